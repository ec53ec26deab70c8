//! A run: a local cluster of `dossier-node` processes, concurrent client processes recording a
//! history, a nemesis injecting faults on a bounded schedule, then healing, final reads, and the
//! checker's verdict written to the run folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dossier_cli::ops;
use dossier_cli::procs::{LocalCluster, NodeProc};
use serde_json::json;

use crate::checker;
use crate::history;
use crate::netns::{self, Net};
use crate::workloads::{self, Recorder, Rng, Shared, register, set};

/// Faults the nemesis may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a random node or the current leader of a shard, restart it half an interval later.
    Kill,
    /// SIGSTOP a random node or the current leader of a shard, SIGCONT it half an interval later.
    Pause,
    /// Cut the network (namespaces only), healed half an interval later. Patterns take turns:
    /// random halves, the leader of a shard isolated, a majority ring, a bridge.
    Partition,
    /// Ask the leader of a random shard's node to hand its leaderships over (Admin.Drain).
    Transfer,
}

impl std::str::FromStr for Fault {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kill" => Ok(Fault::Kill),
            "pause" => Ok(Fault::Pause),
            "partition" => Ok(Fault::Partition),
            "transfer" => Ok(Fault::Transfer),
            other => bail!("unknown nemesis {other:?} (kill, pause, partition, transfer)"),
        }
    }
}

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

