//! Starting `collective-rank` processes on 127.0.0.1 and reading what they print.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_collective-rank");

/// A running job: one child per rank, their stdout lines collected by reader threads.
pub struct Job {
    pub children: Vec<Option<Child>>,
    pub lines: Vec<Arc<Mutex<Vec<String>>>>,
    pub master: String,
}

fn spawn(args: &[String]) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(EXE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start collective-rank");
    let out = child.stdout.take().expect("piped");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    (child, lines)
}

fn args(scenario: &str, rank: usize, world: usize, master: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "scenario",
        "--name",
        scenario,
        "--rank",
        &rank.to_string(),
        "--world",
        &world.to_string(),
        "--master",
        master,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

impl Job {
    /// Starts rank 0 on an ephemeral rendezvous port, then ranks 1..n.
    pub fn start(n: usize, scenario: &str, extra: &[&str]) -> Job {
        let mut job = Job::start_host(n, scenario, extra);
        for r in 1..n {
            job.add(r, n, scenario, extra);
        }
        job
    }

    /// Starts only rank 0 and waits for its rendezvous address.
    pub fn start_host(n: usize, scenario: &str, extra: &[&str]) -> Job {
        let (c0, l0) = spawn(&args(scenario, 0, n, "127.0.0.1:0", extra));
        let mut job = Job {
            children: vec![Some(c0)],
            lines: vec![l0],
            master: String::new(),
        };
        let first = job
            .wait_line(
                0,
                |l| l.starts_with("PARASYNC_RENDEZVOUS"),
                Duration::from_secs(20),
            )
            .expect("rank 0 announces");
        job.master = first
            .split_whitespace()
            .nth(1)
            .expect("address")
            .to_string();
        job
    }

    /// Starts one more rank (index = order of addition).
    pub fn add(&mut self, rank: usize, n: usize, scenario: &str, extra: &[&str]) -> usize {
        let (c, l) = spawn(&args(scenario, rank, n, &self.master, extra));
        self.children.push(Some(c));
        self.lines.push(l);
        self.children.len() - 1
    }

    /// Waits until process `i` printed a line matching `pred`.
    pub fn wait_line(
        &self,
        i: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Some(l) = self.lines[i].lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Freezes process `i` (SIGSTOP): alive, connections open, but silent.
    pub fn stop(&self, i: usize) {
        let pid = self.children[i].as_ref().expect("running").id() as i32;
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for every process to exit (killing them all past `timeout`); returns exit codes
    /// (None: killed) and each one's stdout.
    pub fn finish(&mut self, timeout: Duration) -> Vec<(Option<i32>, Vec<String>)> {
        let until = Instant::now() + timeout;
        let mut codes = vec![None; self.children.len()];
        loop {
            let mut running = false;
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Some(ch) = c {
                    match ch.try_wait().unwrap() {
                        Some(st) => {
                            codes[i] = st.code();
                            *c = None;
                        }
                        None => running = true,
                    }
                }
            }
            if !running {
                break;
            }
            if Instant::now() >= until {
                for i in 0..self.children.len() {
                    self.kill(i);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50)); // let reader threads drain
        codes
            .into_iter()
            .zip(self.lines.iter().map(|l| l.lock().unwrap().clone()))
            .collect()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}
