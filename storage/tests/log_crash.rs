//! Crash tests for the log engine: files cut at random offsets, random bit flips, and a real child
//! process SIGKILLed while it appends at full speed.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dossier_storage::{Error, LogConfig, LogEngine, WriteBatch};
use proptest::prelude::*;

fn config(dir: &Path) -> Arc<LogConfig> {
    LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes_max: 64 * 1024,
        entry_bytes_max: 4 * 1024,
        batch_bytes_max: 1024 * 1024,
        pending_bytes_max: 4 * 1024 * 1024,
        cache_bytes_max: 1024 * 1024,
        ..LogConfig::default()
    }
    .validate()
    .expect("valid test config")
}

fn payload(group: u64, index: u64) -> Bytes {
    let size = 50 + (index * 37 + group * 11) % 700;
    Bytes::from(
        (0..size)
            .map(|i| (i ^ index ^ (group << 3)) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Writes `count` entries to each of three groups, batch by batch, and returns the segment paths.
fn write_log(dir: &Path, count: u64) -> Vec<PathBuf> {
    let engine = LogEngine::open(config(dir)).unwrap();
    engine
        .write(std::mem::take(
            WriteBatch::new().save_vote(7, Bytes::from_static(b"v")),
        ))
        .unwrap();
    for i in 1..=count {
        let mut batch = WriteBatch::new();
        for group in [1, 2, 3] {
            batch.append(group, i, payload(group, i));
        }
        engine.write(batch).unwrap();
    }
    let paths = engine
        .segment_ids()
        .into_iter()
        .map(|id| engine.segment_path(id))
        .collect();
    engine.close().unwrap();
    paths
}

/// Every group's recovered log must be entries `1..=k` with the right payloads; returns each k.
fn recovered_prefix(engine: &LogEngine) -> Vec<u64> {
    [1, 2, 3]
        .into_iter()
        .map(|group| {
            let entries = engine.entries(group, 0..u64::MAX).unwrap();
            for (n, (index, data)) in entries.iter().enumerate() {
                assert_eq!(
                    *index,
                    n as u64 + 1,
                    "group {group}: recovered log is not a prefix"
                );
                assert_eq!(
                    *data,
                    payload(group, *index),
                    "group {group} entry {index}: payload"
                );
            }
            entries.len() as u64
        })
        .collect()
}

/// The log both property tests damage, written once: its directory, segment paths, and how many
/// entries of each group lie in segments older than the newest.
fn original() -> &'static (tempfile::TempDir, Vec<PathBuf>, Vec<u64>) {
    static ORIGINAL: std::sync::OnceLock<(tempfile::TempDir, Vec<PathBuf>, Vec<u64>)> =
        std::sync::OnceLock::new();
    ORIGINAL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        assert!(
            paths.len() >= 3,
            "the test needs several segments: {paths:?}"
        );
        let older = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), older.path());
        std::fs::remove_file(
            older
                .path()
                .join(paths.last().unwrap().file_name().unwrap()),
        )
        .unwrap();
        let kept = recovered_prefix(&LogEngine::open(config(older.path())).unwrap());
        assert!(kept.iter().all(|&k| k > 0 && k < 120), "{kept:?}");
        (dir, paths, kept)
    })
}

