//! The `losses` table: one row per loss report a device sent, so that a gap
//! in `seq` in `readings` is always explained.
//!
//! `{root}/losses/date=YYYY-MM-DD/hour=HH/part-{partition}-{offset}.parquet`,
//! one small file per report (or refused batch) (they are rare), named after the Kafka record so
//! that a replay after a crash rewrites the same file instead of adding one.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use edgeloop_proto::v1::LossReport;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::{file_name, publish, Bucket, SinkError};

pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("profile", DataType::Utf8, false),
        Field::new("first_seq", DataType::Int64, false),
        Field::new("end_seq", DataType::Int64, false),
        Field::new("lost_readings", DataType::Int64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detected_at", ts, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
}

/// Writes the loss reports of Kafka record `offset` of `partition`: the one
/// a device sent, or the seqs of a batch refused for its content (reason
/// `invalid_batch`, one report per range not already in the data set).
pub fn write(
    root: &Path,
    bucket: &Bucket,
    partition: i32,
    offset: i64,
    device_id: &str,
    profile: &str,
    losses: &[LossReport],
) -> Result<PathBuf, SinkError> {
    let dir = bucket.dir_of(root, "losses");
    fs::create_dir_all(&dir).map_err(|source| SinkError::Io {
        action: "creating directory",
        path: dir.clone(),
        source,
    })?;
    let name = file_name(partition, offset);
    let final_path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let schema = schema();
    let n = losses.len();
    // Seqs are at most 2^63 - 1 (edgeloop_proto::validate::MAX_SEQ), so
    // they fit in int64; saturate all the same rather than wrap.
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![device_id; n])),
            Arc::new(StringArray::from(vec![profile; n])),
            Arc::new(Int64Array::from_iter_values(
                losses.iter().map(|l| int(l.first_seq)),
            )),
            Arc::new(Int64Array::from_iter_values(
                losses.iter().map(|l| int(l.end_seq)),
            )),
            Arc::new(Int64Array::from_iter_values(
                losses
                    .iter()
                    .map(|l| int(l.end_seq.saturating_sub(l.first_seq))),
            )),
            Arc::new(StringArray::from_iter_values(
                losses.iter().map(|l| l.reason.as_str()),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    losses.iter().map(|l| l.detected_at_micros),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(Int32Array::from(vec![partition; n])),
            Arc::new(Int64Array::from(vec![offset; n])),
        ],
    )
    .map_err(|source| SinkError::Arrow {
        path: tmp.clone(),
        source,
    })?;
    let file = File::create(&tmp).map_err(|source| SinkError::Io {
        action: "creating",
        path: tmp.clone(),
        source,
    })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let parquet_err = |source| SinkError::Parquet {
        path: tmp.clone(),
        source,
    };
    let mut writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(parquet_err)?;
    writer.write(&batch).map_err(parquet_err)?;
    let file = writer.into_inner().map_err(parquet_err)?;
    publish(file, &tmp, &final_path, &dir)?;
    Ok(final_path)
}
