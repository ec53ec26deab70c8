//! `LogEngine`: the one write-ahead log of a node, shared by every Raft group on it.
//!
//! Writers call [`LogEngine::submit`] with a [`WriteBatch`]. Under one lock the batch is validated,
//! encoded into frames at their final file offsets, and applied to the in-memory index, so readers
//! see it at once (openraft's rule: visible after `append` returns, durable when the callback
//! runs). A single writer thread takes everything queued since its last round, writes it with one
//! positional write per segment touched and one `fdatasync`, then runs every callback of the round:
//! that is the group commit. No callback runs before its bytes are on disk.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use tracing::{info, warn};

use crate::GroupId;
use crate::config::LogConfig;
use crate::error::{Error, Result};
use crate::log::frame::{self, FRAME_HEADER_BYTES};
use crate::log::group::{GroupLog, Loc, Span, SpanError};
use crate::log::prealloc::Prealloc;
use crate::log::record::{HardState, Record, RecordRef};
use crate::log::recovery::recover;
use crate::log::segment::{self, SegmentId};
use crate::log::state::{Counters, Shared, State, evict, lock, release};
use crate::log::writer::{
    NOTIFY_ROUNDS_MAX, delete_segments, notifier_loop, plan_reclaim, writer_loop,
};

/// Called once with the outcome of a submitted batch: `Ok` only after its bytes are fdatasync'ed.
///
/// It runs on the log's notifier thread, in durability order, so it must be short (send on a
/// channel, wake a task) and must not submit to the log and wait.
pub type OnDurable = Box<dyn FnOnce(Result<()>) + Send + 'static>;

/// Frames read back from disk are checked against the hard cap, not the configured entry limit,
/// so that lowering `entry-bytes-max` never turns old, valid entries into "corruption".
pub(super) const RECOVERY_PAYLOAD_MAX: u32 = u32::MAX;

/// Adjacent frames are read with one positional read up to this many bytes.
const READ_COALESCE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Append {
        group: GroupId,
        index: u64,
        data: Bytes,
    },
    Vote {
        group: GroupId,
        vote: Bytes,
    },
    Committed {
        group: GroupId,
        committed: Option<Bytes>,
    },
    TruncateFrom {
        group: GroupId,
        index: u64,
    },
    PurgeTo {
        group: GroupId,
        index: u64,
        marker: Bytes,
    },
    Forget {
        group: GroupId,
    },
}

/// Why [`LogEngine::try_submit`] did not queue a batch.
pub enum Submit {
    /// The batch breaks a rule or a limit, or the log failed or closed.
    Refused(Error),
    /// Too many bytes wait for the disk: the batch and its callback, handed back unqueued.
    Full(WriteBatch, OnDurable),
}

impl std::fmt::Debug for Submit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Submit::Refused(e) => f.debug_tuple("Refused").field(e).finish(),
            Submit::Full(batch, _) => f.debug_tuple("Full").field(&batch.len()).finish(),
        }
    }
}

/// The most bytes one appended entry adds to a batch beyond its payload (frame header and record
/// fields).
pub const APPEND_FRAME_BYTES_MAX: usize =
    FRAME_HEADER_BYTES + crate::log::record::RECORD_OVERHEAD_MAX;

