//! Sparse tables end to end, against real `parasync server` processes: sync training over two
//! shards equals a single-process reference bit for bit, async pushes of eight workers add
//! up exactly, and every class of bad input gets the right status and changes nothing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::raw::{f32_bytes, Raw};
use parasync_client::{Admission, Client, ClientOptions, DType, Eviction, RowInit, TableOptimizer, TableSpec};
use parasync_proto::ps::{self, data_request::Op, parameter_server_client::ParameterServerClient};
use ps_server::sparse as server;
use tonic::Code;

const DIM: usize = 5;

/// Worker `w`'s ids at `step`: overlapping between workers, with repeats in one batch.
fn batch(w: u32, step: u64) -> Vec<u64> {
    let mut ids: Vec<u64> = (0..12).map(|i| (w as u64 * 3 + step * 5 + i * i) % 37).collect();
    ids.push(ids[0]);
    ids.push(1_000_000_007 * (w as u64 + 1));
    ids
}

/// A gradient value that is not a round number (so the order of sums shows in the bits).
fn grad(w: u32, step: u64, pos: usize, e: usize) -> f32 {
    ((w as f32 + 1.3) * (step as f32 + 0.7) * (pos as f32 + 1.1) * (e as f32 + 0.9)).sin() / 7.0
}

fn grads(w: u32, step: u64, n: usize) -> Vec<f32> {
    (0..n * DIM).map(|i| grad(w, step, i / DIM, i % DIM)).collect()
}

fn spec() -> TableSpec {
    let mut s = TableSpec::new("emb", DIM);
    s.init = RowInit::Uniform { low: -0.5, high: 0.5, seed: 11 };
    s.optimizer = TableOptimizer::Adam { lr: 0.05, beta1: 0.9, beta2: 0.99, epsilon: 1e-6 };
    s
}

