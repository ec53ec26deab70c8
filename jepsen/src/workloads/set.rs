//! The set workload: grow-only sets with one key per element.
//!
//! Set `k` is the history key `s/k`; its elements are the keys `set/k/<element>` of the patient
//! `jepsen-s-k`, each written once by a compare-and-set that requires it absent (its value is the
//! element). Elements are unique over the run. A read scans the prefix `set/k/` page by page
//! (`start_after` the last key, until `more` is false), each page from a random replica as
//! registers' reads are; clients read each set about every `READ_INTERVAL_MIN` (less often in
//! long runs, see `Sets::new`), right after an add of theirs to it returned, and once more after
//! the cluster healed (the final read).
//!
//! Each add writes one small key, so the log and the state grow with the number of adds; a set
//! kept as one value that every add rewrote grew with their square.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{ReadConsistency as WireConsistency, RouteHeader, ScanRequest};
use dossier_client::{Client, ClientError, ReadConsistency};
use serde_json::{Value, json};

use super::{Recorder, Rng, Shared, any_replica, outcome_of, patient_of};
use crate::history::{F, Type};

/// How often, at most, each set is read while the workload runs.
pub const READ_INTERVAL_MIN: Duration = Duration::from_secs(2);

/// Reads of each set over a run, about, when the run is longer than `READS_PER_RUN` times
/// `READ_INTERVAL_MIN`. Each read records the whole set, so reads at a fixed interval would make
/// the history (and the checker's memory) grow with the square of the run's length.
pub const READS_PER_RUN: u32 = 60;

/// Pages one read may take (the node's default page is 1,000 keys): a read that would need more
/// is abandoned as indeterminate.
const PAGES_MAX: usize = 10_000;

/// Attempts at each final read.
const FINAL_READ_ATTEMPTS: usize = 3;

/// The sets, and when each was last read.
#[derive(Debug)]
pub struct Sets {
    started: Instant,
    read_interval: Duration,
    /// Milliseconds since `started` of the last read of each set.
    last_read_ms: Vec<AtomicU64>,
    /// The next element.
    next: AtomicU64,
}

impl Sets {
    /// `keys` sets, for a workload of `length`: each is read every `READ_INTERVAL_MIN`, or
    /// `READS_PER_RUN` times over the run if that is less often.
    pub fn new(keys: usize, length: Duration) -> Self {
        Sets {
            started: Instant::now(),
            read_interval: READ_INTERVAL_MIN.max(length / READS_PER_RUN),
            last_read_ms: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicU64::new(0),
        }
    }

    pub fn keys(&self) -> usize {
        self.last_read_ms.len()
    }

