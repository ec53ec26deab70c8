//! The audit events of reads: a read hands its event to the node's batcher, which makes it
//! durable in the node's audit journal (`audit_journal.rs`: many reads share one fsync of the
//! node's log) and answers; the read's data then leaves. Behind the reads, the batcher moves
//! the journaled events into their patients' chains: per shard, one Raft entry of appends per
//! batch, a few batches in flight per shard, the events that arrive meanwhile in the next one
//! (the busier the shard, the larger its batches). A batch that fails (a leader change, a split
//! that moved some chains) is tried again event by event, after a pause, until each is in its
//! chain; the journal forgets events once they are. Shards do not wait for each other.
//!
//! Bounds: at most [`BACKLOG_MAX`] events journaled and not yet moved; a read finding the
//! backlog full waits for room within its deadline, then fails UNAVAILABLE.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dossier_records::kv::{self, BatchResult, Shards};
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{info, warn};

use crate::audit_journal::{self, Entry, Journal};
use crate::errors::ApiError;
use crate::node::Node;
use crate::shards::ClusterShards;

/// Appends of one Raft entry at most (the store's per-batch limit bounds it too).
const APPENDS_PER_BATCH_MAX: usize = 256;

/// Batches of one shard in flight at most: no read waits for a move, so batches may be large.
const IN_FLIGHT_PER_SHARD: usize = 1;

/// A shard's events wait this long for company before they move (unless a batch is full).
const LINGER: Duration = Duration::from_millis(20);

/// Events journaled and not yet in their chains, at most.
pub const BACKLOG_MAX: usize = 65_536;

/// How long a move may take before it counts as failed and is tried again.
const MOVE_DEADLINE: Duration = Duration::from_secs(5);

/// The pause before an event whose move failed is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The journal forgets moved events in steps of at least this many, or this often.
const FORGET_EVERY: u64 = 1024;
const FORGET_AFTER: Duration = Duration::from_millis(500);

/// A journaled event on its way to its chain.
struct Shipment {
    entry: Entry,
    /// Its place in the backlog, freed once it is in its chain.
    _room: Option<OwnedSemaphorePermit>,
}

/// The node's batcher of read audit events.
#[derive(Clone)]
pub struct AuditBatcher {
    journal: Arc<Journal>,
    room: Arc<Semaphore>,
    /// Every event with a seq up to this one is in its chain.
    moved: watch::Receiver<u64>,
    /// The journal's and the mover's tasks (both hold the node).
    tasks: Arc<[tokio::task::AbortHandle; 2]>,
}

impl std::fmt::Debug for AuditBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditBatcher")
            .field("unmoved", &self.unmoved())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Shipment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipment")
            .field("seq", &self.entry.seq)
            .finish_non_exhaustive()
    }
}

impl AuditBatcher {
    /// Opens the journal and starts moving its events (those a previous run left first) on the
    /// current runtime.
    pub fn start(node: Arc<Node>) -> Result<AuditBatcher, ApiError> {
        let (journal, left) = Journal::open(node.engine())?;
        if !left.is_empty() {
            info!(
                events = left.len(),
                "moving the audit events a previous run journaled to their chains"
            );
        }
        let first = left.first().map_or_else(|| journal.next_seq(), |e| e.seq);
        let (moved_tx, moved) = watch::channel(first - 1);
        // Room for the backlog's events and those a previous run left: a send never waits (each
        // event of the backlog holds a permit of `room` until it is in its chain).
        let (queue, rx) = mpsc::channel(BACKLOG_MAX + left.len().max(1));
        for entry in left {
            let _ = queue.try_send(Shipment { entry, _room: None });
        }
        let mover = tokio::spawn(run(
            Arc::clone(&node),
            Arc::clone(&journal),
            rx,
            moved_tx,
            first - 1,
        ));
        // The journal's task hands each durable event to the mover itself: an event whose read
        // gave up waiting is moved all the same, and the moved mark goes on past it.
        let log = Arc::clone(&node);
        let deliver = queue.clone();
        let writer = tokio::spawn(Arc::clone(&journal).run(
            Arc::new(move |batch, on_durable| log.engine().try_submit(batch, on_durable)),
            Arc::new(move |entry, room| {
                let _ = deliver.try_send(Shipment { entry, _room: room });
            }),
        ));
        Ok(AuditBatcher {
            journal,
            room: Arc::new(Semaphore::new(BACKLOG_MAX)),
            moved,
            tasks: Arc::new([writer.abort_handle(), mover.abort_handle()]),
        })
    }

    /// A guard that stops the journal's and the mover's tasks, which hold the node, when it is
    /// dropped: so that the node (its log and state store) is released when its run ends, not
    /// when its runtime does. Events not yet moved stay in the journal for the next start.
    pub fn stop_on_drop(&self) -> StopOnDrop {
        StopOnDrop(Arc::clone(&self.tasks))
    }

