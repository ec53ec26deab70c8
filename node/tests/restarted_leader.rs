//! A shard leader SIGKILLed right after acknowledging writes and started again at once: no
//! linearizable read it answers after the restart may miss those writes.
//!
//! What this catches: a leader restored as leader at start-up without an election (openraft's
//! `enable_leader_restore`). Dossier persists neither the commit index nor the state machine on
//! every apply, so such a leader computed its read index from a commit index that lagged what it
//! had acknowledged and served reads from the state machine as last flushed
//! (docs/invariants.md, "Lease reads", rule 5).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::patient_in_shard;
use common::process::{ProcCluster, linearizable_get, register_value, shard_epoch};
use dossier_api::v1::kv_client::KvClient;

/// Kills and restarts per run.
const CYCLES: u64 = 8;
/// Writes acknowledged just before each kill.
const WRITES: u64 = 40;
const KEY: &[u8] = b"register";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_serves_no_read_missing_its_acknowledged_writes() {
    let mut cluster = ProcCluster::start(3, 1, "").await;
    let client = cluster.client(Duration::from_millis(300)).await;
    let patient = patient_in_shard(&client, 1, "restarted-leader");
    let epoch = shard_epoch(&client, 1);
    let (mut served, mut refused) = (0u64, 0u64);
    for cycle in 0..CYCLES {
        let leader = cluster.leader_of(1).await;
        let mut last = 0;
        for i in 1..=WRITES {
            let value = cycle * 1_000 + i;
            client
                .put(&patient, KEY, &value.to_be_bytes())
                .await
                .unwrap();
            last = value;
        }
        // The last writes live in the leader's write-back buffer, not yet flushed.
        cluster.restart(leader);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let Ok(mut kv) = KvClient::connect(format!("http://{}", cluster.addr(leader))).await
            else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let request = linearizable_get(1, epoch, &patient, KEY, Duration::from_secs(2));
            match kv.get(request).await {
                Ok(answer) => {
                    let got = register_value(&answer.into_inner());
                    assert!(
                        got >= last,
                        "cycle {cycle}: node {leader}, killed and restarted, answered a \
                         linearizable read with {got}, but {last} had been acknowledged"
                    );
                    served += 1;
                    break;
                }
                // Not the leader (yet), starting, or out of time: ask again.
                Err(_) => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        // Every acknowledged write is there, whoever leads now.
        let got = client.get(&patient, KEY).await.unwrap().unwrap();
        assert!(
            u64::from_be_bytes(got[..].try_into().unwrap()) >= last,
            "acknowledged write lost"
        );
    }
    eprintln!("reads served by a restarted leader: {served}, refusals: {refused}");
}
