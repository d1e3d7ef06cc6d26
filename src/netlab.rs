//! An emulated cluster network, for benchmarks and tests that need a wire slower than the
//! CPU: one network namespace per host, each joined by a veth pair to a bridge in a switch
//! namespace of its own, each host's link shaped by `tc` in both directions to a rate (`tbf`)
//! and, where the kernel has `sch_netem`, a one-way delay.
//!
//! Nothing is added to the machine's own namespace: the hosts, the switch and their links
//! exist only inside the namespaces `<name>-sw` and `<name>-h<i>`, and the hosts' addresses
//! (`10.213.0.<i + 1>/24`) are reachable only from them. [`NetLab::down`] (also run when a
//! [`NetLab`] is dropped, and by `parasync cluster-net down`) deletes the namespaces, which
//! takes the links, the bridge and the qdiscs with them.
//!
//! Processes run on a host through [`NetLab::command`] (`ip netns exec`); a thread of the
//! calling process can join a host with [`enter`] (its sockets then live there). Needs root
//! (and `ip`, `tc` from iproute2).

use std::fmt;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

/// The shape of each host's link (both directions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkShape {
    /// Bits per second; 0: not rate-limited.
    pub rate_bits: u64,
    /// One-way delay added on each side of the link (so a round trip through the switch
    /// takes four); zero: none. Needs `sch_netem` in the kernel.
    pub delay: Duration,
}

impl fmt::Display for LinkShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate_bits {
            0 => write!(f, "unlimited")?,
            r if r % 1_000_000_000 == 0 => write!(f, "{} Gbit/s", r / 1_000_000_000)?,
            r if r % 1_000_000 == 0 => write!(f, "{} Mbit/s", r / 1_000_000)?,
            r => write!(f, "{r} bit/s")?,
        }
        if !self.delay.is_zero() {
            write!(f, ", {:?} one way", self.delay)?;
        }
        Ok(())
    }
}

/// Parses a rate: `1gbit`, `100mbit`, `25Gbit`, `500kbit`, or bits per second.
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let units = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)];
    Ok(parse_with_units(s, "rate", &units, "gbit, mbit, kbit or bit")?.round() as u64)
}

/// Parses a delay: `0.5ms`, `50us`, `1s`, or `0`.
pub fn parse_delay(s: &str) -> anyhow::Result<Duration> {
    let units = [("ms", 1e-3), ("us", 1e-6), ("s", 1.0)];
    Ok(Duration::from_secs_f64(parse_with_units(s, "delay", &units, "ms, us or s")?))
}

/// A number ≥ 0 with one of `units` (suffix, factor; none: factor 1), times its factor.
fn parse_with_units(s: &str, what: &str, units: &[(&str, f64)], hint: &str) -> anyhow::Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, factor) = units.iter().find_map(|(suffix, f)| t.strip_suffix(suffix).map(|n| (n.trim(), *f))).unwrap_or((t.as_str(), 1.0));
    let v: f64 = num.parse().with_context(|| format!("{what} {s:?}: expected a number with {hint}"))?;
    if !(v.is_finite() && v >= 0.0) {
        bail!("{what} {s:?}: must be ≥ 0");
    }
    Ok(v * factor)
}

/// One emulated host.
#[derive(Clone, Debug)]
pub struct Host {
    /// Its network namespace.
    pub netns: String,
    /// Its address on the emulated network.
    pub addr: Ipv4Addr,
}

/// An emulated network of hosts on one switch; removed when dropped.
#[derive(Debug)]
pub struct NetLab {
    pub name: String,
    pub hosts: Vec<Host>,
    pub shape: LinkShape,
    removed: bool,
}

/// The switch's namespace of the network `name`.
fn switch_ns(name: &str) -> String {
    format!("{name}-sw")
}

impl NetLab {
    /// Creates the network `name` with `hosts` hosts whose links have `shape`. Fails (and
    /// leaves nothing behind) without root, without `ip` / `tc`, when a network of that name
    /// exists, or when the kernel lacks a qdisc the shape needs.
    pub fn up(name: &str, hosts: usize, shape: LinkShape) -> anyhow::Result<NetLab> {
        check_name(name)?;
        if !(1..=250).contains(&hosts) {
            bail!("an emulated network has 1 to 250 hosts, not {hosts}");
        }
        check_root()?;
        let existing = namespaces_of(name)?;
        if !existing.is_empty() {
            bail!(
                "an emulated network named {name:?} exists already (namespaces {}): remove it with `parasync cluster-net down --name {name}`",
                existing.join(", ")
            );
        }
        let mut lab = NetLab { name: name.to_string(), hosts: Vec::new(), shape, removed: false };
        // Dropping `lab` on an error removes whatever was made.
        lab.build(hosts)?;
        Ok(lab)
    }

    fn build(&mut self, hosts: usize) -> anyhow::Result<()> {
        let sw = switch_ns(&self.name);
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let host = Host { netns: format!("{}-h{i}", self.name), addr: Ipv4Addr::new(10, 213, 0, i as u8 + 1) };
            let port = format!("p{i}");
            ip(&["netns", "add", &host.netns])?;
            self.hosts.push(host.clone());
            ip(&["link", "add", "eth0", "netns", &host.netns, "type", "veth", "peer", "name", &port, "netns", &sw])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &host.netns, "addr", "add", &format!("{}/24", host.addr), "dev", "eth0"])?;
            ip(&["-n", &host.netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
            // Host to switch on the host's side, switch to host on the switch's.
            shape_device(&host.netns, "eth0", self.shape)?;
            shape_device(&sw, &port, self.shape)?;
        }
        Ok(())
    }

    /// `program` to run on host `i` (through `ip netns exec`).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].netns]).arg(program);
        c
    }

    /// Removes the network (idempotent).
    pub fn remove(&mut self) -> anyhow::Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        down(&self.name).map(|_| ())
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("removing the emulated network {:?}: {e:#}", self.name);
        }
    }
}

