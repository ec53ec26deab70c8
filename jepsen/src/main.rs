//! `dossier-jepsen`: runs a fault-injection test against local `dossier-node` processes, or checks
//! an existing history. Exit status: 0 valid, 1 invalid or unknown, 2 the run itself failed.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dossier_jepsen::nemesis::Fault;
use dossier_jepsen::runner::{self, RunConfig};

#[derive(Debug, Parser)]
#[command(
    name = "dossier-jepsen",
    version,
    about = "Fault injection and linearizability checking for Dossier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a cluster, run the workloads under faults, check the history. Bounded by --time-limit.
    Run {
        /// Run folder: node data and logs, history.jsonl, nemesis.log, results.json, summary.txt.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The dossier-node binary (default: next to this executable).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        nodes: u64,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        /// Preset of length and faults: `smoke` (60 s; kill, pause; a fault every 6 s) or `long`
        /// (600 s; kill, pause, partition, transfer; a fault every 5 s: run it before every
        /// release and after any change to replication or reads). --time-limit, --nemesis and
        /// --nemesis-interval override the preset.
        #[arg(long, value_enum, default_value_t = Profile::Smoke)]
        profile: Profile,
        /// Seconds of workload under faults (healing and final reads follow) [smoke: 60, long: 600].
        #[arg(long)]
        time_limit: Option<u64>,
        /// Faults to inject, comma separated: kill, pause, partition, client-partition, transfer,
        /// membership, split. Empty: none. Partitions need root (network namespaces); without it
        /// they are skipped, and said so. `membership` (replica moves, joins in spare node slots,
        /// removals) and `split` (shard splits, each followed by a move of the split shard's
        /// replica) run on their own schedule beside the others.
        /// [smoke: kill,pause; long: all four]
        #[arg(long, value_delimiter = ',')]
        nemesis: Option<Vec<String>>,
        /// Seconds between the start of two faults (each is healed half-way) [smoke: 6, long: 5].
        #[arg(long)]
        nemesis_interval: Option<u64>,
        /// Node slots beyond --nodes in which the membership nemesis starts joining nodes (each
        /// id is used once; removals stop nodes for good).
        #[arg(long, default_value_t = 2)]
        spare_nodes: u64,
        /// Seconds between two changes of the membership nemesis (after the previous one ended).
        #[arg(long, default_value_t = 8)]
        membership_interval: u64,
        /// `raft.read-lease` of the nodes: `true` serves linearizable reads under the leader
        /// lease, `false` confirms each with a quorum round (ReadIndex).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        read_lease: bool,
        /// `raft.quiesce-after-ms` of the nodes (idle groups go quiescent after this many
        /// milliseconds); the nodes' default when not given.
        #[arg(long)]
        quiesce_after_ms: Option<u64>,
        /// TLS on every connection: a CA and certificates for the nodes' addresses are made in
        /// the run's folder (`dossier cert`), the nodes serve and replicate over TLS, and the
        /// clients present a service certificate.
        #[arg(long)]
        tls: bool,
        /// Register slots (read / write / compare-and-set of values 0..5), over several shards;
        /// each moves on to a fresh key every 1,000 operations.
        #[arg(long, default_value_t = 6)]
        register_keys: usize,
        /// Sets (an add writes one key per element; reads scan them, at least 2 s apart and about 60
        /// times a run at most, and once at the end).
        #[arg(long, default_value_t = 3)]
        set_keys: usize,
        /// Concurrent client processes.
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Client hosts the clients are spread over, each in its own network namespace (as
        /// root), which the client-partition nemesis cuts off from some nodes.
        #[arg(long, default_value_t = 2)]
        client_hosts: u64,
        #[arg(long, default_value_t = 7700)]
        base_port: u16,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Clients of the identifier workload: they create patients claiming national numbers
        /// from a small pool; no number may end up held by two patients.
        #[arg(long, default_value_t = 2)]
        identifier_clients: usize,
        /// National numbers the identifier workload competes for.
        #[arg(long, default_value_t = 4)]
        identifier_pool: usize,
        /// Linearizability search budget per key, in seconds (exceeded: unknown).
        #[arg(long, default_value_t = 30)]
        check_budget: u64,
        /// Start the nodes with the UNSAFE test switch that serves reads without a read barrier:
        /// the run must then be reported invalid.
        #[arg(long)]
        unsafe_stale_reads: bool,
    },
    /// Check an existing history.jsonl.
    Check {
        history: PathBuf,
        #[arg(long, default_value_t = 30)]
        check_budget: u64,
    },
}

/// Presets of `run`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Profile {
    Smoke,
    Long,
}

impl Profile {
    /// Seconds of workload, faults, seconds between faults.
    fn defaults(self) -> (u64, &'static [&'static str], u64) {
        match self {
            Profile::Smoke => (60, &["kill", "pause"], 6),
            Profile::Long => (600, &["kill", "pause", "partition", "transfer"], 5),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dossier-jepsen: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result: anyhow::Result<bool> = runtime.block_on(async {
        match cli.command {
            Command::Run {
                out,
                node_bin,
                nodes,
                shards,
                profile,
                time_limit,
                nemesis,
                nemesis_interval,
                spare_nodes,
                membership_interval,
                read_lease,
                quiesce_after_ms,
                tls,
                register_keys,
                set_keys,
                clients,
                client_hosts,
                base_port,
                seed,
                check_budget,
                unsafe_stale_reads,
                identifier_clients,
                identifier_pool,
            } => {
                let (default_time, default_nemesis, default_interval) = profile.defaults();
                let time_limit = time_limit.unwrap_or(default_time);
                let nemesis_interval = nemesis_interval.unwrap_or(default_interval);
                let nemesis = nemesis
                    .unwrap_or_else(|| default_nemesis.iter().map(|s| (*s).to_owned()).collect());
                let nemesis = nemesis
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse::<Fault>())
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let out = out.unwrap_or_else(|| {
                    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    PathBuf::from(format!("jepsen-runs/run-{secs}"))
                });
                let config = RunConfig {
                    out,
                    node_bin: dossier_cli::procs::node_binary(node_bin.as_deref())?,
                    nodes,
                    shards,
                    time_limit: Duration::from_secs(time_limit),
                    nemesis,
                    nemesis_interval: Duration::from_secs(nemesis_interval.max(2)),
                    spare_nodes,
                    membership_interval: Duration::from_secs(membership_interval),
                    register_keys,
                    set_keys,
                    clients,
                    client_hosts,
                    base_port,
                    seed,
                    unsafe_stale_reads,
                    read_lease,
                    quiesce_after_ms,
                    tls,
                    check_budget_per_key: Duration::from_secs(check_budget),
                    identifier_clients,
                    identifier_pool,
                };
                // Ctrl-C or SIGTERM (`timeout`, a CI runner's cancel) drops the run: its
                // processes are stopped and its namespaces removed.
                let mut terminate =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let outcome = tokio::select! {
                    outcome = runner::run(config) => outcome?,
                    _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the cluster and test network were torn down"),
                    _ = terminate.recv() => anyhow::bail!("terminated; the cluster and test network were torn down"),
                };
                print!("{}", outcome.summary());
                println!("run folder: {}", outcome.out.display());
                if !outcome.not_ready.is_empty() {
                    anyhow::bail!("{}", runner::not_ready_line(&outcome.not_ready).trim_end());
                }
                Ok(outcome.valid())
            }
            Command::Check { history, check_budget } => {
                let report = runner::check_history(&history, Duration::from_secs(check_budget), None)?;
                print!("{}", runner::summary(&report, 0));
                Ok(report.valid)
            }
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("dossier-jepsen: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
