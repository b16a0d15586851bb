//! Readings landed in the Parquet data set, read back as its files appear.
//!
//! Reading-to-Parquet latency of a reading = the modification time of the
//! file that holds it (the processor writes a file under a hidden name,
//! fsyncs it and renames it into place, so the time of its last write is
//! when it became durable, a few ms before it became visible) minus the
//! reading's `ts`. Only readings of this bench's devices (their id prefix)
//! count, and only files modified after the bench started are opened.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow_array::{Array, StringArray, TimestampMicrosecondArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::latency::Histogram;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("Parquet file {path}: {message}")]
    File { path: PathBuf, message: String },
}

pub struct ParquetScan {
    root: PathBuf,
    prefix: String,
    not_before: SystemTime,
    seen: HashSet<PathBuf>,
    /// Rows of this bench's devices, per device.
    pub landed: HashMap<String, u64>,
    pub landed_total: u64,
    /// Reading-to-Parquet latency of every landed reading.
    pub latency: Histogram,
    /// Files read so far.
    pub files: u64,
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl ParquetScan {
    /// Scans `{root}/readings` for files modified after `not_before`,
    /// counting rows whose `device_id` starts with `prefix`.
    pub fn new(root: &Path, prefix: &str, not_before: SystemTime) -> ParquetScan {
        ParquetScan {
            root: root.to_path_buf(),
            prefix: prefix.to_string(),
            not_before,
            seen: HashSet::new(),
            landed: HashMap::new(),
            landed_total: 0,
            latency: Histogram::default(),
            files: 0,
        }
    }

    /// Reads the files that appeared since the last call; returns the
    /// latencies of the readings they hold (also merged into `latency`).
    pub fn scan(&mut self) -> Result<Histogram, ScanError> {
        let mut fresh = Histogram::default();
        let mut stack = vec![self.root.join("readings")];
        let mut found = Vec::new();
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let hidden = path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if hidden || path.extension().is_none_or(|e| e != "parquet") {
                    continue;
                }
                let Ok(modified) = meta.modified() else {
                    continue;
                };
                if modified >= self.not_before && !self.seen.contains(&path) {
                    found.push((path, modified));
                }
            }
        }
        found.sort();
        for (path, modified) in found {
            self.read_file(&path, micros(modified), &mut fresh)?;
            self.seen.insert(path);
            self.files += 1;
        }
        self.latency.merge(&fresh);
        Ok(fresh)
    }

    fn read_file(
        &mut self,
        path: &Path,
        landed_micros: i64,
        fresh: &mut Histogram,
    ) -> Result<(), ScanError> {
        let err = |message: String| ScanError::File {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.to_string()))?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), ["device_id", "ts"]);
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| err(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let device = batch
                .column_by_name("device_id")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| err("no string column device_id".into()))?;
            let ts = batch
                .column_by_name("ts")
                .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
                .ok_or_else(|| err("no timestamp (µs) column ts".into()))?;
            let mut current: Option<(&str, u64)> = None;
            for i in 0..batch.num_rows() {
                if device.is_null(i) || ts.is_null(i) {
                    continue;
                }
                let id = device.value(i);
                if !id.starts_with(&self.prefix) {
                    continue;
                }
                // Rows of a device come in runs; count a run at once.
                match &mut current {
                    Some((d, n)) if *d == id => *n += 1,
                    _ => {
                        if let Some((d, n)) = current.take() {
                            *self.landed.entry(d.to_string()).or_insert(0) += n;
                        }
                        current = Some((id, 1));
                    }
                }
                self.landed_total += 1;
                fresh.record(landed_micros.saturating_sub(ts.value(i)).max(0) as u64);
            }
            if let Some((d, n)) = current {
                *self.landed.entry(d.to_string()).or_insert(0) += n;
            }
        }
        Ok(())
    }
}
