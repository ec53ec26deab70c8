//! The membership nemesis: changes of the cluster's shape on their own schedule, while the other
//! faults go on. `membership`: replica moves (`Admin.MoveReplica`), nodes joining in spare slots
//! (`--join`, a fresh data folder, an id never used before), node removals (`Admin.RemoveNode`,
//! then the placement driver drains the node; once the map says removed, the harness stops it and
//! drops it from the cluster for good). `split`: shard splits (`Admin.SplitShard` at the middle
//! patient), kept apart so that either can run without the other.
//!
//! Bounded in count (joins by the spare slots, removals and splits by the schedule's maxima,
//! never below `members_min` members) and in time (each change has a limit; when the run stops,
//! the change under way finishes within its limit, a removal's wait gives up and leaves the node
//! draining). Every change and its outcome is a line of `nemesis.log` and counted ("move ok",
//! "join failed", ...).

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dossier_api::v1::{ClusterMap, NodeState};
use dossier_cli::elastic;
use dossier_cli::ops;
use dossier_cli::procs::NodeProc;

use super::Stage;
use crate::workloads::Rng;

/// How long one replica move may take (a small shard catches up in well under a second).
const MOVE_LIMIT: Duration = Duration::from_secs(30);
/// How long a new node may take to appear in the map and answer ready.
const JOIN_LIMIT: Duration = Duration::from_secs(30);
/// How long the removal request itself may take (the drain follows).
const REMOVE_REQUEST_LIMIT: Duration = Duration::from_secs(15);
/// How long the drain of a removed node may take before the nemesis stops waiting for it.
const REMOVE_LIMIT: Duration = Duration::from_secs(60);
/// How long a split may take.
const SPLIT_LIMIT: Duration = Duration::from_secs(30);

/// A change the nemesis may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Move,
    Join,
    Remove,
    Split,
}

/// The changes in turn; one that cannot be made (not selected, no spare slot, too few members,
/// enough splits) gives its turn to a move, if moves are selected.
const TURNS: [Change; 6] = [
    Change::Move,
    Change::Join,
    Change::Move,
    Change::Split,
    Change::Move,
    Change::Remove,
];

/// What the membership nemesis may do, and how often.
pub struct Schedule {
    /// Between the end of one change and the start of the next.
    pub interval: Duration,
    /// Moves, joins and removals (the `membership` nemesis).
    pub membership: bool,
    /// Node ids that may join, in order (never used before; a removed id never comes back).
    pub spare: Vec<u64>,
    /// Members the cluster keeps at least: no removal goes below.
    pub members_min: usize,
    pub removals_max: usize,
    pub splits_max: usize,
    /// The process of a new node with id `id` (its namespace, address, data folder, flags).
    pub node: Box<dyn Fn(u64) -> Result<NodeProc> + Send + Sync>,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("interval", &self.interval)
            .field("membership", &self.membership)
            .field("spare", &self.spare)
            .field("members_min", &self.members_min)
            .field("removals_max", &self.removals_max)
            .field("splits_max", &self.splits_max)
            .finish_non_exhaustive()
    }
}

