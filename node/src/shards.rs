//! Reads and conditional batches on any shard of the cluster, addressed by a routing key (a
//! patient id, or an index key such as `mpi:<system>|<value>`): the transport of the records
//! layer's protocols that span shards. Served locally when this node leads the shard, else
//! through the internal `dossier.raft.v1.ShardAccess` service of the leader, following leader
//! hints until the deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dossier_api::raft::v1::shard_access_client::ShardAccessClient;
use dossier_api::raft::v1::shard_access_server::ShardAccess;
use dossier_api::raft::v1::{
    ShardReadRequest, ShardReadResponse, ShardWriteRequest, ShardWriteResponse, StoredValue,
};
use dossier_api::v1::ErrorReason;
use dossier_storage::{Batch, Command, Outcome};
use tonic::{Request, Response, Status};

use dossier_records::kv::{self, BatchResult, Shards};

use crate::errors::ApiError;
use crate::node::Node;
use crate::record_store::to_storage;

/// `Shards` over the cluster.
#[derive(Debug, Clone)]
pub struct ClusterShards {
    node: Arc<Node>,
}

impl ClusterShards {
    pub fn new(node: Arc<Node>) -> Self {
        ClusterShards { node }
    }

    async fn local_read(
        node: &Node,
        shard: u64,
        keys: &[Bytes],
        deadline: Duration,
    ) -> Result<Vec<Option<Bytes>>, ApiError> {
        node.read_barrier(shard, deadline).await?;
        let replica = node
            .replica(shard)
            .ok_or(ApiError::shard_not_found(shard))?;
        if keys.iter().any(|k| !replica.owns(k)) {
            return Err(ApiError::Unavailable(format!(
                "shard {shard} split and no longer holds a key of this read; the cluster map is \
                 being updated: refresh it and retry"
            )));
        }
        keys.iter()
            .map(|k| {
                replica
                    .get(k)
                    .map_err(|e| ApiError::Unavailable(format!("read the state store: {e}")))
            })
            .collect()
    }

    async fn local_write(
        node: &Node,
        shard: u64,
        batch: Batch,
        deadline: Duration,
    ) -> Result<(BatchResult, u64), ApiError> {
        batch
            .check_limits(&node.config.state)
            .map_err(|e| ApiError::invalid("batch", e.to_string()))?;
        let (outcome, index) = node
            .write(
                shard,
                Command::Txn {
                    session: None,
                    batch,
                },
                deadline,
            )
            .await?;
        match outcome {
            Outcome::Applied | Outcome::Done => Ok((BatchResult::Applied, index)),
            Outcome::ConditionFailed { index: failed } => Ok((BatchResult::Failed(failed), index)),
            Outcome::StaleSequence { .. }
            | Outcome::SessionExpired
            | Outcome::Replayed { .. }
            | Outcome::OutOfRange => Err(ApiError::Internal(format!(
                "a sessionless batch got outcome {outcome:?} (a split's refusal is an error of \
                 Node::write)"
            ))),
        }
    }

