//! The public `dossier.v1.Admin` service: cluster map, init, per-node shard status, drain.

use std::sync::Arc;
use std::time::Duration;

use dossier_api::v1::admin_server::Admin;
use dossier_api::v1::{
    ClusterMap, ClusterMapRequest, DrainRequest, DrainResponse, InitClusterRequest,
    InitClusterResponse, JoinClusterRequest, JoinClusterResponse, ListBreakGlassRequest,
    ListBreakGlassResponse, MoveReplicaRequest, MoveReplicaResponse, NodeState, NodeStatusRequest,
    NodeStatusResponse, PlacementRequest, PlacementResponse, RemoveNodeRequest, RemoveNodeResponse,
    ShardStatus, SplitShardRequest, SplitShardResponse,
};
use dossier_raft::openraft::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};

use crate::access::{self, Need};
use crate::audit_batch::AuditBatcher;
use crate::errors::ApiError;
use crate::node::Node;

#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<Node>,
    /// The node's read audit journal, whose backlog the node's status reports.
    audits: AuditBatcher,
}

impl AdminService {
    pub fn new(node: Arc<Node>, audits: AuditBatcher) -> Self {
        AdminService { node, audits }
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_cluster_map(
        &self,
        request: Request<ClusterMapRequest>,
    ) -> Result<Response<ClusterMap>, Status> {
        access::decide(&request, Need::Map, None)?;
        let map = self
            .node
            .map()
            .ok_or_else(|| ApiError::ClusterState("the cluster is not initialised".into()))?;
        let me = self.node.node_id();
        if map
            .nodes
            .iter()
            .any(|n| n.node_id == me && n.state == NodeState::Removed as i32)
        {
            // Its copy of the map stops changing once it leaves the meta group.
            return Err(ApiError::Unavailable(format!(
                "node {me} is removed from the cluster; ask another node"
            ))
            .into());
        }
        Ok(Response::new(map))
    }

    async fn init_cluster(
        &self,
        request: Request<InitClusterRequest>,
    ) -> Result<Response<InitClusterResponse>, Status> {
        access::decide(&request, Need::ClusterChange, None)?;
        let r = request.into_inner();
        let map = self
            .node
            .init_cluster(r.nodes, r.shards, r.replicas)
            .await?;
        Ok(Response::new(InitClusterResponse { map: Some(map) }))
    }

    async fn join_cluster(
        &self,
        request: Request<JoinClusterRequest>,
    ) -> Result<Response<JoinClusterResponse>, Status> {
        access::decide(&request, Need::ClusterChange, None)?;
        let request = request.into_inner();
        let node = request
            .node
            .ok_or_else(|| ApiError::invalid("node", "is required"))?;
        let map = self.node.join_node(node, &request.cluster_name).await?;
        Ok(Response::new(JoinClusterResponse { map: Some(map) }))
    }

    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        access::decide(&request, Need::ClusterChange, None)?;
        let r = request.into_inner();
        let shard = self
            .node
            .move_replica(r.shard_id, r.from_node, r.to_node)
            .await?;
        Ok(Response::new(MoveReplicaResponse { shard: Some(shard) }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        access::decide(&request, Need::ClusterChange, None)?;
        let map = self.node.remove_node(request.into_inner().node_id).await?;
        Ok(Response::new(RemoveNodeResponse { map: Some(map) }))
    }

    async fn get_placement(
        &self,
        request: Request<PlacementRequest>,
    ) -> Result<Response<PlacementResponse>, Status> {
        access::decide(&request, Need::ClusterStatus, None)?;
        let meta_leader =
            self.node.known_leader(crate::meta::META_SHARD) == Some(self.node.node_id());
        Ok(Response::new(PlacementResponse {
            decisions: self.node.placement_log.decisions(),
            balancing: self.node.config.node.placement_balance,
            meta_leader,
        }))
    }

    async fn list_break_glass(
        &self,
        request: Request<ListBreakGlassRequest>,
    ) -> Result<Response<ListBreakGlassResponse>, Status> {
        access::decide(&request, Need::BreakGlassReview, None)?;
        let deadline = crate::service::deadline_of(&request, self.node.config.request_deadline());
        let r = request.into_inner();
        let limit = match r.limit {
            0 => crate::break_glass::LIST_MAX,
            n => (n as usize).min(crate::break_glass::LIST_MAX),
        };
        let meta = self.node.replica(crate::meta::META_SHARD).ok_or_else(|| {
            ApiError::ClusterState(
                "this node holds no replica of the meta group: ask a node that does".into(),
            )
        })?;
        self.node
            .read_barrier(crate::meta::META_SHARD, deadline)
            .await?;
        let (accesses, more) = crate::break_glass::list(&meta, r.since_micros, limit)?;
        Ok(Response::new(ListBreakGlassResponse { accesses, more }))
    }

    async fn split_shard(
        &self,
        request: Request<SplitShardRequest>,
    ) -> Result<Response<SplitShardResponse>, Status> {
        access::decide(&request, Need::ClusterChange, None)?;
        let r = request.into_inner();
        let (left, right) = self.node.split_shard(r.shard_id, r.at).await?;
        Ok(Response::new(SplitShardResponse {
            left: Some(left),
            right: Some(right),
        }))
    }

    async fn node_status(
        &self,
        request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        access::decide(&request, Need::ClusterStatus, None)?;
        let count_keys = request.into_inner().count_keys;
        let node_id = self.node.node_id();
        let mut shards = Vec::new();
        for (shard, raft) in self.node.groups() {
            let m = raft.metrics().borrow_watched().clone();
            // Counting is a scan of the shard's tree: only when asked, off the async runtime.
            let counted = match self.node.replica(shard).filter(|_| count_keys) {
                Some(replica) => tokio::task::spawn_blocking(move || replica.key_count())
                    .await
                    .map_err(|e| Status::internal(format!("count keys of shard {shard}: {e}")))?
                    .map(Some),
                None => Ok(None),
            };
            let keys = match counted {
                Ok(keys) => keys.unwrap_or(0) as u64,
                Err(e) => {
                    return Err(Status::internal(format!(
                        "count keys of shard {shard}: {e}"
                    )));
                }
            };
            shards.push(ShardStatus {
                shard_id: shard,
                node_id,
                leader_id: m.current_leader.unwrap_or(0),
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                commit_index: m.local_committed.map_or(0, |l| l.index),
                applied_index: m.last_applied.map_or(0, |l| l.index),
                snapshot_index: m.snapshot.map_or(0, |l| l.index),
                purged_index: m.purged.map_or(0, |l| l.index),
                role: format!("{:?}", m.state).to_lowercase(),
                keys,
                quiescent: self
                    .node
                    .quiet_group(shard)
                    .is_some_and(|(_, q)| q.leader().is_some()),
            });
        }
        let data = &self.node.config.node.data_dir;
        Ok(Response::new(NodeStatusResponse {
            node_id,
            shards,
            state_bytes_on_disk: dir_bytes(&data.join("state")),
            log_bytes_on_disk: dir_bytes(&data.join("log")),
            peer_address: self.node.config.peer_advertise.clone(),
            audit_backlog: Some(self.audits.unmoved()),
        }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        access::decide(&request, Need::ClusterChange, None)?;
        let (transferred, remaining) = self.node.drain(Duration::from_secs(5)).await;
        Ok(Response::new(DrainResponse {
            transferred,
            remaining,
        }))
    }
}
