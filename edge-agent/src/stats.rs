//! Counters of an agent (or of a whole simulated fleet sharing one set).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct AgentStats {
    /// Readings the sources produced.
    pub readings_generated: AtomicU64,
    /// Readings published for the first time (resends not counted).
    pub readings_published: AtomicU64,
    /// Readings acknowledged by the cloud (in Kafka).
    pub readings_acknowledged: AtomicU64,
    /// Readings published again after a reconnect or a stalled watermark.
    pub readings_resent: AtomicU64,
    /// Batches (MQTT messages) published, resends included.
    pub batches_published: AtomicU64,
    /// Loss reports sent (resends included).
    pub loss_reports_sent: AtomicU64,
    /// Connections lost and re-established.
    pub reconnects: AtomicU64,
    /// Times a lost or refused connection moved on to the next broker of
    /// `mqtt.host` and `mqtt.fallback_servers`.
    pub server_switches: AtomicU64,
    /// Readings waiting in the spools, unacknowledged (a gauge).
    pub backlog_readings: AtomicU64,
    /// Bytes of the spools' segments (a gauge).
    pub backlog_bytes: AtomicU64,
    /// Readings the spools lost (evicted when full or too old, or corrupt
    /// on disk), since they were opened.
    pub readings_lost: AtomicU64,
    /// Lines (or samples) a source could not turn into readings.
    pub bad_lines: AtomicU64,
    /// Model updates verified, stored and swapped in.
    pub model_updates_applied: AtomicU64,
    /// Model updates refused (bad signature or hash, lower version,
    /// artifact that does not load, …) and stored models quarantined at
    /// start-up; the model in use stayed.
    pub model_updates_refused: AtomicU64,
    /// Predictions added to readings by on-device inference.
    pub predictions_made: AtomicU64,
    /// Predictions a loaded model could not make (a channel with no finite
    /// value in the window, say); the reading went without.
    pub predictions_failed: AtomicU64,
    /// Uplinks running (one per device; a gateway's children have theirs),
    /// a gauge.
    pub uplinks: AtomicU64,
    /// Uplinks whose MQTT session is up (a gauge).
    pub uplinks_connected: AtomicU64,
    /// Per device with unacknowledged readings, the timestamp (µs since the
    /// epoch) of its oldest one: the spool backlog's age.
    pub oldest_unacked: Mutex<BTreeMap<String, i64>>,
}

impl AgentStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Moves a gauge shared by many agents from this agent's `last` value to
    /// `now`, so that the shared gauge is the sum over the agents.
    pub fn move_gauge(gauge: &AtomicU64, last: &mut u64, now: u64) {
        if now >= *last {
            gauge.fetch_add(now - *last, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(*last - now, Ordering::Relaxed);
        }
        *last = now;
    }

    /// Records `device`'s oldest unacknowledged reading (none: its spool
    /// holds nothing unacknowledged, or it stopped).
    pub fn set_oldest_unacked(&self, device: &str, ts_micros: Option<i64>) {
        let mut oldest = self
            .oldest_unacked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match ts_micros {
            Some(ts) => {
                oldest.insert(device.to_string(), ts);
            }
            None => {
                oldest.remove(device);
            }
        }
    }

    /// The oldest unacknowledged reading's timestamp over every device.
    pub fn oldest_unacked_micros(&self) -> Option<i64> {
        let oldest = self
            .oldest_unacked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        oldest.values().min().copied()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