/// Runs the membership nemesis until `stage.stop`; returns the number of changes attempted.
pub async fn membership(stage: Stage, schedule: Schedule, seed: u64) -> u64 {
    let mut rng = Rng(seed ^ 0x006D_656D_6265_7273);
    let mut spare: VecDeque<u64> = schedule.spare.iter().copied().collect();
    let (mut removals, mut splits, mut attempted) = (0usize, 0usize, 0u64);
    let journal = &stage.journal;
    for turn in 0.. {
        if sleep_unless_stopped(&stage, schedule.interval).await {
            break;
        }
        let members = stage.members().await;
        let possible = match TURNS[turn % TURNS.len()] {
            Change::Move => schedule.membership,
            Change::Join => schedule.membership && !spare.is_empty(),
            Change::Remove => {
                schedule.membership
                    && removals < schedule.removals_max
                    && members.len() > schedule.members_min
            }
            Change::Split => splits < schedule.splits_max,
        };
        let change = match (possible, schedule.membership) {
            (true, _) => TURNS[turn % TURNS.len()],
            (false, true) => Change::Move,
            // Splits alone: every turn is one, while the maximum allows.
            (false, false) if splits < schedule.splits_max => Change::Split,
            (false, false) => continue,
        };
        attempted += 1;
        let started = Instant::now();
        let (what, outcome) = match change {
            Change::Move => ("move", move_replica(&stage, &mut rng).await),
            Change::Join => {
                let id = spare.pop_front().expect("checked above");
                ("join", join(&stage, &schedule, id).await)
            }
            Change::Remove => {
                removals += 1;
                ("removal", remove(&stage, &members, &mut rng).await)
            }
            Change::Split => {
                splits += 1;
                ("split", split(&stage, &mut rng).await)
            }
        };
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Done::Yes(what_happened)) => {
                journal.count(&format!("{what} ok"));
                journal.note(format_args!("{what_happened} ({took:.1} s)"));
            }
            Ok(Done::Unfinished(why)) => {
                journal.count(&format!("{what} unfinished"));
                journal.note(format_args!("{why} ({took:.1} s)"));
            }
            Err(e) => {
                journal.count(&format!("{what} failed"));
                journal.note(format_args!("{what} failed after {took:.1} s: {e:#}"));
            }
        }
    }
    attempted
}

/// How a change ended, when it did not fail.
enum Done {
    /// Done, described.
    Yes(String),
    /// Started and left to the cluster (a removal whose drain outlasted its wait).
    Unfinished(String),
}

/// Sleeps `d`, or less if the run stops; true when it stopped.
async fn sleep_unless_stopped(stage: &Stage, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stage.stopped() {
            return true;
        }
        tokio::time::sleep(
            Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    stage.stopped()
}

async fn current_map(stage: &Stage) -> Result<ClusterMap> {
    ops::fresh_map(&stage.seeds().await).await
}

/// Moves a random replica of a random shard to a random up member that holds none of it.
async fn move_replica(stage: &Stage, rng: &mut Rng) -> Result<Done> {
    move_replica_of(stage, None, rng).await
}

/// Moves a random replica of `shard` (or of a random shard) to a random up member that holds
/// none of it.
async fn move_replica_of(stage: &Stage, shard: Option<u64>, rng: &mut Rng) -> Result<Done> {
    let map = current_map(stage).await?;
    let members = stage.members().await;
    let up: Vec<u64> = map
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Up as i32 && members.contains(&n.node_id))
        .map(|n| n.node_id)
        .collect();
    // Shards with a move under way (a learner listed) are left to it.
    let movable: Vec<_> = map
        .shards
        .iter()
        .filter(|d| shard.is_none_or(|s| s == d.shard_id))
        .filter(|d| d.learners.is_empty() && up.iter().any(|n| !d.replicas.contains(n)))
        .collect();
    if movable.is_empty() {
        bail!("no shard can move now (every one has a move under way or no up node to go to)");
    }
    let d = movable[rng.below(movable.len())];
    let from = d.replicas[rng.below(d.replicas.len())];
    let targets: Vec<u64> = up
        .iter()
        .copied()
        .filter(|n| !d.replicas.contains(n))
        .collect();
    let to = targets[rng.below(targets.len())];
    let seeds = stage.seeds().await;
    let moved = tokio::time::timeout(
        MOVE_LIMIT,
        elastic::move_replica(&seeds, d.shard_id, from, to),
    )
    .await
    .with_context(|| {
        format!(
            "shard {} from {from} to {to}: no answer within {MOVE_LIMIT:?}",
            d.shard_id
        )
    })?
    .with_context(|| format!("shard {} from {from} to {to}", d.shard_id))?;
    Ok(Done::Yes(format!(
        "move: shard {} from node {from} to node {to}, replicas now {:?} (epoch {})",
        d.shard_id, moved.replicas, moved.epoch
    )))
}

