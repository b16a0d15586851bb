//! Bounded memory for training: per (task, profile), a sliding window of
//! the most recent examples plus a uniform reservoir sample (Vitter's
//! algorithm R) of every example that left the window.
//!
//! smartcore has no incremental fit, so each retrain fits on
//! window + reservoir: recent behaviour in full, older behaviour sampled.
//! Memory is `(window + reservoir) * examples`, whatever the stream's length.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One labelled reading, as a model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Features over the device's window ending at this reading
    /// (`proto::features`).
    pub features: Vec<f32>,
    /// Class index in the task's classes.
    pub class: usize,
    /// The reading's timestamp (µs since the epoch): the split is by it.
    pub ts_micros: i64,
    /// Where the reading came from: Kafka `edgeloop.readings` partition and
    /// offset (lineage).
    pub partition: i32,
    pub offset: i64,
    /// Rules version of its label.
    pub rules_version: Arc<str>,
}

/// A uniform sample of at most `capacity` items of a stream of any length.
#[derive(Debug)]
pub struct Reservoir<T> {
    items: Vec<T>,
    capacity: usize,
    seen: u64,
    rng: ChaCha8Rng,
}

impl<T> Reservoir<T> {
    pub fn new(capacity: usize, seed: u64) -> Self {
        Reservoir {
            items: Vec::with_capacity(capacity.min(1 << 16)),
            capacity,
            seen: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Offers one item: after `n` offers each has been kept with probability
    /// `capacity / n`.
    pub fn offer(&mut self, item: T) {
        self.seen += 1;
        if self.items.len() < self.capacity {
            self.items.push(item);
            return;
        }
        let j = self.rng.gen_range(0..self.seen);
        if let Some(slot) = usize::try_from(j).ok().and_then(|j| self.items.get_mut(j)) {
            *slot = item;
        }
    }

    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// Items offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.seen = 0;
    }
}

/// Sliding window + reservoir of one (task, profile).
#[derive(Debug)]
pub struct ExampleBuffer {
    window: VecDeque<Example>,
    window_capacity: usize,
    reservoir: Reservoir<Example>,
}

impl ExampleBuffer {
    pub fn new(window: usize, reservoir: usize, seed: u64) -> Self {
        ExampleBuffer {
            window: VecDeque::with_capacity(window.min(1 << 16)),
            window_capacity: window,
            reservoir: Reservoir::new(reservoir, seed),
        }
    }

    pub fn push(&mut self, example: Example) {
        self.window.push_back(example);
        while self.window.len() > self.window_capacity {
            if let Some(old) = self.window.pop_front() {
                self.reservoir.offer(old);
            }
        }
    }

    /// Every example held: reservoir first, then the window (oldest first).
    pub fn examples(&self) -> impl Iterator<Item = &Example> {
        self.reservoir.items().iter().chain(self.window.iter())
    }

    pub fn len(&self) -> usize {
        self.window.len() + self.reservoir.items().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (a new rules version: old labels mean something
    /// else).
    pub fn clear(&mut self) {
        self.window.clear();
        self.reservoir.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(i: i64) -> Example {
        Example {
            features: vec![i as f32],
            class: 0,
            ts_micros: i,
            partition: 0,
            offset: i,
            rules_version: Arc::from("v"),
        }
    }

    #[test]
    fn reservoir_keeps_a_uniform_sample_in_bounded_memory() {
        // 100 000 items into 1 000 slots, 200 times with different seeds:
        // each decile of the stream should hold ~10% of the sample.
        let (n, k, runs) = (100_000u64, 1_000usize, 200u64);
        let mut per_decile = [0u64; 10];
        for seed in 0..runs {
            let mut r = Reservoir::new(k, seed);
            for i in 0..n {
                r.offer(i);
            }
            assert_eq!(r.items().len(), k, "bounded");
            assert_eq!(r.seen(), n);
            for &i in r.items() {
                per_decile[(i * 10 / n) as usize] += 1;
            }
        }
        let expected = (runs * k as u64) as f64 / 10.0;
        // Chi-square with 9 degrees of freedom: 27.9 is its 0.999 quantile.
        let chi2: f64 = per_decile
            .iter()
            .map(|&o| (o as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.9, "not uniform: {per_decile:?}, chi2 {chi2}");
    }

    #[test]
    fn reservoir_holds_everything_until_full() {
        let mut r = Reservoir::new(10, 1);
        for i in 0..7 {
            r.offer(i);
        }
        assert_eq!(r.items(), &[0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn buffer_keeps_the_latest_window_and_samples_the_rest() {
        let mut b = ExampleBuffer::new(100, 50, 7);
        for i in 0..10_000 {
            b.push(example(i));
        }
        assert_eq!(b.len(), 150);
        let all: Vec<i64> = b.examples().map(|e| e.ts_micros).collect();
        // The window is exactly the last 100.
        assert_eq!(&all[50..], &(9_900..10_000).collect::<Vec<_>>()[..]);
        // The reservoir holds older ones only.
        assert!(all[..50].iter().all(|&t| t < 9_900));
    }
}
