//! Records set aside on import (docs/schema.md §9): a source resource that failed validation is
//! kept verbatim in its patient's quarantine space `z/<id>` with its problems, listed, fixed and
//! re-submitted by a person, then removed. Quarantined records are not records: no version, no
//! index, no reference may name them.

use bytes::Bytes;
use dossier_api::v1::QuarantinedRecord;
use prost::Message;

use crate::error::Error;
use crate::keys::PatientKeys;
use crate::kv::{Batch, Reads};

/// The longest verbatim source resource kept in quarantine.
pub const SOURCE_BYTES_MAX: usize = 1 << 20;
/// The most problems kept per quarantined record.
pub const PROBLEMS_MAX: usize = 64;

/// Checks a record to quarantine; `field` is its path in the request.
pub fn check(r: &QuarantinedRecord, field: &str) -> Result<(), Error> {
    if !crate::is_valid_id(&r.id) {
        return Err(Error::invalid(
            format!("{field}.id"),
            "must match [A-Za-z0-9.-]{1,64}",
        ));
    }
    if r.fhir_type.is_empty()
        || r.fhir_type.len() > 64
        || !r.fhir_type.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return Err(Error::invalid(
            format!("{field}.fhir_type"),
            "must be a FHIR type name",
        ));
    }
    if r.source_json.len() > SOURCE_BYTES_MAX {
        return Err(Error::InvalidArgument {
            field: format!("{field}.source_json"),
            message: format!(
                "is {} bytes, above the limit of {SOURCE_BYTES_MAX}",
                r.source_json.len()
            ),
            limit: Some(SOURCE_BYTES_MAX as u64),
        });
    }
    if r.problems.is_empty() {
        return Err(Error::invalid(
            format!("{field}.problems"),
            "must say why the record is quarantined",
        ));
    }
    if r.problems.len() > PROBLEMS_MAX {
        return Err(Error::InvalidArgument {
            field: format!("{field}.problems"),
            message: format!(
                "has {} problems, above the limit of {PROBLEMS_MAX}",
                r.problems.len()
            ),
            limit: Some(PROBLEMS_MAX as u64),
        });
    }
    Ok(())
}

/// Adds `put` ops for records to quarantine and `delete` ops for ids to release.
pub fn write(keys: &PatientKeys, batch: &mut Batch, put: &[QuarantinedRecord], release: &[String]) {
    for r in put {
        batch.put(keys.quarantined(&r.id), r.encode_to_vec());
    }
    for id in release {
        batch.delete(keys.quarantined(id));
    }
}

/// One page of the patient's quarantine, in id order, after `after` (exclusive); `more` when the
/// page stopped at `limit`.
pub fn list<R: Reads>(
    reads: &R,
    keys: &PatientKeys,
    after: &str,
    limit: usize,
) -> Result<(Vec<QuarantinedRecord>, bool), R::Error> {
    let prefix = keys.quarantine();
    let start: Option<Bytes> = (!after.is_empty()).then(|| keys.quarantined(after));
    let page = reads.scan_prefix(&prefix, start.as_deref(), limit + 1)?;
    let more = page.len() > limit;
    let mut out = Vec::with_capacity(page.len().min(limit));
    for (_, v) in page.into_iter().take(limit) {
        out.push(
            QuarantinedRecord::decode(v.as_ref())
                .map_err(|_| Error::corrupt("quarantined record"))?,
        );
    }
    Ok((out, more))
}
