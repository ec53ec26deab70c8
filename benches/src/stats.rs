//! Latency summaries and the one-line JSON every measurement prints.

use std::fmt::Write as _;
use std::time::Duration;

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// Summarises latencies in nanoseconds (sorts them in place). `None` when there are none.
    pub fn of(nanos: &mut [u64]) -> Option<Latency> {
        if nanos.is_empty() {
            return None;
        }
        nanos.sort_unstable();
        let at = |q: f64| {
            let i = ((nanos.len() as f64 * q).ceil() as usize).clamp(1, nanos.len()) - 1;
            nanos[i] as f64 / 1000.0
        };
        Some(Latency {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        })
    }
}

impl Latency {
    /// Percentiles of an HDR histogram of microseconds. `None` when it is empty.
    pub fn of_histogram(h: &hdrhistogram::Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let at = |q: f64| h.value_at_quantile(q) as f64;
        Some(Latency {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: h.max() as f64,
        })
    }
}

/// A flat JSON object built field by field (numbers and plain strings only).
#[derive(Debug, Default)]
pub struct Json(String);

impl Json {
    pub fn new(measurement: &str) -> Self {
        let mut j = Json(String::from("{"));
        j.str("measurement", measurement);
        j
    }

    fn sep(&mut self) {
        if self.0.len() > 1 {
            self.0.push_str(", ");
        }
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.sep();
        let _ = write!(
            self.0,
            "\"{key}\": \"{}\"",
            value.replace('\\', "\\\\").replace('"', "\\\"")
        );
        self
    }

    pub fn num(&mut self, key: &str, value: f64) -> &mut Self {
        self.sep();
        if value.fract() == 0.0 && value.abs() < 1e15 {
            let _ = write!(self.0, "\"{key}\": {}", value as i64);
        } else {
            let _ = write!(self.0, "\"{key}\": {value:.3}");
        }
        self
    }

    pub fn latency(&mut self, prefix: &str, l: Option<Latency>) -> &mut Self {
        if let Some(l) = l {
            self.num(&format!("{prefix}_p50_us"), l.p50)
                .num(&format!("{prefix}_p90_us"), l.p90)
                .num(&format!("{prefix}_p99_us"), l.p99)
                .num(&format!("{prefix}_p999_us"), l.p999)
                .num(&format!("{prefix}_max_us"), l.max);
        }
        self
    }

    pub fn finish(&mut self) -> String {
        format!("{}}}", self.0)
    }
}

pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_ranks() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let l = Latency::of(&mut v).unwrap();
        assert_eq!((l.p50, l.p99, l.max), (500.0, 990.0, 1000.0));
        assert!(Latency::of(&mut []).is_none());
        let json = Json::new("x")
            .num("a", 2.0)
            .num("b", 0.25)
            .str("c", "q\"")
            .finish();
        assert_eq!(
            json,
            r#"{"measurement": "x", "a": 2, "b": 0.250, "c": "q\""}"#
        );
    }
}
