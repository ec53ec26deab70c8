use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use dossier_api::v1::{
    CodeableConcept, Coding, DatePrecision, DateTime, HumanName, Meta, Observation,
    ObservationStatus, ObservationValue, Patient, Quantity, RecordStatus, observation,
    observation_value, resource,
};
use dossier_records::{Limits, SYSTEM_LOINC, validate_new_record};

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
        // What was kept comes back, and is kept again the same.
        let residues = |b: &ImportedBundle| -> Vec<String> {
            b.records
                .iter()
                .map(|r| r.unmodelled_json.clone())
                .collect()
        };
        assert_eq!(residues(&again), residues(&imported), "{name}");
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
    assert_eq!(
        b.records[0].unmodelled_json,
        r#"{"bodySite":{"text":"arm"}}"#
    );
    assert_eq!(
        b.unmodelled_elements.get("Observation.bodySite.text"),
        Some(&1)
    );
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
                        (3..=5).contains(&status).then_some(DateTime {
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
        performed: Some(dossier_api::v1::procedure::Performed::PerformedPeriod(
            Period {
                start: parse_date_time("2012-11-25T23:37:54+00:00"),
                end: parse_date_time("2012-11-26T00:19:54+00:00"),
            },
        )),
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
    assert_eq!(
        kind_of("proc"),
        Some(resource::Kind::Procedure(procedure.clone()))
    );
    assert_eq!(
        kind_of("consent"),
        Some(resource::Kind::Consent(consent.clone()))
    );
    // And one resource at a time.
    survives_single_import(resource::Kind::Procedure(procedure)).unwrap();
    survives_single_import(resource::Kind::Consent(consent)).unwrap();
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
        let is_reference = path == "reference" || path.ends_with(".reference");
        // A reference to a practitioner or organisation is exported by its identifier.
        let by_identifier = path
            .strip_suffix(".reference")
            .and_then(|parent| residue::at(exported, parent))
            .is_some_and(|r| r.get("identifier").is_some());
        match residue::at(exported, &path) {
            Some(x) if *x == v => {}
            Some(Value::String(x)) if is_reference && x.contains('/') => {}
            None if is_reference && by_identifier => {}
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
    let mut unmodelled: BTreeMap<String, usize> = BTreeMap::new();
    for (name, bundle) in &samples {
        let imported = import_bundle(bundle, &ImportOptions::default())
            .unwrap_or_else(|p| panic!("{name}: refused: {p:?}"));
        quarantined += imported.quarantined.len();
        for (path, n) in &imported.unmodelled_elements {
            *unmodelled.entry(path.clone()).or_default() += n;
        }
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
    println!("unmodelled leaves by path: {unmodelled:#?}");
    println!(
        "unmodelled_json bytes: max {}, mean {:.0}, median {}, empty {} of {}",
        residue_sizes.last().copied().unwrap_or(0),
        total as f64 / residue_sizes.len().max(1) as f64,
        residue_sizes
            .get(residue_sizes.len() / 2)
            .copied()
            .unwrap_or(0),
        residue_sizes.iter().filter(|n| **n == 0).count(),
        residue_sizes.len()
    );
    assert!(
        failures.is_empty(),
        "{} source leaves lost or changed, e.g.:\n{}",
        failures.len(),
        failures
            .iter()
            .take(60)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(quarantined, 0);
}

/// Every reference string in a resource, anywhere.
fn references_in(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    super::reference_strings(v, &mut out);
    out
}

/// The first bundle of the sample with an entry of `fhir` type that no other entry refers to:
/// (bundle, entry index).
fn unreferenced_entry(fhir: &str) -> (String, Value, usize) {
    for (name, bundle) in samples() {
        let entries = bundle["entry"].as_array().unwrap();
        // References from billing entries do not count: those are skipped.
        let all: BTreeSet<String> = entries
            .iter()
            .filter(|e| {
                !BILLING_TYPES.contains(&e["resource"]["resourceType"].as_str().unwrap_or_default())
            })
            .flat_map(|e| references_in(&e["resource"]))
            .collect();
        for (i, e) in entries.iter().enumerate() {
            if e["resource"]["resourceType"] == json!(fhir)
                && !all.contains(e["fullUrl"].as_str().unwrap())
            {
                return (name, bundle, i);
            }
        }
    }
    panic!("no unreferenced {fhir} in the sample");
}

/// A Procedure whose "SNOMED CT" code is the LOINC code 34552-0 (a real Synthea error) is set
/// aside alone: the rest of the patient imports. Refused with `OnInvalid::Refuse`. Fixed, it
/// imports through `import_resource` to the record the correct entry gives.
#[test]
fn a_procedure_with_a_loinc_code_as_snomed_is_quarantined_alone() {
    let (name, original, i) = unreferenced_entry("Procedure");
    let mut bundle = original.clone();
    let good_code = bundle["entry"][i]["resource"]["code"]["coding"][0]["code"].clone();
    assert_eq!(
        bundle["entry"][i]["resource"]["code"]["coding"][0]["system"],
        json!("http://snomed.info/sct")
    );
    bundle["entry"][i]["resource"]["code"]["coding"][0]["code"] = json!("34552-0");

    let clean = import_bundle(&original, &ImportOptions::default()).unwrap();
    let imported = import_bundle(&bundle, &ImportOptions::default())
        .unwrap_or_else(|p| panic!("{name}: {p:?}"));
    assert_eq!(imported.quarantined.len(), 1, "{:?}", imported.quarantined);
    let q = &imported.quarantined[0];
    assert_eq!((q.entry, q.fhir_type.as_str()), (i, "Procedure"));
    assert_eq!(q.resource, bundle["entry"][i]["resource"]);
    assert_eq!(q.problems.len(), 1);
    assert_eq!(q.problems[0].entry, Some(i));
    assert_eq!(
        q.problems[0].path,
        "resource.procedure.code.codings[0].code"
    );
    assert!(
        q.problems[0].message.contains("SNOMED CT"),
        "{:?}",
        q.problems
    );
    assert_eq!(imported.records.len(), clean.records.len() - 1);
    assert_eq!(imported.patient, clean.patient);
    // Its references: the patient and the encounter, as `Type/id`.
    let pid = clean.patient.meta.as_ref().unwrap().id.clone();
    assert!(
        q.references
            .values()
            .any(|v| *v == format!("Patient/{pid}")),
        "{q:?}"
    );
    assert!(
        q.references.values().any(|v| v.starts_with("Encounter/")),
        "{q:?}"
    );
    assert!(q.references.values().all(|v| !v.is_empty()), "{q:?}");

    let refuse = ImportOptions {
        on_invalid: OnInvalid::Refuse,
        ..ImportOptions::default()
    };
    let refused = import_bundle(&bundle, &refuse).unwrap_err();
    assert!(
        refused
            .iter()
            .all(|p| p.entry == Some(i) && p.path.ends_with("code.codings[0].code")),
        "{refused:?}"
    );

    // Fixed and sent again: the record the correct entry gives.
    let mut fixed = q.resource.clone();
    fixed["code"]["coding"][0]["code"] = good_code;
    fixed["id"] = json!(q.id);
    let options = ImportOptions {
        source: q.source.clone(),
        ..ImportOptions::default()
    };
    let record = import_resource(&fixed, &pid, &q.references, &options).unwrap();
    let want = clean
        .records
        .iter()
        .find(|r| r.meta.as_ref().unwrap().id == q.id)
        .unwrap();
    assert_eq!(&record, want);
    // Unfixed, it is refused with the same problem.
    let mut unfixed = q.resource.clone();
    unfixed["id"] = json!(q.id);
    let p = import_resource(&unfixed, &pid, &q.references, &options).unwrap_err();
    assert_eq!(p[0].path, "resource.procedure.code.codings[0].code");
}

/// A record that refers to a quarantined record is quarantined too, naming the entry it refers
/// to: an Observation with a broken LOINC code takes its DiagnosticReport with it. Nothing else
/// is set aside.
#[test]
fn records_referring_to_a_quarantined_record_are_quarantined_too() {
    let (name, mut bundle) = samples()
        .into_iter()
        .find(|(_, b)| {
            b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["resource"]["resourceType"] == json!("DiagnosticReport"))
        })
        .expect("a bundle with a DiagnosticReport");
    let entries = bundle["entry"].as_array().unwrap().clone();
    let report = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == json!("DiagnosticReport"))
        .unwrap();
    let result_url = entries[report]["resource"]["result"][0]["reference"]
        .as_str()
        .unwrap()
        .to_owned();
    let obs = entries
        .iter()
        .position(|e| e["fullUrl"] == json!(result_url))
        .unwrap();
    bundle["entry"][obs]["resource"]["code"]["coding"][0]["code"] = json!("not-loinc");
    let imported = import_bundle(&bundle, &ImportOptions::default())
        .unwrap_or_else(|p| panic!("{name}: {p:?}"));
    let held: BTreeMap<usize, &Quarantined> =
        imported.quarantined.iter().map(|q| (q.entry, q)).collect();
    assert!(held.contains_key(&obs), "{held:?}");
    let r = held.get(&report).expect("the report is quarantined");
    assert!(
        r.problems
            .iter()
            .any(|p| p.message.contains(&format!("entry[{obs}]")) && p.path.contains("results")),
        "{:?}",
        r.problems
    );
    // Every other quarantined record refers to a quarantined one.
    for q in &imported.quarantined {
        if q.entry != obs {
            assert!(q.problems[0].message.contains("quarantined"), "{q:?}");
        }
    }
    let clean = import_bundle(
        &samples().into_iter().find(|(n, _)| *n == name).unwrap().1,
        &ImportOptions::default(),
    )
    .unwrap();
    assert_eq!(
        imported.records.len() + imported.quarantined.len(),
        clean.records.len()
    );
}

/// Problems with the Patient entry refuse the bundle even when records are quarantined.
#[test]
fn a_bad_patient_refuses_the_bundle() {
    let (_, mut bundle) = samples().into_iter().next().unwrap();
    let p = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["resource"]["resourceType"] == json!("Patient"))
        .unwrap();
    bundle["entry"][p]["resource"]["birthDate"] = json!("yesterday");
    let problems = import_bundle(&bundle, &ImportOptions::default()).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|x| x.entry == Some(p) && x.path == "birthDate"),
        "{problems:?}"
    );
}

