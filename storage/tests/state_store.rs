//! The sled state store against a `BTreeMap` model, and snapshot round trips and refusals.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use dossier_storage::{
    ApplyEntry, Batch, Command, Condition, EntryPayload, Error, Expect, Op, Outcome, Session,
    SnapshotReceiver, StateStore, StoreConfig, chain, read_snapshot_chunk,
};
use proptest::prelude::*;

fn config(dir: &std::path::Path) -> Arc<StoreConfig> {
    StoreConfig {
        dir: dir.to_path_buf(),
        flush_interval_ms: 50,
        ..StoreConfig::default()
    }
    .validate()
    .unwrap()
}

fn key(k: u8) -> Bytes {
    // Two "patients" (prefixes) so that prefix scans have something to tell apart.
    Bytes::from(format!("p{}/k{}", k % 2, k))
}

/// Opens a store this process just closed. sled releases its file lock from background threads
/// (and a concurrently spawned child briefly holds inherited descriptors), so the lock may still be
/// held for a moment; a real second process would hold it for good.
fn reopen(cfg: &Arc<StoreConfig>) -> StateStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match StateStore::open(Arc::clone(cfg)) {
            Ok(store) => return store,
            Err(e)
                if std::time::Instant::now() < deadline
                    && format!("{e:?}").contains("WouldBlock") =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopen failed: {e:?}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Txn {
        client: Option<u64>,
        retry: bool,
        conditions: Vec<(u8, Option<Option<u8>>)>,
        ops: Vec<(u8, Option<u8>)>,
    },
    Expire {
        back: u64,
    },
    Membership(u8),
    Blank,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let cond = (0u8..6, proptest::option::of(proptest::option::of(0u8..3)));
    // Keys 0..6 put (or delete with None); 6 and 7 append to one of two hash chains.
    let op = (0u8..8, proptest::option::of(0u8..3));
    prop_oneof![
        8 => (proptest::option::of(0u64..3), proptest::bool::weighted(0.3), proptest::collection::vec(cond, 0..3), proptest::collection::vec(op, 1..4))
            .prop_map(|(client, retry, conditions, ops)| Step::Txn { client, retry, conditions, ops }),
        1 => (0u64..20).prop_map(|back| Step::Expire { back }),
        1 => any::<u8>().prop_map(Step::Membership),
        1 => Just(Step::Blank),
        1 => Just(Step::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    data: BTreeMap<Bytes, Bytes>,
    sessions: HashMap<u64, (u64, u64, Outcome)>,
}

impl Model {
    fn apply(&mut self, index: u64, session: Option<Session>, batch: &Batch) -> Outcome {
        if let Some(s) = session {
            match self.sessions.get(&s.client) {
                Some(&(seq, first, outcome)) if s.seq == seq => {
                    let failed_condition = match outcome {
                        Outcome::ConditionFailed { index } => Some(index),
                        _ => None,
                    };
                    return Outcome::Replayed {
                        index: first,
                        failed_condition,
                    };
                }
                Some(&(seq, _, _)) if s.seq < seq => return Outcome::StaleSequence { last: seq },
                None if s.seq > 1 => return Outcome::SessionExpired,
                _ => {}
            }
        }
        let failed = batch.conditions.iter().position(|c| {
            let cur = self.data.get(&c.key);
            !match &c.expect {
                Expect::Absent => cur.is_none(),
                Expect::Present => cur.is_some(),
                Expect::Equals(v) => cur == Some(v),
            }
        });
        let outcome = match failed {
            Some(i) => Outcome::ConditionFailed { index: i as u32 },
            None => {
                for op in &batch.ops {
                    match op {
                        Op::Put { key, value } => {
                            self.data.insert(key.clone(), value.clone());
                        }
                        Op::Delete { key } => {
                            self.data.remove(key);
                        }
                        Op::Append {
                            head,
                            prefix,
                            value,
                        } => {
                            let (seq, prev) = self
                                .data
                                .get(head)
                                .map(|h| chain::decode_head(h).expect("a head"))
                                .unwrap_or((0, chain::GENESIS));
                            let hash = chain::link(&prev, seq + 1, value);
                            let mut entry = hash.to_vec();
                            entry.extend_from_slice(value);
                            let mut k = prefix.to_vec();
                            k.extend_from_slice(&(seq + 1).to_be_bytes());
                            self.data.insert(Bytes::from(k), Bytes::from(entry));
                            self.data.insert(
                                head.clone(),
                                Bytes::from(chain::encode_head(seq + 1, &hash)),
                            );
                        }
                    }
                }
                Outcome::Applied
            }
        };
        if let Some(s) = session {
            self.sessions.insert(s.client, (s.seq, index, outcome));
        }
        outcome
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Applying random batches (conditions, puts, deletes, sessions with retries, expiry, reopen)
    /// gives the model's outcomes and leaves the model's data, sessions and applied index. The
    /// write-back buffer sizes make every apply reach sled (0), some of them (64 bytes: reads and
    /// scans merge the buffer over the tree), or none before a flush or reopen (1 MiB).
    #[test]
    fn state_store_matches_model(
        steps in proptest::collection::vec(step(), 1..40),
        group_size in 1usize..4,
        write_back_bytes in prop_oneof![Just(0usize), Just(64), Just(1 << 20)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig { write_back_bytes, ..(*config(dir.path())).clone() }.validate().unwrap();
        let mut store = StateStore::open(Arc::clone(&cfg)).unwrap();
        let mut shard = store.create_shard(9).unwrap();
        let mut model = Model::default();
        let mut next_seq: HashMap<u64, u64> = HashMap::new();
        let mut index = 0u64;
        let mut membership = None;
        let mut pending: Vec<(ApplyEntry, Option<Outcome>)> = Vec::new();
        let flush = |shard: &dossier_storage::ShardHandle, pending: &mut Vec<(ApplyEntry, Option<Outcome>)>| -> Result<(), TestCaseError> {
            if pending.is_empty() { return Ok(()); }
            let entries: Vec<ApplyEntry> = pending.iter().map(|(e, _)| e.clone()).collect();
            let got = shard.apply(&entries).unwrap();
            for ((_, want), got) in pending.iter().zip(got) {
                prop_assert_eq!(want.unwrap_or(Outcome::Done), got);
            }
            pending.clear();
            Ok(())
        };
        for step in steps {
            index += 1;
            let log_id = Bytes::from(format!("id-{index}"));
            match step {
                Step::Txn { client, retry, conditions, ops } => {
                    let session = client.map(|c| {
                        let seq = next_seq.entry(c).or_insert(0);
                        if !(retry && *seq > 0) { *seq += 1; }
                        Session { client: c, seq: *seq }
                    });
                    let batch = Batch {
                        conditions: conditions.into_iter().map(|(k, e)| Condition { key: key(k), expect: match e {
                            None => Expect::Absent, Some(None) => Expect::Present, Some(Some(v)) => Expect::Equals(Bytes::from(vec![v])),
                        }}).collect(),
                        ops: ops.into_iter().map(|(k, v)| match (k, v) {
                            (6.., v) => Op::Append {
                                head: Bytes::from(format!("p{}/head", k % 2)),
                                prefix: Bytes::from(format!("p{}/log/", k % 2)),
                                value: Bytes::from(vec![v.unwrap_or(9)]),
                            },
                            (_, Some(v)) => Op::Put { key: key(k), value: Bytes::from(vec![v]) },
                            (_, None) => Op::Delete { key: key(k) },
                        }).collect(),
                    };
                    let want = model.apply(index, session, &batch);
                    pending.push((ApplyEntry { index, log_id, payload: EntryPayload::Command(Command::Txn { session, batch }) }, Some(want)));
                }
                Step::Expire { back } => {
                    let before_index = index.saturating_sub(back);
                    model.sessions.retain(|_, (_, i, _)| *i >= before_index);
                    pending.push((ApplyEntry { index, log_id, payload: EntryPayload::Command(Command::ExpireSessions { before_index }) }, None));
                }
                Step::Membership(m) => {
                    membership = Some(Bytes::from(vec![m]));
                    pending.push((ApplyEntry { index, log_id, payload: EntryPayload::Membership(Bytes::from(vec![m])) }, None));
                }
                Step::Blank => pending.push((ApplyEntry { index, log_id, payload: EntryPayload::Blank }, None)),
                Step::Reopen => {
                    index -= 1; // a reopen is not an entry
                    flush(&shard, &mut pending)?;
                    drop(shard);
                    drop(store);
                    store = reopen(&cfg);
                    shard = store.shard(9).unwrap();
                }
            }
            if pending.len() >= group_size {
                flush(&shard, &mut pending)?;
            }
        }
        flush(&shard, &mut pending)?;
        let applied = shard.applied().unwrap();
        prop_assert_eq!(applied.as_ref().map(|a| a.index), (index > 0).then_some(index));
        if let Some(applied) = applied {
            prop_assert_eq!(applied.log_id, Bytes::from(format!("id-{index}")));
        }
        prop_assert_eq!(shard.membership().unwrap(), membership);
        let all = shard.scan_prefix(b"", None, usize::MAX).unwrap();
        let want: Vec<(Bytes, Bytes)> = model.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        prop_assert_eq!(&all, &want);
        // Prefix scans page through one patient's keys without mixing in another's.
        let p1: Vec<(Bytes, Bytes)> = want.iter().filter(|(k, _)| k.starts_with(b"p1/")).cloned().collect();
        let mut paged = Vec::new();
        let mut after: Option<Bytes> = None;
        loop {
            let page = shard.scan_prefix(b"p1/", after.as_deref(), 2).unwrap();
            if page.is_empty() { break; }
            after = Some(page.last().unwrap().0.clone());
            paged.extend(page);
        }
        prop_assert_eq!(paged, p1);
        let mut sessions: Vec<(u64, u64, u64)> = model.sessions.iter().map(|(&c, &(s, i, _))| (c, s, i)).collect();
        sessions.sort_unstable();
        prop_assert_eq!(shard.sessions().unwrap(), sessions);
    }
}

fn fill(shard: &dossier_storage::ShardHandle, first_index: u64, n: u64, tag: &str) {
    let entries: Vec<ApplyEntry> = (0..n)
        .map(|i| ApplyEntry {
            index: first_index + i,
            log_id: Bytes::from(format!("{tag}-{i}")),
            payload: EntryPayload::Command(Command::Txn {
                session: Some(Session {
                    client: 1 + i % 3,
                    seq: 1 + i / 3,
                }),
                batch: Batch::put(format!("patient-{}/{tag}-{i}", i % 7), vec![i as u8; 100]),
            }),
        })
        .collect();
    for chunk in entries.chunks(500) {
        shard.apply(chunk).unwrap();
    }
}

type Dump = (
    Vec<(Bytes, Bytes)>,
    Vec<(u64, u64, u64)>,
    Option<dossier_storage::Applied>,
);

fn dump(shard: &dossier_storage::ShardHandle) -> Dump {
    (
        shard.scan_prefix(b"", None, usize::MAX).unwrap(),
        shard.sessions().unwrap(),
        shard.applied().unwrap(),
    )
}

/// A snapshot built from one replica and installed (through a chunked stream) over another
/// replica with different data makes it equal to the source, and survives a reopen.
#[test]
fn snapshot_round_trip_replaces_state() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let src = StateStore::open(config(src_dir.path())).unwrap();
    let a = src.create_shard(4).unwrap();
    fill(&a, 1, 3000, "a");
    a.apply(&[ApplyEntry {
        index: 3001,
        log_id: Bytes::from_static(b"m"),
        payload: EntryPayload::Membership(Bytes::from_static(b"voters:1,2,3")),
    }])
    .unwrap();
    let file = src_dir.path().join("snap-4");
    let meta = a.build_snapshot(&file).unwrap();
    assert_eq!(meta.records, 3000 + 3, "data plus three sessions");
    assert_eq!(meta.applied.as_ref().unwrap().index, 3001);

    let dst_cfg = config(dst_dir.path());
    {
        let dst = StateStore::open(Arc::clone(&dst_cfg)).unwrap();
        let b = dst.create_shard(4).unwrap();
        fill(&b, 1, 10, "b");
        let mut rx = SnapshotReceiver::create(&dst_dir.path().join("incoming-4"), 1 << 30).unwrap();
        let mut offset = 0;
        loop {
            let chunk = read_snapshot_chunk(&file, offset, 64 * 1024).unwrap();
            if chunk.is_empty() {
                break;
            }
            rx.write_chunk(offset, &chunk).unwrap();
            offset += chunk.len() as u64;
        }
        assert!(
            matches!(
                rx.write_chunk(offset + 10, b"x"),
                Err(Error::Corrupt { .. })
            ),
            "out of order chunk"
        );
        let path = rx.finish().unwrap();
        let installed = dst.install_snapshot(4, &path).unwrap();
        assert_eq!(installed, meta);
        assert_eq!(dump(&b), dump(&a));
        assert_eq!(b.membership().unwrap(), a.membership().unwrap());
        assert_eq!(b.durable_applied_index(), Some(3001));
    }
    let dst = reopen(&dst_cfg);
    let b = dst.shard(4).unwrap();
    assert_eq!(dump(&b), dump(&a));
    assert!(
        b.get(b"patient-0/b-0").unwrap().is_none(),
        "old state is gone"
    );
}

/// A snapshot file cut short or with a flipped bit is refused, and the replica keeps its state.
#[test]
fn damaged_snapshot_is_refused_and_state_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(config(dir.path())).unwrap();
    let a = store.create_shard(1).unwrap();
    fill(&a, 1, 200, "a");
    let file = dir.path().join("snap");
    a.build_snapshot(&file).unwrap();
    let good = std::fs::read(&file).unwrap();
    let b = store.create_shard(2).unwrap();
    fill(&b, 1, 5, "b");
    let before = dump(&b);
    let wrong_shard = store.install_snapshot(2, &file);
    assert!(
        matches!(
            wrong_shard,
            Err(Error::SnapshotShardMismatch {
                expected: 2,
                found: 1
            })
        ),
        "{wrong_shard:?}"
    );
    let mut rng = 0x9e3779b97f4a7c15u64;
    for round in 0..60 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut bad = good.clone();
        if round % 2 == 0 {
            bad.truncate((rng % good.len() as u64) as usize);
        } else {
            let at = (rng % good.len() as u64) as usize;
            bad[at] ^= 1 << (rng % 8);
        }
        let damaged = dir.path().join("damaged");
        std::fs::write(&damaged, &bad).unwrap();
        let result = store.install_snapshot(1, &damaged);
        assert!(
            matches!(result, Err(Error::Corrupt { .. })),
            "round {round}: {result:?}"
        );
        assert_eq!(dump(&b), before);
    }
    assert_eq!(store.shards(), vec![1, 2]);
}

/// The durable applied index trails the applied index until a flush, then catches up.
#[test]
fn durable_applied_index_follows_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        dir: dir.path().to_path_buf(),
        flush_interval_ms: 60_000,
        ..StoreConfig::default()
    }
    .validate()
    .unwrap();
    let store = StateStore::open(cfg).unwrap();
    let shard = store.create_shard(3).unwrap();
    assert_eq!(shard.durable_applied_index(), None);
    fill(&shard, 1, 10, "x");
    assert_eq!(shard.applied().unwrap().unwrap().index, 10);
    assert_eq!(shard.durable_applied_index(), None, "no flush yet");
    store.flush().unwrap();
    assert_eq!(shard.durable_applied_index(), Some(10));
}

