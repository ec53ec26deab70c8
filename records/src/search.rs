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
    /// A page stops before the record that would take its encoded size past this (it holds one
    /// record at least).
    pub bytes_max: usize,
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
/// Index entries one call reads at most: a query whose matches are rare (a status filter, a
/// wide range) returns a short page, possibly empty, with a token, instead of reading the whole
/// patient in one call.
pub const SCAN_ENTRIES_MAX: usize = 4096;

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
            return Err(Error::invalid(
                "page_token",
                "is not a token this server gave",
            ));
        }
        Ok(())
    }

    /// Whether record `r`, found at an index entry dated `entry_date`, answers the query there:
    /// it matches, and the entry is its current version's (else the record moved since the
    /// entry was read, and its current entry is elsewhere in the scan or behind it).
    fn matches_at(&self, r: &Resource, entry_date: i64) -> bool {
        if index::in_error(r) {
            return false;
        }
        let Some(terms) = index::terms(r) else {
            return false;
        };
        if terms.date.unwrap_or(i64::MIN) != entry_date {
            return false;
        }
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
    // Start after the token, else after every entry dated at or after `until`. `after` is the
    // last key read (a shared handle on the scanned key, no copy per entry).
    let mut after: Bytes = if !query.page_token.is_empty() {
        [&prefix[..], &query.page_token[..]].concat().into()
    } else if let Some(until) = query.until {
        [&prefix[..], &date_part(until)[..], &[0xff]]
            .concat()
            .into()
    } else {
        Bytes::new()
    };
    let mut page = Page::default();
    let limit = query.limit.max(1);
    let mut bytes = 0usize;
    loop {
        let start = (!after.is_empty()).then_some(&after[..]);
        let chunk = reads.scan_prefix(&prefix, start, SCAN_CHUNK)?;
        let exhausted = chunk.len() < SCAN_CHUNK;
        for (key, status) in chunk {
            if page.scanned == SCAN_ENTRIES_MAX {
                page.next_page_token = after[prefix.len()..].to_vec();
                return Ok(page);
            }
            page.scanned += 1;
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
            if !query.statuses.is_empty() && !query.statuses.iter().any(|s| s.as_bytes() == status)
            {
                after = key.clone();
                continue;
            }
            let id = std::str::from_utf8(id).map_err(|_| Error::corrupt("index id"))?;
            let Some(current) = plan::head(reads, keys, t, id)? else {
                after = key.clone();
                continue;
            };
            let raw = reads.get(&keys.version(t, id, current))?.ok_or_else(|| {
                Error::corrupt(format!("version {current} of {t}/{id} (missing)"))
            })?;
            let r = plan::decode(&raw)?;
            if !query.matches_at(&r, date) {
                after = key.clone();
                continue;
            }
            if !page.resources.is_empty() && bytes + raw.len() > query.bytes_max {
                // Full: the next page starts at this entry.
                page.next_page_token = after[prefix.len()..].to_vec();
                return Ok(page);
            }
            after = key.clone();
            bytes += raw.len();
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

#[cfg(test)]
mod tests {
    use dossier_api::v1::{
        CodeableConcept, Coding, DatePrecision, DateTime, Meta, Observation, ObservationStatus,
        Patient, ResourceType, WriteOutcome, observation, resource,
    };

    use super::*;
    use crate::keys::PatientId;
    use crate::plan::{EntryOp, WriteEntry};
    use crate::testing::Map;

    const YEAR: i64 = 365 * 86_400_000_000;

    fn obs(id: &str, date: i64, status: ObservationStatus, note: usize) -> Resource {
        Resource {
            meta: Some(Meta {
                id: id.into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Observation(Observation {
                status: status as i32,
                code: Some(CodeableConcept {
                    codings: vec![Coding {
                        system: "http://loinc.org".into(),
                        code: "8302-2".into(),
                        display: String::new(),
                    }],
                    text: "x".repeat(note),
                }),
                effective: Some(observation::Effective::EffectiveTime(DateTime {
                    unix_micros: date,
                    precision: DatePrecision::Time as i32,
                    utc_offset_minutes: 0,
                })),
                ..Observation::default()
            })),
            unmodelled_json: String::new(),
        }
    }

    fn create<'a>(r: &'a Resource, rtype: ResourceType) -> WriteEntry<'a> {
        WriteEntry {
            op: EntryOp::Create,
            rtype,
            id: r.meta.as_ref().unwrap().id.clone(),
            resource: Some(r),
            field: "resource".into(),
            holds: Vec::new(),
            token: [0; 16],
            releases: Vec::new(),
        }
    }

    /// A patient `p1` with observations (id, date, status, note bytes).
    fn patient_with(obs_list: &[(&str, i64, ObservationStatus, usize)]) -> (Map, PatientKeys) {
        let mut map = Map::default();
        let p = PatientId::parse("p1", "p").unwrap();
        let patient = Resource {
            meta: Some(Meta {
                id: "p1".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Patient(Patient::default())),
            unmodelled_json: String::new(),
        };
        map.write(&p, create(&patient, ResourceType::Patient), 1);
        for (n, (id, date, status, note)) in obs_list.iter().enumerate() {
            let r = obs(id, *date, *status, *note);
            let w = map.write(&p, create(&r, ResourceType::Observation), n as u64 + 2);
            assert_eq!(w.outcome, WriteOutcome::Applied as i32);
        }
        (map, PatientKeys::new(&p))
    }

    fn query() -> Query {
        Query {
            type_name: "Observation",
            limit: 100,
            bytes_max: usize::MAX,
            ..Query::default()
        }
    }

    fn ids(page: &Page) -> Vec<String> {
        page.resources
            .iter()
            .map(|r| r.meta.as_ref().unwrap().id.clone())
            .collect()
    }

    #[test]
    fn dates_before_1970_are_found_and_bound_ranges() {
        use ObservationStatus::Final as F;
        let (map, keys) = patient_with(&[
            ("a", -20 * YEAR, F, 0),
            ("b", -YEAR, F, 0),
            ("c", 10 * YEAR, F, 0),
        ]);
        let all = search(&map, &keys, &query()).unwrap();
        assert_eq!(ids(&all), ["c", "b", "a"]);
        let since = Query {
            since: Some(-10 * YEAR),
            ..query()
        };
        assert_eq!(ids(&search(&map, &keys, &since).unwrap()), ["c", "b"]);
        let until = Query {
            until: Some(0),
            ..query()
        };
        assert_eq!(ids(&search(&map, &keys, &until).unwrap()), ["b", "a"]);
        let code = Query {
            code: "http://loinc.org|8302-2".into(),
            since: Some(-2 * YEAR),
            until: Some(0),
            ..query()
        };
        assert_eq!(ids(&search(&map, &keys, &code).unwrap()), ["b"]);
    }

    #[test]
    fn pages_stop_at_the_byte_bound_and_chain_by_token() {
        use ObservationStatus::Final as F;
        let (map, keys) = patient_with(&[("a", 3, F, 1000), ("b", 2, F, 1000), ("c", 1, F, 1000)]);
        let mut q = Query {
            bytes_max: 1500,
            ..query()
        };
        let mut seen = Vec::new();
        loop {
            let page = search(&map, &keys, &q).unwrap();
            assert_eq!(page.resources.len(), 1, "one ~1 KB record per 1.5 KB page");
            seen.extend(ids(&page));
            if page.next_page_token.is_empty() {
                break;
            }
            q.page_token = page.next_page_token;
        }
        assert_eq!(seen, ["a", "b", "c"]);
    }

    #[test]
    fn an_entry_its_record_moved_away_from_is_not_a_hit() {
        use ObservationStatus::Final as F;
        let (mut map, keys) = patient_with(&[("a", 5 * YEAR, F, 0), ("b", 3 * YEAR, F, 0)]);
        // An entry of `a` at an older date, as a scan that read it before `a` moved would see.
        map.0.insert(
            keys.by_date_entry("Observation", YEAR, "a"),
            Bytes::from_static(b"final"),
        );
        assert_eq!(ids(&search(&map, &keys, &query()).unwrap()), ["a", "b"]);
    }

    #[test]
    fn a_rare_match_returns_short_pages_within_the_scan_bound() {
        use ObservationStatus::{Amended, Final};
        let n = SCAN_ENTRIES_MAX + 500;
        let list: Vec<(String, i64, ObservationStatus)> = (0..n)
            .map(|i| {
                (
                    format!("o{i}"),
                    i as i64,
                    if i == 7 { Amended } else { Final },
                )
            })
            .collect();
        let refs: Vec<(&str, i64, ObservationStatus, usize)> = list
            .iter()
            .map(|(id, d, s)| (id.as_str(), *d, *s, 0))
            .collect();
        let (map, keys) = patient_with(&refs);
        let mut q = Query {
            statuses: vec!["amended".into()],
            ..query()
        };
        let first = search(&map, &keys, &q).unwrap();
        assert!(first.resources.is_empty());
        assert_eq!(first.scanned, SCAN_ENTRIES_MAX);
        assert!(!first.next_page_token.is_empty());
        q.page_token = first.next_page_token;
        let second = search(&map, &keys, &q).unwrap();
        assert_eq!(ids(&second), ["o7"]);
        assert!(second.next_page_token.is_empty());
    }
}
