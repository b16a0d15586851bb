//! The bridge: MQTT telemetry → Kafka `edgeloop.readings`, and the ack
//! watermark back to the devices.
//!
//! A local rumqttd link subscribed to `telemetry/+` receives every batch. Each
//! is produced to Kafka (key = device id, `acks=all`, idempotence on, headers
//! `mqtt_topic` and `device_id`); Kafka's delivery report feeds the
//! [`acks::AckTracker`], and every `ack_interval` the changed watermarks are
//! published retained on `ack/{device}`.
//!
//! Retained `status/{device}` messages (`DeviceStatus`, the last will
//! included) go to the compacted Kafka topic `edgeloop.status`, keyed by
//! device.
//!
//! A payload that does not decode is still produced (keyed by the topic's
//! device) so the stream processor dead-letters it with its reason; it is
//! never acknowledged to the device.
//!
//! Backpressure: at most `max_in_flight_batches` wait for Kafka; beyond that
//! the bridge stops reading its link, the router stops forwarding to it, and
//! devices see no new acks, so their spools hold the backlog.

pub mod acks;

use std::sync::Arc;
use std::time::Duration;

use edgeloop_kafka::KafkaConfig;
use edgeloop_proto::v1::{Ack, ReadingBatch};
use edgeloop_proto::{topics, Message};
use futures::channel::oneshot::Canceled;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use std::future::Future;
use tokio_util::sync::CancellationToken;

use crate::config::BridgeConfig;
use crate::stats::BrokerStats;
use acks::{AckTracker, Take};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("could not create the Kafka producer: {0}")]
    Producer(KafkaError),
    #[error("the broker's local link closed: {0}")]
    Link(String),
}

/// A record on its way to Kafka.
struct InFlight {
    device: String,
    /// Its range of seqs `[first, end)`, and readings in it (a loss report
    /// has none but covers a range of seqs).
    first: u64,
    end: u64,
    readings: u64,
    /// Whether it counts for the device's ack watermark.
    tracked: bool,
    /// A status message (not a readings record).
    status: bool,
}

type Delivered = Result<OwnedDeliveryResult, Canceled>;

async fn delivered(delivery: DeliveryFuture, meta: InFlight) -> (Delivered, InFlight) {
    (delivery.await, meta)
}

pub fn producer(kafka: &KafkaConfig, bridge: &BridgeConfig) -> Result<FutureProducer, BridgeError> {
    let linger = bridge.linger.as_millis().to_string();
    kafka
        .client_config(&[
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("compression.type", &bridge.compression),
            ("linger.ms", &linger),
            ("client.id", "edgeloop-bridge"),
        ])
        .create()
        .map_err(BridgeError::Producer)
}

