//! `cargo bench -p parasync-collective --bench allreduce [-- extra allreduce-bench flags]`
//! (sizes from `$ALLREDUCE_SIZES`, default 4KiB,64KiB,1MiB,16MiB,64MiB,256MiB):
//! the allreduce matrix of bench-results/allreduce.md (N = 2 and 4, f32 and bf16, 4 KiB - 256 MiB, and
//! the 4 KiB latency with busy-polling), as nccl-tests-style tables. Plain harness (criterion
//! is not available offline here); each row is already a median of timed repetitions.

use std::process::Command;

fn main() {
    let exe = env!("CARGO_BIN_EXE_collective-rank");
    // `cargo bench` passes `--bench`; everything after `--` goes to allreduce-bench.
    let extra: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let sizes = std::env::var("ALLREDUCE_SIZES")
        .unwrap_or_else(|_| "4KiB,64KiB,1MiB,16MiB,64MiB,256MiB".into());
    let runs: [(&str, &[&str]); 4] = [
        ("2", &["--dtypes", "f32,bf16", "--sizes", &sizes]),
        ("2", &["--dtypes", "f32", "--sizes", "4KiB", "--spin"]),
        ("4", &["--dtypes", "f32,bf16", "--sizes", &sizes]),
        ("4", &["--dtypes", "f32", "--sizes", "4KiB", "--spin"]),
    ];
    for (ranks, args) in runs {
        let status = Command::new(exe)
            .args(["allreduce-bench", "--ranks", ranks])
            .args(args)
            .args(&extra)
            .status()
            .expect("run collective-rank");
        assert!(
            status.success(),
            "allreduce-bench --ranks {ranks} failed: {status}"
        );
    }
}
