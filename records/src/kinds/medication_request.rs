//! A medication request: a prescription with its dosage.

use crate::validate::{Check, Path, is_decimal};
use dossier_api::v1::MedicationRequest;

pub(crate) fn check(p: &mut Path<'_>, x: &MedicationRequest) -> Check {
    p.enumeration::<dossier_api::v1::MedicationRequestStatus>("status", x.status, true)?;
    p.enumeration::<dossier_api::v1::MedicationRequestIntent>("intent", x.intent, true)?;
    p.concept_at("medication", x.medication.as_ref(), true)?;
    p.record_ref("encounter", x.encounter.as_ref())?;
    p.date_time("authored_on", x.authored_on.as_ref())?;
    p.reference_at("requester", x.requester.as_ref(), false)?;
    p.concepts("reason_codes", &x.reason_codes)?;
    p.record_refs("reason_records", &x.reason_records)?;
    p.each("dosage_instructions", &x.dosage_instructions, |p, d| {
        p.free("text", &d.text)?;
        if !d.period.is_empty() && !is_decimal(&d.period) {
            return p.fail("period", "is not a decimal");
        }
        p.enumeration::<dossier_api::v1::TimeUnit>("period_unit", d.period_unit, false)?;
        if d.frequency > 0 && (d.period.is_empty() || d.period_unit == 0) {
            return p.fail("period", "is required with a frequency (and its unit)");
        }
        p.concept_at("route", d.route.as_ref(), false)?;
        if let Some(q) = &d.dose {
            p.with("dose", |p| p.quantity(q))?;
        }
        Ok(())
    })?;
    p.notes(&x.notes)
}
