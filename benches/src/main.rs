//! `dossier-bench`: measurements of Dossier, printed as a table on stderr and one JSON object per
//! line on stdout. Bounded: every measurement stops after its `--seconds` (or its fill size).
//!
//! Measures the storage engine, the cluster under closed-loop load (against etcd and a bare gRPC
//! floor), failover, the clinical workload, and the record layer at scale.

mod clinical;
mod closed_loop;
mod cluster;
mod idle;
mod records_scale;
mod reshape;
mod rolling;
mod soak;
mod stats;
mod storage;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// The same allocator as `dossier-node`; the load generator drives every backend through it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "dossier-bench",
    version,
    about = "Benchmarks for Dossier (results: one JSON object per line on stdout)"
)]
struct Cli {
    /// Directory for benchmark files; must be on the disk being measured (not a tmpfs).
    #[arg(long, global = true, default_value = "target/bench-data")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The disk's raw limit: 4 KiB write + fdatasync per call (appending and overwriting).
    FsyncRaw {
        /// Seconds per mode.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// The log engine's append path: closed-loop appenders, each waiting for durability.
    LogAppend {
        /// Concurrent closed-loop appenders (each keeps one append outstanding); several values
        /// run one after another.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 256])]
        appenders: Vec<usize>,
        /// OS threads driving the appenders, as an async runtime's workers would (an OS thread
        /// per appender measures the scheduler, not the log: pass --threads 1000 for that).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Raft groups the appenders spread over.
        #[arg(long, default_value_t = 64)]
        groups: u64,
        /// Payload bytes per entry.
        #[arg(long, default_value_t = 256)]
        entry_bytes: usize,
        /// Measured seconds per appender count.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Unmeasured warm-up seconds before each measurement.
        #[arg(long, default_value_t = 1)]
        warmup_seconds: u64,
        /// The log's group-commit linger, in microseconds (the engine's default when omitted).
        #[arg(long)]
        linger_us: Option<u64>,
    },
    /// Group commit against the disk in one run: rounds alternating raw append+fdatasync with
    /// the engine at each linger setting; reports each ratio and the median.
    LogRatio {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 64)]
        appenders: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Measured seconds of each raw and each engine run.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Linger settings to compare, in microseconds.
        #[arg(long, value_delimiter = ',', default_values_t = [0, 200])]
        linger_us: Vec<u64>,
    },
    /// Closed-loop clients against a local 3-node cluster (dossier-node processes, 3 replicas):
    /// durable writes, linearizable reads, stale reads.
    ClusterLoad {
        /// put (durable), get (linearizable), get-stale (any replica), mixed (linearizable gets
        /// and puts, see --read-percent), record-read (linearizable Records.Read of one
        /// Observation per patient); several comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = ["put".to_owned(), "get".to_owned(), "get-stale".to_owned()])]
        workloads: Vec<String>,
        /// Share of gets in the mixed workload, in percent.
        #[arg(long, default_value_t = 90)]
        read_percent: u8,
        /// Concurrent closed-loop clients; several comma separated, one run each.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 256])]
        clients: Vec<usize>,
        #[arg(long, default_value_t = 256)]
        value_bytes: usize,
        /// Key space: one key per patient.
        #[arg(long, default_value_t = 1000)]
        patients: usize,
        /// How patients are picked: uniform or zipf (see --zipf-theta).
        #[arg(long, default_value = "uniform")]
        distribution: String,
        #[arg(long, default_value_t = 0.99)]
        zipf_theta: f64,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Measured seconds per run (after the warm-up); a run also ends at --ops.
        #[arg(long, alias = "duration", default_value_t = 5)]
        seconds: u64,
        /// Stop a run after this many measured operations.
        #[arg(long)]
        ops: Option<u64>,
        /// Unmeasured seconds before each run.
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        #[arg(long, default_value_t = 7300)]
        base_port: u16,
        /// dossier (a local 3-node cluster is started), etcd (an existing cluster, see
        /// benches/scripts/etcd-cluster.sh) or grpc-floor (three in-memory tonic servers speaking
        /// etcd's KV protocol: what one gRPC request costs here, an upper bound for any tonic
        /// server on this machine).
        #[arg(long, default_value = "dossier")]
        backend: String,
        /// etcd client endpoints, for --backend etcd.
        #[arg(long, value_delimiter = ',', default_values_t = ["127.0.0.1:2379".to_owned(), "127.0.0.1:22379".to_owned(), "127.0.0.1:32379".to_owned()])]
        etcd_endpoints: Vec<String>,
        /// HTTP/2 connections the load generator opens to each node, member or server (the
        /// same for every backend); clients are spread over them.
        #[arg(long, default_value_t = 2)]
        connections_per_node: usize,
        /// Dossier only: send every request as its own unary call, instead of letting the client
        /// coalesce the requests waiting for one connection into one bundle (its default).
        /// Reported as backend "dossier-unary".
        #[arg(long)]
        unary: bool,
        /// Dossier only: TLS on every connection (certificates made for the run with `dossier
        /// cert`; the load generator presents a service certificate).
        #[arg(long)]
        tls: bool,
    },
    /// The clinical workload on a local 3-node cluster: import speed of synthetic patients, then
    /// closed-loop summary reads, observation appends and admission transactions.
    Clinical {
        /// summary, append, admission; several comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = ["summary".to_owned(), "append".to_owned(), "admission".to_owned()])]
        workloads: Vec<String>,
        #[arg(long, value_delimiter = ',', default_values_t = [64])]
        clients: Vec<usize>,
        /// Synthetic patients imported first (seed 1).
        #[arg(long, default_value_t = 500)]
        patients: u64,
        /// Concurrent importers.
        #[arg(long, default_value_t = 16)]
        importers: usize,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 7500)]
        base_port: u16,
    },
    /// The record layer at scale on a local 3-node cluster: import rate of synthetic patients,
    /// then two big patients (--big records each) and closed-loop latency of Everything, of a
    /// search by code and date and of a search by type on each of them.
    RecordsScale {
        /// Synthetic patients imported to measure the import rate (seed 1).
        #[arg(long, default_value_t = 2_000)]
        patients: u64,
        /// Concurrent importers.
        #[arg(long, default_value_t = 64)]
        importers: usize,
        /// Records of each big patient; one patient per value.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000, 20_000])]
        big: Vec<u64>,
        /// Closed-loop clients of each latency measurement.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Measured seconds of each latency measurement (after 1 s of warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        #[arg(long, default_value_t = 7700)]
        base_port: u16,
        /// The whole run is abandoned (cluster stopped, data removed) after this many seconds.
        #[arg(long, default_value_t = 1_200)]
        time_limit: u64,
    },
    /// Soak and data scale on a local 3-node cluster: import synthetic patients (30,000 make
    /// several GB of records), append observations for --seconds, then report throughput in the
    /// first and last tenth of each phase, disk bytes per logical byte and peak RSS per node,
    /// restart-to-ready time, and the time to rebuild a wiped node from its peers.
    Soak {
        #[arg(long, default_value_t = 30_000)]
        patients: u64,
        #[arg(long, default_value_t = 16)]
        importers: usize,
        /// Closed-loop clients of the append phase.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds of the append phase.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        #[arg(long, default_value_t = 7600)]
        base_port: u16,
    },
    /// SIGKILL of a shard leader under steady writes: client-observed gap, repeated.
    /// Planned maintenance under load: a local 3-node cluster, every node restarted in turn with
    /// SIGTERM while closed-loop clients read and write; reports failed requests (the target is
    /// none), the slowest request, the longest stretch without a completed request, and how long
    /// each node took to be ready and to lead its share again.
    RollingRestart {
        /// Concurrent closed-loop clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Share of linearizable gets, in percent; the rest are puts of 256 bytes.
        #[arg(long, default_value_t = 50)]
        read_percent: u8,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Patients the clients spread over (one key each).
        #[arg(long, default_value_t = 1000)]
        patients: usize,
        /// Seconds of load before the first restart and after each node is back.
        #[arg(long, default_value_t = 5)]
        settle_seconds: u64,
        #[arg(long, default_value_t = 7500)]
        base_port: u16,
    },
    /// The cluster changes shape under load: a fourth node joins and takes its share, a replica
    /// moves, a shard splits, the fourth node is removed, a standby node joins; throughput, p99
    /// and failed requests in a window from each change, against the baseline window of the same
    /// load just before it.
    Reshape {
        /// Concurrent closed-loop clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Share of linearizable gets, in percent; the rest are puts of 256 bytes.
        #[arg(long, default_value_t = 50)]
        read_percent: u8,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Patients the clients spread over (one key each).
        #[arg(long, default_value_t = 1000)]
        patients: usize,
        /// Seconds of each baseline window, and the least of each change's window.
        #[arg(long, default_value_t = 10)]
        window_seconds: u64,
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
    },
    /// What an idle cluster costs: 3 nodes with SHARDS shards, one write to each, a quiet
    /// settling time, then the nodes' CPU (cores) and resident memory over the measured seconds;
    /// then the first write to idle shards against writes to a busy one.
    Idle {
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// Seconds of quiet before measuring.
        #[arg(long, default_value_t = 10)]
        settle_seconds: u64,
        /// Seconds measured.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Extra dossier-node flag (repeat it), e.g. --node-arg=--quiesce-after-ms=2000.
        #[arg(long = "node-arg", allow_hyphen_values = true)]
        node_args: Vec<String>,
        #[arg(long, default_value_t = 7600)]
        base_port: u16,
    },
    Failover {
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        /// dossier (a local cluster is started) or etcd (a cluster started by
        /// benches/scripts/etcd-cluster.sh in --etcd-dir).
        #[arg(long, default_value = "dossier")]
        backend: String,
        #[arg(long, value_delimiter = ',', default_values_t = ["127.0.0.1:2379".to_owned(), "127.0.0.1:22379".to_owned(), "127.0.0.1:32379".to_owned()])]
        etcd_endpoints: Vec<String>,
        #[arg(long, default_value = "target/etcd-bench")]
        etcd_dir: PathBuf,
        /// Kill the leader of a quiescent shard (nobody writing before the kill) instead of a
        /// busy one; needs a --node-arg=--quiesce-after-ms=N.
        #[arg(long)]
        quiet: bool,
        /// Extra dossier-node flag (repeat it), e.g. --node-arg=--quiesce-after-ms=2000.
        #[arg(long = "node-arg", allow_hyphen_values = true)]
        node_args: Vec<String>,
    },
    /// Recovery time of a log of a given size, and index memory per million entries.
    LogRecovery {
        /// Bytes of log to fill before reopening.
        #[arg(long, default_value_t = 1 << 30)]
        log_bytes: u64,
        #[arg(long, default_value_t = 64)]
        groups: u64,
        #[arg(long, default_value_t = 256)]
        entry_bytes: usize,
    },
    /// One gRPC floor server (started by `cluster-load --backend grpc-floor`); runs until killed.
    #[command(hide = true)]
    FloorServe {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("create {}", cli.dir.display()))?;
    let dir = tempfile::tempdir_in(&cli.dir).context("create a scratch directory")?;
    let lines = match cli.command {
        Command::FloorServe { listen } => {
            // A child of a run, killed at its end: it needs no scratch directory.
            drop(dir);
            return cluster::floor::serve(listen);
        }
        Command::FsyncRaw { seconds } => {
            eprintln!("fsync-raw: {seconds} s per mode");
            storage::fsync_raw(dir.path(), Duration::from_secs(seconds))?
        }
        Command::LogAppend {
            appenders,
            threads,
            groups,
            entry_bytes,
            seconds,
            warmup_seconds,
            linger_us,
        } => {
            let linger_us =
                linger_us.unwrap_or(dossier_storage::LogConfig::default().group_commit_linger_us);
            for n in appenders {
                eprintln!(
                    "log-append: {n} appenders over {groups} groups, {entry_bytes} B entries, linger {linger_us} us, {seconds} s"
                );
                let load = storage::AppendLoad {
                    appenders: n,
                    threads,
                    groups,
                    entry_bytes,
                    linger_us,
                    duration: Duration::from_secs(seconds),
                    warmup: Duration::from_secs(warmup_seconds),
                };
                // Printed as each finishes, so that a long run shows progress.
                println!("{}", storage::append(dir.path(), &load)?.0);
            }
            return Ok(());
        }
        Command::LogRatio {
            rounds,
            appenders,
            threads,
            seconds,
            linger_us,
        } => {
            eprintln!(
                "log-ratio: {rounds} rounds, {appenders} appenders, lingers {linger_us:?} us, {seconds} s each"
            );
            let load = storage::AppendLoad {
                appenders,
                threads,
                groups: 64,
                entry_bytes: 256,
                linger_us: 0,
                duration: Duration::from_secs(seconds),
                warmup: Duration::from_secs(1),
            };
            storage::ratio(dir.path(), rounds.max(1), &load, &linger_us)?
        }
        Command::ClusterLoad {
            workloads,
            read_percent,
            clients,
            value_bytes,
            patients,
            distribution,
            zipf_theta,
            shards,
            seconds,
            ops,
            warmup,
            base_port,
            backend,
            etcd_endpoints,
            connections_per_node,
            unary,
            tls,
        } => {
            // Refuse bad arguments before starting anything.
            let workloads = workloads
                .iter()
                .map(|w| cluster::Workload::parse(w, read_percent))
                .collect::<Result<Vec<_>>>()?;
            let distribution = cluster::Distribution::parse(&distribution, zipf_theta)?;
            anyhow::ensure!(seconds > 0, "--seconds must be at least 1");
            anyhow::ensure!(ops != Some(0), "--ops must be at least 1");
            anyhow::ensure!(
                (1..=64).contains(&connections_per_node),
                "--connections-per-node must be within 1..64, is {connections_per_node}"
            );
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                // What this run started (the Dossier cluster or the floor servers) lives as long
                // as this block and stops when dropped; etcd is started by its script.
                let (_cluster, backend) = match backend.as_str() {
                    "dossier" => {
                        let c = cluster::LocalCluster::start_with(&dir.path().join("cluster"), shards, base_port, Some(connections_per_node), !unary, &[], tls).await?;
                        let b = if unary {
                            cluster::Backend::DossierUnary(c.client.clone())
                        } else {
                            cluster::Backend::Dossier(c.client.clone())
                        };
                        (Some(Box::new(c) as Box<dyn std::any::Any>), b)
                    }
                    "etcd" => (None, cluster::Backend::etcd(&etcd_endpoints, connections_per_node).await?),
                    "grpc-floor" => {
                        let servers = cluster::floor::FloorServers::start(base_port).await?;
                        let b = cluster::Backend::floor(&servers.endpoints, connections_per_node).await?;
                        (Some(Box::new(servers) as Box<dyn std::any::Any>), b)
                    }
                    other => anyhow::bail!("unknown backend {other:?} (dossier, etcd, grpc-floor)"),
                };
                let mut rows = Vec::new();
                for &workload in &workloads {
                    for &n in &clients {
                        let spec = cluster::LoadSpec {
                            workload,
                            clients: n,
                            value_bytes,
                            patients,
                            distribution,
                            duration: Duration::from_secs(seconds),
                            ops,
                            warmup: Duration::from_secs(warmup),
                            shards: matches!(backend, cluster::Backend::Dossier(_) | cluster::Backend::DossierUnary(_)).then_some(shards),
                            connections_per_node,
                        };
                        eprintln!("cluster-load: {} {workload:?} with {n} clients, {value_bytes} B values, {seconds} s", backend.name());
                        let result = cluster::load(&backend, &spec).await?;
                        println!("{}", result.json);
                        rows.push(result.row);
                    }
                }
                eprintln!("{}", cluster::TABLE_HEADER);
                for row in rows {
                    eprintln!("{row}");
                }
                Ok(())
            })?;
            return Ok(());
        }
        Command::Clinical {
            workloads,
            clients,
            patients,
            importers,
            shards,
            seconds,
            base_port,
        } => {
            let workloads = workloads
                .iter()
                .map(|w| clinical::ClinicalWorkload::parse(w))
                .collect::<Result<Vec<_>>>()?;
            anyhow::ensure!(patients > 0, "--patients must be at least 1");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let c = cluster::LocalCluster::start(&dir.path().join("cluster"), shards, base_port, None, true).await?;
                eprintln!("clinical: importing {patients} synthetic patients with {importers} importers");
                println!("{}", clinical::import(&c.client, 1, patients, importers).await?);
                let mut rows = Vec::new();
                for &w in &workloads {
                    for &n in &clients {
                        eprintln!("clinical: {w:?} with {n} clients, {seconds} s");
                        let (json, row) = clinical::load(&c.client, w, 1, patients, n, Duration::from_secs(seconds), Duration::from_secs(1)).await?;
                        println!("{json}");
                        rows.push(row);
                    }
                }
                eprintln!("| workload | clients | ops/s | records/s | p50 ms | p99 ms | p99.9 ms | errors |\n|---|---|---|---|---|---|---|---|");
                for r in rows {
                    eprintln!("{r}");
                }
                Ok::<_, anyhow::Error>(())
            })?;
            return Ok(());
        }
        Command::RecordsScale {
            patients,
            importers,
            big,
            clients,
            seconds,
            shards,
            base_port,
            time_limit,
        } => {
            anyhow::ensure!(seconds > 0, "--seconds must be at least 1");
            anyhow::ensure!(clients > 0, "--clients must be at least 1");
            anyhow::ensure!(
                !big.is_empty() && big.iter().all(|&n| n >= 1),
                "--big must name at least one patient size"
            );
            let spec = records_scale::ScaleSpec {
                patients,
                importers,
                big,
                clients,
                seconds,
                shards,
                base_port,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                // On expiry the run is dropped: its cluster stops, then the scratch directory goes.
                tokio::time::timeout(
                    Duration::from_secs(time_limit),
                    records_scale::run(&dir.path().join("cluster"), &spec),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!("records-scale: not done within --time-limit {time_limit} s")
                })?
            })?;
            return Ok(());
        }
        Command::Soak {
            patients,
            importers,
            clients,
            seconds,
            shards,
            base_port,
        } => {
            anyhow::ensure!(patients > 0, "--patients must be at least 1");
            anyhow::ensure!(
                seconds >= 10,
                "--seconds must be at least 10 (tenths are compared)"
            );
            let spec = soak::SoakSpec {
                patients,
                importers,
                clients,
                seconds,
                shards,
                base_port,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let lines = runtime.block_on(soak::run(&dir.path().join("cluster"), &spec))?;
            for line in lines {
                println!("{line}");
            }
            return Ok(());
        }
        Command::RollingRestart {
            clients,
            read_percent,
            shards,
            patients,
            settle_seconds,
            base_port,
        } => {
            anyhow::ensure!(clients > 0, "--clients must be at least 1");
            anyhow::ensure!(read_percent <= 100, "--read-percent must be within 0..100");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let spec = rolling::RollingSpec {
                clients,
                read_percent,
                patients,
                settle: Duration::from_secs(settle_seconds),
                stop_grace: Duration::from_secs(30),
            };
            eprintln!(
                "rolling-restart: 3 nodes, {shards} shards, {clients} clients ({read_percent}% gets)"
            );
            let measured = runtime.block_on(rolling::rolling_restart(
                &dir.path().join("cluster"),
                shards,
                base_port,
                &spec,
            ));
            if measured.is_err() {
                let kept = dir.keep();
                eprintln!(
                    "rolling-restart: kept the cluster's logs and data in {}",
                    kept.display()
                );
            }
            measured?
        }
        Command::Idle {
            shards,
            settle_seconds,
            seconds,
            node_args,
            base_port,
        } => {
            anyhow::ensure!(shards > 0, "--shards must be at least 1");
            anyhow::ensure!(seconds > 0, "--seconds must be at least 1");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let spec = idle::IdleSpec {
                shards,
                settle: Duration::from_secs(settle_seconds),
                measure: Duration::from_secs(seconds),
                node_args,
            };
            eprintln!("idle: 3 nodes, {shards} shards");
            let measured =
                runtime.block_on(idle::idle(&dir.path().join("cluster"), base_port, &spec));
            if measured.is_err() {
                let kept = dir.keep();
                eprintln!(
                    "idle: kept the cluster's logs and data in {}",
                    kept.display()
                );
            }
            measured?
        }
        Command::Reshape {
            clients,
            read_percent,
            shards,
            patients,
            window_seconds,
            base_port,
        } => {
            anyhow::ensure!(clients > 0, "--clients must be at least 1");
            anyhow::ensure!(read_percent <= 100, "--read-percent must be within 0..100");
            anyhow::ensure!(window_seconds > 0, "--window-seconds must be at least 1");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let spec = reshape::ReshapeSpec {
                clients,
                read_percent,
                patients,
                window: Duration::from_secs(window_seconds),
            };
            eprintln!(
                "reshape: 3 nodes (+1 joining and leaving, +1 standby), {shards} shards, {clients} clients ({read_percent}% gets)"
            );
            let measured = runtime.block_on(reshape::reshape(
                &dir.path().join("cluster"),
                shards,
                base_port,
                &spec,
            ));
            if measured.is_err() {
                let kept = dir.keep();
                eprintln!(
                    "reshape: kept the cluster's logs and data in {}",
                    kept.display()
                );
            }
            measured?
        }
        Command::Failover {
            reps,
            clients,
            base_port,
            backend,
            etcd_endpoints,
            etcd_dir,
            quiet,
            node_args,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                eprintln!("failover ({backend}): {reps} repetitions, {clients} writers");
                match backend.as_str() {
                    "dossier" => {
                        let mut cluster = cluster::LocalCluster::start_with(
                            &dir.path().join("cluster"),
                            8,
                            base_port,
                            None,
                            true,
                            &node_args,
                            false,
                        )
                        .await?;
                        let measured = cluster::failover(&mut cluster, reps, clients, quiet).await;
                        if measured.is_err() {
                            // The nodes' logs and data are the evidence: keep them.
                            drop(cluster);
                            let kept = dir.keep();
                            eprintln!(
                                "failover: kept the cluster's logs and data in {}",
                                kept.display()
                            );
                            return measured;
                        }
                        measured
                    }
                    "etcd" => {
                        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                            .join("scripts/etcd-cluster.sh");
                        cluster::failover_etcd(&etcd_endpoints, &etcd_dir, &script, reps, clients)
                            .await
                    }
                    other => anyhow::bail!("unknown backend {other:?} (dossier, etcd)"),
                }
            })?
        }
        Command::LogRecovery {
            log_bytes,
            groups,
            entry_bytes,
        } => {
            eprintln!(
                "log-recovery: filling {} MiB over {groups} groups",
                log_bytes >> 20
            );
            storage::recovery(dir.path(), log_bytes, groups, entry_bytes)?
        }
    };
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
