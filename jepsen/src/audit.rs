//! The audit check of a run with TLS (where every access is audited): at the end, every patient
//! the workloads touched has an intact audit chain (`dossier_cli::audit_log::read_chain`
//! recomputes every link) holding at least one read event per read acknowledged on it and one
//! write event per write acknowledged on it. A chain may over-report (a retried request, a
//! request whose answer was lost) but never under-report: an acknowledged access without its
//! event is an access the patient cannot see.
//!
//! Read events are counted once per (node, journal seq), as the access log shows them
//! (`dossier_cli::audit_log::read_accesses`): an event moved twice (its node crashed between the
//! move and forgetting it) appears twice in the chain with the same pair. A write's
//! event is in the same atomic batch as the write, so it exists exactly when the write applied.
//!
//! Events of reads reach their chains behind the reads (each node moves its journal in the
//! background), so a chain that is short, or cannot be read, is read again, for up to
//! [`SETTLE`] per patient, before it counts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dossier_api::v1::AuditAction;
use dossier_client::Client;
use serde::Serialize;

use crate::history::{Event, F, Type};
use crate::workloads::patient_of;

/// How long one patient's short or unreadable chain is read again before it counts.
const SETTLE: Duration = Duration::from_secs(10);

/// Accesses of one patient: acknowledged by the workloads, or found in its chain.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Accesses {
    pub reads: u64,
    pub writes: u64,
}

/// What the check found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub valid: bool,
    /// Patients whose chains were read (every patient an operation was invoked on).
    pub patients: usize,
    /// Over all patients: operations acknowledged, and the events found for them.
    pub acknowledged: Accesses,
    pub events: Accesses,
    /// Chains that do not link: patient, and where they break.
    pub broken: Vec<(String, String)>,
    /// Chains with fewer events than acknowledged accesses: patient, found, acknowledged.
    pub short: Vec<(String, Accesses, Accesses)>,
    /// Chains that could not be read: patient, error.
    pub unreadable: Vec<(String, String)>,
}

/// Every patient an operation was invoked on, with the reads and writes acknowledged on it.
pub fn acknowledged(events: &[Event]) -> BTreeMap<String, Accesses> {
    let mut by_patient: BTreeMap<String, Accesses> = BTreeMap::new();
    for e in events {
        let counts = by_patient.entry(patient_of(&e.key)).or_default();
        match (e.kind, e.f) {
            (Type::Ok, F::Read) => counts.reads += 1,
            (Type::Ok, F::Write | F::Cas | F::Add) => counts.writes += 1,
            _ => {}
        }
    }
    by_patient
}

/// The workloads' accesses an event records (an access-log read, or another service's
/// action, records none of theirs).
fn kind(action: i32) -> Option<F> {
    match AuditAction::try_from(action).ok()? {
        AuditAction::KvGet | AuditAction::KvScan => Some(F::Read),
        AuditAction::KvPut
        | AuditAction::KvDelete
        | AuditAction::KvCompareAndSet
        | AuditAction::KvBatch => Some(F::Write),
        _ => None,
    }
}

/// Reads every chain of `acknowledged`'s patients and checks it.
pub async fn check(client: &Client, acknowledged: &BTreeMap<String, Accesses>) -> Report {
    let mut report = Report {
        patients: acknowledged.len(),
        ..Report::default()
    };
    for (patient, &want) in acknowledged {
        report.acknowledged.reads += want.reads;
        report.acknowledged.writes += want.writes;
        let deadline = Instant::now() + SETTLE;
        loop {
            let mut found = Accesses::default();
            let read =
                dossier_cli::audit_log::read_accesses(client, patient, |_, event| {
                    match kind(event.action) {
                        Some(F::Read) => found.reads += 1,
                        Some(_) => found.writes += 1,
                        None => {}
                    }
                })
                .await;
            let short = found.reads < want.reads || found.writes < want.writes;
            if (read.is_err() || short) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            match read {
                Err(e) => {
                    report.unreadable.push((patient.clone(), e.to_string()));
                    break;
                }
                Ok(chain) => {
                    if let Some(b) = chain.broken {
                        report.broken.push((patient.clone(), b.to_string()));
                    } else if short {
                        report.short.push((patient.clone(), found, want));
                    }
                    report.events.reads += found.reads;
                    report.events.writes += found.writes;
                    break;
                }
            }
        }
    }
    report.valid =
        report.broken.is_empty() && report.short.is_empty() && report.unreadable.is_empty();
    report
}

/// One line for the run's summary.
pub fn summary(report: &Report) -> String {
    format!(
        "audit: {}: {} patients; acknowledged {} reads and {} writes; in their chains {} read and {} write events; broken chains {:?}, short chains {:?}, unreadable {:?}",
        if report.valid { "valid" } else { "INVALID" },
        report.patients,
        report.acknowledged.reads,
        report.acknowledged.writes,
        report.events.reads,
        report.events.writes,
        report.broken.iter().take(5).collect::<Vec<_>>(),
        report.short.iter().take(5).collect::<Vec<_>>(),
        report.unreadable.iter().take(5).collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn event(kind: Type, f: F, key: &str) -> Event {
        Event {
            process: 0,
            kind,
            f,
            key: key.to_owned(),
            value: Value::Null,
            time: 0,
        }
    }

    /// Acknowledged reads and writes count by the patient of their key; a patient whose
    /// operations all failed or stayed indeterminate is listed with none (its chain is still
    /// checked for its links).
    #[test]
    fn acknowledged_operations_are_counted_by_patient_and_kind() {
        let events = [
            event(Type::Invoke, F::Read, "r/1.0"),
            event(Type::Ok, F::Read, "r/1.0"),
            event(Type::Invoke, F::Cas, "r/1.0"),
            event(Type::Ok, F::Cas, "r/1.0"),
            event(Type::Invoke, F::Write, "r/1.0"),
            event(Type::Info, F::Write, "r/1.0"),
            event(Type::Invoke, F::Add, "s/2"),
            event(Type::Fail, F::Add, "s/2"),
            event(Type::Ok, F::Add, "s/3"),
            event(Type::Ok, F::Read, "s/3"),
            event(Type::Ok, F::Add, "s/3"),
        ];
        let counted: Vec<(String, Accesses)> = acknowledged(&events).into_iter().collect();
        assert_eq!(
            counted,
            vec![
                (
                    "jepsen-r-1.0".to_owned(),
                    Accesses {
                        reads: 1,
                        writes: 1
                    }
                ),
                ("jepsen-s-2".to_owned(), Accesses::default()),
                (
                    "jepsen-s-3".to_owned(),
                    Accesses {
                        reads: 1,
                        writes: 2
                    }
                ),
            ]
        );
    }

    /// Only the workloads' Kv actions count, reads apart from writes.
    #[test]
    fn events_are_counted_by_their_action() {
        assert_eq!(kind(AuditAction::KvGet as i32), Some(F::Read));
        assert_eq!(kind(AuditAction::KvScan as i32), Some(F::Read));
        assert_eq!(kind(AuditAction::KvCompareAndSet as i32), Some(F::Write));
        assert_eq!(kind(AuditAction::KvBatch as i32), Some(F::Write));
        assert_eq!(kind(AuditAction::AccessLog as i32), None);
        assert_eq!(kind(AuditAction::Read as i32), None);
        assert_eq!(kind(999), None);
    }
}
