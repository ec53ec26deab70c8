//! A write as a pure function (docs/schema.md §5): from reads of the patient's replica (after a
//! read barrier) and the entries of a request, either a definite answer (a replay or a refusal)
//! or ONE conditional batch whose conditions re-check every read the plan depended on. Each
//! condition is named ([`Check`]), so that a failed one maps to its meaning, never to a position
//! the caller must know.

use std::borrow::Cow;
use std::collections::BTreeSet;

use bytes::Bytes;
use dossier_api::v1::{
    Meta, RecordStatus, RecordWriteResponse, Resource, ResourceType, ResourceVersion, WriteHeader,
    WriteOutcome,
};
use prost::Message;

use crate::error::Error;
use crate::idempotency::{self, FINGERPRINT_BYTES};
use crate::keys::{Ident, PatientId, PatientKeys, be_u64};
use crate::kv::{Batch, Condition, Expect, Reads};
use crate::{index, record_refs, type_name};

/// What an entry does to its record.
#[derive(Debug, Clone)]
pub enum EntryOp {
    Create,
    Update { expected: u64 },
    Delete { expected: u64, reason: String },
}

/// One record a write produces.
#[derive(Debug, Clone)]
pub struct WriteEntry<'a> {
    pub op: EntryOp,
    pub rtype: ResourceType,
    pub id: String,
    /// The new content, borrowed from the request (None for a delete: the current version's
    /// content is kept).
    pub resource: Option<&'a Resource>,
    /// Where this entry sits in the request, for error paths (`resource`, `entries[2].create`).
    pub field: String,
    /// Identifiers this write makes the patient hold, claimed beforehand under `token`: the
    /// batch puts `i/X` under the condition that no fence revoked the claim.
    pub holds: Vec<Ident>,
    /// The claim token of `holds` (fresh for every attempt of a write).
    pub token: [u8; 16],
    /// Identifiers this write makes the patient give up: the batch deletes `i/X`.
    pub releases: Vec<Ident>,
}

impl WriteEntry<'_> {
    /// The record the entry writes.
    pub fn record_ref(&self) -> dossier_api::v1::RecordRef {
        dossier_api::v1::RecordRef {
            r#type: self.rtype as i32,
            id: self.id.clone(),
        }
    }
}

/// What one condition of a planned batch checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The request id is unused (else: a concurrent attempt of the same request committed).
    RequestUnused,
    /// The patient's clock is as read (else: another write of the patient committed).
    Clock,
    /// The Patient is present (or, for a create of the patient, absent).
    Patient,
    /// The head of the record of entry `entry` is as read.
    Head { entry: u32 },
    /// No fence revoked this write's claim of an identifier.
    Fence,
    /// A record named by a reference exists; `field` is the reference's path.
    Reference { field: String },
}

/// What to do when condition `i` of a planned batch failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Retry {
    /// Something the plan read moved: plan again from fresh reads.
    Replan,
    /// A definite answer: nothing was written.
    Answer(RecordWriteResponse),
}

/// A planned write: the batch to propose and what its outcomes mean.
#[derive(Debug, Clone)]
pub struct WritePlan {
    pub batch: Batch,
    checks: Vec<Check>,
    creates_patient: bool,
    response: RecordWriteResponse,
}

impl WritePlan {
    /// The answer when the batch applied at log index `index`.
    pub fn applied(mut self, index: u64) -> RecordWriteResponse {
        self.response.index = index;
        self.response
    }

    /// What the failure of condition `failed` means.
    pub fn failed(&self, failed: u32) -> Retry {
        match self.checks.get(failed as usize) {
            Some(Check::Patient) if !self.creates_patient => {
                Retry::Answer(refusal(WriteOutcome::NotFound, 0, "route.patient_id"))
            }
            Some(Check::Fence) => {
                Retry::Answer(refusal(WriteOutcome::ClaimRevoked, 0, "header.request_id"))
            }
            Some(Check::Reference { field }) => {
                Retry::Answer(refusal(WriteOutcome::ReferenceNotFound, 0, field))
            }
            _ => Retry::Replan,
        }
    }

