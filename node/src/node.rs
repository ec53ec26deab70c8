//! `Node`: the groups a node hosts, its view of the cluster map, and the operations the services
//! need (write through Raft, linearizable read barrier, init, drain).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_api::v1::{ClusterMap, ShardDescriptor};
use dossier_raft::openraft::async_runtime::WatchReceiver;
use dossier_raft::openraft::{BasicNode, ServerState};
use dossier_raft::{GroupContext, GroupRegistry, NetworkConfig, PeerPool, Raft, Request, VoteHold};
use dossier_storage::{Command, LogEngine, Outcome, ShardHandle, ShardId, StateStore};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::Config;
use crate::errors::ApiError;
use crate::meta::{self, META_SHARD};
use crate::metrics::Metrics;
use crate::propose::Proposer;
use crate::quiesce::Quiet;

/// Writes waiting for one group's proposal task; a writer beyond it waits, within its deadline.
const PROPOSALS_QUEUED_MAX: usize = 1024;
/// How long a node waits for its replica of a shard's parent to apply the split that builds the
/// shard's replica here, before it starts the replica empty (filled by the shard's leader).
const SPLIT_CHILD_WAIT: Duration = Duration::from_secs(30);
/// Proposals handed to Raft at once (below `raft.entries-per-append-max`, so that one batch
/// travels in one AppendEntries).
const PROPOSALS_PER_BATCH_MAX: usize = 256;
/// Bytes of proposals handed to a group's Raft at once (a larger single proposal goes alone).
const PROPOSAL_BATCH_BYTES_MAX: usize = 8 << 20;

/// One Dossier server process.
#[derive(Debug)]
pub struct Node {
    pub config: Arc<Config>,
    pub(crate) ctx: GroupContext,
    /// Every group started here, with its proposal queue and its quiescence.
    groups: RwLock<HashMap<ShardId, Hosted>>,
    map: RwLock<Option<ClusterMap>>,
    pub in_flight: Arc<Semaphore>,
    pub metrics: Metrics,
    stopping: AtomicBool,
    incoming_seq: AtomicU64,
    /// What the log compactor did (`compactor.rs`).
    pub compactions: crate::compactor::CompactionCounts,
    /// Leaderships held here, for handing them back to preferred replicas (`leadership.rs`).
    pub(crate) leader_balance: crate::leadership::LeaderBalance,
    /// Shards made by a split whose replica here waits for the parent's split (since when).
    split_waits: Mutex<HashMap<ShardId, Instant>>,
    /// Placement decisions made or asked for here (`placement_log.rs`).
    pub(crate) placement_log: crate::placement_log::PlacementLog,
    /// Which peer nodes answer pings (`liveness.rs`), for quiescent groups.
    pub(crate) liveness: crate::liveness::Liveness,
}

/// A group started here.
#[derive(Debug, Clone)]
struct Hosted {
    raft: Raft,
    proposer: Proposer,
    quiet: Arc<Quiet>,
}

pub(crate) fn leader_of(raft: &Raft) -> Option<u64> {
    raft.metrics().borrow_watched().current_leader
}

