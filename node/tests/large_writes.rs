//! Large writes: no burst of big records stops a shard, and a command no log entry can hold is
//! refused as the client's error.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use dossier_api::v1::{Operation, operation};
use dossier_client::{Client, ClientError};

const MIB: usize = 1 << 20;

/// A value of `len` bytes that names its writer in every byte position.
fn value(writer: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (writer * 31 + i) as u8).collect()
}

/// Both checks run on one cluster, one after the other: sled 0.34 guards every tree of a process
/// with one global concurrency-control lock (a batch takes it exclusively, reads share it), so
/// two in-process clusters side by side can hold each other up; one tearing down its databases
/// (a flush that waits for its IO buffers while the lock is shared) once held the other's nodes
/// for 90 s. Separate node processes share no such lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_keep_the_shard_alive_and_an_oversized_command_is_refused() {
    let cluster = TestCluster::start(3, 1, 3, &|_| {}).await;
    let client = cluster.client().await;
    burst_of_large_writes_keeps_the_shard_alive(&cluster, &client).await;
    command_above_the_entry_limit_is_refused(&client).await;
}

/// 64 writers put 1 MiB each into one fresh shard at once (64 MiB, twice the log's batch limit,
/// far above one AppendEntries): the shard keeps its leader, small writes still commit, every
/// follower catches up to the leader, and every acknowledged value reads back whole.
async fn burst_of_large_writes_keeps_the_shard_alive(cluster: &TestCluster, client: &Client) {
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                // A deadline that a loaded 2-core machine meets; the burst, not the deadline,
                // is under test.
                let outcome = client
                    .put_with(
                        &format!("big-{w}"),
                        b"document",
                        &value(w, MIB),
                        Duration::from_secs(60),
                    )
                    .await;
                (w, outcome)
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for writer in writers {
        let (w, outcome) = writer.await.unwrap();
        match outcome {
            Ok(_) => acknowledged.push(w),
            // Under this load on a small machine a write may outlive its deadline; it must
            // never be refused as invalid or stop the group.
            Err(ClientError::Timeout { .. }) => {}
            Err(e) => panic!("writer {w}: {e}"),
        }
    }
    assert!(!acknowledged.is_empty(), "no 1 MiB write was acknowledged");

    cluster.wait_all_leaders(Duration::from_secs(30)).await;
    client.put("small", b"k", b"after the burst").await.unwrap();
    assert_eq!(
        client.get("small", b"k").await.unwrap().as_deref(),
        Some(&b"after the burst"[..])
    );

    // Every replica reaches the same applied index: the followers took the burst in messages
    // within their limits.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied: Vec<u64> = cluster
            .replicas()
            .await
            .iter()
            .filter(|r| r.shard_id == 1)
            .map(|r| r.applied_index)
            .collect();
        if applied.len() == 3 && applied.iter().min() == applied.iter().max() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "followers did not catch up: {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for w in acknowledged {
        let got = client
            .get(&format!("big-{w}"), b"document")
            .await
            .unwrap()
            .unwrap();
        assert!(got[..] == value(w, MIB)[..], "writer {w}'s value changed");
    }
}

/// A batch of five 1 MiB puts encodes to more than one log entry holds (`log.entry-bytes-max`,
/// 4 MiB): it is refused as INVALID_ARGUMENT naming the limit, and the shard goes on serving.
async fn command_above_the_entry_limit_is_refused(client: &Client) {
    let operations: Vec<Operation> = (0..5)
        .map(|i| Operation {
            op: Some(operation::Op::Put(operation::Put {
                key: format!("part-{i}").into_bytes(),
                value: value(i, MIB),
            })),
        })
        .collect();
    let refused = client
        .batch("letter", Vec::new(), operations, Duration::from_secs(10))
        .await
        .expect_err("a 5 MiB command cannot be one entry");
    match &refused {
        ClientError::InvalidArgument { message, limit, .. } => {
            assert!(message.contains("entry-bytes-max"), "{message}");
            assert!(limit.is_some_and(|l| l < 4 * MIB as u64), "{limit:?}");
        }
        other => panic!("expected INVALID_ARGUMENT, got {other}"),
    }
    // Three fit.
    let operations: Vec<Operation> = (0..3)
        .map(|i| Operation {
            op: Some(operation::Op::Put(operation::Put {
                key: format!("part-{i}").into_bytes(),
                value: value(i, MIB),
            })),
        })
        .collect();
    client
        .batch("letter", Vec::new(), operations, Duration::from_secs(10))
        .await
        .unwrap();
}
