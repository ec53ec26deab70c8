//! Writing typed records through the client: a mapped FHIR bundle as a patient and its records
//! in transactions (used by `dossier patient import`, the playground and the benchmarks).

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};
use dossier_api::v1::{
    QuarantineProblem, QuarantinedRecord, RecordWriteResponse, Resource, TransactionEntry,
    WriteOutcome, transaction_entry,
};
use dossier_client::{Client, WriteOptions, is_applied};
use dossier_fhir::ImportedBundle;
use dossier_records::record_refs;

/// Entries per import transaction (the server's default `records.transaction-entries-max`).
pub const TRANSACTION_ENTRIES: usize = 128;

pub fn refusal(w: &RecordWriteResponse) -> String {
    let outcome = WriteOutcome::try_from(w.outcome).unwrap_or(WriteOutcome::Unspecified);
    let mut s = format!("{outcome:?}");
    if !w.field.is_empty() {
        s.push_str(&format!(" at {}", w.field));
    }
    if outcome == WriteOutcome::IdentifierHeld {
        s.push_str(&format!(" (held by patient {})", w.holder_patient_id));
    }
    if outcome == WriteOutcome::VersionConflict {
        s.push_str(&format!(" (current version {})", w.current_version));
    }
    s
}

pub fn derived_request_id(parts: &[&str]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(parts.join("\0").as_bytes()).to_be_bytes()
}

/// Orders records so that each one's references point to earlier ones (a cycle stays in
/// input order) and cuts them into transactions of at most `max` entries.
pub fn chunks(records: &[Resource], max: usize) -> Vec<Vec<Resource>> {
    let key = |r: &Resource| -> (i32, String) {
        let t = r
            .kind
            .as_ref()
            .map_or(0, |k| dossier_records::kind_type(k) as i32);
        (t, r.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default())
    };
    let index: HashMap<(i32, String), usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (key(r), i))
        .collect();
    let mut placed = vec![false; records.len()];
    let mut order = Vec::with_capacity(records.len());
    // Depth-first: a record's targets first.
    fn visit(
        i: usize,
        records: &[Resource],
        index: &HashMap<(i32, String), usize>,
        placed: &mut Vec<bool>,
        visiting: &mut HashSet<usize>,
        order: &mut Vec<usize>,
    ) {
        if placed[i] || !visiting.insert(i) {
            return;
        }
        for (_, target) in record_refs(&records[i], "r") {
            if let Some(&j) = index.get(&(target.r#type, target.id)) {
                visit(j, records, index, placed, visiting, order);
            }
        }
        visiting.remove(&i);
        if !placed[i] {
            placed[i] = true;
            order.push(i);
        }
    }
    let mut visiting = HashSet::new();
    for i in 0..records.len() {
        visit(i, records, &index, &mut placed, &mut visiting, &mut order);
    }
    order
        .chunks(max.max(1))
        .map(|c| c.iter().map(|&i| records[i].clone()).collect())
        .collect()
}

