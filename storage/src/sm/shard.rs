//! `ShardStore`: the state of one shard replica, one sled tree.
//!
//! Key layout inside the tree (first byte is the space):
//! ```text
//! 0x00 "applied"     applied index u64 BE | caller's log id bytes
//! 0x00 "membership"  caller's membership bytes
//! 0x01 client u64 BE session: last seq u64 BE | last index u64 BE | outcome (5 bytes)
//! 0x02 user key      user value
//! 0x03 "range"       the hash range owned since a split (absent: the map's range)
//! 0x03 "split"       the last split: at u64 BE | child shard u64 BE
//! ```
//! Applying a run of entries puts their data, the session records and the applied id into the
//! shard's write-back buffer, an ordered map in memory that every read consults before the tree.
//! The buffer goes to sled when it holds `write-back-bytes` or at the next flush, as one atomic
//! `sled::Batch`, or, when it holds chain entries, in two steps around a flush
//! (`write_back.rs`). Either way, after a crash the store is exactly at some applied index, and
//! the layer above re-applies the log from there.
//!
//! Why not one sled batch per apply run: every `sled::Batch` makes sled seal and write its own
//! I/O buffer on a thread pool that wakes all its threads per job. At a few thousand small runs
//! per second per node that was more than half of the node's context switches.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use crate::ShardId;
use crate::error::{Error, Result};
use crate::sm::command::Outcome;
use crate::sm::range::{HashRange, KeyRoute};
use crate::sm::write_back::WriteBack;

pub(crate) const SPACE_META: u8 = 0x00;
pub(crate) const SPACE_SESSION: u8 = 0x01;
pub(crate) const SPACE_DATA: u8 = 0x02;
/// Shard-level state carried in snapshots (the meta space is not: it describes the replica).
pub(crate) const SPACE_SHARD: u8 = 0x03;
pub(crate) const KEY_APPLIED: &[u8] = b"\x00applied";
pub(crate) const KEY_RANGE: &[u8] = b"\x03range";
/// The last split applied: at u64 BE | child u64 BE.
pub(crate) const KEY_SPLIT: &[u8] = b"\x03split";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"\x00membership";

/// The applied position of a shard replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    /// The caller's encoding of the log id (for openraft: term, leader and index).
    pub log_id: Bytes,
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    pub items: Vec<(Bytes, Bytes)>,
    /// Another item follows the page.
    pub more: bool,
}

/// One shard replica's state. Cheap to share: reads take a read lock on the write-back buffer
/// and sled's own.
#[derive(Debug)]
pub struct ShardStore {
    pub(crate) shard: ShardId,
    /// Applied writes not yet in the tree; changed only under `apply_lock`.
    pub(crate) write_back: RwLock<WriteBack>,
    /// Size of the buffer that triggers a write to the tree.
    pub(crate) write_back_bytes: usize,
    /// Applied index + 1 as held by the tree (behind `applied` while the buffer holds writes).
    pub(crate) stored_applied: AtomicU64,
    /// The live tree; swapped whole when a snapshot is installed.
    pub(crate) tree: RwLock<sled::Tree>,
    /// Serialises applies, snapshot builds and installs.
    pub(crate) apply_lock: Mutex<()>,
    /// Applied index + 1, 0 when nothing is applied (mirrors the tree for cheap reads).
    pub(crate) applied: AtomicU64,
    /// Applied index + 1 as of the last completed flush of the whole database.
    pub(crate) durable_applied: AtomicU64,
    /// The applied id and membership the tree held at the last completed flush.
    pub(crate) durable_checkpoint: Mutex<Option<Checkpoint>>,
    /// Snapshot views holding the tree still (see `snapshot/view.rs`).
    pub(crate) hold: Mutex<Hold>,
    /// Bytes the write-back buffer may grow to while a view holds the tree.
    pub(crate) hold_bytes_max: usize,
    /// The routing hash of keys (none: keys are never checked against a range).
    pub(crate) route: Option<KeyRoute>,
    /// The range owned since a split, as applied (mirrors `KEY_RANGE`; changed under
    /// `apply_lock`).
    pub(crate) range: RwLock<Option<HashRange>>,
    /// Bytes of keys and values put by applied batches since this replica was opened (a cheap
    /// sign of growth: the split check measures the shard only after enough of it).
    pub(crate) written_bytes: AtomicU64,
    /// Removed from the store (set under `apply_lock`): flushes leave it alone.
    pub(crate) removed: AtomicBool,
}

