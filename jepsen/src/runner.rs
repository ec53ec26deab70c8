//! A run: a local cluster of `dossier-node` processes, concurrent client processes recording a
//! history, a nemesis injecting faults on a bounded schedule, then healing, final reads, and the
//! checker's verdict written to the run folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use dossier_cli::procs::{LocalCluster, NodeProc};
use serde_json::json;

use crate::checker;
use crate::client_host::ClientHost;
use crate::history;
use crate::nemesis::{self, Fault, Journal, Stage};
use crate::netns::{self, Net};
use crate::workloads::{self, Recorder, Shared, register, set};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub out: PathBuf,
    pub node_bin: PathBuf,
    pub nodes: u64,
    pub shards: u32,
    pub time_limit: Duration,
    pub nemesis: Vec<Fault>,
    pub nemesis_interval: Duration,
    pub register_keys: usize,
    pub set_keys: usize,
    pub clients: usize,
    /// Client hosts the clients are spread over (each its own network namespace when there are
    /// namespaces), for the client-partition nemesis.
    pub client_hosts: u64,
    pub base_port: u16,
    pub seed: u64,
    /// Start the nodes with the unsafe test switch (reads without a barrier).
    pub unsafe_stale_reads: bool,
    /// `raft.read-lease` of the nodes: lease reads (true, the default) or ReadIndex.
    pub read_lease: bool,
    pub check_budget_per_key: Duration,
    /// Clients of the identifier workload (patients claiming national numbers); 0: none.
    pub identifier_clients: usize,
    /// National numbers they compete for.
    pub identifier_pool: usize,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: checker::Report,
    pub faults: u64,
    /// What the nemesis did, by kind.
    pub counts: BTreeMap<String, u64>,
    pub out: PathBuf,
    /// The identifier workload's check, when it ran.
    pub identifiers: Option<crate::identifiers::Report>,
}