/// Writes one mapped bundle; returns the number of records written.
pub async fn write_bundle(
    client: &Client,
    imported: &ImportedBundle,
    transaction_max: usize,
) -> Result<usize> {
    let patient_id = imported
        .patient
        .meta
        .as_ref()
        .map(|m| m.id.clone())
        .unwrap_or_default();
    // Every record is checked as the server will check it before anything is written, so that
    // bad content never leaves a bundle half-written (the server's limits may still be lower
    // than the defaults used here).
    let limits = dossier_records::Limits::default();
    dossier_records::validate_new_record(&imported.patient, "patient", &patient_id, &limits)
        .map_err(|e| anyhow::anyhow!("patient {patient_id}: {e}"))?;
    for r in &imported.records {
        let id = r.meta.as_ref().map_or("", |m| m.id.as_str());
        dossier_records::validate_new_record(r, "record", &patient_id, &limits)
            .map_err(|e| anyhow::anyhow!("patient {patient_id}, record {id}: {e}"))?;
    }
    let w = client
        .create_patient(
            imported.patient.clone(),
            &WriteOptions {
                request_id: Some(derived_request_id(&["dossier-import/patient", &patient_id])),
                ..WriteOptions::default()
            },
        )
        .await?;
    if !is_applied(&w) {
        bail!("patient {patient_id}: {}", refusal(&w));
    }
    let mut written = 0;
    for chunk in chunks(&imported.records, transaction_max) {
        let ids: Vec<String> = chunk
            .iter()
            .map(|r| r.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default())
            .collect();
        let mut parts = vec!["dossier-import/records", patient_id.as_str()];
        parts.extend(ids.iter().map(String::as_str));
        let entries: Vec<TransactionEntry> = chunk
            .into_iter()
            .map(|r| TransactionEntry {
                op: Some(transaction_entry::Op::Create(r)),
            })
            .collect();
        let n = entries.len();
        let w = client
            .transaction(
                &patient_id,
                entries,
                &WriteOptions {
                    request_id: Some(derived_request_id(&parts)),
                    ..WriteOptions::default()
                },
            )
            .await?;
        if !is_applied(&w) {
            bail!(
                "patient {patient_id}: a transaction of {n} records was refused: {} (entry {})",
                refusal(&w),
                ids.get(w.entry_index as usize).cloned().unwrap_or_default()
            );
        }
        written += n;
    }
    for (t, id) in &imported.entered_in_error {
        let current = client.read_record(&patient_id, *t, id).await?;
        let version = current.and_then(|r| r.meta).map_or(0, |m| m.version);
        if version > 0 {
            let w = client
                .delete_record(
                    &patient_id,
                    *t,
                    id,
                    version,
                    "entered-in-error at source",
                    &WriteOptions::default(),
                )
                .await?;
            if !is_applied(&w)
                && WriteOutcome::try_from(w.outcome) != Ok(WriteOutcome::EnteredInError)
            {
                bail!(
                    "patient {patient_id}: marking {id} entered-in-error: {}",
                    refusal(&w)
                );
            }
        }
    }
    Ok(written)
}

/// Bytes of quarantined sources sent in one call.
const QUARANTINE_CALL_BYTES: usize = 4 << 20;

/// Puts the records an import set aside in the patient's quarantine, `max` per call; returns
/// how many. Re-running an import puts the same records again (the write is idempotent).
pub async fn write_quarantine(
    client: &Client,
    imported: &ImportedBundle,
    max: usize,
) -> anyhow::Result<usize> {
    let patient_id = imported
        .patient
        .meta
        .as_ref()
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let records: Vec<QuarantinedRecord> = imported
        .quarantined
        .iter()
        .map(|q| QuarantinedRecord {
            id: q.id.clone(),
            fhir_type: q.fhir_type.clone(),
            source: q.source.clone(),
            source_json: q.resource.to_string(),
            problems: q
                .problems
                .iter()
                .map(|p| QuarantineProblem {
                    path: p.path.clone(),
                    message: p.message.clone(),
                })
                .collect(),
            references: q.references.clone().into_iter().collect(),
            ..QuarantinedRecord::default()
        })
        .collect();
    // Calls of at most `max` records and QUARANTINE_CALL_BYTES of sources (a source may be up
    // to 1 MiB; a request message is bounded by the node's `limits.request-bytes-max`).
    let mut start = 0;
    while start < records.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < records.len()
            && end - start < max.max(1)
            && (end == start || bytes + records[end].source_json.len() <= QUARANTINE_CALL_BYTES)
        {
            bytes += records[end].source_json.len();
            end += 1;
        }
        let r = client
            .quarantine(
                &patient_id,
                records[start..end].to_vec(),
                Vec::new(),
                &WriteOptions::default(),
            )
            .await?;
        if r.outcome != WriteOutcome::Applied as i32 {
            bail!("patient {patient_id}: the quarantine was refused (no such patient)");
        }
        start = end;
    }
    Ok(records.len())
}
