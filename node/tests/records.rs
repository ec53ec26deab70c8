//! The Records service on an in-process 3-node cluster: versions, optimistic concurrency,
//! transactions, idempotent writes, entered-in-error, and the Everything stream.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestCluster, patient_in_shard};
use dossier_api::v1::{
    CodeableConcept, Coding, DocumentContent, DocumentReference, DocumentReferenceStatus,
    Encounter, EncounterStatus, HumanName, Meta, Observation, ObservationStatus, ObservationValue,
    Patient, Quantity, RecordRef, RecordStatus, Resource, ResourceType, TransactionEntry,
    TransactionUpdate, WriteOutcome, document_content, observation_value, resource,
    transaction_entry,
};
use dossier_client::{Client, ClientError, WriteOptions, is_applied};
use dossier_records::SYSTEM_LOINC;

fn meta(id: &str) -> Option<Meta> {
    Some(Meta {
        id: id.into(),
        ..Meta::default()
    })
}

fn patient(id: &str) -> Resource {
    Resource {
        unmodelled_json: String::new(),
        meta: meta(id),
        kind: Some(resource::Kind::Patient(Patient {
            names: vec![HumanName {
                family: "Peeters".into(),
                given: vec!["An".into()],
                ..HumanName::default()
            }],
            ..Patient::default()
        })),
    }
}

fn height(id: &str, cm: &str, encounter: Option<&str>) -> Resource {
    Resource {
        unmodelled_json: String::new(),
        meta: meta(id),
        kind: Some(resource::Kind::Observation(Observation {
            status: ObservationStatus::Final as i32,
            code: Some(CodeableConcept {
                codings: vec![Coding {
                    system: SYSTEM_LOINC.into(),
                    code: "8302-2".into(),
                    display: "Body height".into(),
                }],
                text: String::new(),
            }),
            encounter: encounter.map(|e| RecordRef {
                r#type: ResourceType::Encounter as i32,
                id: e.into(),
            }),
            value: Some(ObservationValue {
                kind: Some(observation_value::Kind::Quantity(Quantity {
                    value: cm.into(),
                    unit: "cm".into(),
                    ..Quantity::default()
                })),
            }),
            ..Observation::default()
        })),
    }
}

fn encounter(id: &str) -> Resource {
    Resource {
        unmodelled_json: String::new(),
        meta: meta(id),
        kind: Some(resource::Kind::Encounter(Encounter {
            status: EncounterStatus::Finished as i32,
            encounter_class: Some(Coding {
                system: "http://terminology.hl7.org/CodeSystem/v3-ActCode".into(),
                code: "IMP".into(),
                display: "inpatient encounter".into(),
            }),
            ..Encounter::default()
        })),
    }
}

fn letter(id: &str, text: String) -> Resource {
    Resource {
        unmodelled_json: String::new(),
        meta: meta(id),
        kind: Some(resource::Kind::DocumentReference(DocumentReference {
            status: DocumentReferenceStatus::Current as i32,
            r#type: Some(CodeableConcept {
                codings: vec![],
                text: "Discharge letter".into(),
            }),
            content: Some(DocumentContent {
                content_type: "text/plain".into(),
                data: Some(document_content::Data::Text(text)),
                ..DocumentContent::default()
            }),
            ..DocumentReference::default()
        })),
    }
}

fn outcome(w: &dossier_client::RecordWrite) -> WriteOutcome {
    WriteOutcome::try_from(w.outcome).unwrap()
}

fn cm_of(r: &Resource) -> String {
    match &r.kind {
        Some(resource::Kind::Observation(o)) => {
            match o.value.as_ref().and_then(|v| v.kind.as_ref()) {
                Some(observation_value::Kind::Quantity(q)) => q.value.clone(),
                other => panic!("not a quantity: {other:?}"),
            }
        }
        other => panic!("not an observation: {other:?}"),
    }
}