fn snomed_concept() -> impl Strategy<Value = CodeableConcept> {
    (
        proptest::sample::select(vec!["73761001", "229070002", "91251008", "8205005"]),
        arb_text(),
    )
        .prop_map(|(code, text)| CodeableConcept {
            codings: vec![Coding {
                system: dossier_records::SYSTEM_SNOMED.into(),
                code: code.into(),
                display: text.clone(),
            }],
            text,
        })
}

fn loinc_concept() -> impl Strategy<Value = CodeableConcept> {
    (1u32..100_000, arb_text()).prop_map(|(n, text)| CodeableConcept {
        codings: vec![Coding {
            system: SYSTEM_LOINC.into(),
            code: loinc(n),
            display: String::new(),
        }],
        text,
    })
}

fn arb_date() -> impl Strategy<Value = dossier_api::v1::Date> {
    (1900u32..2100, 0u32..13, 1u32..29).prop_map(|(year, month, day)| dossier_api::v1::Date {
        year,
        month,
        day: if month == 0 { 0 } else { day },
    })
}

fn arb_quantity() -> impl Strategy<Value = Quantity> {
    "(0|[1-9][0-9]{0,4})(\\.[0-9]{1,3})?".prop_map(|value| Quantity {
        value,
        unit: "mL".into(),
        system: dossier_records::SYSTEM_UCUM.into(),
        code: "mL".into(),
        ..Quantity::default()
    })
}

