//! Snapshot files: a point-in-time copy of one shard replica.
//!
//! ```text
//! "DSSNAP01"
//! frame  1 header   shard u64 | applied? u8 [index u64 | log_id_len u32 | log_id]
//!                   | membership? u8 [membership_len u32 | membership]
//! frame  2 record   key_len u32 | key (tree key, space byte first) | value      (repeated)
//! frame  3 trailer  records u64
//! ```
//! Frames are the log's (`len | crc32 | payload`). A file is valid only whole: a torn or cut file
//! lacks its trailer, a damaged one fails a crc32, and either is refused before anything changes.
//!
//! Point in time without pausing applies: a file is written from a [`SnapshotView`]
//! (`view.rs`), which holds the shard's tree at one applied id while applies go on in memory.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tracing::info;

use crate::ShardId;
use crate::error::{Error, Result};
use crate::log::frame::{self, FRAME_HEADER_BYTES};
use crate::sm::shard::{self, Applied, Checkpoint, KEY_APPLIED, KEY_MEMBERSHIP};
use crate::sm::store::{self, StateStore};

mod view;

pub use view::SnapshotView;

const MAGIC: &[u8; 8] = b"DSSNAP01";
const KIND_HEADER: u8 = 1;
const KIND_RECORD: u8 = 2;
const KIND_TRAILER: u8 = 3;
/// Records inserted per sled batch while installing.
const INSTALL_BATCH_RECORDS: usize = 4096;

/// What a snapshot file holds, from its header and trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub shard: ShardId,
    pub applied: Option<Applied>,
    pub membership: Option<Bytes>,
    /// Key/value records (data and sessions).
    pub records: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

fn encode_header(meta: &SnapshotMeta) -> Vec<u8> {
    let mut p = vec![KIND_HEADER];
    p.extend_from_slice(&meta.shard.to_le_bytes());
    match &meta.applied {
        Some(applied) => {
            p.push(1);
            p.extend_from_slice(&applied.index.to_le_bytes());
            put_bytes(&mut p, &applied.log_id);
        }
        None => p.push(0),
    }
    match &meta.membership {
        Some(membership) => {
            p.push(1);
            put_bytes(&mut p, membership);
        }
        None => p.push(0),
    }
    p
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(
        &u32::try_from(bytes.len())
            .expect("bounded by config")
            .to_le_bytes(),
    );
    out.extend_from_slice(bytes);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

fn decode_header(payload: &[u8]) -> Option<SnapshotMeta> {
    let mut c = Cursor(payload);
    if c.u8()? != KIND_HEADER {
        return None;
    }
    let shard = c.u64()?;
    let applied = match c.u8()? {
        0 => None,
        1 => {
            let index = c.u64()?;
            Some(Applied {
                index,
                log_id: Bytes::copy_from_slice(c.bytes()?),
            })
        }
        _ => return None,
    };
    let membership = match c.u8()? {
        0 => None,
        1 => Some(Bytes::copy_from_slice(c.bytes()?)),
        _ => return None,
    };
    c.0.is_empty().then_some(SnapshotMeta {
        shard,
        applied,
        membership,
        records: 0,
        bytes: 0,
    })
}

fn write_frame(
    out: &mut impl Write,
    payload: &[u8],
    scratch: &mut Vec<u8>,
) -> std::io::Result<usize> {
    scratch.clear();
    frame::encode_frame(payload, u32::MAX, scratch);
    out.write_all(scratch)?;
    Ok(scratch.len())
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync snapshot directory", dir, e))
}

/// Reads the frames of a snapshot file in order, checking each.
struct FrameReader {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    len: u64,
}

impl FrameReader {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("open snapshot", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat snapshot", path, e))?
            .len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        let corrupt = |offset, reason| Error::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        };
        reader
            .read_exact(&mut magic)
            .map_err(|_| corrupt(0, "snapshot is shorter than its magic"))?;
        if &magic != MAGIC {
            return Err(corrupt(0, "snapshot has a wrong magic number"));
        }
        Ok(FrameReader {
            path: path.to_path_buf(),
            reader,
            offset: MAGIC.len() as u64,
            len,
        })
    }

    fn corrupt(&self, reason: &'static str) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            reason,
        }
    }

    /// The next frame's payload; `None` at the end of the file.
    fn next(&mut self) -> Result<Option<Vec<u8>>> {
        if self.offset == self.len {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        self.reader
            .read_exact(&mut header)
            .map_err(|_| self.corrupt("snapshot frame is cut short"))?;
        let (len, crc) =
            frame::decode_header(&header, u32::MAX).map_err(|f| self.corrupt(f.as_str()))?;
        // Lengths come from disk: check them against the file before allocating.
        if u64::from(len) > self.len - self.offset - FRAME_HEADER_BYTES as u64 {
            return Err(self.corrupt("snapshot frame is cut short"));
        }
        let mut payload = vec![0; len as usize];
        self.reader
            .read_exact(&mut payload)
            .map_err(|_| self.corrupt("snapshot frame is cut short"))?;
        if crc32fast::hash(&payload) != crc {
            return Err(self.corrupt("snapshot frame failed its crc32 check"));
        }
        self.offset += FRAME_HEADER_BYTES as u64 + u64::from(len);
        Ok(Some(payload))
    }
}

