//! `dossier patient`: clinical records of patients, in FHIR R4 JSON at the edges.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use dossier_api::v1::ResourceType;
use dossier_cli::records::{refusal, write_bundle, write_quarantine};
use dossier_client::{SearchQuery, WriteOptions, is_applied};
use dossier_fhir::{self as fhir, ImportOptions};
use dossier_records::type_from_name;

use crate::Cli;

/// Bundles larger than this are refused before they are read.
const BUNDLE_BYTES_MAX: u64 = 256 << 20;

#[derive(Debug, Subcommand)]
pub enum PatientCommand {
    /// Create a patient from a FHIR R4 Patient resource (JSON file, or - for stdin); its `id`
    /// becomes the patient id.
    Create { file: PathBuf },
    /// Who accessed the patient's record: its audit chain, oldest first, verified as it is
    /// read (for the patient, auditors and services).
    AccessLog {
        patient: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// A FHIR R4 Bundle (collection) of AuditEvent resources instead of a table.
        #[arg(long, conflicts_with = "json")]
        fhir: bool,
    },
    /// Print a patient's current record, or one of its records, as FHIR R4 JSON.
    Get {
        patient: String,
        /// FHIR type of the record (Observation, Encounter, …); default: the Patient.
        #[arg(requires = "id")]
        r#type: Option<String>,
        id: Option<String>,
        /// A version instead of the current one.
        #[arg(long)]
        version: Option<u64>,
    },
    /// List the versions of a record, newest first.
    History {
        patient: String,
        r#type: String,
        id: String,
    },
    /// Print every current record of a patient as a FHIR R4 searchset Bundle, streamed.
    Everything {
        patient: String,
        /// Only records changed after this stamp (unix microseconds, from a previous export).
        #[arg(long, default_value_t = 0)]
        since: i64,
        /// Only these FHIR types, comma separated.
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// Include records marked entered-in-error.
        #[arg(long)]
        include_entered_in_error: bool,
    },
    /// Import FHIR R4 Bundles (one patient each): the patient, then its records in transactions;
    /// re-running an import replays instead of duplicating.
    Import {
        files: Vec<PathBuf>,
        /// Skip entries of types Dossier does not model (counted in the summary); without it a
        /// bundle holding such entries is refused. Billing (Claim, ExplanationOfBenefit) is
        /// always skipped. Elements Dossier does not model are kept with their records.
        #[arg(long)]
        skip_unmapped: bool,
        /// Name of the source, kept in every record's meta.source.
        #[arg(long, default_value = "import")]
        source: String,
        /// What to do with a record that fails validation: `quarantine` sets it aside in the
        /// patient's quarantine (see `dossier patient quarantine`) and imports the rest;
        /// `refuse` refuses the whole bundle.
        #[arg(long, value_enum, default_value_t = OnInvalidArg::Quarantine)]
        on_invalid: OnInvalidArg,
    },
    /// Search a patient's records of one kind, newest clinical date first: by code, clinical
    /// date range and status, from per-patient indexes. Prints a FHIR searchset Bundle.
    ///
    /// `dossier patient search P1 Observation --code 'http://loinc.org|2339-0' --since 2024-01-01`
    /// or, in FHIR form, `dossier patient search --fhir 'Observation?patient=P1&code=…&date=ge2024-01-01'`.
    Search {
        /// The patient (omit with --fhir).
        #[arg(required_unless_present = "fhir")]
        patient: Option<String>,
        /// FHIR type: Observation, Condition, Procedure, Immunization, … (omit with --fhir).
        #[arg(required_unless_present = "fhir")]
        r#type: Option<String>,
        /// `system|code` of the record's main concept.
        #[arg(long)]
        code: Option<String>,
        /// Clinical date at or after this FHIR date or dateTime (e.g. 2024-01-01).
        #[arg(long)]
        since: Option<String>,
        /// Clinical date before this FHIR date or dateTime.
        #[arg(long)]
        until: Option<String>,
        /// Only these statuses (FHIR codes, comma separated), e.g. final,amended.
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
        /// At most this many records in all (pages are followed).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// A FHIR search string: `<Type>?patient=<id>&code=<system>|<code>&date=ge<date>&status=…`.
        #[arg(long, conflicts_with_all = ["patient", "type", "code", "since", "until", "status"])]
        fhir: Option<String>,
    },
    /// A patient's quarantine: records an import set aside because they failed validation, with
    /// their problems. Without options, lists them; fix one and write it with --resubmit.
    Quarantine {
        patient: String,
        /// Print one quarantined record's source JSON (to fix it).
        #[arg(long, conflicts_with_all = ["resubmit", "release"])]
        show: Option<String>,
        /// Write the fixed resource in --file as a record and take it out of the quarantine.
        #[arg(long, requires = "file", conflicts_with = "release")]
        resubmit: Option<String>,
        /// The fixed FHIR resource (JSON) for --resubmit.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Take a record out of the quarantine without writing it (it is dropped).
        #[arg(long)]
        release: Option<String>,
    },
    /// Bulk export: one NDJSON file per FHIR type in DIR, for the given patients.
    Export {
        /// Patient ids, comma separated.
        #[arg(long, value_delimiter = ',')]
        patients: Vec<String>,
        /// A file of patient ids, one per line.
        #[arg(long)]
        patients_file: Option<PathBuf>,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
    /// Which patient holds an identifier of an indexed system (the master patient index).
    Lookup { system: String, value: String },
    /// Write synthetic patients as FHIR R4 collection Bundles (one file each) in DIR: the same
    /// seed always gives the same patients. Import them with `dossier patient import`.
    Generate {
        #[arg(long, default_value_t = 100)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `--on-invalid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnInvalidArg {
    Refuse,
    Quarantine,
}

/// A FHIR date or dateTime as unix micros (its start).
fn micros_of(flag: &str, value: &str) -> Result<i64> {
    fhir::parse_date_time(value)
        .map(|d| d.unix_micros)
        .with_context(|| {
            format!("--{flag} {value:?} is not a FHIR date or dateTime (e.g. 2024-01-31)")
        })
}

fn record_type(name: &str) -> Result<ResourceType> {
    match name {
        "CareTeam" => Ok(ResourceType::CareRelationship),
        n => type_from_name(n).with_context(|| {
            let names: Vec<&str> = dossier_records::RESOURCE_TYPES
                .iter()
                .filter_map(|t| dossier_records::type_name(*t))
                .collect();
            format!(
                "{n:?} is not a record type ({}, CareTeam)",
                names.join(", ")
            )
        }),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        let len = std::fs::metadata(path)
            .with_context(|| format!("read {}", path.display()))?
            .len();
        if len > BUNDLE_BYTES_MAX {
            bail!(
                "{} is {len} bytes, above the limit of {BUNDLE_BYTES_MAX}",
                path.display()
            );
        }
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

pub async fn run(cli: &Cli, command: &PatientCommand) -> Result<()> {
    if let PatientCommand::Generate { count, seed, out } = command {
        return generate(*count, *seed, out);
    }
    if let PatientCommand::AccessLog {
        patient,
        json,
        fhir,
    } = command
    {
        let format = match (json, fhir) {
            (true, _) => crate::audit::LogFormat::Json,
            (_, true) => crate::audit::LogFormat::Fhir,
            _ => crate::audit::LogFormat::Table,
        };
        return crate::audit::print_log(cli, patient, format).await;
    }
    let client = cli.client().await?;
    match command {
        PatientCommand::Generate { .. } => unreachable!("handled above"),
        PatientCommand::AccessLog { .. } => unreachable!("handled above"),
        PatientCommand::Create { file } => {
            let resource = read_json(file)?;
            let bundle = serde_json::json!({
                "resourceType": "Bundle", "type": "collection",
                "entry": [{"fullUrl": format!("Patient/{}", resource.get("id").and_then(|v| v.as_str()).unwrap_or_default()), "resource": resource}]
            });
            let imported = fhir::import_bundle(&bundle, &ImportOptions::default())
                .map_err(|p| anyhow::anyhow!(problems_text(&p)))?;
            let w = client
                .create_patient(imported.patient.clone(), &WriteOptions::default())
                .await?;
            if !is_applied(&w) {
                bail!("{}", refusal(&w));
            }
            println!(
                "created patient {}",
                imported.patient.meta.map(|m| m.id).unwrap_or_default()
            );
        }
        PatientCommand::Get {
            patient,
            r#type,
            id,
            version,
        } => {
            let t = match r#type {
                Some(t) => record_type(t)?,
                None => ResourceType::Patient,
            };
            let id = id.clone().unwrap_or_else(|| patient.clone());
            let record = match version {
                Some(v) => client.read_version(patient, t, &id, *v).await?,
                None => client.read_record(patient, t, &id).await?,
            };
            match record {
                Some(r) => println!("{}", serde_json::to_string_pretty(&fhir::to_fhir(&r))?),
                None => bail!("{patient}: no {} {id}", fhir::fhir_type(t)),
            }
        }
        PatientCommand::History {
            patient,
            r#type,
            id,
        } => {
            let t = record_type(r#type)?;
            let mut before = 0;
            println!("version  last updated (UTC)              status            author");
            loop {
                let Some(page) = client.history(patient, t, id, before, 0).await? else {
                    bail!("{patient}: no {} {id}", fhir::fhir_type(t));
                };
                for v in &page.versions {
                    let m = v.meta.clone().unwrap_or_default();
                    let status = dossier_api::v1::RecordStatus::try_from(m.status)
                        .map(|s| format!("{s:?}"))
                        .unwrap_or_default();
                    let author = m
                        .author
                        .map(|a| a.display)
                        .filter(|d| !d.is_empty())
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<8} {:<33} {status:<17} {author}{}",
                        m.version,
                        fhir::format_date_time(&dossier_api::v1::DateTime {
                            unix_micros: m.last_updated_micros,
                            precision: dossier_api::v1::DatePrecision::Time as i32,
                            utc_offset_minutes: 0,
                        }),
                        if m.status_reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", m.status_reason)
                        }
                    );
                    before = m.version;
                }
                if !page.more {
                    break;
                }
            }
        }
        PatientCommand::Everything {
            patient,
            since,
            types,
            include_entered_in_error,
        } => {
            let types = types
                .iter()
                .map(|t| record_type(t))
                .collect::<Result<Vec<_>>>()?;
            // Streamed: the bundle is written entry by entry as messages arrive, its opening
            // with the first (nothing is printed for a refused call).
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            const OPENING: &str = "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"entry\":[";
            let mut first = true;
            let mut count = 0usize;
            let as_of = client
                .everything(patient, *since, &types, *include_entered_in_error, |records| {
                    for r in records {
                        let resource = fhir::to_fhir(&r);
                        let t = resource["resourceType"].as_str().unwrap_or_default().to_owned();
                        let id = resource["id"].as_str().unwrap_or_default().to_owned();
                        let entry = serde_json::json!({"fullUrl": format!("{t}/{id}"), "resource": resource, "search": {"mode": "match"}});
                        let sep = if first { OPENING } else { "," };
                        first = false;
                        count += 1;
                        write!(out, "{sep}{entry}").map_err(|e| dossier_client::ClientError::Server(e.to_string()))?;
                    }
                    Ok(())
                })
                .await?;
            if first {
                write!(out, "{OPENING}")?;
            }
            writeln!(out, "],\"total\":{count}}}")?;
            out.flush()?;
            eprintln!("{count} records; pass --since {as_of} to get only later changes");
        }
        PatientCommand::Import {
            files,
            skip_unmapped,
            source,
            on_invalid,
        } => {
            if files.is_empty() {
                bail!("name at least one bundle file");
            }
            let started = Instant::now();
            let (mut patients, mut records, mut failed) = (0usize, 0usize, 0usize);
            let mut quarantined_total = 0usize;
            let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
            for (n, file) in files.iter().enumerate() {
                let result = async {
                    let bundle = read_json(file)?;
                    let imported = fhir::import_bundle(
                        &bundle,
                        &ImportOptions {
                            skip_unmapped: *skip_unmapped,
                            source: source.clone(),
                            on_invalid: match on_invalid {
                                OnInvalidArg::Refuse => fhir::OnInvalid::Refuse,
                                OnInvalidArg::Quarantine => fhir::OnInvalid::Quarantine,
                            },
                            ..ImportOptions::default()
                        },
                    )
                    .map_err(|p| anyhow::anyhow!(problems_text(&p)))?;
                    let written = write_bundle(&client, &imported, 128).await?;
                    let quarantined = write_quarantine(&client, &imported, 64).await?;
                    Ok::<_, anyhow::Error>((imported, written, quarantined))
                }
                .await;
                match result {
                    Ok((imported, written, quarantined)) => {
                        patients += 1;
                        records += written;
                        quarantined_total += quarantined;
                        for (t, c) in &imported.skipped_types {
                            *skipped.entry(t.clone()).or_default() += c;
                        }
                        let id = imported
                            .patient
                            .meta
                            .as_ref()
                            .map(|m| m.id.as_str())
                            .unwrap_or_default();
                        eprintln!(
                            "[{}/{}] {}: patient {id}, {written} records{}",
                            n + 1,
                            files.len(),
                            file.display(),
                            if quarantined > 0 {
                                format!(
                                    ", {quarantined} quarantined (dossier patient quarantine {id})"
                                )
                            } else {
                                String::new()
                            }
                        );
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!(
                            "[{}/{}] {}: NOT imported: {e:#}",
                            n + 1,
                            files.len(),
                            file.display()
                        );
                    }
                }
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "imported {patients} patients and {records} records in {secs:.1} s ({:.1} patients/s, {:.0} records/s); {quarantined_total} records quarantined; {failed} bundles refused",
                patients as f64 / secs.max(1e-9),
                records as f64 / secs.max(1e-9)
            );
            if !skipped.is_empty() {
                let list: Vec<String> = skipped.iter().map(|(t, c)| format!("{t} {c}")).collect();
                eprintln!(
                    "skipped entries of unmodelled types (billing is never imported): {}",
                    list.join(", ")
                );
            }
            if failed > 0 {
                bail!("{failed} of {} bundles were not imported", files.len());
            }
        }
        PatientCommand::Search {
            patient,
            r#type,
            code,
            since,
            until,
            status,
            limit,
            fhir: fhir_query,
        } => {
            let (patient, query, mut left) = match fhir_query {
                Some(q) => {
                    let p = fhir::parse_search(q).map_err(|e| anyhow::anyhow!("--fhir: {e}"))?;
                    let query = SearchQuery {
                        rtype: Some(record_type(&p.fhir_type)?),
                        code: p.code,
                        since_micros: p.since_micros,
                        until_micros: p.until_micros,
                        statuses: p.statuses,
                        limit: 0,
                    };
                    (p.patient, query, p.count.map_or(*limit, |c| c as usize))
                }
                None => {
                    let query = SearchQuery {
                        rtype: Some(record_type(r#type.as_deref().unwrap_or_default())?),
                        code: code.clone().unwrap_or_default(),
                        since_micros: since
                            .as_deref()
                            .map(|v| micros_of("since", v))
                            .transpose()?,
                        until_micros: until
                            .as_deref()
                            .map(|v| micros_of("until", v))
                            .transpose()?,
                        statuses: status.clone(),
                        limit: 0,
                    };
                    (patient.clone().unwrap_or_default(), query, *limit)
                }
            };
            let mut found = Vec::new();
            let mut token = Vec::new();
            while left > 0 {
                // Pages of the server's size; the last one cut here.
                let page = client.search(&patient, &query, &token).await?;
                let take = page.resources.len().min(left);
                left -= take;
                found.extend(page.resources.into_iter().take(take));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&fhir::export_bundle(&found, "searchset"))?
            );
            eprintln!(
                "{} records{}",
                found.len(),
                if token.is_empty() {
                    ""
                } else {
                    " (more match: raise --limit)"
                }
            );
        }
        PatientCommand::Quarantine {
            patient,
            show,
            resubmit,
            file,
            release,
        } => {
            let mut all = Vec::new();
            let mut after = String::new();
            loop {
                let (page, more) = client.list_quarantine(patient, &after, 0).await?;
                if let Some(last) = page.last() {
                    after = last.id.clone();
                }
                all.extend(page);
                if !more {
                    break;
                }
            }
            let find = |id: &str| {
                all.iter()
                    .find(|q| q.id == id)
                    .with_context(|| format!("{patient}: no quarantined record {id}"))
            };
            if let Some(id) = show {
                let q = find(id)?;
                let value: serde_json::Value = serde_json::from_str(&q.source_json)
                    .context("the quarantined source is not JSON")?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else if let Some(id) = resubmit {
                let q = find(id)?;
                let path = file.as_ref().context("--resubmit needs --file")?;
                let fixed = read_json(path)?;
                let references = q.references.clone().into_iter().collect();
                let mut record = fhir::import_resource(
                    &fixed,
                    patient,
                    &references,
                    &ImportOptions {
                        source: q.source.clone(),
                        ..ImportOptions::default()
                    },
                )
                .map_err(|p| anyhow::anyhow!("still invalid:\n{}", problems_text(&p)))?;
                if let Some(m) = record.meta.as_mut() {
                    m.id = q.id.clone();
                    m.source = q.source.clone();
                }
                let w = client
                    .create_record(patient, record, &WriteOptions::default())
                    .await?;
                if !is_applied(&w) {
                    bail!("{patient}: the fixed record was refused: {}", refusal(&w));
                }
                client
                    .quarantine(
                        patient,
                        Vec::new(),
                        vec![q.id.clone()],
                        &WriteOptions::default(),
                    )
                    .await?;
                println!(
                    "{patient}: {} {} written and taken out of the quarantine",
                    q.fhir_type, q.id
                );
            } else if let Some(id) = release {
                find(id)?;
                client
                    .quarantine(
                        patient,
                        Vec::new(),
                        vec![id.clone()],
                        &WriteOptions::default(),
                    )
                    .await?;
                println!("{patient}: {id} taken out of the quarantine (not written)");
            } else {
                if all.is_empty() {
                    println!("{patient}: the quarantine is empty");
                }
                for q in &all {
                    println!("{} {} ({})", q.fhir_type, q.id, q.source);
                    for p in &q.problems {
                        println!("    {}: {}", p.path, p.message);
                    }
                }
            }
        }
        PatientCommand::Export {
            patients,
            patients_file,
            out,
        } => {
            let mut ids = patients.clone();
            if let Some(f) = patients_file {
                let text =
                    std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
                ids.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
            }
            if ids.is_empty() {
                bail!("name the patients: --patients or --patients-file");
            }
            std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
            let mut files: BTreeMap<String, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let started = Instant::now();
            for (n, patient) in ids.iter().enumerate() {
                let mut write_err = None;
                client
                    .everything(patient, 0, &[], false, |records| {
                        for r in records {
                            let resource = fhir::to_fhir(&r);
                            let t = resource["resourceType"]
                                .as_str()
                                .unwrap_or("Unknown")
                                .to_owned();
                            let file = match files.entry(t.clone()) {
                                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                                std::collections::btree_map::Entry::Vacant(e) => {
                                    let path = out.join(format!("{t}.ndjson"));
                                    let f = std::fs::File::create(&path).map_err(|e| {
                                        dossier_client::ClientError::Server(format!(
                                            "create {}: {e}",
                                            path.display()
                                        ))
                                    })?;
                                    e.insert(std::io::BufWriter::new(f))
                                }
                            };
                            if let Err(e) = writeln!(file, "{resource}") {
                                write_err = Some(e);
                            }
                            *counts.entry(t).or_default() += 1;
                        }
                        Ok(())
                    })
                    .await
                    .with_context(|| format!("export patient {patient}"))?;
                if let Some(e) = write_err {
                    bail!("write the export: {e}");
                }
                if (n + 1) % 100 == 0 || n + 1 == ids.len() {
                    eprintln!("exported {}/{} patients", n + 1, ids.len());
                }
            }
            for (_, mut f) in files {
                f.flush()?;
            }
            let list: Vec<String> = counts.iter().map(|(t, c)| format!("{t} {c}")).collect();
            eprintln!(
                "wrote {} in {:.1} s: {}",
                out.display(),
                started.elapsed().as_secs_f64(),
                list.join(", ")
            );
        }
        PatientCommand::Lookup { system, value } => {
            match client.lookup_identifier(system, value).await? {
                Some(p) => println!("{p}"),
                None => bail!("no patient holds {system}|{value}"),
            }
        }
    }
    Ok(())
}

fn generate(count: u64, seed: u64, out: &Path) -> Result<()> {
    use dossier_records::synth;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let started = Instant::now();
    let mut records = 0;
    for i in 0..count {
        let p = synth::patient(seed, i);
        records += p.records.len();
        let mut all = vec![p.patient.clone()];
        all.extend(p.records.iter().cloned());
        for r in &mut all {
            if let Some(m) = r.meta.as_mut() {
                m.patient_id = p.id().to_owned();
            }
        }
        let bundle = fhir::export_bundle(&all, "collection");
        let path = out.join(format!("{}.json", p.id()));
        std::fs::write(&path, serde_json::to_vec(&bundle)?)
            .with_context(|| format!("write {}", path.display()))?;
        if (i + 1) % 100 == 0 || i + 1 == count {
            eprintln!("generated {}/{count} patients", i + 1);
        }
    }
    eprintln!(
        "{count} patients, {records} records in {} ({:.1} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn problems_text(problems: &[fhir::Problem]) -> String {
    let mut s = format!("{} problem(s):", problems.len());
    for p in problems.iter().take(20) {
        s.push_str(&format!("\n  {p}"));
    }
    if problems.len() > 20 {
        s.push_str(&format!("\n  … and {} more", problems.len() - 20));
    }
    s
}
