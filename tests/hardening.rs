//! What a third-party gRPC client could do to a shard before these checks existed, each
//! tried as such a client would (raw generated stubs, all-default fields): every one now
//! gets a clear refusal, and the shard keeps serving with its state intact.

mod common;

use std::time::{Duration, Instant};

use parasync_proto::ps::{self, parameter_server_client::ParameterServerClient};
use tonic::transport::Channel;
use tonic::Code;

const F32: i32 = ps::Dtype::F32 as i32;

fn sgd(lr: f32) -> Option<ps::Optimizer> {
    Some(ps::Optimizer { kind: Some(ps::optimizer::Kind::Sgd(ps::Sgd { learning_rate: lr, momentum: 0.0, nesterov: false })) })
}

fn reg(name: &str, init: Option<ps::initializer::Kind>) -> ps::RegisterRequest {
    ps::RegisterRequest {
        name: name.into(),
        shape: vec![4],
        storage_dtype: F32,
        optimizer: sgd(0.1),
        init: init.map(|k| ps::Initializer { kind: Some(k) }),
        stochastic_rounding: false,
    }
}

async fn connect(cluster: &parasync::cluster::LocalCluster) -> ParameterServerClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", cluster.addrs()[0])).unwrap().connect().await.unwrap();
    ParameterServerClient::new(channel)
}

async fn info(c: &mut ParameterServerClient<Channel>) -> Vec<(String, String, f32)> {
    let mut v: Vec<_> = c
        .server_info(ps::ServerInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .variables
        .into_iter()
        .map(|v| (v.name, v.optimizer, v.learning_rate))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_default_set_learning_rate_changes_nothing_and_rates_are_visible() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        let mut c = connect(&cluster).await;
        c.register(reg("a", None)).await.unwrap();
        c.register(reg("b", None)).await.unwrap();

        // An empty message used to set every rate to 0.
        let err = c.set_learning_rate(ps::SetLearningRateRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        let err = c
            .set_learning_rate(ps::SetLearningRateRequest { all_variables: true, ..Default::default() })
            .await
            .unwrap_err();
        assert!(err.message().contains("learning_rate is required"), "{}", err.message());
        assert_eq!(info(&mut c).await, vec![("a".into(), "sgd".into(), 0.1), ("b".into(), "sgd".into(), 0.1)]);

        let all = ps::SetLearningRateRequest { learning_rate: Some(0.02), all_variables: true, ..Default::default() };
        assert_eq!(c.set_learning_rate(all).await.unwrap().into_inner().updated, 2);
        assert_eq!(info(&mut c).await, vec![("a".into(), "sgd".into(), 0.02), ("b".into(), "sgd".into(), 0.02)]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_initializer_ranges_are_refused_with_short_messages() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        let mut c = connect(&cluster).await;

        // ±3e38 used to panic inside the sampler and come back as `internal`.
        let wide = ps::initializer::Kind::Uniform(ps::UniformInit { low: -3e38, high: 3e38, seed: 1 });
        let err = c.register(reg("u", Some(wide))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains("uniform initializer"), "{}", err.message());

        // A 16 KiB name used to be echoed whole: the reply's metadata went past the client's
        // limit and the real error was lost.
        let long = "n".repeat(16 << 10);
        let err = c.register(reg(&long, None)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().len() < 1024, "the error repeats {} bytes", err.message().len());
        assert!(err.message().contains("(16384 bytes)"), "{}", err.message());

        // Names that would split log lines, or say nothing.
        for bad in ["a\0b", "two\nlines", "cr\r", "   ", ""] {
            let err = c.register(reg(bad, None)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {}", err.message());
        }
        // None of it registered anything; the shard still serves.
        assert!(info(&mut c).await.is_empty());
        assert!(c.register(reg("ok", None)).await.unwrap().into_inner().created);

        // The Rust client refuses such names before sending anything.
        let mut client = common::client(&cluster, 0, 1 << 20).await;
        let e = client.register(vec![parasync_client::VariableSpec::new("bad\nname", &[4])]).await.unwrap_err();
        assert_eq!(e.kind, parasync_client::ErrorKind::Usage, "{e}");
        assert!(e.to_string().contains("control characters"), "{e}");
        assert_eq!(info(&mut c).await.len(), 1);
    })
    .await;
}

#[test]
fn an_open_health_watch_does_not_hold_the_shutdown() {
    let mut cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1", "--drain-timeout-ms", "20000"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let addr = cluster.addrs()[0].clone();
    let watched = rt.spawn(async move {
        use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut h = HealthClient::new(channel);
        let mut s = h
            .watch(HealthCheckRequest { service: "parasync.ps.v1.ParameterServer".into() })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while let Ok(Some(m)) = s.message().await {
            seen.push(ServingStatus::try_from(m.status).unwrap());
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(500)); // the watch is open
    let t = Instant::now();
    let statuses = cluster.terminate(Duration::from_secs(30)).expect("the shard exits");
    let took = t.elapsed();
    assert!(statuses[0].success(), "{:?}", statuses[0]);
    assert!(took < Duration::from_secs(5), "an open Watch held the shutdown for {took:?} (drain timeout 20 s)");
    let seen = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), watched).await }).expect("watch ended").unwrap();
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(seen, vec![ServingStatus::Serving, ServingStatus::NotServing], "the watcher sees the shutdown, then the end");
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_past_the_shard_limit_are_refused_before_anything_is_allocated() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1", "--max-shard-bytes", "64MiB"]);
        let pid = cluster.servers[0].child.as_ref().unwrap().id();
        let mut c = connect(&cluster).await;
        let sized = |name: &str, elements: u64, init: Option<ps::initializer::Kind>| ps::RegisterRequest {
            shape: vec![elements],
            ..reg(name, init)
        };
        let ones = || Some(ps::initializer::Kind::Constant(1.0));
        // 40 MiB of f32 values: fits
        assert!(c.register(sized("a", 10 << 20, ones())).await.unwrap().into_inner().created);
        let before = rss_bytes(pid);
        // 32 MiB more does not: refused, naming what it needs and what the shard holds
        let err = c.register(sized("b", 8 << 20, ones())).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains("needs 33554432 bytes") && err.message().contains("holds 41943040"), "{}", err.message());
        // Adam keeps two slots: 12 MiB of values need 36 MiB
        let adam = ps::Optimizer { kind: Some(ps::optimizer::Kind::Adam(ps::Adam { learning_rate: 0.1, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, ..Default::default() })) };
        let err = c.register(ps::RegisterRequest { optimizer: Some(adam), ..sized("c", 3 << 20, ones()) }).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains("2 optimizer slot"), "{}", err.message());
        // past the per-variable element limit (2^30): refused as well, nothing allocated
        let err = c.register(sized("d", (1 << 30) + 1, ones())).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains("element limit"), "{}", err.message());
        let after = rss_bytes(pid);
        assert!(after < before + (8 << 20), "RSS grew from {before} to {after} bytes on refused registrations");
        // what fits still fits
        assert!(c.register(sized("e", 4 << 20, ones())).await.unwrap().into_inner().created);
        assert_eq!(info(&mut c).await.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(), ["a", "e"]);
    })
    .await;
}

