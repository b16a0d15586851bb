//! Configuration of the trainer: device profiles, tasks, the example
//! buffers, the retrain triggers, drift detection and the quality gate
//! (`[trainer]` in the processor's TOML; see `docs/training.md`).

use std::path::PathBuf;
use std::time::Duration;

use edgeloop_proto::features::FeatureSet;
use serde::{Deserialize, Serialize};

/// How a device computes: the numerics its model is exported, and gated, in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    /// 8-bit integers: the model is quantized the TFLite way and evaluated
    /// with the integer kernel the device runs (`edgeloop-int8-v1`).
    Int8,
    /// 32-bit floats: the float model (`edgeloop-f32-v1`).
    F32,
}

impl Numerics {
    /// `int8` or `f32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Numerics::Int8 => "int8",
            Numerics::F32 => "f32",
        }
    }
}

/// A class of device hardware/software: what numerics it runs, how large a
/// model it can hold, which features it computes and which tasks it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Profile name, as devices announce it (`ReadingBatch.profile`) and as
    /// it appears in `models/{task}/{profile}`.
    pub name: String,
    /// `int8` or `f32`.
    pub numerics: Numerics,
    /// Largest model artifact the device accepts, in bytes; a larger
    /// candidate is rejected by the gate.
    pub max_model_bytes: usize,
    /// The features the device computes: channels and window (readings).
    pub features: FeatureSet,
    /// Names of the tasks (`[[trainer.tasks]]`) this profile's devices run.
    pub tasks: Vec<String>,
}

/// A task: how a labelled reading becomes a classification target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Task name, as it appears in `models/{task}/{profile}`.
    pub name: String,
    /// The classes, in model output order. A reading whose label is one of
    /// them is an example of that class.
    pub classes: Vec<String>,
    /// The class of a labelled reading whose label is not in `classes`
    /// (none: such readings are not examples). E.g. a binary task
    /// `classes = ["normal", "anomaly"]`, `other = "anomaly"`.
    #[serde(default)]
    pub other: Option<String>,
}

impl TaskConfig {
    /// The class index of a reading labelled `label`, if it is an example.
    pub fn class_of(&self, label: &str) -> Option<usize> {
        self.classes.iter().position(|c| c == label).or_else(|| {
            self.other
                .as_ref()
                .and_then(|o| self.classes.iter().position(|c| c == o))
        })
    }
}

/// Which metric the gate compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    /// Unweighted mean of the per-class F1 over the classes present in the
    /// held-out data or predicted (the default: rare anomaly classes count
    /// as much as `normal`).
    MacroF1,
    /// Fraction of held-out examples classified right.
    Accuracy,
}

/// The quality gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// The metric compared.
    pub metric: GateMetric,
    /// A candidate is published if its metric is at least the live model's
    /// minus this margin (0.02: two points of macro-F1).
    pub margin: f64,
    /// Fraction of the buffered examples, the most recent by reading time,
    /// held out for the gate (never trained on).
    pub holdout_fraction: f64,
    /// Fewer held-out examples than this: no candidate is trained yet.
    pub min_holdout: usize,
}

/// The trainer (`[trainer]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Whether the processor trains models at all (it needs `rules_file`:
    /// models learn the rules' labels).
    pub enabled: bool,
    /// Where the decision log (`decisions.jsonl`) and the published models
    /// (`models/{task}/{profile}/v{N}.bin` and `.json`) go.
    pub dir: PathBuf,
    /// Device profiles.
    pub profiles: Vec<DeviceProfile>,
    /// Tasks.
    pub tasks: Vec<TaskConfig>,
    /// Most recent examples kept per (task, profile): the sliding window.
    pub window_examples: usize,
    /// Examples kept per (task, profile) as a uniform reservoir sample of
    /// everything that left the sliding window.
    pub reservoir_examples: usize,
    /// Examples whose `label_confidence` is below this are left out (0: all
    /// labelled readings are examples).
    pub min_confidence: f64,
    /// Retrain once this many new examples arrived since the last training…
    pub retrain_every_examples: u64,
    /// …or once this long has passed since it, if any new example arrived…
    #[serde(with = "humantime_serde")]
    pub retrain_every: Duration,
    /// …or when drift is detected, or the rules version changes.
    pub drift: DriftConfig,
    /// The quality gate.
    pub gate: GateConfig,
    /// L2 regularization of the logistic regression (smartcore `alpha`).
    pub l2: f64,
    /// Labelled readings queued for the trainer thread; when full, further
    /// readings are not given to the trainer (counted in
    /// `edgeloop_trainer_examples_dropped_total`; the data set is unaffected).
    pub queue: usize,
    /// Seed of the reservoir sampler.
    pub seed: u64,
    /// Private key (64 hex digits, `edgeloop keys generate`) the trainer
    /// signs the models it publishes with. Set: models are published to
    /// Kafka `edgeloop.models` (and so to devices, on `models/{task}/{profile}`)
    /// and mirrored under `dir/models/`; not set: they are only written under
    /// `dir/models/` and no device receives them.
    pub signing_key_file: Option<PathBuf>,
    /// Parity check of on-device predictions: one in this many readings
    /// that carry predictions is re-computed with the model version the
    /// device names (1: every one; 0: off).
    pub parity_sample: u64,
}