impl Node {
    /// Opens the storage, starts the meta group and every replica already on disk.
    pub async fn start(config: Arc<Config>) -> Result<Arc<Node>> {
        std::fs::create_dir_all(&config.node.data_dir)
            .with_context(|| format!("create data directory {}", config.node.data_dir.display()))?;
        let engine = Arc::new(LogEngine::open(Arc::clone(&config.log)).context("open the log")?);
        let store = Arc::new(
            StateStore::open_with_route(
                Arc::clone(&config.state),
                Some(dossier_records::keys::route_hash),
            )
            .context("open the state store")?,
        );
        let pool = PeerPool::new(
            NetworkConfig::default(),
            &config.node.cluster_name,
            config.tls.as_ref().map(|t| t.client()),
        )
        .context("node.cluster-name")?;
        let vote_hold = VoteHold::at_start(&config.raft, &engine);
        if let Some(hold) = vote_hold.remaining() {
            info!(
                hold_ms = hold.as_millis() as u64,
                "restarted: votes held for one leader lease"
            );
        }
        let ctx = GroupContext {
            node_id: config.node.node_id,
            config: Arc::clone(&config.raft),
            engine,
            store,
            pool,
            snapshot_root: config.snapshot_root(),
            vote_hold,
            append_bytes_max: config.node.raft.append_bytes_max as usize,
        };
        let node = Arc::new(Node {
            in_flight: Arc::new(Semaphore::new(config.node.limits.in_flight_max)),
            metrics: Metrics::new(),
            config,
            ctx,
            groups: RwLock::new(HashMap::new()),
            map: RwLock::new(None),
            stopping: AtomicBool::new(false),
            incoming_seq: AtomicU64::new(0),
            compactions: crate::compactor::CompactionCounts::default(),
            leader_balance: crate::leadership::LeaderBalance::default(),
            split_waits: Mutex::new(HashMap::new()),
            placement_log: crate::placement_log::PlacementLog::default(),
            liveness: crate::liveness::Liveness::new(),
        });
        // The meta group first, then every replica this node held before a restart: they resume
        // at once, before the map is read.
        node.ensure_group(META_SHARD).await?;
        for shard in node.ctx.store.shards() {
            node.ensure_group(shard).await?;
        }
        node.refresh_map();
        Ok(node)
    }

    /// Replication streams and sessions of this node's leaders.
    pub fn append_counts(&self) -> &dossier_raft::AppendStreamCounts {
        self.ctx.pool.append_counts()
    }

    /// Calls peers with `tls` from now on (certificates reloaded).
    pub fn set_peer_tls(&self, tls: tonic::transport::ClientTlsConfig) {
        self.ctx.pool.set_tls(tls);
    }

    /// The shared channel to a peer node (internal services).
    pub fn peer_channel(&self, addr: &str) -> Result<tonic::transport::Channel, ApiError> {
        self.ctx
            .pool
            .channel(addr)
            .map_err(|e| ApiError::Unavailable(format!("connect to {addr}: {e}")))
    }

    /// The leader of `shard` as the local replica knows it, if this node hosts one.
    pub fn known_leader(&self, shard: ShardId) -> Option<u64> {
        self.group(shard).and_then(|raft| leader_of(&raft))
    }

    pub fn node_id(&self) -> u64 {
        self.config.node.node_id
    }

    pub fn store(&self) -> &StateStore {
        &self.ctx.store
    }

    pub fn engine(&self) -> &LogEngine {
        &self.ctx.engine
    }

    /// Snapshots sent and received by this node.
    pub fn snapshot_counts(&self) -> &dossier_raft::SnapshotCounts {
        self.ctx.pool.snapshot_counts()
    }