    /// Runs `op` on the leader of `group`: here when this node leads it, else on the node the
    /// local replica or the last answer names, else on each candidate in turn; until the
    /// deadline.
    async fn call(
        &self,
        group: Group<'_>,
        op: &ShardOp,
        deadline: Duration,
    ) -> Result<ShardAnswer, ApiError> {
        let started = Instant::now();
        let mut hint: Option<u64> = None;
        let mut rotate = 0usize;
        let mut backoff = Duration::from_millis(10);
        let mut last = String::new();
        loop {
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(ApiError::Unavailable(format!(
                    "no leader of the shard answered in time (last: {last})"
                )));
            }
            let (shard, candidates) = match group {
                Group::Of(route_key) => {
                    let d = self.node.route(dossier_api::patient_hash(route_key))?;
                    (d.shard_id, d.replicas)
                }
                // Any node of the map may hold a meta replica; one without answers
                // SHARD_NOT_FOUND and the next is tried.
                Group::Meta => {
                    let map = self
                        .node
                        .map()
                        .ok_or_else(|| ApiError::Unavailable("no cluster map yet".into()))?;
                    let nodes: Vec<u64> = map.nodes.iter().map(|n| n.node_id).collect();
                    (crate::meta::META_SHARD, nodes)
                }
            };
            let Some(&fallback) = candidates.get(rotate % candidates.len().max(1)) else {
                return Err(ApiError::ClusterState(format!(
                    "shard {shard} has no replica"
                )));
            };
            let target = hint
                .or_else(|| self.node.known_leader(shard))
                .filter(|t| candidates.contains(t) && rotate == 0)
                .unwrap_or(fallback);
            let result = if target == self.node.node_id() {
                match op {
                    ShardOp::Read(keys) => Self::local_read(&self.node, shard, keys, remaining)
                        .await
                        .map(ShardAnswer::Values),
                    ShardOp::Write(batch, _) => {
                        Self::local_write(&self.node, shard, batch.clone(), remaining)
                            .await
                            .map(|(r, _)| ShardAnswer::Batch(r))
                    }
                }
            } else {
                let addr = self
                    .node
                    .map()
                    .and_then(|m| crate::meta::peer_address(&m, target).map(str::to_owned))
                    .ok_or_else(|| {
                        ApiError::ClusterState(format!("node {target} is not in the map"))
                    })?;
                let channel = self.node.peer_channel(&addr)?;
                match tokio::time::timeout(remaining, remote(channel, shard, op, remaining)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(status)) => Err(from_status(&status)),
                    Err(_) => Err(ApiError::Deadline),
                }
            };
            match result {
                Ok(v) => return Ok(v),
                Err(ApiError::NotLeader { leader, .. }) => {
                    last = format!("node {target} is not the leader");
                    match leader {
                        Some((id, _)) if id != target => {
                            hint = Some(id);
                            rotate = 0;
                        }
                        _ => {
                            hint = None;
                            rotate += 1;
                        }
                    }
                }
                Err(
                    e @ (ApiError::Unavailable(_)
                    | ApiError::Deadline
                    | ApiError::ResourceExhausted { .. }
                    | ApiError::ShardNotFound { .. }
                    | ApiError::StaleEpoch { .. }),
                ) => {
                    last = e.to_string();
                    hint = None;
                    rotate += 1;
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(backoff.min(deadline.saturating_sub(started.elapsed()))).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }
}

impl ClusterShards {
    /// Writes `batch` (no conditions) to the meta group, through its leader wherever it is.
    pub async fn write_meta(&self, batch: kv::Batch, deadline: Duration) -> Result<(), ApiError> {
        let batch = to_storage(batch);
        let encoded = postcard::to_allocvec(&batch)
            .map_err(|e| ApiError::Internal(format!("encode a batch: {e}")))?;
        match self
            .call(Group::Meta, &ShardOp::Write(batch, encoded), deadline)
            .await?
        {
            ShardAnswer::Batch(BatchResult::Applied) => Ok(()),
            ShardAnswer::Batch(BatchResult::Failed(_)) => Err(ApiError::Internal(
                "an unconditional meta batch was refused".into(),
            )),
            ShardAnswer::Values(_) => Err(ApiError::Internal("a write answered as a read".into())),
        }
    }
}

/// The group a `ClusterShards::call` goes to.
#[derive(Debug, Clone, Copy)]
enum Group<'a> {
    /// The shard holding a routing key (a patient id or an identifier's `mpi:` key).
    Of(&'a str),
    /// The meta group.
    Meta,
}

/// What `ClusterShards::call` runs.
enum ShardOp {
    Read(Vec<Bytes>),
    /// The batch, and its encoding for a remote leader.
    Write(Batch, Vec<u8>),
}

enum ShardAnswer {
    Values(Vec<Option<Bytes>>),
    Batch(BatchResult),
}

async fn remote(
    channel: tonic::transport::Channel,
    shard: u64,
    op: &ShardOp,
    timeout: Duration,
) -> Result<ShardAnswer, Status> {
    let mut client = ShardAccessClient::new(channel);
    match op {
        ShardOp::Read(keys) => {
            let mut request = Request::new(ShardReadRequest {
                shard_id: shard,
                keys: keys.iter().map(|k| k.to_vec()).collect(),
            });
            request.set_timeout(timeout);
            let response = client.read(request).await?.into_inner();
            Ok(ShardAnswer::Values(
                response
                    .values
                    .into_iter()
                    .map(|v| v.found.then(|| Bytes::from(v.value)))
                    .collect(),
            ))
        }
        ShardOp::Write(_, encoded) => {
            let mut request = Request::new(ShardWriteRequest {
                shard_id: shard,
                batch: encoded.clone(),
            });
            request.set_timeout(timeout);
            let r = client.write(request).await?.into_inner();
            Ok(ShardAnswer::Batch(if r.applied {
                BatchResult::Applied
            } else {
                BatchResult::Failed(r.failed_condition)
            }))
        }
    }
}

/// The node-side error a peer's status stands for (its `ErrorDetail`), or Unavailable.
pub(crate) fn from_status(status: &Status) -> ApiError {
    let detail = dossier_api::error_detail(status.details());
    let reason = detail
        .as_ref()
        .and_then(|d| ErrorReason::try_from(d.reason).ok())
        .unwrap_or(ErrorReason::Unspecified);
    let message = status.message().to_owned();
    match (reason, detail) {
        (ErrorReason::NotLeader, Some(d)) => ApiError::NotLeader {
            shard: 0,
            leader: (d.leader_hint_node_id != 0)
                .then_some((d.leader_hint_node_id, d.leader_hint_address)),
        },
        (ErrorReason::InvalidArgument, Some(d)) => ApiError::InvalidArgument {
            field: d.field,
            message,
            limit: (d.limit != 0).then_some(d.limit),
        },
        (ErrorReason::Internal, _) => ApiError::Internal(message),
        (ErrorReason::Deadline, _) => ApiError::Deadline,
        _ => ApiError::Unavailable(format!("{:?}: {message}", status.code())),
    }
}

impl Shards for ClusterShards {
    type Error = ApiError;

