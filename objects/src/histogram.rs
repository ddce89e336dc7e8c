//! Fixed-bucket duration histograms kept with plain atomics: how long reconciles, lease
//! renewals and keepalive transactions take, recorded where they happen (the reactor, the
//! lease keeper, the tick) without a metrics library in this crate. The daemon's `/metrics`
//! renders a [`HistogramSnapshot`] as a Prometheus histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the buckets, from 1 ms to 30 s; one more bucket (`+Inf`)
/// holds anything slower. Fixed, so every histogram has the same, bounded series.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const SLOTS: usize = DURATION_BUCKETS.len() + 1;

/// A histogram of durations over [`DURATION_BUCKETS`]; cheap to record into from many tasks.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; SLOTS],
    /// Sum of every observation, in nanoseconds.
    sum_ns: AtomicU64,
}

/// What a histogram held at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations in this bucket only)`, in order; the last
    /// bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// Observations in all.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// Record one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let slot = DURATION_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(SLOTS - 1);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The buckets, count and sum now (the count is the sum of the buckets read).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), DURATION_BUCKETS.len() + 1);
        assert_eq!(s.buckets[0], (0.001, 2));
        assert_eq!(s.buckets[3], (0.01, 1));
        assert_eq!(s.buckets[SLOTS - 1], (f64::INFINITY, 1));
        assert!((s.sum - 60.0085).abs() < 1e-9, "{}", s.sum);
    }
}
