//! End to end: real `parasync server` processes on 127.0.0.1 driven by real clients.

mod common;

use std::sync::Arc;
use std::time::Duration;

use parasync_client::{DType, Init, Optimizer, VariableSpec};
use ps_server::optimizer::{OptimizerSpec, OptimizerState};
use rand::{Rng, SeedableRng};

const WORKERS: u32 = 4;
const STEPS: u64 = 12;

/// The model of the sync test: one large variable (split over both shards by a small
/// split threshold), two small ones, and two different optimizers.
fn specs() -> Vec<VariableSpec> {
    let mut big = VariableSpec::new("big", &[40, 33]);
    big.optimizer = Optimizer::Sgd { lr: 0.05, momentum: 0.9, nesterov: true };
    big.init = Init::Uniform { low: -1.0, high: 1.0, seed: 7 };
    let mut bias = VariableSpec::new("bias", &[33]);
    bias.optimizer = Optimizer::adam(0.01);
    bias.init = Init::Values((0..33).map(|i| i as f32 * 0.1).collect());
    let mut scale = VariableSpec::new("scale", &[5, 3]);
    scale.optimizer = Optimizer::AdamW { lr: 0.02, beta1: 0.9, beta2: 0.99, epsilon: 1e-7, weight_decay: 0.01 };
    scale.init = Init::Constant(0.5);
    vec![big, bias, scale]
}

fn server_spec(o: &Optimizer) -> OptimizerSpec {
    match *o {
        Optimizer::Sgd { lr, momentum, nesterov } => OptimizerSpec::Sgd { lr, momentum, nesterov },
        Optimizer::Adam { lr, beta1, beta2, epsilon, weight_decay } => {
            OptimizerSpec::Adam { lr, beta1, beta2, epsilon, weight_decay, decoupled: false }
        }
        Optimizer::AdamW { lr, beta1, beta2, epsilon, weight_decay } => {
            OptimizerSpec::Adam { lr, beta1, beta2, epsilon, weight_decay, decoupled: true }
        }
        Optimizer::Adagrad { lr, initial_accumulator, epsilon } => OptimizerSpec::Adagrad { lr, initial_accumulator, epsilon },
    }
}

/// A worker's gradient: depends on the current values, the worker and the step, so any
/// wrong value or order on the server changes everything after it.
fn gradient(worker: u32, step: u64, var: usize, values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| (v * 1.3 + (worker as f32 + 1.0) * 0.37 - step as f32 * 0.011 + (i + var) as f32 * 1e-3).sin())
        .collect()
}

/// Runs the sync job with per-worker random delays from `timing_seed`, tensors over the
/// data plane or over gRPC; returns final values.
async fn run_sync_job(timing_seed: u64, data_plane: bool) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let cluster = common::cluster(2, &["--mode", "sync", "--num-workers", "4"]);
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let mut c = common::client_with(&cluster, w, 1024, data_plane).await;
        let info = c.shard_info().await.unwrap();
        assert!(info.iter().all(|i| i.data_plane.is_some() == data_plane), "{info:?}");
        tasks.push(tokio::spawn(async move {
            c.register(specs()).await.unwrap();
            assert_eq!(c.placement().unwrap().parts[0].len(), 2, "big is split over both shards");
            let mut rng = rand::rngs::StdRng::seed_from_u64(timing_seed * 100 + w as u64);
            let initial = c.pull(0).await.unwrap();
            let mut params = initial.clone();
            for step in 0..STEPS {
                tokio::time::sleep(Duration::from_micros(rng.gen_range(0..3000))).await;
                let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(i, p)| gradient(w, step, i, p)).collect();
                let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                // workers 0 and 1 push then pull; 2 and 3 do both in one round trip
                let s = if w < 2 {
                    let s = c.push(step, &refs).await.unwrap();
                    c.pull_into(step + 1, &mut params).await.unwrap();
                    s
                } else {
                    c.push_pull(step, &refs, &mut params).await.unwrap()
                };
                assert_eq!(s.dropped_stale, 0);
            }
            (initial, params)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let (initial, last) = results.pop().unwrap();
    for (_, other) in &results {
        assert_eq!(bits(other), bits(&last), "every worker sees the same final values");
    }
    (initial, last)
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|x| x.iter().map(|f| f.to_bits()).collect()).collect()
}

