//! The public `dossier.v1.Kv` service: every request names a patient; keys live in the patient's
//! shard under `patient_id 0x00 key`, so a scan never leaves one patient.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dossier_api::v1::kv_server::Kv;
use dossier_api::v1::{
    AuditAction, BatchRequest, BundleAnswer, BundleItem, BundleRequest, BundleResponse,
    CompareAndSetRequest, DeleteRequest, GetRequest, GetResponse, ItemError, KeyValue, PutRequest,
    ReadConsistency, RouteHeader, ScanRequest, ScanResponse, SessionHeader, WriteResponse,
    bundle_answer, bundle_item, condition, operation,
};
use dossier_records::PatientId;
use dossier_storage::{Batch, Command, Condition, Expect, Op, Outcome, Session, ShardHandle};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::access::{self, Ground, Need};
use crate::audit::Audit;
use crate::audit_batch::AuditBatcher;
use crate::authn::Principal;
use crate::errors::ApiError;
use crate::node::Node;
use crate::record_store::to_storage_op;

#[derive(Debug, Clone)]
pub struct KvService {
    node: Arc<Node>,
    audits: AuditBatcher,
}

impl KvService {
    pub fn new(node: Arc<Node>, audits: AuditBatcher) -> Self {
        KvService { node, audits }
    }
}

/// Requests that name their patient in a route header.
trait HasRoute {
    fn route_header(&self) -> Option<&RouteHeader>;
}

macro_rules! has_route {
    ($($request:ty),*) => {
        $(impl HasRoute for $request {
            fn route_header(&self) -> Option<&RouteHeader> {
                self.route.as_ref()
            }
        })*
    };
}

has_route!(
    GetRequest,
    PutRequest,
    DeleteRequest,
    CompareAndSetRequest,
    BatchRequest,
    ScanRequest
);

/// A request's patient, checked, its shard, and the audit of the call on it.
struct Routed {
    shard: u64,
    patient: PatientId,
    prefix: Vec<u8>,
    audit: Audit,
}

impl Routed {
    fn key(&self, key: &[u8]) -> Bytes {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k.into()
    }
}

impl KvService {
    fn route(
        &self,
        route: Option<&RouteHeader>,
        principal: &Principal,
    ) -> Result<Routed, ApiError> {
        let route = route
            .ok_or_else(|| ApiError::invalid("route", "is required (it names the patient)"))?;
        // The one patient-id rule of every service: a patient written here can hold records.
        let patient = PatientId::parse(&route.patient_id, "route.patient_id")?;
        let descriptor = super::hosted_shard(&self.node, route)?;
        let prefix = patient.kv_prefix();
        Ok(Routed {
            shard: descriptor.shard_id,
            patient,
            prefix,
            // Only services (or anyone, without TLS) reach the Kv service: on their role.
            audit: Audit::new(principal, &Ground::Role, self.node.node_id()),
        })
    }

    fn check_key(&self, field: &'static str, key: &[u8]) -> Result<(), ApiError> {
        let max = self.node.config.state.key_bytes_max;
        if key.is_empty() {
            return Err(ApiError::invalid(field, "must not be empty"));
        }
        if key.len() > max {
            return Err(ApiError::too_large(field, key.len(), max));
        }
        Ok(())
    }

    fn check_value(&self, field: &'static str, value: &[u8]) -> Result<(), ApiError> {
        let max = self.node.config.state.value_bytes_max;
        if value.len() > max {
            return Err(ApiError::too_large(field, value.len(), max));
        }
        Ok(())
    }

    fn session(header: Option<&SessionHeader>) -> Result<Option<Session>, ApiError> {
        match header {
            None => Ok(None),
            Some(h) if h.client_session == 0 => {
                Err(ApiError::invalid("session.client_session", "must not be 0"))
            }
            Some(h) if h.sequence == 0 => Err(ApiError::invalid("session.sequence", "starts at 1")),
            Some(h) => Ok(Some(Session {
                client: h.client_session,
                seq: h.sequence,
            })),
        }
    }

