//! Receiving side of the network: the `dossier.raft.v1.Raft` gRPC service, dispatching each
//! message to the local replica of its shard.

use std::sync::Arc;

use dossier_api::raft::v1::raft_server::Raft as RaftService;
use dossier_api::raft::v1::{
    AppendAnswer, AppendFrame, PingReply, PingRequest, QuiesceReply, QuiesceRequest, RaftMessage,
    RaftReply, SnapshotChunk,
};
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
    /// Where received snapshots are counted, if anywhere.
    fn snapshot_counts(&self) -> Option<&crate::SnapshotCounts> {
        None
    }
    /// A message that needs the replica's timers arrived for `shard`: entries to append, a vote
    /// or pre-vote, a snapshot, a leadership transfer (heartbeats do not count). A quiescent
    /// replica wakes up.
    fn active(&self, _shard: ShardId) {}
    /// Why a pre-vote for `shard` is refused beyond what Raft decides, if it is: a quiescent
    /// follower keeps its lease on a leader whose node still answers pings.
    fn pre_vote_refusal(&self, _shard: ShardId, _candidate: NodeId) -> Option<String> {
        None
    }
    /// A liveness ping from `from` (process `incarnation`); answers this process's incarnation.
    fn ping(&self, _from: NodeId, _incarnation: u64) -> u64 {
        0
    }
    /// A leader's request that the local replica quiesce; the refusal says why not.
    fn quiesce(&self, _request: &QuiesceRequest) -> Result<(), String> {
        Err("quiescence is off on this node".to_owned())
    }
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

    /// A Vote or PreVote request for the local replica, or the refusal to answer it: during the
    /// process's vote hold, or while the replica has no state at all and the candidate's group
    /// has had a leader (`stateless_refusal`).
    #[allow(clippy::type_complexity)]
    fn vote_request(
        &self,
        request: Request<RaftMessage>,
        pre_vote: bool,
    ) -> Result<Result<(Raft, VoteRequest<TypeConfig>), Result<Response<RaftReply>, Status>>, Status>
    {
        self.check(&request)?;
        if let Some(refusal) = self.vote_held() {
            return Ok(Err(refusal));
        }
        let message = request.into_inner();
        let raft = match self.group(message.shard_id) {
            Ok(raft) => raft,
            Err(e) => return Ok(Err(refused(e))),
        };
        let rpc: VoteRequest<TypeConfig> =
            decode(&message.payload).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if pre_vote
            && let Some(refusal) = self
                .registry
                .pre_vote_refusal(message.shard_id, rpc.vote.leader_id().voted_for)
        {
            self.registry.active(message.shard_id);
            return Ok(Err(refused(refusal)));
        }
        self.registry.active(message.shard_id);
        if self.registry.vote_hold().stateless_window_open()
            && let Some(refusal) = stateless_refusal(&raft, &rpc)
        {
            return Ok(Err(refused(refusal)));
        }
        Ok(Ok((raft, rpc)))
    }

    fn group(&self, shard: ShardId) -> Result<Raft, String> {
        self.registry
            .raft(shard)
            .ok_or_else(|| format!("no replica of shard {shard} on this node"))
    }
}

/// Why a replica with no state at all (no entry, no purge point, no snapshot) does not vote for
/// a candidate whose group has had a leader (its last log index is above the initial membership
/// entry's 0). Such a replica is a new one or one whose disk was replaced: in the second case it
/// may have voted in a term still running, or been part of the majority that committed entries
/// it no longer holds, and a vote now could elect a second leader in a term or one missing those
/// entries. A group that never had a leader has committed nothing, so its first elections go
/// ahead (cluster initialisation). The rule holds for `STATELESS_VOTE_WINDOW` after the process
/// started (a live leader reaches a rebuilt replica well within it): a new group whose first
/// leader failed before it replicated anything can then still elect another. Limits: a replica
/// that received part of its state votes normally, and after the window so does an empty one.
fn stateless_refusal(raft: &Raft, rpc: &VoteRequest<TypeConfig>) -> Option<String> {
    use openraft::async_runtime::WatchReceiver;
    let metrics = raft.metrics().borrow_watched().clone();
    let stateless =
        metrics.last_log_index.is_none() && metrics.purged.is_none() && metrics.snapshot.is_none();
    let led_before = rpc.last_log_id.as_ref().is_some_and(|l| l.index > 0);
    (stateless && led_before).then(|| {
        "this replica holds no state (a new replica, or a replaced disk): it votes once a leader \
         has brought it up to date"
            .to_owned()
    })
}