/// What one process computes applying the averaged gradients in worker order.
fn reference(initial: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let specs = specs();
    let mut params = initial.to_vec();
    let mut opts: Vec<OptimizerState> =
        specs.iter().map(|s| OptimizerState::new(server_spec(&s.optimizer), s.len())).collect();
    for step in 0..STEPS {
        for (vi, p) in params.iter_mut().enumerate() {
            let mut sum = gradient(0, step, vi, p);
            for w in 1..WORKERS {
                for (a, g) in sum.iter_mut().zip(gradient(w, step, vi, p)) {
                    *a += g;
                }
            }
            let mean: Vec<f32> = sum.iter().map(|a| a / WORKERS as f32).collect();
            opts[vi].apply_f32(p, &mean, 1.0);
        }
    }
    params
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_two_shards_four_workers_is_bitwise_reproducible() {
    common::bounded(120, async {
        let (initial, first) = run_sync_job(1, true).await;
        let expected = reference(&initial);
        assert_eq!(bits(&first), bits(&expected), "server result equals the single-process reference bit for bit");
        let (initial2, second) = run_sync_job(2, false).await;
        assert_eq!(bits(&initial2), bits(&initial));
        assert_eq!(bits(&second), bits(&first), "a run with other arrival timing, over gRPC, gives the same bits");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_eight_workers_lose_no_update() {
    common::bounded(120, async {
        const N: u32 = 8;
        const PUSHES: u64 = 40;
        const LEN: usize = 3000;
        let cluster = common::cluster(2, &["--mode", "async", "--num-workers", "8"]);
        let mut v = VariableSpec::new("w", &[1000, 3]);
        v.optimizer = Optimizer::sgd(1.0);
        v.init = Init::Constant(100_000.0);
        let mut small = VariableSpec::new("b", &[7]);
        small.optimizer = Optimizer::sgd(1.0);
        let specs = vec![v, small];
        let grad = |w: u32, s: u64, i: usize| ((w as usize * 7 + s as usize * 3 + i) % 9) as f32 - 4.0;
        let mut tasks = Vec::new();
        for w in 0..N {
            let mut c = common::client(&cluster, w, 4096).await;
            let specs = specs.clone();
            tasks.push(tokio::spawn(async move {
                c.register(specs).await.unwrap();
                let mut stale = Vec::new();
                for s in 0..PUSHES {
                    if s % 5 == 0 {
                        c.pull(s).await.unwrap();
                    }
                    let g: Vec<f32> = (0..LEN).map(|i| grad(w, s, i)).collect();
                    let b: Vec<f32> = (0..7).map(|i| grad(w, s, i + 1)).collect();
                    let r = if w % 2 == 0 {
                        c.push(s, &[&g, &b]).await.unwrap()
                    } else {
                        let mut out = vec![vec![0.0; LEN], vec![0.0; 7]];
                        c.push_pull(s, &[&g, &b], &mut out).await.unwrap()
                    };
                    stale.extend(r.staleness);
                }
                stale
            }));
        }
        let mut staleness = Vec::new();
        for t in tasks {
            staleness.extend(t.await.unwrap());
        }
        let mut c = common::client(&cluster, 0, 4096).await;
        c.register(specs).await.unwrap();
        let got = c.pull(0).await.unwrap();
        assert_eq!(got[0].len(), LEN);
        for (i, &value) in got[0].iter().enumerate() {
            let sum: f32 = (0..N).flat_map(|w| (0..PUSHES).map(move |s| (w, s))).map(|(w, s)| grad(w, s, i)).sum();
            assert_eq!(value, 100_000.0 - sum, "element {i}");
        }
        assert_eq!(got[1].len(), 7);
        for (i, &value) in got[1].iter().enumerate() {
            let sum: f32 = (0..N).flat_map(|w| (0..PUSHES).map(move |s| (w, s))).map(|(w, s)| grad(w, s, i + 1)).sum();
            assert_eq!(value, -sum);
        }
        assert!(staleness.iter().any(|&s| s > 0), "concurrent workers must observe staleness");
        let info = c.shard_info().await.unwrap();
        let versions: u64 = info.iter().flat_map(|s| s.variables.iter().map(|v| v.1)).sum();
        // every push of every part bumps its version: 2 parts of w + b, per push
        assert_eq!(versions, N as u64 * PUSHES * 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_of_n_sync_keeps_advancing_with_a_worker_stopped() {
    common::bounded(120, async {
        let cluster = common::cluster(1, &["--mode", "sync", "--num-workers", "3", "--replicas-to-aggregate", "2"]);
        let mut v = VariableSpec::new("w", &[16]);
        v.optimizer = Optimizer::sgd(0.5);
        let specs = vec![v];
        let mut tasks = Vec::new();
        for w in 0..3u32 {
            let mut c = common::client(&cluster, w, 1 << 20).await;
            let specs = specs.clone();
            // worker 2 stops for good after 2 steps
            let steps = if w == 2 { 2 } else { 20 };
            tasks.push(tokio::spawn(async move {
                c.register(specs).await.unwrap();
                let mut dropped = 0;
                for s in 0..steps {
                    c.pull(s).await.unwrap();
                    let r = c.push(s, &[&[1.0; 16]]).await.unwrap();
                    dropped += r.dropped_stale;
                }
                dropped
            }));
        }
        let mut dropped = 0;
        for t in tasks {
            dropped += t.await.unwrap();
        }
        let c = {
            let mut c = common::client(&cluster, 0, 1 << 20).await;
            c.register(specs).await.unwrap();
            c
        };
        let values = c.pull(20).await.unwrap();
        let info = c.shard_info().await.unwrap();
        assert_eq!(info[0].variables, vec![("w".to_string(), 20)], "20 steps completed with worker 2 gone");
        assert_eq!(values[0], vec![-10.0; 16], "each step applies the mean gradient 1.0 with lr 0.5");
        // while all three ran, the third gradient of a step arrived late and was dropped
        assert_eq!(info[0].dropped_stale, dropped as u64);
    })
    .await;
}

#[test]
fn sigterm_while_clients_push_exits_cleanly() {
    let dir = std::env::temp_dir().join(format!("parasync-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut opts = parasync::cluster::ClusterOptions::new(1, &["--mode", "async", "--num-workers", "4"]);
    opts.log_dir = Some(dir.clone());
    opts.log_filter = Some("info".into());
    let mut cluster = parasync::cluster::LocalCluster::start(&common::exe(), &opts)
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let addrs = cluster.addrs();
        let stop = Arc::clone(&stop);
        tasks.push(rt.spawn(async move {
            // The shard does not come back: no waiting for it (recovery_timeout) once it left.
            let opts = parasync_client::ClientOptions {
                worker_id: w,
                chunk_bytes: 64 << 10,
                recovery_timeout: Duration::ZERO,
                ..Default::default()
            };
            let mut c = parasync_client::Client::connect(&addrs, opts).await.unwrap();
            let mut v = VariableSpec::new("w", &[256, 1024]);
            v.dtype = DType::Bf16;
            c.register(vec![v]).await.unwrap();
            let g = vec![0.001f32; 256 * 1024];
            let mut ok = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.push(0, &[&g]).await {
                    Ok(_) => ok += 1,
                    Err(_) => break, // the server went away: expected
                }
            }
            ok
        }));
    }
    std::thread::sleep(Duration::from_millis(800));
    let statuses = cluster.terminate(Duration::from_secs(15)).expect("server exits after SIGTERM");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pushed: u32 = tasks.into_iter().map(|t| rt.block_on(t).unwrap()).sum();
    assert!(pushed > 0, "clients were pushing when the signal arrived");
    assert!(statuses[0].success(), "exit status {:?}", statuses[0]);
    let log = std::fs::read_to_string(dir.join("shard-0.log")).unwrap();
    assert!(!log.contains("panicked"), "server log shows a panic:\n{log}");
    assert!(log.contains("shutting down"), "server log:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_runtime_learning_rate() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        // gRPC health: the parameter-server service reports SERVING
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.addrs()[0]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: "parasync.ps.v1.ParameterServer".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        let whole = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(whole.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "the server as a whole");

        // Reflection, v1 and v1alpha, lists exactly the services served.
        use tonic_reflection::pb::{v1, v1alpha};
        let mut refl = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let req = v1::ServerReflectionRequest {
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
            ..Default::default()
        };
        let mut replies = refl.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
        let reply = replies.message().await.unwrap().expect("a reflection reply");
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reflection reply {reply:?}");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(
            names,
            ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection", "parasync.ps.v1.ParameterServer"]
        );
        // Every listed service can be described, on both endpoints (`grpcurl describe` walks
        // them all).
        // (The two protocol versions are the same messages in two generated modules.)
        macro_rules! describes {
            ($version:ident, $client:expr, $name:expr) => {{
                let req = $version::ServerReflectionRequest {
                    message_request: Some($version::server_reflection_request::MessageRequest::FileContainingSymbol($name.clone())),
                    ..Default::default()
                };
                let mut replies = $client.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
                let reply = replies.message().await.unwrap().expect("a reflection reply");
                matches!(reply.message_response, Some($version::server_reflection_response::MessageResponse::FileDescriptorResponse(_)))
            }};
        }
        let mut old = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
        for name in &names {
            assert!(describes!(v1, refl, name), "v1 describing {name}");
            assert!(describes!(v1alpha, old, name), "v1alpha describing {name}");
        }

        let mut c = common::client(&cluster, 0, 1 << 20).await;
        let mut v = VariableSpec::new("w", &[8]);
        v.optimizer = Optimizer::sgd(1.0);
        v.init = Init::Constant(10.0);
        c.register(vec![v]).await.unwrap();
        c.push(0, &[&[1.0; 8]]).await.unwrap();
        c.set_learning_rate(0.5).await.unwrap();
        c.push(0, &[&[1.0; 8]]).await.unwrap();
        assert_eq!(c.pull(0).await.unwrap()[0], vec![8.5; 8], "lr 1.0 then 0.5");

        let pushes = cluster.metric_sum("parasync_pushes_total").unwrap();
        let bytes_in = cluster.metric_sum("parasync_bytes_in_total").unwrap();
        assert_eq!((pushes, bytes_in), (2.0, 64.0));
        let text = parasync::cluster::scrape(cluster.servers[0].metrics_addr.as_deref().unwrap()).unwrap();
        assert!(text.contains("parasync_staleness_bucket"), "{text}");
        assert!(text.contains("parasync_step_latency_seconds_count{") || text.contains("parasync_step_latency_seconds_count "), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_retries_while_a_shard_starts() {
    common::bounded(60, async {
        // Reserve a port, release it, and start the server there only after the client began.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let opts = parasync_client::ClientOptions { connect_timeout: Duration::from_secs(20), ..Default::default() };
        let connecting = tokio::spawn({
            let addr = addr.clone();
            async move { parasync_client::Client::connect(&[addr], opts).await }
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!connecting.is_finished(), "nothing listens yet: the client must still be retrying");
        let mut server = std::process::Command::new(common::exe())
            .args(["server", "--listen", &addr, "--mode", "async"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let client = connecting.await.unwrap();
        let _ = server.kill();
        let _ = server.wait();
        let client = client.expect("connects once the shard is up");
        assert_eq!(client.num_shards(), 1);

        // and a shard that never comes up is reported with its address
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let opts = parasync_client::ClientOptions { connect_timeout: Duration::from_millis(300), ..Default::default() };
        let err = parasync_client::Client::connect(&[format!("127.0.0.1:{port}")], opts).await.err().unwrap();
        assert_eq!(err.kind, parasync_client::ErrorKind::Unavailable);
        assert!(err.message.contains(&port.to_string()), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_explicit_initial_values_are_never_read_half_assigned() {
    common::bounded(120, async {
        // 12 MiB: split over two shards into 6 MiB parts, too large to travel inside the
        // registration, so the creator assigns them afterwards; every pull must see them.
        const N: usize = 3 << 20;
        let cluster = common::cluster(2, &["--mode", "sync", "--num-workers", "2"]);
        let values: Vec<f32> = (0..N).map(|i| (i % 1000) as f32 * 0.5).collect();
        let mut spec = VariableSpec::new("emb", &[3072, 1024]);
        spec.init = Init::Values(values.clone());
        let mut tasks = Vec::new();
        for w in 0..2u32 {
            let addrs = cluster.addrs();
            let spec = spec.clone();
            tasks.push(tokio::spawn(async move {
                let opts = parasync_client::ClientOptions { worker_id: w, ..Default::default() };
                let mut c = parasync_client::Client::connect(&addrs, opts).await.unwrap();
                c.register(vec![spec]).await.unwrap();
                c.pull(0).await.unwrap().remove(0)
            }));
        }
        for t in tasks {
            let got = t.await.unwrap();
            assert!(got == values, "a pull right after registration saw values other than the initial ones");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_workers_take_the_chiefs_values_whoever_registers_first() {
    common::bounded(120, async {
        let cluster = common::cluster(2, &["--mode", "sync", "--num-workers", "3"]);
        // A small variable (values inline in the registration) and a 12 MiB one (split over
        // both shards, values sent after the registration), each created by an adopting worker.
        let small: Vec<f32> = (0..10).map(|i| i as f32 + 0.25).collect();
        let large: Vec<f32> = (0..3 << 20).map(|i| (i % 977) as f32 - 3.0).collect(); // 6 MiB parts
        let spec = |name: &str, shape: &[usize], init: Init| {
            let mut s = VariableSpec::new(name, shape);
            s.init = init;
            s
        };
        let adopting = vec![spec("small", &[10], Init::Adopt), spec("large", &[3072, 1024], Init::Adopt)];
        let chief = vec![spec("small", &[10], Init::Values(small.clone())), spec("large", &[3072, 1024], Init::Values(large.clone()))];
        let connect = |w: u32| {
            let addrs = cluster.addrs();
            async move {
                let opts = parasync_client::ClientOptions { worker_id: w, ..Default::default() };
                parasync_client::Client::connect(&addrs, opts).await.unwrap()
            }
        };
        let mut first = connect(1).await;
        first.register(adopting.clone()).await.unwrap();
        // Registered, values pending: a pull waits (here: times out), the chief's arrive later.
        let waiting = tokio::spawn(async move { (first.pull(0).await.unwrap(), first) });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "a pull returned before the chief's values arrived");
        let mut chief_client = connect(0).await;
        chief_client.register(chief).await.unwrap();
        let mut late = connect(2).await;
        late.register(adopting).await.unwrap(); // the values exist now: nothing to wait for
        let (got, _first) = waiting.await.unwrap();
        assert!(got[0] == small && got[1] == large, "the adopting worker saw other values");
        assert!(late.pull(0).await.unwrap() == vec![small.clone(), large.clone()]);
        assert!(chief_client.pull(0).await.unwrap() == vec![small, large]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_while_pushes_update_the_variable_returns_one_version() {
    common::bounded(300, async {
        // 64 MiB in one part; every push adds 1 to every element (SGD, lr 1, gradient -1),
        // so after v updates each element is exactly v: a pull that mixed versions would
        // hold two different values.
        const LEN: usize = 16 << 20;
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "2"]);
        let mut spec = VariableSpec::new("w", &[LEN]);
        spec.optimizer = Optimizer::sgd(1.0);
        let specs = vec![spec];
        let connect = |worker_id: u32, data_plane: bool| {
            let addrs = cluster.addrs();
            let opts = parasync_client::ClientOptions { worker_id, data_plane, split_bytes: usize::MAX, ..Default::default() };
            async move { parasync_client::Client::connect(&addrs, opts).await.unwrap() }
        };
        let mut pusher = connect(0, true).await;
        pusher.register(specs.clone()).await.unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_pushing = Arc::clone(&stop);
        let pushes = tokio::spawn(async move {
            let grad = vec![-1.0f32; LEN];
            let mut n = 0u64;
            while !stop_pushing.load(std::sync::atomic::Ordering::Relaxed) {
                pusher.push(n, &[&grad]).await.unwrap();
                n += 1;
            }
            n
        });
        for data_plane in [true, false] {
            let mut c = connect(1, data_plane).await;
            c.register(specs.clone()).await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..12 {
                let got = c.pull(0).await.unwrap().remove(0);
                let first = got[0];
                if let Some((i, v)) = got.iter().enumerate().find(|&(_, &v)| v != first) {
                    panic!("data plane {data_plane}: element 0 is {first}, element {i} is {v}: the pull mixed versions");
                }
                seen.push(first);
            }
            seen.dedup();
            assert!(seen.len() > 2, "data plane {data_plane}: the pushes did not run during the pulls: {seen:?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(pushes.await.unwrap() > 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_staleness_holds_the_fastest_worker() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "bounded", "--num-workers", "2", "--max-staleness", "1"]);
        let mut specs = vec![VariableSpec::new("w", &[4])];
        specs[0].optimizer = Optimizer::sgd(1.0);
        let mut fast = common::client(&cluster, 0, 1 << 20).await;
        let mut slow = common::client(&cluster, 1, 1 << 20).await;
        fast.register(specs.clone()).await.unwrap();
        slow.register(specs).await.unwrap();
        // worker 0 runs steps 0 and 1 alone: allowed, it is at most 1 step ahead
        for step in 0..2 {
            fast.pull(step).await.unwrap();
            fast.push(step, &[&[1.0; 4]]).await.unwrap();
        }
        // step 2 would put it 2 steps ahead of worker 1, which has pushed nothing
        let mut held = parasync_client::ClientOptions { worker_id: 0, ..Default::default() };
        held.pull_timeout = Some(Duration::from_millis(300));
        let mut probe = parasync_client::Client::connect(&cluster.addrs(), held).await.unwrap();
        probe.register(vec![{
            let mut v = VariableSpec::new("w", &[4]);
            v.optimizer = Optimizer::sgd(1.0);
            v
        }])
        .await
        .unwrap();
        let err = probe.pull(2).await.unwrap_err();
        assert_eq!(err.kind, parasync_client::ErrorKind::Timeout, "{err}");
        assert!(err.message.contains("[1]"), "names the slow worker: {err}");
        // once worker 1 pushes its step 0, worker 0 may go on
        let waiting = tokio::spawn(async move { fast.pull(2).await.map(|v| v[0].clone()) });
        slow.pull(0).await.unwrap();
        slow.push(0, &[&[1.0; 4]]).await.unwrap();
        let values = waiting.await.unwrap().unwrap();
        assert_eq!(values, vec![-3.0; 4], "three gradients of 1.0 applied with lr 1");
    })
    .await;
}

#[cfg(target_os = "linux")]
#[test]
fn demo_stops_every_child_on_ctrl_c() {
    use std::time::Instant;
    let mut demo = std::process::Command::new(common::exe())
        .args(["demo", "--epochs", "500", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = demo.id();
    let children = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.split(' ').nth(1).map(str::to_string)))
                    .flatten()
                    .is_some_and(|ppid| ppid == pid.to_string())
            })
            .collect()
    };
    // wait until the servers and workers are up (2 + 4 children)
    let started = Instant::now();
    let mut kids = children();
    while kids.len() < 6 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
        kids = children();
    }
    assert_eq!(kids.len(), 6, "demo children: {kids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = demo.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "demo did not exit after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    for k in kids {
        let alive = std::fs::read_to_string(format!("/proc/{k}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "child {k} outlived the demo");
    }
}