/// The nemesis: every interval, one fault on a random node or the current leader of a random
/// shard; healed half an interval later. Writes what it did to `nemesis.log`.
async fn nemesis_loop(
    cluster: Arc<tokio::sync::Mutex<LocalCluster>>,
    net: Option<Arc<Net>>,
    config: Arc<RunConfig>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    started: Instant,
) -> u64 {
    let mut rng = Rng(config.seed ^ 0x006E_656D_6573_6973);
    let mut faults = 0;
    let mut partitions = 0;
    if config.nemesis.is_empty() {
        return 0;
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(config.nemesis_interval / 2).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Faults take turns, so that a short run sees each kind.
        let fault = config.nemesis[faults as usize % config.nemesis.len()];
        let seeds = cluster.lock().await.seeds.clone();
        let target = if rng.below(2) == 0 {
            let shard = 1 + rng.below(config.shards as usize) as u64;
            match ops::status(&seeds, false).await {
                Ok(s) => ops::leader_of(&s.replicas, shard).map(|r| r.node_id),
                Err(_) => None,
            }
        } else {
            None
        }
        .unwrap_or(1 + rng.below(config.nodes as usize) as u64);
        let at = started.elapsed().as_secs_f64();
        if fault == Fault::Partition {
            let Some(net) = &net else { continue };
            let (name, cut) = partition_pattern(partitions, target, config.nodes, &mut rng);
            partitions += 1;
            let line = match net.partition(&*cut) {
                Ok(()) => format!("{at:.3}s Partition {name}"),
                Err(e) => format!("{at:.3}s Partition {name} failed: {e:#}"),
            };
            faults += 1;
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            tokio::time::sleep(config.nemesis_interval / 2).await;
            let at = started.elapsed().as_secs_f64();
            let line = match net.heal() {
                Ok(()) => format!("{at:.3}s partition healed"),
                Err(e) => format!("{at:.3}s partition heal failed: {e:#}"),
            };
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            continue;
        }
        if fault == Fault::Transfer {
            let address = cluster
                .lock()
                .await
                .node_mut(target)
                .map(|n| n.grpc.clone());
            let line = match address {
                Some(address) => match drain(&address).await {
                    Ok(moved) => {
                        format!("{at:.3}s Transfer: node {target} handed over shards {moved:?}")
                    }
                    Err(e) => format!("{at:.3}s Transfer on node {target} failed: {e:#}"),
                },
                None => continue,
            };
            faults += 1;
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            tokio::time::sleep(config.nemesis_interval / 2).await;
            continue;
        }
        {
            let mut c = cluster.lock().await;
            let Some(node) = c.node_mut(target) else {
                continue;
            };
            match fault {
                Fault::Kill => node.kill9(),
                Fault::Pause | Fault::Partition | Fault::Transfer => node.pause(true),
            }
        }
        faults += 1;
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{at:.3}s {fault:?} node {target}"));
        tokio::time::sleep(config.nemesis_interval / 2).await;
        let mut c = cluster.lock().await;
        if let Some(node) = c.node_mut(target) {
            let healed = match fault {
                Fault::Kill => node.spawn().map(|()| "restarted"),
                Fault::Pause | Fault::Partition | Fault::Transfer => {
                    node.pause(false);
                    Ok("resumed")
                }
            };
            let at = started.elapsed().as_secs_f64();
            let line = match healed {
                Ok(what) => format!("{at:.3}s node {target} {what}"),
                Err(e) => format!("{at:.3}s node {target} failed to heal: {e:#}"),
            };
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }
    faults
}

/// Asks a node to hand every leadership it holds to another replica; returns the shards moved.
async fn drain(address: &str) -> Result<Vec<u64>> {
    let mut admin =
        dossier_api::v1::admin_client::AdminClient::connect(format!("http://{address}")).await?;
    let mut request = tonic::Request::new(dossier_api::v1::DrainRequest {});
    request.set_timeout(Duration::from_secs(10));
    Ok(admin.drain(request).await?.into_inner().transferred)
}

/// The `n`-th partition pattern: which pairs of nodes stay connected. `leader` is a shard leader
/// (or a random node) for the isolating pattern.
fn partition_pattern(
    n: u64,
    leader: u64,
    nodes: u64,
    rng: &mut Rng,
) -> (String, Box<dyn Fn(u64, u64) -> bool + Send>) {
    match n % 4 {
        0 => {
            // Random halves: a minority and a majority.
            let mut order: Vec<u64> = (1..=nodes).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            let minority: Vec<u64> = order[..(nodes as usize / 2)].to_vec();
            let name = format!("halves, minority {minority:?}");
            (
                name,
                Box::new(move |a, b| minority.contains(&a) == minority.contains(&b)),
            )
        }
        1 => (
            format!("node {leader} isolated"),
            Box::new(move |a, b| a != leader && b != leader),
        ),
        2 => {
            // Majority ring: each node sees its ring neighbours within distance nodes/4 (rounded
            // up), a majority of the cluster, but no two nodes see the same majority.
            let reach = (nodes / 2).div_ceil(2);
            let name = format!("majority ring (reach {reach})");
            (
                name,
                Box::new(move |a, b| {
                    let d = a.abs_diff(b);
                    d.min(nodes - d) <= reach
                }),
            )
        }
        _ => {
            // Bridge: two halves that only `bridge` connects.
            let bridge = leader;
            let others: Vec<u64> = (1..=nodes).filter(|&x| x != bridge).collect();
            let left: Vec<u64> = others[..others.len() / 2].to_vec();
            let name = format!("bridge through node {bridge}, halves split at {left:?}");
            (
                name,
                Box::new(move |a, b| {
                    a == bridge || b == bridge || left.contains(&a) == left.contains(&b)
                }),
            )
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: checker::Report,
    pub faults: u64,
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
    let net = match netns::available() {
        Ok(()) => {
            let tag = (std::process::id() % 200 + 20) as u8;
            let net = Net::create(config.nodes, tag)
                .context("create the test network (namespaces, bridge)")?;
            eprintln!("nodes run in network namespaces on bridge 10.250.{tag}.0/24");
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
        config.nemesis.retain(|f| *f != Fault::Partition);
    }
    let config = Arc::new(config);
    let mut procs = Vec::new();
    for id in 1..=config.nodes {
        let data = config.out.join("nodes").join(format!("node-{id}"));
        let mut p = match &net {
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
        p.extra_args = extra.clone();
        procs.push(p);
    }
    let cluster = LocalCluster::from_procs(procs).await?;
    cluster
        .init(config.shards, 3.min(config.nodes as u32))
        .await?;
    let client = cluster.client().await?;
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let recorder = Arc::new(Recorder::new());
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_nemesis = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        client: client.clone(),
        recorder: Arc::clone(&recorder),
        registers: register::Registers::new(config.register_keys),
        sets: set::Sets::new(config.set_keys, config.time_limit),
        stop: Arc::clone(&stop_clients),
    });
    let clients: Vec<_> = (0..config.clients)
        .map(|c| {
            tokio::spawn(workloads::client_loop(
                Arc::clone(&shared),
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
            tokio::spawn(crate::identifiers::client_loop(
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
    let nemesis_log = Arc::new(Mutex::new(Vec::new()));
    let nemesis = tokio::spawn(nemesis_loop(
        Arc::clone(&cluster),
        net.clone(),
        Arc::clone(&config),
        Arc::clone(&stop_nemesis),
        Arc::clone(&nemesis_log),
        recorder.started,
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
    // Final reads of every set, after the cluster healed.
    set::final_reads(&client, &recorder, config.set_keys).await;
    // The identifier check reads every attempted patient: after the final set reads, so that its
    // time is not counted as a gap of the register and set workloads.
    // Identifier clients may still wait out a create's deadline: after the final reads.
    for c in identifier_clients {
        let _ = c.await;
    }
    let identifiers = if config.identifier_clients > 0 {
        let attempts = attempts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let report = crate::identifiers::check(&client, &numbers, &attempts).await;
        std::fs::write(
            config.out.join("identifiers.json"),
            serde_json::to_string_pretty(&json!({"report": report, "attempts": attempts}))?,
        )?;
        Some(report)
    } else {
        None
    };
    let events = recorder.take();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(config.out.join("history.jsonl"))?);
    history::write(&events, &mut file)?;
    drop(file);
    drop(events);
    std::fs::write(
        config.out.join("nemesis.log"),
        nemesis_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
            + "\n",
    )?;
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
    write_results(&config.out, &report, faults, config.time_limit)?;
    Ok(RunOutcome {
        report,
        faults,
        out: config.out.clone(),
        identifiers,
    })
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
    duration: Duration,
) -> Result<()> {
    let json = json!({ "valid": report.valid, "unknown": report.unknown, "faults": faults, "duration_s": duration.as_secs_f64(), "report": report });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("summary.txt"), summary(report, faults))?;
    Ok(())
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
