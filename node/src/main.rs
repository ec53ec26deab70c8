//! `dossier-node`: parses the configuration and runs the node. See `dossier-node --help`.

use clap::Parser;
use dossier_node::Flags;

/// mimalloc's per-thread free lists: allocation was about a tenth of a write's CPU with the
/// system allocator (docs/benchmarks.md). Built without transparent huge pages (`no_thp`):
/// openraft reserves about 2 MiB of queues per Raft group that a group barely touches, and
/// mimalloc's huge-page advice made every touched byte of them cost a resident 2 MiB page.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&flags.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    let config = match flags.resolve().and_then(|c| c.validate()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dossier-node: invalid configuration: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.node.worker_threads > 0 {
        builder.worker_threads(config.node.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dossier-node: failed to start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dossier_node::run(config, None)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("failed to run the node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
