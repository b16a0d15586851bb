//! Configuration of the broker and its Kafka bridge.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use edgeloop_kafka::KafkaConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// This broker replica's name among the replicas bridging to the same
    /// Kafka (it goes into `edgeloop.sessions` and the logs; the newest
    /// session of a device wins across replicas, docs/broker.md "Several
    /// replicas"). Unset: the host name (on Kubernetes, the pod's name).
    /// 1 to 128 printable bytes, no whitespace.
    pub replica_id: Option<String>,
    /// The MQTT listener devices connect to.
    pub mqtt: MqttConfig,
    /// How to reach Kafka.
    pub kafka: KafkaConfig,
    /// The bridge from MQTT telemetry to Kafka and acks back.
    pub bridge: BridgeConfig,
    /// Who may connect (device credentials, anonymous access).
    pub auth: AuthConfig,
    /// TLS for `mqtt.tls_listen`.
    pub tls: Option<TlsConfig>,
    /// On shutdown: how long to wait for Kafka to acknowledge what the bridge
    /// took, so the last acks can be published.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where to serve `/healthz`, `/readyz` and Prometheus `/metrics`
    /// (none: not served). See docs/operations.md.
    pub metrics_listen: Option<SocketAddr>,
    /// How often `/readyz` asks Kafka for metadata (each ask waits at most
    /// this long): not ready from the first ask Kafka does not answer.
    #[serde(with = "humantime_serde")]
    pub kafka_check_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            replica_id: None,
            mqtt: MqttConfig::default(),
            kafka: KafkaConfig::default(),
            bridge: BridgeConfig::default(),
            auth: AuthConfig::default(),
            tls: None,
            shutdown_grace: Duration::from_secs(10),
            metrics_listen: None,
            kafka_check_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Address of the plain-TCP listener (MQTT 3.1.1 and 5).
    pub listen: SocketAddr,
    /// Address of the TLS listener (MQTT 3.1.1 and 5 over TLS); needs `[tls]`.
    pub tls_listen: Option<SocketAddr>,
    /// Connections at most (devices plus internal links).
    pub max_connections: usize,
    /// Threads that carry devices' MQTT traffic inside the broker: rumqttd
    /// listeners behind the gate, each on a thread of its own, that devices
    /// are spread over. Unset: the CPUs the broker may use, at most 4.
    pub listener_threads: Option<usize>,
    /// Largest packet a device may send, in bytes, fixed header included
    /// (a larger one closes its connection: MQTT 5 clients are told the
    /// limit in the CONNACK and get DISCONNECT 0x95). The gate enforces it
    /// and counts refusals (`edgeloop_gate_packets_too_large_total`);
    /// rumqttd behind it allows as much, so never drops what the gate let
    /// through.
    pub max_payload_bytes: usize,
    /// QoS 1 messages in flight per connection.
    pub max_inflight: usize,
    /// A client that does not send CONNECT within this time is dropped; and
    /// if rumqttd does not answer the gate's CONNECT within it, the device
    /// gets CONNACK "server unavailable".
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The router's in-memory log per topic filter: segment size and count
    /// (the segment being written counted, so at least 2: a log of one drops
    /// its only segment when it fills). A subscriber that falls further
    /// behind than this loses what rolled out (devices then resend: the ack
    /// watermark does not move past a gap).
    pub max_segment_bytes: usize,
    pub max_segment_count: usize,
    /// The log of `status/+` instead: the segment being written, of this
    /// size, and the one before it. Each status a device sent keeps the
    /// broker's read buffer it arrived in (8 KiB) alive while it is in the
    /// log, so this log is small: 64 KiB is ~680 statuses, and the log keeps
    /// 680–1,360 of them, 100–200 s of a 200-device fleet reporting every
    /// 30 s (docs/operations.md, "Broker memory").
    pub status_segment_bytes: usize,
    /// How often each rumqttd listener behind the gate is probed with a
    /// CONNECT (waiting at most `connect_timeout`): the broker is not ready
    /// while one does not answer (`edgeloop_broker_mqtt_listeners_down`).
    #[serde(with = "humantime_serde")]
    pub listener_check_interval: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            tls_listen: None,
            max_connections: 10_010,
            listener_threads: None,
            max_payload_bytes: 1 << 20,
            max_inflight: 100,
            connect_timeout: Duration::from_secs(10),
            // 64 MiB in all: at 100,000 readings/s the 512 MiB this was
            // took the broker to 1.6 GiB; with 32 MiB it stayed at 0.7 GiB
            // and nothing was lost (docs/benchmarks.md, run G).
            max_segment_bytes: 16 << 20,
            max_segment_count: 4,
            status_segment_bytes: 64 << 10,
            listener_check_interval: Duration::from_secs(5),
        }
    }
}

