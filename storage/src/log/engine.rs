//! `LogEngine`: the one write-ahead log of a node, shared by every Raft group on it.
//!
//! Writers call [`LogEngine::submit`] with a [`WriteBatch`]. Under one lock the batch is validated,
//! encoded into frames at their final file offsets, and applied to the in-memory index, so readers
//! see it at once (openraft's rule: visible after `append` returns, durable when the callback
//! runs). A single writer thread takes everything queued since its last round, writes it with one
//! positional write per segment touched and one `fdatasync`, then runs every callback of the round:
//! that is the group commit. No callback runs before its bytes are on disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::GroupId;
use crate::config::LogConfig;
use crate::error::{Error, Result};
use crate::log::frame::{self, FRAME_HEADER_BYTES};
use crate::log::group::{GroupLog, Loc, Span, SpanError};
use crate::log::record::{HardState, Record, RecordRef};
use crate::log::segment::{self, Header, SEGMENT_HEADER_BYTES, ScanEnd, SegmentId, Undecodable};

/// Called once with the outcome of a submitted batch: `Ok` only after its bytes are fdatasync'ed.
///
/// It runs on the log's notifier thread, in durability order, so it must be short (send on a
/// channel, wake a task) and must not submit to the log and wait.
pub type OnDurable = Box<dyn FnOnce(Result<()>) + Send + 'static>;

/// Frames read back from disk are checked against the hard cap, not the configured entry limit,
/// so that lowering `entry-bytes-max` never turns old, valid entries into "corruption".
const RECOVERY_PAYLOAD_MAX: u32 = u32::MAX;

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
}

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
    /// Bytes of entry payloads held by the read cache.
    pub cache_bytes: usize,
    /// Estimated heap bytes of the per-group index (locations, spans, hard states).
    pub index_bytes: usize,
}

#[derive(Debug)]
struct Segment {
    /// Set once the writer created the file; always set for every segment below the durable end.
    file: Option<Arc<File>>,
    /// Bytes assigned so far, including frames still queued.
    size: u64,
    /// Entries in this segment that are still part of some group's log.
    live: u64,
}

