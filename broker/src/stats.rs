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
}

impl BrokerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
