//! The write-back buffer of a shard replica: applied writes that sled has not been handed yet,
//! and how they reach the tree.
//!
//! Every read consults the buffer before the tree. The buffer reaches the tree in one of two
//! ways; either way the tree is, after a crash, exactly at some applied index, and the layer
//! above re-applies the log from there.
//!
//! - **Whole** (`ShardStore::write_back_locked`): every buffered write and the applied id in
//!   one `sled::Batch`, which sled applies atomically. Used when the buffer is full, before a
//!   snapshot view holds the tree or a split point is measured, and by the flusher for buffers
//!   without write-once entries.
//! - **Staged**, by the flusher, for buffers holding write-once entries (the entries of hash
//!   chains: each is written once, at its seq, and never changed). A `sled::Batch` holds sled's
//!   process-wide concurrency lock for writing while it applies, and every read of every shard
//!   of the node waits behind it; an audited workload adds a new chain entry per access, whose
//!   batches are large (new keys: node splits) and stalled all reads by tens of milliseconds.
//!   So the flusher first inserts the write-once entries one by one (sled's shared lock,
//!   `ShardStore::stage_locked`) and sets the rest of the buffer aside as the shard's staged
//!   batch; then flushes sled, so that the entries are on disk; then applies the staged batch
//!   (the mutable keys: chain heads, values, sessions and the applied id, small) atomically
//!   (`ShardStore::write_back_staged_locked`), and flushes again.
//!
//! Why staging is crash-safe: an entry reaches the disk before any batch whose heads name it
//! (the flush between), so a durable head never names a missing entry. A crash after the
//! entries' flush and before the batch's leaves entries beyond their chains' heads, which the
//! tree's applied index does not cover; re-applying the log from that index writes each of them
//! again with the same bytes (an append's seq and hash follow from the head and the entry's
//! bytes, and the log's committed entries are the same on every replay), so the replica ends
//! exactly as if there had been no crash. Until that replay, reads of the reopened replica (and
//! a snapshot view taken then) may see such entries beyond their heads; chain readers stop at
//! the head (`AccessLog`). While the node runs, a read goes through the buffer, which keeps
//! every staged write until the tree holds it, and a snapshot view holds a tree written back
//! whole, so none sees them.
//!
//! This needs the entries to be written once indeed: nothing but their append writes or reads
//! the keys under a chain's prefix (a split's removal of given-away keys aside), so that replay
//! reads only heads, which the batch keeps in step with the applied index ([`crate::Op`]'s
//! `Append`).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::error::{Error, Result};

/// Applied writes that sled has not been handed yet (tree keys, `None` for a removal).
#[derive(Debug, Default)]
pub(crate) struct WriteBack {
    pub(crate) writes: BTreeMap<Vec<u8>, Option<Bytes>>,
    /// Bytes put into `writes` since it was last emptied (a trigger, not an exact size).
    pub(crate) bytes: usize,
    /// Keys of `writes` that are written once and never changed (chain entries).
    once: BTreeSet<Vec<u8>>,
    /// What the flusher set aside to apply after the write-once entries are durable.
    staged: Option<Staged>,
    /// Keys written since the stage was set aside: the only ones the buffer keeps once the
    /// tree has taken the stage (every other key is in the tree by then).
    rewritten: BTreeSet<Vec<u8>>,
}

/// A buffer's mutable writes as of one applied index, ready for one atomic batch.
#[derive(Debug)]
pub(crate) struct Staged {
    batch: sled::Batch,
    /// Applied index + 1 that the batch brings the tree to.
    applied: u64,
}