/// A durable state of a shard replica: its applied id and the membership applied by then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub applied: Applied,
    pub membership: Option<Bytes>,
}

/// Views holding the tree. While any does, applied writes stay in the write-back buffer, so the
/// tree keeps the state the views read. Breaking the hold (the buffer outgrew its bound, or a
/// snapshot was installed) starts a new epoch: views of older epochs find out and fail.
#[derive(Debug, Default)]
pub(crate) struct Hold {
    pub(crate) epoch: u64,
    pub(crate) views: u64,
}

pub(crate) fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(SPACE_DATA);
    k.extend_from_slice(key);
    k
}

pub(crate) fn session_key(client: u64) -> [u8; 9] {
    let mut k = [SPACE_SESSION; 9];
    k[1..].copy_from_slice(&client.to_be_bytes());
    k
}

pub(crate) fn encode_applied(applied: &Applied) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + applied.log_id.len());
    v.extend_from_slice(&applied.index.to_be_bytes());
    v.extend_from_slice(&applied.log_id);
    v
}

pub(crate) fn decode_applied(bytes: &[u8]) -> Option<Applied> {
    let index = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    Some(Applied {
        index,
        log_id: Bytes::copy_from_slice(&bytes[8..]),
    })
}

pub(crate) struct SessionRecord {
    pub(crate) seq: u64,
    pub(crate) index: u64,
    pub(crate) outcome: Outcome,
}

impl SessionRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(21);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.index.to_be_bytes());
        v.extend_from_slice(&self.outcome.encode());
        v
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<SessionRecord> {
        let seq = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let index = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        let outcome = Outcome::decode(bytes.get(16..)?)?;
        Some(SessionRecord {
            seq,
            index,
            outcome,
        })
    }
}