fn practitioner() -> impl Strategy<Value = dossier_api::v1::Reference> {
    ("[0-9]{10}", arb_text()).prop_map(|(value, display)| dossier_api::v1::Reference {
        target: Some(dossier_api::v1::reference::Target::Identifier(
            dossier_api::v1::Identifier {
                system: "http://hl7.org/fhir/sid/us-npi".into(),
                value,
                r#type: None,
            },
        )),
        entity_type: dossier_api::v1::EntityType::Practitioner as i32,
        display,
    })
}

fn rec(t: ResourceType, id: &str) -> dossier_api::v1::RecordRef {
    dossier_api::v1::RecordRef {
        r#type: t as i32,
        id: id.into(),
    }
}

fn notes() -> impl Strategy<Value = Vec<dossier_api::v1::Annotation>> {
    proptest::collection::vec("[A-Za-z .]{1,20}", 0..2).prop_map(|ts| {
        ts.into_iter()
            .map(|text| dossier_api::v1::Annotation {
                text,
                ..Default::default()
            })
            .collect()
    })
}

fn arb_immunization() -> impl Strategy<Value = resource::Kind> {
    (
        1i32..=2,
        proptest::sample::select(vec!["08", "140", "133", "03"]),
        arb_time(),
        proptest::option::of(arb_time()),
        proptest::option::of(any::<bool>()),
        "[A-Z0-9]{0,8}",
        proptest::option::of(arb_date()),
        proptest::option::of(arb_quantity()),
        proptest::collection::vec(practitioner(), 0..2),
        proptest::collection::vec(snomed_concept(), 0..2),
        any::<bool>(),
        notes(),
    )
        .prop_map(
            |(
                status,
                cvx,
                occurrence,
                recorded,
                primary_source,
                lot_number,
                expiration_date,
                dose,
                performers,
                reason_codes,
                with_reason,
                notes,
            )| {
                resource::Kind::Immunization(dossier_api::v1::Immunization {
                    status,
                    vaccine_code: Some(CodeableConcept {
                        codings: vec![Coding {
                            system: dossier_records::SYSTEM_CVX.into(),
                            code: cvx.into(),
                            display: "vaccine".into(),
                        }],
                        text: "vaccine".into(),
                    }),
                    encounter: Some(rec(ResourceType::Encounter, "e-1")),
                    occurrence: Some(occurrence),
                    recorded,
                    primary_source,
                    lot_number,
                    expiration_date,
                    dose,
                    performers,
                    reason_codes,
                    reason_records: if with_reason {
                        vec![rec(ResourceType::Condition, "c-1")]
                    } else {
                        vec![]
                    },
                    notes,
                    ..Default::default()
                })
            },
        )
}

