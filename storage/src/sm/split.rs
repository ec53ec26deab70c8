//! The child side of a shard split: a new replica built from the parent's keys on the same node.
//!
//! Called by the layer above when a `Split` entry is about to be applied to the parent, under
//! the parent's apply lock, so that the copy sees the parent exactly as of the entry before the
//! split. The child's tree is filled, made durable, and only then named in the catalog; a crash
//! before that leaves an unnamed tree that the next open drops, and the split entry is applied
//! again from the log. A child that exists already (built by an earlier application of the same
//! entry, or filled by its own group's leader) is left as it is.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tracing::info;

use crate::ShardId;
use crate::error::{Error, Result};
use crate::sm::range::HashRange;
use crate::sm::shard::{
    self, Applied, KEY_APPLIED, KEY_MEMBERSHIP, KEY_RANGE, SPACE_DATA, SPACE_SESSION, SPACE_SHARD,
    ShardStore,
};
use crate::sm::store::{StateStore, tree_name};

/// Bytes of keys and values per sled batch while the child is filled.
const FILL_BATCH_BYTES: usize = 4 << 20;

/// What a split copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitCopy {
    /// Data keys copied to the child.
    pub keys: u64,
    /// Bytes of those keys and values.
    pub bytes: u64,
}

impl StateStore {
    /// Builds the replica of `child` from `parent`'s data keys routed into `given` and a copy of
    /// its session table, at `applied` and with `membership` (the caller's encodings: the
    /// child's group starts there). Returns `None` when the child exists already.
    pub fn split_off(
        &self,
        parent: ShardId,
        child: ShardId,
        given: HashRange,
        applied: &Applied,
        membership: Bytes,
    ) -> Result<Option<SplitCopy>> {
        if self.shard(child).is_some() {
            return Ok(None);
        }
        let route = self.inner().route.ok_or(Error::StoreCorrupt {
            shard: parent,
            what: "a split needs the key route",
        })?;
        let source = self
            .shard(parent)
            .ok_or(Error::ShardMissing { shard: parent })?;
        let inner = Arc::clone(self.inner());
        let _applying = source.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let name = tree_name(child, 0);
        let tree = inner
            .db
            .open_tree(&name)
            .map_err(|e| Error::sled("create split tree", e))?;
        tree.clear()
            .map_err(|e| Error::sled("clear split tree", e))?;
        let wanted = |key: &[u8]| match key.first() {
            Some(&SPACE_SESSION) => true,
            Some(&SPACE_DATA) => route(&key[1..]).is_some_and(|h| given.contains(h)),
            _ => false,
        };
        let mut copy = SplitCopy { keys: 0, bytes: 0 };
        let mut batch = sled::Batch::default();
        let mut batch_bytes = 0usize;
        let mut add = |batch: &mut sled::Batch, key: &[u8], value: &[u8]| -> Result<()> {
            if key.first() == Some(&SPACE_DATA) {
                copy.keys += 1;
                copy.bytes += (key.len() - 1 + value.len()) as u64;
            }
            batch.insert(key, value);
            batch_bytes += key.len() + value.len();
            if batch_bytes >= FILL_BATCH_BYTES {
                tree.apply_batch(std::mem::take(batch))
                    .map_err(|e| Error::sled("fill split tree", e))?;
                batch_bytes = 0;
            }
            Ok(())
        };
        {
            // The parent's state is its tree overlaid by its write-back buffer.
            let parent_tree = source.tree();
            let buffer = source.write_back.read().unwrap_or_else(|e| e.into_inner());
            for item in parent_tree.range([SPACE_SESSION]..[SPACE_SHARD]) {
                let (key, value) = item.map_err(|e| Error::sled("scan parent for split", e))?;
                if !buffer.contains(&key) && wanted(&key) {
                    add(&mut batch, &key, &value)?;
                }
            }
            for (key, value) in buffer.range(&[SPACE_SESSION], &[SPACE_SHARD]) {
                if let Some(value) = value
                    && wanted(key)
                {
                    add(&mut batch, key, value)?;
                }
            }
        }
        batch.insert(KEY_APPLIED, shard::encode_applied(applied));
        batch.insert(KEY_MEMBERSHIP, membership.as_ref());
        batch.insert(KEY_RANGE, given.encode().to_vec());
        tree.apply_batch(batch)
            .map_err(|e| Error::sled("fill split tree", e))?;
        // The child must be on disk before the catalog names it.
        inner
            .db
            .flush()
            .map_err(|e| Error::sled("flush split tree", e))?;
        let mut shards = inner.shards.lock().unwrap_or_else(|e| e.into_inner());
        if shards.contains_key(&child) {
            drop(shards);
            inner
                .db
                .drop_tree(name.as_bytes())
                .map_err(|e| Error::sled("drop unneeded split tree", e))?;
            return Ok(None);
        }
        inner
            .catalog
            .insert(child.to_be_bytes(), &0u64.to_be_bytes())
            .map_err(|e| Error::sled("record split child in catalog", e))?;
        inner
            .db
            .flush()
            .map_err(|e| Error::sled("flush split catalog", e))?;
        let handle = Arc::new(ShardStore::new(
            child,
            tree,
            inner.config.write_back_bytes,
            inner.config.snapshot_hold_bytes_max,
            inner.route,
        )?);
        debug_assert_eq!(
            handle.applied.load(Ordering::Acquire),
            applied.index + 1,
            "the child starts at its applied id"
        );
        shards.insert(child, handle);
        info!(
            parent,
            child,
            keys = copy.keys,
            bytes = copy.bytes,
            "split: the child replica is built"
        );
        Ok(Some(copy))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::{
        Applied, ApplyEntry, Batch, Command, EntryPayload, HashRange, Outcome, Session, StateStore,
        StoreConfig,
    };

    /// Keys route by their first byte, spread over the space: `a…` low, `z…` high.
    fn route(key: &[u8]) -> Option<u64> {
        key.first().map(|b| u64::from(*b) << 56)
    }

    fn open(dir: &std::path::Path) -> StateStore {
        let config = StoreConfig {
            dir: dir.to_path_buf(),
            ..StoreConfig::default()
        };
        StateStore::open_with_route(config.validate().unwrap(), Some(route)).unwrap()
    }

    fn txn(index: u64, session: Option<Session>, batch: Batch) -> ApplyEntry {
        ApplyEntry {
            index,
            log_id: Bytes::from(index.to_be_bytes().to_vec()),
            payload: EntryPayload::Command(Command::Txn { session, batch }),
        }
    }

    /// A split moves exactly the keys routed above the split point (and a copy of the session
    /// table) to the child, both sides refuse the other's keys from then on, and all of it
    /// survives a reopen.
    #[test]
    fn a_split_divides_keys_and_both_sides_refuse_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let at = u64::from(b'm') << 56;
        {
            let store = open(dir.path());
            let parent = store.create_shard(1).unwrap();
            let session = Some(Session { client: 9, seq: 1 });
            let mut entries = vec![txn(1, session, Batch::put("apple", "1"))];
            for (i, k) in ["banana", "mango", "zebra", "melon"].iter().enumerate() {
                entries.push(txn(i as u64 + 2, None, Batch::put(*k, "v")));
            }
            parent.apply(&entries).unwrap();
            // Half in the buffer, half in the tree: the copy must see both.
            parent.write_back().unwrap();
            parent
                .apply(&[
                    txn(6, None, Batch::delete("melon")),
                    txn(7, None, Batch::put("yak", "y")),
                ])
                .unwrap();

            let given = HashRange { lo: at, hi: None };
            let applied = Applied {
                index: 0,
                log_id: Bytes::from_static(b"child-start"),
            };
            let copy = store
                .split_off(1, 2, given, &applied, Bytes::from_static(b"members"))
                .unwrap()
                .expect("a new child");
            assert_eq!(copy.keys, 3, "mango, zebra, yak");
            let split = ApplyEntry {
                index: 8,
                log_id: Bytes::from_static(b"8"),
                payload: EntryPayload::Command(Command::Split {
                    at,
                    child: 2,
                    lo: 0,
                    hi: None,
                }),
            };
            assert_eq!(parent.apply(&[split]).unwrap(), vec![Outcome::Done]);
            // Built once: a second application of the entry leaves the child alone.
            assert!(
                store
                    .split_off(1, 2, given, &applied, Bytes::new())
                    .unwrap()
                    .is_none()
            );

            // A split proposed from the old range (a leader that had not seen this one) does
            // nothing.
            let stale = ApplyEntry {
                index: 9,
                log_id: Bytes::from_static(b"9"),
                payload: EntryPayload::Command(Command::Split {
                    at: at + 5,
                    child: 3,
                    lo: 0,
                    hi: None,
                }),
            };
            assert!(!parent.split_applies(at + 5, 0, None));
            assert_eq!(parent.apply(&[stale]).unwrap(), vec![Outcome::OutOfRange]);
            assert_eq!(parent.last_split().unwrap(), Some((at, 2)));
            let child = store.shard(2).unwrap();
            assert_eq!(child.applied().unwrap(), Some(applied));
            assert_eq!(
                child.membership().unwrap().as_deref(),
                Some(&b"members"[..])
            );
            assert_eq!(
                child.sessions().unwrap().len(),
                1,
                "the session table is copied"
            );
            // A write to a key the parent gave away is refused, and its session not recorded.
            let refused = parent
                .apply(&[txn(
                    10,
                    Some(Session { client: 9, seq: 2 }),
                    Batch::put("zoo", "z"),
                )])
                .unwrap();
            assert_eq!(refused, vec![Outcome::OutOfRange]);
            assert_eq!(parent.sessions().unwrap()[0].1, 1);
            // So is a batch naming keys of both sides.
            let mixed = Batch {
                conditions: Vec::new(),
                ops: vec![
                    crate::Op::Put {
                        key: "ant".into(),
                        value: "a".into(),
                    },
                    crate::Op::Put {
                        key: "zoo".into(),
                        value: "z".into(),
                    },
                ],
            };
            assert_eq!(
                parent.apply(&[txn(11, None, mixed)]).unwrap(),
                vec![Outcome::OutOfRange]
            );
            assert_eq!(
                child
                    .apply(&[txn(1, None, Batch::put("ant", "a"))])
                    .unwrap(),
                vec![Outcome::OutOfRange]
            );
            assert_eq!(
                child
                    .apply(&[txn(2, None, Batch::put("zoo", "z"))])
                    .unwrap(),
                vec![Outcome::Applied]
            );
            store.flush().unwrap();
        }
        let store = open(dir.path());
        let (parent, child) = (store.shard(1).unwrap(), store.shard(2).unwrap());
        let keys = |s: &crate::ShardHandle| -> Vec<Bytes> {
            s.scan_prefix(b"", None, 100)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys(&parent), vec!["apple", "banana"]);
        assert_eq!(keys(&child), vec!["mango", "yak", "zebra", "zoo"]);
        assert_eq!(
            parent.range(),
            Some(HashRange {
                lo: 0,
                hi: Some(at)
            })
        );
        assert_eq!(child.range(), Some(HashRange { lo: at, hi: None }));
        assert!(parent.owns(b"apple") && !parent.owns(b"zoo"));
        assert!(child.owns(b"zoo") && !child.owns(b"apple"));
    }
}