    /// True (once) when set `k` is due for a read.
    fn read_due(&self, k: usize) -> bool {
        let Some(last) = self.last_read_ms.get(k) else {
            return false;
        };
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let before = last.load(Ordering::Relaxed);
        now.saturating_sub(before) >= self.read_interval.as_millis() as u64
            && last
                .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The history key of set `k`.
pub fn set_key(k: usize) -> String {
    format!("s/{k}")
}

/// The prefix of set `k`'s element keys in its patient.
fn prefix(k: usize) -> String {
    format!("set/{k}/")
}

/// One set operation on a random set: an add, and when that set is due for a read, a read right
/// after the add returned. A replica that serves a read without a barrier is then most likely
/// still behind the add just acknowledged: the window a stale read falls into.
pub async fn operate(shared: &Shared, process: u64, rng: &mut Rng) -> Type {
    let k = rng.below(shared.sets.keys());
    let added = add(shared, process, k).await;
    if added == Type::Info || !shared.sets.read_due(k) {
        return added;
    }
    read(&shared.client, &shared.recorder, process, k, Some(rng)).await
}

/// Adds the next element to set `k`.
async fn add(shared: &Shared, process: u64, k: usize) -> Type {
    let element = shared.sets.next.fetch_add(1, Ordering::Relaxed) as i64;
    let key = set_key(k);
    let recorder = &shared.recorder;
    recorder.record(process, Type::Invoke, F::Add, &key, json!(element));
    let result = shared
        .client
        .compare_and_set(
            &patient_of(&key),
            format!("{}{element}", prefix(k)).as_bytes(),
            None,
            element.to_string().as_bytes(),
            Duration::from_secs(5),
        )
        .await;
    // Elements are unique and each is added once, so an add whose key was already there (its
    // absent condition failed) found an earlier application of itself: recorded `ok` with the
    // completion value "present", which the checker reports as a duplicate.
    let (t, value) = match result {
        Ok(w) if w.applied => (Type::Ok, json!(element)),
        Ok(_) => (Type::Ok, json!("present")),
        Err(e) => (outcome_of(&e), Value::String(e.to_string())),
    };
    recorder.record(process, t, F::Add, &key, value);
    t
}

/// Reads set `k` whole and records it: each page from a random replica when `rng` is given, else
/// through the client (the leader).
async fn read(
    client: &Client,
    recorder: &Recorder,
    process: u64,
    k: usize,
    rng: Option<&mut Rng>,
) -> Type {
    let key = set_key(k);
    recorder.record(process, Type::Invoke, F::Read, &key, Value::Null);
    match scan_all(client, &patient_of(&key), &prefix(k), rng).await {
        Ok(elements) => {
            recorder.record(process, Type::Ok, F::Read, &key, Value::Array(elements));
            Type::Ok
        }
        Err(t) => {
            recorder.record(process, t, F::Read, &key, Value::Null);
            t
        }
    }
}

/// The final read of every set, after the cluster healed and the clients stopped: up to
/// `FINAL_READ_ATTEMPTS` attempts each, through the leader.
pub async fn final_reads(client: &Client, recorder: &Recorder, keys: usize) {
    for k in 0..keys {
        for _ in 0..FINAL_READ_ATTEMPTS {
            let process = recorder.fresh_process();
            if read(client, recorder, process, k, None).await == Type::Ok {
                break;
            }
        }
    }
}

/// Every element under `prefix`, in key order. An item is recorded as its element when its key
/// ends in the decimal element and its value is that element; any other item as the string
/// `key=value`, which the checker reports as malformed. Errors carry the read's outcome.
async fn scan_all(
    client: &Client,
    patient: &str,
    prefix: &str,
    mut rng: Option<&mut Rng>,
) -> Result<Vec<Value>, Type> {
    let mut elements = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    for _ in 0..PAGES_MAX {
        let (items, more) = page(
            client,
            patient,
            prefix,
            after.as_deref(),
            rng.as_deref_mut(),
        )
        .await
        .map_err(|e| outcome_of(&e))?;
        for (k, v) in &items {
            let name = k.strip_prefix(prefix.as_bytes()).unwrap_or(k);
            let element = std::str::from_utf8(name)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|e| v.as_slice() == e.to_string().as_bytes());
            elements.push(match element {
                Some(e) => Value::from(e),
                None => Value::String(format!(
                    "{}={}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                )),
            });
        }
        match items.last() {
            Some((last, _)) if more => after = Some(last.clone()),
            // More was promised on an empty page: nothing to continue from.
            None if more => return Err(Type::Info),
            _ => return Ok(elements),
        }
    }
    Err(Type::Info)
}

type Items = Vec<(Vec<u8>, Vec<u8>)>;

/// One page of the scan (the node's page size), with whether more follow.
async fn page(
    client: &Client,
    patient: &str,
    prefix: &str,
    after: Option<&[u8]>,
    rng: Option<&mut Rng>,
) -> Result<(Items, bool), ClientError> {
    if let Some(rng) = rng
        && let Some(channel) = any_replica(client, patient, rng)
    {
        let mut request = tonic::Request::new(ScanRequest {
            route: Some(RouteHeader {
                patient_id: patient.to_owned(),
                ..RouteHeader::default()
            }),
            prefix: prefix.as_bytes().to_vec(),
            start_after: after.unwrap_or_default().to_vec(),
            limit: 0,
            consistency: WireConsistency::Linearizable as i32,
        });
        request.set_timeout(Duration::from_millis(1_000));
        if let Ok(r) = KvClient::new(channel).scan(request).await {
            let r = r.into_inner();
            let items = r.items.into_iter().map(|kv| (kv.key, kv.value)).collect();
            return Ok((items, r.more));
        }
    }
    let page = client
        .scan(
            patient,
            prefix.as_bytes(),
            after,
            0,
            ReadConsistency::Linearizable,
        )
        .await?;
    let items = page
        .items
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    Ok((items, page.more))
}
