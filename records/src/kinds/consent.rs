//! A consent: a provision permitting or denying an action.

use crate::validate::{Check, Path};
use dossier_api::v1::{Consent, ResourceType};

pub(crate) fn check(p: &mut Path<'_>, x: &Consent) -> Check {
    p.enumeration::<dossier_api::v1::ConsentStatus>("status", x.status, true)?;
    p.concept_at("scope", x.scope.as_ref(), true)?;
    if x.categories.is_empty() {
        return p.fail("categories", "needs at least one");
    }
    p.concepts("categories", &x.categories)?;
    p.date_time("date_time", x.date_time.as_ref())?;
    p.references("performers", &x.performers)?;
    p.concept_at("policy_rule", x.policy_rule.as_ref(), false)?;
    p.enumeration::<dossier_api::v1::ConsentDecision>("decision", x.decision, false)?;
    p.period("period", x.period.as_ref())?;
    p.each("actors", &x.actors, |p, a| {
        p.concept_at("role", a.role.as_ref(), true)?;
        p.reference_at("reference", a.reference.as_ref(), true)
    })?;
    p.concepts("actions", &x.actions)?;
    p.each("purposes", &x.purposes, |p, c| p.coding(c))?;
    for (i, t) in x.resource_types.iter().enumerate() {
        p.enumeration::<ResourceType>(&format!("resource_types[{i}]"), *t, true)?;
    }
    p.record_ref("source", x.source.as_ref())
}
