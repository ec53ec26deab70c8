//! The master patient index: which patient holds an identifier of an indexed system, and the
//! protocol that keeps **no two patients holding the same identifier**, across shards, under
//! concurrent creates, retries and crashes (docs/schema.md §7).
//!
//! - The claim record E[X] of identifier X lives in the shard of the routing key
//!   `mpi:<system>|<value>`, records key `m`: generation, state (claimed or released), token
//!   (fresh for every claiming attempt: a retry or a re-import never meets its own old fence),
//!   claim time, patient.
//! - H_P(X) (`i/X` in patient P's records space) is present while P's current Patient version
//!   holds X; it is written only by P's Patient batches, conditioned on the fence F_P(T, X)
//!   (`f/T/X`) being absent.
//! - E[X] leaves (claimed, P, T) only after a revoke committed F_P(T, X) under the condition
//!   H_P(X) Absent. Hence H_P(X) = T implies E[X] = (claimed, P, T), and two holders would be
//!   named by the one record E[X].

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::Error;
use crate::keys::{Ident, PatientId, PatientKeys};
use crate::kv::{Batch, BatchResult, Condition, Expect, Op, Shards};
use crate::now_micros;

/// H_P(X) of patient `patient`.
fn hold_key(patient: &PatientId, x: &Ident) -> Bytes {
    PatientKeys::new(patient).hold(x)
}

/// F_P(T, X).
fn fence_key(patient: &PatientId, token: &[u8], x: &Ident) -> Bytes {
    PatientKeys::new(patient).fence(token, x)
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
    patient: PatientId,
}

impl ClaimRecord {
    fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(33 + self.patient.as_str().len());
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.push(match self.state {
            State::Claimed => 1,
            State::Released => 2,
        });
        v.extend_from_slice(&self.token);
        v.extend_from_slice(&self.claimed_at_micros.to_be_bytes());
        v.extend_from_slice(self.patient.as_str().as_bytes());
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
        let patient = PatientId::parse(std::str::from_utf8(b.get(33..)?).ok()?, "patient").ok()?;
        Some(ClaimRecord {
            generation,
            state,
            token,
            claimed_at_micros,
            patient,
        })
    }
}

/// The age of a claim made at `claimed_at` (unix micros) seen at `now`, for the grace rule: a
/// claim stamped in the future counts as made now (clamped), unless it lies more than the grace
/// ahead: then its stamp is not believable and the claim counts as expired. So a claimant's fast
/// clock blocks others for at most twice the grace; a slow one, for the grace (measured by the
/// waiting claimant's own monotonic clock too).
fn claim_age(now: i64, claimed_at: i64, grace: Duration) -> Duration {
    let lead = claimed_at.saturating_sub(now);
    if lead > 0 {
        return if Duration::from_micros(lead as u64) > grace {
            grace
        } else {
            Duration::ZERO
        };
    }
    Duration::from_micros(now.saturating_sub(claimed_at) as u64)
}

/// What claiming an identifier found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The claim is this attempt's.
    Claimed,
    /// Another patient holds the identifier, or (when `holder` is the claimant) the claimant
    /// already holds it.
    Held { holder: PatientId },
}

/// The identifiers of indexed `systems` a Patient resource holds, sorted, without duplicates,
/// each with the path of its first occurrence under `field`.
pub fn indexed_identifiers(
    resource: Option<&dossier_api::v1::Resource>,
    systems: &[String],
    field: &str,
) -> Vec<(Ident, String)> {
    use dossier_api::v1::resource::Kind;
    let Some(Kind::Patient(p)) = resource.and_then(|r| r.kind.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<(Ident, String)> = Vec::new();
    for (i, id) in p.identifiers.iter().enumerate() {
        if !systems.contains(&id.system) {
            continue;
        }
        let x = Ident {
            system: id.system.clone(),
            value: id.value.clone(),
        };
        if !out.iter().any(|(y, _)| *y == x) {
            out.push((x, format!("{field}.patient.identifiers[{i}]")));
        }
    }
    out.sort();
    out
}

/// What claiming every identifier of a write found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAll {
    /// Every identifier is claimed under the attempt's token.
    Claimed,
    /// The identifier at `field` is held by `holder` (the patient itself when it already holds
    /// it); the claims made before it were given back.
    Held { holder: PatientId, field: String },
}

