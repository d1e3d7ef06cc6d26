//! Sparse tables in checkpoints end to end, against real `parasync server` processes: a
//! shard killed with SIGKILL comes back from its checkpoint with its table's rows, optimizer
//! slots, admission counts and counters bit for bit, and training goes on exactly as it
//! would have; a checkpoint restored onto another shard count routes the rows by id. A
//! shard whose only state is table rows (the job's small dense variable sits whole on the
//! other shard) writes the same checkpoints: every N steps in sync and async mode, and at
//! the steps shards agree on through the workers' sparse pushes (`--checkpoint-every-s`).

mod common;

use common::{complete_checkpoints, TempDir};

use std::path::{Path, PathBuf};
use std::time::Duration;

use parasync_client::{Admission, Client, Eviction, Init, Optimizer, RowInit, TableOptimizer, TableSpec, VariableSpec};
use parasync_proto::ps::{self, parameter_server_client::ParameterServerClient};

const WORKERS: u32 = 2;
const DIM: usize = 4;
/// Ids the workers draw from (with capacity 10 per shard, rows are evicted).
const POOL: u64 = 90;

/// Adagrad rows, created on an id's second update, at most 10 per shard (least recently
/// used go first).
fn table() -> TableSpec {
    let mut t = TableSpec::new("emb", DIM);
    t.init = RowInit::Uniform { low: -0.5, high: 0.5, seed: 5 };
    t.optimizer = TableOptimizer::Adagrad { lr: 0.1, initial_accumulator: 0.1, epsilon: 1e-7 };
    t.admission = Admission::MinCount(2);
    t.eviction = Eviction::Lru;
    t.capacity = 10;
    t
}

/// The registration a client sends for [`table`], by hand (to read `created`).
fn table_request() -> ps::RegisterTableRequest {
    ps::RegisterTableRequest {
        name: "emb".into(),
        dim: DIM as u32,
        storage_dtype: ps::Dtype::F32 as i32,
        init: Some(ps::RowInitializer { kind: Some(ps::row_initializer::Kind::Uniform(ps::UniformInit { low: -0.5, high: 0.5, seed: 5 })) }),
        optimizer: Some(ps::RowOptimizer {
            kind: Some(ps::row_optimizer::Kind::Adagrad(ps::Adagrad { learning_rate: 0.1, initial_accumulator: 0.1, epsilon: 1e-7 })),
        }),
        admit_min_count: 2,
        admit_probability: 0.0,
        admit_seed: 0,
        eviction: ps::EvictionPolicy::Lru as i32,
        ttl_steps: 0,
        capacity: 10,
    }
}

/// A dense variable split over both shards (split threshold 1 KiB), so each shard has one.
fn dense() -> Vec<VariableSpec> {
    let mut w = VariableSpec::new("w", &[64, 8]);
    w.optimizer = Optimizer::Sgd { lr: 0.05, momentum: 0.9, nesterov: false };
    w.init = Init::Uniform { low: -1.0, high: 1.0, seed: 7 };
    vec![w]
}

/// Worker `w`'s ids at `step`: overlapping, with a repeat and an id seen only once (which
/// stays waiting for admission).
fn batch(w: u32, step: u64) -> Vec<u64> {
    let mut ids: Vec<u64> = (0..10).map(|i| (w as u64 * 11 + step * 7 + i * i * 3) % POOL).collect();
    ids.push(ids[1]);
    ids.push(1_000_000 + step * 10 + w as u64);
    ids
}

/// A gradient of the rows looked up, the worker and the step: any difference in state shows
/// in every later step.
fn row_grads(w: u32, step: u64, rows: &[f32]) -> Vec<f32> {
    rows.iter().enumerate().map(|(i, &x)| (x * 2.3 + (w as f32 + 1.0) * 0.17 + step as f32 * 0.05 + i as f32 * 0.01).sin() * 0.5).collect()
}

