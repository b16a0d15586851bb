//! Rows per second from Kafka into labelled Parquet on one processor, and, in
//! the same run, pyarrow writing the same rows with the same compression.
//!
//! `cargo bench --bench processor -- [READINGS]` (default 1,000,000). Needs
//! Apache Kafka (Java 17+) and pyarrow (`scripts/setup.sh`). Prints figures; asserts nothing.
//! `EDGELOOP_BENCH_PARTITIONS=N` gives the readings topic N partitions
//! instead of `kafka.partitions`' default.

// A benchmark program: a failure ends it with the reason, like a test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeloop_agent::source::simulator::{Simulator, SimulatorConfig};
use edgeloop_kafka::KafkaConfig;
use edgeloop_processor::{ProcessorConfig, ProcessorStats};
use edgeloop_proto::v1::{Reading, ReadingBatch};
use edgeloop_proto::{topics, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

const BATCH: u64 = 100;
const DEVICES: u64 = 50;

#[tokio::main]
async fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let kafka = edgeloop_tests::start_kafka(dir.path())
        .await
        .expect("Apache Kafka (scripts/setup.sh)");
    let mut config = KafkaConfig {
        bootstrap_servers: kafka.bootstrap(),
        ..KafkaConfig::default()
    };
    if let Some(n) = std::env::var("EDGELOOP_BENCH_PARTITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.partitions = n;
    }
    println!("readings topic with {} partitions", config.partitions);
    edgeloop_kafka::ensure_topics(&config, &[topics::KAFKA_READINGS, topics::KAFKA_DEADLETTER])
        .await
        .expect("topics");

    // The readings: DEVICES simulated devices, batches of BATCH, 3 channels.
    let producer: FutureProducer = config
        .client_config(&[
            ("acks", "all"),
            ("linger.ms", "5"),
            ("compression.type", "zstd"),
        ])
        .create()
        .expect("producer");
    let per_device = n / DEVICES;
    let start = Instant::now();
    let mut deliveries = Vec::new();
    let mut sims: Vec<Simulator> = (0..DEVICES)
        .map(|d| {
            Simulator::new(SimulatorConfig {
                seed: d,
                ..SimulatorConfig::default()
            })
        })
        .collect();
    let channels: Vec<String> = SimulatorConfig::default()
        .channels
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for first in (0..per_device).step_by(BATCH as usize) {
        for (d, sim) in sims.iter_mut().enumerate() {
            let device = format!("bench-{d:04}");
            let batch = ReadingBatch {
                device_id: device.clone(),
                profile: "f32".into(),
                first_seq: first,
                channels: channels.clone(),
                readings: (first..(first + BATCH).min(per_device))
                    .map(|s| {
                        let r = sim.next_reading();
                        Reading {
                            ts_micros: 1_800_000_000_000_000 + s as i64 * 100_000,
                            values: r.values,
                            true_label: r.label.into(),
                            predictions: Vec::new(),
                        }
                    })
                    .collect(),
                loss: None,
            };
            let bytes = batch.encode_to_vec();
            loop {
                match producer.send_result(
                    FutureRecord::to(topics::KAFKA_READINGS)
                        .key(device.as_bytes())
                        .payload(&bytes),
                ) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
    }
    let records = deliveries.len() as u64;
    for d in deliveries {
        d.await.expect("delivery").expect("delivered");
    }
    let total = per_device * DEVICES;
    println!(
        "produced {total} readings in {records} records to Apache Kafka in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let root = dir.path().join("parquet");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, include_str!("../config/rules.example.toml")).expect("rules");
    let processor = ProcessorConfig {
        kafka: config.clone(),
        group_id: format!("bench-{}", std::process::id()),
        parquet_root: root.clone(),
        rules_file: Some(rules),
        ..ProcessorConfig::default()
    };
    let stats = Arc::new(ProcessorStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(edgeloop_processor::run(
        processor,
        stop.clone(),
        stats.clone(),
    ));
    // Time from the first record consumed (the group join is not the
    // processor's throughput) to every file closed.
    while ProcessorStats::get(&stats.records_consumed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    while ProcessorStats::get(&stats.records_consumed) < records {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    task.await.expect("join").expect("processor");
    let secs = start.elapsed().as_secs_f64();
    let rows = ProcessorStats::get(&stats.rows_written);
    let ours = rows as f64 / secs;
    println!("edgeloop processor: {rows} labelled rows in {secs:.2} s = {ours:.0} rows/s (one processor, zstd level 3, {} files)", ProcessorStats::get(&stats.files_written));

    // pyarrow writes the very same rows (read back from our files), same
    // compression and row groups; only the write is timed.
    let script = r#"
import sys, time, pyarrow.dataset as ds, pyarrow.parquet as pq
t = ds.dataset(sys.argv[1] + "/readings", format="parquet", partitioning="hive").to_table()
t = t.drop_columns([c for c in ("date", "hour") if c in t.column_names])
start = time.perf_counter()
pq.write_table(t, sys.argv[2], compression="zstd", compression_level=3, row_group_size=131072)
secs = time.perf_counter() - start
print(t.num_rows, secs)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&root)
        .arg(dir.path().join("pyarrow.parquet"))
        .output()
        .expect("python3 with pyarrow (scripts/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let (Some(py_rows), Some(py_secs)) = (
        parts.next().and_then(|r| r.parse::<f64>().ok()),
        parts.next().and_then(|s| s.parse::<f64>().ok()),
    ) else {
        panic!("pyarrow failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    let theirs = py_rows / py_secs;
    println!("pyarrow write_table: {py_rows:.0} rows in {py_secs:.2} s = {theirs:.0} rows/s (zstd level 3, row groups of 131072)");
    println!("ratio edgeloop / pyarrow: {:.2} (edgeloop also consumes Kafka, decodes, dedups and labels)", ours / theirs);
}
