//! The identifier workload: clients create patients that claim national numbers from a small
//! pool, under the same faults as the other workloads, and mark each patient they created
//! entered-in-error soon after (which releases the number), so that numbers keep
//! changing hands through the faults. After healing, every patient ever attempted is read back,
//! and the checker requires that no number is held by two current patients,
//! that the master patient index names each holder, and that every acknowledged create exists
//! with its number. Kept out of `history.jsonl`: its outcome is `identifiers.json`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dossier_api::v1::{
    HumanName, Identifier, Meta, Patient, RecordStatus, Resource, ResourceType, WriteOutcome,
    resource,
};
use dossier_client::{Client, WriteOptions};
use dossier_records::SYSTEM_INSZ;
use serde::Serialize;

/// One create attempt and what the client heard.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub patient: String,
    pub number: String,
    /// "applied", "held", or "indeterminate" (an error: it may or may not have happened).
    pub outcome: &'static str,
    /// When the client saw the create acknowledged (ms since the workload started).
    pub acked_ms: Option<u64>,
    /// When the client asked to release the number (ms); the patient holds it at least until then.
    pub release_invoked_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub valid: bool,
    pub attempts: usize,
    pub acknowledged: usize,
    pub held_answers: usize,
    pub indeterminate: usize,
    /// Number → the patients whose current Patient record lists it (not entered-in-error).
    pub holders: BTreeMap<String, Vec<String>>,
    /// Numbers held by more than one patient at the end.
    pub duplicates: Vec<String>,
    /// Two patients certainly holding one number at once: B's create was acknowledged after
    /// A's and before A's release was even asked for.
    pub overlaps: Vec<String>,
    /// Acknowledged creates not found (or found without their number), in any status.
    pub lost: Vec<String>,
    /// Numbers whose index lookup disagrees with the records.
    pub lookup_mismatches: Vec<String>,
    /// Patients that could not be read back (the check is then not conclusive).
    pub unreadable: Vec<String>,
}

/// One line for the run's summary.
pub fn summary(ids: &Report) -> String {
    format!(
        "identifiers: {}: {} creates ({} acknowledged, {} told the number is held, {} indeterminate); {} numbers held; duplicates {:?}, overlapping holders {:?}, lost {:?}, index mismatches {:?}, unreadable {:?}",
        if ids.valid { "valid" } else { "INVALID" },
        ids.attempts,
        ids.acknowledged,
        ids.held_answers,
        ids.indeterminate,
        ids.holders.len(),
        ids.duplicates,
        ids.overlaps.iter().take(5).collect::<Vec<_>>(),
        ids.lost,
        ids.lookup_mismatches,
        ids.unreadable
    )
}

/// A valid INSZ number from nine digits.
fn insz(first9: u64) -> String {
    dossier_records::insz_with_check(first9, false)
}

/// The pool of numbers a run competes for.
pub fn pool(size: usize, seed: u64) -> Vec<String> {
    (0..size as u64)
        .map(|i| insz(850_101_000 + (seed % 500) * 7 + i))
        .collect()
}

fn patient(id: &str, number: &str) -> Resource {
    Resource {
        unmodelled_json: String::new(),
        meta: Some(Meta {
            id: id.into(),
            ..Meta::default()
        }),
        kind: Some(resource::Kind::Patient(Patient {
            identifiers: vec![Identifier {
                system: SYSTEM_INSZ.into(),
                value: number.into(),
                r#type: None,
            }],
            names: vec![HumanName {
                family: "Jepsen".into(),
                ..HumanName::default()
            }],
            ..Patient::default()
        })),
    }
}

