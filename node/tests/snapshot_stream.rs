//! A snapshot that streams for longer than any request deadline still arrives: transfers are
//! bounded by progress, not by a deadline on the whole stream.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, metric, patient_in_shard};
use dossier_api::v1::{Operation, operation};

const MIB: usize = 1 << 20;

/// One shard; a follower is down while 64 MiB of documents and 300,000 small records are
/// written and the log is purged; it comes back and receives the shard by snapshot. The request deadline is 200 ms (the server's default
/// bound on a call, 1.2 s, was also the bound on a snapshot stream before): the transfer takes
/// longer than that and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_longer_than_the_request_deadline_arrives() {
    let tweak = |c: &mut dossier_node::NodeConfig| {
        c.limits.request_deadline_ms = 200;
        c.raft.snapshot_after_entries = 20;
        c.raft.log_entries_kept_after_snapshot = 2;
    };
    let mut cluster = TestCluster::start(3, 1, 3, &tweak).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 1, "stream");
    let (down, index) = cluster.stop_a_follower_of(1).await;
    // The stopped follower holds no entry past the leader's last one now.
    let stopped_at = leader_status(&cluster).await.last_log_index;
    let value: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, patient, value) = (client.clone(), patient.clone(), value.clone());
            tokio::spawn(async move {
                for i in 0..16 {
                    client
                        .put(&patient, format!("doc-{w}-{i}").as_bytes(), &value)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // 300 batches of 1,000 small records: 300,000 records to scan, send and load, and enough
    // entries for the purge (256 at least) to run.
    for b in 0..300 {
        let operations = (0..1000)
            .map(|i| Operation {
                op: Some(operation::Op::Put(operation::Put {
                    key: format!("rec-{b:03}-{i:04}").into_bytes(),
                    value: vec![b'r'; 64],
                })),
            })
            .collect();
        client
            .batch(&patient, Vec::new(), operations, Duration::from_secs(10))
            .await
            .unwrap();
    }
    // The follower must need a snapshot: the leader's log purged past what it holds. The leader
    // postpones a purge while a replication request (to the stopped follower, retried) covers
    // the entries, and tries again as writes progress: small writes until it has purged.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut extra = 0;
    while leader_status(&cluster).await.purged_index <= stopped_at {
        assert!(
            Instant::now() < deadline,
            "the leader did not purge its log past index {stopped_at}"
        );
        client
            .put(&patient, format!("nudge-{extra}").as_bytes(), b"n")
            .await
            .unwrap();
        extra += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.nodes[index].start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if metric(&cluster.nodes[index], "dossier_snapshots_received_total").await >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {down} received no snapshot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bytes = metric(
        &cluster.nodes[index],
        "dossier_snapshot_received_bytes_total",
    )
    .await;
    let seconds = metric(
        &cluster.nodes[index],
        "dossier_snapshot_receive_seconds_total",
    )
    .await;
    eprintln!(
        "snapshot received: {bytes} bytes in {seconds:.2} s ({:.0} MB/s, debug build)",
        bytes / 1e6 / seconds
    );
    assert!(bytes >= (64 * MIB) as f64, "received {bytes} bytes");
    assert!(
        seconds > 1.2,
        "the transfer took {seconds} s: too fast to show it outlives the request deadline"
    );
    // The returning replica serves the data from its own state.
    let got = client.get(&patient, b"doc-3-15").await.unwrap().unwrap();
    assert!(got[..] == value[..]);
}

/// Shard 1's status on its leader.
async fn leader_status(cluster: &TestCluster) -> dossier_api::v1::ShardStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = cluster
            .replicas()
            .await
            .into_iter()
            .filter(|r| r.shard_id == 1 && r.role == "leader")
            .max_by_key(|r| r.term)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "shard 1 has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
