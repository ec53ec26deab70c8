//! A care relationship: a practitioner or organisation caring for the patient.

use crate::validate::{Check, Path};
use dossier_api::v1::CareRelationship;

pub(crate) fn check(p: &mut Path<'_>, x: &CareRelationship) -> Check {
    p.enumeration::<dossier_api::v1::CareRelationshipStatus>("status", x.status, true)?;
    p.reference_at("participant", x.participant.as_ref(), true)?;
    let kind = x.participant.as_ref().map(|r| r.entity_type);
    if !matches!(kind, Some(k) if k == dossier_api::v1::EntityType::Practitioner as i32
        || k == dossier_api::v1::EntityType::Organization as i32)
    {
        return p.fail(
            "participant",
            "must be a practitioner or an organisation, by identifier",
        );
    }
    p.concept_at("role", x.role.as_ref(), false)?;
    match x.period.as_ref().and_then(|per| per.start.as_ref()) {
        Some(_) => p.period("period", x.period.as_ref())?,
        None => p.fail("period.start", "is required")?,
    }
    p.concepts("reason_codes", &x.reason_codes)?;
    p.reference_at(
        "managing_organization",
        x.managing_organization.as_ref(),
        false,
    )
}
