//! `edgeloop up --config FILE`: the whole local stack from one file.
//!
//! The file names the devices (simulated, replayed from files, standard
//! input) and, in `[broker]`, `[processor]` and `[agent]`, each component's
//! config with the schema its standalone command reads
//! (`config/{broker,processor,agent}.example.toml`), so one config serves
//! both `up` and Kubernetes. `up` fills in what it runs itself (the Kafka
//! bootstrap, device credentials, keys, the control token) and, where the
//! file leaves them out, its one-machine defaults (listen addresses on
//! loopback, files under `data_dir`, a trainer for the devices' channels).
//! Relative paths in the file are taken from the file's directory. Every
//! key can also be set from the environment (`EDGELOOP_UP__{KEY}…`, e.g.
//! `EDGELOOP_UP__PROCESSOR__SINK__MAX_AGE=5s`), and flags win over both.
//! The example `config/up.example.toml` runs as it is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use edgeloop_agent::config::SourceConfig;
use edgeloop_agent::source::lines::{LineFormat, LinesConfig};
use edgeloop_agent::AgentConfig;
use edgeloop_broker::BrokerConfig;
use edgeloop_processor::trainer::{DeviceProfile, Numerics, TaskConfig};
use edgeloop_processor::ProcessorConfig;
use edgeloop_proto::features::FeatureSet;
use serde::Deserialize;

/// What an `up` config file holds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpFile {
    /// Where the run writes everything (default `data`, beside the file).
    pub data_dir: Option<PathBuf>,
    /// Stop by itself after this long (none: when every device is done,
    /// or on Ctrl-C).
    #[serde(with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// The Kafka `up` uses or starts.
    pub kafka: UpKafka,
    /// Broker replicas (default 1), each on its own MQTT port counted up
    /// from `broker.mqtt.listen` (and its metrics port from
    /// `broker.metrics_listen`); the devices are spread over them.
    pub brokers: Option<usize>,
    /// The devices, in groups.
    pub devices: Vec<DeviceGroup>,
    /// `edgeloop broker`'s config (config/broker.example.toml).
    pub broker: toml::Table,
    /// `edgeloop processor`'s config (config/processor.example.toml).
    pub processor: toml::Table,
    /// `edgeloop agent`'s config (config/agent.example.toml), the template
    /// of every device.
    pub agent: toml::Table,
}

/// The Kafka of an `up` run.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpKafka {
    /// Bootstrap servers of an existing cluster (none: `up` starts one).
    pub bootstrap: Option<String>,
    /// Where the started Kafka serves clients (default 127.0.0.1:19092).
    pub listen: Option<SocketAddr>,
    /// Where its KRaft controller listens (default: the next port up).
    pub controller_listen: Option<SocketAddr>,
    /// Its maximum JVM heap (default `1g`).
    pub heap: Option<String>,
}

/// A group of devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceGroup {
    /// Simulated sensors (`{prefix}-0000`, …), each its own agent.
    Simulated {
        /// How many.
        #[serde(default = "ten")]
        count: usize,
        /// Readings per second of each.
        #[serde(default = "ten_hz")]
        rate: f64,
        /// Their ids are `{prefix}-{i:04}`.
        #[serde(default = "device_prefix")]
        prefix: String,
        /// Profiles the devices take in turn (empty: the trainer's).
        #[serde(default)]
        profiles: Vec<String>,
    },
    /// One device per file, replaying it (CSV with a header, or JSON Lines).
    Replay {
        /// The files; each device's id is its file's name without the
        /// extension (characters a device id cannot hold become `-`).
        files: Vec<PathBuf>,
        /// `csv` or `json_lines` (default: by extension, `.jsonl`,
        /// `.ndjson` and `.json` are JSON Lines).
        #[serde(default)]
        format: Option<LineFormat>,
        /// The timestamp column or key.
        #[serde(default = "ts")]
        ts_column: String,
        /// Channels to keep (CSV: default every column but the timestamp).
        #[serde(default)]
        channels: Vec<String>,
        /// Keep the pace of the timestamps.
        #[serde(default)]
        realtime: bool,
        /// Or this many readings per second (neither: as fast as possible).
        #[serde(default)]
        rate: Option<f64>,
        /// The devices' profile (default `gateway`).
        #[serde(default)]
        profile: Option<String>,
    },
    /// One device reading lines on `up`'s standard input.
    Stdin {
        /// Its id.
        #[serde(default = "stdin_id")]
        id: String,
        /// `csv` (no header: the timestamp, then `channels`) or `json_lines`.
        #[serde(default)]
        format: LineFormat,
        /// The timestamp column or key.
        #[serde(default = "ts")]
        ts_column: String,
        /// The channels, in column order.
        channels: Vec<String>,
        /// Its profile (default `gateway`).
        #[serde(default)]
        profile: Option<String>,
    },
}