/// Writes to the log, for any number of groups, submitted together and made durable together.
///
/// A batch is validated as a whole before anything is queued: either every operation is queued or
/// none is. After a crash, a prefix of the batch's records may survive (each record is its own
/// frame); only a batch whose callback said `Ok` is entirely durable.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends entry `index` of `group`: it must follow the group's last entry (or its purge point).
    pub fn append(&mut self, group: GroupId, index: u64, data: impl Into<Bytes>) -> &mut Self {
        self.ops.push(Op::Append {
            group,
            index,
            data: data.into(),
        });
        self
    }

    /// Saves the group's vote (opaque bytes).
    pub fn save_vote(&mut self, group: GroupId, vote: impl Into<Bytes>) -> &mut Self {
        self.ops.push(Op::Vote {
            group,
            vote: vote.into(),
        });
        self
    }

    /// Saves the group's committed log id (opaque bytes), or clears it.
    pub fn save_committed(&mut self, group: GroupId, committed: Option<Bytes>) -> &mut Self {
        self.ops.push(Op::Committed { group, committed });
        self
    }

    /// Removes the group's entries `>= index` (a Raft log conflict). Purged entries cannot be.
    pub fn truncate_from(&mut self, group: GroupId, index: u64) -> &mut Self {
        self.ops.push(Op::TruncateFrom { group, index });
        self
    }

    /// Removes the group's entries `<= index`, keeping `marker` (e.g. the purged log id) with the
    /// purge point. A purge at or below the current purge point is a no-op.
    pub fn purge_to(&mut self, group: GroupId, index: u64, marker: impl Into<Bytes>) -> &mut Self {
        self.ops.push(Op::PurgeTo {
            group,
            index,
            marker: marker.into(),
        });
        self
    }

    /// Forgets the group: its entries, hard state and purge point are gone, as if it had never
    /// been written (a replica that left this node). Written again later, it starts empty.
    pub fn forget(&mut self, group: GroupId) -> &mut Self {
        self.ops.push(Op::Forget { group });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A group's log bounds as the layer above needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// First and last index held, or `None` when the group holds no entry.
    pub entries: Option<(u64, u64)>,
    /// The purge point and its marker.
    pub purged: Option<(u64, Bytes)>,
    pub hard_state: HardState,
}

/// A group whose oldest live entry keeps a segment from being reclaimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub segment: SegmentId,
    pub group: GroupId,
    pub first_index: u64,
}

/// Counters since open, and current sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Writer rounds: each is one write per segment touched and one fdatasync.
    pub rounds: u64,
    pub fsyncs: u64,
    pub fsync_nanos_total: u64,
    pub bytes_written: u64,
    pub batches_submitted: u64,
    pub entries_appended: u64,
    pub segments: usize,
    pub segments_reclaimed: u64,
    /// Bytes of the segment files deleted by reclaim since open.
    pub reclaimed_bytes: u64,
    /// Bytes of frames in the segments on disk (the newest segment's prepared zeros and the
    /// prepared next segment excluded: add up to 2 x `segment-bytes-max` for the files' size).
    pub segment_bytes: u64,
    /// Bytes of entry payloads held by the read cache.
    pub cache_bytes: usize,
    /// Estimated heap bytes of the per-group index (locations, spans, hard states).
    pub index_bytes: usize,
}

/// The shared, segmented, group-committed Raft log of one node. See the crate README.
#[derive(Debug)]
pub struct LogEngine {
    shared: Arc<Shared>,
    /// The writer, then the notifier: joined in that order.
    threads: Vec<JoinHandle<()>>,
}

