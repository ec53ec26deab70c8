//! The record layer at scale on a local 3-node cluster: the import rate of synthetic patients with
//! many concurrent importers, then two big patients (about 1,000 and 20,000 records: a synthetic
//! patient with observations of 20 LOINC codes over 30 years added in transactions), and
//! closed-loop latency of Everything, of a search by code and date within the patient, and of a
//! search by type only, on each of them.
//!
//! What it shows: Everything returns the whole patient, so its cost grows with the patient; a
//! search reads its index from the newest entry and stops at the page (or at the date bound), so
//! its cost follows the page, not the patient.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_api::v1::{
    CodeableConcept, Coding, DatePrecision, DateTime, Resource, ResourceType, TransactionEntry,
    observation, observation_value, resource, transaction_entry,
};
use dossier_client::{Client, ClientError, SearchQuery, WriteOptions, is_applied};
use dossier_fhir::ImportedBundle;
use dossier_records::synth::{self, Rng};
use dossier_records::{Limits, SYSTEM_LOINC, index, validate_new_record};
use hdrhistogram::Histogram;
use prost::Message as _;

use crate::stats::{Json, Latency, per_second};

/// The synthetic generation of the imported patients.
const IMPORT_SEED: u64 = 1;
/// The generation the big patients start from (not the imported patients' one, so that their
/// identifiers never meet).
const BIG_SEED: u64 = 2;
/// Records per transaction when the big patients are filled (the CLI's import chunk).
const CHUNK: usize = dossier_cli::records::TRANSACTION_ENTRIES;
/// The code searched for: heart rate, one of the most frequent.
const SEARCH_CODE: &str = "8867-4";
/// The search's date bound: records of the last five years.
const SEARCH_YEARS: i64 = 5;
/// The spread of the added observations' clinical dates, back from now.
const SPREAD_YEARS: i64 = 30;
/// The page size of both searches.
const PAGE: u32 = 20;
/// The longest a measured operation may take before it counts as failed (an Everything stream
/// is not bounded by the client's deadline once it is open).
const OP_TIMEOUT: Duration = Duration::from_secs(30);
const YEAR_MICROS: i64 = 365 * 86_400_000_000 + 6 * 3_600_000_000;

/// An observation code of the big patients.
#[derive(Debug, Clone, Copy)]
struct Code {
    loinc: &'static str,
    display: &'static str,
    /// `vital-signs` or `laboratory`.
    category: &'static str,
    /// UCUM.
    unit: &'static str,
    low: f64,
    high: f64,
    decimals: u32,
    /// Relative frequency.
    weight: u32,
}

/// `Code` in one line.
#[allow(clippy::too_many_arguments)]
const fn code(
    loinc: &'static str,
    display: &'static str,
    category: &'static str,
    unit: &'static str,
    low: f64,
    high: f64,
    decimals: u32,
    weight: u32,
) -> Code {
    Code {
        loinc,
        display,
        category,
        unit,
        low,
        high,
        decimals,
        weight,
    }
}

const VITAL: &str = "vital-signs";
const LAB: &str = "laboratory";

