use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use dossier_records::{Limits, SYSTEM_LOINC, validate_new_record};
use dossier_api::v1::{
    CodeableConcept, Coding, DatePrecision, DateTime, HumanName, Observation, ObservationStatus,
    ObservationValue, Patient, Quantity, RecordStatus, observation, observation_value, resource,
};

/// The full Synthea sample beside the project, when it is there.
fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fhir/synthea-r4")
}

/// One bundle of the sample, kept in the repository so that these tests run on any checkout.
fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synthea-r4")
}

fn read_bundles(dir: &std::path::Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for f in entries.flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            let text = std::fs::read_to_string(f.path()).unwrap();
            out.push((name, serde_json::from_str(&text).unwrap()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The full sample when it is there, else the bundle kept in the repository.
fn samples() -> Vec<(String, Value)> {
    let shared = read_bundles(&shared_dir());
    if shared.is_empty() {
        read_bundles(&fixture_dir())
    } else {
        shared
    }
}

/// As the store keeps it: meta filled by the server.
fn stored(mut r: Resource, patient: &str, version: u64) -> Resource {
    let meta = r.meta.get_or_insert_with(Meta::default);
    meta.patient_id = patient.to_owned();
    meta.version = version;
    meta.last_updated_micros = 1_700_000_000_000_000;
    meta.status = RecordStatus::Current as i32;
    r
}

/// Records in the bundle kept in the repository (Alberto Atencio's: 76 entries, less 14 billing,
/// 4 directory entries and the Patient).
const FIXTURE_RECORDS: usize = 57;

/// A LOINC code for `n`, with its check digit.
fn loinc(n: u32) -> String {
    (0..10)
        .map(|d| format!("{n}-{d}"))
        .find(|c| dossier_records::loinc_is_valid(c))
        .expect("one check digit fits")
}

fn kinds(b: &ImportedBundle) -> Vec<Option<resource::Kind>> {
    b.records.iter().map(|r| r.kind.clone()).collect()
}

#[test]
fn every_sample_bundle_imports_validates_and_round_trips() {
    let samples = samples();
    let full_sample = samples.len() >= 12;
    assert!(
        !samples.is_empty(),
        "no Synthea bundle in {:?}",
        fixture_dir()
    );
    let options = ImportOptions {
        source: "synthea".into(),
        on_invalid: OnInvalid::Refuse,
        ..ImportOptions::default()
    };
    let mut records = 0;
    for (name, bundle) in &samples {
        // Billing is refused only when asked to be.
        let refused = import_bundle(
            bundle,
            &ImportOptions {
                refuse_billing: true,
                ..ImportOptions::default()
            },
        )
        .unwrap_err();
        assert!(
            refused.iter().any(|p| p.message.contains("Claim")),
            "{name}: {refused:?}"
        );
        // Every record maps and validates: none is refused, none quarantined.
        let imported = import_bundle(bundle, &options).unwrap_or_else(|p| panic!("{name}: {p:?}"));
        let patient_id = imported.patient.meta.as_ref().unwrap().id.clone();
        assert!(!imported.records.is_empty());
        assert!(imported.quarantined.is_empty());
        assert!(imported.skipped_types.contains_key("Claim"));
        assert!(
            imported
                .skipped_types
                .keys()
                .all(|t| t == "Claim" || t == "ExplanationOfBenefit"),
            "{name}: {:?}",
            imported.skipped_types
        );
        // Every record is valid as the Records service checks it.
        validate_new_record(
            &imported.patient,
            "resource",
            &patient_id,
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: patient: {e}"));
        for r in &imported.records {
            validate_new_record(r, "resource", &patient_id, &Limits::default())
                .unwrap_or_else(|e| panic!("{name}: {}: {e}", r.meta.as_ref().unwrap().id));
        }
        records += imported.records.len();
        // Export as the store would, import again: the same records.
        let mut all = vec![stored(imported.patient.clone(), &patient_id, 1)];
        all.extend(
            imported
                .records
                .iter()
                .cloned()
                .map(|r| stored(r, &patient_id, 1)),
        );
        let exported = export_bundle(&all, "collection");
        let again = import_bundle(&exported, &options)
            .unwrap_or_else(|p| panic!("{name}: re-import: {p:?}"));
        assert_eq!(again.patient.kind, imported.patient.kind, "{name}: patient");
        assert_eq!(
            again.patient.unmodelled_json, imported.patient.unmodelled_json,
            "{name}: patient"
        );
        assert_eq!(kinds(&again), kinds(&imported), "{name}: records");
        let ids = |b: &ImportedBundle| -> Vec<String> {
            b.records
                .iter()
                .map(|r| r.meta.as_ref().unwrap().id.clone())
                .collect()
        };
        assert_eq!(ids(&again), ids(&imported));
    }
    if full_sample {
        // The sample's 2,718 entries less 447 billing, 38 directory and 12 Patient entries
        // (docs/schema.md §8).
        assert_eq!(records, 2_718 - 447 - 38 - 12);
    } else {
        // Alberto Atencio's bundle, the one kept in the repository.
        assert_eq!(records, FIXTURE_RECORDS);
    }
}

#[test]
fn exported_resources_are_fhir_shaped() {
    let (_, bundle) = samples().into_iter().next().expect("the Synthea sample");
    let imported = import_bundle(&bundle, &ImportOptions::default()).unwrap();
    let pid = imported.patient.meta.as_ref().unwrap().id.clone();
    for r in &imported.records {
        let v = to_fhir(&stored(r.clone(), &pid, 3));
        let t = v["resourceType"].as_str().unwrap();
        assert_eq!(v["meta"]["versionId"], json!("3"));
        let subject = if matches!(t, "AllergyIntolerance" | "Consent" | "Immunization") {
            "patient"
        } else {
            "subject"
        };
        assert_eq!(
            v[subject]["reference"],
            json!(format!("Patient/{pid}")),
            "{t}"
        );
        // Codings carry system and code; references are Type/id.
        let text = v.to_string();
        assert!(!text.contains("null"), "{t}: {text}");
        if let Some(enc) = v.get("encounter") {
            assert!(enc["reference"].as_str().unwrap().starts_with("Encounter/"));
        }
        for c in v["code"]["coding"].as_array().into_iter().flatten() {
            assert!(c["system"].is_string() && c["code"].is_string(), "{t}: {c}");
        }
    }
}

#[test]
fn bad_bundles_get_clear_problems() {
    let patient = json!({"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient", "id": "p1", "name": [{"family": "Peeters"}]}});
    let obs = |extra: Value| {
        let mut r = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
            "subject": {"reference": "urn:uuid:p1"},
            "valueQuantity": {"value": 170, "unit": "cm"}
        });
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        json!({"fullUrl": "urn:uuid:o1", "resource": r})
    };
    let bundle = |entries: Vec<Value>| json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    let refuse = ImportOptions {
        on_invalid: OnInvalid::Refuse,
        ..ImportOptions::default()
    };
    let problems = |b: &Value| import_bundle(b, &refuse).unwrap_err();

    // Wrong JSON types name the element.
    let p = problems(&bundle(vec![patient.clone(), obs(json!({"status": 5}))]));
    assert!(
        p.iter()
            .any(|p| p.entry == Some(1) && p.path == "status" && p.message.contains("string")),
        "{p:?}"
    );
    // A dangling reference.
    let p = problems(&bundle(vec![
        patient.clone(),
        obs(json!({"encounter": {"reference": "urn:uuid:nowhere"}})),
    ]));
    assert!(
        p.iter()
            .any(|p| p.path == "encounter.reference" && p.message.contains("names no entry")),
        "{p:?}"
    );
    // An unknown resourceType is reported as unmodelled, with its count.
    let p = problems(&bundle(vec![
        patient.clone(),
        json!({"resource": {"resourceType": "Spaceship"}}),
    ]));
    assert!(
        p.iter().any(|p| p.message.contains("Spaceship (1)")),
        "{p:?}"
    );
    // An element Dossier does not model is kept verbatim beside the record.
    let b = import_bundle(
        &bundle(vec![
            patient.clone(),
            obs(json!({"bodySite": {"text": "arm"}})),
        ]),
        &refuse,
    )
    .unwrap();
    assert_eq!(b.records[0].unmodelled_json, r#"{"bodySite":{"text":"arm"}}"#);
    assert_eq!(b.unmodelled_elements.get("Observation.bodySite.text"), Some(&1));
    // No patient, two patients.
    let p = problems(&bundle(vec![obs(json!({}))]));
    assert!(p.iter().any(|p| p.message.contains("no Patient")), "{p:?}");
    let second = json!({"fullUrl": "urn:uuid:p2", "resource": {"resourceType": "Patient"}});
    let p = problems(&bundle(vec![patient.clone(), second]));
    assert!(
        p.iter().any(|p| p.message.contains("second Patient")),
        "{p:?}"
    );
    // A bad time.
    let p = problems(&bundle(vec![
        patient.clone(),
        obs(json!({"effectiveDateTime": "yesterday"})),
    ]));
    assert!(p.iter().any(|p| p.path == "effectiveDateTime"), "{p:?}");
    // Not a bundle at all.
    assert!(
        import_bundle(
            &json!({"resourceType": "Patient"}),
            &ImportOptions::default()
        )
        .is_err()
    );
    // A 50 MB note maps, and is refused by validation with the limit: the record is
    // quarantined.
    let big = "x".repeat(50 << 20);
    let b = bundle(vec![patient, obs(json!({"note": [{"text": big}]}))]);
    let imported = import_bundle(&b, &ImportOptions::default()).unwrap();
    assert!(imported.records.is_empty());
    let q = &imported.quarantined[0];
    assert_eq!(q.problems[0].path, "resource.observation.notes[0].text");
    assert!(q.problems[0].message.contains("65536"), "{q:?}");
}

#[test]
fn decimals_keep_their_digits() {
    let text = r#"{"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient"}},
        {"fullUrl": "urn:uuid:o1", "resource": {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
            "subject": {"reference": "urn:uuid:p1"},
            "valueQuantity": {"value": 1.50, "unit": "cm"}}}
    ]}"#;
    let b: Value = serde_json::from_str(text).unwrap();
    let imported = import_bundle(&b, &ImportOptions::default()).unwrap();
    let Some(resource::Kind::Observation(o)) = &imported.records[0].kind else {
        panic!()
    };
    let Some(observation_value::Kind::Quantity(q)) = o.value.as_ref().and_then(|v| v.kind.as_ref())
    else {
        panic!()
    };
    assert_eq!(q.value, "1.50");
    let out = to_fhir(&stored(imported.records[0].clone(), "p1", 1)).to_string();
    assert!(out.contains("\"value\":1.50"), "{out}");
}

