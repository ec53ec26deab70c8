//! Starting one Raft group (a shard replica) on a node, and the Raft timing configuration.

use std::path::PathBuf;
use std::sync::Arc;

use dossier_storage::{LogEngine, ShardId, StateStore};
use serde::Deserialize;

use crate::error::Error;
use crate::log_store::LogStore;
use crate::network::{GroupNetwork, PeerPool};
use crate::state_machine::StateMachine;
use crate::types::{NodeId, TypeConfig};
use crate::vote_hold::VoteHold;

/// A running replica: openraft's handle, typed with our state machine.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Raft timing and log compaction, shared by every group of a node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RaftConfig {
    /// Leader heartbeat period, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in this range starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Pre-Vote: a node returning from a partition asks before it disrupts a healthy leader.
    pub pre_vote: bool,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log below a snapshot (for followers slightly behind).
    pub log_entries_kept_after_snapshot: u64,
    /// Entries per append-entries message.
    pub entries_per_append_max: u64,
    /// Payload bytes per append-entries message: a message carries at least one entry, and is
    /// cut before the entry that would take it past this (large records replicate in several).
    pub append_bytes_max: u64,
    /// Send new entries to followers as soon as they are queued on the leader, instead of after
    /// the leader's own fdatasync: the leader's and followers' fsyncs overlap.
    pub replicate_before_local_flush: bool,
    /// Serve a linearizable read without a round of heartbeats while a quorum acknowledged this
    /// leader within the leader lease (`election-timeout-max-ms`); otherwise, or when false, the
    /// read waits for a fresh quorum acknowledgement (ReadIndex). Safe because a follower votes
    /// for no one while its lease on the leader runs; it assumes clocks advance at about the same
    /// rate on every node (monotonic clocks, no bound on their offset; docs/invariants.md,
    /// "Lease reads").
    pub read_lease: bool,
    /// Lease reads accept a quorum acknowledgement younger than `election-timeout-max-ms` minus
    /// this margin: room for a leader's clock that runs slower than its followers'.
    pub read_lease_margin_ms: u64,
    /// A group whose leader saw no new entry for this long, every replica holding all of it,
    /// goes quiescent: its replicas stop their Raft timers (no heartbeats, no election timeouts)
    /// until it is written, read linearizably or changed again; followers watch the leader's
    /// node instead through one node-level ping per peer (0: never; `node/src/quiesce.rs`).
    /// Not set: [`QUIESCE_AFTER_DEFAULT_MS`], or twice `election_timeout_max_ms` when that is
    /// more ([`RaftConfig::quiescence_ms`]).
    pub quiesce_after_ms: Option<u64>,
}

/// `RaftConfig::quiesce_after_ms` by default: a group quiet for 2 s stops its timers, or for
/// twice the election timeout when that is more.
pub const QUIESCE_AFTER_DEFAULT_MS: u64 = 2000;

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            // A follower starts an election after openraft's leader lease (the max timeout) plus a
            // random timeout in [min, max]: 0.45-0.6 s without heartbeats (over 10 heartbeats
            // missed), clear of a busy 2-core machine's scheduling hiccups, and a failover the
            // client sees end in well under a second.
            heartbeat_interval_ms: 40,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            pre_vote: true,
            snapshot_after_entries: 10_000,
            log_entries_kept_after_snapshot: 1_000,
            entries_per_append_max: 300,
            append_bytes_max: 8 << 20,
            replicate_before_local_flush: true,
            read_lease: true,
            read_lease_margin_ms: 60,
            quiesce_after_ms: None,
        }
    }
}

impl RaftConfig {
    /// How long a group stays quiet before it goes quiescent, in milliseconds (0: never): the
    /// value set, or the default, which follows raised election timeouts.
    pub fn quiescence_ms(&self) -> u64 {
        self.quiesce_after_ms.unwrap_or_else(|| {
            QUIESCE_AFTER_DEFAULT_MS.max(self.election_timeout_max_ms.saturating_mul(2))
        })
    }