fn options(worker: u32, data_plane: bool) -> ClientOptions {
    ClientOptions {
        worker_id: worker,
        data_plane,
        pull_timeout: Some(Duration::from_secs(20)),
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// The rows after `steps` sync steps of 4 workers, computed in this process with nothing but
/// the row optimizer: per worker the rows of repeated ids summed in order, per step the
/// mean over the workers summed in worker order.
fn reference(steps: u64) -> HashMap<u64, Vec<f32>> {
    let init = server::RowInit::Uniform { low: -0.5, high: 0.5, seed: 11 };
    let opt = server::RowOptimizer::Adam { lr: 0.05, beta1: 0.9, beta2: 0.99, epsilon: 1e-6 };
    // id → (row, m, v, steps)
    let mut rows: HashMap<u64, (Vec<f32>, Vec<f32>, Vec<f32>, u32)> = HashMap::new();
    for step in 0..steps {
        let mut order: Vec<u64> = Vec::new();
        let mut sums: HashMap<u64, Vec<f32>> = HashMap::new();
        for w in 0..4 {
            let ids = batch(w, step);
            let g = grads(w, step, ids.len());
            let mut mine: Vec<(u64, Vec<f32>)> = Vec::new();
            for (pos, &id) in ids.iter().enumerate() {
                let row = &g[pos * DIM..(pos + 1) * DIM];
                match mine.iter_mut().find(|(i, _)| *i == id) {
                    Some((_, acc)) => acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x),
                    None => mine.push((id, row.iter().map(|&x| 0.0 + x).collect())),
                }
            }
            for (id, row) in mine {
                match sums.get_mut(&id) {
                    Some(acc) => acc.iter_mut().zip(&row).for_each(|(a, &x)| *a += x),
                    None => {
                        order.push(id);
                        sums.insert(id, row);
                    }
                }
            }
        }
        for id in order {
            let mean: Vec<f32> = sums[&id].iter().map(|&s| s / 4.0).collect();
            let (w, m, v, t) = rows.entry(id).or_insert_with(|| {
                let mut r = vec![0.0; DIM];
                init.fill(id, &mut r);
                (r, vec![0.0; DIM], vec![0.0; DIM], 0)
            });
            opt.apply(0.05, w, m, v, t, &mean);
        }
    }
    rows.into_iter().map(|(id, (w, ..))| (id, w)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_training_over_two_shards_equals_the_single_process_reference_bit_for_bit() {
    let cluster = common::cluster(2, &["--mode", "sync", "--num-workers", "4"]);
    const STEPS: u64 = 6;
    common::bounded(120, async {
        let mut workers = Vec::new();
        for w in 0..4u32 {
            let addrs = cluster.addrs();
            workers.push(tokio::spawn(async move {
                // Two workers over the data plane, two over gRPC.
                let c = Client::connect(&addrs, options(w, w % 2 == 0)).await.unwrap();
                c.register_table(&spec()).await.unwrap();
                for step in 0..STEPS {
                    let ids = batch(w, step);
                    let mut rows = vec![0.0; ids.len() * DIM];
                    c.lookup("emb", &ids, step, &mut rows).await.unwrap();
                    let s = c.push_sparse("emb", &ids, &grads(w, step, ids.len()), step).await.unwrap();
                    assert_eq!(s.accepted, 2, "both shards took the push");
                    assert_eq!(s.unique_ids, ids.len() - 1);
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        let expect = reference(STEPS);
        let c = Client::connect(&cluster.addrs(), options(0, true)).await.unwrap();
        let mut ids: Vec<u64> = expect.keys().copied().collect();
        ids.sort();
        ids.push(424242); // never pushed: its initial row
        let mut rows = vec![0.0; ids.len() * DIM];
        let version = c.lookup("emb", &ids, STEPS, &mut rows).await.unwrap();
        assert_eq!(version, STEPS);
        for (k, id) in ids.iter().enumerate() {
            let got = &rows[k * DIM..(k + 1) * DIM];
            let want = expect.get(id).cloned().unwrap_or_else(|| {
                let mut r = vec![0.0; DIM];
                server::RowInit::Uniform { low: -0.5, high: 0.5, seed: 11 }.fill(*id, &mut r);
                r
            });
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(&want), "row of id {id}");
        }
        // Both shards hold rows, and ServerInfo lists the table with its counters.
        let mut rpc = ParameterServerClient::connect(format!("http://{}", cluster.addrs()[0])).await.unwrap();
        let info = rpc.server_info(ps::ServerInfoRequest {}).await.unwrap().into_inner();
        let t = info.tables.iter().find(|t| t.name == "emb").expect("the table is listed");
        assert!(t.rows > 5 && t.rows < expect.len() as u64, "{t:?}");
        assert_eq!((t.dim, t.optimizer.as_str(), t.version, t.dropped), (DIM as u32, "adam", STEPS, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_pushes_of_eight_workers_add_up_exactly() {
    let cluster = common::cluster(2, &["--mode", "async", "--num-workers", "8"]);
    const STEPS: u64 = 10;
    let ids_of = |w: u32, step: u64| -> Vec<u64> { (0..20).map(|i| (i * 7 + w as u64 + step) % 50).chain([w as u64 % 3]).collect() };
    let g = |w: u32, step: u64, pos: usize| ((w as u64 * 31 + step * 7 + pos as u64) % 11) as f32 - 5.0;
    common::bounded(120, async {
        let mut workers = Vec::new();
        for w in 0..8u32 {
            let addrs = cluster.addrs();
            workers.push(tokio::spawn(async move {
                let c = Client::connect(&addrs, options(w, w % 2 == 1)).await.unwrap();
                let mut s = TableSpec::new("t", 3);
                s.optimizer = TableOptimizer::Sgd { lr: 1.0 };
                c.register_table(&s).await.unwrap();
                for step in 0..STEPS {
                    let ids = ids_of(w, step);
                    let grads: Vec<f32> = (0..ids.len()).flat_map(|p| [g(w, step, p), 2.0 * g(w, step, p), 1.0]).collect();
                    c.push_sparse("t", &ids, &grads, step).await.unwrap();
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        let mut expect: HashMap<u64, [f32; 3]> = HashMap::new();
        for w in 0..8 {
            for step in 0..STEPS {
                for (p, id) in ids_of(w, step).into_iter().enumerate() {
                    let e = expect.entry(id).or_insert([0.0; 3]);
                    e[0] -= g(w, step, p);
                    e[1] -= 2.0 * g(w, step, p);
                    e[2] -= 1.0;
                }
            }
        }
        let c = Client::connect(&cluster.addrs(), options(0, false)).await.unwrap();
        let ids: Vec<u64> = (0..50).collect();
        let mut rows = vec![0.0; 150];
        c.lookup("t", &ids, 0, &mut rows).await.unwrap();
        for id in 0..50u64 {
            let want = expect.get(&id).copied().unwrap_or([0.0; 3]);
            assert_eq!(rows[id as usize * 3..id as usize * 3 + 3], want, "row of id {id}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_table_requests_get_the_right_status_and_change_nothing() {
    let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "2"]);
    common::bounded(60, async {
        let c = Client::connect(&cluster.addrs(), options(0, true)).await.unwrap();
        let mut s = TableSpec::new("emb", 4);
        s.dtype = DType::Bf16;
        s.admission = Admission::MinCount(1);
        s.eviction = Eviction::Lru;
        s.capacity = 100;
        c.register_table(&s).await.unwrap();
        c.register_table(&s).await.expect("an identical registration is fine");
        c.push_sparse("emb", &[1, 2], &[1.0; 8], 0).await.unwrap();
        let snapshot = || async {
            let mut rows = vec![0.0; 12];
            c.lookup("emb", &[1, 2, 3], 0, &mut rows).await.unwrap();
            rows
        };
        let before = snapshot().await;
        let mut rpc = ParameterServerClient::connect(format!("http://{}", cluster.addrs()[0])).await.unwrap();
        let ids = |v: &[u64]| -> bytes::Bytes { v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into() };
        let f32w = ps::Dtype::F32 as i32;
        let push = |table: &str, id: &[u64], rows: &[f32]| ps::PushSparseRequest {
            table: table.into(),
            ids: ids(id),
            rows: f32_bytes(rows).into(),
            wire_dtype: f32w,
            ..Default::default()
        };
        let cases: Vec<(&str, ps::PushSparseRequest, Code, &str)> = vec![
            ("unknown table", push("nope", &[1], &[1.0; 4]), Code::NotFound, "\"nope\""),
            ("fewer rows than ids", push("emb", &[1, 2], &[1.0; 4]), Code::InvalidArgument, "2 ids need 8 row values"),
            ("rows of the wrong dim", push("emb", &[1, 2], &[1.0; 10]), Code::InvalidArgument, "(4 per row)"),
            ("NaN", push("emb", &[1, 2], &[1.0, 1.0, f32::NAN, 1.0, 1.0, 1.0, 1.0, 1.0]), Code::InvalidArgument, "non-finite"),
            ("Inf", push("emb", &[2], &[1.0, 1.0, f32::INFINITY, 1.0]), Code::InvalidArgument, "id 2"),
            (
                "ids not whole u64s",
                ps::PushSparseRequest { ids: vec![0u8; 12].into(), ..push("emb", &[], &[]) },
                Code::InvalidArgument,
                "8 bytes each",
            ),
            ("no wire dtype", ps::PushSparseRequest { wire_dtype: 0, ..push("emb", &[1], &[1.0; 4]) }, Code::InvalidArgument, "wire_dtype"),
            ("unknown worker", ps::PushSparseRequest { worker_id: 9, ..push("emb", &[1], &[1.0; 4]) }, Code::InvalidArgument, "worker"),
        ];
        for (what, req, code, needle) in cases {
            let e = rpc.push_sparse(req).await.expect_err(what);
            assert_eq!(e.code(), code, "{what}: {}", e.message());
            assert!(e.message().contains(needle), "{what}: {:?} should mention {needle:?}", e.message());
            if what != "unknown table" {
                assert!(e.message().contains("\"emb\""), "{what}: the table is named: {}", e.message());
            }
        }
        let lookup = |table: &str, id: &[u64]| ps::LookupRequest { table: table.into(), ids: ids(id), wire_dtype: f32w, ..Default::default() };
        let e = rpc.lookup(lookup("nope", &[1])).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = rpc.lookup(ps::LookupRequest { ids: vec![1u8; 7].into(), ..lookup("emb", &[]) }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        // A client that did not register the table: the row width comes from the buffers,
        // an empty batch needs none, and empty rows for ids are a usage error, not a panic.
        let other = Client::connect(&cluster.addrs(), options(1, false)).await.unwrap();
        let e = other.push_sparse("emb", &[1, 2], &[], 0).await.unwrap_err();
        assert_eq!(e.kind, parasync_client::ErrorKind::Usage, "{e}");
        other.push_sparse("emb", &[], &[], 0).await.expect("an empty push");
        let mut one = [0f32; 4];
        other.lookup("emb", &[1], 0, &mut one).await.unwrap();
        assert_eq!(one[..], before[..4]);
        // Registrations that disagree, or make no sense.
        let mut other = s.clone();
        other.dim = 8;
        let e = c.register_table(&other).await.unwrap_err();
        assert!(e.message.contains("dim 4 vs 8"), "{e}");
        let mut bad = TableSpec::new("lru-without-capacity", 4);
        bad.eviction = Eviction::Lru;
        let e = c.register_table(&bad).await.unwrap_err();
        assert!(e.message.contains("needs a capacity"), "{e}");
        // The data plane answers the same, and the connection goes on.
        let data = c.shard_info().await.unwrap()[0].data_plane.clone().expect("a data plane");
        let mut raw = Raw::open(&data);
        let op = |table: &str, n: u64| Some(Op::PushSparse(ps::PushSparseRequest { table: table.into(), num_ids: n, wire_dtype: f32w, ..Default::default() }));
        let mut payload = ids(&[1, 2]).to_vec();
        payload.extend(f32_bytes(&[1.0; 6]));
        raw.send(op("emb", 2), &payload);
        raw.expect(Code::InvalidArgument, "2 ids need 8 row values", "short rows on the data plane");
        raw.send(op("emb", 9), &payload);
        raw.expect(Code::InvalidArgument, "num_ids 9", "num_ids past the payload");
        raw.send(op("nope", 2), &payload);
        raw.expect(Code::NotFound, "nope", "unknown table on the data plane");
        let lookup_op = Some(Op::Lookup(ps::LookupRequest { table: "emb".into(), num_ids: 1, wire_dtype: f32w, ..Default::default() }));
        raw.send(lookup_op, &ids(&[1]));
        let (reply, rows) = raw.reply();
        assert_eq!((reply.code, rows.len()), (0, 16), "{}", reply.message);
        assert_eq!(before, snapshot().await, "nothing changed");
        let info = rpc.server_info(ps::ServerInfoRequest {}).await.unwrap().into_inner();
        let t = &info.tables[0];
        assert_eq!((t.rows, t.admitted, t.dropped, t.rows_pushed), (2, 2, 0, 2), "{t:?}");
        // Learning rates: every variable and table, or one table by name.
        c.set_learning_rate(0.25).await.unwrap();
        let rate = |rpc: &mut ParameterServerClient<tonic::transport::Channel>| {
            let mut rpc = rpc.clone();
            async move { rpc.server_info(ps::ServerInfoRequest {}).await.unwrap().into_inner().tables[0].learning_rate }
        };
        assert_eq!(rate(&mut rpc).await, 0.25);
        let one = ps::SetLearningRateRequest { variable: "emb".into(), learning_rate: Some(0.0), all_variables: false };
        assert_eq!(rpc.set_learning_rate(one).await.unwrap().into_inner().updated, 1);
        assert_eq!(rate(&mut rpc).await, 0.0);
        c.push_sparse("emb", &[1], &[5.0; 4], 0).await.unwrap();
        assert_eq!(before, snapshot().await, "a zero rate changes no row");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_capacity_past_the_shard_memory_limit_is_refused() {
    let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1", "--max-shard-bytes", "1MiB"]);
    common::bounded(60, async {
        let c = Client::connect(&cluster.addrs(), options(0, true)).await.unwrap();
        let table = |name: &str, capacity: u64| {
            let mut t = TableSpec::new(name, 64);
            t.eviction = Eviction::Lru;
            t.capacity = capacity;
            t
        };
        // 256 bytes a row (64 f32 values, SGD keeps no slot).
        let e = c.register_table(&table("big", 10_000)).await.unwrap_err();
        assert_eq!(e.kind, parasync_client::ErrorKind::InvalidArgument, "{e}");
        assert!(e.message.contains("\"big\"") && e.message.contains("--max-shard-bytes"), "{e}");
        c.register_table(&table("small", 1000)).await.unwrap();
        c.register_table(&table("small", 1000)).await.expect("an identical registration reserves nothing more");
        c.register_table(&table("third", 3000)).await.expect("256 000 + 768 000 bytes fit in 1 MiB");
        let e = c.register_table(&table("fourth", 100)).await.unwrap_err();
        assert!(e.message.contains("\"fourth\""), "{e}");
        let info = c.shard_info().await.unwrap();
        assert_eq!(info[0].tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["small", "third"]);
        // A lookup may not ask for more than 256 MiB of rows at once (a few ids of wide rows).
        c.register_table(&TableSpec::new("wide", 65_536)).await.unwrap();
        let ids: Vec<u64> = (0..1025).collect();
        let mut rpc = ParameterServerClient::connect(format!("http://{}", cluster.addrs()[0])).await.unwrap();
        let req = ps::LookupRequest {
            table: "wide".into(),
            ids: ids.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into(),
            wire_dtype: ps::Dtype::F32 as i32,
            ..Default::default()
        };
        let e = rpc.lookup(req).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.message().contains("\"wide\"") && e.message().contains("fewer ids"), "{}", e.message());
        let mut rows = vec![0f32; 2 * 65_536];
        c.lookup("wide", &ids[..2], 0, &mut rows).await.expect("a small lookup of the same table");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_lookups_over_grpc_go_in_parts_and_pushes_past_the_grpc_limit_fail_before_sending() {
    let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
    common::bounded(120, async {
        const WIDE: usize = 1024;
        let mut spec = TableSpec::new("wide", WIDE);
        spec.init = RowInit::Uniform { low: -1.0, high: 1.0, seed: 3 };
        let grpc = Client::connect(&cluster.addrs(), options(0, false)).await.unwrap();
        let data = Client::connect(&cluster.addrs(), options(0, true)).await.unwrap();
        grpc.register_table(&spec).await.unwrap();
        data.register_table(&spec).await.unwrap();
        // 5 000 rows of 4 KiB: a 20 MiB reply, past the shard's 16 MiB gRPC message limit in one piece.
        let ids: Vec<u64> = (0..5000u64).map(|i| i * 7919 + 3).collect();
        let mut over_grpc = vec![0f32; ids.len() * WIDE];
        grpc.lookup("wide", &ids, 0, &mut over_grpc).await.expect("a 20 MiB lookup over gRPC");
        let mut over_data = vec![0f32; ids.len() * WIDE];
        data.lookup("wide", &ids, 0, &mut over_data).await.unwrap();
        assert!(over_grpc == over_data, "the same rows in parts over gRPC as in one piece over the data plane");
        assert!(over_grpc[..WIDE].iter().any(|&x| x != 0.0));
        // A push of 3 000 such rows (12 MiB) is one request per shard: over gRPC it fails
        // before anything is sent, naming the table, the size and the limit.
        let grads = vec![1.0f32; 3000 * WIDE];
        let e = grpc.push_sparse("wide", &ids[..3000], &grads, 0).await.unwrap_err();
        assert_eq!(e.kind, parasync_client::ErrorKind::Usage, "{e}");
        for needle in ["\"wide\"", "bytes", "limit", "data plane", "nothing was sent"] {
            assert!(e.message.contains(needle), "{needle:?} in {e}");
        }
        let info = data.shard_info().await.unwrap();
        assert_eq!((info[0].tables[0].rows, info[0].tables[0].rows_pushed), (0, 0), "nothing reached the shard");
        // The same push over the data plane, and a small one over gRPC, go through.
        data.push_sparse("wide", &ids[..3000], &grads, 0).await.expect("the data plane takes it");
        grpc.push_sparse("wide", &ids[..10], &grads[..10 * WIDE], 1).await.expect("a small push over gRPC");
        let info = data.shard_info().await.unwrap();
        assert_eq!(info[0].tables[0].rows_pushed, 3010);
    })
    .await;
}
