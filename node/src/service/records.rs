//! The public `dossier.v1.Records` service: the record layer (`dossier-records`) adapted to gRPC
//! and to this node's shards. Requests are checked and turned into record-layer calls; the
//! planning, key layout, indexes and protocols live in the record layer (docs/schema.md).
//!
//! A write is coordinated by the patient shard's leader: after a read barrier it plans the
//! write from the replica's reads (`plan::plan_write`), proposes the ONE conditional batch the
//! plan made, and on a failed condition asks the plan what it means: a definite answer, or plan
//! again from fresh reads (at most `records.write-attempts-max` times).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dossier_api::v1::records_server::Records;
use dossier_api::v1::{
    CreatePatientRequest, CreateRecordRequest, DeleteRecordRequest, EverythingRequest,
    EverythingResponse, HistoryRequest, HistoryResponse, ListQuarantineRequest,
    ListQuarantineResponse, LookupIdentifierRequest, LookupIdentifierResponse,
    QuarantineRequest, QuarantineResponse, ReadRecordRequest, ReadRecordResponse,
    ReadVersionRequest, RecordWriteResponse, Resource, ResourceType, RouteHeader, SearchRequest,
    SearchResponse, TransactionRequest, UpdateRecordRequest, WriteHeader, WriteOutcome, resource,
    transaction_entry,
};
use dossier_records::everything::Everything;
use dossier_records::idempotency::fingerprint;
use dossier_records::kv::{Batch, Expect};
use dossier_records::mpi::{Claim, Mpi};
use dossier_records::plan::{self, EntryOp, Planned, Retry, WriteEntry, refusal};
use dossier_records::search::{self, Query};
use dossier_records::{
    Ident, Limits, PatientId, PatientKeys, history, kind_type, quarantine, type_name,
    validate_new_record,
};
use dossier_storage::{Command, Outcome, ShardHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::errors::ApiError;
use crate::node::Node;
use crate::record_store::{ReplicaReads, to_storage};
use crate::shards::ClusterShards;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A claim token for one attempt of a write: unique per attempt (request id, clock, counter),
/// so that a fence left by an earlier attempt never blocks a later one.
fn fresh_token(request_id: &[u8]) -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    hash.update(request_id);
    hash.update(&now_micros().to_be_bytes());
    hash.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    hash.update(&std::process::id().to_be_bytes());
    hash.digest128().to_be_bytes()
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

    fn mpi(&self) -> Mpi<'_, ClusterShards> {
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

    /// Claims `idents` for `patient` under `token`; on a held identifier, gives back what it
    /// claimed and answers IDENTIFIER_HELD (or ALREADY_EXISTS when the patient itself holds it).
    async fn claim_all(
        &self,
        patient: &PatientId,
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
                    if holder == *patient {
                        return Ok(Some(refusal(
                            WriteOutcome::AlreadyExists,
                            0,
                            "resource.meta.id",
                        )));
                    }
                    let mut r = refusal(WriteOutcome::IdentifierHeld, 0, field);
                    r.holder_patient_id = holder.as_str().to_owned();
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
        patient: &PatientId,
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
        patient: &PatientId,
        version: u64,
        deadline: Duration,
    ) -> Result<Option<Resource>, ApiError> {
        self.node.read_barrier(shard, deadline).await?;
        let replica = self.replica(shard)?;
        let keys = PatientKeys::new(patient);
        let reads = ReplicaReads(&replica);
        match dossier_records::kv::Reads::get(
            &reads,
            &keys.version("Patient", patient.as_str(), version),
        )? {
            None => Ok(None),
            Some(b) => Ok(Some(plan::decode(&b)?)),
        }
    }

    /// A write of the Patient record that changes the indexed identifiers it holds (docs/schema.md
    /// §7): claims the added ones in the index first (under a token fresh for this attempt),
    /// then writes the patient batch (holding the added ones under fences, dropping the removed
    /// ones), then releases the removed ones; if the write is refused, gives back the claims it
    /// made. `old` is the version being replaced.
    #[allow(clippy::too_many_arguments)]
    async fn write_patient(
        &self,
        shard: u64,
        patient: &PatientId,
        header: &WriteHeader,
        fingerprint: [u8; 16],
        mut entry: WriteEntry<'_>,
        old: Option<&Resource>,
        new: Option<&Resource>,
        deadline: Duration,
    ) -> Result<RecordWriteResponse, ApiError> {
        let started = Instant::now();
        let left = || deadline.saturating_sub(started.elapsed());
        // A replayed request claims nothing; nor does a write the head refuses (in particular
        // one that names a version that is not current: the identifier diff below is computed
        // from that version).
        self.node.read_barrier(shard, left()).await?;
        let replica = self.replica(shard)?;
        let keys = PatientKeys::new(patient);
        let reads = ReplicaReads(&replica);
        if let Some(stored) = dossier_records::kv::Reads::get(&reads, &keys.request(&header.request_id))? {
            return Ok(dossier_records::idempotency::replay(&stored, &fingerprint)?);
        }
        let head = plan::head(&reads, &keys, "Patient", patient.as_str())?;
        if let Some(refused) = plan::head_refusal(&entry, head, 0) {
            return Ok(refused);
        }
        let token = fresh_token(&header.request_id);
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
        entry.token = token;
        entry.releases = removed;
        let result = self
            .write(shard, patient, header, fingerprint, vec![entry], left())
            .await;
        match &result {
            Ok(w) if w.outcome == WriteOutcome::Applied as i32 && !w.replayed => {
                for (x, t) in &removed_tokens {
                    self.release_all(patient, t, std::iter::once(x), left())
                        .await;
                }
            }
            Ok(w) if w.outcome == WriteOutcome::Applied as i32 => {}
            Ok(_) => {
                self.release_all(patient, &token, added.iter().map(|(x, _)| x), left())
                    .await;
            }
            // Refused before anything was proposed: nothing was written.
            Err(ApiError::InvalidArgument { .. } | ApiError::Internal(_)) => {
                self.release_all(patient, &token, added.iter().map(|(x, _)| x), left())
                    .await;
            }
            // Undecided: a claim left behind is revoked by the next claimant (at once when it is
            // a retry for the same patient, after the grace period otherwise).
            Err(_) => {}
        }
        result
    }

    /// Runs a write of `entries` for `patient` (docs/schema.md §5).
    async fn write(
        &self,
        shard: u64,
        patient: &PatientId,
        header: &WriteHeader,
        fingerprint: [u8; 16],
        entries: Vec<WriteEntry<'_>>,
        deadline: Duration,
    ) -> Result<RecordWriteResponse, ApiError> {
        let started = Instant::now();
        let attempts = self.node.config.node.records.write_attempts_max;
        for _ in 0..attempts {
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(ApiError::Deadline);
            }
            self.node.read_barrier(shard, remaining).await?;
            let replica = self.replica(shard)?;
            let planned = plan::plan_write(
                &ReplicaReads(&replica),
                patient,
                header,
                &fingerprint,
                &entries,
                now_micros(),
            )?;
            let plan = match planned {
                Planned::Answer(answer) => return Ok(answer),
                Planned::Write(plan) => plan,
            };
            let batch = to_storage(plan.batch.clone());
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
                Outcome::Applied | Outcome::Done => return Ok(plan.applied(index)),
                Outcome::ConditionFailed { index: failed } => match plan.failed(failed) {
                    Retry::Answer(answer) => return Ok(answer),
                    // The request record, the clock or a head moved: another write of this
                    // patient committed (or this one did). Plan again from fresh reads.
                    Retry::Replan => continue,
                },
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

    fn limits(&self) -> Limits {
        let r = &self.node.config.node.records;
        Limits {
            text_bytes_max: r.text_bytes_max,
            document_bytes_max: r.document_bytes_max,
            repeated_items_max: r.repeated_items_max,
            ..Limits::default()
        }
    }

    /// Checks the route: a patient id of the one id rule, hosted here, at the client's epoch.
    fn route(&self, route: Option<&RouteHeader>) -> Result<(u64, PatientId), ApiError> {
        let route = route
            .ok_or_else(|| ApiError::invalid("route", "is required (it names the patient)"))?;
        let patient = PatientId::parse(&route.patient_id, "route.patient_id")?;
        let descriptor = super::hosted_shard(&self.node, route)?;
        Ok((descriptor.shard_id, patient))
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
        body: impl AsyncFnOnce(&Req, u64, PatientId, Duration) -> Result<T, ApiError>,
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

    fn read_type(raw: i32, field: &str) -> Result<&'static str, ApiError> {
        ResourceType::try_from(raw)
            .ok()
            .and_then(type_name)
            .ok_or_else(|| ApiError::invalid(field.to_owned(), "must be a resource type"))
    }

    fn check_id(id: &str, field: &str) -> Result<(), ApiError> {
        if !dossier_records::is_valid_id(id) {
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
        patient: &PatientId,
        resource: Option<&'a Resource>,
        field: &str,
        op: EntryOp,
        patient_allowed: bool,
    ) -> Result<WriteEntry<'a>, ApiError> {
        let resource =
            resource.ok_or_else(|| ApiError::invalid(field.to_owned(), "is required"))?;
        validate_new_record(resource, field, patient.as_str(), &self.limits()).map_err(|e| {
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
            if id != patient.as_str() {
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
            token: [0; 16],
            releases: Vec::new(),
        })
    }

    /// A page size from a request's `limit` (0: the page limit).
    fn page_limit(&self, limit: u32) -> Result<usize, ApiError> {
        let page_max = self.node.config.node.records.history_page_max;
        match limit {
            0 => Ok(page_max as usize),
            n if n > page_max => Err(ApiError::InvalidArgument {
                field: "limit".into(),
                message: format!("is {n}, above the page limit of {page_max}"),
                limit: Some(u64::from(page_max)),
            }),
            n => Ok(n as usize),
        }
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
                let fp = fingerprint("CreatePatient", r);
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
                let fp = fingerprint("Create", r);
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
                let reads = ReplicaReads(&replica);
                let resource = match plan::head(&reads, &keys, t, &r.id)? {
                    None => None,
                    Some(v) => Some(plan::version(&reads, &keys, t, &r.id, v)?),
                };
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
                let reads = ReplicaReads(&replica);
                let resource = match dossier_records::kv::Reads::get(
                    &reads,
                    &keys.version(t, &r.id, r.version),
                )? {
                    None => None,
                    Some(b) => Some(plan::decode(&b)?),
                };
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
                let limit = self.page_limit(r.limit)?;
                super::read_ready(&self.node, shard, r.consistency, deadline).await?;
                let replica = self.replica(shard)?;
                let applied_index = replica.applied_index().unwrap_or(0);
                let page = history::history(
                    &ReplicaReads(&replica),
                    &PatientKeys::new(&patient),
                    t,
                    &r.id,
                    r.before_version,
                    limit,
                    self.node.config.node.records.message_bytes_max,
                )?;
                Ok(HistoryResponse {
                    found: page.found,
                    versions: page.versions,
                    more: page.more,
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
                let fp = fingerprint("Update", r);
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
                let rtype =
                    dossier_records::type_from_name(t).unwrap_or(ResourceType::Unspecified);
                if rtype == ResourceType::Patient && r.id != patient.as_str() {
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
                    token: [0; 16],
                    releases: Vec::new(),
                };
                let fp = fingerprint("Delete", r);
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
                let fp = fingerprint("Transaction", r);
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
            types = dossier_records::RESOURCE_TYPES
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
                patient_id: holder.map(|p| p.as_str().to_owned()).unwrap_or_default(),
            })
        }
        .await;
        super::observe(&self.node, "records_lookup_identifier", started, result)
    }

    async fn search(
        &self,
        request: Request<SearchRequest>,
    ) -> Result<Response<SearchResponse>, Status> {
        self.serve(
            "records_search",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let t = Self::read_type(r.r#type, "type")?;
                if t == "Patient" {
                    return Err(ApiError::invalid(
                        "type",
                        "search finds records of a patient; read the Patient itself",
                    ));
                }
                if r.statuses.len() > 16 || r.statuses.iter().any(|s| s.len() > 64) {
                    return Err(ApiError::invalid("statuses", "at most 16 codes of 64 bytes"));
                }
                let bound = |v: i64, field: &str| match v {
                    0 => Ok(None),
                    v if v < 0 => Err(ApiError::invalid(field.to_owned(), "must not be negative")),
                    v => Ok(Some(v)),
                };
                let query = Query {
                    type_name: t,
                    code: r.code.clone(),
                    since: bound(r.since_micros, "since_micros")?,
                    until: bound(r.until_micros, "until_micros")?,
                    statuses: r.statuses.clone(),
                    limit: self.page_limit(r.limit)?,
                    page_token: r.page_token.clone(),
                };
                super::read_ready(&self.node, shard, r.consistency, deadline).await?;
                let replica = self.replica(shard)?;
                let applied_index = replica.applied_index().unwrap_or(0);
                let page = search::search(
                    &ReplicaReads(&replica),
                    &PatientKeys::new(&patient),
                    &query,
                )?;
                Ok(SearchResponse {
                    resources: page.resources,
                    next_page_token: page.next_page_token,
                    applied_index,
                })
            },
        )
        .await
    }

    async fn quarantine(
        &self,
        request: Request<QuarantineRequest>,
    ) -> Result<Response<QuarantineResponse>, Status> {
        self.serve(
            "records_quarantine",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                let max = self.node.config.node.records.transaction_entries_max;
                if r.records.len() + r.release_ids.len() > max {
                    return Err(ApiError::InvalidArgument {
                        field: "records".into(),
                        message: format!(
                            "{} records and releases, above the limit of {max}",
                            r.records.len() + r.release_ids.len()
                        ),
                        limit: Some(max as u64),
                    });
                }
                let author = r.header.as_ref().and_then(|h| h.author.clone());
                let now = now_micros() as i64;
                let mut records = r.records.clone();
                for (i, q) in records.iter_mut().enumerate() {
                    quarantine::check(q, &format!("records[{i}]"))?;
                    q.quarantined_micros = now;
                    q.author = author.clone();
                }
                for (i, id) in r.release_ids.iter().enumerate() {
                    Self::check_id(id, &format!("release_ids[{i}]"))?;
                }
                let keys = PatientKeys::new(&patient);
                let mut batch = Batch::default();
                batch.conditions.push(dossier_records::kv::Condition {
                    key: keys.present(),
                    expect: Expect::Present,
                });
                quarantine::write(&keys, &mut batch, &records, &r.release_ids);
                let batch = to_storage(batch);
                batch.check_limits(&self.node.config.state).map_err(|e| {
                    ApiError::invalid("records", format!("the write is too large: {e}"))
                })?;
                let (outcome, index) = self
                    .node
                    .write(
                        shard,
                        Command::Txn {
                            session: None,
                            batch,
                        },
                        deadline,
                    )
                    .await?;
                Ok(match outcome {
                    Outcome::ConditionFailed { .. } => QuarantineResponse {
                        outcome: WriteOutcome::NotFound as i32,
                        ..QuarantineResponse::default()
                    },
                    _ => QuarantineResponse {
                        outcome: WriteOutcome::Applied as i32,
                        stored: records.len() as u32,
                        released: r.release_ids.len() as u32,
                        index,
                    },
                })
            },
        )
        .await
    }

    async fn list_quarantine(
        &self,
        request: Request<ListQuarantineRequest>,
    ) -> Result<Response<ListQuarantineResponse>, Status> {
        self.serve(
            "records_list_quarantine",
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline| {
                if !r.after_id.is_empty() {
                    Self::check_id(&r.after_id, "after_id")?;
                }
                let limit = self.page_limit(r.limit)?;
                super::read_ready(&self.node, shard, r.consistency, deadline).await?;
                let replica = self.replica(shard)?;
                let (records, more) = quarantine::list(
                    &ReplicaReads(&replica),
                    &PatientKeys::new(&patient),
                    &r.after_id,
                    limit,
                )?;
                Ok(ListQuarantineResponse { records, more })
            },
        )
        .await
    }
}

