//! Recovery: rebuilding the index from the segment files on open.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::sync::Arc;

use tracing::warn;

use crate::config::LogConfig;
use crate::error::{Error, Result};
use crate::log::engine::RECOVERY_PAYLOAD_MAX;
use crate::log::frame::{self, FRAME_HEADER_BYTES, FrameFault};
use crate::log::group::{Loc, SpanError};
use crate::log::record::{ROUND_END_PAYLOAD_BYTES, Record};
use crate::log::segment::{self, Header, SEGMENT_HEADER_BYTES, ScanEnd, SegmentId, Undecodable};
use crate::log::state::{Pending, Segment, State, Tail, release};
use crate::log::writer::sync_dir;

/// Rebuilds the in-memory state from the segment files.
pub(super) fn recover(config: &LogConfig) -> Result<State> {
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
            // Limits are enforced with typed errors at submit; the tail asserts only the hard cap,
            // so that rewriting an old record after `entry-bytes-max` shrank cannot panic.
            frame_payload_max: RECOVERY_PAYLOAD_MAX / 2,
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
            // The newest segment was prepared zero-filled (prealloc.rs): its frames end where
            // the zeros begin, and the writer goes on from there.
            ScanEnd::Damaged {
                offset,
                fault: FrameFault::Empty,
            } if last && bytes[offset as usize..].iter().all(|&b| b == 0) => offset,
            ScanEnd::Damaged { offset, fault } if last => {
                // Only the last write round may be torn: every earlier round was fdatasync'ed
                // before the next was written. A round closed after the damage proves the damage
                // is not in the last round: it is corruption of acknowledged records, and cutting
                // there could drop a vote.
                if round_closed_after(&bytes, offset) {
                    return Err(Error::Corrupt {
                        path,
                        offset,
                        reason: "damaged frame followed by later acknowledged write rounds",
                    });
                }
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

/// Looks past the damaged frame at `damaged` for an intact `RoundEnd` record of a round that
/// began after it. A torn last round has none: the only round end that can follow its damage is
/// its own, which begins at or before the damage. Frames after damage are found by trying every
/// offset (frames are not aligned); only records of the `RoundEnd` length are candidates.
fn round_closed_after(bytes: &[u8], damaged: u64) -> bool {
    let frame_len = FRAME_HEADER_BYTES + ROUND_END_PAYLOAD_BYTES;
    let want = (ROUND_END_PAYLOAD_BYTES as u32).to_le_bytes();
    let mut at = usize::try_from(damaged).map_or(usize::MAX, |d| d.saturating_add(1));
    while at
        .checked_add(frame_len)
        .is_some_and(|end| end <= bytes.len())
    {
        if bytes[at..at + 4] == want
            && let Ok((payload, _)) =
                frame::decode_frame(&bytes[at..], ROUND_END_PAYLOAD_BYTES as u32)
            && let Ok(Record::RoundEnd { start }) = Record::decode(payload)
            && start > damaged
            && start <= at as u64
        {
            return true;
        }
        at += 1;
    }
    false
}

pub(super) enum ScanError {
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
pub(super) fn replay(
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
        Record::Forget { group } => {
            if let Some(mut g) = groups.remove(&group) {
                let segments = &mut tail.segments;
                g.drop_all(|loc| release(segments, loc));
            }
        }
        Record::RoundEnd { start } => {
            if start > offset || start < SEGMENT_HEADER_BYTES as u64 {
                return Err("round end names a start outside its segment's frames");
            }
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