/// `key` as the buffer, then the tree, hold it.
pub(crate) fn read_through(
    write_back: &WriteBack,
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Option<Bytes>> {
    if let Some(value) = write_back.writes.get(key) {
        return Ok(value.clone());
    }
    let value = tree.get(key).map_err(|e| Error::sled("read key", e))?;
    Ok(value.map(|v| Bytes::copy_from_slice(&v)))
}

impl ShardStore {
    pub(crate) fn new(
        shard: ShardId,
        tree: sled::Tree,
        write_back_bytes: usize,
        hold_bytes_max: usize,
        route: Option<KeyRoute>,
    ) -> Result<Self> {
        let checkpoint = tree_checkpoint(shard, &tree)?;
        let applied = checkpoint.as_ref().map_or(0, |c| c.applied.index + 1);
        let range = tree_range(shard, &tree)?;
        Ok(ShardStore {
            shard,
            write_back: RwLock::new(WriteBack::default()),
            write_back_bytes,
            stored_applied: AtomicU64::new(applied),
            tree: RwLock::new(tree),
            apply_lock: Mutex::new(()),
            applied: AtomicU64::new(applied),
            durable_applied: AtomicU64::new(applied),
            durable_checkpoint: Mutex::new(checkpoint),
            hold: Mutex::new(Hold::default()),
            hold_bytes_max,
            route,
            range: RwLock::new(range),
            written_bytes: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        })
    }

    /// Bytes of keys and values put since this replica was opened.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the replica's data keys and values: a scan of its data (for the split check, not
    /// for request paths).
    pub fn data_bytes(&self) -> Result<u64> {
        self.write_back()?;
        let mut bytes = 0u64;
        for item in self.tree().range([SPACE_DATA]..[SPACE_SHARD]) {
            let (key, value) = item.map_err(|e| Error::sled("measure the shard", e))?;
            bytes += (key.len() - 1 + value.len()) as u64;
        }
        // A view holding the tree keeps applied writes in the buffer: count their puts too.
        let buffer = self.write_back_buffer();
        for (key, value) in buffer.range(&[SPACE_DATA], &[SPACE_SHARD]) {
            if let Some(value) = value {
                bytes += (key.len() - 1 + value.len()) as u64;
            }
        }
        Ok(bytes)
    }

    /// The range this replica owns since a split (`None`: it never split).
    pub fn range(&self) -> Option<HashRange> {
        *self.range.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` (a user key) belongs to this replica by its applied range: always, before
    /// any split or for a key without a route.
    pub fn owns(&self, key: &[u8]) -> bool {
        owns(self.route, self.range().as_ref(), key)
    }

    /// Whether a `Split { at, lo, hi }` applied now would split this replica (see
    /// [`Command::Split`]); otherwise applying it does nothing.
    pub fn split_applies(&self, at: u64, lo: u64, hi: Option<u64>) -> bool {
        split_applies(self.range().as_ref(), at, lo, hi)
    }

    /// The last split applied to this replica: `(at, child)`.
    pub fn last_split(&self) -> Result<Option<(u64, ShardId)>> {
        let Some(v) = self.read(KEY_SPLIT)? else {
            return Ok(None);
        };
        let at = v
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        let child = v
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        match (at, child) {
            (Some(at), Some(child)) => Ok(Some((at, child))),
            _ => Err(self.corrupt("split record")),
        }
    }

    /// The hash that divides this replica's routing owners (patients, identifiers) in two
    /// halves by count: the lowest hash of the upper half. `None` with fewer than two owners,
    /// or without a key route. Reads every key (for a split's choice, not for request paths).
    pub fn split_point(&self) -> Result<Option<u64>> {
        let Some(route) = self.route else {
            return Ok(None);
        };
        self.write_back()?;
        let mut hashes: Vec<u64> = Vec::new();
        let mut last_owner: Vec<u8> = Vec::new();
        for item in self.tree().range([SPACE_DATA]..[SPACE_SHARD]) {
            let (key, _) = item.map_err(|e| Error::sled("scan for a split point", e))?;
            let user = &key[1..];
            let owner_end = user.iter().position(|b| *b <= 0x01).unwrap_or(user.len());
            if user[..owner_end] == last_owner[..] {
                continue;
            }
            last_owner = user[..owner_end].to_vec();
            if let Some(h) = route(user) {
                hashes.push(h);
            }
        }
        hashes.sort_unstable();
        hashes.dedup();
        if hashes.len() < 2 {
            return Ok(None);
        }
        Ok(Some(hashes[hashes.len() / 2]))
    }

    /// Reads the range from the tree again; the caller holds `apply_lock` and has just replaced
    /// the tree (a snapshot install).
    pub(crate) fn reload_range_locked(&self) -> Result<()> {
        let range = tree_range(self.shard, &self.tree())?;
        *self.range.write().unwrap_or_else(|e| e.into_inner()) = range;
        Ok(())
    }

    /// The applied id and membership the tree holds (not the write-back buffer); the caller
    /// holds `apply_lock` so that the two agree.
    pub(crate) fn tree_checkpoint_locked(&self) -> Result<Option<Checkpoint>> {
        tree_checkpoint(self.shard, &self.tree())
    }

    /// The newest state of this replica known to be on disk: the log may be purged up to its
    /// applied index, and a snapshot taken for compaction names it.
    pub fn durable_checkpoint(&self) -> Option<Checkpoint> {
        self.durable_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn publish_durable(&self, checkpoint: Option<Checkpoint>) {
        let Some(checkpoint) = checkpoint else {
            return;
        };
        let mut durable = self
            .durable_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if durable
            .as_ref()
            .is_none_or(|d| d.applied.index < checkpoint.applied.index)
        {
            *durable = Some(checkpoint);
        }
    }

    pub(crate) fn hold_state(&self) -> std::sync::MutexGuard<'_, Hold> {
        self.hold.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn held(&self) -> bool {
        self.hold_state().views > 0
    }

    /// Ends every view's hold on the tree (they fail when they next check); the caller holds
    /// `apply_lock`.
    pub(crate) fn break_hold_locked(&self) {
        let mut hold = self.hold_state();
        if hold.views > 0 {
            hold.epoch += 1;
            hold.views = 0;
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    fn corrupt(&self, what: &'static str) -> Error {
        Error::StoreCorrupt {
            shard: self.shard,
            what,
        }
    }

    /// The live tree, held for the duration of a read: a snapshot install swaps the tree under
    /// the write lock and drops the old one only after every reader has let go of it.
    pub(crate) fn tree(&self) -> std::sync::RwLockReadGuard<'_, sled::Tree> {
        self.tree.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_back_buffer(&self) -> std::sync::RwLockReadGuard<'_, WriteBack> {
        self.write_back.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a tree key through the write-back buffer.
    fn read(&self, key: &[u8]) -> Result<Option<Bytes>> {
        let tree = self.tree();
        read_through(&self.write_back_buffer(), &tree, key)
    }

    /// Hands the whole write-back buffer to sled as one atomic batch (`write_back.rs`). The
    /// caller holds `apply_lock`, so the buffer cannot change meanwhile; readers keep finding
    /// the writes in the buffer until the tree has them.
    pub(crate) fn write_back_locked(&self) -> Result<()> {
        if self.held() {
            return Ok(());
        }
        let Some(batch) = self.write_back_buffer().whole_batch() else {
            return Ok(());
        };
        self.tree()
            .apply_batch(batch)
            .map_err(|e| Error::sled("write back applied entries", e))?;
        *self.write_back.write().unwrap_or_else(|e| e.into_inner()) = WriteBack::default();
        self.stored_applied
            .store(self.applied.load(Ordering::Acquire), Ordering::Release);
        Ok(())
    }

    /// The flusher's first step for this shard (the caller holds `apply_lock`): the buffer's
    /// write-once entries into the tree one by one, the rest staged for
    /// [`ShardStore::write_back_staged_locked`], which must come after sled's next flush.
    /// Returns whether anything was staged (false: nothing write-once is buffered, or a view
    /// holds the tree).
    pub(crate) fn stage_locked(&self) -> Result<bool> {
        if self.held() {
            return Ok(false);
        }
        let staged = self
            .write_back_buffer()
            .stage_into(&self.tree(), self.applied.load(Ordering::Acquire))?;
        let any = staged.is_some();
        self.write_back
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_staged(staged);
        Ok(any)
    }

    /// The flusher's second step for this shard, after sled flushed the staged entries (the
    /// caller holds `apply_lock`): applies the staged batch and drops from the buffer what the
    /// tree now holds; without a stage, the whole buffer.
    pub(crate) fn write_back_staged_locked(&self) -> Result<()> {
        let staged = self
            .write_back
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take_staged();
        let Some((batch, applied)) = staged else {
            return self.write_back_locked();
        };
        // A view taken since the stage wrote the buffer back whole first, which dropped the stage.
        debug_assert!(!self.held(), "a stage survived a view's whole write-back");
        self.tree()
            .apply_batch(batch)
            .map_err(|e| Error::sled("write back applied entries", e))?;
        self.write_back
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .written();
        self.stored_applied.store(applied, Ordering::Release);
        Ok(())
    }

    /// Hands every applied write to sled (not yet durable: see `StateStore::flush`).
    pub fn write_back(&self) -> Result<()> {
        let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.write_back_locked()
    }

    /// Drops the write-back buffer; the caller holds `apply_lock` and is replacing the tree.
    pub(crate) fn discard_write_back_locked(&self) {
        *self.write_back.write().unwrap_or_else(|e| e.into_inner()) = WriteBack::default();
    }

    /// Keys held (data, sessions and the few metadata keys). A full scan in sled: for status
    /// reports, not for request paths.
    pub fn key_count(&self) -> Result<usize> {
        self.write_back()?;
        Ok(self.tree().len())
    }

    /// The last applied entry, read from the store.
    pub fn applied(&self) -> Result<Option<Applied>> {
        let value = self.read(KEY_APPLIED)?;
        value
            .map(|v| decode_applied(&v).ok_or(self.corrupt("applied id")))
            .transpose()
    }

    /// The last applied index, from memory (no read of the store): cheap enough for every request.
    pub fn applied_index(&self) -> Option<u64> {
        self.applied.load(Ordering::Acquire).checked_sub(1)
    }

    /// The applied index that is on disk: the log may be purged up to it, never past it.
    pub fn durable_applied_index(&self) -> Option<u64> {
        self.durable_applied.load(Ordering::Acquire).checked_sub(1)
    }

    /// The last membership applied (opaque bytes), if any.
    pub fn membership(&self) -> Result<Option<Bytes>> {
        self.read(KEY_MEMBERSHIP)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.read(&data_key(key))
    }

    /// Keys starting with `prefix`, in order, after `start_after` if given, at most `limit`.
    /// Pages through a large prefix (a patient's records) without holding it all in memory.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        Ok(self
            .scan_page(prefix, start_after, limit, usize::MAX)?
            .items)
    }

    /// Like [`ShardStore::scan_prefix`], and the page also ends before the item that would take
    /// its keys plus values past `bytes_max` (a page holds at least one item). `more` tells
    /// whether another item follows.
    pub fn scan_page(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<ScanPage> {
        let tree = self.tree();
        let full_prefix = data_key(prefix);
        let from = match start_after {
            Some(after) => {
                let mut from = data_key(after);
                from.push(0);
                from
            }
            None => full_prefix.clone(),
        };
        // The buffer's part of the range (bounded by `write-back-bytes`), merged over the tree's:
        // a buffered write replaces the tree's value, a buffered removal hides it.
        let buffered: Vec<(Vec<u8>, Option<Bytes>)> = self
            .write_back_buffer()
            .writes
            .range(from.clone()..)
            .take_while(|(k, _)| k.starts_with(&full_prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut buffered = buffered.into_iter().peekable();
        let mut stored = tree.range(from..).peekable();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut push = |key: Bytes, value: Bytes| {
            let size = key.len() + value.len();
            if out.len() >= limit || (!out.is_empty() && bytes.saturating_add(size) > bytes_max) {
                return false;
            }
            bytes += size;
            out.push((key, value));
            true
        };
        let mut more = false;
        loop {
            let next_stored = match stored.peek() {
                Some(Ok((key, _))) if key.starts_with(&full_prefix) => Some(key.clone()),
                Some(Ok(_)) | None => None,
                Some(Err(_)) => {
                    let Some(Err(e)) = stored.next() else {
                        unreachable!("peeked an error")
                    };
                    return Err(Error::sled("scan keys", e));
                }
            };
            let take_buffered = match (buffered.peek(), &next_stored) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((b, _)), Some(t)) => b.as_slice() <= t.as_ref(),
            };
            if take_buffered {
                let Some((key, value)) = buffered.next() else {
                    break;
                };
                if next_stored.as_deref() == Some(key.as_slice()) {
                    stored.next();
                }
                if let Some(value) = value
                    && !push(Bytes::copy_from_slice(&key[1..]), value)
                {
                    more = true;
                    break;
                }
            } else if let Some(Ok((key, value))) = stored.next()
                && !push(
                    Bytes::copy_from_slice(&key[1..]),
                    Bytes::copy_from_slice(&value),
                )
            {
                more = true;
                break;
            }
        }
        Ok(ScanPage { items: out, more })
    }

    /// Every session in the table, as `(client, last seq, last index)` (for tests and tools).
    pub fn sessions(&self) -> Result<Vec<(u64, u64, u64)>> {
        self.write_back()?;
        let mut out = Vec::new();
        for item in self.tree().scan_prefix([SPACE_SESSION]) {
            let (key, value) = item.map_err(|e| Error::sled("scan sessions", e))?;
            let client = key
                .get(1..9)
                .and_then(|k| k.try_into().ok())
                .map(u64::from_be_bytes);
            let record = SessionRecord::decode(&value);
            let (Some(client), Some(record)) = (client, record) else {
                return Err(self.corrupt("session record"));
            };
            out.push((client, record.seq, record.index));
        }
        Ok(out)
    }
}

/// Whether a split at `at` of the range `[lo, hi)` applies to a replica owning `range`: the
/// replica still owns exactly that range (or never split), and `at` falls strictly inside it.
pub(crate) fn split_applies(range: Option<&HashRange>, at: u64, lo: u64, hi: Option<u64>) -> bool {
    let whole = HashRange { lo, hi };
    range.is_none_or(|r| *r == whole) && at > lo && whole.contains(at)
}

pub(crate) fn owns(route: Option<KeyRoute>, range: Option<&HashRange>, key: &[u8]) -> bool {
    match (route, range) {
        (Some(route), Some(range)) => route(key).is_none_or(|h| range.contains(h)),
        _ => true,
    }
}

/// The range stored in `tree`, if it split.
fn tree_range(shard: ShardId, tree: &sled::Tree) -> Result<Option<HashRange>> {
    tree.get(KEY_RANGE)
        .map_err(|e| Error::sled("read range", e))?
        .map(|v| {
            HashRange::decode(&v).ok_or(Error::StoreCorrupt {
                shard,
                what: "range",
            })
        })
        .transpose()
}

/// The applied id and membership stored in `tree`.
fn tree_checkpoint(shard: ShardId, tree: &sled::Tree) -> Result<Option<Checkpoint>> {
    let applied = tree
        .get(KEY_APPLIED)
        .map_err(|e| Error::sled("read applied id", e))?
        .map(|v| {
            decode_applied(&v).ok_or(Error::StoreCorrupt {
                shard,
                what: "applied id",
            })
        })
        .transpose()?;
    let Some(applied) = applied else {
        return Ok(None);
    };
    let membership = tree
        .get(KEY_MEMBERSHIP)
        .map_err(|e| Error::sled("read membership", e))?
        .map(|v| Bytes::copy_from_slice(&v));
    Ok(Some(Checkpoint {
        applied,
        membership,
    }))
}

/// Shared handle to a shard replica's store.
pub type ShardHandle = Arc<ShardStore>;
