//! Typed clinical records (the `dossier.v1.Records` service) through the routing client.
//!
//! Every write carries a request id drawn once per call and resent on every retry, so a retried
//! write is applied once and answers as the first attempt did (`RecordWrite::replayed`).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::time::Duration;

use dossier_api::v1::records_client::RecordsClient;
use dossier_api::v1::{
    AccessLogRequest, AccessLogResponse, CreatePatientRequest, CreateRecordRequest,
    DeleteRecordRequest, EverythingRequest, HistoryRequest, ListQuarantineRequest,
    LookupIdentifierRequest, QuarantineRequest, QuarantineResponse, QuarantinedRecord,
    ReadConsistency, ReadRecordRequest, ReadVersionRequest, RecordWriteResponse, Reference,
    Resource, ResourceType, RouteHeader, SearchRequest, TransactionEntry, TransactionRequest,
    UpdateRecordRequest, WriteHeader, WriteOutcome,
};
use tonic::transport::Channel;

use crate::{Client, ClientError, splitmix64};

/// The answer of a records write. Nothing was written unless `outcome` is `Applied`.
pub type RecordWrite = RecordWriteResponse;

/// True when the write was applied (now, or by an earlier attempt with the same request id).
pub fn is_applied(w: &RecordWrite) -> bool {
    w.outcome == WriteOutcome::Applied as i32
}

/// Who writes (becomes `Meta.author`) and how long a call may take.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub author: Option<Reference>,
    /// Overrides the client's default deadline.
    pub deadline: Option<Duration>,
    /// Reuse a request id (e.g. one derived from an import's source) instead of drawing one.
    pub request_id: Option<[u8; 16]>,
}

/// What to search within one patient (`dossier.v1.SearchRequest` less route and paging).
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// Required; any kind but Patient.
    pub rtype: Option<ResourceType>,
    /// `system|code` of the record's main concept; empty: any.
    pub code: String,
    /// Clinical date at or after (unix micros); None: open.
    pub since_micros: Option<i64>,
    /// Clinical date before (unix micros); None: open.
    pub until_micros: Option<i64>,
    /// FHIR status codes; empty: any.
    pub statuses: Vec<String>,
    /// Page size; 0: the server's page limit.
    pub limit: u32,
}

/// One page of search results, newest clinical date first.
#[derive(Debug, Clone)]
pub struct SearchPage {
    pub resources: Vec<Resource>,
    /// Empty when nothing follows; else pass it to the next call.
    pub next_page_token: Vec<u8>,
}

/// One page of a record's versions, newest first.
#[derive(Debug, Clone)]
pub struct History {
    pub versions: Vec<Resource>,
    /// Older versions follow: ask again with `before_version` = the last version returned.
    pub more: bool,
}

