//! Parameter-server throughput and latency through one real `parasync server` process on
//! 127.0.0.1: push and pull of one 64 MiB f32 variable (f32 and bf16 on the wire), and the
//! 100-byte push + pull round trip.
//!
//! `cargo bench --bench ps_throughput`. Knobs (for tuning runs): `PARASYNC_BENCH_CHUNK`
//! (bytes per streamed message), `PARASYNC_BENCH_CONNS` (connections per shard),
//! `PARASYNC_BENCH_SERVER_THREADS` (server runtime threads, 0 = one event loop),
//! `PARASYNC_BENCH_CLIENT_THREADS` (client runtime threads, 0 = the calling thread),
//! `PARASYNC_BENCH_DATA_CONNS` (data-plane requests in flight per shard, 0 = gRPC only),
//! `PARASYNC_BENCH_PART` (largest part a variable is cut into, bytes),
//! `PARASYNC_BENCH_SPIN_US` (client busy-poll for small replies, microseconds),
//! `PARASYNC_BENCH_SECURITY` (`plain`, `token`, `tls` or `tls+token`: the server requires an
//! auth token and / or serves TLS, with certificates from `parasync tls-certs`),
//! `PARASYNC_BENCH_MEASURE_S` (criterion measurement seconds per 64 MiB benchmark, 8).
//! `PARASYNC_BENCH_SKIP_SYNC=1` skips the sync-step benchmark.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parasync::cluster::{ClusterOptions, LocalCluster};
use parasync_client::{AuthToken, Client, ClientOptions, ClientTls, DType, Optimizer, VariableSpec};

