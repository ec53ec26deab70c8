//! Quiescent groups (`raft.quiesce-after-ms`): idle data groups stop their Raft timers on every
//! replica, stay so (no election, no term change) while nothing happens, wake up for a write or
//! a read, fail over when their leader's node dies, and lose no acknowledged write.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestCluster, patient_in_shard};
use dossier_api::v1::ShardStatus;

const SHARDS: u64 = 4;

/// Data-shard replicas by (shard, node).
async fn data_replicas(cluster: &TestCluster) -> BTreeMap<(u64, u64), ShardStatus> {
    cluster
        .replicas()
        .await
        .into_iter()
        .filter(|r| r.shard_id != 0)
        .map(|r| ((r.shard_id, r.node_id), r))
        .collect()
}

/// Waits until every replica of every data shard on the running nodes is quiescent.
async fn wait_all_quiet(cluster: &TestCluster, replicas: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = data_replicas(cluster).await;
        if all.len() == replicas && all.values().all(|r| r.quiescent) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_go_quiet_wake_for_use_and_fail_over() {
    let mut cluster = TestCluster::start(3, SHARDS as u32, 3, &|c| {
        c.raft.quiesce_after_ms = Some(600);
        c.placement_balance = false;
    })
    .await;
    let client = cluster.client().await;
    let patients: Vec<String> = (1..=SHARDS)
        .map(|s| patient_in_shard(&client, s, "quiet"))
        .collect();
    let mut written = Vec::new();
    for p in &patients {
        client.put(p, b"first", b"v").await.unwrap();
        written.push((p.clone(), "first".to_owned()));
    }
    wait_all_quiet(&cluster, 3 * SHARDS as usize, "every replica goes quiet").await;

    // Quiet means quiet: over two election timeouts' worth of seconds, no term moves and every
    // replica stays quiescent.
    let before = data_replicas(&cluster).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = data_replicas(&cluster).await;
    for (key, r) in &after {
        assert!(r.quiescent, "{r:?}");
        assert_eq!(r.term, before[key].term, "no election while quiet: {r:?}");
        assert_eq!(r.last_log_index, before[key].last_log_index, "{r:?}");
    }

    // A write sent straight to the quiet leader is taken: openraft refuses writes on a leader
    // whose lease expired, and a quiet leader's has, so waking renews it first.
    let leader = cluster.leader_of(1).await.unwrap();
    let at = cluster.nodes[cluster.node_index(leader)].grpc.clone();
    let mut kv = dossier_api::v1::kv_client::KvClient::connect(format!("http://{at}"))
        .await
        .unwrap();
    kv.put(dossier_api::v1::PutRequest {
        route: Some(dossier_api::v1::RouteHeader {
            shard_id: 0,
            epoch: 0,
            patient_id: patients[0].clone(),
        }),
        key: b"direct".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_all_quiet(
        &cluster,
        3 * SHARDS as usize,
        "quiet again after the direct write",
    )
    .await;

    // A write wakes the group, answers, and the group goes quiet again afterwards.
    client.put(&patients[0], b"second", b"v").await.unwrap();
    written.push((patients[0].clone(), "second".to_owned()));
    assert!(
        client.get(&patients[1], b"first").await.unwrap().is_some(),
        "a linearizable read of a quiet shard"
    );
    assert!(client.get(&patients[0], b"direct").await.unwrap().is_some());
    wait_all_quiet(&cluster, 3 * SHARDS as usize, "quiet again after the write").await;

    // The node leading shard 1 dies while the shard is quiet: the others see its node go
    // silent, elect, and take writes.
    let leader = cluster.leader_of(1).await.unwrap();
    let index = cluster.node_index(leader);
    let term = data_replicas(&cluster).await[&(1, leader)].term;
    let killed = Instant::now();
    cluster.nodes[index].kill();
    client.put(&patients[0], b"after-kill", b"v").await.unwrap();
    written.push((patients[0].clone(), "after-kill".to_owned()));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a write to the quiet shard of a dead leader took {took:?}"
    );
    let now = data_replicas(&cluster).await;
    let new_leader = now
        .values()
        .find(|r| r.shard_id == 1 && r.role == "leader")
        .unwrap();
    assert_ne!(new_leader.node_id, leader);
    assert!(new_leader.term > term);

    // It comes back; everything goes quiet again, and nothing acknowledged was lost.
    cluster.nodes[index].start();
    cluster.wait_all_leaders(Duration::from_secs(30)).await;
    for p in &patients {
        client.put(p, b"back", b"v").await.unwrap();
        written.push((p.clone(), "back".to_owned()));
    }
    wait_all_quiet(
        &cluster,
        3 * SHARDS as usize,
        "quiet again after the restart",
    )
    .await;
    for (p, k) in &written {
        assert!(
            client.get(p, k.as_bytes()).await.unwrap().is_some(),
            "acknowledged write {p}/{k} lost"
        );
    }
}
