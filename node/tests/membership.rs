//! Nodes join a running cluster (`join`): they enter the map with their zone, hold the map as
//! learners of the meta group, and a conflicting join is refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, TestNode};
use dossier_api::v1::{ClusterMapRequest, ErrorReason, JoinClusterRequest, NodeInfo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_running_cluster() {
    let cluster = TestCluster::start(3, 4, 3, &|_| {}).await;
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
