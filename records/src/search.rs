//! Search within one patient (docs/schema.md §6): the records of one kind, optionally of one
//! code, within a clinical date range and of some statuses, newest first, paged. Served from
//! the indexes of [`crate::index`]: the scan starts at the newest date in range and stops at the
//! oldest, so its cost follows the page, not the patient's size. Each hit is re-checked against
//! the record read, so a result always matches the query even while the patient is written.

use bytes::Bytes;
use dossier_api::v1::Resource;

use crate::error::Error;
use crate::index;
use crate::keys::{PatientKeys, date_from_part, date_part};
use crate::kv::Reads;
use crate::plan;

/// The longest page token.
pub const PAGE_TOKEN_BYTES_MAX: usize = 256;

/// What to find.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// The kind's type name (`Observation`).
    pub type_name: &'static str,
    /// `system|code`, or empty for any code.
    pub code: String,
    /// Clinical date at or after (unix micros), if set.
    pub since: Option<i64>,
    /// Clinical date before (unix micros), if set.
    pub until: Option<i64>,
    /// FHIR status codes; empty for any.
    pub statuses: Vec<String>,
    pub limit: usize,
    /// Where the previous page stopped (empty: the first page).
    pub page_token: Vec<u8>,
}

/// One page of results.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub resources: Vec<Resource>,
    /// Empty when nothing follows.
    pub next_page_token: Vec<u8>,
    /// Index entries read for this page (the cost of the query).
    pub scanned: usize,
}

/// Index entries read per scan call.
const SCAN_CHUNK: usize = 128;

impl Query {
    /// Checks the parts a caller sets; fields name the request's.
    pub fn check(&self) -> Result<(), Error> {
        if let (Some(s), Some(u)) = (self.since, self.until)
            && s >= u
        {
            return Err(Error::invalid("until_micros", "must be after since_micros"));
        }
        if !self.code.is_empty() && (!self.code.contains('|') || self.code.contains('\0')) {
            return Err(Error::invalid("code", "must be system|code"));
        }
        if self.page_token.len() > PAGE_TOKEN_BYTES_MAX {
            return Err(Error::invalid("page_token", "is not a token this server gave"));
        }
        Ok(())
    }

    fn matches(&self, r: &Resource) -> bool {
        if index::in_error(r) {
            return false;
        }
        let Some(terms) = index::terms(r) else {
            return false;
        };
        if !self.code.is_empty() && !terms.codes.contains(&self.code) {
            return false;
        }
        if !self.statuses.is_empty() && !self.statuses.contains(&terms.status) {
            return false;
        }
        match terms.date {
            None => self.since.is_none() && self.until.is_none(),
            Some(d) => self.since.is_none_or(|s| d >= s) && self.until.is_none_or(|u| d < u),
        }
    }
}

/// Runs `query` on one replica of the patient.
pub fn search<R: Reads>(reads: &R, keys: &PatientKeys, query: &Query) -> Result<Page, R::Error> {
    query.check()?;
    let t = query.type_name;
    let prefix: Bytes = if query.code.is_empty() {
        keys.by_date(t)
    } else {
        keys.by_code(t, &query.code)
    };
    // Start after the token, else after every entry dated at or after `until`.
    let mut after: Vec<u8> = if !query.page_token.is_empty() {
        [&prefix[..], &query.page_token[..]].concat()
    } else if let Some(until) = query.until {
        [&prefix[..], &date_part(until)[..], &[0xff]].concat()
    } else {
        Vec::new()
    };
    let mut page = Page::default();
    let limit = query.limit.max(1);
    loop {
        let start = (!after.is_empty()).then_some(after.as_slice());
        let chunk = reads.scan_prefix(&prefix, start, SCAN_CHUNK)?;
        let exhausted = chunk.len() < SCAN_CHUNK;
        for (key, status) in chunk {
            page.scanned += 1;
            after = key.to_vec();
            let rest = &key[prefix.len()..];
            let (Some(date_bytes), Some(id)) = (rest.get(..8), rest.get(9..)) else {
                return Err(Error::corrupt("search index key").into());
            };
            let date = date_from_part(date_bytes).ok_or_else(|| Error::corrupt("index date"))?;
            if let Some(since) = query.since
                && date < since
            {
                // Older than the range: nothing after this matches.
                return Ok(page);
            }
            if !query.statuses.is_empty() && !query.statuses.iter().any(|s| s.as_bytes() == status) {
                continue;
            }
            let id = std::str::from_utf8(id).map_err(|_| Error::corrupt("index id"))?;
            let Some(current) = plan::head(reads, keys, t, id)? else {
                continue;
            };
            let r = plan::version(reads, keys, t, id, current)?;
            if !query.matches(&r) {
                continue; // Written since the entry was read: its new entry is elsewhere.
            }
            page.resources.push(r);
            if page.resources.len() == limit {
                page.next_page_token = key[prefix.len()..].to_vec();
                return Ok(page);
            }
        }
        if exhausted {
            return Ok(page);
        }
    }
}