impl Client {
    /// A fresh request id: 16 bytes, never all zero.
    pub fn new_request_id(&self) -> [u8; 16] {
        let a = splitmix64(self.inner.session_seed.fetch_add(1, Ordering::Relaxed));
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(a);
        let b = h.finish() | 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&a.to_be_bytes());
        id[8..].copy_from_slice(&b.to_be_bytes());
        id
    }

    fn header(&self, options: &WriteOptions) -> WriteHeader {
        WriteHeader {
            request_id: options
                .request_id
                .unwrap_or_else(|| self.new_request_id())
                .to_vec(),
            author: options.author.clone(),
        }
    }

    /// One Records call to the shard of `route_key` (a patient id, or an index key), retried as
    /// `routed` retries: `build` makes the request for the route of each attempt, `rpc` sends it.
    async fn records_call<Req, Resp, Fut>(
        &self,
        route_key: &str,
        deadline: Duration,
        build: impl Fn(RouteHeader) -> Req,
        rpc: impl Fn(RecordsClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, ClientError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let response = self
            .routed(route_key, deadline, |lane, route, t| {
                let mut request = tonic::Request::new(build(route));
                request.set_timeout(t);
                if let Some(token) = &self.inner.config.token {
                    token.stamp(&mut request);
                }
                if let Some(glass) = &self.inner.config.break_glass {
                    glass.stamp(&mut request);
                }
                rpc(RecordsClient::new(lane.channel), request)
            })
            .await?;
        Ok(response.into_inner())
    }

    fn deadline_of(&self, options: &WriteOptions) -> Duration {
        options.deadline.unwrap_or(self.inner.config.deadline)
    }

    /// Creates a patient; `patient.meta.id` is its id.
    pub async fn create_patient(
        &self,
        patient: Resource,
        options: &WriteOptions,
    ) -> Result<RecordWrite, ClientError> {
        let patient_id = patient
            .meta
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_default();
        let header = self.header(options);
        let response = self
            .records_call(
                &patient_id,
                self.deadline_of(options),
                |route| CreatePatientRequest {
                    route: Some(route),
                    header: Some(header.clone()),
                    resource: Some(patient.clone()),
                },
                |mut c, r| async move { c.create_patient(r).await },
            )
            .await?;
        Ok(response)
    }

    /// Creates version 1 of a record of an existing patient.
    pub async fn create_record(
        &self,
        patient_id: &str,
        resource: Resource,
        options: &WriteOptions,
    ) -> Result<RecordWrite, ClientError> {
        let header = self.header(options);
        let response = self
            .records_call(
                patient_id,
                self.deadline_of(options),
                |route| CreateRecordRequest {
                    route: Some(route),
                    header: Some(header.clone()),
                    resource: Some(resource.clone()),
                },
                |mut c, r| async move { c.create(r).await },
            )
            .await?;
        Ok(response)
    }

    /// Writes version `expected_version + 1` if the current version is `expected_version`.
    pub async fn update_record(
        &self,
        patient_id: &str,
        expected_version: u64,
        resource: Resource,
        options: &WriteOptions,
    ) -> Result<RecordWrite, ClientError> {
        let header = self.header(options);
        let response = self
            .records_call(
                patient_id,
                self.deadline_of(options),
                |route| UpdateRecordRequest {
                    route: Some(route),
                    header: Some(header.clone()),
                    expected_version,
                    resource: Some(resource.clone()),
                },
                |mut c, r| async move { c.update(r).await },
            )
            .await?;
        Ok(response)
    }

    /// Marks a record entered-in-error (a new version; nothing is erased).
    pub async fn delete_record(
        &self,
        patient_id: &str,
        rtype: ResourceType,
        id: &str,
        expected_version: u64,
        reason: &str,
        options: &WriteOptions,
    ) -> Result<RecordWrite, ClientError> {
        let header = self.header(options);
        let response = self
            .records_call(
                patient_id,
                self.deadline_of(options),
                |route| DeleteRecordRequest {
                    route: Some(route),
                    header: Some(header.clone()),
                    r#type: rtype as i32,
                    id: id.to_owned(),
                    expected_version,
                    reason: reason.to_owned(),
                },
                |mut c, r| async move { c.delete(r).await },
            )
            .await?;
        Ok(response)
    }

    /// Creates and updates records of one patient atomically.
    pub async fn transaction(
        &self,
        patient_id: &str,
        entries: Vec<TransactionEntry>,
        options: &WriteOptions,
    ) -> Result<RecordWrite, ClientError> {
        let header = self.header(options);
        let response = self
            .records_call(
                patient_id,
                self.deadline_of(options),
                |route| TransactionRequest {
                    route: Some(route),
                    header: Some(header.clone()),
                    entries: entries.clone(),
                },
                |mut c, r| async move { c.transaction(r).await },
            )
            .await?;
        Ok(response)
    }

    /// The current version of a record (linearizable), or `None`.
    pub async fn read_record(
        &self,
        patient_id: &str,
        rtype: ResourceType,
        id: &str,
    ) -> Result<Option<Resource>, ClientError> {
        let response = self
            .records_call(
                patient_id,
                self.inner.config.deadline,
                |route| ReadRecordRequest {
                    route: Some(route),
                    r#type: rtype as i32,
                    id: id.to_owned(),
                    consistency: ReadConsistency::Linearizable as i32,
                },
                |mut c, r| async move { c.read(r).await },
            )
            .await?;
        Ok(response.resource.filter(|_| response.found))
    }

    /// One version of a record, or `None`.
    pub async fn read_version(
        &self,
        patient_id: &str,
        rtype: ResourceType,
        id: &str,
        version: u64,
    ) -> Result<Option<Resource>, ClientError> {
        let response = self
            .records_call(
                patient_id,
                self.inner.config.deadline,
                |route| ReadVersionRequest {
                    route: Some(route),
                    r#type: rtype as i32,
                    id: id.to_owned(),
                    version,
                    consistency: ReadConsistency::Linearizable as i32,
                },
                |mut c, r| async move { c.v_read(r).await },
            )
            .await?;
        Ok(response.resource.filter(|_| response.found))
    }

    /// A page of a record's versions, newest first, below `before_version` (0: from the current).
    pub async fn history(
        &self,
        patient_id: &str,
        rtype: ResourceType,
        id: &str,
        before_version: u64,
        limit: u32,
    ) -> Result<Option<History>, ClientError> {
        let response = self
            .records_call(
                patient_id,
                self.inner.config.deadline,
                |route| HistoryRequest {
                    route: Some(route),
                    r#type: rtype as i32,
                    id: id.to_owned(),
                    before_version,
                    limit,
                    consistency: ReadConsistency::Linearizable as i32,
                },
                |mut c, r| async move { c.history(r).await },
            )
            .await?;
        Ok(response.found.then_some(History {
            versions: response.versions,
            more: response.more,
        }))
    }

    /// Every current record of a patient changed after `since_micros` (0: all), of `types`
    /// (empty: all), passed to `each` message by message; returns the `as_of` stamp to pass as
    /// `since_micros` next time. The stream is consumed as it arrives, never held whole.
    pub async fn everything(
        &self,
        patient_id: &str,
        since_micros: i64,
        types: &[ResourceType],
        include_entered_in_error: bool,
        mut each: impl FnMut(Vec<Resource>) -> Result<(), ClientError>,
    ) -> Result<i64, ClientError> {
        // The stream is opened through the router (leader hints, map refreshes), then read
        // to its end; a stream broken midway is an error the caller resumes with `since`.
        let mut stream = self
            .records_call(
                patient_id,
                self.inner.config.deadline,
                |route| EverythingRequest {
                    route: Some(route),
                    since_micros,
                    types: types.iter().map(|t| *t as i32).collect(),
                    include_entered_in_error,
                    consistency: ReadConsistency::Linearizable as i32,
                },
                |mut c, r| async move { c.everything(r).await },
            )
            .await?;
        let mut as_of = since_micros;
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    as_of = message.as_of_micros;
                    each(message.resources)?;
                }
                Ok(None) => return Ok(as_of),
                Err(status) => {
                    return Err(ClientError::Server(format!(
                        "everything stream broke: {:?}: {}",
                        status.code(),
                        status.message()
                    )));
                }
            }
        }
    }

    /// A page of the patient's audit chain (every access to the record, hash-chained), after
    /// entry `after_seq` (0: from the first), at most `limit` entries (0: the server's page).
    /// Linearizable. For the patient themselves, auditors and services.
    pub async fn access_log(
        &self,
        patient_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<AccessLogResponse, ClientError> {
        self.records_call(
            patient_id,
            self.inner.config.deadline,
            |route| AccessLogRequest {
                route: Some(route),
                after_seq,
                limit,
                consistency: ReadConsistency::Linearizable as i32,
            },
            |mut c, r| async move { c.access_log(r).await },
        )
        .await
    }

    /// The patient holding an identifier of an indexed system (the master patient index), or
    /// `None`. Linearizable.
    pub async fn lookup_identifier(
        &self,
        system: &str,
        value: &str,
    ) -> Result<Option<String>, ClientError> {
        let route_key = format!("mpi:{system}|{value}");
        let response = self
            .records_call(
                &route_key,
                self.inner.config.deadline,
                |route| LookupIdentifierRequest {
                    route: Some(route),
                    system: system.to_owned(),
                    value: value.to_owned(),
                    consistency: ReadConsistency::Linearizable as i32,
                },
                |mut c, r| async move { c.lookup_identifier(r).await },
            )
            .await?;
        Ok(response.found.then_some(response.patient_id))
    }

    /// One page of a patient's records matching `query`, newest clinical date first, from
    /// `page_token` (empty for the first page). Linearizable.
    pub async fn search(
        &self,
        patient_id: &str,
        query: &SearchQuery,
        page_token: &[u8],
    ) -> Result<SearchPage, ClientError> {
        let response = self
            .records_call(
                patient_id,
                self.inner.config.deadline,
                |route| SearchRequest {
                    route: Some(route),
                    r#type: query.rtype.map_or(0, |t| t as i32),
                    code: query.code.clone(),
                    since_micros: query.since_micros,
                    until_micros: query.until_micros,
                    statuses: query.statuses.clone(),
                    limit: query.limit,
                    page_token: page_token.to_vec(),
                    consistency: ReadConsistency::Linearizable as i32,
                },
                |mut c, r| async move { c.search(r).await },
            )
            .await?;
        Ok(SearchPage {
            resources: response.resources,
            next_page_token: response.next_page_token,
        })
    }

    /// Puts `records` in the patient's quarantine and removes `release_ids` from it, atomically
    /// (idempotent: a retry does the same again).
    pub async fn quarantine(
        &self,
        patient_id: &str,
        records: Vec<QuarantinedRecord>,
        release_ids: Vec<String>,
        options: &WriteOptions,
    ) -> Result<QuarantineResponse, ClientError> {
        let header = self.header(options);
        self.records_call(
            patient_id,
            self.deadline_of(options),
            |route| QuarantineRequest {
                route: Some(route),
                header: Some(header.clone()),
                records: records.clone(),
                release_ids: release_ids.clone(),
            },
            |mut c, r| async move { c.quarantine(r).await },
        )
        .await
    }

    /// One page of the patient's quarantine in id order after `after_id`; true when more follow.
    pub async fn list_quarantine(
        &self,
        patient_id: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<(Vec<QuarantinedRecord>, bool), ClientError> {
        let response = self
            .records_call(
                patient_id,
                self.inner.config.deadline,
                |route| ListQuarantineRequest {
                    route: Some(route),
                    after_id: after_id.to_owned(),
                    limit,
                    consistency: ReadConsistency::Linearizable as i32,
                },
                |mut c, r| async move { c.list_quarantine(r).await },
            )
            .await?;
        Ok((response.records, response.more))
    }
}
