//! A deterministic synthetic patient generator: the same seed and index always give the same
//! patient and records. Belgian identifiers with valid check digits, real LOINC, SNOMED CT,
//! RxNorm and UCUM codes, a realistic mix of encounters, vital signs and labs, conditions,
//! medications, allergies, discharge letters and the GP's care relationship. For the
//! playground, the tests and the benchmarks; no real person's data.

use crate::{SYSTEM_INSZ, SYSTEM_LOINC, SYSTEM_SNOMED, SYSTEM_UCUM};
use dossier_api::v1::{
    Address, AllergyCategory, AllergyClinicalStatus, AllergyIntolerance, AllergyType,
    CareRelationship, CareRelationshipStatus, ClinicalCondition, CodeableConcept, Coding,
    ConditionClinicalStatus, Date, DatePrecision, DateTime, DocumentContent, DocumentReference,
    DocumentReferenceStatus, Dosage, Encounter, EncounterStatus, EntityType, HumanName, Identifier,
    MedicationRequest, MedicationRequestIntent, MedicationRequestStatus, Meta, Observation,
    ObservationStatus, ObservationValue, Patient, Period, Quantity, RecordRef, Reference, Resource,
    ResourceType, TimeUnit, document_content, observation, observation_value, reference, resource,
};

const SYSTEM_NIHDI: &str = "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/nihdi";
const SYSTEM_CBE: &str = "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/cbe";
const SYSTEM_RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const SYSTEM_ACT: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const SYSTEM_OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

const FAMILY: &[&str] = &[
    "Peeters", "Janssens", "Maes", "Jacobs", "Mertens", "Willems", "Claes", "Goossens", "Wouters",
    "De Smet", "Dubois", "Lambert", "Dupont", "Martin", "Simon", "Leclercq", "Hermans", "Aerts",
];
const GIVEN_F: &[&str] = &[
    "Emma", "Louise", "Marie", "Olivia", "Elise", "Noor", "Lina", "Camille", "Anna", "Julie",
];
const GIVEN_M: &[&str] = &[
    "Noah", "Louis", "Lucas", "Arthur", "Liam", "Jules", "Adam", "Victor", "Finn", "Thomas",
];
const CITIES: &[(&str, &str)] = &[
    ("Gent", "9000"),
    ("Antwerpen", "2000"),
    ("Brussel", "1000"),
    ("Leuven", "3000"),
    ("Brugge", "8000"),
    ("Liège", "4000"),
    ("Namur", "5000"),
    ("Hasselt", "3500"),
];
/// (CBE number, name) of hospitals.
const HOSPITALS: &[(&str, &str)] = &[
    ("0256070171", "AZ Sint-Jan"),
    ("0410448543", "UZ Gent"),
    ("0419052272", "UZ Leuven"),
    ("0200452960", "CHU de Liège"),
];

/// (LOINC, display, UCUM unit, low, high, decimals).
const VITALS: &[(&str, &str, &str, f64, f64, u32)] = &[
    ("8302-2", "Body height", "cm", 150.0, 195.0, 1),
    ("29463-7", "Body weight", "kg", 50.0, 120.0, 1),
    ("8867-4", "Heart rate", "/min", 55.0, 100.0, 0),
    (
        "8480-6",
        "Systolic blood pressure",
        "mm[Hg]",
        100.0,
        170.0,
        0,
    ),
    (
        "8462-4",
        "Diastolic blood pressure",
        "mm[Hg]",
        60.0,
        100.0,
        0,
    ),
    ("8310-5", "Body temperature", "Cel", 36.0, 38.5, 1),
];
const LABS: &[(&str, &str, &str, f64, f64, u32)] = &[
    (
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        "mg/dL",
        70.0,
        180.0,
        0,
    ),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.5,
        9.5,
        1,
    ),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        0.5,
        1.8,
        2,
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        140.0,
        280.0,
        0,
    ),
    (
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        11.0,
        17.0,
        1,
    ),
];
/// (SNOMED CT, display, RxNorm of a treatment, its display).
const CONDITIONS: &[(&str, &str, &str, &str)] = &[
    (
        "38341003",
        "Hypertensive disorder",
        "314076",
        "lisinopril 10 MG Oral Tablet",
    ),
    (
        "44054006",
        "Diabetes mellitus type 2",
        "860975",
        "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
    ),
    (
        "195967001",
        "Asthma",
        "745679",
        "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
    ),
    (
        "55822004",
        "Hyperlipidemia",
        "617312",
        "atorvastatin 10 MG Oral Tablet",
    ),
    ("162864005", "Body mass index 30+ - obesity", "", ""),
    ("15777000", "Prediabetes", "", ""),
];
const ALLERGIES: &[(&str, &str, AllergyCategory)] = &[
    (
        "91936005",
        "Allergy to penicillin",
        AllergyCategory::Medication,
    ),
    ("91935009", "Allergy to peanuts", AllergyCategory::Food),
    ("300913006", "Shellfish allergy", AllergyCategory::Food),
];

