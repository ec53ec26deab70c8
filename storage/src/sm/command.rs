//! What the state machine applies: commands carried by Raft entries, and their outcomes.
//!
//! Applying is deterministic: it depends only on the store's contents and the entries, never on
//! configuration or clocks, so every replica reaches the same state. Limits are therefore checked
//! when a command is proposed ([`Batch::check_limits`]), not when it is applied.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::sm::chain;

/// What a condition expects of a key's current value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    Absent,
    Present,
    Equals(Bytes),
}

/// A condition on one key, checked before a batch's operations run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub key: Bytes,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: Bytes,
        value: Bytes,
    },
    Delete {
        key: Bytes,
    },
    /// Appends `value` to the hash-chained log whose head is at `head` and whose entries are at
    /// `prefix ‖ seq`, linked at apply time (`chain.rs`). Never refused by the state machine;
    /// nodes older than this variant cannot apply it. The caller keeps the keys under `prefix`
    /// for the chain alone: no `Put`, `Delete` or condition may name them (other than a split
    /// giving them away), because entries reach the tree ahead of the rest of their apply's
    /// writes (`write_back.rs`).
    Append {
        head: Bytes,
        prefix: Bytes,
        value: Bytes,
    },
}

impl Op {
    /// The keys the operation writes: its key, or for an append the head and the entries'
    /// prefix (entries share their log's route).
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        let (first, second) = match self {
            Op::Put { key, .. } | Op::Delete { key } => (key, None),
            Op::Append { head, prefix, .. } => (head, Some(prefix)),
        };
        std::iter::once(first).chain(second)
    }

    /// Bytes the operation adds to the store, about.
    pub fn written_bytes(&self) -> u64 {
        match self {
            Op::Put { key, value } => (key.len() + value.len()) as u64,
            Op::Delete { .. } => 0,
            Op::Append {
                head,
                prefix,
                value,
            } => (head.len() + prefix.len() + value.len() + 2 * (8 + 32)) as u64,
        }
    }
}

/// An atomic batch: if every condition holds, every operation is applied; otherwise none is.
/// Compare-and-set is a batch of one `Equals` condition and one `Put`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub conditions: Vec<Condition>,
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn put(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Batch {
            conditions: Vec::new(),
            ops: vec![Op::Put {
                key: key.into(),
                value: value.into(),
            }],
        }
    }

    pub fn delete(key: impl Into<Bytes>) -> Self {
        Batch {
            conditions: Vec::new(),
            ops: vec![Op::Delete { key: key.into() }],
        }
    }

    /// Puts `new` at `key` only if its current value is `expected` (`None`: only if absent).
    pub fn compare_and_set(
        key: impl Into<Bytes>,
        expected: Option<Bytes>,
        new: impl Into<Bytes>,
    ) -> Self {
        let key = key.into();
        let expect = expected.map_or(Expect::Absent, Expect::Equals);
        Batch {
            conditions: vec![Condition {
                key: key.clone(),
                expect,
            }],
            ops: vec![Op::Put {
                key,
                value: new.into(),
            }],
        }
    }

    /// Checks key and value sizes and the number of conditions plus operations.
    pub fn check_limits(&self, config: &StoreConfig) -> Result<()> {
        let ops = self.conditions.len() + self.ops.len();
        if ops > config.ops_per_batch_max {
            return Err(Error::TooManyOps {
                ops,
                max: config.ops_per_batch_max,
            });
        }
        // By length: an append's entry key and value are checked before they exist.
        let check_key = |bytes: usize| {
            if bytes > config.key_bytes_max {
                return Err(Error::KeyTooLarge {
                    bytes,
                    max: config.key_bytes_max,
                });
            }
            Ok(())
        };
        let check_value = |bytes: usize| {
            if bytes > config.value_bytes_max {
                return Err(Error::ValueTooLarge {
                    bytes,
                    max: config.value_bytes_max,
                });
            }
            Ok(())
        };
        for condition in &self.conditions {
            check_key(condition.key.len())?;
            if let Expect::Equals(value) = &condition.expect {
                check_value(value.len())?;
            }
        }
        for op in &self.ops {
            match op {
                Op::Put { key, value } => {
                    check_key(key.len())?;
                    check_value(value.len())?;
                }
                Op::Delete { key } => check_key(key.len())?,
                Op::Append {
                    head,
                    prefix,
                    value,
                } => {
                    check_key(head.len())?;
                    // The entries' keys carry 8 more bytes, their values a 32-byte hash.
                    check_key(prefix.len() + 8)?;
                    check_value(value.len() + chain::HASH_BYTES)?;
                }
            }
        }
        Ok(())
    }
}

