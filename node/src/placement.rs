//! The placement driver, on the meta group's leader: it balances replicas, zones and preferred
//! leaders over the up nodes (`balance.rs`, unless `placement-balance` is off), and first of all
//! it drains the nodes being removed, one
//! replica move at a time, choosing targets that keep a shard's replicas in distinct zones where
//! zones allow and that hold the fewest replicas; then it marks the node removed (while the node
//! still follows the map, so that it learns it and stops handing the map out) and hands its meta
//! group vote to another node. Every round starts from the map, so a drain
//! interrupted by a crash or a change of meta leader resumes where it stood.

use std::collections::BTreeSet;
use std::time::Duration;

use dossier_api::v1::{ClusterMap, NodeState};
use dossier_raft::openraft::async_runtime::WatchReceiver;
use dossier_raft::openraft::{BasicNode, ChangeMembers, ServerState};
use tracing::{info, warn};

use crate::balance;
use crate::errors::ApiError;
use crate::membership::MapChange;
use crate::meta::{self, META_SHARD};
use crate::node::Node;
use crate::placement_log::Decision;
use crate::standby;

/// How long the meta group's new voter may take to catch up.
const META_CATCH_UP: Duration = Duration::from_secs(60);

/// Marks `node` draining, after checking that the shards keep enough nodes.
pub(crate) fn begin_removal(map: &ClusterMap, node: u64) -> Result<MapChange, ApiError> {
    let Some(entry) = map.nodes.iter().find(|n| n.node_id == node) else {
        return Err(ApiError::invalid(
            "node_id",
            format!("node {node} is not in the cluster"),
        ));
    };
    match NodeState::try_from(entry.state) {
        Ok(NodeState::Draining) => return Ok(MapChange::Unchanged),
        Ok(NodeState::Removed) => {
            return Err(ApiError::invalid(
                "node_id",
                format!("node {node} is removed already"),
            ));
        }
        _ => {}
    }
    let remaining = map
        .nodes
        .iter()
        .filter(|n| n.node_id != node && n.state == NodeState::Up as i32 && !n.standby)
        .count();
    let needed = map
        .shards
        .iter()
        .map(|d| d.replicas.len())
        .max()
        .unwrap_or(0);
    // A standby node holds no voter: its standbys are only taken away.
    if remaining < needed && !entry.standby {
        return Err(ApiError::invalid(
            "node_id",
            format!(
                "removing node {node} would leave {remaining} up nodes for shards of {needed} replicas: add a node first"
            ),
        ));
    }
    let mut next = map.clone();
    for n in &mut next.nodes {
        if n.node_id == node {
            n.state = NodeState::Draining as i32;
        }
    }
    Ok(MapChange::Next(next))
}

/// Reorders `shard`'s replicas to `order` (the same nodes): a new preferred leader.
fn prefer(map: &ClusterMap, shard: u64, order: &[u64]) -> Result<MapChange, ApiError> {
    let mut next = map.clone();
    let Some(d) = next.shards.iter_mut().find(|d| d.shard_id == shard) else {
        return Ok(MapChange::Unchanged);
    };
    let mut have = d.replicas.clone();
    let mut want = order.to_vec();
    have.sort_unstable();
    want.sort_unstable();
    if have != want || d.replicas == order {
        // The replicas changed meanwhile (the next round decides again), or nothing to do.
        return Ok(MapChange::Unchanged);
    }
    d.replicas = order.to_vec();
    Ok(MapChange::Next(next))
}

fn mark_removed(map: &ClusterMap, node: u64) -> Result<MapChange, ApiError> {
    let mut next = map.clone();
    let mut changed = false;
    for n in &mut next.nodes {
        if n.node_id == node && n.state == NodeState::Draining as i32 {
            n.state = NodeState::Removed as i32;
            changed = true;
        }
    }
    if !changed {
        return Ok(MapChange::Unchanged);
    }
    if next.shards.iter().any(|d| d.places(node)) {
        return Err(ApiError::Unavailable(format!(
            "node {node} still holds replicas; the drain goes on"
        )));
    }
    Ok(MapChange::Next(next))
}

impl Node {
    /// Starts decommissioning `node` (on the meta leader): marks it draining; the placement
    /// driver does the rest.
    pub async fn remove_node(&self, node: u64) -> Result<ClusterMap, ApiError> {
        let map = self.change_map(|m| begin_removal(m, node)).await?;
        info!(node, "node draining: its replicas move to other nodes");
        Ok(map)
    }