impl WriteBack {
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.writes.contains_key(key)
    }

    /// Buffered writes of keys in `[lo, hi)`.
    pub(crate) fn range(
        &self,
        lo: &[u8],
        hi: &[u8],
    ) -> impl Iterator<Item = (&Vec<u8>, &Option<Bytes>)> {
        self.writes.range(lo.to_vec()..hi.to_vec())
    }

    /// Takes an apply run's writes; `once` names those that are written once and never
    /// changed.
    pub(crate) fn merge(&mut self, writes: BTreeMap<Vec<u8>, Option<Bytes>>, once: Vec<Vec<u8>>) {
        for (key, value) in writes {
            self.bytes += entry_bytes(&key, &value);
            // Heads, sessions and the applied id come back every run: a key is copied once.
            if self.staged.is_some() && !self.rewritten.contains(&key) {
                self.rewritten.insert(key.clone());
            }
            self.writes.insert(key, value);
        }
        self.once.extend(once);
    }

    /// The buffered writes as one batch, but for those `kept_out` names.
    fn batch(&self, kept_out: impl Fn(&[u8], &Option<Bytes>) -> bool) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in &self.writes {
            match value {
                _ if kept_out(key, value) => {}
                Some(value) => batch.insert(key.as_slice(), value.as_ref()),
                None => batch.remove(key.as_slice()),
            }
        }
        batch
    }
}

/// What a buffered write counts toward [`WriteBack::bytes`].
fn entry_bytes(key: &[u8], value: &Option<Bytes>) -> usize {
    key.len() + value.as_ref().map_or(0, Bytes::len)
}

impl WriteBack {
    /// The whole buffer as one batch; `None` when it is empty.
    pub(crate) fn whole_batch(&self) -> Option<sled::Batch> {
        (!self.writes.is_empty()).then(|| self.batch(|_, _| false))
    }

    /// The first step: inserts the write-once entries into `tree` one by one and returns the
    /// rest as the stage of applied index + 1 `applied`; `None` when nothing write-once is
    /// buffered. The stage is applied by [`WriteBack::take_staged`]'s caller after sled's next
    /// flush.
    pub(crate) fn stage_into(&self, tree: &sled::Tree, applied: u64) -> Result<Option<Staged>> {
        if self.once.is_empty() {
            return Ok(None);
        }
        // A write-once key removed since (a split gave it away) stays in the batch, a removal.
        for (key, value) in &self.writes {
            if let Some(value) = value
                && self.once.contains(key)
            {
                tree.insert(key.as_slice(), value.as_ref())
                    .map_err(|e| Error::sled("write back a chain entry", e))?;
            }
        }
        Ok(Some(Staged {
            batch: self.batch(|key, value| value.is_some() && self.once.contains(key)),
            applied,
        }))
    }

    /// Keeps `staged` for the second step. A stage left by a round that failed before its batch
    /// is replaced, never applied: its entries' flush may not have happened.
    pub(crate) fn set_staged(&mut self, staged: Option<Staged>) {
        self.staged = staged;
        self.rewritten.clear();
    }

    /// The stage's batch and the applied index + 1 it brings the tree to.
    pub(crate) fn take_staged(&mut self) -> Option<(sled::Batch, u64)> {
        self.staged.take().map(|s| (s.batch, s.applied))
    }