fn any_simulated(groups: &[DeviceGroup]) -> bool {
    groups
        .iter()
        .any(|g| matches!(g, DeviceGroup::Simulated { .. }))
}

fn ten() -> usize {
    10
}
fn ten_hz() -> f64 {
    10.0
}
fn device_prefix() -> String {
    "device".into()
}
fn ts() -> String {
    "ts".into()
}
fn stdin_id() -> String {
    "stdin".into()
}

/// What the command line says over the file (`None`: not given).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub devices: Option<usize>,
    pub rate: Option<f64>,
    pub batch_size: Option<usize>,
    pub duration: Option<Duration>,
    pub data_dir: Option<PathBuf>,
    pub kafka: Option<String>,
    pub kafka_listen: Option<SocketAddr>,
    pub kafka_controller_listen: Option<SocketAddr>,
    pub kafka_heap: Option<String>,
    pub mqtt_listen: Option<SocketAddr>,
    pub file_max_age: Option<Duration>,
    pub control_listen: Option<SocketAddr>,
    pub broker_metrics_listen: Option<SocketAddr>,
    pub brokers: Option<usize>,
    pub replay: Vec<PathBuf>,
    pub replay_rate: Option<f64>,
    pub replay_realtime: bool,
    pub rules: Option<PathBuf>,
}

/// Everything an `up` run starts, resolved from the file, the flags and
/// the defaults; credentials, keys and the control token are `up`'s to add.
#[derive(Debug)]
pub struct Plan {
    pub data_dir: PathBuf,
    pub duration: Option<Duration>,
    /// `Some`: an existing cluster; `None`: start one with `local`.
    pub bootstrap: Option<String>,
    pub kafka_listen: SocketAddr,
    pub kafka_controller_listen: Option<SocketAddr>,
    pub kafka_heap: String,
    /// One config per broker replica, without credentials.
    pub brokers: Vec<BrokerConfig>,
    pub processor: ProcessorConfig,
    /// One config per device, without credentials.
    pub devices: Vec<AgentConfig>,
    /// What the devices are, for the start-up line.
    pub description: Vec<String>,
    /// Whether the rules are `up`'s own example (simulated devices only).
    pub example_rules: bool,
    /// Readings per MQTT message.
    pub batch_size: usize,
    /// Whether every device stops by itself (no simulated one).
    pub ends_by_itself: bool,
}

impl UpFile {
    /// Reads `path`, with `EDGELOOP_UP__*` variables over its keys.
    pub fn read(path: &Path, vars: impl IntoIterator<Item = (String, String)>) -> Result<UpFile> {
        crate::config_env::load("up", Some(path), vars)
    }
}