macro_rules! dispatch {
    ($self:ident, $request:ident, $ty:ty, $method:ident, $active:expr) => {{
        $self.check(&$request)?;
        let message: RaftMessage = $request.into_inner();
        let raft = match $self.group(message.shard_id) {
            Ok(raft) => raft,
            Err(e) => return refused(e),
        };
        let rpc: $ty =
            decode(&message.payload).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let active: fn(&$ty) -> bool = $active;
        if active(&rpc) {
            $self.registry.active(message.shard_id);
        }
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
            append_entries,
            |rpc| !rpc.entries.is_empty()
        )
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
        let (raft, rpc) = match self.vote_request(request, false)? {
            Ok(ready) => ready,
            Err(refusal) => return refusal,
        };
        match raft.vote(rpc).await {
            Ok(response) => ok(&response),
            Err(e) => refused(e),
        }
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
        let (raft, rpc) = match self.vote_request(request, true)? {
            Ok(ready) => ready,
            Err(refusal) => return refusal,
        };
        match raft.pre_vote(rpc).await {
            Ok(response) => ok(&response),
            Err(e) => refused(e),
        }
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftReply>, Status> {
        dispatch!(
            self,
            request,
            TransferLeaderRequest<TypeConfig>,
            handle_transfer_leader,
            |_| true
        )
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        self.check(&request)?;
        let mut chunks = request.into_inner();
        let first = tokio::time::timeout(SNAPSHOT_CHUNK_IDLE, chunks.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("no snapshot chunk for {SNAPSHOT_CHUNK_IDLE:?}"))
            })?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let raft = match self.group(first.shard_id) {
            Ok(raft) => raft,
            Err(e) => return refused(e),
        };
        self.registry.active(first.shard_id);
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
        let started = std::time::Instant::now();
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
        if installed.is_ok()
            && let Some(counts) = self.registry.snapshot_counts()
        {
            counts.record_received(offset, started.elapsed());
        }
        match installed {
            Ok(response) => ok(&response),
            Err(e) => refused(e),
        }
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        self.check(&request)?;
        let r = request.into_inner();
        Ok(Response::new(PingReply {
            incarnation: self.registry.ping(r.from_node, r.incarnation),
        }))
    }

    async fn quiesce(
        &self,
        request: Request<QuiesceRequest>,
    ) -> Result<Response<QuiesceReply>, Status> {
        self.check(&request)?;
        let answer = match self.registry.quiesce(request.get_ref()) {
            Ok(()) => QuiesceReply {
                quiet: true,
                refusal: String::new(),
            },
            Err(refusal) => QuiesceReply {
                quiet: false,
                refusal,
            },
        };
        Ok(Response::new(answer))
    }
}

/// A registry for tests of the service: node 2 of cluster "test", with at most one replica (of
/// shard 7).
#[cfg(test)]
pub(crate) mod test_registry {
    use super::GroupRegistry;
    use crate::vote_hold::VoteHold;
    use crate::{NodeId, Raft};

    pub(crate) struct Registry {
        pub(crate) raft: Option<Raft>,
        pub(crate) hold: VoteHold,
    }