impl LogEngine {
    /// Opens (or creates) the log in `config.dir`, recovering every group's state from the segments.
    ///
    /// A torn or corrupt tail of the newest segment is cut off (it was never acknowledged); damage
    /// anywhere else fails with [`Error::Corrupt`] naming the file and offset.
    pub fn open(config: Arc<LogConfig>) -> Result<Self> {
        let dir = config.dir.clone();
        create_dir_durable(&dir)?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open lock file", &lock_path, e))?;
        lock.try_lock().map_err(|e| {
            let e = match e {
                fs::TryLockError::Error(e) => e,
                fs::TryLockError::WouldBlock => {
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "a running node holds it (another process, or one still running in this process)",
                    )
                }
            };
            Error::io("lock log directory", &lock_path, e)
        })?;
        let started = Instant::now();
        let state = recover(&config)?;
        let stats = (state.groups.len(), state.tail.segments.len());
        info!(
            dir = %dir.display(),
            groups = stats.0,
            segments = stats.1,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "log recovered"
        );
        let fresh = state.tail.segments.values().all(|s| s.file.is_none());
        let prealloc = Prealloc::new(&dir, config.segment_bytes_max, fresh)
            .map_err(|e| Error::io("prepare the next log segment", &dir, e))?;
        let shared = Arc::new(Shared {
            prealloc,
            config,
            state: Mutex::new(state),
            work: Condvar::new(),
            room: Condvar::new(),
            counters: Counters::default(),
            _lock: lock,
        });
        let (notify, notices) = std::sync::mpsc::sync_channel(NOTIFY_ROUNDS_MAX);
        let queued = Arc::new(AtomicU64::new(0));
        let notifier_queued = Arc::clone(&queued);
        let notifier = std::thread::Builder::new()
            .name("dossier-log-notify".into())
            .spawn(move || notifier_loop(notices, &notifier_queued))
            .map_err(|e| Error::io("spawn log notifier thread", &dir, e))?;
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("dossier-log-writer".into())
                .spawn(move || writer_loop(&shared, &notify, &queued))
                .map_err(|e| Error::io("spawn log writer thread", &dir, e))?
        };
        let preparer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("dossier-log-prealloc".into())
                .spawn(move || shared.prealloc.run())
                .map_err(|e| Error::io("spawn log preallocation thread", &dir, e))?
        };
        let engine = LogEngine {
            shared,
            threads: vec![writer, notifier, preparer],
        };
        // Segments left unreferenced by an earlier run are reclaimed from the start.
        let doomed = plan_reclaim(&mut engine.lock(), &engine.shared);
        delete_segments(&engine.shared, doomed);
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// Queues `batch`; `on_durable` runs once its bytes are fdatasync'ed (or the write failed).
    ///
    /// Returns an error, without queuing anything or calling `on_durable`, when the batch breaks a
    /// rule or a limit. Blocks while more than `pending-bytes-max` bytes wait for the disk. The
    /// batch is visible to readers as soon as this returns.
    pub fn submit(&self, batch: WriteBatch, on_durable: OnDurable) -> Result<()> {
        match self.submit_or_return(batch, on_durable, true) {
            Ok(()) => Ok(()),
            Err(Submit::Refused(e)) => Err(e),
            Err(Submit::Full(..)) => unreachable!("a blocking submit waits for room"),
        }
    }

    /// Like [`LogEngine::submit`], but never blocks: when `pending-bytes-max` bytes already wait
    /// for the disk, the batch and its callback are handed back (`Submit::Full`), unqueued, for
    /// the caller to submit again from a thread that may wait (async callers).
    pub fn try_submit(
        &self,
        batch: WriteBatch,
        on_durable: OnDurable,
    ) -> std::result::Result<(), Submit> {
        self.submit_or_return(batch, on_durable, false)
    }

    fn submit_or_return(
        &self,
        batch: WriteBatch,
        on_durable: OnDurable,
        block: bool,
    ) -> std::result::Result<(), Submit> {
        let config = &self.shared.config;
        for op in &batch.ops {
            let (group, index, bytes) = match op {
                Op::Append { group, index, data } => (*group, *index, data.len()),
                Op::PurgeTo {
                    group,
                    index,
                    marker,
                } => (*group, *index, marker.len()),
                _ => continue,
            };
            if bytes > config.entry_bytes_max as usize {
                return Err(Submit::Refused(Error::EntryTooLarge {
                    group,
                    index,
                    bytes,
                    max: config.entry_bytes_max,
                }));
            }
        }
        let mut state = self.lock();
        loop {
            if state.failed {
                return Err(Submit::Refused(Error::Failed));
            }
            if state.closing {
                return Err(Submit::Refused(Error::Closed));
            }
            let bytes = validate(&state, &batch, config).map_err(Submit::Refused)?;
            if bytes > config.batch_bytes_max {
                return Err(Submit::Refused(Error::BatchTooLarge {
                    bytes,
                    max: config.batch_bytes_max,
                }));
            }
            let queued = state.tail.pending.bytes;
            if queued == 0 || queued + bytes <= config.pending_bytes_max {
                break;
            }
            if !block {
                return Err(Submit::Full(batch, on_durable));
            }
            state.room_waiters += 1;
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
            state.room_waiters -= 1;
        }
        let appended = apply(&mut state, &batch);
        state.tail.pending.callbacks.push(on_durable);
        evict(&mut state, config.cache_bytes_max);
        // A busy writer picks the batch up at the end of its round; waking it costs a syscall.
        let wake =
            state.writer_idle && state.tail.pending.callbacks.len() >= state.wake_at_callbacks;
        drop(state);
        if wake {
            self.shared.work.notify_one();
        }
        self.shared.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.shared
            .counters
            .entries
            .fetch_add(appended, Ordering::Relaxed);
        Ok(())
    }

    /// The largest entry payload and the largest batch `submit` accepts, in bytes. A batch's size
    /// is at most the sum of [`APPEND_FRAME_BYTES_MAX`] plus payload over its appends.
    pub fn limits(&self) -> (usize, usize) {
        let config = &self.shared.config;
        (config.entry_bytes_max as usize, config.batch_bytes_max)
    }

    /// Submits `batch` and waits until it is durable.
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            batch,
            Box::new(move |result| {
                // The receiver only goes away if this thread did, so nobody is left to tell.
                let _ = tx.send(result);
            }),
        )?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// The entries of `group` with indexes in `range` that the log holds, in order, as
    /// `(index, payload)`. Indexes outside the group's bounds are simply not returned.
    pub fn entries(&self, group: GroupId, range: Range<u64>) -> Result<Vec<(u64, Bytes)>> {
        self.entries_up_to(group, range, usize::MAX)
    }

    /// Like [`LogEngine::entries`], but stops before the entry that would take the payloads
    /// read past `bytes_max` (at least one entry is read): what a replication message carries,
    /// without reading what it cannot.
    pub fn entries_up_to(
        &self,
        group: GroupId,
        range: Range<u64>,
        bytes_max: usize,
    ) -> Result<Vec<(u64, Bytes)>> {
        enum Slot {
            Cached(Bytes),
            OnDisk(Loc, Arc<File>),
        }
        let slots: Vec<(u64, Slot)> = {
            let state = self.lock();
            let Some(g) = state.groups.get(&group) else {
                return Ok(Vec::new());
            };
            let lo = range.start.max(g.span.first);
            let hi = range.end.min(g.span.end);
            let mut slots = Vec::with_capacity(usize::try_from(hi.saturating_sub(lo)).unwrap_or(0));
            let mut bytes = 0usize;
            for index in lo..hi {
                let cached = g.cached(index).map(|(_, data)| data);
                // A frame's length bounds its payload's from above.
                let size = cached.map_or_else(
                    || g.loc(index).map_or(0, |loc| loc.len as usize),
                    Bytes::len,
                );
                if !slots.is_empty() && bytes.saturating_add(size) > bytes_max {
                    break;
                }
                bytes += size;
                if let Some(data) = cached {
                    slots.push((index, Slot::Cached(data.clone())));
                    continue;
                }
                let loc = g.loc(index).expect("index within span");
                // Entries not yet durable are never evicted, so an uncached entry is on disk.
                assert!((loc.segment, u64::from(loc.offset) + u64::from(loc.len)) <= state.durable);
                let file = state.tail.segments[&loc.segment]
                    .file
                    .clone()
                    .expect("durable segment has a file");
                slots.push((index, Slot::OnDisk(loc, file)));
            }
            slots
        };
        let mut out = Vec::with_capacity(slots.len());
        let mut i = 0;
        while i < slots.len() {
            match &slots[i].1 {
                Slot::Cached(data) => {
                    out.push((slots[i].0, data.clone()));
                    i += 1;
                }
                Slot::OnDisk(first, file) => {
                    // Coalesce a run of adjacent frames of one segment into one positional read.
                    let mut j = i + 1;
                    let mut end = u64::from(first.offset) + u64::from(first.len);
                    while let Some((_, Slot::OnDisk(next, _))) = slots.get(j) {
                        let adjacent =
                            next.segment == first.segment && u64::from(next.offset) == end;
                        if !adjacent
                            || (end - u64::from(first.offset)) as usize >= READ_COALESCE_BYTES
                        {
                            break;
                        }
                        end += u64::from(next.len);
                        j += 1;
                    }
                    let mut buf = vec![0; (end - u64::from(first.offset)) as usize];
                    let path = self.segment_path(first.segment);
                    file.read_exact_at(&mut buf, u64::from(first.offset))
                        .map_err(|e| Error::io("read entries from segment", &path, e))?;
                    let mut at = 0;
                    for (index, slot) in &slots[i..j] {
                        let Slot::OnDisk(loc, _) = slot else {
                            unreachable!("run holds disk slots")
                        };
                        let corrupt = |reason| Error::Corrupt {
                            path: path.clone(),
                            offset: u64::from(loc.offset),
                            reason,
                        };
                        let (payload, len) = frame::decode_frame(&buf[at..], RECOVERY_PAYLOAD_MAX)
                            .map_err(|fault| corrupt(fault.as_str()))?;
                        if len != loc.len as usize {
                            return Err(corrupt("frame length differs from the index"));
                        }
                        match Record::decode(payload).map_err(corrupt)? {
                            Record::Entry {
                                group: g,
                                index: ix,
                                data,
                            } if g == group && ix == *index => {
                                out.push((*index, data));
                            }
                            _ => return Err(corrupt("frame is not the entry the index points at")),
                        }
                        at += len;
                    }
                    i = j;
                }
            }
        }
        Ok(out)
    }

    /// The group's bounds, purge point and hard state; `None` for a group the log never saw.
    pub fn group_state(&self, group: GroupId) -> Option<GroupState> {
        let state = self.lock();
        let g = state.groups.get(&group)?;
        Some(GroupState {
            entries: (!g.span.is_empty()).then(|| (g.span.first, g.span.end - 1)),
            purged: g.span.purged.map(|p| (p, g.marker.clone())),
            hard_state: g.hard_state.clone(),
        })
    }

    /// Every group the log holds anything for, in no particular order.
    pub fn groups(&self) -> Vec<GroupId> {
        self.lock().groups.keys().copied().collect()
    }

    /// The groups whose oldest live entries keep the oldest segments on disk, oldest first, at most
    /// `limit`: the layer above snapshots and purges them so that segments can be reclaimed.
    pub fn pins(&self, limit: usize) -> Vec<Pin> {
        let state = self.lock();
        let mut pins: Vec<Pin> = state
            .groups
            .iter()
            .filter_map(|(&group, g)| {
                let loc = g.locs.front()?;
                Some(Pin {
                    segment: loc.segment,
                    group,
                    first_index: g.span.first,
                })
            })
            .collect();
        pins.sort_unstable_by_key(|p| (p.segment, p.group));
        pins.truncate(limit);
        pins
    }

    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        let state = self.lock();
        let index_bytes = state
            .groups
            .values()
            .map(|g| {
                size_of::<(GroupId, GroupLog)>()
                    + g.locs.capacity() * size_of::<Loc>()
                    + g.cache.capacity() * size_of::<(u64, Bytes)>()
                    + g.hard_state.bytes()
                    + g.marker.len()
            })
            .sum::<usize>()
            + state.cache_queue.capacity() * size_of::<(GroupId, u64, u64)>();
        LogStats {
            rounds: c.rounds.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            fsync_nanos_total: c.fsync_nanos.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            batches_submitted: c.batches.load(Ordering::Relaxed),
            entries_appended: c.entries.load(Ordering::Relaxed),
            segments: state.tail.segments.len(),
            segments_reclaimed: c.reclaimed.load(Ordering::Relaxed),
            reclaimed_bytes: c.reclaimed_bytes.load(Ordering::Relaxed),
            segment_bytes: state.tail.segments.values().map(|s| s.size).sum(),
            cache_bytes: state.cache_bytes,
            index_bytes,
        }
    }

    /// Segment files on disk, oldest first (for tests and tools).
    pub fn segment_ids(&self) -> Vec<SegmentId> {
        self.lock()
            .tail
            .segments
            .iter()
            .filter(|(_, s)| s.file.is_some())
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn segment_path(&self, id: SegmentId) -> PathBuf {
        self.shared.config.dir.join(segment::file_name(id))
    }

    /// Waits for everything queued to be durable, then stops the writer.
    pub fn close(mut self) -> Result<()> {
        self.shutdown();
        if self.lock().failed {
            Err(Error::Failed)
        } else {
            Ok(())
        }
    }

    fn shutdown(&mut self) {
        self.lock().closing = true;
        self.shared.prealloc.close();
        self.shared.work.notify_one();
        self.shared.room.notify_all();
        // The writer drains what is queued and exits, dropping its sender; the notifier then
        // runs the last callbacks and exits.
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                warn!("a log thread panicked");
            }
        }
    }
}

