//! `dossier-records`: the clinical record layer, built on the key-value primitives of one shard
//! as a record layer is built on a key-value store (docs/architecture.md, docs/schema.md).
//!
//! - Schema: the typed kinds of `dossier.v1.Resource`, their names and validation.
//! - [`keys`]: the one key map of a patient's data ([`PatientId`] is the one patient-id rule).
//! - [`plan`]: a write as a pure function from reads to one conditional batch whose conditions
//!   are named; [`idempotency`]: request fingerprints and stored answers.
//! - [`mpi`]: the master patient index protocol; [`index`] and [`search`]: per-patient search
//!   indexes kept in the same batch as the record; [`quarantine`]: records set aside on import.
//! - [`care`]: where a clinician stands with a patient (care relationships, consents).
//! - [`history`] and [`everything`]: reading versions and a patient's records in stamp order.
//!
//! Non-goals: no gRPC, no networking, no Raft; the node adapts these to its services and store.

pub mod care;
mod codes;
mod error;
pub mod everything;
pub mod history;
pub mod idempotency;
pub mod index;
pub mod keys;
mod kinds;
pub mod kv;
pub mod mpi;
pub mod plan;
pub mod quarantine;
pub mod search;
#[cfg(test)]
mod testing;
mod validate;

pub use codes::{insz_is_valid, insz_with_check, loinc_is_valid, snomed_is_valid};
pub use error::Error;
pub use keys::{Ident, PatientId, PatientKeys};
pub use kinds::immunization::SYSTEM_CVX;
pub use validate::{Invalid, Limits, validate_new_record, validate_record_content};

use dossier_api::v1::{RecordRef, Reference, Resource, ResourceType, reference, resource};

/// Identifier system of the Belgian national number (INSZ/NISS) and BIS number.
pub const SYSTEM_INSZ: &str = "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/ssin";
pub const SYSTEM_LOINC: &str = "http://loinc.org";
pub const SYSTEM_SNOMED: &str = "http://snomed.info/sct";
pub const SYSTEM_UCUM: &str = "http://unitsofmeasure.org";

/// Every kind, in `ResourceType` order.
pub const RESOURCE_TYPES: [ResourceType; 15] = [
    ResourceType::Patient,
    ResourceType::Encounter,
    ResourceType::Observation,
    ResourceType::Condition,
    ResourceType::AllergyIntolerance,
    ResourceType::MedicationRequest,
    ResourceType::Procedure,
    ResourceType::DocumentReference,
    ResourceType::CareRelationship,
    ResourceType::Consent,
    ResourceType::Immunization,
    ResourceType::DiagnosticReport,
    ResourceType::CarePlan,
    ResourceType::Goal,
    ResourceType::ImagingStudy,
];

/// The FHIR type name of a kind (also its name in storage keys: fixed forever).
pub fn type_name(t: ResourceType) -> Option<&'static str> {
    Some(match t {
        ResourceType::Unspecified => return None,
        ResourceType::Patient => "Patient",
        ResourceType::Encounter => "Encounter",
        ResourceType::Observation => "Observation",
        ResourceType::Condition => "Condition",
        ResourceType::AllergyIntolerance => "AllergyIntolerance",
        ResourceType::MedicationRequest => "MedicationRequest",
        ResourceType::Procedure => "Procedure",
        ResourceType::DocumentReference => "DocumentReference",
        ResourceType::CareRelationship => "CareRelationship",
        ResourceType::Consent => "Consent",
        ResourceType::Immunization => "Immunization",
        ResourceType::DiagnosticReport => "DiagnosticReport",
        ResourceType::CarePlan => "CarePlan",
        ResourceType::Goal => "Goal",
        ResourceType::ImagingStudy => "ImagingStudy",
    })
}

/// The kind named `name` (FHIR type name).
pub fn type_from_name(name: &str) -> Option<ResourceType> {
    RESOURCE_TYPES
        .into_iter()
        .find(|t| type_name(*t) == Some(name))
}