/// Resolves the run: `file` (read from `file_dir`, where its relative
/// paths start), then the flags in `over`, then the defaults.
pub fn plan(file: UpFile, file_dir: Option<&Path>, over: &Overrides) -> Result<Plan> {
    let from_file = |p: &Path| match file_dir {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    };
    let data_dir = match (&over.data_dir, &file.data_dir) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => from_file(d),
        (None, None) => from_file(Path::new("data")),
    };
    let mut groups = file.devices.clone();
    if !over.replay.is_empty() {
        groups.push(DeviceGroup::Replay {
            files: over.replay.clone(),
            format: None,
            ts_column: ts(),
            channels: Vec::new(),
            realtime: over.replay_realtime,
            rate: over.replay_rate,
            profile: None,
        });
    } else if over.replay_rate.is_some() || over.replay_realtime {
        bail!("--replay-rate and --replay-realtime pace the files of --replay, and none is given");
    }
    // Paths of the file's groups are the file's; those of --replay the
    // shell's.
    let from_flags = file.devices.len();
    for (i, group) in groups.iter_mut().enumerate() {
        if let DeviceGroup::Replay { files, .. } = group {
            if i < from_flags {
                *files = files.iter().map(|f| from_file(f)).collect();
            }
        }
    }
    if !any_simulated(&groups) && (groups.is_empty() || over.devices.is_some()) {
        groups.insert(
            0,
            DeviceGroup::Simulated {
                count: 10,
                rate: 10.0,
                prefix: device_prefix(),
                profiles: Vec::new(),
            },
        );
    }
    for group in &mut groups {
        if let DeviceGroup::Simulated { count, rate, .. } = group {
            if let Some(n) = over.devices {
                *count = n;
            }
            if let Some(r) = over.rate {
                *rate = r;
            }
        }
    }
    let only_simulated = groups
        .iter()
        .all(|g| matches!(g, DeviceGroup::Simulated { .. }));
    // Every device's agent: the file's [agent] as the template.
    let mut template: AgentConfig = component("agent", file.agent.clone())?;
    let simulator = match &template.source {
        SourceConfig::Simulator(sim) => sim.clone(),
        _ => Default::default(),
    };

    // The channels each device sends.
    let simulator_channels: Vec<String> =
        simulator.channels.iter().map(|c| c.name.clone()).collect();
    let mut sources: Vec<(String, Option<String>, SourceConfig)> = Vec::new();
    let mut description = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let at = format!("devices[{g}]");
        match group {
            DeviceGroup::Simulated {
                count,
                rate,
                prefix,
                profiles,
            } => {
                for i in 0..*count {
                    let mut sim = edgeloop_agent::source::simulator::SimulatorConfig {
                        rate_hz: *rate,
                        ..simulator.clone()
                    };
                    sim.seed = sim.seed.wrapping_add(i as u64);
                    let profile =
                        (!profiles.is_empty()).then(|| profiles[i % profiles.len()].clone());
                    sources.push((
                        format!("{prefix}-{i:04}"),
                        profile,
                        SourceConfig::Simulator(sim),
                    ));
                }
                description.push(format!(
                    "{count} simulated devices at {rate} readings/s each"
                ));
            }
            DeviceGroup::Replay {
                files,
                format,
                ts_column,
                channels,
                realtime,
                rate,
                profile,
            } => {
                if files.is_empty() {
                    bail!("{at}.files: no file to replay");
                }
                for file in files {
                    if !file.is_file() {
                        bail!("{at}.files: {} is not a file", file.display());
                    }
                    let id = device_id_of(file)
                        .with_context(|| format!("{at}.files: {}", file.display()))?;
                    let lines = LinesConfig {
                        path: Some(file.clone()),
                        format: format.unwrap_or_else(|| format_of(file)),
                        ts_column: ts_column.clone(),
                        channels: channels.clone(),
                        realtime: *realtime,
                        rate_hz: *rate,
                    };
                    lines
                        .validate(true)
                        .map_err(|e| anyhow::anyhow!("{at}.{e}"))?;
                    sources.push((id, profile.clone(), SourceConfig::Replay(lines)));
                }
                let pace = match (realtime, rate) {
                    (true, _) => "at the pace of their timestamps".to_string(),
                    (false, Some(r)) => format!("at {r} readings/s each"),
                    (false, None) => "as fast as they go".to_string(),
                };
                description.push(format!("{} replayed files {pace}", files.len()));
            }
            DeviceGroup::Stdin {
                id,
                format,
                ts_column,
                channels,
                profile,
            } => {
                let lines = LinesConfig {
                    path: None,
                    format: *format,
                    ts_column: ts_column.clone(),
                    channels: channels.clone(),
                    realtime: false,
                    rate_hz: None,
                };
                lines
                    .validate(false)
                    .map_err(|e| anyhow::anyhow!("{at}.{e}"))?;
                if channels.is_empty() {
                    bail!("{at}.channels: standard input has no header; name its channels");
                }
                if sources
                    .iter()
                    .any(|(_, _, s)| matches!(s, SourceConfig::Stdin(_)))
                {
                    bail!("{at}: only one device can read up's standard input");
                }
                sources.push((id.clone(), profile.clone(), SourceConfig::Stdin(lines)));
                description.push(format!("device {id} reading standard input"));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some((id, _, _)) = sources.iter().find(|(id, _, _)| !seen.insert(id.clone())) {
        bail!("devices: two devices would have the id {id:?} (replayed files are named after their file)");
    }
    let mut device_channels: Vec<String> = Vec::new();
    let mut common: Option<Vec<String>> = None;
    for (id, _, source) in &sources {
        let channels = match source {
            SourceConfig::Simulator(_) => simulator_channels.clone(),
            SourceConfig::Replay(l) | SourceConfig::Stdin(l) => l
                .resolve_channels()
                .map_err(|e| anyhow::anyhow!("device {id}: {e}"))?,
            SourceConfig::Sysfs(_) => Vec::new(),
        };
        for c in &channels {
            if !device_channels.contains(c) {
                device_channels.push(c.clone());
            }
        }
        common = Some(match common {
            None => channels,
            Some(c) => c.into_iter().filter(|x| channels.contains(x)).collect(),
        });
    }
    let common = common.unwrap_or_default();

    // The broker: its file section, loopback defaults, up's Kafka.
    let mut broker_table = file.broker.clone();
    put(
        &mut broker_table,
        &["mqtt", "listen"],
        over.mqtt_listen.map(|a| a.to_string()),
        "127.0.0.1:1883",
    );
    put(
        &mut broker_table,
        &["metrics_listen"],
        over.broker_metrics_listen.map(|a| a.to_string()),
        "127.0.0.1:9465",
    );
    let broker: BrokerConfig = component("broker", broker_table)?;
    let replicas = over.brokers.or(file.brokers).unwrap_or(1);
    if !(1..=MAX_BROKERS).contains(&replicas) {
        bail!("brokers: {replicas} broker replicas; give 1 to {MAX_BROKERS}");
    }
    let brokers = broker_replicas(&broker, replicas)?;

    // The processor.
    let mut table = file.processor.clone();
    let had_trainer = table.contains_key("trainer");
    resolve_paths(&mut table, &["rules_file"], &from_file);
    resolve_paths(&mut table, &["parquet_root"], &from_file);
    resolve_paths(&mut table, &["trainer", "dir"], &from_file);
    if let Some(rules) = &over.rules {
        table.insert("rules_file".into(), path_value(rules));
    }
    put(&mut table, &["group_id"], None, "edgeloop-up");
    put(&mut table, &["instance_id"], None, "edgeloop-up-0");
    put(
        &mut table,
        &["parquet_root"],
        None,
        &data_dir.join("parquet").to_string_lossy(),
    );
    put(
        &mut table,
        &["sink", "max_age"],
        over.file_max_age
            .map(|d| humantime::format_duration(d).to_string()),
        "10s",
    );
    put(
        &mut table,
        &["control", "listen"],
        over.control_listen.map(|a| a.to_string()),
        "127.0.0.1:9470",
    );
    let mut processor: ProcessorConfig = component("processor", table)?;
    // Rules: the file's, --rules, or for simulated devices the shipped
    // example (DIR/rules.toml, written on the first run).
    let mut example_rules = false;
    if processor.rules_file.is_none() && only_simulated {
        processor.rules_file = Some(data_dir.join("rules.toml"));
        example_rules = true;
    }
    if processor.channels.is_empty() {
        processor.channels = device_channels.clone();
    }
    if !had_trainer {
        processor.trainer = default_trainer(&processor, only_simulated, &common, &data_dir)?;
    }

    // No two listeners on one address.
    let mut addresses: Vec<(String, SocketAddr)> = Vec::new();
    for (i, b) in brokers.iter().enumerate() {
        addresses.push((format!("broker {i}'s mqtt.listen"), b.mqtt.listen));
        if let Some(a) = b.mqtt.tls_listen {
            addresses.push((format!("broker {i}'s mqtt.tls_listen"), a));
        }
        if let Some(a) = b.metrics_listen {
            addresses.push((format!("broker {i}'s metrics_listen"), a));
        }
    }
    if let Some(a) = processor.control.listen {
        addresses.push(("processor.control.listen".into(), a));
    }
    if let Some(a) = processor.metrics_listen {
        addresses.push(("processor.metrics_listen".into(), a));
    }
    for (i, (what, addr)) in addresses.iter().enumerate() {
        if let Some((other, _)) = addresses[..i].iter().find(|(_, a)| a == addr) {
            bail!("{other} and {what} are both {addr}: give one of them another address");
        }
    }
    // Where devices connect: a replica's listen address, loopback for an
    // unspecified one.
    let servers: Vec<(String, u16)> = brokers
        .iter()
        .map(|b| {
            let listen = b.mqtt.listen;
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".into()
            } else {
                listen.ip().to_string()
            };
            (host, listen.port())
        })
        .collect();
    if !file.agent.contains_key("spool") || over.data_dir.is_some() {
        template.spool.dir = data_dir.join("spool");
    } else {
        template.spool.dir = from_file(&template.spool.dir);
    }
    let batch_size = over
        .batch_size
        .or_else(|| {
            table_has(&file.agent, &["uplink", "batch_size"]).then_some(template.uplink.batch_size)
        })
        .unwrap_or(100);
    template.uplink.batch_size = batch_size;
    template.uplink.max_unacked_readings = template
        .uplink
        .max_unacked_readings
        .max(batch_size as u64 * 4);
    let trainer_profiles: Vec<String> = processor
        .trainer
        .profiles
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let mut devices = Vec::new();
    let mut simulated = 0usize;
    for (k, (id, profile, source)) in sources.into_iter().enumerate() {
        let mut config = template.clone();
        // Device k starts on replica k mod N and moves on to the next after
        // a lost connection.
        config.mqtt.spread_over(&servers, k);
        config.spool.dir = template.spool.dir.join(&id);
        if let Some(dir) = &template.models.dir {
            config.models.dir = Some(dir.join(&id));
        }
        config.profile = match (profile, &source) {
            (Some(p), _) => p,
            (None, _) if file.agent.contains_key("profile") => template.profile.clone(),
            // Simulated devices take the trainer's profiles in turn.
            (None, SourceConfig::Simulator(_)) if !trainer_profiles.is_empty() => {
                simulated += 1;
                trainer_profiles[(simulated - 1) % trainer_profiles.len()].clone()
            }
            (None, _) => edgeloop_proto::DEFAULT_PROFILE.to_string(),
        };
        config.device_id = id;
        config.source = source;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("device {}: {e}", config.device_id))?;
        devices.push(config);
    }

    Ok(Plan {
        data_dir,
        duration: over.duration.or(file.duration),
        bootstrap: over.kafka.clone().or(file.kafka.bootstrap),
        kafka_listen: over
            .kafka_listen
            .or(file.kafka.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 19092))),
        kafka_controller_listen: over
            .kafka_controller_listen
            .or(file.kafka.controller_listen),
        kafka_heap: over
            .kafka_heap
            .clone()
            .or(file.kafka.heap)
            .unwrap_or_else(|| "1g".into()),
        brokers,
        processor,
        devices,
        description,
        example_rules,
        batch_size,
        ends_by_itself: !any_simulated(&groups),
    })
}