fn arb_diagnostic_report() -> impl Strategy<Value = resource::Kind> {
    (
        1i32..=9,
        proptest::collection::vec(snomed_concept(), 0..2),
        loinc_concept(),
        arb_time(),
        proptest::option::of(arb_time()),
        proptest::collection::vec(practitioner(), 0..2),
        0usize..4,
        "[A-Za-z .]{0,30}",
        proptest::collection::vec(snomed_concept(), 0..2),
    )
        .prop_map(
            |(
                status,
                categories,
                code,
                effective,
                issued,
                performers,
                results,
                conclusion,
                conclusion_codes,
            )| {
                resource::Kind::DiagnosticReport(dossier_api::v1::DiagnosticReport {
                    status,
                    categories,
                    code: Some(code),
                    encounter: Some(rec(ResourceType::Encounter, "e-1")),
                    effective: Some(
                        dossier_api::v1::diagnostic_report::Effective::EffectiveTime(effective),
                    ),
                    issued,
                    performers,
                    results: (0..results)
                        .map(|i| rec(ResourceType::Observation, &format!("o-{i}")))
                        .collect(),
                    conclusion,
                    conclusion_codes,
                })
            },
        )
}

fn arb_care_plan() -> impl Strategy<Value = resource::Kind> {
    (
        (1i32..=6, 1i32..=4),
        proptest::collection::vec(snomed_concept(), 0..2),
        ("[A-Za-z ]{0,12}", "[A-Za-z .]{0,30}"),
        (arb_time(), proptest::option::of(arb_time())),
        proptest::option::of(practitioner()),
        (any::<bool>(), any::<bool>()),
        proptest::collection::vec((snomed_concept(), 1i32..=9, "[A-Za-z ]{0,12}"), 0..3),
        notes(),
    )
        .prop_map(
            |(
                (status, intent),
                categories,
                (title, description),
                (start, created),
                author,
                (addresses, goals),
                activities,
                notes,
            )| {
                resource::Kind::CarePlan(dossier_api::v1::CarePlan {
                    status,
                    intent,
                    categories,
                    title,
                    description,
                    encounter: Some(rec(ResourceType::Encounter, "e-1")),
                    period: Some(dossier_api::v1::Period {
                        start: Some(start),
                        end: None,
                    }),
                    created,
                    author,
                    addresses: if addresses {
                        vec![rec(ResourceType::Condition, "c-1")]
                    } else {
                        vec![]
                    },
                    goals: if goals {
                        vec![rec(ResourceType::Goal, "g-1")]
                    } else {
                        vec![]
                    },
                    activities: activities
                        .into_iter()
                        .map(
                            |(code, status, description)| dossier_api::v1::CarePlanActivity {
                                code: Some(code),
                                status,
                                description,
                                scheduled_period: None,
                            },
                        )
                        .collect(),
                    notes,
                })
            },
        )
}