pub async fn run(config: RunConfig) -> Result<RunOutcome> {
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("create {}", config.out.display()))?;
    let config = Arc::new(config);
    let mut extra: Vec<String> = Vec::new();
    if config.unsafe_stale_reads {
        extra.push("--unsafe-stale-reads-for-testing".into());
    }
    if !config.read_lease {
        let path = config.out.join("node.toml");
        std::fs::write(&path, "[raft]\nread-lease = false\n")
            .with_context(|| format!("write {}", path.display()))?;
        extra.push("--config".into());
        extra.push(path.display().to_string());
    }
    // Declared before the cluster so that it is dropped after the nodes are stopped.
    let client_hosts = config.client_hosts.max(1);
    let net = match netns::available() {
        Ok(()) => {
            let tag = (std::process::id() % 200 + 20) as u8;
            let net = Net::create(config.nodes, client_hosts, tag)
                .context("create the test network (namespaces, bridge)")?;
            eprintln!(
                "nodes and client hosts run in network namespaces on bridge 10.250.{tag}.0/24"
            );
            Some(Arc::new(net))
        }
        Err(why) => {
            eprintln!(
                "network namespaces unavailable ({why}): nodes run on loopback and partition faults are SKIPPED"
            );
            None
        }
    };
    let mut config = (*config).clone();
    if net.is_none() {
        config.nemesis.retain(|f| !f.needs_namespaces());
    }
    let config = Arc::new(config);
    let mut procs = Vec::new();
    for id in 1..=config.nodes {
        procs.push(node_proc(&config, net.as_deref(), id, &extra));
    }
    let cluster = LocalCluster::from_procs(procs).await?;
    cluster
        .init(config.shards, 3.min(config.nodes as u32))
        .await?;
    let seeds = cluster.seeds.clone();
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    // The clients' hosts: their runtimes, each with its own client, in their own namespaces. They
    // are dropped (their runtimes shut down) before the cluster is.
    let mut hosts = Vec::new();
    for h in 1..=client_hosts {
        let namespace = net.as_ref().map(|n| n.client_namespace(h));
        let host = ClientHost::new(&format!("client-host-{h}"), namespace.as_deref())?;
        host.check().await?;
        let seeds = seeds.clone();
        let client = host
            .handle()
            .spawn(async move { connect(seeds).await })
            .await
            .context("connect a client host")??;
        hosts.push((host, client));
    }
    let recorder = Arc::new(Recorder::new());
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_nemesis = Arc::new(AtomicBool::new(false));
    let registers = Arc::new(register::Registers::new(config.register_keys));
    let sets = Arc::new(set::Sets::new(config.set_keys, config.time_limit));
    let shared: Vec<Arc<Shared>> = hosts
        .iter()
        .map(|(_, client)| {
            Arc::new(Shared {
                client: client.clone(),
                recorder: Arc::clone(&recorder),
                registers: Arc::clone(&registers),
                sets: Arc::clone(&sets),
                stop: Arc::clone(&stop_clients),
            })
        })
        .collect();
    // Client `c` runs on host `c mod hosts`.
    let clients: Vec<_> = (0..config.clients)
        .map(|c| {
            let host = c % hosts.len();
            hosts[host].0.handle().spawn(workloads::client_loop(
                Arc::clone(&shared[host]),
                config.seed.wrapping_add(c as u64 * 7919),
            ))
        })
        .collect();
    let numbers = Arc::new(crate::identifiers::pool(
        config.identifier_pool.max(1),
        config.seed,
    ));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let identifier_clients: Vec<_> = (0..config.identifier_clients)
        .map(|w| {
            let (host, client) = &hosts[w % hosts.len()];
            host.handle().spawn(crate::identifiers::client_loop(
                client.clone(),
                w,
                Arc::clone(&numbers),
                Arc::clone(&stop_clients),
                Arc::clone(&attempts),
                config.seed,
                recorder.started,
            ))
        })
        .collect();
    let journal = Arc::new(Journal::new(recorder.started));
    let stage = Stage {
        cluster: Arc::clone(&cluster),
        net: net.clone(),
        journal: Arc::clone(&journal),
        stop: Arc::clone(&stop_nemesis),
    };
    let nemesis = tokio::spawn(nemesis::faults(
        stage.clone(),
        config.nemesis.clone(),
        config.nemesis_interval,
        config.seed,
    ));
    eprintln!(
        "running for {:?} with nemesis {:?} every {:?}",
        config.time_limit, config.nemesis, config.nemesis_interval
    );
    tokio::time::sleep(config.time_limit).await;
    stop_nemesis.store(true, Ordering::Relaxed);
    let faults = nemesis.await.unwrap_or(0);
    let faults_end = recorder.now();
    // Heal: the network whole, every node running and not paused, then a few seconds of
    // fault-free operation.
    if let Some(net) = &net {
        net.heal()?;
        net.heal_clients()?;
    }
    {
        let mut c = cluster.lock().await;
        for p in &mut c.procs {
            if p.is_running() {
                p.pause(false);
            } else {
                p.spawn()?;
            }
        }
        for p in &c.procs {
            p.wait_http_ok("readyz", Duration::from_secs(60)).await?;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_clients.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    // Final reads of every set, after the cluster healed, from the first client host.
    let (first, client) = &hosts[0];
    let final_reads = {
        let (client, recorder, keys) = (client.clone(), Arc::clone(&recorder), config.set_keys);
        first
            .handle()
            .spawn(async move { set::final_reads(&client, &recorder, keys).await })
    };
    final_reads.await.context("final reads")?;
    // Identifier clients may still wait out a create's deadline: after the final reads. The
    // identifier check reads every attempted patient: after the final set reads too, so that its
    // time is not counted as a gap of the register and set workloads.
    for c in identifier_clients {
        let _ = c.await;
    }
    let identifiers = if config.identifier_clients > 0 {
        let attempts = attempts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (client, numbers, checked) = (client.clone(), Arc::clone(&numbers), attempts.clone());
        let report = first
            .handle()
            .spawn(async move { crate::identifiers::check(&client, &numbers, &checked).await })
            .await
            .context("identifier check")?;
        std::fs::write(
            config.out.join("identifiers.json"),
            serde_json::to_string_pretty(&json!({"report": report, "attempts": attempts}))?,
        )?;
        Some(report)
    } else {
        None
    };
    drop(hosts);
    let events = recorder.take();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(config.out.join("history.jsonl"))?);
    history::write(&events, &mut file)?;
    drop(file);
    drop(events);
    std::fs::write(config.out.join("nemesis.log"), journal.text())?;
    {
        let mut c = cluster.lock().await;
        for p in &mut c.procs {
            p.terminate(Duration::from_secs(10));
        }
    }
    let report = check_history(
        &config.out.join("history.jsonl"),
        config.check_budget_per_key,
        Some(faults_end),
    )?;
    let counts = journal.counts();
    write_results(&config.out, &report, faults, &counts, config.time_limit)?;
    Ok(RunOutcome {
        report,
        faults,
        counts,
        out: config.out.clone(),
        identifiers,
    })
}

