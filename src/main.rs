//! `parasync`: every Parasync role in one binary.

use clap::{Parser, Subcommand};

/// Parasync: parameter server and collectives for distributed training.
#[derive(Parser)]
#[command(name = "parasync", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one parameter-server shard (the same program as `ps-server`).
    Server(ps_server::config::ServerArgs),
    /// Train a model with a local cluster of real processes: a 64-128-10 MLP on the digits
    /// data, or (`--model ctr`) a click-through model with a sparse embedding table.
    Demo(parasync::demo::DemoArgs),
    /// Look into checkpoints: `inspect` lists what one holds, `export` joins its parts into
    /// whole tensors in one safetensors file.
    #[command(subcommand)]
    Checkpoint(ps_server::checkpoint::tool::CheckpointCmd),
    /// Allreduce bandwidth / latency table (nccl-tests style) over local ranks, or one rank
    /// of a multi-host run (`--rank I --master HOST:PORT`, or `--from-env`).
    AllreduceBench(parasync_collective::bench::AllreduceBenchArgs),
    /// An emulated cluster network (root only): one network namespace per host on a switch,
    /// each host's link shaped to a rate (and, with netem, a delay). `up` creates it, `down`
    /// removes it.
    #[command(subcommand)]
    ClusterNet(parasync::netlab::ClusterNetCmd),
    /// Benchmarks: `bandwidth` (over an emulated cluster network, root), `staleness`.
    #[command(subcommand)]
    Bench(parasync::netbench::BenchCmd),
    /// A long run of a local cluster under valid and bad traffic and connection drops,
    /// reporting each process's memory, file descriptors and threads; fails on a failed
    /// valid request, a wrong answer to a bad one, or growth after warm-up.
    Soak(parasync::soak::SoakArgs),
    /// A private certificate authority with a server and a client certificate, for shards
    /// started with `--tls-cert` / `--tls-key` (and `--tls-client-ca`).
    TlsCerts(parasync::certs::CertsArgs),
    /// One worker of the demo job (started by `parasync demo`).
    #[command(hide = true)]
    DemoWorker(parasync::demo::WorkerArgs),
    /// One worker of the CTR demo job (started by `parasync demo --model ctr`).
    #[command(hide = true)]
    DemoCtrWorker(parasync::ctr::CtrWorkerArgs),
    /// One follower rank of the criterion allreduce bench (started by `benches/allreduce.rs`,
    /// which is rank 0 and orders every batch).
    #[command(hide = true)]
    AllreduceFollower(parasync_collective::bench::AllreduceBenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Server(args) => {
            ps_server::server::init_logging();
            ps_server::server::main_with(args)
        }
        Cmd::Demo(args) if args.model == parasync::demo::DemoModel::Ctr => {
            let report = parasync::ctr::run(&args, &std::env::current_exe()?)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                parasync::ctr::print_report(&report);
            }
            Ok(())
        }
        Cmd::Demo(args) => {
            let exe = std::env::current_exe()?;
            let report = match parasync::demo::run(&args, &exe) {
                Ok(r) => r,
                // The interrupt handler is stopping the children and exits with 130.
                Err(_) if parasync::demo::interrupted() => loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                },
                Err(e) => return Err(e),
            };
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                parasync::demo::print_report(&report);
            }
            Ok(())
        }
        Cmd::Soak(args) => parasync::soak::run(&args, &std::env::current_exe()?),
        Cmd::TlsCerts(args) => {
            for path in parasync::certs::run(&args)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Cmd::Checkpoint(cmd) => ps_server::checkpoint::tool::run(&cmd),
        Cmd::AllreduceBench(args) => parasync_collective::bench::run(&args),
        Cmd::ClusterNet(cmd) => parasync::netlab::run_cmd(&cmd),
        Cmd::Bench(cmd) => parasync::netbench::run_cmd(&cmd),
        Cmd::DemoWorker(args) => parasync::demo::run_worker(&args),
        Cmd::DemoCtrWorker(args) => parasync::ctr::run_worker(&args),
        Cmd::AllreduceFollower(args) => parasync_collective::bench::led::run_follower(&args),
    }
}
