//! The log engine against a simple in-memory model: random appends, truncations, purges, votes,
//! forgotten groups and reopens across several groups, with segments small enough to roll and be reclaimed.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use dossier_storage::{Error, GroupState, HardState, LogConfig, LogEngine, WriteBatch};
use proptest::prelude::*;

const GROUPS: u64 = 4;

fn small_config(dir: &std::path::Path) -> Arc<LogConfig> {
    LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes_max: 64 * 1024,
        entry_bytes_max: 8 * 1024,
        batch_bytes_max: 1024 * 1024,
        pending_bytes_max: 4 * 1024 * 1024,
        cache_bytes_max: 16 * 1024,
        ..LogConfig::default()
    }
    .validate()
    .expect("valid test config")
}

#[derive(Debug, Clone, Default)]
struct ModelGroup {
    entries: BTreeMap<u64, Bytes>,
    purged: Option<(u64, Bytes)>,
    hard_state: HardState,
    touched: bool,
}

impl ModelGroup {
    fn next(&self) -> Option<u64> {
        match self.entries.last_key_value() {
            Some((&last, _)) => Some(last + 1),
            None => self.purged.as_ref().map(|(p, _)| p + 1),
        }
    }

    fn state(&self) -> GroupState {
        GroupState {
            entries: self
                .entries
                .first_key_value()
                .map(|(&f, _)| (f, *self.entries.last_key_value().unwrap().0)),
            purged: self.purged.clone(),
            hard_state: self.hard_state.clone(),
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Append {
        group: u64,
        count: usize,
        size: usize,
        start: u64,
        skew: u64,
    },
    Truncate {
        group: u64,
        back: u64,
    },
    Purge {
        group: u64,
        forward: u64,
    },
    Vote {
        group: u64,
        vote: u8,
    },
    Committed {
        group: u64,
        committed: Option<u8>,
    },
    Forget {
        group: u64,
    },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..GROUPS, 1..20usize, 1..3000usize, 0..5u64, prop_oneof![9 => Just(0u64), 1 => 1..3u64])
            .prop_map(|(group, count, size, start, skew)| Step::Append { group, count, size, start, skew }),
        1 => (0..GROUPS, 0..10u64).prop_map(|(group, back)| Step::Truncate { group, back }),
        2 => (0..GROUPS, 0..40u64).prop_map(|(group, forward)| Step::Purge { group, forward }),
        1 => (0..GROUPS, any::<u8>()).prop_map(|(group, vote)| Step::Vote { group, vote }),
        1 => (0..GROUPS, proptest::option::of(any::<u8>()))
            .prop_map(|(group, committed)| Step::Committed { group, committed }),
        1 => (0..GROUPS).prop_map(|group| Step::Forget { group }),
        1 => Just(Step::Reopen),
    ]
}

fn payload(group: u64, index: u64, size: usize) -> Bytes {
    let mut data = vec![0u8; size];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (group as u8).wrapping_mul(31) ^ (index as u8).wrapping_mul(7) ^ (i as u8);
    }
    Bytes::from(data)
}