/// Limits are checked when a batch is proposed, with errors that name the limit.
#[test]
fn batch_limits_are_typed_errors() {
    let cfg = StoreConfig {
        key_bytes_max: 8,
        value_bytes_max: 16,
        ops_per_batch_max: 2,
        ..StoreConfig::default()
    };
    assert!(matches!(
        Batch::put("123456789", "v").check_limits(&cfg),
        Err(Error::KeyTooLarge { bytes: 9, max: 8 })
    ));
    assert!(matches!(
        Batch::put("k", vec![0u8; 17]).check_limits(&cfg),
        Err(Error::ValueTooLarge { .. })
    ));
    let cas = Batch::compare_and_set("k", Some(Bytes::from_static(b"a")), "b");
    assert!(cas.check_limits(&cfg).is_ok());
    let mut big = cas.clone();
    big.ops.push(Op::Delete {
        key: Bytes::from_static(b"z"),
    });
    assert!(matches!(
        big.check_limits(&cfg),
        Err(Error::TooManyOps { ops: 3, max: 2 })
    ));
}

/// `n` entries after `index`, each writing its own key `k<index>` (`value_bytes` long) and the
/// key `count` = its index (big-endian).
fn counted_entries(index: &mut u64, n: usize, value_bytes: usize) -> Vec<ApplyEntry> {
    (0..n)
        .map(|_| {
            *index += 1;
            let i = *index;
            let mut batch = Batch::put(format!("k{i:08}"), vec![7u8; value_bytes]);
            batch.ops.push(Op::Put {
                key: Bytes::from_static(b"count"),
                value: Bytes::from(i.to_be_bytes().to_vec()),
            });
            // A chain entry too: write-backs that hold one go to sled in two steps.
            batch.ops.push(Op::Append {
                head: Bytes::from_static(b"chain/head"),
                prefix: Bytes::from_static(b"chain/log/"),
                value: Bytes::from(format!("entry {i}")),
            });
            ApplyEntry {
                index: i,
                log_id: Bytes::new(),
                payload: EntryPayload::Command(Command::Txn {
                    session: None,
                    batch,
                }),
            }
        })
        .collect()
}

