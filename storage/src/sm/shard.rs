//! `ShardStore`: the state of one shard replica, one sled tree.
//!
//! Key layout inside the tree (first byte is the space):
//! ```text
//! 0x00 "applied"     applied index u64 BE | caller's log id bytes
//! 0x00 "membership"  caller's membership bytes
//! 0x01 client u64 BE session: last seq u64 BE | last index u64 BE | outcome (5 bytes)
//! 0x02 user key      user value
//! ```
//! Applying a run of entries writes their data, the session records and the applied id in one
//! `sled::Batch`, which sled applies atomically and recovers as a prefix: after a crash the store
//! is exactly at some applied index, and the layer above re-applies the log from there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use crate::ShardId;
use crate::error::{Error, Result};
use crate::sm::command::{ApplyEntry, Batch, Command, EntryPayload, Expect, Op, Outcome, Session};

pub(crate) const SPACE_META: u8 = 0x00;
pub(crate) const SPACE_SESSION: u8 = 0x01;
pub(crate) const SPACE_DATA: u8 = 0x02;
pub(crate) const KEY_APPLIED: &[u8] = b"\x00applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"\x00membership";

/// The applied position of a shard replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    /// The caller's encoding of the log id (for openraft: term, leader and index).
    pub log_id: Bytes,
}

/// One shard replica's state. Cheap to share: reads take no lock beyond sled's own.
#[derive(Debug)]
pub struct ShardStore {
    shard: ShardId,
    /// The live tree; swapped whole when a snapshot is installed.
    pub(crate) tree: RwLock<sled::Tree>,
    /// Serialises applies, snapshot builds and installs.
    pub(crate) apply_lock: Mutex<()>,
    /// Applied index + 1, 0 when nothing is applied (mirrors the tree for cheap reads).
    pub(crate) applied: AtomicU64,
    /// Applied index + 1 as of the last completed flush of the whole database.
    pub(crate) durable_applied: AtomicU64,
}

pub(crate) fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(SPACE_DATA);
    k.extend_from_slice(key);
    k
}

fn session_key(client: u64) -> [u8; 9] {
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

struct SessionRecord {
    seq: u64,
    index: u64,
    outcome: Outcome,
}

impl SessionRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(21);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.index.to_be_bytes());
        v.extend_from_slice(&self.outcome.encode());
        v
    }

    fn decode(bytes: &[u8]) -> Option<SessionRecord> {
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

/// Writes of one apply run, seen by later entries of the same run before they reach sled.
struct Overlay<'a> {
    shard: ShardId,
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Bytes>>,
}

impl Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        if let Some(value) = self.writes.get(key) {
            return Ok(value.clone());
        }
        let value = self.tree.get(key).map_err(|e| Error::sled("read key", e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(&v)))
    }

    fn put(&mut self, key: Vec<u8>, value: impl Into<Bytes>) {
        self.writes.insert(key, Some(value.into()));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    fn corrupt(&self, what: &'static str) -> Error {
        Error::StoreCorrupt {
            shard: self.shard,
            what,
        }
    }
}

