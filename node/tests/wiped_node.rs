//! A node whose disk was replaced (its data folder empty) comes back under its old id and
//! address and rebuilds every replica it is assigned from its peers, while the cluster serves.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, patient_in_shard};
use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{GetRequest, ReadConsistency, RouteHeader};

/// Puts keys `k{i}` for `range` into every patient, one writer per patient.
async fn write(client: &dossier_client::Client, patients: &[String], range: std::ops::Range<u32>) {
    let writers: Vec<_> = patients
        .iter()
        .map(|p| {
            let (client, p, range) = (client.clone(), p.clone(), range.clone());
            tokio::spawn(async move {
                for i in range {
                    client
                        .put(&p, format!("k{i}").as_bytes(), b"v")
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}

/// 3 nodes, 4 shards whose logs are purged as they go (a snapshot every 50 entries, purges of 256 entries and more): node 3 is
/// killed, its data folder removed, and it is started again under its id and address while
/// writes go on. It learns the map from its peers, receives every shard by snapshot (its logs
/// start past the purge point), and then serves the data from its own replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_rebuilds_its_replicas_from_its_peers() {
    let tweak = |c: &mut dossier_node::NodeConfig| {
        c.raft.snapshot_after_entries = 50;
        c.raft.log_entries_kept_after_snapshot = 5;
    };
    let mut cluster = TestCluster::start(3, 4, 3, &tweak).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (1..=4)
        .map(|shard| patient_in_shard(&client, shard, "wiped"))
        .collect();
    write(&client, &patients, 0..400).await;
    let wiped = 3;
    let index = cluster.node_index(wiped);
    cluster.nodes[index].kill();
    std::fs::remove_dir_all(&cluster.nodes[index].config.data_dir).unwrap();
    cluster.nodes[index].start();
    // The cluster keeps serving meanwhile.
    write(&client, &patients, 400..500).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replicas = cluster.replicas().await;
        let rebuilt = (0..=4).all(|shard| {
            let best = replicas
                .iter()
                .filter(|r| r.shard_id == shard)
                .map(|r| r.applied_index)
                .max();
            let mine = replicas
                .iter()
                .find(|r| r.shard_id == shard && r.node_id == wiped)
                .map(|r| r.applied_index);
            mine.is_some() && mine == best
        });
        if rebuilt {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {wiped} did not rebuild: {:?}",
            replicas
                .iter()
                .filter(|r| r.node_id == wiped)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = cluster.replicas().await;
    for r in &all {
        if r.node_id == wiped && r.shard_id != 0 {
            assert!(
                r.purged_index > 0 && r.snapshot_index >= r.purged_index,
                "shard {} was rebuilt by snapshot: {all:?}",
                r.shard_id
            );
        }
    }
    // Its own replicas hold the data: stale reads served by node 3 alone.
    let mut kv = KvClient::connect(format!("http://{}", cluster.nodes[index].grpc))
        .await
        .unwrap();
    for p in &patients {
        let got = kv
            .get(GetRequest {
                route: Some(RouteHeader {
                    patient_id: p.clone(),
                    ..RouteHeader::default()
                }),
                key: b"k499".to_vec(),
                consistency: ReadConsistency::Stale as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.value, b"v", "patient {p}");
    }
}
