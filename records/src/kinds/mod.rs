//! The rules of each kind of record, one file per kind (docs/schema.md §3). The element checks
//! they share (codings, times, references, text bounds) are in `validate.rs`.

pub(crate) mod care_plan;
pub(crate) mod diagnostic_report;
pub(crate) mod goal;
pub(crate) mod imaging_study;
pub(crate) mod immunization;