const CHILD_ENV: &str = "DOSSIER_STATE_CRASH_CHILD_DIR";

/// Not a test on its own: the child of `sigkill_leaves_store_at_an_applied_prefix`. Applies runs
/// of entries as fast as it can, each entry writing its own key and a counter; flushes often and
/// prints the durable applied index. Bounded: stops after 20 s by itself.
#[test]
fn crash_child_applier() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let cfg = StoreConfig {
        dir: dir.into(),
        flush_interval_ms: 5,
        ..StoreConfig::default()
    }
    .validate()
    .unwrap();
    let store = StateStore::open(cfg).unwrap();
    let shard = store.create_shard(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut index = 0u64;
    let mut printed = None;
    while std::time::Instant::now() < deadline {
        shard.apply(&counted_entries(&mut index, 16, 200)).unwrap();
        let durable = shard.durable_applied_index();
        if durable != printed {
            println!("DURABLE {}", durable.unwrap_or(0));
            printed = durable;
        }
    }
}

/// A process applying at full speed is SIGKILLed; the reopened store is exactly at some applied
/// index at or past the last one reported durable: data and applied id changed together.
#[test]
fn sigkill_leaves_store_at_an_applied_prefix() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_applier",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let started = std::time::Instant::now();
    let mut durable = 0u64;
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line
            .strip_prefix("DURABLE ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            durable = durable.max(n);
        }
        if durable >= 20_000 || started.elapsed() > std::time::Duration::from_secs(10) {
            break;
        }
    }
    // Killed at a varying point of the flusher's cycle (5 ms), not just after a report: now and
    // then between a round's two flushes, with chain entries on disk ahead of their batch.
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_micros()
        % 5_000;
    std::thread::sleep(std::time::Duration::from_micros(u64::from(jitter)));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(durable > 0, "the child reported nothing durable");

    let store = StateStore::open(config(dir.path())).unwrap();
    let shard = store.shard(1).unwrap();
    let applied = shard
        .applied()
        .unwrap()
        .expect("something was applied")
        .index;
    assert!(
        applied >= durable,
        "applied {applied} is below the reported durable {durable}"
    );
    let count = shard.get(b"count").unwrap().expect("counter");
    assert_eq!(
        u64::from_be_bytes(count.as_ref().try_into().unwrap()),
        applied
    );
    let keys = shard.scan_prefix(b"k", None, usize::MAX).unwrap();
    assert_eq!(
        keys.len() as u64,
        applied,
        "exactly the keys of entries 1..={applied}"
    );
    assert_eq!(
        keys.last().unwrap().0,
        Bytes::from(format!("k{applied:08}"))
    );
    // The chain: one linked entry per applied entry, its head naming the last; entries beyond
    // the head (written ahead of their batch, which the kill lost) follow on without a gap.
    let head = shard.get(b"chain/head").unwrap().expect("chain head");
    let head = chain::decode_head(&head).unwrap();
    assert_eq!(head.0, applied);
    let seqs = |shard: &dossier_storage::ShardHandle| -> Vec<(u64, Bytes)> {
        shard
            .scan_prefix(b"chain/log/", None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(key, value)| {
                let seq = u64::from_be_bytes(key[b"chain/log/".len()..].try_into().unwrap());
                (seq, value)
            })
            .collect()
    };
    let mut verifier = chain::Verifier::default();
    let entries = seqs(&shard);
    for (seq, value) in entries.iter().take_while(|(seq, _)| *seq <= head.0) {
        verifier.next(*seq, value).unwrap();
    }
    verifier.finish(Some(head)).unwrap();
    let beyond = entries.last().map_or(0, |(seq, _)| *seq);
    assert_eq!(entries.len() as u64, beyond.max(applied), "no gap");
    // Replaying the entries after the applied index, as the layer above does, writes those
    // beyond the head again with the same bytes and leaves one intact chain.
    let mut index = applied;
    let replay = counted_entries(
        &mut index,
        (beyond.saturating_sub(applied) + 16) as usize,
        200,
    );
    shard.apply(&replay).unwrap();
    let head = chain::decode_head(&shard.get(b"chain/head").unwrap().unwrap()).unwrap();
    assert_eq!(head.0, index);
    let mut verifier = chain::Verifier::default();
    for (seq, value) in seqs(&shard) {
        verifier.next(seq, &value).unwrap();
    }
    verifier.finish(Some(head)).unwrap();
    eprintln!(
        "entries beyond the head at reopen: {}",
        beyond.saturating_sub(applied)
    );
    eprintln!(
        "killed after {:?}: durable {durable}, recovered applied {applied}",
        started.elapsed()
    );
}

