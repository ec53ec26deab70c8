//! Warm standbys: a node started with `standby` (a disaster-recovery or reporting site) receives
//! a non-voting copy of every shard, new shards of a split included; it serves stale reads of
//! acknowledged writes, sends the rest to the leader, never votes, and is removed by taking its
//! copies away.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, TestNode};
use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{
    ClusterMap, ErrorReason, GetRequest, NodeState, NodeStatusRequest, ReadConsistency,
    RemoveNodeRequest, RouteHeader, SplitShardRequest,
};

/// Reads `key` of `patient` on `node` alone, routed by the node (route shard 0).
async fn read_on(
    node: &TestNode,
    patient: &str,
    key: &str,
    consistency: ReadConsistency,
) -> Result<Option<Vec<u8>>, tonic::Status> {
    let mut kv = KvClient::connect(format!("http://{}", node.grpc))
        .await
        .unwrap();
    kv.get(GetRequest {
        route: Some(RouteHeader {
            shard_id: 0,
            epoch: 0,
            patient_id: patient.to_owned(),
        }),
        key: key.as_bytes().to_vec(),
        consistency: consistency as i32,
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        r.found.then_some(r.value)
    })
}

/// The data shards `node` holds, with their roles, by its own status.
async fn roles_on(node: &TestNode) -> Vec<(u64, String)> {
    let mut admin = AdminClient::connect(format!("http://{}", node.grpc))
        .await
        .unwrap();
    admin
        .node_status(NodeStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .shards
        .into_iter()
        .filter(|s| s.shard_id != 0)
        .map(|s| (s.shard_id, s.role))
        .collect()
}

/// Waits (up to `secs`) until `done` holds for the map.
async fn wait_map(
    client: &dossier_client::Client,
    secs: u64,
    what: &str,
    done: impl Fn(&ClusterMap) -> bool,
) -> ClusterMap {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let map = client.refresh_map().await.unwrap();
        if done(&map) {
            return map;
        }
        assert!(Instant::now() < deadline, "{what}: {map:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `node` serves every `(patient, key)` by a stale read.
async fn wait_stale_reads(node: &TestNode, written: &[(String, String)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for (p, k) in written {
        loop {
            if let Ok(Some(v)) = read_on(node, p, k, ReadConsistency::Stale).await {
                assert_eq!(v, b"v");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby never served {p}/{k}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_node_holds_every_shard_without_voting() {
    let cluster = TestCluster::start(3, 3, 3, &|c| c.placement_balance = false).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (0..24).map(|i| format!("standby-{i}")).collect();
    let mut written = Vec::new();
    for p in &patients {
        client.put(p, b"before", b"v").await.unwrap();
        written.push((p.clone(), "before".to_owned()));
    }
    let mut standby = cluster
        .join_node(4, &client, &|c| {
            c.standby = true;
            c.zone = "dr".into();
        })
        .await;
    let map = wait_map(&client, 60, "every shard gets its standby", |m| {
        m.shards.iter().all(|d| d.standbys == [4])
    })
    .await;
    let joined = map.nodes.iter().find(|n| n.node_id == 4).unwrap();
    assert!(joined.standby && joined.zone == "dr", "{joined:?}");
    for d in &map.shards {
        assert!(
            !d.replicas.contains(&4),
            "a standby is never a voter: {d:?}"
        );
    }
    // Writes after the standby was added reach it too.
    for p in &patients {
        client.put(p, b"after", b"v").await.unwrap();
        written.push((p.clone(), "after".to_owned()));
    }
    wait_stale_reads(&standby, &written).await;
    // It is a learner of every data shard, and sends linearizable reads to the leader.
    let roles = roles_on(&standby).await;
    assert_eq!(roles.len(), 3, "{roles:?}");
    assert!(roles.iter().all(|(_, r)| r == "learner"), "{roles:?}");
    let refused = read_on(
        &standby,
        &patients[0],
        "after",
        ReadConsistency::Linearizable,
    )
    .await
    .unwrap_err();
    let detail = dossier_api::error_detail(refused.details()).unwrap();
    assert_eq!(detail.reason, ErrorReason::NotLeader as i32, "{detail:?}");
    // A voter's move to a standby node is refused.
    let mut admin = cluster.meta_leader_admin().await;
    let d = &map.shards[0];
    let refused = admin
        .move_replica(dossier_api::v1::MoveReplicaRequest {
            shard_id: d.shard_id,
            from_node: d.replicas[0],
            to_node: 4,
        })
        .await
        .unwrap_err();
    assert!(refused.message().contains("standby"), "{refused:?}");

    // A split: the new shard has the standby too, built from the standby's own copy.
    let split = admin
        .split_shard(SplitShardRequest { shard_id: 1, at: 0 })
        .await
        .unwrap()
        .into_inner();
    let right = split.right.unwrap();
    assert_eq!(right.standbys, vec![4], "{right:?}");
    wait_stale_reads(&standby, &written).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !roles_on(&standby)
        .await
        .contains(&(right.shard_id, "learner".to_owned()))
    {
        assert!(
            Instant::now() < deadline,
            "no learner of the new shard on the standby"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Three voting nodes for shards of three replicas, yet the standby node may go: it holds
    // no voter. Its copies are taken away first.
    admin
        .remove_node(RemoveNodeRequest { node_id: 4 })
        .await
        .unwrap();
    let map = wait_map(&client, 60, "the standby node is removed", |m| {
        m.nodes
            .iter()
            .any(|n| n.node_id == 4 && n.state == NodeState::Removed as i32)
    })
    .await;
    assert!(map.shards.iter().all(|d| d.standbys.is_empty()), "{map:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = roles_on(&standby).await;
        if held.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 still holds {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing was lost on the voters.
    for (p, k) in &written {
        assert!(
            client.get(p, k.as_bytes()).await.unwrap().is_some(),
            "{p}/{k}"
        );
    }
    standby.stop().await;
}
