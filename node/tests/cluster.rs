//! In-process 3-node clusters on loopback (real tonic, real storage), each test stating its
//! property.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, patient_in_shard};
use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{
    BatchRequest, BundleAnswer, BundleItem, BundleRequest, Condition, ErrorReason, GetRequest,
    Operation, PutRequest, ReadConsistency, RouteHeader, SessionHeader, bundle_answer, bundle_item,
    condition, operation,
};
use dossier_client::ClientError;
use prost::Message;

fn reason(status: &tonic::Status) -> ErrorReason {
    let detail =
        dossier_api::error_detail(status.details()).expect("every error carries an ErrorDetail");
    ErrorReason::try_from(detail.reason).unwrap()
}

/// Writes are replicated to every replica and read back linearizably; a stale read on any
/// replica eventually sees them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_linearizable_reads() {
    let cluster = TestCluster::start(3, 4, 3, &|_| {}).await;
    let client = cluster.client().await;
    for i in 0..40 {
        client
            .put(
                &format!("p-{i}"),
                b"name",
                format!("patient {i}").as_bytes(),
            )
            .await
            .unwrap();
    }
    for i in 0..40 {
        let got = client.get(&format!("p-{i}"), b"name").await.unwrap();
        assert_eq!(got.as_deref(), Some(format!("patient {i}").as_bytes()));
    }
    // Every replica of every shard reaches the same applied index.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let replicas = cluster.replicas().await;
        let lagging = (1..=4).any(|s| {
            let applied: Vec<u64> = replicas
                .iter()
                .filter(|r| r.shard_id == s)
                .map(|r| r.applied_index)
                .collect();
            applied.len() != 3 || applied.iter().min() != applied.iter().max()
        });
        if !lagging {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: {replicas:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A stale read served by each node directly sees the data.
    let patient = "p-7";
    for node in &cluster.nodes {
        let mut kv = KvClient::connect(format!("http://{}", node.grpc))
            .await
            .unwrap();
        let route = RouteHeader {
            patient_id: patient.into(),
            ..RouteHeader::default()
        };
        let request = GetRequest {
            route: Some(route),
            key: b"name".to_vec(),
            consistency: ReadConsistency::Stale as i32,
        };
        match kv.get(request).await {
            Ok(r) => assert_eq!(r.into_inner().value, b"patient 7"),
            // A node without a replica of this patient's shard says where it lives.
            Err(s) => {
                assert_eq!(reason(&s), ErrorReason::ShardNotFound);
                let shard = dossier_api::error_detail(s.details()).unwrap().shard;
                assert!(shard.is_some(), "the descriptor to route with");
            }
        }
    }
}

/// When a shard's leader is dropped abruptly, another replica takes over and no acknowledged
/// write is lost; writes resume within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_loses_no_acknowledged_write() {
    let mut cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 1, "kill");
    let mut acked = Vec::new();
    for i in 0..50 {
        client
            .put(&patient, format!("k{i}").as_bytes(), b"v")
            .await
            .unwrap();
        acked.push(i);
    }
    let leader = cluster.leader_of(1).await.unwrap();
    let index = cluster.node_index(leader);
    cluster.nodes[index].kill();
    let killed = Instant::now();
    // Keep writing through the failover: every write either succeeds or is retried by the client.
    for i in 50..80 {
        client
            .put(&patient, format!("k{i}").as_bytes(), b"v")
            .await
            .unwrap();
        acked.push(i);
    }
    assert!(
        killed.elapsed() < Duration::from_secs(14),
        "failover took {:?}",
        killed.elapsed()
    );
    let new_leader = cluster.leader_of(1).await.unwrap();
    assert_ne!(new_leader, leader);
    for i in acked {
        let got = client
            .get(&patient, format!("k{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&b"v"[..]),
            "acknowledged write k{i} lost"
        );
    }
}

