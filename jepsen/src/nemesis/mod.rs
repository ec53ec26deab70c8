//! The nemesis: faults on a bounded schedule, each healed before the next, and (see
//! [`membership`]) changes of the cluster's shape running beside them.
//!
//! Every `nemesis-interval` the next fault in turn is applied to the current leader of a random
//! shard or to a random member node, and healed half an interval later. Faults take turns so
//! that a short run sees each kind. Each fault and heal is a line of `nemesis.log`, and counted
//! for the run's summary.

pub mod membership;
pub mod partition;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use dossier_cli::ops;
use dossier_cli::procs::LocalCluster;

use crate::netns::Net;
use crate::workloads::Rng;

/// Faults the nemesis may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a random node or the current leader of a shard, restart it half an interval later.
    Kill,
    /// SIGSTOP a random node or the current leader of a shard, SIGCONT it half an interval later.
    Pause,
    /// Cut links between nodes (namespaces only), healed half an interval later. Patterns take
    /// turns: random halves, the leader of a shard isolated, a majority ring, a bridge.
    Partition,
    /// Cut client hosts off from some nodes (namespaces only), healed half an interval later.
    /// Patterns take turns: each host sees its own minority, its own majority, one node, every
    /// node but a shard's leader.
    ClientPartition,
    /// Ask the leader of a random shard's node to hand its leaderships over (Admin.Drain).
    Transfer,
    /// Replica moves, node joins and removals, on their own schedule beside the other faults
    /// ([`membership`]).
    Membership,
    /// Shard splits, on the membership nemesis's schedule (with `membership` or alone).
    Split,
}

impl std::str::FromStr for Fault {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kill" => Ok(Fault::Kill),
            "pause" => Ok(Fault::Pause),
            "partition" => Ok(Fault::Partition),
            "client-partition" => Ok(Fault::ClientPartition),
            "transfer" => Ok(Fault::Transfer),
            "membership" => Ok(Fault::Membership),
            "split" => Ok(Fault::Split),
            other => bail!(
                "unknown nemesis {other:?} (kill, pause, partition, client-partition, transfer, membership, split)"
            ),
        }
    }
}

impl Fault {
    /// Whether the fault needs the nodes and clients in network namespaces.
    pub fn needs_namespaces(self) -> bool {
        matches!(self, Fault::Partition | Fault::ClientPartition)
    }

    /// Whether the fault is a change of the cluster's shape, made by the membership nemesis on
    /// its own schedule rather than in the faults' turns.
    pub fn changes_membership(self) -> bool {
        matches!(self, Fault::Membership | Fault::Split)
    }
}