fn copy_dir(from: &Path, to: &Path) {
    for dirent in std::fs::read_dir(from).unwrap() {
        let dirent = dirent.unwrap();
        std::fs::copy(dirent.path(), to.join(dirent.file_name())).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Cutting the newest segment anywhere (a torn write) recovers a prefix of every group's log:
    /// nothing before the cut but the one torn frame is lost, and entries in older segments all stay.
    #[test]
    fn cut_tail_recovers_a_prefix(cut_permille in 0u64..=1000) {
        let (original, paths, older) = original();
        let dir = tempfile::tempdir().unwrap();
        copy_dir(original.path(), dir.path());
        let last = dir.path().join(paths.last().unwrap().file_name().unwrap());
        let full = std::fs::metadata(&last).unwrap().len();
        let cut = full * cut_permille / 1000;
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(cut).unwrap();

        let engine = LogEngine::open(config(dir.path())).unwrap();
        let kept = recovered_prefix(&engine);
        let survived = std::fs::metadata(&last).map(|m| m.len()).unwrap_or(0);
        prop_assert!(survived <= cut, "recovery never grows a file");
        // At most one frame (the torn one, < 1 KiB here) is dropped before the cut, unless the cut
        // went into the header, in which case the segment is removed as never written.
        prop_assert!(cut < 16 || cut - survived < 1024, "cut {} survived {}", cut, survived);
        if cut == full {
            prop_assert_eq!(&kept, &vec![120, 120, 120]);
        }
        // Entries in older segments are never touched by a tail cut.
        prop_assert!(kept.iter().zip(older).all(|(k, o)| k >= o), "{:?} < {:?}", kept, older);
        let vote = engine.group_state(7).unwrap().hard_state.vote;
        prop_assert_eq!(vote.as_deref(), Some(&b"v"[..]));
        // The recovered log keeps working: appends follow the surviving prefix.
        let next = kept[0] + 1;
        engine.write(std::mem::take(WriteBatch::new().append(1, next, payload(1, next)))).unwrap();
    }

    /// A bit flipped in an older segment, or in the newest segment before its last write round,
    /// fails the open with that file and an offset at or before the flip; in the last round (or
    /// the zero tail after it) it cuts the log at the damaged frame, losing at most that round.
    #[test]
    fn bit_flip_is_corruption_or_a_cut_tail(segment_pick in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (original, paths, _) = original();
        let dir = tempfile::tempdir().unwrap();
        copy_dir(original.path(), dir.path());
        let n = segment_pick.index(paths.len());
        let path = dir.path().join(paths[n].file_name().unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        let offset = at.index(bytes.len());
        bytes[offset] ^= 1 << bit;
        std::fs::write(&path, &bytes).unwrap();

        let last_round = last_round_start(&std::fs::read(&paths[paths.len() - 1]).unwrap());
        let in_last_round = n + 1 == paths.len() && offset as u64 >= last_round;
        match LogEngine::open(config(dir.path())) {
            Err(Error::Corrupt { path: bad, offset: reported, .. }) => {
                prop_assert!(!in_last_round, "a flip in the last write round is a torn tail");
                prop_assert_eq!(bad, path);
                prop_assert!(reported <= offset as u64);
            }
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
            Ok(engine) => {
                prop_assert!(in_last_round, "flip in segment {n} at {offset} went unnoticed");
                let kept = recovered_prefix(&engine);
                prop_assert!(kept.iter().all(|&k| k >= 119), "more than the last round lost: {:?}", kept);
                prop_assert!(std::fs::metadata(&path).unwrap().len() <= offset as u64);
            }
        }
    }
}

/// Where the last write round of a segment begins: the `start` of its last `RoundEnd` record
/// (frames are `len u32 | crc u32 | payload`, a `RoundEnd` payload is kind 5, group 0, start).
fn last_round_start(segment: &[u8]) -> u64 {
    let mut at = 16;
    let mut start = None;
    while at + 8 <= segment.len() {
        let len = u32::from_le_bytes(segment[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        let payload = &segment[at + 8..at + 8 + len];
        if payload[0] == 5 {
            start = Some(u64::from_le_bytes(payload[9..17].try_into().unwrap()));
        }
        at += 8 + len;
    }
    start.expect("every write round ends with a RoundEnd record")
}

/// A bit flip in the middle of the newest segment, with acknowledged rounds after it, refuses
/// the open and names the file and offset: cutting there would drop acknowledged records (a
/// vote among them). A torn last round (a page of it never reached the disk) is cut and opens.
#[test]
fn newest_segment_damage_refuses_unless_in_the_last_round() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_log(dir.path(), 120);
    let newest = paths.last().unwrap();
    let pristine = std::fs::read(newest).unwrap();
    let last_round = last_round_start(&pristine) as usize;
    assert!(last_round > 1024, "the newest segment holds several rounds");

    // A flip halfway into the rounds before the last.
    let mut bytes = pristine.clone();
    let middle = 16 + (last_round - 16) / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(newest, &bytes).unwrap();
    let err = LogEngine::open(config(dir.path())).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&newest.display().to_string()), "{text}");
    assert!(
        matches!(err, Error::Corrupt { offset, .. } if offset as usize <= middle),
        "{err:?}"
    );
    // Refused again on a second try: nothing was cut by the first.
    assert_eq!(std::fs::read(newest).unwrap(), bytes);
    assert!(LogEngine::open(config(dir.path())).is_err());

    // A torn last round: its first bytes never reached the disk (zeros), its end did.
    let mut bytes = pristine.clone();
    for b in &mut bytes[last_round..last_round + 64] {
        *b = 0;
    }
    std::fs::write(newest, &bytes).unwrap();
    let engine = LogEngine::open(config(dir.path())).unwrap();
    assert_eq!(recovered_prefix(&engine), vec![119, 119, 119]);
    assert_eq!(
        engine.group_state(7).unwrap().hard_state.vote.as_deref(),
        Some(&b"v"[..])
    );
}

/// A corrupt older segment is refused even when it is the only damage, and the error names it.
#[test]
fn corrupt_middle_segment_error_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_log(dir.path(), 120);
    let path = &paths[1];
    let mut bytes = std::fs::read(path).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(path, &bytes).unwrap();
    let err = LogEngine::open(config(dir.path())).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(
        matches!(err, Error::Corrupt { offset, .. } if offset <= 100),
        "{err:?}"
    );
    // A missing middle segment is refused too.
    std::fs::remove_file(path).unwrap();
    assert!(matches!(
        LogEngine::open(config(dir.path())),
        Err(Error::Corrupt {
            reason: "segment file is missing",
            ..
        })
    ));
}

