//! Numbers of the reports: summaries of samples, percentiles, units and verdicts, one copy
//! for every figure set.

use std::time::Duration;

/// Milliseconds as f64.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// MiB of kB (`/proc` reports memory in kB = KiB).
pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Summary of a sample: median (mean of the middle two for even n), min, max, p90
/// (nearest rank).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) p90: f64,
}

/// Summarise `xs` (empty → NaN everywhere).
pub(crate) fn summarize(xs: &[f64]) -> Summary {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Summary {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            p90: f64::NAN,
        };
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Summary {
        median,
        min: v[0],
        max: v[n - 1],
        p90: nearest_rank(&v, 0.9).unwrap_or(f64::NAN),
    }
}

/// The `q` quantile (0 < q ≤ 1) of an ascending sample by nearest rank; `None` when empty.
pub(crate) fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    Some(sorted[rank - 1])
}

/// `PASS` or `MISS`.
pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// Format a per-tick number.
pub(crate) fn per_tick(x: f64) -> String {
    if x == x.trunc() {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_stats() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!((s.median, s.min, s.max, s.p90), (5.5, 1.0, 10.0, 9.0));
        assert_eq!(summarize(&[3.0, 1.0, 2.0, 10.0]).median, 2.5);
        assert!(summarize(&[]).median.is_nan());
    }

    #[test]
    fn nearest_ranks() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        let at = |q| nearest_rank(&xs, q);
        assert_eq!(
            (at(0.5), at(0.9), at(0.99), at(1.0)),
            (Some(50.0), Some(90.0), Some(99.0), Some(100.0))
        );
        assert_eq!(nearest_rank::<f64>(&[], 0.5), None);
        assert_eq!(nearest_rank(&[7], 0.01), Some(7));
    }

    #[test]
    fn per_tick_numbers() {
        assert_eq!(per_tick(3.0), "3");
        assert_eq!(per_tick(1.0 / 3.0), "0.33");
        assert_eq!(verdict(true), "PASS");
    }
}