/// Broker replicas `up` runs at most.
pub const MAX_BROKERS: usize = 16;

/// `n` replicas of `broker`: replica i listens on the ports of `broker`
/// plus i (MQTT, MQTT over TLS, metrics) and is named `up-broker-{i}`
/// unless the config names it (then `{name}-{i}`).
fn broker_replicas(broker: &BrokerConfig, n: usize) -> Result<Vec<BrokerConfig>> {
    if n == 1 {
        return Ok(vec![broker.clone()]);
    }
    let plus = |addr: SocketAddr, i: usize, field: &str| -> Result<SocketAddr> {
        let port = u16::try_from(usize::from(addr.port()) + i)
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("broker.{field}: no port {i} above {addr} for replica {i}"))?;
        Ok(SocketAddr::new(addr.ip(), port))
    };
    (0..n)
        .map(|i| {
            let mut replica = broker.clone();
            replica.mqtt.listen = plus(broker.mqtt.listen, i, "mqtt.listen")?;
            if let Some(tls) = broker.mqtt.tls_listen {
                replica.mqtt.tls_listen = Some(plus(tls, i, "mqtt.tls_listen")?);
            }
            if let Some(metrics) = broker.metrics_listen {
                replica.metrics_listen = Some(plus(metrics, i, "metrics_listen")?);
            }
            replica.replica_id = Some(match &broker.replica_id {
                Some(name) => format!("{name}-{i}"),
                None => format!("up-broker-{i}"),
            });
            Ok(replica)
        })
        .collect()
}

