//! The Parquet sink: one open file per Kafka partition, Hive layout.
//!
//! Files land at `{root}/readings/date=YYYY-MM-DD/hour=HH/part-{partition}-{first_offset}.parquet`
//! (partition 5 digits, offset 20 digits, so names sort by offset). `date` and
//! `hour` are those of the Kafka record timestamp (when the bridge took the
//! batch, UTC) of the file's first record; a record of another hour closes the
//! file and opens the next. For readings that arrive on time that is their own
//! hour; a device's late backlog lands in the hour it arrived, and its `ts`
//! column still says when each reading was taken.
//!
//! A file is written under a hidden temporary name (`.part-….parquet.tmp`),
//! fsynced, renamed, and its directory fsynced; only then are the Kafka
//! offsets it covers committed. Its name derives from its first Kafka offset,
//! so after a crash the file re-written from the committed offset replaces any
//! earlier attempt under the same name rather than adding a copy.
//!
//! A file also closes when a batch brings a channel it has no column for; the
//! next file has the wider schema (old files keep reading, engines union by
//! name).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{
    Float64Builder, Int32Builder, Int64Builder, ListBuilder, StringBuilder, StructBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use edgeloop_proto::v1::ReadingBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::config::SinkConfig;
use crate::labeller::Labelled;

pub mod losses;
pub mod rule_stats;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing Parquet file {path}: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("building a record batch for {path}: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
    #[error("invalid zstd level {0}")]
    Level(i32),
}

/// The Hive partition of a file: UTC date and hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub date: String,
    pub hour: u32,
}

impl Bucket {
    pub fn of_millis(millis: i64) -> Bucket {
        let t = chrono::DateTime::from_timestamp_millis(millis).unwrap_or_default();
        Bucket {
            date: t.format("%Y-%m-%d").to_string(),
            hour: chrono::Timelike::hour(&t),
        }
    }

    fn dir(&self, root: &Path) -> PathBuf {
        self.dir_of(root, "readings")
    }

    /// The directory of this bucket in `table` (`readings`, `losses`).
    pub fn dir_of(&self, root: &Path, table: &str) -> PathBuf {
        root.join(table)
            .join(format!("date={}", self.date))
            .join(format!("hour={:02}", self.hour))
    }
}

