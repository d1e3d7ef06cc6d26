//! Peak memory of a shard holding 1 GiB of f32 variables (SGD) while 4 workers push
//! 64 MiB gradients at once, every variable in turn (so every variable has been pushed by
//! the end, and buffers the shard keeps for reuse show up). Reads the server's `VmHWM` and
//! `VmRSS` from /proc.
//!
//! `cargo bench --bench ps_memory` (Linux only).

use std::path::PathBuf;
use std::time::Instant;

use parasync::cluster::{ClusterOptions, LocalCluster};
use parasync_client::{Client, ClientOptions, Init, Optimizer, VariableSpec};

const VAR_ELEMS: usize = 16 << 20; // 64 MiB of f32
const VARS: usize = 16; // 1 GiB in all
const WORKERS: u32 = 4;
const ROUNDS: usize = 3;

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes every bench target
    }
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_parasync"));
    let cluster = LocalCluster::start(&exe, &ClusterOptions::new(1, &["--mode", "async", "--num-workers", "4"]))
    .expect("starting the server");
    let pid = cluster.servers[0].child.as_ref().unwrap().id();
    let specs: Vec<VariableSpec> = (0..VARS)
        .map(|i| {
            let mut s = VariableSpec::new(format!("v{i:02}"), &[VAR_ELEMS]);
            s.optimizer = Optimizer::sgd(0.01);
            // non-zero so every page is really resident (zeros would stay unmapped)
            s.init = Init::Constant(0.25);
            s
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let addrs = cluster.addrs();
    rt.block_on(async {
        let mut c = Client::connect(&addrs, ClientOptions::default()).await.unwrap();
        c.register(specs.clone()).await.unwrap();
    });
    let after_register = status_kib(pid, "VmHWM:");
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let addrs = addrs.clone();
            tasks.push(tokio::spawn(async move {
                // Worker w pushes variables w, w + 4, w + 8 and w + 12, one after another:
                // 4 x 64 MiB in flight at once, and all 16 variables pushed.
                let mut clients = Vec::new();
                for v in (w as usize..VARS).step_by(WORKERS as usize) {
                    let mut one = VariableSpec::new(format!("v{v:02}"), &[VAR_ELEMS]);
                    one.optimizer = Optimizer::sgd(0.01);
                    one.init = Init::Constant(0.25);
                    let mut c = Client::connect(&addrs, ClientOptions { worker_id: w, ..Default::default() }).await.unwrap();
                    c.register(vec![one]).await.unwrap();
                    clients.push(c);
                }
                let g = vec![0.5f32; VAR_ELEMS];
                for _ in 0..ROUNDS {
                    for c in &clients {
                        c.push(0, &[&g]).await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let peak = status_kib(pid, "VmHWM:");
    let now = status_kib(pid, "VmRSS:");
    let gib = |kib: u64| kib as f64 / (1 << 20) as f64;
    println!(
        "ps_memory: 1 shard, {VARS} x 64 MiB f32 variables (1 GiB), {WORKERS} workers pushing 64 MiB at once, \
         each its 4 variables in turn, {ROUNDS} rounds"
    );
    println!("  peak RSS after registration: {:.2} GiB", gib(after_register));
    println!("  peak RSS after pushes:       {:.2} GiB   (target <= 1.50 GiB)", gib(peak));
    println!("  RSS at rest after pushes:    {:.2} GiB", gib(now));
    println!("  push phase took {:.2} s", started.elapsed().as_secs_f64());
}
