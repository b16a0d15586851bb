//! The ack log: every watermark the bridge publishes on `ack/{device}` is
//! first written to the compacted Kafka topic `edgeloop.acks` (key = device
//! id, value = the `Ack`), so that a restarted broker restores what its
//! devices were told ([`super::restore_acks`]).
//!
//! Order matters: a watermark goes to the device only once Kafka holds it in
//! `edgeloop.acks`. A broker killed in between then restores a watermark at
//! least as high as any its devices saw, so a device always resends from at or
//! below the restored watermark and the tracker ([`super::acks`]) continues
//! from there. (Published the other way round, a kill between the two would
//! restore a lower watermark than the device's, and the device's resends,
//! starting above it, would never be acknowledged again.)
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

    /// The tracker wants `seq` published for `device`. Returns the watermark
    /// to publish to the device now, if Kafka already holds it; otherwise it
    /// is queued for [`AckLog::to_write`].
    pub fn offer(&mut self, device: &str, seq: u64) -> Option<u64> {
        let e = self.devices.entry(device.to_string()).or_default();
        if seq <= e.logged {
            return Some(e.logged);
        }
        e.wanted = e.wanted.max(seq);
        if e.in_flight.is_none() {
            self.ready.insert(device.to_string());
        }
        None
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

    /// Kafka's delivery report of the ack record `seq` of `device`. Returns
    /// the watermark to publish to the device if the record is in Kafka.
    pub fn on_written(&mut self, device: &str, seq: u64, ok: bool) -> Option<u64> {
        let e = self.devices.get_mut(device)?;
        if e.in_flight.take().is_some() {
            self.in_flight -= 1;
        }
        if ok {
            e.logged = e.logged.max(seq);
        }
        if e.wanted > e.logged {
            self.ready.insert(device.to_string());
        }
        ok.then_some(e.logged)
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
    fn a_watermark_is_published_only_once_kafka_holds_it() {
        let mut log = AckLog::default();
        assert_eq!(log.offer("d", 10), None);
        assert_eq!(log.to_write(), vec![("d".to_string(), 10)]);
        assert!(log.busy());
        assert_eq!(log.on_written("d", 10, true), Some(10));
        assert!(!log.busy());
        // Re-publishing a watermark already in Kafka needs no new record.
        assert_eq!(log.offer("d", 10), Some(10));
        assert!(log.to_write().is_empty());
    }

    #[test]
    fn one_record_in_flight_per_device_and_the_latest_value_follows() {
        let mut log = AckLog::default();
        log.offer("d", 10);
        assert_eq!(log.to_write(), vec![("d".to_string(), 10)]);
        log.offer("d", 20);
        log.offer("d", 30);
        assert!(log.to_write().is_empty(), "10 is still in flight");
        assert_eq!(log.on_written("d", 10, true), Some(10));
        assert_eq!(log.to_write(), vec![("d".to_string(), 30)]);
        assert_eq!(log.on_written("d", 30, true), Some(30));
        assert!(!log.busy());
    }

    #[test]
    fn a_record_kafka_did_not_take_is_written_again() {
        let mut log = AckLog::default();
        log.offer("d", 10);
        log.to_write();
        assert_eq!(log.on_written("d", 10, false), None);
        assert!(log.busy());
        assert_eq!(log.to_write(), vec![("d".to_string(), 10)]);
        assert_eq!(log.on_written("d", 10, true), Some(10));
    }

    #[test]
    fn a_restored_watermark_is_already_logged() {
        let mut log = AckLog::default();
        log.restored("d", 100);
        assert_eq!(log.offer("d", 100), Some(100));
        assert!(!log.busy());
        assert_eq!(log.offer("d", 120), None);
        assert_eq!(log.to_write(), vec![("d".to_string(), 120)]);
    }
}