    /// Makes `op` (an append to the chain of `route_key`) durable within `deadline`; it is then
    /// moved to its chain in the background.
    pub async fn append(
        &self,
        route_key: &str,
        op: kv::Op,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        tokio::time::timeout(deadline, async {
            let room = Arc::clone(&self.room)
                .acquire_owned()
                .await
                .map_err(|_| ApiError::Unavailable("the node is shutting down".into()))?;
            self.journal.append(route_key, &op, Some(room)).await.map(drop)
        })
        .await
        .map_err(|_| {
            ApiError::Unavailable(
                "the audit of this read could not be recorded in time (the node's audit backlog is full or its log is slow)".into(),
            )
        })?
    }

    /// Waits until every event journaled before this call is in its chain (an access log read
    /// after its reads sees their events), for at most `deadline`.
    pub async fn flush(&self, deadline: Duration) -> Result<(), ApiError> {
        let target = self.journal.next_seq() - 1;
        let mut moved = self.moved.clone();
        tokio::time::timeout(deadline, moved.wait_for(|m| *m >= target))
            .await
            .map_err(|_| ApiError::Deadline)?
            .map_err(|_| ApiError::Unavailable("the node is shutting down".into()))?;
        Ok(())
    }

    /// Events in the journal and not yet in their chains, those a previous run left included:
    /// a node's disk may be wiped only once this is 0.
    pub fn unmoved(&self) -> u64 {
        unmoved(&self.journal, *self.moved.borrow())
    }
}

/// Events in `journal` beyond `moved`, the mark below which every event is in its chain. The
/// mark is read first: read after the journal's seq, a batch journaled and moved in between
/// would count as moved and not as journaled.
fn unmoved(journal: &Journal, moved: u64) -> u64 {
    (journal.next_seq() - 1).saturating_sub(moved)
}

/// Stops the journal's and the mover's tasks when dropped ([`AuditBatcher::stop_on_drop`]).
#[derive(Debug)]
pub struct StopOnDrop(Arc<[tokio::task::AbortHandle; 2]>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for task in self.0.iter() {
            task.abort();
        }
    }
}

/// Which journaled events are in their chains. Seqs are handed over in any order (concurrent
/// reads finish journaling in any order), and moved in any order.
#[derive(Debug)]
struct Progress {
    /// Handed over, not yet in their chains.
    pending: BTreeSet<u64>,
    /// Every seq below it was handed over,
    unreceived: u64,
    /// and these above it.
    ahead: BTreeSet<u64>,
}

impl Progress {
    /// Every seq up to `moved` is in its chain.
    fn after(moved: u64) -> Progress {
        Progress {
            pending: BTreeSet::new(),
            unreceived: moved + 1,
            ahead: BTreeSet::new(),
        }
    }

    fn received(&mut self, seq: u64) {
        self.pending.insert(seq);
        if seq == self.unreceived {
            self.unreceived += 1;
            while self.ahead.remove(&self.unreceived) {
                self.unreceived += 1;
            }
        } else if seq > self.unreceived {
            self.ahead.insert(seq);
        }
    }

    fn in_chain(&mut self, seq: u64) {
        self.pending.remove(&seq);
    }

    /// Every seq up to this one is in its chain: none is pending, none still to come.
    fn moved(&self) -> u64 {
        self.pending
            .first()
            .map_or(self.unreceived, |first| (*first).min(self.unreceived))
            - 1
    }
}

/// What a batch left: the seqs now in their chains, and the events to try again.
struct Moved {
    shard: u64,
    done: Vec<u64>,
    again: Vec<Shipment>,
}

