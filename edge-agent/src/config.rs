//! Configuration of one agent. Every field has a default that works on one
//! machine; durations are human-readable (`"100ms"`, `"30s"`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::source::lines::LinesConfig;
use crate::source::simulator::SimulatorConfig;
use crate::source::sysfs::SysfsConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The device id: also the MQTT client id and the `{device}` of its topics.
    pub device_id: String,
    /// The device profile it announces; it picks the models the device gets
    /// (`models/{task}/{profile}`) and must match a trainer profile, such as
    /// the shipped `gateway` (f32, the default) or `mcu8` (int8).
    pub profile: String,
    /// How to reach the MQTT broker.
    pub mqtt: MqttConfig,
    /// Where readings come from.
    pub source: SourceConfig,
    /// Where readings wait until acknowledged.
    pub spool: SpoolConfig,
    /// How readings are batched and sent.
    pub uplink: UplinkConfig,
    /// On shutdown, how long to keep sending so that everything taken is
    /// acknowledged before exiting.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Gateway mode: accept child devices over MQTT and relay them (off when absent).
    pub gateway: Option<GatewayConfig>,
    /// Model updates and on-device inference (off until `verify_key_file` is set).
    pub models: ModelsConfig,
    /// Where to serve `/healthz`, `/readyz` (every uplink connected) and
    /// Prometheus `/metrics`, e.g. `127.0.0.1:9466` (none: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

pub use crate::models::ModelsConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where child devices connect (MQTT 3.1.1).
    pub listen: std::net::SocketAddr,
    /// Child devices at most.
    pub max_children: usize,
    /// Largest payload a child may publish, in bytes.
    pub max_payload_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_children: 256,
            max_payload_bytes: 1 << 20,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            device_id: "device-0000".into(),
            profile: edgeloop_proto::DEFAULT_PROFILE.into(),
            mqtt: MqttConfig::default(),
            source: SourceConfig::Simulator(SimulatorConfig::default()),
            spool: SpoolConfig::default(),
            uplink: UplinkConfig::default(),
            shutdown_grace: Duration::from_secs(10),
            gateway: None,
            models: ModelsConfig::default(),
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker MQTT port.
    pub port: u16,
    /// More broker replicas, `HOST:PORT` each, for when `host`:`port` is
    /// away: after each lost or refused connection the agent tries the next
    /// address of `host:port` then these, in turn (wrapping around), as a
    /// Paho client does with its list of server URIs. The replicas must
    /// bridge to the same Kafka (docs/broker.md, "Several replicas"). Empty
    /// by default: only `host`:`port`, as behind a load balancer.
    pub fallback_servers: Vec<String>,
    /// MQTT keep-alive interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest MQTT packet sent or accepted, in bytes.
    pub max_packet_bytes: usize,
    /// QoS 1 publishes in flight (sent, PUBACK not yet received).
    pub max_inflight: u16,
    /// How long a connect (TCP, then CONNECT until CONNACK) may take before
    /// the agent gives up on it and tries again after its backoff; also the
    /// longest a write to the broker may take. Whole seconds, at least 1.
    /// rumqttc's own default is 5 s, which a broker busy logging in
    /// thousands of devices at once can exceed: each retry then costs it
    /// another login.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Optional MQTT user name and password.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            fallback_servers: Vec::new(),
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 1 << 20,
            max_inflight: 64,
            connect_timeout: Duration::from_secs(30),
            username: None,
            password: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "kind")]
pub enum SourceConfig {
    /// A seeded simulated sensor with anomalies.
    Simulator(SimulatorConfig),
    /// A CSV or JSON Lines file, replayed as fast as possible or in real time.
    Replay(LinesConfig),
    /// Lines (CSV or JSON Lines) on standard input.
    Stdin(LinesConfig),
    /// The thermal zones and hwmon sensors of this Linux machine.
    Sysfs(SysfsConfig),
}