/// splitmix64: small, seedable, and the same on every run (also the benchmarks' key chooser).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

fn coding(system: &str, code: &str, display: &str) -> Coding {
    Coding {
        system: system.into(),
        code: code.into(),
        display: display.into(),
    }
}

fn concept(system: &str, code: &str, display: &str) -> CodeableConcept {
    CodeableConcept {
        codings: vec![coding(system, code, display)],
        text: display.into(),
    }
}

fn at(micros: i64) -> DateTime {
    DateTime {
        unix_micros: micros,
        precision: DatePrecision::Time as i32,
        utc_offset_minutes: 60,
    }
}

fn record(id: String, kind: resource::Kind) -> Resource {
    Resource {
        meta: Some(Meta {
            id,
            ..Meta::default()
        }),
        kind: Some(kind),
        unmodelled_json: String::new(),
    }
}

fn enc_ref(id: &str) -> Option<RecordRef> {
    Some(RecordRef {
        r#type: ResourceType::Encounter as i32,
        id: id.into(),
    })
}

fn by_identifier(entity: EntityType, system: &str, value: &str, display: &str) -> Reference {
    Reference {
        target: Some(reference::Target::Identifier(Identifier {
            system: system.into(),
            value: value.into(),
            r#type: None,
        })),
        entity_type: entity as i32,
        display: display.into(),
    }
}

/// A valid INSZ number for a birth date, a serial and a century.
fn insz(year: u32, month: u32, day: u32, serial: u32) -> String {
    let first9 = u64::from(year % 100) * 10_000_000
        + u64::from(month) * 100_000
        + u64::from(day) * 1_000
        + u64::from(serial);
    crate::insz_with_check(first9, year >= 2000)
}

/// A generated patient: its Patient record and its other records, in an order where every
/// reference points to an earlier record.
#[derive(Debug, Clone)]
pub struct SynthPatient {
    pub patient: Resource,
    pub records: Vec<Resource>,
}

impl SynthPatient {
    pub fn id(&self) -> &str {
        self.patient.meta.as_ref().map_or("", |m| m.id.as_str())
    }
}

/// The id of patient `index` of generation `seed`.
pub fn patient_id(seed: u64, index: u64) -> String {
    format!("synth-{seed}-{index}")
}

