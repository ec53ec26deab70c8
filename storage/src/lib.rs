//! `dossier-storage`: the durable base of a Dossier node.
//!
//! - [`LogEngine`]: one segmented, crc32-framed, group-committed write-ahead log per node, shared by
//!   every Raft group hosted on it.
//! - [`StateStore`]: one sled database per node, one tree per shard replica; data, applied log id,
//!   membership and the exactly-once session table change together in one atomic batch.
//! - Snapshot files: a point-in-time copy of one shard replica, crc32-framed, streamed in chunks.
//!
//! Non-goals: this crate knows nothing of openraft, tonic or patients. The `raft` crate adapts it
//! to openraft's storage traits; entries, votes and log ids are opaque bytes here.
//!
//! Invariants (see `docs/invariants.md`): no write is acknowledged before its bytes are
//! fdatasync'ed; recovery yields a prefix of what was written that holds every acknowledged record,
//! or fails naming the corrupt file and offset; a segment is deleted only when nothing live needs
//! it; a state store's applied log id always describes exactly the data beside it.

mod config;
mod error;
mod log;
mod sm;
mod snapshot;

/// Identifies a Raft group in the shared log (for Dossier, a shard replica's group).
pub type GroupId = u64;
/// Identifies a shard, and so its tree in the state store.
pub type ShardId = u64;

pub use config::{LogConfig, StoreConfig};
pub use error::{Error, Result};
pub use log::engine::{
    APPEND_FRAME_BYTES_MAX, GroupState, LogEngine, LogStats, OnDurable, Pin, Submit, WriteBatch,
};
pub use log::frame::FRAME_HEADER_BYTES;
pub use log::record::HardState;
pub use log::segment::SegmentId;
pub use sm::chain;
pub use sm::command::{
    ApplyEntry, Batch, Command, Condition, EntryPayload, Expect, Op, Outcome, Session,
};
pub use sm::range::{HashRange, KeyRoute};
pub use sm::shard::{Applied, Checkpoint, ScanPage, ShardHandle, ShardStore};
pub use sm::split::SplitCopy;
pub use sm::store::StateStore;
pub use snapshot::{
    SnapshotHeader, SnapshotMeta, SnapshotReceiver, SnapshotView, read_snapshot_chunk,
    read_snapshot_header,
};