/// The process of node `id`: in its namespace when there is a test network, else on loopback.
fn node_proc(config: &RunConfig, net: Option<&Net>, id: u64, extra: &[String]) -> NodeProc {
    let data = config.out.join("nodes").join(format!("node-{id}"));
    let mut p = match net {
        Some(net) => {
            let ip = net.ip(id);
            let mut p = NodeProc::at(
                id,
                format!("{ip}:7000"),
                format!("{ip}:7080"),
                data,
                config.node_bin.clone(),
            );
            p.prefix = net.prefix(id);
            p
        }
        None => NodeProc::new(
            id,
            config.base_port + id as u16,
            config.base_port + 80 + id as u16,
            data,
            config.node_bin.clone(),
        ),
    };
    p.extra_args = extra.to_vec();
    p
}

/// A client of the cluster with short attempts (fast failover) and a 10 s deadline, as
/// `LocalCluster::client` makes: to be called on the client host's runtime, which then opens
/// its connections.
async fn connect(seeds: Vec<String>) -> Result<dossier_client::Client> {
    let mut config = dossier_client::ClientConfig::new(seeds);
    config.attempt_timeout = Duration::from_millis(500);
    config.deadline = Duration::from_secs(10);
    Ok(dossier_client::Client::connect(config).await?)
}

/// Checks a history file.
pub fn check_history(
    path: &Path,
    budget: Duration,
    faults_end: Option<u64>,
) -> Result<checker::Report> {
    let events = history::read(std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
    ))?;
    let ops = history::into_ops(events)?;
    Ok(checker::check(&ops, budget, faults_end))
}

/// `results.json` and `summary.txt` in the run folder.
pub fn write_results(
    out: &Path,
    report: &checker::Report,
    faults: u64,
    counts: &BTreeMap<String, u64>,
    duration: Duration,
) -> Result<()> {
    let json = json!({ "valid": report.valid, "unknown": report.unknown, "faults": faults, "nemesis": counts, "duration_s": duration.as_secs_f64(), "report": report });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let text = summary(report, faults) + &nemesis_summary(counts);
    std::fs::write(out.join("summary.txt"), text)?;
    Ok(())
}

/// What the nemesis did, by kind (`faults: kill 3, pause 2, ...`). Empty when it did nothing.
pub fn nemesis_summary(counts: &BTreeMap<String, u64>) -> String {
    let faults: Vec<String> = ["kill", "pause", "partition", "client-partition", "transfer"]
        .iter()
        .filter_map(|k| counts.get(*k).map(|n| format!("{k} {n}")))
        .collect();
    if faults.is_empty() {
        return String::new();
    }
    format!("faults: {}\n", faults.join(", "))
}

