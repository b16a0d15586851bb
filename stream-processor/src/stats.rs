//! Counters of the stream processor.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Times a partition's first record after assignment came past the
    /// committed offset and the consumer sought back to it.
    pub seeks_back: AtomicU64,
    /// Loss reports from devices written to the `losses` table, and the
    /// readings they cover.
    pub loss_reports: AtomicU64,
    pub readings_reported_lost: AtomicU64,
    /// Readings (and lost seqs) dropped because the data set already has them.
    pub duplicates_dropped: AtomicU64,
    /// Rules files taken into force, and refused (the previous rules stay).
    pub rules_reloads: AtomicU64,
    pub rules_refused: AtomicU64,
    /// Open files dropped because their partition was revoked.
    pub files_aborted: AtomicU64,
    /// The trainer's counters.
    pub trainer: std::sync::Arc<crate::trainer::TrainerStats>,
}

impl ProcessorStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
