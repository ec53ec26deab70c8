//! The master patient index: which patient holds an identifier of an indexed system, and the
//! protocol that keeps **no two patients holding the same identifier**, across shards, under
//! concurrent creates, retries and crashes (docs/schema.md §7).
//!
//! - The claim record E[X] of identifier X lives in the shard of the routing key
//!   `mpi:<system>|<value>`, records key `m`: generation, state (claimed or released), token
//!   (the request id of the claiming write), claim time, patient.
//! - H_P(X) (`i/X` in patient P's records space) is present while P's current Patient version
//!   holds X; it is written only by P's Patient batches, conditioned on the fence F_P(T, X)
//!   (`f/T/X`) being absent.
//! - E[X] leaves (claimed, P, T) only after a revoke committed F_P(T, X) under the condition
//!   H_P(X) Absent. Hence H_P(X) = T implies E[X] = (claimed, P, T), and two holders would be
//!   named by the one record E[X].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dossier_storage::{Batch, Condition, Expect, Op};

use crate::errors::ApiError;
use crate::shards::{BatchResult, Shards};

/// An identifier of an indexed system.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ident {
    pub system: String,
    pub value: String,
}

impl Ident {
    /// `system|value`: the identifier in keys (systems never contain `|`).
    pub fn joined(&self) -> String {
        format!("{}|{}", self.system, self.value)
    }

    /// The routing key of the identifier's claim record.
    pub fn route_key(&self) -> String {
        format!("mpi:{}", self.joined())
    }
}

/// `owner ‖ 0x01 ‖ parts`: a key in a routing key's records space.
fn key(owner: &str, parts: &[&[u8]]) -> Bytes {
    let mut k = owner.as_bytes().to_vec();
    k.push(0x01);
    for p in parts {
        k.extend_from_slice(p);
    }
    k.into()
}

fn entry_key(x: &Ident) -> Bytes {
    key(&x.route_key(), &[b"m"])
}

/// H_P(X): `P ‖ 0x01 ‖ i/<system|value>`, value the holding token.
pub fn hold_key(patient: &str, x: &Ident) -> Bytes {
    key(patient, &[b"i/", x.joined().as_bytes()])
}

/// F_P(T, X): `P ‖ 0x01 ‖ f/<token>/<system|value>`.
pub fn fence_key(patient: &str, token: &[u8], x: &Ident) -> Bytes {
    key(patient, &[b"f/", token, b"/", x.joined().as_bytes()])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Claimed,
    Released,
}

/// E[X], fixed layout: generation u64 BE | state u8 | token [16] | claimed_at i64 BE | patient.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClaimRecord {
    generation: u64,
    state: State,
    token: [u8; 16],
    claimed_at_micros: i64,
    patient: String,
}

impl ClaimRecord {
    fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(33 + self.patient.len());
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.push(match self.state {
            State::Claimed => 1,
            State::Released => 2,
        });
        v.extend_from_slice(&self.token);
        v.extend_from_slice(&self.claimed_at_micros.to_be_bytes());
        v.extend_from_slice(self.patient.as_bytes());
        v.into()
    }

    fn decode(b: &[u8]) -> Option<ClaimRecord> {
        let generation = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let state = match b.get(8)? {
            1 => State::Claimed,
            2 => State::Released,
            _ => return None,
        };
        let token = b.get(9..25)?.try_into().ok()?;
        let claimed_at_micros = i64::from_be_bytes(b.get(25..33)?.try_into().ok()?);
        let patient = String::from_utf8(b.get(33..)?.to_vec()).ok()?;
        Some(ClaimRecord {
            generation,
            state,
            token,
            claimed_at_micros,
            patient,
        })
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// What claiming an identifier found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The claim is this request's (now, or from an earlier attempt of the same request).
    Claimed,
    /// Another patient holds the identifier.
    Held { holder: String },
}

/// The index protocol over a `Shards` transport.
pub struct Mpi<'a> {
    pub shards: &'a dyn Shards,
    /// How long a claim whose patient was never written blocks other claimants.
    pub grace: Duration,
    /// Bound on the protocol's retry loops (conflicting CASes, claims within their grace).
    pub attempts: u32,
}