/// A node that is down while the shard snapshots and purges its log catches up by snapshot
/// when it returns, and then holds every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_behind_the_purge_point_catches_up_by_snapshot() {
    let tweak = |c: &mut dossier_node::NodeConfig| {
        c.raft.snapshot_after_entries = 50;
        c.raft.log_entries_kept_after_snapshot = 5;
    };
    let mut cluster = TestCluster::start(3, 1, 3, &tweak).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 1, "snap");
    client.put(&patient, b"before", b"1").await.unwrap();
    let (down, index) = cluster.stop_a_follower_of(1).await;
    for i in 0..300 {
        client
            .put(&patient, format!("k{i:03}").as_bytes(), b"x")
            .await
            .unwrap();
    }
    // The leader compacts in the background: the node returns once the leader's log is purged
    // past what it missed, so that only a snapshot can bring it back (on a loaded machine the
    // compaction may lag the writes).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let purged = cluster
            .replicas()
            .await
            .iter()
            .filter(|r| r.shard_id == 1 && r.role == "leader")
            .map(|r| r.purged_index)
            .max();
        if purged.is_some_and(|p| p >= 250) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader did not purge its log: {purged:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.nodes[index].start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let replicas = cluster.replicas().await;
        let mine = replicas
            .iter()
            .find(|r| r.shard_id == 1 && r.node_id == down)
            .map(|r| r.applied_index);
        let best = replicas
            .iter()
            .filter(|r| r.shard_id == 1)
            .map(|r| r.applied_index)
            .max();
        if mine.is_some() && mine == best {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {down} did not catch up: {replicas:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The returning node's own replica holds the data (a stale read served by it).
    let mut kv = KvClient::connect(format!("http://{}", cluster.nodes[index].grpc))
        .await
        .unwrap();
    let route = RouteHeader {
        patient_id: patient.clone(),
        ..RouteHeader::default()
    };
    let got = kv
        .get(GetRequest {
            route: Some(route),
            key: b"k299".to_vec(),
            consistency: ReadConsistency::Stale as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"x");
    // It got there by a snapshot: its log starts past everything written while it was down.
    let mine = cluster
        .replicas()
        .await
        .into_iter()
        .find(|r| r.shard_id == 1 && r.node_id == down)
        .unwrap();
    assert!(
        mine.snapshot_index >= 250 && mine.purged_index >= 250,
        "the returning node installed a snapshot: {mine:?}"
    );
    let leftovers = std::fs::read_dir(
        cluster.nodes[index]
            .config
            .data_dir
            .join("snapshots/shard-1"),
    )
    .unwrap()
    .count();
    assert_eq!(leftovers, 0, "snapshot files are removed once installed");
}

/// A request routed with a stale epoch or to the wrong shard is answered with the fresh
/// descriptor; the client library then routes correctly by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_routes_are_corrected() {
    let cluster = TestCluster::start(3, 4, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 2, "route");
    let mut kv = KvClient::connect(format!("http://{}", cluster.nodes[0].grpc))
        .await
        .unwrap();
    let stale = RouteHeader {
        shard_id: 3,
        epoch: 1,
        patient_id: patient.clone(),
    };
    let request = PutRequest {
        route: Some(stale),
        session: None,
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    let status = kv.put(request).await.unwrap_err();
    assert_eq!(reason(&status), ErrorReason::StaleEpoch);
    let detail = dossier_api::error_detail(status.details()).unwrap();
    assert_eq!(detail.shard.unwrap().shard_id, 2);
    // The details are the standard error model every gRPC library reads: a google.rpc.Status of
    // the same code, the ErrorDetail packed as an Any, and the shard as a ResourceInfo.
    let rpc = dossier_api::google::rpc::Status::decode(status.details()).unwrap();
    assert_eq!(rpc.code, tonic::Code::FailedPrecondition as i32);
    assert_eq!(rpc.code, status.code() as i32);
    let urls: Vec<&str> = rpc.details.iter().map(|a| a.type_url.as_str()).collect();
    assert_eq!(
        urls,
        [
            "type.googleapis.com/dossier.v1.ErrorDetail",
            "type.googleapis.com/google.rpc.ResourceInfo"
        ]
    );
    // An invalid field also comes as a google.rpc.BadRequest naming it.
    let bad = PutRequest {
        route: Some(RouteHeader {
            shard_id: 0,
            epoch: 0,
            patient_id: "a/b".into(),
        }),
        session: None,
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    let status = kv.put(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let rpc = dossier_api::google::rpc::Status::decode(status.details()).unwrap();
    let any = rpc
        .details
        .iter()
        .find(|a| a.type_url == "type.googleapis.com/google.rpc.BadRequest")
        .expect("a BadRequest detail");
    let bad_request = dossier_api::google::rpc::BadRequest::decode(any.value.as_slice()).unwrap();
    assert_eq!(bad_request.field_violations[0].field, "route.patient_id");
    client.put(&patient, b"k", b"v").await.unwrap();
    assert_eq!(
        client.get(&patient, b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

/// A request retried with the same session and sequence number is applied once: the retry gets
/// the first outcome and log index even though re-executing it would now fail its condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_request_applies_once() {
    let cluster = TestCluster::start(3, 1, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 1, "dup");
    let request = || BatchRequest {
        route: Some(RouteHeader {
            patient_id: patient.clone(),
            ..RouteHeader::default()
        }),
        session: Some(SessionHeader {
            client_session: 77,
            sequence: 1,
        }),
        conditions: vec![Condition {
            key: b"order-1".to_vec(),
            expect: condition::Expect::Absent as i32,
            value: vec![],
        }],
        operations: vec![Operation {
            op: Some(operation::Op::Put(operation::Put {
                key: b"order-1".to_vec(),
                value: b"amoxicillin 500mg".to_vec(),
            })),
        }],
    };
    let first = batch_at_leader(&cluster, request()).await.unwrap();
    let retry = batch_at_leader(&cluster, request()).await.unwrap();
    assert!(
        first.applied && retry.applied,
        "the retry returns the first outcome"
    );
    assert_eq!(
        retry.index, first.index,
        "the retry answers the first write's log index, not its own entry's"
    );
    let stored = client.get(&patient, b"order-1").await.unwrap();
    assert_eq!(stored.as_deref(), Some(&b"amoxicillin 500mg"[..]));
    // A new sequence number is a new request: now the condition fails.
    let mut again = request();
    again.session = Some(SessionHeader {
        client_session: 77,
        sequence: 2,
    });
    assert!(!batch_at_leader(&cluster, again).await.unwrap().applied);
    // An older sequence number is refused.
    let status = batch_at_leader(&cluster, request()).await.unwrap_err();
    assert_eq!(reason(&status), ErrorReason::Session);
}

/// Bad input gets the right machine-readable reason, naming the field and limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors() {
    let cluster = TestCluster::start(3, 2, 3, &|c| {
        c.state.value_bytes_max = 1024;
        c.records.document_bytes_max = 512;
    })
    .await;
    let client = cluster.client().await;
    match client.put("p-1", b"k", &vec![0u8; 2048]).await {
        Err(ClientError::InvalidArgument { field, limit, .. }) => {
            assert_eq!(field, "value");
            assert_eq!(limit, Some(1024));
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    match client.put("", b"k", b"v").await {
        Err(ClientError::InvalidArgument { field, .. }) => assert_eq!(field, "route.patient_id"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    match client.put("p/1", b"k", b"v").await {
        Err(ClientError::InvalidArgument { field, .. }) => assert_eq!(field, "route.patient_id"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    match client.put(&"x".repeat(500), b"k", b"v").await {
        Err(ClientError::InvalidArgument { field, limit, .. }) => {
            assert_eq!((field.as_str(), limit), ("route.patient_id", Some(64)))
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // An expired deadline: the client gives up with a timeout, never hangs.
    let started = Instant::now();
    let r = client
        .put_with("p-2", b"k", b"v", Duration::from_nanos(1))
        .await;
    assert!(matches!(r, Err(ClientError::Timeout { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // A raw request for a shard id the node has no replica of names the shard it should use.
    let mut kv = KvClient::connect(format!("http://{}", cluster.nodes[0].grpc))
        .await
        .unwrap();
    let route = RouteHeader {
        shard_id: 99,
        epoch: 1,
        patient_id: "p-3".into(),
    };
    let status = kv
        .get(GetRequest {
            route: Some(route),
            key: b"k".to_vec(),
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), ErrorReason::ShardNotFound);
    assert_eq!(status.code(), tonic::Code::NotFound);
    let detail = dossier_api::error_detail(status.details()).unwrap();
    let shard = detail
        .shard
        .expect("the patient's descriptor to route with");
    let hash = dossier_api::patient_hash("p-3");
    assert!(hash >= shard.hash_lo && (shard.hash_hi_max || hash < shard.hash_hi));
    let status = kv
        .get(GetRequest {
            route: None,
            key: b"k".to_vec(),
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), ErrorReason::InvalidArgument);
}

/// Concurrent writes to one shard are proposed to Raft in batches; each writer must still get the
/// answer of its own entry. 24 writers race a compare-and-set from absent on one key, 5 rounds:
/// exactly one is told it applied, and the key holds that writer's value. Concurrent puts on
/// distinct keys each get their own log index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_proposals_answer_each_writer() {
    let cluster = TestCluster::start(3, 1, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 1, "batch");
    for round in 0..5 {
        let key = format!("race-{round}").into_bytes();
        let mut writers = Vec::new();
        for w in 0..24u32 {
            let (client, patient, key) = (client.clone(), patient.clone(), key.clone());
            writers.push(tokio::spawn(async move {
                let value = format!("writer-{w}").into_bytes();
                let result = client
                    .compare_and_set(&patient, &key, None, &value, Duration::from_secs(10))
                    .await
                    .unwrap();
                (value, result)
            }));
        }
        let mut winners = Vec::new();
        for writer in writers {
            let (value, result) = writer.await.unwrap();
            if result.applied {
                winners.push(value);
            } else {
                assert_eq!(
                    result.failed_condition,
                    Some(0),
                    "a loser names the condition"
                );
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one applied");
        let stored = client.get(&patient, &key).await.unwrap();
        assert_eq!(stored.as_deref(), Some(&winners[0][..]), "round {round}");
    }
    let mut writers = Vec::new();
    for w in 0..48u32 {
        let (client, patient) = (client.clone(), patient.clone());
        writers.push(tokio::spawn(async move {
            client
                .put(&patient, format!("k-{w}").as_bytes(), b"v")
                .await
                .unwrap()
                .index
        }));
    }
    let mut indexes = Vec::new();
    for writer in writers {
        indexes.push(writer.await.unwrap());
    }
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(
        indexes.len(),
        48,
        "each put answered with its own log index"
    );
}

/// A Kv client connected to the current leader of `shard`.
async fn kv_of_leader(cluster: &TestCluster, shard: u64) -> KvClient<tonic::transport::Channel> {
    let leader = cluster.leader_of(shard).await.unwrap();
    let node = &cluster.nodes[cluster.node_index(leader)];
    KvClient::connect(format!("http://{}", node.grpc))
        .await
        .unwrap()
}

/// `request` sent to shard 1's leader, again to the new one if leadership moved meanwhile (a
/// busy machine can delay heartbeats past an election timeout).
async fn batch_at_leader(
    cluster: &TestCluster,
    request: BatchRequest,
) -> Result<dossier_api::v1::WriteResponse, tonic::Status> {
    for _ in 0..50 {
        let mut kv = kv_of_leader(cluster, 1).await;
        match kv.batch(request.clone()).await {
            Err(status) if reason(&status) == ErrorReason::NotLeader => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer.map(tonic::Response::into_inner),
        }
    }
    panic!("shard 1 kept changing leaders");
}

/// Every answer of a bundle, in item order; each item answered exactly once.
async fn answers_of(
    kv: &mut KvClient<tonic::transport::Channel>,
    request: BundleRequest,
) -> Vec<BundleAnswer> {
    let items = request.items.len();
    let mut stream = kv.bundle(request).await.unwrap().into_inner();
    let mut answers: Vec<Option<BundleAnswer>> = vec![None; items];
    while let Some(batch) = stream.message().await.unwrap() {
        assert!(!batch.answers.is_empty(), "no empty answer message");
        for answer in batch.answers {
            let slot = &mut answers[answer.item as usize];
            assert!(slot.is_none(), "item {} answered twice", answer.item);
            *slot = Some(answer);
        }
    }
    answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.unwrap_or_else(|| panic!("item {i} never answered")))
        .collect()
}

/// A bundle's items are served as if each were sent alone: every item gets exactly one answer,
/// marked with its index, with its own result or typed error; one bad item spoils nothing else; a bundle above
/// `limits.bundle-items-max` is refused whole. Through the client, which coalesces by default,
/// concurrent reads of distinct keys each get their own value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_answer_each_item_as_if_sent_alone() {
    let cluster = TestCluster::start(3, 1, 3, &|c| c.limits.bundle_items_max = 64).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 1, "bundle");
    client.put(&patient, b"warm", b"up").await.unwrap();
    let route = || {
        Some(RouteHeader {
            shard_id: 0,
            epoch: 0,
            patient_id: patient.clone(),
        })
    };
    let put = |i: u64| {
        bundle_item::Request::Put(PutRequest {
            route: route(),
            session: Some(SessionHeader {
                client_session: 0xb0_0000 + i,
                sequence: 1,
            }),
            key: format!("key-{i}").into_bytes(),
            value: format!("value-{i}").into_bytes(),
        })
    };
    let get = |key: Vec<u8>| {
        bundle_item::Request::Get(GetRequest {
            route: route(),
            key,
            consistency: ReadConsistency::Linearizable as i32,
        })
    };
    let bundle = |items: Vec<bundle_item::Request>| BundleRequest {
        items: items
            .into_iter()
            .map(|r| BundleItem {
                request: Some(r),
                timeout_micros: 0,
            })
            .collect(),
    };
    let field = |answer: &Option<bundle_answer::Answer>| match answer {
        Some(bundle_answer::Answer::Error(e)) => {
            let d = e.detail.as_ref().unwrap();
            assert_eq!(d.reason, ErrorReason::InvalidArgument as i32, "{e:?}");
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
            d.field.clone()
        }
        other => panic!("expected an error answer, got {other:?}"),
    };

    // 40 puts with three bad items among them, sent to the leader (again if it moved).
    let mut items: Vec<bundle_item::Request> = (0..40).map(put).collect();
    let mut empty_key = put(100);
    if let bundle_item::Request::Put(p) = &mut empty_key {
        p.key.clear();
    }
    items.insert(7, empty_key);
    items.insert(20, get(b"k".to_vec()));
    if let bundle_item::Request::Get(g) = &mut items[20] {
        g.route = None;
    }
    let mut request = bundle(items);
    request.items.insert(
        30,
        BundleItem {
            request: None,
            timeout_micros: 0,
        },
    );
    let answers = loop {
        let mut kv = kv_of_leader(&cluster, 1).await;
        let answers = answers_of(&mut kv, request.clone()).await;
        let moved = answers.iter().any(|a| {
            matches!(&a.answer, Some(bundle_answer::Answer::Error(e))
                if e.detail.as_ref().unwrap().reason == ErrorReason::NotLeader as i32)
        });
        if !moved {
            break answers;
        }
    };
    assert_eq!(answers.len(), 43, "one answer per item");
    assert_eq!(field(&answers[7].answer), "key");
    assert_eq!(field(&answers[20].answer), "route");
    assert_eq!(field(&answers[30].answer), "items.request");
    let mut indexes = Vec::new();
    for (i, answer) in answers.iter().enumerate() {
        if [7, 20, 30].contains(&i) {
            continue;
        }
        match &answer.answer {
            Some(bundle_answer::Answer::Write(w)) => {
                assert!(w.applied, "item {i}: {w:?}");
                indexes.push(w.index);
            }
            other => panic!("item {i}: expected a write answer, got {other:?}"),
        }
    }
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(indexes.len(), 40, "each put committed as its own entry");

    // Reads back: answer i is the value of key i, wherever the bundle went.
    let mut kv = kv_of_leader(&cluster, 1).await;
    let reads = bundle(
        (0..40)
            .rev()
            .map(|i| get(format!("key-{i}").into_bytes()))
            .collect(),
    );
    let answers = answers_of(&mut kv, reads).await;
    for (answer, i) in answers.iter().zip((0..40).rev()) {
        match &answer.answer {
            Some(bundle_answer::Answer::Get(g)) => {
                assert!(g.found, "key-{i}");
                assert_eq!(g.value, format!("value-{i}").into_bytes());
            }
            other => panic!("key-{i}: expected a read answer, got {other:?}"),
        }
    }

    // Above the limit: refused whole, naming the field and the limit.
    let status = kv
        .bundle(bundle((0..65).map(|_| get(b"k".to_vec())).collect()))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), ErrorReason::InvalidArgument);
    let detail = dossier_api::error_detail(status.details()).unwrap();
    assert_eq!((detail.field.as_str(), detail.limit), ("items", 64));

    // Through the client: 64 concurrent readers, each expecting its own key's value.
    let mut readers = Vec::new();
    for i in 0..64u64 {
        let (client, patient) = (client.clone(), patient.clone());
        readers.push(tokio::spawn(async move {
            let key = format!("key-{}", i % 40);
            let value = client.get(&patient, key.as_bytes()).await.unwrap();
            (i % 40, value)
        }));
    }
    for reader in readers {
        let (i, value) = reader.await.unwrap();
        assert_eq!(value.as_deref(), Some(format!("value-{i}").as_bytes()));
    }
}

/// A bundle answers each item as it completes: a stale read bundled behind a write that cannot
/// commit (its leader has lost both followers) is answered at once, not when the write gives up;
/// the write ends at its own deadline, not the bundle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundled_read_does_not_wait_for_a_stuck_write() {
    let mut cluster = TestCluster::start(3, 1, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patient = patient_in_shard(&client, 1, "stuck");
    client.put(&patient, b"k", b"v").await.unwrap();
    let leader = cluster.leader_of(1).await.unwrap();
    let leader_index = cluster.node_index(leader);
    for (i, node) in cluster.nodes.iter_mut().enumerate() {
        if i != leader_index {
            node.kill();
        }
    }
    let route = Some(RouteHeader {
        shard_id: 0,
        epoch: 0,
        patient_id: patient.clone(),
    });
    let items = vec![
        bundle_item::Request::Put(PutRequest {
            route: route.clone(),
            session: Some(SessionHeader {
                client_session: 0x57_0c4,
                sequence: 1,
            }),
            key: b"k".to_vec(),
            value: b"never".to_vec(),
        }),
        bundle_item::Request::Get(GetRequest {
            route,
            key: b"k".to_vec(),
            consistency: ReadConsistency::Stale as i32,
        }),
    ];
    // The write has 1 s of its own; the bundle, 3 s.
    let mut request = tonic::Request::new(BundleRequest {
        items: items
            .into_iter()
            .zip([1_000_000, 0])
            .map(|(r, timeout_micros)| BundleItem {
                request: Some(r),
                timeout_micros,
            })
            .collect(),
    });
    request.set_timeout(Duration::from_secs(3));
    let mut kv = KvClient::connect(format!("http://{}", cluster.nodes[leader_index].grpc))
        .await
        .unwrap();
    let sent = Instant::now();
    let mut stream = kv.bundle(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let items: Vec<u32> = first.answers.iter().map(|a| a.item).collect();
    assert_eq!(items, vec![1], "the read comes first, alone");
    match &first.answers[0].answer {
        Some(bundle_answer::Answer::Get(g)) => assert_eq!(g.value, b"v"),
        other => panic!("expected the read's value, got {other:?}"),
    }
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(second.answers.len(), 1);
    assert_eq!(second.answers[0].item, 0);
    match &second.answers[0].answer {
        Some(bundle_answer::Answer::Error(e)) => assert_eq!(
            e.detail.as_ref().unwrap().reason,
            ErrorReason::Deadline as i32,
            "the write cannot commit and ends at its own deadline: {e:?}"
        ),
        other => panic!("expected the write's error, got {other:?}"),
    }
    // Its own 1 s, not the bundle's 3 s (wide margin for a loaded machine).
    assert!(
        sent.elapsed() < Duration::from_millis(2_500),
        "the write's answer came after {:?}",
        sent.elapsed()
    );
    assert!(
        stream.message().await.unwrap().is_none(),
        "then the bundle ends"
    );
}

/// A Raft message addressed to another cluster or another node is refused before it reaches a
/// replica (an address reused by another node must not take its predecessor's traffic); one
/// that names neither is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misaddressed_raft_messages_are_refused() {
    use dossier_api::raft::v1::RaftMessage;
    use dossier_api::raft::v1::raft_client::RaftClient;
    let cluster = TestCluster::start(3, 1, 3, &|_| {}).await;
    let node = &cluster.nodes[0];
    let mut raft = RaftClient::connect(format!("http://{}", node.grpc))
        .await
        .unwrap();
    let message = |cluster: Option<&str>, to: Option<&str>| {
        let mut request = tonic::Request::new(RaftMessage {
            shard_id: 1,
            payload: b"not a vote".to_vec(),
        });
        if let Some(c) = cluster {
            request
                .metadata_mut()
                .insert("x-dossier-cluster", c.parse().unwrap());
        }
        if let Some(t) = to {
            request
                .metadata_mut()
                .insert("x-dossier-to", t.parse().unwrap());
        }
        request
    };
    let own = node.config.cluster_name.clone();
    let own_id = node.id.to_string();
    for (cluster_name, to) in [
        (Some("another"), Some(own_id.as_str())),
        (Some(own.as_str()), Some("99")),
    ] {
        let status = raft.vote(message(cluster_name, to)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    }
    // Rightly addressed, or not addressed: it reaches the replica, which finds no vote in it.
    for (cluster_name, to) in [(Some(own.as_str()), Some(own_id.as_str())), (None, None)] {
        let status = raft.vote(message(cluster_name, to)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
}

/// The replication-stream counters, summed over `cluster`'s running nodes (one /metrics page
/// read per node).
#[derive(Debug, Clone, Copy)]
struct StreamCounts {
    opened: u64,
    sessions: u64,
    failed: u64,
}

impl StreamCounts {
    async fn of(cluster: &TestCluster) -> StreamCounts {
        let mut sum = [0u64; 3];
        for node in cluster.nodes.iter().filter(|n| n.is_running()) {
            for (total, name) in sum.iter_mut().zip([
                "dossier_raft_append_streams_opened_total",
                "dossier_raft_append_sessions_total",
                "dossier_raft_append_session_failures_total",
            ]) {
                *total += common::metric(node, name).await as u64;
            }
        }
        let [opened, sessions, failed] = sum;
        StreamCounts {
            opened,
            sessions,
            failed,
        }
    }

    /// The counts now, and what they grow by over the next `span`.
    async fn over(cluster: &TestCluster, span: Duration) -> (StreamCounts, StreamCounts) {
        let before = StreamCounts::of(cluster).await;
        tokio::time::sleep(span).await;
        let after = StreamCounts::of(cluster).await;
        let grown = StreamCounts {
            opened: after.opened - before.opened,
            sessions: after.sessions - before.sessions,
            failed: after.failed - before.failed,
        };
        (before, grown)
    }
}

async fn put_many(client: &dossier_client::Client, patients: &[String], round: u32) {
    let mut writers = Vec::new();
    for (i, patient) in patients.iter().enumerate() {
        let (client, patient) = (client.clone(), patient.clone());
        writers.push(tokio::spawn(async move {
            for n in 0..20 {
                let key = format!("k-{round}-{i}-{n}").into_bytes();
                client.put(&patient, &key, b"v").await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
}

/// Leaders replicate over one stream per peer, every group's sessions (replication runs and
/// heartbeats) multiplexed on it. Heartbeats are sessions too, about 25 a second per group and
/// follower: they must neither open streams nor fail while the groups are idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_streams_carry_every_session_and_stay_open_while_idle() {
    let cluster = TestCluster::start(3, 3, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (1..=3)
        .flat_map(|shard| (0..4).map(move |salt| (shard, format!("stream-{salt}"))))
        .map(|(shard, salt)| patient_in_shard(&client, shard, &salt))
        .collect();
    put_many(&client, &patients, 0).await;
    // Commit indexes reach the followers, then every group is idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, idle) = StreamCounts::over(&cluster, Duration::from_secs(2)).await;
    let (opened, idle_opened, idle_sessions, idle_failed) =
        (before.opened, idle.opened, idle.sessions, idle.failed);
    // 3 nodes, each with at most 2 peers; a stream broken while the cluster formed is reopened.
    assert!(
        (2..=12).contains(&opened),
        "{opened} replication streams opened for 3 nodes"
    );
    eprintln!(
        "streams opened {opened}, idle: {idle_sessions} sessions, {idle_failed} failed, {idle_opened} streams opened"
    );
    // 4 groups (3 shards and the directory) x 2 followers x 2 s of heartbeats: hundreds of
    // sessions on the streams already open.
    assert!(
        idle_sessions >= 100,
        "{idle_sessions} sessions while idle: heartbeats go through the streams"
    );
    assert_eq!(idle_opened, 0, "no stream opened while idle");
    assert!(
        idle_failed < 3,
        "{idle_failed} of {idle_sessions} sessions failed while idle"
    );
    // Writes after the idle time are replicated as before.
    put_many(&client, &patients, 1).await;
}

/// A stopped peer: the graceful stop is not held up by the replication streams peers keep open
/// to it; while it is down, the other nodes redial it at a bounded rate instead of failing
/// sessions in a loop (each heartbeat is a session); once it is back it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_is_redialled_at_a_bounded_rate() {
    let mut cluster = TestCluster::start(3, 3, 3, &|_| {}).await;
    let client = cluster.client().await;
    let patients: Vec<String> = (1..=3)
        .map(|shard| patient_in_shard(&client, shard, "down"))
        .collect();
    put_many(&client, &patients, 0).await;
    let stopping = Instant::now();
    cluster.nodes[2].stop().await;
    let stop_took = stopping.elapsed();
    assert!(
        stop_took < Duration::from_secs(8),
        "graceful stop took {stop_took:?}"
    );
    let (_, down) = StreamCounts::over(&cluster, Duration::from_secs(2)).await;
    let (down_opened, down_failed) = (down.opened, down.failed);
    eprintln!(
        "stop took {stop_took:?}; peer down 2 s: {down_opened} streams opened, {down_failed} sessions failed"
    );
    // 2 nodes redial at most every 100 ms: 40 in 2 s. Heartbeats (4 groups, 25 a second each)
    // fail at once in between: a few hundred. Failing sessions in a loop made hundreds of
    // thousands.
    assert!(
        down_opened <= 50,
        "{down_opened} streams opened to a stopped peer in 2 s"
    );
    assert!(down_failed < 2_000, "{down_failed} sessions failed in 2 s");
    // The other two replicas still commit.
    put_many(&client, &patients, 1).await;
    cluster.nodes[2].start();
    put_many(&client, &patients, 2).await;
    // The restarted node catches up: every replica applies the last write.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let replicas = cluster.replicas().await;
        let lagging: Vec<_> = replicas
            .iter()
            .filter(|s| s.node_id == 3)
            .filter(|s| {
                let leader = replicas
                    .iter()
                    .filter(|l| l.shard_id == s.shard_id && l.role == "leader")
                    .max_by_key(|l| l.term);
                leader.is_none_or(|l| s.applied_index < l.commit_index)
            })
            .collect();
        if lagging.is_empty() && replicas.iter().any(|s| s.node_id == 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 did not catch up: {lagging:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