/// The kind a resource holds.
pub fn kind_type(kind: &resource::Kind) -> ResourceType {
    match kind {
        resource::Kind::Patient(_) => ResourceType::Patient,
        resource::Kind::Encounter(_) => ResourceType::Encounter,
        resource::Kind::Observation(_) => ResourceType::Observation,
        resource::Kind::Condition(_) => ResourceType::Condition,
        resource::Kind::AllergyIntolerance(_) => ResourceType::AllergyIntolerance,
        resource::Kind::MedicationRequest(_) => ResourceType::MedicationRequest,
        resource::Kind::Procedure(_) => ResourceType::Procedure,
        resource::Kind::DocumentReference(_) => ResourceType::DocumentReference,
        resource::Kind::CareRelationship(_) => ResourceType::CareRelationship,
        resource::Kind::Consent(_) => ResourceType::Consent,
        resource::Kind::Immunization(_) => ResourceType::Immunization,
        resource::Kind::DiagnosticReport(_) => ResourceType::DiagnosticReport,
        resource::Kind::CarePlan(_) => ResourceType::CarePlan,
        resource::Kind::Goal(_) => ResourceType::Goal,
        resource::Kind::ImagingStudy(_) => ResourceType::ImagingStudy,
    }
}

/// The proto field name of a kind in `Resource.kind` (for error paths).
pub fn kind_field(t: ResourceType) -> &'static str {
    match t {
        ResourceType::Unspecified => "kind",
        ResourceType::Patient => "patient",
        ResourceType::Encounter => "encounter",
        ResourceType::Observation => "observation",
        ResourceType::Condition => "condition",
        ResourceType::AllergyIntolerance => "allergy_intolerance",
        ResourceType::MedicationRequest => "medication_request",
        ResourceType::Procedure => "procedure",
        ResourceType::DocumentReference => "document_reference",
        ResourceType::CareRelationship => "care_relationship",
        ResourceType::Consent => "consent",
        ResourceType::Immunization => "immunization",
        ResourceType::DiagnosticReport => "diagnostic_report",
        ResourceType::CarePlan => "care_plan",
        ResourceType::Goal => "goal",
        ResourceType::ImagingStudy => "imaging_study",
    }
}

