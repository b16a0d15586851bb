//! The `rule_stats` table: how each labelling rule behaved, per device, per
//! file of readings, so an analyst can ask how a rule behaves by device and
//! by day. Written next to each readings file, under the same name, so a
//! rewrite after a crash replaces it.
//!
//! `{root}/rule_stats/date=YYYY-MM-DD/hour=HH/part-{partition}-{first_offset}.parquet`

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::{file_name, publish, Bucket, SinkError};
use crate::labeller::RuleCounts;

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("rules_version", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("rule_label", DataType::Utf8, false),
        Field::new("readings", DataType::Int64, false),
        Field::new("votes", DataType::Int64, false),
        Field::new("overlaps", DataType::Int64, false),
        Field::new("conflicts", DataType::Int64, false),
        Field::new("agreements", DataType::Int64, false),
        Field::new("estimated_accuracy", DataType::Float64, true),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("first_offset", DataType::Int64, false),
    ]))
}

/// One row: a rule on a device.
pub struct StatsRow<'a> {
    pub device_id: &'a str,
    pub rule: &'a str,
    pub rule_label: &'a str,
    pub counts: RuleCounts,
    pub estimated_accuracy: Option<f64>,
}

/// Writes the rule statistics of the readings file `(partition, first_offset)`.
pub fn write(
    root: &Path,
    bucket: &Bucket,
    partition: i32,
    first_offset: i64,
    rules_version: &str,
    rows: &[StatsRow<'_>],
) -> Result<PathBuf, SinkError> {
    let dir = bucket.dir_of(root, "rule_stats");
    fs::create_dir_all(&dir).map_err(|source| SinkError::Io {
        action: "creating directory",
        path: dir.clone(),
        source,
    })?;
    let name = file_name(partition, first_offset);
    let final_path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let ints = |f: fn(&RuleCounts) -> u64| -> Arc<Int64Array> {
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| f(&r.counts) as i64),
        ))
    };
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.device_id),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|_| rules_version),
            )),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.rule))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.rule_label),
            )),
            ints(|c| c.readings),
            ints(|c| c.votes),
            ints(|c| c.overlaps),
            ints(|c| c.conflicts),
            ints(|c| c.agreements),
            Arc::new(Float64Array::from_iter(
                rows.iter().map(|r| r.estimated_accuracy),
            )),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|_| partition))),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|_| first_offset),
            )),
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
    let mut writer = ArrowWriter::try_new(file, schema(), Some(props)).map_err(parquet_err)?;
    writer.write(&batch).map_err(parquet_err)?;
    let file = writer.into_inner().map_err(parquet_err)?;
    publish(file, &tmp, &final_path, &dir)?;
    Ok(final_path)
}
