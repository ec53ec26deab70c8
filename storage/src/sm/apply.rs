//! Applying committed entries to a shard replica: each run of entries sees its own earlier
//! writes through an overlay over the write-back buffer and the tree, and its writes join the
//! buffer at the end of the run (`write_back.rs` says how they reach sled).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::ShardId;
use crate::error::{Error, Result};
use crate::sm::chain;
use crate::sm::command::{ApplyEntry, Batch, Command, EntryPayload, Expect, Op, Outcome, Session};
use crate::sm::range::{HashRange, KeyRoute};
use crate::sm::shard::{
    Applied, KEY_APPLIED, KEY_MEMBERSHIP, KEY_RANGE, KEY_SPLIT, SPACE_DATA, SPACE_SESSION,
    SPACE_SHARD, SessionRecord, ShardStore, data_key, encode_applied, owns, read_through,
    session_key, split_applies,
};
use crate::sm::write_back::WriteBack;

/// Writes of one apply run, seen by later entries of the same run before they reach the
/// write-back buffer.
struct Overlay<'a> {
    shard: ShardId,
    tree: &'a sled::Tree,
    write_back: &'a WriteBack,
    writes: BTreeMap<Vec<u8>, Option<Bytes>>,
    /// Keys of `writes` written once and never changed (chain entries: `write_back.rs`).
    once: Vec<Vec<u8>>,
}

impl Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        if let Some(value) = self.writes.get(key) {
            return Ok(value.clone());
        }
        read_through(self.write_back, self.tree, key)
    }

    fn put(&mut self, key: Vec<u8>, value: impl Into<Bytes>) {
        self.writes.insert(key, Some(value.into()));
    }

    /// Puts a key that no later write changes (a chain entry, at its seq).
    fn put_once(&mut self, key: Vec<u8>, value: impl Into<Bytes>) {
        self.once.push(key.clone());
        self.put(key, value);
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
    /// Applies committed entries in order, in one atomic sled batch with the applied id, and
    /// returns one outcome per entry. Entries must be above the applied index and increasing;
    /// otherwise nothing is applied and `ApplyOutOfOrder` is returned.
    pub fn apply(&self, entries: &[ApplyEntry]) -> Result<Vec<Outcome>> {
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tree = self.tree();
        let buffer = self.write_back_buffer();
        let mut overlay = Overlay {
            shard: self.shard,
            tree: &tree,
            write_back: &buffer,
            writes: BTreeMap::new(),
            once: Vec::new(),
        };
        let mut expected = self.applied.load(Ordering::Acquire);
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut range = self.range();
        let mut written = 0u64;
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
                    if batch_owned(self.route, range.as_ref(), batch) {
                        let outcome = apply_txn(&mut overlay, entry.index, *session, batch)?;
                        if outcome == Outcome::Applied {
                            written += batch.ops.iter().map(Op::written_bytes).sum::<u64>();
                        }
                        outcome
                    } else {
                        Outcome::OutOfRange
                    }
                }
                EntryPayload::Command(Command::ExpireSessions { before_index }) => {
                    expire_sessions(&mut overlay, *before_index)?;
                    Outcome::Done
                }
                EntryPayload::Command(Command::Split { at, child, lo, hi })
                    if !split_applies(range.as_ref(), *at, *lo, *hi) =>
                {
                    // Proposed from a view of the shard older than a split applied since:
                    // nothing is done (the proposer sees the applied split and finishes it).
                    let _ = child;
                    Outcome::OutOfRange
                }
                EntryPayload::Command(Command::Split { at, child, lo, hi }) => {
                    let kept = HashRange {
                        lo: *lo,
                        hi: Some(*at),
                    };
                    let given = HashRange { lo: *at, hi: *hi };
                    give_away(&mut overlay, self.route, &given)?;
                    let mut split = at.to_be_bytes().to_vec();
                    split.extend_from_slice(&child.to_be_bytes());
                    overlay.put(KEY_SPLIT.to_vec(), split);
                    overlay.put(KEY_RANGE.to_vec(), kept.encode().to_vec());
                    range = Some(kept);
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
        let writes = std::mem::take(&mut overlay.writes);
        let once = std::mem::take(&mut overlay.once);
        drop(overlay);
        drop(buffer);
        drop(tree);
        let full = {
            let mut buffer = self.write_back.write().unwrap_or_else(|e| e.into_inner());
            buffer.merge(writes, once);
            buffer.bytes >= self.write_back_bytes
        };
        *self.range.write().unwrap_or_else(|e| e.into_inner()) = range;
        self.written_bytes.fetch_add(written, Ordering::Relaxed);
        self.applied.store(last.index + 1, Ordering::Release);
        if full {
            let held_bytes = self.write_back_buffer().bytes;
            if held_bytes > self.hold_bytes_max && self.held() {
                tracing::warn!(
                    shard = self.shard,
                    held_bytes,
                    "writes outgrew the buffer while a snapshot view held the tree; the view fails \
                     and is taken again"
                );
                self.break_hold_locked();
            }
            self.write_back_locked()?;
        }
        Ok(outcomes)
    }
}