/// Observation codes of the big patients with their relative frequency: vital signs at most
/// visits, common labs less often, the rest now and then.
#[rustfmt::skip]
const CODES: [Code; 20] = [
    code("8867-4", "Heart rate", VITAL, "/min", 50.0, 110.0, 0, 8),
    code("8480-6", "Systolic blood pressure", VITAL, "mm[Hg]", 100.0, 175.0, 0, 8),
    code("8462-4", "Diastolic blood pressure", VITAL, "mm[Hg]", 55.0, 105.0, 0, 8),
    code("29463-7", "Body weight", VITAL, "kg", 50.0, 120.0, 1, 7),
    code("8310-5", "Body temperature", VITAL, "Cel", 35.8, 39.0, 1, 6),
    code("9279-1", "Respiratory rate", VITAL, "/min", 10.0, 26.0, 0, 5),
    code("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", VITAL, "%", 88.0, 100.0, 0, 5),
    code("8302-2", "Body height", VITAL, "cm", 150.0, 195.0, 1, 2),
    code("39156-5", "Body mass index (BMI) [Ratio]", VITAL, "kg/m2", 18.0, 40.0, 1, 2),
    code("2339-0", "Glucose [Mass/volume] in Blood", LAB, "mg/dL", 70.0, 200.0, 0, 5),
    code("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", LAB, "mg/dL", 0.5, 2.0, 2, 4),
    code("2951-2", "Sodium [Moles/volume] in Serum or Plasma", LAB, "mmol/L", 132.0, 148.0, 0, 4),
    code("2823-3", "Potassium [Moles/volume] in Serum or Plasma", LAB, "mmol/L", 3.2, 5.5, 1, 4),
    code("718-7", "Hemoglobin [Mass/volume] in Blood", LAB, "g/dL", 10.0, 17.5, 1, 4),
    code("6690-2", "Leukocytes [#/volume] in Blood by Automated count", LAB, "10*3/uL", 3.5, 13.0, 1, 4),
    code("777-3", "Platelets [#/volume] in Blood by Automated count", LAB, "10*3/uL", 140.0, 420.0, 0, 3),
    code("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", LAB, "%", 4.5, 9.5, 1, 2),
    code("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", LAB, "mg/dL", 140.0, 290.0, 0, 2),
    code("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", LAB, "mg/dL", 30.0, 90.0, 0, 2),
    code("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", LAB, "U/L", 7.0, 70.0, 0, 2),
];

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleSpec {
    /// Synthetic patients imported to measure the import rate.
    pub patients: u64,
    pub importers: usize,
    /// Records of each big patient (one patient per value).
    pub big: Vec<u64>,
    /// Closed-loop clients of each latency measurement.
    pub clients: usize,
    pub seconds: u64,
    pub shards: u32,
    pub base_port: u16,
}

/// The kind of a failed call, for the error counts.
fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::InvalidArgument { field, .. } => format!("invalid-{field}"),
        other => other.kind().into(),
    }
}

/// Failures by kind, with the first message of each kind (printed once on stderr).
#[derive(Debug, Default)]
struct Failures(std::sync::Mutex<BTreeMap<String, (u64, String)>>);

impl Failures {
    fn add(&self, kind: String, message: String) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(kind).or_insert((0, message));
        e.0 += 1;
    }

    fn take(&self) -> BTreeMap<String, (u64, String)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn ms(latency: Option<Latency>, f: fn(&Latency) -> f64) -> String {
    latency.map_or("-".to_owned(), |l| format!("{:.2}", f(&l) / 1000.0))
}

/// CPU time of the machine against this run's (the nodes' and this process'), to tell how much
/// of the CPU other processes took while a measurement ran (the machine may be shared).
#[derive(Debug)]
struct CpuWatch {
    pids: Vec<u32>,
    started: Instant,
    at_start: Option<(u64, u64)>,
}

/// Busy jiffies of the machine and of `pids` plus this process, from `/proc`.
fn jiffies(pids: &[u32]) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy = cpu
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    let process = |path: String| -> Option<u64> {
        let s = std::fs::read_to_string(path).ok()?;
        let fields: Vec<&str> = s.get(s.rfind(')')? + 1..)?.split_whitespace().collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let ours = pids
        .iter()
        .map(|p| format!("/proc/{p}/stat"))
        .chain(std::iter::once("/proc/self/stat".to_owned()))
        .filter_map(process)
        .sum();
    Some((busy, ours))
}

impl CpuWatch {
    fn start(pids: &[u32]) -> Self {
        CpuWatch {
            pids: pids.to_vec(),
            started: Instant::now(),
            at_start: jiffies(pids),
        }
    }

    /// The share of the machine's CPU (0 to 1) that other processes used since the start.
    fn others_share(&self) -> Option<f64> {
        let (busy0, ours0) = self.at_start?;
        let (busy1, ours1) = jiffies(&self.pids)?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // /proc counts in USER_HZ ticks, 100 a second on Linux.
        let capacity = self.started.elapsed().as_secs_f64() * cpus * 100.0;
        let others = busy1
            .saturating_sub(busy0)
            .saturating_sub(ours1.saturating_sub(ours0));
        Some((others as f64 / capacity.max(1.0)).min(1.0))
    }
}

/// `others_share` as a JSON field and a note for the summary.
fn note_others(json: &mut Json, watch: &CpuWatch) -> String {
    match watch.others_share() {
        Some(share) => {
            json.num("other_processes_cpu_share", share);
            format!("{:.0} %", share * 100.0)
        }
        None => "?".to_owned(),
    }
}

