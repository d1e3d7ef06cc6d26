//! `collective-rank`: one rank of a collective job, as a process. Hosts the allreduce
//! benchmark (`allreduce-bench`, the same code as `parasync allreduce-bench`) and the
//! scenarios the end-to-end tests run (`scenario`).

mod scenarios;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "One rank of a parasync collective job")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// nccl-tests-style allreduce table over TCP.
    AllreduceBench(parasync_collective::bench::AllreduceBenchArgs),
    /// A test scenario (prints `RESULT …` or `ERROR …` lines).
    Scenario(scenarios::ScenarioArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::AllreduceBench(a) => parasync_collective::bench::run(&a),
        Cmd::Scenario(a) => scenarios::run(&a),
    }
}
