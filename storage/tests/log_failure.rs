//! The log's failure path on a real I/O error: a tiny tmpfs fills up (ENOSPC) under appends.
//! After the first failed write, the engine fails every waiting and later write (nothing queued
//! behind the failure is written), and a reopen still holds every acknowledged entry.
//! Needs root to mount the tmpfs (CI runs as root); elsewhere it says so and checks nothing else.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use bytes::Bytes;
use dossier_storage::{Error, LogConfig, LogEngine, WriteBatch};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_log_and_keeps_every_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let _mount = Mount(dir.path().to_path_buf());
    let config = LogConfig {
        dir: dir.path().join("log"),
        segment_bytes_max: 64 * 1024,
        entry_bytes_max: 8 * 1024,
        batch_bytes_max: 1024 * 1024,
        pending_bytes_max: 4 * 1024 * 1024,
        ..LogConfig::default()
    }
    .validate()
    .unwrap();
    let engine = LogEngine::open(Arc::clone(&config)).unwrap();
    let payload = Bytes::from(vec![9u8; 1000]);
    let (tx, rx) = sync_channel(4096);
    let mut submitted = 0u64;
    // 2000 x 1 KB does not fit in 512 KiB: some write must fail.
    for index in 1..=2000u64 {
        let mut batch = WriteBatch::new();
        batch.append(1, index, payload.clone());
        let tx = tx.clone();
        match engine.submit(batch, Box::new(move |r| drop(tx.send((index, r))))) {
            Ok(()) => submitted += 1,
            Err(e) => {
                assert!(
                    matches!(e, Error::Failed),
                    "after a failure, submits are refused: {e:?}"
                );
                break;
            }
        }
    }
    drop(tx);
    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for (index, result) in rx.iter() {
        match result {
            Ok(()) => acknowledged.push(index),
            Err(e) => {
                assert!(e.is_fatal() || matches!(e, Error::Failed), "{e:?}");
                failed.push(index);
            }
        }
    }
    assert_eq!(
        (acknowledged.len() + failed.len()) as u64,
        submitted,
        "every callback ran once"
    );
    assert!(
        !failed.is_empty(),
        "the disk filled up, so some write failed"
    );
    acknowledged.sort_unstable();
    // Acknowledged entries are a prefix: nothing after the first failure was acknowledged.
    assert_eq!(
        acknowledged,
        (1..=acknowledged.len() as u64).collect::<Vec<_>>()
    );
    let more = engine.write(std::mem::take(WriteBatch::new().append(
        2,
        1,
        payload.clone(),
    )));
    assert!(matches!(more, Err(Error::Failed)), "{more:?}");
    drop(engine);

    let engine = LogEngine::open(config).unwrap();
    let entries = engine.entries(1, 0..u64::MAX).unwrap();
    assert!(
        entries.len() >= acknowledged.len(),
        "{} recovered < {} acknowledged",
        entries.len(),
        acknowledged.len()
    );
    for (n, (index, data)) in entries.iter().enumerate() {
        assert_eq!(*index, n as u64 + 1);
        assert_eq!(*data, payload);
    }
    eprintln!(
        "{} acknowledged, {} failed, {} recovered",
        acknowledged.len(),
        failed.len(),
        entries.len()
    );
}
