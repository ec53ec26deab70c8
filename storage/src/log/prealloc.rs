//! Zero-filled segment files prepared ahead of need.
//!
//! fdatasync after appending to a growing file also commits the file's new size and extents
//! through the ext4 journal: more I/O per round than the data itself. Overwriting blocks that
//! are already allocated and written needs no metadata, so the log writes into segments that
//! were zero-filled (and fsync'ed) in advance by this thread, renamed into place when the writer
//! rolls to a new segment. A zero-filled tail is therefore normal in the newest segment (see
//! recovery); an older segment is cut to its used length when the next one is created.
//!
//! The prepared file is not part of the log: it is renamed ready only once complete and fsync'ed,
//! kept across restarts if it has the configured size, and removed otherwise. A new log prepares
//! its first file at open (a node's first start takes one segment's worth of zero writes longer);
//! later files are made in the background while the current segment fills, and the writer never
//! waits for one: if none is ready, or one cannot be made (no space), the segment grows as
//! written, as before.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use tracing::warn;

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The prepared segment, complete and fsync'ed.
const READY: &str = "next-segment.prealloc";
/// The prepared segment while it is being written.
const PARTIAL: &str = "next-segment.prealloc.partial";
const ZEROS_PER_WRITE: usize = 1 << 20;

#[derive(Debug, Default)]
struct Flags {
    ready: bool,
    closing: bool,
}

#[derive(Debug)]
pub(super) struct Prealloc {
    dir: PathBuf,
    bytes: u64,
    flags: Mutex<Flags>,
    changed: Condvar,
}

impl Prealloc {
    /// Keeps a prepared file an earlier run left if it has the configured size (it is renamed
    /// ready only once complete and fsync'ed), and removes anything else. With `fresh` (a log
    /// without segments, whose first segment is about to be created) and no file kept, prepares
    /// one now, so that a new node writes its first segment prepared too.
    pub(super) fn new(dir: &Path, bytes: u64, fresh: bool) -> io::Result<Prealloc> {
        remove_if_present(&dir.join(PARTIAL))?;
        let ready_path = dir.join(READY);
        let kept = match fs::metadata(&ready_path) {
            Ok(m) if m.len() == bytes => true,
            Ok(_) => {
                remove_if_present(&ready_path)?;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let prealloc = Prealloc {
            dir: dir.to_owned(),
            bytes,
            flags: Mutex::new(Flags {
                ready: kept,
                ..Flags::default()
            }),
            changed: Condvar::new(),
        };
        if fresh && !kept {
            match prealloc.make() {
                Ok(made) => prealloc.flags().ready = made,
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e,
                        "cannot prepare the first log segment; it will grow as written");
                    remove_if_present(&dir.join(PARTIAL))?;
                }
            }
        }
        Ok(prealloc)
    }

    fn flags(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The preparing thread: keeps one zero-filled file ready until `close`.
    pub(super) fn run(&self) {
        loop {
            {
                let mut flags = self.flags();
                while flags.ready && !flags.closing {
                    flags = self.changed.wait(flags).unwrap_or_else(|e| e.into_inner());
                }
                if flags.closing {
                    return;
                }
            }
            match self.make() {
                Ok(true) => {
                    self.flags().ready = true;
                    self.changed.notify_all();
                }
                Ok(false) => return, // closing
                Err(e) => {
                    warn!(dir = %self.dir.display(), error = %e,
                        "cannot prepare a zero-filled log segment; segments will grow as written");
                    // The thread ends and `ready` stays false: segments grow from then on.
                    let _ = fs::remove_file(self.dir.join(PARTIAL));
                    return;
                }
            }
        }
    }

    /// Writes `bytes` zeros to the partial file, fsyncs it and renames it ready; false if the
    /// engine began closing meanwhile.
    fn make(&self) -> io::Result<bool> {
        let partial = self.dir.join(PARTIAL);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)?;
        let zeros = vec![0u8; ZEROS_PER_WRITE];
        let mut offset = 0u64;
        while offset < self.bytes {
            if self.flags().closing {
                drop(file);
                fs::remove_file(&partial)?;
                return Ok(false);
            }
            let n = (self.bytes - offset).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        file.sync_all()?;
        fs::rename(&partial, self.dir.join(READY))?;
        Ok(true)
    }

    /// Renames the ready file to `segment` and opens it; None if no file is ready (the caller
    /// creates a growing segment instead). The caller fsyncs the directory.
    /// Never waits: the next file is made while the current segment fills.
    pub(super) fn take(&self, segment: &Path) -> io::Result<Option<File>> {
        let mut flags = self.flags();
        if !flags.ready {
            return Ok(None);
        }
        fs::rename(self.dir.join(READY), segment)?;
        flags.ready = false;
        self.changed.notify_all();
        drop(flags);
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment)
            .map(Some)
    }

    /// Stops the preparing thread at its next step (the caller joins it).
    pub(super) fn close(&self) {
        self.flags().closing = true;
        self.changed.notify_all();
    }
}
