//! Sending side of the network: one tonic channel per peer node, shared by every group; each
//! message names its shard. Connections are lazy, connect with a short timeout, and every call has
//! a deadline, so a dead peer costs a bounded wait, never a hang.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dossier_api::raft::v1::raft_client::RaftClient;
use dossier_api::raft::v1::{RaftMessage, RaftReply};
use dossier_storage::ShardId;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::StreamAppendResult;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetworkFactory, RaftNetworkV2, Snapshot};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::append::{AppendStreamCounts, Carrier, Mux, REOPEN_AFTER, Session};
use crate::snapshot_send::{self, Outgoing, SendError, SnapshotCounts};
use crate::state_machine::SnapshotData;
use crate::types::{CommittedLeaderId, NodeId, TypeConfig, Vote, decode, encode};

/// How a peer is reached and how long the network may wait on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    pub connect_timeout: Duration,
    /// A snapshot transfer fails when the peer takes no chunk for this long (no deadline bounds
    /// the whole transfer: a large shard takes as long as the link needs).
    pub snapshot_idle_timeout: Duration,
    /// How long the peer may take, after the last chunk, to load the snapshot and answer.
    pub snapshot_install_timeout: Duration,
    /// Bytes per snapshot chunk.
    pub snapshot_chunk_bytes: usize,
    /// AppendEntries requests a replication session keeps unanswered (at least 1).
    pub append_pipeline_depth: usize,
    /// How long a replication session waits for an answer that is due before it fails
    /// (openraft's own budget, the heartbeat interval, if that is longer). Under load a
    /// follower's answer waits for its fsync and its turn on the CPU; a session failed early is
    /// started again from a probe, which only adds work. A follower that died breaks the stream
    /// at once; one that hangs costs this long.
    pub append_answer_timeout: Duration,
}

/// Numbers spool files, so that a transfer started while an abandoned one still writes its file
/// never shares it.
static SPOOL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Default of [`NetworkConfig::append_pipeline_depth`] (docs/benchmarks.md).
pub const APPEND_PIPELINE_DEPTH: usize = 4;

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            connect_timeout: Duration::from_millis(250),
            snapshot_idle_timeout: Duration::from_secs(30),
            snapshot_install_timeout: Duration::from_secs(900),
            snapshot_chunk_bytes: 1 << 20,
            append_pipeline_depth: APPEND_PIPELINE_DEPTH,
            append_answer_timeout: Duration::from_millis(500),
        }
    }
}

/// The header naming the cluster a Raft message is meant for (`node.cluster-name`).
pub const CLUSTER_HEADER: &str = "x-dossier-cluster";
/// The header naming the node id a Raft message is meant for.
pub const TO_HEADER: &str = "x-dossier-to";

/// Addresses a Raft request: the cluster and the node it is meant for. The receiver refuses it
/// if it is not that node (`misaddressed`): an address reused by another node or another cluster
/// (a replaced pod, a restarted test cluster) must not take a message meant for its predecessor.
pub(crate) fn address<T>(request: &mut tonic::Request<T>, cluster: &ClusterName, to: NodeId) {
    let metadata = request.metadata_mut();
    metadata.insert(CLUSTER_HEADER, cluster.clone());
    metadata.insert(TO_HEADER, to.into());
}

/// A cluster name as the header value every message carries (checked once).
pub(crate) type ClusterName = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// Why a Raft request that names another cluster or node than (`cluster`, `me`) is refused; a
/// request that names none (an older sender) is taken.
pub(crate) fn misaddressed<T>(
    request: &tonic::Request<T>,
    cluster: &str,
    me: NodeId,
) -> Option<tonic::Status> {
    let metadata = request.metadata();
    let header = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    if let Some(theirs) = header(CLUSTER_HEADER)
        && theirs != cluster
    {
        return Some(tonic::Status::failed_precondition(format!(
            "a Raft message for cluster {theirs:?} reached a node of cluster {cluster:?}"
        )));
    }
    if let Some(to) = header(TO_HEADER)
        && to.parse::<NodeId>() != Ok(me)
    {
        return Some(tonic::Status::failed_precondition(format!(
            "a Raft message for node {to} reached node {me}"
        )));
    }
    None
}