    /// The name of every condition, in batch order.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn check(&mut self, check: Check, key: Bytes, expect: Expect) {
        self.checks.push(check);
        self.batch.conditions.push(Condition { key, expect });
    }
}

/// The outcome of planning.
#[derive(Debug)]
pub enum Planned {
    /// A definite answer from the reads: a replay of the request, or a refusal.
    Answer(RecordWriteResponse),
    Write(WritePlan),
}

/// A definite refusal: nothing was written.
pub fn refusal(outcome: WriteOutcome, entry_index: u32, field: &str) -> RecordWriteResponse {
    RecordWriteResponse {
        outcome: outcome as i32,
        entry_index,
        field: field.to_owned(),
        ..RecordWriteResponse::default()
    }
}

/// The path of `leaf` of a write entry whose resource sits at `field` in the request:
/// `resource` → `resource.meta.id` / `expected_version`; `entries[2].update.resource` →
/// `entries[2].update.resource.meta.id` / `entries[2].update.expected_version`; a Delete (no
/// resource) → `id` / `expected_version`.
fn entry_path(field: &str, leaf: &str) -> String {
    match (field, leaf) {
        ("", "meta.id") => "id".to_owned(),
        (_, "expected_version") => match field.strip_suffix("resource") {
            Some(prefix) => format!("{prefix}expected_version"),
            None => "expected_version".to_owned(),
        },
        _ => format!("{field}.{leaf}"),
    }
}

/// The refusal an entry gets from the current head of its record (None: the head allows it):
/// a create of an existing record, an update or delete of a missing one or of another version.
pub fn head_refusal(
    e: &WriteEntry<'_>,
    head: Option<u64>,
    entry_index: u32,
) -> Option<RecordWriteResponse> {
    match (&e.op, head) {
        (EntryOp::Create, Some(_)) => Some(refusal(
            WriteOutcome::AlreadyExists,
            entry_index,
            &entry_path(&e.field, "meta.id"),
        )),
        (EntryOp::Update { .. } | EntryOp::Delete { .. }, None) => Some(refusal(
            WriteOutcome::NotFound,
            entry_index,
            &entry_path(&e.field, "meta.id"),
        )),
        (EntryOp::Update { expected } | EntryOp::Delete { expected, .. }, Some(current))
            if current != *expected =>
        {
            let mut r = refusal(
                WriteOutcome::VersionConflict,
                entry_index,
                &entry_path(&e.field, "expected_version"),
            );
            r.current_version = current;
            Some(r)
        }
        _ => None,
    }
}

/// The stored bytes of a version: `content`'s kind and unmodelled elements with `meta` as its
/// envelope, encoded as the `Resource` they make (fields in number order: the kind's oneof,
/// `meta` (15), `unmodelled_json` (16)), without copying the content.
pub fn encode_version(content: &Resource, meta: &Meta) -> Vec<u8> {
    let kind_len = content.kind.as_ref().map_or(0, |k| k.encoded_len());
    let extra = &content.unmodelled_json;
    let mut out = Vec::with_capacity(kind_len + meta.encoded_len() + extra.len() + 12);
    if let Some(kind) = &content.kind {
        kind.encode(&mut out);
    }
    prost::encoding::message::encode(15, meta, &mut out);
    if !extra.is_empty() {
        prost::encoding::string::encode(16, extra, &mut out);
    }
    out
}

/// The current version of `t/id`, if any.
pub fn head<R: Reads>(
    reads: &R,
    keys: &PatientKeys,
    t: &str,
    id: &str,
) -> Result<Option<u64>, R::Error> {
    match reads.get(&keys.head(t, id))? {
        None => Ok(None),
        Some(v) => {
            Ok(Some(be_u64(&v).ok_or_else(|| {
                Error::corrupt(format!("head of {t}/{id}"))
            })?))
        }
    }
}