const BIG: usize = 16 << 20; // elements: 64 MiB of f32

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Server flags and client settings for `security` (`plain`, `token`, `tls`, `tls+token`):
/// a token file and certificates from `parasync tls-certs` in a fresh temporary folder.
fn security_setup(exe: &std::path::Path, security: &str) -> (Vec<String>, Option<AuthToken>, Option<ClientTls>) {
    if !["plain", "token", "tls", "tls+token"].contains(&security) {
        panic!("PARASYNC_BENCH_SECURITY must be plain, token, tls or tls+token, not {security:?}");
    }
    let dir = std::env::temp_dir().join(format!("parasync-bench-security-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut args, mut token, mut tls) = (Vec::new(), None, None);
    if security.contains("token") {
        let secret = "bench-token-0123456789abcdef0123456789abcdef";
        std::fs::write(dir.join("token"), secret).unwrap();
        args.extend(["--auth-token-file".to_string(), dir.join("token").to_string_lossy().into()]);
        token = Some(AuthToken::new(secret).unwrap());
    }
    if security.contains("tls") {
        let certs = dir.join("certs");
        let made = std::process::Command::new(exe).args(["tls-certs", "--out"]).arg(&certs).output().unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        args.extend(["--tls-cert", "--tls-key"].iter().zip(["server.pem", "server-key.pem"]).flat_map(|(flag, f)| {
            [flag.to_string(), certs.join(f).to_string_lossy().into()]
        }));
        tls = Some(ClientTls::from_files(&certs.join("ca.pem"), None, None, None).unwrap());
    }
    (args, token, tls)
}

fn bench(c: &mut Criterion) {
    let chunk = env_usize("PARASYNC_BENCH_CHUNK", 1 << 20);
    let conns = env_usize("PARASYNC_BENCH_CONNS", 1);
    let server_threads = env_usize("PARASYNC_BENCH_SERVER_THREADS", 2);
    let client_threads = env_usize("PARASYNC_BENCH_CLIENT_THREADS", 0);
    let defaults = ClientOptions::default();
    let data_conns = env_usize("PARASYNC_BENCH_DATA_CONNS", defaults.data_connections_per_shard);
    let part = env_usize("PARASYNC_BENCH_PART", defaults.max_part_bytes);
    let spin = Duration::from_micros(env_usize("PARASYNC_BENCH_SPIN_US", defaults.reply_spin.as_micros() as usize) as u64);
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_parasync"));
    let (chunk_s, threads_s) = (chunk.to_string(), server_threads.to_string());
    let security = std::env::var("PARASYNC_BENCH_SECURITY").unwrap_or_else(|_| "plain".into());
    let (security_args, token, tls) = security_setup(&exe, &security);
    let mut server_args: Vec<&str> = vec!["--mode", "async", "--num-workers", "1", "--chunk-bytes", &chunk_s, "--worker-threads", &threads_s];
    server_args.extend(security_args.iter().map(String::as_str));
    let cluster = LocalCluster::start(&exe, &ClusterOptions::new(1, &server_args)).expect("starting the server");
    let rt = match client_threads {
        0 => tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build().unwrap(),
    };
    let connect = |name: &str, len: usize, wire: DType| {
        let opts = ClientOptions {
            chunk_bytes: chunk,
            connections_per_shard: conns,
            wire_dtype: wire,
            data_plane: data_conns > 0,
            data_connections_per_shard: data_conns.max(1),
            max_part_bytes: part,
            reply_spin: spin,
            auth_token: token.clone(),
            tls: tls.clone(),
            ..Default::default()
        };
        let mut spec = VariableSpec::new(name, &[len]);
        // lr 0: every push runs the full update path but leaves values unchanged
        spec.optimizer = Optimizer::sgd(0.0);
        rt.block_on(async {
            let mut c = Client::connect(&cluster.addrs(), opts).await.unwrap();
            c.register(vec![spec]).await.unwrap();
            c
        })
    };
    let big_f32 = connect("big", BIG, DType::F32);
    let big_bf16 = connect("big", BIG, DType::Bf16);
    let small = connect("small", 25, DType::F32);
    let grad = vec![0.001f32; BIG];
    let mut out = vec![vec![0.0f32; BIG]];

    let mut setup = match data_conns {
        0 => format!("grpc_chunk{}KiB_conns{conns}_srv{server_threads}_cli{client_threads}", chunk >> 10),
        n => format!("data{n}_part{}MiB_spin{}us_srv{server_threads}_cli{client_threads}", part >> 20, spin.as_micros()),
    };
    if security != "plain" {
        setup = format!("{setup}_{}", security.replace('+', "_"));
    }
    let measure = Duration::from_secs(env_usize("PARASYNC_BENCH_MEASURE_S", 8) as u64);
    let mut g = c.benchmark_group(format!("ps_64MiB_{setup}"));
    g.sample_size(15).measurement_time(measure).warm_up_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes((BIG * 4) as u64));
    for (label, client) in [("f32_wire", &big_f32), ("bf16_wire", &big_bf16)] {
        g.bench_function(format!("push_{label}"), |b| b.iter(|| rt.block_on(client.push(0, &[&grad])).unwrap()));
        g.bench_function(format!("pull_{label}"), |b| b.iter(|| rt.block_on(client.pull_into(0, &mut out)).unwrap()));
    }
    g.finish();

    let mut g = c.benchmark_group(format!("ps_small_{setup}"));
    g.sample_size(30);
    let small_grad = vec![0.5f32; 25];
    let mut small_out = vec![vec![0.0f32; 25]];
    g.bench_function("push_100B", |b| b.iter(|| rt.block_on(small.push(0, &[&small_grad])).unwrap()));
    g.bench_function("pull_100B", |b| b.iter(|| rt.block_on(small.pull_into(0, &mut small_out)).unwrap()));
    g.bench_function("push_pull_100B", |b| {
        b.iter(|| {
            rt.block_on(async {
                small.push(0, &[&small_grad]).await.unwrap();
                small.pull_into(0, &mut small_out).await.unwrap();
            })
        })
    });
    g.bench_function("push_pull_one_call_100B", |b| {
        b.iter(|| rt.block_on(small.push_pull(0, &[&small_grad], &mut small_out)).unwrap())
    });
    g.finish();
    drop((big_f32, big_bf16, small));
    drop(cluster);
    if std::env::var_os("PARASYNC_BENCH_SKIP_SYNC").is_some() {
        return;
    }

    // One sync step of the demo model (64-128-10 MLP) with 4 workers on 2 shards: every
    // worker pulls the step and pushes its gradients; the step completes on both shards.
    let sync = LocalCluster::start(
        &exe,
        &ClusterOptions::new(2, &["--mode", "sync", "--num-workers", "4", "--worker-threads", &threads_s]),
    )
    .expect("starting the sync cluster");
    let shapes: [&[usize]; 4] = [&[64, 128], &[128], &[128, 10], &[10]];
    let workers: Vec<Client> = (0..4u32)
        .map(|w| {
            rt.block_on(async {
                let opts = ClientOptions { worker_id: w, ..Default::default() };
                let mut c = Client::connect(&sync.addrs(), opts).await.unwrap();
                let specs = ["w1", "b1", "w2", "b2"]
                    .iter()
                    .zip(shapes)
                    .map(|(n, s)| {
                        let mut v = VariableSpec::new(*n, s);
                        v.optimizer = Optimizer::sgd(0.1);
                        v
                    })
                    .collect();
                c.register(specs).await.unwrap();
                c
            })
        })
        .collect();
    let grads: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.001; s.iter().product()]).collect();
    let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let mut bufs: Vec<Vec<Vec<f32>>> = (0..4).map(|_| grads.clone()).collect();
    let mut step = 0u64;
    let mut g = c.benchmark_group(format!("ps_sync_step_{setup}"));
    g.sample_size(30);
    g.bench_function("mlp_4workers_2shards", |b| {
        b.iter(|| {
            rt.block_on(async {
                let calls = workers.iter().zip(bufs.iter_mut()).map(|(w, buf)| {
                    let refs = &refs;
                    async move {
                        w.pull_into(step, buf).await.unwrap();
                        w.push(step, refs).await.unwrap();
                    }
                });
                futures::future::join_all(calls).await;
            });
            step += 1;
        })
    });
    g.finish();
    drop(workers);
    drop(rt);
}

criterion_group!(benches, bench);
criterion_main!(benches);
