//! Configuration of the log engine and the state store. Every limit is here, validated at start-up.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::log::frame::FRAME_HEADER_BYTES;
use crate::log::record::RECORD_OVERHEAD_MAX;
use crate::log::segment::SEGMENT_HEADER_BYTES;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The shared Raft log of one node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    /// Directory of the segment files; created if missing.
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it would grow past this many bytes.
    pub segment_bytes_max: u64,
    /// Largest payload of one entry (and of one group's vote plus committed id), in bytes.
    pub entry_bytes_max: u32,
    /// Largest encoded size of one write batch, in bytes.
    pub batch_bytes_max: usize,
    /// Bytes queued for the disk beyond which writers wait (back-pressure, bounded memory).
    pub pending_bytes_max: usize,
    /// Bytes of entry payloads kept in memory for reads; unflushed entries are held beyond it.
    pub cache_bytes_max: usize,
    /// The node keeps the log's segment files below this many bytes: once the segments' frames
    /// reach half of it less two segments, the groups whose entries pin the oldest segment are
    /// compacted (a checkpoint of their state, then a purge) until it can be reclaimed. The other
    /// half is room for the writes made while that runs. Not enforced by the engine itself.
    pub disk_bytes_target: u64,
    /// After a round that completed many waiters, how long the writer may wait for them to submit
    /// again before its next fdatasync, in microseconds (0: never wait). Trades a little latency
    /// under high concurrency for far fewer fsyncs.
    pub group_commit_linger_us: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            dir: PathBuf::from("dossier-data/log"),
            segment_bytes_max: 64 * MIB,
            entry_bytes_max: 4 * MIB as u32,
            batch_bytes_max: 32 * MIB as usize,
            pending_bytes_max: 64 * MIB as usize,
            cache_bytes_max: 128 * MIB as usize,
            disk_bytes_target: 512 * MIB,
            group_commit_linger_us: 200,
        }
    }
}

impl LogConfig {
    /// A frame payload may hold an entry plus the record's own fields.
    pub(crate) fn frame_payload_max(&self) -> u32 {
        self.entry_bytes_max + RECORD_OVERHEAD_MAX as u32
    }

    pub fn validate(self) -> Result<Arc<Self>> {
        let invalid = |field, rule: String| Err(Error::InvalidConfig { field, rule });
        if self.segment_bytes_max < 64 * KIB || self.segment_bytes_max > u64::from(u32::MAX) {
            return invalid(
                "segment-bytes-max",
                format!(
                    "must be within 64 KiB..4 GiB, is {}",
                    self.segment_bytes_max
                ),
            );
        }
        if self.entry_bytes_max == 0 || self.entry_bytes_max > u32::MAX / 2 {
            return invalid(
                "entry-bytes-max",
                format!("must be within 1..2 GiB, is {}", self.entry_bytes_max),
            );
        }
        let frame_max = (SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES) as u64
            + u64::from(self.frame_payload_max());
        if frame_max > self.segment_bytes_max {
            return invalid(
                "entry-bytes-max",
                format!(
                    "{} does not fit one segment of segment-bytes-max {}",
                    self.entry_bytes_max, self.segment_bytes_max
                ),
            );
        }
        if (self.batch_bytes_max as u64) < frame_max {
            return invalid(
                "batch-bytes-max",
                format!(
                    "{} cannot hold one entry of entry-bytes-max",
                    self.batch_bytes_max
                ),
            );
        }
        if self.disk_bytes_target < 8 * self.segment_bytes_max {
            return invalid(
                "disk-bytes-target",
                format!(
                    "{} is below 8 x segment-bytes-max {} (room for the live segments, the \
                     prepared one and the writes made while compaction runs)",
                    self.disk_bytes_target, self.segment_bytes_max
                ),
            );
        }
        if self.group_commit_linger_us > 10_000 {
            return invalid(
                "group-commit-linger-us",
                format!("must be at most 10000, is {}", self.group_commit_linger_us),
            );
        }
        if self.pending_bytes_max < self.batch_bytes_max {
            return invalid(
                "pending-bytes-max",
                format!(
                    "{} is below batch-bytes-max {}",
                    self.pending_bytes_max, self.batch_bytes_max
                ),
            );
        }
        Ok(Arc::new(self))
    }
}

