//! Fuzzing of what a shard reads from the network, against a live `parasync server`:
//! mutated gRPC messages for every method of the service, and mutated data-plane
//! connections (greeting, frame lengths, headers and payloads). Every case must end in a
//! reply or a closed connection, never a panic (a broken call), a hang, or memory that
//! grows; afterwards the shard still serves. Seeded, so a failure reproduces;
//! `PARASYNC_FUZZ_CASES` (default 10 000 per test) runs longer.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::raw::RawCodec;
use parasync_proto::data::{put_frame, MAGIC};
use parasync_proto::ps::{self, data_request::Op, parameter_server_client::ParameterServerClient};
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Code;

#[path = "../collective/tests/common/seeded.rs"]
mod seeded;

use seeded::{cases, Rng};

const F32: i32 = ps::Dtype::F32 as i32;
const BF16: i32 = ps::Dtype::Bf16 as i32;

fn header(variable: &str, n: u64, wire: i32) -> ps::PushHeader {
    ps::PushHeader { variable: variable.into(), wire_dtype: wire, num_elements: n, kind: ps::PushKind::Gradient as i32, ..Default::default() }
}

fn values(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect()
}

/// Valid messages of each method, encoded: (method path, messages of the call).
fn grpc_seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let sgd = ps::Optimizer { kind: Some(ps::optimizer::Kind::Sgd(ps::Sgd { learning_rate: 0.5, momentum: 0.9, nesterov: true })) };
    let adam = ps::Optimizer {
        kind: Some(ps::optimizer::Kind::Adam(ps::Adam { learning_rate: 0.01, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, ..Default::default() })),
    };
    let uniform = ps::Initializer { kind: Some(ps::initializer::Kind::Uniform(ps::UniformInit { low: -1.0, high: 1.0, seed: 3 })) };
    let register = |name: &str, shape: Vec<u64>, optimizer: &ps::Optimizer| ps::RegisterRequest {
        name: name.into(),
        shape,
        storage_dtype: F32,
        optimizer: Some(optimizer.clone()),
        init: Some(uniform.clone()),
        stochastic_rounding: false,
    };
    let push = |h: ps::PushHeader, data: Vec<u8>| ps::PushRequest { header: Some(h), data: data.into() }.encode_to_vec();
    let pull = ps::PullRequest { variable: "w".into(), wire_dtype: F32, timeout_ms: 50, ..Default::default() };
    let rate = ps::SetLearningRateRequest { learning_rate: Some(0.1), all_variables: true, ..Default::default() };
    vec![
        ("Register", vec![register("w", vec![4, 4], &sgd).encode_to_vec()]),
        ("Register", vec![register("fz", vec![3], &adam).encode_to_vec()]),
        ("Push", vec![push(header("w", 16, F32), values(16))]),
        ("Push", vec![push(header("w", 16, F32), values(8)), ps::PushRequest { header: None, data: values(8).into() }.encode_to_vec()]),
        ("Push", vec![push(header("w", 16, BF16), vec![0x3f; 32])]),
        ("Pull", vec![pull.encode_to_vec()]),
        ("PushPull", vec![push(ps::PushHeader { pull_timeout_ms: 50, ..header("w", 16, F32) }, values(16))]),
        ("SetLearningRate", vec![rate.encode_to_vec()]),
        ("ServerInfo", vec![ps::ServerInfoRequest {}.encode_to_vec()]),
        ("Checkpoint", vec![ps::CheckpointRequest { step: 3 }.encode_to_vec()]),
        ("RegisterTable", vec![table_register().encode_to_vec()]),
        ("Lookup", vec![ps::LookupRequest { table: "emb".into(), ids: table_ids().into(), wire_dtype: F32, timeout_ms: 50, ..Default::default() }.encode_to_vec()]),
        (
            "PushSparse",
            vec![ps::PushSparseRequest { table: "emb".into(), ids: table_ids().into(), rows: values(12).into(), wire_dtype: F32, ..Default::default() }
                .encode_to_vec()],
        ),
    ]
}

/// A small table with a capacity, so that mutated ids cannot grow it without bound.
fn table_register() -> ps::RegisterTableRequest {
    ps::RegisterTableRequest {
        name: "emb".into(),
        dim: 4,
        storage_dtype: F32,
        optimizer: Some(ps::RowOptimizer {
            kind: Some(ps::row_optimizer::Kind::Adagrad(ps::Adagrad { learning_rate: 0.1, initial_accumulator: 0.1, epsilon: 1e-8 })),
        }),
        admit_min_count: 2,
        eviction: ps::EvictionPolicy::Lru as i32,
        capacity: 1000,
        ..Default::default()
    }
}

