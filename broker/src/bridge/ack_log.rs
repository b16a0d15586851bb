//! The ack log: every watermark the bridge publishes on `ack/{device}` is
//! also written to the compacted Kafka topic `edgeloop.acks` (key = device
//! id, value = the `Ack`), so that a restarted broker restores what its
//! devices were told ([`super::restore_acks`]).
//!
//! Order: a watermark goes to the device as soon as the readings under it are
//! in Kafka, and its record follows. (Until 2026-12-01 the bridge published a
//! watermark only once `edgeloop.acks` held it. That put a second Kafka round
//! trip, and a third when a record of the device was already on its way,
//! between a reading's delivery and its ack: most of the reading-to-ack
//! latency under load.) A broker killed between the two restores a watermark
//! below the one its device holds. The device reports what it holds in its
//! status on connect, before it resends (`DeviceStatus.acked_seq`), and the
//! tracker takes that as a floor ([`super::acks::AckTracker::raise_to_device_ack`]),
//! so the resend, which starts at the device's own watermark, is
//! acknowledged again instead of waiting behind a gap that never fills.
//!
//! Coalescing: per device at most one ack record is on its way to Kafka; a
//! watermark that moves meanwhile is written (its latest value only) once that
//! record is delivered, on the next ack tick. A record Kafka did not take is
//! written again, with the latest value, on the next tick.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct Entry {
    /// The highest watermark known to be in `edgeloop.acks`.
    logged: u64,
    /// The highest watermark to write there.
    wanted: u64,
    /// The watermark of the record on its way, if one is.
    in_flight: Option<u64>,
}

#[derive(Debug, Default)]
pub struct AckLog {
    devices: HashMap<String, Entry>,
    /// Devices with `wanted > logged` and nothing in flight.
    ready: BTreeSet<String>,
    in_flight: usize,
}

impl AckLog {
    /// A watermark read back from `edgeloop.acks` at start-up.
    pub fn restored(&mut self, device: &str, seq: u64) {
        let e = self.devices.entry(device.to_string()).or_default();
        e.logged = e.logged.max(seq);
        e.wanted = e.wanted.max(seq);
    }

    /// `seq` was published to `device`: queued for [`AckLog::to_write`]
    /// unless `edgeloop.acks` already holds it (or more).
    pub fn offer(&mut self, device: &str, seq: u64) {
        let e = self.devices.entry(device.to_string()).or_default();
        if seq <= e.logged {
            return;
        }
        e.wanted = e.wanted.max(seq);
        if e.in_flight.is_none() {
            self.ready.insert(device.to_string());
        }
    }

    /// The ack records to write now, each marked in flight.
    pub fn to_write(&mut self) -> Vec<(String, u64)> {
        let ready = std::mem::take(&mut self.ready);
        let mut out = Vec::with_capacity(ready.len());
        for device in ready {
            if let Some(e) = self.devices.get_mut(&device) {
                if e.in_flight.is_none() && e.wanted > e.logged {
                    e.in_flight = Some(e.wanted);
                    self.in_flight += 1;
                    out.push((device, e.wanted));
                }
            }
        }
        out
    }

    /// Kafka's delivery report of the ack record `seq` of `device`.
    pub fn on_written(&mut self, device: &str, seq: u64, ok: bool) {
        let Some(e) = self.devices.get_mut(device) else {
            return;
        };
        if e.in_flight.take().is_some() {
            self.in_flight -= 1;
        }
        if ok {
            e.logged = e.logged.max(seq);
        }
        if e.wanted > e.logged {
            self.ready.insert(device.to_string());
        }
    }

    /// Ack records on their way to Kafka.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether some watermark still waits to be written or delivered.
    pub fn busy(&self) -> bool {
        self.in_flight > 0 || !self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_watermark_is_written_once() {
        let mut log = AckLog::default();
        log.offer("d", 10);
        assert_eq!(log.to_write(), vec![("d".to_string(), 10)]);
        assert!(log.busy());
        log.on_written("d", 10, true);
        assert!(!log.busy());
        // Re-publishing a watermark already in Kafka needs no new record.
        log.offer("d", 10);
        assert!(log.to_write().is_empty());
        assert!(!log.busy());
    }

    #[test]
    fn one_record_in_flight_per_device_and_the_latest_value_follows() {
        let mut log = AckLog::default();
        log.offer("d", 10);
        assert_eq!(log.to_write(), vec![("d".to_string(), 10)]);
        log.offer("d", 20);
        log.offer("d", 30);
        assert!(log.to_write().is_empty(), "10 is still in flight");
        log.on_written("d", 10, true);
        assert_eq!(log.to_write(), vec![("d".to_string(), 30)]);
        log.on_written("d", 30, true);
        assert!(!log.busy());
    }

    #[test]
    fn a_record_kafka_did_not_take_is_written_again() {
        let mut log = AckLog::default();
        log.offer("d", 10);
        log.to_write();
        log.on_written("d", 10, false);
        assert!(log.busy());
        assert_eq!(log.to_write(), vec![("d".to_string(), 10)]);
        log.on_written("d", 10, true);
        assert!(!log.busy());
    }

    #[test]
    fn a_restored_watermark_is_already_logged() {
        let mut log = AckLog::default();
        log.restored("d", 100);
        log.offer("d", 100);
        assert!(!log.busy());
        log.offer("d", 120);
        assert_eq!(log.to_write(), vec![("d".to_string(), 120)]);
    }
}
