//! Parity in production: for a sample of readings that carry on-device
//! predictions (`Reading.predictions`), the trainer recomputes the prediction
//! the device's model version should have made, from the device's own
//! readings (its history in the trainer), and compares the class names.
//!
//! A device says its model saw the features of its last `window` readings,
//! seqs `seq - window + 1 ..= seq`. The check needs every one of them in the
//! device's history, contiguous; then it extracts the features with the
//! artifact's own [`FeatureSet`](edgeloop_proto::features::FeatureSet)
//! (`extract_columns`, the code the device runs) and predicts with the
//! artifact's kernel ([`fit::predict`]: the integer kernel for int8).
//! Outcomes: a match, a mismatch (must never happen: logged at warn and
//! counted in `edgeloop_processor_parity_mismatches_total`), or unverifiable
//! with a reason (counted per reason): see [`Unverifiable`].

use edgeloop_proto::model::Artifact;
use edgeloop_proto::v1::Prediction;

use super::fit;
use super::History;

/// Why a prediction could not be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverifiable {
    /// No artifact of that (task, profile, version) is known (never seen on
    /// `edgeloop.models`, or too old for the cache).
    UnknownModel,
    /// The prediction's `window` is not the artifact's feature window.
    WindowMismatch,
    /// The window is longer than the readings kept per device.
    WindowTooLong,
    /// Readings of the window are missing from the history (the trainer's
    /// queue dropped a batch, the processor restarted, a gap in seq).
    Gap,
    /// The device does not send a channel the model reads.
    MissingChannel,
    /// The features could not be computed, or the model refused them.
    Features,
}

impl Unverifiable {
    /// The `reason` label of `edgeloop_processor_parity_unverifiable_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unverifiable::UnknownModel => "unknown_model",
            Unverifiable::WindowMismatch => "window_mismatch",
            Unverifiable::WindowTooLong => "window_too_long",
            Unverifiable::Gap => "gap",
            Unverifiable::MissingChannel => "missing_channel",
            Unverifiable::Features => "features",
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Match,
    Mismatch {
        /// The class the artifact gives.
        expected: String,
        /// The features it was given.
        features: Vec<f32>,
    },
    Unverifiable(Unverifiable),
}

