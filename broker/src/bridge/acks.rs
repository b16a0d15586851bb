//! The per-device ack watermark: the highest seq below which every reading of
//! the device is in Kafka.
//!
//! Batches are tracked from the moment the bridge takes them until Kafka's
//! delivery report. The watermark only moves across a contiguous run of
//! delivered batches, so a batch lost on the way (the broker's log rolled, a
//! delivery failed) holds it back until the device resends; it never claims
//! more than Kafka has.
//!
//! The first batch seen from a device sets its starting point: a device
//! resends from its own watermark after every connect, so that batch starts
//! where the device's acknowledged data ends. (Restoring watermarks from Kafka
//! after a bridge restart is the broker issue's work.)

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Send the batch to Kafka and report its delivery.
    Produce,
    /// Everything in the batch is already acknowledged, or the same batch is
    /// already on its way: do not send it again, but re-publish the ack.
    Skip,
}

#[derive(Debug, Default)]
struct Device {
    watermark: u64,
    /// first_seq → (end_seq, delivered)
    pending: BTreeMap<u64, (u64, bool)>,
    dirty: bool,
}

#[derive(Debug, Default)]
pub struct AckTracker {
    devices: HashMap<String, Device>,
}

impl AckTracker {
    /// A batch `[first, end)` of `device` arrived.
    pub fn on_received(&mut self, device: &str, first: u64, end: u64) -> Take {
        let d = self
            .devices
            .entry(device.to_string())
            .or_insert_with(|| Device {
                watermark: first,
                ..Device::default()
            });
        if end <= d.watermark {
            d.dirty = true;
            return Take::Skip;
        }
        if let Some((pending_end, _)) = d.pending.get(&first) {
            if *pending_end >= end {
                return Take::Skip;
            }
        }
        d.pending.insert(first, (end, false));
        Take::Produce
    }

    /// Kafka's delivery report for the batch of `device` starting at `first`.
    pub fn on_delivered(&mut self, device: &str, first: u64, ok: bool) {
        let Some(d) = self.devices.get_mut(device) else {
            return;
        };
        if ok {
            if let Some(entry) = d.pending.get_mut(&first) {
                entry.1 = true;
            }
        } else {
            // Forget it: the watermark stays below it until the device resends.
            d.pending.remove(&first);
        }
        let before = d.watermark;
        while let Some((&first, &(end, delivered))) = d.pending.first_key_value() {
            if end <= d.watermark {
                d.pending.remove(&first);
                continue;
            }
            if first > d.watermark || !delivered {
                break;
            }
            d.watermark = end;
            d.pending.remove(&first);
        }
        if d.watermark != before {
            d.dirty = true;
        }
    }

    /// The current watermark of a device, if it was seen.
    pub fn watermark(&self, device: &str) -> Option<u64> {
        self.devices.get(device).map(|d| d.watermark)
    }

    /// Devices whose watermark should be (re-)published, with it.
    pub fn take_dirty(&mut self) -> Vec<(String, u64)> {
        self.devices
            .iter_mut()
            .filter(|(_, d)| d.dirty)
            .map(|(id, d)| {
                d.dirty = false;
                (id.clone(), d.watermark)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_advances_only_over_contiguous_delivered_batches() {
        let mut t = AckTracker::default();
        assert_eq!(t.on_received("d", 0, 10), Take::Produce);
        assert_eq!(t.on_received("d", 10, 20), Take::Produce);
        assert_eq!(t.on_received("d", 20, 30), Take::Produce);
        // Out-of-order delivery of the second batch: nothing moves yet.
        t.on_delivered("d", 10, true);
        assert_eq!(t.watermark("d"), Some(0));
        assert!(t.take_dirty().is_empty());
        t.on_delivered("d", 0, true);
        assert_eq!(t.watermark("d"), Some(20));
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 20)]);
        t.on_delivered("d", 20, true);
        assert_eq!(t.watermark("d"), Some(30));
    }

    #[test]
    fn a_failed_delivery_holds_the_watermark_until_the_batch_is_resent() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 10);
        t.on_received("d", 10, 20);
        t.on_delivered("d", 0, false);
        t.on_delivered("d", 10, true);
        assert_eq!(t.watermark("d"), Some(0));
        // The device resends from its watermark.
        assert_eq!(t.on_received("d", 0, 10), Take::Produce);
        // The second batch is already delivered: not produced again.
        assert_eq!(t.on_received("d", 10, 20), Take::Skip);
        t.on_delivered("d", 0, true);
        assert_eq!(t.watermark("d"), Some(20));
    }

    #[test]
    fn a_gap_never_acknowledged_past() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 10);
        t.on_delivered("d", 0, true);
        // Batch 10..20 never arrived (lost in the broker's log).
        t.on_received("d", 20, 30);
        t.on_delivered("d", 20, true);
        assert_eq!(t.watermark("d"), Some(10));
    }

    #[test]
    fn already_acknowledged_batch_is_skipped_and_ack_republished() {
        let mut t = AckTracker::default();
        t.on_received("d", 5, 10);
        t.on_delivered("d", 5, true);
        let _ = t.take_dirty();
        assert_eq!(t.on_received("d", 5, 10), Take::Skip);
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 10)]);
    }

    #[test]
    fn overlapping_resend_with_other_boundaries_still_advances() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 10);
        t.on_delivered("d", 0, true);
        t.on_received("d", 10, 20); // lost on delivery
        t.on_delivered("d", 10, false);
        // Device re-batched: 5..25 overlaps the acknowledged part.
        assert_eq!(t.on_received("d", 5, 25), Take::Produce);
        t.on_delivered("d", 5, true);
        assert_eq!(t.watermark("d"), Some(25));
    }
}
