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

/// How long each node may take to answer ready once the faults stopped.
const READY_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub out: PathBuf,
    pub node_bin: PathBuf,
    pub nodes: u64,
    pub shards: u32,
    pub time_limit: Duration,
    pub nemesis: Vec<Fault>,
    pub nemesis_interval: Duration,
    /// Node slots beyond `nodes` that the membership nemesis may start joining nodes in.
    pub spare_nodes: u64,
    /// Between two changes of the membership nemesis.
    pub membership_interval: Duration,
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
    /// `raft.quiesce-after-ms` of the nodes, when set (quiescent groups).
    pub quiesce_after_ms: Option<u64>,
    /// TLS on every connection (certificates made in `out/certs`).
    pub tls: bool,
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
    /// With the membership nemesis: the final map's members, or what is wrong with it (a removed
    /// node still listed by a shard).
    pub membership: Option<Result<String, String>>,
    /// Nodes that did not answer ready within `READY_LIMIT` once the faults stopped.
    pub not_ready: Vec<u64>,
    pub out: PathBuf,
    /// The identifier workload's check, when it ran.
    pub identifiers: Option<crate::identifiers::Report>,
    /// The audit check, when the run had TLS on.
    pub audit: Option<crate::audit::Report>,
}

impl RunOutcome {
    /// The run's verdict: the history, the membership check, the identifiers' and the audit's
    /// checks all valid, and every node ready after the faults.
    pub fn valid(&self) -> bool {
        self.report.valid
            && !matches!(self.membership, Some(Err(_)))
            && self.identifiers.as_ref().is_none_or(|r| r.valid)
            && self.audit.as_ref().is_none_or(|r| r.valid)
            && self.not_ready.is_empty()
    }

    /// What the run printed and `summary.txt` holds: the history's verdict, the nemesis, the
    /// identifiers' and the audit's checks, the nodes not ready, the whole run's verdict.
    pub fn summary(&self) -> String {
        let mut text = summary(&self.report, self.faults)
            + &nemesis_summary(&self.counts, self.membership.as_ref());
        if let Some(ids) = &self.identifiers {
            text.push_str(&crate::identifiers::summary(ids));
            text.push('\n');
        }
        if let Some(audit) = &self.audit {
            text.push_str(&crate::audit::summary(audit));
            text.push('\n');
        }
        if !self.not_ready.is_empty() {
            text.push_str(&not_ready_line(&self.not_ready));
        }
        text.push_str(if self.valid() {
            "run: VALID\n"
        } else {
            "run: INVALID\n"
        });
        text
    }
}