/// Imports synthetic patients 0..patients of [`IMPORT_SEED`] with `importers` concurrent
/// importers (CreatePatient, then transactions of up to 128 records, as `dossier patient
/// import` writes); a failed patient is counted and the import goes on.
async fn import(
    client: &Client,
    patients: u64,
    importers: usize,
    pids: &[u32],
) -> Result<(String, String)> {
    let watch = CpuWatch::start(pids);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let records = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Failures::default());
    let tasks: Vec<_> = (0..importers.max(1))
        .map(|_| {
            let (client, next, records, failures) = (
                client.clone(),
                Arc::clone(&next),
                Arc::clone(&records),
                Arc::clone(&failures),
            );
            tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
                    .expect("valid histogram bounds");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= patients {
                        return latencies;
                    }
                    let p = synth::patient(IMPORT_SEED, i);
                    let bundle = ImportedBundle {
                        patient: p.patient,
                        records: p.records,
                        ..ImportedBundle::default()
                    };
                    let t = Instant::now();
                    match dossier_cli::records::write_bundle(&client, &bundle, CHUNK).await {
                        Ok(n) => {
                            records.fetch_add(n as u64 + 1, Ordering::Relaxed);
                            let us = (t.elapsed().as_micros() as u64).clamp(1, 600_000_000);
                            let _ = latencies.record(us);
                        }
                        Err(e) => {
                            // Which write of the patient failed: its creation or a transaction
                            // of its records.
                            let message = format!("{e:#}");
                            let kind = if message.contains("a transaction of") {
                                "transaction"
                            } else {
                                "patient"
                            };
                            failures.add(kind.into(), message);
                        }
                    }
                    if (i + 1) % 500 == 0 {
                        eprintln!("  imported {} patients", i + 1);
                    }
                }
            })
        })
        .collect();
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for t in tasks {
        latencies.add(t.await.context("import task")?)?;
    }
    let elapsed = started.elapsed();
    let records = records.load(Ordering::Relaxed);
    let failures = failures.take();
    let errors: u64 = failures.values().map(|(n, _)| n).sum();
    for (kind, (n, first)) in &failures {
        eprintln!("  import: {n} patients failed at a {kind} write; the first: {first}");
    }
    let imported = latencies.len();
    let latency = Latency::of_histogram(&latencies);
    let mut json = Json::new("records-scale-import");
    json.num("patients", imported as f64)
        .num("records", records as f64)
        .num("importers", importers as f64)
        .num("seconds", elapsed.as_secs_f64())
        .num("patients_per_s", per_second(imported, elapsed))
        .num("records_per_s", per_second(records, elapsed))
        .num("errors", errors as f64);
    for (kind, (n, _)) in &failures {
        json.num(&format!("errors_{kind}"), *n as f64);
    }
    json.latency("patient_latency", latency);
    let others = note_others(&mut json, &watch);
    let row = format!(
        "import: {imported} patients ({records} records, the Patient counted) by {importers} importers in {:.1} s: {:.0} patients/s, {:.0} records/s; per patient p50 {} ms, p99 {} ms, max {} ms; {errors} failed; other processes took {others} of the CPU",
        elapsed.as_secs_f64(),
        per_second(imported, elapsed),
        per_second(records, elapsed),
        ms(latency, |l| l.p50),
        ms(latency, |l| l.p99),
        ms(latency, |l| l.max),
    );
    Ok((json.finish(), row))
}

