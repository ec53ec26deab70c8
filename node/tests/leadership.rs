//! Leaderships go back to their preferred replicas (node/src/leadership.rs): after a node is
//! stopped as SIGTERM would (its leaderships handed over) and started again, it leads its share
//! again, and no shard is left without a leader meanwhile.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::TestCluster;

/// Shards each node leads, by the nodes' own views (highest term wins).
async fn leaders(cluster: &TestCluster) -> BTreeMap<u64, Vec<u64>> {
    let replicas = cluster.replicas().await;
    let mut by_shard: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for r in replicas
        .iter()
        .filter(|r| r.role == "leader" && r.shard_id != 0)
    {
        let e = by_shard.entry(r.shard_id).or_insert((r.term, r.node_id));
        if r.term >= e.0 {
            *e = (r.term, r.node_id);
        }
    }
    let mut led: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (shard, (_, node)) in by_shard {
        led.entry(node).or_default().push(shard);
    }
    led
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_leads_its_preferred_shards_again() {
    let mut cluster = TestCluster::start(3, 6, 3, &|_| {}).await;
    let client = cluster.client().await;
    let map = client.cluster_map().unwrap();
    // Each shard's preferred leader is its first replica; init spreads them two per node.
    let preferred: BTreeMap<u64, u64> = map
        .shards
        .iter()
        .map(|d| (d.shard_id, d.replicas[0]))
        .collect();
    let wanted = |node: u64| -> Vec<u64> {
        preferred
            .iter()
            .filter(|(_, n)| **n == node)
            .map(|(s, _)| *s)
            .collect()
    };
    // Settle: every shard led by its preferred replica (elections may have gone elsewhere).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let led = leaders(&cluster).await;
        if (1..=3).all(|n| led.get(&n).cloned().unwrap_or_default() == wanted(n)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaderships did not settle on the preferred replicas: {led:?}, preferred {preferred:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Node 1 stops gracefully: the others take its leaderships.
    let index = cluster.node_index(1);
    cluster.nodes[index].stop().await;
    cluster.wait_all_leaders(Duration::from_secs(20)).await;
    let led = leaders(&cluster).await;
    assert!(
        !led.contains_key(&1),
        "a stopped node leads nothing: {led:?}"
    );
    // Writes keep going to every shard meanwhile.
    for d in &map.shards {
        let patient = common::patient_in_shard(&client, d.shard_id, "lead");
        client.put(&patient, b"k", b"v").await.unwrap();
    }
    // Back: it leads its two preferred shards again, without anyone asking.
    cluster.nodes[index].start();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let led = leaders(&cluster).await;
        if led.get(&1).cloned().unwrap_or_default() == wanted(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 did not lead its preferred shards {:?} again: {led:?}",
            wanted(1)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for d in &map.shards {
        let patient = common::patient_in_shard(&client, d.shard_id, "lead");
        assert_eq!(
            client.get(&patient, b"k").await.unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
}