    pub fn group(&self, shard: ShardId) -> Option<Raft> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .map(|h| h.raft.clone())
    }

    /// Whether `shard`'s group here may be quiescent: the check every write, read and incoming
    /// append makes first, without cloning anything.
    pub(crate) fn may_be_quiet(&self, shard: ShardId) -> bool {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .is_some_and(|h| h.quiet.may_be())
    }

    /// A group started here, with its quiescence.
    pub(crate) fn quiet_group(&self, shard: ShardId) -> Option<(Raft, Arc<Quiet>)> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .map(|h| (h.raft.clone(), Arc::clone(&h.quiet)))
    }

    /// Every group started here with its quiescence, by shard.
    pub(crate) fn quiet_groups(&self) -> Vec<(ShardId, Raft, Arc<Quiet>)> {
        let mut all: Vec<_> = self
            .groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, h)| (*s, h.raft.clone(), Arc::clone(&h.quiet)))
            .collect();
        all.sort_unstable_by_key(|(s, _, _)| *s);
        all
    }

    fn proposer(&self, shard: ShardId) -> Option<Proposer> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .map(|h| h.proposer.clone())
    }

    pub fn groups(&self) -> Vec<(ShardId, Raft)> {
        let mut all: Vec<_> = self
            .groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, h)| (*s, h.raft.clone()))
            .collect();
        all.sort_unstable_by_key(|(s, _)| *s);
        all
    }

    pub fn replica(&self, shard: ShardId) -> Option<ShardHandle> {
        self.ctx.store.shard(shard)
    }

    async fn ensure_group(&self, shard: ShardId) -> Result<Raft> {
        if let Some(raft) = self.group(shard) {
            return Ok(raft);
        }
        let raft = self
            .ctx
            .start(shard)
            .await
            .with_context(|| format!("start group {shard}"))?;
        let mut groups = self.groups.write().unwrap_or_else(|e| e.into_inner());
        // Another task may have started it meanwhile; keep the first.
        let hosted = groups.entry(shard).or_insert_with(|| {
            let proposer = Proposer::start(
                raft.clone(),
                PROPOSALS_QUEUED_MAX,
                PROPOSALS_PER_BATCH_MAX,
                PROPOSAL_BATCH_BYTES_MAX,
                self.metrics.proposals_per_batch.clone(),
            );
            Hosted {
                raft,
                proposer,
                quiet: Arc::default(),
            }
        });
        Ok(hosted.raft.clone())
    }

    /// The cluster map as this node last read it from its meta replica.
    pub fn map(&self) -> Option<ClusterMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn refresh_map(&self) -> Option<ClusterMap> {
        let meta = self.replica(META_SHARD)?;
        match meta::read_map(&meta) {
            Ok(map) => {
                *self.map.write().unwrap_or_else(|e| e.into_inner()) = map.clone();
                map
            }
            Err(e) => {
                warn!(error = %e, "the cluster map does not decode");
                None
            }
        }
    }

    /// Starts the replicas the map assigns to this node (voters, learners and standbys); the first replica
    /// of a shard initialises its group. Drops the replicas of shards whose descriptor no longer
    /// lists this node (a move took them away: the map changes only after the voters did).
    /// Called periodically; cheap when nothing changed.
    pub async fn reconcile(&self) -> Result<()> {
        let Some(map) = self.refresh_map() else {
            return Ok(());
        };
        let me = self.node_id();
        for (shard, _) in self.groups() {
            let placed_elsewhere = map
                .shards
                .iter()
                .any(|d| d.shard_id == shard && !d.places(me));
            if shard != META_SHARD && placed_elsewhere {
                self.drop_replica(shard).await?;
            }
        }
        // Replicas a split built here before the map lists them: their groups start at once, so
        // that the new shard elects its leader while the old one still answers for its keys.
        // A split this node applied for a shard the map places elsewhere (this replica of the
        // parent joined after the split and replayed it) built a state that is dropped.
        for shard in self.ctx.store.shards() {
            if shard == META_SHARD || self.group(shard).is_some() {
                continue;
            }
            match map.shards.iter().find(|d| d.shard_id == shard) {
                None => {
                    self.ensure_group(shard).await?;
                }
                Some(d) if !d.places(me) => {
                    self.drop_replica(shard).await?;
                }
                Some(_) => {}
            }
        }
        for d in &map.shards {
            if d.learners.contains(&me) {
                // An empty replica that the shard's leader fills as a learner.
                self.ensure_group(d.shard_id).await?;
                continue;
            }
            let standby = d.standbys.contains(&me);
            if !d.replicas.contains(&me) && !standby {
                continue;
            }
            if d.split_from != 0 && !self.split_child_ready(d) {
                continue;
            }
            let raft = self.ensure_group(d.shard_id).await?;
            if standby {
                // A learner the shard's leader fills; it never initialises the group.
                continue;
            }
            // Only shards made by `cluster init` start from nothing; a split's shard starts from
            // the state its split built, and a moved replica from its leader's.
            if d.epoch <= 1
                && d.split_from == 0
                && d.replicas.first() == Some(&me)
                && !seen_initialised(&raft)
                && !raft.is_initialized().await.context("query group state")?
            {
                let members = members(&map, &d.replicas)?;
                match raft.initialize(members).await {
                    Ok(()) => info!(shard = d.shard_id, "shard group initialised"),
                    Err(e) => {
                        warn!(shard = d.shard_id, error = %e, "shard group initialisation refused")
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts the group of a shard this node's split just built, and has it stand for election.
    pub(crate) async fn start_split_child(&self, child: ShardId) -> Result<()> {
        if self.replica(child).is_none() {
            anyhow::bail!("shard {child} has no replica here");
        }
        let raft = self.ensure_group(child).await?;
        raft.trigger()
            .elect(false)
            .await
            .map_err(|e| anyhow::anyhow!("stand for election: {e}"))?;
        Ok(())
    }

    /// Whether this node may start its replica of `d`, a shard made by a split: once its own
    /// replica of the parent applied the split (which built this one), or when it holds no
    /// replica of the parent, or after waiting `SPLIT_CHILD_WAIT` (the parent replica is far
    /// behind, or caught up by a snapshot past the split): the new group's leader then fills
    /// the empty replica.
    fn split_child_ready(&self, d: &ShardDescriptor) -> bool {
        if self.replica(d.shard_id).is_some() || self.group(d.split_from).is_none() {
            return true;
        }
        let mut waiting = self.split_waits.lock().unwrap_or_else(|e| e.into_inner());
        let since = *waiting.entry(d.shard_id).or_insert_with(Instant::now);
        if since.elapsed() < SPLIT_CHILD_WAIT {
            return false;
        }
        warn!(
            shard = d.shard_id,
            parent = d.split_from,
            "this node's replica of the parent has not applied the split; starting the new shard's replica empty"
        );
        waiting.remove(&d.shard_id);
        true
    }

    /// Removes a replica from this node: its group stops, its state, its log and its snapshots
    /// go. Placed here again later, it starts empty and is filled by the leader.
    pub(crate) async fn drop_replica(&self, shard: ShardId) -> Result<()> {
        let removed = self
            .groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&shard);
        match removed {
            Some(Hosted { raft, .. }) => {
                if let Err(e) = raft.shutdown().await {
                    warn!(shard, error = %e, "the dropped replica's group did not stop cleanly");
                }
            }
            // No group: a state a split built here for a shard placed elsewhere.
            None if self.ctx.store.shard(shard).is_some() => {}
            None => return Ok(()),
        }
        match self.ctx.store.remove_shard(shard) {
            Ok(()) | Err(dossier_storage::Error::ShardMissing { .. }) => {}
            Err(e) => return Err(e).context("remove the replica's state"),
        }
        let engine = Arc::clone(&self.ctx.engine);
        tokio::task::spawn_blocking(move || {
            let mut batch = dossier_storage::WriteBatch::new();
            batch.forget(shard);
            engine.write(batch)
        })
        .await
        .context("forget the replica's log")?
        .context("forget the replica's log")?;
        match std::fs::remove_dir_all(self.ctx.snapshot_dir(shard)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(shard, error = %e, "the dropped replica's snapshots were not removed"),
        }
        info!(
            shard,
            "replica dropped: the map places this shard on other nodes"
        );
        Ok(())
    }

    pub(crate) fn not_leader(
        &self,
        shard: ShardId,
        leader: Option<u64>,
        node: Option<&BasicNode>,
    ) -> ApiError {
        // Clients are sent to the leader's client address, from the map; a group's member
        // record holds its peer endpoint, the same unless it serves `peer-listen`.
        let hint = leader.and_then(|id| {
            self.map()
                .and_then(|m| meta::address(&m, id).map(str::to_owned))
                .or_else(|| node.map(|n| n.addr.clone()))
                .map(|a| (id, a))
        });
        ApiError::NotLeader {
            shard,
            leader: hint,
        }
    }

    /// Proposes `command` to the shard's group and waits until it is committed and applied here.
    pub async fn write(
        &self,
        shard: ShardId,
        command: Command,
        deadline: Duration,
    ) -> Result<(Outcome, u64), ApiError> {
        let proposer = self
            .proposer(shard)
            .ok_or(ApiError::shard_not_found(shard))?;
        self.wake_if_leader(shard).await;
        // Admission by bytes: a command the log would refuse as one entry is the client's error,
        // found here, before Raft sees it.
        let bytes = command.encoded_bytes_bound();
        let bytes_max = self.entry_command_bytes_max();
        if bytes > bytes_max {
            return Err(ApiError::InvalidArgument {
                field: "request".to_owned(),
                message: format!(
                    "encodes to up to {bytes} bytes, above the {bytes_max} one log entry holds \
                     (log.entry-bytes-max {} less the entry's framing); split it",
                    self.config.log.entry_bytes_max
                ),
                limit: Some(bytes_max as u64),
            });
        }
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, proposer.write(Request(command), bytes)).await;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Err(_) => Err(ApiError::Deadline),
            Ok(Ok(response)) => match response.response.outcome.unwrap_or(Outcome::Done) {
                Outcome::OutOfRange => Err(ApiError::Unavailable(format!(
                    "shard {shard} split and no longer holds a key of this request; the cluster \
                     map is being updated: refresh it and retry"
                ))),
                outcome => Ok((outcome, response.log_id.index)),
            },
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(f) => Err(self.not_leader(shard, f.leader_id, f.leader_node.as_ref())),
                None => Err(ApiError::Unavailable(format!("shard {shard}: {e}"))),
            },
        }
    }

    /// Refuses (retryably) a request for the patient (or identifier) `route_key` on a replica
    /// that gave it away in a split which this node's map may not show yet. Nothing is hashed
    /// on a replica that never split.
    pub(crate) fn check_owned(&self, shard: ShardId, route_key: &str) -> Result<(), ApiError> {
        let range = self.replica(shard).and_then(|r| r.range());
        match range {
            Some(range) if !range.contains(dossier_api::patient_hash(route_key)) => {
                Err(ApiError::Unavailable(format!(
                    "shard {shard} split and no longer holds this patient; the cluster map is \
                     being updated: refresh it and retry"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The largest command (by `Command::encoded_bytes_bound`) one log entry holds.
    pub fn entry_command_bytes_max(&self) -> usize {
        (self.config.log.entry_bytes_max as usize)
            .saturating_sub(dossier_raft::ENTRY_FRAMING_BYTES_MAX)
    }

    /// Waits until this replica may serve a linearizable read (the leader's lease, or ReadIndex:
    /// `raft.read-lease`).
    pub async fn read_barrier(&self, shard: ShardId, deadline: Duration) -> Result<(), ApiError> {
        let raft = self.group(shard).ok_or(ApiError::shard_not_found(shard))?;
        self.wake_if_leader(shard).await;
        let option = self.config.node.raft.read_option();
        match tokio::time::timeout(deadline, raft.ensure_linearizable(option)).await {
            Err(_) => Err(ApiError::Deadline),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(f) => Err(self.not_leader(shard, f.leader_id, f.leader_node.as_ref())),
                None => Err(ApiError::Unavailable(format!("shard {shard}: {e}"))),
            },
        }
    }

    /// The descriptor of the patient's shard from this node's map.
    pub fn route(&self, patient_hash: u64) -> Result<ShardDescriptor, ApiError> {
        let map = self
            .map()
            // Retryable: another node may know the map already (this one is catching up).
            .ok_or_else(|| {
                ApiError::Unavailable("this node has not learnt the cluster map yet".into())
            })?;
        meta::shard_for(&map, patient_hash)
            .cloned()
            .ok_or_else(|| ApiError::ClusterState("no shard covers this patient".into()))
    }

    /// Hands every leadership this node holds to another voter; returns (moved, still led here).
    pub async fn drain(&self, wait: Duration) -> (Vec<u64>, Vec<u64>) {
        let me = self.node_id();
        let led: Vec<(ShardId, Raft)> = self
            .groups()
            .into_iter()
            .filter(|(_, r)| r.metrics().borrow_watched().state == ServerState::Leader)
            .collect();
        let mut kept = Vec::new();
        let mut moving = Vec::new();
        for (shard, raft) in led {
            // A group with no other voter (a single-node cluster) has nobody to hand over to.
            let Some(target) = raft.voter_ids().find(|id| *id != me) else {
                kept.push(shard);
                continue;
            };
            self.wake_if_leader(shard).await;
            if let Err(e) = raft.trigger().transfer_leader(target).await {
                warn!(shard, error = %e, "leader transfer failed");
            }
            moving.push((shard, raft));
        }
        let led = moving;
        let deadline = Instant::now() + wait;
        loop {
            let mut remaining: Vec<u64> = led
                .iter()
                .filter(|(_, r)| leader_of(r) == Some(me))
                .map(|(s, _)| *s)
                .collect();
            if remaining.is_empty() || Instant::now() > deadline {
                let moved = led
                    .iter()
                    .map(|(s, _)| *s)
                    .filter(|s| !remaining.contains(s))
                    .collect();
                remaining.extend(&kept);
                return (moved, remaining);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// On every shard this node leads, proposes forgetting sessions idle for more than
    /// `limits.session-idle-entries` entries (deterministic: applied by every replica alike).
    pub async fn expire_sessions(&self) {
        let window = self.config.node.limits.session_idle_entries;
        for (shard, raft) in self.groups() {
            let metrics = raft.metrics().borrow_watched().clone();
            let applied = metrics.last_applied.map_or(0, |l| l.index);
            if shard == META_SHARD || metrics.state != ServerState::Leader || applied <= window {
                continue;
            }
            // A quiescent group had no write since it expired sessions last.
            if self
                .quiet_group(shard)
                .is_some_and(|(_, q)| q.leader().is_some())
            {
                continue;
            }
            let command = Command::ExpireSessions {
                before_index: applied - window,
            };
            if let Err(e) = self.write(shard, command, Duration::from_secs(5)).await {
                warn!(shard, error = %e, "session expiry not proposed");
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stops every group, then flushes and closes the storage.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        for (shard, raft) in self.groups() {
            if let Err(e) = raft.shutdown().await {
                warn!(shard, error = %e, "group did not stop cleanly");
            }
        }
        if let Err(e) = self.ctx.store.flush() {
            warn!(error = %e, "final state store flush failed");
        }
    }

    /// Ready: the map is known and every local group knows a leader.
    pub fn is_ready(&self) -> bool {
        self.map().is_some() && self.groups().iter().all(|(_, r)| leader_of(r).is_some())
    }
}

fn members(map: &ClusterMap, replicas: &[u64]) -> Result<BTreeMap<u64, BasicNode>> {
    replicas
        .iter()
        .map(|id| {
            let addr = meta::peer_address(map, *id)
                .with_context(|| format!("node {id} is not in the map"))?;
            Ok((*id, BasicNode::new(addr)))
        })
        .collect()
}

impl GroupRegistry for Node {
    fn raft(&self, shard: ShardId) -> Option<Raft> {
        self.group(shard)
    }

    fn identity(&self) -> (&str, u64) {
        (&self.config.node.cluster_name, self.config.node.node_id)
    }

    fn vote_hold(&self) -> VoteHold {
        self.ctx.vote_hold
    }

    fn incoming_snapshot_path(&self, shard: ShardId) -> Option<std::path::PathBuf> {
        self.group(shard)?;
        let seq = self.incoming_seq.fetch_add(1, Ordering::Relaxed);
        Some(
            self.ctx
                .snapshot_dir(shard)
                .join(format!("incoming-{seq}.partial")),
        )
    }

    fn snapshot_bytes_max(&self) -> u64 {
        64 << 30
    }

    fn snapshot_counts(&self) -> Option<&dossier_raft::SnapshotCounts> {
        Some(self.ctx.pool.snapshot_counts())
    }

    fn active(&self, shard: ShardId) {
        self.wake_on_message(shard);
    }

    fn pre_vote_refusal(&self, shard: ShardId, candidate: u64) -> Option<String> {
        self.quiet_pre_vote_refusal(shard, candidate)
    }

    fn ping(&self, from: u64, incarnation: u64) -> u64 {
        if self.liveness.heard(from, incarnation) {
            self.wake_groups_with(from);
        }
        self.liveness.incarnation()
    }

    fn quiesce(&self, request: &dossier_api::raft::v1::QuiesceRequest) -> Result<(), String> {
        self.quiesce_here(request)
    }
}

/// Whether the group's metrics already show it initialised: a log or a term, the test openraft's
/// `is_initialized` makes on its state (metrics may lag it, never lead it), read from the
/// metrics' watch without a message to the group's core. The reconcile loop asks this of every
/// shard it starts, ten times a second; asking the core instead woke every quiescent group's
/// task as often.
fn seen_initialised(raft: &Raft) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    m.last_log_index.is_some() || m.current_term > 0
}