/// Segments are zero-filled ahead of need (`next-segment.prealloc`). The newest segment keeps its
/// zero tail and the log goes on from where its frames end; every older segment is cut to its
/// frames, and a zero tail found in one is corruption, not an end.
#[test]
fn prepared_segments_keep_a_zero_tail_only_while_newest() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("next-segment.prealloc");
    let wait_ready = || {
        let started = Instant::now();
        while !ready.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no prepared segment within 10 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let append = |engine: &LogEngine, indexes: std::ops::RangeInclusive<u64>| {
        for i in indexes {
            // Each roll to a new segment then takes a prepared file.
            wait_ready();
            let mut batch = WriteBatch::new();
            for group in [1, 2, 3] {
                batch.append(group, i, payload(group, i));
            }
            engine.write(batch).unwrap();
        }
    };
    let engine = LogEngine::open(config(dir.path())).unwrap();
    append(&engine, 1..=120);
    let paths: Vec<PathBuf> = engine
        .segment_ids()
        .into_iter()
        .map(|id| engine.segment_path(id))
        .collect();
    engine.close().unwrap();
    assert!(
        paths.len() >= 3,
        "the test needs several segments: {paths:?}"
    );
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    let newest = paths.last().unwrap();
    assert_eq!(
        len(newest),
        64 * 1024,
        "the newest segment is a prepared one"
    );
    for older in &paths[..paths.len() - 1] {
        let bytes = std::fs::read(older).unwrap();
        assert!(
            bytes.len() < 64 * 1024 || bytes.last() != Some(&0),
            "{older:?} was not cut"
        );
    }
    // Reopened: every entry, and the log continues after the newest segment's frames.
    let engine = LogEngine::open(config(dir.path())).unwrap();
    assert_eq!(recovered_prefix(&engine), vec![120, 120, 120]);
    append(&engine, 121..=200);
    engine.close().unwrap();
    let engine = LogEngine::open(config(dir.path())).unwrap();
    assert_eq!(recovered_prefix(&engine), vec![200, 200, 200]);
    let first = engine.segment_path(engine.segment_ids()[0]);
    engine.close().unwrap();
    // Zeros after an older segment's frames are not an end: the open fails, naming the file.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&first)
        .unwrap();
    file.write_all(&[0u8; 4096]).unwrap();
    drop(file);
    let err = LogEngine::open(config(dir.path())).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path, .. } if *path == first),
        "{err:?}"
    );
}

const CHILD_ENV: &str = "DOSSIER_LOG_CRASH_CHILD_DIR";