    /// Proposes `batch` with the call's audit event (`action` on `keys`) in it.
    async fn write(
        &self,
        routed: &Routed,
        session: Option<Session>,
        mut batch: Batch,
        audited: (AuditAction, Vec<Vec<u8>>),
        deadline: Duration,
    ) -> Result<WriteResponse, ApiError> {
        let (action, keys) = audited;
        batch.ops.extend(
            routed
                .audit
                .kv_op(&routed.patient, action, keys)
                .map(to_storage_op),
        );
        batch
            .check_limits(&self.node.config.state)
            .map_err(|e| ApiError::invalid("batch", e.to_string()))?;
        let (outcome, index) = self
            .node
            .write(routed.shard, Command::Txn { session, batch }, deadline)
            .await?;
        match outcome {
            Outcome::Applied | Outcome::Done => Ok(WriteResponse {
                applied: true,
                failed_condition: 0,
                index,
            }),
            Outcome::ConditionFailed { index: failed } => Ok(WriteResponse {
                applied: false,
                failed_condition: failed,
                index,
            }),
            // A retry of a write already applied: the first application's answer, its index.
            Outcome::Replayed {
                index: first,
                failed_condition,
            } => Ok(WriteResponse {
                applied: failed_condition.is_none(),
                failed_condition: failed_condition.unwrap_or(0),
                index: first,
            }),
            Outcome::StaleSequence { last } => Err(ApiError::Session(format!(
                "sequence number is older than the last one applied ({last})"
            ))),
            Outcome::SessionExpired => Err(ApiError::Session(
                "the session expired; start a new one".into(),
            )),
            Outcome::OutOfRange => Err(ApiError::Internal(
                "a split's refusal is an error of Node::write, never an outcome".into(),
            )),
        }
    }

    async fn read_ready(
        &self,
        routed: &Routed,
        consistency: i32,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        // The deliberately broken mode the fault harness must catch: no read barrier.
        if self.node.config.node.unsafe_stale_reads_for_testing
            && consistency == ReadConsistency::Linearizable as i32
        {
            return Ok(());
        }
        super::read_ready(
            &self.node,
            routed.shard,
            routed.patient.as_str(),
            consistency,
            deadline,
        )
        .await
    }

    /// The local replica of the routed shard, once it may serve a read of `consistency`.
    async fn readable(
        &self,
        routed: &Routed,
        consistency: i32,
        deadline: Duration,
    ) -> Result<ShardHandle, ApiError> {
        self.read_ready(routed, consistency, deadline).await?;
        self.node
            .replica(routed.shard)
            .ok_or(ApiError::shard_not_found(routed.shard))
    }

    /// What every handler does around its own work: the deadline, admission under the in-flight
    /// limit, routing by patient, and the latency metric.
    async fn serve<Req: HasRoute, T>(
        &self,
        method: &'static str,
        request: Request<Req>,
        body: impl AsyncFnOnce(&Req, &Routed, Duration) -> Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let deadline = super::deadline_of(&request, self.node.config.request_deadline());
        let result =
            match access::decide(&request, Need::Kv, None).and_then(|_| Principal::of(&request)) {
                Ok(principal) => {
                    self.admitted(request.get_ref(), &principal, deadline, body)
                        .await
                }
                Err(e) => Err(e),
            };
        super::observe(&self.node, method, started, result)
    }

    /// Admission under the in-flight limit, routing by patient, then `body`.
    async fn admitted<Req: HasRoute, T>(
        &self,
        request: &Req,
        principal: &Principal,
        deadline: Duration,
        body: impl AsyncFnOnce(&Req, &Routed, Duration) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let _permit = super::admit(&self.node)?;
        let routed = self.route(request.route_header(), principal)?;
        body(request, &routed, deadline).await
    }

    /// Records a read's audit event (durable in the node's journal) before its data leaves the
    /// node.
    async fn audited(
        &self,
        routed: &Routed,
        action: AuditAction,
        keys: Vec<Vec<u8>>,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        match routed.audit.kv_op(&routed.patient, action, keys) {
            Some(op) => {
                self.audits
                    .append(routed.patient.as_str(), op, deadline)
                    .await
            }
            None => Ok(()),
        }
    }

    /// One item of a bundle, served as the unary method of its kind would serve it.
    async fn bundle_item(
        &self,
        item: &BundleItem,
        principal: &Principal,
        deadline: Duration,
    ) -> bundle_answer::Answer {
        let started = Instant::now();
        // The unary method's name, and its body run as that method runs it.
        macro_rules! as_unary {
            ($method:literal, $request:expr, $body:ident, $answer:path) => {
                (
                    $method,
                    self.admitted($request, principal, deadline, async |r, routed, d| {
                        self.$body(r, routed, d).await
                    })
                    .await
                    .map($answer),
                )
            };
        }
        use bundle_answer::Answer;
        use bundle_item::Request as Item;
        let (method, result) = match &item.request {
            Some(Item::Get(r)) => as_unary!("get", r, do_get, Answer::Get),
            Some(Item::Put(r)) => as_unary!("put", r, do_put, Answer::Write),
            Some(Item::Delete(r)) => as_unary!("delete", r, do_delete, Answer::Write),
            Some(Item::CompareAndSet(r)) => {
                as_unary!("compare_and_set", r, do_compare_and_set, Answer::Write)
            }
            Some(Item::Batch(r)) => as_unary!("batch", r, do_batch, Answer::Write),
            None => (
                "bundle_item",
                Err(ApiError::invalid(
                    "items.request",
                    "must be one of get, put, delete, compare_and_set, batch",
                )),
            ),
        };
        super::record(&self.node, method, started, result.as_ref().map(|_| ()));
        result.unwrap_or_else(|e| {
            let (code, detail) = e.detail();
            bundle_answer::Answer::Error(ItemError {
                code: code as i32,
                message: e.to_string(),
                detail: Some(detail),
            })
        })
    }
}

