//! The soak's verdict: the devices' own records (each spool's next seq, ack
//! watermark and pending loss reports) against the Parquet data set (the
//! `readings` and `losses` tables).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow_array::{Array, Int64Array, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

/// What a device's spool says about it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRecord {
    pub device_id: String,
    /// The seq its next reading would get: every seq below it was fsynced.
    pub next_seq: u64,
    /// Its persisted ack watermark.
    pub acked: u64,
    /// Loss reports the cloud has not acknowledged yet.
    pub pending_loss_reports: usize,
    /// Problems `edgeloop spool check` would report (corrupt segments, gaps).
    pub spool_problems: usize,
}

/// Reads a device's spool directory without changing it.
pub fn device_record(device_id: &str, dir: &Path) -> Result<DeviceRecord> {
    let found = edgeloop_agent::spool::inspect::inspect(dir)
        .with_context(|| format!("inspecting the spool of {device_id}"))?;
    let next_seq = found
        .segments
        .iter()
        .map(|s| s.first_seq + s.records)
        .max()
        .unwrap_or(0);
    Ok(DeviceRecord {
        device_id: device_id.to_string(),
        next_seq,
        acked: found.acked.unwrap_or(0),
        pending_loss_reports: found.losses.len(),
        spool_problems: found.problems(),
    })
}

/// The data set as far as identity goes: how often each `(device, seq)` is
/// there, and the loss ranges each device reported.
#[derive(Debug, Default)]
pub struct Dataset {
    /// Per device, count of rows per seq (index = seq).
    pub rows: BTreeMap<String, Vec<u16>>,
    /// Rows whose seq is negative or absurdly large.
    pub bad_seq_rows: u64,
    /// Per device, reported lost ranges `[first, end)`.
    pub losses: BTreeMap<String, Vec<(u64, u64)>>,
    pub files: usize,
}

/// Every visible `*.parquet` file of `table` under `root` (the processor's
/// temporary files start with a dot).
fn table_files(root: &Path, table: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.join(table)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if path.is_dir() {
                stack.push(path);
            } else if !hidden && path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn batches(path: &Path, columns: &[&str]) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("reading the Parquet footer of {}", path.display()))?;
    let schema = builder.parquet_schema();
    let indices: Vec<usize> = columns
        .iter()
        .map(|name| {
            schema
                .columns()
                .iter()
                .position(|c| c.name() == *name)
                .with_context(|| format!("{} has no column {name}", path.display()))
        })
        .collect::<Result<_>>()?;
    let mask = parquet::arrow::ProjectionMask::leaves(schema, indices);
    builder
        .with_projection(mask)
        .build()?
        .map(|b| b.with_context(|| format!("decoding {}", path.display())))
        .collect()
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .with_context(|| format!("column {name} of {} has an unexpected type", path.display()))
}

/// Largest seq kept in the per-device count vectors (a reading above it is
/// counted as a bad seq rather than allocating for it).
const MAX_SEQ: i64 = 1 << 32;

/// Reads the `readings` (device_id, seq) and `losses` tables under `root`.
pub fn read_dataset(root: &Path) -> Result<Dataset> {
    let mut out = Dataset::default();
    for path in table_files(root, "readings")? {
        out.files += 1;
        for batch in batches(&path, &["device_id", "seq"])? {
            let device = column::<StringArray>(&batch, "device_id", &path)?;
            let seq = column::<Int64Array>(&batch, "seq", &path)?;
            for i in 0..batch.num_rows() {
                let s = seq.value(i);
                if !(0..MAX_SEQ).contains(&s) {
                    out.bad_seq_rows += 1;
                    continue;
                }
                let counts = out.rows.entry(device.value(i).to_string()).or_default();
                let s = s as usize;
                if counts.len() <= s {
                    counts.resize(s + 1, 0);
                }
                counts[s] = counts[s].saturating_add(1);
            }
        }
    }
    for path in table_files(root, "losses")? {
        for batch in batches(&path, &["device_id", "first_seq", "end_seq"])? {
            let device = column::<StringArray>(&batch, "device_id", &path)?;
            let first = column::<Int64Array>(&batch, "first_seq", &path)?;
            let end = column::<Int64Array>(&batch, "end_seq", &path)?;
            for i in 0..batch.num_rows() {
                out.losses
                    .entry(device.value(i).to_string())
                    .or_default()
                    .push((first.value(i).max(0) as u64, end.value(i).max(0) as u64));
            }
        }
    }
    Ok(out)
}

