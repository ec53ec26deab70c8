//! Operations on a running cluster shared by the `dossier` commands, the benchmarks and the fault
//! harness: init, status (tables and JSON).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::{
    ClusterMap, ClusterMapRequest, ErrorDetail, InitClusterRequest, NodeInfo, NodeStatusRequest,
    PlacementRequest, PlacementResponse, ShardStatus,
};
use tonic::transport::Endpoint;

/// TLS for every connection these operations open (set once, from `--certs-dir`).
static TLS: std::sync::OnceLock<dossier_client::ClientTls> = std::sync::OnceLock::new();

/// Makes every later connection of these operations use `tls` (once per process; a second call
/// is ignored).
pub fn use_tls(tls: dossier_client::ClientTls) {
    let _ = TLS.set(tls);
}

/// An endpoint for a node at `addr` (host:port), over TLS when `use_tls` was called.
pub fn endpoint(addr: &str) -> Result<Endpoint> {
    match TLS.get() {
        Some(tls) => tls.endpoint(addr),
        None => Endpoint::from_shared(format!("http://{addr}")),
    }
    .with_context(|| format!("address {addr:?}"))
}

/// The ErrorDetail of a status, if it carries one.
pub(crate) fn decode_detail(status: &tonic::Status) -> Option<ErrorDetail> {
    dossier_api::error_detail(status.details())
}

pub(crate) async fn admin(
    addr: &str,
    timeout: Duration,
) -> Result<AdminClient<tonic::transport::Channel>> {
    admin_client(addr, timeout)
}

/// An Admin client of the node at `addr` (connected on first use), with the TLS of `use_tls`.
pub fn admin_client(
    addr: &str,
    timeout: Duration,
) -> Result<AdminClient<tonic::transport::Channel>> {
    let channel = endpoint(addr)?
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .connect_lazy();
    Ok(AdminClient::new(channel))
}