pub fn summary(report: &checker::Report, faults: u64) -> String {
    let mut s = String::new();
    let a = &report.availability;
    s.push_str(&format!(
        "{}: {} operations ({} ok, {} fail, {} info; {:.1}% ok), {} faults injected\n",
        if report.valid {
            "VALID"
        } else if report.unknown {
            "UNKNOWN"
        } else {
            "INVALID"
        },
        a.ops,
        a.ok,
        a.fail,
        a.info,
        a.ok_fraction * 100.0,
        faults
    ));
    s.push_str(&format!(
        "longest gap without a successful write: {:.0} ms (key {})",
        a.longest_write_gap_ms, a.longest_write_gap_key
    ));
    match a.longest_write_gap_after_faults_ms {
        Some(after) => s.push_str(&format!("; after the faults stopped: {after:.0} ms\n")),
        None => s.push('\n'),
    }
    // Registers by slot (`r/0.0`, `r/0.1`, ... are slot `r/0`): one line each, and one per key
    // that is not valid.
    let mut slots: Vec<(&str, usize, usize, usize)> = Vec::new();
    for r in &report.registers {
        let slot = r
            .key
            .split_once('.')
            .map_or(r.key.as_str(), |(slot, _)| slot);
        match slots.last_mut() {
            Some((s, keys, ops, bad)) if *s == slot => {
                *keys += 1;
                *ops += r.ops;
                *bad += usize::from(r.verdict != "valid");
            }
            _ => slots.push((slot, 1, r.ops, usize::from(r.verdict != "valid"))),
        }
    }
    for (slot, keys, ops, bad) in slots {
        s.push_str(&format!(
            "register {slot}: {} ({keys} keys, {ops} ops)\n",
            if bad == 0 {
                "valid".to_owned()
            } else {
                format!("{bad} keys not valid")
            }
        ));
    }
    for r in report.registers.iter().filter(|r| r.verdict != "valid") {
        s.push_str(&format!(
            "register {}: {} ({} ops)",
            r.key, r.verdict, r.ops
        ));
        if let Some(e) = &r.explanation {
            s.push_str(&format!(": {e}"));
        }
        s.push('\n');
    }
    let c = &report.cas;
    if c.invoked > 0 {
        s.push_str(&format!(
            "compare-and-set: {} invoked, {} applied ({:.1}%), {} found another value, {} refused, {} indeterminate\n",
            c.invoked,
            c.applied,
            c.applied as f64 * 100.0 / c.invoked as f64,
            c.condition_failed,
            c.refused,
            c.indeterminate
        ));
    }
    for set in &report.sets {
        let stale: usize = set.stale_reads.iter().map(|r| r.missing).sum();
        s.push_str(&format!(
            "set {}: {} ({} acknowledged, {} indeterminate; final read {} elements; {} reads checked; lost {}, unexpected {}, duplicates {}, stale reads {} (missing {stale}), malformed {}{})\n",
            set.key,
            if set.valid { "valid" } else { "INVALID" },
            set.acknowledged,
            set.indeterminate,
            set.read,
            set.reads,
            few(&set.lost),
            few(&set.unexpected),
            few(&set.duplicates),
            set.stale_reads.len(),
            set.malformed.len(),
            if set.missing_final_read { ", no final read" } else { "" }
        ));
        for r in set.stale_reads.iter().take(5) {
            s.push_str(&format!(
                "  stale read {:.3}-{:.3} s: {} missing, e.g. {:?}\n",
                r.call_ms / 1e3,
                r.ret_ms / 1e3,
                r.missing,
                r.examples
            ));
        }
    }
    s
}

/// A list of elements for the summary: the first ten, and how many more (all are in
/// `results.json`).
fn few(elements: &[i64]) -> String {
    const SHOWN: usize = 10;
    if elements.len() <= SHOWN {
        format!("{elements:?}")
    } else {
        format!(
            "{:?} and {} more",
            &elements[..SHOWN],
            elements.len() - SHOWN
        )
    }
}