/// The trainer of a config that sets none: for simulated devices the
/// shipped one (`mcu8` and `gateway` profiles, task `anomaly`); for devices
/// of one's own, one task `label` whose classes are the rules' labels, on
/// the channels every device sends, in both profiles. Without rules: none.
fn default_trainer(
    processor: &ProcessorConfig,
    only_simulated: bool,
    channels: &[String],
    data_dir: &Path,
) -> Result<edgeloop_processor::trainer::TrainerConfig> {
    use edgeloop_processor::trainer::TrainerConfig;
    let dir = data_dir.join("trainer");
    let mut trainer = if only_simulated {
        TrainerConfig::simulator(&processor.channels, dir)
    } else {
        let Some(rules_file) = &processor.rules_file else {
            return Ok(TrainerConfig::default());
        };
        let text = std::fs::read_to_string(rules_file)
            .with_context(|| format!("processor.rules_file: reading {}", rules_file.display()))?;
        let rules = edgeloop_processor::labeller::RulesFile::parse(&text, None)
            .with_context(|| format!("processor.rules_file: {}", rules_file.display()))?;
        let mut classes: Vec<String> = Vec::new();
        for rule in &rules.rules {
            if !classes.contains(&rule.label) {
                classes.push(rule.label.clone());
            }
        }
        if classes.len() < 2 || channels.is_empty() {
            // Nothing to tell apart, or no channel every device has.
            return Ok(TrainerConfig::default());
        }
        let features = FeatureSet {
            channels: channels.to_vec(),
            window: 10,
        };
        let task = "label".to_string();
        TrainerConfig {
            enabled: true,
            dir,
            profiles: vec![
                DeviceProfile {
                    name: "mcu8".into(),
                    numerics: Numerics::Int8,
                    max_model_bytes: 4096,
                    features: features.clone(),
                    tasks: vec![task.clone()],
                },
                DeviceProfile {
                    name: edgeloop_proto::DEFAULT_PROFILE.into(),
                    numerics: Numerics::F32,
                    max_model_bytes: 1 << 20,
                    features,
                    tasks: vec![task.clone()],
                },
            ],
            tasks: vec![TaskConfig {
                name: task,
                classes,
                other: None,
            }],
            ..TrainerConfig::default()
        }
    };
    // A run on one machine is short: a first model once 2,000 labelled
    // readings are in, then a retrain every 2,000 more (or every minute), on
    // at most 4,000 examples (the last 2,500 and a sample of 1,500 older),
    // so a retrain takes well under a second in a release build.
    trainer.retrain_every_examples = 2_000;
    trainer.window_examples = 2_500;
    trainer.reservoir_examples = 1_500;
    trainer.retrain_every = Duration::from_secs(60);
    Ok(trainer)
}

