//! The master patient index on an in-process 3-node cluster: no two patients hold the same
//! identifier, under concurrent creates from several coordinators, retries and a node kill.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestCluster, patient_with_insz as patient};
use dossier_api::v1::{ResourceType, WriteOutcome, resource};
use dossier_client::{ClientError, WriteOptions, is_applied};
use dossier_records::SYSTEM_INSZ;

/// A valid INSZ number from nine digits.
fn insz(first9: u64) -> String {
    dossier_records::insz_with_check(first9, false)
}

fn outcome(w: &dossier_client::RecordWrite) -> WriteOutcome {
    WriteOutcome::try_from(w.outcome).unwrap()
}

/// Patients created at once with the same identifier, on different shards (so coordinated by
/// different leaders): exactly one is created, the others are told who holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_identifier_create_one_patient() {
    let cluster = TestCluster::start(3, 3, 3, &|_| {}).await;
    let client = cluster.client().await;
    for round in 0..4u64 {
        let number = insz(850_730_000 + round);
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let (client, number) = (client.clone(), number.clone());
                tokio::spawn(async move {
                    let id = format!("r{round}-p{i}");
                    let w = client
                        .create_patient(patient(&id, &[&number]), &WriteOptions::default())
                        .await
                        .unwrap();
                    (id, w)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut holders = Vec::new();
        for t in tasks {
            let (id, w) = t.await.unwrap();
            match outcome(&w) {
                WriteOutcome::Applied => winners.push(id),
                WriteOutcome::IdentifierHeld => {
                    assert_eq!(w.field, "resource.patient.identifiers[0]");
                    holders.push(w.holder_patient_id.clone());
                }
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert!(
            holders.iter().all(|h| *h == winners[0]),
            "{holders:?} vs {winners:?}"
        );
        assert_eq!(
            client
                .lookup_identifier(SYSTEM_INSZ, &number)
                .await
                .unwrap(),
            Some(winners[0].clone())
        );
    }
}

/// Removing an identifier (by update, or by marking the patient entered-in-error) frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_identifiers_are_released() {
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let opts = WriteOptions::default();
    let (a, b) = (insz(850_730_001), insz(900_101_002));
    assert!(is_applied(
        &client
            .create_patient(patient("pa", &[&a, &b]), &opts)
            .await
            .unwrap()
    ));
    assert_eq!(
        client
            .lookup_identifier(SYSTEM_INSZ, &a)
            .await
            .unwrap()
            .as_deref(),
        Some("pa")
    );
    let w = client
        .create_patient(patient("pb", &[&b]), &opts)
        .await
        .unwrap();
    assert_eq!(
        (outcome(&w), w.holder_patient_id.as_str()),
        (WriteOutcome::IdentifierHeld, "pa")
    );
    // pa gives up b: pb may now take it.
    let w = client
        .update_record("pa", 1, patient("pa", &[&a]), &opts)
        .await
        .unwrap();
    assert!(is_applied(&w), "{w:?}");
    assert_eq!(
        client.lookup_identifier(SYSTEM_INSZ, &b).await.unwrap(),
        None
    );
    assert!(is_applied(
        &client
            .create_patient(patient("pb", &[&b]), &opts)
            .await
            .unwrap()
    ));
    assert_eq!(
        client
            .lookup_identifier(SYSTEM_INSZ, &b)
            .await
            .unwrap()
            .as_deref(),
        Some("pb")
    );
    // pa recorded by mistake: its identifier is free again.
    let w = client
        .delete_record(
            "pa",
            ResourceType::Patient,
            "pa",
            2,
            "duplicate registration",
            &opts,
        )
        .await
        .unwrap();
    assert!(is_applied(&w), "{w:?}");
    assert_eq!(
        client.lookup_identifier(SYSTEM_INSZ, &a).await.unwrap(),
        None
    );
    assert!(is_applied(
        &client
            .create_patient(patient("pc", &[&a]), &opts)
            .await
            .unwrap()
    ));
    // Unindexed systems and bad numbers are refused clearly.
    match client.lookup_identifier("urn:other", "1").await {
        Err(ClientError::InvalidArgument { field, .. }) => assert_eq!(field, "system"),
        other => panic!("{other:?}"),
    }
    match client
        .create_patient(patient("pd", &["85073003329"]), &opts)
        .await
    {
        Err(ClientError::InvalidArgument { field, .. }) => {
            assert_eq!(field, "resource.patient.identifiers[0].value")
        }
        other => panic!("{other:?}"),
    }
}

/// Concurrent creates competing for identifiers while a node is killed: every identifier is
/// held by at most one patient, and the index names that patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_stay_unique_through_a_node_kill() {
    let mut cluster = TestCluster::start(3, 3, 3, &|_| {}).await;
    let client = cluster.client().await;
    let numbers: Vec<String> = (0..5).map(|i| insz(700_000_000 + i)).collect();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let (client, numbers, progress) = (client.clone(), numbers.clone(), progress.clone());
            tokio::spawn(async move {
                let mut created = Vec::new();
                for i in 0..12usize {
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let id = format!("w{w}-{i}");
                    let number = &numbers[(i + w) % numbers.len()];
                    let opts = WriteOptions {
                        deadline: Some(Duration::from_secs(10)),
                        ..WriteOptions::default()
                    };
                    // An undecided create (deadline) is fine: the check below reads the truth.
                    if let Ok(w) = client.create_patient(patient(&id, &[number]), &opts).await
                        && is_applied(&w)
                    {
                        created.push((id, number.clone()));
                    }
                }
                created
            })
        })
        .collect();
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 10 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let victim = cluster.leader_of(1).await.unwrap();
    let index = cluster.node_index(victim);
    cluster.nodes[index].kill();
    let mut created = Vec::new();
    for t in tasks {
        created.extend(t.await.unwrap());
    }
    // Every patient that exists, with the identifiers its current version holds.
    let mut holders: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for w in 0..4 {
        for i in 0..12 {
            let id = format!("w{w}-{i}");
            if let Some(r) = client
                .read_record(&id, ResourceType::Patient, &id)
                .await
                .unwrap()
                && let Some(resource::Kind::Patient(p)) = r.kind
            {
                for ident in p.identifiers {
                    holders.entry(ident.value).or_default().push(id.clone());
                }
            }
        }
    }
    for (number, patients) in &holders {
        assert_eq!(
            patients.len(),
            1,
            "identifier {number} held by {patients:?}"
        );
        assert_eq!(
            client
                .lookup_identifier(SYSTEM_INSZ, number)
                .await
                .unwrap()
                .as_ref(),
            Some(&patients[0])
        );
    }
    for (id, number) in &created {
        assert_eq!(
            holders.get(number),
            Some(&vec![id.clone()]),
            "acknowledged create {id} lost"
        );
    }
    assert!(!created.is_empty());
    eprintln!(
        "{} creates acknowledged, {} identifiers held, node {victim} killed",
        created.len(),
        holders.len()
    );
}

