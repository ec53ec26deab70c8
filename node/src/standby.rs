//! Warm standbys: non-voting replicas (Raft learners) on the nodes started with `--standby`, for
//! a disaster-recovery or reporting site. Every shard keeps one standby in each zone that has an
//! up standby node (on the one of that zone holding the fewest standbys), so the site holds a
//! copy of everything that the shard's leader keeps up to date, without its nodes ever voting,
//! leading, or slowing a commit down. A standby answers stale reads sent to it; anything else is
//! sent on to the leader (NOT_LEADER).
//!
//! Run by the placement driver on the meta group's leader, one change per round:
//! - **add**: the shard's leader adds the node as a learner (without waiting for it to catch
//!   up), then the map lists it in the shard's `standbys` and the node starts its replica;
//!   interrupted in between, the next round decides the same and finds the learner there;
//! - **remove** (its node is draining, removed, or no longer a standby's zone's choice): the
//!   shard's leader takes the learner out of the group's members, then the map drops it and the
//!   node drops its replica.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dossier_api::raft::v1::ChangeReplicasRequest;
use dossier_api::v1::{ClusterMap, NodeInfo, NodeState, ShardDescriptor};
use tracing::info;

use crate::errors::ApiError;
use crate::membership::{MapChange, descriptor};
use crate::meta;
use crate::node::Node;

/// For the shard's leader to commit the membership change (no catch-up is awaited).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A standby the placement driver adds or removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Add { shard: u64, node: u64 },
    Remove { shard: u64, node: u64 },
}

/// Whether `n` is an up standby node.
fn serving_standby(n: &NodeInfo) -> bool {
    n.standby && n.state == NodeState::Up as i32
}

/// The next standby change the map calls for: removals first (a standby on a node that is not
/// an up standby node, or a second one in a zone), then additions, shard by shard.
pub(crate) fn next_change(map: &ClusterMap) -> Option<Change> {
    let node = |id: u64| map.nodes.iter().find(|n| n.node_id == id);
    for d in &map.shards {
        let mut zones = BTreeSet::new();
        for &s in &d.standbys {
            let keep = node(s).is_some_and(|n| serving_standby(n) && zones.insert(&n.zone));
            if !keep {
                return Some(Change::Remove {
                    shard: d.shard_id,
                    node: s,
                });
            }
        }
    }
    // Standbys per standby node, to choose the least loaded one of a zone.
    let mut held: BTreeMap<u64, usize> = map
        .nodes
        .iter()
        .filter(|n| serving_standby(n))
        .map(|n| (n.node_id, 0))
        .collect();
    for d in &map.shards {
        for s in &d.standbys {
            if let Some(h) = held.get_mut(s) {
                *h += 1;
            }
        }
    }
    let zones: BTreeSet<&str> = map
        .nodes
        .iter()
        .filter(|n| serving_standby(n))
        .map(|n| n.zone.as_str())
        .collect();
    for d in &map.shards {
        // A shard in the middle of a move or a split waits; its standby comes afterwards.
        if !d.learners.is_empty() {
            continue;
        }
        let covered: BTreeSet<&str> = d
            .standbys
            .iter()
            .filter_map(|s| node(*s))
            .map(|n| n.zone.as_str())
            .collect();
        for zone in zones.iter().filter(|z| !covered.contains(*z)) {
            let choice = map
                .nodes
                .iter()
                .filter(|n| serving_standby(n) && n.zone == *zone)
                .filter(|n| !d.replicas.contains(&n.node_id))
                .min_by_key(|n| (held[&n.node_id], n.node_id));
            if let Some(n) = choice {
                return Some(Change::Add {
                    shard: d.shard_id,
                    node: n.node_id,
                });
            }
        }
    }
    None
}

/// Lists `node` among `shard`'s standbys.
fn list(map: &ClusterMap, shard: u64, node: u64) -> Result<MapChange, ApiError> {
    let d = descriptor(map, shard)?;
    if d.standbys.contains(&node) {
        return Ok(MapChange::Unchanged);
    }
    let mut next = map.clone();
    with_shard(&mut next, shard).standbys.push(node);
    Ok(MapChange::Next(next))
}

/// Drops `node` from `shard`'s standbys.
fn unlist(map: &ClusterMap, shard: u64, node: u64) -> Result<MapChange, ApiError> {
    let d = descriptor(map, shard)?;
    if !d.standbys.contains(&node) {
        return Ok(MapChange::Unchanged);
    }
    let mut next = map.clone();
    with_shard(&mut next, shard).standbys.retain(|s| *s != node);
    Ok(MapChange::Next(next))
}

