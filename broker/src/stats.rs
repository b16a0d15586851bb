//! Counters of the broker's bridge, and the gauges `/metrics` exports
//! (`crate::ops` renders them; `docs/operations.md` documents each).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Telemetry publishes the bridge took from the broker.
    pub batches_received: AtomicU64,
    /// Device status messages forwarded to Kafka.
    pub statuses_received: AtomicU64,
    /// Ack watermarks raised to what a device reported holding
    /// (`DeviceStatus.acked_seq`) above what the bridge had restored.
    pub watermarks_raised_by_device: AtomicU64,
    /// Batches not sent again because they were acknowledged or in flight.
    pub batches_skipped: AtomicU64,
    /// Telemetry refused with no seqs to take (it does not decode, names
    /// another device, or its seqs are past 2^63 - 1): forwarded for the
    /// processor to dead-letter, never acknowledged.
    pub malformed_forwarded: AtomicU64,
    /// Telemetry refused for its content (channels, value counts,
    /// timestamps): forwarded and acknowledged; the processor dead-letters
    /// it and records its seqs in `losses` as `invalid_batch`.
    pub batches_invalid: AtomicU64,
    /// Device statuses refused (not a `DeviceStatus`, naming another device
    /// than their topic's, time or seq out of range): sent to
    /// `edgeloop.deadletter` with the reason instead of `edgeloop.status`.
    pub statuses_refused: AtomicU64,
    /// Readings records (batches and loss reports) and readings Kafka
    /// acknowledged (status messages not counted).
    pub batches_in_kafka: AtomicU64,
    pub readings_in_kafka: AtomicU64,
    /// Batches Kafka did not take (the device resends them).
    pub delivery_errors: AtomicU64,
    /// Ack watermarks published.
    pub acks_published: AtomicU64,
    /// Device connections open now (through the gate).
    pub connections_open: AtomicU64,
    /// Connections turned away at the connection limit.
    pub connections_refused: AtomicU64,
    /// CONNECTs refused: unknown identity, wrong password, client id not
    /// matching the credential, anonymous when that is off.
    pub auth_failures: AtomicU64,
    /// Publishes and subscription filters refused by the topic ACLs.
    pub acl_refused_publishes: AtomicU64,
    pub acl_refused_subscriptions: AtomicU64,
    /// Connections closed for a malformed or oversized packet.
    pub malformed_packets: AtomicU64,
    /// Of those, packets over `mqtt.max_payload_bytes` (the one size limit).
    pub packets_too_large: AtomicU64,
    /// Sessions ended because a credentials reload removed or changed the
    /// credential they logged in with.
    pub sessions_revoked: AtomicU64,
    /// Devices the gate logged in to rumqttd a second time, rumqttd having
    /// closed the first log-in without a CONNACK.
    pub upstream_login_retries: AtomicU64,
    /// Publishes from devices let through, by topic class.
    pub publishes_telemetry: AtomicU64,
    pub publishes_status: AtomicU64,
    pub publishes_other: AtomicU64,
    /// Telemetry publishes the gate held because the bridge was
    /// `bridge.max_lag_bytes` behind, and the time they waited in all (µs).
    pub publishes_held: AtomicU64,
    pub publish_hold_micros: AtomicU64,
    /// From the gate's connect to rumqttd, for a device it authenticated, to
    /// rumqttd's CONNACK.
    pub connect_latency: LatencyHistogram,
    /// Telemetry let into rumqttd's log and not yet taken by the bridge
    /// (bytes of log entries; a gauge), and the limit (0: off).
    pub lag_bytes: AtomicU64,
    pub max_lag_bytes: AtomicU64,

    /// Records handed to the Kafka producer (readings, status and ack
    /// records), and their key and payload bytes.
    pub records_produced: AtomicU64,
    pub bytes_produced: AtomicU64,
    /// Times a record was offered again because librdkafka's queue was full.
    pub enqueue_retries: AtomicU64,
    /// Readings and status records waiting for Kafka's delivery report (a gauge).
    pub in_flight: AtomicU64,
    /// Seconds from handing a record to the producer to its delivery report.
    pub delivery_latency: LatencyHistogram,
    /// Ack records Kafka took into `edgeloop.acks`, and those it did not
    /// (they are produced again).
    pub ack_records: AtomicU64,
    pub ack_record_errors: AtomicU64,
    /// Devices whose ack watermark was restored from `edgeloop.acks` at start.
    pub acks_restored: AtomicU64,
    /// Records of `edgeloop.acks` read while following it (other replicas'
    /// watermarks, and this one's own coming back).
    pub acks_followed: AtomicU64,
    /// Followed ack records that raised a watermark here.
    pub acks_merged: AtomicU64,
    /// Session records this replica wrote to `edgeloop.sessions`.
    pub session_records: AtomicU64,
    /// Session records Kafka did not take.
    pub session_record_errors: AtomicU64,
    /// Local sessions closed because a newer session of the same client
    /// appeared on another replica.
    pub sessions_taken_over: AtomicU64,
    /// `ModelUpdate`s published retained on `models/{task}/{profile}`.
    pub models_republished: AtomicU64,
    /// Model records ignored because a higher version was already published.
    pub models_stale: AtomicU64,
    /// Model and ack records that did not decode (or named no valid topic).
    pub records_undecodable: AtomicU64,
    /// Tombstones in `edgeloop.models`: the retained model was cleared.
    pub models_cleared: AtomicU64,
    /// Whether the MQTT listener is up, and whether Kafka answered the last
    /// readiness check.
    pub mqtt_up: AtomicBool,
    pub kafka_up: AtomicBool,
    /// A shutdown has begun (SIGTERM): the broker is closing its devices'
    /// connections, so it is no longer ready for new ones.
    pub stopping: AtomicBool,
    /// rumqttd's listeners behind the gate (one per protocol level and
    /// listener thread), by name, and whether each answered the last probe
    /// (a CONNECT with the gate's credential, `crate::ops::check_listeners`).
    pub listeners: Mutex<Vec<(String, bool)>>,
    /// The producer's own figures, from librdkafka's statistics callback.
    pub kafka_client: Mutex<KafkaClientStats>,
}