impl KvService {
    // The bodies of the Kv methods, shared by the unary methods and the bundle.

    async fn do_get(
        &self,
        r: &GetRequest,
        routed: &Routed,
        deadline: Duration,
    ) -> Result<GetResponse, ApiError> {
        self.check_key("key", &r.key)?;
        let replica = self.readable(routed, r.consistency, deadline).await?;
        let value = replica
            .get(&routed.key(&r.key))
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let applied_index = replica.applied_index().unwrap_or(0);
        self.audited(routed, AuditAction::KvGet, vec![r.key.clone()], deadline)
            .await?;
        Ok(match value {
            Some(v) => GetResponse {
                found: true,
                value: v.to_vec(),
                applied_index,
            },
            None => GetResponse {
                found: false,
                value: Vec::new(),
                applied_index,
            },
        })
    }

    async fn do_put(
        &self,
        r: &PutRequest,
        routed: &Routed,
        deadline: Duration,
    ) -> Result<WriteResponse, ApiError> {
        self.check_key("key", &r.key)?;
        self.check_value("value", &r.value)?;
        let session = Self::session(r.session.as_ref())?;
        let batch = Batch::put(routed.key(&r.key), r.value.clone());
        let audited = (AuditAction::KvPut, vec![r.key.clone()]);
        self.write(routed, session, batch, audited, deadline).await
    }

    async fn do_delete(
        &self,
        r: &DeleteRequest,
        routed: &Routed,
        deadline: Duration,
    ) -> Result<WriteResponse, ApiError> {
        self.check_key("key", &r.key)?;
        let session = Self::session(r.session.as_ref())?;
        let audited = (AuditAction::KvDelete, vec![r.key.clone()]);
        let batch = Batch::delete(routed.key(&r.key));
        self.write(routed, session, batch, audited, deadline).await
    }

    async fn do_compare_and_set(
        &self,
        r: &CompareAndSetRequest,
        routed: &Routed,
        deadline: Duration,
    ) -> Result<WriteResponse, ApiError> {
        self.check_key("key", &r.key)?;
        self.check_value("expected", &r.expected)?;
        self.check_value("value", &r.value)?;
        let session = Self::session(r.session.as_ref())?;
        let expected = (!r.expect_absent).then(|| Bytes::from(r.expected.clone()));
        let batch = Batch::compare_and_set(routed.key(&r.key), expected, r.value.clone());
        let audited = (AuditAction::KvCompareAndSet, vec![r.key.clone()]);
        self.write(routed, session, batch, audited, deadline).await
    }