fn arb_goal() -> impl Strategy<Value = resource::Kind> {
    (
        1i32..=8,
        proptest::option::of(snomed_concept()),
        proptest::collection::vec(snomed_concept(), 0..2),
        "[A-Za-z <.0-9]{1,30}",
        (
            proptest::option::of(arb_date()),
            proptest::option::of(arb_date()),
        ),
        proptest::collection::vec(
            (
                loinc_concept(),
                proptest::option::of(arb_quantity()),
                proptest::option::of(arb_date()),
            ),
            0..2,
        ),
        proptest::option::of(practitioner()),
        any::<bool>(),
        notes(),
    )
        .prop_map(
            |(
                lifecycle_status,
                achievement_status,
                categories,
                description,
                (start_date, status_date),
                targets,
                expressed_by,
                addresses,
                notes,
            )| {
                resource::Kind::Goal(dossier_api::v1::Goal {
                    lifecycle_status,
                    achievement_status,
                    categories,
                    priority: None,
                    description: Some(CodeableConcept {
                        codings: vec![],
                        text: description,
                    }),
                    start_date,
                    targets: targets
                        .into_iter()
                        .map(
                            |(measure, detail_quantity, due_date)| dossier_api::v1::GoalTarget {
                                measure: Some(measure),
                                detail_quantity,
                                detail_text: String::new(),
                                due_date,
                            },
                        )
                        .collect(),
                    status_date,
                    expressed_by,
                    addresses: if addresses {
                        vec![rec(ResourceType::Condition, "c-1")]
                    } else {
                        vec![]
                    },
                    notes,
                })
            },
        )
}

fn arb_imaging_study() -> impl Strategy<Value = resource::Kind> {
    let dicom = |code: &str| Coding {
        system: "http://dicom.nema.org/resources/ontology/DCM".into(),
        code: code.into(),
        display: String::new(),
    };
    (
        1i32..=4,
        "[0-9]{1,8}",
        arb_time(),
        proptest::collection::vec(
            (
                "[0-9]{1,8}",
                0u32..4,
                proptest::sample::select(vec!["DX", "CT", "MR"]),
                proptest::option::of(arb_time()),
                proptest::collection::vec(("[0-9]{1,8}", 0u32..3, "[A-Za-z ]{0,12}"), 0..3),
            ),
            0..3,
        ),
        proptest::collection::vec(snomed_concept(), 0..2),
        notes(),
    )
        .prop_map(
            move |(status, study, started, series, procedure_codes, notes)| {
                let series: Vec<dossier_api::v1::ImagingSeries> = series
                    .into_iter()
                    .map(|(uid, number, modality, started, instances)| {
                        dossier_api::v1::ImagingSeries {
                            uid: format!("1.2.840.{uid}"),
                            number,
                            modality: Some(dicom(modality)),
                            number_of_instances: instances.len() as u32,
                            body_site: None,
                            started,
                            description: String::new(),
                            instances: instances
                                .into_iter()
                                .map(|(uid, number, title)| dossier_api::v1::ImagingInstance {
                                    uid: format!("1.2.840.1.{uid}"),
                                    sop_class: Some(Coding {
                                        system: "urn:ietf:rfc:3986".into(),
                                        code: "1.2.840.10008.5.1.4.1.1.1.1".into(),
                                        display: String::new(),
                                    }),
                                    number,
                                    title,
                                })
                                .collect(),
                        }
                    })
                    .collect();
                resource::Kind::ImagingStudy(dossier_api::v1::ImagingStudy {
                    status,
                    identifiers: vec![dossier_api::v1::Identifier {
                        system: "urn:ietf:rfc:3986".into(),
                        value: format!("urn:oid:1.2.840.{study}"),
                        r#type: None,
                    }],
                    modalities: series.iter().filter_map(|s| s.modality.clone()).collect(),
                    encounter: Some(rec(ResourceType::Encounter, "e-1")),
                    started: Some(started),
                    number_of_series: series.len() as u32,
                    number_of_instances: series.iter().map(|s| s.number_of_instances).sum(),
                    procedure_codes,
                    reason_codes: vec![],
                    description: String::new(),
                    series,
                    notes,
                })
            },
        )
}

