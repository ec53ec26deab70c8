//! Cluster membership: nodes joining a running cluster.
//!
//! The cluster map is the one authority on which nodes exist; it changes only through the meta
//! group, each change a compare-and-set of the whole map (`version` + 1), so that concurrent
//! changes are serialised and none is lost. A node that joins becomes a learner of the meta
//! group: it holds the map without a vote, and it hosts no replica until one is placed on it.

use std::time::Duration;

use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::{
    ClusterMap, ErrorReason, JoinClusterRequest, NodeInfo, NodeState, NodeStatusRequest,
    ShardDescriptor,
};
use dossier_raft::openraft::BasicNode;
use dossier_raft::openraft::async_runtime::WatchReceiver;
use dossier_storage::{Batch, Command, Condition, Expect, Op, Outcome};
use prost::Message;
use tracing::{info, warn};

use crate::errors::ApiError;
use crate::meta::{self, META_SHARD};
use crate::node::Node;

/// Attempts of one map change lost to concurrent changes before it gives up (retryable).
const MAP_CHANGE_ATTEMPTS: usize = 8;
/// Deadline of each step of a map change (barrier, write).
const MAP_STEP_DEADLINE: Duration = Duration::from_secs(5);
/// For a node to tell its peer endpoint at init.
const PEER_ADDRESS_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two rounds of join requests.
const JOIN_RETRY: Duration = Duration::from_millis(500);

/// What a map change decides from the current map: nothing to do, or the next map.
pub(crate) enum MapChange {
    Unchanged,
    Next(ClusterMap),
}

/// The descriptor of `shard` in `map`; an unknown shard is the caller's error.
pub(crate) fn descriptor(map: &ClusterMap, shard: u64) -> Result<&ShardDescriptor, ApiError> {
    map.shards
        .iter()
        .find(|d| d.shard_id == shard)
        .ok_or_else(|| ApiError::invalid("shard_id", format!("shard {shard} is not in the map")))
}

/// Adds `node` to `map`, or leaves it when it is already there at the same address.
pub(crate) fn add_node(map: &ClusterMap, node: &NodeInfo) -> Result<MapChange, ApiError> {
    if node.node_id == 0 {
        return Err(ApiError::invalid("node.node_id", "must not be 0"));
    }
    if node.address.is_empty() {
        return Err(ApiError::invalid("node.address", "must be host:port"));
    }
    if node.zone.len() > 64 || !node.zone.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "node.zone",
            "must be at most 64 printable ASCII characters without spaces",
        ));
    }
    if let Some(known) = map.nodes.iter().find(|n| n.node_id == node.node_id) {
        if known.state == NodeState::Removed as i32 {
            return Err(ApiError::invalid(
                "node.node_id",
                format!(
                    "node {} was removed from the cluster; a node that comes back needs a new id and an empty data directory",
                    node.node_id
                ),
            ));
        }
        if known.address != node.address || known.peer_address != node.peer_address {
            return Err(ApiError::invalid(
                "node.node_id",
                format!(
                    "node {} is already in the cluster at {} (peer endpoint {}); a new node needs a new id, and a node's addresses are fixed when it joins",
                    node.node_id,
                    known.address,
                    meta::peer_of(known)
                ),
            ));
        }
        return Ok(MapChange::Unchanged);
    }
    if let Some(other) = map.nodes.iter().find(|n| n.address == node.address) {
        return Err(ApiError::invalid(
            "node.address",
            format!("{} is node {}'s address", node.address, other.node_id),
        ));
    }
    let mut next = map.clone();
    next.nodes.push(NodeInfo {
        node_id: node.node_id,
        address: node.address.clone(),
        zone: node.zone.clone(),
        standby: node.standby,
        peer_address: node.peer_address.clone(),
        ..NodeInfo::default()
    });
    Ok(MapChange::Next(next))
}