    impl GroupRegistry for Registry {
        fn raft(&self, shard: u64) -> Option<Raft> {
            self.raft.clone().filter(|_| shard == 7)
        }
        fn incoming_snapshot_path(&self, _shard: u64) -> Option<std::path::PathBuf> {
            None
        }
        fn snapshot_bytes_max(&self) -> u64 {
            0
        }
        fn identity(&self) -> (&str, NodeId) {
            ("test", 2)
        }
        fn vote_hold(&self) -> VoteHold {
            self.hold
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use dossier_api::raft::v1::RaftMessage;
    use dossier_api::raft::v1::raft_server::Raft as RaftService;
    use dossier_storage::{LogConfig, LogEngine, StateStore, StoreConfig};
    use openraft::raft::VoteRequest;

    use super::RaftServer;
    use super::test_registry::Registry;
    use crate::types::{LogId, TypeConfig, Vote, encode};
    use crate::vote_hold::VoteHold;
    use crate::{GroupNetwork, LogStore, NetworkConfig, PeerPool, Raft, StateMachine};

    /// A replica with no state refuses a candidate whose group has had a leader (a replaced disk
    /// may have voted in that term, or lost entries it helped commit), and answers the first
    /// elections of a group that never had one (cluster initialisation). Once the stateless
    /// window since the process started has passed, it answers both (a new group whose first
    /// leader died before replicating anything must still elect one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stateless_replica_votes_only_in_a_group_that_never_had_a_leader() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(
            LogEngine::open(
                LogConfig {
                    dir: dir.path().join("log"),
                    ..LogConfig::default()
                }
                .validate()
                .unwrap(),
            )
            .unwrap(),
        );
        let store = Arc::new(
            StateStore::open(
                StoreConfig {
                    dir: dir.path().join("state"),
                    ..StoreConfig::default()
                }
                .validate()
                .unwrap(),
            )
            .unwrap(),
        );
        let sm = StateMachine::open(store, 7, dir.path().join("snapshots")).unwrap();
        let pool = PeerPool::new(NetworkConfig::default(), "test", None).unwrap();
        let config = openraft::Config {
            enable_elect: false,
            ..Default::default()
        };
        let raft = Raft::new(
            2,
            Arc::new(config.validate().unwrap()),
            GroupNetwork::new(7, pool, dir.path().join("snapshots")),
            LogStore::new(engine, 7, 8 << 20),
            sm,
        )
        .await
        .unwrap();
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let server = RaftServer::new(
            Arc::new(Registry {
                raft: Some(raft.clone()),
                hold: VoteHold::none(),
            }),
            stopping.clone(),
        );
        let ask = |last_index: u64| {
            let vote = VoteRequest::<TypeConfig>::new(
                Vote::new(5, 1),
                Some(LogId::new(
                    crate::types::CommittedLeaderId::new(4),
                    last_index,
                )),
            );
            let mut request = tonic::Request::new(RaftMessage {
                shard_id: 7,
                payload: encode(&vote).unwrap(),
            });
            crate::network::address(&mut request, &"test".parse().unwrap(), 2);
            request
        };
        for pre in [false, true] {
            let answer = if pre {
                server.pre_vote(ask(400)).await
            } else {
                server.vote(ask(400)).await
            };
            let error = answer.unwrap().into_inner().error;
            assert!(error.contains("holds no state"), "{error}");
        }
        let answer = tokio::time::timeout(Duration::from_secs(5), server.vote(ask(0)))
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        assert!(answer.error.is_empty(), "{}", answer.error);
        let later = RaftServer::new(
            Arc::new(Registry {
                raft: Some(raft),
                hold: VoteHold::started_ago(
                    crate::vote_hold::STATELESS_VOTE_WINDOW + Duration::from_secs(1),
                ),
            }),
            stopping,
        );
        let answer = tokio::time::timeout(Duration::from_secs(5), later.pre_vote(ask(400)))
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        assert!(answer.error.is_empty(), "{}", answer.error);
    }
}