/// Raises this process's open-file limit to at least `want` (up to the hard limit).
fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}

/// Whether the server closed `s` (end of file or reset) rather than keeping it open.
fn closed(s: &std::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_data_connections_is_capped_and_timed_out_while_clients_go_on() {
    assert!(raise_fd_limit(4096) >= 2200, "this test needs 2 200 open files");
    common::bounded(90, async {
        let cluster = common::cluster(
            1,
            &["--mode", "async", "--num-workers", "1", "--data-max-connections", "64", "--data-idle-timeout-s", "12"],
        );
        let mut c = common::client(&cluster, 0, 1 << 20).await;
        let mut spec = parasync_client::VariableSpec::new("w", &[1 << 16]);
        spec.optimizer = parasync_client::Optimizer::sgd(1.0);
        c.register(vec![spec]).await.unwrap();
        c.push(0, &[&vec![1.0f32; 1 << 16]]).await.unwrap(); // its data-plane connection is open

        let mut raw = connect(&cluster).await;
        let port = raw.server_info(ps::ServerInfoRequest {}).await.unwrap().into_inner().data_port;
        assert!(port > 0, "the shard runs a data plane");
        let flood: Vec<std::net::TcpStream> = tokio::task::spawn_blocking(move || {
            (0..2000)
                .map(|_| {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
                    let _ = std::io::Write::write_all(&mut s, parasync_proto::data::MAGIC);
                    s.set_nonblocking(true).unwrap();
                    s
                })
                .collect()
        })
        .await
        .unwrap();
        // Wait (bounded) until the shard has taken every connection off its backlog: all
        // but the 64 it keeps are refused and counted. (Before the idle timeout frees slots.)
        let t = std::time::Instant::now();
        while cluster.metric_sum("parasync_rejected_requests_total").unwrap() < 1900.0 && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(cluster.metric_sum("parasync_rejected_requests_total").unwrap() >= 1900.0, "refused connections are counted");
        let open = flood.iter().filter(|s| !closed(s)).count();
        assert!(open <= 64, "{open} of 2000 flood connections stayed open past --data-max-connections 64");
        assert!(open > 0, "connections under the limit are served");

        // The registered client goes on over its own connection.
        for step in 1..=5 {
            c.push(step, &[&vec![1.0f32; 1 << 16]]).await.unwrap();
        }
        assert_eq!(c.pull(0).await.unwrap()[0][..4], [-6.0; 4], "six pushes of 1.0 with lr 1");

        // Past the idle timeout every flood connection is closed; the client reconnects.
        tokio::time::sleep(Duration::from_millis(13_000)).await;
        let open = flood.iter().filter(|s| !closed(s)).count();
        assert_eq!(open, 0, "idle connections outlived --data-idle-timeout-s 12");
        c.push(6, &[&vec![1.0f32; 1 << 16]]).await.unwrap();
        assert_eq!(c.pull(0).await.unwrap()[0][..4], [-7.0; 4]);
    })
    .await;
}