fn arb_time() -> impl Strategy<Value = DateTime> {
    (
        -1_000_000_000i64..3_000_000_000,
        0i64..1_000_000,
        -14i32..=14,
        0u8..4,
    )
        .prop_map(|(s, us, h, p)| {
            match p {
                0 => DateTime {
                    unix_micros: s * 1_000_000 + us,
                    precision: DatePrecision::Time as i32,
                    utc_offset_minutes: h * 60,
                },
                // Partial dates are the start of the period at 00:00 UTC.
                _ => {
                    let day = s.div_euclid(86_400) * 86_400_000_000;
                    let t = DateTime {
                        unix_micros: day,
                        precision: DatePrecision::Day as i32,
                        utc_offset_minutes: 0,
                    };
                    parse_date_time(&format_date_time(&t)).unwrap()
                }
            }
        })
}

fn arb_text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9 éà.-]{0,12}"
}

fn arb_observation() -> impl Strategy<Value = Observation> {
    (
        0u32..100_000,
        "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,4})?",
        arb_text(),
        proptest::option::of(arb_time()),
        proptest::option::of(arb_time()),
        1i32..8,
        proptest::collection::vec(arb_text(), 0..3),
    )
        .prop_map(
            |(n, value, unit, effective, issued, status, notes)| Observation {
                status,
                code: Some(CodeableConcept {
                    codings: vec![Coding {
                        system: SYSTEM_LOINC.into(),
                        code: loinc(n),
                        display: unit.clone(),
                    }],
                    text: String::new(),
                }),
                // A final, amended or corrected observation needs its time (validation).
                effective: effective
                    .or_else(|| {
                        (3..=5).contains(&status).then(|| DateTime {
                            unix_micros: 1_600_000_000_000_000,
                            precision: DatePrecision::Time as i32,
                            utc_offset_minutes: 0,
                        })
                    })
                    .map(observation::Effective::EffectiveTime),
                issued,
                value: Some(ObservationValue {
                    kind: Some(observation_value::Kind::Quantity(Quantity {
                        value,
                        unit,
                        ..Quantity::default()
                    })),
                }),
                notes: notes
                    .into_iter()
                    .filter(|n| !n.is_empty())
                    .map(|text| dossier_api::v1::Annotation {
                        text,
                        ..Default::default()
                    })
                    .collect(),
                ..Observation::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// proto → FHIR JSON (through its text) → proto gives the same records.
    #[test]
    fn records_round_trip_through_fhir_json(
        observations in proptest::collection::vec(arb_observation(), 1..5),
        family in "[A-Za-z]{1,10}",
        given in proptest::collection::vec("[A-Za-z]{1,8}", 0..3),
        gender in 0i32..5,
    ) {
        let patient = Resource {
            meta: Some(Meta { id: "p-1".into(), ..Meta::default() }),
            kind: Some(resource::Kind::Patient(Patient {
                names: vec![HumanName { family, given, ..HumanName::default() }],
                gender,
                ..Patient::default()
            })),
            unmodelled_json: String::new(),
        };
        let mut all = vec![stored(patient.clone(), "p-1", 1)];
        for (i, o) in observations.iter().enumerate() {
            all.push(stored(
                Resource {
                    meta: Some(Meta { id: format!("o-{i}"), ..Meta::default() }),
                    kind: Some(resource::Kind::Observation(o.clone())),
                    unmodelled_json: String::new(),
                },
                "p-1",
                1,
            ));
        }
        let text = export_bundle(&all, "searchset").to_string();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let back = import_bundle(&parsed, &ImportOptions::default()).map_err(|p| TestCaseError::fail(format!("{p:?}")))?;
        prop_assert_eq!(back.patient.kind, patient.kind);
        let got: Vec<Observation> = back.records.into_iter().filter_map(|r| match r.kind {
            Some(resource::Kind::Observation(o)) => Some(o),
            _ => None,
        }).collect();
        prop_assert_eq!(got, observations);
    }

    #[test]
    fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(base64_decode(&base64_encode(&bytes)), Some(bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Synthetic patients (every kind the generator makes: encounters with identifier
    /// references, observations, conditions, medications with dosages and reason records,
    /// allergies, letters as base64 text, care relationships) survive proto → FHIR JSON text →
    /// proto unchanged.
    #[test]
    fn synthetic_patients_round_trip_through_fhir_json(seed in 0u64..1_000, index in 0u64..10_000) {
        let p = dossier_records::synth::patient(seed, index);
        let mut all = vec![stored(p.patient.clone(), p.id(), 1)];
        all.extend(p.records.iter().cloned().map(|r| stored(r, p.id(), 2)));
        let text = export_bundle(&all, "collection").to_string();
        let back = import_bundle(&serde_json::from_str(&text).unwrap(), &ImportOptions::default())
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(back.patient.kind, p.patient.kind);
        let mut want: Vec<_> = p.records.iter().map(|r| (r.meta.as_ref().unwrap().id.clone(), r.kind.clone())).collect();
        let mut got: Vec<_> = back.records.iter().map(|r| (r.meta.as_ref().unwrap().id.clone(), r.kind.clone())).collect();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        got.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(got, want);
    }
}

/// The kinds the generator does not make: a procedure and a consent refusing sharing with an
/// organisation, and a record in error.
#[test]
fn procedures_consents_and_retractions_round_trip() {
    use dossier_api::v1::{
        Consent, ConsentActor, ConsentDecision, ConsentStatus, EntityType, Identifier, Period,
        Procedure, ProcedureStatus, RecordRef, Reference, reference,
    };
    let patient = stored(
        Resource {
            meta: Some(Meta {
                id: "p".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Patient(Patient::default())),
            unmodelled_json: String::new(),
        },
        "p",
        1,
    );
    let org = Reference {
        target: Some(reference::Target::Identifier(Identifier {
            system: "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/cbe".into(),
            value: "0256070171".into(),
            r#type: None,
        })),
        entity_type: EntityType::Organization as i32,
        display: "AZ Sint-Jan".into(),
    };
    let procedure = Procedure {
        status: ProcedureStatus::Completed as i32,
        code: Some(CodeableConcept {
            codings: vec![Coding {
                system: "http://snomed.info/sct".into(),
                code: "73761001".into(),
                display: "Colonoscopy".into(),
            }],
            text: "Colonoscopy".into(),
        }),
        performed: Some(dossier_api::v1::procedure::Performed::PerformedPeriod(Period {
            start: parse_date_time("2012-11-25T23:37:54+00:00"),
            end: parse_date_time("2012-11-26T00:19:54+00:00"),
        })),
        performers: vec![org.clone()],
        ..Procedure::default()
    };
    let consent = Consent {
        status: ConsentStatus::Active as i32,
        scope: Some(CodeableConcept {
            codings: vec![Coding {
                system: "http://terminology.hl7.org/CodeSystem/consentscope".into(),
                code: "patient-privacy".into(),
                display: String::new(),
            }],
            text: String::new(),
        }),
        categories: vec![CodeableConcept {
            codings: vec![],
            text: "Refusal to share".into(),
        }],
        date_time: parse_date_time("2024-03-01"),
        decision: ConsentDecision::Deny as i32,
        actors: vec![ConsentActor {
            role: Some(CodeableConcept {
                codings: vec![Coding {
                    system: "http://terminology.hl7.org/CodeSystem/v3-ParticipationType".into(),
                    code: "IRCP".into(),
                    display: String::new(),
                }],
                text: String::new(),
            }),
            reference: Some(org),
        }],
        resource_types: vec![
            ResourceType::DocumentReference as i32,
            ResourceType::CareRelationship as i32,
        ],
        source: Some(RecordRef {
            r#type: ResourceType::Procedure as i32,
            id: "proc".into(),
        }),
        ..Consent::default()
    };
    let mut retracted = stored(
        Resource {
            meta: Some(Meta {
                id: "obs".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Observation(Observation {
                status: ObservationStatus::Unknown as i32,
                code: Some(CodeableConcept {
                    codings: vec![Coding {
                        system: SYSTEM_LOINC.into(),
                        code: "8867-4".into(),
                        display: String::new(),
                    }],
                    text: String::new(),
                }),
                value: Some(ObservationValue {
                    kind: Some(observation_value::Kind::Boolean(true)),
                }),
                ..Observation::default()
            })),
            unmodelled_json: String::new(),
        },
        "p",
        2,
    );
    retracted.meta.as_mut().unwrap().status = RecordStatus::EnteredInError as i32;
    let records = vec![
        patient,
        stored(
            Resource {
                meta: Some(Meta {
                    id: "proc".into(),
                    ..Meta::default()
                }),
                kind: Some(resource::Kind::Procedure(procedure.clone())),
                unmodelled_json: String::new(),
            },
            "p",
            1,
        ),
        stored(
            Resource {
                meta: Some(Meta {
                    id: "consent".into(),
                    ..Meta::default()
                }),
                kind: Some(resource::Kind::Consent(consent.clone())),
                unmodelled_json: String::new(),
            },
            "p",
            1,
        ),
        retracted.clone(),
    ];
    let bundle = export_bundle(&records, "collection");
    assert_eq!(
        bundle["entry"][3]["resource"]["status"],
        json!("entered-in-error")
    );
    let back = import_bundle(
        &serde_json::from_str(&bundle.to_string()).unwrap(),
        &ImportOptions::default(),
    )
    .unwrap();
    let kind_of = |id: &str| {
        back.records
            .iter()
            .find(|r| r.meta.as_ref().unwrap().id == id)
            .unwrap()
            .kind
            .clone()
    };
    assert_eq!(kind_of("proc"), Some(resource::Kind::Procedure(procedure)));
    assert_eq!(kind_of("consent"), Some(resource::Kind::Consent(consent)));
    assert_eq!(kind_of("obs"), retracted.kind);
    assert_eq!(
        back.entered_in_error,
        vec![(ResourceType::Observation, "obs".to_owned())]
    );
}

/// The leaves of a source resource that its record's export does not give back: (path, source
/// value, exported value or None when lost). Allowed: rewritten reference strings, and the
/// identity and meta the store regenerates (`id`, `resourceType`, `meta.versionId`,
/// `meta.lastUpdated`, `meta.source`).
fn lost_or_changed(source: &Value, exported: &Value) -> Vec<(String, Value, Option<Value>)> {
    let mut ls = Vec::new();
    residue::leaves(source, "", &mut ls);
    let mut out = Vec::new();
    for (path, v) in ls {
        if matches!(
            path.as_str(),
            "id" | "resourceType" | "meta.versionId" | "meta.lastUpdated" | "meta.source"
        ) {
            continue;
        }
        match residue::at(exported, &path) {
            Some(x) if *x == v => {}
            Some(Value::String(x))
                if (path == "reference" || path.ends_with(".reference"))
                    && (x.contains('/') || x.contains("?identifier=")) => {}
            other => out.push((path, v, other.cloned())),
        }
    }
    out
}

/// Lossless import: for every modelled entry of every sample bundle, import the bundle, export
/// the entry's record as the store gives it back, and compare every source leaf (path → value)
/// with the export. A leaf lost or changed fails the test with the list of them. Prints the
/// figures of the sample (records per kind, skipped, residue sizes).
#[test]
fn every_source_leaf_of_the_sample_survives_import_and_export() {
    let samples = samples();
    assert!(!samples.is_empty());
    let mut failures: Vec<String> = Vec::new();
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    let mut residue_sizes: Vec<usize> = Vec::new();
    let mut quarantined = 0;
    for (name, bundle) in &samples {
        let imported = import_bundle(bundle, &ImportOptions::default())
            .unwrap_or_else(|p| panic!("{name}: refused: {p:?}"));
        quarantined += imported.quarantined.len();
        for (t, n) in &imported.skipped_types {
            *skipped.entry(t.clone()).or_default() += n;
        }
        let pid = imported.patient.meta.as_ref().unwrap().id.clone();
        let mut by_url: HashMap<String, &Resource> = HashMap::new();
        for r in std::iter::once(&imported.patient).chain(&imported.records) {
            by_url.insert(r.meta.as_ref().unwrap().source.clone(), r);
        }
        for entry in bundle["entry"].as_array().unwrap() {
            let fhir = entry["resource"]["resourceType"].as_str().unwrap();
            if fhir != "Patient" && modelled(fhir).is_none() {
                continue;
            }
            let url = entry["fullUrl"].as_str().unwrap();
            let Some(record) = by_url.get(url) else {
                failures.push(format!("{name}: {fhir} {url}: no record"));
                continue;
            };
            *per_kind.entry(fhir.to_owned()).or_default() += 1;
            residue_sizes.push(record.unmodelled_json.len());
            let exported = to_fhir(&stored((*record).clone(), &pid, 1));
            for (path, was, now) in lost_or_changed(&entry["resource"], &exported) {
                failures.push(match now {
                    None => format!("{name}: {fhir}.{path} = {was}: lost"),
                    Some(now) => format!("{name}: {fhir}.{path} = {was}: became {now}"),
                });
            }
        }
    }
    residue_sizes.sort_unstable();
    let total: usize = residue_sizes.iter().sum();
    println!("records per kind (Patient included): {per_kind:?}");
    println!("skipped entries: {skipped:?}; quarantined: {quarantined}");
    println!(
        "unmodelled_json bytes: max {}, mean {:.0}, median {}, empty {} of {}",
        residue_sizes.last().copied().unwrap_or(0),
        total as f64 / residue_sizes.len().max(1) as f64,
        residue_sizes.get(residue_sizes.len() / 2).copied().unwrap_or(0),
        residue_sizes.iter().filter(|n| **n == 0).count(),
        residue_sizes.len()
    );
    assert!(
        failures.is_empty(),
        "{} source leaves lost or changed, e.g.:\n{}",
        failures.len(),
        failures.iter().take(60).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(quarantined, 0);
}
