//! Page-Hinkley drift detection (Page 1954; Hinkley 1971), for an increase
//! of the mean of a signal. The trainer feeds it, per (task, profile), the
//! disagreement between the live model and the rules' label of each new
//! example (1: they differ, 0: they agree): when the rules start labelling
//! differently from what the live model learned (the fleet's behaviour or
//! the rules changed), the disagreement rate rises and a retrain is due.
//!
//! With `x̄_t` the running mean of `x_1..x_t`:
//! `m_t = Σ_{i≤t} (x_i - x̄_i - δ)`, `M_t = min_{i≤t} m_i`; drift when
//! `m_t - M_t > λ`. `δ` is the change tolerated, `λ` the evidence needed:
//! at a stationary rate `m_t` falls by about `δ` per step, so noise does not
//! accumulate, while a rise of the rate by `d > δ` adds about `d - δ` per
//! step and fires after about `λ / (d - δ)` examples.

/// The detector's state.
#[derive(Debug, Clone)]
pub struct PageHinkley {
    delta: f64,
    threshold: f64,
    min_examples: u64,
    n: u64,
    mean: f64,
    cumulative: f64,
    minimum: f64,
}

impl PageHinkley {
    pub fn new(delta: f64, threshold: f64, min_examples: u64) -> Self {
        PageHinkley {
            delta,
            threshold,
            min_examples,
            n: 0,
            mean: 0.0,
            cumulative: 0.0,
            minimum: 0.0,
        }
    }

    /// Adds one observation; true when drift is detected (the detector then
    /// starts afresh).
    pub fn update(&mut self, x: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        self.cumulative += x - self.mean - self.delta;
        self.minimum = self.minimum.min(self.cumulative);
        if self.n >= self.min_examples && self.statistic() > self.threshold {
            self.reset();
            return true;
        }
        false
    }

    /// `m_t - M_t`.
    pub fn statistic(&self) -> f64 {
        self.cumulative - self.minimum
    }

    pub fn reset(&mut self) {
        self.n = 0;
        self.mean = 0.0;
        self.cumulative = 0.0;
        self.minimum = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Index at which the detector first fires on Bernoulli(p_before) for
    /// `shift_at` steps, then Bernoulli(p_after).
    fn first_alarm(seed: u64, p_before: f64, p_after: f64, shift_at: usize) -> Option<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let d = crate::trainer::config::DriftConfig::default();
        let mut ph = PageHinkley::new(d.delta, d.threshold, d.min_examples);
        (0..shift_at + 20_000).find(|&i| {
            let p = if i < shift_at { p_before } else { p_after };
            ph.update(f64::from(u8::from(rng.gen_bool(p))))
        })
    }

    #[test]
    fn page_hinkley_fires_after_a_shift_in_disagreement() {
        for seed in 0..20 {
            let alarm = first_alarm(seed, 0.05, 0.4, 10_000).expect("fires");
            assert!(alarm >= 10_000, "seed {seed}: false alarm at {alarm}");
            // About (0.4 - 0.05 - δ) per step: ~300 steps for λ = 100.
            assert!(alarm < 10_000 + 1_000, "seed {seed}: late alarm at {alarm}");
        }
    }

    #[test]
    fn page_hinkley_stays_quiet_on_noise() {
        for seed in 0..20 {
            // 30 000 steps of a stationary 10% disagreement rate.
            assert_eq!(first_alarm(seed, 0.1, 0.1, 10_000), None, "seed {seed}");
        }
    }

    #[test]
    fn page_hinkley_ignores_non_finite_input() {
        let mut ph = PageHinkley::new(0.0, 1.0, 1);
        assert!(!ph.update(f64::NAN));
        assert_eq!(ph.statistic(), 0.0);
    }
}
