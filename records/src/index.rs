//! The per-patient search indexes (docs/schema.md §6): for each current record of a kind, one
//! entry by clinical date and one per code of its main concept, kept in the same batch as the
//! record. The value of each entry is the record's status, so a status filter reads no record.
//! A record marked entered-in-error has no entries: search shows what a clinician may act on.

use bytes::Bytes;
use dossier_api::v1::{CodeableConcept, DateTime, Period, RecordStatus, Resource};

use crate::keys::PatientKeys;

/// What a record is found by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Terms {
    /// The clinical date (unix micros): when it happened, not when it was written. None for a
    /// record without one (it sorts last).
    pub date: Option<i64>,
    /// `system|code` of each coding of the record's main concept, without duplicates.
    pub codes: Vec<String>,
    /// The kind's own status as its FHIR code (`final`, `active`, …); empty when not set.
    pub status: String,
}

fn at(t: &Option<DateTime>) -> Option<i64> {
    t.as_ref().map(|t| t.unix_micros)
}

/// A calendar date as the start of its first day at 00:00 UTC (month and day 0 count as 1).
fn date_micros(d: &dossier_api::v1::Date) -> i64 {
    let (y, m, d) = (
        i64::from(d.year),
        i64::from(d.month.max(1)),
        i64::from(d.day.max(1)),
    );
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    days * 86_400_000_000
}

fn start(p: &Option<Period>) -> Option<i64> {
    p.as_ref().and_then(|p| at(&p.start))
}

fn codes<'a>(concepts: impl IntoIterator<Item = &'a CodeableConcept>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in concepts {
        for coding in &c.codings {
            if coding.code.is_empty() || coding.code.contains('\0') || coding.system.contains('\0')
            {
                continue;
            }
            let joined = format!("{}|{}", coding.system, coding.code);
            if !out.contains(&joined) {
                out.push(joined);
            }
        }
    }
    out
}

/// The FHIR code of a status enum value from its proto name: `OBSERVATION_STATUS_ENTERED_IN_ERROR`
/// less `OBSERVATION_STATUS_` is `entered-in-error`.
fn status<E: TryFrom<i32>>(raw: i32, name: fn(&E) -> &'static str, prefix: &str) -> String {
    match E::try_from(raw) {
        Ok(e) if raw != 0 => name(&e)
            .strip_prefix(prefix)
            .unwrap_or_default()
            .to_ascii_lowercase()
            .replace('_', "-"),
        _ => String::new(),
    }
}

