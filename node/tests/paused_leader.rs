//! A shard leader stopped with SIGSTOP while linearizable reads queue at it: another replica
//! takes over and accepts writes, the old leader resumes, and no read it then answers may return
//! a value older than a write that completed before the read was sent.
//!
//! What this catches: a deposed leader that believes a quorum acknowledged it a moment ago. With
//! openraft's in-flight accounting, an answer a follower made before the stop, read from the
//! socket after it, could be credited with the creation time of a request built after the
//! resume; the old leader's lease (or ReadIndex round) then passed and it served its stale state
//! (docs/invariants.md, "Lease reads"). `raft/src/lease_credit_tests.rs` shows that mechanism
//! deterministically; this test shows its effect end to end, on real processes. Each cycle stops
//! the leader of some shards while 24 writers keep its replication streams busy, so answers are
//! in flight when it stops. Whether the resumed node handles the old answers and the queued reads
//! before the new leader's messages is up to its scheduler: against the binaries before the fix
//! (`DOSSIER_TEST_NODE_BIN=…`) one cycle in ten to twenty served a stale read, so 30 cycles
//! caught it in most runs on a quiet machine (docs/testing.md); with the fix no cycle may.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::patient_in_shard;
use common::process::{ProcCluster, linearizable_get, register_value, shard_epoch};
use dossier_api::v1::kv_client::KvClient;
use nix::sys::signal::Signal;

/// Shards of the cluster (the deployed shape: several leaders per node).
const SHARDS: u64 = 8;
/// Registers per shard, one writer each.
const KEYS_PER_SHARD: usize = 3;
const KEYS: usize = SHARDS as usize * KEYS_PER_SHARD;
/// Reads queued at the stopped leader per key and cycle.
const READS_PER_KEY: usize = 4;
/// Pauses per run.
const CYCLES: usize = 30;
/// Raft timing of the test cluster: the leader lease (the maximum election timeout) is 100 ms,
/// and a follower that hears nothing stands for election 180–200 ms after the last heartbeat.
const TIMING: &str = "[raft]\nheartbeat-interval-ms = 20\nelection-timeout-min-ms = 80\nelection-timeout-max-ms = 100\n";
/// How long the leader stays stopped at least: past its lease and an election. Shorter than the
/// replication sessions' answer timeout (500 ms), so the answers that reached the leader's
/// socket while it was stopped are read, not dropped with a session that timed out.
const PAUSE: Duration = Duration::from_millis(420);
const KEY: &[u8] = b"register";

/// What the reads of a run came to.
#[derive(Debug, Default)]
struct Outcome {
    /// Reads the resumed leader answered with a value (never stale, or the test failed).
    served: usize,
    /// Reads it refused (no longer leader, deadline).
    refused: usize,
}

