"""Sparse tables through PsClient (register_table, lookup, push_sparse, shard_info's tables)
against real `parasync server` processes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import parasync

# Ids that spread over two shards and include a large one.
IDS = np.array([3, 7, 3, 2**40 + 5, 7, 3, 11, 2**63 + 1], dtype=np.uint64)


def table_info(client: parasync.PsClient, name: str) -> dict:
    """The table's counters summed over the shards (its dim and version from the first)."""
    found = [t for shard in client.shard_info() for t in shard["tables"] if t["name"] == name]
    assert len(found) == client.num_shards, f"table {name!r} is not on every shard"
    total = dict(found[0])
    for key in ("rows", "admitted", "evicted", "dropped", "rows_looked_up", "rows_pushed"):
        total[key] = sum(t[key] for t in found)
    return total


@pytest.mark.parametrize("shards,dtype", [(1, "f32"), (2, "f32"), (2, "bf16")])
def test_async_pushes_of_repeated_ids_subtract_exactly_and_lookup_fills_out_in_place(cluster, shards, dtype):
    cl = cluster(shards=shards, mode="async")
    dim = 5
    with parasync.PsClient(cl.addresses, timeout=10, pull_timeout=10) as c:
        c.register_table(parasync.TableSpec("emb", dim, dtype=dtype, optimizer=parasync.SGD(1.0)))
        assert np.array_equal(c.lookup("emb", IDS), np.zeros((len(IDS), dim), np.float32))

        rng = np.random.default_rng(5)
        expected = {int(i): np.zeros(dim, np.float32) for i in IDS}
        for step in range(3):
            grads = rng.integers(-4, 5, size=(len(IDS), dim)).astype(np.float32)
            if step == 1:
                grads = grads.reshape(-1)  # a flat gradient is taken too
            s = c.push_sparse("emb", IDS, grads, step=step)
            assert isinstance(s, parasync.SparsePushSummary)
            assert (s.accepted, s.dropped_stale, s.unique_ids) == (shards, 0, 5)
            assert len(s.staleness) == shards
            for i, g in zip(IDS, grads.reshape(len(IDS), dim)):
                expected[int(i)] -= g

        want = np.stack([expected[int(i)] for i in IDS])
        got = c.lookup("emb", IDS)
        assert got.dtype == np.float32 and got.shape == (len(IDS), dim)
        assert np.array_equal(got, want)

        out = np.full((len(IDS), dim), np.nan, np.float32)
        returned = c.lookup("emb", IDS, out=out)
        assert returned is out
        assert np.array_equal(out, want)

        # Non-negative int64 ids read as the same uint64 ids (the largest id does not fit).
        small = IDS[:-1]
        assert np.array_equal(c.lookup("emb", small.astype(np.int64)), want[:-1])
        assert c.lookup("emb", np.array([], np.uint64)).shape == (0, dim)

        info = table_info(c, "emb")
        assert (info["dim"], info["rows"], info["admitted"], info["dropped"]) == (dim, 5, 5, 0)
        assert info["rows_pushed"] == 3 * 5


def test_row_initializers_give_the_same_rows_on_every_lookup_and_every_client(cluster):
    cl = cluster(shards=2, mode="async")
    ids = np.arange(100, 140, dtype=np.uint64)
    with parasync.PsClient(cl.addresses, timeout=10) as a, parasync.PsClient(cl.addresses, worker_id=1, timeout=10) as b:
        a.register_table(parasync.TableSpec("u", 8, init=parasync.RowUniform(-0.5, 0.5, seed=9), optimizer=parasync.Adagrad(0.1)))
        a.register_table(parasync.TableSpec("n", 8, init=parasync.RowNormal(0.0, 1.0, seed=9), optimizer=parasync.Ftrl(0.1)))
        first = a.lookup("u", ids)
        assert np.all((first >= -0.5) & (first < 0.5))
        assert len(np.unique(first)) > 300, "rows should differ by id and element"
        assert np.array_equal(a.lookup("u", ids), first)
        # `b` never registered the tables: it learns their width from the shards.
        assert np.array_equal(b.lookup("u", ids), first)
        # The rows depend on the id, not on its place in the batch.
        assert np.array_equal(b.lookup("u", ids[::-1].copy()), first[::-1])
        normal = b.lookup("n", ids)
        assert np.array_equal(a.lookup("n", ids), normal)
        assert not np.array_equal(normal, first)
        assert abs(float(normal.mean())) < 0.3 and 0.7 < float(normal.std()) < 1.3
        # Lookups create no rows.
        assert table_info(a, "u")["rows"] == 0


