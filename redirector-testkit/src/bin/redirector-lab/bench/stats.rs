//! Rates and latency distributions.
use std::time::Duration;

use serde::Serialize;

/// At most this many latency points are kept per setup for the CDF plots.
const CDF_POINTS: usize = 2000;

/// One setup's result in one scenario.
#[derive(Serialize, Clone, Default)]
pub struct Stats {
    /// Connections (or transactions) measured.
    pub count: usize,
    /// Per second: connections, transactions, or MiB (absent for pure
    /// latencies).
    #[serde(skip_serializing_if = "is_zero")]
    pub rate_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Sorted latencies (µs) thinned to at most [`CDF_POINTS`], for plots.
    #[serde(skip)]
    pub cdf_us: Vec<f64>,
}

impl Stats {
    /// From latency samples measured over `seconds` of wall time.
    pub fn from_samples(samples: &mut [Duration], seconds: f64) -> Self {
        samples.sort();
        let us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        let step = us.len().div_ceil(CDF_POINTS).max(1);
        let mut cdf_us: Vec<f64> = us.iter().step_by(step).copied().collect();
        if let (Some(last), Some(max)) = (cdf_us.last(), us.last()) {
            if last < max {
                cdf_us.push(*max);
            }
        }
        Self {
            count: us.len(),
            rate_per_s: if seconds > 0.0 { us.len() as f64 / seconds } else { 0.0 },
            p50_us: quantile(&us, 0.5),
            p90_us: quantile(&us, 0.9),
            p99_us: quantile(&us, 0.99),
            p999_us: quantile(&us, 0.999),
            max_us: us.last().copied().unwrap_or(0.0),
            cdf_us,
        }
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The `p` quantile of sorted values (nearest rank below), 0 when empty.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// `a / b`, or 0 when `b` is 0 (a setup that measured nothing).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Microseconds as milliseconds with two decimals.
pub fn ms(us: f64) -> String {
    format!("{:.2}", us / 1e3)
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_thinning() {
        let mut v: Vec<Duration> = (1..=10_000u64).rev().map(Duration::from_micros).collect();
        let s = Stats::from_samples(&mut v, 2.0);
        assert_eq!(s.count, 10_000);
        assert_eq!(s.rate_per_s, 5000.0);
        assert_eq!(s.p50_us, 5000.0);
        assert_eq!(s.p99_us, 9900.0);
        assert_eq!(s.max_us, 10_000.0);
        assert!(s.cdf_us.len() <= CDF_POINTS + 1);
        assert_eq!(s.cdf_us.last(), Some(&10_000.0));
        assert!(s.cdf_us.windows(2).all(|w| w[0] <= w[1]));
        let empty = Stats::from_samples(&mut [], 1.0);
        assert_eq!((empty.count, empty.p99_us), (0, 0.0));
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