/// Makes a written file part of the data set: fsync, rename from its
/// temporary name, fsync the directory.
pub(crate) fn publish(
    file: File,
    tmp: &Path,
    final_path: &Path,
    dir: &Path,
) -> Result<(), SinkError> {
    file.sync_all().map_err(|source| SinkError::Io {
        action: "fsyncing",
        path: tmp.to_path_buf(),
        source,
    })?;
    drop(file);
    fs::rename(tmp, final_path).map_err(|source| SinkError::Io {
        action: "renaming into place",
        path: tmp.to_path_buf(),
        source,
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SinkError::Io {
            action: "fsyncing directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// The name of the file whose first record is `first_offset` of `partition`.
pub fn file_name(partition: i32, first_offset: i64) -> String {
    format!("part-{partition:05}-{first_offset:020}.parquet")
}

/// The fields of one element of the `predictions` column: the device's own
/// prediction for the reading (`Reading.predictions`).
fn prediction_fields() -> Fields {
    Fields::from(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("model_version", DataType::Int64, false),
        Field::new("label", DataType::Utf8, false),
    ])
}

/// The element field of the `predictions` list.
fn prediction_item() -> FieldRef {
    Arc::new(Field::new(
        "item",
        DataType::Struct(prediction_fields()),
        true,
    ))
}

/// The schema of a file with the given channels (sorted).
pub fn schema(channels: &[String]) -> SchemaRef {
    let mut fields = vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("profile", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ];
    fields.extend(
        channels
            .iter()
            .map(|c| Field::new(c, DataType::Float64, true)),
    );
    fields.extend([
        Field::new("true_label", DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
        Field::new("label_confidence", DataType::Float64, true),
        Field::new("rules_version", DataType::Utf8, true),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        // list<struct<task, model_version, label>>; empty when the device
        // sent no prediction.
        Field::new("predictions", DataType::List(prediction_item()), false),
    ]);
    Arc::new(Schema::new(fields))
}

struct Columns {
    device_id: StringBuilder,
    profile: StringBuilder,
    seq: Int64Builder,
    ts: TimestampMicrosecondBuilder,
    channels: Vec<Float64Builder>,
    true_label: StringBuilder,
    label: StringBuilder,
    label_confidence: Float64Builder,
    rules_version: StringBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    predictions: ListBuilder<StructBuilder>,
    rows: usize,
}

impl Columns {
    fn new(channels: usize) -> Columns {
        Columns {
            device_id: StringBuilder::new(),
            profile: StringBuilder::new(),
            seq: Int64Builder::new(),
            ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            channels: (0..channels).map(|_| Float64Builder::new()).collect(),
            true_label: StringBuilder::new(),
            label: StringBuilder::new(),
            label_confidence: Float64Builder::new(),
            rules_version: StringBuilder::new(),
            kafka_partition: Int32Builder::new(),
            kafka_offset: Int64Builder::new(),
            predictions: ListBuilder::new(StructBuilder::from_fields(prediction_fields(), 0))
                .with_field(prediction_item()),
            rows: 0,
        }
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.device_id.finish()),
            Arc::new(self.profile.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.ts.finish()),
        ];
        for c in &mut self.channels {
            arrays.push(Arc::new(c.finish()));
        }
        arrays.push(Arc::new(self.true_label.finish()));
        arrays.push(Arc::new(self.label.finish()));
        arrays.push(Arc::new(self.label_confidence.finish()));
        arrays.push(Arc::new(self.rules_version.finish()));
        arrays.push(Arc::new(self.kafka_partition.finish()));
        arrays.push(Arc::new(self.kafka_offset.finish()));
        arrays.push(Arc::new(self.predictions.finish()));
        self.rows = 0;
        RecordBatch::try_new(schema.clone(), arrays)
    }
}

/// A file that was closed and renamed into the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedFile {
    pub path: PathBuf,
    pub rows: usize,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// The open file of one partition.
pub struct OpenFile {
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub bucket: Bucket,
    pub opened_at: Instant,
    pub rows: usize,
    pub est_bytes: usize,
    channels: Vec<String>,
    schema: SchemaRef,
    dir: PathBuf,
    tmp_path: PathBuf,
    final_path: PathBuf,
    writer: ArrowWriter<File>,
    buffer: Columns,
    flush_rows: usize,
}

impl OpenFile {
    /// Opens the file that will start with record `first_offset`.
    pub fn open(
        root: &Path,
        partition: i32,
        first_offset: i64,
        bucket: Bucket,
        mut channels: Vec<String>,
        config: &SinkConfig,
    ) -> Result<OpenFile, SinkError> {
        channels.sort();
        let dir = bucket.dir(root);
        fs::create_dir_all(&dir).map_err(|source| SinkError::Io {
            action: "creating directory",
            path: dir.clone(),
            source,
        })?;
        let name = file_name(partition, first_offset);
        let final_path = dir.join(&name);
        let tmp_path = dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp_path).map_err(|source| SinkError::Io {
            action: "creating",
            path: tmp_path.clone(),
            source,
        })?;
        let schema = schema(&channels);
        let level = ZstdLevel::try_new(config.zstd_level)
            .map_err(|_| SinkError::Level(config.zstd_level))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_created_by(format!("edgeloop {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|source| {
            SinkError::Parquet {
                path: tmp_path.clone(),
                source,
            }
        })?;
        let buffer = Columns::new(channels.len());
        Ok(OpenFile {
            partition,
            first_offset,
            last_offset: first_offset,
            bucket,
            opened_at: Instant::now(),
            rows: 0,
            est_bytes: 0,
            channels,
            schema,
            dir,
            tmp_path,
            final_path,
            writer,
            buffer,
            flush_rows: config.row_group_rows.clamp(1, 64 * 1024),
        })
    }

    /// Whether a batch of `bucket` with `channels` can go into this file.
    pub fn accepts(&self, bucket: &Bucket, channels: &[String]) -> bool {
        self.bucket == *bucket
            && channels
                .iter()
                .all(|c| self.channels.binary_search(c).is_ok())
    }

    /// Appends one row per reading of `batch` (record `offset`), with the
    /// label of each reading (`labels` is empty when no rules are in force).
    pub fn append(
        &mut self,
        batch: &ReadingBatch,
        offset: i64,
        labels: &[Labelled],
        rules_version: Option<&str>,
    ) -> Result<(), SinkError> {
        // Column index in this file of each channel of the batch.
        let index: Vec<usize> = batch
            .channels
            .iter()
            .map(|c| self.channels.binary_search(c).unwrap_or(usize::MAX))
            .collect();
        let b = &mut self.buffer;
        let mut values: Vec<Option<f64>> = vec![None; self.channels.len()];
        for (i, r) in batch.readings.iter().enumerate() {
            b.device_id.append_value(&batch.device_id);
            b.profile.append_value(&batch.profile);
            b.seq.append_value((batch.first_seq + i as u64) as i64);
            b.ts.append_value(r.ts_micros);
            values.iter_mut().for_each(|v| *v = None);
            for (&col, &v) in index.iter().zip(&r.values) {
                if let Some(slot) = values.get_mut(col) {
                    // Every non-finite value is "no value" (docs/dataset.md).
                    *slot = v.is_finite().then_some(v);
                }
            }
            for (builder, v) in b.channels.iter_mut().zip(&values) {
                builder.append_option(*v);
            }
            if r.true_label.is_empty() {
                b.true_label.append_null();
            } else {
                b.true_label.append_value(&r.true_label);
            }
            match labels.get(i) {
                Some(l) => {
                    b.label.append_option(l.label.as_deref());
                    b.label_confidence.append_option(l.confidence);
                    b.rules_version.append_option(rules_version);
                }
                None => {
                    b.label.append_null();
                    b.label_confidence.append_null();
                    b.rules_version.append_null();
                }
            }
            b.kafka_partition.append_value(self.partition);
            b.kafka_offset.append_value(offset);
            let items = b.predictions.values();
            for p in &r.predictions {
                // StructBuilder::from_fields(prediction_fields()) made
                // exactly these children (Utf8 → StringBuilder, Int64 →
                // Int64Builder), so every downcast succeeds and the children
                // stay as long as the struct (finish() checks it).
                if let Some(t) = items.field_builder::<StringBuilder>(0) {
                    t.append_value(&p.task);
                }
                if let Some(v) = items.field_builder::<Int64Builder>(1) {
                    v.append_value(i64::try_from(p.model_version).unwrap_or(i64::MAX));
                }
                if let Some(l) = items.field_builder::<StringBuilder>(2) {
                    l.append_value(&p.label);
                }
                items.append(true);
            }
            b.predictions.append(true);
            b.rows += 1;
        }
        let n = batch.readings.len();
        self.rows += n;
        self.est_bytes += n
            * (batch.device_id.len()
                + batch.profile.len()
                + 8 * 3
                + 4
                + 8 * self.channels.len()
                + 8)
            + batch
                .readings
                .iter()
                .flat_map(|r| &r.predictions)
                .map(|p| p.task.len() + p.label.len() + 8 + 8)
                .sum::<usize>();
        self.last_offset = offset;
        if self.buffer.rows >= self.flush_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        if self.buffer.rows == 0 {
            return Ok(());
        }
        let batch = self
            .buffer
            .finish(&self.schema)
            .map_err(|source| SinkError::Arrow {
                path: self.tmp_path.clone(),
                source,
            })?;
        self.writer
            .write(&batch)
            .map_err(|source| SinkError::Parquet {
                path: self.tmp_path.clone(),
                source,
            })
    }

    /// Writes the footer, fsyncs, renames into place and fsyncs the directory.
    pub fn close(mut self) -> Result<ClosedFile, SinkError> {
        self.flush()?;
        let tmp = self.tmp_path.clone();
        let file = self
            .writer
            .into_inner()
            .map_err(|source| SinkError::Parquet {
                path: tmp.clone(),
                source,
            })?;
        publish(file, &tmp, &self.final_path, &self.dir)?;
        Ok(ClosedFile {
            path: self.final_path,
            rows: self.rows,
            first_offset: self.first_offset,
            last_offset: self.last_offset,
        })
    }

    /// Drops the file unwritten (its partition was revoked): the new owner
    /// re-reads it from the committed offset.
    pub fn abort(self) {
        let tmp = self.tmp_path.clone();
        drop(self);
        if let Err(e) = fs::remove_file(&tmp) {
            tracing::warn!(path = %tmp.display(), error = %e, "could not remove an aborted temporary file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use edgeloop_proto::v1::Reading;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn f64_column<'a>(rb: &'a RecordBatch, name: &str) -> &'a arrow_array::Float64Array {
        rb.column_by_name(name)
            .expect(name)
            .as_any()
            .downcast_ref::<arrow_array::Float64Array>()
            .expect("f64")
    }

    fn batch(first_seq: u64, channels: &[&str], n: usize) -> ReadingBatch {
        ReadingBatch {
            device_id: "d1".into(),
            profile: "f32".into(),
            first_seq,
            channels: channels.iter().map(|c| c.to_string()).collect(),
            readings: (0..n)
                .map(|i| Reading {
                    ts_micros: 1_700_000_000_000_000 + i as i64,
                    values: channels
                        .iter()
                        .enumerate()
                        .map(|(c, _)| (i * 10 + c) as f64)
                        .collect(),
                    true_label: if i == 0 {
                        "spike".into()
                    } else {
                        String::new()
                    },
                    // Reading 1 carries one prediction, reading 2 two.
                    predictions: (0..if i < 3 { i } else { 0 })
                        .map(|k| edgeloop_proto::v1::Prediction {
                            task: format!("task{k}"),
                            model_version: 7 + k as u64,
                            label: if k == 0 { "normal" } else { "spike" }.into(),
                            window: 10,
                        })
                        .collect(),
                })
                .collect(),
            loss: None,
        }
    }

    #[test]
    fn closed_file_is_renamed_into_the_hive_layout_and_reads_back(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let bucket = Bucket::of_millis(1_700_000_000_000);
        assert_eq!(
            bucket,
            Bucket {
                date: "2023-11-14".into(),
                hour: 22
            }
        );
        let channels = vec!["temp".to_string(), "hum".to_string()];
        let mut f = OpenFile::open(root.path(), 3, 42, bucket, channels, &SinkConfig::default())?;
        // Channels in another order than the file's (sorted) columns.
        f.append(&batch(0, &["temp", "hum"], 5), 42, &[], None)?;
        f.append(&batch(5, &["hum"], 2), 43, &[], None)?;
        let closed = f.close()?;
        assert_eq!(
            closed.path,
            root.path()
                .join("readings/date=2023-11-14/hour=22/part-00003-00000000000000000042.parquet")
        );
        assert_eq!(
            (closed.rows, closed.first_offset, closed.last_offset),
            (7, 42, 43)
        );
        let dir_entries: Vec<_> = fs::read_dir(closed.path.parent().expect("dir"))?.collect();
        assert_eq!(dir_entries.len(), 1, "no temporary file is left behind");

        let reader =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&closed.path)?)?.build()?;
        let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
        let rb = &batches[0];
        assert_eq!(rb.num_rows(), 7);
        let names: Vec<_> = rb
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            [
                "device_id",
                "profile",
                "seq",
                "ts",
                "hum",
                "temp",
                "true_label",
                "label",
                "label_confidence",
                "rules_version",
                "kafka_partition",
                "kafka_offset",
                "predictions"
            ]
        );
        let predictions = rb
            .column_by_name("predictions")
            .expect("predictions")
            .as_any()
            .downcast_ref::<arrow_array::ListArray>()
            .expect("list");
        assert_eq!(predictions.null_count(), 0, "no prediction: an empty list");
        let lens: Vec<usize> = (0..7).map(|i| predictions.value(i).len()).collect();
        assert_eq!(lens, [0, 1, 2, 0, 0, 0, 1]);
        let second = predictions.value(2);
        let second = second
            .as_any()
            .downcast_ref::<arrow_array::StructArray>()
            .expect("struct");
        let label = second
            .column_by_name("label")
            .expect("label")
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .expect("utf8");
        let version = second
            .column_by_name("model_version")
            .expect("model_version")
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .expect("i64");
        assert_eq!((label.value(1), version.value(1)), ("spike", 8));
        // An analyst's engine reads it too (DuckDB, as docs/dataset.md shows;
        // scripts/setup.sh installs it).
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import duckdb,sys; print(duckdb.execute(f\"SELECT seq, p.task, p.model_version, p.label FROM (SELECT seq, unnest(predictions) AS p FROM read_parquet('{sys.argv[1]}')) ORDER BY seq, p.task\").fetchall())",
            ])
            .arg(&closed.path)
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "[(1, 'task0', 7, 'normal'), (2, 'task0', 7, 'normal'), (2, 'task1', 8, 'spike'), (6, 'task0', 7, 'normal')]"
        );
        let temp = f64_column(rb, "temp");
        let hum = f64_column(rb, "hum");
        // Row 1 of the first batch: temp = 10, hum = 11.
        assert_eq!((temp.value(1), hum.value(1)), (10.0, 11.0));
        // Second batch had no temp column: nulls there; hum was channel 0.
        assert!(temp.is_null(5));
        assert_eq!(hum.value(6), 10.0);
        let seq = rb
            .column_by_name("seq")
            .expect("seq")
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .expect("i64");
        assert_eq!(seq.values().to_vec(), vec![0, 1, 2, 3, 4, 5, 6]);
        Ok(())
    }

    #[test]
    fn a_new_channel_or_another_hour_is_not_accepted_by_an_open_file(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let bucket = Bucket::of_millis(0);
        let f = OpenFile::open(
            root.path(),
            0,
            0,
            bucket.clone(),
            vec!["a".into(), "b".into()],
            &SinkConfig::default(),
        )?;
        assert!(f.accepts(&bucket, &["b".into()]));
        assert!(!f.accepts(&bucket, &["c".into()]));
        assert!(!f.accepts(&Bucket::of_millis(3_600_000), &["a".into()]));
        f.abort();
        assert_eq!(fs::read_dir(bucket.dir(root.path()))?.count(), 0);
        Ok(())
    }

    #[test]
    fn rewriting_the_same_first_offset_replaces_the_earlier_file(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let bucket = Bucket::of_millis(0);
        let mut f = OpenFile::open(
            root.path(),
            0,
            7,
            bucket.clone(),
            vec!["a".into()],
            &SinkConfig::default(),
        )?;
        f.append(&batch(0, &["a"], 3), 7, &[], None)?;
        let first = f.close()?;
        let mut f = OpenFile::open(
            root.path(),
            0,
            7,
            bucket,
            vec!["a".into()],
            &SinkConfig::default(),
        )?;
        f.append(&batch(0, &["a"], 3), 7, &[], None)?;
        f.append(&batch(3, &["a"], 3), 8, &[], None)?;
        let second = f.close()?;
        assert_eq!(first.path, second.path);
        let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(&second.path)?)?;
        assert_eq!(meta.metadata().file_metadata().num_rows(), 6);
        Ok(())
    }

    #[test]
    fn nan_and_both_infinities_are_written_as_null() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let bucket = Bucket::of_millis(0);
        let mut f = OpenFile::open(
            root.path(),
            0,
            0,
            bucket,
            vec!["a".into()],
            &SinkConfig::default(),
        )?;
        let mut b = batch(0, &["a"], 4);
        for (r, v) in b
            .readings
            .iter_mut()
            .zip([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 2.5])
        {
            r.values = vec![v];
        }
        f.append(&b, 0, &[], None)?;
        let closed = f.close()?;
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&closed.path)?)?.build()?;
        let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
        let a = f64_column(&batches[0], "a");
        let got: Vec<Option<f64>> = (0..a.len())
            .map(|i| (!a.is_null(i)).then(|| a.value(i)))
            .collect();
        assert_eq!(got, [None, None, None, Some(2.5)]);
        Ok(())
    }
}
