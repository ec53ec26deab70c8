//! FHIR R4 JSON in and out: a patient's Bundle to typed records (import) and typed records to
//! FHIR resources, Bundles and NDJSON lines (export). No I/O. The mapping is in docs/schema.md
//! §3 and §8.
//!
//! Import is lossless: what a record does not model is kept verbatim in its `unmodelled_json`
//! and merged back on export (`residue.rs`). Records that do not map or validate are set aside
//! (quarantined) with their problems, not the whole patient, unless the caller asks to refuse.

mod audit;
mod bundle;
mod codes;
mod export;
mod import;
mod quarantine;
mod residue;
mod search;
mod time;

use std::collections::BTreeMap;

pub use audit::audit_event_to_fhir;
pub use bundle::{export_bundle, import_bundle};
pub use export::{fhir_type, to_fhir};
pub use quarantine::{Quarantined, import_resource};
pub use search::{SearchParams, parse_search};
pub use time::{format_date, format_date_time, format_instant, parse_date, parse_date_time};

use dossier_api::v1::{Resource, ResourceType};
use dossier_records::Limits;

// For the tests, which see the crate through `super::*`.
#[cfg(test)]
use {
    bundle::{BILLING_TYPES, modelled},
    quarantine::reference_strings,
    serde_json::Value,
};

/// One thing wrong with a bundle: the entry (index in `Bundle.entry`) and the element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub entry: Option<usize>,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.entry {
            Some(e) => write!(f, "entry[{e}] {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// What an import does with a record that does not map or does not validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInvalid {
    /// Refuse the whole bundle, with every problem found.
    Refuse,
    /// Set the record aside in `ImportedBundle::quarantined` (and the records that refer to it),
    /// and import the rest of the patient. Problems with the Patient entry or the bundle's shape
    /// still refuse the bundle.
    #[default]
    Quarantine,
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Skip entries of unmodelled types other than billing (still counted in `skipped_types`);
    /// without it such a bundle is refused.
    pub skip_unmapped: bool,
    /// Names the source in every record's `meta.source` (`<source>#<fullUrl>`).
    pub source: String,
    /// Treat billing entries (Claim, ExplanationOfBenefit, …) like other unmodelled types; by
    /// default they are skipped and counted, as Dossier holds no billing.
    pub refuse_billing: bool,
    pub on_invalid: OnInvalid,
    /// The bounds every record is validated against (the server's, to learn before writing).
    pub limits: Limits,
}

/// A bundle mapped to typed records, ready to write: the patient, then its records in an order
/// where every reference points to an earlier record.
#[derive(Debug, Clone, Default)]
pub struct ImportedBundle {
    pub patient: Resource,
    pub records: Vec<Resource>,
    /// Records whose source status was entered-in-error: write them, then mark them.
    pub entered_in_error: Vec<(ResourceType, String)>,
    /// Entries of unmodelled types skipped (billing by default, others with `skip_unmapped`), by
    /// FHIR type.
    pub skipped_types: BTreeMap<String, usize>,
    /// Directory entries (Practitioner, Organization) used only to resolve references.
    pub directory_entries: usize,
    /// Source elements the store sets instead (`meta.versionId`, `meta.lastUpdated`,
    /// `meta.source`), by type and path.
    pub dropped_elements: BTreeMap<String, usize>,
    /// Source leaves kept verbatim in `unmodelled_json`, by type and path.
    pub unmodelled_elements: BTreeMap<String, usize>,
    /// Records set aside (with `OnInvalid::Quarantine`), in entry order.
    pub quarantined: Vec<Quarantined>,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        let mut pad = 0;
        for (i, c) in chunk.iter().enumerate() {
            let v = match c {
                b'=' if i >= 2 => {
                    pad += 1;
                    0
                }
                _ if pad > 0 => return None,
                c => B64.iter().position(|b| b == c)? as u32,
            };
            n = (n << 6) | v;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests;
