//! Keeping the shared log short: the groups that pin its oldest segment are compacted.
//!
//! Every group of the node appends to one log, and a segment can be reclaimed only when none of
//! its entries is live. A quiet group (the meta group, a shard nobody writes to) keeps its few
//! old entries, and with them every segment from theirs on, forever; a busy group keeps the
//! entries since its last purge. So whenever the segments hold more than half of
//! `log.disk-bytes-target`, the groups with live entries in the oldest segment are compacted:
//!
//! 1. a snapshot is triggered; it costs nothing (`dossier_raft::StateMachine::build_snapshot`
//!    returns the replica's durable checkpoint, the state the state store has on disk);
//! 2. once openraft has it, the log is purged up to it;
//! 3. the engine then deletes the segments no live entry needs.
//!
//! One step per group per tick, so the work is spread out and never blocks anything. The other
//! half of the target is room for the segment being written, the prepared one, and the entries
//! written while a compaction is under way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dossier_raft::openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;
use tracing::debug;

use crate::node::Node;

/// How often the log's size is looked at.
const TICK: Duration = Duration::from_millis(500);
/// Groups looked at per tick (those pinning the oldest segment, up to this many).
const PINS_PER_TICK: usize = 16;

/// What the compactor did, for metrics.
#[derive(Debug, Default)]
pub struct CompactionCounts {
    /// Snapshots (checkpoints) triggered.
    pub snapshots: AtomicU64,
    /// Purges triggered.
    pub purges: AtomicU64,
}

/// Compacts until `stop` turns true.
pub async fn run(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        step(&node).await;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// One look at the log, and one step for each group pinning its oldest segment.
pub async fn step(node: &Node) {
    let engine = node.engine();
    let target = node.config.log.disk_bytes_target;
    if engine.stats().segment_bytes <= target / 2 {
        return;
    }
    let pins = engine.pins(PINS_PER_TICK);
    let Some(oldest) = pins.first().map(|p| p.segment) else {
        return;
    };
    for pin in pins.iter().filter(|p| p.segment == oldest) {
        let (Some(raft), Some(replica)) = (node.group(pin.group), node.replica(pin.group)) else {
            continue;
        };
        let metrics = raft.metrics().borrow_watched().clone();
        let snapshot = metrics.snapshot.map(|l| l.index);
        let purged = metrics.purged.map(|l| l.index);
        let durable = replica.durable_applied_index();
        let counts = &node.compactions;
        if durable > snapshot {
            debug!(
                group = pin.group,
                ?durable,
                ?snapshot,
                "checkpoint for compaction"
            );
            if raft.trigger().snapshot().await.is_ok() {
                counts.snapshots.fetch_add(1, Ordering::Relaxed);
            }
        } else if let Some(upto) = snapshot
            && snapshot > purged
        {
            debug!(group = pin.group, upto, "purge for compaction");
            if raft.trigger().purge_log(upto).await.is_ok() {
                counts.purges.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
