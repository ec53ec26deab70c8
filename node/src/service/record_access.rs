//! Who may make a Records call and what it leaves in the patient's audit chain: the
//! authorisation of every call on a patient (`access.rs` decides; a clinician's standing is read
//! here), the commit of a read's audit event, and the pages of the chain (`AccessLog`).

use std::time::Duration;

use dossier_api::v1::{AccessLogEntry, AccessLogResponse};
use dossier_records::kv::Reads;
use dossier_records::{PatientId, PatientKeys};
use dossier_storage::chain;
use tonic::Request;

use super::records::RecordsService;
use crate::access::{self, Decision, Ground, Need};
use crate::audit::Audit;
use crate::authn::{Caller, Principal};
use crate::break_glass;
use crate::errors::ApiError;
use crate::record_store::ReplicaReads;

impl RecordsService {
    /// Decides whether the caller of `request` may do what `need` says on `patient` of `shard`:
    /// by role, or for a clinician by their standing with the patient, read from this replica
    /// (as applied here: a care relationship ended a moment ago may still count on a replica
    /// that has not applied the change). A break-the-glass access is put on the review list
    /// before it is allowed.
    pub(super) async fn authorize<Req>(
        &self,
        request: &Request<Req>,
        need: Need,
        shard: u64,
        patient: &PatientId,
        deadline: Duration,
    ) -> Result<Audit, ApiError> {
        let (ground, withheld) = match access::decide(request, need, Some(patient))? {
            Decision::Allowed(ground) => (ground, Vec::new()),
            Decision::NeedsStanding(access) => {
                let replica = self.replica(shard)?;
                let standing = dossier_records::care::standing(
                    &ReplicaReads(&replica),
                    &PatientKeys::new(patient),
                    &access.caller().care,
                    dossier_records::now_micros(),
                )?;
                access.with_standing(standing)?
            }
        };
        let principal = Principal::of(request)?;
        if let (Ground::BreakGlass(reason), Principal::Caller(caller)) = (&ground, &principal) {
            let call = match need {
                Need::RecordWrite | Need::PatientCreate => "record-write",
                _ => "record-read",
            };
            self.review_break_glass(caller, patient.as_str(), reason, call, deadline)
                .await?;
            tracing::warn!(shard, "break-the-glass access to a patient's record");
        }
        Ok(Audit::new(&principal, &ground, self.node.node_id()).withholding(withheld))
    }

    /// Puts a break-the-glass access on the cluster's review list (`break_glass.rs`).
    pub(super) async fn review_break_glass(
        &self,
        caller: &Caller,
        patient: &str,
        reason: &str,
        call: &str,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        self.node.metrics.break_glass.inc();
        let op = break_glass::record(caller, patient, reason, call, self.node.node_id());
        self.shards
            .write_meta(
                dossier_records::kv::Batch {
                    conditions: Vec::new(),
                    ops: vec![op],
                },
                deadline,
            )
            .await
    }

    /// Records a read's audit event (if the call is audited) durably in the node's journal
    /// before its data leaves the node; it reaches the chain behind the read (`audit_batch.rs`).
    pub(super) async fn audited(
        &self,
        op: Option<dossier_records::kv::Op>,
        patient: &PatientId,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        match op {
            Some(op) => self.audits.append(patient.as_str(), op, deadline).await,
            None => Ok(()),
        }
    }

    /// A page of the patient's audit chain after `after_seq`: entries up to the head read first,
    /// so that a page never runs past the head it reports.
    pub(super) fn access_log_page(
        &self,
        shard: u64,
        patient: &PatientId,
        after_seq: u64,
        limit: u32,
    ) -> Result<AccessLogResponse, ApiError> {
        let limit = self.page_limit(limit)?;
        let replica = self.replica(shard)?;
        let reads = ReplicaReads(&replica);
        let keys = PatientKeys::new(patient);
        let head = match reads.get(&keys.audit_head())? {
            None => None,
            Some(v) => Some(chain::decode_head(&v).ok_or_else(|| {
                ApiError::Internal("the audit chain's head does not decode".into())
            })?),
        };
        let (head_seq, head_hash) = head.map_or((0, Vec::new()), |(s, h)| (s, h.to_vec()));
        let prefix = keys.audit_entries();
        let after = (after_seq > 0).then(|| chain::entry_key(&prefix, after_seq));
        let bytes_max = self.node.config.node.records.message_bytes_max;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        for (key, value) in reads.scan_prefix(&prefix, after.as_deref(), limit + 1)? {
            let seq = dossier_records::keys::be_u64(&key[prefix.len()..])
                .ok_or_else(|| ApiError::Internal("an audit entry's key does not decode".into()))?;
            if seq > head_seq {
                break;
            }
            if entries.len() == limit || (bytes + value.len() > bytes_max && !entries.is_empty()) {
                more = true;
                break;
            }
            let (hash, event) = chain::split_entry(&value)
                .ok_or_else(|| ApiError::Internal(format!("audit entry {seq} does not decode")))?;
            bytes += value.len();
            entries.push(AccessLogEntry {
                seq,
                hash: hash.to_vec(),
                event: event.to_vec(),
            });
        }
        Ok(AccessLogResponse {
            entries,
            head_seq,
            head_hash,
            more,
        })
    }
}
