//! An allergy or intolerance.

use crate::validate::{Check, Path};
use dossier_api::v1::AllergyIntolerance;

pub(crate) fn check(p: &mut Path<'_>, x: &AllergyIntolerance) -> Check {
    p.enumeration::<dossier_api::v1::AllergyClinicalStatus>(
        "clinical_status",
        x.clinical_status,
        false,
    )?;
    p.enumeration::<dossier_api::v1::AllergyVerificationStatus>(
        "verification_status",
        x.verification_status,
        false,
    )?;
    p.enumeration::<dossier_api::v1::AllergyType>("type", x.r#type, false)?;
    p.enumeration::<dossier_api::v1::AllergyCriticality>("criticality", x.criticality, false)?;
    p.concept_at("code", x.code.as_ref(), true)?;
    p.record_ref("encounter", x.encounter.as_ref())?;
    p.date_time("onset", x.onset.as_ref())?;
    p.date_time("recorded", x.recorded.as_ref())?;
    p.reference_at("recorder", x.recorder.as_ref(), false)?;
    p.each("reactions", &x.reactions, |p, r| {
        p.concept_at("substance", r.substance.as_ref(), false)?;
        if r.manifestations.is_empty() {
            return p.fail("manifestations", "needs at least one");
        }
        p.concepts("manifestations", &r.manifestations)?;
        p.enumeration::<dossier_api::v1::AllergySeverity>("severity", r.severity, false)?;
        p.free("description", &r.description)
    })?;
    p.notes(&x.notes)
}