pub async fn run(config: RunConfig) -> Result<RunOutcome> {
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("create {}", config.out.display()))?;
    let config = Arc::new(config);
    let mut extra: Vec<String> = Vec::new();
    if config.unsafe_stale_reads {
        extra.push("--unsafe-stale-reads-for-testing".into());
    }
    if let Some(ms) = config.quiesce_after_ms {
        extra.push(format!("--quiesce-after-ms={ms}"));
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
    let membership = config.nemesis.iter().any(|f| f.changes_membership());
    let spare = if config.nemesis.contains(&Fault::Membership) {
        config.spare_nodes
    } else {
        0
    };
    let net = match netns::available() {
        Ok(()) => {
            let tag = (std::process::id() % 200 + 20) as u8;
            let net = Net::create(config.nodes + spare, client_hosts, tag)
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
    let client_tls = if config.tls {
        // The nodes' certificate names every address a node of this run may have.
        let mut hosts = vec!["127.0.0.1".to_owned()];
        if let Some(net) = &net {
            hosts.extend((1..=config.nodes + spare).map(|id| net.ip(id)));
        }
        let certs = config.out.join("certs");
        let life = dossier_cli::certs::Lifetimes::default();
        dossier_cli::certs::create_ca(&certs, life, true)?;
        dossier_cli::certs::create_node(&certs, &hosts, life, true)?;
        dossier_cli::certs::create_client(&certs, "jepsen", "service", life, true)?;
        dossier_cli::certs::create_client(&certs, "jepsen-admin", "admin", life, true)?;
        dossier_cli::tokens::create_issuer(&certs, true)?;
        let tls = dossier_client::ClientTls::from_certs_dir(&certs, Some("jepsen"))?;
        // The nemeses' cluster operations (moves, joins, removals) act as an operator.
        dossier_cli::ops::use_tls(dossier_client::ClientTls::from_certs_dir(
            &certs,
            Some("jepsen-admin"),
        )?);
        extra.extend(dossier_cli::procs::LocalCluster::secure_args(&certs));
        Some(tls)
    } else {
        None
    };
    let mut procs = Vec::new();
    for id in 1..=config.nodes {
        procs.push(node_proc(&config, net.as_deref(), id, &extra)?);
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
        let tls = client_tls.clone();
        let client = host
            .handle()
            .spawn(async move { connect(seeds, tls).await })
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
    let changes = membership.then(|| {
        let (nodes, net, extra) = (Arc::clone(&config), net.clone(), extra.clone());
        let schedule = nemesis::membership::Schedule {
            interval: config.membership_interval,
            membership: config.nemesis.contains(&Fault::Membership),
            spare: (config.nodes + 1..=config.nodes + spare).collect(),
            // Three replicas per shard, and one node more, which a kill may take down.
            members_min: (config.nodes as usize).min(4),
            removals_max: spare as usize,
            splits_max: if config.nemesis.contains(&Fault::Split) {
                2
            } else {
                0
            },
            node: Box::new(move |id| node_proc(&nodes, net.as_deref(), id, &extra)),
        };
        tokio::spawn(nemesis::membership::membership(
            stage.clone(),
            schedule,
            config.seed,
        ))
    });
    eprintln!(
        "running for {:?} with nemesis {:?} every {:?}",
        config.time_limit, config.nemesis, config.nemesis_interval
    );
    tokio::time::sleep(config.time_limit).await;
    stop_nemesis.store(true, Ordering::Relaxed);
    let faults = nemesis.await.unwrap_or(0);
    // The change under way finishes within its limit.
    if let Some(changes) = changes {
        let _ = changes.await;
    }
    let faults_end = recorder.now();
    // Written now too, so that a run that fails from here on keeps it.
    std::fs::write(config.out.join("nemesis.log"), journal.text())?;
    // Heal: the network whole, every node running and not paused, then a few seconds of
    // fault-free operation. A node that does not become ready is recorded and the run goes on to
    // its final reads and check, so that its folder holds the whole history; it fails at the end.
    if let Some(net) = &net {
        net.heal()?;
        net.heal_clients()?;
    }
    let mut not_ready = Vec::new();
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
            if let Err(e) = p.wait_http_ok("readyz", READY_LIMIT).await {
                let without = leaderless(&p.grpc).await;
                eprintln!("{e:#}; {without}");
                journal.note(format_args!("after the faults: {e:#}; {without}"));
                not_ready.push(p.id);
            }
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
    // With TLS every access is audited: each patient's chain is intact and holds an event per
    // acknowledged operation (after the final reads, whose events are checked too).
    let audit = if config.tls {
        let acknowledged =
            crate::audit::acknowledged(&recorder.events.lock().unwrap_or_else(|e| e.into_inner()));
        let client = client.clone();
        let report = first
            .handle()
            .spawn(async move { crate::audit::check(&client, &acknowledged).await })
            .await
            .context("audit check")?;
        std::fs::write(
            config.out.join("audit.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        Some(report)
    } else {
        None
    };
    drop(hosts);
    let membership = if membership {
        let checked = nemesis::membership::final_check(&stage).await;
        Some(checked.map_err(|e| format!("{e:#}")))
    } else {
        None
    };
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
    let outcome = RunOutcome {
        report,
        faults,
        counts: journal.counts(),
        membership,
        not_ready,
        out: config.out.clone(),
        identifiers,
        audit,
    };
    write_results(&outcome, config.time_limit)?;
    Ok(outcome)
}

/// The status of the node at `address` (`Admin.NodeStatus`), within 10 s.
pub(crate) async fn node_status(address: &str) -> Result<dossier_api::v1::NodeStatusResponse> {
    let status = async {
        let mut admin = dossier_api::v1::admin_client::AdminClient::new(
            dossier_cli::ops::endpoint(address)?.connect().await?,
        );
        let mut request = tonic::Request::new(dossier_api::v1::NodeStatusRequest::default());
        request.set_timeout(Duration::from_secs(5));
        anyhow::Ok(admin.node_status(request).await?.into_inner())
    };
    tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
}

/// The replicas of the node at `address` that know no leader (what keeps it from being ready).
async fn leaderless(address: &str) -> String {
    match node_status(address).await {
        Ok(s) => {
            let shards: Vec<String> = s
                .shards
                .iter()
                .filter(|r| r.leader_id == 0)
                .map(|r| format!("shard {} ({}, term {})", r.shard_id, r.role, r.term))
                .collect();
            format!("replicas without a leader: {shards:?}")
        }
        Err(e) => format!("its status: {e:#}"),
    }
}

/// The process of node `id`: in its namespace when there is a test network, else on loopback.
fn node_proc(config: &RunConfig, net: Option<&Net>, id: u64, extra: &[String]) -> Result<NodeProc> {
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
            if config.tls {
                p.peer = Some(format!("{ip}:7100"));
            }
            p
        }
        None => LocalCluster::node(
            config.base_port,
            id,
            data,
            config.node_bin.clone(),
            config.tls,
        )?,
    };
    // With TLS the internal services have their own port, as a secure deployment runs them.
    p.extra_args = extra.to_vec();
    Ok(p)
}

/// A client of the cluster with short attempts (fast failover) and a 10 s deadline, as
/// `LocalCluster::client` makes: to be called on the client host's runtime, which then opens
/// its connections.
async fn connect(
    seeds: Vec<String>,
    tls: Option<dossier_client::ClientTls>,
) -> Result<dossier_client::Client> {
    let mut config = dossier_client::ClientConfig::new(seeds);
    config.tls = tls;
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

/// `results.json` and `summary.txt` in the run folder. `valid` in `results.json` is the whole
/// run's verdict; `history_valid` the history's alone.
pub fn write_results(outcome: &RunOutcome, duration: Duration) -> Result<()> {
    let o = outcome;
    let json = json!({
        "valid": o.valid(),
        "history_valid": o.report.valid,
        "unknown": o.report.unknown,
        "faults": o.faults,
        "nemesis": o.counts,
        "membership": o.membership,
        "not_ready": o.not_ready,
        "identifiers": o.identifiers,
        "audit": o.audit,
        "duration_s": duration.as_secs_f64(),
        "report": o.report,
    });
    std::fs::write(
        o.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(o.out.join("summary.txt"), o.summary())?;
    Ok(())
}

/// The line that says which nodes did not become ready after the faults (the run fails).
pub fn not_ready_line(nodes: &[u64]) -> String {
    format!(
        "RUN FAILED: nodes {nodes:?} did not answer ready within {READY_LIMIT:?} after the faults stopped\n"
    )
}

/// What the nemesis did: faults by kind, then the membership changes by outcome ("moves 4 ok /
/// 1 failed"), then the final map's check. Empty when it did nothing.
pub fn nemesis_summary(
    counts: &BTreeMap<String, u64>,
    membership: Option<&Result<String, String>>,
) -> String {
    let mut s = String::new();
    let faults: Vec<String> = ["kill", "pause", "partition", "client-partition", "transfer"]
        .iter()
        .filter_map(|k| counts.get(*k).map(|n| format!("{k} {n}")))
        .collect();
    if !faults.is_empty() {
        s.push_str(&format!("faults: {}\n", faults.join(", ")));
    }
    let outcomes = ["ok", "failed", "unfinished"];
    let changes: Vec<String> = [
        ("move", "moves"),
        ("join", "joins"),
        ("removal", "removals"),
        ("split", "splits"),
    ]
    .iter()
    .filter(|(k, _)| {
        outcomes
            .iter()
            .any(|o| counts.contains_key(&format!("{k} {o}")))
    })
    .map(|(k, plural)| {
        let by: Vec<String> = outcomes
            .iter()
            .filter_map(|o| {
                let n = counts.get(&format!("{k} {o}")).copied().unwrap_or(0);
                (n > 0 || *o != "unfinished").then(|| format!("{n} {o}"))
            })
            .collect();
        format!("{plural} {}", by.join(" / "))
    })
    .collect();
    if !changes.is_empty() {
        s.push_str(&format!("membership: {}\n", changes.join(", ")));
    }
    match membership {
        Some(Ok(fine)) => s.push_str(&format!("membership check: valid; {fine}\n")),
        Some(Err(wrong)) => s.push_str(&format!("membership check: INVALID: {wrong}\n")),
        None => {}
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary counts faults by kind, each membership change by outcome (an unfinished one
    /// only when there is one), and gives the final map's check.
    #[test]
    fn nemesis_summary_lists_faults_and_changes() {
        let counts: BTreeMap<String, u64> = [
            ("kill", 3),
            ("client-partition", 2),
            ("move ok", 4),
            ("move failed", 1),
            ("removal ok", 1),
            ("removal unfinished", 1),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
        let fine = Ok("final map: version 9".to_owned());
        assert_eq!(
            nemesis_summary(&counts, Some(&fine)),
            "faults: kill 3, client-partition 2\n\
             membership: moves 4 ok / 1 failed, removals 1 ok / 0 failed / 1 unfinished\n\
             membership check: valid; final map: version 9\n"
        );
        assert_eq!(nemesis_summary(&BTreeMap::new(), None), "");
        let wrong = Err("shards [2] list a removed node".to_owned());
        assert!(nemesis_summary(&BTreeMap::new(), Some(&wrong)).contains("INVALID"));
    }

    /// A run whose history is valid but whose audit is not is reported invalid, in its summary
    /// and in `results.json`, which says which check failed.
    #[test]
    fn a_failed_audit_makes_the_whole_run_invalid_in_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let report = checker::check(&[], Duration::from_secs(1), None);
        assert!(report.valid, "an empty history is valid");
        let mut outcome = RunOutcome {
            report,
            faults: 0,
            counts: BTreeMap::new(),
            membership: None,
            not_ready: Vec::new(),
            out: dir.path().to_path_buf(),
            identifiers: None,
            audit: Some(crate::audit::Report {
                valid: true,
                ..crate::audit::Report::default()
            }),
        };
        assert!(outcome.valid());
        write_results(&outcome, Duration::from_secs(1)).unwrap();
        assert!(
            std::fs::read_to_string(dir.path().join("summary.txt"))
                .unwrap()
                .ends_with("run: VALID\n")
        );

        outcome.audit = Some(crate::audit::Report {
            valid: false,
            short: vec![(
                "p-1".to_owned(),
                crate::audit::Accesses::default(),
                crate::audit::Accesses {
                    reads: 1,
                    writes: 0,
                },
            )],
            ..crate::audit::Report::default()
        });
        assert!(!outcome.valid());
        write_results(&outcome, Duration::from_secs(1)).unwrap();
        let summary = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
        assert!(summary.contains("audit: INVALID"), "{summary}");
        assert!(summary.ends_with("run: INVALID\n"), "{summary}");
        let results: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("results.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(results["valid"], false);
        assert_eq!(results["history_valid"], true);
        assert_eq!(results["audit"]["valid"], false);
    }
}