impl StateStore {
    /// Replaces the replica of `shard` with the snapshot at `path`, atomically: the snapshot is
    /// loaded into a fresh tree, made durable, and only then named in the catalog. A damaged
    /// snapshot is refused and the old state stays.
    pub fn install_snapshot(&self, shard: ShardId, path: &Path) -> Result<SnapshotMeta> {
        let handle = self.shard(shard).ok_or(Error::ShardMissing { shard })?;
        let inner = Arc::clone(self.inner());
        let _applying = handle.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Views of the replaced state fail when they next look.
        handle.break_hold_locked();
        let old = handle.tree().clone();
        let generation = inner
            .catalog
            .get(shard.to_be_bytes())
            .map_err(|e| Error::sled("read catalog", e))?
            .and_then(|g| g.as_ref().try_into().ok().map(u64::from_be_bytes))
            .ok_or(Error::StoreCorrupt {
                shard,
                what: "catalog entry",
            })?
            + 1;
        let name = store::tree_name(shard, generation);
        let fresh = inner
            .db
            .open_tree(&name)
            .map_err(|e| Error::sled("create snapshot tree", e))?;
        fresh
            .clear()
            .map_err(|e| Error::sled("clear snapshot tree", e))?;
        let loaded = load(&fresh, shard, path);
        let meta = match loaded {
            Ok(meta) => meta,
            Err(e) => {
                inner
                    .db
                    .drop_tree(name.as_bytes())
                    .map_err(|e| Error::sled("drop refused snapshot tree", e))?;
                return Err(e);
            }
        };
        // The fresh tree must be on disk before the catalog names it.
        inner
            .db
            .flush()
            .map_err(|e| Error::sled("flush installed snapshot", e))?;
        inner
            .catalog
            .insert(shard.to_be_bytes(), &generation.to_be_bytes())
            .map_err(|e| Error::sled("switch catalog to snapshot", e))?;
        inner
            .db
            .flush()
            .map_err(|e| Error::sled("flush catalog switch", e))?;
        *handle.tree.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        let applied = meta.applied.as_ref().map_or(0, |a| a.index + 1);
        handle.discard_write_back_locked();
        handle.reload_range_locked()?;
        handle.applied.store(applied, Ordering::Release);
        handle.stored_applied.store(applied, Ordering::Release);
        handle.durable_applied.store(applied, Ordering::Release);
        *handle
            .durable_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = meta.applied.clone().map(|applied| Checkpoint {
            applied,
            membership: meta.membership.clone(),
        });
        inner
            .db
            .drop_tree(old.name())
            .map_err(|e| Error::sled("drop replaced shard tree", e))?;
        info!(
            shard,
            records = meta.records,
            generation,
            "snapshot installed"
        );
        Ok(meta)
    }
}

/// Loads a snapshot file into an empty tree, checking every frame and the trailer.
fn load(tree: &sled::Tree, shard: ShardId, path: &Path) -> Result<SnapshotMeta> {
    let mut frames = FrameReader::open(path)?;
    let mut meta = match frames.next()? {
        Some(payload) => decode_header(&payload)
            .ok_or_else(|| frames.corrupt("snapshot header does not decode"))?,
        None => return Err(frames.corrupt("snapshot has no header")),
    };
    if meta.shard != shard {
        return Err(Error::SnapshotShardMismatch {
            expected: shard,
            found: meta.shard,
        });
    }
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    let mut trailer = None;
    while let Some(payload) = frames.next()? {
        if trailer.is_some() {
            return Err(frames.corrupt("snapshot has frames after its trailer"));
        }
        let mut c = Cursor(&payload);
        match c.u8() {
            Some(KIND_RECORD) => {
                let key = c
                    .bytes()
                    .ok_or_else(|| frames.corrupt("snapshot record does not decode"))?;
                if key.first().is_none_or(|&space| space == shard::SPACE_META) {
                    return Err(frames.corrupt("snapshot record has a reserved key"));
                }
                batch.insert(key, c.0);
                meta.records += 1;
                in_batch += 1;
                if in_batch == INSTALL_BATCH_RECORDS {
                    tree.apply_batch(std::mem::take(&mut batch))
                        .map_err(|e| Error::sled("load snapshot", e))?;
                    in_batch = 0;
                }
            }
            Some(KIND_TRAILER) => {
                trailer = Some(
                    c.u64()
                        .filter(|_| c.0.is_empty())
                        .ok_or_else(|| frames.corrupt("snapshot trailer does not decode"))?,
                );
            }
            _ => return Err(frames.corrupt("snapshot frame has an unknown kind")),
        }
    }
    match trailer {
        Some(records) if records == meta.records => {}
        Some(_) => return Err(frames.corrupt("snapshot trailer disagrees with its record count")),
        None => return Err(frames.corrupt("snapshot has no trailer: the file is cut short")),
    }
    if let Some(applied) = &meta.applied {
        batch.insert(KEY_APPLIED, shard::encode_applied(applied));
    }
    if let Some(membership) = &meta.membership {
        batch.insert(KEY_MEMBERSHIP, membership.as_ref());
    }
    tree.apply_batch(batch)
        .map_err(|e| Error::sled("load snapshot", e))?;
    meta.bytes = frames.offset;
    Ok(meta)
}

