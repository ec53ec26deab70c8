//! A procedure performed on the patient.

use crate::validate::{Check, Path};
use dossier_api::v1::Procedure;

pub(crate) fn check(p: &mut Path<'_>, x: &Procedure) -> Check {
    p.enumeration::<dossier_api::v1::ProcedureStatus>("status", x.status, true)?;
    p.concept_at("code", x.code.as_ref(), true)?;
    p.record_ref("encounter", x.encounter.as_ref())?;
    p.references("performers", &x.performers)?;
    p.concepts("reason_codes", &x.reason_codes)?;
    p.record_refs("reason_records", &x.reason_records)?;
    p.concepts("body_sites", &x.body_sites)?;
    p.concept_at("outcome", x.outcome.as_ref(), false)?;
    p.notes(&x.notes)
}