    fn deadline_passed(&self) -> ApiError {
        ApiError::Deadline
    }

    async fn read(
        &self,
        route_key: &str,
        keys: Vec<Bytes>,
        deadline: Duration,
    ) -> Result<Vec<Option<Bytes>>, ApiError> {
        match self
            .call(Group::Of(route_key), &ShardOp::Read(keys), deadline)
            .await?
        {
            ShardAnswer::Values(v) => Ok(v),
            ShardAnswer::Batch(_) => Err(ApiError::Internal("a read answered as a write".into())),
        }
    }

    async fn write(
        &self,
        route_key: &str,
        batch: kv::Batch,
        deadline: Duration,
    ) -> Result<BatchResult, ApiError> {
        let batch = to_storage(batch);
        let encoded = postcard::to_allocvec(&batch)
            .map_err(|e| ApiError::Internal(format!("encode a batch: {e}")))?;
        match self
            .call(
                Group::Of(route_key),
                &ShardOp::Write(batch, encoded),
                deadline,
            )
            .await?
        {
            ShardAnswer::Batch(r) => Ok(r),
            ShardAnswer::Values(_) => Err(ApiError::Internal("a write answered as a read".into())),
        }
    }
}

/// The internal `ShardAccess` service: the receiving side of `ClusterShards`.
#[derive(Debug, Clone)]
pub struct ShardAccessService {
    node: Arc<Node>,
}

impl ShardAccessService {
    pub fn new(node: Arc<Node>) -> Self {
        ShardAccessService { node }
    }
}

fn deadline_of<T>(request: &Request<T>, node: &Node) -> Duration {
    crate::service::deadline_of(request, node.config.request_deadline())
}

#[tonic::async_trait]
impl ShardAccess for ShardAccessService {
    async fn change_replicas(
        &self,
        request: Request<dossier_api::raft::v1::ChangeReplicasRequest>,
    ) -> Result<Response<dossier_api::raft::v1::ChangeReplicasResponse>, Status> {
        let voters = self.node.change_replicas_here(request.get_ref()).await?;
        Ok(Response::new(
            dossier_api::raft::v1::ChangeReplicasResponse { voters },
        ))
    }

    async fn split(
        &self,
        request: Request<dossier_api::raft::v1::SplitRequest>,
    ) -> Result<Response<dossier_api::raft::v1::SplitResponse>, Status> {
        Ok(Response::new(
            self.node.split_here(request.get_ref()).await?,
        ))
    }

    async fn read(
        &self,
        request: Request<ShardReadRequest>,
    ) -> Result<Response<ShardReadResponse>, Status> {
        let deadline = deadline_of(&request, &self.node);
        let r = request.into_inner();
        let keys: Vec<Bytes> = r.keys.into_iter().map(Bytes::from).collect();
        let values = ClusterShards::local_read(&self.node, r.shard_id, &keys, deadline).await?;
        Ok(Response::new(ShardReadResponse {
            values: values
                .into_iter()
                .map(|v| StoredValue {
                    found: v.is_some(),
                    value: v.map(|b| b.to_vec()).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn write(
        &self,
        request: Request<ShardWriteRequest>,
    ) -> Result<Response<ShardWriteResponse>, Status> {
        let deadline = deadline_of(&request, &self.node);
        let r = request.into_inner();
        let batch: Batch = postcard::from_bytes(&r.batch).map_err(|e| {
            Status::from(ApiError::invalid("batch", format!("does not decode: {e}")))
        })?;
        let (result, index) =
            ClusterShards::local_write(&self.node, r.shard_id, batch, deadline).await?;
        Ok(Response::new(match result {
            BatchResult::Applied => ShardWriteResponse {
                applied: true,
                failed_condition: 0,
                index,
            },
            BatchResult::Failed(c) => ShardWriteResponse {
                applied: false,
                failed_condition: c,
                index,
            },
        }))
    }
}