/// A typed record → FHIR JSON text → `import_resource` of that single resource gives the same
/// record, with nothing unmodelled.
fn survives_single_import(kind: resource::Kind) -> Result<(), TestCaseError> {
    let record = stored(
        Resource {
            meta: Some(Meta {
                id: "r-1".into(),
                ..Meta::default()
            }),
            kind: Some(kind.clone()),
            unmodelled_json: String::new(),
        },
        "p-1",
        1,
    );
    let text = to_fhir(&record).to_string();
    let parsed: Value = serde_json::from_str(&text).unwrap();
    let references: BTreeMap<String, String> = references_in(&parsed)
        .into_iter()
        .map(|r| (r.clone(), r))
        .collect();
    let back = import_resource(&parsed, "p-1", &references, &ImportOptions::default())
        .map_err(|p| TestCaseError::fail(format!("{p:?}\n{text}")))?;
    prop_assert_eq!(back.kind, Some(kind));
    prop_assert_eq!(back.unmodelled_json, "");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn immunizations_survive_fhir(kind in arb_immunization()) {
        survives_single_import(kind)?;
    }

    #[test]
    fn diagnostic_reports_survive_fhir(kind in arb_diagnostic_report()) {
        survives_single_import(kind)?;
    }

    #[test]
    fn care_plans_survive_fhir(kind in arb_care_plan()) {
        survives_single_import(kind)?;
    }

    #[test]
    fn goals_survive_fhir(kind in arb_goal()) {
        survives_single_import(kind)?;
    }

    #[test]
    fn imaging_studies_survive_fhir(kind in arb_imaging_study()) {
        survives_single_import(kind)?;
    }

    /// The existing kinds, from the synthetic patient generator, one resource at a time.
    #[test]
    fn synthetic_records_survive_single_import(seed in 0u64..1_000, index in 0u64..1_000) {
        let p = dossier_records::synth::patient(seed, index);
        for r in p.records.iter().take(12) {
            survives_single_import(r.kind.clone().unwrap())?;
        }
    }
}

/// Times written in another form than Dossier's (`Z`, a one-digit fraction) come back as the
/// same instant, precision and offset in Dossier's form: the typed time is the value, and a
/// kept source text could resurrect a time a later update removed.
#[test]
fn times_in_another_form_come_back_as_the_same_instant() {
    let (_, mut bundle) = samples().into_iter().next().unwrap();
    let i = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["resource"]["resourceType"] == json!("Observation"))
        .unwrap();
    bundle["entry"][i]["resource"]["effectiveDateTime"] = json!("2015-08-23T01:16:09Z");
    bundle["entry"][i]["resource"]["issued"] = json!("2015-08-23T03:16:09.5+02:00");
    let imported = import_bundle(&bundle, &ImportOptions::default()).unwrap();
    let pid = imported.patient.meta.as_ref().unwrap().id.clone();
    let url = bundle["entry"][i]["fullUrl"].as_str().unwrap();
    let record = imported
        .records
        .iter()
        .find(|r| r.meta.as_ref().unwrap().source == url)
        .unwrap();
    let exported = to_fhir(&stored(record.clone(), &pid, 1));
    let changed = lost_or_changed(&bundle["entry"][i]["resource"], &exported);
    let paths: Vec<&str> = changed.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(paths, vec!["effectiveDateTime", "issued"]);
    for (_, was, now) in changed {
        let (was, now) = (was.as_str().unwrap().to_owned(), now.unwrap());
        assert_eq!(
            parse_date_time(&was),
            parse_date_time(now.as_str().unwrap())
        );
    }
    assert_eq!(exported["issued"], json!("2015-08-23T03:16:09.500+02:00"));
    assert!(
        !record.unmodelled_json.contains("2015-08-23"),
        "{}",
        record.unmodelled_json
    );
}