/// The node's connections to its peers, by address: one HTTP/2 channel per peer, and on it one
/// replication stream carrying every group's AppendEntries (`crate::append`).
#[derive(Debug)]
pub struct PeerPool {
    config: NetworkConfig,
    /// This node's cluster, named in every message it sends.
    cluster: ClusterName,
    /// TLS to peers (the cluster's CA, this node's certificate as its identity); None: plaintext.
    tls: RwLock<Option<ClientTlsConfig>>,
    channels: Mutex<HashMap<String, Channel>>,
    streams: Mutex<HashMap<String, Arc<Mux>>>,
    counts: Arc<AppendStreamCounts>,
    snapshots: SnapshotCounts,
}

impl PeerPool {
    /// Refuses a cluster name that cannot travel as a header value (printable ASCII).
    pub fn new(
        config: NetworkConfig,
        cluster: &str,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Arc<Self>, tonic::metadata::errors::InvalidMetadataValue> {
        Ok(Arc::new(PeerPool {
            config,
            cluster: cluster.parse()?,
            tls: RwLock::new(tls),
            channels: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            counts: Arc::default(),
            snapshots: SnapshotCounts::default(),
        }))
    }

    /// Calls peers with `tls` from now on (certificates reloaded): channels are made anew on
    /// next use; connections in use keep the settings they were made with.
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(tls);
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Snapshots sent and received by this node.
    pub fn snapshot_counts(&self) -> &SnapshotCounts {
        &self.snapshots
    }

    /// Replication streams and sessions of this node's leaders.
    pub fn append_counts(&self) -> &AppendStreamCounts {
        &self.counts
    }

    /// The open replication stream to `addr`, opened anew if there is none or it broke (at
    /// most once per [`REOPEN_AFTER`](crate::append::REOPEN_AFTER)).
    pub(crate) fn replication_stream(
        &self,
        addr: &str,
        to: NodeId,
    ) -> Result<Arc<Mux>, RPCError<TypeConfig>> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mux) = streams.get(addr) {
            match mux.closed_at() {
                None => return Ok(Arc::clone(mux)),
                Some(at) if at.elapsed() < REOPEN_AFTER => {
                    return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                        "replication stream to {addr} closed {:?} ago",
                        at.elapsed()
                    ))));
                }
                Some(_) => {}
            }
        }
        let channel = self
            .channel(addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mux = Mux::open(addr, channel, &self.cluster, to);
        self.counts
            .streams_opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        streams.insert(addr.to_owned(), Arc::clone(&mux));
        Ok(mux)
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// `message` as a request addressed to node `to` of this cluster (`address`), for the
    /// node-level calls of the Raft service (liveness pings, quiescence).
    pub fn addressed<T>(&self, message: T, to: NodeId) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        address(&mut request, &self.cluster, to);
        request
    }

    /// The channel to `addr` (host:port), created lazily on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = self
            .endpoint(addr)?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// An endpoint for `addr` (host:port) as this node reaches its peers: over TLS with its node
    /// certificate when the pool has one.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        let tls = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        match tls {
            Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls),
            None => Endpoint::from_shared(format!("http://{addr}")),
        }
    }
}

/// Builds the per-peer clients of one group.
#[derive(Debug, Clone)]
pub struct GroupNetwork {
    shard: ShardId,
    pool: Arc<PeerPool>,
    /// Where snapshots on their way to a peer are spooled.
    snapshot_dir: PathBuf,
}

impl GroupNetwork {
    pub fn new(shard: ShardId, pool: Arc<PeerPool>, snapshot_dir: PathBuf) -> Self {
        GroupNetwork {
            shard,
            pool,
            snapshot_dir,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerLink {
            shard: self.shard,
            target,
            addr: node.addr.clone(),
            pool: Arc::clone(&self.pool),
            snapshot_dir: self.snapshot_dir.clone(),
        }
    }
}

/// One group's link to one peer.
#[derive(Debug)]
pub struct PeerLink {
    shard: ShardId,
    target: NodeId,
    addr: String,
    pool: Arc<PeerPool>,
    snapshot_dir: PathBuf,
}

#[derive(Debug, Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    PreVote,
    TransferLeader,
}

