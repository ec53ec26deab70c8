//! The real binaries: three `dossier-node` processes on loopback, `init`, writes, `kill -9` of a
//! shard leader under writes, and every acknowledged write read back afterwards.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;
use common::process::{Proc, ProcCluster};
use dossier_client::{Client, ClientConfig};

/// SIGKILL of a shard leader while writes flow loses no acknowledged write, and the shard serves
/// again within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_leader_loses_no_acknowledged_write() {
    let mut cluster = ProcCluster::start(3, 2, "").await;
    let client = cluster.client(Duration::from_millis(700)).await;
    let mut acked = Vec::new();
    for i in 0..100u32 {
        client
            .put(
                &format!("patient-{}", i % 10),
                format!("obs/{i:04}").as_bytes(),
                &i.to_le_bytes(),
            )
            .await
            .unwrap();
        acked.push(i);
    }
    // Kill -9 shard 1's leader.
    let leader = cluster.leader_of(1).await;
    cluster.kill(leader);
    for i in 100..160u32 {
        client
            .put(
                &format!("patient-{}", i % 10),
                format!("obs/{i:04}").as_bytes(),
                &i.to_le_bytes(),
            )
            .await
            .unwrap();
        acked.push(i);
    }
    for i in acked {
        let got = client
            .get(
                &format!("patient-{}", i % 10),
                format!("obs/{i:04}").as_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&i.to_le_bytes()[..]),
            "acknowledged write {i} lost"
        );
    }
}

/// Everything of a patient with 10,000 records (about 40 MB) through a real `dossier-node`:
/// the node's peak resident memory grows by far less than the patient while the stream is read
/// slowly, because the server holds one page of the stamp index per kind and at most two
/// messages of `records.message-bytes-max` (1 MiB) in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_of_a_10000_record_patient_stays_within_a_memory_bound() {
    use dossier_api::v1::{
        Annotation, CodeableConcept, Coding, HumanName, Meta, Observation, ObservationStatus,
        ObservationValue, Patient, Resource, TransactionEntry, observation_value, resource,
        transaction_entry,
    };
    use dossier_client::{WriteOptions, is_applied};
    use dossier_records::SYSTEM_LOINC;

    let dir = tempfile::tempdir().unwrap();
    let grpc = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    // A single node that initialises itself (the embedded default).
    let node = Proc::new(
        Command::new(env!("CARGO_BIN_EXE_dossier-node"))
            .args(["--node-id", "1", "--listen", &grpc, "--http-listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--data-dir")
            .arg(dir.path().join("node"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let pid = node.id();
    let mut config = ClientConfig::new(vec![grpc.clone()]);
    config.deadline = Duration::from_secs(30);
    let started = Instant::now();
    let client = loop {
        match Client::connect(config.clone()).await {
            Ok(c) if c.cluster_map().is_some_and(|m| !m.shards.is_empty()) => break c,
            _ if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("the node did not come up: {other:?}"),
        }
    };
    let patient = Resource {
        unmodelled_json: String::new(),
        meta: Some(Meta {
            id: "big".into(),
            ..Meta::default()
        }),
        kind: Some(resource::Kind::Patient(Patient {
            names: vec![HumanName {
                family: "Groot".into(),
                ..HumanName::default()
            }],
            ..Patient::default()
        })),
    };
    let opts = WriteOptions::default();
    assert!(is_applied(
        &client.create_patient(patient, &opts).await.unwrap()
    ));
    let note = "n".repeat(4000);
    for chunk in 0..79 {
        let entries: Vec<TransactionEntry> = (0..128)
            .map(|i| chunk * 128 + i)
            .filter(|n| *n < 10_000)
            .map(|n| TransactionEntry {
                op: Some(transaction_entry::Op::Create(Resource {
                    unmodelled_json: String::new(),
                    meta: Some(Meta {
                        id: format!("o{n}"),
                        ..Meta::default()
                    }),
                    kind: Some(resource::Kind::Observation(Observation {
                        status: ObservationStatus::Final as i32,
                        code: Some(CodeableConcept {
                            codings: vec![Coding {
                                system: SYSTEM_LOINC.into(),
                                code: "8867-4".into(),
                                display: "Heart rate".into(),
                            }],
                            text: String::new(),
                        }),
                        value: Some(ObservationValue {
                            kind: Some(observation_value::Kind::Quantity(
                                dossier_api::v1::Quantity {
                                    value: format!("{}", 50 + n % 50),
                                    unit: "/min".into(),
                                    ..Default::default()
                                },
                            )),
                        }),
                        notes: vec![Annotation {
                            text: note.clone(),
                            ..Annotation::default()
                        }],
                        ..Observation::default()
                    })),
                })),
            })
            .collect();
        let w = client.transaction("big", entries, &opts).await.unwrap();
        assert!(is_applied(&w), "{w:?}");
    }
    let peak = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    // The writes reach sled at the state store's next flushes (every 200 ms): let them, so that
    // the flushes' growth is not counted as the stream's.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = peak();
    let (mut records, mut bytes) = (0usize, 0usize);
    for _ in 0..2 {
        records = 0;
        client
            .everything("big", 0, &[], false, |rs| {
                records += rs.len();
                bytes += rs.iter().map(prost::Message::encoded_len).sum::<usize>();
                // A slow reader: the server must wait, not buffer.
                std::thread::sleep(Duration::from_millis(2));
                Ok(())
            })
            .await
            .unwrap();
    }
    let growth = peak().saturating_sub(before);
    assert_eq!(records, 10_001);
    assert!(bytes > 2 * 40_000_000, "{bytes} bytes streamed");
    // The peak also moves with sled's page cache and the allocator's retained pages: 0 to 26
    // MiB over 28 runs here (up to 36 MiB before the writes were left to flush first). Holding
    // the patient would add its 39 MiB on top.
    assert!(
        growth < 32 << 20,
        "peak resident memory grew by {} MiB while streaming a patient of {} MiB",
        growth >> 20,
        (bytes / 2) >> 20
    );
    eprintln!(
        "streamed {} MiB twice; the node's peak resident memory grew by {} MiB",
        (bytes / 2) >> 20,
        growth >> 20
    );
}