    async fn do_batch(
        &self,
        r: &BatchRequest,
        routed: &Routed,
        deadline: Duration,
    ) -> Result<WriteResponse, ApiError> {
        let session = Self::session(r.session.as_ref())?;
        if r.operations.is_empty() {
            return Err(ApiError::invalid(
                "operations",
                "at least one operation is needed",
            ));
        }
        let mut batch = Batch::default();
        for c in &r.conditions {
            self.check_key("conditions.key", &c.key)?;
            let expect = match condition::Expect::try_from(c.expect) {
                Ok(condition::Expect::Equals) => {
                    self.check_value("conditions.value", &c.value)?;
                    Expect::Equals(c.value.clone().into())
                }
                Ok(condition::Expect::Absent) => Expect::Absent,
                Ok(condition::Expect::Present) => Expect::Present,
                Err(_) => return Err(ApiError::invalid("conditions.expect", "unknown value")),
            };
            batch.conditions.push(Condition {
                key: routed.key(&c.key),
                expect,
            });
        }
        for o in &r.operations {
            match &o.op {
                Some(operation::Op::Put(p)) => {
                    self.check_key("operations.put.key", &p.key)?;
                    self.check_value("operations.put.value", &p.value)?;
                    batch.ops.push(Op::Put {
                        key: routed.key(&p.key),
                        value: p.value.clone().into(),
                    });
                }
                Some(operation::Op::Delete(d)) => {
                    self.check_key("operations.delete.key", &d.key)?;
                    batch.ops.push(Op::Delete {
                        key: routed.key(&d.key),
                    });
                }
                None => {
                    return Err(ApiError::invalid("operations.op", "must be put or delete"));
                }
            }
        }
        let keys = r
            .operations
            .iter()
            .filter_map(|o| match &o.op {
                Some(operation::Op::Put(p)) => Some(p.key.clone()),
                Some(operation::Op::Delete(d)) => Some(d.key.clone()),
                None => None,
            })
            .collect();
        self.write(
            routed,
            session,
            batch,
            (AuditAction::KvBatch, keys),
            deadline,
        )
        .await
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.serve("get", request, async |r, routed, deadline| {
            self.do_get(r, routed, deadline).await
        })
        .await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<WriteResponse>, Status> {
        self.serve("put", request, async |r, routed, deadline| {
            self.do_put(r, routed, deadline).await
        })
        .await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.serve("delete", request, async |r, routed, deadline| {
            self.do_delete(r, routed, deadline).await
        })
        .await
    }

    async fn compare_and_set(
        &self,
        request: Request<CompareAndSetRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.serve("compare_and_set", request, async |r, routed, deadline| {
            self.do_compare_and_set(r, routed, deadline).await
        })
        .await
    }

    async fn batch(
        &self,
        request: Request<BatchRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.serve("batch", request, async |r, routed, deadline| {
            self.do_batch(r, routed, deadline).await
        })
        .await
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        self.serve("scan", request, async |r, routed, deadline| {
            let page_max = self.node.config.node.limits.scan_page_max;
            let limit = if r.limit == 0 { page_max } else { r.limit };
            if limit > page_max {
                return Err(ApiError::InvalidArgument {
                    field: "limit".into(),
                    message: format!("is {limit}, above the page limit of {page_max}"),
                    limit: Some(u64::from(page_max)),
                });
            }
            let replica = self.readable(routed, r.consistency, deadline).await?;
            let prefix = routed.key(&r.prefix);
            let after = (!r.start_after.is_empty()).then(|| routed.key(&r.start_after));
            let page = replica
                .scan_page(
                    &prefix,
                    after.as_deref(),
                    limit as usize,
                    self.node.config.node.limits.scan_page_bytes_max,
                )
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
            let (items, more) = (page.items, page.more);
            self.audited(
                routed,
                AuditAction::KvScan,
                vec![r.prefix.clone()],
                deadline,
            )
            .await?;
            let strip = routed.prefix.len();
            let items = items
                .into_iter()
                .map(|(k, v)| KeyValue {
                    key: k[strip..].to_vec(),
                    value: v.to_vec(),
                })
                .collect();
            Ok(ScanResponse { items, more })
        })
        .await
    }

    type BundleStream = BundleAnswers;

    async fn bundle(
        &self,
        request: Request<BundleRequest>,
    ) -> Result<Response<BundleAnswers>, Status> {
        let started = Instant::now();
        let deadline = super::deadline_of(&request, self.node.config.request_deadline());
        let principal =
            match access::decide(&request, Need::Kv, None).and_then(|_| Principal::of(&request)) {
                Ok(principal) => principal,
                Err(refused) => {
                    super::record(&self.node, "bundle", started, Err(&refused));
                    return Err(refused.into());
                }
            };
        let items = request.into_inner().items;
        self.node.metrics.bundle_items.observe(items.len() as f64);
        let max = self.node.config.node.limits.bundle_items_max;
        if items.len() > max {
            let refused = ApiError::InvalidArgument {
                field: "items".into(),
                message: format!("has {} items, above the limit of {max}", items.len()),
                limit: Some(max as u64),
            };
            super::record(&self.node, "bundle", started, Err(&refused));
            return Err(refused.into());
        }
        // Every item runs at once, as separate requests would; each answer leaves as soon as its
        // item completes, with whatever else completed by then.
        let running: FuturesUnordered<BoxFuture<'static, BundleAnswer>> = items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                let service = self.clone();
                let principal = principal.clone();
                let deadline = match item.timeout_micros {
                    0 => deadline,
                    own => deadline.min(Duration::from_micros(own)),
                };
                async move {
                    BundleAnswer {
                        item: index as u32,
                        answer: Some(service.bundle_item(&item, &principal, deadline).await),
                    }
                }
                .boxed()
            })
            .collect();
        let state = (running, Arc::clone(&self.node));
        let answers = futures_util::stream::unfold(state, move |(mut running, node)| async move {
            let Some(first) = running.next().await else {
                super::record(&node, "bundle", started, Ok(()));
                return None;
            };
            let mut bytes = first.encoded_len();
            let mut answers = vec![first];
            while bytes < BUNDLE_MESSAGE_BYTES
                && let Some(Some(answer)) = running.next().now_or_never()
            {
                bytes += answer.encoded_len();
                answers.push(answer);
            }
            Some((Ok(BundleResponse { answers }), (running, node)))
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// A message of bundle answers stops taking more answers past this size (one answer may be
/// larger: a value may be up to `state.value-bytes-max`).
const BUNDLE_MESSAGE_BYTES: usize = 4 << 20;

/// The answers of a bundle, as its items complete.
pub type BundleAnswers =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<BundleResponse, Status>> + Send>>;
