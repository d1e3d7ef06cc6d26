//! The data plane (tensor bytes over plain TCP beside gRPC): the same results as gRPC for
//! every wire dtype, bad input refused with the gRPC status codes while the connection and
//! the variables stay intact, and a fallback to gRPC where a shard offers none.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use parasync_client::{Client, ClientOptions, DType, Init, Optimizer, VariableSpec};
use common::raw::{f32_bytes, pull_op, push_op, Raw};
use parasync_proto::data::put_frame;
use parasync_proto::ps;
use tonic::Code;

fn spec(name: &str, dtype: DType) -> VariableSpec {
    let mut v = VariableSpec::new(name, &[300, 7]);
    v.dtype = dtype;
    v.optimizer = Optimizer::Sgd { lr: 0.1, momentum: 0.5, nesterov: false };
    v.init = Init::Uniform { low: -1.0, high: 1.0, seed: 3 };
    v
}

async fn connect(cluster: &parasync::cluster::LocalCluster, wire: DType, data_plane: bool) -> Client {
    let opts = ClientOptions {
        wire_dtype: wire,
        data_plane,
        split_bytes: 2048,
        max_part_bytes: 2048,
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    Client::connect(&cluster.addrs(), opts).await.expect("connecting")
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|x| x.iter().map(|f| f.to_bits()).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_and_grpc_give_identical_results_for_every_dtype() {
    common::bounded(120, async {
        let cluster = common::cluster(2, &["--mode", "async", "--num-workers", "1"]);
        for (storage, wire) in [(DType::F32, DType::F32), (DType::F32, DType::Bf16), (DType::Bf16, DType::Bf16), (DType::Bf16, DType::F32)] {
            let mut finals = Vec::new();
            for data_plane in [true, false] {
                let name = format!("v_{storage}_{wire}_{data_plane}");
                let mut c = connect(&cluster, wire, data_plane).await;
                let info = c.shard_info().await.unwrap();
                assert!(info.iter().all(|i| i.data_plane.is_some() == data_plane), "{info:?}");
                c.register(vec![spec(&name, storage)]).await.unwrap();
                assert!(c.placement().unwrap().parts[0].len() > 2, "the variable travels as several parts");
                let mut params = c.pull(0).await.unwrap();
                for step in 0..5u64 {
                    let grad: Vec<f32> = params[0].iter().enumerate().map(|(i, p)| (p * 0.7 + i as f32 * 1e-3 + step as f32).cos()).collect();
                    if step % 2 == 0 {
                        c.push(step, &[&grad]).await.unwrap();
                        c.pull_into(step + 1, &mut params).await.unwrap();
                    } else {
                        c.push_pull(step, &[&grad], &mut params).await.unwrap();
                    }
                }
                finals.push(params);
            }
            assert_eq!(bits(&finals[0]), bits(&finals[1]), "storage {storage}, wire {wire}: data plane and gRPC agree bit for bit");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_parts_move_whole_and_alike_over_both_transports() {
    common::bounded(120, async {
        // 3 MiB parts: well above the sizes a reply carries inline, so pulls stream straight
        // from the variable and pushes land in place.
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        let mut v = VariableSpec::new("large", &[1536, 1024]);
        v.optimizer = Optimizer::adam(0.01);
        v.init = Init::Uniform { low: -1.0, high: 1.0, seed: 11 };
        let opts = |wire, data_plane| ClientOptions { wire_dtype: wire, data_plane, max_part_bytes: 3 << 20, ..Default::default() };
        let mut writer = Client::connect(&cluster.addrs(), opts(DType::F32, true)).await.unwrap();
        writer.register(vec![v.clone()]).await.unwrap();
        assert_eq!(writer.placement().unwrap().parts[0].len(), 2);
        let grad: Vec<f32> = (0..1536 * 1024).map(|i| ((i % 977) as f32 * 0.01).sin()).collect();
        writer.push(0, &[&grad]).await.unwrap();
        let mut bf16_writer = Client::connect(&cluster.addrs(), opts(DType::Bf16, true)).await.unwrap();
        bf16_writer.register(vec![v.clone()]).await.unwrap();
        bf16_writer.push(0, &[&grad]).await.unwrap();
        for wire in [DType::F32, DType::Bf16] {
            let mut pulled = Vec::new();
            for data_plane in [true, false] {
                let mut c = Client::connect(&cluster.addrs(), opts(wire, data_plane)).await.unwrap();
                c.register(vec![v.clone()]).await.unwrap();
                pulled.push(c.pull(0).await.unwrap());
            }
            assert_eq!(bits(&pulled[0]), bits(&pulled[1]), "wire {wire}: the same values over both transports");
            assert!(pulled[0][0].iter().all(|x| x.is_finite()) && pulled[0][0][5] != pulled[0][0][6]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_pulls_may_use_different_wire_dtypes() {
    common::bounded(120, async {
        // bf16 gradients pushed, f32 weights pulled, with pull and with push_pull, over both
        // transports: the values come back exactly, not rounded to bf16.
        for data_plane in [true, false] {
            let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
            let mut v = VariableSpec::new("w", &[256, 1024]);
            v.optimizer = Optimizer::sgd(1.0);
            v.init = Init::Constant(0.1);
            let opts = ClientOptions {
                wire_dtype: DType::Bf16,
                pull_wire_dtype: Some(DType::F32),
                data_plane,
                max_part_bytes: 512 << 10,
                ..Default::default()
            };
            let mut c = Client::connect(&cluster.addrs(), opts).await.unwrap();
            c.register(vec![v]).await.unwrap();
            let first = c.pull(0).await.unwrap();
            assert!(first[0].iter().all(|&x| x == 0.1), "f32 0.1 itself, not its bf16 rounding ({data_plane})");
            // 0.5 is exact in bf16: after one push the weights are 0.1 - 0.5, computed in f32.
            let grad = vec![0.5f32; 256 * 1024];
            let mut out = vec![vec![0.0f32; 256 * 1024]];
            c.push_pull(0, &[&grad], &mut out).await.unwrap();
            assert!(out[0].iter().all(|&x| x == 0.1f32 - 0.5), "push_pull ({data_plane}): {}", out[0][0]);
            c.push(1, &[&grad]).await.unwrap();
            let after = c.pull(0).await.unwrap();
            assert!(after[0].iter().all(|&x| x == (0.1f32 - 0.5) - 0.5), "pull ({data_plane}): {}", after[0][0]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_without_a_reachable_data_plane_is_served_over_grpc() {
    common::bounded(60, async {
        // none at all, and one the client cannot reach (it listens on another loopback
        // address than the one the client dials gRPC on)
        for data_listen in ["off", "127.0.0.2:0"] {
            let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1", "--data-listen", data_listen]);
            let mut c = connect(&cluster, DType::F32, true).await;
            assert_eq!(c.shard_info().await.unwrap()[0].data_plane, None, "{data_listen}");
            c.register(vec![spec("w", DType::F32)]).await.unwrap();
            let before = c.pull(0).await.unwrap();
            c.push(0, &[&vec![1.0; 2100]]).await.unwrap();
            let after = c.pull(0).await.unwrap();
            assert!((before[0][0] - 0.1 - after[0][0]).abs() < 1e-6, "{data_listen}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_data_plane_is_refused_and_changes_nothing() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        let mut c = connect(&cluster, DType::F32, true).await;
        let mut w = VariableSpec::new("w", &[4]);
        w.optimizer = Optimizer::sgd(1.0);
        w.init = Init::Values(vec![1.0, 2.0, 3.0, 4.0]);
        c.register(vec![w]).await.unwrap();
        let addr = c.shard_info().await.unwrap()[0].data_plane.clone().expect("the shard offers a data plane");

        tokio::task::spawn_blocking(move || {
            let good = f32_bytes(&[1.0; 4]);
            let mut raw = Raw::open(&addr);
            raw.send(push_op("nope", 4, ps::Dtype::F32), &good);
            raw.expect(Code::NotFound, "\"nope\"", "unknown variable");
            raw.send(push_op("w", 4, ps::Dtype::F32), &good[..12]);
            raw.expect(Code::InvalidArgument, "payload has 12 bytes", "payload shorter than the shape");
            raw.send(push_op("w", 5, ps::Dtype::F32), &f32_bytes(&[1.0; 5]));
            raw.expect(Code::InvalidArgument, "5 elements", "element count not matching the shape");
            raw.send(push_op("w", 4, ps::Dtype::Unspecified), &good);
            raw.expect(Code::InvalidArgument, "wire_dtype", "no wire dtype");
            raw.send(push_op("w", 4, ps::Dtype::F32), &f32_bytes(&[0.5, f32::NAN, 1.0, 1.0]));
            raw.expect(Code::InvalidArgument, "element 1 is NaN", "non-finite gradient");
            raw.send(pull_op("w"), &good);
            raw.expect(Code::InvalidArgument, "carries no payload", "pull with a payload");
            raw.send(None, &good);
            raw.expect(Code::InvalidArgument, "no operation", "request without an operation");
            // every refusal consumed its payload: the same connection still serves, and the
            // variable is untouched
            raw.send(pull_op("w"), &[]);
            let (r, values) = raw.reply();
            assert_eq!(r.code, 0, "{}", r.message);
            assert_eq!(values, f32_bytes(&[1.0, 2.0, 3.0, 4.0]));
            // a push that is fine is applied
            raw.send(push_op("w", 4, ps::Dtype::Bf16), &[0x80, 0x3f].repeat(4));
            let (r, _) = raw.reply();
            assert!(r.code == 0 && r.push.unwrap().accepted, "{}", r.message);

            // framing that cannot be followed gets an error, then the connection closes
            let mut raw = Raw::open(&addr);
            raw.0.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
            raw.expect(Code::InvalidArgument, "at most", "oversized header");
            assert!(raw.closed());
            let mut raw = Raw::open(&addr);
            raw.0.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
            raw.expect(Code::InvalidArgument, "malformed data request", "undecodable header");
            assert!(raw.closed());
            // a connection that does not greet is closed without a word
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            assert!(Raw(s).closed());
        })
        .await
        .unwrap();

        assert_eq!(c.pull(0).await.unwrap()[0], vec![0.0, 1.0, 2.0, 3.0], "only the valid push changed the values");
        assert!(cluster.metric_sum("parasync_rejected_requests_total").unwrap() >= 9.0, "every refusal is counted");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_shard_is_found_on_its_new_data_port() {
    common::bounded(90, async {
        // A fixed gRPC port (as in a real cluster), the data plane on a free port each start.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let start = || {
            std::process::Command::new(common::exe())
                .args(["server", "--listen", &addr, "--mode", "async", "--num-workers", "1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let first = Kill(start());
        let opts = ClientOptions { connect_timeout: Duration::from_secs(20), ..Default::default() };
        let mut c = Client::connect(std::slice::from_ref(&addr), opts).await.unwrap();
        let mut w = VariableSpec::new("w", &[4]);
        w.optimizer = Optimizer::sgd(1.0);
        c.register(vec![w.clone()]).await.unwrap();
        c.push(0, &[&[1.0; 4]]).await.unwrap();
        let old = c.shard_info().await.unwrap()[0].data_plane.clone().unwrap();

        drop(first); // the shard dies with its state; a new one starts on the same gRPC port
        let _second = Kill(start());
        let mut registered = false;
        for _ in 0..100 {
            if c.register(vec![w.clone()]).await.is_ok() {
                registered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(registered, "the restarted shard accepts the registration");
        c.push(0, &[&[2.0; 4]]).await.expect("the push finds the new data port");
        assert_eq!(c.pull(0).await.unwrap()[0], vec![-2.0; 4]);
        let new = c.shard_info().await.unwrap()[0].data_plane.clone().unwrap();
        assert_ne!(new, old, "the client follows the shard to its new data port");
    })
    .await;
}

#[test]
fn sigterm_releases_a_pull_waiting_on_the_data_plane() {
    let mut cluster = common::cluster(1, &["--mode", "sync", "--num-workers", "2", "--pull-timeout-ms", "60000"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let addrs = cluster.addrs();
    let waiting = rt.spawn(async move {
        // No waiting for the shard to come back: this is about how the server lets go.
        let opts = ClientOptions { recovery_timeout: Duration::ZERO, ..Default::default() };
        let mut c = Client::connect(&addrs, opts).await.unwrap();
        c.register(vec![VariableSpec::new("w", &[64, 1024])]).await.unwrap();
        assert!(c.shard_info().await.unwrap()[0].data_plane.is_some());
        // step 1 needs both workers' gradients for step 0: nobody pushes, so this waits
        let started = std::time::Instant::now();
        (c.pull(1).await, started)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!waiting.is_finished(), "the pull must be waiting for its step");
    let statuses = cluster.terminate(Duration::from_secs(15)).expect("server exits after SIGTERM");
    assert!(statuses[0].success(), "exit status {:?}", statuses[0]);
    let (result, started) = rt.block_on(waiting).unwrap();
    let err = result.expect_err("the waiting pull ends with an error, not values");
    assert_eq!(err.kind, parasync_client::ErrorKind::Unavailable, "{err}");
    assert!(err.message.contains("shutting down"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "released at shutdown, not at the 60 s pull timeout");
}

#[test]
fn sigterm_closes_idle_data_connections_at_once() {
    // A long drain timeout: the server must not sit it out for an idle connection.
    let mut cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1", "--drain-timeout-ms", "30000"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let addrs = cluster.addrs();
    let client = rt.block_on(async move {
        let mut c = Client::connect(&addrs, ClientOptions::default()).await.unwrap();
        c.register(vec![VariableSpec::new("w", &[256])]).await.unwrap();
        c.push(0, &[&[1.0; 256]]).await.unwrap(); // leaves a pooled data connection open
        c
    });
    let started = std::time::Instant::now();
    let statuses = cluster.terminate(Duration::from_secs(40)).expect("server exits after SIGTERM");
    assert!(statuses[0].success(), "exit status {:?}", statuses[0]);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}: the idle connection held the drain", started.elapsed());
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_pull_whose_pull_times_out_says_its_push_was_accepted() {
    common::bounded(60, async {
        // sync with two workers: worker 0's gradient is accepted for step 0, which then
        // waits for worker 1 until the server's pull timeout
        // (the server's default would wait a minute: the client's pull_timeout must count)
        let cluster = common::cluster(1, &["--mode", "sync", "--num-workers", "2", "--pull-timeout-ms", "60000"]);
        for data_plane in [true, false] {
            let opts = ClientOptions { data_plane, pull_timeout: Some(Duration::from_millis(300)), ..Default::default() };
            let mut c = Client::connect(&cluster.addrs(), opts).await.unwrap();
            let name = format!("w{data_plane}");
            c.register(vec![VariableSpec::new(&name, &[8])]).await.unwrap();
            let mut out = vec![vec![0.0; 8]];
            let err = c.push_pull(0, &[&[1.0; 8]], &mut out).await.expect_err("step 1 never completes");
            assert_eq!(err.kind, parasync_client::ErrorKind::Timeout, "data plane {data_plane}: {err}");
            assert!(err.message.contains("the push was accepted"), "data plane {data_plane}: {err}");
            // and it was: a second push for step 0 is a duplicate
            let again = c.push(0, &[&[1.0; 8]]).await.expect_err("a duplicate");
            assert!(again.message.contains("already pushed"), "data plane {data_plane}: {again}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_initial_values_up_to_4_mib_and_small_client_chunks_work_over_grpc() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        // 2.4 MB of initial values go inside the registration; the client's own chunks are
        // 128 KiB, the server's replies 1 MiB
        let opts = ClientOptions { data_plane: false, chunk_bytes: 128 << 10, ..Default::default() };
        let mut c = Client::connect(&cluster.addrs(), opts).await.unwrap();
        // (usage errors first: a name listed twice, a shape whose size overflows)
        let twice = c.register(vec![VariableSpec::new("a", &[2]), VariableSpec::new("a", &[2])]).await.unwrap_err();
        assert!(twice.message.contains("listed twice"), "{twice}");
        let huge = c.register(vec![VariableSpec::new("h", &[1 << 40, 1 << 40])]).await.unwrap_err();
        assert!(huge.message.contains("too large"), "{huge}");
        let values: Vec<f32> = (0..600_000).map(|i| i as f32).collect();
        let mut w = VariableSpec::new("w", &[600, 1000]);
        w.init = Init::Values(values.clone());
        c.register(vec![w]).await.expect("registering 2.4 MB of inline values");
        let got = c.pull(0).await.expect("pulling 2.4 MB in the server's 1 MiB chunks");
        assert_eq!(bits(&got), bits(&[values]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_shard_error_names_the_cause() {
    common::bounded(30, async {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // closed again
        let opts = ClientOptions { connect_timeout: Duration::from_millis(300), ..Default::default() };
        let Err(err) = Client::connect(&[format!("127.0.0.1:{port}")], opts).await else { panic!("nobody listens") };
        assert_eq!(err.kind, parasync_client::ErrorKind::Unavailable, "{err}");
        assert!(err.message.to_lowercase().contains("refused"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dies_mid_push_changes_nothing() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        let c = connect(&cluster, DType::F32, true).await;
        let mut w = VariableSpec::new("w", &[1 << 20]);
        w.optimizer = Optimizer::sgd(1.0);
        w.init = Init::Constant(5.0);
        let opts = ClientOptions { max_part_bytes: 8 << 20, ..Default::default() };
        let mut c2 = Client::connect(&cluster.addrs(), opts).await.unwrap();
        c2.register(vec![w]).await.unwrap();
        let addr = c.shard_info().await.unwrap()[0].data_plane.clone().unwrap();
        tokio::task::spawn_blocking(move || {
            // 4 MiB announced, 1 MiB sent, then the connection drops
            let mut raw = Raw::open(&addr);
            let mut out = Vec::new();
            let op = push_op("w", 1 << 20, ps::Dtype::F32);
            put_frame(&ps::DataRequest { op, payload_bytes: 4 << 20 }, &mut out);
            out.extend(f32_bytes(&vec![1.0; 1 << 18]));
            raw.0.write_all(&out).unwrap();
            drop(raw);
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let values = c2.pull(0).await.unwrap();
        assert!(values[0].iter().all(|&v| v == 5.0), "a push whose data never all arrived is not applied");
        c2.push(0, &[&vec![1.0; 1 << 20]]).await.unwrap();
        assert!(c2.pull(0).await.unwrap()[0].iter().all(|&v| v == 4.0), "the shard keeps serving");
        drop(c);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_gave_back_its_buffers_when_idle_still_serves() {
    common::bounded(60, async {
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1"]);
        let opts = ClientOptions { wire_dtype: DType::Bf16, data_connections_per_shard: 1, ..Default::default() };
        let mut c = Client::connect(&cluster.addrs(), opts).await.unwrap();
        let mut v = VariableSpec::new("v", &[512, 1024]);
        v.init = Init::Uniform { low: -1.0, high: 1.0, seed: 5 };
        c.register(vec![v]).await.unwrap();
        let first = c.pull(0).await.unwrap();
        // the server releases the connection's megabyte-sized buffers after 2 s idle
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let grad = vec![0.5f32; 512 * 1024];
        c.push(0, &[&grad]).await.unwrap();
        let second = c.pull(0).await.unwrap();
        assert_ne!(bits(&first), bits(&second));
        assert_eq!(second[0].len(), 512 * 1024);
    })
    .await;
}
