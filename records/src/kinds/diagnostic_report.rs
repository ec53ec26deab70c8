//! DiagnosticReport: a report grouping result Observations.

use crate::validate::{Check, Path};
use dossier_api::v1::{DiagnosticReport, DiagnosticReportStatus, ResourceType, diagnostic_report};

pub(crate) fn check(p: &mut Path<'_>, x: &DiagnosticReport) -> Check {
    p.enumeration::<DiagnosticReportStatus>("status", x.status, true)?;
    p.concepts("categories", &x.categories)?;
    // LOINC is preferred, not required: imaging and pathology reports often carry local codes.
    // A LOINC coding present is checked (check digit) like every LOINC coding.
    p.concept_at("code", x.code.as_ref(), true)?;
    p.record_ref_of(
        "encounter",
        x.encounter.as_ref(),
        &[ResourceType::Encounter],
    )?;
    match &x.effective {
        Some(diagnostic_report::Effective::EffectiveTime(t)) => {
            p.date_time("effective_time", Some(t))?
        }
        Some(diagnostic_report::Effective::EffectivePeriod(per)) => {
            p.period("effective_period", Some(per))?
        }
        None => {}
    }
    let final_like = [
        DiagnosticReportStatus::Final,
        DiagnosticReportStatus::Amended,
        DiagnosticReportStatus::Corrected,
        DiagnosticReportStatus::Appended,
    ];
    if final_like.iter().any(|s| *s as i32 == x.status) && x.effective.is_none() {
        return p.fail(
            "effective",
            "is required when FINAL, AMENDED, CORRECTED or APPENDED",
        );
    }
    p.date_time("issued", x.issued.as_ref())?;
    p.references("performers", &x.performers)?;
    p.record_refs_of("results", &x.results, &[ResourceType::Observation])?;
    p.free("conclusion", &x.conclusion)?;
    p.concepts("conclusion_codes", &x.conclusion_codes)
}