    /// One round of the placement driver, when this node leads the meta group: one move off a
    /// draining node, the end of a drain, or a removed node's exit from the meta group. Returns
    /// whether it did anything.
    pub async fn drive_placement(&self) -> bool {
        let Some(meta) = self.group(META_SHARD) else {
            return false;
        };
        if meta.metrics().borrow_watched().state != ServerState::Leader {
            return false;
        }
        let Some(map) = self.map() else {
            return false;
        };
        // A move this node's predecessor as meta leader started and did not finish (it crashed
        // or lost the lead): finished first, from where it stood.
        if let Some(d) = map
            .shards
            .iter()
            .find(|d| d.learners.len() == 1 && d.moving_from != 0)
        {
            let (shard, from, to) = (d.shard_id, d.moving_from, d.learners[0]);
            let decision = Decision {
                kind: "move",
                shard,
                from,
                to,
                reason: "finishing a move in progress",
            };
            info!(shard, from, to, "placement: finishing a move in progress");
            return match self.move_replica(shard, from, to).await {
                Ok(_) => {
                    self.placement_log.record(decision, "done");
                    true
                }
                Err(e) => {
                    warn!(shard, from, to, error = %e, "placement: finishing the move failed; it is retried");
                    self.placement_log.record(decision, format!("failed: {e}"));
                    false
                }
            };
        }
        // Standbys: added on standby nodes, taken off nodes that are no longer up standbys
        // (a draining standby node loses them here, before its drain below ends).
        if let Some(change) = standby::next_change(&map) {
            let (kind, shard, from, to) = match change {
                standby::Change::Add { shard, node } => ("standby add", shard, 0, node),
                standby::Change::Remove { shard, node } => ("standby remove", shard, node, 0),
            };
            let decision = Decision {
                kind,
                shard,
                from,
                to,
                reason: "one standby per shard in each standby zone",
            };
            return match self.change_standby(change).await {
                Ok(()) => {
                    self.placement_log.record(decision, "done");
                    true
                }
                Err(e) => {
                    warn!(shard, from, to, error = %e, "placement: the standby change failed; it is decided again");
                    self.placement_log.record(decision, format!("failed: {e}"));
                    false
                }
            };
        }
        // One draining node at a time, the first in the map.
        let draining = map
            .nodes
            .iter()
            .find(|n| n.state == NodeState::Draining as i32)
            .map(|n| n.node_id);
        if let Some(node) = draining {
            let held = map
                .shards
                .iter()
                .find(|d| d.replicas.contains(&node) && d.learners.is_empty());
            if let Some(d) = held {
                let Some(target) = balance::drain_target(&map, d.shard_id, node) else {
                    warn!(
                        node,
                        shard = d.shard_id,
                        "no node can take this replica; the drain waits"
                    );
                    return false;
                };
                info!(
                    node,
                    shard = d.shard_id,
                    target,
                    "draining: moving a replica"
                );
                let decision = Decision {
                    kind: "drain",
                    shard: d.shard_id,
                    from: node,
                    to: target,
                    reason: "the node is being removed",
                };
                self.placement_log.record(decision, "started");
                match self.move_replica(d.shard_id, node, target).await {
                    Ok(_) => self.placement_log.record(decision, "done"),
                    Err(e) => {
                        warn!(node, shard = d.shard_id, target, error = %e, "draining: the move failed; it is retried");
                        self.placement_log.record(decision, format!("failed: {e}"));
                    }
                }
                return true;
            }
            if map.shards.iter().any(|d| d.places(node)) {
                // A move in progress (a learner listed): its next round finishes it; standbys
                // are taken away before (above).
                return false;
            }
            // Marked removed while still in the meta group, so that the node itself learns it
            // and stops handing out the map.
            let decision = Decision {
                kind: "remove",
                shard: 0,
                from: node,
                to: 0,
                reason: "the node holds no replica any more",
            };
            match self.change_map(|m| mark_removed(m, node)).await {
                Ok(_) => {
                    info!(node, "node removed: it holds no replica");
                    self.placement_log.record(decision, "done");
                }
                Err(e) => warn!(node, error = %e, "draining: marking the node removed failed"),
            }
            return true;
        }
        let membership = meta
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .clone();
        let removed_member = map
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Removed as i32)
            .map(|n| n.node_id)
            .find(|id| membership.get_node(id).is_some());
        if let Some(node) = removed_member {
            return match self.leave_meta_group(&map, node).await {
                Ok(_) => true,
                Err(e) => {
                    warn!(node, error = %e, "the meta group change failed; it is retried");
                    false
                }
            };
        }
        if !self.config.node.placement_balance {
            return false;
        }
        if let Some(mv) = balance::next_move(&map) {
            info!(
                shard = mv.shard,
                from = mv.from,
                to = mv.to,
                reason = mv.reason,
                "placement: moving a replica"
            );
            let decision = Decision {
                kind: "move",
                shard: mv.shard,
                from: mv.from,
                to: mv.to,
                reason: mv.reason,
            };
            self.placement_log.record(decision, "started");
            if let Err(e) = self.move_replica(mv.shard, mv.from, mv.to).await {
                warn!(shard = mv.shard, from = mv.from, to = mv.to, error = %e, "placement: the move failed; it is decided again");
                self.placement_log.record(decision, format!("failed: {e}"));
                return false;
            }
            self.placement_log.record(decision, "done");
            return true;
        }
        if let Some((shard, order)) = balance::next_preference(&map) {
            let changed = self.change_map(|m| prefer(m, shard, &order)).await;
            let decision = Decision {
                kind: "prefer",
                shard,
                from: 0,
                to: order[0],
                reason: "preferred leaders per node",
            };
            match changed {
                Ok(_) => {
                    info!(
                        shard,
                        preferred = order[0],
                        "placement: a new preferred leader"
                    );
                    self.placement_log.record(decision, "done");
                }
                Err(e) => {
                    warn!(shard, error = %e, "placement: changing the preferred leader failed");
                    return false;
                }
            }
            return true;
        }
        false
    }

    /// Takes `node` out of the meta group, giving its vote to an up node that has none.
    /// Ok(false) when this node handed its own meta leadership over first (the next leader
    /// carries on).
    async fn leave_meta_group(&self, map: &ClusterMap, node: u64) -> Result<bool, ApiError> {
        let meta = self
            .group(META_SHARD)
            .ok_or(ApiError::shard_not_found(META_SHARD))?;
        let metrics = meta.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let unavailable =
            |e: &dyn std::fmt::Display| ApiError::Unavailable(format!("meta group: {e}"));
        if voters.contains(&node) {
            if node == self.node_id() {
                let next = voters.iter().copied().find(|v| *v != node);
                if let Some(next) = next {
                    meta.trigger()
                        .transfer_leader(next)
                        .await
                        .map_err(|e| unavailable(&e))?;
                    return Ok(false);
                }
            }
            let replacement = map
                .nodes
                .iter()
                .filter(|n| {
                    n.state == NodeState::Up as i32 && !n.standby && !voters.contains(&n.node_id)
                })
                .map(|n| n.node_id)
                .min();
            let mut wanted = voters.clone();
            wanted.remove(&node);
            if let Some(r) = replacement {
                let address = meta::peer_address(map, r)
                    .ok_or_else(|| ApiError::ClusterState(format!("node {r} has no address")))?;
                tokio::time::timeout(
                    META_CATCH_UP,
                    meta.add_learner(r, BasicNode::new(address), true),
                )
                .await
                .map_err(|_| {
                    ApiError::Unavailable(format!("node {r} did not catch up with the meta group"))
                })?
                .map_err(|e| unavailable(&e))?;
                wanted.insert(r);
            }
            meta.change_membership(ChangeMembers::ReplaceAllVoters(wanted), false)
                .await
                .map_err(|e| unavailable(&e))?;
            info!(
                node,
                ?replacement,
                "the meta group's vote moved off the draining node"
            );
        } else if membership.get_node(&node).is_some() {
            meta.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([node])), false)
                .await
                .map_err(|e| unavailable(&e))?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use dossier_api::v1::NodeInfo;

    use super::*;

    fn map(zones: &[&str]) -> ClusterMap {
        let nodes: Vec<NodeInfo> = zones
            .iter()
            .enumerate()
            .map(|(i, z)| NodeInfo {
                node_id: i as u64 + 1,
                address: format!("10.0.0.{}:7000", i + 1),
                zone: (*z).into(),
                ..NodeInfo::default()
            })
            .collect();
        meta::plan(&nodes[..3], 6, 3).clone_with_nodes(nodes)
    }

    trait WithNodes {
        fn clone_with_nodes(self, nodes: Vec<NodeInfo>) -> ClusterMap;
    }

    impl WithNodes for ClusterMap {
        fn clone_with_nodes(mut self, nodes: Vec<NodeInfo>) -> ClusterMap {
            self.nodes = nodes;
            self
        }
    }

    #[test]
    fn targets_avoid_shared_zones_then_load() {
        // Nodes 1..3 hold every shard; 4 shares zone a with node 1, 5 is alone in zone d.
        let m = map(&["a", "b", "c", "a", "d"]);
        // Moving off node 2 (zone b): node 4 would put two replicas in zone a; node 5 does not.
        assert_eq!(balance::drain_target(&m, 1, 2), Some(5));
        // Moving off node 1 (zone a): zone a is free again, both 4 and 5 fit; equal load, lowest id.
        assert_eq!(balance::drain_target(&m, 1, 1), Some(4));
        // Without zones, the least loaded node wins.
        let mut m = map(&["", "", "", "", ""]);
        m.shards[1].replicas = vec![1, 2, 4];
        assert_eq!(
            balance::drain_target(&m, 1, 2),
            Some(5),
            "node 4 holds a replica already"
        );
        // Nodes not up take nothing.
        m.nodes[4].state = NodeState::Draining as i32;
        assert_eq!(balance::drain_target(&m, 1, 2), Some(4));
    }

    #[test]
    fn removal_keeps_enough_nodes() {
        let m = map(&["a", "b", "c"]);
        let e = begin_removal(&m, 2).err().expect("3 replicas need 3 nodes");
        assert!(e.to_string().contains("add a node first"), "{e}");
        let m = map(&["a", "b", "c", "d"]);
        let MapChange::Next(next) = begin_removal(&m, 2).unwrap() else {
            panic!("marks it draining");
        };
        assert_eq!(next.nodes[1].state, NodeState::Draining as i32);
        assert!(matches!(
            begin_removal(&next, 2).unwrap(),
            MapChange::Unchanged
        ));
        // Removed only once it holds nothing.
        assert!(mark_removed(&next, 2).is_err());
    }
}