pub use crate::spool::disk::{DiskSpoolConfig as SpoolConfig, FullPolicy};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Readings per MQTT message at most.
    pub batch_size: usize,
    /// How long a partial batch may wait for more readings before it is sent.
    /// 0 (the default): the readings of each spool sync go out as soon as
    /// they are on disk, so `spool.sync_interval` (the group commit) sets the
    /// batching; more than 0 holds them for further syncs, fewer and larger
    /// messages for more latency.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Readings sent but not yet acknowledged, at most (the in-flight window).
    pub max_unacked_readings: u64,
    /// If the ack watermark has not moved for this long while readings are
    /// outstanding, send again from the watermark.
    #[serde(with = "humantime_serde")]
    pub resend_after: Duration,
    /// First delay before reconnecting; doubles up to `reconnect_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// After an outage: `in_order` sends the backlog first; `live_first`
    /// sends new readings ahead of it while the backlog drains behind them.
    pub drain_order: DrainOrder,
    /// With `live_first`, the share of batches the backlog gets while new
    /// readings are waiting too (it gets everything when they are not).
    pub backlog_share: f64,
    /// How often the retained `status/{device}` is re-published (it is also
    /// published on every connect and when losses change).
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DrainOrder {
    #[default]
    InOrder,
    LiveFirst,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            batch_size: 100,
            linger: Duration::ZERO,
            max_unacked_readings: 20_000,
            resend_after: Duration::from_secs(15),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
            drain_order: DrainOrder::InOrder,
            backlog_share: 0.5,
            status_interval: Duration::from_secs(30),
        }
    }
}

impl MqttConfig {
    /// The brokers to connect to, in the order they are tried: `host`:`port`,
    /// then `fallback_servers`. An error names the entry that is not
    /// `HOST:PORT`.
    pub fn servers(&self) -> Result<Vec<(String, u16)>, String> {
        let mut servers = vec![(self.host.clone(), self.port)];
        for (i, server) in self.fallback_servers.iter().enumerate() {
            let parsed = server
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)));
            match parsed {
                Some((_, 0)) | None => {
                    return Err(format!(
                        "mqtt.fallback_servers[{i}]: {server:?} is not HOST:PORT (a port from 1 to 65535)"
                    ))
                }
                Some(s) => servers.push(s),
            }
        }
        Ok(servers)
    }

    /// Spreads devices over broker replicas as a load balancer would: this
    /// device starts on `servers[first mod N]` (`host`, `port`) and lists
    /// the others after it, in turn, as its `fallback_servers`.
    pub fn spread_over(&mut self, servers: &[(String, u16)], first: usize) {
        if servers.is_empty() {
            return;
        }
        let first = first % servers.len();
        let mut order = servers[first..].iter().chain(&servers[..first]);
        if let Some((host, port)) = order.next() {
            (self.host, self.port) = (host.clone(), *port);
        }
        self.fallback_servers = order.map(|(h, p)| format!("{h}:{p}")).collect();
    }
}