/// A component's config from its section, naming the section on error.
fn component<T: serde::de::DeserializeOwned>(name: &str, table: toml::Table) -> Result<T> {
    T::deserialize(toml::Value::Table(table)).with_context(|| format!("in [{name}]"))
}

/// Sets `path` in `table`: to `flag` when given, else to `default` unless
/// the table has a value there.
fn put(table: &mut toml::Table, path: &[&str], flag: Option<String>, default: &str) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in parents {
        let entry = at
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            // Not a table: left for the component's own check to refuse.
            _ => return,
        };
    }
    match flag {
        Some(v) => {
            at.insert(last.to_string(), toml::Value::String(v));
        }
        None => {
            at.entry(last.to_string())
                .or_insert_with(|| toml::Value::String(default.into()));
        }
    }
}

fn table_has(table: &toml::Table, path: &[&str]) -> bool {
    let mut at = table;
    for (i, key) in path.iter().enumerate() {
        match at.get(*key) {
            Some(toml::Value::Table(t)) if i + 1 < path.len() => at = t,
            Some(_) if i + 1 == path.len() => return true,
            _ => return false,
        }
    }
    false
}

/// Makes the path string at `path` in `table` relative to the file's
/// directory.
fn resolve_paths(table: &mut toml::Table, path: &[&str], from_file: &dyn Fn(&Path) -> PathBuf) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in parents {
        match at.get_mut(*key) {
            Some(toml::Value::Table(t)) => at = t,
            _ => return,
        }
    }
    if let Some(toml::Value::String(p)) = at.get(*last) {
        let resolved = from_file(Path::new(p));
        at.insert(last.to_string(), path_value(&resolved));
    }
}

fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.to_string_lossy().into_owned())
}

/// A replayed file's device id: its name without the extension, each
/// character a device id cannot hold replaced by `-`.
fn device_id_of(file: &Path) -> Result<String> {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(edgeloop_proto::device_id::MAX_LEN)
        .collect();
    edgeloop_proto::device_id::validate(&id).map_err(anyhow::Error::msg)?;
    Ok(id)
}