impl BrokerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn set(gauge: &AtomicU64, n: u64) {
        gauge.store(n, Ordering::Relaxed);
    }

    /// Ready: the MQTT listener is up, every rumqttd listener behind it
    /// answered its last probe, Kafka answered the last check, and no
    /// shutdown has begun.
    pub fn ready(&self) -> bool {
        self.mqtt_up.load(Ordering::Relaxed)
            && self.kafka_up.load(Ordering::Relaxed)
            && !self.stopping.load(Ordering::Relaxed)
            && self.listeners_down().is_empty()
    }

    /// The rumqttd listeners that did not answer their last probe.
    pub fn listeners_down(&self) -> Vec<String> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, up)| !up)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// What librdkafka reports about the producer (`statistics.interval.ms`).
#[derive(Debug, Default, Clone)]
pub struct KafkaClientStats {
    /// Whether a report arrived yet.
    pub seen: bool,
    /// Messages and bytes in the producer's queues (`msg_cnt`, `msg_size`).
    pub msg_cnt: u64,
    pub msg_size: u64,
    /// Messages and bytes sent to brokers (`txmsgs`, `txmsg_bytes`).
    pub txmsgs: u64,
    pub txmsg_bytes: u64,
    /// Summed over brokers: requests retried, send errors, request timeouts.
    pub txretries: u64,
    pub txerrs: u64,
    pub req_timeouts: u64,
    /// Per broker (`nodename/nodeid`): state is up, and the average round-trip
    /// time in seconds over the last interval (`rtt.avg`).
    pub brokers: Vec<BrokerRtt>,
}

#[derive(Debug, Default, Clone)]
pub struct BrokerRtt {
    pub name: String,
    pub up: bool,
    pub rtt_avg_seconds: f64,
}

/// Upper bounds of the delivery latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A Prometheus histogram with fixed buckets ([`LATENCY_BUCKETS`]).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations at most each bound (not cumulative; the renderer sums).
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Cumulative counts per bucket bound, the total count and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_the_overflow_counts_only_in_the_total() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(1000));
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[4], (0.025, 2));
        assert_eq!(buckets.last().map(|b| b.1), Some(2));
        assert_eq!(count, 3);
        assert!((sum - 1000.0205).abs() < 1e-9, "{sum}");
    }
}