#[derive(Debug)]
struct Chunk {
    segment: SegmentId,
    offset: u64,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Pending {
    chunks: Vec<Chunk>,
    callbacks: Vec<OnDurable>,
    bytes: usize,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("chunks", &self.chunks.len())
            .field("callbacks", &self.callbacks.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// A position in the log: (segment, byte offset). Ordered as the log is written.
type Pos = (SegmentId, u64);

/// The tail of the log: where the next frame goes.
#[derive(Debug)]
struct Tail {
    segments: BTreeMap<SegmentId, Segment>,
    active: SegmentId,
    pending: Pending,
    segment_bytes_max: u64,
    frame_payload_max: u32,
}

impl Tail {
    fn end(&self) -> Pos {
        (self.active, self.segments[&self.active].size)
    }

    /// Assigns the record its place at the end of the log and queues its frame.
    fn encode(&mut self, record: RecordRef<'_>) -> Loc {
        let payload_len = record.encoded_len();
        let frame_len = (FRAME_HEADER_BYTES + payload_len) as u64;
        let size = self.segments[&self.active].size;
        if size > SEGMENT_HEADER_BYTES as u64 && size + frame_len > self.segment_bytes_max {
            self.active += 1;
            let fresh = Segment {
                file: None,
                size: 0,
                live: 0,
            };
            assert!(
                self.segments.insert(self.active, fresh).is_none(),
                "segment ids only grow"
            );
        }
        let active = self.active;
        let segment = self
            .segments
            .get_mut(&active)
            .expect("active segment is tracked");
        let extends_last = self.pending.chunks.last().is_some_and(|c| {
            c.segment == active && c.offset + c.bytes.len() as u64 == segment.size
        });
        if !extends_last {
            self.pending.chunks.push(Chunk {
                segment: active,
                offset: segment.size,
                bytes: Vec::new(),
            });
        }
        let chunk = self.pending.chunks.last_mut().expect("pushed above");
        let before = chunk.bytes.len();
        if segment.size == 0 {
            segment::encode_header(active, &mut chunk.bytes);
            segment.size = SEGMENT_HEADER_BYTES as u64;
        }
        let offset = segment.size;
        let written = frame::encode_frame_with(
            &mut chunk.bytes,
            payload_len,
            self.frame_payload_max,
            |out| record.encode(out),
        );
        assert_eq!(written as u64, frame_len);
        segment.size += frame_len;
        self.pending.bytes += chunk.bytes.len() - before;
        Loc {
            segment: active,
            offset: u32::try_from(offset).expect("segment-bytes-max is at most 4 GiB"),
            len: u32::try_from(frame_len).expect("frames are bounded by entry-bytes-max"),
        }
    }
}

#[derive(Debug)]
struct Reclaim {
    /// Segments with ids below this are deleted once the log is durable up to `after`.
    below: SegmentId,
    after: Pos,
}

#[derive(Debug)]
struct State {
    groups: HashMap<GroupId, GroupLog>,
    tail: Tail,
    /// Everything before this position is fdatasync'ed.
    durable: Pos,
    cache_bytes: usize,
    /// `(group, index, append sequence number)` in append order: the cache's eviction queue.
    cache_queue: VecDeque<(GroupId, u64, u64)>,
    cache_queue_compact_at: usize,
    append_seq: u64,
    reclaim: Option<Reclaim>,
    failed: bool,
    closing: bool,
    /// The writer is waiting on `work` and must be woken for new work...
    writer_idle: bool,
    /// ...once this many callbacks are queued (more than one while it lingers).
    wake_at_callbacks: usize,
    /// Submitters waiting on `room`.
    room_waiters: usize,
}

#[derive(Debug, Default)]
struct Counters {
    rounds: AtomicU64,
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    bytes_written: AtomicU64,
    batches: AtomicU64,
    entries: AtomicU64,
    reclaimed: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    config: Arc<LogConfig>,
    state: Mutex<State>,
    /// The writer waits here for work.
    work: Condvar,
    /// Submitters wait here for room under `pending-bytes-max`.
    room: Condvar,
    counters: Counters,
    /// Held for the engine's life so that two processes never write one log.
    _lock: File,
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
        fs::create_dir_all(&dir).map_err(|e| Error::io("create log directory", &dir, e))?;
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
                    std::io::Error::new(std::io::ErrorKind::WouldBlock, "another process holds it")
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
        let shared = Arc::new(Shared {
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
        let engine = LogEngine {
            shared,
            threads: vec![writer, notifier],
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
                return Err(Error::EntryTooLarge {
                    group,
                    index,
                    bytes,
                    max: config.entry_bytes_max,
                });
            }
        }
        let mut state = self.lock();
        loop {
            if state.failed {
                return Err(Error::Failed);
            }
            if state.closing {
                return Err(Error::Closed);
            }
            let bytes = validate(&state, &batch, config)?;
            if bytes > config.batch_bytes_max {
                return Err(Error::BatchTooLarge {
                    bytes,
                    max: config.batch_bytes_max,
                });
            }
            let queued = state.tail.pending.bytes;
            if queued == 0 || queued + bytes <= config.pending_bytes_max {
                break;
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
            for index in lo..hi {
                if let Some((_, data)) = g.cached(index) {
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

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock is a bug already reported; the state is still consistent
    // because every mutation is validated first.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
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
            | Op::PurgeTo { group, .. } => *group,
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

fn release(segments: &mut BTreeMap<SegmentId, Segment>, loc: Loc) {
    let segment = segments
        .get_mut(&loc.segment)
        .expect("entries point at tracked segments");
    segment.live = segment
        .live
        .checked_sub(1)
        .expect("live count covers every entry");
}

/// Drops the oldest cached payloads until the cache fits; entries not yet durable are kept.
fn evict(state: &mut State, cache_bytes_max: usize) {
    while state.cache_bytes > cache_bytes_max {
        let Some(&(group, index, seq)) = state.cache_queue.front() else {
            break;
        };
        if let Some(g) = state.groups.get_mut(&group)
            && g.cached(index).is_some_and(|(s, _)| *s == seq)
        {
            let loc = g.loc(index).expect("cached entries are indexed");
            if (loc.segment, u64::from(loc.offset) + u64::from(loc.len)) > state.durable {
                break;
            }
            // Queue order is append order and a group's cache is a suffix: the oldest live queue
            // item of a group is that group's oldest cached entry.
            assert_eq!(g.cache_first(), index, "oldest queued is oldest cached");
            state.cache_bytes -= g.evict(index);
        }
        state.cache_queue.pop_front();
    }
    // Truncations and purges leave stale queue items behind; drop them once they dominate.
    if state.cache_queue.len() >= state.cache_queue_compact_at {
        let groups = &state.groups;
        state.cache_queue.retain(|(group, index, seq)| {
            groups
                .get(group)
                .and_then(|g| g.cached(*index))
                .is_some_and(|(s, _)| s == seq)
        });
        state.cache_queue_compact_at = (2 * state.cache_queue.len()).max(1 << 16);
    }
}

/// Rounds whose callbacks may wait for the notifier before the writer itself waits.
const NOTIFY_ROUNDS_MAX: usize = 1024;

/// Callbacks of one round and its outcome, handed from the writer to the notifier.
type Notice = (Vec<OnDurable>, Result<()>);

/// Runs callbacks in round order on their own thread, so that waking hundreds of waiters overlaps
/// with the writer's next write and fdatasync instead of delaying it.
fn notifier_loop(notices: std::sync::mpsc::Receiver<Notice>, queued: &AtomicU64) {
    for (callbacks, result) in notices {
        for callback in callbacks {
            callback(result.clone());
        }
        queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Rounds with at most this many callbacks run them on the writer itself when the notifier is
/// idle: one waiter is woken sooner directly than through another thread.
const INLINE_CALLBACKS_MAX: usize = 4;

/// A round that completed at least this many callbacks makes the writer linger before the next.
const LINGER_CALLBACKS_MIN: usize = 2 * INLINE_CALLBACKS_MAX;

fn writer_loop(shared: &Shared, notify: &std::sync::mpsc::SyncSender<Notice>, queued: &AtomicU64) {
    let linger = Duration::from_micros(shared.config.group_commit_linger_us);
    let mut last_round = 0;
    loop {
        let (chunks, callbacks, files, room_waiters) = {
            let mut state = lock(shared);
            // The many callers completed by the last round are about to submit again: give them a
            // moment to arrive, so that one fdatasync covers them all instead of a trickle each.
            if last_round >= LINGER_CALLBACKS_MIN && !linger.is_zero() {
                let want = last_round * 3 / 4;
                let deadline = Instant::now() + linger;
                while state.tail.pending.callbacks.len() < want && !state.closing {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    state.writer_idle = true;
                    state.wake_at_callbacks = want;
                    state = shared
                        .work
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    state.writer_idle = false;
                }
            }
            while state.tail.pending.chunks.is_empty() && state.tail.pending.callbacks.is_empty() {
                if state.closing {
                    return;
                }
                state.writer_idle = true;
                state.wake_at_callbacks = 1;
                state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
                state.writer_idle = false;
            }
            last_round = state.tail.pending.callbacks.len();
            let pending = std::mem::take(&mut state.tail.pending);
            let room_waiters = state.room_waiters;
            let files: HashMap<SegmentId, Arc<File>> = pending
                .chunks
                .iter()
                .filter_map(|c| Some((c.segment, state.tail.segments[&c.segment].file.clone()?)))
                .collect();
            (pending.chunks, pending.callbacks, files, room_waiters)
        };
        if room_waiters > 0 {
            shared.room.notify_all();
        }
        let result = write_round(shared, &chunks, files);
        let deletions = {
            let mut state = lock(shared);
            let result = match result {
                Ok(created) => {
                    for (id, file) in created {
                        state.tail.segments.get_mut(&id).expect("tracked").file = Some(file);
                    }
                    if let Some(last) = chunks.last() {
                        let end = (last.segment, last.offset + last.bytes.len() as u64);
                        assert!(end > state.durable, "the durable end only moves forward");
                        state.durable = end;
                    }
                    evict(&mut state, shared.config.cache_bytes_max);
                    Ok(plan_reclaim(&mut state, shared))
                }
                Err(e) => {
                    tracing::error!(error = %e, "log write failed; the log refuses all further writes");
                    state.failed = true;
                    Err(e)
                }
            };
            let stranded = if state.failed {
                std::mem::take(&mut state.tail.pending.callbacks)
            } else {
                Vec::new()
            };
            let room_waiters = state.room_waiters;
            drop(state);
            if room_waiters > 0 {
                shared.room.notify_all();
            }
            let (callbacks, result, deletions) = match result {
                Ok(deletions) => (callbacks, Ok(()), deletions),
                Err(e) => (
                    callbacks.into_iter().chain(stranded).collect(),
                    Err(e),
                    Vec::new(),
                ),
            };
            // Callbacks run in round order: inline only when no earlier round is still queued.
            if callbacks.len() <= INLINE_CALLBACKS_MAX && queued.load(Ordering::Acquire) == 0 {
                for callback in callbacks {
                    callback(result.clone());
                }
            } else {
                queued.fetch_add(1, Ordering::AcqRel);
                if notify.send((callbacks, result)).is_err() {
                    tracing::error!("log notifier thread is gone; callbacks were dropped");
                }
            }
            deletions
        };
        delete_segments(shared, deletions);
    }
}

/// Writes one round's chunks in order and makes them durable. A new segment file is created only
/// after the previous segment is fdatasync'ed, so only the newest segment can ever be torn.
fn write_round(
    shared: &Shared,
    chunks: &[Chunk],
    mut files: HashMap<SegmentId, Arc<File>>,
) -> Result<Vec<(SegmentId, Arc<File>)>> {
    let dir = &shared.config.dir;
    let mut created = Vec::new();
    let mut current: Option<(SegmentId, Arc<File>)> = None;
    for chunk in chunks {
        let path = dir.join(segment::file_name(chunk.segment));
        if current.as_ref().is_none_or(|(id, _)| *id != chunk.segment) {
            if let Some((id, file)) = current.take() {
                sync(shared, &file, &dir.join(segment::file_name(id)))?;
            }
            let file = if chunk.offset == 0 {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| Error::io("create segment", &path, e))?;
                let file = Arc::new(file);
                created.push((chunk.segment, Arc::clone(&file)));
                debug!(segment = chunk.segment, "log segment created");
                file
            } else {
                files
                    .remove(&chunk.segment)
                    .expect("a segment with data has a file")
            };
            current = Some((chunk.segment, file));
        }
        let (_, file) = current.as_ref().expect("set above");
        file.write_all_at(&chunk.bytes, chunk.offset)
            .map_err(|e| Error::io("write segment", &path, e))?;
        shared
            .counters
            .bytes_written
            .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
    }
    if let Some((id, file)) = current {
        sync(shared, &file, &dir.join(segment::file_name(id)))?;
    }
    if !created.is_empty() {
        sync_dir(dir)?;
    }
    shared.counters.rounds.fetch_add(1, Ordering::Relaxed);
    Ok(created)
}

fn sync(shared: &Shared, file: &File, path: &Path) -> Result<()> {
    let started = Instant::now();
    file.sync_data()
        .map_err(|e| Error::io("fdatasync segment", path, e))?;
    shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
    shared
        .counters
        .fsync_nanos
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync log directory", dir, e))
}

/// Decides which old segments can go. A segment goes once no group has a live entry in it and no
/// group's newest hard state or purge point is recorded only there: those records are first
/// rewritten at the tail, and the segment is deleted only after the rewrite is durable. Only a
/// prefix of segments is ever deleted, so a truncation record never outlives what it truncates.
/// Returns the segments to delete now.
fn plan_reclaim(state: &mut State, shared: &Shared) -> Vec<SegmentId> {
    if let Some(reclaim) = &state.reclaim {
        if state.durable < reclaim.after {
            return Vec::new();
        }
        let below = reclaim.below;
        state.reclaim = None;
        let doomed: Vec<SegmentId> = state
            .tail
            .segments
            .range(..below)
            .map(|(&id, _)| id)
            .collect();
        for id in &doomed {
            let segment = state.tail.segments.remove(id).expect("listed above");
            assert_eq!(segment.live, 0, "a reclaimed segment holds no live entry");
        }
        debug_assert!(state.groups.values().all(|g| {
            g.hard_state_segment.is_none_or(|s| s >= below)
                && g.purge_segment.is_none_or(|s| s >= below)
        }));
        return doomed;
    }
    let active = state.tail.active;
    let below = state
        .tail
        .segments
        .iter()
        .find(|(id, s)| **id == active || s.live > 0)
        .map(|(&id, _)| id)
        .expect("the active segment is tracked");
    if state
        .tail
        .segments
        .keys()
        .next()
        .is_none_or(|&first| first >= below)
    {
        return Vec::new();
    }
    let State { groups, tail, .. } = state;
    let mut rewrites = 0;
    for (&group, g) in groups.iter_mut() {
        if g.hard_state_segment.is_some_and(|s| s < below) {
            let loc = tail.encode(RecordRef::HardState {
                group,
                state: &g.hard_state,
            });
            g.hard_state_segment = Some(loc.segment);
            rewrites += 1;
        }
        if let (Some(s), Some(purged)) = (g.purge_segment, g.span.purged)
            && s < below
        {
            let loc = tail.encode(RecordRef::PurgeTo {
                group,
                index: purged,
                marker: &g.marker,
            });
            g.purge_segment = Some(loc.segment);
            rewrites += 1;
        }
    }
    debug!(below, rewrites, "log reclaim planned");
    state.reclaim = Some(Reclaim {
        below,
        after: state.tail.end(),
    });
    if rewrites > 0 {
        shared.work.notify_one();
        Vec::new()
    } else {
        plan_reclaim(state, shared)
    }
}

fn delete_segments(shared: &Shared, ids: Vec<SegmentId>) {
    if ids.is_empty() {
        return;
    }
    let dir = &shared.config.dir;
    for id in &ids {
        let path = dir.join(segment::file_name(*id));
        // A segment that cannot be deleted only wastes disk; recovery reclaims it next time.
        if let Err(e) = fs::remove_file(&path) {
            warn!(segment = id, error = %e, "failed to delete reclaimed log segment");
        }
    }
    if let Err(e) = sync_dir(dir) {
        warn!(error = %e, "failed to fsync log directory after reclaim");
    }
    shared
        .counters
        .reclaimed
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    debug!(count = ids.len(), "log segments reclaimed");
}

/// Rebuilds the in-memory state from the segment files.
fn recover(config: &LogConfig) -> Result<State> {
    let dir = &config.dir;
    let mut ids = Vec::new();
    for dirent in fs::read_dir(dir).map_err(|e| Error::io("list log directory", dir, e))? {
        let dirent = dirent.map_err(|e| Error::io("list log directory", dir, e))?;
        if let Some(id) = dirent
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    for pair in ids.windows(2) {
        if pair[1] != pair[0] + 1 {
            let path = dir.join(segment::file_name(pair[0] + 1));
            return Err(Error::Corrupt {
                path,
                offset: 0,
                reason: "segment file is missing",
            });
        }
    }
    let mut state = State {
        groups: HashMap::new(),
        tail: Tail {
            segments: BTreeMap::new(),
            active: ids.first().copied().unwrap_or(1),
            pending: Pending::default(),
            segment_bytes_max: config.segment_bytes_max,
            frame_payload_max: config.frame_payload_max(),
        },
        durable: (0, 0),
        cache_bytes: 0,
        cache_queue: VecDeque::new(),
        cache_queue_compact_at: 1 << 16,
        append_seq: 0,
        reclaim: None,
        failed: false,
        closing: false,
        writer_idle: false,
        wake_at_callbacks: 1,
        room_waiters: 0,
    };
    let mut bytes = Vec::new();
    for (n, &id) in ids.iter().enumerate() {
        let last = n + 1 == ids.len();
        let path = dir.join(segment::file_name(id));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open segment", &path, e))?;
        bytes.clear();
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io("read segment", &path, e))?;
        if bytes.len() as u64 > u64::from(u32::MAX) {
            return Err(Error::Corrupt {
                path,
                offset: u64::from(u32::MAX),
                reason: "segment is larger than 4 GiB",
            });
        }
        match segment::check_header(&bytes, id) {
            Header::Valid => {}
            Header::Unwritten if last => {
                warn!(
                    segment = id,
                    "removing a log segment whose creation was cut short"
                );
                drop(file);
                fs::remove_file(&path)
                    .map_err(|e| Error::io("remove unwritten segment", &path, e))?;
                sync_dir(dir)?;
                state.tail.active = id;
                break;
            }
            Header::Unwritten => {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    reason: "segment header is missing",
                });
            }
            Header::Invalid(reason) => {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    reason,
                });
            }
        }
        state.tail.segments.insert(
            id,
            Segment {
                file: None,
                size: 0,
                live: 0,
            },
        );
        state.tail.active = id;
        let end = segment::scan(&bytes, RECOVERY_PAYLOAD_MAX, |offset, len, record| {
            replay(&mut state, id, offset, len, record).map_err(|reason| {
                ScanError::Engine(Error::Corrupt {
                    path: path.clone(),
                    offset,
                    reason,
                })
            })
        })
        .map_err(|e| match e {
            ScanError::Undecodable(Undecodable { offset, reason }) => Error::Corrupt {
                path: path.clone(),
                offset,
                reason,
            },
            ScanError::Engine(e) => e,
        })?;
        let size = match end {
            ScanEnd::Clean => bytes.len() as u64,
            ScanEnd::Damaged { offset, fault } if last => {
                warn!(
                    segment = id,
                    offset,
                    dropped_bytes = bytes.len() as u64 - offset,
                    fault = fault.as_str(),
                    "cutting the torn tail of the newest log segment"
                );
                file.set_len(offset)
                    .map_err(|e| Error::io("truncate torn segment tail", &path, e))?;
                file.sync_all()
                    .map_err(|e| Error::io("fsync truncated segment", &path, e))?;
                offset
            }
            ScanEnd::Damaged { offset, fault } => {
                return Err(Error::Corrupt {
                    path,
                    offset,
                    reason: fault.as_str(),
                });
            }
        };
        let segment = state.tail.segments.get_mut(&id).expect("inserted above");
        segment.size = size;
        segment.file = Some(Arc::new(file));
    }
    let active = state.tail.active;
    state.tail.segments.entry(active).or_insert(Segment {
        file: None,
        size: 0,
        live: 0,
    });
    state.durable = state.tail.end();
    for g in state.groups.values() {
        g.check_invariants();
    }
    Ok(state)
}

enum ScanError {
    Undecodable(Undecodable),
    Engine(Error),
}

impl From<Undecodable> for ScanError {
    fn from(u: Undecodable) -> Self {
        ScanError::Undecodable(u)
    }
}

impl From<Error> for ScanError {
    fn from(e: Error) -> Self {
        ScanError::Engine(e)
    }
}

/// Applies one recovered record. The log was written under the same rules, so a record that
/// breaks them is corruption (or a bug), reported with its place.
fn replay(
    state: &mut State,
    segment: SegmentId,
    offset: u64,
    len: u32,
    record: Record,
) -> Result<(), &'static str> {
    let loc = Loc {
        segment,
        offset: u32::try_from(offset).map_err(|_| "offset beyond 4 GiB")?,
        len,
    };
    let State { groups, tail, .. } = state;
    match record {
        Record::Entry { group, index, .. } => {
            if index == u64::MAX {
                return Err("entry index is out of range");
            }
            let g = groups.entry(group).or_default();
            if let Err(SpanError::NotContiguous { expected }) = g.span.clone().append(index) {
                // An empty group may resume past its expected index: the entries in between sat in
                // reclaimed segments and are purged by a record further on (reclaim only deletes
                // segments whose entries are all dead). Within a run of entries there is no gap.
                if !g.span.is_empty() || index < expected {
                    return Err("entry does not follow its group's log");
                }
                g.resume_at(index, loc);
            } else {
                g.push(index, loc, None);
            }
            tail.segments.get_mut(&segment).expect("tracked").live += 1;
        }
        Record::HardState { group, state } => {
            let g = groups.entry(group).or_default();
            g.hard_state = state;
            g.hard_state_segment = Some(segment);
        }
        Record::TruncateFrom { group, index } => {
            let g = groups.entry(group).or_default();
            g.span
                .clone()
                .truncate(index)
                .map_err(|_| "truncation below the purge point")?;
            let segments = &mut tail.segments;
            g.truncate(index, |loc| release(segments, loc));
        }
        Record::PurgeTo {
            group,
            index,
            marker,
        } => {
            let g = groups.entry(group).or_default();
            match g
                .span
                .clone()
                .purge(index)
                .map_err(|_| "purge index out of range")?
            {
                Some(_) => {
                    let segments = &mut tail.segments;
                    g.purge(index, marker, |loc| release(segments, loc));
                }
                // A purge record rewritten by reclaim repeats the current purge point.
                None if g.span.purged == Some(index) => g.marker = marker,
                None => return Err("purge record goes backwards"),
            }
            g.purge_segment = Some(segment);
        }
    }
    Ok(())
}
