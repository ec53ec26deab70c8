//! Goal: an intended outcome for the patient.

use crate::validate::{Check, Path};
use dossier_api::v1::{Goal, GoalLifecycleStatus, ResourceType};

pub(crate) fn check(p: &mut Path<'_>, x: &Goal) -> Check {
    p.enumeration::<GoalLifecycleStatus>("lifecycle_status", x.lifecycle_status, true)?;
    p.concept_at("achievement_status", x.achievement_status.as_ref(), false)?;
    p.concepts("categories", &x.categories)?;
    p.concept_at("priority", x.priority.as_ref(), false)?;
    p.concept_at("description", x.description.as_ref(), true)?;
    p.date("start_date", x.start_date.as_ref())?;
    p.each("targets", &x.targets, |p, t| {
        p.concept_at("measure", t.measure.as_ref(), false)?;
        if let Some(q) = &t.detail_quantity {
            p.with("detail_quantity", |p| p.quantity(q))?;
        }
        p.short("detail_text", &t.detail_text)?;
        if t.detail_quantity.is_some() && !t.detail_text.is_empty() {
            return p.fail(
                "detail_text",
                "must be unset with a detail_quantity (one detail)",
            );
        }
        p.date("due_date", t.due_date.as_ref())
    })?;
    p.date("status_date", x.status_date.as_ref())?;
    p.reference_at("expressed_by", x.expressed_by.as_ref(), false)?;
    p.record_refs_of(
        "addresses",
        &x.addresses,
        &[
            ResourceType::Condition,
            ResourceType::Observation,
            ResourceType::MedicationRequest,
            ResourceType::Procedure,
        ],
    )?;
    p.notes(&x.notes)
}
