//! `ps-server`: one shard of the Parasync parameter server.

use clap::Parser;

/// One shard of the Parasync parameter server.
#[derive(Parser)]
#[command(name = "ps-server", version, about)]
struct Cli {
    #[command(flatten)]
    server: ps_server::config::ServerArgs,
}

fn main() -> anyhow::Result<()> {
    ps_server::server::init_logging();
    ps_server::server::main_with(Cli::parse().server)
}
