//! The write coordinator of the `Records` service: on the patient shard's leader, after a read
//! barrier, the record layer plans the write from the replica's reads (`plan::plan_write`); the
//! ONE conditional batch it made is proposed, and a failed condition is answered as the plan says
//! (a definite answer, or plan again from fresh reads, at most `records.write-attempts-max`
//! times). Writes of a Patient claim its added indexed identifiers first (`records::mpi`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dossier_api::v1::{RecordWriteResponse, Resource, WriteHeader, WriteOutcome};
use dossier_records::mpi::{ClaimAll, Mpi, indexed_identifiers};
use dossier_records::plan::{self, Planned, Retry, WriteEntry, refusal};
use dossier_records::{Ident, PatientId, PatientKeys};
use dossier_storage::{Command, Outcome};

use super::records::RecordsService;
use crate::errors::ApiError;
use crate::record_store::{ReplicaReads, to_storage};
use crate::shards::ClusterShards;

fn now_micros() -> u64 {
    dossier_records::now_micros().max(0) as u64
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

impl RecordsService {
    pub(super) fn mpi(&self) -> Mpi<'_, ClusterShards> {
        let r = &self.node.config.node.records;
        Mpi {
            shards: &self.shards,
            grace: Duration::from_millis(r.mpi_claim_grace_ms),
            attempts: r.write_attempts_max,
        }
    }

    fn indexed(&self, resource: Option<&Resource>, field: &str) -> Vec<(Ident, String)> {
        indexed_identifiers(
            resource,
            &self.node.config.node.records.indexed_identifier_systems,
            field,
        )
    }

    /// Version `version` of the patient's Patient record, read after a barrier.
    pub(super) async fn patient_version(
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
    /// made. When another write of the same patient revoked this attempt's claims (they revoke
    /// each other's at once), it tries again with a new token, at most
    /// `records.write-attempts-max` times. `old` is the version being replaced.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_patient(
        &self,
        shard: u64,
        patient: &PatientId,
        header: &WriteHeader,
        fingerprint: [u8; 16],
        mut entry: WriteEntry<'_>,
        old: Option<&Resource>,
        new: Option<&Resource>,
        audit: Option<dossier_records::kv::Op>,
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
        if let Some(stored) =
            dossier_records::kv::Reads::get(&reads, &keys.request(&header.request_id))?
        {
            return Ok(dossier_records::idempotency::replay(&stored, &fingerprint)?);
        }
        let head = plan::head(&reads, &keys, "Patient", patient.as_str())?;
        if let Some(refused) = plan::head_refusal(&entry, head, 0) {
            return Ok(refused);
        }
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
        let mut removed_tokens = Vec::new();
        for x in &removed {
            if let Some(t) = self.mpi().holds(patient, x, left()).await? {
                removed_tokens.push((x.clone(), t));
            }
        }
        entry.releases = removed;
        let attempts = self.node.config.node.records.write_attempts_max;
        for attempt in 0..attempts {
            let token = fresh_token(&header.request_id);
            if attempt > 0 {
                // Another write of this patient revoked this one's claims (or the reverse):
                // step aside a little, a different time for each, so one of them gets through.
                let jitter =
                    Duration::from_millis(1 + u64::from(token[0] % 20) * u64::from(attempt));
                tokio::time::sleep(jitter.min(left())).await;
            }
            match self
                .mpi()
                .claim_all(patient, &token, &added, left())
                .await?
            {
                ClaimAll::Claimed => {}
                ClaimAll::Held { holder, .. } if holder == *patient => {
                    // The patient holds it already: a write of this patient that added it
                    // committed since the head was read (an earlier attempt of this request, or
                    // another write). The claims were given back; the plan answers from fresh
                    // reads: the stored answer, or the head's refusal.
                    match self
                        .answer_from_reads(shard, patient, header, fingerprint, &entry, left())
                        .await?
                    {
                        Some(answer) => return Ok(answer),
                        None => continue,
                    }
                }
                ClaimAll::Held { holder, field } => {
                    let mut r = refusal(WriteOutcome::IdentifierHeld, 0, &field);
                    r.holder_patient_id = holder.as_str().to_owned();
                    return Ok(r);
                }
            }
            entry.holds = added.iter().map(|(x, _)| x.clone()).collect();
            entry.token = token;
            let result = self
                .write(
                    shard,
                    patient,
                    header,
                    fingerprint,
                    vec![entry.clone()],
                    audit.clone(),
                    left(),
                )
                .await;
            let give_back = match &result {
                Ok(w) if w.outcome == WriteOutcome::Applied as i32 => {
                    if !w.replayed {
                        for (x, t) in &removed_tokens {
                            self.mpi()
                                .release_all(patient, t, std::iter::once(x), left())
                                .await;
                        }
                    }
                    false
                }
                Ok(_) => true,
                // Refused before anything was proposed: nothing was written.
                Err(ApiError::InvalidArgument { .. } | ApiError::Internal(_)) => true,
                // Undecided: a claim left behind is revoked by the next claimant (at once when it
                // is a retry for the same patient, after the grace period otherwise).
                Err(_) => false,
            };
            if give_back {
                self.mpi()
                    .release_all(patient, &token, added.iter().map(|(x, _)| x), left())
                    .await;
            }
            match result {
                Ok(w) if w.outcome == WriteOutcome::ClaimRevoked as i32 => continue,
                other => return other,
            }
        }
        Err(ApiError::Unavailable(format!(
            "patient {patient}: identifier claims lost {attempts} times to concurrent writes of the same patient; retry"
        )))
    }

    /// The answer fresh reads give `entry` without writing (a replay of the request, or the
    /// head's refusal); None when the write could go ahead after all.
    async fn answer_from_reads(
        &self,
        shard: u64,
        patient: &PatientId,
        header: &WriteHeader,
        fingerprint: [u8; 16],
        entry: &WriteEntry<'_>,
        deadline: Duration,
    ) -> Result<Option<RecordWriteResponse>, ApiError> {
        self.node.read_barrier(shard, deadline).await?;
        let replica = self.replica(shard)?;
        let planned = plan::plan_write(
            &ReplicaReads(&replica),
            patient,
            header,
            &fingerprint,
            std::slice::from_ref(entry),
            now_micros(),
        )?;
        Ok(match planned {
            Planned::Answer(answer) => Some(answer),
            Planned::Write(_) => None,
        })
    }

    /// Runs a write of `entries` for `patient` (docs/schema.md §5), with its audit event in the
    /// same batch.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write(
        &self,
        shard: u64,
        patient: &PatientId,
        header: &WriteHeader,
        fingerprint: [u8; 16],
        entries: Vec<WriteEntry<'_>>,
        audit: Option<dossier_records::kv::Op>,
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
            let mut batch = plan.batch.clone();
            batch.ops.extend(audit.clone());
            let batch = to_storage(batch);
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
                Outcome::StaleSequence { .. }
                | Outcome::SessionExpired
                | Outcome::Replayed { .. }
                | Outcome::OutOfRange => {
                    return Err(ApiError::Internal(format!(
                        "a sessionless write got outcome {outcome:?}"
                    )));
                }
            }
        }
        Err(ApiError::Unavailable(format!(
            "patient {patient}: {attempts} attempts lost to concurrent writes of the same patient; retry"
        )))
    }
}
