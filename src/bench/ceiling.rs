//! `edgeloop bench --local DIR --kafka-ceiling DURATION`: the bare ceiling of
//! the Kafka under the stack, in the same run. The bridge's own producer
//! (`edgeloop_broker::bridge::producer`: `acks=all`, idempotence, the
//! bridge's compression and linger) sends records shaped like the fleet's
//! (one `ReadingBatch` of `batch_size` readings of `channels` values per
//! record, keyed by the fleet's device ids in turn) to a topic of its own,
//! as fast as Kafka takes them, with no agent, MQTT, gate or bridge logic in
//! the path. The fleet's acknowledged rate over this one is what the rest of
//! edgeloop costs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgeloop_broker::config::BridgeConfig;
use edgeloop_broker::BrokerStats;
use edgeloop_kafka::KafkaConfig;
use edgeloop_proto::v1::{Reading, ReadingBatch};
use edgeloop_proto::Message as _;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;

/// The topic the ceiling is measured on (created like the readings topic).
pub const TOPIC: &str = "edgeloop.bench.ceiling";

/// Records Kafka may hold unacknowledged at once, as the bridge's
/// `max_in_flight_batches` default allows.
const IN_FLIGHT: usize = 10_000;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Ceiling {
    pub seconds: f64,
    pub records: u64,
    pub readings: u64,
    pub readings_per_s: f64,
    pub record_bytes: usize,
}

pub async fn run(
    bootstrap: &str,
    devices: usize,
    batch_size: usize,
    channels: usize,
    duration: Duration,
) -> Result<Ceiling> {
    let kafka = KafkaConfig {
        bootstrap_servers: bootstrap.to_string(),
        ..KafkaConfig::default()
    };
    edgeloop_kafka::ensure_topics(&kafka, &[TOPIC]).await?;
    let producer = edgeloop_broker::bridge::producer(
        &kafka,
        &BridgeConfig::default(),
        Arc::new(BrokerStats::default()),
    )
    .context("creating the bridge's producer")?;
    let ids: Vec<String> = (0..devices.max(1))
        .map(|i| format!("ceiling-{i:05}"))
        .collect();
    let names: Vec<String> = (0..channels).map(|c| format!("ch{c}")).collect();
    let mut next_seq = vec![0u64; ids.len()];
    let mut in_flight = VecDeque::new();
    let (mut records, mut readings, mut record_bytes) = (0u64, 0u64, 0usize);
    let started = Instant::now();
    let mut i = 0usize;
    while started.elapsed() < duration {
        let d = i % ids.len();
        i += 1;
        let first_seq = next_seq[d];
        next_seq[d] += batch_size as u64;
        let batch = ReadingBatch {
            device_id: ids[d].clone(),
            profile: "gateway".into(),
            first_seq,
            channels: names.clone(),
            readings: (0..batch_size)
                .map(|k| Reading {
                    ts_micros: 1_700_000_000_000_000 + (first_seq + k as u64) as i64 * 1_000,
                    values: (0..channels)
                        .map(|c| 20.0 + (k + c) as f64 * 0.25)
                        .collect(),
                    ..Reading::default()
                })
                .collect(),
            loss: None,
        };
        let payload = batch.encode_to_vec();
        record_bytes = payload.len();
        let mut record = FutureRecord::to(TOPIC)
            .key(ids[d].as_bytes())
            .payload(&payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if let Some(oldest) = in_flight.pop_front() {
                        if matches!(oldest.await, Ok(Ok(_))) {
                            records += 1;
                            readings += batch_size as u64;
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Err((e, _)) => return Err(e).context("producing to the ceiling topic"),
            }
        }
        while in_flight.len() >= IN_FLIGHT {
            if let Some(oldest) = in_flight.pop_front() {
                if matches!(oldest.await, Ok(Ok(_))) {
                    records += 1;
                    readings += batch_size as u64;
                }
            }
        }
    }
    for delivery in in_flight {
        if matches!(delivery.await, Ok(Ok(_))) {
            records += 1;
            readings += batch_size as u64;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Ceiling {
        seconds,
        records,
        readings,
        readings_per_s: readings as f64 / seconds,
        record_bytes,
    })
}
