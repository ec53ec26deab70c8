//! Receiving side of the network: the `dossier.raft.v1.Raft` gRPC service, dispatching each
//! message to the local replica of its shard.

use std::sync::Arc;

use dossier_api::raft::v1::raft_server::Raft as RaftService;
use dossier_api::raft::v1::{AppendAnswer, AppendFrame, RaftMessage, RaftReply, SnapshotChunk};
use dossier_storage::{ShardId, SnapshotReceiver};
use openraft::Snapshot;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::Serialize;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::group::Raft;
use crate::state_machine::SnapshotData;
use crate::types::{NodeId, SnapshotMeta, TypeConfig, Vote, decode, encode};
use crate::vote_hold::VoteHold;

/// A snapshot stream that brings no chunk for this long is given up (its partial file removed).
const SNAPSHOT_CHUNK_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Finds the local replica of a shard.
pub trait GroupRegistry: Send + Sync + 'static {
    fn raft(&self, shard: ShardId) -> Option<Raft>;
    /// Where a snapshot for `shard` being received is written.
    fn incoming_snapshot_path(&self, shard: ShardId) -> Option<std::path::PathBuf>;
    /// The largest snapshot accepted, in bytes.
    fn snapshot_bytes_max(&self) -> u64;
    /// This node's cluster name and id: messages addressed to another are refused.
    fn identity(&self) -> (&str, NodeId);
    /// Set when the process started: Vote and PreVote are refused while it lasts.
    fn vote_hold(&self) -> VoteHold;
}

/// The internal Raft service of a node.
#[derive(Debug)]
pub struct RaftServer<R> {
    registry: Arc<R>,
    stopping: watch::Receiver<bool>,
}

impl<R> RaftServer<R> {
    /// `stopping` turns true when the node stops serving: the long-lived replication streams
    /// then end, so that the server's graceful shutdown does not wait on them.
    pub fn new(registry: Arc<R>, stopping: watch::Receiver<bool>) -> Self {
        RaftServer { registry, stopping }
    }
}

/// The answers of one replication stream.
type AppendAnswers =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<AppendAnswer, Status>> + Send>>;

fn ok<T: Serialize>(value: &T) -> Result<Response<RaftReply>, Status> {
    let payload = encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftReply {
        payload,
        error: String::new(),
    }))
}

fn refused(error: impl ToString) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(RaftReply {
        payload: Vec::new(),
        error: error.to_string(),
    }))
}

impl<R: GroupRegistry> RaftServer<R> {
    /// Refuses a request meant for another cluster or node (`network::address`).
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let (cluster, me) = self.registry.identity();
        match crate::network::misaddressed(request, cluster, me) {
            Some(refusal) => Err(refusal),
            None => Ok(()),
        }
    }

    /// The refusal of a vote while this process's vote hold lasts (`crate::vote_hold`); the
    /// candidate counts it as no vote.
    fn vote_held(&self) -> Option<Result<Response<RaftReply>, Status>> {
        let left = self.registry.vote_hold().remaining()?;
        Some(refused(format!(
            "vote held for {left:?} more: this node started less than a leader lease ago and may \
             have acknowledged a leader whose lease still runs"
        )))
    }

    fn group(&self, shard: ShardId) -> Result<Raft, String> {
        self.registry
            .raft(shard)
            .ok_or_else(|| format!("no replica of shard {shard} on this node"))
    }
}

macro_rules! dispatch {
    ($self:ident, $request:ident, $ty:ty, $method:ident) => {{
        $self.check(&$request)?;
        let message: RaftMessage = $request.into_inner();
        let raft = match $self.group(message.shard_id) {
            Ok(raft) => raft,
            Err(e) => return refused(e),
        };
        let rpc: $ty =
            decode(&message.payload).map_err(|e| Status::invalid_argument(e.to_string()))?;
        match raft.$method(rpc).await {
            Ok(response) => ok(&response),
            Err(e) => refused(e),
        }
    }};
}

#[tonic::async_trait]
impl<R: GroupRegistry> RaftService for RaftServer<R> {
    type ReplicateStream = AppendAnswers;

    async fn replicate(
        &self,
        request: Request<Streaming<AppendFrame>>,
    ) -> Result<Response<AppendAnswers>, Status> {
        self.check(&request)?;
        let answers = crate::append::serve(
            Arc::clone(&self.registry),
            request.into_inner(),
            self.stopping.clone(),
        );
        Ok(Response::new(Box::pin(answers)))
    }

    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftReply>, Status> {
        dispatch!(
            self,
            request,
            AppendEntriesRequest<TypeConfig>,
            append_entries
        )
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
        if let Some(refusal) = self.vote_held() {
            return refusal;
        }
        dispatch!(self, request, VoteRequest<TypeConfig>, vote)
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
        if let Some(refusal) = self.vote_held() {
            return refusal;
        }
        dispatch!(self, request, VoteRequest<TypeConfig>, pre_vote)
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftReply>, Status> {
        dispatch!(
            self,
            request,
            TransferLeaderRequest<TypeConfig>,
            handle_transfer_leader
        )
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        self.check(&request)?;
        let mut chunks = request.into_inner();
        let first = chunks
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let raft = match self.group(first.shard_id) {
            Ok(raft) => raft,
            Err(e) => return refused(e),
        };
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.header)
            .map_err(|e| Status::invalid_argument(format!("snapshot header: {e}")))?;
        let Some(path) = self.registry.incoming_snapshot_path(first.shard_id) else {
            return refused(format!(
                "no replica of shard {} on this node",
                first.shard_id
            ));
        };
        let bytes_max = self.registry.snapshot_bytes_max();
        let internal = |e: dossier_storage::Error| Status::internal(e.to_string());
        // Dropped on any early return: the partial file goes with it.
        let mut receiver = SnapshotReceiver::create(&path, bytes_max).map_err(internal)?;
        let shard = first.shard_id;
        let mut offset = 0u64;
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            if c.shard_id != shard {
                return Err(Status::invalid_argument(
                    "snapshot chunks name different shards",
                ));
            }
            receiver.write_chunk(offset, &c.data).map_err(internal)?;
            offset += c.data.len() as u64;
            // No deadline bounds the whole stream; a sender that goes quiet is given up on.
            chunk = match tokio::time::timeout(SNAPSHOT_CHUNK_IDLE, chunks.next()).await {
                Ok(next) => next.transpose()?,
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "no snapshot chunk for {SNAPSHOT_CHUNK_IDLE:?} after {} bytes",
                        receiver.received()
                    )));
                }
            };
        }
        let path = receiver.finish().map_err(internal)?;
        let installed = raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: SnapshotData::Received(path.clone()),
                },
            )
            .await;
        // Installed files are removed by the state machine; one refused before it got there
        // (a stale vote, a stopping group) is removed here.
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "failed to remove a received snapshot");
        }
        match installed {
            Ok(response) => ok(&response),
            Err(e) => refused(e),
        }
    }
}