/// How long Everything waits for a reader to take the next message before giving up.
const STALLED_READER: Duration = Duration::from_secs(60);

/// Sends the patient's current records with a stamp above `since`, in stamp order, in messages
/// of at most `bytes_max` bytes (a larger record goes alone).
async fn stream_everything(
    replica: &ShardHandle,
    keys: &PatientKeys,
    types: &[&'static str],
    since: u64,
    include_entered_in_error: bool,
    bytes_max: usize,
    tx: &tokio::sync::mpsc::Sender<Result<EverythingResponse, Status>>,
) -> Result<(), ApiError> {
    let reads = ReplicaReads(replica);
    let mut everything = Everything::start(&reads, keys, types, since, include_entered_in_error)?;
    let as_of = everything.as_of() as i64;
    let mut sent_any = false;
    loop {
        let resources = everything.next_batch(&reads, bytes_max)?;
        if resources.is_empty() && sent_any {
            return Ok(());
        }
        let last = resources.is_empty();
        let message = EverythingResponse {
            resources,
            as_of_micros: as_of,
        };
        // A reader that stops reading (but keeps its connection) ends the stream after
        // STALLED_READER instead of holding its admission permit for ever.
        if !matches!(
            tokio::time::timeout(STALLED_READER, tx.send(Ok(message))).await,
            Ok(Ok(()))
        ) || last
        {
            return Ok(());
        }
        sent_any = true;
    }
}

#[cfg(test)]
mod tests {
    use dossier_api::v1::{CreateRecordRequest, Meta, Resource, RouteHeader, WriteHeader};
    use dossier_records::idempotency::fingerprint;

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
                ..Resource::default()
            }),
        };
        let route = |epoch| RouteHeader {
            shard_id: 3,
            epoch,
            patient_id: "p".into(),
        };
        let a = fingerprint("Create", &request(Some(route(1)), "x"));
        assert_eq!(a, fingerprint("Create", &request(Some(route(9)), "x")));
        assert_eq!(a, fingerprint("Create", &request(None, "x")));
        assert_ne!(a, fingerprint("Create", &request(Some(route(1)), "y")));
        assert_ne!(a, fingerprint("Update", &request(Some(route(1)), "x")));
    }
}
