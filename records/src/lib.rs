//! The typed clinical records (`dossier.v1.Resource` and its kinds): names, validation and the
//! national-number check. No I/O. The schema, key layout and rules are in docs/schema.md.

mod codes;
mod validate;

pub use codes::{insz_is_valid, insz_with_check, loinc_is_valid, snomed_is_valid};
pub use validate::{Invalid, Limits, validate_new_record, validate_record_content};

use dossier_api::v1::{RecordRef, Reference, Resource, ResourceType, reference, resource};

/// Identifier system of the Belgian national number (INSZ/NISS) and BIS number.
pub const SYSTEM_INSZ: &str = "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/ssin";
pub const SYSTEM_LOINC: &str = "http://loinc.org";
pub const SYSTEM_SNOMED: &str = "http://snomed.info/sct";
pub const SYSTEM_UCUM: &str = "http://unitsofmeasure.org";

/// Every kind, in `ResourceType` order.
pub const RESOURCE_TYPES: [ResourceType; 10] = [
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
    }
    for (path, r) in refs {
        if let Some(reference::Target::Record(rr)) = &r.target {
            out.push((format!("{path}.record"), rr.clone()));
        }
    }
    out
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