/// The `[log]` and `[state]` tables of `docs/config-template.toml` parse into both configs with
/// exactly the defaults: the template cannot drift from the code. (The node's own test checks the
/// whole file against the node's defaults.)
#[test]
fn config_template_matches_defaults() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/config-template.toml"
    ))
    .unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let log: dossier_storage::LogConfig = table["log"].clone().try_into().unwrap();
    let state: StoreConfig = table["state"].clone().try_into().unwrap();
    assert_eq!(log, dossier_storage::LogConfig::default());
    assert_eq!(state, StoreConfig::default());
}

/// Entries at or below the applied index (or at u64::MAX) are refused with a typed error and
/// change nothing; they never panic the node.
#[test]
fn out_of_order_apply_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(config(dir.path())).unwrap();
    let shard = store.create_shard(1).unwrap();
    fill(&shard, 1, 5, "x");
    let before = dump(&shard);
    for index in [3, 5, u64::MAX] {
        let entry = ApplyEntry {
            index,
            log_id: Bytes::new(),
            payload: EntryPayload::Blank,
        };
        let result = shard.apply(&[entry]);
        assert!(
            matches!(result, Err(Error::ApplyOutOfOrder { shard: 1, .. })),
            "{index}: {result:?}"
        );
    }
    assert_eq!(dump(&shard), before);
}