/// The counts the soak prints, over all devices or one.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Readings the devices fsynced (the sum of their next seqs).
    pub offered: u64,
    /// Distinct `(device_id, seq)` of those in the `readings` table.
    pub landed: u64,
    /// Rows beyond the first of a `(device_id, seq)`.
    pub duplicated: u64,
    /// Readings not in `readings` whose seq a `losses` row covers.
    pub lost_and_reported: u64,
    /// Readings acknowledged to their device (below its watermark) but in
    /// neither table: lost by the cloud side. Must be 0.
    pub lost_unexplained: u64,
    /// Readings not acknowledged, in neither table: still on their device
    /// (the system did not recover in time). Must be 0.
    pub still_spooled: u64,
    /// Readings in `readings` although a loss report covers them (a device
    /// evicted them after sending them): informational.
    pub reported_but_landed: u64,
    /// Rows no device fsynced (seq at or beyond its next seq, unknown
    /// device, or an impossible seq). Must be 0.
    pub unexpected_rows: u64,
    /// Loss reports still waiting in the devices' spools. Must be 0.
    pub pending_loss_reports: u64,
    /// Problems found in the devices' spools. Must be 0.
    pub spool_problems: u64,
    /// Devices whose ack watermark stayed below their next seq (the spool
    /// did not drain, even if the readings landed). Must be 0.
    pub undrained_devices: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.offered += o.offered;
        self.landed += o.landed;
        self.duplicated += o.duplicated;
        self.lost_and_reported += o.lost_and_reported;
        self.lost_unexplained += o.lost_unexplained;
        self.still_spooled += o.still_spooled;
        self.reported_but_landed += o.reported_but_landed;
        self.unexpected_rows += o.unexpected_rows;
        self.pending_loss_reports += o.pending_loss_reports;
        self.spool_problems += o.spool_problems;
        self.undrained_devices += o.undrained_devices;
    }

    /// The invariants that failed, as sentences (empty: all hold).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        check(self.duplicated, "duplicated rows in readings");
        check(
            self.lost_unexplained,
            "acknowledged readings neither in readings nor in losses (lost unexplained)",
        );
        check(
            self.still_spooled,
            "readings still unacknowledged on their device after the recovery time",
        );
        check(
            self.unexpected_rows,
            "rows in readings that no device fsynced",
        );
        check(
            self.pending_loss_reports,
            "loss reports still unacknowledged on their device",
        );
        check(self.spool_problems, "problems in the devices' spools");
        check(
            self.undrained_devices,
            "devices whose ack watermark stayed below their next seq",
        );
        out
    }
}

/// One device's counts, and where its first unexplained seqs are.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceCounts {
    pub device_id: String,
    pub next_seq: u64,
    pub acked: u64,
    #[serde(flatten)]
    pub counts: Counts,
    /// The first few seqs lost unexplained (for investigating).
    pub first_unexplained: Vec<u64>,
    /// The first few duplicated seqs.
    pub first_duplicated: Vec<u64>,
}