impl ShardStore {
    pub(crate) fn new(shard: ShardId, tree: sled::Tree) -> Result<Self> {
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
        let applied = applied.map_or(0, |a| a.index + 1);
        Ok(ShardStore {
            shard,
            tree: RwLock::new(tree),
            apply_lock: Mutex::new(()),
            applied: AtomicU64::new(applied),
            durable_applied: AtomicU64::new(applied),
        })
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

    /// Keys held (data, sessions and the few metadata keys). A full scan in sled: for status
    /// reports, not for request paths.
    pub fn len(&self) -> usize {
        self.tree().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last applied entry, read from the store.
    pub fn applied(&self) -> Result<Option<Applied>> {
        let value = self
            .tree()
            .get(KEY_APPLIED)
            .map_err(|e| Error::sled("read applied id", e))?;
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
        let value = self
            .tree()
            .get(KEY_MEMBERSHIP)
            .map_err(|e| Error::sled("read membership", e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(&v)))
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        let value = self
            .tree()
            .get(data_key(key))
            .map_err(|e| Error::sled("read key", e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(&v)))
    }

    /// Keys starting with `prefix`, in order, after `start_after` if given, at most `limit`.
    /// Pages through a large prefix (a patient's records) without holding it all in memory.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let tree = self.tree();
        let full_prefix = data_key(prefix);
        let iter = match start_after {
            Some(after) => {
                let mut from = data_key(after);
                from.push(0);
                tree.range(from..)
            }
            None => tree.range(full_prefix.clone()..),
        };
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| Error::sled("scan keys", e))?;
            if !key.starts_with(&full_prefix) {
                break;
            }
            out.push((
                Bytes::copy_from_slice(&key[1..]),
                Bytes::copy_from_slice(&value),
            ));
        }
        Ok(out)
    }

    /// Applies committed entries in order, in one atomic sled batch with the applied id, and
    /// returns one outcome per entry. Entries must be above the applied index and increasing;
    /// otherwise nothing is applied and `ApplyOutOfOrder` is returned.
    pub fn apply(&self, entries: &[ApplyEntry]) -> Result<Vec<Outcome>> {
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tree = self.tree();
        let mut overlay = Overlay {
            shard: self.shard,
            tree: &tree,
            writes: BTreeMap::new(),
        };
        let mut expected = self.applied.load(Ordering::Acquire);
        let mut outcomes = Vec::with_capacity(entries.len());
        for entry in entries {
            if entry.index < expected || entry.index == u64::MAX {
                let applied = expected.checked_sub(1);
                return Err(Error::ApplyOutOfOrder {
                    shard: self.shard,
                    index: entry.index,
                    applied,
                });
            }
            expected = entry.index + 1;
            let outcome = match &entry.payload {
                EntryPayload::Blank => Outcome::Done,
                EntryPayload::Membership(membership) => {
                    overlay.put(KEY_MEMBERSHIP.to_vec(), membership.clone());
                    Outcome::Done
                }
                EntryPayload::Command(Command::Txn { session, batch }) => {
                    apply_txn(&mut overlay, entry.index, *session, batch)?
                }
                EntryPayload::Command(Command::ExpireSessions { before_index }) => {
                    expire_sessions(&mut overlay, *before_index)?;
                    Outcome::Done
                }
            };
            outcomes.push(outcome);
        }
        overlay.put(
            KEY_APPLIED.to_vec(),
            encode_applied(&Applied {
                index: last.index,
                log_id: last.log_id.clone(),
            }),
        );
        let mut batch = sled::Batch::default();
        for (key, value) in overlay.writes {
            match value {
                Some(value) => batch.insert(key, value.as_ref()),
                None => batch.remove(key),
            }
        }
        tree.apply_batch(batch)
            .map_err(|e| Error::sled("apply batch", e))?;
        self.applied.store(last.index + 1, Ordering::Release);
        Ok(outcomes)
    }

    /// Every session in the table, as `(client, last seq, last index)` (for tests and tools).
    pub fn sessions(&self) -> Result<Vec<(u64, u64, u64)>> {
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

fn apply_txn(
    overlay: &mut Overlay<'_>,
    index: u64,
    session: Option<Session>,
    batch: &Batch,
) -> Result<Outcome> {
    if let Some(session) = session {
        let key = session_key(session.client);
        match overlay.get(&key)? {
            Some(bytes) => {
                let record =
                    SessionRecord::decode(&bytes).ok_or(overlay.corrupt("session record"))?;
                if session.seq == record.seq {
                    return Ok(record.outcome);
                }
                if session.seq < record.seq {
                    return Ok(Outcome::StaleSequence { last: record.seq });
                }
            }
            // Sequence numbers start at 1: a later one from an unknown session means the session
            // was expired, and the request may already have been applied once.
            None if session.seq > 1 => return Ok(Outcome::SessionExpired),
            None => {}
        }
    }
    let mut outcome = Outcome::Applied;
    for (i, condition) in batch.conditions.iter().enumerate() {
        let current = overlay.get(&data_key(&condition.key))?;
        let holds = match (&condition.expect, &current) {
            (Expect::Absent, None) | (Expect::Present, Some(_)) => true,
            (Expect::Equals(want), Some(have)) => want == have,
            _ => false,
        };
        if !holds {
            outcome = Outcome::ConditionFailed {
                index: u32::try_from(i).unwrap_or(u32::MAX),
            };
            break;
        }
    }
    if outcome == Outcome::Applied {
        for op in &batch.ops {
            match op {
                Op::Put { key, value } => overlay.put(data_key(key), value.clone()),
                Op::Delete { key } => overlay.delete(data_key(key)),
            }
        }
    }
    if let Some(session) = session {
        let record = SessionRecord {
            seq: session.seq,
            index,
            outcome,
        };
        overlay.put(session_key(session.client).to_vec(), record.encode());
    }
    Ok(outcome)
}

fn expire_sessions(overlay: &mut Overlay<'_>, before_index: u64) -> Result<()> {
    let mut doomed = Vec::new();
    for item in overlay.tree.scan_prefix([SPACE_SESSION]) {
        let (key, value) = item.map_err(|e| Error::sled("scan sessions", e))?;
        let record = SessionRecord::decode(&value).ok_or(overlay.corrupt("session record"))?;
        if record.index < before_index {
            doomed.push(key.to_vec());
        }
    }
    // Sessions touched earlier in this run are newer than anything being expired here unless
    // their own index is below the bound too.
    let touched: Vec<(Vec<u8>, Option<Bytes>)> = overlay
        .writes
        .range(vec![SPACE_SESSION]..vec![SPACE_DATA])
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in touched {
        let stale = value
            .as_deref()
            .and_then(SessionRecord::decode)
            .is_some_and(|r| r.index < before_index);
        if stale {
            doomed.push(key);
        } else {
            doomed.retain(|d| *d != key);
        }
    }
    for key in doomed {
        overlay.delete(key);
    }
    Ok(())
}

/// Shared handle to a shard replica's store.
pub type ShardHandle = Arc<ShardStore>;