/// The sled state store of one node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// Directory of the sled database; created if missing.
    pub dir: PathBuf,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// How often the store is flushed to disk, in milliseconds; the durable applied index of every
    /// shard advances at each flush. sled's own background flusher is turned off.
    pub flush_interval_ms: u64,
    /// Applied writes a shard keeps in memory before handing them to sled as one batch, in bytes
    /// (every flush hands them over too). Reads see them either way.
    pub write_back_bytes: usize,
    /// Largest key, in bytes.
    pub key_bytes_max: usize,
    /// Largest value, in bytes.
    pub value_bytes_max: usize,
    /// Most conditions plus operations in one atomic batch.
    pub ops_per_batch_max: usize,
    /// While a snapshot for a peer is read from a shard, the shard's applied writes wait in memory
    /// (so that the read sees one state); past this many bytes the read is abandoned and retried.
    pub snapshot_hold_bytes_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dir: PathBuf::from("dossier-data/state"),
            cache_bytes: 256 * MIB,
            flush_interval_ms: 200,
            write_back_bytes: MIB as usize,
            key_bytes_max: 4 * KIB as usize,
            value_bytes_max: MIB as usize,
            ops_per_batch_max: 1024,
            snapshot_hold_bytes_max: 256 * MIB as usize,
        }
    }
}

impl StoreConfig {
    pub fn validate(self) -> Result<Arc<Self>> {
        let invalid = |field, rule: String| Err(Error::InvalidConfig { field, rule });
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000 {
            return invalid(
                "flush-interval-ms",
                format!("must be within 1..60000, is {}", self.flush_interval_ms),
            );
        }
        if self.write_back_bytes > 256 * MIB as usize {
            return invalid(
                "write-back-bytes",
                format!("must be at most 256 MiB, is {}", self.write_back_bytes),
            );
        }
        if self.key_bytes_max == 0 || self.key_bytes_max > 64 * KIB as usize {
            return invalid(
                "key-bytes-max",
                format!("must be within 1..64 KiB, is {}", self.key_bytes_max),
            );
        }
        if self.value_bytes_max == 0 || self.value_bytes_max > 64 * MIB as usize {
            return invalid(
                "value-bytes-max",
                format!("must be within 1..64 MiB, is {}", self.value_bytes_max),
            );
        }
        if self.snapshot_hold_bytes_max < self.write_back_bytes {
            return invalid(
                "snapshot-hold-bytes-max",
                format!(
                    "{} is below write-back-bytes {}",
                    self.snapshot_hold_bytes_max, self.write_back_bytes
                ),
            );
        }
        if self.ops_per_batch_max == 0 {
            return invalid("ops-per-batch-max", "must be at least 1".to_owned());
        }
        Ok(Arc::new(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defaults are valid, and relations between limits are checked with a message naming the field.
    #[test]
    fn validate_checks_relations() {
        assert!(LogConfig::default().validate().is_ok());
        assert!(StoreConfig::default().validate().is_ok());
        let cfg = LogConfig {
            entry_bytes_max: 64 * MIB as u32 + 1,
            ..LogConfig::default()
        };
        let err = cfg.validate().expect_err("entry larger than a segment");
        assert!(err.to_string().contains("entry-bytes-max"), "{err}");
        let cfg = LogConfig {
            pending_bytes_max: 1,
            ..LogConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(Error::InvalidConfig {
                field: "pending-bytes-max",
                ..
            })
        ));
        let cfg = StoreConfig {
            flush_interval_ms: 0,
            ..StoreConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(Error::InvalidConfig {
                field: "flush-interval-ms",
                ..
            })
        ));
    }
}
