//! FHIR code ↔ enum value tables: the enum value is the code's position + 1 (0 is UNSPECIFIED).

pub const NAME_USE: &[&str] = &[
    "usual",
    "official",
    "temp",
    "nickname",
    "anonymous",
    "old",
    "maiden",
];
pub const CONTACT_POINT_SYSTEM: &[&str] =
    &["phone", "fax", "email", "pager", "url", "sms", "other"];
pub const CONTACT_POINT_USE: &[&str] = &["home", "work", "temp", "old", "mobile"];
pub const ADDRESS_USE: &[&str] = &["home", "work", "temp", "old", "billing"];
pub const GENDER: &[&str] = &["male", "female", "other", "unknown"];
pub const ENCOUNTER_STATUS: &[&str] = &[
    "planned",
    "arrived",
    "triaged",
    "in-progress",
    "onleave",
    "finished",
    "cancelled",
    "unknown",
];
pub const OBSERVATION_STATUS: &[&str] = &[
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "unknown",
];
pub const QUANTITY_COMPARATOR: &[&str] = &["<", "<=", ">=", ">"];
pub const CONDITION_CLINICAL: &[&str] = &[
    "active",
    "recurrence",
    "relapse",
    "inactive",
    "remission",
    "resolved",
];
pub const CONDITION_VERIFICATION: &[&str] = &[
    "unconfirmed",
    "provisional",
    "differential",
    "confirmed",
    "refuted",
];
pub const ALLERGY_CLINICAL: &[&str] = &["active", "inactive", "resolved"];
pub const ALLERGY_VERIFICATION: &[&str] = &["unconfirmed", "confirmed", "refuted"];
pub const ALLERGY_TYPE: &[&str] = &["allergy", "intolerance"];
pub const ALLERGY_CATEGORY: &[&str] = &["food", "medication", "environment", "biologic"];
pub const ALLERGY_CRITICALITY: &[&str] = &["low", "high", "unable-to-assess"];
pub const ALLERGY_SEVERITY: &[&str] = &["mild", "moderate", "severe"];
pub const MEDICATION_REQUEST_STATUS: &[&str] = &[
    "active",
    "on-hold",
    "cancelled",
    "completed",
    "stopped",
    "draft",
    "unknown",
];
pub const MEDICATION_REQUEST_INTENT: &[&str] = &[
    "proposal",
    "plan",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];
pub const TIME_UNIT: &[&str] = &["s", "min", "h", "d", "wk", "mo", "a"];
pub const PROCEDURE_STATUS: &[&str] = &[
    "preparation",
    "in-progress",
    "not-done",
    "on-hold",
    "stopped",
    "completed",
    "unknown",
];
pub const DOCUMENT_REFERENCE_STATUS: &[&str] = &["current", "superseded"];
pub const CARE_RELATIONSHIP_STATUS: &[&str] = &["proposed", "active", "suspended", "inactive"];
pub const CONSENT_STATUS: &[&str] = &["draft", "proposed", "active", "rejected", "inactive"];
pub const CONSENT_DECISION: &[&str] = &["deny", "permit"];
pub const IMMUNIZATION_STATUS: &[&str] = &["completed", "not-done"];
pub const DIAGNOSTIC_REPORT_STATUS: &[&str] = &[
    "registered",
    "partial",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "appended",
    "cancelled",
    "unknown",
];
pub const CARE_PLAN_STATUS: &[&str] = &[
    "draft",
    "active",
    "on-hold",
    "revoked",
    "completed",
    "unknown",
];
pub const CARE_PLAN_INTENT: &[&str] = &["proposal", "plan", "order", "option"];
pub const CARE_PLAN_ACTIVITY_STATUS: &[&str] = &[
    "not-started",
    "scheduled",
    "in-progress",
    "on-hold",
    "completed",
    "cancelled",
    "stopped",
    "unknown",
    "entered-in-error",
];
pub const GOAL_LIFECYCLE_STATUS: &[&str] = &[
    "proposed",
    "planned",
    "accepted",
    "active",
    "on-hold",
    "completed",
    "cancelled",
    "rejected",
];
pub const IMAGING_STUDY_STATUS: &[&str] = &["registered", "available", "cancelled", "unknown"];
/// Reference.type of an identifier reference, by `EntityType`.
pub const ENTITY_TYPE: &[&str] = &["Practitioner", "Organization", "RelatedPerson", "Device"];

pub const SYS_CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
pub const SYS_CONDITION_VERIFICATION: &str =
    "http://terminology.hl7.org/CodeSystem/condition-ver-status";
pub const SYS_ALLERGY_CLINICAL: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
pub const SYS_ALLERGY_VERIFICATION: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";

/// The code of enum value `raw` (None for UNSPECIFIED or unknown values).
pub fn code_of<'a>(table: &[&'a str], raw: i32) -> Option<&'a str> {
    usize::try_from(raw)
        .ok()?
        .checked_sub(1)
        .and_then(|i| table.get(i).copied())
}

/// The enum value of `code`.
pub fn value_of(table: &[&str], code: &str) -> Option<i32> {
    table.iter().position(|c| *c == code).map(|i| i as i32 + 1)
}
