//! The `losses` table: one row per loss report a device sent, so that a gap
//! in `seq` in `readings` is always explained.
//!
//! `{root}/losses/date=YYYY-MM-DD/hour=HH/part-{partition}-{offset}.parquet`,
//! one small file per report (they are rare), named after the Kafka record so
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

/// Writes the loss report of Kafka record `offset` of `partition`.
pub fn write(
    root: &Path,
    bucket: &Bucket,
    partition: i32,
    offset: i64,
    device_id: &str,
    profile: &str,
    loss: &LossReport,
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
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![device_id])),
            Arc::new(StringArray::from(vec![profile])),
            Arc::new(Int64Array::from(vec![loss.first_seq as i64])),
            Arc::new(Int64Array::from(vec![loss.end_seq as i64])),
            Arc::new(Int64Array::from(vec![
                (loss.end_seq - loss.first_seq) as i64,
            ])),
            Arc::new(StringArray::from(vec![loss.reason.as_str()])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![loss.detected_at_micros]).with_timezone("UTC"),
            ),
            Arc::new(Int32Array::from(vec![partition])),
            Arc::new(Int64Array::from(vec![offset])),
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
