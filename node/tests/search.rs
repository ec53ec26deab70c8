//! Search within a patient and the quarantine, on an in-process 3-node cluster: every search
//! result matches its query and comes newest first while the patient is being written, and once
//! writes stop, paged search returns exactly what a brute-force scan of the patient finds.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{TestCluster, patient_in_shard};
use dossier_api::v1::{
    CodeableConcept, Coding, DatePrecision, DateTime, Meta, Observation, ObservationStatus,
    ObservationValue, Patient, QuarantineProblem, QuarantinedRecord, RecordStatus, Resource,
    ResourceType, WriteOutcome, observation, observation_value, resource,
};
use dossier_client::{Client, SearchQuery, WriteOptions, is_applied};

/// The two tests run one after the other: the first loads its cluster with writers and a
/// reader, and a second cluster starting beside it on a 2-core machine could miss its init
/// deadline.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const CODES: [&str; 4] = ["2339-0", "8302-2", "29463-7", "8867-4"];
const STATUSES: [ObservationStatus; 3] = [
    ObservationStatus::Final,
    ObservationStatus::Preliminary,
    ObservationStatus::Amended,
];
const DAY: i64 = 86_400_000_000;
const EPOCH_2015: i64 = 1_420_070_400_000_000;

fn status_code(s: ObservationStatus) -> &'static str {
    match s {
        ObservationStatus::Final => "final",
        ObservationStatus::Preliminary => "preliminary",
        _ => "amended",
    }
}

fn obs(id: &str, code: &str, date: i64, status: ObservationStatus) -> Resource {
    Resource {
        meta: Some(Meta {
            id: id.into(),
            ..Meta::default()
        }),
        kind: Some(resource::Kind::Observation(Observation {
            status: status as i32,
            code: Some(CodeableConcept {
                codings: vec![Coding {
                    system: "http://loinc.org".into(),
                    code: code.into(),
                    display: String::new(),
                }],
                text: String::new(),
            }),
            effective: Some(observation::Effective::EffectiveTime(DateTime {
                unix_micros: date,
                precision: DatePrecision::Time as i32,
                utc_offset_minutes: 0,
            })),
            value: Some(ObservationValue {
                kind: Some(observation_value::Kind::Text("x".into())),
            }),
            ..Observation::default()
        })),
        unmodelled_json: String::new(),
    }
}

fn patient(id: &str) -> Resource {
    Resource {
        meta: Some(Meta {
            id: id.into(),
            ..Meta::default()
        }),
        kind: Some(resource::Kind::Patient(Patient::default())),
        unmodelled_json: String::new(),
    }
}

/// (code, date, status) of an observation.
fn terms(r: &Resource) -> (String, i64, &'static str) {
    let Some(resource::Kind::Observation(o)) = &r.kind else {
        panic!("not an observation")
    };
    let code = o.code.as_ref().unwrap().codings[0].code.clone();
    let Some(observation::Effective::EffectiveTime(t)) = &o.effective else {
        panic!("no date")
    };
    let status = status_code(ObservationStatus::try_from(o.status).unwrap());
    (code, t.unix_micros, status)
}

fn id_of(r: &Resource) -> String {
    r.meta.as_ref().unwrap().id.clone()
}

fn loinc(code: &str) -> String {
    format!("http://loinc.org|{code}")
}

/// The queries checked: by type, by code, by date range, by status, and all together.
fn queries() -> Vec<SearchQuery> {
    let base = SearchQuery {
        rtype: Some(ResourceType::Observation),
        ..SearchQuery::default()
    };
    vec![
        base.clone(),
        SearchQuery {
            code: loinc(CODES[0]),
            ..base.clone()
        },
        SearchQuery {
            since_micros: Some(EPOCH_2015 + 300 * DAY),
            until_micros: Some(EPOCH_2015 + 2_000 * DAY),
            ..base.clone()
        },
        SearchQuery {
            statuses: vec!["final".into(), "amended".into()],
            ..base.clone()
        },
        SearchQuery {
            code: loinc(CODES[1]),
            since_micros: Some(EPOCH_2015 + 1_000 * DAY),
            statuses: vec!["final".into()],
            ..base
        },
    ]
}

