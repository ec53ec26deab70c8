//! The register workload, as Jepsen's: read, write and compare-and-set of small integers.
//!
//! Writes and compare-and-set draw their values from `0..VALUES`, so that a good share of
//! compare-and-set operations find their expected value and succeed (drawn from the whole
//! history, as before, none did). A small value domain leaves the linearizability search more
//! orders to consider, so no key's history grows without bound: register slot `k` is the key
//! `r/k.g`, and it moves on to generation `g + 1` (a fresh key of a fresh patient, absent at first)
//! after `OPS_PER_KEY` operations, or sooner, once `INFOS_PER_KEY` of them were indeterminate
//! (each pending indeterminate operation may or may not take effect at any later point, which
//! multiplies what a search of an invalid history has to rule out).

use std::sync::Mutex;
use std::time::Duration;

use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{GetRequest, ReadConsistency as WireConsistency, RouteHeader};
use dossier_client::{Client, ClientError, ReadConsistency};
use serde_json::{Value, json};

use super::{Rng, Shared, any_replica, outcome_of, patient_of};
use crate::history::{F, Type};

/// Register values are drawn from `0..VALUES`.
pub const VALUES: usize = 5;

/// Operations a register key takes before its slot moves on to the next generation. The
/// checker decides a valid key of this size in milliseconds; an invalid one, which it must search
/// exhaustively up to the operation that cannot be placed, in seconds.
pub const OPS_PER_KEY: u64 = 1_000;

/// Indeterminate operations after which a slot moves on (those still in flight then may add up
/// to one per client).
pub const INFOS_PER_KEY: u64 = 4;

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    generation: u64,
    ops: u64,
    infos: u64,
}

/// The register slots: each one's generation, and what that generation has taken so far.
#[derive(Debug)]
pub struct Registers {
    slots: Mutex<Vec<Slot>>,
}

impl Registers {
    pub fn new(slots: usize) -> Self {
        Registers {
            slots: Mutex::new(vec![Slot::default(); slots]),
        }
    }

    pub fn slots(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The generation the next operation on `slot` goes to (counted against it).
    pub fn begin(&self, slot: usize) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let s = slots.get_mut(slot)?;
        if s.ops >= OPS_PER_KEY {
            *s = Slot {
                generation: s.generation + 1,
                ..Slot::default()
            };
        }
        s.ops += 1;
        Some(s.generation)
    }

    /// An operation on `slot`'s `generation` ended indeterminate.
    pub fn indeterminate(&self, slot: usize, generation: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(slot)
            && s.generation == generation
        {
            s.infos += 1;
            if s.infos >= INFOS_PER_KEY {
                *s = Slot {
                    generation: generation + 1,
                    ..Slot::default()
                };
            }
        }
    }
}

/// Register slot `slot`, generation `generation`: `r/{slot}.{generation}`.
pub fn register_key(slot: usize, generation: u64) -> String {
    format!("r/{slot}.{generation}")
}

/// The value a client last saw on a key (read, written, or set by its compare-and-set), per slot.
#[derive(Debug, Default)]
pub struct Seen {
    last: Vec<Option<(String, i64)>>,
}

impl Seen {
    fn get(&self, slot: usize, key: &str) -> Option<i64> {
        match self.last.get(slot) {
            Some(Some((k, v))) if k == key => Some(*v),
            _ => None,
        }
    }

    fn set(&mut self, slot: usize, key: &str, value: i64) {
        if self.last.len() <= slot {
            self.last.resize(slot + 1, None);
        }
        self.last[slot] = Some((key.to_owned(), value));
    }
}

fn value_of(rng: &mut Rng) -> i64 {
    rng.below(VALUES) as i64
}

/// A read's recorded value: `null` when absent, the integer, or (never written by the workload)
/// the bytes as a string, which the checker refuses to judge.
fn decode(bytes: Option<Vec<u8>>) -> Value {
    match bytes {
        None => Value::Null,
        Some(b) => {
            let text = String::from_utf8_lossy(&b);
            text.parse::<i64>()
                .map_or_else(|_| Value::String(text.into_owned()), Value::from)
        }
    }
}

/// One register operation on a random slot: half reads, a quarter writes, a quarter
/// compare-and-set. Returns its outcome.
pub async fn operate(shared: &Shared, process: u64, rng: &mut Rng, seen: &mut Seen) -> Type {
    let slot = rng.below(shared.registers.slots());
    let Some(generation) = shared.registers.begin(slot) else {
        return Type::Fail;
    };
    let key = register_key(slot, generation);
    let t = operate_on(shared, process, rng, seen, slot, &key).await;
    if t == Type::Info {
        shared.registers.indeterminate(slot, generation);
    }
    t
}