/// Every reference to a record of the same patient a resource holds, with its path under
/// `prefix` (e.g. `resource.observation.encounter`): direct `RecordRef`s and `Reference`s whose
/// target is a record.
pub fn record_refs(r: &Resource, prefix: &str) -> Vec<(String, RecordRef)> {
    use resource::Kind as K;
    let Some(kind) = &r.kind else {
        return Vec::new();
    };
    let base = format!("{prefix}.{}", kind_field(kind_type(kind)));
    let mut out: Vec<(String, RecordRef)> = Vec::new();
    let mut direct = |path: &str, x: Option<&RecordRef>| {
        if let Some(x) = x {
            out.push((format!("{base}.{path}"), x.clone()));
        }
    };
    let mut refs: Vec<(String, Reference)> = Vec::new();
    let mut reference = |path: String, x: Option<&Reference>| {
        if let Some(x) = x {
            refs.push((path, x.clone()));
        }
    };
    macro_rules! each {
        ($name:literal, $xs:expr) => {
            for (i, x) in $xs.iter().enumerate() {
                reference(format!("{base}.{}[{i}]", $name), Some(x));
            }
        };
    }
    macro_rules! notes {
        ($xs:expr) => {
            for (i, n) in $xs.iter().enumerate() {
                reference(format!("{base}.notes[{i}].author"), n.author.as_ref());
            }
        };
    }
    match kind {
        K::Patient(x) => each!("general_practitioners", x.general_practitioners),
        K::Encounter(x) => {
            for (i, rr) in x.reason_records.iter().enumerate() {
                direct(&format!("reason_records[{i}]"), Some(rr));
            }
            reference(
                format!("{base}.service_provider"),
                x.service_provider.as_ref(),
            );
            for (i, p) in x.participants.iter().enumerate() {
                reference(
                    format!("{base}.participants[{i}].individual"),
                    p.individual.as_ref(),
                );
            }
        }
        K::Observation(x) => {
            direct("encounter", x.encounter.as_ref());
            each!("performers", x.performers);
            notes!(x.notes);
        }
        K::Condition(x) => {
            direct("encounter", x.encounter.as_ref());
            reference(format!("{base}.asserter"), x.asserter.as_ref());
            notes!(x.notes);
        }
        K::AllergyIntolerance(x) => {
            direct("encounter", x.encounter.as_ref());
            reference(format!("{base}.recorder"), x.recorder.as_ref());
            notes!(x.notes);
        }
        K::MedicationRequest(x) => {
            direct("encounter", x.encounter.as_ref());
            for (i, rr) in x.reason_records.iter().enumerate() {
                direct(&format!("reason_records[{i}]"), Some(rr));
            }
            reference(format!("{base}.requester"), x.requester.as_ref());
            notes!(x.notes);
        }
        K::Procedure(x) => {
            direct("encounter", x.encounter.as_ref());
            for (i, rr) in x.reason_records.iter().enumerate() {
                direct(&format!("reason_records[{i}]"), Some(rr));
            }
            each!("performers", x.performers);
            notes!(x.notes);
        }
        K::DocumentReference(x) => {
            direct("encounter", x.encounter.as_ref());
            each!("authors", x.authors);
        }
        K::CareRelationship(x) => {
            reference(format!("{base}.participant"), x.participant.as_ref());
            reference(
                format!("{base}.managing_organization"),
                x.managing_organization.as_ref(),
            );
        }
        K::Consent(x) => {
            direct("source", x.source.as_ref());
            each!("performers", x.performers);
            for (i, a) in x.actors.iter().enumerate() {
                reference(
                    format!("{base}.actors[{i}].reference"),
                    a.reference.as_ref(),
                );
            }
        }
        K::Immunization(x) => {
            direct("encounter", x.encounter.as_ref());
            each!("performers", x.performers);
            for (i, rr) in x.reason_records.iter().enumerate() {
                direct(&format!("reason_records[{i}]"), Some(rr));
            }
            notes!(x.notes);
        }
        K::DiagnosticReport(x) => {
            direct("encounter", x.encounter.as_ref());
            each!("performers", x.performers);
            for (i, rr) in x.results.iter().enumerate() {
                direct(&format!("results[{i}]"), Some(rr));
            }
        }
        K::CarePlan(x) => {
            direct("encounter", x.encounter.as_ref());
            reference(format!("{base}.author"), x.author.as_ref());
            for (i, rr) in x.addresses.iter().enumerate() {
                direct(&format!("addresses[{i}]"), Some(rr));
            }
            for (i, rr) in x.goals.iter().enumerate() {
                direct(&format!("goals[{i}]"), Some(rr));
            }
            notes!(x.notes);
        }
        K::Goal(x) => {
            reference(format!("{base}.expressed_by"), x.expressed_by.as_ref());
            for (i, rr) in x.addresses.iter().enumerate() {
                direct(&format!("addresses[{i}]"), Some(rr));
            }
            notes!(x.notes);
        }
        K::ImagingStudy(x) => {
            direct("encounter", x.encounter.as_ref());
            notes!(x.notes);
        }
    }
    for (path, r) in refs {
        if let Some(reference::Target::Record(rr)) = &r.target {
            out.push((format!("{path}.record"), rr.clone()));
        }
    }
    out
}

/// The wall clock in unix microseconds (0 before 1970): stamps, claim times, quarantine times.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// FHIR id syntax: `[A-Za-z0-9.-]{1,64}`. Record and patient ids use it.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_round_trip() {
        for t in RESOURCE_TYPES {
            let name = type_name(t).unwrap();
            assert_eq!(type_from_name(name), Some(t));
        }
        assert_eq!(type_from_name("Claim"), None);
        assert_eq!(type_name(ResourceType::Unspecified), None);
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("a1.B-2"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("mpi:x"));
    }
}
pub mod synth;
