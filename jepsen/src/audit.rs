//! The audit check of a run with TLS (where every access is audited): at the end, every patient
//! the workloads touched has an intact audit chain (`dossier_cli::audit_log::read_chain`
//! recomputes every link) holding at least one event per operation acknowledged on it. A chain
//! may over-report (a retried request, a read whose answer was lost) but never under-report: an
//! acknowledged access without its event is an access the patient cannot see.
//!
//! Events of reads reach their chains behind the reads (each node moves its journal in the
//! background), so a chain that is short is read again, up to a deadline, before it counts as
//! short.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dossier_api::v1::AuditAction;
use dossier_client::Client;
use serde::Serialize;

use crate::history::{Event, Type};
use crate::workloads::patient_of;

/// How long short chains are read again before they count as short.
const SETTLE: Duration = Duration::from_secs(20);

/// What the check found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub valid: bool,
    pub patients: usize,
    /// Operations acknowledged, and events found for them, over all patients.
    pub acknowledged: u64,
    pub events: u64,
    /// Chains that do not link: patient, and where they break.
    pub broken: Vec<(String, String)>,
    /// Chains with fewer events than acknowledged operations: patient, events, acknowledged.
    pub short: Vec<(String, u64, u64)>,
    /// Chains that could not be read: patient, error.
    pub unreadable: Vec<(String, String)>,
}

/// Acknowledged operations per patient, from the run's events.
pub fn acknowledged(events: &[Event]) -> BTreeMap<String, u64> {
    let mut by_patient = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind == Type::Ok) {
        *by_patient.entry(patient_of(&e.key)).or_insert(0) += 1;
    }
    by_patient
}

/// Reads every chain of `acknowledged`'s patients and checks it.
pub async fn check(client: &Client, acknowledged: &BTreeMap<String, u64>) -> Report {
    let mut report = Report {
        patients: acknowledged.len(),
        acknowledged: acknowledged.values().sum(),
        ..Report::default()
    };
    let deadline = Instant::now() + SETTLE;
    for (patient, &want) in acknowledged {
        loop {
            // Reading a log is itself audited: those events are not the workloads' accesses.
            let mut events = 0u64;
            let read = dossier_cli::audit_log::read_chain(client, patient, |_, event| {
                if event.action != AuditAction::AccessLog as i32 {
                    events += 1;
                }
            })
            .await;
            match read {
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    report.unreadable.push((patient.clone(), e.to_string()));
                    break;
                }
                Ok(chain) if chain.broken.is_some() => {
                    let broken = chain.broken.map(|b| b.to_string()).unwrap_or_default();
                    report.broken.push((patient.clone(), broken));
                    break;
                }
                Ok(_) if events < want && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(_) => {
                    report.events += events;
                    if events < want {
                        report.short.push((patient.clone(), events, want));
                    }
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
        "audit: {}: {} patients, {} acknowledged operations, {} events; broken chains {:?}, short chains {:?}, unreadable {:?}",
        if report.valid { "valid" } else { "INVALID" },
        report.patients,
        report.acknowledged,
        report.events,
        report.broken.iter().take(5).collect::<Vec<_>>(),
        report.short.iter().take(5).collect::<Vec<_>>(),
        report.unreadable.iter().take(5).collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::history::F;

    fn event(kind: Type, key: &str) -> Event {
        Event {
            process: 0,
            kind,
            f: F::Read,
            key: key.to_owned(),
            value: Value::Null,
            time: 0,
        }
    }

    /// Only acknowledged operations count, by the patient of their key.
    #[test]
    fn acknowledged_operations_are_counted_by_patient() {
        let events = [
            event(Type::Invoke, "r/1.0"),
            event(Type::Ok, "r/1.0"),
            event(Type::Invoke, "r/1.0"),
            event(Type::Info, "r/1.0"),
            event(Type::Invoke, "s/2"),
            event(Type::Fail, "s/2"),
            event(Type::Ok, "s/3"),
            event(Type::Ok, "s/3"),
        ];
        let counted = acknowledged(&events);
        assert_eq!(
            counted.into_iter().collect::<Vec<_>>(),
            vec![("jepsen-r-1.0".to_owned(), 1), ("jepsen-s-3".to_owned(), 2)]
        );
    }
}
