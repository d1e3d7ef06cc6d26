//! The emulated cluster network (needs root, as CI runs): hosts in network namespaces on a
//! switch of their own, links shaped by tc, real `parasync` processes on the hosts, and
//! nothing left behind afterwards. Every address used lives inside the test's namespaces.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use parasync::netlab::{self, LinkShape, NetLab};
use parasync_client::{Client, ClientOptions, Init, Optimizer, VariableSpec};

/// A network named after this test and process (so parallel tests and runs never meet).
fn lab(tag: &str, rate_bits: u64) -> NetLab {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the emulated-network tests need root (network namespaces, tc): run the suite as root");
    let name = format!("pstest-{tag}-{}", std::process::id());
    NetLab::up(&name, 2, LinkShape { rate_bits, delay: Duration::ZERO }).expect("bringing the emulated network up")
}

/// Veth devices in the machine's own namespace (the test must add none).
fn own_veths() -> usize {
    let out = std::process::Command::new("ip").args(["-o", "link", "show", "type", "veth"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Kills the child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first stdout line of `child`, within 30 s.
fn first_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("no first line within 30 s")
}

/// Runs `f` on a thread that has joined `netns`, within `secs`.
fn in_netns<T: Send + 'static>(netns: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = netns.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        netlab::enter(&netns).unwrap();
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).expect("the thread in the namespace did not finish in time")
}

#[test]
fn a_shaped_link_carries_a_bulk_transfer_at_its_rate_and_nothing_is_left_behind() {
    let veths_before = own_veths();
    let mut lab = lab("rate", 1_000_000_000);
    let (h0, h1) = (lab.hosts[0].clone(), lab.hosts[1].clone());
    let bytes = 50_000_000usize;

    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let receiver = {
        let ns = h0.netns.clone();
        std::thread::spawn(move || {
            netlab::enter(&ns).unwrap();
            let l = TcpListener::bind(SocketAddr::new(h0.addr.into(), 0)).unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            loop {
                match s.read(&mut buf).unwrap() {
                    0 => break,
                    k => n += k,
                }
            }
            (n, Instant::now())
        })
    };
    let target: SocketAddr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let started = in_netns(&h1.netns, 60, move || {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(10)).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let started = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let k = left.min(chunk.len());
            s.write_all(&chunk[..k]).unwrap();
            left -= k;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        started
    });
    let (received, done) = receiver.join().unwrap();
    assert_eq!(received, bytes);
    let took = done.duration_since(started).as_secs_f64();
    // On the wire each 1448-byte segment of payload is 1514 bytes (TCP with timestamps, IP,
    // Ethernet), which tbf counts.
    let expected = bytes as f64 * 8.0 * (1514.0 / 1448.0) / 1e9;
    eprintln!("{bytes} B over a 1 Gbit/s link in {took:.3} s (expected {expected:.3} s)");
    assert!((took / expected - 1.0).abs() <= 0.15, "took {took:.3} s, expected {expected:.3} s ± 15 %");

    let name = lab.name.clone();
    assert_eq!(netlab::namespaces_of(&name).unwrap().len(), 3, "a switch and two hosts");
    lab.remove().unwrap();
    assert!(netlab::namespaces_of(&name).unwrap().is_empty(), "every namespace is gone");
    assert_eq!(own_veths(), veths_before, "no link was left in the machine's own namespace");
}

#[test]
fn an_allreduce_and_a_push_pull_cross_the_emulated_switch() {
    let lab = lab("ops", 1_000_000_000);
    let exe = common::exe();

    // Two ranks of a real allreduce, one on each host.
    let master = format!("{}:0", lab.hosts[0].addr);
    let rank = |i: usize, master: &str| {
        let mut c = lab.command(i, &exe);
        c.args(["allreduce-bench", "--ranks", "2", "--rank", &i.to_string(), "--master", master, "--sizes", "1MiB", "--reps", "3"]);
        c.args(["--target-s", "0.05", "--timeout-s", "30"]).stdout(Stdio::piped()).stderr(Stdio::inherit());
        Killed(c.spawn().expect("starting a rank"))
    };
    let mut r0 = rank(0, &master);
    let announced = first_line(&mut r0.0);
    let addr = announced.trim().strip_prefix("PARASYNC_RENDEZVOUS").expect("rank 0 announces its rendezvous address").trim().to_string();
    assert!(addr.starts_with(&lab.hosts[0].addr.to_string()), "{addr}");
    let mut r1 = rank(1, &addr);
    for (i, r) in [(0, &mut r0), (1, &mut r1)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = r.0.try_wait().unwrap() {
                assert!(st.success(), "rank {i} failed: {st}");
                break;
            }
            assert!(Instant::now() < deadline, "rank {i} did not finish in 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // A shard on host 0, a worker on host 1.
    let mut server = lab.command(0, &exe);
    server.args(["server", "--listen", &format!("{}:0", lab.hosts[0].addr), "--mode", "sync", "--num-workers", "1"]);
    let mut server = Killed(server.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap());
    let line = first_line(&mut server.0);
    let shard = line.split_whitespace().nth(3).expect("ps-server listening on ADDR").to_string();
    let values = in_netns(&lab.hosts[1].netns.clone(), 60, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut c = Client::connect(&[shard], ClientOptions::default()).await.unwrap();
            let mut w = VariableSpec::new("w", &[1 << 20]);
            w.optimizer = Optimizer::sgd(1.0);
            w.init = Init::Zeros;
            c.register(vec![w]).await.unwrap();
            let grad = vec![0.5f32; 1 << 20];
            let mut out = vec![vec![0f32; 1 << 20]];
            c.push_pull(0, &[&grad], &mut out).await.unwrap();
            out.remove(0)
        })
    });
    assert!(values.iter().all(|&v| v == -0.5), "one SGD step of lr 1 from zeros");
}

#[test]
fn bench_bandwidth_in_a_small_configuration_writes_its_table_and_plots() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the emulated-network tests need root (network namespaces, tc): run the suite as root");
    let dir = std::env::temp_dir().join(format!("parasync-bw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let name = format!("pstest-bw-{}", std::process::id());
    let out = std::process::Command::new(common::exe())
        .args(["bench", "bandwidth", "--models", "synthetic:4MiB", "--workers", "2", "--shards", "1", "--rates", "1gbit"])
        .args(["--steps", "1", "--net-name", &name, "--out"])
        .arg(dir.join("bw"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(netlab::namespaces_of(&name).unwrap().is_empty(), "the bench removes its network");
    let table = std::fs::read_to_string(dir.join("bw.md")).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ps") || l.starts_with("| allreduce")).collect();
    assert_eq!(rows.len(), 4, "ps and allreduce, f32 and bf16:\n{table}");
    let lines = std::fs::read_to_string(dir.join("bw.jsonl")).unwrap();
    for l in lines.lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        let (t, f) = (r["seconds"].as_f64().unwrap(), r["formula_seconds"].as_f64().unwrap());
        assert!(t > 0.0 && f > 0.0 && (r["ratio"].as_f64().unwrap() - t / f).abs() < 1e-9, "{l}");
    }
    assert_eq!(lines.lines().count(), 4);
    for wire in ["f32", "bf16"] {
        let svg = std::fs::read_to_string(dir.join(format!("bw-synthetic-4MiB-{wire}-1-Gbit-s.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("ring allreduce: measured") && svg.contains("parameter server, 1 shard(s): formula"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
