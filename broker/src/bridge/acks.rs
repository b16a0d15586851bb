//! The per-device ack watermark: the highest seq below which every reading of
//! the device is in Kafka.
//!
//! Batches are tracked from the moment the bridge takes them until Kafka's
//! delivery report, each by its range `[first, end)`. The watermark only
//! moves across a contiguous run of delivered batches, so a batch lost on the
//! way (the broker's log rolled, a delivery failed) holds it back until the
//! device resends; it never claims more than Kafka has. A batch is identified
//! by its whole range, not its first seq: a device that re-batches its resend
//! (`[0, 7)` first, `[0, 50)` later) has two batches in flight, and the
//! delivery of the short one acknowledges only the short one.
//!
//! Where a device's watermark starts:
//!
//! - **Restored** ([`AckTracker::restore`]): the watermark the bridge
//!   published before a restart, read back from the compacted Kafka topic
//!   `edgeloop.acks`. Batches entirely below it are skipped (the ack is
//!   re-published), a batch straddling it advances it, and a batch above it
//!   waits for the gap to be filled like any other. The bridge writes an ack
//!   to that topic just after publishing it, so a broker killed in between
//!   restores less than the device holds; the device's status on connect
//!   raises it to what the device holds ([`AckTracker::raise_to_device_ack`]),
//!   which is where its resend starts.
//! - **First batch**, for a device with no restored watermark (never
//!   acknowledged, or `edgeloop.acks` was lost): a device resends from its own
//!   watermark after every connect, so its first batch starts where its
//!   acknowledged data ends.

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
    /// (first_seq, end_seq) → delivered
    pending: BTreeMap<(u64, u64), bool>,
    dirty: bool,
}

impl Device {
    /// Raises the watermark to `to` (never lowers it) and moves on over the
    /// delivered batches from there; whether it rose.
    fn lift(&mut self, to: u64) -> bool {
        if to <= self.watermark {
            return false;
        }
        self.watermark = to;
        self.advance();
        true
    }

    /// Moves the watermark over every delivered batch that starts at or below
    /// it, and forgets batches entirely below it.
    fn advance(&mut self) {
        let before = self.watermark;
        loop {
            let reach = self
                .pending
                .range(..=(self.watermark, u64::MAX))
                .filter(|(_, delivered)| **delivered)
                .map(|((_, end), _)| *end)
                .max();
            let watermark = self.watermark;
            self.pending.retain(|(_, end), _| *end > watermark);
            match reach {
                Some(end) if end > self.watermark => self.watermark = end,
                _ => break,
            }
        }
        if self.watermark != before {
            self.dirty = true;
        }
    }
}

#[derive(Debug, Default)]
pub struct AckTracker {
    devices: HashMap<String, Device>,
}

impl AckTracker {
    /// Seeds `device` with a watermark published before a restart. Never
    /// moves a watermark backwards: of several values the highest holds.
    pub fn restore(&mut self, device: &str, watermark: u64) {
        let d = self
            .devices
            .entry(device.to_string())
            .or_insert_with(|| Device {
                watermark,
                ..Device::default()
            });
        if d.lift(watermark) {
            // Published already (it was read back from Kafka).
            d.dirty = false;
        }
    }

    /// The ack watermark a device reports holding (`DeviceStatus.acked_seq`),
    /// for a device already tracked: an ack the device holds came from a
    /// bridge that had it in Kafka, so the watermark is at least that. After
    /// a restart whose read of `edgeloop.acks` missed the device's last ack
    /// (published just before a crash, its record not yet in Kafka; or, with
    /// several broker replicas, written by another one), this is what lets the
    /// device's resend, which starts at its ack, move the watermark again
    /// instead of waiting for a gap that never fills. A device not tracked
    /// yet is left to the first-batch rule. Returns whether it rose.
    pub fn raise_to_device_ack(&mut self, device: &str, acked: u64) -> bool {
        let Some(d) = self.devices.get_mut(device) else {
            return false;
        };
        let rose = d.lift(acked);
        // The device holds `acked`; anything past it is news to it: a
        // watermark that rose here, or another replica's watermark merged
        // while the device was away ([`AckTracker::merge`]).
        if d.watermark > acked {
            d.dirty = true;
        } else if rose {
            d.dirty = false;
        }
        rose
    }