impl AgentConfig {
    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        edgeloop_proto::device_id::validate(&self.device_id)
            .map_err(|e| format!("device_id: {e}"))?;
        if self.profile.is_empty() || self.profile.contains(['/', '+', '#']) {
            return Err(format!(
                "profile: {:?} must be non-empty and free of '/', '+' and '#'",
                self.profile
            ));
        }
        if self.mqtt.host.is_empty() {
            return Err("mqtt.host: must not be empty".into());
        }
        self.mqtt.servers()?;
        if self.mqtt.max_inflight == 0 {
            return Err("mqtt.max_inflight: must be at least 1".into());
        }
        if self.mqtt.connect_timeout < Duration::from_secs(1) {
            return Err("mqtt.connect_timeout: must be at least 1s".into());
        }
        self.spool.validate().map_err(|e| format!("spool.{e}"))?;
        if self.uplink.batch_size == 0 {
            return Err("uplink.batch_size: must be at least 1".into());
        }
        if self.uplink.max_unacked_readings < self.uplink.batch_size as u64 {
            return Err(format!(
                "uplink.max_unacked_readings: {} is smaller than uplink.batch_size {}",
                self.uplink.max_unacked_readings, self.uplink.batch_size
            ));
        }
        let share = self.uplink.backlog_share;
        if share.is_nan() || share <= 0.0 || share > 1.0 {
            return Err(format!(
                "uplink.backlog_share: {} is not within (0, 1]",
                self.uplink.backlog_share
            ));
        }
        if self.uplink.reconnect_min > self.uplink.reconnect_max {
            return Err("uplink.reconnect_min: must not exceed uplink.reconnect_max".into());
        }
        match &self.source {
            SourceConfig::Simulator(sim) => sim.validate(),
            SourceConfig::Replay(lines) => lines.validate(true),
            SourceConfig::Stdin(lines) => lines.validate(false),
            SourceConfig::Sysfs(sys) if sys.rate_hz.is_nan() || sys.rate_hz <= 0.0 => Err(format!(
                "rate_hz: must be a positive number, not {}",
                sys.rate_hz
            )),
            SourceConfig::Sysfs(_) => Ok(()),
        }
        .map_err(|e| format!("source.{e}"))?;
        self.models.verifying_key()?;
        Ok(())
    }

    /// Where this device's models are stored: `models.dir`, or
    /// `{spool.dir}/models` when it is not set.
    pub fn models_dir(&self) -> std::path::PathBuf {
        self.models
            .dir
            .clone()
            .unwrap_or_else(|| self.spool.dir.join("models"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../config/agent.example.toml");
        let config: AgentConfig = toml::from_str(text).expect("example parses");
        config.validate().expect("example validates");
        let defaults = AgentConfig::default();
        assert_eq!(
            config.uplink, defaults.uplink,
            "the example shows the defaults"
        );
        assert_eq!(config.spool.sync_interval, defaults.spool.sync_interval);
        assert_eq!(config.uplink.linger, Duration::ZERO);
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let err = toml::from_str::<AgentConfig>("[uplink]\nbatch_sise = 3\n")
            .expect_err("typo must be refused");
        assert!(err.to_string().contains("batch_sise"), "{err}");
    }

    #[test]
    fn a_bad_or_missing_verify_key_file_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = AgentConfig::default();
        config.models.verify_key_file = Some(dir.path().join("missing.pub"));
        let err = config
            .validate()
            .expect_err("a missing key file must be refused");
        assert!(err.starts_with("models.verify_key_file"), "{err}");
        let bad = dir.path().join("bad.pub");
        std::fs::write(&bad, "not hex").expect("write");
        config.models.verify_key_file = Some(bad);
        let err = config.validate().expect_err("a bad key must be refused");
        assert!(err.starts_with("models.verify_key_file"), "{err}");
        let good = dir.path().join("good.pub");
        let key = edgeloop_proto::signing::SigningKey::from_bytes(&[3; 32]);
        std::fs::write(
            &good,
            edgeloop_proto::signing::to_hex(key.verifying_key().as_bytes()),
        )
        .expect("write");
        config.models.verify_key_file = Some(good);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            config.models_dir(),
            config.spool.dir.join("models"),
            "the store defaults to the spool's directory"
        );
    }

    #[test]
    fn models_section_parses() {
        let config: AgentConfig =
            toml::from_str("[models]\nverify_key_file = \"k.pub\"\ndir = \"m\"\n").expect("parses");
        assert_eq!(config.models.dir, Some("m".into()));
        assert!(toml::from_str::<AgentConfig>("[models]\nverify_key = \"k\"\n").is_err());
    }

    #[test]
    fn window_smaller_than_batch_is_refused_naming_the_field() {
        let mut config = AgentConfig::default();
        config.uplink.max_unacked_readings = 10;
        let err = config.validate().expect_err("must be refused");
        assert!(err.starts_with("uplink.max_unacked_readings"), "{err}");
    }

    #[test]
    fn a_connect_timeout_under_a_second_is_refused_naming_the_field() {
        let mut config: AgentConfig =
            toml::from_str("[mqtt]\nconnect_timeout = \"500ms\"\n").expect("parses");
        let err = config.validate().expect_err("must be refused");
        assert!(err.starts_with("mqtt.connect_timeout"), "{err}");
        config.mqtt.connect_timeout = Duration::from_secs(1);
        config.validate().expect("1s is allowed");
    }

    #[test]
    fn fallback_servers_follow_the_first_and_a_bad_one_is_named() {
        let mut config: AgentConfig = toml::from_str(
            "[mqtt]\nhost = \"10.0.0.1\"\nport = 1883\nfallback_servers = [\"10.0.0.2:1884\", \"broker-c:1885\"]\n",
        )
        .expect("parses");
        config.validate().expect("valid");
        assert_eq!(
            config.mqtt.servers(),
            Ok(vec![
                ("10.0.0.1".to_string(), 1883),
                ("10.0.0.2".to_string(), 1884),
                ("broker-c".to_string(), 1885)
            ])
        );
        let replicas = [
            ("a".to_string(), 1),
            ("b".to_string(), 2),
            ("c".to_string(), 3),
        ];
        config.mqtt.spread_over(&replicas, 4);
        assert_eq!((config.mqtt.host.as_str(), config.mqtt.port), ("b", 2));
        assert_eq!(config.mqtt.fallback_servers, ["c:3", "a:1"]);
        for bad in ["10.0.0.3", ":1883", "host:0", "host:99999", "host:x"] {
            config.mqtt.fallback_servers = vec!["ok:1".into(), bad.into()];
            let err = config.validate().expect_err(bad);
            assert!(err.starts_with("mqtt.fallback_servers[1]"), "{bad}: {err}");
        }
    }
}
