//! A patient's current records in stamp order (the Everything operation and synchronisation):
//! one cursor per kind over `t/<Type>/`, merged by stamp, a page of each kind held at a time.

use std::collections::VecDeque;

use bytes::Bytes;
use dossier_api::v1::Resource;

use crate::error::Error;
use crate::keys::{PatientKeys, be_u64};
use crate::kv::Reads;
use crate::{index, plan};

const STAMP_PAGE: usize = 256;

/// One kind's cursor over `t/<Type>/`, a page at a time.
#[derive(Debug)]
struct StampCursor {
    t: &'static str,
    prefix: Bytes,
    after: Bytes,
    page: VecDeque<(u64, u64, String)>,
    done: bool,
}

impl StampCursor {
    fn peek<R: Reads>(&mut self, reads: &R) -> Result<Option<u64>, R::Error> {
        if self.page.is_empty() && !self.done {
            let page = reads.scan_prefix(&self.prefix, Some(&self.after), STAMP_PAGE)?;
            self.done = page.len() < STAMP_PAGE;
            if let Some((k, _)) = page.last() {
                self.after = k.clone();
            }
            for (k, v) in page {
                let stamp = k
                    .get(self.prefix.len()..)
                    .and_then(be_u64)
                    .ok_or_else(|| Error::corrupt("stamp key"))?;
                let version = v
                    .get(..8)
                    .and_then(be_u64)
                    .ok_or_else(|| Error::corrupt("stamp pointer"))?;
                let id = String::from_utf8(v[8..].to_vec())
                    .map_err(|_| Error::corrupt("stamp pointer id"))?;
                self.page.push_back((stamp, version, id));
            }
        }
        Ok(self.page.front().map(|(s, _, _)| *s))
    }
}

/// The records of a patient with a stamp above `since` and at most `as_of` (the patient's clock
/// when the read began), in stamp order.
#[derive(Debug)]
pub struct Everything {
    keys: PatientKeys,
    cursors: Vec<StampCursor>,
    as_of: u64,
    include_entered_in_error: bool,
}

impl Everything {
    /// Starts a read of kinds `types`; the patient's clock is read now (`as_of`).
    pub fn start<R: Reads>(
        reads: &R,
        keys: &PatientKeys,
        types: &[&'static str],
        since: u64,
        include_entered_in_error: bool,
    ) -> Result<Everything, R::Error> {
        let as_of = match reads.get(&keys.clock())? {
            Some(v) => be_u64(&v).ok_or_else(|| Error::corrupt("patient clock"))?,
            None => 0,
        };
        let cursors = types
            .iter()
            .map(|t| StampCursor {
                t,
                prefix: keys.stamps(t),
                after: keys.stamp(t, since),
                page: VecDeque::new(),
                done: false,
            })
            .collect();
        Ok(Everything {
            keys: keys.clone(),
            cursors,
            as_of,
            include_entered_in_error,
        })
    }

    /// The patient's clock when the read began.
    pub fn as_of(&self) -> u64 {
        self.as_of
    }

    /// The next records, at most `bytes_max` encoded bytes (one record at least); empty at the
    /// end.
    pub fn next_batch<R: Reads>(
        &mut self,
        reads: &R,
        bytes_max: usize,
    ) -> Result<Vec<Resource>, R::Error> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        loop {
            let mut best: Option<(usize, u64)> = None;
            for (i, c) in self.cursors.iter_mut().enumerate() {
                if let Some(s) = c.peek(reads)?
                    && best.is_none_or(|(_, b)| s < b)
                {
                    best = Some((i, s));
                }
            }
            // Only what was current when the read began (stamps up to `as_of`): a record written
            // meanwhile has a later stamp and goes to the next sync (`since = as_of`), so that a
            // resumed read (`since` = the last stamp received) misses nothing.
            let Some((i, stamp)) = best else { break };
            if stamp > self.as_of {
                break;
            }
            let (_, version, id) = self.cursors[i].page.front().cloned().expect("peeked");
            let t = self.cursors[i].t;
            let Some(raw) = reads.get(&self.keys.version(t, &id, version))? else {
                // The record moved on since the page was read: its new stamp is above this one
                // and the cursor reaches it later (or the next sync does).
                self.cursors[i].page.pop_front();
                continue;
            };
            if !out.is_empty() && bytes + raw.len() > bytes_max {
                break;
            }
            self.cursors[i].page.pop_front();
            let resource = plan::decode(&raw)?;
            if index::in_error(&resource) && !self.include_entered_in_error {
                continue;
            }
            bytes += raw.len();
            out.push(resource);
        }
        Ok(out)
    }
}
