//! Receiving side of the network: the `dossier.raft.v1.Raft` gRPC service, dispatching each
//! message to the local replica of its shard.

use std::sync::Arc;

use dossier_api::raft::v1::raft_server::Raft as RaftService;
use dossier_api::raft::v1::{RaftMessage, RaftReply, SnapshotChunk};
use dossier_storage::{ShardId, SnapshotReceiver};
use openraft::Snapshot;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::group::Raft;
use crate::state_machine::SnapshotFile;
use crate::types::{SnapshotMeta, TypeConfig, Vote, decode, encode};

/// Finds the local replica of a shard.
pub trait GroupRegistry: Send + Sync + 'static {
    fn raft(&self, shard: ShardId) -> Option<Raft>;
    /// Where a snapshot for `shard` being received is written.
    fn incoming_snapshot_path(&self, shard: ShardId) -> Option<std::path::PathBuf>;
    /// The largest snapshot accepted, in bytes.
    fn snapshot_bytes_max(&self) -> u64;
}

/// The internal Raft service of a node.
#[derive(Debug)]
pub struct RaftServer<R> {
    registry: Arc<R>,
}

impl<R> RaftServer<R> {
    pub fn new(registry: Arc<R>) -> Self {
        RaftServer { registry }
    }
}

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
    fn group(&self, shard: ShardId) -> Result<Raft, String> {
        self.registry
            .raft(shard)
            .ok_or_else(|| format!("no replica of shard {shard} on this node"))
    }
}

macro_rules! dispatch {
    ($self:ident, $request:ident, $ty:ty, $method:ident) => {{
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

/// The replies of an append stream.
type AppendReplies =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<RaftReply, Status>> + Send>>;

/// Feeds a stream's requests (from `first` on) to the replica in order and answers each. A
/// message that does not decode, names another shard or breaks the transport ends the input,
/// and with it the replies.
///
/// A task owns the replica's handle while it pumps the answers: openraft's answer stream
/// borrows the handle, so it cannot be returned beside it.
fn append_replies(
    raft: Raft,
    shard: ShardId,
    first: RaftMessage,
    messages: Streaming<RaftMessage>,
) -> impl futures_util::Stream<Item = Result<RaftReply, Status>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(APPEND_REPLIES_QUEUED);
    let requests = futures_util::stream::unfold(
        (Some(first), messages),
        move |(pending, mut messages)| async move {
            let message = match pending {
                Some(m) => m,
                None => messages.next().await?.ok()?,
            };
            if message.shard_id != shard {
                tracing::warn!(
                    shard,
                    other = message.shard_id,
                    "append stream changed shard"
                );
                return None;
            }
            match decode::<AppendEntriesRequest<TypeConfig>>(&message.payload) {
                Ok(rpc) => Some((rpc, (None, messages))),
                Err(e) => {
                    tracing::warn!(shard, error = %e, "undecodable append request");
                    None
                }
            }
        },
    );
    tokio::spawn(async move {
        let answers = raft.stream_append(requests);
        futures_util::pin_mut!(answers);
        while let Some(result) = answers.next().await {
            let reply = match result {
                Ok(appended) => encode(&appended)
                    .map(|payload| RaftReply {
                        payload,
                        error: String::new(),
                    })
                    .map_err(|e| Status::internal(e.to_string())),
                Err(fatal) => Ok(RaftReply {
                    payload: Vec::new(),
                    error: fatal.to_string(),
                }),
            };
            if tx.send(reply).await.is_err() {
                // The leader closed the stream.
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Answers of one append stream waiting for the transport.
const APPEND_REPLIES_QUEUED: usize = 64;

#[tonic::async_trait]
impl<R: GroupRegistry> RaftService for RaftServer<R> {
    type AppendStreamStream = AppendReplies;

    async fn append_stream(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<AppendReplies>, Status> {
        // Answered at once: the leader may have nothing to send until its group changes.
        let registry = Arc::clone(&self.registry);
        let mut messages = request.into_inner();
        let replies = futures_util::stream::once(async move {
            let first = match messages.next().await {
                None => return Box::pin(tokio_stream::empty()) as AppendReplies,
                Some(Err(status)) => return Box::pin(tokio_stream::once(Err(status))),
                Some(Ok(first)) => first,
            };
            let shard = first.shard_id;
            let Some(raft) = registry.raft(shard) else {
                let refusal = RaftReply {
                    payload: Vec::new(),
                    error: format!("no replica of shard {shard} on this node"),
                };
                return Box::pin(tokio_stream::once(Ok(refusal)));
            };
            Box::pin(append_replies(raft, shard, first, messages)) as AppendReplies
        });
        let replies = futures_util::StreamExt::flatten(replies);
        Ok(Response::new(Box::pin(replies)))
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
        dispatch!(self, request, VoteRequest<TypeConfig>, vote)
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
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
            chunk = chunks.next().await.transpose()?;
        }
        let path = receiver.finish().map_err(internal)?;
        match raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: SnapshotFile { path },
                },
            )
            .await
        {
            Ok(response) => ok(&response),
            Err(e) => refused(e),
        }
    }
}