fn matches(q: &SearchQuery, r: &Resource) -> bool {
    let (code, date, status) = terms(r);
    (q.code.is_empty() || q.code == loinc(&code))
        && q.since_micros.is_none_or(|s| date >= s)
        && q.until_micros.is_none_or(|u| date < u)
        && (q.statuses.is_empty() || q.statuses.iter().any(|s| s == status))
        && r.meta.as_ref().unwrap().status != RecordStatus::EnteredInError as i32
}

/// Every page of `q`, `page` records at a time.
async fn search_all(client: &Client, p: &str, q: &SearchQuery, page: u32) -> Vec<Resource> {
    let mut out = Vec::new();
    let mut token = Vec::new();
    loop {
        let q = SearchQuery {
            limit: page,
            ..q.clone()
        };
        let r = client.search(p, &q, &token).await.unwrap();
        assert!(r.resources.len() <= page as usize);
        out.extend(r.resources);
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}

/// Newest clinical date first; ties in id order (the index's order).
fn sorted(mut rs: Vec<Resource>) -> Vec<(i64, String)> {
    let mut v: Vec<(i64, String)> = rs.drain(..).map(|r| (terms(&r).1, id_of(&r))).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_matches_a_brute_force_scan_under_concurrent_writes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let p = patient_in_shard(&client, 1, "search");
    let patient = patient(&p);
    assert!(is_applied(
        &client
            .create_patient(patient, &WriteOptions::default())
            .await
            .unwrap()
    ));

    // Writers: create observations, re-date / re-code / re-status them, mark some in error.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (client, p) = (client.clone(), p.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w + 1));
                let mut mine: Vec<(String, u64)> = Vec::new();
                for i in 0..45u64 {
                    let code = CODES[rng.below(4) as usize];
                    let date = EPOCH_2015 + rng.below(3_000) as i64 * DAY;
                    let status = STATUSES[rng.below(3) as usize];
                    let opts = WriteOptions::default();
                    match (rng.below(5), mine.len()) {
                        (0 | 1, n) if n > 0 => {
                            let k = rng.below(n as u64) as usize;
                            let (id, v) = mine[k].clone();
                            let w = client
                                .update_record(&p, v, obs(&id, code, date, status), &opts)
                                .await
                                .unwrap();
                            if is_applied(&w) {
                                mine[k].1 = w.written[0].version;
                            }
                        }
                        (2, n) if n > 3 => {
                            let (id, v) = mine.swap_remove(rng.below(n as u64) as usize);
                            let w = client
                                .delete_record(&p, ResourceType::Observation, &id, v, "test", &opts)
                                .await
                                .unwrap();
                            assert!(is_applied(&w), "{w:?}");
                        }
                        _ => {
                            let id = format!("o{w}-{i}");
                            let w = client
                                .create_record(&p, obs(&id, code, date, status), &opts)
                                .await
                                .unwrap();
                            assert!(is_applied(&w), "{w:?}");
                            mine.push((id, 1));
                        }
                    }
                }
            })
        })
        .collect();
    // A reader meanwhile: every result matches its query and comes newest first.
    let reader = {
        let (client, p, stop) = (client.clone(), p.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut checked = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for q in queries() {
                    let got = search_all(&client, &p, &q, 7).await;
                    for r in &got {
                        assert!(matches(&q, r), "{q:?} found {r:?}");
                    }
                    let dates: Vec<i64> = got.iter().map(|r| terms(r).1).collect();
                    assert!(dates.windows(2).all(|w| w[0] >= w[1]), "{dates:?}");
                    checked += got.len();
                }
            }
            checked
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let checked = reader.await.unwrap();
    assert!(checked > 0, "the reader saw no results while writes ran");

    // Quiescent: search equals a brute-force scan of the patient, page size notwithstanding.
    let mut all: BTreeMap<String, Resource> = BTreeMap::new();
    client
        .everything(&p, 0, &[ResourceType::Observation], true, |rs| {
            for r in rs {
                all.insert(id_of(&r), r);
            }
            Ok(())
        })
        .await
        .unwrap();
    assert!(all.len() > 30, "{} observations", all.len());
    for q in queries() {
        let want = sorted(all.values().filter(|r| matches(&q, r)).cloned().collect());
        for page in [1, 10, 100] {
            let got: Vec<(i64, String)> = search_all(&client, &p, &q, page)
                .await
                .iter()
                .map(|r| (terms(r).1, id_of(r)))
                .collect();
            assert_eq!(got, want, "query {q:?}, page {page}");
        }
    }
    // Bad queries are refused by name.
    let e = client
        .search(
            &p,
            &SearchQuery {
                rtype: Some(ResourceType::Patient),
                ..SearchQuery::default()
            },
            &[],
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("type"), "{e}");
    let e = client
        .search(
            &p,
            &SearchQuery {
                rtype: Some(ResourceType::Observation),
                code: "2339-0".into(),
                ..SearchQuery::default()
            },
            &[],
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("system|code"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_records_are_kept_listed_and_released() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = TestCluster::start(3, 2, 3, &|_| {}).await;
    let client = cluster.client().await;
    let p = patient_in_shard(&client, 1, "quarantine");
    let patient = patient(&p);
    let opts = WriteOptions::default();
    let q = |id: &str| QuarantinedRecord {
        id: id.into(),
        fhir_type: "Procedure".into(),
        source: format!("test#urn:uuid:{id}"),
        source_json: format!(r#"{{"resourceType":"Procedure","id":"{id}"}}"#),
        problems: vec![QuarantineProblem {
            path: "code.coding[0].code".into(),
            message: "34552-0 is not a SNOMED CT code".into(),
        }],
        references: [("Encounter/e1".to_owned(), "Encounter/e1".to_owned())].into(),
        ..QuarantinedRecord::default()
    };
    // No patient: nothing is kept.
    let r = client
        .quarantine(&p, vec![q("a")], vec![], &opts)
        .await
        .unwrap();
    assert_eq!(r.outcome, WriteOutcome::NotFound as i32);
    assert!(is_applied(
        &client.create_patient(patient, &opts).await.unwrap()
    ));
    let r = client
        .quarantine(&p, vec![q("b"), q("a"), q("c")], vec![], &opts)
        .await
        .unwrap();
    assert_eq!((r.outcome, r.stored), (WriteOutcome::Applied as i32, 3));
    // Idempotent: again, the same three.
    client
        .quarantine(&p, vec![q("a")], vec![], &opts)
        .await
        .unwrap();
    let (page, more) = client.list_quarantine(&p, "", 2).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(more);
    assert!(page[0].quarantined_micros > 0);
    assert_eq!(page[0].problems, q("a").problems);
    assert_eq!(page[0].references, q("a").references);
    let (page, more) = client.list_quarantine(&p, "b", 2).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["c"]
    );
    assert!(!more);
    // Released after the fix: gone; the others stay.
    client
        .quarantine(&p, vec![], vec!["b".into()], &opts)
        .await
        .unwrap();
    let (page, _) = client.list_quarantine(&p, "", 10).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
    // A record without problems, or with a bad id, is refused by field.
    let mut bad = q("d");
    bad.problems.clear();
    let e = client
        .quarantine(&p, vec![bad], vec![], &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("records[0].problems"), "{e}");
    let e = client
        .quarantine(&p, vec![q("a/b")], vec![], &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("records[0].id"), "{e}");
    // Quarantined records are not records: search and reads do not see them.
    assert!(
        client
            .read_record(&p, ResourceType::Procedure, "a")
            .await
            .unwrap()
            .is_none()
    );
}