impl Node {
    /// The nodes of an init request, each with its peer endpoint: as given, this node's own, or
    /// as the node reports it (NodeStatus on its client address). Every node must answer: the
    /// meta group's members are recorded with the endpoint their peers dial.
    pub(crate) async fn learn_peer_addresses(
        &self,
        mut nodes: Vec<NodeInfo>,
    ) -> Result<Vec<NodeInfo>, ApiError> {
        for n in nodes.iter_mut().filter(|n| n.peer_address.is_empty()) {
            if n.node_id == self.node_id() {
                n.peer_address = self.config.own_peer_address();
                continue;
            }
            let channel = self.peer_channel(&n.address)?;
            let mut request = tonic::Request::new(NodeStatusRequest { count_keys: false });
            request.set_timeout(PEER_ADDRESS_TIMEOUT);
            let status = AdminClient::new(channel)
                .node_status(request)
                .await
                .map_err(|s| {
                    ApiError::Unavailable(format!(
                        "node {} at {} did not say where its peers reach it (start every node before init): {}",
                        n.node_id,
                        n.address,
                        s.message()
                    ))
                })?
                .into_inner();
            if status.node_id != n.node_id {
                return Err(ApiError::invalid(
                    "nodes",
                    format!(
                        "{} is node {}, not node {}",
                        n.address, status.node_id, n.node_id
                    ),
                ));
            }
            if status.peer_address != n.address {
                n.peer_address = status.peer_address;
            }
        }
        Ok(nodes)
    }

    /// Changes the map on the meta leader: `change` decides from the current map, and the
    /// result is written only if the map is still the one it decided on (else it decides again).
    pub(crate) async fn change_map(
        &self,
        change: impl Fn(&ClusterMap) -> Result<MapChange, ApiError>,
    ) -> Result<ClusterMap, ApiError> {
        for _ in 0..MAP_CHANGE_ATTEMPTS {
            // Leader of the meta group, and the local replica has applied every committed change.
            self.read_barrier(META_SHARD, MAP_STEP_DEADLINE).await?;
            let replica = self
                .replica(META_SHARD)
                .ok_or(ApiError::shard_not_found(META_SHARD))?;
            let bytes = replica
                .get(meta::MAP_KEY)
                .map_err(|e| ApiError::Internal(format!("read the cluster map: {e}")))?
                .ok_or_else(|| ApiError::ClusterState("the cluster is not initialised".into()))?;
            let current = ClusterMap::decode(bytes.as_ref())
                .map_err(|e| ApiError::Internal(format!("the cluster map does not decode: {e}")))?;
            let mut next = match change(&current)? {
                MapChange::Unchanged => return Ok(current),
                MapChange::Next(next) => next,
            };
            next.version = current.version + 1;
            let batch = Batch {
                conditions: vec![Condition {
                    key: meta::MAP_KEY.into(),
                    expect: Expect::Equals(bytes),
                }],
                ops: vec![Op::Put {
                    key: meta::MAP_KEY.into(),
                    value: meta::encode(&next).into(),
                }],
            };
            let command = Command::Txn {
                session: None,
                batch,
            };
            match self.write(META_SHARD, command, MAP_STEP_DEADLINE).await?.0 {
                Outcome::Applied => {
                    self.reconcile()
                        .await
                        .map_err(|e| ApiError::Unavailable(format!("{e:#}")))?;
                    return Ok(next);
                }
                // Another change committed in between: decide again on the new map.
                Outcome::ConditionFailed { .. } => continue,
                other => {
                    return Err(ApiError::Internal(format!(
                        "a map change was answered {other:?}"
                    )));
                }
            }
        }
        Err(ApiError::Unavailable(
            "the cluster map kept changing under this change; retry".into(),
        ))
    }

    /// Adds a node to the cluster (on the meta leader): into the map, then into the meta group
    /// as a learner so that it holds the map.
    pub async fn join_node(&self, node: NodeInfo, cluster: &str) -> Result<ClusterMap, ApiError> {
        if cluster != self.config.node.cluster_name {
            return Err(ApiError::invalid(
                "cluster_name",
                format!(
                    "this is cluster {:?}, not {cluster:?}: a node joins only the cluster it is configured for",
                    self.config.node.cluster_name
                ),
            ));
        }
        let map = self.change_map(|map| add_node(map, &node)).await?;
        let meta = self
            .group(META_SHARD)
            .ok_or(ApiError::shard_not_found(META_SHARD))?;
        let membership = meta.metrics().borrow_watched().membership_config.clone();
        if membership.membership().get_node(&node.node_id).is_none() {
            meta.add_learner(node.node_id, BasicNode::new(meta::peer_of(&node)), false)
                .await
                .map_err(|e| match e.forward_to_leader() {
                    Some(_) => ApiError::Unavailable(
                        "the meta group's leadership moved during the join; retry".into(),
                    ),
                    None => ApiError::Unavailable(format!(
                        "add node {} to the meta group: {e}",
                        node.node_id
                    )),
                })?;
            info!(node = node.node_id, address = %node.address, zone = %node.zone, "node joined the cluster");
        }
        Ok(map)
    }

