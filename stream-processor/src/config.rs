//! Configuration of the stream processor.

use std::path::PathBuf;
use std::time::Duration;

use edgeloop_kafka::KafkaConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// How to reach Kafka.
    pub kafka: KafkaConfig,
    /// Kafka consumer group; processors in one group share the partitions.
    pub group_id: String,
    /// Static group membership (`group.instance.id`): a stable name per
    /// processor instance (a StatefulSet pod name, say). A processor that
    /// restarts under the same name takes its partitions back at once instead
    /// of waiting for the group to notice the old member is gone (Kafka's
    /// static membership, `group.instance.id`).
    pub instance_id: Option<String>,
    /// Consumer session timeout: how long a silent member keeps its
    /// partitions before the group gives them to the others (10 s: a
    /// processor that died hands its partitions on within that; one that
    /// restarts under the same `instance_id` takes them back at once).
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Root of the Parquet data set (files go under `{root}/readings/…`).
    pub parquet_root: PathBuf,
    /// When files roll, and how they are laid out.
    pub sink: SinkConfig,
    /// The labelling rules (TOML, see docs/labelling.md); none: no labels.
    /// The file is watched: a change is taken into force without a restart,
    /// a file with an error is refused and the rules in force stay.
    pub rules_file: Option<PathBuf>,
    /// How often the rules file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub rules_check_interval: Duration,
    /// The channels of the data set: rules naming another channel are
    /// refused (empty: any channel is accepted).
    pub channels: Vec<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (none: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long the processor may take to close its open files
    /// and commit them; past it, it exits with an error and leaves them
    /// (their records are read again after the restart and the files
    /// written again under the same names: nothing is lost). Keep it under
    /// the pod's `terminationGracePeriodSeconds`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The gRPC control API (docs/control-api.md).
    pub control: crate::control::ControlConfig,
    /// Training, device profiles and the quality gate (docs/training.md).
    pub trainer: crate::trainer::TrainerConfig,
    /// What one batch may carry (channels per device profile): give the
    /// broker's `bridge.batch_limits` the same, since the bridge decides from
    /// it what to acknowledge. A batch over it is a dead letter and its seqs
    /// a `losses` row (`invalid_batch`). Default: 64 channels for every
    /// profile.
    pub batch_limits: edgeloop_proto::validate::BatchLimits,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// A file is closed once it holds this many rows…
    pub max_rows: usize,
    /// …or this many bytes (estimated, uncompressed)…
    pub max_bytes: usize,
    /// …or has been open this long. Offsets are committed when a file closes,
    /// so this also bounds how much is re-read after a crash.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// zstd compression level (1–22).
    pub zstd_level: i32,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            kafka: KafkaConfig::default(),
            group_id: "edgeloop-processor".into(),
            instance_id: None,
            session_timeout: Duration::from_secs(10),
            parquet_root: PathBuf::from("data/parquet"),
            sink: SinkConfig::default(),
            rules_file: None,
            rules_check_interval: Duration::from_secs(2),
            channels: Vec::new(),
            metrics_listen: None,
            shutdown_grace: Duration::from_secs(30),
            control: Default::default(),
            trainer: crate::trainer::TrainerConfig::default(),
            batch_limits: Default::default(),
        }
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            max_rows: 1_000_000,
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(60),
            row_group_rows: 128 * 1024,
            zstd_level: 3,
        }
    }
}

impl ProcessorConfig {
    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate().map_err(|e| e.to_string())?;
        if self.group_id.is_empty() {
            return Err("group_id: must not be empty".into());
        }
        if self.parquet_root.as_os_str().is_empty() {
            return Err("parquet_root: must not be empty".into());
        }
        self.batch_limits.validate("batch_limits")?;
        if self.sink.max_rows == 0 {
            return Err("sink.max_rows: must be at least 1".into());
        }
        if self.sink.row_group_rows == 0 {
            return Err("sink.row_group_rows: must be at least 1".into());
        }
        if !(1..=22).contains(&self.sink.zstd_level) {
            return Err(format!(
                "sink.zstd_level: {} is not within 1..=22",
                self.sink.zstd_level
            ));
        }
        if self.sink.max_age.is_zero() {
            return Err("sink.max_age: must be longer than zero".into());
        }
        self.control.validate()?;
        self.trainer.validate()?;
        if self.trainer.enabled && self.rules_file.is_none() {
            return Err(
                "trainer.enabled: the trainer learns the rules' labels; set rules_file too".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../config/processor.example.toml");
        let config: ProcessorConfig = toml::from_str(text).expect("example parses");
        config.validate().expect("example validates");
        let t = &config.trainer;
        let numerics: Vec<_> = t.profiles.iter().map(|p| p.numerics).collect();
        assert!(numerics.contains(&crate::trainer::Numerics::Int8));
        assert!(numerics.contains(&crate::trainer::Numerics::F32));
        let mut enabled = config.clone();
        enabled.trainer.enabled = true;
        enabled.rules_file = Some("rules.toml".into());
        enabled
            .validate()
            .expect("example trainer validates when enabled");
    }

    #[test]
    fn trainer_without_rules_is_refused_naming_the_field() {
        let config = ProcessorConfig {
            trainer: crate::trainer::TrainerConfig::simulator(&["a".into()], "t".into()),
            ..ProcessorConfig::default()
        };
        assert!(config
            .validate()
            .expect_err("refused")
            .starts_with("trainer.enabled"));
    }

    #[test]
    fn example_rules_parse_against_the_simulator_channels() {
        let text = include_str!("../../config/rules.example.toml");
        let known = |c: &str| ["temperature", "humidity", "vibration"].contains(&c);
        let rules = crate::labeller::RulesFile::parse(text, Some(&known)).expect("example rules");
        assert_eq!(rules.version(), "sim-v1");
        assert!(rules.rules.len() >= 5);
    }

    #[test]
    fn bad_zstd_level_is_refused_naming_the_field() {
        let mut config = ProcessorConfig::default();
        config.sink.zstd_level = 40;
        assert!(config
            .validate()
            .expect_err("refused")
            .starts_with("sink.zstd_level"));
    }
}