async fn paused_leader_serves_no_stale_read(config: &str) -> Outcome {
    let cluster = ProcCluster::start(3, SHARDS as u32, &format!("{TIMING}{config}")).await;
    let client = Arc::new(cluster.client(Duration::from_millis(300)).await);
    // Key k is in shard `shard_of(k)`.
    let shard_of = |k: usize| (k / KEYS_PER_SHARD) as u64 + 1;
    let patients: Arc<Vec<String>> = Arc::new(
        (0..KEYS)
            .map(|k| patient_in_shard(&client, shard_of(k), &format!("register-{k}")))
            .collect(),
    );
    let epochs: Vec<u64> = (1..=SHARDS).map(|s| shard_epoch(&client, s)).collect();
    let epoch = |shard: u64| epochs[shard as usize - 1];

    // Each writer puts 1, 2, 3, ... to its key, one at a time; `acked[k]` is the highest value
    // whose put completed.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..KEYS)
        .map(|k| {
            let (client, patients, acked, stop) = (
                Arc::clone(&client),
                Arc::clone(&patients),
                Arc::clone(&acked),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut value = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    value += 1;
                    // A failed put may still apply later: it only makes reads newer.
                    if client
                        .put(&patients[k], KEY, &value.to_be_bytes())
                        .await
                        .is_ok()
                    {
                        acked[k].store(value, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let snapshot = |acked: &[AtomicU64]| -> Vec<u64> {
        acked.iter().map(|a| a.load(Ordering::SeqCst)).collect()
    };

    let mut outcome = Outcome::default();
    for cycle in 0..CYCLES {
        // The leader of one shard, and every shard it leads.
        let leader = cluster.leader_of(cycle as u64 % SHARDS + 1).await;
        let mut led = Vec::new();
        for shard in 1..=SHARDS {
            if cluster.leader_of(shard).await == leader {
                led.push(shard);
            }
        }
        // Connected before the stop, so the reads below only queue in the leader's socket.
        let direct = KvClient::connect(format!("http://{}", cluster.addr(leader)))
            .await
            .unwrap();
        // Writes flow through the leader, its replication streams full.
        let flowing = snapshot(&acked);
        let deadline = Instant::now() + Duration::from_secs(10);
        while snapshot(&acked).iter().zip(&flowing).any(|(a, f)| a <= f) {
            assert!(Instant::now() < deadline, "writes do not flow");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        cluster.signal(leader, Signal::SIGSTOP);
        let stopped = Instant::now();
        // Another replica takes over: every key gets a write that completed after the stop.
        let at_stop = snapshot(&acked);
        let deadline = stopped + Duration::from_secs(10);
        while snapshot(&acked)
            .iter()
            .zip(&at_stop)
            .enumerate()
            .any(|(k, (a, s))| led.contains(&shard_of(k)) && a <= s)
        {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: no write completed without node {leader}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Linearizable reads sent to the stopped leader now must see at least these values.
        let floor = snapshot(&acked);
        let mut reads = Vec::new();
        for (k, patient) in patients.iter().enumerate() {
            if !led.contains(&shard_of(k)) {
                continue;
            }
            for _ in 0..READS_PER_KEY {
                let mut direct = direct.clone();
                let request = linearizable_get(
                    shard_of(k),
                    epoch(shard_of(k)),
                    patient,
                    KEY,
                    Duration::from_secs(10),
                );
                reads.push((k, tokio::spawn(async move { direct.get(request).await })));
            }
        }
        tokio::time::sleep(
            PAUSE
                .saturating_sub(stopped.elapsed())
                .max(Duration::from_millis(20)),
        )
        .await;
        cluster.signal(leader, Signal::SIGCONT);

        for (k, read) in reads {
            match read.await.unwrap() {
                Ok(answer) => {
                    let got = register_value(&answer.into_inner());
                    assert!(
                        got >= floor[k],
                        "cycle {cycle}: node {leader}, stopped {:?} and resumed, answered a \
                         linearizable read of key {k} with {got}, but {} had been written and \
                         acknowledged before the read was sent",
                        PAUSE,
                        floor[k]
                    );
                    outcome.served += 1;
                }
                // No longer leader (the usual answer), or out of time.
                Err(_) => outcome.refused += 1,
            }
        }
        // The old leader rejoins as a follower before the next cycle.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    eprintln!("{outcome:?}");
    outcome
}

/// Lease reads (the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_leader_serves_no_stale_lease_read() {
    let outcome = paused_leader_serves_no_stale_read("").await;
    assert!(outcome.served + outcome.refused >= READS_PER_KEY * KEYS_PER_SHARD * CYCLES);
}

/// ReadIndex (`raft.read-lease = false`): a fresh quorum round per read must hold as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_leader_serves_no_stale_read_index_read() {
    let outcome = paused_leader_serves_no_stale_read("read-lease = false\n").await;
    assert!(outcome.served + outcome.refused >= READS_PER_KEY * KEYS_PER_SHARD * CYCLES);
}