    /// On a node started with `join`: asks the seeds (following leader hints) to add this node,
    /// until its meta replica holds the cluster (it became a learner and received the map).
    pub async fn join_through(&self, seeds: &[String]) {
        let me = NodeInfo {
            node_id: self.node_id(),
            address: self.config.advertise.clone(),
            zone: self.config.node.zone.clone(),
            standby: self.config.node.standby,
            peer_address: self.config.own_peer_address(),
            ..NodeInfo::default()
        };
        let mut announced = false;
        loop {
            if self.refresh_map().is_some() {
                info!("joined: this node holds the cluster map");
                return;
            }
            if self.is_stopping() {
                return;
            }
            if !announced {
                let mut targets: Vec<String> = seeds.to_vec();
                let mut tried = 0;
                while let Some(target) = targets.pop() {
                    tried += 1;
                    if tried > 16 {
                        break;
                    }
                    match join_request(&self.ctx.pool, &target, &me, &self.config.node.cluster_name)
                        .await
                    {
                        Ok(()) => {
                            announced = true;
                            break;
                        }
                        Err(JoinAnswer::Leader(address)) => targets.push(address),
                        Err(JoinAnswer::Refused(why)) => {
                            warn!(%target, error = %why, "the cluster refused this node; fix the configuration and restart");
                            return;
                        }
                        Err(JoinAnswer::Retry(why)) => {
                            warn!(%target, error = %why, "join request failed; retrying");
                        }
                    }
                }
            }
            tokio::time::sleep(JOIN_RETRY).await;
            // Joined but the map has not arrived: ask again after a while (idempotent).
            if announced && self.refresh_map().is_none() {
                announced = false;
                tokio::time::sleep(JOIN_RETRY * 4).await;
            }
        }
    }
}

enum JoinAnswer {
    Leader(String),
    Refused(String),
    Retry(String),
}

async fn join_request(
    pool: &dossier_raft::PeerPool,
    target: &str,
    me: &NodeInfo,
    cluster: &str,
) -> Result<(), JoinAnswer> {
    let channel = pool
        .endpoint(target)
        .map_err(|e| JoinAnswer::Refused(format!("seed {target:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| JoinAnswer::Retry(format!("connect: {e}")))?;
    let mut request = tonic::Request::new(JoinClusterRequest {
        node: Some(me.clone()),
        cluster_name: cluster.to_owned(),
    });
    request.set_timeout(Duration::from_secs(15));
    match AdminClient::new(channel).join_cluster(request).await {
        Ok(_) => Ok(()),
        Err(status) => match dossier_api::error_detail(status.details()) {
            Some(d)
                if d.reason == ErrorReason::NotLeader as i32
                    && !d.leader_hint_address.is_empty() =>
            {
                Err(JoinAnswer::Leader(d.leader_hint_address))
            }
            Some(d) if d.reason == ErrorReason::InvalidArgument as i32 => {
                Err(JoinAnswer::Refused(d.message))
            }
            _ => Err(JoinAnswer::Retry(status.message().to_owned())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ClusterMap {
        meta::plan(
            &(1..=3)
                .map(|i| NodeInfo {
                    node_id: i,
                    address: format!("10.0.0.{i}:7000"),
                    ..NodeInfo::default()
                })
                .collect::<Vec<_>>(),
            4,
            3,
        )
    }

    fn node(id: u64, address: &str, zone: &str) -> NodeInfo {
        NodeInfo {
            node_id: id,
            address: address.into(),
            zone: zone.into(),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn a_new_node_is_added_once_and_conflicts_are_refused() {
        let m = map();
        let MapChange::Next(next) = add_node(&m, &node(4, "10.0.0.4:7000", "dc-b")).unwrap() else {
            panic!("a new node changes the map");
        };
        assert_eq!(next.nodes.len(), 4);
        assert_eq!(next.nodes[3].zone, "dc-b");
        assert_eq!(next.shards, m.shards, "joining places no replica");
        // The same again: nothing to do.
        assert!(matches!(
            add_node(&next, &node(4, "10.0.0.4:7000", "dc-b")).unwrap(),
            MapChange::Unchanged
        ));
        // A known id at another address, or a known address under another id: refused.
        for bad in [
            node(4, "10.0.0.9:7000", ""),
            node(5, "10.0.0.4:7000", ""),
            node(0, "x:1", ""),
        ] {
            assert!(
                matches!(add_node(&next, &bad), Err(ApiError::InvalidArgument { .. })),
                "{bad:?}"
            );
        }
        assert!(add_node(&next, &node(6, "10.0.0.6:7000", "dc b")).is_err());
    }
}