fn status_error(status: &tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            RPCError::Unreachable(Unreachable::new(status))
        }
        _ => RPCError::Network(NetworkError::new(status)),
    }
}

fn reply<Resp: DeserializeOwned>(reply: RaftReply) -> Result<Resp, RPCError<TypeConfig>> {
    answer(&reply.payload, reply.error)
}

/// A peer's answer (a unary reply or an append stream's answer): the response, or the peer's
/// refusal.
pub(crate) fn answer<Resp: DeserializeOwned>(
    payload: &[u8],
    error: String,
) -> Result<Resp, RPCError<TypeConfig>> {
    if !error.is_empty() {
        // The peer is up but cannot serve this group (yet): back off like for an unreachable peer.
        return Err(RPCError::Unreachable(Unreachable::from_string(error)));
    }
    decode(payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

impl PeerLink {
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        let channel = self
            .pool
            .channel(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        Ok(RaftClient::new(channel))
    }

    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftMessage {
            shard_id: self.shard,
            payload,
        });
        request.set_timeout(option.hard_ttl());
        address(&mut request, &self.pool.cluster, self.target);
        let mut client = self.client()?;
        let result = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::PreVote => client.pre_vote(request).await,
            Rpc::TransferLeader => client.transfer_leader(request).await,
        };
        reply(result.map_err(|s| status_error(&s))?.into_inner())
    }
}

impl RaftNetworkV2<TypeConfig> for PeerLink {
    type SnapshotData = SnapshotData;

    /// A session on the replication stream to the peer, shared by every group
    /// (`crate::append`): up to `append_pipeline_depth` requests unanswered; an answer must come
    /// within `append_answer_timeout` while one is due, or the session fails (openraft then
    /// starts another, probing from the follower's last match). The stream is joined at the
    /// first request, after openraft's backoff.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures_util::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + openraft::OptionalSend
            + Unpin
            + 'static,
    {
        let pool = Arc::clone(&self.pool);
        let addr = self.addr.clone();
        let target = self.target;
        let open = move || {
            pool.replication_stream(&addr, target)
                .map(|mux| mux as Arc<dyn Carrier>)
        };
        let config = self.pool.config();
        let session = Session::start(
            &self.addr,
            open,
            self.shard,
            input,
            config.append_pipeline_depth,
            option.hard_ttl().max(config.append_answer_timeout),
            Arc::clone(&self.pool.counts),
        );
        Box::pin(async move {
            let answers: BoxStream<'s, _> = Box::pin(session.into_stream());
            Ok(answers)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::PreVote, &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::TransferLeader, &req, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<CommittedLeaderId, NodeId, BasicNode, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let network = |e: &dyn std::error::Error| {
            StreamingError::Network(NetworkError::from_string(e.to_string()))
        };
        let SnapshotData::View(view) = snapshot.snapshot else {
            return Err(StreamingError::Network(NetworkError::from_string(
                "only a view of the replica can be sent as a snapshot".to_owned(),
            )));
        };
        let header = encode(&(vote, snapshot.meta.clone())).map_err(|e| network(&e))?;
        let config = self.pool.config();
        let outgoing = Outgoing {
            shard: self.shard,
            header,
            view,
            spool: self.snapshot_dir.join(format!(
                "outgoing-to-{}-{}.partial",
                self.target,
                SPOOL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
            chunk_bytes: config.snapshot_chunk_bytes,
            idle_timeout: config.snapshot_idle_timeout,
            install_timeout: config.snapshot_install_timeout,
        };
        let client = self.client().map_err(|e| network(&e))?;
        let (cluster, target) = (self.pool.cluster.clone(), self.target);
        let sent = tokio::select! {
            sent = snapshot_send::send(
                outgoing,
                client,
                |request| address(request, &cluster, target),
                &self.pool.snapshots,
            ) => sent,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let sent = sent.map_err(|e| match e {
            SendError::Peer(status) => match status_error(&status) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                other => StreamingError::Network(NetworkError::new(&other)),
            },
            other => network(&other),
        })?;
        reply::<SnapshotResponse<TypeConfig>>(sent).map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::new(&other)),
        })
    }
}
