//! A condition: a problem, diagnosis or health concern.

use crate::SYSTEM_SNOMED;
use crate::validate::{Check, Path};
use dossier_api::v1::ClinicalCondition;

pub(crate) fn check(p: &mut Path<'_>, x: &ClinicalCondition) -> Check {
    p.enumeration::<dossier_api::v1::ConditionClinicalStatus>(
        "clinical_status",
        x.clinical_status,
        false,
    )?;
    p.enumeration::<dossier_api::v1::ConditionVerificationStatus>(
        "verification_status",
        x.verification_status,
        false,
    )?;
    p.concepts("categories", &x.categories)?;
    p.concept_at("severity", x.severity.as_ref(), false)?;
    p.coded_in(
        "code",
        x.code.as_ref(),
        &[
            SYSTEM_SNOMED,
            "http://hl7.org/fhir/sid/icd-10",
            "http://hl7.org/fhir/sid/icd-10-cm",
        ],
    )?;
    p.concepts("body_sites", &x.body_sites)?;
    p.record_ref("encounter", x.encounter.as_ref())?;
    p.date_time("onset", x.onset.as_ref())?;
    p.date_time("abatement", x.abatement.as_ref())?;
    p.date_time("recorded", x.recorded.as_ref())?;
    p.reference_at("asserter", x.asserter.as_ref(), false)?;
    p.notes(&x.notes)
}