/// An import refused because one of its identifiers was held gives back the other it claimed;
/// once the holder lets go, the same import (same derived request id) goes through. Before
/// claim tokens were drawn per attempt, the give-back fenced the request's own token and every
/// later attempt of it failed with CLAIM_REVOKED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_import_succeeds_with_the_same_request_id_once_the_holder_lets_go() {
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let (x1, x2) = (insz(850_730_301), insz(850_730_302));
    let w = client
        .create_patient(patient("holder", &[&x2]), &WriteOptions::default())
        .await
        .unwrap();
    assert!(is_applied(&w), "{w:?}");
    let import = WriteOptions {
        request_id: Some([0x5a; 16]),
        ..WriteOptions::default()
    };
    let w = client
        .create_patient(patient("imported", &[&x1, &x2]), &import)
        .await
        .unwrap();
    assert_eq!(outcome(&w), WriteOutcome::IdentifierHeld);
    assert_eq!(w.holder_patient_id, "holder");
    assert_eq!(
        client.lookup_identifier(SYSTEM_INSZ, &x1).await.unwrap(),
        None
    );
    // The holder is marked entered-in-error: it gives its number up.
    let w = client
        .delete_record(
            "holder",
            ResourceType::Patient,
            "holder",
            1,
            "duplicate registration",
            &WriteOptions::default(),
        )
        .await
        .unwrap();
    assert!(is_applied(&w), "{w:?}");
    // The import again, same request id: applied, holding both numbers.
    let w = client
        .create_patient(patient("imported", &[&x1, &x2]), &import)
        .await
        .unwrap();
    assert_eq!(outcome(&w), WriteOutcome::Applied, "{w:?}");
    for x in [&x1, &x2] {
        assert_eq!(
            client
                .lookup_identifier(SYSTEM_INSZ, x)
                .await
                .unwrap()
                .as_deref(),
            Some("imported")
        );
    }
}

/// Concurrent updates of one patient that add the same identifiers revoke each other's pending
/// claims at once; the losers try again with new tokens, so exactly one update applies and the
/// others are told the version moved (never CLAIM_REVOKED, never ALREADY_EXISTS). Concurrent
/// attempts of one create (a client's retry racing its first attempt) both answer APPLIED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_patient_settle_on_one_winner() {
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    for round in 0..3u64 {
        let id = format!("same-{round}");
        let (x, y) = (insz(850_730_200 + 2 * round), insz(850_730_201 + 2 * round));
        // One create sent twice at once under one request id.
        let opts = WriteOptions {
            request_id: Some([round as u8 + 1; 16]),
            ..WriteOptions::default()
        };
        let creates: Vec<_> = (0..2)
            .map(|_| {
                let (client, id, opts) = (client.clone(), id.clone(), opts.clone());
                tokio::spawn(async move {
                    client
                        .create_patient(patient(&id, &[]), &opts)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in creates {
            let w = t.await.unwrap();
            assert_eq!(outcome(&w), WriteOutcome::Applied, "{w:?}");
        }
        // Four updates of version 1, each adding both numbers.
        let updates: Vec<_> = (0..4)
            .map(|_| {
                let (client, id, x, y) = (client.clone(), id.clone(), x.clone(), y.clone());
                tokio::spawn(async move {
                    client
                        .update_record(&id, 1, patient(&id, &[&x, &y]), &WriteOptions::default())
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in updates {
            outcomes.push(outcome(&t.await.unwrap()));
        }
        let applied = outcomes
            .iter()
            .filter(|o| **o == WriteOutcome::Applied)
            .count();
        assert_eq!(applied, 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, WriteOutcome::Applied | WriteOutcome::VersionConflict)),
            "round {round}: {outcomes:?}"
        );
        for n in [&x, &y] {
            assert_eq!(
                client
                    .lookup_identifier(SYSTEM_INSZ, n)
                    .await
                    .unwrap()
                    .as_deref(),
                Some(id.as_str())
            );
        }
    }
}
