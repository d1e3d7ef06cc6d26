//! Exactly-once pushes: a TCP proxy between a client and its shard loses the reply to a
//! push, or cuts a push off halfway; the client sends it again, and the shard applies every
//! push exactly once.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parasync_client::{Client, ClientOptions, Init, Optimizer, VariableSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Once the client has sent `after` bytes: forward the rest of its request, throw away
    /// whatever the shard answers, and close the connection 300 ms later.
    DropReply,
    /// Once the client has sent `after` bytes: close the connection there, mid-request.
    CutRequest,
}

/// A TCP proxy on 127.0.0.1 that injects `fault` once, on the first connection that
/// carries `after` bytes from the client.
struct Proxy {
    addr: SocketAddr,
    fired: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr, fault: Fault, after: usize) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fired);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else { continue };
                tokio::spawn(relay(client, server, fault, after, Arc::clone(&f)));
            }
        });
        Proxy { addr, fired, task }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, fault: Fault, after: usize, fired: Arc<AtomicBool>) {
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let dropping = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let (d, stop) = (Arc::clone(&dropping), tokio::sync::Notify::new());
    let stop = Arc::new(stop);
    let stop_up = Arc::clone(&stop);
    let up = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let total = sent.fetch_add(n, Ordering::Relaxed) + n;
            if total >= after && !fired.swap(true, Ordering::AcqRel) {
                match fault {
                    Fault::CutRequest => {
                        let keep = n - (total - after);
                        let _ = sw.write_all(&buf[..keep]).await;
                        stop_up.notify_one();
                        return;
                    }
                    Fault::DropReply => {
                        d.store(true, Ordering::Release);
                        let stop = Arc::clone(&stop_up);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            stop.notify_one();
                        });
                    }
                }
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if dropping.load(Ordering::Acquire) {
                continue; // the reply is lost
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending, or the fault's deadline, closes both sides.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = stop.notified() => {}
    }
}

const LEN: usize = 1000;
const PUSHES: u64 = 30;

/// One worker pushes gradient k + 1 at step k through `proxy` (gRPC, no data plane), lr 1
/// from zeros: exactly once each, the values end at -(1 + 2 + … + PUSHES).
/// Also returns the parts the push summaries say were sent again, and answered as duplicates.
async fn run(mode: &str, fault: Fault) -> (f64, Vec<f32>, Vec<(String, u64)>, (usize, usize)) {
    let cluster = common::cluster(1, &["--mode", mode, "--num-workers", "1"]);
    let target: SocketAddr = cluster.addrs()[0].parse().unwrap();
    // About a third of the way through (each push is ~4 KB of values).
    let proxy = Proxy::start(target, fault, 10 * LEN * 4 + 2000).await;
    let opts = ClientOptions {
        data_plane: false,
        pull_timeout: Some(Duration::from_secs(20)),
        recovery_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let mut c = Client::connect(&[proxy.addr.to_string()], opts).await.unwrap();
    let mut w = VariableSpec::new("w", &[LEN]);
    w.optimizer = Optimizer::sgd(1.0);
    w.init = Init::Zeros;
    c.register(vec![w]).await.unwrap();
    let mut values = vec![vec![0f32; LEN]];
    let (mut retried, mut duplicate) = (0, 0);
    for k in 0..PUSHES {
        let grad = vec![(k + 1) as f32; LEN];
        let s = c.push_pull(k, &[&grad], &mut values).await.unwrap_or_else(|e| panic!("{mode} {fault:?}, push {k}: {e}"));
        assert_eq!(s.parts.len(), 1);
        assert!(s.parts[0].applied && s.accepted == 1 && s.duplicate <= 1, "{mode} {fault:?}, push {k}: {s:?}");
        assert_eq!((s.retried, s.parts[0].attempts > 1), (usize::from(s.parts[0].attempts > 1), s.retried == 1), "{s:?}");
        retried += s.retried;
        duplicate += s.duplicate;
    }
    assert!(proxy.fired.load(Ordering::Acquire), "{mode} {fault:?}: the fault was injected");
    let duplicates = cluster.metric_sum("parasync_duplicate_pushes_total").unwrap();
    let info = c.shard_info().await.unwrap().remove(0);
    (duplicates, values.remove(0), info.variables, (retried, duplicate))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_whose_reply_is_lost_is_applied_once() {
    common::bounded(120, async {
        let want = -((PUSHES * (PUSHES + 1) / 2) as f32);
        for mode in ["async", "sync"] {
            let (duplicates, values, vars, (retried, duplicate)) = run(mode, Fault::DropReply).await;
            assert!(values.iter().all(|&v| v == want), "{mode}: {} instead of {want}: a push counted twice or not at all", values[0]);
            assert!(duplicates >= 1.0, "{mode}: the retry reached the shard and was answered from its first result");
            assert!(retried >= 1 && duplicate >= 1, "{mode}: the summaries say so too: {retried} retried, {duplicate} duplicate");
            assert_eq!(vars, vec![("w".to_string(), PUSHES)], "{mode}: one version per push");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cut_off_halfway_is_applied_once() {
    common::bounded(120, async {
        let want = -((PUSHES * (PUSHES + 1) / 2) as f32);
        for mode in ["async", "sync"] {
            let (_, values, vars, (retried, duplicate)) = run(mode, Fault::CutRequest).await;
            assert!(values.iter().all(|&v| v == want), "{mode}: {} instead of {want}", values[0]);
            assert!(retried >= 1 && duplicate == 0, "{mode}: sent again, applied by the retry: {retried} retried, {duplicate} duplicate");
            assert_eq!(vars, vec![("w".to_string(), PUSHES)], "{mode}");
        }
    })
    .await;
}
