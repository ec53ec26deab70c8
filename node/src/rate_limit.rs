//! Rate limits per identity: a token bucket per caller, on each node, for the roles that name
//! people (clinicians and patients). A stolen clinician's token then reads at a clinician's
//! pace, not at the cluster's. Services, operators and auditors are not limited here (their
//! load is the application's; the in-flight limit bounds it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Callers tracked at most; past it, buckets full again (idle for a burst's time) are dropped.
const CALLERS_MAX: usize = 100_000;

/// Token buckets by caller.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_second` calls a second on average, `burst` at once; None when `per_second` is 0.
    pub fn new(per_second: u32, burst: u32) -> Option<RateLimiter> {
        (per_second > 0).then(|| RateLimiter {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Takes one call of `caller` at `now`; false when the caller is over its rate.
    pub fn admit(&self, caller: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= CALLERS_MAX && !buckets.contains_key(caller) {
            let full_after = self.burst / self.per_second;
            buckets.retain(|_, b| now.saturating_duration_since(b.at).as_secs_f64() < full_after);
        }
        let bucket = buckets.entry(caller.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_caller_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let limiter = RateLimiter::new(10, 20).unwrap();
        let t0 = Instant::now();
        let admitted = (0..30).filter(|_| limiter.admit("dr-x", t0)).count();
        assert_eq!(admitted, 20, "the burst");
        assert!(
            limiter.admit("dr-y", t0),
            "another caller has its own bucket"
        );
        // A tenth of a second later: one more call (10 a second).
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.admit("dr-x", t1));
        assert!(!limiter.admit("dr-x", t1));
        // After a long pause the bucket is full again, never fuller.
        let t2 = t1 + Duration::from_secs(60);
        let admitted = (0..30).filter(|_| limiter.admit("dr-x", t2)).count();
        assert_eq!(admitted, 20);
        assert!(RateLimiter::new(0, 10).is_none(), "0: no limit");
    }
}