impl Drop for LogEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Checks the whole batch against the current state, simulating its effect on each group, and
/// returns the bytes it will add to the log.
fn validate(state: &State, batch: &WriteBatch, config: &LogConfig) -> Result<usize> {
    let mut overlay: HashMap<GroupId, (Span, HardState)> = HashMap::new();
    let mut bytes = 0;
    for op in &batch.ops {
        let group = match op {
            Op::Append { group, .. }
            | Op::Vote { group, .. }
            | Op::Committed { group, .. }
            | Op::TruncateFrom { group, .. }
            | Op::PurgeTo { group, .. }
            | Op::Forget { group } => *group,
        };
        let (span, hard_state) = overlay.entry(group).or_insert_with(|| {
            state
                .groups
                .get(&group)
                .map_or_else(Default::default, |g| (g.span, g.hard_state.clone()))
        });
        let span_error = |e: SpanError, index: u64| match e {
            SpanError::NotContiguous { expected } => Error::NotContiguous {
                group,
                expected,
                got: index,
            },
            SpanError::TruncatePurged { purged } => Error::TruncatePurged {
                group,
                index,
                purged,
            },
            SpanError::IndexOutOfRange => Error::EntryMissing { group, index },
        };
        let record_len = match op {
            Op::Append { index, data, .. } => {
                span.append(*index).map_err(|e| span_error(e, *index))?;
                RecordRef::Entry {
                    group,
                    index: *index,
                    data,
                }
                .encoded_len()
            }
            Op::Vote { vote, .. } => {
                hard_state.vote = Some(vote.clone());
                hard_state_len(group, hard_state, config)?
            }
            Op::Forget { .. } => {
                *span = Span::default();
                *hard_state = HardState::default();
                RecordRef::Forget { group }.encoded_len()
            }
            Op::Committed { committed, .. } => {
                hard_state.committed = committed.clone();
                hard_state_len(group, hard_state, config)?
            }
            Op::TruncateFrom { index, .. } => {
                if span.truncate(*index).map_err(|e| span_error(e, *index))? == 0 {
                    continue;
                }
                RecordRef::TruncateFrom {
                    group,
                    index: *index,
                }
                .encoded_len()
            }
            Op::PurgeTo { index, marker, .. } => {
                if span
                    .purge(*index)
                    .map_err(|e| span_error(e, *index))?
                    .is_none()
                {
                    continue;
                }
                RecordRef::PurgeTo {
                    group,
                    index: *index,
                    marker,
                }
                .encoded_len()
            }
        };
        bytes += FRAME_HEADER_BYTES + record_len;
    }
    Ok(bytes)
}

