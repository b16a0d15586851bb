//! A latency histogram: log-spaced buckets 2 % wide from 1 µs to hours, so
//! quantiles are exact to 2 % whatever the count, in a fixed 10 KiB.

use serde::Serialize;

const GROWTH: f64 = 1.02;
const BUCKETS: usize = 1300;

#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_micros: u64,
}

/// Quantiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; BUCKETS],
            count: 0,
            max_micros: 0,
        }
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros <= 1 {
        return 0;
    }
    ((micros as f64).ln() / GROWTH.ln())
        .ceil()
        .min((BUCKETS - 1) as f64) as usize
}

fn upper_bound(bucket: usize) -> f64 {
    GROWTH.powi(bucket as i32)
}

impl Histogram {
    /// Records `n` observations of `micros`.
    pub fn record_n(&mut self, micros: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.buckets[bucket_of(micros)] += n;
        self.count += n;
        self.max_micros = self.max_micros.max(micros);
    }

    pub fn record(&mut self, micros: u64) {
        self.record_n(micros, 1);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max_micros = self.max_micros.max(other.max_micros);
    }

    /// The value at quantile `q` (0..=1), in µs: the upper bound of its
    /// bucket, never above the largest value seen.
    pub fn quantile_micros(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target && i < BUCKETS - 1 {
                return (upper_bound(i) as u64).min(self.max_micros);
            }
        }
        self.max_micros
    }

    /// p50, p99 and max, or `None` when nothing was recorded.
    pub fn quantiles(&self) -> Option<Quantiles> {
        (self.count > 0).then(|| Quantiles {
            count: self.count,
            p50_ms: self.quantile_micros(0.5) as f64 / 1000.0,
            p99_ms: self.quantile_micros(0.99) as f64 / 1000.0,
            max_ms: self.max_micros as f64 / 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_uniform_spread_are_within_two_percent() {
        let mut h = Histogram::default();
        for ms in 1..=1000u64 {
            h.record(ms * 1000);
        }
        let q = h.quantiles().unwrap();
        assert_eq!(q.count, 1000);
        assert!((q.p50_ms - 500.0).abs() <= 10.0, "{q:?}");
        assert!((q.p99_ms - 990.0).abs() <= 20.0, "{q:?}");
        assert_eq!(q.max_ms, 1000.0);
    }

    #[test]
    fn an_empty_histogram_has_no_quantiles_and_merging_adds_counts() {
        let mut a = Histogram::default();
        assert!(a.quantiles().is_none());
        let mut b = Histogram::default();
        b.record_n(0, 3);
        b.record_n(u64::MAX, 1);
        a.merge(&b);
        assert_eq!(a.quantiles().unwrap().count, 4);
        assert!(a.quantile_micros(0.5) <= 1);
        assert_eq!(a.quantile_micros(1.0), u64::MAX);
    }
}
