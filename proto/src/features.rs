//! Features, once: the numbers a model sees, computed from a window of
//! recent readings by the same code on the device and in the trainer.
//!
//! A [`FeatureSet`] names the channels and the window length (in readings).
//! For each channel, in the order the feature set lists them, six features
//! are produced, in this order (see `docs/models.md`):
//!
//! | # | name | definition over the finite values `v_1..v_n` of the window |
//! |---|---|---|
//! | 0 | `mean` | `(v_1 + … + v_n) / n`, summed left to right |
//! | 1 | `min` | smallest value |
//! | 2 | `max` | largest value |
//! | 3 | `std` | population standard deviation, `sqrt(Σ (v_i - mean)² / n)` |
//! | 4 | `slope` | least-squares slope of value against time, per second; 0 with one value or when all timestamps are equal |
//! | 5 | `last` | the value of the latest reading that has one |
//!
//! The window is the last `window` readings given (fewer at the start of a
//! stream: the features are then computed over what there is). NaN or
//! infinite values are a missing value and are skipped; a channel with no
//! value at all in the window is an error ([`FeatureError::NoValues`]).
//!
//! Determinism: all arithmetic is IEEE-754 `f64`, in a fixed order, with no
//! fused multiply-add and no parallel reduction, so the same inputs give the
//! same bits on every platform Rust supports; each feature is then rounded
//! once to `f32`, the type models take.

use crate::v1::Reading;
use serde::{Deserialize, Serialize};

/// Names of the per-channel features, in output order.
pub const FEATURES_PER_CHANNEL: [&str; 6] = ["mean", "min", "max", "std", "slope", "last"];

/// Largest window a feature set may ask for, in readings.
pub const MAX_WINDOW: usize = 65_535;
/// Largest number of channels a feature set may name.
pub const MAX_CHANNELS: usize = 64;

/// Which channels, over how many recent readings: the description a model
/// carries and a device profile names in config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSet {
    /// Channel names, as in `ReadingBatch.channels`; features are produced
    /// per channel in this order.
    pub channels: Vec<String>,
    /// Number of most recent readings the features are computed over (1 to
    /// 65535).
    pub window: usize,
}

/// Why features could not be computed, or a feature set is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeatureError {
    /// `window` is 0 or above [`MAX_WINDOW`].
    #[error("feature set field `window` is {0}; it must be between 1 and {MAX_WINDOW} readings")]
    BadWindow(usize),
    /// `channels` is empty, too long, or repeats a name.
    #[error("feature set field `channels` is invalid: {0}")]
    BadChannels(String),
    /// A channel the feature set needs is not among the readings' channels.
    #[error("channel `{0}` of the feature set is not among the readings' channels")]
    MissingChannel(String),
    /// No readings at all were given.
    #[error("no readings in the window")]
    EmptyWindow,
    /// A channel had no finite value in the whole window.
    #[error("channel `{0}` has no finite value in the window")]
    NoValues(String),
    /// The columns given do not match the timestamps or the feature set.
    #[error("column shape mismatch: {0}")]
    Shape(String),
    /// A feature overflowed to infinity (values too large to sum).
    #[error("feature `{channel}.{feature}` is not finite (input values too large)")]
    NotFinite {
        /// The channel.
        channel: String,
        /// The feature name, one of [`FEATURES_PER_CHANNEL`].
        feature: &'static str,
    },
}

