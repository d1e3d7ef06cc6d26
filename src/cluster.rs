//! A local cluster of real `ps-server` processes on 127.0.0.1, for the demo, the
//! end-to-end tests and the benchmarks. Children are killed when the cluster is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One running server process.
pub struct ServerProcess {
    /// The child process (taken when it has been waited for).
    pub child: Option<Child>,
    /// gRPC address it listens on.
    pub addr: String,
    /// Address of its Prometheus endpoint.
    pub metrics_addr: Option<String>,
}

/// Servers started by [`LocalCluster::start`].
pub struct LocalCluster {
    /// One entry per shard, in shard order.
    pub servers: Vec<ServerProcess>,
    exe: std::path::PathBuf,
    opts: ClusterOptions,
}

/// How to start the servers of a local cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of shards.
    pub shards: usize,
    /// Extra flags for every server (mode, workers, …).
    pub server_args: Vec<String>,
    /// Pass the servers' logs through to this process's stderr (else discard them).
    pub show_logs: bool,
    /// Write server `i`'s logs to `log_dir/shard-i.log` instead (takes precedence).
    pub log_dir: Option<std::path::PathBuf>,
    /// `RUST_LOG` filter of the servers (default: the caller's `RUST_LOG`, else `warn`).
    pub log_filter: Option<String>,
    /// How long a server may take to announce its address.
    pub ready_timeout: Duration,
}

impl ClusterOptions {
    /// `shards` servers with `server_args`, logs discarded, 20 s to come up.
    pub fn new(shards: usize, server_args: &[&str]) -> Self {
        ClusterOptions {
            shards,
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
            show_logs: false,
            log_dir: None,
            log_filter: None,
            ready_timeout: Duration::from_secs(20),
        }
    }
}

/// Makes the child that `cmd` starts receive SIGTERM when this process dies, however it
/// dies (SIGKILL included), so that no server or worker outlives the launcher. On Linux
/// (`PR_SET_PDEATHSIG`); elsewhere the launcher's own cleanup is all there is. The signal
/// follows the thread that spawns the child: spawn from a thread that lives as long as
/// the children should.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls: prctl and getppid.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the launcher exited while starting this child"));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

impl LocalCluster {
    /// Starts `opts.shards` servers from `exe` (a binary with a `server` subcommand, i.e.
    /// `parasync`), each on an ephemeral port of 127.0.0.1, and waits until they listen.
    pub fn start(exe: &Path, opts: &ClusterOptions) -> anyhow::Result<LocalCluster> {
        let mut cluster = LocalCluster { servers: Vec::new(), exe: exe.to_path_buf(), opts: opts.clone() };
        for shard in 0..opts.shards {
            let s = cluster.spawn(shard, "127.0.0.1:0", &[])?;
            cluster.servers.push(s);
        }
        Ok(cluster)
    }