fn hard_state_len(group: GroupId, hard_state: &HardState, config: &LogConfig) -> Result<usize> {
    let bytes = hard_state.bytes();
    if bytes > config.entry_bytes_max as usize {
        return Err(Error::EntryTooLarge {
            group,
            index: 0,
            bytes,
            max: config.entry_bytes_max,
        });
    }
    Ok(RecordRef::HardState {
        group,
        state: hard_state,
    }
    .encoded_len())
}

/// Encodes a validated batch and applies it to the index; returns the entries appended.
fn apply(state: &mut State, batch: &WriteBatch) -> u64 {
    let State {
        groups,
        tail,
        cache_bytes,
        cache_queue,
        append_seq,
        ..
    } = state;
    let mut appended = 0;
    for op in &batch.ops {
        match op {
            Op::Append { group, index, data } => {
                let loc = tail.encode(RecordRef::Entry {
                    group: *group,
                    index: *index,
                    data,
                });
                tail.segments.get_mut(&loc.segment).expect("tracked").live += 1;
                *append_seq += 1;
                let g = groups.entry(*group).or_default();
                *cache_bytes += g.push(*index, loc, Some((*append_seq, data.clone())));
                cache_queue.push_back((*group, *index, *append_seq));
                appended += 1;
            }
            Op::Vote { group, vote } => {
                let g = groups.entry(*group).or_default();
                g.hard_state.vote = Some(vote.clone());
                let loc = tail.encode(RecordRef::HardState {
                    group: *group,
                    state: &g.hard_state,
                });
                g.hard_state_segment = Some(loc.segment);
            }
            Op::Committed { group, committed } => {
                let g = groups.entry(*group).or_default();
                g.hard_state.committed = committed.clone();
                let loc = tail.encode(RecordRef::HardState {
                    group: *group,
                    state: &g.hard_state,
                });
                g.hard_state_segment = Some(loc.segment);
            }
            Op::TruncateFrom { group, index } => {
                let g = groups.entry(*group).or_default();
                if *index >= g.span.end {
                    continue;
                }
                tail.encode(RecordRef::TruncateFrom {
                    group: *group,
                    index: *index,
                });
                let segments = &mut tail.segments;
                *cache_bytes -= g.truncate(*index, |loc| release(segments, loc));
            }
            Op::Forget { group } => {
                // Recorded even for a group unknown here: validation counted its bytes.
                tail.encode(RecordRef::Forget { group: *group });
                if let Some(mut g) = groups.remove(group) {
                    let segments = &mut tail.segments;
                    *cache_bytes -= g.drop_all(|loc| release(segments, loc));
                }
            }
            Op::PurgeTo {
                group,
                index,
                marker,
            } => {
                let g = groups.entry(*group).or_default();
                if g.span.purged.is_some_and(|p| p >= *index) {
                    continue;
                }
                let loc = tail.encode(RecordRef::PurgeTo {
                    group: *group,
                    index: *index,
                    marker,
                });
                g.purge_segment = Some(loc.segment);
                let segments = &mut tail.segments;
                *cache_bytes -= g.purge(*index, marker.clone(), |loc| release(segments, loc));
            }
        }
    }
    appended
}

/// Creates `dir` and any missing ancestors, fsyncing each parent so that the new directories
/// survive a crash (a vanished log directory would silently read as a fresh log).
fn create_dir_durable(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at {
        if path.as_os_str().is_empty() || path.exists() {
            break;
        }
        missing.push(path.to_path_buf());
        at = path.parent();
    }
    fs::create_dir_all(dir).map_err(|e| Error::io("create log directory", dir, e))?;
    for created in missing.iter().rev() {
        let parent = match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("fsync parent of new log directory", parent, e))?;
    }
    Ok(())
}
