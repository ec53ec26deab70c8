//! Shard splits on a running 3-node cluster: the shard keeps the lower half of its patients and
//! a new shard on the same nodes takes the upper half, while writers keep writing to both
//! halves; no acknowledged write is lost, every replica builds the new shard, and clients
//! re-route by themselves.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::TestCluster;
use dossier_api::v1::SplitShardRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_splits_under_writes_and_loses_nothing() {
    let cluster = TestCluster::start(3, 1, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (0..40).map(|i| format!("split-{i}")).collect();
    for p in &patients {
        client.put(p, b"before", b"v").await.unwrap();
    }
    // Writers over every patient, through the split.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..4usize {
        let (client, stop, acked, patients) = (
            client.clone(),
            stop.clone(),
            acked.clone(),
            patients.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && n < 5_000 {
                let p = &patients[(n * 7 + w * 11) % patients.len()];
                let key = format!("w{w}-{n}");
                if client.put(p, key.as_bytes(), b"x").await.is_ok() {
                    acked.lock().unwrap().push((p.clone(), key));
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut admin = cluster.meta_leader_admin().await;
    let split = admin
        .split_shard(SplitShardRequest { shard_id: 1, at: 0 })
        .await
        .unwrap()
        .into_inner();
    let (left, right) = (split.left.unwrap(), split.right.unwrap());
    assert_eq!(right.shard_id, 2);
    assert_eq!((left.hash_lo, left.hash_hi), (0, right.hash_lo));
    assert!(right.hash_hi_max && !left.hash_hi_max);
    assert_eq!((left.epoch, right.epoch, right.split_from), (2, 2, 1));
    let mut sorted = right.replicas.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        vec![1, 2, 3],
        "the new shard lives on the same nodes"
    );
    // Repeating the request finishes nothing new and splits nothing again.
    let again = admin
        .split_shard(SplitShardRequest { shard_id: 1, at: 0 })
        .await;
    if let Ok(again) = again {
        // A second split of the (now smaller) shard 1 is a new split; it must not reuse id 2.
        assert_ne!(again.into_inner().right.unwrap().shard_id, 2);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Both halves hold patients, and every acknowledged write reads back.
    let map = client.refresh_map().await.unwrap();
    let owner = |p: &str| {
        let h = dossier_api::patient_hash(p);
        map.shards
            .iter()
            .find(|d| h >= d.hash_lo && (d.hash_hi_max || h < d.hash_hi))
            .unwrap()
            .shard_id
    };
    let on_right = patients.iter().filter(|p| owner(p) == 2).count();
    assert!(
        on_right > 0 && on_right < patients.len(),
        "{on_right} of 40 on the new shard"
    );
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} writes were acknowledged",
        acked.len()
    );
    for p in &patients {
        assert!(
            client.get(p, b"before").await.unwrap().is_some(),
            "{p} lost its first key"
        );
    }
    for (p, key) in &acked {
        assert!(
            client.get(p, key.as_bytes()).await.unwrap().is_some(),
            "acknowledged write {p}/{key} lost (shard {})",
            owner(p)
        );
    }
    // Every node runs the new shard's replica, and it has a leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let replicas = cluster.replicas().await;
        let on = replicas.iter().filter(|r| r.shard_id == 2).count();
        let led = replicas
            .iter()
            .any(|r| r.shard_id == 2 && r.role == "leader");
        if on == 3 && led {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shard 2: {on} replicas, led: {led}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New writes go to both shards.
    for p in &patients {
        client.put(p, b"after", b"v").await.unwrap();
        assert!(client.get(p, b"after").await.unwrap().is_some());
    }
}

/// With a small `split-shard-bytes`, a shard that grows past it splits by itself, at its middle
/// patient, and every patient still reads whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_past_its_size_splits_by_itself() {
    let cluster = TestCluster::start(3, 1, 3, &|c| c.split_shard_bytes = 64 << 10).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (0..24).map(|i| format!("grow-{i}")).collect();
    let value = vec![b'x'; 4096];
    for p in &patients {
        for k in 0..2 {
            client
                .put(p, format!("k{k}").as_bytes(), &value)
                .await
                .unwrap();
        }
    }
    // 24 patients of 8 KiB: about 3 times the threshold.
    let deadline = Instant::now() + Duration::from_secs(90);
    let map = loop {
        let map = client.refresh_map().await.unwrap();
        if map.shards.len() >= 2 {
            break map;
        }
        assert!(
            Instant::now() < deadline,
            "the shard did not split by itself"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(map.shards.iter().any(|d| d.split_from == 1), "{map:?}");
    for p in &patients {
        for k in 0..2 {
            assert_eq!(
                client
                    .get(p, format!("k{k}").as_bytes())
                    .await
                    .unwrap()
                    .as_deref(),
                Some(&value[..]),
                "{p}"
            );
        }
    }
}
