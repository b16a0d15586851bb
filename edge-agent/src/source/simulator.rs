//! A simulated sensor: a slow sine per channel plus Gaussian-like noise, and,
//! now and then, an anomaly episode on one channel. The simulator knows the
//! true label of every reading (`normal`, `spike`, `drift`, `stuck`), so label
//! quality can be measured against the truth later.
//!
//! Values depend only on the seed and the reading's position, never on the
//! clock, so two runs with the same seed produce the same values.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Labels the simulator emits.
pub const LABEL_NORMAL: &str = "normal";
pub const LABEL_SPIKE: &str = "spike";
pub const LABEL_DRIFT: &str = "drift";
pub const LABEL_STUCK: &str = "stuck";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    /// Readings per second (of simulated time).
    pub rate_hz: f64,
    /// Simulated seconds per wall-clock second: above 1 fast-forwards (the
    /// timestamps keep `rate_hz` apart), for tests and benchmarks.
    pub speedup: f64,
    /// Seed of the generator; the same seed gives the same values.
    pub seed: u64,
    /// Stop after this many readings (none: run until shut down).
    pub limit: Option<u64>,
    /// Probability that an anomaly episode starts at a given reading.
    pub anomaly_rate: f64,
    /// The channels, each one column in the data set.
    pub channels: Vec<ChannelSpec>,
}

/// One simulated channel: `base + amplitude * sin(2π t / period) + noise`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    pub name: String,
    pub base: f64,
    pub amplitude: f64,
    /// Period of the sine, in seconds of simulated time.
    pub period_s: f64,
    /// Standard deviation of the noise.
    pub noise: f64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            rate_hz: 10.0,
            speedup: 1.0,
            seed: 1,
            limit: None,
            anomaly_rate: 0.002,
            channels: vec![
                ChannelSpec {
                    name: "temperature".into(),
                    base: 21.0,
                    amplitude: 4.0,
                    period_s: 600.0,
                    noise: 0.2,
                },
                ChannelSpec {
                    name: "humidity".into(),
                    base: 45.0,
                    amplitude: 8.0,
                    period_s: 900.0,
                    noise: 0.5,
                },
                ChannelSpec {
                    name: "vibration".into(),
                    base: 1.0,
                    amplitude: 0.3,
                    period_s: 60.0,
                    noise: 0.05,
                },
            ],
        }
    }
}

