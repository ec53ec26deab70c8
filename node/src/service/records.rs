//! The public `dossier.v1.Records` service: typed, versioned clinical records of one patient in
//! the patient's shard. Key layout, write and read protocols: docs/schema.md §4–§6.
//!
//! A write is coordinated by the patient shard's leader: after a read barrier it reads what the
//! write depends on (the request record, the patient's clock, the heads of the records written),
//! answers definite refusals from those reads, and proposes ONE conditional batch that re-checks
//! every one of them. A failed condition means another write of the patient committed in
//! between: the write is rebuilt, at most `records.write-attempts-max` times.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dossier_records::{
    self as rec, Limits, is_valid_id, kind_type, type_name, validate_new_record,
};
use dossier_api::v1::records_server::Records;
use dossier_api::v1::{
    CreatePatientRequest, CreateRecordRequest, DeleteRecordRequest, EverythingRequest,
    EverythingResponse, HistoryRequest, HistoryResponse, LookupIdentifierRequest,
    LookupIdentifierResponse, Meta, ReadRecordRequest, ReadRecordResponse, ReadVersionRequest,
    RecordStatus, RecordWriteResponse, Resource, ResourceType, ResourceVersion, RouteHeader,
    TransactionRequest, UpdateRecordRequest, WriteHeader, WriteOutcome, resource,
    transaction_entry,
};
use dossier_storage::{Batch, Command, Condition, Expect, Op, Outcome, ShardHandle};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::errors::ApiError;
use crate::mpi::{Claim, Ident, Mpi, fence_key, hold_key};
use crate::node::Node;
use crate::shards::ClusterShards;

/// The records keys of one patient: `patient_id ‖ 0x01 ‖ records key` (docs/schema.md §4).
#[derive(Debug, Clone)]
pub struct PatientKeys {
    prefix: Vec<u8>,
}

impl PatientKeys {
    pub fn new(patient_id: &str) -> Self {
        let mut prefix = patient_id.as_bytes().to_vec();
        prefix.push(0x01);
        PatientKeys { prefix }
    }

    fn key(&self, parts: &[&[u8]]) -> Bytes {
        let mut k = self.prefix.clone();
        for p in parts {
            k.extend_from_slice(p);
        }
        k.into()
    }

    /// `c`: the patient's clock, the last stamp given to a version (u64 BE).
    pub fn clock(&self) -> Bytes {
        self.key(&[b"c"])
    }

    /// `p`: present iff the Patient record exists and is not entered-in-error.
    pub fn present(&self) -> Bytes {
        self.key(&[b"p"])
    }

    /// `h/<Type>/<id>`: the current version (u64 BE).
    pub fn head(&self, t: &str, id: &str) -> Bytes {
        self.key(&[b"h/", t.as_bytes(), b"/", id.as_bytes()])
    }

    /// `v/<Type>/<id>/<version u64 BE>`: one immutable version (`Resource`, protobuf).
    pub fn version(&self, t: &str, id: &str, version: u64) -> Bytes {
        self.key(&[
            b"v/",
            t.as_bytes(),
            b"/",
            id.as_bytes(),
            b"/",
            &version.to_be_bytes(),
        ])
    }

    /// `t/<Type>/`: the records of a kind by the stamp of their current version.
    pub fn stamps(&self, t: &str) -> Bytes {
        self.key(&[b"t/", t.as_bytes(), b"/"])
    }

    /// `t/<Type>/<stamp u64 BE>` → version u64 BE ‖ id.
    pub fn stamp(&self, t: &str, stamp: u64) -> Bytes {
        self.key(&[b"t/", t.as_bytes(), b"/", &stamp.to_be_bytes()])
    }

    /// `q/<request id>` → fingerprint (16 bytes) ‖ `RecordWriteResponse`.
    pub fn request(&self, request_id: &[u8]) -> Bytes {
        self.key(&[b"q/", request_id])
    }
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[derive(Debug, Clone)]
enum EntryOp {
    Create,
    Update { expected: u64 },
    Delete { expected: u64, reason: String },
}

/// One record a write produces.
#[derive(Debug, Clone)]
struct WriteEntry<'a> {
    op: EntryOp,
    rtype: ResourceType,
    id: String,
    /// The new content, borrowed from the request (None for a delete: the current version's
    /// content is kept).
    resource: Option<&'a Resource>,
    /// Where this entry sits in the request, for error paths (`resource`, `entries[2].create`).
    field: String,
    /// Identifiers this write makes the patient hold (claimed in the index beforehand): the
    /// batch puts `i/X` under the condition that no fence revoked the claim.
    holds: Vec<Ident>,
    /// Identifiers this write makes the patient give up: the batch deletes `i/X`.
    releases: Vec<Ident>,
}

/// What a write decided before proposing, per entry.
struct Planned<'a> {
    version: u64,
    old_stamp: Option<u64>,
    /// The content of the new version: the request's, or the current version's for a delete.
    resource: Cow<'a, Resource>,
}

#[derive(Debug, Clone)]
pub struct RecordsService {
    node: Arc<Node>,
    shards: ClusterShards,
}

impl RecordsService {
    pub fn new(node: Arc<Node>) -> Self {
        let shards = ClusterShards::new(Arc::clone(&node));
        RecordsService { node, shards }
    }