/// Page-Hinkley drift detection on the disagreement between the live model
/// and the rules' labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    /// Whether drift triggers a retrain.
    pub enabled: bool,
    /// Tolerated change of the disagreement rate (Page-Hinkley `delta`).
    pub delta: f64,
    /// Detection threshold on the cumulative deviation (`lambda`).
    pub threshold: f64,
    /// Examples seen before the detector may fire.
    pub min_examples: u64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            delta: 0.02,
            threshold: 100.0,
            min_examples: 100,
        }
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            metric: GateMetric::MacroF1,
            margin: 0.02,
            holdout_fraction: 0.2,
            min_holdout: 200,
        }
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            enabled: false,
            dir: PathBuf::from("data/trainer"),
            profiles: Vec::new(),
            tasks: Vec::new(),
            window_examples: 5_000,
            reservoir_examples: 5_000,
            min_confidence: 0.0,
            retrain_every_examples: 5_000,
            retrain_every: Duration::from_secs(600),
            drift: DriftConfig::default(),
            gate: GateConfig::default(),
            l2: 1.0,
            queue: 10_000,
            seed: 1,
            signing_key_file: None,
            parity_sample: 10,
        }
    }
}

impl TrainerConfig {
    /// The shipped profiles and task for the simulator's channels: `mcu8`
    /// (int8, 8-bit microcontroller class, 4 KiB models) and `gateway`
    /// (f32, Linux gateway class), both doing task `anomaly`.
    pub fn simulator(channels: &[String], dir: PathBuf) -> TrainerConfig {
        let features = |window| FeatureSet {
            channels: channels.to_vec(),
            window,
        };
        TrainerConfig {
            enabled: true,
            dir,
            profiles: vec![
                DeviceProfile {
                    name: "mcu8".into(),
                    numerics: Numerics::Int8,
                    max_model_bytes: 4096,
                    features: features(10),
                    tasks: vec!["anomaly".into()],
                },
                DeviceProfile {
                    name: edgeloop_proto::DEFAULT_PROFILE.into(),
                    numerics: Numerics::F32,
                    max_model_bytes: 1 << 20,
                    features: features(10),
                    tasks: vec!["anomaly".into()],
                },
            ],
            tasks: vec![TaskConfig {
                name: "anomaly".into(),
                classes: ["normal", "spike", "drift", "stuck"]
                    .map(String::from)
                    .to_vec(),
                other: None,
            }],
            ..TrainerConfig::default()
        }
    }

    /// The profiles' names, in config order.
    pub fn profile_names(&self) -> Vec<&str> {
        self.profiles.iter().map(|p| p.name.as_str()).collect()
    }

    /// Whether a device announcing `profile` gets models from this trainer:
    /// false only when training is on and no trainer profile has that name
    /// (a trainer that is off cannot tell: another processor may train).
    pub fn serves_profile(&self, profile: &str) -> bool {
        !self.enabled || self.profiles.iter().any(|p| p.name == profile)
    }