    /// A watermark another replica (or this one, earlier) wrote to
    /// `edgeloop.acks`, read while following it: true of the device (every
    /// reading below it is in Kafka), so it raises the watermark, never
    /// lowers it (crate::replicas). `tell` marks the device to be told
    /// (it is connected here); otherwise the watermark is only kept, and
    /// the device is told when it next reports less
    /// ([`AckTracker::raise_to_device_ack`]) or resends below it. Returns
    /// whether it rose.
    pub fn merge(&mut self, device: &str, watermark: u64, tell: bool) -> bool {
        let Some(d) = self.devices.get_mut(device) else {
            if watermark == 0 {
                return false;
            }
            self.devices.insert(
                device.to_string(),
                Device {
                    watermark,
                    dirty: tell,
                    ..Device::default()
                },
            );
            return true;
        };
        // `lift` marks the device dirty if this replica's own delivered
        // batches carry the watermark past `watermark`: that part is news
        // to Kafka too, and is published and logged as usual.
        let rose = d.lift(watermark);
        if rose && tell {
            d.dirty = true;
        }
        rose
    }

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
        // The same batch, or a longer one from the same seq, is already on
        // its way or delivered.
        if d.pending
            .range((first, end)..=(first, u64::MAX))
            .next()
            .is_some()
        {
            return Take::Skip;
        }
        d.pending.insert((first, end), false);
        Take::Produce
    }

    /// Kafka's delivery report for the batch `[first, end)` of `device`.
    pub fn on_delivered(&mut self, device: &str, first: u64, end: u64, ok: bool) {
        let Some(d) = self.devices.get_mut(device) else {
            return;
        };
        if ok {
            if let Some(delivered) = d.pending.get_mut(&(first, end)) {
                *delivered = true;
            }
        } else {
            // Forget it: the watermark stays below it until the device resends.
            d.pending.remove(&(first, end));
        }
        d.advance();
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
        t.on_delivered("d", 10, 20, true);
        assert_eq!(t.watermark("d"), Some(0));
        assert!(t.take_dirty().is_empty());
        t.on_delivered("d", 0, 10, true);
        assert_eq!(t.watermark("d"), Some(20));
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 20)]);
        t.on_delivered("d", 20, 30, true);
        assert_eq!(t.watermark("d"), Some(30));
    }

    #[test]
    fn a_failed_delivery_holds_the_watermark_until_the_batch_is_resent() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 10);
        t.on_received("d", 10, 20);
        t.on_delivered("d", 0, 10, false);
        t.on_delivered("d", 10, 20, true);
        assert_eq!(t.watermark("d"), Some(0));
        // The device resends from its watermark.
        assert_eq!(t.on_received("d", 0, 10), Take::Produce);
        // The second batch is already delivered: not produced again.
        assert_eq!(t.on_received("d", 10, 20), Take::Skip);
        t.on_delivered("d", 0, 10, true);
        assert_eq!(t.watermark("d"), Some(20));
    }

    #[test]
    fn a_gap_never_acknowledged_past() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 10);
        t.on_delivered("d", 0, 10, true);
        // Batch 10..20 never arrived (lost in the broker's log).
        t.on_received("d", 20, 30);
        t.on_delivered("d", 20, 30, true);
        assert_eq!(t.watermark("d"), Some(10));
    }

    #[test]
    fn already_acknowledged_batch_is_skipped_and_ack_republished() {
        let mut t = AckTracker::default();
        t.on_received("d", 5, 10);
        t.on_delivered("d", 5, 10, true);
        let _ = t.take_dirty();
        assert_eq!(t.on_received("d", 5, 10), Take::Skip);
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 10)]);
    }

    #[test]
    fn overlapping_resend_with_other_boundaries_still_advances() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 10);
        t.on_delivered("d", 0, 10, true);
        t.on_received("d", 10, 20); // lost on delivery
        t.on_delivered("d", 10, 20, false);
        // Device re-batched: 5..25 overlaps the acknowledged part.
        assert_eq!(t.on_received("d", 5, 25), Take::Produce);
        t.on_delivered("d", 5, 25, true);
        assert_eq!(t.watermark("d"), Some(25));
    }

    #[test]
    fn a_short_batch_delivered_does_not_acknowledge_a_longer_resend_from_the_same_seq() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 7);
        // Resent re-batched while the first is still in flight.
        assert_eq!(t.on_received("d", 0, 50), Take::Produce);
        t.on_delivered("d", 0, 7, true);
        assert_eq!(t.watermark("d"), Some(7));
        // The longer one fails: nothing past 7 is acknowledged.
        t.on_delivered("d", 0, 50, false);
        assert_eq!(t.watermark("d"), Some(7));
        assert_eq!(t.on_received("d", 7, 50), Take::Produce);
        t.on_delivered("d", 7, 50, true);
        assert_eq!(t.watermark("d"), Some(50));
    }

    #[test]
    fn a_restored_watermark_is_the_starting_point_and_batches_below_it_are_skipped() {
        let mut t = AckTracker::default();
        t.restore("d", 100);
        assert_eq!(t.watermark("d"), Some(100));
        assert!(
            t.take_dirty().is_empty(),
            "a restored ack is already published"
        );
        // The device resends from its own watermark, at or below the restored one.
        assert_eq!(t.on_received("d", 50, 100), Take::Skip);
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 100)]);
        assert_eq!(t.on_received("d", 0, 50), Take::Skip);
        // Delivery reports of batches never taken change nothing.
        t.on_delivered("d", 0, 50, true);
        assert_eq!(t.watermark("d"), Some(100));
        // A batch straddling the watermark advances it.
        assert_eq!(t.on_received("d", 90, 140), Take::Produce);
        t.on_delivered("d", 90, 140, true);
        assert_eq!(t.watermark("d"), Some(140));
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 140)]);
    }

    #[test]
    fn a_batch_above_a_restored_watermark_waits_for_the_gap() {
        let mut t = AckTracker::default();
        t.restore("d", 100);
        assert_eq!(t.on_received("d", 120, 130), Take::Produce);
        t.on_delivered("d", 120, 130, true);
        assert_eq!(t.watermark("d"), Some(100));
        assert_eq!(t.on_received("d", 100, 120), Take::Produce);
        t.on_delivered("d", 100, 120, true);
        assert_eq!(t.watermark("d"), Some(130));
    }

    #[test]
    fn a_device_holding_a_higher_ack_than_was_restored_lifts_the_watermark() {
        let mut t = AckTracker::default();
        // The restore missed the last ack the device got (1051).
        t.restore("d", 1000);
        // Its resend starts at 1051 and is delivered: a gap below it.
        assert_eq!(t.on_received("d", 1051, 1101), Take::Produce);
        t.on_delivered("d", 1051, 1101, true);
        assert_eq!(t.watermark("d"), Some(1000));
        // Its status says it holds 1051: the resend now counts.
        assert!(t.raise_to_device_ack("d", 1051));
        assert_eq!(t.watermark("d"), Some(1101));
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 1101)]);
        // Lower or equal reports change nothing; unknown devices are left
        // to their first batch.
        assert!(!t.raise_to_device_ack("d", 900));
        assert!(!t.raise_to_device_ack("other", 50));
        assert_eq!(t.watermark("other"), None);
    }

    #[test]
    fn a_merged_watermark_only_rises_and_lets_a_waiting_batch_through() {
        let mut t = AckTracker::default();
        t.on_received("d", 0, 10);
        t.on_delivered("d", 0, 10, true);
        let _ = t.take_dirty();
        // The device moved to another replica (10..20 acknowledged there)
        // and came back: its batch 20..30 waits for a gap only the other
        // replica's record fills.
        assert_eq!(t.on_received("d", 20, 30), Take::Produce);
        t.on_delivered("d", 20, 30, true);
        assert_eq!(t.watermark("d"), Some(10));
        assert!(t.merge("d", 20, true));
        assert_eq!(t.watermark("d"), Some(30));
        assert_eq!(t.take_dirty(), vec![("d".to_string(), 30)]);
        // Lower, equal or repeated records change nothing.
        assert!(!t.merge("d", 5, true));
        assert!(!t.merge("d", 30, true));
        assert_eq!(t.watermark("d"), Some(30));
        assert!(t.take_dirty().is_empty());
    }

    #[test]
    fn a_merged_watermark_of_a_device_not_connected_here_is_kept_but_not_published() {
        let mut t = AckTracker::default();
        assert!(t.merge("away", 40, false));
        assert_eq!(t.watermark("away"), Some(40));
        assert!(t.take_dirty().is_empty());
        assert!(t.merge("away", 50, false));
        assert!(t.take_dirty().is_empty());
        // It connects here holding 45: it is told 50.
        assert!(!t.raise_to_device_ack("away", 45));
        assert_eq!(t.take_dirty(), vec![("away".to_string(), 50)]);
        // A connected device is told at once.
        assert!(t.merge("here", 7, true));
        assert_eq!(t.take_dirty(), vec![("here".to_string(), 7)]);
        assert!(!t.merge("none", 0, true));
        assert_eq!(t.watermark("none"), None);
    }

    #[test]
    fn restoring_never_moves_a_watermark_backwards() {
        let mut t = AckTracker::default();
        t.restore("d", 100);
        t.restore("d", 40);
        assert_eq!(t.watermark("d"), Some(100));
        t.restore("d", 150);
        assert_eq!(t.watermark("d"), Some(150));
    }
}