/// The search terms of a record, or None for a kind that is not searched (Patient).
pub fn terms(r: &Resource) -> Option<Terms> {
    use dossier_api::v1::*;
    use resource::Kind as K;
    let kind = r.kind.as_ref()?;
    Some(match kind {
        K::Patient(_) => return None,
        K::Encounter(x) => Terms {
            date: start(&x.period),
            codes: codes(&x.types),
            status: status(x.status, EncounterStatus::as_str_name, "ENCOUNTER_STATUS_"),
        },
        K::Observation(x) => Terms {
            date: match &x.effective {
                Some(observation::Effective::EffectiveTime(t)) => Some(t.unix_micros),
                Some(observation::Effective::EffectivePeriod(p)) => at(&p.start),
                None => None,
            }
            .or(at(&x.issued)),
            codes: codes(&x.code),
            status: status(
                x.status,
                ObservationStatus::as_str_name,
                "OBSERVATION_STATUS_",
            ),
        },
        K::Condition(x) => Terms {
            date: at(&x.onset).or(at(&x.recorded)),
            codes: codes(&x.code),
            status: status(
                x.clinical_status,
                ConditionClinicalStatus::as_str_name,
                "CONDITION_CLINICAL_STATUS_",
            ),
        },
        K::AllergyIntolerance(x) => Terms {
            date: at(&x.onset).or(at(&x.recorded)),
            codes: codes(&x.code),
            status: status(
                x.clinical_status,
                AllergyClinicalStatus::as_str_name,
                "ALLERGY_CLINICAL_STATUS_",
            ),
        },
        K::MedicationRequest(x) => Terms {
            date: at(&x.authored_on),
            codes: codes(&x.medication),
            status: status(
                x.status,
                MedicationRequestStatus::as_str_name,
                "MEDICATION_REQUEST_STATUS_",
            ),
        },
        K::Procedure(x) => Terms {
            date: match &x.performed {
                Some(procedure::Performed::PerformedTime(t)) => Some(t.unix_micros),
                Some(procedure::Performed::PerformedPeriod(p)) => at(&p.start),
                None => None,
            },
            codes: codes(&x.code),
            status: status(x.status, ProcedureStatus::as_str_name, "PROCEDURE_STATUS_"),
        },
        K::DocumentReference(x) => Terms {
            date: at(&x.date).or(start(&x.period)),
            codes: codes(&x.r#type),
            status: status(
                x.status,
                DocumentReferenceStatus::as_str_name,
                "DOCUMENT_REFERENCE_STATUS_",
            ),
        },
        K::CareRelationship(x) => Terms {
            date: start(&x.period),
            codes: codes(&x.role),
            status: status(
                x.status,
                CareRelationshipStatus::as_str_name,
                "CARE_RELATIONSHIP_STATUS_",
            ),
        },
        K::Consent(x) => Terms {
            date: at(&x.date_time),
            codes: codes(x.scope.iter().chain(&x.categories)),
            status: status(x.status, ConsentStatus::as_str_name, "CONSENT_STATUS_"),
        },
        K::Immunization(x) => Terms {
            date: at(&x.occurrence).or(at(&x.recorded)),
            codes: codes(&x.vaccine_code),
            status: status(
                x.status,
                ImmunizationStatus::as_str_name,
                "IMMUNIZATION_STATUS_",
            ),
        },
        K::DiagnosticReport(x) => Terms {
            date: match &x.effective {
                Some(diagnostic_report::Effective::EffectiveTime(t)) => Some(t.unix_micros),
                Some(diagnostic_report::Effective::EffectivePeriod(p)) => at(&p.start),
                None => None,
            }
            .or(at(&x.issued)),
            codes: codes(&x.code),
            status: status(
                x.status,
                DiagnosticReportStatus::as_str_name,
                "DIAGNOSTIC_REPORT_STATUS_",
            ),
        },
        K::CarePlan(x) => Terms {
            date: start(&x.period).or(at(&x.created)),
            codes: codes(&x.categories),
            status: status(x.status, CarePlanStatus::as_str_name, "CARE_PLAN_STATUS_"),
        },
        K::Goal(x) => Terms {
            date: x
                .start_date
                .as_ref()
                .map(date_micros)
                .or(x.status_date.as_ref().map(date_micros)),
            codes: codes(&x.description),
            status: status(
                x.lifecycle_status,
                GoalLifecycleStatus::as_str_name,
                "GOAL_LIFECYCLE_STATUS_",
            ),
        },
        K::ImagingStudy(x) => Terms {
            date: at(&x.started),
            codes: codes(&x.procedure_codes),
            status: status(
                x.status,
                ImagingStudyStatus::as_str_name,
                "IMAGING_STUDY_STATUS_",
            ),
        },
    })
}

/// Whether a stored version is marked entered-in-error.
pub fn in_error(r: &Resource) -> bool {
    r.meta
        .as_ref()
        .is_some_and(|m| m.status == RecordStatus::EnteredInError as i32)
}

/// The index entries (key, value) of one version of record `t/id` with content `r`: none for an
/// entered-in-error version or a kind that is not searched.
pub fn entries(
    keys: &PatientKeys,
    t: &str,
    id: &str,
    r: &Resource,
    in_error: bool,
) -> Vec<(Bytes, Bytes)> {
    let Some(terms) = terms(r).filter(|_| !in_error) else {
        return Vec::new();
    };
    let date = terms.date.unwrap_or(i64::MIN);
    let value = Bytes::from(terms.status.into_bytes());
    let mut out = Vec::with_capacity(1 + terms.codes.len());
    out.push((keys.by_date_entry(t, date, id), value.clone()));
    for code in &terms.codes {
        out.push((keys.by_code_entry(t, code, date, id), value.clone()));
    }
    out
}