    /// Checks every field; the error names the one that is wrong
    /// (`trainer.profiles[1].max_model_bytes: …`).
    pub fn validate(&self) -> Result<(), String> {
        // Profiles and tasks are checked even when training is off, so a
        // mistake shows before it is switched on.
        if self.enabled {
            if self.dir.as_os_str().is_empty() {
                return Err("trainer.dir: must not be empty".into());
            }
            if self.profiles.is_empty() {
                return Err("trainer.profiles: at least one profile is needed".into());
            }
            if self.tasks.is_empty() {
                return Err("trainer.tasks: at least one task is needed".into());
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            let f = format!("trainer.tasks[{i}]");
            check_name(&t.name).map_err(|e| format!("{f}.name: {e}"))?;
            if self.tasks[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("{f}.name: task `{}` is defined twice", t.name));
            }
            if t.classes.len() < 2 {
                return Err(format!("{f}.classes: at least two classes are needed"));
            }
            if t.classes.len() > edgeloop_proto::model::MAX_CLASSES {
                return Err(format!(
                    "{f}.classes: at most {} classes are allowed",
                    edgeloop_proto::model::MAX_CLASSES
                ));
            }
            for (j, c) in t.classes.iter().enumerate() {
                if c.is_empty() || t.classes[..j].contains(c) {
                    return Err(format!(
                        "{f}.classes: class {j} ({c:?}) is empty or repeated"
                    ));
                }
            }
            if let Some(o) = &t.other {
                if !t.classes.contains(o) {
                    return Err(format!("{f}.other: `{o}` is not one of its classes"));
                }
            }
        }
        for (i, p) in self.profiles.iter().enumerate() {
            let f = format!("trainer.profiles[{i}]");
            check_name(&p.name).map_err(|e| format!("{f}.name: {e}"))?;
            if self.profiles[..i].iter().any(|o| o.name == p.name) {
                return Err(format!("{f}.name: profile `{}` is defined twice", p.name));
            }
            if p.max_model_bytes < 64 {
                return Err(format!(
                    "{f}.max_model_bytes: {} is too small for any model (64 bytes at least)",
                    p.max_model_bytes
                ));
            }
            p.features
                .validate()
                .map_err(|e| format!("{f}.features: {e}"))?;
            if p.tasks.is_empty() {
                return Err(format!("{f}.tasks: at least one task is needed"));
            }
            for t in &p.tasks {
                if !self.tasks.iter().any(|k| &k.name == t) {
                    return Err(format!(
                        "{f}.tasks: task `{t}` is not defined in [[trainer.tasks]]"
                    ));
                }
            }
        }
        if self.window_examples < 10 {
            return Err("trainer.window_examples: must be at least 10".into());
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return Err(format!(
                "trainer.min_confidence: {} is not within 0..=1",
                self.min_confidence
            ));
        }
        if self.retrain_every_examples == 0 {
            return Err("trainer.retrain_every_examples: must be at least 1".into());
        }
        if self.retrain_every.is_zero() {
            return Err("trainer.retrain_every: must be longer than zero".into());
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return Err(format!(
                "trainer.l2: {} must be a non-negative number",
                self.l2
            ));
        }
        if self.queue == 0 {
            return Err("trainer.queue: must be at least 1".into());
        }
        let g = &self.gate;
        if !(g.margin.is_finite() && (0.0..=1.0).contains(&g.margin)) {
            return Err(format!(
                "trainer.gate.margin: {} is not within 0..=1",
                g.margin
            ));
        }
        if !(g.holdout_fraction > 0.0 && g.holdout_fraction < 1.0) {
            return Err(format!(
                "trainer.gate.holdout_fraction: {} must be strictly between 0 and 1",
                g.holdout_fraction
            ));
        }
        if g.min_holdout == 0 {
            return Err("trainer.gate.min_holdout: must be at least 1".into());
        }
        if self.enabled {
            self.signing_key()?;
        }
        let d = &self.drift;
        if !(d.delta.is_finite() && d.delta >= 0.0) {
            return Err(format!(
                "trainer.drift.delta: {} must be a non-negative number",
                d.delta
            ));
        }
        if !(d.threshold.is_finite() && d.threshold > 0.0) {
            return Err(format!(
                "trainer.drift.threshold: {} must be a positive number",
                d.threshold
            ));
        }
        Ok(())
    }
}