/// Whether every key the batch names belongs to the range (no key is looked at before a split).
fn batch_owned(route: Option<KeyRoute>, range: Option<&HashRange>, batch: &Batch) -> bool {
    if range.is_none() || route.is_none() {
        return true;
    }
    batch
        .conditions
        .iter()
        .map(|c| &c.key)
        .chain(batch.ops.iter().flat_map(Op::keys))
        .all(|key| owns(route, range, key))
}

/// Removes the data keys routed into `given` (a split gave them to another shard), as this run
/// sees them: the tree, the write-back buffer, then earlier entries of the run.
fn give_away(overlay: &mut Overlay<'_>, route: Option<KeyRoute>, given: &HashRange) -> Result<()> {
    let Some(route) = route else {
        return Ok(());
    };
    let moved = |key: &[u8]| route(&key[1..]).is_some_and(|h| given.contains(h));
    let mut doomed: Vec<Vec<u8>> = Vec::new();
    for item in overlay.tree.range([SPACE_DATA]..[SPACE_SHARD]) {
        let (key, _) = item.map_err(|e| Error::sled("scan keys to give away", e))?;
        if moved(&key) {
            doomed.push(key.to_vec());
        }
    }
    let data_space = vec![SPACE_DATA]..vec![SPACE_SHARD];
    for writes in [&overlay.write_back.writes, &overlay.writes] {
        for (key, value) in writes.range(data_space.clone()) {
            if value.is_some() && moved(key) {
                doomed.push(key.clone());
            }
        }
    }
    for key in doomed {
        overlay.delete(key);
    }
    Ok(())
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
                    let failed_condition = match record.outcome {
                        Outcome::ConditionFailed { index } => Some(index),
                        _ => None,
                    };
                    return Ok(Outcome::Replayed {
                        index: record.index,
                        failed_condition,
                    });
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
                Op::Append {
                    head,
                    prefix,
                    value,
                } => append(overlay, head, prefix, value)?,
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

/// Links `value` after the last entry of the chain at `head` (`chain.rs`).
fn append(overlay: &mut Overlay<'_>, head: &Bytes, prefix: &Bytes, value: &Bytes) -> Result<()> {
    let (seq, prev) = match overlay.get(&data_key(head))? {
        None => (0, chain::GENESIS),
        Some(v) => chain::decode_head(&v).ok_or(overlay.corrupt("chain head"))?,
    };
    let seq = seq + 1;
    let hash = chain::link(&prev, seq, value);
    let mut entry = Vec::with_capacity(chain::HASH_BYTES + value.len());
    entry.extend_from_slice(&hash);
    entry.extend_from_slice(value);
    overlay.put_once(data_key(&chain::entry_key(prefix, seq)), entry);
    overlay.put(data_key(head), chain::encode_head(seq, &hash));
    Ok(())
}

fn expire_sessions(overlay: &mut Overlay<'_>, before_index: u64) -> Result<()> {
    // The session table as this entry sees it: the tree, then the write-back buffer, then the
    // entries earlier in this run. The tree alone may be behind (a snapshot view can hold it).
    let mut sessions: BTreeMap<Vec<u8>, Option<Bytes>> = BTreeMap::new();
    for item in overlay.tree.scan_prefix([SPACE_SESSION]) {
        let (key, value) = item.map_err(|e| Error::sled("scan sessions", e))?;
        sessions.insert(key.to_vec(), Some(Bytes::copy_from_slice(&value)));
    }
    let session_space = vec![SPACE_SESSION]..vec![SPACE_DATA];
    for writes in [&overlay.write_back.writes, &overlay.writes] {
        for (key, value) in writes.range(session_space.clone()) {
            sessions.insert(key.clone(), value.clone());
        }
    }
    for (key, value) in sessions {
        let Some(value) = value else { continue };
        let record = SessionRecord::decode(&value).ok_or(overlay.corrupt("session record"))?;
        if record.index < before_index {
            overlay.delete(key);
        }
    }
    Ok(())
}
