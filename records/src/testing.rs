//! Test fixtures: one replica as an in-memory map, and writes planned and applied on it.

use std::collections::BTreeMap;

use bytes::Bytes;
use dossier_api::v1::{RecordWriteResponse, WriteHeader};

use crate::error::Error;
use crate::keys::PatientId;
use crate::kv::{Batch, BatchResult, Expect, Op, Reads};
use crate::plan::{Planned, WriteEntry, plan_write};

/// One replica as a map; batches apply whole or not at all.
#[derive(Default)]
pub(crate) struct Map(pub(crate) BTreeMap<Bytes, Bytes>);

impl Reads for Map {
    type Error = Error;

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        Ok(self.0.get(key).cloned())
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, Error> {
        Ok(self
            .0
            .range(Bytes::copy_from_slice(prefix)..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| start_after.is_none_or(|a| k.as_ref() > a))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl Map {
    pub(crate) fn apply(&mut self, batch: Batch) -> BatchResult {
        for (i, c) in batch.conditions.iter().enumerate() {
            let v = self.0.get(&c.key);
            let ok = match &c.expect {
                Expect::Absent => v.is_none(),
                Expect::Present => v.is_some(),
                Expect::Equals(x) => v == Some(x),
            };
            if !ok {
                return BatchResult::Failed(i as u32);
            }
        }
        for op in batch.ops {
            match op {
                Op::Put { key, value } => {
                    self.0.insert(key, value);
                }
                Op::Delete { key } => {
                    self.0.remove(&key);
                }
                Op::Append { .. } => panic!("the record layer's tests make no appends"),
            }
        }
        BatchResult::Applied
    }

    /// Plans and applies one write; the answer.
    pub(crate) fn write(
        &mut self,
        p: &PatientId,
        entry: WriteEntry<'_>,
        n: u64,
    ) -> RecordWriteResponse {
        let header = WriteHeader {
            request_id: [&n.to_be_bytes()[..], &[1; 8]].concat(),
            author: None,
        };
        let fp = [n as u8; 16];
        match plan_write(self, p, &header, &fp, &[entry], 1_000 + n).unwrap() {
            Planned::Answer(a) => a,
            Planned::Write(plan) => match self.apply(plan.batch.clone()) {
                BatchResult::Applied => plan.applied(n),
                BatchResult::Failed(i) => {
                    panic!("condition {:?} failed", plan.checks()[i as usize])
                }
            },
        }
    }
}
