//! The client workloads of a run: registers (read, write and compare-and-set over a few values,
//! [`register`]) and grow-only sets (one key per element, read back by scanning, [`set`]).
//!
//! Client processes are concurrent tasks; each is one logical process at a time, and after an
//! indeterminate (`info`) outcome it continues under a fresh process number.

pub mod register;
pub mod set;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dossier_client::{Client, ClientError};
use serde_json::Value;
use tonic::transport::Channel;

use crate::history::{Event, F, Type};

/// Records the history: every invocation and completion, with its time since the start.
#[derive(Debug)]
pub struct Recorder {
    pub started: Instant,
    pub events: Mutex<Vec<Event>>,
    next_process: AtomicU64,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            started: Instant::now(),
            events: Mutex::new(Vec::new()),
            next_process: AtomicU64::new(0),
        }
    }

    pub fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn record(&self, process: u64, kind: Type, f: F, key: &str, value: Value) {
        let event = Event {
            process,
            kind,
            f,
            key: key.to_owned(),
            value,
            time: self.now(),
        };
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    pub fn fresh_process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    /// The events recorded so far, leaving none behind.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// A small deterministic generator (splitmix64), seeded per client.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The patient of history key `key`: `jepsen-` and the key with `/` as `-` (patient ids follow
/// the record layer's id rule).
pub fn patient_of(key: &str) -> String {
    format!("jepsen-{}", key.replace('/', "-"))
}

/// How a failed operation is recorded: `fail` only when it certainly did not take effect, which
/// here means a refused argument (every attempt carries the same request, so every attempt was
/// refused). The client also counts session and cluster-state errors as definite, but they can
/// end a request after an earlier attempt went unanswered: a session the node reports expired
/// may have applied it once, and a node that has not applied the map yet (one that just joined
/// or restarted) answers for itself only. Those are `info` here.
pub fn outcome_of(e: &ClientError) -> Type {
    match e {
        ClientError::InvalidArgument { .. } => Type::Fail,
        _ => Type::Info,
    }
}

/// A connection to a random replica of the patient's shard, as a load balancer would pick one:
/// a correct replica that is not the leader refuses linearizable reads (the caller then reads
/// through the client, which finds the leader); the nodes' unsafe test switch makes it answer
/// from its local state. `None` when the map names no reachable replica.
pub fn any_replica(client: &Client, patient: &str, rng: &mut Rng) -> Option<Channel> {
    let map = client.cluster_map()?;
    let h = dossier_api::patient_hash(patient);
    let shard = map
        .shards
        .iter()
        .find(|d| h >= d.hash_lo && (d.hash_hi_max || h < d.hash_hi))?;
    let node = *shard.replicas.get(rng.below(shard.replicas.len()))?;
    let address = &map.nodes.iter().find(|n| n.node_id == node)?.address;
    // The client's own connection: its identity is the workload's (a service), not the
    // operator's of `dossier_cli::ops`.
    client.connection(address).ok()
}

/// What the clients of one client host share; `registers`, `sets`, `recorder` and `stop` are the
/// same for every host, `client` is the host's own (its connections leave from the host).
#[derive(Debug)]
pub struct Shared {
    pub client: Client,
    pub recorder: Arc<Recorder>,
    pub registers: Arc<register::Registers>,
    pub sets: Arc<set::Sets>,
    pub stop: Arc<AtomicBool>,
}

/// One client: a logical process at a time, random operations until `stop`. Two in three
/// operations go to the registers, one to the sets (all of them when the other has no keys).
pub async fn client_loop(shared: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed);
    let mut process = shared.recorder.fresh_process();
    let mut seen = register::Seen::default();
    let (registers, sets) = (shared.registers.slots(), shared.sets.keys());
    if registers == 0 && sets == 0 {
        return;
    }
    while !shared.stop.load(Ordering::Relaxed) {
        let register = sets == 0 || (registers > 0 && rng.below(3) > 0);
        let outcome = if register {
            register::operate(&shared, process, &mut rng, &mut seen).await
        } else {
            set::operate(&shared, process, &mut rng).await
        };
        if outcome == Type::Info {
            // Its operation may still be in flight: this process continues under a new number.
            process = shared.recorder.fresh_process();
        }
    }
}