fn dense_grads(w: u32, step: u64, values: &[f32]) -> Vec<f32> {
    values.iter().enumerate().map(|(i, &v)| (v * 1.3 + (w as f32 + 1.0) * 0.29 - step as f32 * 0.011 + i as f32 * 1e-3).sin()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}


async fn connect(addrs: &[String], worker: u32) -> Client {
    common::client_at(addrs, worker, 1024, true).await
}

/// A dense variable small enough to be placed whole on one shard: the other holds only
/// table rows.
fn small_dense() -> Vec<VariableSpec> {
    let mut b = VariableSpec::new("bias", &[8]);
    b.optimizer = Optimizer::Sgd { lr: 0.05, momentum: 0.9, nesterov: false };
    b.init = Init::Uniform { low: -1.0, high: 1.0, seed: 3 };
    vec![b]
}

/// The workers train steps `from..to` (per step: look up their ids, push row gradients of
/// what they read, push-pull the dense variable); returns the dense values of step `to`.
async fn train(addrs: &[String], from: u64, to: u64) -> Vec<f32> {
    train_with(addrs, from, to, dense).await
}

/// [`train`] with the dense variables `specs` gives.
async fn train_with(addrs: &[String], from: u64, to: u64, specs: fn() -> Vec<VariableSpec>) -> Vec<f32> {
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let addrs = addrs.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&addrs, w).await;
            c.register(specs()).await.unwrap();
            c.register_table(&table()).await.unwrap();
            let mut params = c.pull(from).await.unwrap();
            for step in from..to {
                let ids = batch(w, step);
                let mut rows = vec![0f32; ids.len() * DIM];
                let version = c.lookup("emb", &ids, step, &mut rows).await.unwrap();
                assert_eq!(version, step, "worker {w} reads step {step}");
                let s = c.push_sparse("emb", &ids, &row_grads(w, step, &rows), step).await.unwrap();
                assert_eq!((s.accepted, s.dropped_stale), (addrs.len(), 0), "{s:?}");
                let grads = dense_grads(w, step, &params[0]);
                c.push_pull(step, &[&grads], &mut params).await.unwrap();
            }
            params.remove(0)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let last = results.pop().unwrap();
    for other in &results {
        assert_eq!(bits(other), bits(&last), "every worker sees the same values");
    }
    last
}

/// Every id of the pool, the once-seen ones of the first steps and a never-seen one.
fn probe_ids() -> Vec<u64> {
    let mut ids: Vec<u64> = (0..POOL).collect();
    ids.extend([1_000_000, 1_000_001, 1_000_010, 424_242]);
    ids
}

/// The rows of [`probe_ids`] as step `step` reads them, as bits.
async fn lookups(addrs: &[String], step: u64) -> Vec<u32> {
    let c = connect(addrs, 0).await;
    let ids = probe_ids();
    let mut rows = vec![0f32; ids.len() * DIM];
    assert_eq!(c.lookup("emb", &ids, step, &mut rows).await.unwrap(), step);
    bits(&rows)
}

/// Per shard, the table's (version, rows, admitted, evicted, dropped) as `ServerInfo` says.
async fn table_counters(addrs: &[String]) -> Vec<(u64, u64, u64, u64, u64)> {
    let info = connect(addrs, 0).await.shard_info().await.unwrap();
    info.iter()
        .map(|i| {
            let t = i.tables.iter().find(|t| t.name == "emb").unwrap_or_else(|| panic!("no table on shard {}: {i:?}", i.shard_index));
            (t.version, t.rows, t.admitted, t.evicted, t.dropped)
        })
        .collect()
}