/// Observation `n` of a big patient: a code drawn by [`CODES`]' weights, a clinical date drawn
/// uniformly from the [`SPREAD_YEARS`] before `now`, a value within the code's range.
fn big_observation(pid: &str, n: u64, now: i64, rng: &mut Rng) -> Resource {
    let total: u64 = CODES.iter().map(|c| u64::from(c.weight)).sum();
    let mut pick = rng.next_u64() % total;
    let c = *CODES
        .iter()
        .find(|c| {
            let hit = pick < u64::from(c.weight);
            pick = pick.saturating_sub(u64::from(c.weight));
            hit
        })
        .expect("the weights cover the draw");
    let effective = now - 1 - (rng.unit() * (SPREAD_YEARS * YEAR_MICROS) as f64) as i64;
    let value = format!(
        "{:.*}",
        c.decimals as usize,
        c.low + (c.high - c.low) * rng.unit()
    );
    let concept = |system: &str, code: &str, display: &str| CodeableConcept {
        codings: vec![Coding {
            system: system.into(),
            code: code.into(),
            display: display.into(),
        }],
        text: display.into(),
    };
    // The synthetic observation as the template: status, value's unit system.
    let mut r = synth::observation(format!("{pid}-x{n}"), n);
    if let Some(resource::Kind::Observation(o)) = r.kind.as_mut() {
        o.categories = vec![concept(
            "http://terminology.hl7.org/CodeSystem/observation-category",
            c.category,
            c.category,
        )];
        o.code = Some(concept(SYSTEM_LOINC, c.loinc, c.display));
        o.effective = Some(observation::Effective::EffectiveTime(DateTime {
            unix_micros: effective,
            precision: DatePrecision::Time as i32,
            utc_offset_minutes: 60,
        }));
        if let Some(observation_value::Kind::Quantity(q)) =
            o.value.as_mut().and_then(|v| v.kind.as_mut())
        {
            q.value = value;
            q.unit = c.unit.into();
            q.code = c.unit.into();
        }
    }
    r
}