/// Removes every namespace of the network `name`; returns how many there were.
pub fn down(name: &str) -> anyhow::Result<usize> {
    check_name(name)?;
    let found = namespaces_of(name)?;
    for ns in &found {
        ip(&["netns", "del", ns])?;
    }
    Ok(found.len())
}

/// The namespaces of the network `name` that exist now.
pub fn namespaces_of(name: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output().context("running `ip netns list` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!("`ip netns list` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let sw = switch_ns(name);
    let host_prefix = format!("{name}-h");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| *ns == sw || ns.strip_prefix(&host_prefix).is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())))
        .map(str::to_string)
        .collect())
}

/// Moves the calling thread into `netns` (its later sockets live there); other threads
/// of the process stay where they are.
pub fn enter(netns: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{netns}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid descriptor of a network namespace; setns changes only this thread.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns into {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 40 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        bail!("network name {name:?}: 1 to 40 characters of a-z, 0-9 and -");
    }
    Ok(())
}

fn check_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("an emulated network needs root (it creates network namespaces and tc qdiscs): run as root");
    }
    Ok(())
}

/// Shapes the egress of `dev` in `netns`: netem for the delay (if any), tbf for the rate.
fn shape_device(netns: &str, dev: &str, shape: LinkShape) -> anyhow::Result<()> {
    let mut parent = vec!["root".to_string()];
    if !shape.delay.is_zero() {
        let delay = format!("{}us", shape.delay.as_micros().max(1));
        tc(netns, &["qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", &delay, "limit", "100000"]).map_err(|e| {
            if e.to_string().contains("unknown") {
                anyhow::anyhow!("this kernel has no netem qdisc (sch_netem): links can be rate-limited here, not delayed ({e})")
            } else {
                e
            }
        })?;
        parent = vec!["parent".to_string(), "1:1".to_string()];
    }
    if shape.rate_bits > 0 {
        // A burst of at least 1 ms at the rate (and of a 64 KiB segmentation-offload
        // packet); a queue of 20 ms at the rate before tbf drops.
        let bytes_per_s = shape.rate_bits / 8;
        let burst = (bytes_per_s / 1000).max(128 << 10);
        let mut args: Vec<String> = vec!["qdisc".into(), "add".into(), "dev".into(), dev.into()];
        args.extend(parent);
        args.extend(["handle".into(), "10:".into(), "tbf".into(), "rate".into(), format!("{}bit", shape.rate_bits)]);
        args.extend(["burst".into(), burst.to_string(), "latency".into(), "20ms".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tc(netns, &args)?;
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn tc(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("tc", &all)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running `{program}` (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!("`{program} {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `parasync cluster-net`: brings an emulated network up or down.
#[derive(clap::Subcommand, Debug)]
pub enum ClusterNetCmd {
    /// Creates the network (it stays until `down`) and prints its hosts.
    Up(UpArgs),
    /// Removes the network: its namespaces, links, bridge and qdiscs.
    Down(NameArg),
}

#[derive(clap::Args, Debug)]
pub struct NameArg {
    /// The network's name: its namespaces are `<name>-sw` and `<name>-h<i>`.
    #[arg(long, default_value = "parasync-net")]
    pub name: String,
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Number of hosts.
    #[arg(long, default_value_t = 2)]
    pub hosts: usize,
    /// Each host's link rate, both ways (`1gbit`, `10gbit`, `100mbit`; `0`: unlimited).
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    pub rate: u64,
    /// One-way delay added on each side of a host's link (`0.05ms`, `500us`; needs netem).
    #[arg(long, default_value = "0", value_parser = parse_delay)]
    pub delay: Duration,
}

/// Runs `parasync cluster-net …`.
pub fn run_cmd(cmd: &ClusterNetCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterNetCmd::Up(a) => {
            let mut lab = NetLab::up(&a.name.name, a.hosts, LinkShape { rate_bits: a.rate, delay: a.delay })?;
            println!("emulated network {:?}: {} hosts, links {}", lab.name, lab.hosts.len(), lab.shape);
            for h in &lab.hosts {
                println!("  {}  {}   (ip netns exec {} parasync server --listen {}:5000 …)", h.netns, h.addr, h.netns, h.addr);
            }
            println!("remove it with: parasync cluster-net down --name {}", lab.name);
            // It stays up: `down` removes it.
            lab.removed = true;
            Ok(())
        }
        ClusterNetCmd::Down(a) => {
            let n = down(&a.name)?;
            println!("removed {n} namespaces of {:?}", a.name);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_delays_and_names_parse_or_say_why_not() {
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("2.5Gbit").unwrap(), 2_500_000_000);
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("fast").unwrap_err().to_string().contains("gbit"));
        assert!(parse_rate("-1gbit").is_err());
        assert_eq!(parse_delay("0.05ms").unwrap(), Duration::from_micros(50));
        assert_eq!(parse_delay("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_delay("0").unwrap(), Duration::ZERO);
        assert!(parse_delay("soon").is_err());
        assert!(check_name("Bad Name").is_err() && check_name("").is_err() && check_name("lab-1").is_ok());
        let s = LinkShape { rate_bits: 10_000_000_000, delay: Duration::from_micros(50) };
        assert_eq!(s.to_string(), "10 Gbit/s, 50µs one way");
    }
}
