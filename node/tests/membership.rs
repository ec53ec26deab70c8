//! Nodes join a running cluster (`join`): they enter the map with their zone, hold the map as
//! learners of the meta group, and a conflicting join is refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, TestNode};
use dossier_api::v1::{ClusterMapRequest, ErrorReason, JoinClusterRequest, NodeInfo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_running_cluster() {
    let cluster = TestCluster::start(3, 4, 3, &|c| c.placement_balance = false).await;
    let seed = cluster.nodes[0].grpc.clone();
    let name = cluster.nodes[0].config.cluster_name.clone();
    let data = cluster.dir.path().join("n4");
    // A node of another cluster is refused, naming the cluster it asked to join.
    let mut stranger = TestNode::new(5, cluster.dir.path().join("n5"), &|c| {
        c.join = vec![seed.clone()];
        c.cluster_name = "elsewhere".into();
    });
    let refused = join_cluster(&cluster, &stranger).await.unwrap_err();
    assert!(refused.contains("elsewhere"), "{refused}");
    stranger.kill();
    let mut joiner = TestNode::new(4, data, &|c| {
        c.join = vec![seed.clone()];
        c.zone = "dc-b".into();
        c.cluster_name = name.clone();
    });
    joiner.start();
    // The map gains node 4 with its zone, and node 4 serves the map itself (it is a meta
    // learner that received it).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = async {
            let mut admin = dossier_api::v1::admin_client::AdminClient::connect(format!(
                "http://{}",
                joiner.grpc
            ))
            .await
            .ok()?;
            admin
                .get_cluster_map(ClusterMapRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        }
        .await;
        if let Some(map) = answer
            && let Some(me) = map.nodes.iter().find(|n| n.node_id == 4)
        {
            assert_eq!(me.zone, "dc-b");
            assert_eq!(me.address, joiner.grpc);
            assert_eq!(map.nodes.len(), 4);
            assert!(
                map.shards.iter().all(|d| !d.replicas.contains(&4)),
                "joining places no replica by itself"
            );
            break;
        }
        if Instant::now() > deadline {
            let map = cluster.client().await.refresh_map().await.unwrap();
            let mut admin = dossier_api::v1::admin_client::AdminClient::connect(format!(
                "http://{}",
                joiner.grpc
            ))
            .await
            .unwrap();
            let status = admin
                .node_status(dossier_api::v1::NodeStatusRequest::default())
                .await;
            panic!(
                "node 4 did not join within 30 s: map nodes {:?}; node 4 status {status:?}",
                map.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every member sees it too, and the cluster still serves.
    let client = cluster.client().await;
    let map = client.refresh_map().await.unwrap();
    assert!(map.nodes.iter().any(|n| n.node_id == 4));
    client.put("p-join", b"k", b"v").await.unwrap();
    // Joining again (a restart) changes nothing; another node under id 4 is refused, naming it.
    let version = map.version;
    joiner.stop().await;
    joiner.start();
    let admin = cluster.admin(0).await;
    let again = NodeInfo {
        node_id: 4,
        address: joiner.grpc.clone(),
        zone: "dc-b".into(),
        ..NodeInfo::default()
    };
    let mut leader_admin = None;
    for i in 0..3 {
        let mut a = cluster.admin(i).await;
        if a.join_cluster(JoinClusterRequest {
            node: Some(again.clone()),
            cluster_name: name.clone(),
        })
        .await
        .is_ok()
        {
            leader_admin = Some(a);
            break;
        }
    }
    let mut leader_admin = leader_admin.expect("the meta leader accepts a repeated join");
    assert_eq!(
        client.refresh_map().await.unwrap().version,
        version,
        "a repeated join does not change the map"
    );
    let status = leader_admin
        .join_cluster(JoinClusterRequest {
            node: Some(NodeInfo {
                address: "127.0.0.1:1".into(),
                ..again.clone()
            }),
            cluster_name: name.clone(),
        })
        .await
        .unwrap_err();
    let detail = dossier_api::error_detail(status.details()).unwrap();
    assert_eq!(detail.reason, ErrorReason::InvalidArgument as i32);
    assert!(
        detail.message.contains("already in the cluster"),
        "{detail:?}"
    );
    drop(admin);
    joiner.stop().await;
}

/// A join request as `stranger` would send it, to the meta leader (tried on every member).
async fn join_cluster(cluster: &TestCluster, node: &TestNode) -> Result<(), String> {
    let mut last = String::new();
    for i in 0..cluster.nodes.len() {
        let mut admin = cluster.admin(i).await;
        let request = JoinClusterRequest {
            node: Some(NodeInfo {
                node_id: node.id,
                address: node.grpc.clone(),
                ..NodeInfo::default()
            }),
            cluster_name: node.config.cluster_name.clone(),
        };
        match admin.join_cluster(request).await {
            Ok(_) => return Ok(()),
            Err(status) => {
                let detail = dossier_api::error_detail(status.details()).unwrap();
                if detail.reason == ErrorReason::InvalidArgument as i32 {
                    return Err(detail.message);
                }
                last = detail.message;
            }
        }
    }
    Err(last)
}

/// A shard's replica moves from its leader's node to a node that just joined, while writers
/// keep writing to it: no acknowledged write is lost, the map names the new replica with a new
/// epoch, the new node serves the data, and the old node drops its replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moves_to_a_joined_node_under_writes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let cluster = TestCluster::start(3, 2, 3, &|c| c.placement_balance = false).await;
    let client = cluster.client().await;
    let mut joiner = cluster.join_node(4, &client, &|_| {}).await;
    let patients: Vec<String> = (0..4)
        .map(|i| common::patient_in_shard(&client, 1, &format!("move{i}")))
        .collect();
    for p in &patients {
        for k in 0..50 {
            client
                .put(p, format!("before-{k}").as_bytes(), b"v")
                .await
                .unwrap();
        }
    }
    // Writers run through the whole move.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = patients
        .iter()
        .cloned()
        .map(|p| {
            let (client, stop) = (client.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("during-{n}");
                    if client.put(&p, key.as_bytes(), b"v").await.is_ok() {
                        acked.push(key);
                    }
                }
                (p, acked)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Move the replica on the shard's leader: the leader hands over first.
    let from = cluster.leader_of(1).await.unwrap();
    let mut admin = cluster.meta_leader_admin().await;
    let moved = admin
        .move_replica(dossier_api::v1::MoveReplicaRequest {
            shard_id: 1,
            from_node: from,
            to_node: 4,
        })
        .await
        .unwrap()
        .into_inner()
        .shard
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = 0;
    for w in writers {
        let (p, acked) = w.await.unwrap();
        for key in &acked {
            assert_eq!(
                client.get(&p, key.as_bytes()).await.unwrap().as_deref(),
                Some(&b"v"[..]),
                "{p}/{key} acknowledged during the move, then lost"
            );
        }
        during += acked.len();
    }
    assert!(during > 0, "writes went on during the move");
    assert!(
        moved.replicas.contains(&4) && !moved.replicas.contains(&from),
        "{moved:?}"
    );
    assert_eq!(moved.epoch, 2);
    assert!(moved.learners.is_empty());
    for p in &patients {
        for k in 0..50 {
            assert!(
                client
                    .get(p, format!("before-{k}").as_bytes())
                    .await
                    .unwrap()
                    .is_some()
            );
        }
    }
    // The new node holds the data (a stale read served by it alone), the old one drops it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let replicas = cluster.replicas().await;
        let on_old = replicas
            .iter()
            .any(|r| r.shard_id == 1 && r.node_id == from);
        if !on_old {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {from} kept its replica of shard 1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut kv = dossier_api::v1::kv_client::KvClient::connect(format!("http://{}", joiner.grpc))
        .await
        .unwrap();
    let got = kv
        .get(dossier_api::v1::GetRequest {
            route: Some(dossier_api::v1::RouteHeader {
                patient_id: patients[0].clone(),
                ..Default::default()
            }),
            key: b"before-7".to_vec(),
            consistency: dossier_api::v1::ReadConsistency::Stale as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found, "node 4 serves the moved shard's data");
    // Moving it again is a no-op answer; moving from a node without a replica is refused.
    let again = admin
        .move_replica(dossier_api::v1::MoveReplicaRequest {
            shard_id: 1,
            from_node: from,
            to_node: 4,
        })
        .await
        .unwrap()
        .into_inner()
        .shard
        .unwrap();
    assert_eq!(again.epoch, 2);
    let refused = admin
        .move_replica(dossier_api::v1::MoveReplicaRequest {
            shard_id: 1,
            from_node: from,
            to_node: 4 + 100,
        })
        .await
        .unwrap_err();
    assert_eq!(
        dossier_api::error_detail(refused.details()).unwrap().reason,
        ErrorReason::InvalidArgument as i32
    );
    joiner.stop().await;
}

/// A node is removed from a 4-node cluster: refused while only 3 nodes are up, then, with a
/// fourth joined, its replicas move to the others, its meta vote goes to the new node, and it
/// ends removed, holding nothing; no acknowledged write is lost and the cluster keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_hands_everything_over() {
    let cluster = TestCluster::start(3, 3, 3, &|c| c.placement_balance = false).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (1..=3)
        .map(|s| common::patient_in_shard(&client, s, "remove"))
        .collect();
    for p in &patients {
        for k in 0..20 {
            client
                .put(p, format!("k{k}").as_bytes(), b"v")
                .await
                .unwrap();
        }
    }
    // Three nodes for shards of three replicas: removing one is refused.
    let mut admin = cluster.meta_leader_admin().await;
    let refused = admin
        .remove_node(dossier_api::v1::RemoveNodeRequest { node_id: 3 })
        .await
        .unwrap_err();
    let detail = dossier_api::error_detail(refused.details()).unwrap();
    assert!(detail.message.contains("add a node first"), "{detail:?}");

    let mut joiner = cluster.join_node(4, &client, &|_| {}).await;
    // Remove node 1 (a meta voter, holding a replica of every shard).
    let mut admin = cluster.meta_leader_admin().await;
    admin
        .remove_node(dossier_api::v1::RemoveNodeRequest { node_id: 1 })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let map = loop {
        let map = client.refresh_map().await.unwrap();
        let state = map.nodes.iter().find(|n| n.node_id == 1).unwrap().state;
        if state == dossier_api::v1::NodeState::Removed as i32 {
            break map;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 was not removed within 90 s: {:?}",
            map
        );
        // Writes go on meanwhile.
        client.put(&patients[0], b"during", b"v").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for d in &map.shards {
        assert!(!d.replicas.contains(&1) && d.learners.is_empty(), "{d:?}");
        assert!(d.replicas.contains(&4), "node 4 took node 1's place: {d:?}");
    }
    for p in &patients {
        for k in 0..20 {
            assert!(
                client
                    .get(p, format!("k{k}").as_bytes())
                    .await
                    .unwrap()
                    .is_some()
            );
        }
    }
    assert!(client.get(&patients[0], b"during").await.unwrap().is_some());
    // Node 1 ends holding no shard replica, and the meta group has node 4's vote instead.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let replicas = cluster.replicas().await;
        let on_1: Vec<u64> = replicas
            .iter()
            .filter(|r| r.node_id == 1 && r.shard_id != 0)
            .map(|r| r.shard_id)
            .collect();
        if on_1.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 still holds {on_1:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut status =
        dossier_api::v1::admin_client::AdminClient::connect(format!("http://{}", joiner.grpc))
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let meta_on_4 = status
            .node_status(dossier_api::v1::NodeStatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .shards
            .into_iter()
            .find(|s| s.shard_id == 0)
            .unwrap();
        if meta_on_4.role != "learner" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never got a meta group vote"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The removed node no longer hands out the map, which stopped changing there.
    let mut on_1 = dossier_api::v1::admin_client::AdminClient::connect(format!(
        "http://{}",
        cluster.nodes[0].grpc
    ))
    .await
    .unwrap();
    let refused = on_1
        .get_cluster_map(dossier_api::v1::ClusterMapRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Removing it again is refused.
    let mut admin = cluster.meta_leader_admin().await;
    assert!(
        admin
            .remove_node(dossier_api::v1::RemoveNodeRequest { node_id: 1 })
            .await
            .is_err()
    );
    joiner.stop().await;
}

/// With placement balancing on, a node that joins a 3-node cluster of 6 shards takes its share
/// by itself while writers write: replica counts end within one of each other, the new node is
/// some shards' preferred leader and leads them, and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_takes_its_share_by_itself() {
    let cluster = TestCluster::start(3, 6, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (1..=6)
        .map(|s| common::patient_in_shard(&client, s, "share"))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop, patients) = (client.clone(), stop.clone(), patients.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                let p = patients[n % patients.len()].clone();
                let key = format!("k{n}");
                if client.put(&p, key.as_bytes(), b"v").await.is_ok() {
                    acked.push((p, key));
                }
                n += 1;
            }
            acked
        })
    };
    let name = cluster.nodes[0].config.cluster_name.clone();
    let seeds = cluster.seeds();
    let mut joiner = TestNode::new(4, cluster.dir.path().join("n4"), &|c| {
        c.join = seeds.clone();
        c.cluster_name = name.clone();
    });
    joiner.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let map = client.refresh_map().await.unwrap();
        let count = |n: u64| {
            map.shards
                .iter()
                .filter(|d| d.replicas.contains(&n))
                .count()
        };
        let counts: Vec<usize> = (1..=4).map(count).collect();
        let preferred_4 = map.shards.iter().filter(|d| d.replicas[0] == 4).count();
        let settled = map.shards.iter().all(|d| d.learners.is_empty());
        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
        if settled && spread <= 1 && preferred_4 >= 1 && cluster_leads(&joiner).await >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 did not take its share: replicas {counts:?}, preferred {preferred_4}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    for (p, key) in &acked {
        assert!(
            client.get(p, key.as_bytes()).await.unwrap().is_some(),
            "acknowledged write {p}/{key} lost"
        );
    }
    joiner.stop().await;
}

/// Shards the node leads, by its own status.
async fn cluster_leads(node: &TestNode) -> usize {
    let Ok(mut admin) =
        dossier_api::v1::admin_client::AdminClient::connect(format!("http://{}", node.grpc)).await
    else {
        return 0;
    };
    admin
        .node_status(dossier_api::v1::NodeStatusRequest::default())
        .await
        .map(|s| {
            s.into_inner()
                .shards
                .iter()
                .filter(|s| s.shard_id != 0 && s.role == "leader")
                .count()
        })
        .unwrap_or(0)
}

/// A node that died (its disk lost) is removed without it: its replicas are rebuilt on the
/// other nodes from their leaders, its meta vote goes to another node, and it ends removed;
/// every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_removed_and_its_replicas_rebuilt_elsewhere() {
    let mut cluster = TestCluster::start(3, 3, 3, &|c| c.placement_balance = false).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (1..=3)
        .map(|s| common::patient_in_shard(&client, s, "dead"))
        .collect();
    for p in &patients {
        for k in 0..10 {
            client
                .put(p, format!("k{k}").as_bytes(), b"v")
                .await
                .unwrap();
        }
    }
    let mut joiner = cluster
        .join_node(4, &client, &|c| c.placement_balance = false)
        .await;
    // Node 3 dies for good.
    let index = cluster.node_index(3);
    cluster.nodes[index].kill();
    let mut admin = cluster.meta_leader_admin().await;
    admin
        .remove_node(dossier_api::v1::RemoveNodeRequest { node_id: 3 })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let map = loop {
        let map = client.refresh_map().await.unwrap();
        if map.nodes.iter().find(|n| n.node_id == 3).unwrap().state
            == dossier_api::v1::NodeState::Removed as i32
        {
            break map;
        }
        assert!(Instant::now() < deadline, "node 3 was not removed: {map:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for d in &map.shards {
        assert!(!d.replicas.contains(&3) && d.replicas.contains(&4), "{d:?}");
    }
    for p in &patients {
        for k in 0..10 {
            assert!(
                client
                    .get(p, format!("k{k}").as_bytes())
                    .await
                    .unwrap()
                    .is_some()
            );
        }
        client.put(p, b"after", b"v").await.unwrap();
    }
    joiner.stop().await;
}

/// A move whose driver stops half-way (here the request is cancelled after the map listed the
/// learner) is finished by the meta leader's placement driver, even with balancing off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_move_is_finished_by_the_placement_driver() {
    let cluster = TestCluster::start(3, 2, 3, &|c| c.placement_balance = false).await;
    let client = cluster.client().await;
    let patient = common::patient_in_shard(&client, 1, "abandoned");
    client.put(&patient, b"k", b"v").await.unwrap();
    let mut joiner = cluster
        .join_node(4, &client, &|c| c.placement_balance = false)
        .await;
    let from = client.refresh_map().await.unwrap().shards[0].replicas[2];
    let mut abandoned = false;
    for timeout_ms in [5u64, 10, 20, 40, 80, 160] {
        let mut admin = cluster.meta_leader_admin().await;
        let mut request = tonic::Request::new(dossier_api::v1::MoveReplicaRequest {
            shard_id: 1,
            from_node: from,
            to_node: 4,
        });
        request.set_timeout(Duration::from_millis(timeout_ms));
        let _ = admin.move_replica(request).await;
        let map = client.refresh_map().await.unwrap();
        let d = map.shards.iter().find(|d| d.shard_id == 1).unwrap();
        if d.replicas.contains(&4) {
            break; // finished within the timeout: nothing was abandoned this time
        }
        if d.learners == vec![4] {
            assert_eq!(d.moving_from, from);
            abandoned = true;
            break;
        }
    }
    eprintln!("abandoned half-way: {abandoned}");
    // Abandoned or not, the move ends finished.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let map = client.refresh_map().await.unwrap();
        let d = map.shards.iter().find(|d| d.shard_id == 1).unwrap();
        if d.replicas.contains(&4) && !d.replicas.contains(&from) && d.learners.is_empty() {
            assert_eq!(d.moving_from, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the move was left half-way (abandoned: {abandoned}): {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        client.get(&patient, b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    joiner.stop().await;
}