async fn operate_on(
    shared: &Shared,
    process: u64,
    rng: &mut Rng,
    seen: &mut Seen,
    slot: usize,
    key: &str,
) -> Type {
    let patient = patient_of(key);
    let (client, recorder) = (&shared.client, &shared.recorder);
    match rng.below(4) {
        0 | 1 => {
            recorder.record(process, Type::Invoke, F::Read, key, Value::Null);
            match read_any_replica(client, &patient, b"v", rng).await {
                Ok(v) => {
                    let value = decode(v);
                    if let Some(v) = value.as_i64() {
                        seen.set(slot, key, v);
                    }
                    recorder.record(process, Type::Ok, F::Read, key, value);
                    Type::Ok
                }
                Err(e) => {
                    let t = outcome_of(&e);
                    recorder.record(process, t, F::Read, key, Value::Null);
                    t
                }
            }
        }
        2 => {
            let v = value_of(rng);
            recorder.record(process, Type::Invoke, F::Write, key, json!(v));
            let t = match client
                .put_with(
                    &patient,
                    b"v",
                    v.to_string().as_bytes(),
                    Duration::from_secs(5),
                )
                .await
            {
                Ok(_) => {
                    seen.set(slot, key, v);
                    Type::Ok
                }
                Err(e) => outcome_of(&e),
            };
            recorder.record(process, t, F::Write, key, json!(v));
            t
        }
        _ => {
            // Half the time from the value this client last saw on the key, as a client that
            // read before it writes would; otherwise blind.
            let expected = match seen.get(slot, key) {
                Some(v) if rng.below(2) == 0 => v,
                _ => value_of(rng),
            };
            let new = value_of(rng);
            recorder.record(process, Type::Invoke, F::Cas, key, json!([expected, new]));
            let result = client
                .compare_and_set(
                    &patient,
                    b"v",
                    Some(expected.to_string().as_bytes()),
                    new.to_string().as_bytes(),
                    Duration::from_secs(5),
                )
                .await;
            // A condition that did not hold is a definite failure that still observed the
            // register (it did not hold `expected`): its completion keeps `[expected, new]`. A
            // request refused before it was evaluated completes with the error's text.
            let (t, value) = match result {
                Ok(w) if w.applied => {
                    seen.set(slot, key, new);
                    (Type::Ok, json!([expected, new]))
                }
                Ok(_) => (Type::Fail, json!([expected, new])),
                Err(e) => (outcome_of(&e), Value::String(e.to_string())),
            };
            recorder.record(process, t, F::Cas, key, value);
            t
        }
    }
}

/// A read as a load balancer would send it: to any replica of the patient's shard; when that
/// replica refuses or cannot be reached, through the client (the leader).
async fn read_any_replica(
    client: &Client,
    patient: &str,
    key: &[u8],
    rng: &mut Rng,
) -> Result<Option<Vec<u8>>, ClientError> {
    if let Some(channel) = any_replica(client, patient, rng) {
        let mut request = tonic::Request::new(GetRequest {
            route: Some(RouteHeader {
                patient_id: patient.to_owned(),
                ..RouteHeader::default()
            }),
            key: key.to_vec(),
            consistency: WireConsistency::Linearizable as i32,
        });
        request.set_timeout(Duration::from_millis(500));
        if let Ok(r) = KvClient::new(channel).get(request).await {
            let r = r.into_inner();
            return Ok(r.found.then_some(r.value));
        }
    }
    let value = client
        .get_with(
            patient,
            key,
            ReadConsistency::Linearizable,
            Duration::from_secs(5),
        )
        .await?;
    Ok(value.map(|v| v.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot moves on after `OPS_PER_KEY` operations, or after `INFOS_PER_KEY` indeterminate
    /// ones of its current generation; late news of an earlier generation changes nothing.
    #[test]
    fn generations() {
        let r = Registers::new(2);
        for _ in 0..OPS_PER_KEY {
            assert_eq!(r.begin(0), Some(0));
        }
        assert_eq!(r.begin(0), Some(1));
        assert_eq!(r.begin(1), Some(0));
        assert_eq!(r.begin(2), None);
        for _ in 0..INFOS_PER_KEY - 1 {
            r.indeterminate(0, 1);
            r.indeterminate(0, 0);
        }
        assert_eq!(r.begin(0), Some(1));
        r.indeterminate(0, 1);
        assert_eq!(r.begin(0), Some(2));
        assert_eq!(register_key(0, 2), "r/0.2");
    }
}