    /// After the tree took the stage's batch: drops from the buffer what the tree now holds,
    /// every key but those written since the stage (their newer values wait for the next
    /// write-back).
    pub(crate) fn written(&mut self) {
        // Built from the keys written since the stage, not by sifting the whole buffer; what is
        // left is counted afresh, as a whole write-back would leave it.
        let mut writes = std::mem::take(&mut self.writes);
        let once = std::mem::take(&mut self.once);
        self.bytes = 0;
        for key in std::mem::take(&mut self.rewritten) {
            if let Some(value) = writes.remove(&key) {
                self.bytes += entry_bytes(&key, &value);
                if once.contains(&key) {
                    self.once.insert(key.clone());
                }
                self.writes.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use std::path::Path;
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::config::StoreConfig;
    use crate::sm::chain::{self, Verifier};
    use crate::sm::command::{ApplyEntry, Batch, Command, EntryPayload, Op};
    use crate::sm::shard::ShardHandle;
    use crate::sm::store::StateStore;

    const CHAINS: u64 = 3;

    fn config(dir: &Path) -> Arc<StoreConfig> {
        StoreConfig {
            dir: dir.to_path_buf(),
            // The test runs the flusher's steps itself.
            flush_interval_ms: 60_000,
            ..StoreConfig::default()
        }
        .validate()
        .unwrap()
    }

    /// Entries `from..=to`: each appends to one of the chains and rewrites a plain key.
    fn entries(from: u64, to: u64) -> Vec<ApplyEntry> {
        (from..=to)
            .map(|i| {
                let c = i % CHAINS;
                let batch = Batch {
                    conditions: Vec::new(),
                    ops: vec![
                        Op::Append {
                            head: Bytes::from(format!("c{c}/head")),
                            prefix: Bytes::from(format!("c{c}/log/")),
                            value: Bytes::from(format!("event {i} {}", "x".repeat(100))),
                        },
                        Op::Put {
                            key: Bytes::from(format!("v{c}")),
                            value: Bytes::from(i.to_be_bytes().to_vec()),
                        },
                    ],
                };
                ApplyEntry {
                    index: i,
                    log_id: Bytes::from(format!("id-{i}")),
                    payload: EntryPayload::Command(Command::Txn {
                        session: None,
                        batch,
                    }),
                }
            })
            .collect()
    }

    /// Every key and value of the shard, read through its buffer.
    fn dump(shard: &ShardHandle) -> Vec<(Bytes, Bytes)> {
        shard.scan_prefix(b"", None, usize::MAX).unwrap()
    }

    /// A chain's head seq, and its entries as stored in the tree (sled alone, no buffer).
    fn tree_chain(shard: &ShardHandle, c: u64) -> (u64, usize) {
        let head = shard
            .get(format!("c{c}/head").as_bytes())
            .unwrap()
            .map_or(0, |h| chain::decode_head(&h).unwrap().0);
        let entries = shard
            .tree()
            .scan_prefix(super::super::shard::data_key(
                format!("c{c}/log/").as_bytes(),
            ))
            .count();
        (head, entries)
    }

    fn verify(shard: &ShardHandle, c: u64) {
        let mut v = Verifier::default();
        let prefix = format!("c{c}/log/");
        for (key, value) in shard
            .scan_prefix(prefix.as_bytes(), None, usize::MAX)
            .unwrap()
        {
            let seq = u64::from_be_bytes(key[prefix.len()..].try_into().unwrap());
            v.next(seq, &value).unwrap();
        }
        let head = shard.get(format!("c{c}/head").as_bytes()).unwrap();
        v.finish(head.map(|h| chain::decode_head(&h).unwrap()))
            .unwrap();
    }

    /// A store whose shard applied entries `1..=last` and went through the flusher's first step.
    fn staged_after(dir: &Path, last: u64) -> (StateStore, ShardHandle) {
        let store = StateStore::open(config(dir)).unwrap();
        let shard = store.create_shard(1).unwrap();
        shard.apply(&entries(1, last)).unwrap();
        stage(&shard);
        (store, shard)
    }

    /// The flusher's first step on `shard`, which holds chain entries.
    fn stage(shard: &ShardHandle) {
        let _applying = shard.apply_lock.lock().unwrap();
        assert!(shard.stage_locked().unwrap(), "chain entries are staged");
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for item in std::fs::read_dir(from).unwrap() {
            let item = item.unwrap();
            let target = to.join(item.file_name());
            if item.file_type().unwrap().is_dir() {
                copy_dir(&item.path(), &target);
            } else {
                std::fs::copy(item.path(), target).unwrap();
            }
        }
    }

    /// The crash window of a staged write-back: chain entries are on disk, the batch with their
    /// heads and the applied index is not. The store reopened there is at the previous applied
    /// index with entries beyond their heads, and re-applying the log from that index brings it
    /// to exactly the state of a store that never crashed, every chain intact.
    #[test]
    fn a_crash_between_the_entries_and_their_batch_is_undone_by_replay() {
        let live_dir = tempfile::tempdir().unwrap();
        let crashed_dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(config(live_dir.path())).unwrap();
        let shard = store.create_shard(1).unwrap();
        shard.apply(&entries(1, 30)).unwrap();
        store.flush().unwrap();
        assert_eq!(shard.durable_applied_index(), Some(30));
        shard.apply(&entries(31, 60)).unwrap();

        // The flusher's first step and its flush, then a crash: a copy of the directory now.
        stage(&shard);
        store.inner().db.flush().unwrap();
        copy_dir(live_dir.path(), crashed_dir.path());

        // The live store goes on: its next flush applies everything.
        store.flush().unwrap();
        assert_eq!(shard.durable_applied_index(), Some(60));
        let want = dump(&shard);
        for c in 0..CHAINS {
            verify(&shard, c);
            assert_eq!(tree_chain(&shard, c).0, 20);
        }
        drop(shard);
        drop(store);

        let crashed = StateStore::open(config(crashed_dir.path())).unwrap();
        let replica = crashed.shard(1).unwrap();
        assert_eq!(
            replica.applied_index(),
            Some(30),
            "the staged batch was not on disk"
        );
        for c in 0..CHAINS {
            let (head, stored) = tree_chain(&replica, c);
            assert_eq!(head, 10);
            assert_eq!(stored, 20, "the later entries reached the disk first");
        }
        // Replay from the applied index, as the layer above does after a crash.
        replica.apply(&entries(31, 60)).unwrap();
        assert_eq!(dump(&replica), want);
        for c in 0..CHAINS {
            verify(&replica, c);
        }
        crashed.flush().unwrap();
        assert_eq!(replica.durable_applied_index(), Some(60));
        assert_eq!(dump(&replica), want);
    }

    /// Between the two steps, reads see the newest applied state; a write-back then keeps what
    /// was rewritten meanwhile, and drops what the tree holds.
    #[test]
    fn reads_between_the_steps_see_the_newest_state() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shard) = staged_after(dir.path(), 12);
        // Applied after the stage: new heads, entries and values, in the buffer only.
        shard.apply(&entries(13, 15)).unwrap();
        let newest = dump(&shard);
        {
            let _applying = shard.apply_lock.lock().unwrap();
            shard.write_back_staged_locked().unwrap();
        }
        assert_eq!(dump(&shard), newest);
        assert_eq!(
            shard
                .stored_applied
                .load(std::sync::atomic::Ordering::Acquire),
            13,
            "the tree is at the stage's index"
        );
        let buffered = shard.write_back_buffer().writes.len();
        assert!(
            buffered > 0 && buffered <= 3 * 3 + 1,
            "only the writes of entries 13..=15 stay buffered, not {buffered}"
        );
        for c in 0..CHAINS {
            verify(&shard, c);
        }
        store.flush().unwrap();
        assert_eq!(shard.durable_applied_index(), Some(15));
        assert!(shard.write_back_buffer().writes.is_empty());
        assert_eq!(dump(&shard), newest);
    }

    /// A snapshot view taken between the steps writes the buffer back whole, stage and all; the
    /// second step then has nothing staged and leaves the held tree alone.
    #[test]
    fn a_view_between_the_steps_takes_the_whole_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shard) = staged_after(dir.path(), 12);
        let view = shard.view().unwrap();
        assert_eq!(view.meta().applied.as_ref().map(|a| a.index), Some(12));
        assert!(shard.write_back_buffer().writes.is_empty());
        shard.apply(&entries(13, 15)).unwrap();
        {
            let _applying = shard.apply_lock.lock().unwrap();
            assert!(!shard.stage_locked().unwrap(), "a held tree is not staged");
            shard.write_back_staged_locked().unwrap();
        }
        assert_eq!(
            shard.write_back_buffer().writes.len(),
            3 * 3 + 1,
            "entries 13..=15 stay buffered while the view holds the tree"
        );
        drop(view);
        store.flush().unwrap();
        assert_eq!(shard.durable_applied_index(), Some(15));
        for c in 0..CHAINS {
            verify(&shard, c);
        }
    }
}
