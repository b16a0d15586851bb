//! Counters of the broker's bridge.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Telemetry publishes the bridge took from the broker.
    pub batches_received: AtomicU64,
    /// Device status messages forwarded to Kafka.
    pub statuses_received: AtomicU64,
    /// Batches not sent again because they were acknowledged or in flight.
    pub batches_skipped: AtomicU64,
    /// Payloads that did not decode (forwarded for dead-lettering).
    pub malformed_forwarded: AtomicU64,
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
    /// Publishes from devices let through, by topic class.
    pub publishes_telemetry: AtomicU64,
    pub publishes_status: AtomicU64,
    pub publishes_other: AtomicU64,
}

impl BrokerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
