//! An observation: a vital sign, a lab result, a score.

use crate::SYSTEM_LOINC;
use crate::validate::{Check, Path, observation_value_check};
use dossier_api::v1::{Observation, observation};

pub(crate) fn check(p: &mut Path<'_>, x: &Observation) -> Check {
    p.enumeration::<dossier_api::v1::ObservationStatus>("status", x.status, true)?;
    p.concepts("categories", &x.categories)?;
    p.coded_in("code", x.code.as_ref(), &[SYSTEM_LOINC])?;
    p.record_ref("encounter", x.encounter.as_ref())?;
    match &x.effective {
        Some(observation::Effective::EffectiveTime(t)) => p.date_time("effective_time", Some(t))?,
        Some(observation::Effective::EffectivePeriod(per)) => {
            p.period("effective_period", Some(per))?
        }
        None => {}
    }
    p.date_time("issued", x.issued.as_ref())?;
    p.references("performers", &x.performers)?;
    let has_value = x.value.as_ref().is_some_and(|v| v.kind.is_some());
    if let Some(v) = &x.value {
        p.with("value", |p| observation_value_check(p, v))?;
    }
    p.concept_at("data_absent_reason", x.data_absent_reason.as_ref(), false)?;
    if has_value && x.data_absent_reason.is_some() {
        return p.fail("data_absent_reason", "must be unset when a value is given");
    }
    p.concepts("interpretations", &x.interpretations)?;
    p.each("components", &x.components, |p, c| {
        p.concept_at("code", c.code.as_ref(), true)?;
        if let Some(v) = &c.value {
            p.with("value", |p| observation_value_check(p, v))?;
        }
        p.concept_at("data_absent_reason", c.data_absent_reason.as_ref(), false)
    })?;
    if !has_value && x.data_absent_reason.is_none() && x.components.is_empty() {
        return p.fail(
            "value",
            "is required (or a data_absent_reason, or components)",
        );
    }
    p.each("reference_ranges", &x.reference_ranges, |p, r| {
        if let Some(q) = &r.low {
            p.with("low", |p| p.quantity(q))?;
        }
        if let Some(q) = &r.high {
            p.with("high", |p| p.quantity(q))?;
        }
        p.short("text", &r.text)
    })?;
    p.notes(&x.notes)
}
