//! The one error type of `dossier-storage`.
//!
//! Retry-able conditions (`Backpressure` is not one: the engine blocks instead) are kept apart from
//! fatal ones: `Corrupt`, `Io` and `Failed` mean this node's storage cannot be trusted and the node
//! must stop. Errors carry ids, paths and offsets, never record contents.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::{GroupId, ShardId};

/// Errors of the log engine, the state store and snapshot files.
///
/// `Clone` because one I/O failure is reported to every caller waiting on the same group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {field} {rule}")]
    InvalidConfig { field: &'static str, rule: String },

    #[error("i/o failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    #[error("{path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },

    #[error("the log engine stopped after an earlier fatal error; restart the node")]
    Failed,

    #[error("the log engine is closed")]
    Closed,

    #[error("entry {index} of group {group} is {bytes} bytes, above entry-bytes-max {max}")]
    EntryTooLarge {
        group: GroupId,
        index: u64,
        bytes: usize,
        max: u32,
    },

    #[error("write batch is {bytes} bytes, above batch-bytes-max {max}")]
    BatchTooLarge { bytes: usize, max: usize },

    #[error("group {group}: append of index {got} does not follow the log (expected {expected})")]
    NotContiguous {
        group: GroupId,
        expected: u64,
        got: u64,
    },

    #[error("group {group}: cannot truncate from {index}, entries up to {purged} are purged")]
    TruncatePurged {
        group: GroupId,
        index: u64,
        purged: u64,
    },

    #[error("group {group}: index {index} is not in the log")]
    EntryMissing { group: GroupId, index: u64 },

    #[error("sled failed to {op}")]
    Sled {
        op: &'static str,
        #[source]
        source: Arc<sled::Error>,
    },

    #[error("shard {shard}: a stored {what} does not decode")]
    StoreCorrupt { shard: ShardId, what: &'static str },

    #[error("shard {shard}: entry {index} does not follow the applied index {applied:?}")]
    ApplyOutOfOrder {
        shard: ShardId,
        index: u64,
        applied: Option<u64>,
    },

    #[error("shard {shard} has no replica in this state store")]
    ShardMissing { shard: ShardId },

    #[error("shard {shard} already has a replica in this state store")]
    ShardExists { shard: ShardId },

    #[error("key of {bytes} bytes is above key-bytes-max {max}")]
    KeyTooLarge { bytes: usize, max: usize },

    #[error("value of {bytes} bytes is above value-bytes-max {max}")]
    ValueTooLarge { bytes: usize, max: usize },

    #[error("batch has {ops} operations, above ops-per-batch-max {max}")]
    TooManyOps { ops: usize, max: usize },

    #[error("snapshot is for shard {found}, not shard {expected}")]
    SnapshotShardMismatch { expected: ShardId, found: ShardId },

    #[error(
        "the snapshot view of shard {shard} was released before it was read (writes outgrew \
         state.snapshot-hold-bytes-max, or a snapshot was installed); take a new one"
    )]
    SnapshotViewLost { shard: ShardId },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn sled(op: &'static str, source: sled::Error) -> Self {
        Error::Sled {
            op,
            source: Arc::new(source),
        }
    }

    /// True when the node must stop: its storage can no longer be trusted.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Corrupt { .. } | Error::Failed | Error::Sled { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