impl FeatureSet {
    /// Checks the window length and the channel list.
    pub fn validate(&self) -> Result<(), FeatureError> {
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(FeatureError::BadWindow(self.window));
        }
        if self.channels.is_empty() || self.channels.len() > MAX_CHANNELS {
            return Err(FeatureError::BadChannels(format!(
                "{} channels given; between 1 and {MAX_CHANNELS} are allowed",
                self.channels.len()
            )));
        }
        for (i, name) in self.channels.iter().enumerate() {
            if name.is_empty() || name.len() > 255 {
                return Err(FeatureError::BadChannels(format!(
                    "channel {i} has a name of {} bytes; 1 to 255 are allowed",
                    name.len()
                )));
            }
            if self.channels[..i].contains(name) {
                return Err(FeatureError::BadChannels(format!(
                    "channel `{name}` is listed twice"
                )));
            }
        }
        Ok(())
    }

    /// Number of features produced: six per channel.
    pub fn len(&self) -> usize {
        self.channels.len() * FEATURES_PER_CHANNEL.len()
    }

    /// Whether the feature set produces no features (no channels).
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Feature names in output order, `channel.feature` (e.g. `temp.slope`).
    pub fn names(&self) -> Vec<String> {
        self.channels
            .iter()
            .flat_map(|c| FEATURES_PER_CHANNEL.iter().map(move |f| format!("{c}.{f}")))
            .collect()
    }

    /// Features from readings as the device sends them: `channels` are the
    /// batch's channel names (`ReadingBatch.channels`), `readings` are in
    /// time order, oldest first; only the last `window` are used.
    pub fn extract(
        &self,
        channels: &[String],
        readings: &[Reading],
    ) -> Result<Vec<f32>, FeatureError> {
        self.validate()?;
        let start = readings.len().saturating_sub(self.window);
        let readings = &readings[start..];
        let ts: Vec<i64> = readings.iter().map(|r| r.ts_micros).collect();
        let mut columns = Vec::with_capacity(self.channels.len());
        for name in &self.channels {
            let index = channels
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| FeatureError::MissingChannel(name.clone()))?;
            // A reading with fewer values than channels has no value here.
            columns.push(
                readings
                    .iter()
                    .map(|r| r.values.get(index).copied().unwrap_or(f64::NAN))
                    .collect::<Vec<f64>>(),
            );
        }
        let columns: Vec<&[f64]> = columns.iter().map(Vec::as_slice).collect();
        self.extract_columns(&ts, &columns)
    }

    /// Features from columns (as a trainer reads them from Parquet):
    /// `ts_micros` are the readings' timestamps, oldest first, and
    /// `columns[c]` holds channel `self.channels[c]`'s values for the same
    /// readings. Only the last `window` rows are used. This is the one
    /// function that computes features; [`FeatureSet::extract`] calls it.
    pub fn extract_columns(
        &self,
        ts_micros: &[i64],
        columns: &[&[f64]],
    ) -> Result<Vec<f32>, FeatureError> {
        self.validate()?;
        if columns.len() != self.channels.len() {
            return Err(FeatureError::Shape(format!(
                "{} columns given for {} channels",
                columns.len(),
                self.channels.len()
            )));
        }
        if ts_micros.is_empty() {
            return Err(FeatureError::EmptyWindow);
        }
        let start = ts_micros.len().saturating_sub(self.window);
        let ts = &ts_micros[start..];
        let mut out = Vec::with_capacity(self.len());
        for (name, column) in self.channels.iter().zip(columns) {
            if column.len() != ts_micros.len() {
                return Err(FeatureError::Shape(format!(
                    "channel `{name}` has {} values for {} timestamps",
                    column.len(),
                    ts_micros.len()
                )));
            }
            let values = &column[start..];
            let features =
                channel_features(ts, values).ok_or_else(|| FeatureError::NoValues(name.clone()))?;
            for (feature, value) in FEATURES_PER_CHANNEL.iter().zip(features) {
                let value = value as f32;
                if !value.is_finite() {
                    return Err(FeatureError::NotFinite {
                        channel: name.clone(),
                        feature,
                    });
                }
                out.push(value);
            }
        }
        Ok(out)
    }
}