impl Mpi<'_> {
    async fn read_entry(
        &self,
        x: &Ident,
        deadline: Duration,
    ) -> Result<(Option<Bytes>, Option<ClaimRecord>), ApiError> {
        let raw = self
            .shards
            .read(&x.route_key(), vec![entry_key(x)], deadline)
            .await?
            .pop()
            .flatten();
        let record = match &raw {
            None => None,
            Some(b) => Some(ClaimRecord::decode(b).ok_or_else(|| {
                ApiError::Internal(format!("claim record of {} does not decode", x.joined()))
            })?),
        };
        Ok((raw, record))
    }

    /// The token `patient` holds X under (H_P(X)), if it holds X.
    pub async fn holds(
        &self,
        patient: &str,
        x: &Ident,
        deadline: Duration,
    ) -> Result<Option<Bytes>, ApiError> {
        Ok(self
            .shards
            .read(patient, vec![hold_key(patient, x)], deadline)
            .await?
            .pop()
            .flatten())
    }

    /// CAS of E[X] from `old` (None: absent) to `new`.
    async fn cas(
        &self,
        x: &Ident,
        old: Option<Bytes>,
        new: &ClaimRecord,
        deadline: Duration,
    ) -> Result<bool, ApiError> {
        let batch = Batch {
            conditions: vec![Condition {
                key: entry_key(x),
                expect: match old {
                    Some(b) => Expect::Equals(b),
                    None => Expect::Absent,
                },
            }],
            ops: vec![Op::Put {
                key: entry_key(x),
                value: new.encode(),
            }],
        };
        Ok(self.shards.write(&x.route_key(), batch, deadline).await? == BatchResult::Applied)
    }

    /// Fences claim (`patient`, `token`) of X off `patient`'s shard, unless the patient holds X.
    /// True when the fence is in place (the claim can never become a hold).
    async fn revoke(
        &self,
        x: &Ident,
        patient: &str,
        token: &[u8],
        deadline: Duration,
    ) -> Result<bool, ApiError> {
        let batch = Batch {
            conditions: vec![Condition {
                key: hold_key(patient, x),
                expect: Expect::Absent,
            }],
            ops: vec![Op::Put {
                key: fence_key(patient, token, x),
                value: Bytes::new(),
            }],
        };
        Ok(self.shards.write(patient, batch, deadline).await? == BatchResult::Applied)
    }

    /// Claims X for `patient` under `token` (docs/schema.md §7, claim).
    pub async fn claim(
        &self,
        x: &Ident,
        patient: &str,
        token: &[u8; 16],
        deadline: Duration,
    ) -> Result<Claim, ApiError> {
        let started = Instant::now();
        let left = || deadline.saturating_sub(started.elapsed());
        for _ in 0..self.attempts.max(1) * 4 {
            if left().is_zero() {
                return Err(ApiError::Deadline);
            }
            let (raw, record) = self.read_entry(x, left()).await?;
            let mine = ClaimRecord {
                generation: record.as_ref().map_or(1, |r| r.generation + 1),
                state: State::Claimed,
                token: *token,
                claimed_at_micros: now_micros(),
                patient: patient.to_owned(),
            };
            match &record {
                None => {
                    if self.cas(x, None, &mine, left()).await? {
                        return Ok(Claim::Claimed);
                    }
                }
                Some(r)
                    if r.state == State::Claimed && r.patient == patient && r.token == *token =>
                {
                    return Ok(Claim::Claimed);
                }
                Some(r) if r.state == State::Released => {
                    if self.cas(x, raw, &mine, left()).await? {
                        return Ok(Claim::Claimed);
                    }
                }
                Some(r) => {
                    if self.holds(&r.patient, x, left()).await?.is_some() {
                        return Ok(Claim::Held {
                            holder: r.patient.clone(),
                        });
                    }
                    let age = Duration::from_micros(
                        now_micros().saturating_sub(r.claimed_at_micros).max(0) as u64,
                    );
                    if age < self.grace {
                        // The claimant's patient write may still come.
                        let wait = (self.grace - age)
                            .min(Duration::from_millis(50))
                            .min(left());
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    if !self.revoke(x, &r.patient, &r.token, left()).await? {
                        // The claimant holds X now: the next read says so.
                        continue;
                    }
                    if self.cas(x, raw, &mine, left()).await? {
                        return Ok(Claim::Claimed);
                    }
                }
            }
        }
        Err(ApiError::Unavailable(format!(
            "identifier {} is contended; retry",
            x.joined()
        )))
    }

    /// Gives up claim (`patient`, `token`) of X, after a write that removed X committed or
    /// after a write that claimed X failed. Cleanup only: a claim left behind is revoked by the
    /// next claimant after the grace period.
    pub async fn release(
        &self,
        x: &Ident,
        patient: &str,
        token: &[u8],
        deadline: Duration,
    ) -> Result<(), ApiError> {
        if !self.revoke(x, patient, token, deadline).await? {
            return Ok(()); // The patient holds X under this token: nothing to release.
        }
        let (raw, record) = self.read_entry(x, deadline).await?;
        if let Some(r) = record
            && r.state == State::Claimed
            && r.patient == patient
            && r.token == token
        {
            let released = ClaimRecord {
                generation: r.generation + 1,
                state: State::Released,
                ..r
            };
            self.cas(x, raw, &released, deadline).await?;
        }
        Ok(())
    }

    /// The patient holding X, linearizably (docs/schema.md §7, LookupIdentifier).
    pub async fn lookup(&self, x: &Ident, deadline: Duration) -> Result<Option<String>, ApiError> {
        let started = Instant::now();
        let left = || deadline.saturating_sub(started.elapsed());
        let (_, mut record) = self.read_entry(x, left()).await?;
        for _ in 0..self.attempts.max(1) {
            let Some(r) = record.clone() else {
                return Ok(None);
            };
            if r.state == State::Released {
                return Ok(None);
            }
            if self.holds(&r.patient, x, left()).await?.as_deref() == Some(&r.token[..]) {
                return Ok(Some(r.patient));
            }
            let (_, again) = self.read_entry(x, left()).await?;
            if again.as_ref().map(|a| a.generation) == Some(r.generation) {
                return Ok(None);
            }
            record = again;
        }
        Err(ApiError::Unavailable(format!(
            "identifier {} changed under every lookup; retry",
            x.joined()
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use dossier_storage::{ApplyEntry, Command, EntryPayload, Outcome, StateStore, StoreConfig};

    use super::*;

    /// Every routing key on one real shard store: the conditions and batches behave exactly as
    /// on a cluster's shards, and tasks interleave at every call.
    struct StoreShards {
        _dir: tempfile::TempDir,
        _store: StateStore,
        shard: dossier_storage::ShardHandle,
        index: AtomicU64,
        apply: std::sync::Mutex<()>,
    }

    impl StoreShards {
        fn new() -> Arc<StoreShards> {
            let dir = tempfile::tempdir().unwrap();
            let config = StoreConfig {
                dir: dir.path().to_path_buf(),
                ..StoreConfig::default()
            }
            .validate()
            .unwrap();
            let store = StateStore::open(config).unwrap();
            let shard = store.create_shard(1).unwrap();
            Arc::new(StoreShards {
                _dir: dir,
                _store: store,
                shard,
                index: AtomicU64::new(0),
                apply: std::sync::Mutex::new(()),
            })
        }

        fn get(&self, key: &[u8]) -> Option<Bytes> {
            self.shard.get(key).unwrap()
        }
    }

    #[tonic::async_trait]
    impl Shards for StoreShards {
        async fn read(
            &self,
            _route: &str,
            keys: Vec<Bytes>,
            _d: Duration,
        ) -> Result<Vec<Option<Bytes>>, ApiError> {
            tokio::task::yield_now().await;
            Ok(keys.iter().map(|k| self.get(k)).collect())
        }

        async fn write(
            &self,
            _route: &str,
            batch: Batch,
            _d: Duration,
        ) -> Result<BatchResult, ApiError> {
            tokio::task::yield_now().await;
            let outcome = {
                let _serial = self.apply.lock().unwrap();
                let index = self.index.fetch_add(1, Ordering::SeqCst) + 1;
                let entry = ApplyEntry {
                    index,
                    log_id: Bytes::new(),
                    payload: EntryPayload::Command(Command::Txn {
                        session: None,
                        batch,
                    }),
                };
                self.shard.apply(&[entry]).unwrap()[0]
            };
            tokio::task::yield_now().await;
            Ok(match outcome {
                Outcome::ConditionFailed { index } => BatchResult::Failed(index),
                _ => BatchResult::Applied,
            })
        }
    }

    fn insz(v: &str) -> Ident {
        Ident {
            system: dossier_records::SYSTEM_INSZ.into(),
            value: v.into(),
        }
    }

    /// The patient batch of a write holding X: fence absent, then the hold.
    async fn hold(shards: &dyn Shards, patient: &str, token: &[u8; 16], x: &Ident) -> bool {
        let batch = Batch {
            conditions: vec![Condition {
                key: fence_key(patient, token, x),
                expect: Expect::Absent,
            }],
            ops: vec![Op::Put {
                key: hold_key(patient, x),
                value: Bytes::copy_from_slice(token),
            }],
        };
        shards
            .write(patient, batch, Duration::from_secs(1))
            .await
            .unwrap()
            == BatchResult::Applied
    }

    const D: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_stalled_claim_is_revoked_after_the_grace_and_its_late_write_fails() {
        let shards = StoreShards::new();
        let x = insz("85073003328");
        let mpi = Mpi {
            shards: &*shards,
            grace: Duration::from_millis(100),
            attempts: 8,
        };
        // P's coordinator claims X, then stalls before its patient batch.
        assert_eq!(
            mpi.claim(&x, "p", &[1; 16], D).await.unwrap(),
            Claim::Claimed
        );
        // Within the grace, Q waits; after it, Q revokes P's claim and takes X.
        let started = Instant::now();
        assert_eq!(
            mpi.claim(&x, "q", &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(
            started.elapsed() >= Duration::from_millis(90),
            "revoked within the grace"
        );
        // P's late batch finds its fence and writes nothing.
        assert!(!hold(&*shards, "p", &[1; 16], &x).await);
        assert!(shards.get(&hold_key("p", &x)).is_none());
        // Not held until Q's batch commits; then Q.
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), None);
        assert!(hold(&*shards, "q", &[2; 16], &x).await);
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), Some("q".into()));
        // A third claimant finds it held, however old the claim.
        let mpi0 = Mpi {
            grace: Duration::ZERO,
            ..mpi
        };
        assert_eq!(
            mpi0.claim(&x, "r", &[3; 16], D).await.unwrap(),
            Claim::Held { holder: "q".into() }
        );
        // A retry of Q's own request finds its claim.
        assert_eq!(
            mpi0.claim(&x, "q", &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
    }

    #[tokio::test]
    async fn a_released_identifier_can_be_claimed_again() {
        let shards = StoreShards::new();
        let x = insz("00010100105");
        let mpi = Mpi {
            shards: &*shards,
            grace: Duration::from_secs(30),
            attempts: 8,
        };
        assert_eq!(
            mpi.claim(&x, "p", &[1; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(hold(&*shards, "p", &[1; 16], &x).await);
        // P's write that removes X deletes its hold, then releases the claim.
        let drop_hold = Batch {
            conditions: vec![],
            ops: vec![Op::Delete {
                key: hold_key("p", &x),
            }],
        };
        shards.write("p", drop_hold, D).await.unwrap();
        mpi.release(&x, "p", &[1; 16], D).await.unwrap();
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), None);
        // No grace to wait: the record says released.
        let started = Instant::now();
        assert_eq!(
            mpi.claim(&x, "q", &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

        /// Many patients race for one identifier with a zero grace (every pending claim may be
        /// revoked at once: the worst clocks can do), some coordinators "crash" between claim
        /// and hold, some release. Whatever the interleaving: at most one patient holds X, and
        /// a lookup names exactly the holder.
        #[test]
        fn no_two_patients_ever_hold_one_identifier(
            plan in proptest::collection::vec((0u8..3, proptest::bool::ANY), 2..10),
            seed in 0u64..1000,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let shards = StoreShards::new();
                let x = insz("85073003328");
                let tasks: Vec<_> = plan.iter().enumerate().map(|(i, &(crash, release))| {
                    let shards = Arc::clone(&shards);
                    let x = x.clone();
                    tokio::spawn(async move {
                        for _ in 0..(seed as usize + i) % 3 {
                            tokio::task::yield_now().await;
                        }
                        let mpi = Mpi { shards: &*shards, grace: Duration::ZERO, attempts: 8 };
                        let patient = format!("p{i}");
                        let token = [i as u8 + 1; 16];
                        match mpi.claim(&x, &patient, &token, D).await {
                            Ok(Claim::Claimed) if crash == 0 => {} // crashed before its batch
                            Ok(Claim::Claimed) => {
                                let held = hold(&*shards, &patient, &token, &x).await;
                                if held && release {
                                    let drop_hold = Batch { conditions: vec![], ops: vec![Op::Delete { key: hold_key(&patient, &x) }] };
                                    shards.write(&patient, drop_hold, D).await.unwrap();
                                    mpi.release(&x, &patient, &token, D).await.unwrap();
                                }
                            }
                            Ok(Claim::Held { .. }) | Err(_) => {}
                        }
                    })
                }).collect();
                for t in tasks {
                    t.await.unwrap();
                }
                let holders: Vec<String> = (0..plan.len())
                    .map(|i| format!("p{i}"))
                    .filter(|p| shards.get(&hold_key(p, &x)).is_some())
                    .collect();
                assert!(holders.len() <= 1, "holders {holders:?}");
                let mpi = Mpi { shards: &*shards, grace: Duration::ZERO, attempts: 8 };
                assert_eq!(mpi.lookup(&x, D).await.unwrap(), holders.first().cloned());
            });
        }
    }

    #[test]
    fn claim_records_round_trip() {
        let r = ClaimRecord {
            generation: 7,
            state: State::Claimed,
            token: [9; 16],
            claimed_at_micros: 1_700_000_000_000_000,
            patient: "patient-42".into(),
        };
        assert_eq!(ClaimRecord::decode(&r.encode()), Some(r.clone()));
        let released = ClaimRecord {
            state: State::Released,
            ..r
        };
        assert_eq!(ClaimRecord::decode(&released.encode()), Some(released));
        assert_eq!(ClaimRecord::decode(b"short"), None);
    }
}