/// Patient `index` of generation `seed`, about 30 to 300 records.
pub fn patient(seed: u64, index: u64) -> SynthPatient {
    let mut rng = Rng(seed.wrapping_mul(0x1000_0000_01b3) ^ index.wrapping_mul(0x9e37_79b9));
    let pid = patient_id(seed, index);
    // Birth date and serial follow from the index, so that no two patients of one generation
    // share an INSZ number (below 998 × 28,560 patients): the serial takes the index modulo
    // 998, and a permutation of the birth dates (7919 is prime to 85 × 336) the rest.
    let serial = (index % 998) as u32 + 1;
    let female = serial.is_multiple_of(2);
    let d = ((index / 998) * 7919 + seed) % (85 * 336);
    let (year, month, day) = (
        1935 + (d / 336) as u32,
        1 + (d % 336 / 28) as u32,
        1 + (d % 28) as u32,
    );
    let (city, postal) = *rng.pick(CITIES);
    let gp_nihdi = format!("1{:010}", rng.below(10_000_000_000));
    let gp_name = format!("Dr. {}", rng.pick(FAMILY));
    let patient = record(
        pid.clone(),
        resource::Kind::Patient(Patient {
            identifiers: vec![Identifier {
                system: SYSTEM_INSZ.into(),
                value: insz(year, month, day, serial),
                r#type: None,
            }],
            names: vec![HumanName {
                family: (*rng.pick(FAMILY)).into(),
                given: vec![(*rng.pick(if female { GIVEN_F } else { GIVEN_M })).into()],
                ..HumanName::default()
            }],
            gender: if female { 2 } else { 1 },
            birth_date: Some(Date { year, month, day }),
            addresses: vec![Address {
                lines: vec![format!("{}straat {}", rng.pick(FAMILY), 1 + rng.below(200))],
                city: city.into(),
                postal_code: postal.into(),
                country: "BE".into(),
                ..Address::default()
            }],
            general_practitioners: vec![by_identifier(
                EntityType::Practitioner,
                SYSTEM_NIHDI,
                &gp_nihdi,
                &gp_name,
            )],
            languages: vec![if rng.chance(60) { "nl-BE" } else { "fr-BE" }.into()],
            ..Patient::default()
        }),
    );
    let mut records = Vec::new();
    let born = ((i64::from(year) - 1970) * 365 + i64::from(month) * 30) * 86_400_000_000;
    let now = 1_790_000_000_000_000i64;
    records.push(record(
        format!("{pid}-gp"),
        resource::Kind::CareRelationship(CareRelationship {
            status: CareRelationshipStatus::Active as i32,
            participant: Some(by_identifier(
                EntityType::Practitioner,
                SYSTEM_NIHDI,
                &gp_nihdi,
                &gp_name,
            )),
            role: Some(concept(SYSTEM_SNOMED, "62247001", "General practitioner")),
            period: Some(Period {
                start: Some(at(now - 5 * 365 * 86_400_000_000)),
                end: None,
            }),
            ..CareRelationship::default()
        }),
    ));
    let conditions: Vec<usize> = (0..CONDITIONS.len()).filter(|_| rng.chance(25)).collect();
    if rng.chance(20) {
        let (code, display, category) = *rng.pick(ALLERGIES);
        records.push(record(
            format!("{pid}-allergy"),
            resource::Kind::AllergyIntolerance(AllergyIntolerance {
                clinical_status: AllergyClinicalStatus::Active as i32,
                r#type: AllergyType::Allergy as i32,
                categories: vec![category as i32],
                code: Some(concept(SYSTEM_SNOMED, code, display)),
                recorded: Some(at(born + 20 * 365 * 86_400_000_000)),
                ..AllergyIntolerance::default()
            }),
        ));
    }
    let encounters = 2 + rng.below(10);
    for e in 0..encounters {
        let start = now - (encounters - e) as i64 * (30 + rng.below(300) as i64) * 86_400_000_000;
        let inpatient = rng.chance(15);
        let (class, display, hours) = if inpatient {
            ("IMP", "inpatient encounter", 24 * (1 + rng.below(7)) as i64)
        } else if rng.chance(10) {
            ("EMER", "emergency", 3)
        } else {
            ("AMB", "ambulatory", 1)
        };
        let (cbe, hospital) = *rng.pick(HOSPITALS);
        let eid = format!("{pid}-e{e}");
        let end = start + hours * 3_600_000_000;
        records.push(record(
            eid.clone(),
            resource::Kind::Encounter(Encounter {
                status: EncounterStatus::Finished as i32,
                encounter_class: Some(coding(SYSTEM_ACT, class, display)),
                types: vec![concept(
                    SYSTEM_SNOMED,
                    "185349003",
                    "Encounter for check up",
                )],
                period: Some(Period {
                    start: Some(at(start)),
                    end: Some(at(end)),
                }),
                service_provider: Some(by_identifier(
                    EntityType::Organization,
                    SYSTEM_CBE,
                    cbe,
                    hospital,
                )),
                ..Encounter::default()
            }),
        ));
        let mut n = 0;
        let mut observe =
            |rng: &mut Rng,
             (code, name, unit, lo, hi, places): (&str, &str, &str, f64, f64, u32),
             category: &str,
             records: &mut Vec<Resource>| {
                let value = format!("{:.*}", places as usize, rng.range(lo, hi));
                records.push(record(
                    format!("{eid}-o{n}"),
                    resource::Kind::Observation(Observation {
                        status: ObservationStatus::Final as i32,
                        categories: vec![concept(SYSTEM_OBS_CATEGORY, category, category)],
                        code: Some(concept(SYSTEM_LOINC, code, name)),
                        encounter: enc_ref(&eid),
                        effective: Some(observation::Effective::EffectiveTime(at(
                            start + 600_000_000
                        ))),
                        value: Some(ObservationValue {
                            kind: Some(observation_value::Kind::Quantity(Quantity {
                                value,
                                unit: unit.into(),
                                system: SYSTEM_UCUM.into(),
                                code: unit.into(),
                                ..Quantity::default()
                            })),
                        }),
                        ..Observation::default()
                    }),
                ));
                n += 1;
            };
        for v in VITALS {
            if rng.chance(80) {
                observe(&mut rng, *v, "vital-signs", &mut records);
            }
        }
        for l in LABS {
            if rng.chance(if inpatient { 90 } else { 35 }) {
                observe(&mut rng, *l, "laboratory", &mut records);
            }
        }
        if e == 0 {
            for &c in &conditions {
                let (code, name, rx, rx_name) = CONDITIONS[c];
                records.push(record(
                    format!("{pid}-c{c}"),
                    resource::Kind::Condition(ClinicalCondition {
                        clinical_status: ConditionClinicalStatus::Active as i32,
                        code: Some(concept(SYSTEM_SNOMED, code, name)),
                        encounter: enc_ref(&eid),
                        onset: Some(at(start)),
                        recorded: Some(at(start)),
                        ..ClinicalCondition::default()
                    }),
                ));
                if !rx.is_empty() {
                    records.push(record(
                        format!("{pid}-m{c}"),
                        resource::Kind::MedicationRequest(MedicationRequest {
                            status: MedicationRequestStatus::Active as i32,
                            intent: MedicationRequestIntent::Order as i32,
                            medication: Some(concept(SYSTEM_RXNORM, rx, rx_name)),
                            encounter: enc_ref(&eid),
                            authored_on: Some(at(start)),
                            reason_records: vec![RecordRef {
                                r#type: ResourceType::Condition as i32,
                                id: format!("{pid}-c{c}"),
                            }],
                            dosage_instructions: vec![Dosage {
                                sequence: 1,
                                text: "1 tablet daily".into(),
                                frequency: 1,
                                period: "1".into(),
                                period_unit: TimeUnit::Day as i32,
                                ..Dosage::default()
                            }],
                            ..MedicationRequest::default()
                        }),
                    ));
                }
            }
        }
        if inpatient {
            let words = 80 + rng.below(400) as usize;
            let mut text = format!("Discharge letter, {hospital}.\n\nAdmitted for observation. ");
            for w in 0..words {
                text.push_str(
                    [
                        "stable",
                        "afebrile",
                        "follow-up",
                        "labs",
                        "normal",
                        "improved",
                        "home",
                        "GP",
                    ][(w * 7 + rng.below(8) as usize) % 8],
                );
                text.push(' ');
            }
            records.push(record(
                format!("{eid}-letter"),
                resource::Kind::DocumentReference(DocumentReference {
                    status: DocumentReferenceStatus::Current as i32,
                    r#type: Some(concept(SYSTEM_LOINC, "18842-5", "Discharge summary")),
                    date: Some(at(end)),
                    authors: vec![by_identifier(
                        EntityType::Organization,
                        SYSTEM_CBE,
                        cbe,
                        hospital,
                    )],
                    encounter: enc_ref(&eid),
                    content: Some(DocumentContent {
                        content_type: "text/plain".into(),
                        language: "nl-BE".into(),
                        title: "Ontslagbrief".into(),
                        data: Some(document_content::Data::Text(text)),
                    }),
                    ..DocumentReference::default()
                }),
            ));
        }
    }
    // Conditions and medications were created at the first encounter; keep references backward.
    records.sort_by_key(|r| match r.kind.as_ref().map(crate::kind_type) {
        Some(ResourceType::CareRelationship) => 0,
        Some(ResourceType::AllergyIntolerance) => 1,
        Some(ResourceType::Encounter) => 2,
        Some(ResourceType::Condition) => 3,
        Some(ResourceType::MedicationRequest) => 4,
        _ => 5,
    });
    SynthPatient { patient, records }
}

