//! ImagingStudy: the metadata of a DICOM study, never its pixel data.

use crate::validate::{Check, Path};
use dossier_api::v1::{ImagingStudy, ImagingStudyStatus, ResourceType};

/// A DICOM UID: 1..64 characters of digits and dots (PS3.5 §9.1), without the `urn:oid:` prefix.
fn is_dicom_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
}

pub(crate) fn check(p: &mut Path<'_>, x: &ImagingStudy) -> Check {
    p.enumeration::<ImagingStudyStatus>("status", x.status, true)?;
    p.each("identifiers", &x.identifiers, |p, i| p.identifier(i))?;
    p.each("modalities", &x.modalities, |p, c| p.coding(c))?;
    p.record_ref_of(
        "encounter",
        x.encounter.as_ref(),
        &[ResourceType::Encounter],
    )?;
    p.date_time("started", x.started.as_ref())?;
    p.concepts("procedure_codes", &x.procedure_codes)?;
    p.concepts("reason_codes", &x.reason_codes)?;
    p.free("description", &x.description)?;
    p.each("series", &x.series, |p, s| {
        if !is_dicom_uid(&s.uid) {
            return p.fail("uid", "is not a DICOM UID (digits and dots, at most 64)");
        }
        p.coding_at("modality", s.modality.as_ref(), true)?;
        p.short("description", &s.description)?;
        p.coding_at("body_site", s.body_site.as_ref(), false)?;
        p.date_time("started", s.started.as_ref())?;
        p.each("instances", &s.instances, |p, i| {
            if !is_dicom_uid(&i.uid) {
                return p.fail("uid", "is not a DICOM UID (digits and dots, at most 64)");
            }
            p.coding_at("sop_class", i.sop_class.as_ref(), true)?;
            p.short("title", &i.title)
        })?;
        if s.number_of_instances != 0 && (s.number_of_instances as usize) < s.instances.len() {
            return p.fail("number_of_instances", "is below the instances listed");
        }
        Ok(())
    })?;
    if x.number_of_series != 0 && (x.number_of_series as usize) < x.series.len() {
        return p.fail("number_of_series", "is below the series listed");
    }
    p.notes(&x.notes)
}
