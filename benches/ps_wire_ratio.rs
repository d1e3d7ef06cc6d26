//! The bf16-wire speed-up of a 64 MiB f32 variable, measured in pairs: each round times
//! one f32-wire and one bf16-wire operation back to back (their order alternating from round
//! to round), so that the machine's drift between runs, which on a shared VM moves single
//! figures by 10–40 %, cancels out of each round's ratio. Prints the median per-round
//! ratio of push, pull and push + pull, with its quartiles.
//!
//! `cargo bench --bench ps_wire_ratio` (`PARASYNC_RATIO_ROUNDS`, default 60). Same setup as
//! `ps_throughput`: one `parasync server` process (async, SGD with lr 0), a client on a
//! current-thread runtime, the data plane with default options; one 64 MiB variable per
//! wire dtype. `PARASYNC_RATIO_RAW=1` also prints every round's times.
//! `PARASYNC_RATIO_ONLY=f32` (or `bf16`, either followed by `:push` or `:pull` for that
//! operation alone) runs that wire alone for `PARASYNC_RATIO_ROUNDS` rounds and prints its
//! medians, for a profiler to watch one path at a time.
//! `PARASYNC_BENCH_PART` (largest part, bytes) and `PARASYNC_WORKER_THREADS` (the server's)
//! change the setup for tuning runs.

use std::path::PathBuf;
use std::time::Instant;

use parasync::cluster::{ClusterOptions, LocalCluster};
use parasync_client::{Client, ClientOptions, DType, Optimizer, VariableSpec};

const BIG: usize = 16 << 20; // elements: 64 MiB of f32

fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there are no tests here
    }
    let rounds: usize = std::env::var("PARASYNC_RATIO_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let part = std::env::var("PARASYNC_BENCH_PART").ok().and_then(|v| v.parse().ok()).unwrap_or(ClientOptions::default().max_part_bytes);
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_parasync"));
    let cluster = LocalCluster::start(&exe, &ClusterOptions::new(1, &["--mode", "async", "--num-workers", "1"])).expect("starting the server");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // One variable per wire dtype, so that neither pass leaves the other's server-side
    // buffers in a different state than its own previous pass did.
    let connect = |wire: DType| {
        let mut spec = VariableSpec::new(format!("big_{wire}"), &[BIG]);
        spec.optimizer = Optimizer::sgd(0.0); // every push runs the full update, values stay
        rt.block_on(async {
            let mut c = Client::connect(&cluster.addrs(), ClientOptions { wire_dtype: wire, max_part_bytes: part, ..Default::default() }).await.unwrap();
            c.register(vec![spec]).await.unwrap();
            c
        })
    };
    let clients = [connect(DType::F32), connect(DType::Bf16)];
    let grad = vec![0.001f32; BIG];
    let mut out = vec![vec![0.0f32; BIG]];
    // [wire][push, pull] seconds of each round
    let mut secs = vec![[[0.0f64; 2]; 2]; rounds];
    // Times the push and (or) the pull of wire `w` into `round`.
    let mut ops = |w: usize, push: bool, pull: bool, round: &mut [[f64; 2]; 2]| {
        if push {
            let t = Instant::now();
            rt.block_on(clients[w].push(0, &[&grad])).unwrap();
            round[w][0] = t.elapsed().as_secs_f64();
        }
        if pull {
            let t = Instant::now();
            rt.block_on(clients[w].pull_into(0, &mut out)).unwrap();
            round[w][1] = t.elapsed().as_secs_f64();
        }
    };
    let mut once = |w: usize, round: &mut [[f64; 2]; 2]| ops(w, true, true, round);
    for _ in 0..3 {
        once(0, &mut [[0.0; 2]; 2]);
        once(1, &mut [[0.0; 2]; 2]);
    }
    if let Ok(only) = std::env::var("PARASYNC_RATIO_ONLY") {
        let (wire, op) = only.split_once(':').unwrap_or((&only, "both"));
        let w = match wire {
            "f32" => 0,
            "bf16" => 1,
            other => panic!("PARASYNC_RATIO_ONLY={other}: expected f32 or bf16, then optionally :push or :pull"),
        };
        let (push, pull) = (op != "pull", op != "push");
        for round in secs.iter_mut() {
            ops(w, push, pull, round);
        }
        let mut line = format!("{only} alone, {rounds} rounds, medians:");
        for (k, what, done) in [(0, "push", push), (1, "pull", pull)] {
            if done {
                let (_, med, _) = quartiles(secs.iter().map(|r| r[w][k]).collect());
                line += &format!(" {what} {:.2} ms", med * 1e3);
            }
        }
        println!("{line}");
        return;
    }
    eprintln!("ps_wire_ratio: {rounds} rounds of f32 + bf16 push and pull, 64 MiB");
    for (i, round) in secs.iter_mut().enumerate() {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for w in order {
            once(w, round);
        }
    }
    if std::env::var_os("PARASYNC_RATIO_RAW").is_some() {
        for r in &secs {
            println!("raw f32 push {:.2} pull {:.2}  bf16 push {:.2} pull {:.2} ms", r[0][0] * 1e3, r[0][1] * 1e3, r[1][0] * 1e3, r[1][1] * 1e3);
        }
    }
    let mb = (BIG * 4) as f64 / 1e9;
    println!("# ps_wire_ratio, {rounds} rounds; per-round f32 time / bf16 time: median [25th, 75th percentile]");
    for (k, what) in ["push", "pull"].iter().enumerate() {
        let (_, f32_med, _) = quartiles(secs.iter().map(|r| r[0][k]).collect());
        let (_, bf16_med, _) = quartiles(secs.iter().map(|r| r[1][k]).collect());
        let (q1, med, q3) = quartiles(secs.iter().map(|r| r[0][k] / r[1][k]).collect());
        println!(
            "{what:<9} f32 {:6.2} ms ({:.2} GB/s)  bf16 {:6.2} ms ({:.2} GB/s)  ratio {med:.2} [{q1:.2}, {q3:.2}]",
            f32_med * 1e3,
            mb / f32_med,
            bf16_med * 1e3,
            mb / bf16_med
        );
    }
    let (q1, med, q3) = quartiles(secs.iter().map(|r| (r[0][0] + r[0][1]) / (r[1][0] + r[1][1])).collect());
    println!("push+pull ratio {med:.2} [{q1:.2}, {q3:.2}]");
}