/// Starts node `id` with `--join` (a fresh data folder) and waits until the map lists it up and
/// it answers ready. It is a member of the harness's cluster from its start, so the other faults
/// may strike it while it joins.
async fn join(stage: &Stage, schedule: &Schedule, id: u64) -> Result<Done> {
    let seeds = stage.seeds().await;
    let mut node = (schedule.node)(id)?;
    node.extra_args
        .extend(["--join".to_owned(), seeds.join(",")]);
    node.spawn().with_context(|| format!("start node {id}"))?;
    let http = node.http.clone();
    stage.cluster.lock().await.procs.push(node);
    let started = Instant::now();
    loop {
        let listed = current_map(stage).await.ok().is_some_and(|m| {
            m.nodes
                .iter()
                .any(|n| n.node_id == id && n.state == NodeState::Up as i32)
        });
        if listed && dossier_cli::procs::http_ok(&http, "readyz").await {
            return Ok(Done::Yes(format!(
                "join: node {id} is in the map and ready"
            )));
        }
        if started.elapsed() > JOIN_LIMIT {
            // It stays a member of the harness's cluster: the join may still complete, and the
            // final heal requires it ready.
            bail!(
                "node {id} was not in the map and ready within {JOIN_LIMIT:?} (listed: {listed})"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Removes a random member that is up in the map: asks for the removal, waits until the map says
/// removed, then stops the node and drops it from the harness's cluster.
async fn remove(stage: &Stage, members: &[u64], rng: &mut Rng) -> Result<Done> {
    let map = current_map(stage).await?;
    let candidates: Vec<u64> = members
        .iter()
        .copied()
        .filter(|&m| {
            map.nodes
                .iter()
                .any(|n| n.node_id == m && n.state == NodeState::Up as i32)
        })
        .collect();
    if candidates.is_empty() {
        bail!("no member is up in the map");
    }
    let id = candidates[rng.below(candidates.len())];
    let seeds = stage.seeds().await;
    tokio::time::timeout(REMOVE_REQUEST_LIMIT, elastic::remove_node(&seeds, id))
        .await
        .with_context(|| format!("node {id}: no answer within {REMOVE_REQUEST_LIMIT:?}"))?
        .with_context(|| format!("node {id}"))?;
    stage
        .journal
        .note(format_args!("removal: node {id} draining"));
    let started = Instant::now();
    loop {
        let map = current_map(stage).await.ok();
        let removed = map.as_ref().is_some_and(|m| {
            m.nodes
                .iter()
                .any(|n| n.node_id == id && n.state == NodeState::Removed as i32)
        });
        if removed {
            break;
        }
        if started.elapsed() > REMOVE_LIMIT || stage.stopped() {
            let held = map.map_or(0, |m| m.shards.iter().filter(|d| d.places(id)).count());
            return Ok(Done::Unfinished(format!(
                "removal: node {id} still draining ({held} replicas) after {:.1} s; left to the cluster",
                started.elapsed().as_secs_f64()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut c = stage.cluster.lock().await;
    if let Some(at) = c.procs.iter().position(|p| p.id == id) {
        let mut node = c.procs.remove(at);
        // A paused node would not act on SIGTERM.
        node.pause(false);
        node.terminate(Duration::from_secs(10));
    }
    Ok(Done::Yes(format!("removal: node {id} removed and stopped")))
}

/// Splits a random shard at its middle patient, then at once moves a replica of the shard it
/// split (whose log still holds the split: the new replica replays it) to another node.
async fn split(stage: &Stage, rng: &mut Rng) -> Result<Done> {
    let map = current_map(stage).await?;
    if map.shards.is_empty() {
        bail!("the map has no shards");
    }
    let shard = map.shards[rng.below(map.shards.len())].shard_id;
    let seeds = stage.seeds().await;
    let (left, right) = tokio::time::timeout(SPLIT_LIMIT, elastic::split_shard(&seeds, shard, 0))
        .await
        .with_context(|| format!("shard {shard}: no answer within {SPLIT_LIMIT:?}"))?
        .with_context(|| format!("shard {shard}"))?;
    stage.journal.note(format_args!(
        "split: shard {shard} into {} and {} (replicas {:?})",
        left.shard_id, right.shard_id, right.replicas
    ));
    let then = match move_replica_of(stage, Some(left.shard_id), rng).await {
        Ok(Done::Yes(moved) | Done::Unfinished(moved)) => {
            stage.journal.count("move ok");
            moved
        }
        Err(e) => {
            stage.journal.count("move failed");
            format!("move failed: {e:#}")
        }
    };
    Ok(Done::Yes(format!("split: shard {shard} done; then {then}")))
}

/// How long the nodes' replicas may take, after the faults, to be the ones the map places.
const PLACEMENT_LIMIT: Duration = Duration::from_secs(20);

/// The end of a run with membership changes, once the cluster has healed: no shard may list a
/// removed node (a node is marked removed only once its replicas have moved away), and within
/// `PLACEMENT_LIMIT` every member must run exactly the replicas the map places on it (as voter
/// or learner): none missing, and none the map places elsewhere (the node drops those itself).
/// Returns the final map's members, or what is wrong.
pub async fn final_check(stage: &Stage) -> Result<String> {
    let started = Instant::now();
    loop {
        let map = current_map(stage).await?;
        let state = |s: i32| match NodeState::try_from(s) {
            Ok(NodeState::Up) => "up",
            Ok(NodeState::Draining) => "draining",
            Ok(NodeState::Removed) => "removed",
            Err(_) => "unknown",
        };
        let nodes: Vec<String> = map
            .nodes
            .iter()
            .map(|n| format!("{} {}", n.node_id, state(n.state)))
            .collect();
        let removed: Vec<u64> = map
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Removed as i32)
            .map(|n| n.node_id)
            .collect();
        let stranded: Vec<u64> = map
            .shards
            .iter()
            .filter(|d| {
                d.replicas
                    .iter()
                    .chain(&d.learners)
                    .any(|r| removed.contains(r))
            })
            .map(|d| d.shard_id)
            .collect();
        if !stranded.is_empty() {
            bail!(
                "shards {stranded:?} list a removed node (map version {}, nodes {nodes:?})",
                map.version
            );
        }
        let misplaced = misplaced(stage, &map).await;
        if misplaced.is_empty() {
            return Ok(format!(
                "final map: version {}, {} shards, nodes [{}]; every member runs the replicas the map places on it",
                map.version,
                map.shards.len(),
                nodes.join(", ")
            ));
        }
        if started.elapsed() > PLACEMENT_LIMIT {
            bail!(
                "{PLACEMENT_LIMIT:?} after the faults, replicas and map disagree: {} (map version {}, nodes {nodes:?})",
                misplaced.join("; "),
                map.version
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// For each member whose replicas differ from the map's placement: which shards it runs that the
/// map does not place on it, and which the map places on it that it does not run (or that it
/// could not be asked).
async fn misplaced(stage: &Stage, map: &ClusterMap) -> Vec<String> {
    let members: Vec<(u64, String)> = {
        let c = stage.cluster.lock().await;
        c.procs.iter().map(|p| (p.id, p.grpc.clone())).collect()
    };
    let mut out = Vec::new();
    for (id, address) in members {
        let placed: BTreeSet<u64> = map
            .shards
            .iter()
            .filter(|d| d.places(id))
            .map(|d| d.shard_id)
            .collect();
        let running = match hosted(&address).await {
            Ok(running) => running,
            Err(e) => {
                out.push(format!("node {id}: {e:#}"));
                continue;
            }
        };
        let extra: Vec<&u64> = running.difference(&placed).collect();
        let missing: Vec<&u64> = placed.difference(&running).collect();
        if !extra.is_empty() || !missing.is_empty() {
            out.push(format!(
                "node {id} runs shards {extra:?} the map does not place on it and lacks {missing:?}"
            ));
        }
    }
    out
}

/// The shards (not the meta group) whose replicas the node at `address` runs.
async fn hosted(address: &str) -> Result<BTreeSet<u64>> {
    let status = crate::runner::node_status(address)
        .await
        .context("status")?;
    Ok(status
        .shards
        .iter()
        .map(|r| r.shard_id)
        .filter(|&s| s != META_SHARD)
        .collect())
}

/// The meta group's shard id, which every member runs and no map descriptor lists.
const META_SHARD: u64 = 0;