fn with_shard(map: &mut ClusterMap, shard: u64) -> &mut ShardDescriptor {
    map.shards
        .iter_mut()
        .find(|d| d.shard_id == shard)
        .expect("descriptor() found it")
}

impl Node {
    /// Makes the standby change `change` (on the meta leader).
    pub(crate) async fn change_standby(&self, change: Change) -> Result<(), ApiError> {
        let map = self.map().ok_or_else(|| {
            ApiError::Unavailable("this node has not learnt the cluster map yet".into())
        })?;
        match change {
            Change::Add { shard, node } => {
                let d = descriptor(&map, shard)?.clone();
                let address = meta::peer_address(&map, node)
                    .ok_or_else(|| {
                        ApiError::invalid("node_id", format!("node {node} has no address"))
                    })?
                    .to_owned();
                self.standby_on_leader(&d, node, &address, 0).await?;
                self.change_map(|m| list(m, shard, node)).await?;
                info!(shard, node, "standby added");
            }
            Change::Remove { shard, node } => {
                let d = descriptor(&map, shard)?.clone();
                self.standby_on_leader(&d, 0, "", node).await?;
                self.change_map(|m| unlist(m, shard, node)).await?;
                info!(shard, node, "standby removed");
            }
        }
        Ok(())
    }

    async fn standby_on_leader(
        &self,
        d: &ShardDescriptor,
        add: u64,
        address: &str,
        remove: u64,
    ) -> Result<(), ApiError> {
        let request = ChangeReplicasRequest {
            shard_id: d.shard_id,
            add_node: add,
            add_address: address.to_owned(),
            remove_node: remove,
            catch_up_timeout_ms: 0,
            standby: true,
        };
        self.change_replicas_on_leader(d, request, CHANGE_TIMEOUT, "the standby change")
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(nodes: &[(&str, bool)], shards: u32) -> ClusterMap {
        let nodes: Vec<NodeInfo> = nodes
            .iter()
            .enumerate()
            .map(|(i, (zone, standby))| NodeInfo {
                node_id: i as u64 + 1,
                address: format!("10.0.0.{}:7000", i + 1),
                zone: (*zone).into(),
                standby: *standby,
                ..NodeInfo::default()
            })
            .collect();
        let mut m = meta::plan(&nodes[..3], shards, 3);
        m.nodes = nodes;
        m
    }

    fn apply(m: &mut ClusterMap, c: Change) {
        match c {
            Change::Add { shard, node } => with_shard(m, shard).standbys.push(node),
            Change::Remove { shard, node } => with_shard(m, shard).standbys.retain(|s| *s != node),
        }
    }

    fn settle(m: &mut ClusterMap) -> usize {
        let mut changes = 0;
        while let Some(c) = next_change(m) {
            apply(m, c);
            changes += 1;
            assert!(changes <= 64, "no end to the changes");
        }
        changes
    }

    #[test]
    fn every_shard_gets_one_standby_per_standby_zone_spread_over_its_nodes() {
        // Two hospital sites and a witness hold the voters; a DR site has two standby nodes,
        // a reporting site one.
        let mut m = map(
            &[
                ("a", false),
                ("b", false),
                ("c", false),
                ("dr", true),
                ("dr", true),
                ("report", true),
            ],
            8,
        );
        assert_eq!(settle(&mut m), 16);
        for d in &m.shards {
            let mut s = d.standbys.clone();
            s.sort_unstable();
            assert!(
                s == vec![4, 6] || s == vec![5, 6],
                "one in dr, one in report: {d:?}"
            );
        }
        assert_eq!(
            (on_count(&m, 4), on_count(&m, 5), on_count(&m, 6)),
            (4, 4, 8)
        );
        // A standby node drains: its standbys go, and the other node of its zone takes them.
        m.nodes[3].state = NodeState::Draining as i32;
        let first = next_change(&m).unwrap();
        assert!(matches!(first, Change::Remove { node: 4, .. }), "{first:?}");
        settle(&mut m);
        assert_eq!((on_count(&m, 4), on_count(&m, 5)), (0, 8));
        // Voters never become standbys, and no standby is added during a move.
        let mut m = map(&[("a", false), ("b", false), ("c", false)], 4);
        assert_eq!(next_change(&m), None);
        m.nodes.push(NodeInfo {
            node_id: 9,
            zone: "dr".into(),
            standby: true,
            ..NodeInfo::default()
        });
        m.shards[0].learners = vec![9];
        let c = next_change(&m).unwrap();
        assert_ne!(
            c,
            Change::Add {
                shard: m.shards[0].shard_id,
                node: 9
            }
        );
    }

    fn on_count(m: &ClusterMap, n: u64) -> usize {
        m.shards.iter().filter(|d| d.standbys.contains(&n)).count()
    }
}