async fn run(
    node: Arc<Node>,
    journal: Arc<Journal>,
    mut rx: mpsc::Receiver<Shipment>,
    moved_tx: watch::Sender<u64>,
    mut moved: u64,
) {
    let shards = ClusterShards::new(Arc::clone(&node));
    // Events waiting per shard, the shards' batches in flight, and the seqs not yet in chains.
    let mut waiting: BTreeMap<u64, (Instant, Vec<Shipment>)> = BTreeMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut busy: BTreeMap<u64, usize> = BTreeMap::new();
    let mut progress = Progress::after(moved);
    let mut forgotten = moved;
    let mut last_forget = Instant::now();
    loop {
        let mut arrived = Vec::new();
        // The next shard due to send (one with room in flight: the others send when theirs
        // returns).
        let due = waiting
            .iter()
            .filter(|(s, _)| busy.get(s).copied().unwrap_or(0) < IN_FLIGHT_PER_SHARD)
            .map(|(_, (since, _))| *since + LINGER)
            .min();
        tokio::select! {
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {}
            next = rx.recv() => {
                let Some(first) = next else { break };
                arrived.push(first);
                while let Ok(s) = rx.try_recv() {
                    arrived.push(s);
                }
                for s in &arrived {
                    progress.received(s.entry.seq);
                }
            }
            Some(m) = in_flight.next(), if !in_flight.is_empty() => {
                let Moved { shard, done, again } = m;
                if let Some(n) = busy.get_mut(&shard) {
                    *n -= 1;
                }
                for seq in done {
                    progress.in_chain(seq);
                }
                arrived = again;
            }
        }
        let map = node.map();
        for s in arrived {
            // By shard as the map routes the chain now (a split since is caught in `commit`).
            let shard = map
                .as_ref()
                .and_then(|m| {
                    crate::meta::shard_for(m, dossier_api::patient_hash(&s.entry.route_key))
                })
                .map_or(0, |d| d.shard_id);
            waiting
                .entry(shard)
                .or_insert_with(|| (Instant::now(), Vec::new()))
                .1
                .push(s);
        }
        let now_moved = progress.moved();
        if now_moved != moved {
            moved = now_moved;
            let _ = moved_tx.send(moved);
        }
        node.metrics
            .audit_backlog
            .set(unmoved(&journal, moved) as i64);
        if moved > forgotten
            && (moved - forgotten >= FORGET_EVERY || last_forget.elapsed() >= FORGET_AFTER)
        {
            audit_journal::forget_to(node.engine(), moved);
            forgotten = moved;
            last_forget = Instant::now();
        }
        // Every shard with room in flight and a full batch, or events that lingered enough,
        // sends one now.
        let ready: Vec<u64> = waiting
            .iter()
            .filter(|(s, (since, group))| {
                busy.get(s).copied().unwrap_or(0) < IN_FLIGHT_PER_SHARD
                    && (group.len() >= APPENDS_PER_BATCH_MAX || since.elapsed() >= LINGER)
            })
            .map(|(s, _)| *s)
            .collect();
        for shard in ready {
            let Some((since, mut group)) = waiting.remove(&shard) else {
                continue;
            };
            if group.len() > APPENDS_PER_BATCH_MAX {
                let rest = group.split_off(APPENDS_PER_BATCH_MAX);
                waiting.insert(shard, (since, rest));
            }
            *busy.entry(shard).or_default() += 1;
            let shards = shards.clone();
            in_flight.push(async move {
                let (done, again) = commit(&shards, group).await;
                Moved { shard, done, again }
            });
        }
    }
}

/// Moves one shard's events in one batch; if that fails, each event on its own. Returns the seqs
/// now in their chains and, after a pause, the events to try again.
async fn commit(shards: &ClusterShards, group: Vec<Shipment>) -> (Vec<u64>, Vec<Shipment>) {
    let batch = kv::Batch {
        conditions: Vec::new(),
        ops: group.iter().map(|s| s.entry.op.clone()).collect(),
    };
    let together = write(shards, &group[0].entry.route_key, batch).await;
    if together.is_ok() {
        return (group.iter().map(|s| s.entry.seq).collect(), Vec::new());
    }
    let alone = group.into_iter().map(|s| async move {
        let batch = kv::Batch {
            conditions: Vec::new(),
            ops: vec![s.entry.op.clone()],
        };
        match write(shards, &s.entry.route_key, batch).await {
            Ok(()) => Ok(s.entry.seq),
            Err(e) => {
                warn!(error = %e, "an audit event could not be moved to its chain yet; retrying");
                Err(s)
            }
        }
    });
    let mut done = Vec::new();
    let mut again = Vec::new();
    for result in join_all(alone).await {
        match result {
            Ok(seq) => done.push(seq),
            Err(s) => again.push(s),
        }
    }
    if !again.is_empty() {
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    (done, again)
}

async fn write(shards: &ClusterShards, route_key: &str, batch: kv::Batch) -> Result<(), ApiError> {
    match shards.write(route_key, batch, MOVE_DEADLINE).await {
        Ok(BatchResult::Applied) => Ok(()),
        Ok(BatchResult::Failed(_)) => Err(ApiError::Internal(
            "an unconditional audit batch was refused".into(),
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    /// The journal may forget only what is in its chain: an event handed over late, or moved
    /// late, holds the mark back.
    #[test]
    fn the_moved_mark_never_passes_an_event_not_in_its_chain() {
        let mut p = Progress::after(10);
        assert_eq!(p.moved(), 10);
        // 12 and 13 arrive before 11 and are moved at once: 11 may still be journaling.
        p.received(12);
        p.received(13);
        p.in_chain(12);
        p.in_chain(13);
        assert_eq!(p.moved(), 10);
        p.received(11);
        assert_eq!(p.moved(), 10, "11 is not in its chain yet");
        p.received(14);
        p.in_chain(14);
        assert_eq!(p.moved(), 10);
        p.in_chain(11);
        assert_eq!(p.moved(), 14);
        // A retried event (moved later than those after it) holds the mark at its seq - 1.
        p.received(15);
        p.received(16);
        p.in_chain(16);
        assert_eq!(p.moved(), 14);
        p.in_chain(15);
        assert_eq!(p.moved(), 16);
    }
}