/// An observation for patient `pid` (a new record each call: appended by the benchmarks).
pub fn observation(id: String, n: u64) -> Resource {
    let (code, name, unit, lo, hi, places) = VITALS[(n % VITALS.len() as u64) as usize];
    let mut rng = Rng(n);
    record(
        id,
        resource::Kind::Observation(Observation {
            status: ObservationStatus::Final as i32,
            categories: vec![concept(SYSTEM_OBS_CATEGORY, "vital-signs", "vital-signs")],
            code: Some(concept(SYSTEM_LOINC, code, name)),
            effective: Some(observation::Effective::EffectiveTime(at(
                1_790_000_000_000_000 + n as i64,
            ))),
            value: Some(ObservationValue {
                kind: Some(observation_value::Kind::Quantity(Quantity {
                    value: format!("{:.*}", places as usize, rng.range(lo, hi)),
                    unit: unit.into(),
                    system: SYSTEM_UCUM.into(),
                    code: unit.into(),
                    ..Quantity::default()
                })),
            }),
            ..Observation::default()
        }),
    )
}

/// An admission as one transaction's records: an inpatient encounter, vital signs referring to
/// it and a discharge letter.
pub fn admission(pid: &str, tag: &str, n: u64) -> Vec<Resource> {
    let eid = format!("{pid}-adm-{tag}");
    let start = 1_790_000_000_000_000 + n as i64 * 1_000_000;
    let mut out = vec![record(
        eid.clone(),
        resource::Kind::Encounter(Encounter {
            status: EncounterStatus::Finished as i32,
            encounter_class: Some(coding(SYSTEM_ACT, "IMP", "inpatient encounter")),
            period: Some(Period {
                start: Some(at(start)),
                end: Some(at(start + 86_400_000_000)),
            }),
            ..Encounter::default()
        }),
    )];
    for k in 0..3 {
        let mut o = observation(format!("{eid}-o{k}"), n * 3 + k);
        if let Some(resource::Kind::Observation(x)) = o.kind.as_mut() {
            x.encounter = enc_ref(&eid);
        }
        out.push(o);
    }
    out.push(record(
        format!("{eid}-letter"),
        resource::Kind::DocumentReference(DocumentReference {
            status: DocumentReferenceStatus::Current as i32,
            r#type: Some(concept(SYSTEM_LOINC, "18842-5", "Discharge summary")),
            encounter: enc_ref(&eid),
            content: Some(DocumentContent {
                content_type: "text/plain".into(),
                data: Some(document_content::Data::Text(
                    "Discharged home in good condition. Follow-up by the GP in two weeks.".into(),
                )),
                ..DocumentContent::default()
            }),
            ..DocumentReference::default()
        }),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, validate_new_record};

    #[test]
    fn patients_are_deterministic_valid_and_varied() {
        let mut total = 0;
        let mut kinds = std::collections::BTreeMap::new();
        for i in 0..200 {
            let p = patient(7, i);
            assert_eq!(p.patient, patient(7, i).patient);
            assert_eq!(p.records, patient(7, i).records);
            validate_new_record(&p.patient, "resource", p.id(), &Limits::default())
                .unwrap_or_else(|e| panic!("patient {i}: {e}"));
            let ids: std::collections::HashSet<&str> = p
                .records
                .iter()
                .map(|r| r.meta.as_ref().unwrap().id.as_str())
                .collect();
            assert_eq!(ids.len(), p.records.len(), "duplicate ids in patient {i}");
            for r in &p.records {
                validate_new_record(r, "resource", p.id(), &Limits::default()).unwrap_or_else(
                    |e| panic!("patient {i}, {}: {e}", r.meta.as_ref().unwrap().id),
                );
                *kinds
                    .entry(crate::kind_type(r.kind.as_ref().unwrap()) as i32)
                    .or_insert(0) += 1;
            }
            total += p.records.len();
        }
        // Every kind but Consent and Procedure shows up, and the mix is clinical.
        for t in [
            ResourceType::Encounter,
            ResourceType::Observation,
            ResourceType::Condition,
            ResourceType::MedicationRequest,
            ResourceType::AllergyIntolerance,
            ResourceType::DocumentReference,
            ResourceType::CareRelationship,
        ] {
            assert!(
                kinds.get(&(t as i32)).copied().unwrap_or(0) > 0,
                "{t:?} never generated"
            );
        }
        assert!((20 * 200..300 * 200).contains(&total), "{total} records");
        assert_ne!(patient(7, 1).patient, patient(8, 1).patient);
        // No two patients of a generation share an identifier.
        let mut seen = std::collections::HashSet::new();
        for i in 0..5_000 {
            let Some(resource::Kind::Patient(p)) = patient(3, i).patient.kind else {
                panic!()
            };
            assert!(
                seen.insert(p.identifiers[0].value.clone()),
                "patient {i} repeats an INSZ"
            );
        }
        for r in admission("p", "x", 3)
            .iter()
            .chain([observation("o".into(), 5)].iter())
        {
            validate_new_record(r, "resource", "p", &Limits::default()).unwrap();
        }
    }
}
