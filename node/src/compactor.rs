//! Keeping the shared log short: the groups that pin its oldest segment are compacted.
//!
//! Every group of the node appends to one log, and a segment can be reclaimed only when none of
//! its entries is live. A quiet group (the meta group, a shard nobody writes to) keeps its few
//! old entries, and with them every segment from theirs on, forever; a busy group keeps the
//! entries since its last purge. So whenever the segments' frames reach the mark (half of
//! `log.disk-bytes-target`, less two segments of preallocated zeros), the groups with live
//! entries in the oldest segment are compacted:
//!
//! 1. a snapshot is triggered; it costs a flush of the state store at most
//!    (`dossier_raft::StateMachine::build_snapshot` returns the replica's durable checkpoint,
//!    the state the state store has on disk, and copies nothing);
//! 2. once openraft has it, the log is purged up to it (on a leader, not past what a follower
//!    slightly behind still needs, unless the log nears its target);
//! 3. the engine then deletes the segments no live entry needs.
//!
//! Steps follow each other at once while they reclaim segments, every 50 ms while the log is
//! above its mark and every 500 ms below it; nothing waits on the compactor. The other
//! half of the target is room for the segment being written, the prepared one, and the entries
//! written while a compaction is under way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dossier_raft::openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;
use tracing::debug;

use crate::node::Node;

/// How often the log's size is looked at while it is below its mark.
const TICK: Duration = Duration::from_millis(500);
/// ... and while it is above (waiting for the state store's next flush to move the groups'
/// durable checkpoints).
const TICK_ABOVE: Duration = Duration::from_millis(50);
/// Groups looked at per step (those pinning the oldest segment, up to this many).
const PINS_PER_TICK: usize = 16;
/// How long a step waits for a triggered checkpoint.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(1);
/// How long a step gives the log's writer to record purges and reclaim segments.
const RECLAIM_WAIT: Duration = Duration::from_millis(20);

/// What the compactor did, for metrics.
#[derive(Debug, Default)]
pub struct CompactionCounts {
    /// Snapshots (checkpoints) triggered.
    pub snapshots: AtomicU64,
    /// Purges triggered.
    pub purges: AtomicU64,
}

/// Frames in the segments above which compaction runs: half the target, less the two segment
/// files that are zeros ahead of the frames (the newest one's rest and the prepared next one).
pub fn mark(log: &dossier_storage::LogConfig) -> u64 {
    (log.disk_bytes_target / 2).saturating_sub(2 * log.segment_bytes_max)
}

/// How far a group's log may be purged: up to its snapshot, except that a leader keeps the
/// entries a follower a little behind still needs (one within `kept` entries of the snapshot),
/// so that a follower slowed by load is not sent the whole shard for want of a few entries. A
/// follower further behind, or any follower once the log is `urgent`, is not waited for: it
/// gets a snapshot.
fn spare_followers(
    metrics: &dossier_raft::openraft::RaftMetrics<dossier_raft::TypeConfig>,
    snapshot: u64,
    kept: u64,
    urgent: bool,
) -> u64 {
    let Some(replication) = metrics.replication.as_ref().filter(|_| !urgent) else {
        return snapshot;
    };
    let floor = snapshot.saturating_sub(kept);
    replication
        .values()
        .map(|matching| matching.map_or(0, |l| l.index))
        .filter(|&matching| matching >= floor)
        .min()
        .map_or(snapshot, |slowest| slowest.min(snapshot))
}

/// What a step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The log is below its mark.
    Below,
    /// Above, and the oldest segment is still pinned (its groups' durable state has not moved).
    Stuck,
    /// Above, and the oldest segment was released.
    Reclaimed,
}

/// Compacts until `stop` turns true: at once again after a step that released the oldest
/// segment, every `TICK_ABOVE` while above the mark, every `TICK` below it.
pub async fn run(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        let pause = match step(&node).await {
            Step::Below => TICK,
            Step::Stuck => TICK_ABOVE,
            Step::Reclaimed => Duration::ZERO,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// One look at the log: when it is above its mark, each group pinning the oldest segment is
/// checkpointed (if it applied past its last snapshot) and purged up to its snapshot, sparing
/// followers slightly behind (`spare_followers`).
pub async fn step(node: &Node) -> Step {
    let engine = node.engine();
    let frames = engine.stats().segment_bytes;
    let mark = mark(&node.config.log);
    if frames <= mark {
        return Step::Below;
    }
    // Past half-way to the target's edge, followers that are behind are no longer spared.
    let urgent = frames > mark + (node.config.log.disk_bytes_target / 2 - mark) / 2;
    let kept = node.config.node.raft.log_entries_kept_after_snapshot;
    let pins = engine.pins(PINS_PER_TICK);
    let Some(oldest) = pins.first().map(|p| p.segment) else {
        return Step::Stuck;
    };
    // All checkpoints first, then the waits: each costs one flush of the state store at most,
    // and flushes of several groups overlap.
    let mut pinned = Vec::new();
    for pin in pins.iter().filter(|p| p.segment == oldest) {
        let (Some(raft), Some(replica)) = (node.group(pin.group), node.replica(pin.group)) else {
            continue;
        };
        let snapshot = raft.metrics().borrow_watched().snapshot.map(|l| l.index);
        let applied = replica.applied_index();
        if applied > snapshot {
            debug!(group = pin.group, ?applied, "checkpoint for compaction");
            if raft.trigger().snapshot().await.is_ok() {
                node.compactions.snapshots.fetch_add(1, Ordering::Relaxed);
            }
        }
        pinned.push((pin.group, raft, applied));
    }
    for (group, raft, applied) in pinned {
        // A checkpoint costs a flush at most; wait for it briefly, or come back next step.
        let _ = raft
            .wait(Some(CHECKPOINT_WAIT))
            .metrics(
                |m| m.snapshot.map(|l| l.index) >= applied,
                "compaction checkpoint",
            )
            .await;
        let metrics = raft.metrics().borrow_watched().clone();
        let snapshot = metrics.snapshot.map(|l| l.index);
        let upto = snapshot.map(|s| spare_followers(&metrics, s, kept, urgent));
        if let Some(upto) = upto
            && Some(upto) > metrics.purged.map(|l| l.index)
        {
            debug!(group, upto, "purge for compaction");
            if raft.trigger().purge_log(upto).await.is_ok() {
                node.compactions.purges.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Purges are written, and segments reclaimed, by the log's writer: give it a moment.
    tokio::time::sleep(RECLAIM_WAIT).await;
    if engine.pins(1).first().map(|p| p.segment) == Some(oldest) {
        Step::Stuck
    } else {
        Step::Reclaimed
    }
}
