//! An encounter: a visit, a stay, a consultation.

use crate::validate::{Check, Path};
use dossier_api::v1::Encounter;

pub(crate) fn check(p: &mut Path<'_>, x: &Encounter) -> Check {
    p.enumeration::<dossier_api::v1::EncounterStatus>("status", x.status, true)?;
    match &x.encounter_class {
        Some(c) => p.with("encounter_class", |p| p.coding(c))?,
        None => p.fail("encounter_class", "is required")?,
    }
    p.concepts("types", &x.types)?;
    p.period("period", x.period.as_ref())?;
    p.reference_at("service_provider", x.service_provider.as_ref(), false)?;
    p.each("participants", &x.participants, |p, part| {
        p.concepts("types", &part.types)?;
        p.reference_at("individual", part.individual.as_ref(), false)?;
        p.period("period", part.period.as_ref())
    })?;
    p.concepts("reason_codes", &x.reason_codes)?;
    p.record_refs("reason_records", &x.reason_records)?;
    p.concept_at(
        "discharge_disposition",
        x.discharge_disposition.as_ref(),
        false,
    )
}