/// Decodes a stored version.
pub fn decode(bytes: &[u8]) -> Result<Resource, Error> {
    Resource::decode(bytes).map_err(|_| Error::corrupt("version"))
}

/// Version `version` of `t/id`, which the head says exists.
pub fn version<R: Reads>(
    reads: &R,
    keys: &PatientKeys,
    t: &str,
    id: &str,
    version: u64,
) -> Result<Resource, R::Error> {
    let bytes = reads
        .get(&keys.version(t, id, version))?
        .ok_or_else(|| Error::corrupt(format!("version {version} of {t}/{id} (missing)")))?;
    Ok(decode(&bytes)?)
}

/// Plans a write of `entries` for `patient` from `reads` (docs/schema.md §5). `now_micros` is
/// the coordinator's clock: stamps are at least it and above the patient's clock.
pub fn plan_write<R: Reads>(
    reads: &R,
    patient: &PatientId,
    header: &WriteHeader,
    fingerprint: &[u8; FINGERPRINT_BYTES],
    entries: &[WriteEntry<'_>],
    now_micros: u64,
) -> Result<Planned, R::Error> {
    let keys = PatientKeys::new(patient);
    let creates_patient = entries
        .iter()
        .any(|e| e.rtype == ResourceType::Patient && matches!(e.op, EntryOp::Create));
    if let Some(stored) = reads.get(&keys.request(&header.request_id))? {
        return Ok(Planned::Answer(idempotency::replay(&stored, fingerprint)?));
    }
    let clock = match reads.get(&keys.clock())? {
        None => None,
        Some(v) => Some(be_u64(&v).ok_or_else(|| Error::corrupt("patient clock"))?),
    };
    // A refusal read from the replica is answered only if the request's own record is still
    // absent: the replica applies writes while it is read, so a refused-looking head may be this
    // very request's earlier attempt, applied (with its `q/R`, in one batch) since `q/R` was read.
    let refuse = |answer: RecordWriteResponse| -> Result<Planned, R::Error> {
        match reads.get(&keys.request(&header.request_id))? {
            Some(stored) => Ok(Planned::Answer(idempotency::replay(&stored, fingerprint)?)),
            None => Ok(Planned::Answer(answer)),
        }
    };
    if !creates_patient && reads.get(&keys.present())?.is_none() {
        return refuse(refusal(WriteOutcome::NotFound, 0, "route.patient_id"));
    }
    // Plan every entry from the reads; answer definite refusals now.
    struct Old {
        version: u64,
        stamp: Option<u64>,
        content: Option<Resource>,
    }
    let mut olds = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let t = type_name(e.rtype).unwrap_or("?");
        let current = head(reads, &keys, t, &e.id)?;
        if let Some(refused) = head_refusal(e, current, i as u32) {
            return refuse(refused);
        }
        olds.push(match current {
            None => Old {
                version: 0,
                stamp: None,
                content: None,
            },
            Some(current) => {
                let old = version(reads, &keys, t, &e.id, current)?;
                let old_meta = old.meta.clone().unwrap_or_default();
                if old_meta.status == RecordStatus::EnteredInError as i32 {
                    return refuse(refusal(
                        WriteOutcome::EnteredInError,
                        i as u32,
                        &entry_path(&e.field, "meta.id"),
                    ));
                }
                Old {
                    version: current,
                    stamp: Some(old_meta.last_updated_micros as u64),
                    content: Some(old),
                }
            }
        });
    }
    // Stamps: strictly increasing over the patient's writes, in commit order.
    let first = now_micros.max(clock.map_or(0, |c| c + 1));
    let mut plan = WritePlan {
        batch: Batch::default(),
        checks: Vec::new(),
        creates_patient,
        response: RecordWriteResponse {
            outcome: WriteOutcome::Applied as i32,
            ..RecordWriteResponse::default()
        },
    };
    plan.check(
        Check::RequestUnused,
        keys.request(&header.request_id),
        Expect::Absent,
    );
    plan.check(
        Check::Clock,
        keys.clock(),
        match clock {
            Some(c) => Expect::Equals(Bytes::copy_from_slice(&c.to_be_bytes())),
            None => Expect::Absent,
        },
    );
    plan.check(
        Check::Patient,
        keys.present(),
        if creates_patient {
            Expect::Absent
        } else {
            Expect::Present
        },
    );
    let written: BTreeSet<(i32, String)> = entries
        .iter()
        .map(|e| (e.rtype as i32, e.id.clone()))
        .collect();
    let mut references = Vec::new();
    for (i, (e, old)) in entries.iter().zip(olds).enumerate() {
        let t = type_name(e.rtype).unwrap_or("?");
        let stamp = first + i as u64;
        let version = old.version + 1;
        plan.check(
            Check::Head { entry: i as u32 },
            keys.head(t, &e.id),
            match old.version {
                0 => Expect::Absent,
                v => Expect::Equals(Bytes::copy_from_slice(&v.to_be_bytes())),
            },
        );
        // The content of the new version: the request's, or the current version's for a delete.
        let content: Cow<'_, Resource> = match (&e.op, e.resource, &old.content) {
            (EntryOp::Delete { .. }, _, Some(c)) | (_, None, Some(c)) => Cow::Borrowed(c),
            (_, Some(new), _) => Cow::Borrowed(new),
            (_, None, None) => Cow::Owned(Resource::default()),
        };
        let source = content
            .meta
            .as_ref()
            .map(|m| m.source.clone())
            .unwrap_or_default();
        let (status, status_reason) = match &e.op {
            EntryOp::Delete { reason, .. } => (RecordStatus::EnteredInError, reason.clone()),
            _ => (RecordStatus::Current, String::new()),
        };
        let meta = Meta {
            id: e.id.clone(),
            patient_id: patient.as_str().to_owned(),
            version,
            last_updated_micros: stamp as i64,
            author: header.author.clone(),
            status: status as i32,
            status_reason,
            request_id: header.request_id.clone(),
            source,
        };
        references.extend(record_refs(&content, &e.field));
        plan.batch.put(
            keys.version(t, &e.id, version),
            encode_version(&content, &meta),
        );
        plan.batch.put(
            keys.head(t, &e.id),
            Bytes::copy_from_slice(&version.to_be_bytes()),
        );
        if let Some(old) = old.stamp {
            plan.batch.delete(keys.stamp(t, old));
        }
        let mut pointer = version.to_be_bytes().to_vec();
        pointer.extend_from_slice(e.id.as_bytes());
        plan.batch.put(keys.stamp(t, stamp), pointer);
        // Search indexes: the old version's entries go, the new version's come.
        let old_entries = old
            .content
            .as_ref()
            .map(|c| index::entries(&keys, t, &e.id, c, false))
            .unwrap_or_default();
        let new_entries = index::entries(
            &keys,
            t,
            &e.id,
            &content,
            status == RecordStatus::EnteredInError,
        );
        for (key, _) in &old_entries {
            if !new_entries.iter().any(|(k, _)| k == key) {
                plan.batch.delete(key.clone());
            }
        }
        for (key, value) in new_entries {
            plan.batch.put(key, value);
        }
        for x in &e.holds {
            plan.check(Check::Fence, keys.fence(&e.token, x), Expect::Absent);
            plan.batch
                .put(keys.hold(x), Bytes::copy_from_slice(&e.token));
        }
        for x in &e.releases {
            plan.batch.delete(keys.hold(x));
        }
        if e.rtype == ResourceType::Patient {
            match status {
                RecordStatus::EnteredInError => plan.batch.delete(keys.present()),
                _ => plan.batch.put(keys.present(), Bytes::new()),
            }
        }
        plan.response.written.push(ResourceVersion {
            r#type: e.rtype as i32,
            id: e.id.clone(),
            version,
            last_updated_micros: stamp as i64,
        });
    }
    // References to records of this patient not written here must exist.
    let mut seen = BTreeSet::new();
    for (field, r) in references {
        if written.contains(&(r.r#type, r.id.clone())) || !seen.insert((r.r#type, r.id.clone())) {
            continue;
        }
        let Some(t) = ResourceType::try_from(r.r#type).ok().and_then(type_name) else {
            continue;
        };
        plan.check(
            Check::Reference { field },
            keys.head(t, &r.id),
            Expect::Present,
        );
    }
    let last = first + entries.len() as u64 - 1;
    plan.batch
        .put(keys.clock(), Bytes::copy_from_slice(&last.to_be_bytes()));
    let stored = idempotency::stored_answer(fingerprint, &plan.response);
    plan.batch.put(keys.request(&header.request_id), stored);
    Ok(Planned::Write(plan))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use dossier_api::v1::{
        CodeableConcept, Coding, DatePrecision, DateTime, Observation, Patient, observation,
        resource,
    };

    use super::*;

    use crate::testing::Map;

    fn obs(id: &str, code: &str, date: i64) -> Resource {
        Resource {
            meta: Some(Meta {
                id: id.into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Observation(Observation {
                code: Some(CodeableConcept {
                    codings: vec![Coding {
                        system: "http://loinc.org".into(),
                        code: code.into(),
                        display: String::new(),
                    }],
                    text: String::new(),
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

    fn entry<'a>(
        op: EntryOp,
        r: Option<&'a Resource>,
        id: &str,
        rtype: ResourceType,
    ) -> WriteEntry<'a> {
        WriteEntry {
            op,
            rtype,
            id: id.into(),
            resource: r,
            field: "resource".into(),
            holds: Vec::new(),
            token: [0; 16],
            releases: Vec::new(),
        }
    }

    /// Applies a batch to the map after the first read, as a replica applying a commit while a
    /// plan reads it.
    struct ApplyAfterFirstRead {
        map: std::cell::RefCell<Map>,
        pending: std::cell::RefCell<Option<Batch>>,
    }

    impl Reads for ApplyAfterFirstRead {
        type Error = Error;

        fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
            let answer = self.map.borrow().get(key);
            if let Some(batch) = self.pending.borrow_mut().take() {
                self.map.borrow_mut().apply(batch);
            }
            answer
        }

        fn scan_prefix(
            &self,
            p: &[u8],
            a: Option<&[u8]>,
            l: usize,
        ) -> Result<Vec<(Bytes, Bytes)>, Error> {
            self.map.borrow().scan_prefix(p, a, l)
        }
    }

    /// A retry planned while its first attempt is applied between its reads replays that
    /// attempt's answer; it never refuses with ALREADY_EXISTS what it wrote itself.
    #[test]
    fn a_retry_racing_its_own_first_attempt_replays_it() {
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
        map.write(
            &p,
            entry(EntryOp::Create, Some(&patient), "p1", ResourceType::Patient),
            1,
        );
        let records: Vec<Resource> = (0..3).map(|i| obs(&format!("o{i}"), "a-1", i)).collect();
        let entries: Vec<WriteEntry<'_>> = records
            .iter()
            .map(|r| {
                entry(
                    EntryOp::Create,
                    Some(r),
                    &r.meta.as_ref().unwrap().id,
                    ResourceType::Observation,
                )
            })
            .collect();
        let header = WriteHeader {
            request_id: vec![7; 16],
            author: None,
        };
        let first = match plan_write(&map, &p, &header, &[7; 16], &entries, 5_000).unwrap() {
            Planned::Write(plan) => plan,
            other => panic!("{other:?}"),
        };
        let racing = ApplyAfterFirstRead {
            map: std::cell::RefCell::new(map),
            pending: std::cell::RefCell::new(Some(first.batch.clone())),
        };
        match plan_write(&racing, &p, &header, &[7; 16], &entries, 6_000).unwrap() {
            Planned::Answer(a) => {
                assert_eq!(a.outcome, WriteOutcome::Applied as i32, "{a:?}");
                assert!(a.replayed);
                assert_eq!(a.written.len(), 3);
            }
            Planned::Write(_) => panic!("planned a second write of an applied request"),
        }
    }

    /// After any sequence of creates, updates and entered-in-error marks, the index holds
    /// exactly the entries of the current versions: nothing stale, nothing missing.
    #[test]
    fn indexes_hold_exactly_the_current_versions_entries() {
        let mut map = Map::default();
        let p = PatientId::parse("p1", "p").unwrap();
        let keys = PatientKeys::new(&p);
        let patient = Resource {
            meta: Some(Meta {
                id: "p1".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Patient(Patient::default())),
            unmodelled_json: String::new(),
        };
        let w = map.write(
            &p,
            entry(EntryOp::Create, Some(&patient), "p1", ResourceType::Patient),
            1,
        );
        assert_eq!(w.outcome, WriteOutcome::Applied as i32);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rand = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut versions: BTreeMap<String, u64> = BTreeMap::new();
        for n in 2..300u64 {
            let id = format!("o{}", rand(40));
            let r = obs(
                &id,
                ["a-1", "b-2", "c-3"][rand(3) as usize],
                rand(50) as i64 * 1_000,
            );
            let w = match versions.get(&id).copied() {
                None => map.write(
                    &p,
                    entry(EntryOp::Create, Some(&r), &id, ResourceType::Observation),
                    n,
                ),
                Some(v) if rand(4) == 0 => map.write(
                    &p,
                    entry(
                        EntryOp::Delete {
                            expected: v,
                            reason: "test".into(),
                        },
                        None,
                        &id,
                        ResourceType::Observation,
                    ),
                    n,
                ),
                Some(v) => map.write(
                    &p,
                    entry(
                        EntryOp::Update { expected: v },
                        Some(&r),
                        &id,
                        ResourceType::Observation,
                    ),
                    n,
                ),
            };
            match WriteOutcome::try_from(w.outcome).unwrap() {
                WriteOutcome::Applied => {
                    versions.insert(id, w.written[0].version);
                }
                WriteOutcome::EnteredInError => {}
                other => panic!("{other:?}"),
            }
            // The index as stored against the index the current versions make.
            let mut stored: Vec<Bytes> = Vec::new();
            for prefix in [&b"p1\x01x/"[..], &b"p1\x01y/"[..]] {
                stored.extend(
                    map.scan_prefix(prefix, None, usize::MAX)
                        .unwrap()
                        .into_iter()
                        .map(|(k, _)| k),
                );
            }
            let mut want: Vec<Bytes> = Vec::new();
            for (id, v) in &versions {
                let current = version(&map, &keys, "Observation", id, *v).unwrap();
                let in_error = index::in_error(&current);
                want.extend(
                    index::entries(&keys, "Observation", id, &current, in_error)
                        .into_iter()
                        .map(|(k, _)| k),
                );
            }
            stored.sort();
            want.sort();
            assert_eq!(stored, want, "after write {n}");
        }
        assert!(versions.len() > 20);
    }

    /// A version's bytes, built from borrowed content and a new envelope, are the encoding of
    /// the Resource they make.
    #[test]
    fn versions_encode_as_their_resource() {
        for extra in ["", r#"{"maritalStatus":{"text":"M"}}"#] {
            let content = Resource {
                meta: Some(Meta {
                    id: "request's meta".into(),
                    ..Meta::default()
                }),
                kind: Some(resource::Kind::Patient(Patient {
                    languages: vec!["nl-BE".into()],
                    ..Patient::default()
                })),
                unmodelled_json: extra.into(),
            };
            let meta = Meta {
                id: "p".into(),
                version: 3,
                ..Meta::default()
            };
            let bytes = encode_version(&content, &meta);
            let want = Resource {
                meta: Some(meta),
                kind: content.kind.clone(),
                unmodelled_json: extra.into(),
            };
            assert_eq!(bytes, want.encode_to_vec());
            assert_eq!(Resource::decode(bytes.as_slice()).unwrap(), want);
        }
    }
}