    fn mpi(&self) -> Mpi<'_> {
        let r = &self.node.config.node.records;
        Mpi {
            shards: &self.shards,
            grace: Duration::from_millis(r.mpi_claim_grace_ms),
            attempts: r.write_attempts_max,
        }
    }

    /// The identifiers of indexed systems a Patient holds, sorted and without duplicates, with
    /// the path of (the first of) each.
    fn indexed(&self, resource: Option<&Resource>, field: &str) -> Vec<(Ident, String)> {
        let systems = &self.node.config.node.records.indexed_identifier_systems;
        let Some(resource::Kind::Patient(p)) = resource.and_then(|r| r.kind.as_ref()) else {
            return Vec::new();
        };
        let mut out: Vec<(Ident, String)> = Vec::new();
        for (i, id) in p.identifiers.iter().enumerate() {
            if !systems.contains(&id.system) {
                continue;
            }
            let x = Ident {
                system: id.system.clone(),
                value: id.value.clone(),
            };
            if !out.iter().any(|(y, _)| *y == x) {
                out.push((x, format!("{field}.patient.identifiers[{i}]")));
            }
        }
        out.sort();
        out
    }

    /// Claims `idents` for `patient` under the request's token; on a held identifier, gives back
    /// what it claimed and answers IDENTIFIER_HELD.
    async fn claim_all(
        &self,
        patient: &str,
        token: &[u8; 16],
        idents: &[(Ident, String)],
        deadline: Duration,
    ) -> Result<Option<RecordWriteResponse>, ApiError> {
        let mpi = self.mpi();
        for (n, (x, field)) in idents.iter().enumerate() {
            let claimed = idents[..n].iter().map(|(x, _)| x);
            match mpi.claim(x, patient, token, deadline).await {
                Ok(Claim::Claimed) => {}
                Ok(Claim::Held { holder }) => {
                    self.release_all(patient, token, claimed, deadline).await;
                    // The patient itself holds it: a concurrent create of the same patient won.
                    if holder == patient {
                        return Ok(Some(refusal(
                            WriteOutcome::AlreadyExists,
                            0,
                            "resource.meta.id",
                        )));
                    }
                    let mut r = refusal(WriteOutcome::IdentifierHeld, 0, field);
                    r.holder_patient_id = holder;
                    return Ok(Some(r));
                }
                Err(e) => {
                    // The claims made so far are definite and nothing was written: give them
                    // back rather than block other claimants for the grace period.
                    self.release_all(patient, token, claimed, deadline).await;
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// Best-effort release of claims (a failure leaves a claim the next claimant revokes after
    /// the grace period).
    async fn release_all<'a>(
        &self,
        patient: &str,
        token: &[u8],
        idents: impl Iterator<Item = &'a Ident>,
        deadline: Duration,
    ) {
        let mpi = self.mpi();
        for x in idents {
            if let Err(e) = mpi.release(x, patient, token, deadline).await {
                tracing::warn!(identifier = %x.joined(), error = %e, "release of an identifier claim failed");
            }
        }
    }

    /// Version `version` of the patient's Patient record, read after a barrier.
    async fn patient_version(
        &self,
        shard: u64,
        patient: &str,
        version: u64,
        deadline: Duration,
    ) -> Result<Option<Resource>, ApiError> {
        self.node.read_barrier(shard, deadline).await?;
        let replica = self.replica(shard)?;
        let keys = PatientKeys::new(patient);
        Self::get(&replica, &keys.version("Patient", patient, version))?
            .map(|b| Self::decode(&b, "version"))
            .transpose()
    }

    /// A write of the Patient record that changes the indexed identifiers it holds (docs/schema.md
    /// §7): claims the added ones in the index first, then writes the patient batch (holding the
    /// added ones under fences, dropping the removed ones), then releases the removed ones; if the
    /// write is refused, gives back the claims it made. `old` is the version being replaced.
    #[allow(clippy::too_many_arguments)]
    async fn write_patient(
        &self,
        shard: u64,
        patient: &str,
        header: &WriteHeader,
        fingerprint: [u8; 16],
        mut entry: WriteEntry<'_>,
        old: Option<&Resource>,
        new: Option<&Resource>,
        deadline: Duration,
    ) -> Result<RecordWriteResponse, ApiError> {
        let started = Instant::now();
        let left = || deadline.saturating_sub(started.elapsed());
        // A replayed request claims nothing.
        self.node.read_barrier(shard, left()).await?;
        let replica = self.replica(shard)?;
        let keys = PatientKeys::new(patient);
        if let Some(stored) = Self::get(&replica, &keys.request(&header.request_id))? {
            return Self::replay(&stored, &fingerprint);
        }
        // Claim nothing for a write the head refuses (in particular one that names a version that
        // is not current: the identifier diff below is computed from that version).
        let head = Self::head(&replica, &keys, "Patient", patient)?;
        if let Some(refused) = head_refusal(&entry, head, 0) {
            return Ok(refused);
        }
        let token: [u8; 16] = header
            .request_id
            .as_slice()
            .try_into()
            .map_err(|_| ApiError::invalid("header.request_id", "must be 16 bytes"))?;
        let before = self.indexed(old, "resource");
        let after = self.indexed(new, "resource");
        let added: Vec<(Ident, String)> = after
            .iter()
            .filter(|(x, _)| !before.iter().any(|(y, _)| y == x))
            .cloned()
            .collect();
        let removed: Vec<Ident> = before
            .iter()
            .filter(|(x, _)| !after.iter().any(|(y, _)| y == x))
            .map(|(x, _)| x.clone())
            .collect();
        if let Some(refused) = self.claim_all(patient, &token, &added, left()).await? {
            return Ok(refused);
        }
        let mut removed_tokens = Vec::new();
        for x in &removed {
            if let Some(t) = self.mpi().holds(patient, x, left()).await? {
                removed_tokens.push((x.clone(), t));
            }
        }
        entry.holds = added.iter().map(|(x, _)| x.clone()).collect();
        entry.releases = removed;
        let result = self
            .write(shard, patient, header, fingerprint, vec![entry], left())
            .await;
        match &result {
            Ok(w) if w.outcome == WriteOutcome::Applied as i32 => {
                for (x, t) in &removed_tokens {
                    self.release_all(patient, t, std::iter::once(x), left())
                        .await;
                }
            }
            Ok(_) => {
                self.release_all(patient, &token, added.iter().map(|(x, _)| x), left())
                    .await;
            }
            // Refused before anything was proposed: nothing was written.
            Err(ApiError::InvalidArgument { .. } | ApiError::Internal(_)) => {
                self.release_all(patient, &token, added.iter().map(|(x, _)| x), left())
                    .await;
            }
            // Undecided: a retry of the same request finds its claims; a claim left behind is
            // revoked by the next claimant after the grace period.
            Err(_) => {}
        }
        result
    }

    fn limits(&self) -> Limits {
        let r = &self.node.config.node.records;
        Limits {
            text_bytes_max: r.text_bytes_max,
            document_bytes_max: r.document_bytes_max,
            repeated_items_max: r.repeated_items_max,
        }
    }

    /// Checks the route: a patient id of record-id syntax, hosted here, at the client's epoch.
    fn route(&self, route: Option<&RouteHeader>) -> Result<(u64, String), ApiError> {
        let route = route
            .ok_or_else(|| ApiError::invalid("route", "is required (it names the patient)"))?;
        if !is_valid_id(&route.patient_id) {
            return Err(ApiError::invalid(
                "route.patient_id",
                "must match [A-Za-z0-9.-]{1,64}",
            ));
        }
        let descriptor = super::hosted_shard(&self.node, route)?;
        Ok((descriptor.shard_id, route.patient_id.clone()))
    }

    fn replica(&self, shard: u64) -> Result<ShardHandle, ApiError> {
        self.node
            .replica(shard)
            .ok_or(ApiError::ShardNotFound { shard })
    }

    async fn serve<Req, T>(
        &self,
        method: &'static str,
        request: Request<Req>,
        route: impl FnOnce(&Req) -> Option<&RouteHeader>,
        body: impl AsyncFnOnce(&Req, u64, String, Duration) -> Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let deadline = super::deadline_of(&request, self.node.config.request_deadline());
        let result = async {
            let _permit = super::admit(&self.node)?;
            let r = request.get_ref();
            let (shard, patient) = self.route(route(r))?;
            body(r, shard, patient, deadline).await
        }
        .await;
        super::observe(&self.node, method, started, result)
    }

    fn decode(bytes: &[u8], what: &str) -> Result<Resource, ApiError> {
        Resource::decode(bytes)
            .map_err(|e| ApiError::Internal(format!("stored {what} does not decode: {e}")))
    }

    fn get(replica: &ShardHandle, key: &[u8]) -> Result<Option<Bytes>, ApiError> {
        replica
            .get(key)
            .map_err(|e| ApiError::Unavailable(format!("read the state store: {e}")))
    }

    fn head(
        replica: &ShardHandle,
        keys: &PatientKeys,
        t: &str,
        id: &str,
    ) -> Result<Option<u64>, ApiError> {
        match Self::get(replica, &keys.head(t, id))? {
            None => Ok(None),
            Some(v) => be_u64(&v)
                .map(Some)
                .ok_or_else(|| ApiError::Internal(format!("head of {t}/{id} is not a version"))),
        }
    }

    /// The fingerprint that ties a request id to one request: XXH3-128 of the method name and
    /// the request as this server encodes it, without its route (which changes between retries).
    fn fingerprint<M: Message>(method: &str, request: &M) -> [u8; 16] {
        let encoded = request.encode_to_vec();
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        hash.update(method.as_bytes());
        hash.update(&[0]);
        hash.update(without_route(&encoded));
        hash.digest128().to_be_bytes()
    }

    fn check_header(header: Option<&WriteHeader>) -> Result<&WriteHeader, ApiError> {
        let header = header.ok_or_else(|| {
            ApiError::invalid("header", "is required (it carries the request id)")
        })?;
        if header.request_id.len() != 16 || header.request_id.iter().all(|b| *b == 0) {
            return Err(ApiError::invalid(
                "header.request_id",
                "must be 16 bytes, not all zero",
            ));
        }
        Ok(header)
    }

    /// Runs a write of `entries` for `patient` (docs/schema.md §5).
    async fn write(
        &self,
        shard: u64,
        patient: &str,
        header: &WriteHeader,
        fingerprint: [u8; 16],
        entries: Vec<WriteEntry<'_>>,
        deadline: Duration,
    ) -> Result<RecordWriteResponse, ApiError> {
        let started = Instant::now();
        let keys = PatientKeys::new(patient);
        let creates_patient = entries
            .iter()
            .any(|e| e.rtype == ResourceType::Patient && matches!(e.op, EntryOp::Create));
        let attempts = self.node.config.node.records.write_attempts_max;
        for _ in 0..attempts {
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(ApiError::Deadline);
            }
            self.node.read_barrier(shard, remaining).await?;
            let replica = self.replica(shard)?;
            if let Some(stored) = Self::get(&replica, &keys.request(&header.request_id))? {
                return Self::replay(&stored, &fingerprint);
            }
            let clock = match Self::get(&replica, &keys.clock())? {
                None => None,
                Some(v) => {
                    Some(be_u64(&v).ok_or_else(|| ApiError::Internal("patient clock".into()))?)
                }
            };
            if !creates_patient && Self::get(&replica, &keys.present())?.is_none() {
                return Ok(refusal(WriteOutcome::NotFound, 0, "route.patient_id"));
            }
            // Plan every entry from barrier-fresh reads; answer definite refusals now.
            let mut planned = Vec::with_capacity(entries.len());
            for (i, e) in entries.iter().enumerate() {
                let t = type_name(e.rtype).unwrap_or("?");
                let head = Self::head(&replica, &keys, t, &e.id)?;
                let entry_index = i as u32;
                if let Some(refused) = head_refusal(e, head, entry_index) {
                    return Ok(refused);
                }
                let plan = match head {
                    None => Planned {
                        version: 1,
                        old_stamp: None,
                        resource: e
                            .resource
                            .map_or_else(|| Cow::Owned(Resource::default()), Cow::Borrowed),
                    },
                    Some(current) => {
                        let old = Self::get(&replica, &keys.version(t, &e.id, current))?
                            .ok_or_else(|| {
                                ApiError::Internal(format!(
                                    "version {current} of {t}/{} is missing",
                                    e.id
                                ))
                            })?;
                        let old = Self::decode(&old, "version")?;
                        let old_meta = old.meta.clone().unwrap_or_default();
                        if old_meta.status == RecordStatus::EnteredInError as i32 {
                            return Ok(refusal(
                                WriteOutcome::EnteredInError,
                                entry_index,
                                &entry_path(&e.field, "meta.id"),
                            ));
                        }
                        let resource = match (&e.op, e.resource) {
                            (EntryOp::Delete { .. }, _) | (_, None) => Cow::Owned(old),
                            (_, Some(new)) => Cow::Borrowed(new),
                        };
                        Planned {
                            version: current + 1,
                            old_stamp: Some(old_meta.last_updated_micros as u64),
                            resource,
                        }
                    }
                };
                planned.push(plan);
            }
            // Stamps: strictly increasing over the patient's writes, in commit order.
            let first = now_micros().max(clock.map_or(0, |c| c + 1));
            let mut batch = Batch {
                conditions: vec![
                    Condition {
                        key: keys.request(&header.request_id),
                        expect: Expect::Absent,
                    },
                    Condition {
                        key: keys.clock(),
                        expect: match clock {
                            Some(c) => Expect::Equals(Bytes::copy_from_slice(&c.to_be_bytes())),
                            None => Expect::Absent,
                        },
                    },
                    Condition {
                        key: keys.present(),
                        expect: if creates_patient {
                            Expect::Absent
                        } else {
                            Expect::Present
                        },
                    },
                ],
                ops: Vec::new(),
            };
            let mut response = RecordWriteResponse {
                outcome: WriteOutcome::Applied as i32,
                ..RecordWriteResponse::default()
            };
            let written: BTreeSet<(i32, String)> = entries
                .iter()
                .map(|e| (e.rtype as i32, e.id.clone()))
                .collect();
            let mut references = Vec::new();
            let mut fence_conditions = Vec::new();
            for (i, (e, plan)) in entries.iter().zip(planned).enumerate() {
                let t = type_name(e.rtype).unwrap_or("?");
                let stamp = first + i as u64;
                batch.conditions.push(Condition {
                    key: keys.head(t, &e.id),
                    expect: match plan.version {
                        1 => Expect::Absent,
                        v => Expect::Equals(Bytes::copy_from_slice(&(v - 1).to_be_bytes())),
                    },
                });
                let content: &Resource = &plan.resource;
                let source = content
                    .meta
                    .as_ref()
                    .map(|m| m.source.clone())
                    .unwrap_or_default();
                let (status, status_reason) = match &e.op {
                    EntryOp::Delete { reason, .. } => {
                        (RecordStatus::EnteredInError, reason.clone())
                    }
                    _ => (RecordStatus::Current, String::new()),
                };
                let meta = Meta {
                    id: e.id.clone(),
                    patient_id: patient.to_owned(),
                    version: plan.version,
                    last_updated_micros: stamp as i64,
                    author: header.author.clone(),
                    status: status as i32,
                    status_reason,
                    request_id: header.request_id.clone(),
                    source,
                };
                references.extend(rec::record_refs(content, &e.field));
                batch.ops.push(Op::Put {
                    key: keys.version(t, &e.id, plan.version),
                    value: encode_version(content, &meta).into(),
                });
                batch.ops.push(Op::Put {
                    key: keys.head(t, &e.id),
                    value: Bytes::copy_from_slice(&plan.version.to_be_bytes()),
                });
                if let Some(old) = plan.old_stamp {
                    batch.ops.push(Op::Delete {
                        key: keys.stamp(t, old),
                    });
                }
                let mut pointer = plan.version.to_be_bytes().to_vec();
                pointer.extend_from_slice(e.id.as_bytes());
                batch.ops.push(Op::Put {
                    key: keys.stamp(t, stamp),
                    value: pointer.into(),
                });
                for x in &e.holds {
                    fence_conditions.push(batch.conditions.len());
                    batch.conditions.push(Condition {
                        key: fence_key(patient, &header.request_id, x),
                        expect: Expect::Absent,
                    });
                    batch.ops.push(Op::Put {
                        key: hold_key(patient, x),
                        value: Bytes::copy_from_slice(&header.request_id),
                    });
                }
                for x in &e.releases {
                    batch.ops.push(Op::Delete {
                        key: hold_key(patient, x),
                    });
                }
                if e.rtype == ResourceType::Patient {
                    match status {
                        RecordStatus::EnteredInError => batch.ops.push(Op::Delete {
                            key: keys.present(),
                        }),
                        _ => batch.ops.push(Op::Put {
                            key: keys.present(),
                            value: Bytes::new(),
                        }),
                    }
                }
                response.written.push(ResourceVersion {
                    r#type: e.rtype as i32,
                    id: e.id.clone(),
                    version: plan.version,
                    last_updated_micros: stamp as i64,
                });
            }
            // References to records of this patient not written here must exist.
            let heads_end = batch.conditions.len();
            let mut reference_fields = Vec::new();
            let mut seen = BTreeSet::new();
            for (field, r) in references {
                if written.contains(&(r.r#type, r.id.clone()))
                    || !seen.insert((r.r#type, r.id.clone()))
                {
                    continue;
                }
                let Some(t) = ResourceType::try_from(r.r#type).ok().and_then(type_name) else {
                    continue;
                };
                batch.conditions.push(Condition {
                    key: keys.head(t, &r.id),
                    expect: Expect::Present,
                });
                reference_fields.push(field);
            }
            let last = first + entries.len() as u64 - 1;
            batch.ops.push(Op::Put {
                key: keys.clock(),
                value: Bytes::copy_from_slice(&last.to_be_bytes()),
            });
            let mut stored = fingerprint.to_vec();
            stored.extend_from_slice(&response.encode_to_vec());
            batch.ops.push(Op::Put {
                key: keys.request(&header.request_id),
                value: stored.into(),
            });
            batch.check_limits(&self.node.config.state).map_err(|e| {
                ApiError::invalid(
                    entries
                        .first()
                        .map_or("resource", |e| e.field.as_str())
                        .to_owned(),
                    format!("the write is too large: {e}"),
                )
            })?;
            let remaining = deadline.saturating_sub(started.elapsed());
            let (outcome, index) = self
                .node
                .write(
                    shard,
                    Command::Txn {
                        session: None,
                        batch,
                    },
                    remaining,
                )
                .await?;
            match outcome {
                Outcome::Applied | Outcome::Done => {
                    response.index = index;
                    return Ok(response);
                }
                Outcome::ConditionFailed { index: failed } => {
                    let failed = failed as usize;
                    if failed == 2 && !creates_patient {
                        return Ok(refusal(WriteOutcome::NotFound, 0, "route.patient_id"));
                    }
                    if fence_conditions.contains(&failed) {
                        return Ok(refusal(WriteOutcome::ClaimRevoked, 0, "header.request_id"));
                    }
                    if failed >= heads_end {
                        let field = reference_fields
                            .get(failed - heads_end)
                            .cloned()
                            .unwrap_or_default();
                        return Ok(refusal(WriteOutcome::ReferenceNotFound, 0, &field));
                    }
                    // The request record, the clock or a head moved: another write of this
                    // patient committed (or this one did). Plan again from fresh reads.
                    continue;
                }
                Outcome::StaleSequence { .. } | Outcome::SessionExpired => {
                    return Err(ApiError::Internal(
                        "a sessionless write got a session outcome".into(),
                    ));
                }
            }
        }
        Err(ApiError::Unavailable(format!(
            "patient {patient}: {attempts} attempts lost to concurrent writes of the same patient; retry"
        )))
    }

    /// The stored answer of an applied request id, or INVALID_ARGUMENT when the id was used by
    /// another request.
    fn replay(stored: &[u8], fingerprint: &[u8; 16]) -> Result<RecordWriteResponse, ApiError> {
        if stored.len() < 16 {
            return Err(ApiError::Internal("stored request record is short".into()));
        }
        if &stored[..16] != fingerprint {
            return Err(ApiError::invalid(
                "header.request_id",
                "was already used by a different request",
            ));
        }
        let mut response = RecordWriteResponse::decode(&stored[16..])
            .map_err(|e| ApiError::Internal(format!("stored answer does not decode: {e}")))?;
        response.replayed = true;
        response.index = 0;
        Ok(response)
    }

    fn read_current(
        replica: &ShardHandle,
        keys: &PatientKeys,
        t: &str,
        id: &str,
    ) -> Result<Option<Resource>, ApiError> {
        let Some(version) = Self::head(replica, keys, t, id)? else {
            return Ok(None);
        };
        let bytes = Self::get(replica, &keys.version(t, id, version))?.ok_or_else(|| {
            ApiError::Internal(format!("version {version} of {t}/{id} is missing"))
        })?;
        Self::decode(&bytes, "version").map(Some)
    }

    fn read_type(raw: i32, field: &str) -> Result<&'static str, ApiError> {
        ResourceType::try_from(raw)
            .ok()
            .and_then(type_name)
            .ok_or_else(|| ApiError::invalid(field.to_owned(), "must be a resource type"))
    }

    fn check_id(id: &str, field: &str) -> Result<(), ApiError> {
        if !is_valid_id(id) {
            return Err(ApiError::invalid(
                field.to_owned(),
                "must match [A-Za-z0-9.-]{1,64}",
            ));
        }
        Ok(())
    }

    /// Validates a create or update of one record and returns its entry.
    fn entry<'a>(
        &self,
        patient: &str,
        resource: Option<&'a Resource>,
        field: &str,
        op: EntryOp,
        patient_allowed: bool,
    ) -> Result<WriteEntry<'a>, ApiError> {
        let resource =
            resource.ok_or_else(|| ApiError::invalid(field.to_owned(), "is required"))?;
        validate_new_record(resource, field, patient, &self.limits()).map_err(|e| {
            ApiError::InvalidArgument {
                field: e.field,
                message: e.message,
                limit: e.limit,
            }
        })?;
        let Some(kind) = &resource.kind else {
            return Err(ApiError::invalid(format!("{field}.kind"), "is required"));
        };
        let rtype = kind_type(kind);
        let id = resource
            .meta
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_default();
        if rtype == ResourceType::Patient {
            if !patient_allowed {
                return Err(ApiError::invalid(
                    format!("{field}.patient"),
                    "a Patient is written by CreatePatient or Update, not here",
                ));
            }
            if id != patient {
                return Err(ApiError::invalid(
                    format!("{field}.meta.id"),
                    "a Patient's id must equal route.patient_id",
                ));
            }
        }
        Ok(WriteEntry {
            op,
            rtype,
            id,
            resource: Some(resource),
            field: field.to_owned(),
            holds: Vec::new(),
            releases: Vec::new(),
        })
    }
}

/// The stored bytes of a version: `content`'s kind with `meta` as its envelope, encoded as the
/// `Resource` they make (the kind's oneof fields come before `meta`, field 15), without copying
/// the content.
fn encode_version(content: &Resource, meta: &Meta) -> Vec<u8> {
    let kind_len = content.kind.as_ref().map_or(0, |k| k.encoded_len());
    let mut out = Vec::with_capacity(kind_len + meta.encoded_len() + 8);
    if let Some(kind) = &content.kind {
        kind.encode(&mut out);
    }
    prost::encoding::message::encode(15, meta, &mut out);
    out
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
fn head_refusal(
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

/// A definite refusal: nothing was written.
fn refusal(outcome: WriteOutcome, entry_index: u32, field: &str) -> RecordWriteResponse {
    RecordWriteResponse {
        outcome: outcome as i32,
        entry_index,
        field: field.to_owned(),
        ..RecordWriteResponse::default()
    }
}

/// An encoded write request less its route: every write request has its `RouteHeader` as field
/// 1, which prost encodes first (tag byte 0x0a, a length, the bytes).
fn without_route(encoded: &[u8]) -> &[u8] {
    if encoded.first() != Some(&0x0a) {
        return encoded;
    }
    let mut rest = &encoded[1..];
    match prost::encoding::decode_varint(&mut rest) {
        Ok(len) if (len as usize) <= rest.len() => &rest[len as usize..],
        _ => encoded,
    }
}

#[tonic::async_trait]
impl Records for RecordsService {
    async fn create_patient(
        &self,
        request: Request<CreatePatientRequest>,
    ) -> Result<Response<RecordWriteResponse>, Status> {
        self.serve(
            "records_create_patient",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let header = Self::check_header(r.header.as_ref())?;
                let entry = self.entry(
                    &patient,
                    r.resource.as_ref(),
                    "resource",
                    EntryOp::Create,
                    true,
                )?;
                if entry.rtype != ResourceType::Patient {
                    return Err(ApiError::invalid("resource.kind", "must be a patient"));
                }
                let fp = Self::fingerprint("CreatePatient", r);
                self.write_patient(
                    shard,
                    &patient,
                    header,
                    fp,
                    entry,
                    None,
                    r.resource.as_ref(),
                    deadline,
                )
                .await
            },
        )
        .await
    }

    async fn create(
        &self,
        request: Request<CreateRecordRequest>,
    ) -> Result<Response<RecordWriteResponse>, Status> {
        self.serve(
            "records_create",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let header = Self::check_header(r.header.as_ref())?;
                let entry = self.entry(
                    &patient,
                    r.resource.as_ref(),
                    "resource",
                    EntryOp::Create,
                    false,
                )?;
                let fp = Self::fingerprint("Create", r);
                self.write(shard, &patient, header, fp, vec![entry], deadline)
                    .await
            },
        )
        .await
    }

    async fn read(
        &self,
        request: Request<ReadRecordRequest>,
    ) -> Result<Response<ReadRecordResponse>, Status> {
        self.serve(
            "records_read",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let t = Self::read_type(r.r#type, "type")?;
                Self::check_id(&r.id, "id")?;
                super::read_ready(&self.node, shard, r.consistency, deadline).await?;
                let replica = self.replica(shard)?;
                let keys = PatientKeys::new(&patient);
                let resource = Self::read_current(&replica, &keys, t, &r.id)?;
                Ok(ReadRecordResponse {
                    found: resource.is_some(),
                    resource,
                    applied_index: replica.applied_index().unwrap_or(0),
                })
            },
        )
        .await
    }

    async fn v_read(
        &self,
        request: Request<ReadVersionRequest>,
    ) -> Result<Response<ReadRecordResponse>, Status> {
        self.serve(
            "records_vread",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let t = Self::read_type(r.r#type, "type")?;
                Self::check_id(&r.id, "id")?;
                if r.version == 0 {
                    return Err(ApiError::invalid("version", "starts at 1"));
                }
                super::read_ready(&self.node, shard, r.consistency, deadline).await?;
                let replica = self.replica(shard)?;
                let keys = PatientKeys::new(&patient);
                let resource = Self::get(&replica, &keys.version(t, &r.id, r.version))?
                    .map(|b| Self::decode(&b, "version"))
                    .transpose()?;
                Ok(ReadRecordResponse {
                    found: resource.is_some(),
                    resource,
                    applied_index: replica.applied_index().unwrap_or(0),
                })
            },
        )
        .await
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        self.serve(
            "records_history",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let t = Self::read_type(r.r#type, "type")?;
                Self::check_id(&r.id, "id")?;
                let page_max = self.node.config.node.records.history_page_max;
                let limit = match r.limit {
                    0 => page_max,
                    n if n > page_max => {
                        return Err(ApiError::InvalidArgument {
                            field: "limit".into(),
                            message: format!("is {n}, above the page limit of {page_max}"),
                            limit: Some(u64::from(page_max)),
                        });
                    }
                    n => n,
                };
                super::read_ready(&self.node, shard, r.consistency, deadline).await?;
                let replica = self.replica(shard)?;
                let keys = PatientKeys::new(&patient);
                let applied_index = replica.applied_index().unwrap_or(0);
                let Some(current) = Self::head(&replica, &keys, t, &r.id)? else {
                    return Ok(HistoryResponse {
                        found: false,
                        versions: Vec::new(),
                        more: false,
                        applied_index,
                    });
                };
                let top = match r.before_version {
                    0 => current,
                    b => (b - 1).min(current),
                };
                let bytes_max = self.node.config.node.records.message_bytes_max;
                let (mut versions, mut bytes) = (Vec::new(), 0usize);
                let mut v = top;
                while v >= 1 && versions.len() < limit as usize {
                    let raw =
                        Self::get(&replica, &keys.version(t, &r.id, v))?.ok_or_else(|| {
                            ApiError::Internal(format!("version {v} of {t}/{} is missing", r.id))
                        })?;
                    if !versions.is_empty() && bytes + raw.len() > bytes_max {
                        break;
                    }
                    bytes += raw.len();
                    versions.push(Self::decode(&raw, "version")?);
                    v -= 1;
                }
                Ok(HistoryResponse {
                    found: true,
                    more: v >= 1,
                    versions,
                    applied_index,
                })
            },
        )
        .await
    }

    async fn update(
        &self,
        request: Request<UpdateRecordRequest>,
    ) -> Result<Response<RecordWriteResponse>, Status> {
        self.serve(
            "records_update",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let header = Self::check_header(r.header.as_ref())?;
                if r.expected_version == 0 {
                    return Err(ApiError::invalid("expected_version", "starts at 1"));
                }
                let entry = self.entry(
                    &patient,
                    r.resource.as_ref(),
                    "resource",
                    EntryOp::Update {
                        expected: r.expected_version,
                    },
                    true,
                )?;
                let fp = Self::fingerprint("Update", r);
                if entry.rtype == ResourceType::Patient {
                    let old = self
                        .patient_version(shard, &patient, r.expected_version, deadline)
                        .await?;
                    return self
                        .write_patient(
                            shard,
                            &patient,
                            header,
                            fp,
                            entry,
                            old.as_ref(),
                            r.resource.as_ref(),
                            deadline,
                        )
                        .await;
                }
                self.write(shard, &patient, header, fp, vec![entry], deadline)
                    .await
            },
        )
        .await
    }

    async fn delete(
        &self,
        request: Request<DeleteRecordRequest>,
    ) -> Result<Response<RecordWriteResponse>, Status> {
        self.serve(
            "records_delete",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let header = Self::check_header(r.header.as_ref())?;
                let t = Self::read_type(r.r#type, "type")?;
                Self::check_id(&r.id, "id")?;
                if r.expected_version == 0 {
                    return Err(ApiError::invalid("expected_version", "starts at 1"));
                }
                if r.reason.trim().is_empty() {
                    return Err(ApiError::invalid(
                        "reason",
                        "is required: why the record is in error",
                    ));
                }
                if r.reason.len() > 1024 || r.reason.chars().any(char::is_control) {
                    return Err(ApiError::invalid(
                        "reason",
                        "must be at most 1024 bytes of text",
                    ));
                }
                let rtype = rec::type_from_name(t).unwrap_or(ResourceType::Unspecified);
                if rtype == ResourceType::Patient && r.id != patient {
                    return Err(ApiError::invalid(
                        "id",
                        "a Patient's id must equal route.patient_id",
                    ));
                }
                let entry = WriteEntry {
                    op: EntryOp::Delete {
                        expected: r.expected_version,
                        reason: r.reason.clone(),
                    },
                    rtype,
                    id: r.id.clone(),
                    resource: None,
                    field: String::new(),
                    holds: Vec::new(),
                    releases: Vec::new(),
                };
                let fp = Self::fingerprint("Delete", r);
                if rtype == ResourceType::Patient {
                    let old = self
                        .patient_version(shard, &patient, r.expected_version, deadline)
                        .await?;
                    return self
                        .write_patient(
                            shard,
                            &patient,
                            header,
                            fp,
                            entry,
                            old.as_ref(),
                            None,
                            deadline,
                        )
                        .await;
                }
                self.write(shard, &patient, header, fp, vec![entry], deadline)
                    .await
            },
        )
        .await
    }

    async fn transaction(
        &self,
        request: Request<TransactionRequest>,
    ) -> Result<Response<RecordWriteResponse>, Status> {
        self.serve(
            "records_transaction",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let header = Self::check_header(r.header.as_ref())?;
                let max = self.node.config.node.records.transaction_entries_max;
                if r.entries.is_empty() {
                    return Err(ApiError::invalid("entries", "needs at least one entry"));
                }
                if r.entries.len() > max {
                    return Err(ApiError::InvalidArgument {
                        field: "entries".into(),
                        message: format!(
                            "has {} entries, above the limit of {max}",
                            r.entries.len()
                        ),
                        limit: Some(max as u64),
                    });
                }
                let mut entries = Vec::with_capacity(r.entries.len());
                let mut seen = BTreeSet::new();
                for (i, e) in r.entries.iter().enumerate() {
                    let entry = match &e.op {
                        Some(transaction_entry::Op::Create(res)) => self.entry(
                            &patient,
                            Some(res),
                            &format!("entries[{i}].create"),
                            EntryOp::Create,
                            false,
                        )?,
                        Some(transaction_entry::Op::Update(u)) => {
                            if u.expected_version == 0 {
                                return Err(ApiError::invalid(
                                    format!("entries[{i}].update.expected_version"),
                                    "starts at 1",
                                ));
                            }
                            self.entry(
                                &patient,
                                u.resource.as_ref(),
                                &format!("entries[{i}].update.resource"),
                                EntryOp::Update {
                                    expected: u.expected_version,
                                },
                                false,
                            )?
                        }
                        None => {
                            return Err(ApiError::invalid(
                                format!("entries[{i}].op"),
                                "is required (create or update)",
                            ));
                        }
                    };
                    if !seen.insert((entry.rtype as i32, entry.id.clone())) {
                        return Err(ApiError::invalid(
                            format!("{}.meta.id", entry.field),
                            "names a record an earlier entry already writes",
                        ));
                    }
                    entries.push(entry);
                }
                let fp = Self::fingerprint("Transaction", r);
                self.write(shard, &patient, header, fp, entries, deadline)
                    .await
            },
        )
        .await
    }

    type EverythingStream = ReceiverStream<Result<EverythingResponse, Status>>;

    async fn everything(
        &self,
        request: Request<EverythingRequest>,
    ) -> Result<Response<Self::EverythingStream>, Status> {
        let deadline = super::deadline_of(&request, self.node.config.request_deadline());
        let permit = super::admit(&self.node).map_err(Status::from)?;
        let r = request.into_inner();
        let (shard, patient) = self.route(r.route.as_ref()).map_err(Status::from)?;
        let mut types: Vec<&'static str> = Vec::new();
        for (i, t) in r.types.iter().enumerate() {
            let name = Self::read_type(*t, &format!("types[{i}]")).map_err(Status::from)?;
            if types.contains(&name) {
                return Err(
                    ApiError::invalid(format!("types[{i}]"), "repeats an earlier type").into(),
                );
            }
            types.push(name);
        }
        if types.is_empty() {
            types = rec::RESOURCE_TYPES
                .iter()
                .filter_map(|t| type_name(*t))
                .collect();
        }
        if r.since_micros < 0 {
            return Err(ApiError::invalid("since_micros", "must not be negative").into());
        }
        super::read_ready(&self.node, shard, r.consistency, deadline)
            .await
            .map_err(Status::from)?;
        let replica = self.replica(shard).map_err(Status::from)?;
        let bytes_max = self.node.config.node.records.message_bytes_max;
        // Two messages in flight at most: a slow reader holds back the scan, not memory.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let _permit = permit;
            let result = stream_everything(
                &replica,
                &PatientKeys::new(&patient),
                &types,
                r.since_micros as u64,
                r.include_entered_in_error,
                bytes_max,
                &tx,
            )
            .await;
            if let Err(e) = result {
                let _ = tokio::time::timeout(STALLED_READER, tx.send(Err(Status::from(e)))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lookup_identifier(
        &self,
        request: Request<LookupIdentifierRequest>,
    ) -> Result<Response<LookupIdentifierResponse>, Status> {
        let started = Instant::now();
        let deadline = super::deadline_of(&request, self.node.config.request_deadline());
        let result = async {
            let _permit = super::admit(&self.node)?;
            let r = request.get_ref();
            if !self
                .node
                .config
                .node
                .records
                .indexed_identifier_systems
                .contains(&r.system)
            {
                return Err(ApiError::invalid(
                    "system",
                    "is not an indexed identifier system (records.indexed-identifier-systems)",
                ));
            }
            if r.value.is_empty()
                || r.value.len() > 64
                || r.value.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(ApiError::invalid(
                    "value",
                    "must be 1..64 bytes without white space",
                ));
            }
            let x = Ident {
                system: r.system.clone(),
                value: r.value.clone(),
            };
            // The client routes by the index key; the route is checked like a patient's.
            let route = r
                .route
                .as_ref()
                .ok_or_else(|| ApiError::invalid("route", "is required"))?;
            if route.patient_id != x.route_key() {
                return Err(ApiError::invalid(
                    "route.patient_id",
                    "must be the index key mpi:<system>|<value>",
                ));
            }
            let holder = self.mpi().lookup(&x, deadline).await?;
            Ok(LookupIdentifierResponse {
                found: holder.is_some(),
                patient_id: holder.unwrap_or_default(),
            })
        }
        .await;
        super::observe(&self.node, "records_lookup_identifier", started, result)
    }
}

/// One kind's cursor over `t/<Type>/`, a page at a time.
struct StampCursor {
    t: &'static str,
    prefix: Bytes,
    after: Bytes,
    page: std::collections::VecDeque<(u64, u64, String)>,
    done: bool,
}

const STAMP_PAGE: usize = 256;

/// How long Everything waits for a reader to take the next message before giving up.
const STALLED_READER: Duration = Duration::from_secs(60);

impl StampCursor {
    fn peek(&mut self, replica: &ShardHandle) -> Result<Option<u64>, ApiError> {
        if self.page.is_empty() && !self.done {
            let page = replica
                .scan_prefix(&self.prefix, Some(&self.after), STAMP_PAGE)
                .map_err(|e| ApiError::Unavailable(format!("scan the state store: {e}")))?;
            self.done = page.len() < STAMP_PAGE;
            if let Some((k, _)) = page.last() {
                self.after = k.clone();
            }
            for (k, v) in page {
                let stamp = k
                    .get(self.prefix.len()..)
                    .and_then(be_u64)
                    .ok_or_else(|| ApiError::Internal("stamp key".into()))?;
                let version = v
                    .get(..8)
                    .and_then(be_u64)
                    .ok_or_else(|| ApiError::Internal("stamp pointer".into()))?;
                let id = String::from_utf8(v[8..].to_vec())
                    .map_err(|_| ApiError::Internal("stamp pointer id".into()))?;
                self.page.push_back((stamp, version, id));
            }
        }
        Ok(self.page.front().map(|(s, _, _)| *s))
    }
}

/// Sends the patient's current records with a stamp above `since`, in stamp order, in messages
/// of at most `bytes_max` bytes (a larger record goes alone). Holds one page per kind.
async fn stream_everything(
    replica: &ShardHandle,
    keys: &PatientKeys,
    types: &[&'static str],
    since: u64,
    include_entered_in_error: bool,
    bytes_max: usize,
    tx: &tokio::sync::mpsc::Sender<Result<EverythingResponse, Status>>,
) -> Result<(), ApiError> {
    let as_of = match RecordsService::get(replica, &keys.clock())? {
        Some(v) => be_u64(&v).ok_or_else(|| ApiError::Internal("patient clock".into()))? as i64,
        None => 0,
    };
    let mut cursors: Vec<StampCursor> = types
        .iter()
        .map(|t| StampCursor {
            t,
            prefix: keys.stamps(t),
            after: keys.stamp(t, since),
            page: Default::default(),
            done: false,
        })
        .collect();
    let mut message = EverythingResponse {
        resources: Vec::new(),
        as_of_micros: as_of,
    };
    let mut bytes = 0usize;
    let mut sent_any = false;
    loop {
        let mut best: Option<(usize, u64)> = None;
        for (i, c) in cursors.iter_mut().enumerate() {
            if let Some(s) = c.peek(replica)?
                && best.is_none_or(|(_, b)| s < b)
            {
                best = Some((i, s));
            }
        }
        // Only what was current when the stream began (stamps up to `as_of`): a record written
        // meanwhile has a later stamp and goes to the next sync (`since = as_of`), so that a
        // resumed stream (`since` = the last stamp received) misses nothing.
        let Some((i, stamp)) = best else { break };
        if stamp > as_of as u64 {
            break;
        }
        let (_, version, id) = cursors[i].page.pop_front().expect("peeked");
        let t = cursors[i].t;
        let Some(raw) = RecordsService::get(replica, &keys.version(t, &id, version))? else {
            // The record moved on since the page was read: its new stamp is above this one and
            // the cursor reaches it later (or the next sync does).
            continue;
        };
        let resource = RecordsService::decode(&raw, "version")?;
        let in_error = resource
            .meta
            .as_ref()
            .is_some_and(|m| m.status == RecordStatus::EnteredInError as i32);
        if in_error && !include_entered_in_error {
            continue;
        }
        if !message.resources.is_empty() && bytes + raw.len() > bytes_max {
            let full = std::mem::replace(
                &mut message,
                EverythingResponse {
                    resources: Vec::new(),
                    as_of_micros: as_of,
                },
            );
            // A reader that stops reading (but keeps its connection) ends the stream after
            // STALLED_READER instead of holding its admission permit for ever.
            if !matches!(
                tokio::time::timeout(STALLED_READER, tx.send(Ok(full))).await,
                Ok(Ok(()))
            ) {
                return Ok(());
            }
            sent_any = true;
            bytes = 0;
        }
        bytes += raw.len();
        message.resources.push(resource);
    }
    if !message.resources.is_empty() || !sent_any {
        let _ = tokio::time::timeout(STALLED_READER, tx.send(Ok(message))).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dossier_api::v1::{CreateRecordRequest, Meta, Resource, RouteHeader, WriteHeader};

    use super::RecordsService;

    /// A retry routed with another epoch has the same fingerprint; another request has another.
    #[test]
    fn fingerprints_ignore_the_route_only() {
        let request = |route: Option<RouteHeader>, id: &str| CreateRecordRequest {
            route,
            header: Some(WriteHeader {
                request_id: vec![7; 16],
                author: None,
            }),
            resource: Some(Resource {
                meta: Some(Meta {
                    id: id.into(),
                    ..Meta::default()
                }),
                kind: None,
            }),
        };
        let route = |epoch| RouteHeader {
            shard_id: 3,
            epoch,
            patient_id: "p".into(),
        };
        let a = RecordsService::fingerprint("Create", &request(Some(route(1)), "x"));
        assert_eq!(
            a,
            RecordsService::fingerprint("Create", &request(Some(route(9)), "x"))
        );
        assert_eq!(
            a,
            RecordsService::fingerprint("Create", &request(None, "x"))
        );
        assert_ne!(
            a,
            RecordsService::fingerprint("Create", &request(Some(route(1)), "y"))
        );
        assert_ne!(
            a,
            RecordsService::fingerprint("Update", &request(Some(route(1)), "x"))
        );
    }

    /// A version's bytes, built from borrowed content and a new envelope, are the encoding of
    /// the Resource they make.
    #[test]
    fn versions_encode_as_their_resource() {
        use dossier_api::v1::{Patient, resource};
        use prost::Message;
        let content = Resource {
            meta: Some(Meta {
                id: "request's meta".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Patient(Patient {
                languages: vec!["nl-BE".into()],
                ..Patient::default()
            })),
        };
        let meta = Meta {
            id: "p".into(),
            version: 3,
            ..Meta::default()
        };
        let bytes = super::encode_version(&content, &meta);
        let want = Resource {
            meta: Some(meta),
            kind: content.kind.clone(),
        };
        assert_eq!(bytes, want.encode_to_vec());
        assert_eq!(Resource::decode(bytes.as_slice()).unwrap(), want);
    }
}
