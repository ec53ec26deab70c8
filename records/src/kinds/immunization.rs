//! Immunization: a vaccine given or not given.

use crate::validate::{Check, Path};
use crate::{SYSTEM_SNOMED, SYSTEM_UCUM};
use dossier_api::v1::{Immunization, ImmunizationStatus, ResourceType};

/// CVX, the CDC's vaccine code system (Synthea's `vaccineCode`).
pub const SYSTEM_CVX: &str = "http://hl7.org/fhir/sid/cvx";

pub(crate) fn check(p: &mut Path<'_>, x: &Immunization) -> Check {
    p.enumeration::<ImmunizationStatus>("status", x.status, true)?;
    p.concept_at("status_reason", x.status_reason.as_ref(), false)?;
    // A vaccine is named by CVX or SNOMED CT; a text alone is kept for sources without either.
    p.concept_at("vaccine_code", x.vaccine_code.as_ref(), true)?;
    if let Some(c) = &x.vaccine_code
        && !c.codings.is_empty()
        && !c
            .codings
            .iter()
            .any(|k| k.system == SYSTEM_CVX || k.system == SYSTEM_SNOMED)
    {
        return p.fail(
            "vaccine_code",
            "needs a CVX or SNOMED CT coding (or a text only)",
        );
    }
    p.record_ref_of(
        "encounter",
        x.encounter.as_ref(),
        &[ResourceType::Encounter],
    )?;
    if x.status == ImmunizationStatus::Completed as i32 && x.occurrence.is_none() {
        return p.fail("occurrence", "is required when COMPLETED");
    }
    p.date_time("occurrence", x.occurrence.as_ref())?;
    p.date_time("recorded", x.recorded.as_ref())?;
    p.token("lot_number", &x.lot_number, 64).or_else(|e| {
        if x.lot_number.is_empty() {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    p.date("expiration_date", x.expiration_date.as_ref())?;
    p.concept_at("site", x.site.as_ref(), false)?;
    p.concept_at("route", x.route.as_ref(), false)?;
    if let Some(q) = &x.dose {
        p.with("dose", |p| {
            p.quantity(q)?;
            if !q.code.is_empty() && q.system != SYSTEM_UCUM {
                return p.fail("system", "must be UCUM with a code");
            }
            Ok(())
        })?;
    }
    p.references("performers", &x.performers)?;
    p.concepts("reason_codes", &x.reason_codes)?;
    p.record_refs_of(
        "reason_records",
        &x.reason_records,
        &[
            ResourceType::Condition,
            ResourceType::Observation,
            ResourceType::DiagnosticReport,
        ],
    )?;
    p.notes(&x.notes)
}