/// Not a test on its own: the body of the child process of `sigkill_loses_no_acknowledged_entry`.
/// It appends to 8 groups from 4 threads with many batches in flight, purging now and then, and
/// prints each batch once the log says it is durable. Bounded: stops after 20 s by itself.
#[test]
fn crash_child_appender() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let engine = Arc::new(LogEngine::open(config(Path::new(&dir))).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                let groups = [2 * t + 1, 2 * t + 2];
                let mut next = [1u64, 1];
                let (tx, rx) = std::sync::mpsc::sync_channel::<()>(32);
                let mut in_flight = 0;
                while Instant::now() < deadline {
                    let mut batch = WriteBatch::new();
                    let mut line = String::new();
                    for (k, &group) in groups.iter().enumerate() {
                        for _ in 0..3 {
                            batch.append(group, next[k], payload(group, next[k]));
                            line.push_str(&format!("ACK {group} {}\n", next[k]));
                            next[k] += 1;
                        }
                        if next[k] % 200 == 1 {
                            let to = next[k] - 150;
                            batch.purge_to(group, to, Bytes::new());
                            line.push_str(&format!("PURGE {group} {to}\n"));
                        }
                    }
                    if in_flight == 32 {
                        rx.recv().unwrap();
                        in_flight -= 1;
                    }
                    let tx = tx.clone();
                    engine
                        .submit(
                            batch,
                            Box::new(move |result| {
                                result.unwrap();
                                let mut out = std::io::stdout().lock();
                                out.write_all(line.as_bytes()).unwrap();
                                out.flush().unwrap();
                                let _ = tx.send(());
                            }),
                        )
                        .unwrap();
                    in_flight += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A child process appending at full speed is SIGKILLed; every entry it was told is durable is
/// in the recovered log (unless purged), and each group's log is contiguous with right payloads.
#[test]
fn sigkill_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_appender",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut purged: HashMap<u64, u64> = HashMap::new();
    let mut record = |line: &str, acked: &mut HashMap<u64, u64>| {
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 3 {
            return;
        }
        let (Ok(group), Ok(index)) = (parts[1].parse::<u64>(), parts[2].parse::<u64>()) else {
            return;
        };
        match parts[0] {
            "ACK" => {
                let max = acked.entry(group).or_default();
                *max = (*max).max(index);
            }
            "PURGE" => {
                let max = purged.entry(group).or_default();
                *max = (*max).max(index);
            }
            _ => {}
        }
    };
    let started = Instant::now();
    let mut seen = 0;
    // Kill once enough has been acknowledged (at least one purge per group), or after 10 s.
    while seen < 30_000 && started.elapsed() < Duration::from_secs(10) {
        let Some(Ok(line)) = lines.next() else { break };
        record(&line, &mut acked);
        seen += 1;
    }
    child.kill().unwrap();
    // Lines already in the pipe were printed after their batch was durable: they count too.
    for line in lines.map_while(Result::ok) {
        record(&line, &mut acked);
    }
    child.wait().unwrap();
    assert!(
        acked.values().sum::<u64>() >= 1000,
        "the child acknowledged too little: {acked:?}"
    );
    eprintln!(
        "child killed after {:?}; acknowledged per group {acked:?}, purged {purged:?}",
        started.elapsed()
    );

    let engine = LogEngine::open(config(dir.path())).unwrap();
    for (&group, &last_acked) in &acked {
        let state = engine.group_state(group).unwrap();
        let (first, last) = state.entries.expect("acknowledged entries exist");
        assert!(
            last >= last_acked,
            "group {group}: acked up to {last_acked}, recovered up to {last}"
        );
        // An acknowledged purge survives; a later one may have become durable without being
        // acknowledged before the kill. Either way the log starts right after the purge point.
        if let Some(&purge_acked) = purged.get(&group) {
            let (point, _) = state.purged.clone().expect("acknowledged purge survives");
            assert!(
                point >= purge_acked,
                "group {group}: purge {point} below acknowledged {purge_acked}"
            );
            assert_eq!(
                first,
                point + 1,
                "group {group}: entries lost after the purge point"
            );
        }
        let entries = engine.entries(group, first..last + 1).unwrap();
        assert_eq!(
            entries.len() as u64,
            last - first + 1,
            "group {group}: gap in the log"
        );
        for (index, data) in entries {
            assert_eq!(data, payload(group, index), "group {group} entry {index}");
        }
    }
}