/// Three ids, as little-endian u64 bytes.
fn table_ids() -> Vec<u8> {
    [7u64, 1 << 40, 7].iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// Sends one call's messages as raw bytes; returns its status code.
async fn raw_call(channel: &Channel, method: &str, msgs: Vec<Vec<u8>>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(format!("/parasync.ps.v1.ParameterServer/{method}")).unwrap();
    let mut first = msgs.into_iter();
    match method {
        "Push" => grpc.client_streaming(tonic::Request::new(futures::stream::iter(first)), path, RawCodec).await.map(drop),
        "PushPull" => {
            let mut s = grpc.streaming(tonic::Request::new(futures::stream::iter(first)), path, RawCodec).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }
        "Pull" => {
            let req = tonic::Request::new(first.next().unwrap_or_default());
            let mut s = grpc.server_streaming(req, path, RawCodec).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }
        _ => grpc.unary(tonic::Request::new(first.next().unwrap_or_default()), path, RawCodec).await.map(drop),
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the shard's /proc entry");
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap();
    kib << 10
}

const SHARD_ARGS: &[&str] = &["--mode", "async", "--num-workers", "2", "--max-shard-bytes", "64MiB", "--max-message-bytes", "1048576", "--chunk-bytes", "65536"];

/// The shard answers a well-formed call after the cases.
async fn still_serves(channel: &Channel) {
    let mut c = ParameterServerClient::new(channel.clone());
    c.server_info(ps::ServerInfoRequest {}).await.expect("the shard still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_grpc_messages_get_a_status_and_the_shard_keeps_serving() {
    common::bounded(600, async {
        let cluster = common::cluster(1, SHARD_ARGS);
        let pid = cluster.pid(0).unwrap();
        let channel = Channel::from_shared(format!("http://{}", cluster.addrs()[0])).unwrap().connect().await.unwrap();
        let seeds = grpc_seeds();
        // The variables the seeds name exist, so mutations reach past the lookups.
        for (method, msgs) in seeds.iter().filter(|(m, _)| m.starts_with("Register")) {
            raw_call(&channel, method, msgs.clone()).await.unwrap();
        }
        let mut rng = Rng(0xf0_22ed_9a7c);
        let mut codes = std::collections::BTreeMap::<String, usize>::new();
        let (n, started) = (cases(), Instant::now());
        let mut rss_after_warmup = 0;
        for i in 0..n {
            let (method, msgs) = &seeds[rng.below(seeds.len())];
            let pick = rng.below(msgs.len());
            let msgs: Vec<Vec<u8>> = msgs.iter().enumerate().map(|(j, m)| if j == pick { rng.mutate(m.clone()) } else { m.clone() }).collect();
            let r = tokio::time::timeout(Duration::from_secs(20), raw_call(&channel, method, msgs.clone()))
                .await
                .unwrap_or_else(|_| panic!("case {i}: {method} {msgs:02x?} hung"));
            let code = r.as_ref().err().map_or(Code::Ok, |s| s.code());
            if let Err(s) = &r {
                // A panic in the shard breaks the call: tonic reports the transport error.
                assert!(
                    !matches!(code, Code::Unknown | Code::Internal | Code::Unavailable | Code::Cancelled),
                    "case {i}: {method} {msgs:02x?}: {code:?} {}",
                    s.message()
                );
                assert!(!s.message().is_empty() && s.message().len() < 8192, "case {i}: {method}: {:?}", s.message());
            }
            *codes.entry(format!("{method} {code:?}")).or_default() += 1;
            if i == n / 10 {
                rss_after_warmup = rss(pid);
            }
            if (i + 1) % 2000 == 0 {
                eprintln!("{} cases in {:.1?}, shard RSS {} MiB", i + 1, started.elapsed(), rss(pid) >> 20);
            }
        }
        still_serves(&channel).await;
        let grown = rss(pid).saturating_sub(rss_after_warmup);
        eprintln!("outcomes: {codes:?}");
        assert!(grown < 64 << 20, "the shard grew by {} MiB after warm-up", grown >> 20);
        assert!(codes.keys().any(|k| k.ends_with(" Ok")) && codes.keys().any(|k| k.contains("InvalidArgument")), "{codes:?}");
    })
    .await;
}

/// Valid data-plane requests, framed, with their payloads.
fn data_seeds() -> Vec<Vec<u8>> {
    let frame = |op: Op, payload: Vec<u8>| {
        let mut out = Vec::new();
        put_frame(&ps::DataRequest { op: Some(op), payload_bytes: payload.len() as u64 }, &mut out);
        out.extend_from_slice(&payload);
        out
    };
    let pull = ps::PullRequest { variable: "w".into(), wire_dtype: F32, timeout_ms: 50, ..Default::default() };
    vec![
        frame(Op::Hello(ps::DataHello::default()), vec![]),
        frame(Op::Push(header("w", 16, F32)), values(16)),
        frame(Op::Push(header("w", 16, BF16)), vec![0x3f; 32]),
        frame(Op::Pull(pull.clone()), vec![]),
        frame(Op::PushPull(ps::PushHeader { pull_timeout_ms: 50, ..header("w", 16, F32) }), values(16)),
        [frame(Op::Hello(ps::DataHello::default()), vec![]), frame(Op::Pull(pull), vec![])].concat(),
        frame(Op::Lookup(ps::LookupRequest { table: "emb".into(), num_ids: 3, wire_dtype: F32, timeout_ms: 50, ..Default::default() }), table_ids()),
        frame(
            Op::PushSparse(ps::PushSparseRequest { table: "emb".into(), num_ids: 3, wire_dtype: BF16, ..Default::default() }),
            [table_ids(), vec![0x3f; 24]].concat(),
        ),
    ]
}

/// Sends `bytes` on a new data-plane connection, closes the sending side, and reads until
/// the shard closes; false if it did not within `limit`.
fn data_case(addr: &str, bytes: &[u8], limit: Duration) -> bool {
    let mut s = TcpStream::connect(addr).expect("connecting to the data plane");
    // Closed with a reset: no TIME_WAIT left behind for thousands of cases.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a linger struct of the size given.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&linger as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as u32);
    }
    s.set_read_timeout(Some(limit)).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true, // reset by the shard
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_data_plane_connections_end_and_the_shard_keeps_serving() {
    common::bounded(600, async {
        let cluster = common::cluster(1, SHARD_ARGS);
        let pid = cluster.pid(0).unwrap();
        let channel = Channel::from_shared(format!("http://{}", cluster.addrs()[0])).unwrap().connect().await.unwrap();
        for (method, msgs) in grpc_seeds().into_iter().filter(|(m, _)| m.starts_with("Register")) {
            raw_call(&channel, method, msgs).await.unwrap();
        }
        let mut c = ParameterServerClient::new(channel.clone());
        let port = c.server_info(ps::ServerInfoRequest {}).await.unwrap().into_inner().data_port;
        let addr = format!("127.0.0.1:{port}");
        let rejected_before = cluster.metric_sum("parasync_rejected_requests_total").unwrap();
        let seeds = data_seeds();
        let n = cases();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut rng = Rng(0xda7a_91a_4e);
            let mut rss_after_warmup = 0;
            for i in 0..n {
                let mut bytes = MAGIC.to_vec();
                bytes.extend_from_slice(&seeds[rng.below(seeds.len())]);
                // Mostly past the greeting, sometimes in it.
                let bytes = match rng.below(8) {
                    0 => rng.mutate(bytes),
                    _ => [&bytes[..8], &rng.mutate(bytes[8..].to_vec())[..]].concat(),
                };
                assert!(data_case(&addr, &bytes, Duration::from_secs(10)), "case {i}: {bytes:02x?}: the shard neither answered nor closed");
                if i == n / 10 {
                    rss_after_warmup = rss(pid);
                }
                if (i + 1) % 2000 == 0 {
                    eprintln!("{} cases in {:.1?}, shard RSS {} MiB", i + 1, started.elapsed(), rss(pid) >> 20);
                }
            }
            let grown = rss(pid).saturating_sub(rss_after_warmup);
            assert!(grown < 64 << 20, "the shard grew by {} MiB after warm-up", grown >> 20);
        })
        .await
        .unwrap();
        still_serves(&channel).await;
        let rejected = cluster.metric_sum("parasync_rejected_requests_total").unwrap() - rejected_before;
        eprintln!("{n} connections, {rejected} requests rejected");
        assert!(rejected > 0.0, "the mutations should reach the request checks");
    })
    .await;
}
