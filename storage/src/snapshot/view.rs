//! `SnapshotView`: one shard replica's state at one applied id, read while applies go on.
//!
//! sled has no consistent iterator across concurrent writes. A shard's applies already go to its
//! write-back buffer first and reach the tree in batches; a view **holds** the tree: while any
//! view of the current hold epoch lives, the buffer is not handed to sled, so the tree keeps
//! exactly the state (data, sessions, applied id, membership) it had when the view was taken,
//! and every read still sees the newest writes through the buffer. Nothing pauses.
//!
//! The buffer's growth is bounded by `state.snapshot-hold-bytes-max`: an apply that takes it
//! past the bound breaks the hold (a new epoch) and writes back, and the view's scan fails when it
//! next checks; installing a snapshot breaks it too. So memory stays bounded however slow a scan
//! is, and a view never reads a state other than the one it names.
//!
//! A view is taken only when a peer needs the shard's state (a follower behind the log's purge
//! point, a new or rebuilt replica): keeping the log short costs no copy of the shard.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use tracing::info;

use super::write_frame;
use super::{KIND_RECORD, KIND_TRAILER, MAGIC, SnapshotMeta, encode_header, put_bytes, sync_dir};
use crate::error::{Error, Result};
use crate::sm::shard::{self, ShardStore};

/// Records scanned between checks that the hold still stands.
const HOLD_CHECK_RECORDS: u64 = 4096;

/// A shard replica's state held at one applied id; dropping the view releases the hold.
#[derive(Debug)]
pub struct SnapshotView {
    shard: Arc<ShardStore>,
    tree: sled::Tree,
    meta: SnapshotMeta,
    epoch: u64,
}

impl ShardStore {
    /// Holds the tree at its current state (writing the buffer back first, unless another view
    /// holds it already) and returns a view of it.
    pub fn view(self: &Arc<Self>) -> Result<SnapshotView> {
        let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.write_back_locked()?;
        let checkpoint = self.tree_checkpoint_locked()?;
        let tree = self.tree().clone();
        let epoch = {
            let mut hold = self.hold_state();
            hold.views += 1;
            hold.epoch
        };
        Ok(SnapshotView {
            shard: Arc::clone(self),
            tree,
            meta: SnapshotMeta {
                shard: self.shard(),
                applied: checkpoint.as_ref().map(|c| c.applied.clone()),
                membership: checkpoint.and_then(|c| c.membership),
                records: 0,
                bytes: 0,
            },
            epoch,
        })
    }

    /// Writes a snapshot of the current state to `path` (a view taken and written at once).
    pub fn build_snapshot(self: &Arc<Self>, path: &Path) -> Result<SnapshotMeta> {
        self.view()?.write_to(path)
    }
}

impl SnapshotView {
    /// What the view holds: shard, applied id and membership (records and bytes are 0 until
    /// written).
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    fn intact(&self) -> Result<()> {
        if self.shard.hold_state().epoch == self.epoch {
            Ok(())
        } else {
            Err(Error::SnapshotViewLost {
                shard: self.meta.shard,
            })
        }
    }

    /// Writes the held state as a snapshot file at `path` (a temporary file, fsync'ed, then
    /// renamed). Applies go on meanwhile; fails with `SnapshotViewLost` if the hold was broken.
    pub fn write_to(&self, path: &Path) -> Result<SnapshotMeta> {
        let tmp = path.with_extension("tmp");
        let written = self.write_file(&tmp);
        let meta = match written {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, path).map_err(|e| Error::io("rename snapshot into place", path, e))?;
        sync_dir(path)?;
        info!(
            shard = meta.shard,
            records = meta.records,
            bytes = meta.bytes,
            "snapshot written"
        );
        Ok(meta)
    }

    fn write_file(&self, tmp: &Path) -> Result<SnapshotMeta> {
        let file = File::create(tmp).map_err(|e| Error::io("create snapshot", tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let io = |e| Error::io("write snapshot", tmp, e);
        let mut scratch = Vec::new();
        let mut meta = self.meta.clone();
        let mut bytes = MAGIC.len() as u64;
        out.write_all(MAGIC).map_err(io)?;
        bytes += write_frame(&mut out, &encode_header(&meta), &mut scratch).map_err(io)? as u64;
        let mut payload = Vec::new();
        for item in self.tree.range([shard::SPACE_SESSION]..) {
            let (key, value) = item.map_err(|e| Error::sled("scan shard for snapshot", e))?;
            payload.clear();
            payload.push(KIND_RECORD);
            put_bytes(&mut payload, &key);
            payload.extend_from_slice(&value);
            bytes += write_frame(&mut out, &payload, &mut scratch).map_err(io)? as u64;
            meta.records += 1;
            if meta.records.is_multiple_of(HOLD_CHECK_RECORDS) {
                self.intact()?;
            }
        }
        // Everything read came from the held state only if the hold still stands now.
        self.intact()?;
        let mut trailer = vec![KIND_TRAILER];
        trailer.extend_from_slice(&meta.records.to_le_bytes());
        bytes += write_frame(&mut out, &trailer, &mut scratch).map_err(io)? as u64;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io("fsync snapshot", tmp, e))?;
        meta.bytes = bytes;
        Ok(meta)
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        let mut hold = self.shard.hold_state();
        if hold.epoch == self.epoch {
            hold.views -= 1;
        }
    }
}