/// Sends the init request to the first node, following a leader hint and retrying while the meta
/// group elects, within `deadline`.
pub async fn init(
    nodes: Vec<NodeInfo>,
    shards: u32,
    replicas: u32,
    deadline: Duration,
) -> Result<ClusterMap> {
    let started = Instant::now();
    let mut target = nodes
        .first()
        .context("at least one node is needed")?
        .address
        .clone();
    let mut last = String::new();
    while started.elapsed() < deadline {
        let mut client = admin(&target, Duration::from_secs(15)).await?;
        let request = InitClusterRequest {
            nodes: nodes.clone(),
            shards,
            replicas,
        };
        match client.init_cluster(request).await {
            Ok(r) => {
                return r
                    .into_inner()
                    .map
                    .context("the node answered without a map");
            }
            Err(status) => {
                let detail: Option<ErrorDetail> = decode_detail(&status);
                match detail {
                    Some(d) if !d.leader_hint_address.is_empty() => target = d.leader_hint_address,
                    Some(d) if d.reason == dossier_api::v1::ErrorReason::InvalidArgument as i32 => {
                        bail!("init refused: {}", d.message)
                    }
                    _ => {}
                }
                last = status.message().to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("cluster init did not complete within {deadline:?}: {last}")
}

/// The current leader of `shard` among `replicas`: of the replicas that say they lead, the one
/// with the highest term (a restarted former leader may still believe it leads an old term).
pub fn leader_of(replicas: &[ShardStatus], shard: u64) -> Option<&ShardStatus> {
    replicas
        .iter()
        .filter(|r| r.shard_id == shard && r.role == "leader")
        .max_by_key(|r| r.term)
}

/// How far a node has taken its share of the cluster, by a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Replicas per up node, in map order.
    pub replicas_per_node: Vec<usize>,
    /// Replicas the node holds, and shards it leads.
    pub holds: usize,
    pub leads: usize,
    /// No replica move is in progress.
    pub settled: bool,
}

impl Share {
    pub fn of(s: &Status, node: u64) -> Share {
        let count = |n: u64| {
            s.map
                .shards
                .iter()
                .filter(|d| d.replicas.contains(&n))
                .count()
        };
        let replicas_per_node = s
            .map
            .nodes
            .iter()
            .filter(|n| n.state == dossier_api::v1::NodeState::Up as i32)
            .map(|n| count(n.node_id))
            .collect();
        let leads = s
            .map
            .shards
            .iter()
            .filter(|d| leader_of(&s.replicas, d.shard_id).is_some_and(|l| l.node_id == node))
            .count();
        Share {
            replicas_per_node,
            holds: count(node),
            leads,
            settled: s.map.shards.iter().all(|d| d.learners.is_empty()),
        }
    }

    /// Up nodes hold within one replica of each other, no move is in progress, and the node
    /// leads a shard: what the placement driver brings a joining node to.
    pub fn taken(&self) -> bool {
        let max = self.replicas_per_node.iter().max().unwrap_or(&0);
        let min = self.replicas_per_node.iter().min().unwrap_or(&0);
        self.settled && max - min <= 1 && self.leads > 0
    }
}

/// The map and every node's view of its replicas.
#[derive(Debug)]
pub struct Status {
    pub map: ClusterMap,
    pub replicas: Vec<ShardStatus>,
    pub disk: BTreeMap<u64, (u64, u64)>,
    pub unreachable: Vec<u64>,
    /// Whether the nodes were asked to count keys (a scan of every replica).
    pub keys_counted: bool,
    /// The meta leader's placement decisions, when it answered.
    pub placement: Option<(u64, PlacementResponse)>,
}

/// The newest cluster map any seed gives (a node that fell behind or left the cluster may give
/// an older one, or refuse).
pub async fn fresh_map(seeds: &[String]) -> Result<ClusterMap> {
    let mut best: Option<ClusterMap> = None;
    let mut last = String::from("no seed given");
    for seed in seeds {
        match admin(seed, Duration::from_secs(2))
            .await?
            .get_cluster_map(ClusterMapRequest {})
            .await
        {
            Ok(m) => {
                let m = m.into_inner();
                if best.as_ref().is_none_or(|b| b.version < m.version) {
                    best = Some(m);
                }
            }
            Err(e) => last = format!("{seed}: {}", e.message()),
        }
    }
    best.with_context(|| format!("no seed gave the cluster map ({last})"))
}

pub async fn status(seeds: &[String], count_keys: bool) -> Result<Status> {
    let map = fresh_map(seeds).await?;
    let mut replicas = Vec::new();
    let mut disk = BTreeMap::new();
    let mut unreachable = Vec::new();
    for node in &map.nodes {
        if node.state == dossier_api::v1::NodeState::Removed as i32 {
            continue;
        }
        match admin(&node.address, Duration::from_secs(2))
            .await?
            .node_status(NodeStatusRequest { count_keys })
            .await
        {
            Ok(s) => {
                let s = s.into_inner();
                disk.insert(node.node_id, (s.state_bytes_on_disk, s.log_bytes_on_disk));
                replicas.extend(s.shards);
            }
            Err(_) => unreachable.push(node.node_id),
        }
    }
    let mut placement = None;
    if let Some(leader) = leader_of(&replicas, 0)
        && let Some(node) = map.nodes.iter().find(|n| n.node_id == leader.node_id)
        && let Ok(answer) = admin(&node.address, Duration::from_secs(2))
            .await?
            .get_placement(PlacementRequest {})
            .await
    {
        placement = Some((leader.node_id, answer.into_inner()));
    }
    Ok(Status {
        placement,
        keys_counted: count_keys,
        map,
        replicas,
        disk,
        unreachable,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Prints the status as tables.
/// One line per node of the map: id, address, zone, state, replicas held, shards led.
pub fn print_nodes(s: &Status) {
    println!(
        "{:>4}  {:<22} {:<12} {:<12} {:>8} {:>7}",
        "node", "address", "zone", "state", "replicas", "leads"
    );
    for n in &s.map.nodes {
        // Voters, or on a standby node its standbys.
        let replicas = s.map.shards.iter().filter(|d| d.places(n.node_id)).count();
        let leads = s
            .map
            .shards
            .iter()
            .filter(|d| leader_of(&s.replicas, d.shard_id).is_some_and(|l| l.node_id == n.node_id))
            .count();
        let state = match dossier_api::v1::NodeState::try_from(n.state) {
            Ok(dossier_api::v1::NodeState::Up) if s.unreachable.contains(&n.node_id) => {
                "unreachable".to_owned()
            }
            Ok(state) => state
                .as_str_name()
                .trim_start_matches("NODE_STATE_")
                .to_lowercase(),
            Err(_) => format!("unknown ({})", n.state),
        };
        let state = if n.standby {
            format!("{state} standby")
        } else {
            state
        };
        let zone = if n.zone.is_empty() { "-" } else { &n.zone };
        println!(
            "{:>4}  {:<22} {:<12} {:<12} {:>8} {:>7}",
            n.node_id, n.address, zone, state, replicas, leads
        );
    }
}

pub fn print_status(s: &Status) {
    println!(
        "{:<6} {:<22} {:<10} {:>12} {:>12}",
        "NODE", "ADDRESS", "STATE", "STATE DISK", "LOG DISK"
    );
    for n in &s.map.nodes {
        let (state, (sd, ld)) = match s.disk.get(&n.node_id) {
            Some(d) => ("up", *d),
            None => ("DOWN", (0, 0)),
        };
        println!(
            "{:<6} {:<22} {:<10} {:>12} {:>12}",
            n.node_id,
            n.address,
            state,
            mib(sd),
            mib(ld)
        );
    }
    println!();
    println!(
        "{:<6} {:<10} {:<8} {:>6} {:>10} {:>8} {:>8}  HASH RANGE",
        "SHARD", "REPLICAS", "LEADER", "TERM", "APPLIED", "LAG", "KEYS"
    );
    let mut shard_ids: Vec<u64> = vec![0];
    shard_ids.extend(s.map.shards.iter().map(|d| d.shard_id));
    for shard in shard_ids {
        let rows: Vec<&ShardStatus> = s.replicas.iter().filter(|r| r.shard_id == shard).collect();
        let leader = leader_of(&s.replicas, shard);
        let max_applied = rows.iter().map(|r| r.applied_index).max().unwrap_or(0);
        let min_applied = rows.iter().map(|r| r.applied_index).min().unwrap_or(0);
        let (replicas, range) = match s.map.shards.iter().find(|d| d.shard_id == shard) {
            Some(d) => (
                // Standbys after a "+": 1,2,3+4.
                [&d.replicas, &d.standbys]
                    .map(|nodes| {
                        nodes
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .join("+")
                    .trim_end_matches('+')
                    .to_owned(),
                format!(
                    "{:016x}..{}",
                    d.hash_lo,
                    if d.hash_hi_max {
                        "end".to_owned()
                    } else {
                        format!("{:016x}", d.hash_hi)
                    }
                ),
            ),
            None => (
                s.map
                    .nodes
                    .iter()
                    .map(|n| n.node_id.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                "meta".to_owned(),
            ),
        };
        println!(
            "{:<6} {:<10} {:<8} {:>6} {:>10} {:>8} {:>8}  {}",
            shard,
            replicas,
            leader.map_or("none".to_owned(), |l| l.node_id.to_string()),
            leader.map_or(0, |l| l.term),
            max_applied,
            max_applied - min_applied,
            match leader {
                Some(l) if s.keys_counted => l.keys.to_string(),
                _ => "-".to_owned(),
            },
            range
        );
    }
    if !s.unreachable.is_empty() {
        println!("\nunreachable nodes: {:?}", s.unreachable);
    }
    print_placement(s);
}

/// Moves in progress, nodes draining, and the meta leader's recent placement decisions.
fn print_placement(s: &Status) {
    let mut pending = Vec::new();
    for d in &s.map.shards {
        for l in &d.learners {
            pending.push(format!(
                "shard {}: node {l} catching up as a learner (a replica move)",
                d.shard_id
            ));
        }
    }
    for n in &s.map.nodes {
        if n.state == dossier_api::v1::NodeState::Draining as i32 {
            let left = s.map.shards.iter().filter(|d| d.places(n.node_id)).count();
            pending.push(format!(
                "node {}: draining, {left} replicas left",
                n.node_id
            ));
        }
    }
    println!();
    if pending.is_empty() {
        println!("PENDING: nothing");
    } else {
        println!("PENDING");
        for p in pending {
            println!("  {p}");
        }
    }
    let Some((leader, placement)) = &s.placement else {
        println!("PLACEMENT: the meta group's leader did not answer");
        return;
    };
    println!(
        "PLACEMENT (meta leader node {leader}, balancing {}): {} recent decisions",
        if placement.balancing { "on" } else { "off" },
        placement.decisions.len()
    );
    for d in placement.decisions.iter().rev().take(10).rev() {
        let secs = d.at_unix_ms / 1000 % 86_400;
        let nodes = match (d.from_node, d.to_node) {
            (0, 0) => String::new(),
            (0, to) => format!("-> {to}"),
            (from, 0) => format!("{from}"),
            (from, to) => format!("{from} -> {to}"),
        };
        println!(
            "  {:02}:{:02}:{:02}Z {:<7} shard {:<4} {:<8} {} ({})",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            d.kind,
            d.shard_id,
            nodes,
            d.reason,
            d.outcome
        );
    }
}

pub fn status_json(s: &Status) -> serde_json::Value {
    serde_json::json!({
        "nodes": s.map.nodes.iter().map(|n| serde_json::json!({
            "node_id": n.node_id,
            "address": n.address,
            "zone": n.zone,
            "standby": n.standby,
            "state": dossier_api::v1::NodeState::try_from(n.state).map_or("unknown", |s| s.as_str_name()),
            "up": s.disk.contains_key(&n.node_id),
            "state_bytes_on_disk": s.disk.get(&n.node_id).map(|d| d.0),
            "log_bytes_on_disk": s.disk.get(&n.node_id).map(|d| d.1),
        })).collect::<Vec<_>>(),
        "shards": s.map.shards.iter().map(|d| serde_json::json!({
            "shard_id": d.shard_id,
            "epoch": d.epoch,
            "hash_lo": d.hash_lo,
            "hash_hi": if d.hash_hi_max { None } else { Some(d.hash_hi) },
            "replicas": d.replicas,
            "learners": d.learners,
            "standbys": d.standbys,
            "split_from": d.split_from,
        })).collect::<Vec<_>>(),
        "replicas": s.replicas.iter().map(|r| serde_json::json!({
            "shard_id": r.shard_id,
            "node_id": r.node_id,
            "role": r.role,
            "leader_id": r.leader_id,
            "term": r.term,
            "last_log_index": r.last_log_index,
            "commit_index": r.commit_index,
            "applied_index": r.applied_index,
            "keys": s.keys_counted.then_some(r.keys),
            "snapshot_index": r.snapshot_index,
            "purged_index": r.purged_index,
            "quiescent": r.quiescent,
        })).collect::<Vec<_>>(),
        "map_version": s.map.version,
        "moves_in_progress": s.map.shards.iter().flat_map(|d| d.learners.iter().map(move |l| serde_json::json!({
            "shard_id": d.shard_id,
            "learner": l,
        }))).collect::<Vec<_>>(),
        "placement": s.placement.as_ref().map(|(leader, p)| serde_json::json!({
            "meta_leader": leader,
            "balancing": p.balancing,
            "decisions": p.decisions.iter().map(|d| serde_json::json!({
                "at_unix_ms": d.at_unix_ms,
                "kind": d.kind,
                "shard_id": d.shard_id,
                "from_node": d.from_node,
                "to_node": d.to_node,
                "reason": d.reason,
                "outcome": d.outcome,
            })).collect::<Vec<_>>(),
        })),
    })
}