impl MqttConfig {
    /// `listener_threads` in effect.
    pub fn listener_threads(&self) -> usize {
        self.listener_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Kafka compression codec of the readings: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// Batches sent to Kafka and not yet acknowledged by it, at most; beyond
    /// that the bridge stops taking telemetry until Kafka catches up.
    pub max_in_flight_batches: usize,
    /// How often changed ack watermarks are published to devices.
    #[serde(with = "humantime_serde")]
    pub ack_interval: Duration,
    /// librdkafka `linger.ms`: how long the producer waits to fill a request.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// At start-up, the longest the bridge may take to read `edgeloop.acks`
    /// and `edgeloop.models` to their end (the broker does not listen before).
    #[serde(with = "humantime_serde")]
    pub restore_timeout: Duration,
    /// librdkafka `statistics.interval.ms`: how often the producer's own
    /// figures are refreshed for `/metrics` (0s: never).
    #[serde(with = "humantime_serde")]
    pub statistics_interval: Duration,
    /// Telemetry (bytes of rumqttd log entries) the gate lets in ahead of the
    /// bridge, at most; beyond it the gate holds devices' telemetry until the
    /// bridge catches up, and their spools keep it (`crate::backpressure`).
    /// Unset: half of what the `telemetry/+` log keeps for certain,
    /// `mqtt.max_segment_bytes` × (`mqtt.max_segment_count` − 1). 0: off.
    pub max_lag_bytes: Option<usize>,
    /// The longest the gate holds a device's telemetry publish for
    /// `max_lag_bytes`; then it goes in anyway. The held connection carries
    /// nothing else meanwhile, PINGREQs included: keep it well under the
    /// devices' MQTT keep-alive.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
    /// What one batch may carry (channels per device profile); give the
    /// processor's `batch_limits` the same. A batch over it, like any batch
    /// refused for its content, is acknowledged and recorded as lost by the
    /// processor (docs/device-protocol.md, "What happens to a bad payload").
    /// Default: 64 channels for every profile.
    pub batch_limits: edgeloop_proto::validate::BatchLimits,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            compression: "zstd".into(),
            max_in_flight_batches: 10_000,
            ack_interval: Duration::from_millis(50),
            linger: Duration::from_millis(5),
            restore_timeout: Duration::from_secs(60),
            statistics_interval: Duration::from_secs(5),
            max_lag_bytes: None,
            max_hold: Duration::from_secs(10),
            batch_limits: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Credentials file (argon2 hashes; `edgeloop broker add-device` writes
    /// it). Re-read when it changes: a device added can connect at once, and
    /// the live sessions of a credential removed or changed are ended.
    pub credentials_file: Option<PathBuf>,
    /// Let clients without a user name connect; they get the device ACLs of
    /// their client id. Off by default.
    pub allow_anonymous: bool,
    /// How often the credentials file is checked for changes (besides at
    /// every CONNECT), so a revoked credential's sessions end within this.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            credentials_file: None,
            allow_anonymous: false,
            reload_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the broker.
    pub cert_file: PathBuf,
    /// PEM private key of the broker.
    pub key_file: PathBuf,
    /// PEM CA certificate(s) that sign device certificates. When set, a
    /// verified client certificate's common name is the device id (no
    /// password needed).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a certificate signed by `client_ca_file`.
    #[serde(default)]
    pub require_client_cert: bool,
}

impl BrokerConfig {
    /// What rumqttd's `telemetry/+` log keeps for certain: every segment but
    /// the one being written, which it drops whole when the log is full.
    pub fn telemetry_log_bytes(&self) -> usize {
        self.mqtt
            .max_segment_bytes
            .saturating_mul(self.mqtt.max_segment_count.saturating_sub(1))
    }

    /// `bridge.max_lag_bytes` in effect (0: off).
    pub fn max_lag_bytes(&self) -> usize {
        self.bridge
            .max_lag_bytes
            .unwrap_or_else(|| self.telemetry_log_bytes() / 2)
    }

    /// `replica_id` in effect.
    pub fn replica_id(&self) -> String {
        self.replica_id
            .clone()
            .unwrap_or_else(crate::replicas::default_replica_id)
    }

    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate().map_err(|e| e.to_string())?;
        if let Some(id) = &self.replica_id {
            if !crate::replicas::valid_replica_id(id) {
                return Err(format!(
                    "replica_id: {id:?} is not 1 to 128 printable bytes without whitespace"
                ));
            }
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.bridge.compression.as_str()) {
            return Err(format!(
                "bridge.compression: {:?} is not one of none, gzip, snappy, lz4, zstd",
                self.bridge.compression
            ));
        }
        self.bridge.batch_limits.validate("bridge.batch_limits")?;
        if self.bridge.max_in_flight_batches == 0 {
            return Err("bridge.max_in_flight_batches: must be at least 1".into());
        }
        if self
            .mqtt
            .listener_threads
            .is_some_and(|n| !(1..=64).contains(&n))
        {
            return Err("mqtt.listener_threads: must be between 1 and 64".into());
        }
        if self.mqtt.max_connections == 0 {
            return Err("mqtt.max_connections: must be at least 1".into());
        }
        if self.mqtt.max_payload_bytes < 1024 {
            return Err("mqtt.max_payload_bytes: must be at least 1024".into());
        }
        if self.mqtt.max_segment_bytes < 1 << 16 {
            return Err("mqtt.max_segment_bytes: must be at least 65536".into());
        }
        if self.mqtt.max_segment_count < 2 {
            return Err(
                "mqtt.max_segment_count: must be at least 2 (the segment being written counts)"
                    .into(),
            );
        }
        if let Some(lag) = self.bridge.max_lag_bytes.filter(|&l| l > 0) {
            let log = self.telemetry_log_bytes();
            if lag < 1 << 16 || lag > log {
                return Err(format!(
                    "bridge.max_lag_bytes: {lag} is not between 65536 and {log}, what rumqttd's \
                     telemetry log keeps for certain (mqtt.max_segment_bytes × \
                     (mqtt.max_segment_count − 1)); 0 turns back-pressure off"
                ));
            }
        }
        if self.bridge.max_hold.is_zero() {
            return Err("bridge.max_hold: must be more than 0s".into());
        }
        if self.mqtt.status_segment_bytes < 4 << 10 {
            return Err("mqtt.status_segment_bytes: must be at least 4096".into());
        }
        if self.mqtt.tls_listen.is_some() && self.tls.is_none() {
            return Err(
                "mqtt.tls_listen: needs a [tls] section with cert_file and key_file".into(),
            );
        }
        if let Some(tls) = &self.tls {
            if tls.require_client_cert && tls.client_ca_file.is_none() {
                return Err("tls.require_client_cert: needs tls.client_ca_file".into());
            }
        }
        if self.bridge.restore_timeout.is_zero() {
            return Err("bridge.restore_timeout: must be more than 0s".into());
        }
        if self.kafka_check_interval < Duration::from_millis(100) {
            return Err("kafka_check_interval: must be at least 100ms".into());
        }
        if self.mqtt.listener_check_interval < Duration::from_millis(100) {
            return Err("mqtt.listener_check_interval: must be at least 100ms".into());
        }
        if self.auth.reload_interval < Duration::from_millis(100) {
            return Err("auth.reload_interval: must be at least 100ms".into());
        }
        if self.mqtt.connect_timeout.as_millis() > u128::from(u16::MAX) {
            return Err("mqtt.connect_timeout: must be at most 65s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../config/broker.example.toml");
        let config: BrokerConfig = toml::from_str(text).expect("example parses");
        config.validate().expect("example validates");
    }

    #[test]
    fn unknown_compression_is_refused_naming_the_field() {
        let mut config = BrokerConfig::default();
        config.bridge.compression = "brotli".into();
        let err = config.validate().expect_err("refused");
        assert!(err.starts_with("bridge.compression"), "{err}");
    }

    /// rumqttd panics on a log segment under 1 KiB, and a log of one segment
    /// drops it whole when it fills; the config says which field is wrong
    /// before rumqttd is started.
    #[test]
    fn a_log_too_small_is_refused_naming_the_field() {
        let mut config = BrokerConfig::default();
        config.mqtt.status_segment_bytes = 512;
        let err = config.validate().expect_err("refused");
        assert!(err.starts_with("mqtt.status_segment_bytes"), "{err}");

        let mut config = BrokerConfig::default();
        config.mqtt.max_segment_count = 1;
        let err = config.validate().expect_err("refused");
        assert!(err.starts_with("mqtt.max_segment_count"), "{err}");
    }

    #[test]
    fn listener_threads_default_to_the_cpus_up_to_4_and_0_is_refused_naming_the_field() {
        let mut config = BrokerConfig::default();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config.mqtt.listener_threads(), cpus.min(4));
        config.mqtt.listener_threads = Some(7);
        assert_eq!(config.mqtt.listener_threads(), 7);
        config.validate().expect("7 is fine");
        for wrong in [0, 65] {
            config.mqtt.listener_threads = Some(wrong);
            let err = config.validate().expect_err("refused");
            assert!(err.starts_with("mqtt.listener_threads"), "{err}");
        }
    }

    #[test]
    fn the_lag_limit_defaults_to_half_the_telemetry_log_and_must_fit_in_it() {
        let mut config = BrokerConfig::default();
        config.mqtt.max_segment_bytes = 16 << 20;
        config.mqtt.max_segment_count = 4;
        assert_eq!(config.max_lag_bytes(), 24 << 20);
        config.bridge.max_lag_bytes = Some(0);
        assert_eq!(config.max_lag_bytes(), 0, "off");
        config.validate().expect("0 is valid");
        config.bridge.max_lag_bytes = Some((48 << 20) + 1);
        let err = config.validate().expect_err("more than the log keeps");
        assert!(err.starts_with("bridge.max_lag_bytes"), "{err}");
        config.bridge.max_lag_bytes = Some(48 << 20);
        config.validate().expect("all the log keeps");
    }

    #[test]
    fn a_replica_id_with_whitespace_is_refused_naming_the_field_and_unset_is_the_host_name() {
        let mut config = BrokerConfig::default();
        assert!(crate::replicas::valid_replica_id(&config.replica_id()));
        config.replica_id = Some("broker 1".into());
        let err = config.validate().expect_err("refused");
        assert!(err.starts_with("replica_id"), "{err}");
        config.replica_id = Some("edgeloop-broker-0".into());
        config.validate().expect("valid");
        assert_eq!(config.replica_id(), "edgeloop-broker-0");
    }
}