/// Waits (bounded) until checkpoint `step` is complete: every shard's manifest and the joined one.
async fn complete(dir: &Path, step: u64) -> PathBuf {
    let d = dir.join(format!("step-{step}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !d.join("manifest.json").is_file() {
        assert!(std::time::Instant::now() < deadline, "checkpoint {} was not completed", d.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_killed_after_a_checkpoint_restores_its_table_bit_for_bit_and_trains_on() {
    common::bounded(240, async {
        let sync = ["--mode", "sync", "--num-workers", "2"];
        // Nine steps straight, reading the rows at step 6 and 9.
        let (straight6, straight9, dense9) = {
            let cluster = common::cluster(2, &sync);
            train(&cluster.addrs(), 0, 6).await;
            let l6 = lookups(&cluster.addrs(), 6).await;
            let d9 = train(&cluster.addrs(), 6, 9).await;
            (l6, lookups(&cluster.addrs(), 9).await, d9)
        };

        let dir = TempDir::new("kill");
        let d = dir.0.to_str().unwrap();
        let mut args = sync.to_vec();
        args.extend(["--num-shards", "2", "--checkpoint-dir", d, "--checkpoint-every-steps", "3"]);
        let mut cluster = common::cluster(2, &args);
        let addrs = cluster.addrs();
        train(&addrs, 0, 6).await;
        let step6 = complete(&dir.0, 6).await;
        assert_eq!(lookups(&addrs, 6).await, straight6, "checkpoints change nothing");
        let before = table_counters(&addrs).await;
        assert!(before.iter().all(|c| c.0 == 6 && c.1 > 0 && c.2 > 0 && c.3 > 0 && c.4 > 0), "rows admitted, evicted and dropped: {before:?}");

        // The manifests list the table; `parasync checkpoint inspect` too.
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(step6.join("manifest.json")).unwrap()).unwrap();
        let t = &manifest["tables"][0];
        assert_eq!((t["name"].as_str(), t["dim"].as_u64(), t["version"].as_u64()), (Some("emb"), Some(DIM as u64), Some(6)), "{manifest}");
        assert_eq!(t["rows"].as_u64(), Some(before[0].1 + before[1].1));
        let shard1: serde_json::Value = serde_json::from_slice(&std::fs::read(step6.join("shard-1-of-2.json")).unwrap()).unwrap();
        let e = &shard1["tables"][0];
        assert_eq!(e["counts"]["evicted"].as_u64(), Some(before[1].3), "{e}");
        assert_eq!(e["admission"], serde_json::json!({ "kind": "min_count", "n": 2 }));
        assert_eq!(e["tensors"]["slots"]["accumulator"], "table:emb:accumulator");
        let out = std::process::Command::new(common::exe()).args(["checkpoint", "inspect"]).arg(&step6).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && listing.contains("emb  dim 4 f32  adagrad") && listing.contains("version 6"), "{listing}");

        // Shard 1 dies and comes back from step 6.
        cluster.kill(1);
        cluster.restart(1, &["--restore", "latest"]).unwrap();
        let mut rpc = ParameterServerClient::connect(format!("http://{}", addrs[1])).await.unwrap();
        let created = rpc.register_table(table_request()).await.unwrap().into_inner().created;
        assert!(!created, "the restored table is found, identical, by its registration");
        let info = connect(&addrs, 0).await.shard_info().await.unwrap();
        assert_eq!((info[0].restored_step, info[1].restored_step), (None, Some(6)));
        assert_eq!(table_counters(&addrs).await, before, "version, rows, admitted, evicted and dropped restored");
        assert_eq!(lookups(&addrs, 6).await, straight6, "every row as step 6 left it");

        // Training goes on as it would have without the kill: rows, slots, per-row ticks and
        // admission counts came back exactly.
        let dense9_restored = train(&addrs, 6, 9).await;
        assert_eq!(lookups(&addrs, 9).await, straight9, "rows equal after three more steps");
        assert_eq!(bits(&dense9_restored), bits(&dense9));
        let after = table_counters(&addrs).await;
        assert!(after.iter().all(|c| c.0 == 9), "{after:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_checkpoint_restores_onto_three_shards_by_routing_rows_by_id() {
    common::bounded(240, async {
        let sync = ["--mode", "sync", "--num-workers", "2"];
        let two = TempDir::new("two");
        let mut args = sync.to_vec();
        args.extend(["--num-shards", "2", "--checkpoint-dir", two.0.to_str().unwrap(), "--checkpoint-every-steps", "3"]);
        let cluster = common::cluster(2, &args);
        train(&cluster.addrs(), 0, 6).await;
        let step6 = complete(&two.0, 6).await;
        let at6 = lookups(&cluster.addrs(), 6).await;
        let before = table_counters(&cluster.addrs()).await;
        drop(cluster); // SIGKILL, every shard

        let restore = step6.to_str().unwrap();
        let three = common::cluster(3, &["--mode", "sync", "--num-workers", "2", "--num-shards", "3", "--restore", restore]);
        let addrs = three.addrs();
        let mut rpc = ParameterServerClient::connect(format!("http://{}", addrs[2])).await.unwrap();
        assert!(!rpc.register_table(table_request()).await.unwrap().into_inner().created, "restored before serving");
        assert_eq!(lookups(&addrs, 6).await, at6, "every row found on the shard its id routes to now");
        let after = table_counters(&addrs).await;
        let sum = |v: &[(u64, u64, u64, u64, u64)], f: fn(&(u64, u64, u64, u64, u64)) -> u64| v.iter().map(f).sum::<u64>();
        assert!(after.iter().all(|c| c.0 == 6), "{after:?}");
        assert_eq!(sum(&after, |c| c.1), sum(&before, |c| c.1), "every row kept (the capacity per shard holds them)");
        assert_eq!((sum(&after, |c| c.2), sum(&after, |c| c.3), sum(&after, |c| c.4)), (sum(&before, |c| c.2), sum(&before, |c| c.3), sum(&before, |c| c.4)), "the job's counters add up as before");
        // Training goes on over three shards.
        let values = train(&addrs, 6, 8).await;
        assert!(values.iter().all(|x| x.is_finite()));
        assert!(table_counters(&addrs).await.iter().all(|c| c.0 == 8));
    })
    .await;
}

/// The one shard that holds no dense variable (and the table's rows), by `ServerInfo`.
async fn tables_only_shard(addrs: &[String]) -> usize {
    let info = connect(addrs, 0).await.shard_info().await.unwrap();
    let without: Vec<usize> = info.iter().filter(|i| i.variables.is_empty()).map(|i| i.shard_index as usize).collect();
    assert_eq!(without.len(), 1, "the small variable sits whole on one shard: {info:?}");
    let k = without[0];
    assert!(info[k].tables.iter().any(|t| t.name == "emb" && t.rows > 0), "shard {k} holds table rows: {:?}", info[k]);
    k
}

/// Shard `shard`'s manifest of the checkpoint in `dir`.
fn shard_manifest(dir: &Path, shard: usize) -> serde_json::Value {
    let path = dir.join(format!("shard-{shard}-of-2.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_of_tables_alone_writes_every_n_steps_and_comes_back_from_sigkill_bit_for_bit() {
    common::bounded(240, async {
        let sync = ["--mode", "sync", "--num-workers", "2"];
        // Nine steps straight, reading the rows at step 9.
        let straight9 = {
            let cluster = common::cluster(2, &sync);
            train_with(&cluster.addrs(), 0, 9, small_dense).await;
            lookups(&cluster.addrs(), 9).await
        };

        let dir = TempDir::new("tables-only");
        let mut args = sync.to_vec();
        args.extend(["--num-shards", "2", "--checkpoint-dir", dir.0.to_str().unwrap(), "--checkpoint-every-steps", "3"]);
        let mut cluster = common::cluster(2, &args);
        let addrs = cluster.addrs();
        train_with(&addrs, 0, 6, small_dense).await;
        let k = tables_only_shard(&addrs).await;
        let step3 = complete(&dir.0, 3).await;
        let step6 = complete(&dir.0, 6).await;
        let at6 = lookups(&addrs, 6).await;
        let before = table_counters(&addrs).await;
        for (step, d) in [(3u64, &step3), (6, &step6)] {
            let m = shard_manifest(d, k);
            assert_eq!(m["variables"].as_array().map(Vec::len), Some(0), "{m}");
            let t = &m["tables"][0];
            assert_eq!((t["name"].as_str(), t["version"].as_u64()), (Some("emb"), Some(step)), "{m}");
        }
        assert_eq!(shard_manifest(&step6, k)["tables"][0]["rows"].as_u64(), Some(before[k].1));

        // The shard of table rows alone dies and comes back from step 6.
        cluster.kill(k);
        cluster.restart(k, &["--restore", "latest"]).unwrap();
        let info = connect(&addrs, 0).await.shard_info().await.unwrap();
        assert_eq!(info[k].restored_step, Some(6), "{:?}", info[k]);
        assert_eq!(info[1 - k].restored_step, None);
        assert_eq!(table_counters(&addrs).await, before, "version, rows, admitted, evicted and dropped restored");
        assert_eq!(lookups(&addrs, 6).await, at6, "every row as step 6 left it");

        // Training goes on as it would have without the kill.
        train_with(&addrs, 6, 9, small_dense).await;
        assert_eq!(lookups(&addrs, 9).await, straight9, "rows equal after three more steps");
        complete(&dir.0, 9).await;

        // A checkpoint a client asks for: the shard of table rows alone writes its part too.
        let files = connect(&addrs, 0).await.checkpoint(9).await.unwrap();
        let mine = files.iter().find(|f| f.shard == k).unwrap();
        assert_eq!(mine.step, 9);
        assert!(mine.path.ends_with(&format!("shard-{k}-of-2.safetensors")), "{mine:?}");
        let m = shard_manifest(&complete(&dir.0, 9).await, k);
        assert_eq!((m["tables"][0]["name"].as_str(), m["tables"][0]["version"].as_u64()), (Some("emb"), Some(9)), "{m}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_shard_of_tables_alone_writes_its_checkpoints_at_the_first_push_of_the_step() {
    common::bounded(240, async {
        let dir = TempDir::new("tables-only-async");
        let args = [
            "--mode", "async", "--num-workers", "1", "--num-shards", "2",
            "--checkpoint-dir", dir.0.to_str().unwrap(), "--checkpoint-every-steps", "3",
        ];
        let mut cluster = common::cluster(2, &args);
        let addrs = cluster.addrs();
        let mut c = connect(&addrs, 0).await;
        c.register(small_dense()).await.unwrap();
        c.register_table(&table()).await.unwrap();
        let mut params = c.pull(0).await.unwrap();
        let probe = probe_ids();
        let mut at3 = Vec::new();
        for step in 0..5u64 {
            if step == 3 {
                // What the first push of step 3 finds: the checkpoint takes it before applying it.
                at3 = vec![0f32; probe.len() * DIM];
                c.lookup("emb", &probe, step, &mut at3).await.unwrap();
            }
            let ids = batch(0, step);
            let mut rows = vec![0f32; ids.len() * DIM];
            c.lookup("emb", &ids, step, &mut rows).await.unwrap();
            let s = c.push_sparse("emb", &ids, &row_grads(0, step, &rows), step).await.unwrap();
            assert_eq!(s.accepted, 2, "{s:?}");
            let grads = dense_grads(0, step, &params[0]);
            c.push_pull(step, &[&grads], &mut params).await.unwrap();
        }
        let k = tables_only_shard(&addrs).await;
        let step3 = complete(&dir.0, 3).await;
        let m = shard_manifest(&step3, k);
        assert_eq!(m["variables"].as_array().map(Vec::len), Some(0), "{m}");
        assert_eq!((m["mode"].as_str(), m["tables"][0]["name"].as_str(), m["tables"][0]["version"].as_u64()), (Some("async"), Some("emb"), Some(3)), "{m}");
        let joined: serde_json::Value = serde_json::from_slice(&std::fs::read(step3.join("manifest.json")).unwrap()).unwrap();
        let shards: Vec<u64> = joined["tables"][0]["shards"].as_array().unwrap().iter().map(|s| s["shard"].as_u64().unwrap()).collect();
        assert_eq!((joined["tables"][0]["name"].as_str(), shards), (Some("emb"), vec![0, 1]), "{joined}");

        // Killed and restored, the shard holds its rows as step 3's first push found them.
        cluster.kill(k);
        cluster.restart(k, &["--restore", step3.to_str().unwrap()]).unwrap();
        let mut back = vec![0f32; probe.len() * DIM];
        connect(&addrs, 0).await.lookup("emb", &probe, 3, &mut back).await.unwrap();
        let on_k = |rows: &[f32]| -> Vec<u32> {
            probe
                .iter()
                .zip(rows.chunks_exact(DIM))
                .filter(|(&id, _)| parasync_proto::sparse::shard_of_id(id, 2) == k)
                .flat_map(|(_, r)| bits(r))
                .collect()
        };
        assert!(!on_k(&at3).is_empty());
        assert_eq!(on_k(&back), on_k(&at3), "shard {k}'s rows bit for bit");
        let info = connect(&addrs, 0).await.shard_info().await.unwrap();
        assert_eq!(info[k].tables[0].version, 3);
    })
    .await;
}


/// `--checkpoint-every-s` in a job of a table alone: the sparse pushes' replies name the
/// steps and the workers pass them on in their sparse pushes, so both shards write the same
/// steps (sync: each table exactly as that step left it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_based_checkpoints_of_a_job_of_tables_alone_are_agreed_through_sparse_pushes() {
    common::bounded(240, async {
        for mode in ["sync", "async"] {
            let dir = TempDir::new(&format!("tables-timed-{mode}"));
            let args = [
                "--mode", mode, "--num-workers", "2", "--num-shards", "2", "--checkpoint-dir", dir.0.to_str().unwrap(),
                "--checkpoint-every-s", "0.25", "--keep-checkpoints", "1000",
            ];
            let cluster = common::cluster(2, &args);
            let mut tasks = Vec::new();
            for w in 0..WORKERS {
                let addrs = cluster.addrs();
                tasks.push(tokio::spawn(async move {
                    let c = connect(&addrs, w).await;
                    c.register_table(&table()).await.unwrap();
                    for step in 0..40u64 {
                        let ids = batch(w, step);
                        let mut rows = vec![0f32; ids.len() * DIM];
                        c.lookup("emb", &ids, step, &mut rows).await.unwrap();
                        c.push_sparse("emb", &ids, &row_grads(w, step, &rows), step).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let steps = complete_checkpoints(&dir.0, 2).await;
            eprintln!("{mode}: complete checkpoints at steps {steps:?}");
            assert!(steps.len() >= 2, "{mode}: about one checkpoint per 0.25 s of a ≥ 1 s run: {steps:?}");
            for &s in &steps {
                let d = dir.0.join(format!("step-{s}"));
                for shard in 0..2 {
                    let m = shard_manifest(&d, shard);
                    let t = &m["tables"][0];
                    assert_eq!(t["name"].as_str(), Some("emb"), "{m}");
                    if mode == "sync" {
                        assert_eq!(t["version"].as_u64(), Some(s), "sync: step {s} holds the table as that step left it: {m}");
                    }
                }
            }
            drop(cluster);
        }
    })
    .await;
}