fn format_of(file: &Path) -> LineFormat {
    match file.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson" | "json") => LineFormat::JsonLines,
        _ => LineFormat::Csv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, dir: &Path) -> Result<UpFile> {
        let path = dir.join("edgeloop.toml");
        std::fs::write(&path, text)?;
        UpFile::read(&path, Vec::new())
    }

    #[test]
    fn the_shipped_example_runs_as_it_is() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let file = UpFile::read(&root.join("up.example.toml"), Vec::new())?;
        let mut plan = plan(file, Some(&root), &Overrides::default())?;
        assert!(!plan.devices.is_empty());
        // `up` adds the control API's token.
        plan.processor.control.token = Some("0123456789abcdef0123".into());
        for broker in &plan.brokers {
            broker.validate().map_err(anyhow::Error::msg)?;
        }
        plan.processor.validate().map_err(anyhow::Error::msg)?;
        // Every device's profile has models to get.
        for d in &plan.devices {
            assert!(
                plan.processor
                    .trainer
                    .profiles
                    .iter()
                    .any(|p| p.name == d.profile),
                "{} announces {:?}",
                d.device_id,
                d.profile
            );
        }
        Ok(())
    }

    #[test]
    fn replayed_files_are_devices_named_after_them_with_the_headers_channels() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("press #1.csv"), "ts,p,q\n1,2,3\n")?;
        std::fs::write(dir.path().join("press-2.csv"), "ts,p,r\n1,2,3\n")?;
        std::fs::write(
            dir.path().join("rules.toml"),
            "[[rule]]\nname = \"high\"\nlabel = \"high\"\nwhen = { kind = \"threshold\", channel = \"p\", above = 5.0 }\n\
             [[rule]]\nname = \"low\"\nlabel = \"low\"\nwhen = { kind = \"threshold\", channel = \"p\", below = 5.0 }\n",
        )?;
        let file = read(
            "[[devices]]\nkind = \"replay\"\nfiles = [\"press #1.csv\", \"press-2.csv\"]\nrate = 50.0\n\
             [processor]\nrules_file = \"rules.toml\"\n",
            dir.path(),
        )?;
        let plan = plan(file, Some(dir.path()), &Overrides::default())?;
        let ids: Vec<&str> = plan.devices.iter().map(|d| d.device_id.as_str()).collect();
        assert_eq!(ids, ["press--1", "press-2"]);
        assert!(plan.devices.iter().all(|d| d.profile == "gateway"));
        assert_eq!(plan.processor.channels, ["p", "q", "r"]);
        assert_eq!(plan.data_dir, dir.path().join("data"));
        assert_eq!(
            plan.processor.rules_file.as_deref(),
            Some(dir.path().join("rules.toml").as_path())
        );
        // A trainer for what every device sends, classes from the rules.
        let t = &plan.processor.trainer;
        assert!(t.enabled);
        assert_eq!(t.tasks[0].classes, ["high", "low"]);
        assert!(t.profiles.iter().all(|p| p.features.channels == ["p"]));
        assert!(t.profiles.iter().any(|p| p.name == "gateway"));
        match &plan.devices[0].source {
            SourceConfig::Replay(l) => assert_eq!(l.rate_hz, Some(50.0)),
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_defaults() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = read(
            "data_dir = \"run\"\n[[devices]]\nkind = \"simulated\"\ncount = 3\n\
             [broker.mqtt]\nlisten = \"127.0.0.1:2883\"\n[processor.sink]\nmax_age = \"3s\"\n",
            dir.path(),
        )?;
        let p = plan(file, Some(dir.path()), &Overrides::default())?;
        assert_eq!(p.devices.len(), 3);
        assert_eq!(p.data_dir, dir.path().join("run"));
        assert_eq!(p.brokers[0].mqtt.listen.port(), 2883);
        assert_eq!(p.devices[0].mqtt.port, 2883);
        assert_eq!(p.processor.sink.max_age, Duration::from_secs(3));
        assert_eq!(p.processor.control.listen.map(|a| a.port()), Some(9470));
        let file = read(
            "[[devices]]\nkind = \"simulated\"\ncount = 3\n[broker.mqtt]\nlisten = \"127.0.0.1:2883\"\n",
            dir.path(),
        )?;
        let over = Overrides {
            devices: Some(5),
            mqtt_listen: Some("127.0.0.1:3883".parse()?),
            ..Overrides::default()
        };
        let p = plan(file, Some(dir.path()), &over)?;
        assert_eq!(p.devices.len(), 5);
        assert_eq!(p.brokers[0].mqtt.listen.port(), 3883);
        Ok(())
    }

    #[test]
    fn broker_replicas_take_the_next_ports_and_the_devices_are_spread_over_them() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = read(
            "brokers = 3\n[[devices]]\nkind = \"simulated\"\ncount = 4\n\
             [broker]\nmetrics_listen = \"127.0.0.1:7465\"\n[broker.mqtt]\nlisten = \"127.0.0.1:2883\"\n",
            dir.path(),
        )?;
        let p = plan(file, Some(dir.path()), &Overrides::default())?;
        let ports: Vec<(u16, Option<u16>, Option<String>)> = p
            .brokers
            .iter()
            .map(|b| {
                (
                    b.mqtt.listen.port(),
                    b.metrics_listen.map(|a| a.port()),
                    b.replica_id.clone(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                (2883, Some(7465), Some("up-broker-0".into())),
                (2884, Some(7466), Some("up-broker-1".into())),
                (2885, Some(7467), Some("up-broker-2".into())),
            ]
        );
        // Device k starts on replica k mod 3; the others follow in turn.
        let servers: Vec<Vec<String>> = p
            .devices
            .iter()
            .map(|d| d.mqtt.servers().map_err(anyhow::Error::msg))
            .map(|s| Ok(s?.iter().map(|(h, port)| format!("{h}:{port}")).collect()))
            .collect::<Result<_>>()?;
        let a = "127.0.0.1:2883".to_string();
        let (b, c) = ("127.0.0.1:2884".to_string(), "127.0.0.1:2885".to_string());
        assert_eq!(
            servers,
            [
                vec![a.clone(), b.clone(), c.clone()],
                vec![b.clone(), c.clone(), a.clone()],
                vec![c.clone(), a.clone(), b.clone()],
                vec![a, b, c],
            ]
        );
        // --brokers wins over the file; one replica keeps its own name.
        let over = Overrides {
            brokers: Some(1),
            ..Overrides::default()
        };
        let file = read("brokers = 3\n", dir.path())?;
        let p = plan(file, Some(dir.path()), &over)?;
        assert_eq!(p.brokers.len(), 1);
        assert_eq!(p.brokers[0].replica_id, None);
        assert!(p.devices[0].mqtt.fallback_servers.is_empty());
        Ok(())
    }

    #[test]
    fn a_bad_config_is_refused_naming_the_field() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for (text, names) in [
            ("[processor]\nsink = { max_rowz = 3 }\n", "max_rowz"),
            ("[processor.sink]\nmax_rows = \"many\"\n", "max_rows"),
            (
                "[[devices]]\nkind = \"replay\"\nfiles = [\"nope.csv\"]\n",
                "devices[0].files",
            ),
            ("[[devices]]\nkind = \"teleport\"\n", "teleport"),
            ("[agent]\nprofile = \"a/b\"\n", "profile"),
            ("[[devices]]\nkind = \"stdin\"\n", "channels"),
            (
                "[[devices]]\nkind = \"stdin\"\nchannels = [\"a\"]\n[[devices]]\nkind = \"stdin\"\nid = \"b\"\nchannels = [\"a\"]\n",
                "only one device",
            ),
            ("[kafka]\nlisten = \"x\"\n", "listen"),
            ("brokers = 0\n", "brokers: 0"),
            ("brokers = 17\n", "brokers: 17"),
            (
                "brokers = 2\n[broker.mqtt]\nlisten = \"127.0.0.1:65535\"\n",
                "broker.mqtt.listen",
            ),
            // Replica 5's metrics port would be the control API's.
            (
                "brokers = 6\n[broker]\nmetrics_listen = \"127.0.0.1:9465\"\n",
                "127.0.0.1:9470",
            ),
        ] {
            let err = read(text, dir.path())
                .and_then(|f| plan(f, Some(dir.path()), &Overrides::default()));
            let Err(err) = err else {
                panic!("{text}: accepted");
            };
            let message = format!("{err:#}");
            assert!(message.contains(names), "{text}: {message}");
        }
        Ok(())
    }
}