/// What a snapshot file's header says: enough to describe it without reading it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub shard: ShardId,
    pub applied: Option<Applied>,
    pub membership: Option<Bytes>,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Reads the header of a snapshot file (checking its magic and the header frame's crc32 only).
pub fn read_snapshot_header(path: &Path) -> Result<SnapshotHeader> {
    let mut frames = FrameReader::open(path)?;
    let payload = frames
        .next()?
        .ok_or_else(|| frames.corrupt("snapshot has no header"))?;
    let meta =
        decode_header(&payload).ok_or_else(|| frames.corrupt("snapshot header does not decode"))?;
    Ok(SnapshotHeader {
        shard: meta.shard,
        applied: meta.applied,
        membership: meta.membership,
        bytes: frames.len,
    })
}

/// Reads up to `max_bytes` of a snapshot file from `offset`: one chunk of a stream to a peer.
pub fn read_snapshot_chunk(path: &Path, offset: u64, max_bytes: usize) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| Error::io("open snapshot", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat snapshot", path, e))?
        .len();
    let want = usize::try_from(len.saturating_sub(offset))
        .unwrap_or(usize::MAX)
        .min(max_bytes);
    let mut buf = vec![0; want];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| Error::io("read snapshot chunk", path, e))?;
    Ok(Bytes::from(buf))
}

/// Receives a snapshot stream chunk by chunk into a temporary file, then puts it in place. A
/// receiver dropped before `finish` removes its temporary file.
#[derive(Debug)]
pub struct SnapshotReceiver {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    written: u64,
    bytes_max: u64,
    finished: bool,
}

impl Drop for SnapshotReceiver {
    fn drop(&mut self) {
        if !self.finished
            && let Err(e) = fs::remove_file(&self.tmp)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.tmp.display(), error = %e, "failed to remove a partial snapshot");
        }
    }
}

impl SnapshotReceiver {
    /// Starts receiving into `path`; the stream may hold at most `bytes_max` bytes.
    pub fn create(path: &Path, bytes_max: u64) -> Result<Self> {
        let tmp = path.with_extension("recv");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io("create received snapshot", &tmp, e))?;
        Ok(SnapshotReceiver {
            path: path.to_path_buf(),
            tmp,
            file,
            written: 0,
            bytes_max,
            finished: false,
        })
    }

    /// Appends the chunk that starts at `offset`; chunks must arrive in order. A repeated chunk
    /// (a retry) is accepted once more only if it ends where the file already ends.
    pub fn write_chunk(&mut self, offset: u64, chunk: &[u8]) -> Result<()> {
        let out_of_order = |reason| Error::Corrupt {
            path: self.tmp.clone(),
            offset,
            reason,
        };
        let end = offset
            .checked_add(chunk.len() as u64)
            .ok_or_else(|| out_of_order("snapshot chunk offset overflows"))?;
        if end == self.written && offset < self.written {
            return Ok(());
        }
        if offset != self.written {
            return Err(out_of_order("snapshot chunk out of order"));
        }
        if end > self.bytes_max {
            return Err(out_of_order("snapshot stream exceeds its size limit"));
        }
        self.file
            .write_all_at(chunk, offset)
            .map_err(|e| Error::io("write received snapshot", &self.tmp, e))?;
        self.written = end;
        Ok(())
    }

    /// Makes the received file durable and moves it to its path; the caller then installs it.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync received snapshot", &self.tmp, e))?;
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io("rename received snapshot", &self.path, e))?;
        self.finished = true;
        if let Err(e) = sync_dir(&self.path) {
            let _ = fs::remove_file(&self.path);
            return Err(e);
        }
        Ok(self.path.clone())
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.written
    }
}