impl TrainerConfig {
    /// The key of `signing_key_file`, read and parsed (none: not set). The
    /// error names the field: `trainer.signing_key_file: …`.
    pub fn signing_key(&self) -> Result<Option<edgeloop_proto::signing::SigningKey>, String> {
        let Some(path) = &self.signing_key_file else {
            return Ok(None);
        };
        if path.as_os_str().is_empty() {
            return Err("trainer.signing_key_file: must not be empty (leave it out to publish to the directory only)".into());
        }
        crate::control::load_signing_key("trainer.signing_key_file", path)
            .map(Some)
            .map_err(|e| match e {
                crate::control::ControlError::KeyFile {
                    field,
                    path,
                    reason,
                } => {
                    format!("{field}: {}: {reason}", path.display())
                }
                other => format!("trainer.signing_key_file: {other}"),
            })
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        || name.starts_with('.')
    {
        return Err(format!(
            "{name:?} must be 1 to 64 letters, digits, '_', '-' or '.' (not first)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_without_a_trainer_profile_gets_no_models_while_training_is_on() {
        let mut c = TrainerConfig::simulator(&["t".to_string()], "d".into());
        assert!(c.serves_profile("mcu8") && c.serves_profile("gateway"));
        assert!(
            !c.serves_profile("f32"),
            "the old agent default has no trainer profile"
        );
        c.enabled = false;
        assert!(
            c.serves_profile("f32"),
            "a processor that does not train cannot tell"
        );
    }

    fn sim() -> TrainerConfig {
        let channels = ["temperature", "humidity", "vibration"].map(String::from);
        TrainerConfig::simulator(&channels, "t".into())
    }

    #[test]
    fn simulator_profiles_validate() {
        assert_eq!(sim().validate(), Ok(()));
    }

    #[test]
    fn bad_profile_fields_are_refused_naming_the_field() {
        let mut c = sim();
        c.profiles[1].max_model_bytes = 3;
        let e = c.validate().expect_err("refused");
        assert!(e.starts_with("trainer.profiles[1].max_model_bytes"), "{e}");
        let mut c = sim();
        c.profiles[0].tasks = vec!["nope".into()];
        let e = c.validate().expect_err("refused");
        assert!(e.starts_with("trainer.profiles[0].tasks"), "{e}");
        let mut c = sim();
        c.profiles[0].features.window = 0;
        let e = c.validate().expect_err("refused");
        assert!(e.starts_with("trainer.profiles[0].features"), "{e}");
        let mut c = sim();
        c.gate.holdout_fraction = 1.0;
        let e = c.validate().expect_err("refused");
        assert!(e.starts_with("trainer.gate.holdout_fraction"), "{e}");
        let mut c = sim();
        c.tasks[0].other = Some("weird".into());
        let e = c.validate().expect_err("refused");
        assert!(e.starts_with("trainer.tasks[0].other"), "{e}");
    }

    #[test]
    fn a_bad_signing_key_file_is_refused_naming_the_field() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let mut c = sim();
        c.signing_key_file = Some(dir.path().join("missing.key"));
        let e = c.validate().expect_err("missing file");
        assert!(e.starts_with("trainer.signing_key_file: "), "{e}");
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not hex")?;
        c.signing_key_file = Some(bad);
        let e = c.validate().expect_err("not a key");
        assert!(e.starts_with("trainer.signing_key_file: "), "{e}");
        let good = dir.path().join("good.key");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32)))?;
        c.signing_key_file = Some(good);
        assert_eq!(c.validate(), Ok(()));
        assert!(c.signing_key()?.is_some());
        Ok(())
    }

    #[test]
    fn unknown_numerics_is_refused_by_the_parser() {
        let text = r#"
            name = "x"
            numerics = "int4"
            max_model_bytes = 100
            features = { channels = ["a"], window = 3 }
            tasks = ["t"]
        "#;
        let e = toml::from_str::<DeviceProfile>(text).expect_err("refused");
        assert!(e.to_string().contains("numerics"), "{e}");
    }

    #[test]
    fn a_task_maps_other_labels_to_its_other_class() {
        let t = TaskConfig {
            name: "is_anomaly".into(),
            classes: vec!["normal".into(), "anomaly".into()],
            other: Some("anomaly".into()),
        };
        assert_eq!(t.class_of("normal"), Some(0));
        assert_eq!(t.class_of("spike"), Some(1));
        let strict = TaskConfig { other: None, ..t };
        assert_eq!(strict.class_of("spike"), None);
    }
}