/// Runs the bridge until `shutdown`; then stops taking telemetry, waits up to
/// `grace` for Kafka to acknowledge what it took, and publishes the last acks.
pub async fn run(
    producer: FutureProducer,
    config: BridgeConfig,
    mut link_tx: LinkTx,
    mut link_rx: LinkRx,
    shutdown: CancellationToken,
    grace: Duration,
    stats: Arc<BrokerStats>,
) -> Result<(), BridgeError> {
    let mut tracker = AckTracker::default();
    let mut in_flight = FuturesUnordered::new();
    let mut ack_tick = tokio::time::interval(config.ack_interval);
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop_deadline: Option<tokio::time::Instant> = None;

    loop {
        let can_take = stop_deadline.is_none() && in_flight.len() < config.max_in_flight_batches;
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (delivered, record): (Delivered, InFlight) = done;
                let ok = matches!(delivered, Ok(Ok(_)));
                if let Ok(Err((e, _))) = &delivered {
                    tracing::warn!(device = %record.device, first_seq = record.first, error = %e, "Kafka did not take a record; the device will resend it");
                    BrokerStats::add(&stats.delivery_errors, 1);
                }
                if ok && !record.status {
                    BrokerStats::add(&stats.batches_in_kafka, 1);
                    BrokerStats::add(&stats.readings_in_kafka, record.readings);
                }
                if record.tracked {
                    tracker.on_delivered(&record.device, record.first, record.end, ok);
                }
            }
            _ = ack_tick.tick() => {
                publish_acks(&mut tracker, &mut link_tx, &stats).await?;
            }
            notification = link_rx.next(), if can_take => {
                match notification {
                    Ok(Some(Notification::Forward(forward))) => {
                        if let Some(sent) = take(&producer, &mut tracker, forward.publish, &stats).await {
                            in_flight.push(sent);
                        }
                    }
                    Ok(Some(Notification::Unschedule)) => {
                        link_rx.wake().await.map_err(|e| BridgeError::Link(e.to_string()))?;
                    }
                    Ok(Some(_)) | Ok(None) => {}
                    Err(e) => return Err(BridgeError::Link(e.to_string())),
                }
            }
            _ = shutdown.cancelled(), if stop_deadline.is_none() => {
                tracing::info!(in_flight = in_flight.len(), "bridge stopping: flushing to Kafka");
                stop_deadline = Some(tokio::time::Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(stop_deadline.unwrap_or_else(tokio::time::Instant::now)), if stop_deadline.is_some() => {
                tracing::warn!(in_flight = in_flight.len(), "bridge grace period over with batches unacknowledged by Kafka");
                break;
            }
        }
        if stop_deadline.is_some() && in_flight.is_empty() {
            break;
        }
    }
    publish_acks(&mut tracker, &mut link_tx, &stats).await?;
    // Give the router a moment to route the last acks before the caller exits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// Decides what to do with one telemetry publish and, if it goes to Kafka,
/// enqueues it there. Waits (backpressure) while librdkafka's queue is full.
async fn take(
    producer: &FutureProducer,
    tracker: &mut AckTracker,
    publish: Publish,
    stats: &BrokerStats,
) -> Option<impl Future<Output = (Delivered, InFlight)>> {
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let (device, kafka_topic) = if let Some(d) = topics::device_of_telemetry(&topic) {
        (d.to_owned(), topics::KAFKA_READINGS)
    } else if let Some(d) = topics::device_of_status(&topic) {
        (d.to_owned(), topics::KAFKA_STATUS)
    } else {
        tracing::warn!(%topic, "ignoring a publish outside telemetry/ and status/");
        return None;
    };
    let decoded = if kafka_topic == topics::KAFKA_STATUS {
        // Device status goes to the compacted status topic as it is.
        BrokerStats::add(&stats.statuses_received, 1);
        None
    } else {
        BrokerStats::add(&stats.batches_received, 1);
        Some(ReadingBatch::decode(publish.payload.as_ref()))
    };
    let (first, end, readings, tracked) = match decoded {
        None => (0, 0, 0, false),
        Some(decoded) => match decoded {
            Ok(batch) if batch.device_id == device => {
                let first = batch.first_seq;
                let end = batch.end_seq();
                if tracker.on_received(&device, first, end) == Take::Skip {
                    BrokerStats::add(&stats.batches_skipped, 1);
                    return None;
                }
                (first, end, batch.readings.len() as u64, true)
            }
            // Not ours to judge in detail: the processor dead-letters it with the
            // reason. It is never acknowledged.
            Ok(_) | Err(_) => {
                BrokerStats::add(&stats.malformed_forwarded, 1);
                (0, 0, 0, false)
            }
        },
    };
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "mqtt_topic",
            value: Some(topic.as_bytes()),
        })
        .insert(Header {
            key: "device_id",
            value: Some(device.as_bytes()),
        });
    let mut record = FutureRecord::to(kafka_topic)
        .key(device.as_bytes())
        .payload(publish.payload.as_ref())
        .headers(headers);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => {
                let record = InFlight {
                    device,
                    first,
                    end,
                    readings,
                    tracked,
                    status: kafka_topic == topics::KAFKA_STATUS,
                };
                return Some(delivered(delivery, record));
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => {
                tracing::warn!(%device, error = %e, "could not enqueue a batch for Kafka; the device will resend it");
                BrokerStats::add(&stats.delivery_errors, 1);
                if tracked {
                    tracker.on_delivered(&device, first, end, false);
                }
                return None;
            }
        }
    }
}

async fn publish_acks(
    tracker: &mut AckTracker,
    link_tx: &mut LinkTx,
    stats: &BrokerStats,
) -> Result<(), BridgeError> {
    for (device, committed_seq) in tracker.take_dirty() {
        let payload = Ack { committed_seq }.encode_to_vec();
        let publish = Publish::new(
            bytes::Bytes::from(topics::ack(&device)),
            bytes::Bytes::from(payload),
            true,
        );
        link_tx
            .send(Packet::Publish(publish, None))
            .await
            .map_err(|e| BridgeError::Link(e.to_string()))?;
        BrokerStats::add(&stats.acks_published, 1);
    }
    Ok(())
}
