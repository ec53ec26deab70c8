//! The key-value primitives the record layer is built on, as the store offers them: point reads
//! and prefix scans of one shard's replica, and one conditional batch per write (all conditions
//! hold and every op applies, or nothing does). The node adapts its store to these.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

/// What a condition expects of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Absent,
    Present,
    Equals(Bytes),
}

/// One condition of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: Bytes,
    pub expect: Expect,
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Bytes,
        value: Bytes,
    },
    Delete {
        key: Bytes,
    },
    /// Appends `value` to the hash-chained log at `head`, entries at `prefix ‖ seq`, linked by
    /// the store when it applies the batch (the patient's audit chain).
    Append {
        head: Bytes,
        prefix: Bytes,
        value: Bytes,
    },
}

/// A conditional batch: applied whole if every condition holds, else not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub conditions: Vec<Condition>,
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn put(&mut self, key: Bytes, value: impl Into<Bytes>) {
        self.ops.push(Op::Put {
            key,
            value: value.into(),
        });
    }

    pub fn delete(&mut self, key: Bytes) {
        self.ops.push(Op::Delete { key });
    }
}

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchResult {
    Applied,
    /// The position of the first condition that failed.
    Failed(u32),
}

/// Reads of one replica of a shard, after whatever barrier the caller needs.
pub trait Reads {
    /// The caller's error type; the record layer's own errors convert into it.
    type Error: From<crate::Error>;

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Self::Error>;

    /// Up to `limit` pairs whose key starts with `prefix`, in key order, after `start_after`.
    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, Self::Error>;
}

/// Linearizable reads and conditional batches on the shard holding a routing key (a patient id
/// or an identifier's `mpi:` key), wherever it is in the cluster.
pub trait Shards: Send + Sync {
    type Error: From<crate::Error> + std::fmt::Display + Send;

    fn read(
        &self,
        route_key: &str,
        keys: Vec<Bytes>,
        deadline: Duration,
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>, Self::Error>> + Send;

    fn write(
        &self,
        route_key: &str,
        batch: Batch,
        deadline: Duration,
    ) -> impl Future<Output = Result<BatchResult, Self::Error>> + Send;

    /// The error for a deadline that passed inside the record layer.
    fn deadline_passed(&self) -> Self::Error;
}
