//! The clinical workload over the Records service: import speed of synthetic patients, then
//! closed-loop clients reading patient summaries, appending observations, and writing
//! admissions (an encounter, three observations and a discharge letter in one transaction).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_api::v1::{ResourceType, TransactionEntry, WriteOutcome, transaction_entry};
use dossier_client::{Client, WriteOptions};
use dossier_fhir::ImportedBundle;
use dossier_records::synth;

use crate::stats::{Json, Latency, per_second};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClinicalWorkload {
    /// Everything of a patient restricted to its summary kinds (conditions, medications,
    /// allergies, care relationships) and the Patient record.
    Summary,
    /// Create one observation.
    Append,
    /// One transaction: encounter, three observations, discharge letter.
    Admission,
}

impl ClinicalWorkload {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "summary" => Self::Summary,
            "append" => Self::Append,
            "admission" => Self::Admission,
            other => {
                anyhow::bail!("unknown clinical workload {other:?} (summary, append, admission)")
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Summary => "summary",
            Self::Append => "append",
            Self::Admission => "admission",
        }
    }
}

/// The kind of a failed call, for the error counts: the client error's variant.
fn error_kind(e: &dossier_client::ClientError) -> String {
    format!("{e:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or("error")
        .to_lowercase()
}

/// `records` when the write applied, else its outcome as an error kind.
fn applied(w: &dossier_client::RecordWrite, records: u64) -> Result<u64, String> {
    if w.outcome == WriteOutcome::Applied as i32 {
        Ok(records)
    } else {
        Err(format!(
            "{:?}",
            WriteOutcome::try_from(w.outcome).unwrap_or(WriteOutcome::Unspecified)
        )
        .to_lowercase())
    }
}

/// Writes synthetic patients 0..patients of `seed` with `concurrency` importers; returns a JSON
/// line with patients/s and records/s.
pub async fn import(
    client: &Client,
    seed: u64,
    patients: u64,
    concurrency: usize,
) -> Result<String> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let records = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (client, next, records) = (client.clone(), Arc::clone(&next), Arc::clone(&records));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= patients {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let p = synth::patient(seed, i);
                    let bundle = ImportedBundle {
                        patient: p.patient,
                        records: p.records,
                        ..ImportedBundle::default()
                    };
                    let n = dossier_cli::records::write_bundle(
                        &client,
                        &bundle,
                        dossier_cli::records::TRANSACTION_ENTRIES,
                    )
                    .await?;
                    records.fetch_add(n as u64, Ordering::Relaxed);
                    if (i + 1) % 200 == 0 {
                        eprintln!("  imported {} patients", i + 1);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.context("import task")??;
    }
    let elapsed = started.elapsed();
    let records = records.load(Ordering::Relaxed);
    Ok(Json::new("clinical-import")
        .num("patients", patients as f64)
        .num("records", records as f64)
        .num("concurrency", concurrency as f64)
        .num("seconds", elapsed.as_secs_f64())
        .num("patients_per_s", per_second(patients, elapsed))
        .num("records_per_s", per_second(records, elapsed))
        .finish())
}

/// One operation of `workload` on patient `pid`: the records it read or wrote, or the kind of
/// failure. `tag` makes the ids of what it creates unique.
async fn clinical_op(
    client: &Client,
    workload: ClinicalWorkload,
    pid: &str,
    tag: &str,
    k: u64,
) -> Result<u64, String> {
    match workload {
        ClinicalWorkload::Summary => {
            let mut got = 0u64;
            client
                .everything(
                    pid,
                    0,
                    &[
                        ResourceType::Patient,
                        ResourceType::Condition,
                        ResourceType::MedicationRequest,
                        ResourceType::AllergyIntolerance,
                        ResourceType::CareRelationship,
                    ],
                    false,
                    |rs| {
                        got += rs.len() as u64;
                        Ok(())
                    },
                )
                .await
                .map(|_| got)
                .map_err(|e| error_kind(&e))
        }
        ClinicalWorkload::Append => client
            .create_record(
                pid,
                synth::observation(format!("bench-{tag}"), k),
                &WriteOptions::default(),
            )
            .await
            .map_err(|e| error_kind(&e))
            .and_then(|w| applied(&w, 1)),
        ClinicalWorkload::Admission => {
            let entries: Vec<TransactionEntry> = synth::admission(pid, tag, k)
                .into_iter()
                .map(|r| TransactionEntry {
                    op: Some(transaction_entry::Op::Create(r)),
                })
                .collect();
            let n = entries.len() as u64;
            client
                .transaction(pid, entries, &WriteOptions::default())
                .await
                .map_err(|e| error_kind(&e))
                .and_then(|w| applied(&w, n))
        }
    }
}

/// Closed loop: `clients` clients running `workload` on patients of `seed` picked uniformly.
pub async fn load(
    client: &Client,
    workload: ClinicalWorkload,
    seed: u64,
    patients: u64,
    clients: usize,
    duration: Duration,
    warmup: Duration,
) -> Result<(String, String)> {
    let run_tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    );
    let spec = crate::closed_loop::LoopSpec {
        clients,
        warmup,
        duration,
        ops: None,
    };
    let result = crate::closed_loop::run(spec, |c| {
        let (client, run_tag) = (client.clone(), run_tag.clone());
        let mut n = c as u64;
        move |k| {
            n = n
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let pid = synth::patient_id(seed, (n >> 33) % patients);
            let (client, tag) = (client.clone(), format!("{run_tag}-{c}-{k}"));
            async move { clinical_op(&client, workload, &pid, &tag, k).await }
        }
    })
    .await?;
    let (hist, errors, resources, elapsed) = (
        result.latencies,
        result.errors,
        result.units,
        result.elapsed,
    );
    let ops = hist.len();
    let latency = Latency::of_histogram(&hist);
    let mut json = Json::new("clinical-load");
    json.str("workload", workload.name())
        .num("clients", clients as f64)
        .num("patients", patients as f64)
        .num("seconds", elapsed.as_secs_f64())
        .num("ops", ops as f64)
        .num("ops_per_s", per_second(ops, elapsed))
        .num("resources_per_s", per_second(resources, elapsed))
        .num("errors", errors.values().sum::<u64>() as f64);
    for (k, n) in &errors {
        json.num(&format!("errors_{k}"), *n as f64);
    }
    json.latency("latency", latency);
    let ms = |f: fn(&Latency) -> f64| {
        latency.map_or("-".to_owned(), |l| format!("{:.2}", f(&l) / 1000.0))
    };
    let row = format!(
        "| {} | {clients} | {:.0} | {:.0} | {} | {} | {} | {} |",
        workload.name(),
        per_second(ops, elapsed),
        per_second(resources, elapsed),
        ms(|l| l.p50),
        ms(|l| l.p99),
        ms(|l| l.p999),
        errors.values().sum::<u64>()
    );
    Ok((json.finish(), row))
}