/// Runs `round` on a thread of its own until `stop` is set; the thread returns the rounds it ran.
fn until_stopped(
    stop: &Arc<std::sync::atomic::AtomicBool>,
    mut round: impl FnMut() + Send + 'static,
) -> std::thread::JoinHandle<u64> {
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        let mut rounds = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            round();
            rounds += 1;
        }
        rounds
    })
}

/// Reads racing snapshot installs never fail: the old tree is dropped only after readers let go.
#[test]
fn reads_race_snapshot_installs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(config(dir.path())).unwrap());
    let shard = store.create_shard(1).unwrap();
    fill(&shard, 1, 300, "x");
    let file = dir.path().join("snap");
    shard.build_snapshot(&file).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let shard = Arc::clone(&shard);
        until_stopped(&stop, move || {
            assert_eq!(
                shard
                    .scan_prefix(b"patient-3/", None, usize::MAX)
                    .unwrap()
                    .len(),
                43
            );
            assert!(shard.get(b"patient-0/x-0").unwrap().is_some());
        })
    };
    for _ in 0..20 {
        store.install_snapshot(1, &file).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

/// Write-backs, whole and in the flusher's two steps, run beside applies and reads: a reader
/// never sees the counter go back or a key it counted missing, and the tree ends at the last
/// applied index.
#[test]
fn write_backs_race_applies_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        dir: dir.path().to_path_buf(),
        flush_interval_ms: 60_000,
        write_back_bytes: 4096,
        ..StoreConfig::default()
    }
    .validate()
    .unwrap();
    let store = Arc::new(StateStore::open(cfg).unwrap());
    let shard = store.create_shard(1).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (shard, store) = (Arc::clone(&shard), Arc::clone(&store));
        let rounds = std::sync::atomic::AtomicU64::new(0);
        until_stopped(&stop, move || {
            if rounds
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(2)
            {
                shard.write_back().unwrap();
            } else {
                store.flush().unwrap();
            }
        })
    };
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let (shard, seen) = (Arc::clone(&shard), Arc::clone(&seen));
        until_stopped(&stop, move || {
            let count = shard
                .get(b"count")
                .unwrap()
                .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
            let before = seen.fetch_max(count, std::sync::atomic::Ordering::SeqCst);
            assert!(
                count >= before,
                "the counter went back from {before} to {count}"
            );
            if count > 0 {
                assert!(
                    shard
                        .get(format!("k{count:08}").as_bytes())
                        .unwrap()
                        .is_some()
                );
            }
        })
    };
    let mut index = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    while std::time::Instant::now() < deadline {
        shard.apply(&counted_entries(&mut index, 8, 100)).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().unwrap();
    reader.join().unwrap();
    assert!(seen.load(std::sync::atomic::Ordering::SeqCst) > 0);
    store.flush().unwrap();
    assert_eq!(shard.durable_applied_index(), Some(index));
    // Keys, count, applied id, and the chain's entries and head.
    assert_eq!(shard.key_count().unwrap(), 2 * index as usize + 3);
}