/// A client session and the sequence number of this request within it: the exactly-once key.
/// A session has one request in flight at a time; a retry carries the same sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub client: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An atomic batch, deduplicated per session when one is given.
    Txn {
        session: Option<Session>,
        batch: Batch,
    },
    /// Forgets sessions last used by an entry below `before_index` (bounds the session table).
    /// A retry from a forgotten session after this is answered `SessionExpired`, never re-applied.
    ExpireSessions { before_index: u64 },
    /// Splits the shard at hash `at`: keys routed to `[at, hi)` and a copy of the session table
    /// go to a new replica of shard `child` (created beside this one by the layer above, before
    /// this entry is applied: [`crate::StateStore::split_off`]); this replica keeps `[lo, at)`
    /// and refuses every other key from then on. `lo` and `hi` are the shard's range before the
    /// split (`hi: None`: to the end of the space).
    Split {
        at: u64,
        child: u64,
        lo: u64,
        hi: Option<u64>,
    },
}

impl Command {
    /// An upper bound of the command's postcard encoding, in bytes, computed without encoding it:
    /// every length and integer is counted at its longest varint. Proposers compare it with the
    /// log's entry limit before anything reaches Raft, so an oversized command is refused as the
    /// client's error and never as a log failure.
    pub fn encoded_bytes_bound(&self) -> usize {
        const VARINT_MAX: usize = 10;
        const TAG_MAX: usize = 5;
        match self {
            Command::Txn { batch, .. } => {
                let conditions: usize = batch
                    .conditions
                    .iter()
                    .map(|c| {
                        let value = match &c.expect {
                            Expect::Equals(v) => VARINT_MAX + v.len(),
                            Expect::Absent | Expect::Present => 0,
                        };
                        VARINT_MAX + c.key.len() + TAG_MAX + value
                    })
                    .sum();
                let ops: usize = batch
                    .ops
                    .iter()
                    .map(|op| match op {
                        Op::Put { key, value } => {
                            TAG_MAX + 2 * VARINT_MAX + key.len() + value.len()
                        }
                        Op::Delete { key } => TAG_MAX + VARINT_MAX + key.len(),
                        Op::Append {
                            head,
                            prefix,
                            value,
                        } => TAG_MAX + 3 * VARINT_MAX + head.len() + prefix.len() + value.len(),
                    })
                    .sum();
                // variant, session option and its two integers, two vector lengths
                TAG_MAX + 1 + 2 * VARINT_MAX + 2 * VARINT_MAX + conditions + ops
            }
            Command::ExpireSessions { .. } => TAG_MAX + VARINT_MAX,
            Command::Split { .. } => TAG_MAX + 4 * VARINT_MAX + 1,
        }
    }
}

/// What an entry carries, as the state machine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryPayload {
    /// A leader's no-op entry: only the applied id moves.
    Blank,
    /// A membership change, opaque here, kept with the applied id.
    Membership(Bytes),
    Command(Command),
}

/// One committed entry to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyEntry {
    pub index: u64,
    /// The caller's encoding of the entry's log id, returned by `applied()`.
    pub log_id: Bytes,
    pub payload: EntryPayload,
}

/// The result of applying one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Not a command (blank or membership), or sessions expired.
    Done,
    /// The batch's operations were applied.
    Applied,
    /// Condition `index` (in the batch's order) did not hold; nothing was applied.
    ConditionFailed { index: u32 },
    /// The session's sequence number is below the last one applied: an old, superseded retry.
    StaleSequence { last: u64 },
    /// The session is unknown although its sequence number says it was used before: it expired.
    SessionExpired,
    /// A retry of the session's last request: nothing was applied again. The first application
    /// is answered once more: its log index, and the condition that failed (`None`: applied).
    Replayed {
        index: u64,
        failed_condition: Option<u32>,
    },
    /// A key of the batch is routed outside the range this replica owns since a split: nothing
    /// was applied and the session was not recorded (the request is retried on the other side).
    OutOfRange,
}

impl Outcome {
    pub(crate) fn encode(self) -> [u8; 5] {
        let (kind, arg) = match self {
            Outcome::Done => (0, 0),
            Outcome::Applied => (1, 0),
            Outcome::ConditionFailed { index } => (2, index),
            // Only Applied and ConditionFailed are ever stored in the session table.
            Outcome::StaleSequence { .. }
            | Outcome::SessionExpired
            | Outcome::Replayed { .. }
            | Outcome::OutOfRange => {
                unreachable!("never stored")
            }
        };
        let mut out = [kind, 0, 0, 0, 0];
        out[1..].copy_from_slice(&arg.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Outcome> {
        let arg = u32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?);
        match bytes.first()? {
            0 => Some(Outcome::Done),
            1 => Some(Outcome::Applied),
            2 => Some(Outcome::ConditionFailed { index: arg }),
            _ => None,
        }
    }
}
