//! CarePlan: what is planned, for which conditions, towards which goals.

use crate::validate::{Check, Path};
use dossier_api::v1::{
    CarePlan, CarePlanActivityStatus, CarePlanIntent, CarePlanStatus, ResourceType,
};

pub(crate) fn check(p: &mut Path<'_>, x: &CarePlan) -> Check {
    p.enumeration::<CarePlanStatus>("status", x.status, true)?;
    p.enumeration::<CarePlanIntent>("intent", x.intent, true)?;
    p.concepts("categories", &x.categories)?;
    p.short("title", &x.title)?;
    p.free("description", &x.description)?;
    p.record_ref_of(
        "encounter",
        x.encounter.as_ref(),
        &[ResourceType::Encounter],
    )?;
    p.period("period", x.period.as_ref())?;
    p.date_time("created", x.created.as_ref())?;
    p.reference_at("author", x.author.as_ref(), false)?;
    p.record_refs_of("addresses", &x.addresses, &[ResourceType::Condition])?;
    p.record_refs_of("goals", &x.goals, &[ResourceType::Goal])?;
    p.each("activities", &x.activities, |p, a| {
        p.concept_at("code", a.code.as_ref(), false)?;
        p.enumeration::<CarePlanActivityStatus>("status", a.status, true)?;
        p.free("description", &a.description)?;
        if a.code.is_none() && a.description.is_empty() {
            return p.fail("code", "is required (or a description)");
        }
        p.period("scheduled_period", a.scheduled_period.as_ref())
    })?;
    p.notes(&x.notes)
}