/// The index protocol over a `Shards` transport.
#[derive(Debug)]
pub struct Mpi<'a, S: Shards> {
    pub shards: &'a S,
    /// How long a claim whose patient was never written blocks other claimants.
    pub grace: Duration,
    /// Bound on the protocol's retry loops (conflicting CASes, claims within their grace).
    pub attempts: u32,
}

impl<S: Shards> Mpi<'_, S> {
    async fn read_entry(
        &self,
        x: &Ident,
        deadline: Duration,
    ) -> Result<(Option<Bytes>, Option<ClaimRecord>), S::Error> {
        let raw = self
            .shards
            .read(&x.route_key(), vec![x.claim_key()], deadline)
            .await?
            .pop()
            .flatten();
        let record = match &raw {
            None => None,
            Some(b) => Some(
                ClaimRecord::decode(b)
                    .ok_or_else(|| Error::corrupt(format!("claim record of {}", x.joined())))?,
            ),
        };
        Ok((raw, record))
    }

    /// The token `patient` holds X under (H_P(X)), if it holds X.
    pub async fn holds(
        &self,
        patient: &PatientId,
        x: &Ident,
        deadline: Duration,
    ) -> Result<Option<Bytes>, S::Error> {
        Ok(self
            .shards
            .read(patient.as_str(), vec![hold_key(patient, x)], deadline)
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
    ) -> Result<bool, S::Error> {
        let batch = Batch {
            conditions: vec![Condition {
                key: x.claim_key(),
                expect: match old {
                    Some(b) => Expect::Equals(b),
                    None => Expect::Absent,
                },
            }],
            ops: vec![Op::Put {
                key: x.claim_key(),
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
        patient: &PatientId,
        token: &[u8],
        deadline: Duration,
    ) -> Result<bool, S::Error> {
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
        Ok(self.shards.write(patient.as_str(), batch, deadline).await? == BatchResult::Applied)
    }

    /// Claims X for `patient` under `token`, fresh for this attempt (docs/schema.md §7, claim).
    ///
    /// A pending claim of another patient blocks for the grace period, measured on both clocks:
    /// its `claimed_at` (clamped: a time in the future counts as now) and this claimant's own
    /// monotonic clock since it first saw that claim, so a claimant whose clock runs behind
    /// waits no longer than the grace. A pending claim of the same patient (an earlier attempt
    /// of this or another write of the patient) is fenced at once.
    pub async fn claim(
        &self,
        x: &Ident,
        patient: &PatientId,
        token: &[u8; 16],
        deadline: Duration,
    ) -> Result<Claim, S::Error> {
        let started = tokio::time::Instant::now();
        let left = || deadline.saturating_sub(started.elapsed());
        let mut first_seen: Option<(u64, tokio::time::Instant)> = None;
        for _ in 0..self.attempts.max(1) * 4 {
            if left().is_zero() {
                return Err(self.shards.deadline_passed());
            }
            let (raw, record) = self.read_entry(x, left()).await?;
            let mine = ClaimRecord {
                generation: record.as_ref().map_or(1, |r| r.generation + 1),
                state: State::Claimed,
                token: *token,
                claimed_at_micros: now_micros(),
                patient: patient.clone(),
            };
            match &record {
                None => {
                    if self.cas(x, None, &mine, left()).await? {
                        return Ok(Claim::Claimed);
                    }
                }
                Some(r)
                    if r.state == State::Claimed && r.patient == *patient && r.token == *token =>
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
                    if r.patient != *patient {
                        let seen = match first_seen {
                            Some((g, at)) if g == r.generation => at,
                            _ => {
                                let now = tokio::time::Instant::now();
                                first_seen = Some((r.generation, now));
                                now
                            }
                        };
                        let age = claim_age(now_micros(), r.claimed_at_micros, self.grace)
                            .max(seen.elapsed());
                        if age < self.grace {
                            // The claimant's patient write may still come.
                            let wait = (self.grace - age)
                                .min(Duration::from_millis(50))
                                .min(left());
                            tokio::time::sleep(wait).await;
                            continue;
                        }
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
        Err(Error::Contended(format!("identifier {} is contended", x.joined())).into())
    }

    /// Gives up claim (`patient`, `token`) of X, after a write that removed X committed or
    /// after a write that claimed X failed. Cleanup only: a claim left behind is revoked by the
    /// next claimant after the grace period.
    pub async fn release(
        &self,
        x: &Ident,
        patient: &PatientId,
        token: &[u8],
        deadline: Duration,
    ) -> Result<(), S::Error> {
        if !self.revoke(x, patient, token, deadline).await? {
            return Ok(()); // The patient holds X under this token: nothing to release.
        }
        let (raw, record) = self.read_entry(x, deadline).await?;
        if let Some(r) = record
            && r.state == State::Claimed
            && r.patient == *patient
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

    /// Claims `idents` in order for `patient` under `token`; on a held identifier or an error,
    /// gives back what it claimed first (claims are definite and nothing was written).
    pub async fn claim_all(
        &self,
        patient: &PatientId,
        token: &[u8; 16],
        idents: &[(Ident, String)],
        deadline: Duration,
    ) -> Result<ClaimAll, S::Error> {
        for (n, (x, field)) in idents.iter().enumerate() {
            let claimed = idents[..n].iter().map(|(x, _)| x);
            match self.claim(x, patient, token, deadline).await {
                Ok(Claim::Claimed) => {}
                Ok(Claim::Held { holder }) => {
                    self.release_all(patient, token, claimed, deadline).await;
                    return Ok(ClaimAll::Held {
                        holder,
                        field: field.clone(),
                    });
                }
                Err(e) => {
                    self.release_all(patient, token, claimed, deadline).await;
                    return Err(e);
                }
            }
        }
        Ok(ClaimAll::Claimed)
    }

    /// Best-effort release of claims: a claim a failure leaves behind is revoked by the next
    /// claimant (at once for the same patient, after the grace period for another).
    pub async fn release_all<'x>(
        &self,
        patient: &PatientId,
        token: &[u8],
        idents: impl Iterator<Item = &'x Ident>,
        deadline: Duration,
    ) {
        for x in idents {
            if let Err(e) = self.release(x, patient, token, deadline).await {
                // The identifier's value (a national number) and the error (which may name its
                // routing key) stay out of the log.
                let _ = e;
                tracing::warn!(
                    system = %x.system,
                    "release of an identifier claim failed; the next claimant revokes it"
                );
            }
        }
    }

    /// The patient holding X, linearizably (docs/schema.md §7, LookupIdentifier).
    pub async fn lookup(
        &self,
        x: &Ident,
        deadline: Duration,
    ) -> Result<Option<PatientId>, S::Error> {
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
        Err(Error::Contended(format!(
            "identifier {} changed under every lookup",
            x.joined()
        ))
        .into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::testing::Map;

    /// Every routing key in one replica map (`testing::Map`), batches applied atomically:
    /// conditions behave as on a shard, and tasks interleave at every call.
    #[derive(Default)]
    struct MapShards {
        map: Mutex<Map>,
    }

    impl MapShards {
        fn new() -> Arc<MapShards> {
            Arc::new(MapShards::default())
        }

        fn get(&self, key: &[u8]) -> Option<Bytes> {
            self.map.lock().unwrap().0.get(key).cloned()
        }
    }

    impl Shards for MapShards {
        type Error = Error;

        async fn read(
            &self,
            _route: &str,
            keys: Vec<Bytes>,
            _d: Duration,
        ) -> Result<Vec<Option<Bytes>>, Error> {
            tokio::task::yield_now().await;
            Ok(keys.iter().map(|k| self.get(k)).collect())
        }

        async fn write(
            &self,
            _route: &str,
            batch: Batch,
            _d: Duration,
        ) -> Result<BatchResult, Error> {
            tokio::task::yield_now().await;
            let result = self.map.lock().unwrap().apply(batch);
            tokio::task::yield_now().await;
            Ok(result)
        }

        fn deadline_passed(&self) -> Error {
            Error::Contended("deadline".into())
        }
    }

    fn pid(p: &str) -> PatientId {
        PatientId::parse(p, "patient").unwrap()
    }

    fn insz(v: &str) -> Ident {
        Ident {
            system: crate::SYSTEM_INSZ.into(),
            value: v.into(),
        }
    }

    /// The patient batch of a write holding X: fence absent, then the hold.
    async fn hold(shards: &MapShards, patient: &PatientId, token: &[u8; 16], x: &Ident) -> bool {
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
            .write(patient.as_str(), batch, Duration::from_secs(1))
            .await
            .unwrap()
            == BatchResult::Applied
    }

    const D: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_stalled_claim_is_revoked_after_the_grace_and_its_late_write_fails() {
        let shards = MapShards::new();
        let x = insz("85073003328");
        let mpi = Mpi {
            shards: &*shards,
            grace: Duration::from_millis(100),
            attempts: 8,
        };
        // P's coordinator claims X, then stalls before its patient batch.
        assert_eq!(
            mpi.claim(&x, &pid("p"), &[1; 16], D).await.unwrap(),
            Claim::Claimed
        );
        // Within the grace, Q waits; after it, Q revokes P's claim and takes X.
        let started = Instant::now();
        assert_eq!(
            mpi.claim(&x, &pid("q"), &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(
            started.elapsed() >= Duration::from_millis(90),
            "revoked within the grace"
        );
        // P's late batch finds its fence and writes nothing.
        assert!(!hold(&shards, &pid("p"), &[1; 16], &x).await);
        assert!(shards.get(&hold_key(&pid("p"), &x)).is_none());
        // Not held until Q's batch commits; then Q.
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), None);
        assert!(hold(&shards, &pid("q"), &[2; 16], &x).await);
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), Some(pid("q")));
        // A third claimant finds it held, however old the claim.
        let mpi0 = Mpi {
            grace: Duration::ZERO,
            ..mpi
        };
        assert_eq!(
            mpi0.claim(&x, &pid("r"), &[3; 16], D).await.unwrap(),
            Claim::Held { holder: pid("q") }
        );
        // A retry of Q's own request finds its claim.
        assert_eq!(
            mpi0.claim(&x, &pid("q"), &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
    }

    #[tokio::test]
    async fn a_released_identifier_can_be_claimed_again() {
        let shards = MapShards::new();
        let x = insz("00010100105");
        let mpi = Mpi {
            shards: &*shards,
            grace: Duration::from_secs(30),
            attempts: 8,
        };
        assert_eq!(
            mpi.claim(&x, &pid("p"), &[1; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(hold(&shards, &pid("p"), &[1; 16], &x).await);
        // P's write that removes X deletes its hold, then releases the claim.
        let drop_hold = Batch {
            conditions: vec![],
            ops: vec![Op::Delete {
                key: hold_key(&pid("p"), &x),
            }],
        };
        shards.write("p", drop_hold, D).await.unwrap();
        mpi.release(&x, &pid("p"), &[1; 16], D).await.unwrap();
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), None);
        // No grace to wait: the record says released.
        let started = Instant::now();
        assert_eq!(
            mpi.claim(&x, &pid("q"), &[2; 16], D).await.unwrap(),
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
                let shards = MapShards::new();
                let x = insz("85073003328");
                let tasks: Vec<_> = plan.iter().enumerate().map(|(i, &(crash, release))| {
                    let shards = Arc::clone(&shards);
                    let x = x.clone();
                    tokio::spawn(async move {
                        for _ in 0..(seed as usize + i) % 3 {
                            tokio::task::yield_now().await;
                        }
                        let mpi = Mpi { shards: &*shards, grace: Duration::ZERO, attempts: 8 };
                        let patient = pid(&format!("p{i}"));
                        let token = [i as u8 + 1; 16];
                        match mpi.claim(&x, &patient, &token, D).await {
                            Ok(Claim::Claimed) if crash == 0 => {} // crashed before its batch
                            Ok(Claim::Claimed) => {
                                let held = hold(&shards, &patient, &token, &x).await;
                                if held && release {
                                    let drop_hold = Batch { conditions: vec![], ops: vec![Op::Delete { key: hold_key(&patient, &x) }] };
                                    shards.write(patient.as_str(), drop_hold, D).await.unwrap();
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
                    .filter(|p| shards.get(&hold_key(&pid(p), &x)).is_some())
                    .collect();
                assert!(holders.len() <= 1, "holders {holders:?}");
                let mpi = Mpi { shards: &*shards, grace: Duration::ZERO, attempts: 8 };
                assert_eq!(mpi.lookup(&x, D).await.unwrap(), holders.first().map(|p| pid(p)));
            });
        }
    }

    /// Seeds E[X] with a claim by `p`, never written, stamped `lead` micros from now.
    async fn stalled_claim(shards: &MapShards, x: &Ident, lead: i64) {
        let claim = ClaimRecord {
            generation: 1,
            state: State::Claimed,
            token: [1; 16],
            claimed_at_micros: now_micros() + lead,
            patient: pid("p"),
        };
        let seed = Batch {
            conditions: vec![],
            ops: vec![Op::Put {
                key: x.claim_key(),
                value: claim.encode(),
            }],
        };
        shards.write("m", seed, D).await.unwrap();
    }

    #[test]
    fn claim_ages_clamp_the_future_and_expire_the_unbelievable() {
        let g = Duration::from_secs(30);
        assert_eq!(
            claim_age(100_000_000, 90_000_000, g),
            Duration::from_secs(10)
        );
        assert_eq!(claim_age(100_000_000, 110_000_000, g), Duration::ZERO);
        assert_eq!(claim_age(100_000_000, 100_000_000 + 31_000_000, g), g);
        assert_eq!(claim_age(i64::MIN, i64::MAX, g), g);
        assert_eq!(
            claim_age(i64::MAX, i64::MIN, g),
            Duration::from_micros(i64::MAX as u64)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_stamped_in_the_future_blocks_others_for_the_grace_at_most() {
        let x = insz("85073003328");
        // An hour ahead (a coordinator's clock gone wrong): expired at once, for the settings'
        // attempts and a request's deadline.
        let shards = MapShards::new();
        stalled_claim(&shards, &x, 3_600_000_000).await;
        let mpi = Mpi {
            shards: &*shards,
            grace: Duration::from_secs(30),
            attempts: 8,
        };
        let started = tokio::time::Instant::now();
        assert_eq!(
            mpi.claim(&x, &pid("q"), &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(started.elapsed() < Duration::from_millis(10));
        // A little ahead, within the grace: clamped to now, and expired once the claimant has
        // itself watched it for the grace (the stated age alone would never get there under a
        // paused clock).
        let shards = MapShards::new();
        stalled_claim(&shards, &x, 50_000).await;
        let grace = Duration::from_millis(200);
        let mpi = Mpi {
            shards: &*shards,
            grace,
            attempts: 8,
        };
        let started = tokio::time::Instant::now();
        assert_eq!(
            mpi.claim(&x, &pid("q"), &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
        let waited = started.elapsed();
        assert!(
            waited >= grace && waited < grace + Duration::from_millis(100),
            "waited {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_patient_reclaims_a_released_or_revoked_identifier_with_a_fresh_token() {
        let shards = MapShards::new();
        let x = insz("00010100105");
        let mpi = Mpi {
            shards: &*shards,
            grace: Duration::from_secs(30),
            attempts: 8,
        };
        // p's first import claims X and stalls; its claim is revoked by p's own next attempt at
        // once (same patient: no grace), and that attempt's batch holds X.
        assert_eq!(
            mpi.claim(&x, &pid("p"), &[1; 16], D).await.unwrap(),
            Claim::Claimed
        );
        let started = Instant::now();
        assert_eq!(
            mpi.claim(&x, &pid("p"), &[2; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            !hold(&shards, &pid("p"), &[1; 16], &x).await,
            "the stalled attempt is fenced"
        );
        assert!(hold(&shards, &pid("p"), &[2; 16], &x).await);
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), Some(pid("p")));
        // p gives X up (its patient was marked entered-in-error), then is imported again.
        let drop_hold = Batch {
            conditions: vec![],
            ops: vec![Op::Delete {
                key: hold_key(&pid("p"), &x),
            }],
        };
        shards.write("p", drop_hold, D).await.unwrap();
        mpi.release(&x, &pid("p"), &[2; 16], D).await.unwrap();
        assert_eq!(
            mpi.claim(&x, &pid("p"), &[3; 16], D).await.unwrap(),
            Claim::Claimed
        );
        assert!(hold(&shards, &pid("p"), &[3; 16], &x).await);
        assert_eq!(mpi.lookup(&x, D).await.unwrap(), Some(pid("p")));
        // Claiming what p already holds says so.
        assert_eq!(
            mpi.claim(&x, &pid("p"), &[4; 16], D).await.unwrap(),
            Claim::Held { holder: pid("p") }
        );
    }

    #[test]
    fn claim_records_round_trip() {
        let r = ClaimRecord {
            generation: 7,
            state: State::Claimed,
            token: [9; 16],
            claimed_at_micros: 1_700_000_000_000_000,
            patient: pid("patient-42"),
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