    /// Starts shard `shard` listening on `listen`, with the cluster's flags and `extra`.
    fn spawn(&self, shard: usize, listen: &str, extra: &[&str]) -> anyhow::Result<ServerProcess> {
        let (exe, opts) = (&self.exe, &self.opts);
        let mut cmd = Command::new(exe);
        cmd.arg("server")
            .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
            .args(["--shard-index", &shard.to_string()])
            .args(&opts.server_args)
            .args(extra)
            .env_remove("TF_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match &opts.log_dir {
                Some(dir) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join(format!("shard-{shard}.log")))
                        .context("opening a server log file")?,
                ),
                None if opts.show_logs => Stdio::inherit(),
                None => Stdio::null(),
            });
        match (&opts.log_filter, std::env::var_os("RUST_LOG")) {
            (Some(f), _) => {
                cmd.env("RUST_LOG", f);
            }
            (None, None) => {
                cmd.env("RUST_LOG", "warn");
            }
            (None, Some(_)) => {}
        }
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut server = ServerProcess { child: Some(child), addr: String::new(), metrics_addr: None };
        let line = match read_first_line(stdout, opts.ready_timeout) {
            Ok(l) => l,
            Err(e) => {
                if let Some(mut c) = server.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e.context(format!("shard {shard} did not announce its address")));
            }
        };
        let (addr, metrics) =
            parse_announcement(&line).with_context(|| format!("shard {shard} printed an unexpected line: {line:?}"))?;
        server.addr = addr;
        server.metrics_addr = metrics;
        Ok(server)
    }

    /// Kills shard `shard` with SIGKILL (as a machine failure would) and waits for it.
    pub fn kill(&mut self, shard: usize) {
        if let Some(mut c) = self.servers[shard].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts shard `shard` again on the address it had, with the cluster's flags and
    /// `extra` (such as `--restore latest`); kills it first if it still runs.
    pub fn restart(&mut self, shard: usize, extra: &[&str]) -> anyhow::Result<()> {
        self.kill(shard);
        let addr = self.servers[shard].addr.clone();
        self.servers[shard] = self.spawn(shard, &addr, extra)?;
        Ok(())
    }

    /// gRPC addresses in shard order.
    pub fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// Process id of shard `shard` (`None` once it was killed or stopped).
    pub fn pid(&self, shard: usize) -> Option<u32> {
        self.servers.get(shard)?.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM to every server and waits (up to `timeout`) for each to exit;
    /// returns their exit statuses. Servers still running after `timeout` are killed.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Vec<ExitStatus>> {
        for s in &self.servers {
            if let Some(c) = &s.child {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + timeout;
        let mut statuses = Vec::new();
        for (i, s) in self.servers.iter_mut().enumerate() {
            let Some(mut child) = s.child.take() else { continue };
            loop {
                if let Some(st) = child.try_wait()? {
                    statuses.push(st);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("shard {i} did not exit within {timeout:?} of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(statuses)
    }

    /// Sum of a counter over all shards' `/metrics` endpoints.
    pub fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for s in &self.servers {
            let addr = s.metrics_addr.as_deref().context("server has no metrics endpoint")?;
            total += scrape(addr)?
                .lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        Ok(total)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn read_first_line(stdout: impl Read + Send + 'static, timeout: Duration) -> anyhow::Result<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let res = r.read_line(&mut line).map(|_| line);
        let _ = tx.send(res);
        // Keep draining so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if !line.is_empty() => Ok(line.trim().to_string()),
        Ok(Ok(_)) => bail!("the process exited before printing its address"),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("no address within {timeout:?}"),
    }
}

/// Parses `ps-server listening on ADDR [metrics ADDR]`.
fn parse_announcement(line: &str) -> Option<(String, Option<String>)> {
    let rest = line.strip_prefix("ps-server listening on ")?;
    let mut it = rest.split_whitespace();
    let addr = it.next()?.to_string();
    let metrics = match (it.next(), it.next()) {
        (Some("metrics"), Some(m)) => Some(m.to_string()),
        _ => None,
    };
    Some((addr, metrics))
}

/// `GET /metrics` over plain HTTP/1.1.
pub fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to metrics at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (head, body) = body.split_once("\r\n\r\n").context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("metrics endpoint answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_lines_parse() {
        assert_eq!(
            parse_announcement("ps-server listening on 127.0.0.1:5 metrics 127.0.0.1:6"),
            Some(("127.0.0.1:5".into(), Some("127.0.0.1:6".into())))
        );
        assert_eq!(parse_announcement("ps-server listening on 127.0.0.1:5"), Some(("127.0.0.1:5".into(), None)));
        assert_eq!(parse_announcement("hello"), None);
    }

    /// The child gets SIGTERM when the thread that started it ends (as it would when the
    /// whole launcher dies), instead of running on as an orphan.
    #[cfg(target_os = "linux")]
    #[test]
    fn children_die_with_their_launcher() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            die_with_parent(&mut cmd);
            cmd.spawn().expect("starting sleep")
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the child outlived its launcher thread");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    }
}