/// `n` puts without a session from `first_index` on, of `value_bytes` each, over keys that
/// overwrite the first `fill`'s.
fn overwrite(shard: &dossier_storage::ShardHandle, first_index: u64, n: u64, value_bytes: usize) {
    let entries: Vec<ApplyEntry> = (0..n)
        .map(|i| ApplyEntry {
            index: first_index + i,
            log_id: Bytes::from(format!("w-{i}")),
            payload: EntryPayload::Command(Command::Txn {
                session: None,
                batch: Batch::put(format!("patient-{}/a-{i}", i % 7), vec![0xEE; value_bytes]),
            }),
        })
        .collect();
    for chunk in entries.chunks(64) {
        shard.apply(chunk).unwrap();
    }
}

/// A view holds the state it was taken at while applies go on: reads see the newer writes, the
/// snapshot written from the view afterwards holds exactly the older state, and once the view is
/// dropped the newer writes reach the tree and survive a reopen.
#[test]
fn view_holds_one_state_while_applies_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let file = dir.path().join("snap");
    let before;
    {
        let store = StateStore::open(Arc::clone(&cfg)).unwrap();
        let a = store.create_shard(3).unwrap();
        fill(&a, 1, 1000, "a");
        before = dump(&a);
        let view = a.view().unwrap();
        assert_eq!(view.meta().applied.as_ref().unwrap().index, 1000);
        overwrite(&a, 1001, 500, 200);
        store.flush().unwrap();
        assert_eq!(
            a.get(b"patient-0/a-0").unwrap().as_deref(),
            Some(&[0xEE; 200][..]),
            "reads see writes made while the view holds the tree"
        );
        assert_eq!(
            a.durable_applied_index(),
            Some(1000),
            "held writes are not durable yet"
        );
        let meta = view.write_to(&file).unwrap();
        assert_eq!(meta.applied.as_ref().unwrap().index, 1000);
        drop(view);
        store.flush().unwrap();
        assert_eq!(a.durable_applied_index(), Some(1500));
        assert_eq!(
            a.durable_checkpoint().unwrap().applied.index,
            1500,
            "the durable checkpoint follows the flush"
        );
    }
    let other = tempfile::tempdir().unwrap();
    let copy = StateStore::open(config(other.path())).unwrap();
    let b = copy.create_shard(3).unwrap();
    copy.install_snapshot(3, &file).unwrap();
    assert_eq!(
        dump(&b),
        before,
        "the snapshot is the state the view was taken at"
    );
    let store = reopen(&cfg);
    let a = store.shard(3).unwrap();
    assert_eq!(a.applied_index(), Some(1500));
    assert_eq!(
        a.get(b"patient-0/a-0").unwrap().as_deref(),
        Some(&[0xEE; 200][..])
    );
}

