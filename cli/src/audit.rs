//! `dossier audit` and `dossier patient access-log`: a patient's audit chain, listed and
//! verified (`dossier_cli::audit_log`).

use anyhow::{Result, bail};
use clap::Subcommand;
use dossier_api::v1::{AuditAction, AuditEvent, AuditGround, ResourceType};
use dossier_cli::audit_log::{self, ChainReport};

use crate::Cli;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify patients' audit chains: every entry links to the one before (SHA-256), none is
    /// missing, and the chain ends at its head. Exits with 1 when a chain is broken.
    Verify {
        /// Patient ids.
        #[arg(required = true)]
        patients: Vec<String>,
    },
}

pub async fn run(cli: &Cli, command: &AuditCommand) -> Result<()> {
    let client = cli.client().await?;
    match command {
        AuditCommand::Verify { patients } => {
            let mut broken = 0;
            for patient in patients {
                let report = audit_log::read_chain(&client, patient, |_, _| {}).await?;
                println!("{patient}: {}", summary(&report));
                broken += usize::from(report.broken.is_some());
            }
            if broken > 0 {
                bail!("{broken} of {} chains are broken", patients.len());
            }
        }
    }
    Ok(())
}

/// How `dossier patient access-log` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Table,
    /// One JSON object per line.
    Json,
    /// A FHIR R4 Bundle of AuditEvent resources.
    Fhir,
}

/// Prints the patient's access log, oldest first, verifying it as it goes.
pub async fn print_log(cli: &Cli, patient: &str, format: LogFormat) -> Result<()> {
    let client = cli.client().await?;
    let mut fhir_entries = Vec::new();
    if format == LogFormat::Table {
        println!(
            "{:>6}  {:<32}  {:<20}  {:<9}  {:<15}  {:<11}  WHAT",
            "SEQ", "TIME", "WHO", "ROLE", "ACTION", "GROUND"
        );
    }
    let report = audit_log::read_chain(&client, patient, |seq, e| {
        if format == LogFormat::Json {
            println!("{}", event_json(seq, e));
        } else if format == LogFormat::Fhir {
            let resource = dossier_fhir::audit_event_to_fhir(patient, seq, e);
            fhir_entries.push(serde_json::json!({
                "fullUrl": format!("AuditEvent/{}", resource["id"].as_str().unwrap_or_default()),
                "resource": resource,
            }));
        } else {
            println!(
                "{seq:>6}  {:<32}  {:<20}  {:<9}  {:<15}  {:<11}  {}",
                dossier_fhir::format_instant(e.time_micros),
                e.actor,
                e.role,
                action(e.action),
                ground(e.ground),
                what(e)
            );
        }
    })
    .await?;
    if format == LogFormat::Fhir {
        let bundle = serde_json::json!({
            "resourceType": "Bundle",
            "type": "collection",
            "total": fhir_entries.len(),
            "entry": fhir_entries,
        });
        println!("{bundle}");
    }
    eprintln!("{}", summary(&report));
    if report.broken.is_some() {
        bail!("the audit chain of {patient} is broken");
    }
    Ok(())
}

fn summary(report: &ChainReport) -> String {
    match &report.broken {
        None => format!(
            "chain verified: {} entries, head {} {}",
            report.entries,
            report.head_seq,
            if report.head_hash.is_empty() {
                "(empty)"
            } else {
                &report.head_hash
            }
        ),
        Some(b) => format!("CHAIN BROKEN after {} good entries: {b}", report.entries),
    }
}

fn action(a: i32) -> String {
    AuditAction::try_from(a).map_or_else(
        |_| a.to_string(),
        |a| {
            a.as_str_name()
                .trim_start_matches("AUDIT_ACTION_")
                .to_lowercase()
        },
    )
}

fn ground(g: i32) -> String {
    AuditGround::try_from(g).map_or_else(
        |_| g.to_string(),
        |g| {
            g.as_str_name()
                .trim_start_matches("AUDIT_GROUND_")
                .to_lowercase()
        },
    )
}

fn type_name(t: i32) -> &'static str {
    ResourceType::try_from(t)
        .ok()
        .and_then(dossier_records::type_name)
        .unwrap_or("?")
}

/// Records listed by name in a table row; the rest are counted.
const RECORDS_SHOWN: usize = 3;

/// The records or kinds an event names, and a break-the-glass reason.
fn what(e: &AuditEvent) -> String {
    let mut parts: Vec<String> = e
        .records
        .iter()
        .take(RECORDS_SHOWN)
        .map(|r| format!("{}/{}", type_name(r.r#type), r.id))
        .collect();
    if e.records.len() > RECORDS_SHOWN {
        parts.push(format!("(+{} more)", e.records.len() - RECORDS_SHOWN));
    }
    parts.extend(
        e.kv_keys
            .iter()
            .map(|k| format!("key {:?}", String::from_utf8_lossy(k))),
    );
    parts.extend(e.types.iter().map(|t| format!("{}/*", type_name(*t))));
    if !e.reason.is_empty() {
        parts.push(format!("reason: {:?}", e.reason));
    }
    parts.join(" ")
}

fn event_json(seq: u64, e: &AuditEvent) -> serde_json::Value {
    serde_json::json!({
        "seq": seq,
        "time": dossier_fhir::format_instant(e.time_micros),
        "actor": e.actor,
        "role": e.role,
        "via": e.via,
        "actor_identifiers": e.actor_identifiers.iter().map(|x| format!("{}|{}", x.system, x.value)).collect::<Vec<_>>(),
        "action": action(e.action),
        "ground": ground(e.ground),
        "reason": e.reason,
        "records": e.records.iter().map(|r| format!("{}/{}", type_name(r.r#type), r.id)).collect::<Vec<_>>(),
        "types": e.types.iter().map(|t| type_name(*t)).collect::<Vec<_>>(),
        "kv_keys": e.kv_keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>(),
        "node": e.node_id,
    })
}