/// Checks `prediction`, made by the device for its reading `seq` (the last
/// reading in `history`), against `artifact` (`None`: unknown version).
pub(super) fn check(
    artifact: Option<&Artifact>,
    prediction: &Prediction,
    history: &History,
    seq: u64,
) -> Outcome {
    let Some(artifact) = artifact else {
        return Outcome::Unverifiable(Unverifiable::UnknownModel);
    };
    let fs = artifact.features();
    let window = fs.window;
    if prediction.window as usize != window {
        return Outcome::Unverifiable(Unverifiable::WindowMismatch);
    }
    if window > history.capacity {
        return Outcome::Unverifiable(Unverifiable::WindowTooLong);
    }
    let n = history.readings.len();
    if window == 0 || n < window {
        return Outcome::Unverifiable(Unverifiable::Gap);
    }
    let recent = history.readings.range(n - window..);
    // Seqs seq-window+1 ..= seq, in order, each once.
    let first = (seq + 1).checked_sub(window as u64);
    let contiguous = first.is_some_and(|first| {
        recent
            .clone()
            .enumerate()
            .all(|(i, r)| r.seq == first + i as u64)
    });
    if !contiguous {
        return Outcome::Unverifiable(Unverifiable::Gap);
    }
    let ts: Vec<i64> = recent.clone().map(|r| r.ts_micros).collect();
    let mut columns = Vec::with_capacity(fs.channels.len());
    for name in &fs.channels {
        let Some(index) = history.channels.iter().position(|c| c == name) else {
            return Outcome::Unverifiable(Unverifiable::MissingChannel);
        };
        columns.push(
            recent
                .clone()
                .map(|r| r.values.get(index).copied().unwrap_or(f64::NAN))
                .collect::<Vec<f64>>(),
        );
    }
    let columns: Vec<&[f64]> = columns.iter().map(Vec::as_slice).collect();
    let Ok(features) = fs.extract_columns(&ts, &columns) else {
        return Outcome::Unverifiable(Unverifiable::Features);
    };
    let Some(expected) = fit::predict(artifact, &features)
        .ok()
        .and_then(|c| fit::classes(artifact).get(c))
    else {
        return Outcome::Unverifiable(Unverifiable::Features);
    };
    if *expected == prediction.label {
        Outcome::Match
    } else {
        Outcome::Mismatch {
            expected: expected.clone(),
            features,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use edgeloop_proto::features::FeatureSet;
    use edgeloop_proto::model::{quantize, Artifact, FloatModel};
    use edgeloop_proto::v1::{Prediction, Reading, ReadingBatch};

    use super::super::config::{DeviceProfile, Numerics, TaskConfig, TrainerConfig};
    use super::super::{fit, DirPublisher, LabelledBatch, Publisher, Trainer, TrainerStats};

    const WINDOW: usize = 3;

    fn features() -> FeatureSet {
        FeatureSet {
            channels: vec!["a".into()],
            window: WINDOW,
        }
    }

    /// "high" when the window's last value is above 5.
    fn artifact(numerics: Numerics) -> Result<Artifact, Box<dyn std::error::Error>> {
        let mut weights = vec![0f32; 12];
        weights[6 + 5] = 1.0;
        let float = FloatModel::new(
            features(),
            vec!["low".into(), "high".into()],
            vec![0.0; 6],
            vec![1.0; 6],
            weights,
            vec![0.0, -5.5],
        )?;
        Ok(match numerics {
            Numerics::F32 => Artifact::F32(float),
            Numerics::Int8 => {
                let calibration: Vec<Vec<f32>> = (0..20).map(|i| vec![i as f32 / 2.0; 6]).collect();
                Artifact::Int8(quantize(&float, &calibration)?)
            }
        })
    }

    fn config(dir: &std::path::Path, numerics: Numerics) -> TrainerConfig {
        TrainerConfig {
            enabled: true,
            dir: dir.to_path_buf(),
            profiles: vec![DeviceProfile {
                name: "p".into(),
                numerics,
                max_model_bytes: 1 << 20,
                features: features(),
                tasks: vec!["t".into()],
            }],
            tasks: vec![TaskConfig {
                name: "t".into(),
                classes: vec!["low".into(), "high".into()],
                other: None,
            }],
            parity_sample: 1,
            ..TrainerConfig::default()
        }
    }

    fn value(seq: u64) -> f64 {
        (seq % 10) as f64
    }

    /// Readings `first..first + n` of device `d`; `predict(seq)` says which
    /// ones carry a prediction, and with which label and version.
    fn batch(first: u64, n: u64, predict: impl Fn(u64) -> Option<(u64, String)>) -> LabelledBatch {
        LabelledBatch {
            batch: ReadingBatch {
                device_id: "d".into(),
                profile: "p".into(),
                first_seq: first,
                channels: vec!["a".into()],
                readings: (first..first + n)
                    .map(|seq| Reading {
                        ts_micros: 1_800_000_000_000_000 + seq as i64 * 100_000,
                        values: vec![value(seq)],
                        true_label: String::new(),
                        predictions: predict(seq)
                            .map(|(version, label)| Prediction {
                                task: "t".into(),
                                model_version: version,
                                label,
                                window: WINDOW as u32,
                            })
                            .into_iter()
                            .collect(),
                    })
                    .collect(),
                loss: None,
            },
            labels: Vec::new(),
            rules_version: None,
            partition: 0,
            offset: first as i64,
        }
    }

    /// What the device's model gives for reading `seq`, computed the way
    /// the device does: `FeatureSet::extract` over its last readings.
    fn device_label(model: &Artifact, seq: u64) -> Result<String, Box<dyn std::error::Error>> {
        let readings: Vec<Reading> = (seq + 1 - WINDOW as u64..=seq)
            .map(|s| Reading {
                ts_micros: 1_800_000_000_000_000 + s as i64 * 100_000,
                values: vec![value(s)],
                ..Default::default()
            })
            .collect();
        let x = features().extract(&["a".into()], &readings)?;
        let c = fit::predict(model, &x)?;
        Ok(fit::classes(model)[c].clone())
    }

    fn unverifiable(stats: &TrainerStats) -> Vec<(&'static str, u64)> {
        stats
            .parity_unverifiable
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
        a.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn parity_counts_right_and_wrong_predictions_and_gaps_in_both_numerics(
    ) -> Result<(), Box<dyn std::error::Error>> {
        for numerics in [Numerics::F32, Numerics::Int8] {
            let dir = tempfile::tempdir()?;
            let model = artifact(numerics)?;
            let mut publisher = DirPublisher::new(dir.path());
            assert_eq!(
                publisher.publish("t", "p", &model, &serde_json::json!({}))?,
                1
            );
            let stats = Arc::new(TrainerStats::default());
            let mut t = Trainer::new(config(dir.path(), numerics), publisher, stats.clone());

            // Both classes occur among the right answers (values 0..9).
            let right: Vec<String> = (2..12)
                .map(|s| device_label(&model, s))
                .collect::<Result<_, _>>()?;
            assert!(right.iter().any(|l| l == "high") && right.iter().any(|l| l == "low"));

            // Seqs 2..12 carry the model's own answers: checked, no mismatch.
            t.ingest(&batch(0, 12, |s| {
                (s >= 2).then(|| (1, right[(s - 2) as usize].clone()))
            }));
            assert_eq!(
                (load(&stats.parity_checked), load(&stats.parity_mismatches)),
                (10, 0),
                "{numerics:?}"
            );
            assert!(
                unverifiable(&stats).is_empty(),
                "{:?}",
                unverifiable(&stats)
            );

            // Seq 13 with the other class: a mismatch.
            let wrong = if device_label(&model, 13)? == "high" {
                "low"
            } else {
                "high"
            };
            t.ingest(&batch(12, 2, |s| (s == 13).then(|| (1, wrong.to_string()))));
            assert_eq!(
                (load(&stats.parity_checked), load(&stats.parity_mismatches)),
                (11, 1),
                "{numerics:?}"
            );

            // A gap: seqs 14..20 never arrive. Seq 21's window (19..=21)
            // is incomplete; seq 22's (20..=22) is whole again.
            let (l21, l22) = (device_label(&model, 21)?, device_label(&model, 22)?);
            t.ingest(&batch(20, 3, |s| match s {
                21 => Some((1, l21.clone())),
                22 => Some((1, l22.clone())),
                _ => None,
            }));
            assert_eq!(unverifiable(&stats), [("gap", 1)]);
            assert_eq!(
                (load(&stats.parity_checked), load(&stats.parity_mismatches)),
                (12, 1)
            );

            // A version never published: unverifiable, not a mismatch.
            t.ingest(&batch(23, 1, |_| Some((9, "low".into()))));
            assert_eq!(unverifiable(&stats), [("gap", 1), ("unknown_model", 1)]);
            assert_eq!(load(&stats.parity_mismatches), 1);
        }
        Ok(())
    }

    #[test]
    fn parity_samples_one_in_n_readings_with_predictions() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let model = artifact(Numerics::F32)?;
        let mut publisher = DirPublisher::new(dir.path());
        publisher.publish("t", "p", &model, &serde_json::json!({}))?;
        let stats = Arc::new(TrainerStats::default());
        let mut c = config(dir.path(), Numerics::F32);
        c.parity_sample = 4;
        let mut t = Trainer::new(c, publisher, stats.clone());
        let labels: Vec<String> = (2..42)
            .map(|s| device_label(&model, s))
            .collect::<Result<_, _>>()?;
        t.ingest(&batch(0, 42, |s| {
            (s >= 2).then(|| (1, labels[(s - 2) as usize].clone()))
        }));
        assert_eq!(load(&stats.parity_checked), 10);
        assert_eq!(load(&stats.parity_mismatches), 0);
        Ok(())
    }
}