async fn new_patient(client: &Client, salt: &str) -> String {
    let id = patient_in_shard(client, 1, salt);
    let w = client
        .create_patient(patient(&id), &WriteOptions::default())
        .await
        .unwrap();
    assert!(is_applied(&w), "{w:?}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_history_and_optimistic_concurrency() {
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let p = new_patient(&client, "versions").await;
    let opts = WriteOptions::default();

    // A record of an unknown patient is refused, not created.
    let w = client
        .create_record("nobody-here", height("h", "170", None), &opts)
        .await
        .unwrap();
    assert_eq!(outcome(&w), WriteOutcome::NotFound);
    assert_eq!(w.field, "route.patient_id");

    let w = client
        .create_record(&p, height("h1", "170", None), &opts)
        .await
        .unwrap();
    assert!(is_applied(&w));
    assert_eq!(w.written[0].version, 1);
    let again = client
        .create_record(&p, height("h1", "171", None), &opts)
        .await
        .unwrap();
    assert_eq!(outcome(&again), WriteOutcome::AlreadyExists);

    for (expected, cm) in [(1, "171"), (2, "172"), (3, "173")] {
        let w = client
            .update_record(&p, expected, height("h1", cm, None), &opts)
            .await
            .unwrap();
        assert!(is_applied(&w), "{w:?}");
        assert_eq!(w.written[0].version, expected + 1);
    }
    // A stale base version is a conflict that names the current one.
    let w = client
        .update_record(&p, 2, height("h1", "999", None), &opts)
        .await
        .unwrap();
    assert_eq!(outcome(&w), WriteOutcome::VersionConflict);
    assert_eq!(w.current_version, 4);
    assert_eq!(w.field, "expected_version");

    let current = client
        .read_record(&p, ResourceType::Observation, "h1")
        .await
        .unwrap()
        .unwrap();
    let m = current.meta.clone().unwrap();
    assert_eq!(
        (m.version, m.patient_id.as_str(), cm_of(&current).as_str()),
        (4, p.as_str(), "173")
    );
    assert_eq!(m.status, RecordStatus::Current as i32);
    // Every version is kept, unchanged, and stamps increase with versions.
    let history = client
        .history(&p, ResourceType::Observation, "h1", 0, 0)
        .await
        .unwrap()
        .unwrap();
    let cms: Vec<String> = history.versions.iter().map(cm_of).collect();
    assert_eq!(cms, ["173", "172", "171", "170"]);
    let stamps: Vec<i64> = history
        .versions
        .iter()
        .map(|v| v.meta.as_ref().unwrap().last_updated_micros)
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] > w[1]), "{stamps:?}");
    let page = client
        .history(&p, ResourceType::Observation, "h1", 3, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((page.versions.len(), page.more), (1, true));
    assert_eq!(page.versions[0].meta.as_ref().unwrap().version, 2);
    let v1 = client
        .read_version(&p, ResourceType::Observation, "h1", 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cm_of(&v1), "170");
    assert!(
        client
            .read_version(&p, ResourceType::Observation, "h1", 5)
            .await
            .unwrap()
            .is_none()
    );

    // Entered-in-error is a new version; nothing is erased and nothing may follow it.
    let w = client
        .delete_record(
            &p,
            ResourceType::Observation,
            "h1",
            4,
            "wrong patient",
            &opts,
        )
        .await
        .unwrap();
    assert!(is_applied(&w));
    let current = client
        .read_record(&p, ResourceType::Observation, "h1")
        .await
        .unwrap()
        .unwrap();
    let m = current.meta.unwrap();
    assert_eq!(
        (m.version, m.status),
        (5, RecordStatus::EnteredInError as i32)
    );
    assert_eq!(m.status_reason, "wrong patient");
    let w = client
        .update_record(&p, 5, height("h1", "1", None), &opts)
        .await
        .unwrap();
    assert_eq!(outcome(&w), WriteOutcome::EnteredInError);
    let history = client
        .history(&p, ResourceType::Observation, "h1", 0, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(history.versions.len(), 5);
}

/// Concurrent updates from the same base version: exactly one wins, the others get a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_of_one_version_exactly_one_wins() {
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let p = new_patient(&client, "race").await;
    let opts = WriteOptions::default();
    client
        .create_record(&p, height("h", "100", None), &opts)
        .await
        .unwrap();
    for round in 0..3u64 {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (client, p) = (client.clone(), p.clone());
                tokio::spawn(async move {
                    client
                        .update_record(
                            &p,
                            round + 1,
                            height("h", &format!("{}", 100 + round * 10 + i), None),
                            &WriteOptions::default(),
                        )
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut applied = 0;
        for t in tasks {
            let w = t.await.unwrap();
            match outcome(&w) {
                WriteOutcome::Applied => applied += 1,
                WriteOutcome::VersionConflict => assert_eq!(w.current_version, round + 2),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(applied, 1, "round {round}");
    }
    let history = client
        .history(&p, ResourceType::Observation, "h", 0, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(history.versions.len(), 4);
}

/// A transaction writes all of its entries or none; references must name records of the patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_all_or_nothing() {
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let p = new_patient(&client, "txn").await;
    let opts = WriteOptions::default();
    client
        .create_record(&p, height("old", "150", None), &opts)
        .await
        .unwrap();
    let create = |r: Resource| TransactionEntry {
        op: Some(transaction_entry::Op::Create(r)),
    };
    // An admission: the encounter, two observations referring to it, a letter, and an update.
    let admission = |base: u64| {
        vec![
            create(encounter("adm-1")),
            create(height("obs-1", "180", Some("adm-1"))),
            create(height("obs-2", "181", Some("adm-1"))),
            create(letter("letter-1", "Discharged home.".into())),
            TransactionEntry {
                op: Some(transaction_entry::Op::Update(TransactionUpdate {
                    expected_version: base,
                    resource: Some(height("old", "151", None)),
                })),
            },
        ]
    };
    // A wrong base version on the last entry: nothing of the first four is written.
    let w = client.transaction(&p, admission(7), &opts).await.unwrap();
    assert_eq!(outcome(&w), WriteOutcome::VersionConflict);
    assert_eq!(w.entry_index, 4);
    assert_eq!(w.field, "entries[4].update.expected_version");
    for (t, id) in [
        (ResourceType::Encounter, "adm-1"),
        (ResourceType::Observation, "obs-1"),
        (ResourceType::DocumentReference, "letter-1"),
    ] {
        assert!(
            client.read_record(&p, t, id).await.unwrap().is_none(),
            "{id} written"
        );
    }
    // A reference to a record that does not exist: refused, nothing written.
    let w = client
        .transaction(
            &p,
            vec![create(height("obs-9", "1", Some("no-such-encounter")))],
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(outcome(&w), WriteOutcome::ReferenceNotFound);
    assert_eq!(w.field, "entries[0].create.observation.encounter");
    assert!(
        client
            .read_record(&p, ResourceType::Observation, "obs-9")
            .await
            .unwrap()
            .is_none()
    );
    // The right base: everything, with consecutive stamps.
    let w = client.transaction(&p, admission(1), &opts).await.unwrap();
    assert!(is_applied(&w), "{w:?}");
    assert_eq!(w.written.len(), 5);
    assert!(
        w.written
            .windows(2)
            .all(|x| x[1].last_updated_micros == x[0].last_updated_micros + 1)
    );
    assert_eq!(
        cm_of(
            &client
                .read_record(&p, ResourceType::Observation, "old")
                .await
                .unwrap()
                .unwrap()
        ),
        "151"
    );
    // Bad input is INVALID_ARGUMENT naming the field.
    let mut bad = height("obs-3", "1", None);
    if let Some(resource::Kind::Observation(o)) = &mut bad.kind {
        o.code.as_mut().unwrap().codings[0].code = "8302-9".into();
    }
    match client.transaction(&p, vec![create(bad)], &opts).await {
        Err(ClientError::InvalidArgument { field, .. }) => {
            assert_eq!(field, "entries[0].create.observation.code.codings[0].code")
        }
        other => panic!("expected invalid argument, got {other:?}"),
    }
}

/// A retried write (same request id) is applied once and answers as the first attempt; the same
/// id on a different request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_make_writes_idempotent() {
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let p = new_patient(&client, "idem").await;
    let opts = WriteOptions {
        request_id: Some(client.new_request_id()),
        ..WriteOptions::default()
    };
    let first = client
        .create_record(&p, height("o", "1", None), &opts)
        .await
        .unwrap();
    assert!(is_applied(&first) && !first.replayed);
    let second = client
        .create_record(&p, height("o", "1", None), &opts)
        .await
        .unwrap();
    assert!(is_applied(&second) && second.replayed, "{second:?}");
    assert_eq!(first.written, second.written);
    match client
        .create_record(&p, height("o", "2", None), &opts)
        .await
    {
        Err(ClientError::InvalidArgument { field, .. }) => assert_eq!(field, "header.request_id"),
        other => panic!("expected invalid argument, got {other:?}"),
    }
    let history = client
        .history(&p, ResourceType::Observation, "o", 0, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(history.versions.len(), 1);
}

/// Everything streams every current record in stamp order, bounded per message, and `since`
/// returns exactly what changed after the last sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_streams_current_records_and_syncs_since() {
    let tweak = |c: &mut dossier_node::NodeConfig| c.records.message_bytes_max = 16 * 1024;
    let cluster = TestCluster::start(3, 2, 3, &tweak).await;
    let client = cluster.client().await;
    let p = new_patient(&client, "everything").await;
    let opts = WriteOptions::default();
    client
        .create_record(&p, encounter("e1"), &opts)
        .await
        .unwrap();
    for i in 0..40 {
        let w = client
            .create_record(
                &p,
                height(&format!("o{i}"), &format!("{i}"), Some("e1")),
                &opts,
            )
            .await
            .unwrap();
        assert!(is_applied(&w));
    }
    // Three letters of 10 KiB: messages are cut at 16 KiB.
    for i in 0..3 {
        client
            .create_record(&p, letter(&format!("l{i}"), "x".repeat(10 * 1024)), &opts)
            .await
            .unwrap();
    }
    client
        .update_record(&p, 1, height("o0", "500", Some("e1")), &opts)
        .await
        .unwrap();
    client
        .delete_record(&p, ResourceType::Observation, "o1", 1, "typo", &opts)
        .await
        .unwrap();

    let mut got = Vec::new();
    let mut messages = 0;
    let as_of = client
        .everything(&p, 0, &[], false, |rs| {
            messages += 1;
            got.extend(rs);
            Ok(())
        })
        .await
        .unwrap();
    // Patient, encounter, 40 observations less the one in error, 3 letters.
    assert_eq!(got.len(), 1 + 1 + 39 + 3);
    assert!(messages >= 3, "{messages} messages");
    let stamps: Vec<i64> = got
        .iter()
        .map(|r| r.meta.as_ref().unwrap().last_updated_micros)
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]));
    assert!(
        as_of >= *stamps.last().unwrap(),
        "as_of {as_of} below the last stamp"
    );
    let o0 = got
        .iter()
        .find(|r| r.meta.as_ref().unwrap().id == "o0")
        .unwrap();
    assert_eq!(cm_of(o0), "500");
    // Only observations, with the one in error.
    let mut obs = Vec::new();
    client
        .everything(&p, 0, &[ResourceType::Observation], true, |rs| {
            obs.extend(rs);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(obs.len(), 40);
    // Since the last sync: exactly the two records written after it.
    client
        .create_record(&p, height("late", "1", None), &opts)
        .await
        .unwrap();
    client
        .update_record(&p, 1, height("o5", "55", Some("e1")), &opts)
        .await
        .unwrap();
    let mut since = Vec::new();
    client
        .everything(&p, as_of, &[], false, |rs| {
            since.extend(rs);
            Ok(())
        })
        .await
        .unwrap();
    let ids: Vec<&str> = since
        .iter()
        .map(|r| r.meta.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(ids, ["late", "o5"]);
    // A type named twice is refused.
    let twice = client
        .everything(
            &p,
            0,
            &[ResourceType::Observation, ResourceType::Observation],
            false,
            |_| Ok(()),
        )
        .await;
    assert!(
        matches!(twice, Err(ClientError::InvalidArgument { ref field, .. }) if field == "types[1]"),
        "{twice:?}"
    );
}

/// Transactions under a leader kill: each one is found whole or not at all, and every one the
/// client saw applied is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_cut_by_a_leader_kill_leaves_all_or_nothing() {
    let mut cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let p = new_patient(&client, "kill-txn").await;
    let create = |r: Resource| TransactionEntry {
        op: Some(transaction_entry::Op::Create(r)),
    };
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (client, p, progress) = (client.clone(), p.clone(), progress.clone());
        tokio::spawn(async move {
            let mut applied = Vec::new();
            for i in 0..60 {
                progress.store(i, std::sync::atomic::Ordering::Relaxed);
                let entries = vec![
                    create(encounter(&format!("e{i}"))),
                    create(height(&format!("a{i}"), "1", Some(&format!("e{i}")))),
                    create(height(&format!("b{i}"), "2", Some(&format!("e{i}")))),
                    create(letter(&format!("l{i}"), format!("letter {i}"))),
                ];
                let opts = WriteOptions {
                    deadline: Some(Duration::from_secs(10)),
                    ..WriteOptions::default()
                };
                if let Ok(w) = client.transaction(&p, entries, &opts).await {
                    assert!(is_applied(&w), "{w:?}");
                    applied.push(i);
                }
            }
            applied
        })
    };
    // Kill the leader once the writer is well under way, so that transactions are in flight.
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 15 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let leader = cluster.leader_of(1).await.unwrap();
    let index = cluster.node_index(leader);
    cluster.nodes[index].kill();
    let killed_at = progress.load(std::sync::atomic::Ordering::Relaxed);
    let applied = writer.await.unwrap();
    assert!(killed_at < 59, "the writer finished before the kill");
    eprintln!(
        "killed at transaction {killed_at}; {} of 60 applied",
        applied.len()
    );
    assert!(
        applied.len() >= 30,
        "only {} transactions applied",
        applied.len()
    );
    for i in 0..60 {
        let mut present = 0;
        for (t, id) in [
            (ResourceType::Encounter, format!("e{i}")),
            (ResourceType::Observation, format!("a{i}")),
            (ResourceType::Observation, format!("b{i}")),
            (ResourceType::DocumentReference, format!("l{i}")),
        ] {
            present += usize::from(client.read_record(&p, t, &id).await.unwrap().is_some());
        }
        assert!(
            present == 0 || present == 4,
            "transaction {i}: {present} of 4 records"
        );
        if applied.contains(&i) {
            assert_eq!(present, 4, "acknowledged transaction {i} lost");
        }
    }
}
