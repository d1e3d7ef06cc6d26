//! Shards serving TLS (`--tls-cert`, `--tls-key`, optionally `--tls-client-ca`), with the
//! certificates `parasync tls-certs` makes: clients that trust the authority push and pull
//! over gRPC and the data plane; a plain-text client, a client trusting another authority,
//! and (with mutual TLS) a client without a certificate get a clear error, quickly.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::raw::{hello_op, Raw};
use parasync_client::{Client, ClientOptions, ClientTls, ErrorKind, Init, Optimizer, VariableSpec};

/// A fresh folder with an authority and certificates from `parasync tls-certs`.
fn certs(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parasync-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(common::exe()).args(["tls-certs", "--out"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn tls(dir: &Path, client_cert: bool) -> ClientTls {
    let (cert, key) = (dir.join("client.pem"), dir.join("client-key.pem"));
    let identity = client_cert.then_some((cert.as_path(), key.as_path()));
    ClientTls::from_files(&dir.join("ca.pem"), identity.map(|i| i.0), identity.map(|i| i.1), None).unwrap()
}

fn options(tls: Option<ClientTls>, data_plane: bool) -> ClientOptions {
    ClientOptions {
        data_plane,
        tls,
        connect_timeout: Duration::from_secs(3),
        pull_timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    }
}

fn server_args(dir: &Path, mutual: bool) -> Vec<String> {
    let mut a: Vec<String> = ["--mode", "async", "--num-workers", "1", "--tls-cert"].map(String::from).to_vec();
    a.push(dir.join("server.pem").to_string_lossy().into());
    a.push("--tls-key".into());
    a.push(dir.join("server-key.pem").to_string_lossy().into());
    if mutual {
        a.push("--tls-client-ca".into());
        a.push(dir.join("ca.pem").to_string_lossy().into());
    }
    a
}

/// Registers `w`, pushes a gradient of ones and pulls: the values come back one lower.
async fn train(c: &mut Client, name: &str) {
    let mut w = VariableSpec::new(name, &[3, 300]);
    w.optimizer = Optimizer::sgd(1.0);
    w.init = Init::Values((0..900).map(|i| i as f32).collect());
    c.register(vec![w]).await.unwrap();
    c.push(0, &[&vec![1.0; 900]]).await.unwrap();
    let got = c.pull(1).await.unwrap();
    assert_eq!(got[0], (0..900).map(|i| i as f32 - 1.0).collect::<Vec<_>>(), "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_trusting_the_authority_train_over_both_transports_and_others_are_refused() {
    common::bounded(120, async {
        let dir = certs("one-way");
        let args = server_args(&dir, false);
        let cluster = common::cluster(1, &args.iter().map(String::as_str).collect::<Vec<_>>());

        for data_plane in [true, false] {
            let mut c = Client::connect(&cluster.addrs(), options(Some(tls(&dir, false)), data_plane)).await.unwrap();
            assert_eq!(c.shard_info().await.unwrap()[0].data_plane.is_some(), data_plane);
            train(&mut c, &format!("w{}", data_plane as u8)).await;
        }

        // Plain text against TLS: an error within the connect budget, no hang.
        let started = Instant::now();
        let e = Client::connect(&cluster.addrs(), options(None, true)).await.err().expect("a plain client is refused");
        assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
        assert!(e.message.contains("PARASYNC_TLS_CA"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());

        // Another authority: the shard's certificate is not trusted.
        let other = certs("other");
        let e = Client::connect(&cluster.addrs(), options(Some(tls(&other, false)), true)).await.err().expect("refused");
        assert!(e.message.contains("certificate") || e.message.contains("UnknownIssuer"), "{e}");

        // A raw plain-text connection to the TLS data plane is closed, not left hanging.
        let data = Client::connect(&cluster.addrs(), options(Some(tls(&dir, false)), true)).await.unwrap().shard_info().await.unwrap()[0]
            .data_plane
            .clone()
            .unwrap();
        tokio::task::spawn_blocking(move || {
            let mut raw = Raw::open(&data);
            raw.send(hello_op(""), &[]);
            // At most a TLS alert record (content type 21), then the end of the stream.
            let mut answer = Vec::new();
            std::io::Read::read_to_end(&mut raw.0, &mut answer).expect("the shard closes the connection");
            assert!(answer.is_empty() || answer[0] == 21, "the shard answered plain text on its TLS port: {answer:02x?}");
        })
        .await
        .unwrap();
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate() {
    common::bounded(120, async {
        let dir = certs("mutual");
        let args = server_args(&dir, true);
        let cluster = common::cluster(1, &args.iter().map(String::as_str).collect::<Vec<_>>());
        let started = Instant::now();
        let e = Client::connect(&cluster.addrs(), options(Some(tls(&dir, false)), true)).await.err().expect("refused");
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
        assert!(e.message.contains("certificate"), "{e}");
        for data_plane in [true, false] {
            let mut c = Client::connect(&cluster.addrs(), options(Some(tls(&dir, true)), data_plane)).await.unwrap();
            assert_eq!(c.shard_info().await.unwrap()[0].data_plane.is_some(), data_plane);
            train(&mut c, &format!("m{}", data_plane as u8)).await;
        }
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[test]
fn bad_tls_files_stop_the_server_with_a_message() {
    let dir = certs("bad");
    let cert = dir.join("server.pem");
    let wrong_key = dir.join("client-key.pem");
    for (args, needle) in [
        (vec!["--tls-cert".into(), cert.clone(), "--tls-key".into(), wrong_key], "do not go together"),
        (vec!["--tls-cert".into(), cert.clone(), "--tls-key".into(), dir.join("missing.pem")], "missing.pem"),
        (vec!["--tls-cert".into(), dir.join("ca-key.pem"), "--tls-key".into(), dir.join("server-key.pem")], "no certificate"),
    ] {
        let out = std::process::Command::new(common::exe()).args(["server", "--listen", "127.0.0.1:0"]).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Rank 0 and rank 1 of a job (threads), each with its TLS settings: what each one's
/// allreduce of `[rank + 1; 1000]` gave, or its error.
fn two_ranks(tls: [Option<parasync_collective::JobTls>; 2], timeout: Duration) -> Vec<Result<Vec<f32>, parasync_collective::Error>> {
    use parasync_collective::{connect, connect_hosting, CommConfig, ConnectOptions, JoinSpec, ReduceOp, RendezvousHost, TcpOptions};
    let host = RendezvousHost::bind("127.0.0.1:0").unwrap();
    let master = host.local_addr().unwrap().to_string();
    let mut host = Some(host);
    std::thread::scope(|s| {
        let handles: Vec<_> = tls
            .into_iter()
            .enumerate()
            .map(|(rank, tls)| {
                let opts = ConnectOptions {
                    spec: JoinSpec { rank, world_size: 2, master: master.clone(), token: "tls-test".into(), auth_token: None, tls, timeout },
                    comm: CommConfig { timeout, ..CommConfig::default() },
                    // Every byte through the links (no copies from a peer's memory), over two
                    // connections per pair.
                    tcp: TcpOptions { peer_copy: false, streams: 2, ..TcpOptions::default() },
                    data_host: None,
                };
                let h = if rank == 0 { host.take() } else { None };
                s.spawn(move || {
                    let mut c = match h {
                        Some(h) => connect_hosting(&opts, h)?,
                        None => connect(&opts)?,
                    };
                    let mut v = vec![rank as f32 + 1.0; 1000];
                    c.allreduce(&mut v, ReduceOp::Sum)?;
                    // Larger than a socket buffer: the tunnel's backpressure in both directions.
                    let mut big: Vec<f32> = (0..1 << 20).map(|i| (i % 7) as f32 * (rank as f32 + 1.0)).collect();
                    c.allreduce(&mut big, ReduceOp::Sum)?;
                    assert!(big.iter().enumerate().all(|(i, &x)| x == (i % 7) as f32 * 3.0), "rank {rank}: the large allreduce");
                    Ok(v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn job_tls(dir: &Path) -> parasync_collective::JobTls {
    parasync_collective::JobTls::from_files(&dir.join("server.pem"), &dir.join("server-key.pem"), &dir.join("ca.pem"), None).unwrap()
}

#[test]
fn two_ranks_allreduce_over_tls_and_a_rank_of_another_authority_is_refused() {
    let dir = certs("ranks");
    let results = two_ranks([Some(job_tls(&dir)), Some(job_tls(&dir))], Duration::from_secs(20));
    for r in results {
        assert_eq!(r.unwrap(), vec![3.0; 1000]);
    }
    // A rank whose certificate another authority signed: refused by the rendezvous, and
    // rank 0 names it missing; both within the timeout.
    let other = certs("other-ranks");
    let started = Instant::now();
    let results = two_ranks([Some(job_tls(&dir)), Some(job_tls(&other))], Duration::from_secs(3));
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let errors: Vec<String> = results.into_iter().map(|r| r.expect_err("refused").to_string()).collect();
    assert!(errors[0].contains("ranks [1] did not join"), "{errors:?}");
    // And a plain rank against a TLS job.
    let results = two_ranks([Some(job_tls(&dir)), None], Duration::from_secs(3));
    assert!(results.iter().all(|r| r.is_err()), "a plain rank joined a TLS job");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other);
}