/// `nemesis.log` as it is written, and what the nemesis did, counted by kind.
#[derive(Debug)]
pub struct Journal {
    started: Instant,
    lines: Mutex<Vec<String>>,
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Journal {
    pub fn new(started: Instant) -> Self {
        Journal {
            started,
            lines: Mutex::new(Vec::new()),
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    /// A line of `nemesis.log`, stamped with the time since the run began.
    pub fn note(&self, line: impl std::fmt::Display) {
        let at = self.started.elapsed().as_secs_f64();
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{at:.3}s {line}"));
    }

    /// Counts one `what` ("kill", "move ok", ...).
    pub fn count(&self, what: &str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what.to_owned())
            .or_default() += 1;
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// What the nemesis acts on: the node processes (shared with the runner and the membership
/// nemesis, which adds members and drops removed ones), the test network if there is one, its
/// journal.
#[derive(Debug, Clone)]
pub struct Stage {
    pub cluster: Arc<tokio::sync::Mutex<LocalCluster>>,
    pub net: Option<Arc<Net>>,
    pub journal: Arc<Journal>,
    pub stop: Arc<AtomicBool>,
}

impl Stage {
    /// The ids of the member nodes the harness runs (removed ones are gone from the cluster).
    pub async fn members(&self) -> Vec<u64> {
        self.cluster
            .lock()
            .await
            .procs
            .iter()
            .map(|p| p.id)
            .collect()
    }

    /// The addresses of the member nodes, to ask for the map or send admin requests to.
    pub async fn seeds(&self) -> Vec<String> {
        let c = self.cluster.lock().await;
        c.procs.iter().map(|p| p.grpc.clone()).collect()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// The fault schedule (every kind but the membership changes, which run on their own): runs
/// until `stage.stop`, heals what it injected before it returns. Returns the number of faults
/// injected.
pub async fn faults(stage: Stage, kinds: Vec<Fault>, interval: Duration, seed: u64) -> u64 {
    let kinds: Vec<Fault> = kinds
        .into_iter()
        .filter(|f| !f.changes_membership())
        .collect();
    if kinds.is_empty() {
        return 0;
    }
    let mut rng = Rng(seed ^ 0x006E_656D_6573_6973);
    let mut faults = 0u64;
    let mut turn = 0usize;
    let mut partitions = 0u64;
    let mut client_partitions = 0u64;
    let journal = &stage.journal;
    while !stage.stopped() {
        tokio::time::sleep(interval / 2).await;
        if stage.stopped() {
            break;
        }
        let fault = kinds[turn % kinds.len()];
        turn += 1;
        let members = stage.members().await;
        if members.is_empty() {
            continue;
        }
        let target = match rng.below(2) {
            0 => shard_leader(&stage, &mut rng).await,
            _ => None,
        }
        .filter(|t| members.contains(t))
        .unwrap_or(members[rng.below(members.len())]);
        match fault {
            Fault::Partition | Fault::ClientPartition => {
                let Some(net) = &stage.net else { continue };
                let (name, result) = if fault == Fault::Partition {
                    let (name, connected) =
                        partition::between_nodes(partitions, target, &members, &mut rng);
                    partitions += 1;
                    (name, net.partition(&*connected))
                } else {
                    let hosts = net.client_hosts();
                    let (name, sees) = partition::clients_from_nodes(
                        client_partitions,
                        target,
                        &members,
                        hosts,
                        &mut rng,
                    );
                    client_partitions += 1;
                    (name, net.cut_clients(&*sees))
                };
                let what = if fault == Fault::Partition {
                    "partition"
                } else {
                    "client-partition"
                };
                match result {
                    Ok(()) => journal.note(format_args!("{what}: {name}")),
                    Err(e) => journal.note(format_args!("{what}: {name} failed: {e:#}")),
                }
                faults += 1;
                journal.count(what);
                tokio::time::sleep(interval / 2).await;
                let healed = if fault == Fault::Partition {
                    net.heal()
                } else {
                    net.heal_clients()
                };
                match healed {
                    Ok(()) => journal.note(format_args!("{what} healed")),
                    Err(e) => journal.note(format_args!("{what} heal failed: {e:#}")),
                }
            }
            Fault::Transfer => {
                let address = stage
                    .cluster
                    .lock()
                    .await
                    .node_mut(target)
                    .map(|n| n.grpc.clone());
                let Some(address) = address else { continue };
                match drain(&address).await {
                    Ok(moved) => journal.note(format_args!(
                        "transfer: node {target} handed over shards {moved:?}"
                    )),
                    Err(e) => journal.note(format_args!("transfer on node {target} failed: {e:#}")),
                }
                faults += 1;
                journal.count("transfer");
                tokio::time::sleep(interval / 2).await;
            }
            Fault::Kill | Fault::Pause => {
                {
                    let mut c = stage.cluster.lock().await;
                    let Some(node) = c.node_mut(target) else {
                        continue;
                    };
                    if fault == Fault::Kill {
                        node.kill9();
                    } else {
                        node.pause(true);
                    }
                }
                let what = if fault == Fault::Kill {
                    "kill"
                } else {
                    "pause"
                };
                faults += 1;
                journal.count(what);
                journal.note(format_args!("{what} node {target}"));
                tokio::time::sleep(interval / 2).await;
                let mut c = stage.cluster.lock().await;
                // A node removed meanwhile is gone from the cluster: nothing to heal.
                if let Some(node) = c.node_mut(target) {
                    let healed = if fault == Fault::Kill {
                        node.spawn().map(|()| "restarted")
                    } else {
                        node.pause(false);
                        Ok("resumed")
                    };
                    match healed {
                        Ok(what) => journal.note(format_args!("node {target} {what}")),
                        Err(e) => journal.note(format_args!("node {target} failed to heal: {e:#}")),
                    }
                }
            }
            Fault::Membership | Fault::Split => {}
        }
    }
    faults
}

/// The node that leads a random shard of the map now, by the nodes' own status (shards split
/// and move, so they are taken from the map).
async fn shard_leader(stage: &Stage, rng: &mut Rng) -> Option<u64> {
    let seeds = stage.seeds().await;
    let status = ops::status(&seeds, false).await.ok()?;
    let shards = &status.map.shards;
    let shard = shards.get(rng.below(shards.len()))?.shard_id;
    ops::leader_of(&status.replicas, shard).map(|r| r.node_id)
}

/// Asks a node to hand every leadership it holds to another replica; returns the shards moved.
async fn drain(address: &str) -> Result<Vec<u64>> {
    let mut admin = dossier_api::v1::admin_client::AdminClient::new(
        dossier_cli::ops::endpoint(address)?.connect().await?,
    );
    let mut request = tonic::Request::new(dossier_api::v1::DrainRequest {});
    request.set_timeout(Duration::from_secs(10));
    Ok(admin.drain(request).await?.into_inner().transferred)
}