/// A practitioner without an identifier cannot be referred to: the records that refer to it are
/// quarantined (and those that refer to them), the patient imports.
#[test]
fn references_to_a_practitioner_without_identifier_quarantine_the_record() {
    let (_, mut bundle) = samples().into_iter().next().unwrap();
    let entries = bundle["entry"].as_array().unwrap().clone();
    let p = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == json!("Practitioner"))
        .unwrap();
    bundle["entry"][p]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("identifier");
    let url = entries[p]["fullUrl"].as_str().unwrap();
    let referring: BTreeSet<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            !BILLING_TYPES.contains(&e["resource"]["resourceType"].as_str().unwrap())
                && references_in(&e["resource"]).contains(url)
        })
        .map(|(i, _)| i)
        .collect();
    assert!(!referring.is_empty());
    let imported = import_bundle(&bundle, &ImportOptions::default()).unwrap();
    let held: BTreeSet<usize> = imported.quarantined.iter().map(|q| q.entry).collect();
    assert!(referring.is_subset(&held), "{referring:?} {held:?}");
    for q in &imported.quarantined {
        if referring.contains(&q.entry) {
            assert!(
                q.problems[0].message.contains("without an identifier"),
                "{q:?}"
            );
            assert_eq!(q.references.get(url).map(String::as_str), Some(""));
        } else {
            assert!(q.problems[0].message.contains("quarantined"), "{q:?}");
        }
    }
    let refuse = ImportOptions {
        on_invalid: OnInvalid::Refuse,
        ..ImportOptions::default()
    };
    let problems = import_bundle(&bundle, &refuse).unwrap_err();
    assert!(problems.iter().any(|x| x.entry == Some(p)), "{problems:?}");
}

/// JSON pointers of every object in a value.
fn object_pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            out.push(at.clone());
            for (k, x) in m {
                object_pointers(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                object_pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn arb_unmodelled_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        "[A-Za-z0-9 ]{0,10}".prop_map(Value::String),
        any::<bool>().prop_map(Value::Bool),
        "-?(0|[1-9][0-9]{0,6})(\\.[0-9]{1,4})?"
            .prop_map(|t| serde_json::from_str::<Value>(&t).unwrap()),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 1..3).prop_map(Value::Array),
            proptest::collection::btree_map("zz[a-z]{1,4}", inner, 1..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Lossless beyond the sample: elements Dossier does not model, added anywhere in an
    /// exported record (any object, any depth), survive import then export, leaf by leaf.
    #[test]
    fn added_unmodelled_elements_survive_import_and_export(
        seed in 0u64..1_000,
        pick in any::<prop::sample::Index>(),
        additions in proptest::collection::vec(
            (any::<prop::sample::Index>(), "zz[A-Za-z]{1,6}", arb_unmodelled_value()),
            1..5,
        ),
    ) {
        let p = dossier_records::synth::patient(seed, 1);
        let record = pick.get(&p.records);
        let mut source = to_fhir(&stored(record.clone(), "p-1", 1));
        for (at, key, value) in additions {
            let mut pointers = Vec::new();
            object_pointers(&source, String::new(), &mut pointers);
            let target = at.get(&pointers).clone();
            if let Some(Value::Object(m)) = source.pointer_mut(&target) {
                m.insert(key, value);
            }
        }
        let source: Value = serde_json::from_str(&source.to_string()).unwrap();
        let references: BTreeMap<String, String> =
            references_in(&source).into_iter().map(|r| (r.clone(), r)).collect();
        let back = import_resource(&source, "p-1", &references, &ImportOptions::default())
            .map_err(|e| TestCaseError::fail(format!("{e:?}\n{source}")))?;
        prop_assert_eq!(&back.kind, &record.kind);
        prop_assert!(back.unmodelled_json.contains("zz"), "{}", back.unmodelled_json);
        let again = to_fhir(&stored(back, "p-1", 1));
        let lost = lost_or_changed(&source, &again);
        prop_assert!(lost.is_empty(), "{:?}\nsource {}\nexport {}", lost, source, again);
    }
}