def _bad_calls():
    ids = np.array([1, 2, 3], np.uint64)
    g = np.ones((3, 4), np.float32)
    out = np.zeros((3, 4), np.float32)
    read_only = np.zeros((3, 4), np.float32)
    read_only.flags.writeable = False
    return [
        ("float64 ids", lambda c: c.lookup("emb", ids.astype(np.float64)), TypeError, 'table "emb": ids must be uint64'),
        ("list ids", lambda c: c.push_sparse("emb", [1, 2, 3], g), TypeError, 'table "emb": ids must be a 1-D numpy.ndarray'),
        ("2-D ids", lambda c: c.lookup("emb", ids.reshape(3, 1)), ValueError, 'table "emb": ids must be 1-D'),
        ("negative int64 ids", lambda c: c.push_sparse("emb", np.array([1, -2, 3]), g), ValueError, "ids[1] is -2"),
        ("non-contiguous ids", lambda c: c.lookup("emb", np.arange(6, dtype=np.uint64)[::2]), ValueError, "ids array is not contiguous"),
        ("grads of the wrong shape", lambda c: c.push_sparse("emb", ids, np.ones((3, 5), np.float32)), ValueError,
         'table "emb": grads has shape [3, 5], expected [3, 4] or [12]'),
        ("grads of the wrong dtype", lambda c: c.push_sparse("emb", ids, g.astype(np.float64)), TypeError,
         'table "emb": grads must be a numpy.ndarray of float32'),
        ("non-contiguous grads", lambda c: c.push_sparse("emb", ids, np.ones((4, 3), np.float32).T), ValueError,
         'table "emb": grads is not C-contiguous'),
        ("read-only out", lambda c: c.lookup("emb", ids, out=read_only), ValueError, 'table "emb": out is read-only'),
        ("out of the wrong shape", lambda c: c.lookup("emb", ids, out=out[:2]), ValueError, 'table "emb": out has shape [2, 4]'),
        ("flat out", lambda c: c.lookup("emb", ids, out=out.reshape(-1)), ValueError, 'table "emb": out has shape [12]'),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_naming_the_table_and_send_nothing(cluster, case):
    _, call, exc, message = case
    cl = cluster(shards=1, mode="async")
    with parasync.PsClient(cl.addresses, timeout=10) as c:
        c.register_table(parasync.TableSpec("emb", 4, optimizer=parasync.SGD(1.0)))
        c.push_sparse("emb", np.array([1], np.uint64), np.ones((1, 4), np.float32))
        before = table_info(c, "emb")
        with pytest.raises(exc) as info:
            call(c)
        assert message in str(info.value)
        assert table_info(c, "emb") == before
        rows = c.lookup("emb", np.array([1, 2], np.uint64))
        assert np.array_equal(rows, np.array([[-1] * 4, [0] * 4], np.float32))


def test_server_refusals_map_to_exception_classes_and_the_server_keeps_serving(cluster):
    cl = cluster(shards=1, mode="async")
    ids = np.array([4, 9], np.uint64)
    with parasync.PsClient(cl.addresses, timeout=10) as c:
        c.register_table(parasync.TableSpec("emb", 3, init=parasync.RowUniform(0.0, 1.0, seed=2), optimizer=parasync.SGD(1.0)))
        c.push_sparse("emb", ids, np.ones((2, 3), np.float32))
        before = c.lookup("emb", ids)

        for call in (lambda: c.lookup("nope", ids), lambda: c.push_sparse("nope", ids, np.ones((2, 3), np.float32))):
            with pytest.raises(parasync.PsNotFoundError) as nf:
                call()
            assert isinstance(nf.value, LookupError) and '"nope"' in str(nf.value)

        bad = np.ones((2, 3), np.float32)
        bad[1, 2] = np.nan
        with pytest.raises(parasync.PsInvalidArgumentError) as inv:
            c.push_sparse("emb", ids, bad)
        assert '"emb"' in str(inv.value) and "non-finite" in str(inv.value)

        with pytest.raises(parasync.PsAlreadyExistsError):
            c.register_table(parasync.TableSpec("emb", 3, optimizer=parasync.SGD(1.0)))
        assert np.array_equal(c.lookup("emb", ids), before)
        assert table_info(c, "emb")["rows_pushed"] == 2


def test_specs_refused_before_anything_is_sent(cluster):
    cl = cluster(shards=1, mode="async")
    T = parasync.TableSpec
    cases = [
        (T("t", 4, optimizer=parasync.SGD(0.1, momentum=0.9)), ValueError, "table 't': SGD for a table has no momentum"),
        (T("t", 4, optimizer=parasync.SGD(0.1, nesterov=True)), ValueError, "no momentum"),
        (T("t", 4, optimizer=parasync.Adam(0.1, weight_decay=0.1)), ValueError, "table 't': Adam for a table has no weight decay"),
        (T("t", 4, optimizer=parasync.AdamW(0.1)), ValueError, "AdamW for a table has no weight decay"),
        (T("t", 4, init=parasync.Uniform(0, 1)), TypeError, "init must be None, RowUniform or RowNormal"),
        (T("t", 0), ValueError, "dim must be a positive int"),
        (T("t", 4, dtype="f16"), ValueError, "dtype must be 'f32' or 'bf16'"),
        (T("t", 4, min_count=2, admit_probability=0.5), ValueError, "min_count and admit_probability are alternatives"),
        (T("t", 4, min_count=0), ValueError, "min_count must be a positive int"),
        (T("t", 4, admit_probability=1.5), ValueError, "admit_probability must be in (0, 1]"),
        (T("t", 4, eviction="lru"), ValueError, "eviction 'lru' needs a capacity"),
        (T("t", 4, eviction=("ttl", 0)), ValueError, "needs steps >= 1"),
        (T("t", 4, eviction="fifo"), ValueError, "eviction must be None, 'lru', 'lfu' or ('ttl', steps)"),
    ]
    with parasync.PsClient(cl.addresses, timeout=10) as c:
        for spec, exc, message in cases:
            with pytest.raises(exc) as info:
                c.register_table(spec)
            assert message in str(info.value), (spec, str(info.value))
        with pytest.raises(TypeError, match="takes a parasync.TableSpec"):
            c.register_table(parasync.VariableSpec("t", (4,)))
        with pytest.raises(TypeError, match="Ftrl is for sparse tables"):
            c.register([parasync.VariableSpec("w", (4,), parasync.Ftrl(0.1))])
        assert all(shard["tables"] == [] for shard in c.shard_info())
        # Accepted forms: AdamW without decay is Adam; LFU with a capacity; a TTL.
        c.register_table(T("a", 2, optimizer=parasync.AdamW(0.1, weight_decay=0.0), eviction="lfu", capacity=10))
        c.register_table(T("b", 2, optimizer=parasync.Adagrad(0.1), eviction=("ttl", 5), admit_probability=0.5, admit_seed=3))
        assert sorted(t["name"] for t in c.shard_info()[0]["tables"]) == ["a", "b"]


def test_min_count_admission_keeps_the_initial_row_until_the_nth_update(cluster):
    cl = cluster(shards=1, mode="async")
    ids = np.array([42], np.uint64)
    with parasync.PsClient(cl.addresses, timeout=10) as c:
        c.register_table(parasync.TableSpec("adm", 2, init=parasync.RowUniform(1.0, 2.0, seed=4), optimizer=parasync.SGD(1.0), min_count=2))
        initial = c.lookup("adm", ids)
        c.push_sparse("adm", ids, np.ones((1, 2), np.float32))
        assert np.array_equal(c.lookup("adm", ids), initial)
        info = table_info(c, "adm")
        assert (info["dropped"], info["rows"], info["admitted"]) == (1, 0, 0)
        # The second update creates the row and is applied to it.
        c.push_sparse("adm", ids, np.ones((1, 2), np.float32))
        info = table_info(c, "adm")
        assert (info["dropped"], info["rows"], info["admitted"]) == (1, 1, 1)
        assert np.array_equal(c.lookup("adm", ids), initial - np.float32(1.0))


def test_threads_look_up_and_push_at_once_on_one_client(cluster):
    cl = cluster(shards=2, mode="async")
    dim, rounds = 6, 40
    ids = np.arange(0, 64, dtype=np.uint64)
    errors: list[BaseException] = []
    with parasync.PsClient(cl.addresses, timeout=10) as c:
        c.register_table(parasync.TableSpec("emb", dim, optimizer=parasync.SGD(1.0)))

        def pusher() -> None:
            try:
                for step in range(rounds):
                    c.push_sparse("emb", ids, np.ones((len(ids), dim), np.float32), step=step)
            except BaseException as e:  # reported below
                errors.append(e)

        def looker() -> None:
            try:
                out = np.empty((len(ids), dim), np.float32)
                last = 0.0
                for _ in range(rounds):
                    c.lookup("emb", ids, out=out)
                    # Every row moves the same way; pushes only lower the values.
                    assert out.max() <= last
                    last = float(out.max())
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=pusher), threading.Thread(target=looker)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads), "a thread did not finish"
        assert not errors, errors
        assert np.array_equal(c.lookup("emb", ids), np.full((len(ids), dim), -float(rounds), np.float32))


def test_a_lookup_waiting_for_its_sync_step_does_not_hold_up_a_push_from_another_thread(cluster):
    cl = cluster(shards=1, mode="sync", num_workers=1)
    ids = np.array([5, 6], np.uint64)
    with parasync.PsClient(cl.addresses, timeout=10, pull_timeout=20) as c:
        c.register_table(parasync.TableSpec("emb", 2, optimizer=parasync.SGD(1.0)))
        got: dict = {}

        def waiting_lookup() -> None:
            try:
                got["rows"] = c.lookup("emb", ids, step=1)  # waits for step 0's push
            except BaseException as e:  # reported below
                got["error"] = e

        th = threading.Thread(target=waiting_lookup)
        th.start()
        time.sleep(0.3)
        assert th.is_alive(), "the lookup for step 1 should still be waiting"
        s = c.push_sparse("emb", ids, np.full((2, 2), 3.0, np.float32), step=0)
        assert s.accepted == 1
        th.join(10)
        assert not th.is_alive(), "the waiting lookup did not return after the step completed"
        assert "error" not in got, got.get("error")
        assert np.array_equal(got["rows"], np.full((2, 2), -3.0, np.float32))
