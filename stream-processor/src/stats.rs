//! Counters of the stream processor.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct ProcessorStats {
    /// Kafka records (batches) consumed, dead letters included.
    pub records_consumed: AtomicU64,
    /// Readings in files that were closed and renamed into the data set.
    pub rows_written: AtomicU64,
    /// Parquet files closed and renamed into the data set.
    pub files_written: AtomicU64,
    /// Records sent to the dead-letter topic.
    pub dead_letters: AtomicU64,
    /// Offset commits that failed (the records are re-read; files replaced).
    pub commit_errors: AtomicU64,
    /// Times start-up asked Kafka again after getting no answer (Kafka down,
    /// starting, or unreachable at `kafka.bootstrap_servers`).
    pub startup_kafka_retries: AtomicU64,
    /// Consumers replaced after Kafka fenced them for good.
    pub consumer_restarts: AtomicU64,
    /// Times a partition's first record after assignment came past the
    /// committed offset (what lay between was no longer in Kafka).
    pub offset_gaps: AtomicU64,
    /// Loss reports from devices written to the `losses` table, and the
    /// readings they cover.
    pub loss_reports: AtomicU64,
    pub readings_reported_lost: AtomicU64,
    /// Batches refused for their content whose seqs were recorded in
    /// `losses` as `invalid_batch` (their bytes are dead letters), and those
    /// seqs.
    pub invalid_batches: AtomicU64,
    pub readings_invalid: AtomicU64,
    /// Records of `edgeloop.status` the control API refused: not a
    /// `DeviceStatus`, naming another device than their key, or with a time
    /// or seq out of range.
    pub statuses_refused: AtomicU64,
    /// Readings (and lost seqs) dropped because the data set already has them.
    pub duplicates_dropped: AtomicU64,
    /// Rules files taken into force, and refused (the previous rules stay).
    pub rules_reloads: AtomicU64,
    pub rules_refused: AtomicU64,
    /// Open files dropped because their partition was revoked.
    pub files_aborted: AtomicU64,
    /// Partitions of the readings topic assigned to this processor now (a
    /// gauge).
    pub partitions_assigned: AtomicU64,
    /// Seconds this processor has been without any partition (0 while it
    /// has some; a gauge).
    pub unassigned_seconds: AtomicU64,
    /// Devices seen whose profile no trainer profile has, while training is
    /// on: they never get a model (a gauge, of this processor's partitions).
    pub devices_without_trainer_profile: AtomicU64,
    /// What this processor consumed per device (its partitions, since it
    /// started): the control API's fleet view joins it with the status topic.
    pub devices: Mutex<BTreeMap<String, DeviceSeen>>,
    /// The trainer's counters.
    pub trainer: std::sync::Arc<crate::trainer::TrainerStats>,
}

/// What the processor saw of one device in the readings topic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSeen {
    pub profile: String,
    /// Readings consumed, duplicates included.
    pub readings: u64,
    /// Timestamp of the newest reading (device clock), microseconds.
    pub last_reading_ts_micros: i64,
    /// Loss reports consumed, and the readings they cover.
    pub loss_reports: u64,
    pub readings_lost: u64,
}

impl ProcessorStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// What the processor did, as the lines it logs when it stops (and
    /// `edgeloop up` prints): rows and files written, the gate's decisions,
    /// the parity check.
    pub fn exit_summary(&self) -> Vec<String> {
        vec![
            format!(
                "processor: {} records consumed, {} rows written to Parquet in {} files, {} dead letters",
                Self::get(&self.records_consumed),
                Self::get(&self.rows_written),
                Self::get(&self.files_written),
                Self::get(&self.dead_letters),
            ),
            format!("models: {}", self.trainer.gate_summary()),
            self.trainer.parity_line(),
        ]
    }

    /// Records a decoded batch of `device` in the per-device view; whether
    /// it is the device's first, or the first with another profile.
    pub fn saw_batch(&self, batch: &edgeloop_proto::v1::ReadingBatch) -> bool {
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let seen = match devices.get_mut(&batch.device_id) {
            Some(seen) => seen,
            None => devices.entry(batch.device_id.clone()).or_default(),
        };
        let new = seen.profile != batch.profile && !batch.profile.is_empty();
        if !batch.profile.is_empty() {
            seen.profile.clone_from(&batch.profile);
        }
        seen.readings += batch.readings.len() as u64;
        if let Some(newest) = batch.readings.iter().map(|r| r.ts_micros).max() {
            seen.last_reading_ts_micros = seen.last_reading_ts_micros.max(newest);
        }
        if let Some(loss) = &batch.loss {
            seen.loss_reports += 1;
            seen.readings_lost += loss.end_seq.saturating_sub(loss.first_seq);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_summary_names_rows_files_gate_decisions_and_parity() {
        let stats = ProcessorStats::default();
        assert_eq!(
            stats.exit_summary()[1..],
            [
                "models: no gate decision yet",
                "parity: 0 device predictions recomputed in the cloud, 0 mismatches, 0 could not be checked"
            ]
        );
        ProcessorStats::add(&stats.records_consumed, 7);
        ProcessorStats::add(&stats.rows_written, 70);
        ProcessorStats::add(&stats.files_written, 2);
        {
            let mut d = stats
                .trainer
                .decisions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            d.insert(("anomaly".into(), "mcu8".into(), "published"), 3);
            d.insert(("anomaly".into(), "mcu8".into(), "rejected"), 1);
            d.insert(("anomaly".into(), "gateway".into(), "published"), 2);
        }
        ProcessorStats::add(&stats.trainer.parity_checked, 40);
        ProcessorStats::add(&stats.trainer.parity_mismatches, 1);
        stats
            .trainer
            .parity_unverifiable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert("no model", 5);
        assert_eq!(
            stats.exit_summary(),
            [
                "processor: 7 records consumed, 70 rows written to Parquet in 2 files, 0 dead letters",
                "models: anomaly/gateway 2 published; anomaly/mcu8 3 published, 1 rejected",
                "parity: 40 device predictions recomputed in the cloud, 1 mismatches, 5 could not be checked",
            ]
        );
    }
}
