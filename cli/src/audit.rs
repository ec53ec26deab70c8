//! `dossier audit` and `dossier patient access-log`: a patient's audit chain, listed and
//! verified (`dossier_cli::audit_log`).

use anyhow::{Result, bail};
use clap::Subcommand;
use dossier_api::v1::{AuditAction, AuditEvent, AuditGround, ResourceType};
use dossier_cli::audit_log::{self, ChainReport};

use crate::Cli;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List the cluster's break-the-glass accesses for review, oldest first (auditors): who,
    /// which patient, why, when. Asks the --seeds in turn for one holding the meta group.
    BreakGlass {
        /// From this time (FHIR date or dateTime, e.g. 2026-12-01 or 2026-12-01T08:00:00Z);
        /// default: 24 hours ago.
        #[arg(long)]
        since: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify patients' audit chains: every entry links to the one before (SHA-256), none is
    /// missing, and the chain ends at its head. Exits with 1 when a chain is broken.
    Verify {
        /// Patient ids.
        #[arg(required = true)]
        patients: Vec<String>,
    },
}

pub async fn run(cli: &Cli, command: &AuditCommand) -> Result<()> {
    if let AuditCommand::BreakGlass { since, json } = command {
        return break_glass(cli, since.as_deref(), *json).await;
    }
    let client = cli.client().await?;
    match command {
        AuditCommand::BreakGlass { .. } => unreachable!("handled above"),
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
    // A read's event moved to the chain twice is shown once.
    let report = audit_log::read_accesses(&client, patient, |seq, e| {
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
    short(
        AuditAction::try_from(a).map(|a| a.as_str_name()).ok(),
        "AUDIT_ACTION_",
        a,
    )
}

fn ground(g: i32) -> String {
    short(
        AuditGround::try_from(g).map(|g| g.as_str_name()).ok(),
        "AUDIT_GROUND_",
        g,
    )
}

/// A proto enum value's name without its prefix, lower case; the number when unknown.
fn short(name: Option<&str>, prefix: &str, raw: i32) -> String {
    name.map_or_else(
        || raw.to_string(),
        |n| n.trim_start_matches(prefix).to_lowercase(),
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

/// Prints the break-the-glass accesses since `since` (default: a day ago), page by page.
async fn break_glass(cli: &Cli, since: Option<&str>, json: bool) -> Result<()> {
    let mut since_micros = match since {
        Some(s) => {
            dossier_fhir::parse_date_time(s)
                .ok_or_else(|| anyhow::anyhow!("--since {s:?} is not a FHIR date or dateTime"))?
                .unix_micros
        }
        None => dossier_records::now_micros() as i64 - 24 * 3_600_000_000,
    };
    if !json {
        println!(
            "{:<32}  {:<16}  {:<20}  {:<18}  {:>4}  REASON",
            "TIME", "WHO", "PATIENT", "CALL", "NODE"
        );
    }
    let timeout = std::time::Duration::from_millis(cli.timeout_ms);
    let mut total = 0usize;
    loop {
        let page = list_page(cli, since_micros, timeout).await?;
        for a in &page.accesses {
            total += 1;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "time": dossier_fhir::format_instant(a.time_micros),
                        "actor": a.actor,
                        "actor_identifiers": a.actor_identifiers,
                        "via": a.via,
                        "patient": a.patient_id,
                        "call": a.call,
                        "node": a.node_id,
                        "reason": a.reason,
                    })
                );
            } else {
                println!(
                    "{:<32}  {:<16}  {:<20}  {:<18}  {:>4}  {}",
                    dossier_fhir::format_instant(a.time_micros),
                    a.actor,
                    a.patient_id,
                    a.call,
                    a.node_id,
                    a.reason
                );
            }
        }
        match (page.more, page.accesses.last()) {
            (true, Some(last)) => since_micros = last.time_micros + 1,
            _ => break,
        }
    }
    eprintln!("{total} break-the-glass accesses");
    Ok(())
}

/// One page of the list, from the first seed that holds the meta group.
async fn list_page(
    cli: &Cli,
    since_micros: i64,
    timeout: std::time::Duration,
) -> Result<dossier_api::v1::ListBreakGlassResponse> {
    let mut last = String::from("no seed");
    for addr in &cli.seeds {
        let mut admin = dossier_cli::ops::admin_client(addr, timeout)?;
        let request = dossier_api::v1::ListBreakGlassRequest {
            since_micros,
            limit: 0,
        };
        match admin.list_break_glass(request).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) =>
            {
                bail!("{}", s.message())
            }
            Err(s) => last = format!("{addr}: {}", s.message()),
        }
    }
    bail!("no seed answered with the break-the-glass list (last: {last})")
}