    /// How a linearizable read is confirmed (see `read_lease`).
    pub fn read_option(&self) -> openraft::LinearizerOption {
        if self.read_lease {
            // A quorum acknowledgement within the lease, less the margin, will do; if none is
            // that fresh, send heartbeats now rather than wait for the next tick.
            let age = self
                .election_timeout_max_ms
                .saturating_sub(self.read_lease_margin_ms);
            openraft::LinearizerOption::new(Some(std::time::Duration::from_millis(age)), true)
        } else {
            openraft::ReadPolicy::ReadIndex.into()
        }
    }

    /// openraft's configuration for a group (validated: openraft checks the timeout relations).
    pub fn openraft(&self, cluster: &str) -> Result<Arc<openraft::Config>, Error> {
        let config = openraft::Config {
            cluster_name: cluster.to_owned(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            enable_pre_vote: Some(self.pre_vote),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.log_entries_kept_after_snapshot,
            max_payload_entries: self.entries_per_append_max,
            broadcast_submitted_on_append: Some(self.replicate_before_local_flush),
            purge_batch_size: 256,
            // A leader that restarts must win an election again before it serves: restored at
            // once (openraft's default), it would serve reads at a read index computed from the
            // commit index it persisted, which can lag what it acknowledged, over a state
            // machine that flushes after apply; a write acknowledged just before a kill was then
            // missing from a linearizable read (a 600 s fault run, seed 7; docs/invariants.md,
            // "Lease reads").
            enable_leader_restore: Some(false),
            // A follower whose log went back to empty is a replaced disk (the disk-replacement
            // runbook in docs/operations.md): its leader starts its replication over (by
            // snapshot when the log is purged) instead of sending from where it was, forever.
            // While it holds no state the replica refuses candidates of groups that had a
            // leader (`server.rs`, `stateless_refusal`, within its window), so the entries it
            // lost are not outvoted while its leader brings it back.
            allow_log_reversion: Some(true),
            // The network applies its own snapshot deadline (NetworkConfig::snapshot_timeout).
            install_snapshot_timeout: 60_000,
            ..Default::default()
        };
        Ok(Arc::new(config.validate()?))
    }
}

/// Everything a node shares between its groups.
#[derive(Debug, Clone)]
pub struct GroupContext {
    pub node_id: NodeId,
    pub config: Arc<openraft::Config>,
    pub engine: Arc<LogEngine>,
    pub store: Arc<StateStore>,
    pub pool: Arc<PeerPool>,
    /// Each group keeps its snapshots in `snapshot_root/shard-{id}`.
    pub snapshot_root: PathBuf,
    /// Set when the process started: replicas started within it do not stand for election.
    pub vote_hold: VoteHold,
    /// `RaftConfig::append_bytes_max`.
    pub append_bytes_max: usize,
}

impl GroupContext {
    pub fn snapshot_dir(&self, shard: ShardId) -> PathBuf {
        self.snapshot_root.join(format!("shard-{shard}"))
    }

    /// Starts (or restarts) the local replica of `shard`: its log is the shard's part of the
    /// shared log, its state machine the shard's tree.
    pub async fn start(&self, shard: ShardId) -> Result<Raft, Error> {
        let sm = StateMachine::open(Arc::clone(&self.store), shard, self.snapshot_dir(shard))
            .map_err(|source| Error::Io {
                op: "open state machine",
                source,
            })?;
        let log = LogStore::new(Arc::clone(&self.engine), shard, self.append_bytes_max);
        let network = GroupNetwork::new(shard, Arc::clone(&self.pool), self.snapshot_dir(shard));
        let raft = Raft::new(self.node_id, Arc::clone(&self.config), network, log, sm)
            .await
            .map_err(|e| Error::Fatal {
                shard,
                reason: e.to_string(),
            })?;
        self.vote_hold.hold_elections(&raft);
        Ok(raft)
    }
}
