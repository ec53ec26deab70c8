//! The record layer's key-value primitives (`dossier_records::kv`) over this node's store: reads
//! of a local replica, and record-layer batches as store batches.

use bytes::Bytes;
use dossier_records::kv;
use dossier_storage::{Batch, Condition, Expect, Op, ShardHandle};

use crate::errors::ApiError;

/// Reads of one local replica (after whatever barrier the caller waited for).
#[derive(Debug)]
pub struct ReplicaReads<'a>(pub &'a ShardHandle);

impl kv::Reads for ReplicaReads<'_> {
    type Error = ApiError;

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, ApiError> {
        self.0
            .get(key)
            .map_err(|e| ApiError::Unavailable(format!("read the state store: {e}")))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, ApiError> {
        self.0
            .scan_prefix(prefix, start_after, limit)
            .map_err(|e| ApiError::Unavailable(format!("scan the state store: {e}")))
    }
}

/// A record-layer op as a store op.
pub fn to_storage_op(op: kv::Op) -> Op {
    match op {
        kv::Op::Put { key, value } => Op::Put { key, value },
        kv::Op::Delete { key } => Op::Delete { key },
        kv::Op::Append {
            head,
            prefix,
            value,
        } => Op::Append {
            head,
            prefix,
            value,
        },
    }
}

/// A record-layer batch as a store batch (same conditions, same ops, same order).
pub fn to_storage(batch: kv::Batch) -> Batch {
    Batch {
        conditions: batch
            .conditions
            .into_iter()
            .map(|c| Condition {
                key: c.key,
                expect: match c.expect {
                    kv::Expect::Absent => Expect::Absent,
                    kv::Expect::Present => Expect::Present,
                    kv::Expect::Equals(v) => Expect::Equals(v),
                },
            })
            .collect(),
        ops: batch.ops.into_iter().map(to_storage_op).collect(),
    }
}
