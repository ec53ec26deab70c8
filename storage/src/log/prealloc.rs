//! Zero-filled segment files prepared ahead of need.
//!
//! fdatasync after appending to a growing file also commits the file's new size and extents
//! through the ext4 journal: more I/O per round than the data itself. Overwriting blocks that
//! are already allocated and written needs no metadata, so the log writes into segments that
//! were zero-filled (and fsync'ed) in advance by this thread, renamed into place when the writer
//! rolls to a new segment. A zero-filled tail is therefore normal in the newest segment (see
//! recovery); an older segment is cut to its used length when the next one is created.
//!
//! The prepared file is not part of the log: it is deleted at open and made again. If it cannot
//! be made (no space), the writer creates growing segments as before.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use tracing::warn;

/// The prepared segment, complete and fsync'ed.
const READY: &str = "next-segment.prealloc";
/// The prepared segment while it is being written.
const PARTIAL: &str = "next-segment.prealloc.partial";
const ZEROS_PER_WRITE: usize = 1 << 20;
const FIRST_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Default)]
struct Flags {
    ready: bool,
    closing: bool,
    /// Making a file failed once; segments grow from then on.
    gave_up: bool,
    /// A segment was taken (or created) since open.
    taken_once: bool,
}

#[derive(Debug)]
pub(super) struct Prealloc {
    dir: PathBuf,
    bytes: u64,
    flags: Mutex<Flags>,
    changed: Condvar,
}

impl Prealloc {
    /// Removes what an earlier run left (it is not part of the log).
    pub(super) fn new(dir: &Path, bytes: u64) -> io::Result<Prealloc> {
        for name in [READY, PARTIAL] {
            match fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(Prealloc {
            dir: dir.to_owned(),
            bytes,
            flags: Mutex::new(Flags::default()),
            changed: Condvar::new(),
        })
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
                    let _ = fs::remove_file(self.dir.join(PARTIAL));
                    self.flags().gave_up = true;
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
    ///
    /// The first segment after open waits for the first file (up to `FIRST_WAIT_MAX`): a fresh
    /// or restarted node would otherwise write its first whole segment growing. Later segments
    /// never wait; the next file is made while the current one fills.
    pub(super) fn take(&self, segment: &Path) -> io::Result<Option<File>> {
        let mut flags = self.flags();
        if !flags.taken_once {
            flags.taken_once = true;
            let deadline = std::time::Instant::now() + FIRST_WAIT_MAX;
            while !flags.ready && !flags.gave_up && !flags.closing {
                let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                    break;
                };
                flags = self
                    .changed
                    .wait_timeout(flags, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if !flags.ready || flags.gave_up {
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