/// The six features of one channel, in f64; `None` if no value is finite.
fn channel_features(ts: &[i64], values: &[f64]) -> Option<[f64; 6]> {
    let t0 = *ts.first()?;
    // (seconds since the window's first reading, value), finite values only.
    // i128 keeps the difference exact whatever the timestamps are.
    let points: Vec<(f64, f64)> = ts
        .iter()
        .zip(values)
        .filter(|(_, v)| v.is_finite())
        .map(|(t, v)| ((i128::from(*t) - i128::from(t0)) as f64 / 1e6, *v))
        .collect();
    let (_, last) = *points.last()?;
    let n = points.len() as f64;
    let mut sum = 0.0;
    let mut sum_t = 0.0;
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    for &(t, v) in &points {
        sum += v;
        sum_t += t;
        min = min.min(v);
        max = max.max(v);
    }
    let mean = sum / n;
    let mean_t = sum_t / n;
    let mut sum_sq = 0.0;
    let mut s_tt = 0.0;
    let mut s_tv = 0.0;
    for &(t, v) in &points {
        let dv = v - mean;
        let dt = t - mean_t;
        sum_sq += dv * dv;
        s_tt += dt * dt;
        s_tv += dt * dv;
    }
    let std = (sum_sq / n).sqrt();
    let slope = if s_tt > 0.0 { s_tv / s_tt } else { 0.0 };
    Some([mean, min, max, std, slope, last])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(window: usize) -> FeatureSet {
        FeatureSet {
            channels: vec!["temp".into(), "hum".into()],
            window,
        }
    }

    fn reading(ts_s: i64, temp: f64, hum: f64) -> Reading {
        Reading {
            ts_micros: 1_700_000_000_000_000 + ts_s * 1_000_000,
            values: vec![hum, temp],
            true_label: String::new(),
            predictions: Vec::new(),
        }
    }

    #[test]
    fn features_of_a_linear_ramp_are_exact() -> Result<(), FeatureError> {
        // temp = 10 + 2 t over t = 0..4 s; hum constant 50, with one NaN.
        let readings: Vec<Reading> = (0..5)
            .map(|t| {
                reading(
                    t,
                    10.0 + 2.0 * t as f64,
                    if t == 2 { f64::NAN } else { 50.0 },
                )
            })
            .collect();
        let channels = vec!["hum".to_string(), "temp".to_string()];
        let f = set(5).extract(&channels, &readings)?;
        // temp: mean 14, min 10, max 18, std sqrt(8), slope 2/s, last 18.
        assert_eq!(&f[..6], &[14.0, 10.0, 18.0, 8f64.sqrt() as f32, 2.0, 18.0]);
        // hum: constant; the NaN is skipped.
        assert_eq!(&f[6..], &[50.0, 50.0, 50.0, 0.0, 0.0, 50.0]);
        assert_eq!(set(5).names()[4], "temp.slope");
        Ok(())
    }

    /// Pins the feature bits: the device and every deployed model depend on
    /// them, so a change here is a change of the model contract. The values
    /// were computed independently in Python (IEEE f64, the order documented
    /// above, then rounded to f32).
    #[test]
    fn feature_bits_are_pinned() -> Result<(), FeatureError> {
        let ts = [0, 1_000_000, 2_500_000, 4_000_000, 4_100_000];
        let temp = [21.3, 21.9, f64::NAN, 22.8, 22.75];
        let hum = [40.1, 39.7, 41.2, 40.0, 38.9];
        let f = set(8).extract_columns(&ts, &[&temp, &hum])?;
        let bits: Vec<u32> = f.iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            bits,
            vec![
                0x41b1_8000,
                0x41aa_6666,
                0x41b6_6666,
                0x3f1f_f7cf,
                0x3eae_8e7a,
                0x41b6_0000, // temp
                0x421f_eb85,
                0x421b_999a,
                0x4224_cccd,
                0x3f3d_c91f,
                0xbdf5_cc21,
                0x421b_999a, // hum
            ],
            "features: {f:?}"
        );
        Ok(())
    }

    #[test]
    fn only_the_last_window_readings_count() -> Result<(), FeatureError> {
        let readings: Vec<Reading> = (0..10).map(|t| reading(t, t as f64, 1.0)).collect();
        let channels = vec!["hum".to_string(), "temp".to_string()];
        let f = set(3).extract(&channels, &readings)?;
        assert_eq!(
            &f[..6],
            &[8.0, 7.0, 9.0, (2.0f64 / 3.0).sqrt() as f32, 1.0, 9.0]
        );
        Ok(())
    }

    #[test]
    fn missing_channel_and_all_nan_are_errors_naming_the_channel() {
        let channels = vec!["hum".to_string()];
        let readings = vec![reading(0, 1.0, 2.0)];
        assert_eq!(
            set(3).extract(&channels, &readings),
            Err(FeatureError::MissingChannel("temp".into()))
        );
        let channels = vec!["hum".to_string(), "temp".to_string()];
        let readings = vec![reading(0, f64::NAN, 2.0)];
        assert_eq!(
            set(3).extract(&channels, &readings),
            Err(FeatureError::NoValues("temp".into()))
        );
        assert_eq!(
            set(3).extract(&channels, &[]),
            Err(FeatureError::EmptyWindow)
        );
    }

    #[test]
    fn huge_values_are_an_error_not_infinity() {
        let channels = vec!["hum".to_string(), "temp".to_string()];
        let readings = vec![reading(0, f64::MAX, 1.0), reading(1, f64::MAX, 1.0)];
        assert!(matches!(
            set(3).extract(&channels, &readings),
            Err(FeatureError::NotFinite { .. })
        ));
    }

    #[test]
    fn invalid_feature_sets_are_rejected_with_the_field_named() {
        assert!(set(0)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`window`"));
        let dup = FeatureSet {
            channels: vec!["a".into(), "a".into()],
            window: 3,
        };
        assert!(dup
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`channels`"));
    }

    #[test]
    fn feature_set_parses_from_toml_and_rejects_unknown_keys() {
        let ok: Result<FeatureSet, _> = toml::from_str("channels = [\"temp\"]\nwindow = 16\n");
        assert_eq!(
            ok.ok(),
            Some(FeatureSet {
                channels: vec!["temp".into()],
                window: 16
            })
        );
        let bad: Result<FeatureSet, _> =
            toml::from_str("channels = [\"temp\"]\nwindow = 16\nwindows = 3\n");
        assert!(bad.is_err());
    }
}