/// A big patient: synthetic patient `index` of [`BIG_SEED`] imported, then observations added in
/// transactions of [`CHUNK`] until it holds `target` records (its Patient counted).
async fn build_big(client: &Client, index: u64, target: u64, now: i64) -> Result<(String, u64)> {
    let p = synth::patient(BIG_SEED, index);
    let pid = p.id().to_owned();
    let bundle = ImportedBundle {
        patient: p.patient,
        records: p.records,
        ..ImportedBundle::default()
    };
    let mut written = 1 + dossier_cli::records::write_bundle(client, &bundle, CHUNK)
        .await
        .with_context(|| format!("import {pid}"))? as u64;
    let limits = Limits::default();
    let mut rng = Rng(0xb16 ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = 0u64;
    while written < target {
        let size = (target - written).min(CHUNK as u64);
        let mut entries = Vec::with_capacity(size as usize);
        for _ in 0..size {
            let r = big_observation(&pid, n, now, &mut rng);
            n += 1;
            validate_new_record(&r, "record", &pid, &limits)
                .map_err(|e| anyhow::anyhow!("observation {n} of {pid}: {e}"))?;
            entries.push(TransactionEntry {
                op: Some(transaction_entry::Op::Create(r)),
            });
        }
        let options = WriteOptions {
            deadline: Some(Duration::from_secs(30)),
            ..WriteOptions::default()
        };
        let w = client
            .transaction(&pid, entries, &options)
            .await
            .with_context(|| format!("a transaction of {size} observations of {pid}"))?;
        anyhow::ensure!(
            is_applied(&w),
            "a transaction of {size} observations of {pid}: {}",
            dossier_cli::records::refusal(&w)
        );
        written += size;
        if written % 5_000 < size {
            eprintln!("  {pid}: {written} records");
        }
    }
    Ok((pid, written))
}

/// The newest first dates of the Observations of `records` matching `code` (empty: any) dated
/// at or after `since` (None: any), at most `limit`: what the first page of the search must hold.
fn expected_page(
    records: &[Resource],
    code: &str,
    since: Option<i64>,
    limit: usize,
) -> Vec<Option<i64>> {
    let mut dates: Vec<Option<i64>> = records
        .iter()
        .filter(|r| matches!(r.kind, Some(resource::Kind::Observation(_))))
        .filter(|r| !index::in_error(r))
        .filter_map(index::terms)
        .filter(|t| code.is_empty() || t.codes.iter().any(|c| c == code))
        .filter(|t| since.is_none_or(|s| t.date.is_some_and(|d| d >= s)))
        .map(|t| t.date)
        .collect();
    // Newest first; records without a date last.
    dates.sort_by(|a, b| match (a, b) {
        (Some(x), Some(y)) => y.cmp(x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    dates.truncate(limit);
    dates
}

/// One measured operation on a patient.
#[derive(Debug, Clone)]
enum Probe {
    Everything,
    Search(SearchQuery),
}

impl Probe {
    async fn run(&self, client: &Client, pid: &str) -> Result<u64, (String, String)> {
        let call = async {
            match self {
                Probe::Everything => {
                    let mut got = 0u64;
                    client
                        .everything(pid, 0, &[], false, |rs| {
                            got += rs.len() as u64;
                            Ok(())
                        })
                        .await
                        .map(|_| got)
                }
                Probe::Search(q) => client
                    .search(pid, q, &[])
                    .await
                    .map(|p| p.resources.len() as u64),
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err((error_kind(&e), e.to_string())),
            Err(_) => Err((
                "bench-timeout".into(),
                format!("no answer within {OP_TIMEOUT:?}"),
            )),
        }
    }
}

/// A search of the measurements, with the date bound it was given (to check its pages).
#[derive(Debug)]
struct Search {
    name: &'static str,
    query: SearchQuery,
    since: Option<i64>,
}

/// A big patient as the measurements see it.
#[derive(Debug)]
struct BigPatient {
    pid: String,
    records: u64,
}

/// Calls one after another, unloaded, of each probe.
const ALONE_EVERYTHING: usize = 5;
const ALONE_SEARCH: usize = 20;

/// The median of `times`, in milliseconds.
fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort_unstable();
    times
        .get(times.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The patient as Everything returns it (its records, their encoded bytes, the messages), the
/// median time of Everything and of each search alone, and the first page of each search
/// checked against what Everything returned.
async fn inspect(
    client: &Client,
    p: &BigPatient,
    searches: &[Search],
) -> Result<(String, Vec<String>)> {
    let mut all: Vec<Resource> = Vec::new();
    let mut messages = 0u64;
    client
        .everything(&p.pid, 0, &[], false, |rs| {
            messages += 1;
            all.extend(rs);
            Ok(())
        })
        .await
        .with_context(|| format!("Everything of {}", p.pid))?;
    anyhow::ensure!(
        all.len() as u64 == p.records,
        "Everything of {} returned {} records, {} were written",
        p.pid,
        all.len(),
        p.records
    );
    let mut times = Vec::new();
    for _ in 0..ALONE_EVERYTHING {
        let started = Instant::now();
        let n = Probe::Everything
            .run(client, &p.pid)
            .await
            .map_err(|(_, e)| anyhow::anyhow!("Everything of {}: {e}", p.pid))?;
        times.push(started.elapsed());
        anyhow::ensure!(
            n == p.records,
            "Everything of {} returned {n} records",
            p.pid
        );
    }
    let alone = median_ms(times);
    let bytes: usize = all.iter().map(|r| r.encoded_len()).sum();
    let observations = all
        .iter()
        .filter(|r| matches!(r.kind, Some(resource::Kind::Observation(_))))
        .count();
    let mut json = Json::new("records-scale-patient");
    json.str("patient", &p.pid)
        .num("records", all.len() as f64)
        .num("observations", observations as f64)
        .num("everything_bytes", bytes as f64)
        .num("everything_messages", messages as f64)
        .num("everything_alone_median_ms", alone);
    let mut lines = vec![format!(
        "{}: Everything: {} records ({observations} observations), {:.2} MB in {messages} messages; alone {alone:.1} ms (median of {ALONE_EVERYTHING})",
        p.pid,
        all.len(),
        bytes as f64 / 1e6,
    )];
    for Search {
        name,
        query: q,
        since,
    } in searches
    {
        let page = client
            .search(&p.pid, q, &[])
            .await
            .with_context(|| format!("{name} of {}", p.pid))?;
        let got: Vec<Option<i64>> = page
            .resources
            .iter()
            .map(|r| index::terms(r).and_then(|t| t.date))
            .collect();
        let want = expected_page(&all, &q.code, *since, q.limit as usize);
        let matches = got == want;
        let in_range = expected_page(&all, &q.code, *since, usize::MAX).len();
        let probe = Probe::Search(q.clone());
        let mut times = Vec::new();
        for _ in 0..ALONE_SEARCH {
            let started = Instant::now();
            probe
                .run(client, &p.pid)
                .await
                .map_err(|(_, e)| anyhow::anyhow!("{name} of {}: {e}", p.pid))?;
            times.push(started.elapsed());
        }
        let alone = median_ms(times);
        lines.push(format!(
            "{}: {name}: {} results of {in_range} in range, {}; alone {alone:.2} ms (median of {ALONE_SEARCH})",
            p.pid,
            got.len(),
            if matches {
                "the newest of what Everything returned"
            } else {
                "NOT the newest of what Everything returned"
            }
        ));
        let key = name.replace('-', "_");
        json.num(&format!("{key}_results"), got.len() as f64)
            .num(&format!("{key}_in_range"), in_range as f64)
            .num(&format!("{key}_alone_median_ms"), alone)
            .num(&format!("{key}_page_checked"), f64::from(u8::from(matches)));
    }
    Ok((json.finish(), lines))
}

/// Closed loop: `clients` clients running `probe` on one patient for `seconds`.
async fn measure(
    client: &Client,
    name: &str,
    probe: Probe,
    p: &BigPatient,
    clients: usize,
    seconds: u64,
    pids: &[u32],
) -> Result<(String, String)> {
    let watch = CpuWatch::start(pids);
    let failures = Arc::new(Failures::default());
    let probe = Arc::new(probe);
    let pid: Arc<str> = Arc::from(p.pid.as_str());
    let result = crate::closed_loop::run(
        crate::closed_loop::LoopSpec {
            clients,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(seconds),
            ops: None,
        },
        |_c| {
            let (client, probe, pid, failures) = (
                client.clone(),
                Arc::clone(&probe),
                Arc::clone(&pid),
                Arc::clone(&failures),
            );
            move |_k| {
                let (client, probe, pid, failures) = (
                    client.clone(),
                    Arc::clone(&probe),
                    Arc::clone(&pid),
                    Arc::clone(&failures),
                );
                async move {
                    probe.run(&client, &pid).await.map_err(|(kind, message)| {
                        failures.add(kind.clone(), message);
                        kind
                    })
                }
            }
        },
    )
    .await?;
    for (kind, (n, first)) in failures.take() {
        // Counted from the warm-up on; the measured counts are in the JSON.
        eprintln!("  {name}: {n} failed ({kind}), the first: {first}");
    }
    let ops = result.latencies.len();
    let latency = Latency::of_histogram(&result.latencies);
    let errors: u64 = result.errors.values().sum();
    let mut json = Json::new("records-scale-load");
    json.str("workload", name)
        .str("patient", &p.pid)
        .num("patient_records", p.records as f64)
        .num("clients", clients as f64)
        .num("seconds", result.elapsed.as_secs_f64())
        .num("ops", ops as f64)
        .num("ops_per_s", per_second(ops, result.elapsed))
        .num("records_per_s", per_second(result.units, result.elapsed))
        .num(
            "records_per_op",
            if ops == 0 {
                0.0
            } else {
                result.units as f64 / ops as f64
            },
        )
        .num("errors", errors as f64);
    for (k, n) in &result.errors {
        json.num(&format!("errors_{}", k.replace('-', "_")), *n as f64);
    }
    json.latency("latency", latency);
    let others = note_others(&mut json, &watch);
    let row = format!(
        "| {name} | {} | {clients} | {:.0} | {:.0} | {} | {} | {} | {} | {others} |",
        p.records,
        per_second(ops, result.elapsed),
        per_second(result.units, result.elapsed),
        ms(latency, |l| l.p50),
        ms(latency, |l| l.p99),
        ms(latency, |l| l.max),
        if result.errors.is_empty() {
            "0".to_owned()
        } else {
            result
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok((json.finish(), row))
}

/// The whole measurement on a cluster started under `dir` (removed by the caller). Prints each
/// JSON line as it is measured, and the summary on stderr at the end.
pub async fn run(dir: &std::path::Path, spec: &ScaleSpec) -> Result<()> {
    let cluster =
        crate::cluster::LocalCluster::start(dir, spec.shards, spec.base_port, None, true).await?;
    let client = &cluster.client;
    let pids: Vec<u32> = cluster.local.procs.iter().filter_map(|p| p.pid()).collect();
    let mut summary = Vec::new();

    eprintln!(
        "records-scale: importing {} synthetic patients with {} importers",
        spec.patients, spec.importers
    );
    let (json, row) = import(client, spec.patients, spec.importers, &pids).await?;
    println!("{json}");
    summary.push(row);

    let now = dossier_records::now_micros();
    let mut big = Vec::new();
    for (i, &target) in spec.big.iter().enumerate() {
        eprintln!("records-scale: building a patient of {target} records");
        let started = Instant::now();
        let (pid, records) = build_big(client, i as u64, target, now).await?;
        let took = started.elapsed();
        eprintln!(
            "  {pid}: {records} records written in {:.1} s ({:.0} records/s, one transaction of up to {CHUNK} at a time)",
            took.as_secs_f64(),
            per_second(records, took)
        );
        summary.push(format!(
            "{pid}: {records} records written in {:.1} s ({:.0} records/s, transactions of {CHUNK} one at a time)",
            took.as_secs_f64(),
            per_second(records, took)
        ));
        big.push(BigPatient { pid, records });
    }

    let since = now - SEARCH_YEARS * YEAR_MICROS;
    let search_code = SearchQuery {
        rtype: Some(ResourceType::Observation),
        code: format!("{SYSTEM_LOINC}|{SEARCH_CODE}"),
        since_micros: since.into(),
        limit: PAGE,
        ..SearchQuery::default()
    };
    let search_type = SearchQuery {
        rtype: Some(ResourceType::Observation),
        limit: PAGE,
        ..SearchQuery::default()
    };
    let searches = [
        Search {
            name: "search-code",
            query: search_code.clone(),
            since: Some(since),
        },
        Search {
            name: "search-type",
            query: search_type.clone(),
            since: None,
        },
    ];
    for p in &big {
        let (json, lines) = inspect(client, p, &searches).await?;
        println!("{json}");
        for line in lines {
            eprintln!("  {line}");
            summary.push(line);
        }
    }

    let probes = [
        ("everything", Probe::Everything),
        ("search-code", Probe::Search(search_code)),
        ("search-type", Probe::Search(search_type)),
    ];
    let mut rows = Vec::new();
    for (name, probe) in &probes {
        for p in &big {
            eprintln!(
                "records-scale: {name} of {} ({} records), {} clients, {} s",
                p.pid, p.records, spec.clients, spec.seconds
            );
            let (json, row) = measure(
                client,
                name,
                probe.clone(),
                p,
                spec.clients,
                spec.seconds,
                &pids,
            )
            .await?;
            println!("{json}");
            rows.push(row);
        }
    }

    eprintln!(
        "\nrecords-scale: 3 nodes, {} shards; search-code: Observations of LOINC {SEARCH_CODE} of the last {SEARCH_YEARS} years, search-type: Observations; both the first page of {PAGE}, newest first",
        spec.shards
    );
    for line in summary {
        eprintln!("{line}");
    }
    eprintln!(
        "| workload | patient records | clients | ops/s | records/s | p50 ms | p99 ms | max ms | errors | CPU of other processes |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in rows {
        eprintln!("{row}");
    }
    drop(cluster);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_are_valid_loinc_and_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for c in CODES {
            assert!(dossier_records::loinc_is_valid(c.loinc), "{}", c.loinc);
            assert!(seen.insert(c.loinc), "{} twice", c.loinc);
        }
        assert!(CODES.iter().any(|c| c.loinc == SEARCH_CODE));
    }

    #[test]
    fn big_observations_validate_and_spread() {
        let now = 1_800_000_000_000_000;
        let mut rng = Rng(7);
        let mut codes = std::collections::BTreeSet::new();
        let (mut oldest, mut newest) = (i64::MAX, i64::MIN);
        for n in 0..2_000 {
            let r = big_observation("synth-2-0", n, now, &mut rng);
            validate_new_record(&r, "record", "synth-2-0", &Limits::default()).unwrap();
            let t = index::terms(&r).unwrap();
            let d = t.date.unwrap();
            (oldest, newest) = (oldest.min(d), newest.max(d));
            codes.extend(t.codes);
        }
        assert_eq!(codes.len(), CODES.len());
        assert!(newest < now && now - newest < YEAR_MICROS);
        assert!(now - oldest > 29 * YEAR_MICROS && now - oldest <= SPREAD_YEARS * YEAR_MICROS);
    }

    #[test]
    fn the_expected_page_is_newest_first_and_bounded() {
        let mut rng = Rng(3);
        let rs: Vec<Resource> = (0..500)
            .map(|n| big_observation("p", n, 1_800_000_000_000_000, &mut rng))
            .collect();
        let page = expected_page(&rs, "", None, 20);
        assert_eq!(page.len(), 20);
        assert!(page.windows(2).all(|w| w[0] >= w[1]));
        let code = format!("{SYSTEM_LOINC}|{SEARCH_CODE}");
        let since = 1_800_000_000_000_000 - SEARCH_YEARS * YEAR_MICROS;
        let page = expected_page(&rs, &code, Some(since), usize::MAX);
        assert!(page.iter().all(|d| d.is_some_and(|d| d >= since)));
    }
}