/// One client: creates patient after patient, each claiming a number of the pool, until stopped.
pub async fn client_loop(
    client: Client,
    worker: usize,
    numbers: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    seed: u64,
    started: std::time::Instant,
) {
    let ms = || started.elapsed().as_millis() as u64;
    let mut n = seed.wrapping_add(worker as u64 * 7919) | 1;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n = n
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        i += 1;
        let id = format!("j{worker}-{i}");
        let number = numbers[((n >> 33) % numbers.len() as u64) as usize].clone();
        let options = WriteOptions {
            deadline: Some(Duration::from_secs(5)),
            ..WriteOptions::default()
        };
        let outcome = match client.create_patient(patient(&id, &number), &options).await {
            Ok(w) if w.outcome == WriteOutcome::Applied as i32 => "applied",
            Ok(w) if w.outcome == WriteOutcome::IdentifierHeld as i32 => "held",
            // Any other answer is definite too, but this workload makes none: record it as
            // indeterminate so that the check stays conservative.
            Ok(_) | Err(_) => "indeterminate",
        };
        let release = outcome == "applied";
        let acked_ms = release.then(ms);
        let mut attempt = Attempt {
            patient: id.clone(),
            number,
            outcome,
            acked_ms,
            release_invoked_ms: None,
        };
        if release {
            // Give the number back after a while: the next claimant must find it released
            // (or revoke a stale claim), never take it from a live holder.
            tokio::time::sleep(Duration::from_millis((n >> 40) % 300)).await;
            attempt.release_invoked_ms = Some(ms());
        }
        attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(attempt);
        if release {
            let _ = client
                .delete_record(
                    &id,
                    ResourceType::Patient,
                    &id,
                    1,
                    "jepsen: release",
                    &options,
                )
                .await;
        }
    }
}

/// Reads every attempted patient back (after healing) and checks the invariants.
pub async fn check(client: &Client, numbers: &[String], attempts: &[Attempt]) -> Report {
    let mut report = Report {
        attempts: attempts.len(),
        acknowledged: attempts.iter().filter(|a| a.outcome == "applied").count(),
        held_answers: attempts.iter().filter(|a| a.outcome == "held").count(),
        indeterminate: attempts
            .iter()
            .filter(|a| a.outcome == "indeterminate")
            .count(),
        ..Report::default()
    };
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in attempts.iter().filter(|a| a.outcome != "held") {
        match client
            .read_record(&a.patient, ResourceType::Patient, &a.patient)
            .await
        {
            Ok(Some(r)) => {
                let current = r
                    .meta
                    .as_ref()
                    .is_some_and(|m| m.status == RecordStatus::Current as i32);
                if let Some(resource::Kind::Patient(p)) = r.kind {
                    let numbers: Vec<String> = p.identifiers.into_iter().map(|i| i.value).collect();
                    if current {
                        for number in &numbers {
                            report
                                .holders
                                .entry(number.clone())
                                .or_default()
                                .push(a.patient.clone());
                        }
                    }
                    found.insert(a.patient.clone(), numbers);
                }
            }
            Ok(None) => {}
            Err(_) => report.unreadable.push(a.patient.clone()),
        }
    }
    for a in attempts.iter().filter(|a| a.outcome == "applied") {
        if !found.get(&a.patient).is_some_and(|n| n.contains(&a.number)) {
            report.lost.push(a.patient.clone());
        }
    }
    for (number, patients) in &report.holders {
        if patients.len() > 1 {
            report.duplicates.push(number.clone());
        }
    }
    let applied: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome == "applied").collect();
    for a in &applied {
        for b in &applied {
            let (Some(a_ack), Some(b_ack)) = (a.acked_ms, b.acked_ms) else {
                continue;
            };
            let a_until = a.release_invoked_ms.unwrap_or(u64::MAX);
            if a.patient != b.patient && a.number == b.number && a_ack < b_ack && b_ack < a_until {
                report.overlaps.push(format!(
                    "{}: {} held it from {a_ack} ms until at least {a_until} ms, {} was acknowledged at {b_ack} ms",
                    a.number, a.patient, b.patient
                ));
            }
        }
    }
    for number in numbers {
        let holder = report.holders.get(number).and_then(|p| p.first()).cloned();
        match client.lookup_identifier(SYSTEM_INSZ, number).await {
            Ok(found) if found == holder => {}
            Ok(found) => report.lookup_mismatches.push(format!(
                "{number}: index says {found:?}, records say {holder:?}"
            )),
            Err(e) => report
                .lookup_mismatches
                .push(format!("{number}: lookup failed: {e}")),
        }
    }
    report.valid = report.duplicates.is_empty()
        && report.overlaps.is_empty()
        && report.lost.is_empty()
        && report.lookup_mismatches.is_empty()
        && report.unreadable.is_empty();
    report
}