/// Compares the devices' records with the data set.
pub fn verify(devices: &[DeviceRecord], data: &Dataset) -> (Counts, Vec<DeviceCounts>) {
    let mut total = Counts {
        unexpected_rows: data.bad_seq_rows,
        ..Counts::default()
    };
    let empty = Vec::new();
    let no_losses = Vec::new();
    for (device, counts) in &data.rows {
        if !devices.iter().any(|d| &d.device_id == device) {
            total.unexpected_rows += counts.iter().map(|c| u64::from(*c)).sum::<u64>();
        }
    }
    let mut per_device = Vec::new();
    for d in devices {
        let rows = data.rows.get(&d.device_id).unwrap_or(&empty);
        let losses = data.losses.get(&d.device_id).unwrap_or(&no_losses);
        let covered = |seq: u64| losses.iter().any(|(f, e)| *f <= seq && seq < *e);
        let mut c = Counts {
            offered: d.next_seq,
            pending_loss_reports: d.pending_loss_reports as u64,
            spool_problems: d.spool_problems as u64,
            undrained_devices: u64::from(d.acked < d.next_seq),
            ..Counts::default()
        };
        let mut first_unexplained = Vec::new();
        let mut first_duplicated = Vec::new();
        for seq in 0..d.next_seq {
            let n = rows.get(seq as usize).copied().unwrap_or(0);
            if n > 0 {
                c.landed += 1;
                if n > 1 {
                    c.duplicated += u64::from(n) - 1;
                    if first_duplicated.len() < 10 {
                        first_duplicated.push(seq);
                    }
                }
                if covered(seq) {
                    c.reported_but_landed += 1;
                }
            } else if covered(seq) {
                c.lost_and_reported += 1;
            } else if seq >= d.acked {
                c.still_spooled += 1;
            } else {
                c.lost_unexplained += 1;
                if first_unexplained.len() < 10 {
                    first_unexplained.push(seq);
                }
            }
        }
        c.unexpected_rows += rows
            .iter()
            .skip(d.next_seq as usize)
            .map(|n| u64::from(*n))
            .sum::<u64>();
        total.add(&c);
        per_device.push(DeviceCounts {
            device_id: d.device_id.clone(),
            next_seq: d.next_seq,
            acked: d.acked,
            counts: c,
            first_unexplained,
            first_duplicated,
        });
    }
    (total, per_device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, next_seq: u64, acked: u64) -> DeviceRecord {
        DeviceRecord {
            device_id: id.into(),
            next_seq,
            acked,
            pending_loss_reports: 0,
            spool_problems: 0,
        }
    }

    #[test]
    fn every_reading_is_landed_reported_spooled_or_unexplained() {
        let mut data = Dataset::default();
        // seqs 0,1 once, 2 twice, 3..5 missing (3 reported), 5 landed though reported,
        // 7 beyond next_seq.
        data.rows.insert("d".into(), vec![1, 1, 2, 0, 0, 1, 0, 1]);
        data.losses.insert("d".into(), vec![(3, 4), (5, 6)]);
        data.rows.insert("ghost".into(), vec![1]);
        let (total, per) = verify(&[device("d", 7, 5)], &data);
        assert_eq!(total.offered, 7);
        assert_eq!(total.landed, 4);
        assert_eq!(total.duplicated, 1);
        assert_eq!(total.lost_and_reported, 1);
        assert_eq!(total.lost_unexplained, 1); // seq 4: acked, nowhere
        assert_eq!(total.still_spooled, 1); // seq 6: not acked
        assert_eq!(total.reported_but_landed, 1);
        assert_eq!(total.unexpected_rows, 2); // seq 7 and the ghost device
        assert_eq!(per[0].first_unexplained, vec![4]);
        assert_eq!(per[0].first_duplicated, vec![2]);
        assert_eq!(total.undrained_devices, 1);
        assert_eq!(total.failures().len(), 5);
    }

    #[test]
    fn a_clean_run_has_no_failures() {
        let mut data = Dataset::default();
        data.rows.insert("d".into(), vec![1, 1, 0, 1]);
        data.losses.insert("d".into(), vec![(2, 3)]);
        let (total, _) = verify(&[device("d", 4, 4)], &data);
        assert!(total.failures().is_empty(), "{:?}", total.failures());
        assert_eq!(total.lost_and_reported, 1);
    }
}
