//! The log's shared in-memory state: the tail being written, the segments, the per-group index
//! and the read cache, behind one mutex.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::GroupId;
use crate::config::LogConfig;
use crate::log::engine::OnDurable;
use crate::log::frame::{self, FRAME_HEADER_BYTES};
use crate::log::group::{GroupLog, Loc};
use crate::log::prealloc::Prealloc;
use crate::log::record::{ROUND_END_PAYLOAD_BYTES, RecordRef};
use crate::log::segment::{self, SEGMENT_HEADER_BYTES, SegmentId};

#[derive(Debug)]
pub(super) struct Segment {
    /// Set once the writer created the file; always set for every segment below the durable end.
    pub(super) file: Option<Arc<File>>,
    /// Bytes assigned so far, including frames still queued.
    pub(super) size: u64,
    /// Entries in this segment that are still part of some group's log.
    pub(super) live: u64,
}

#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) segment: SegmentId,
    pub(super) offset: u64,
    pub(super) bytes: Vec<u8>,
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) chunks: Vec<Chunk>,
    pub(super) callbacks: Vec<OnDurable>,
    pub(super) bytes: usize,
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
pub(super) type Pos = (SegmentId, u64);

/// The tail of the log: where the next frame goes.
#[derive(Debug)]
pub(super) struct Tail {
    pub(super) segments: BTreeMap<SegmentId, Segment>,
    pub(super) active: SegmentId,
    pub(super) pending: Pending,
    pub(super) segment_bytes_max: u64,
    pub(super) frame_payload_max: u32,
}

impl Tail {
    pub(super) fn end(&self) -> Pos {
        (self.active, self.segments[&self.active].size)
    }

    /// Closes the pending round with a `RoundEnd` record naming where the round's frames begin in
    /// the segment that receives the record. Nothing to close when no frame is pending.
    pub(super) fn seal_round(&mut self) {
        let Some(last) = self.pending.chunks.last() else {
            return;
        };
        let frame_len = (FRAME_HEADER_BYTES + ROUND_END_PAYLOAD_BYTES) as u64;
        let size = self.segments[&self.active].size;
        let rolls = size > SEGMENT_HEADER_BYTES as u64 && size + frame_len > self.segment_bytes_max;
        let start = if rolls {
            SEGMENT_HEADER_BYTES as u64
        } else {
            let segment = last.segment;
            let first = self
                .pending
                .chunks
                .iter()
                .find(|c| c.segment == segment)
                .expect("the last chunk is in its own segment");
            first.offset.max(SEGMENT_HEADER_BYTES as u64)
        };
        self.encode(RecordRef::RoundEnd { start });
    }

    /// Assigns the record its place at the end of the log and queues its frame.
    pub(super) fn encode(&mut self, record: RecordRef<'_>) -> Loc {
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
pub(super) struct Reclaim {
    /// Segments with ids below this are deleted once the log is durable up to `after`.
    pub(super) below: SegmentId,
    pub(super) after: Pos,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) groups: HashMap<GroupId, GroupLog>,
    pub(super) tail: Tail,
    /// Everything before this position is fdatasync'ed.
    pub(super) durable: Pos,
    pub(super) cache_bytes: usize,
    /// `(group, index, append sequence number)` in append order: the cache's eviction queue.
    pub(super) cache_queue: VecDeque<(GroupId, u64, u64)>,
    pub(super) cache_queue_compact_at: usize,
    pub(super) append_seq: u64,
    pub(super) reclaim: Option<Reclaim>,
    pub(super) failed: bool,
    pub(super) closing: bool,
    /// The writer is waiting on `work` and must be woken for new work...
    pub(super) writer_idle: bool,
    /// ...once this many callbacks are queued (more than one while it lingers).
    pub(super) wake_at_callbacks: usize,
    /// Submitters waiting on `room`.
    pub(super) room_waiters: usize,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) rounds: AtomicU64,
    pub(super) fsyncs: AtomicU64,
    pub(super) fsync_nanos: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) batches: AtomicU64,
    pub(super) entries: AtomicU64,
    pub(super) reclaimed: AtomicU64,
    pub(super) reclaimed_bytes: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: Arc<LogConfig>,
    pub(super) state: Mutex<State>,
    /// The writer waits here for work.
    pub(super) work: Condvar,
    /// Submitters wait here for room under `pending-bytes-max`.
    pub(super) room: Condvar,
    pub(super) counters: Counters,
    /// The next segment's file, zero-filled ahead of need.
    pub(super) prealloc: Prealloc,
    /// Held for the engine's life so that two processes never write one log.
    pub(super) _lock: File,
}

pub(super) fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock is a bug already reported; the state is still consistent
    // because every mutation is validated first.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn release(segments: &mut BTreeMap<SegmentId, Segment>, loc: Loc) {
    let segment = segments
        .get_mut(&loc.segment)
        .expect("entries point at tracked segments");
    segment.live = segment
        .live
        .checked_sub(1)
        .expect("live count covers every entry");
}

/// Drops the oldest cached payloads until the cache fits; entries not yet durable are kept.
pub(super) fn evict(state: &mut State, cache_bytes_max: usize) {
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
