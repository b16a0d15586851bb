//! On-device inference: a `Prediction` per loaded model on every reading the
//! device's own sources append (a gateway's relayed children get none).
//!
//! The features are those of `proto` ([`FeatureSet::extract_columns`], the
//! function the trainer calls) over the device's last readings, this one
//! included, and the class is the artifact's own kernel (the integer-only
//! one for `edgeloop-int8-v1`). `Prediction.window` is how many readings
//! that was: the model's window, or fewer while the agent holds fewer (it
//! keeps readings since it started, at most the largest window of its
//! models, and only while it has a model). So the cloud can recompute the
//! prediction from readings `seq - window + 1 ..= seq`.
//!
//! [`History`] keeps the readings column by column in buffers of twice the
//! largest window, shifted down when full: a window is always a contiguous
//! slice, appending is amortized O(1), and nothing is allocated per reading
//! besides the features and the prediction itself.
//!
//! [`FeatureSet::extract_columns`]: edgeloop_proto::features::FeatureSet::extract_columns

use edgeloop_proto::v1::{Prediction, Reading};

use super::{lock, Loaded, Models};
use crate::stats::AgentStats;

/// The device's recent readings, one column per device channel.
#[derive(Debug)]
pub struct History {
    /// Readings the windows may need: the largest window of the models.
    capacity: usize,
    ts: Vec<i64>,
    columns: Vec<Vec<f64>>,
}

impl History {
    pub fn new(channels: usize) -> History {
        History {
            capacity: 0,
            ts: Vec::new(),
            columns: vec![Vec::new(); channels],
        }
    }

    /// Keeps up to `capacity` readings from now on (0: none).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        if capacity == 0 {
            self.ts.clear();
            self.columns.iter_mut().for_each(Vec::clear);
        }
    }

    /// Readings held (the last `len()` appended).
    pub fn len(&self) -> usize {
        self.ts.len().min(self.capacity)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a reading; a value missing from it is NaN (no value), as the
    /// trainer reads it.
    pub fn push(&mut self, reading: &Reading) {
        if self.capacity == 0 {
            return;
        }
        if self.ts.len() >= 2 * self.capacity {
            let drop = self.ts.len() + 1 - self.capacity;
            self.ts.drain(..drop);
            self.columns.iter_mut().for_each(|c| {
                c.drain(..drop);
            });
        }
        self.ts.push(reading.ts_micros);
        for (i, column) in self.columns.iter_mut().enumerate() {
            column.push(reading.values.get(i).copied().unwrap_or(f64::NAN));
        }
    }

    /// The prediction of `model` over the last readings held, or why there
    /// is none (a channel with no finite value in the window, say).
    pub fn predict(&self, model: &Loaded) -> Result<Prediction, String> {
        let n = model.window().min(self.len());
        let start = self.ts.len() - n;
        let columns: Vec<&[f64]> = model
            .inputs
            .iter()
            .map(|&i| self.columns.get(i).map_or(&[][..], |c| &c[start..]))
            .collect();
        let features = model
            .artifact
            .features()
            .extract_columns(&self.ts[start..], &columns)
            .map_err(|e| e.to_string())?;
        let class = model
            .artifact
            .predict_class(&features)
            .map_err(|e| e.to_string())?;
        let label = model
            .artifact
            .classes()
            .get(class)
            .ok_or_else(|| format!("class {class} is out of range"))?;
        Ok(Prediction {
            task: model.task.clone(),
            model_version: model.version,
            label: label.clone(),
            // n ≤ the feature window ≤ 65535 (FeatureSet::validate).
            window: n as u32,
        })
    }
}

impl Models {
    /// Adds one prediction per loaded model to each of `readings` (in the
    /// order they will be appended), and remembers them for the next
    /// windows.
    pub fn annotate(&self, readings: &mut [Reading]) {
        let loaded = self.loaded();
        if loaded.is_empty() {
            return;
        }
        let mut history = lock(&self.history);
        let (mut made, mut failed) = (0u64, 0u64);
        for reading in readings.iter_mut() {
            history.push(reading);
            reading.predictions.reserve(loaded.len());
            for model in loaded.iter() {
                match history.predict(model) {
                    Ok(p) => {
                        reading.predictions.push(p);
                        made += 1;
                    }
                    Err(e) => {
                        tracing::trace!(device = %self.device, task = %model.task, error = %e, "no prediction");
                        failed += 1;
                    }
                }
            }
        }
        AgentStats::add(&self.stats.predictions_made, made);
        if failed > 0 {
            AgentStats::add(&self.stats.predictions_failed, failed);
        }
    }
}