impl SimulatorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.rate_hz.is_finite() || self.rate_hz <= 0.0 {
            return Err(format!(
                "rate_hz: must be a positive number, not {}",
                self.rate_hz
            ));
        }
        if !self.speedup.is_finite() || self.speedup <= 0.0 {
            return Err(format!(
                "speedup: must be a positive number, not {}",
                self.speedup
            ));
        }
        if !(0.0..=1.0).contains(&self.anomaly_rate) {
            return Err(format!(
                "anomaly_rate: must be within 0..=1, not {}",
                self.anomaly_rate
            ));
        }
        if self.channels.is_empty() {
            return Err("channels: at least one channel is needed".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            if c.name.is_empty()
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            {
                return Err(format!(
                    "channels[{i}].name: {:?} must be letters, digits or '_'",
                    c.name
                ));
            }
            if !names.insert(&c.name) {
                return Err(format!("channels[{i}].name: {:?} appears twice", c.name));
            }
            if c.period_s.is_nan() || c.period_s <= 0.0 {
                return Err(format!("channels[{i}].period_s: must be positive"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Spike,
    Drift,
    Stuck,
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    kind: Kind,
    channel: usize,
    /// Readings left in the episode, this one included.
    left: u32,
    length: u32,
    /// The frozen value of a `stuck` episode.
    stuck_at: f64,
}

/// One generated reading: values in channel order and the true label.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReading {
    pub values: Vec<f64>,
    pub label: &'static str,
}

pub struct Simulator {
    config: SimulatorConfig,
    rng: ChaCha8Rng,
    index: u64,
    episode: Option<Episode>,
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Simulator {
            config,
            rng,
            index: 0,
            episode: None,
        }
    }

    pub fn channel_names(&self) -> Vec<String> {
        self.config
            .channels
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    /// Standard normal sample (Box–Muller).
    fn gaussian(&mut self) -> f64 {
        let u1: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.gen();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// The next reading.
    pub fn next_reading(&mut self) -> SimReading {
        let t = self.index as f64 / self.config.rate_hz;
        self.index += 1;
        let mut values = Vec::with_capacity(self.config.channels.len());
        for i in 0..self.config.channels.len() {
            let c = &self.config.channels[i];
            let (base, amplitude, period, noise) = (c.base, c.amplitude, c.period_s, c.noise);
            let clean = base + amplitude * (std::f64::consts::TAU * t / period).sin();
            values.push(clean + noise * self.gaussian());
        }
        if self.episode.is_none() && self.rng.gen_bool(self.config.anomaly_rate) {
            let kind = match self.rng.gen_range(0..3) {
                0 => Kind::Spike,
                1 => Kind::Drift,
                _ => Kind::Stuck,
            };
            let channel = self.rng.gen_range(0..self.config.channels.len());
            let length = match kind {
                Kind::Spike => 1,
                Kind::Drift | Kind::Stuck => self.rng.gen_range(20..60),
            };
            self.episode = Some(Episode {
                kind,
                channel,
                left: length,
                length,
                stuck_at: values[channel],
            });
        }
        let mut label = LABEL_NORMAL;
        if let Some(mut e) = self.episode.take() {
            let c = &self.config.channels[e.channel];
            let scale = c.amplitude.abs().max(c.noise * 10.0).max(1e-9);
            let sign = if self.rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            match e.kind {
                Kind::Spike => {
                    values[e.channel] += sign * scale * self.rng.gen_range(2.5..4.0);
                    label = LABEL_SPIKE;
                }
                Kind::Drift => {
                    let done = f64::from(e.length - e.left + 1) / f64::from(e.length);
                    values[e.channel] += scale * 2.0 * done;
                    label = LABEL_DRIFT;
                }
                Kind::Stuck => {
                    values[e.channel] = e.stuck_at;
                    label = LABEL_STUCK;
                }
            }
            e.left -= 1;
            if e.left > 0 {
                self.episode = Some(e);
            }
        }
        SimReading { values, label }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_readings_and_labels() {
        let config = SimulatorConfig {
            anomaly_rate: 0.05,
            ..SimulatorConfig::default()
        };
        let mut a = Simulator::new(config.clone());
        let mut b = Simulator::new(config);
        for _ in 0..2_000 {
            assert_eq!(a.next_reading(), b.next_reading());
        }
    }

    #[test]
    fn every_anomaly_kind_occurs_and_is_labelled() {
        let mut sim = Simulator::new(SimulatorConfig {
            anomaly_rate: 0.02,
            ..SimulatorConfig::default()
        });
        let mut seen = std::collections::HashMap::new();
        for _ in 0..20_000 {
            *seen.entry(sim.next_reading().label).or_insert(0u32) += 1;
        }
        for label in [LABEL_NORMAL, LABEL_SPIKE, LABEL_DRIFT, LABEL_STUCK] {
            assert!(
                seen.get(label).copied().unwrap_or(0) > 0,
                "{label} never seen: {seen:?}"
            );
        }
        // Most readings are normal.
        assert!(seen[LABEL_NORMAL] > 10_000, "{seen:?}");
    }

    #[test]
    fn spike_is_far_from_the_clean_signal() {
        let config = SimulatorConfig {
            anomaly_rate: 0.01,
            ..SimulatorConfig::default()
        };
        let mut sim = Simulator::new(config.clone());
        let mut checked = 0;
        for i in 0..50_000u64 {
            let r = sim.next_reading();
            if r.label == LABEL_SPIKE {
                let t = i as f64 / config.rate_hz;
                let far = config.channels.iter().zip(&r.values).any(|(c, v)| {
                    let clean =
                        c.base + c.amplitude * (std::f64::consts::TAU * t / c.period_s).sin();
                    (v - clean).abs() > 2.0 * c.amplitude
                });
                assert!(
                    far,
                    "spike at {i} not far from clean signal: {:?}",
                    r.values
                );
                checked += 1;
            }
        }
        assert!(checked > 0);
    }
}