/// Writes that outgrow `snapshot-hold-bytes-max` while a view holds the tree break the hold: the
/// view's snapshot fails (never a mixed state), memory stays bounded, and the writes go on.
#[test]
fn view_fails_when_held_writes_outgrow_their_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        dir: dir.path().to_path_buf(),
        flush_interval_ms: 50,
        snapshot_hold_bytes_max: 2 << 20,
        ..StoreConfig::default()
    }
    .validate()
    .unwrap();
    let store = StateStore::open(cfg).unwrap();
    let a = store.create_shard(5).unwrap();
    fill(&a, 1, 100, "a");
    let view = a.view().unwrap();
    overwrite(&a, 101, 64, 64 * 1024);
    let err = view.write_to(&dir.path().join("snap")).unwrap_err();
    assert!(matches!(err, Error::SnapshotViewLost { shard: 5 }), "{err}");
    assert!(!dir.path().join("snap").exists());
    assert!(
        !dir.path().join("snap.tmp").exists(),
        "no partial file is left"
    );
    drop(view);
    store.flush().unwrap();
    assert_eq!(a.durable_applied_index(), Some(164));
    // A new view works.
    a.view()
        .unwrap()
        .write_to(&dir.path().join("snap"))
        .unwrap();
}

/// Replicas are removed while flushes run (the flusher, snapshot builds and shutdown all flush):
/// a removal waits for no flush round and no round waits for a removed replica, so neither hangs.
#[test]
fn removals_and_flushes_never_wait_for_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(config(dir.path())).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let store = Arc::clone(&store);
        until_stopped(&stop, move || store.flush().unwrap())
    };
    let (done_tx, done) = std::sync::mpsc::sync_channel(1);
    let remover = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
            let mut removed = 0u64;
            let mut shard_id = 100;
            while std::time::Instant::now() < deadline {
                shard_id += 1;
                let shard = store.create_shard(shard_id).unwrap();
                let mut index = 0;
                // Chain entries too, so that rounds stage this replica between their flushes.
                shard.apply(&counted_entries(&mut index, 32, 100)).unwrap();
                store.remove_shard(shard_id).unwrap();
                removed += 1;
            }
            done_tx.send(removed).unwrap();
        })
    };
    let removed = done
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a removal and a flush waited for each other");
    remover.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = flusher.join().unwrap();
    assert!(
        removed > 0 && rounds > 0,
        "{removed} removals, {rounds} rounds"
    );
    eprintln!("{removed} removals beside {rounds} flush rounds");
}
