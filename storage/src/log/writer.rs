//! The writer thread (group commit), the notifier thread (callbacks in order), and segment
//! reclaim.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::log::engine::OnDurable;
use crate::log::record::RecordRef;
use crate::log::segment::{self, SegmentId};
use crate::log::state::{Chunk, Reclaim, Shared, State, evict, lock};

/// Rounds whose callbacks may wait for the notifier before the writer itself waits.
pub(super) const NOTIFY_ROUNDS_MAX: usize = 1024;

/// Callbacks of one round and its outcome, handed from the writer to the notifier.
pub(super) type Notice = (Vec<OnDurable>, Result<()>);

/// Runs callbacks in round order on their own thread, so that waking hundreds of waiters overlaps
/// with the writer's next write and fdatasync instead of delaying it.
pub(super) fn notifier_loop(notices: std::sync::mpsc::Receiver<Notice>, queued: &AtomicU64) {
    for (callbacks, result) in notices {
        for callback in callbacks {
            run_callback(callback, result.clone());
        }
        queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Rounds with at most this many callbacks run them on the writer itself when the notifier is
/// idle: one waiter is woken sooner directly than through another thread.
pub(super) const INLINE_CALLBACKS_MAX: usize = 4;

/// A round that completed at least this many callbacks makes the writer linger before the next.
pub(super) const LINGER_CALLBACKS_MIN: usize = 2 * INLINE_CALLBACKS_MAX;

pub(super) fn writer_loop(
    shared: &Shared,
    notify: &std::sync::mpsc::SyncSender<Notice>,
    queued: &AtomicU64,
) {
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
            state.tail.seal_round();
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
            // After a failed write or fsync the page cache cannot be trusted (a failed fsync is
            // reported once and the pages are marked clean): nothing queued behind it may be
            // written, `durable` never moves again, and no segment is reclaimed.
            let stranded = if state.failed {
                state.tail.pending.chunks.clear();
                state.tail.pending.bytes = 0;
                state.reclaim = None;
                std::mem::take(&mut state.tail.pending.callbacks)
            } else {
                Vec::new()
            };
            let failed = state.failed;
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
                    run_callback(callback, result.clone());
                }
            } else {
                queued.fetch_add(1, Ordering::AcqRel);
                if notify.send((callbacks, result)).is_err() {
                    tracing::error!("log notifier thread is gone; callbacks were dropped");
                }
            }
            if failed {
                return;
            }
            deletions
        };
        delete_segments(shared, deletions);
    }
}

/// Runs one callback; a panicking callback is a bug in its caller, reported, and must not take the
/// writer or the notifier (and so every later callback) down with it.
fn run_callback(callback: OnDurable, result: Result<()>) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(result))).is_err() {
        tracing::error!("a log durability callback panicked");
    }
}

/// Writes one round's chunks in order and makes them durable. A new segment file is created only
/// after the previous segment is fdatasync'ed, so only the newest segment can ever be torn.
pub(super) fn write_round(
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
                cut_previous_segment(shared, chunk.segment, &created)?;
                let prepared = shared
                    .prealloc
                    .take(&path)
                    .map_err(|e| Error::io("rename the prepared segment", &path, e))?;
                let file = match prepared {
                    Some(file) => file,
                    None => OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(|e| Error::io("create segment", &path, e))?,
                };
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

/// Cuts the segment before `segment` to the bytes it holds, durably, before `segment` exists: a
/// zero-filled (prepared) tail is allowed only in the newest segment.
/// `created`: the segments this round created so far (not yet in the state).
fn cut_previous_segment(
    shared: &Shared,
    segment: SegmentId,
    created: &[(SegmentId, Arc<File>)],
) -> Result<()> {
    let Some(previous) = segment.checked_sub(1) else {
        return Ok(());
    };
    let used = {
        let state = lock(shared);
        state.tail.segments.get(&previous).and_then(|s| {
            let file = created
                .iter()
                .find(|(id, _)| *id == previous)
                .map(|(_, f)| Arc::clone(f))
                .or_else(|| s.file.clone())?;
            Some((s.size, file))
        })
    };
    let Some((size, file)) = used else {
        return Ok(());
    };
    let path = shared.config.dir.join(segment::file_name(previous));
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat segment", &path, e))?
        .len();
    if len > size {
        file.set_len(size)
            .map_err(|e| Error::io("cut the segment's unused tail", &path, e))?;
        file.sync_all()
            .map_err(|e| Error::io("fsync the cut segment", &path, e))?;
    }
    Ok(())
}

pub(super) fn sync(shared: &Shared, file: &File, path: &Path) -> Result<()> {
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

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync log directory", dir, e))
}

/// Decides which old segments can go. A segment goes once no group has a live entry in it and no
/// group's newest hard state or purge point is recorded only there: those records are first
/// rewritten at the tail, and the segment is deleted only after the rewrite is durable. Only a
/// prefix of segments is ever deleted, so a truncation record never outlives what it truncates.
/// Returns the segments to delete now.
pub(super) fn plan_reclaim(state: &mut State, shared: &Shared) -> Vec<SegmentId> {
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

pub(super) fn delete_segments(shared: &Shared, ids: Vec<SegmentId>) {
    if ids.is_empty() {
        return;
    }
    let dir = &shared.config.dir;
    // Oldest first, each unlink made durable before the next, stopping at the first failure: the
    // files left are always a suffix-free prefix gap-less run, which recovery replays consistently
    // (their entries are dead by records further on) and reclaims again.
    let mut deleted = 0;
    for id in &ids {
        let path = dir.join(segment::file_name(*id));
        let bytes = fs::metadata(&path).map_or(0, |m| m.len());
        if let Err(e) = fs::remove_file(&path).and_then(|()| File::open(dir)?.sync_all()) {
            warn!(segment = id, error = %e, "failed to delete a reclaimed log segment; retried after restart");
            break;
        }
        deleted += 1;
        shared
            .counters
            .reclaimed_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }
    shared
        .counters
        .reclaimed
        .fetch_add(deleted, Ordering::Relaxed);
    debug!(count = deleted, "log segments reclaimed");
}
