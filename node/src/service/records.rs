//! The public `dossier.v1.Records` service: the record layer (`dossier-records`) adapted to gRPC
//! and to this node's shards. Requests are checked and turned into record-layer calls; the
//! planning, key layout, indexes and protocols live in the record layer (docs/schema.md).
//!
//! Writes are coordinated in `record_write.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dossier_api::v1::records_server::Records;
use dossier_api::v1::{
    AccessLogRequest, AccessLogResponse, AuditAction, CreatePatientRequest, CreateRecordRequest,
    DeleteRecordRequest, EverythingRequest, EverythingResponse, HistoryRequest, HistoryResponse,
    ListQuarantineRequest, ListQuarantineResponse, LookupIdentifierRequest,
    LookupIdentifierResponse, QuarantineRequest, QuarantineResponse, ReadRecordRequest,
    ReadRecordResponse, ReadVersionRequest, RecordRef, RecordWriteResponse, ResourceType,
    RouteHeader, SearchRequest, SearchResponse, TransactionRequest, UpdateRecordRequest,
    WriteOutcome, transaction_entry,
};
use dossier_records::idempotency::fingerprint;
use dossier_records::kv::{Batch, Expect};
use dossier_records::plan::{self, EntryOp, WriteEntry};
use dossier_records::search::{self, Query};
use dossier_records::{Ident, Limits, PatientId, PatientKeys, history, quarantine, type_name};
use dossier_storage::{Command, Outcome, ShardHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::record_everything;
use crate::access::{self, Decision, Ground, Need};
use crate::audit::Audit;
use crate::audit_batch::AuditBatcher;
use crate::authn::Principal;
use crate::errors::ApiError;
use crate::node::Node;
use crate::record_store::{ReplicaReads, to_storage};
use crate::shards::ClusterShards;

#[derive(Debug, Clone)]
pub struct RecordsService {
    pub(super) node: Arc<Node>,
    pub(super) shards: ClusterShards,
    /// Commits the audit events of reads, batched (`audit_batch.rs`).
    pub(super) audits: AuditBatcher,
    /// The Everything streams reading at once (on blocking threads), in arrival order.
    everything_slots: Arc<tokio::sync::Semaphore>,
}

/// The longest an access log read waits for this node's journaled events to reach their chains.
const ACCESS_LOG_FLUSH_MAX: Duration = Duration::from_secs(2);

impl RecordsService {
    pub fn new(node: Arc<Node>, audits: AuditBatcher) -> Self {
        let shards = ClusterShards::new(Arc::clone(&node));
        // Two Everything streams read per core: enough to keep the cores busy while readers
        // take messages, few enough that each finishes in a few times its time alone.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        RecordsService {
            node,
            shards,
            audits,
            everything_slots: Arc::new(tokio::sync::Semaphore::new(2 * cores)),
        }
    }

    pub(super) fn limits(&self) -> Limits {
        let r = &self.node.config.node.records;
        Limits {
            text_bytes_max: r.text_bytes_max,
            document_bytes_max: r.document_bytes_max,
            repeated_items_max: r.repeated_items_max,
            unmodelled_bytes_max: r.unmodelled_bytes_max,
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

    pub(super) fn replica(&self, shard: u64) -> Result<ShardHandle, ApiError> {
        self.node
            .replica(shard)
            .ok_or(ApiError::shard_not_found(shard))
    }

    async fn serve<Req, T>(
        &self,
        method: &'static str,
        need: Need,
        request: Request<Req>,
        route: impl FnOnce(&Req) -> Option<&RouteHeader>,
        body: impl AsyncFnOnce(&Req, u64, PatientId, Duration, &Audit) -> Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let deadline = super::deadline_of(&request, self.node.config.request_deadline());
        let result = async {
            let _permit = super::admit(&self.node)?;
            let r = request.get_ref();
            let (shard, patient) = self.route(route(r))?;
            let audit = self
                .authorize(&request, need, shard, &patient, deadline)
                .await?;
            body(r, shard, patient, deadline, &audit).await
        }
        .await;
        super::observe(&self.node, method, started, result)
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
            Need::PatientCreate,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
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
                let audited = audit.op(
                    &PatientKeys::new(&patient),
                    AuditAction::CreatePatient,
                    vec![entry.record_ref()],
                    &[],
                );
                self.write_patient(
                    shard,
                    &patient,
                    header,
                    fp,
                    entry,
                    None,
                    r.resource.as_ref(),
                    audited,
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
            Need::RecordWrite,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                let header = Self::check_header(r.header.as_ref())?;
                let entry = self.entry(
                    &patient,
                    r.resource.as_ref(),
                    "resource",
                    EntryOp::Create,
                    false,
                )?;
                audit.check_type(entry.rtype as i32)?;
                let fp = fingerprint("Create", r);
                let audited = audit.op(
                    &PatientKeys::new(&patient),
                    AuditAction::Create,
                    vec![entry.record_ref()],
                    &[],
                );
                self.write(shard, &patient, header, fp, vec![entry], audited, deadline)
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
            Need::RecordRead,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                let t = Self::read_type(r.r#type, "type")?;
                audit.check_type(r.r#type)?;
                Self::check_id(&r.id, "id")?;
                super::read_ready(&self.node, shard, patient.as_str(), r.consistency, deadline)
                    .await?;
                let replica = self.replica(shard)?;
                let keys = PatientKeys::new(&patient);
                let reads = ReplicaReads(&replica);
                let resource = match plan::head(&reads, &keys, t, &r.id)? {
                    None => None,
                    Some(v) => Some(plan::version(&reads, &keys, t, &r.id, v)?),
                };
                let record = RecordRef {
                    r#type: r.r#type,
                    id: r.id.clone(),
                };
                self.audited(
                    audit.op(&keys, AuditAction::Read, vec![record], &[]),
                    &patient,
                    deadline,
                )
                .await?;
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
            Need::RecordRead,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                let t = Self::read_type(r.r#type, "type")?;
                audit.check_type(r.r#type)?;
                Self::check_id(&r.id, "id")?;
                if r.version == 0 {
                    return Err(ApiError::invalid("version", "starts at 1"));
                }
                super::read_ready(&self.node, shard, patient.as_str(), r.consistency, deadline)
                    .await?;
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
                let record = RecordRef {
                    r#type: r.r#type,
                    id: r.id.clone(),
                };
                self.audited(
                    audit.op(&keys, AuditAction::Vread, vec![record], &[]),
                    &patient,
                    deadline,
                )
                .await?;
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
            Need::RecordRead,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                let t = Self::read_type(r.r#type, "type")?;
                audit.check_type(r.r#type)?;
                Self::check_id(&r.id, "id")?;
                let limit = self.page_limit(r.limit)?;
                super::read_ready(&self.node, shard, patient.as_str(), r.consistency, deadline)
                    .await?;
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
                let record = RecordRef {
                    r#type: r.r#type,
                    id: r.id.clone(),
                };
                self.audited(
                    audit.op(
                        &PatientKeys::new(&patient),
                        AuditAction::History,
                        vec![record],
                        &[],
                    ),
                    &patient,
                    deadline,
                )
                .await?;
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
            Need::RecordWrite,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
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
                audit.check_type(entry.rtype as i32)?;
                let fp = fingerprint("Update", r);
                let audited = audit.op(
                    &PatientKeys::new(&patient),
                    AuditAction::Update,
                    vec![entry.record_ref()],
                    &[],
                );
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
                            audited,
                            deadline,
                        )
                        .await;
                }
                self.write(shard, &patient, header, fp, vec![entry], audited, deadline)
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
            Need::RecordWrite,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                let header = Self::check_header(r.header.as_ref())?;
                let t = Self::read_type(r.r#type, "type")?;
                audit.check_type(r.r#type)?;
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
                let rtype = dossier_records::type_from_name(t).unwrap_or(ResourceType::Unspecified);
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
                let audited = audit.op(
                    &PatientKeys::new(&patient),
                    AuditAction::Delete,
                    vec![entry.record_ref()],
                    &[],
                );
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
                            audited,
                            deadline,
                        )
                        .await;
                }
                self.write(shard, &patient, header, fp, vec![entry], audited, deadline)
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
            Need::RecordWrite,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
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
                    audit.check_type(entry.rtype as i32)?;
                    if !seen.insert((entry.rtype as i32, entry.id.clone())) {
                        return Err(ApiError::invalid(
                            format!("{}.meta.id", entry.field),
                            "names a record an earlier entry already writes",
                        ));
                    }
                    entries.push(entry);
                }
                let fp = fingerprint("Transaction", r);
                let audited = audit.op(
                    &PatientKeys::new(&patient),
                    AuditAction::Transaction,
                    entries.iter().map(WriteEntry::record_ref).collect(),
                    &[],
                );
                self.write(shard, &patient, header, fp, entries, audited, deadline)
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
        let (shard, patient) = self.route(request.get_ref().route.as_ref())?;
        let audit = self
            .authorize(&request, Need::RecordRead, shard, &patient, deadline)
            .await?;
        let r = request.into_inner();
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
        for t in &r.types {
            audit.check_type(*t).map_err(Status::from)?;
        }
        if types.is_empty() {
            // Everything the patient's consents leave open to the caller.
            types = dossier_records::RESOURCE_TYPES
                .iter()
                .filter(|t| !audit.withholds(**t))
                .filter_map(|t| type_name(*t))
                .collect();
        }
        if r.since_micros < 0 {
            return Err(ApiError::invalid("since_micros", "must not be negative").into());
        }
        super::read_ready(&self.node, shard, patient.as_str(), r.consistency, deadline)
            .await
            .map_err(Status::from)?;
        let asked: Vec<ResourceType> = r
            .types
            .iter()
            .filter_map(|t| ResourceType::try_from(*t).ok())
            .collect();
        // Audited before the first record leaves.
        self.audited(
            audit.op(
                &PatientKeys::new(&patient),
                AuditAction::Everything,
                Vec::new(),
                &asked,
            ),
            &patient,
            deadline,
        )
        .await?;
        let replica = self.replica(shard).map_err(Status::from)?;
        let bytes_max = self.node.config.node.records.message_bytes_max;
        // Two messages in flight at most: a slow reader holds back the scan, not memory.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let slots = Arc::clone(&self.everything_slots);
        tokio::spawn(async move {
            let _permit = permit;
            let result = record_everything::stream_everything(
                slots,
                replica,
                PatientKeys::new(&patient),
                types,
                r.since_micros as u64,
                r.include_entered_in_error,
                bytes_max,
                &tx,
            )
            .await;
            if let Err(e) = result {
                let _ = tokio::time::timeout(
                    record_everything::STALLED_READER,
                    tx.send(Err(Status::from(e))),
                )
                .await;
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
            let ground = match access::decide(&request, Need::Lookup, None)? {
                Decision::Allowed(ground) => ground,
                Decision::NeedsStanding(_) => {
                    return Err(ApiError::Internal(
                        "an identifier lookup is decided by role".into(),
                    ));
                }
            };
            let glass = match &ground {
                Ground::BreakGlass(reason) => Some(reason.clone()),
                _ => None,
            };
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
            // The holder's chain records who resolved their identifier, before the answer
            // leaves the node.
            if let Some(holder) = &holder {
                let principal = Principal::of(&request)?;
                let op = Audit::new(&principal, &ground, self.node.node_id()).op(
                    &PatientKeys::new(holder),
                    AuditAction::LookupIdentifier,
                    Vec::new(),
                    &[],
                );
                self.audited(op, holder, deadline).await?;
            }
            if let (Some(reason), Principal::Caller(caller)) = (glass, Principal::of(&request)?) {
                let patient = holder.as_ref().map_or("", |p| p.as_str());
                self.review_break_glass(&caller, patient, &reason, "identifier-lookup", deadline)
                    .await?;
                tracing::warn!("break-the-glass lookup of an identifier");
            }
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
            Need::RecordRead,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                let t = Self::read_type(r.r#type, "type")?;
                audit.check_type(r.r#type)?;
                if t == "Patient" {
                    return Err(ApiError::invalid(
                        "type",
                        "search finds records of a patient; read the Patient itself",
                    ));
                }
                if r.statuses.len() > 16 || r.statuses.iter().any(|s| s.len() > 64) {
                    return Err(ApiError::invalid(
                        "statuses",
                        "at most 16 codes of 64 bytes",
                    ));
                }
                let query = Query {
                    type_name: t,
                    code: r.code.clone(),
                    since: r.since_micros,
                    until: r.until_micros,
                    statuses: r.statuses.clone(),
                    limit: self.page_limit(r.limit)?,
                    page_token: r.page_token.clone(),
                    bytes_max: self.node.config.node.records.message_bytes_max,
                };
                super::read_ready(&self.node, shard, patient.as_str(), r.consistency, deadline)
                    .await?;
                let replica = self.replica(shard)?;
                let applied_index = replica.applied_index().unwrap_or(0);
                // On the async worker, as a Kv scan page: a page is bounded by records, bytes
                // and SCAN_ENTRIES_MAX index entries (about a millisecond's work).
                let keys = PatientKeys::new(&patient);
                let page = search::search(&ReplicaReads(&replica), &keys, &query)?;
                let types: Vec<ResourceType> =
                    dossier_records::type_from_name(t).into_iter().collect();
                self.audited(
                    audit.op(&keys, AuditAction::Search, Vec::new(), &types),
                    &patient,
                    deadline,
                )
                .await?;
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
            Need::Quarantine,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
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
                let now = dossier_records::now_micros();
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
                batch
                    .ops
                    .extend(audit.op(&keys, AuditAction::Quarantine, Vec::new(), &[]));
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

    async fn access_log(
        &self,
        request: Request<AccessLogRequest>,
    ) -> Result<Response<AccessLogResponse>, Status> {
        self.serve(
            "records_access_log",
            Need::AccessLog,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                // The events of reads this node served are in their chains first (reads served
                // by other nodes reach them as quickly, on their own). A journal that cannot
                // drain in time (a shard without quorum) delays the answer, never refuses it.
                let _ = self
                    .audits
                    .flush((deadline / 2).min(ACCESS_LOG_FLUSH_MAX))
                    .await;
                super::read_ready(&self.node, shard, patient.as_str(), r.consistency, deadline)
                    .await?;
                let page = self.access_log_page(shard, &patient, r.after_seq, r.limit)?;
                // Reading the log is an access to the record too: its event follows the page.
                let keys = PatientKeys::new(&patient);
                self.audited(
                    audit.op(&keys, AuditAction::AccessLog, Vec::new(), &[]),
                    &patient,
                    deadline,
                )
                .await?;
                Ok(page)
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
            Need::Quarantine,
            request,
            |r| r.route.as_ref(),
            async |r, shard, patient, deadline, audit| {
                if !r.after_id.is_empty() {
                    Self::check_id(&r.after_id, "after_id")?;
                }
                let limit = self.page_limit(r.limit)?;
                super::read_ready(&self.node, shard, patient.as_str(), r.consistency, deadline)
                    .await?;
                let replica = self.replica(shard)?;
                let keys = PatientKeys::new(&patient);
                let (records, more) =
                    quarantine::list(&ReplicaReads(&replica), &keys, &r.after_id, limit)?;
                self.audited(
                    audit.op(&keys, AuditAction::ListQuarantine, Vec::new(), &[]),
                    &patient,
                    deadline,
                )
                .await?;
                Ok(ListQuarantineResponse { records, more })
            },
        )
        .await
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