fn check(engine: &LogEngine, model: &HashMap<u64, ModelGroup>) -> Result<(), TestCaseError> {
    for group in 0..GROUPS {
        let m = model.get(&group).cloned().unwrap_or_default();
        let got = engine.group_state(group);
        if !m.touched {
            prop_assert!(
                got.is_none() || got == Some(m.state()),
                "group {group}: {got:?}"
            );
            continue;
        }
        let got = got.unwrap_or(GroupState {
            entries: None,
            purged: None,
            hard_state: HardState::default(),
        });
        prop_assert_eq!(&got, &m.state(), "group {}", group);
        let entries = engine
            .entries(group, 0..u64::MAX)
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let want: Vec<(u64, Bytes)> = m.entries.iter().map(|(&i, d)| (i, d.clone())).collect();
        prop_assert_eq!(entries.len(), want.len(), "group {}", group);
        prop_assert!(entries == want, "group {} entries differ", group);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every step and every reopen, each group's bounds, purge point, hard state and entries
    /// equal the model's; invalid appends are refused with a typed error and change nothing.
    #[test]
    fn log_engine_matches_model(steps in proptest::collection::vec(step(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let config = small_config(dir.path());
        let mut engine = LogEngine::open(Arc::clone(&config)).unwrap();
        let mut model: HashMap<u64, ModelGroup> = HashMap::new();
        for step in steps {
            match step {
                Step::Append { group, count, size, start, skew } => {
                    let m = model.entry(group).or_default();
                    let first = m.next().unwrap_or(start) + skew;
                    let mut batch = WriteBatch::new();
                    for i in first..first + count as u64 {
                        batch.append(group, i, payload(group, i, size));
                    }
                    let result = engine.write(batch);
                    if skew > 0 && m.next().is_some() {
                        let refused = matches!(result, Err(Error::NotContiguous { .. }));
                        prop_assert!(refused, "{:?}", result);
                    } else {
                        prop_assert!(result.is_ok(), "{:?}", result);
                        m.touched = true;
                        for i in first..first + count as u64 {
                            m.entries.insert(i, payload(group, i, size));
                        }
                    }
                }
                Step::Truncate { group, back } => {
                    let m = model.entry(group).or_default();
                    let Some(next) = m.next() else { continue };
                    let index = next.saturating_sub(back);
                    let result = engine.write(std::mem::take(WriteBatch::new().truncate_from(group, index)));
                    if m.purged.as_ref().is_some_and(|(p, _)| index <= *p) {
                        prop_assert!(matches!(result, Err(Error::TruncatePurged { .. })), "{:?}", result);
                    } else {
                        prop_assert!(result.is_ok(), "{:?}", result);
                        m.entries.retain(|&i, _| i < index);
                    }
                }
                Step::Purge { group, forward } => {
                    let m = model.entry(group).or_default();
                    let Some(first) = m.entries.first_key_value().map(|(&i, _)| i) else { continue };
                    let index = first + forward;
                    let marker = Bytes::from(format!("purged-{index}"));
                    engine.write(std::mem::take(WriteBatch::new().purge_to(group, index, marker.clone()))).unwrap();
                    m.touched = true;
                    if m.purged.as_ref().is_none_or(|(p, _)| *p < index) {
                        m.purged = Some((index, marker));
                        m.entries.retain(|&i, _| i > index);
                    }
                }
                Step::Vote { group, vote } => {
                    let vote = Bytes::from(vec![vote; 3]);
                    engine.write(std::mem::take(WriteBatch::new().save_vote(group, vote.clone()))).unwrap();
                    let m = model.entry(group).or_default();
                    m.touched = true;
                    m.hard_state.vote = Some(vote);
                }
                Step::Committed { group, committed } => {
                    let committed = committed.map(|c| Bytes::from(vec![c; 5]));
                    engine.write(std::mem::take(WriteBatch::new().save_committed(group, committed.clone()))).unwrap();
                    let m = model.entry(group).or_default();
                    m.touched = true;
                    m.hard_state.committed = committed;
                }
                Step::Forget { group } => {
                    engine.write(std::mem::take(WriteBatch::new().forget(group))).unwrap();
                    model.remove(&group);
                    prop_assert!(engine.group_state(group).is_none(), "group {} forgotten", group);
                }
                Step::Reopen => {
                    engine.close().unwrap();
                    engine = LogEngine::open(Arc::clone(&config)).unwrap();
                }
            }
            check(&engine, &model)?;
        }
        engine.close().unwrap();
        let engine = LogEngine::open(config).unwrap();
        check(&engine, &model)?;
    }
}

/// Purging every group lets old segments be reclaimed, while the hard state written into those
/// segments survives (rewritten at the tail) and the purge points survive a reopen.
#[test]
fn purged_segments_are_reclaimed_and_hard_state_survives() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let engine = LogEngine::open(Arc::clone(&config)).unwrap();
    let mut batch = WriteBatch::new();
    batch
        .save_vote(1, Bytes::from_static(b"vote-1"))
        .save_vote(2, Bytes::from_static(b"vote-2"));
    engine.write(batch).unwrap();
    for i in 1..=200u64 {
        let mut batch = WriteBatch::new();
        batch
            .append(1, i, payload(1, i, 2000))
            .append(2, i, payload(2, i, 1000));
        engine.write(batch).unwrap();
    }
    let before = engine.segment_ids();
    assert!(before.len() >= 8, "{before:?}");
    let pins = engine.pins(10);
    assert_eq!(pins[0].segment, before[0]);
    assert_eq!(pins.iter().map(|p| p.group).collect::<Vec<_>>(), vec![1, 2]);

    let mut batch = WriteBatch::new();
    batch
        .purge_to(1, 190, Bytes::from_static(b"p1"))
        .purge_to(2, 195, Bytes::from_static(b"p2"));
    engine.write(batch).unwrap();
    // Reclaim is planned after the purge is durable and finishes after the rewrite is durable.
    engine
        .write(std::mem::take(WriteBatch::new().append(
            1,
            201,
            payload(1, 201, 10),
        )))
        .unwrap();
    engine
        .write(std::mem::take(WriteBatch::new().append(
            1,
            202,
            payload(1, 202, 10),
        )))
        .unwrap();
    let after = engine.segment_ids();
    assert!(after.len() <= 3, "before {before:?} after {after:?}");
    assert!(engine.stats().segments_reclaimed >= 5);
    for id in &before {
        assert_eq!(
            engine.segment_path(*id).exists(),
            after.contains(id),
            "segment {id}"
        );
    }
    engine.close().unwrap();

    let engine = LogEngine::open(config).unwrap();
    let g1 = engine.group_state(1).unwrap();
    assert_eq!(g1.hard_state.vote.as_deref(), Some(&b"vote-1"[..]));
    assert_eq!(g1.purged, Some((190, Bytes::from_static(b"p1"))));
    assert_eq!(g1.entries, Some((191, 202)));
    let g2 = engine.group_state(2).unwrap();
    assert_eq!(g2.hard_state.vote.as_deref(), Some(&b"vote-2"[..]));
    assert_eq!(g2.entries, Some((196, 200)));
    let entries = engine.entries(2, 0..u64::MAX).unwrap();
    assert_eq!(
        entries.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (196..=200).collect::<Vec<_>>()
    );
    assert_eq!(entries[0].1, payload(2, 196, 1000));
}

/// A forgotten group (a replica that left the node) stays forgotten across reopens while older
/// segments still hold its records (another group pins them), frees its segments for reclaim,
/// and written again starts empty, at any index.
#[test]
fn a_forgotten_group_stays_forgotten_and_frees_its_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let engine = LogEngine::open(Arc::clone(&config)).unwrap();
    // Group 2's first entry pins the first segment; group 1 fills several.
    engine
        .write(std::mem::take(
            WriteBatch::new()
                .append(2, 1, payload(2, 1, 100))
                .save_vote(1, Bytes::from_static(b"vote-1")),
        ))
        .unwrap();
    for i in 1..=200u64 {
        engine
            .write(std::mem::take(WriteBatch::new().append(
                1,
                i,
                payload(1, i, 2000),
            )))
            .unwrap();
    }
    engine
        .write(std::mem::take(WriteBatch::new().purge_to(
            1,
            50,
            Bytes::from_static(b"p"),
        )))
        .unwrap();
    let before = engine.segment_ids();
    assert!(before.len() >= 6, "{before:?}");
    engine
        .write(std::mem::take(WriteBatch::new().forget(1)))
        .unwrap();
    assert_eq!(engine.group_state(1), None);
    engine.close().unwrap();

    // Reopened: group 1's entries, vote and purge point in the older segments are replayed and
    // then forgotten again; group 2 is intact.
    let engine = LogEngine::open(Arc::clone(&config)).unwrap();
    assert_eq!(engine.group_state(1), None);
    assert!(engine.entries(1, 0..u64::MAX).unwrap().is_empty());
    assert_eq!(engine.group_state(2).unwrap().entries, Some((1, 1)));
    // Written again: a fresh group, from any index.
    engine
        .write(std::mem::take(WriteBatch::new().append(
            1,
            7_000,
            payload(1, 7_000, 10),
        )))
        .unwrap();
    // Once group 2 lets go of the first segment, group 1's old segments go too.
    engine
        .write(std::mem::take(WriteBatch::new().purge_to(
            2,
            1,
            Bytes::from_static(b"p2"),
        )))
        .unwrap();
    for i in 7_001..=7_002u64 {
        engine
            .write(std::mem::take(WriteBatch::new().append(
                1,
                i,
                payload(1, i, 10),
            )))
            .unwrap();
    }
    let after = engine.segment_ids();
    assert!(after.len() <= 2, "before {before:?} after {after:?}");
    engine.close().unwrap();
    let engine = LogEngine::open(config).unwrap();
    let g1 = engine.group_state(1).unwrap();
    assert_eq!(g1.entries, Some((7_000, 7_002)));
    assert_eq!(g1.hard_state.vote, None, "the forgotten vote is not back");
    assert_eq!(g1.purged, None);
}

/// Many threads appending at once share fsyncs (group commit), and every entry is readable after
/// a reopen. The count of rounds is checked only loosely: it depends on scheduling.
#[test]
fn concurrent_appenders_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let engine = Arc::new(LogEngine::open(Arc::clone(&config)).unwrap());
    let threads: Vec<_> = (0..16u64)
        .map(|group| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                for i in 1..=50u64 {
                    engine
                        .write(std::mem::take(WriteBatch::new().append(
                            group,
                            i,
                            payload(group, i, 100),
                        )))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = engine.stats();
    assert_eq!(stats.entries_appended, 800);
    assert!(stats.fsyncs <= 800 + stats.segments as u64, "{stats:?}");
    Arc::into_inner(engine).unwrap().close().unwrap();
    let engine = LogEngine::open(config).unwrap();
    for group in 0..16u64 {
        let entries = engine.entries(group, 1..51).unwrap();
        assert_eq!(entries.len(), 50);
        assert!(entries.iter().all(|(i, d)| *d == payload(group, *i, 100)));
    }
}

/// Limits are enforced with typed errors before anything is queued.
#[test]
fn limits_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let engine = LogEngine::open(Arc::clone(&config)).unwrap();
    let too_big = engine.write(std::mem::take(WriteBatch::new().append(
        1,
        1,
        vec![0u8; 8 * 1024 + 1],
    )));
    assert!(
        matches!(
            too_big,
            Err(Error::EntryTooLarge {
                group: 1,
                index: 1,
                ..
            })
        ),
        "{too_big:?}"
    );
    let mut batch = WriteBatch::new();
    for i in 1..=200 {
        batch.append(1, i, vec![0u8; 8 * 1024]);
    }
    assert!(matches!(
        engine.write(batch),
        Err(Error::BatchTooLarge { .. })
    ));
    assert_eq!(
        engine.group_state(1),
        None,
        "a refused batch leaves nothing behind"
    );
    // A second process (here: a second open) cannot write the same log.
    let second = LogEngine::open(config);
    assert!(
        matches!(
            second,
            Err(Error::Io {
                op: "lock log directory",
                ..
            })
        ),
        "{second:?}"
    );
}

/// `entries_up_to` returns a prefix of `entries` whose payloads stay within the byte budget
/// (at least one entry), from the read cache and from disk alike (the cache here holds 16 KiB).
#[test]
fn entries_up_to_stops_at_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(small_config(dir.path())).unwrap();
    for index in 1..=64u64 {
        let mut batch = WriteBatch::new();
        batch.append(1, index, Bytes::from(vec![index as u8; 1000]));
        engine.write(batch).unwrap();
    }
    let all = engine.entries(1, 1..65).unwrap();
    assert_eq!(all.len(), 64);
    for (from, budget) in [(1u64, 10_500usize), (60, 2_500), (1, 1), (5, 0)] {
        let got = engine.entries_up_to(1, from..65, budget).unwrap();
        let bytes: usize = got.iter().map(|(_, d)| d.len()).sum();
        assert!(!got.is_empty(), "at least one entry");
        assert!(got.len() == 1 || bytes <= budget, "{budget}: {bytes}");
        assert_eq!(got[..], all[(from - 1) as usize..][..got.len()]);
    }
    // 10 payloads of 1000 bytes fit 10,500 bytes, from the cache or from disk.
    assert_eq!(engine.entries_up_to(1, 1..65, 10_500).unwrap().len(), 10);
}
