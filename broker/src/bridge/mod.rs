//! The bridge: MQTT telemetry → Kafka `edgeloop.readings`, the ack
//! watermark back to the devices, and the models out.
//!
//! A local rumqttd link subscribed to `telemetry/+` receives every batch. Each
//! is produced to Kafka (key = device id, `acks=all`, idempotence on, with
//! the headers a Kafka user filters on: `device_id`, `profile`, `schema`
//! (`edgeloop.v1.ReadingBatch`) and `content-type`, plus `reason` on a dead
//! letter; docs/device-protocol.md, "In Kafka"); Kafka's delivery report
//! feeds the
//! [`acks::AckTracker`]; every `ack_interval` the changed watermarks are
//! published retained on `ack/{device}` and written to the compacted topic
//! `edgeloop.acks` ([`ack_log`]).
//!
//! Retained `status/{device}` messages (`DeviceStatus`, the last will
//! included) go to the compacted Kafka topic `edgeloop.status`, keyed by
//! device, once [`edgeloop_proto::validate::check_status`] passes; one that
//! does not (it names another device, say) goes to `edgeloop.deadletter`
//! instead, with a `reason` header, and is counted.
//!
//! Telemetry is checked by [`edgeloop_proto::validate::decode_batch`], the
//! check the processor runs too, and every batch is produced keyed by the
//! topic's device (the identity; never the payload's). A valid batch counts
//! for the ack watermark. A batch refused for its content (channels, value
//! counts, timestamps) whose seqs are real counts too, so the device does
//! not resend it forever: the processor dead-letters it with its reason and
//! records its seqs in `losses` (`invalid_batch`), so the gap is explained.
//! Any other refusal (it does not decode, names another device, seqs past
//! 2^63 - 1) is produced for the processor to dead-letter and never
//! acknowledged.
//!
//! After a restart: [`restore_acks`] reads `edgeloop.acks` back, republishes
//! each retained `ack/{device}` and seeds the tracker, before the bridge
//! subscribes to telemetry; [`models`] does the same for `edgeloop.models`
//! and keeps following it. [`compacted`] reads those topics.
//!
//! Backpressure: at most `max_in_flight_batches` readings and status records
//! wait for Kafka; beyond that the bridge stops reading its link, the router
//! stops forwarding to it, and devices see no new acks, so their spools hold
//! the backlog. Nothing is dropped: librdkafka keeps retrying what it holds
//! (up to `message.timeout.ms`, after which the record counts as a delivery
//! error and its device resends it), and the bridge resumes reading as soon
//! as deliveries come back. While Kafka is away the bridge's memory is bounded
//! by that limit; rumqttd's own log is bounded by `mqtt.max_segment_bytes` ×
//! `mqtt.max_segment_count`, and the gate stops letting telemetry into it
//! once the bridge is `bridge.max_lag_bytes` behind: the bridge gives the
//! budget back as it reads ([`crate::backpressure`]).

pub mod ack_log;
pub mod acks;
pub mod compacted;
pub mod models;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeloop_kafka::KafkaConfig;
use edgeloop_proto::v1::Ack;
use edgeloop_proto::validate::{self, BatchLimits};
use edgeloop_proto::{topics, Message as _};
use futures::channel::oneshot::Canceled;
use futures::future;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message as _};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use tokio_util::sync::CancellationToken;

use crate::backpressure::{self, Backpressure};
use crate::config::BridgeConfig;
use crate::stats::{BrokerRtt, BrokerStats, KafkaClientStats};
use ack_log::AckLog;
use acks::{AckTracker, Take};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("could not create the Kafka producer: {0}")]
    Producer(KafkaError),
    #[error("could not create a Kafka consumer: {0}")]
    Consumer(KafkaError),
    #[error("the broker's local link closed: {0}")]
    Link(String),
    #[error("could not read Kafka topic {topic} back at start-up: {reason}")]
    Restore { topic: &'static str, reason: String },
}

/// The bridge's Kafka producer; its context feeds librdkafka's statistics to
/// [`BrokerStats::kafka_client`].
pub type Producer = FutureProducer<BridgeContext>;

pub struct BridgeContext {
    stats: Arc<BrokerStats>,
}

impl ClientContext for BridgeContext {
    fn stats(&self, s: Statistics) {
        let mut brokers: Vec<BrokerRtt> = s
            .brokers
            .values()
            // Bootstrap entries (node id -1) stand for the configured
            // addresses, not for brokers.
            .filter(|b| b.nodeid >= 0)
            .map(|b| BrokerRtt {
                name: format!("{}/{}", b.nodename, b.nodeid),
                up: b.state == "UP",
                rtt_avg_seconds: b.rtt.as_ref().map_or(0.0, |w| w.avg as f64 / 1e6),
            })
            .collect();
        brokers.sort_by(|a, b| a.name.cmp(&b.name));
        let sum = |f: fn(&rdkafka::statistics::Broker) -> u64| s.brokers.values().map(f).sum();
        let figures = KafkaClientStats {
            seen: true,
            msg_cnt: s.msg_cnt,
            msg_size: s.msg_size,
            txmsgs: u64::try_from(s.txmsgs).unwrap_or(0),
            txmsg_bytes: u64::try_from(s.txmsg_bytes).unwrap_or(0),
            txretries: sum(|b| b.txretries),
            txerrs: sum(|b| b.txerrs),
            req_timeouts: sum(|b| b.req_timeouts),
            brokers,
        };
        *self
            .stats
            .kafka_client
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = figures;
    }
}

/// A record on its way to Kafka.
struct InFlight {
    device: String,
    kind: Kind,
    sent: Instant,
}

enum Kind {
    /// A readings batch or loss report covering `[first, end)` (`readings`
    /// readings in it); `tracked` if it counts for the ack watermark.
    Readings {
        first: u64,
        end: u64,
        readings: u64,
        tracked: bool,
    },
    /// A device status.
    Status,
    /// A refused device status, to `edgeloop.deadletter`.
    DeadLetter,
    /// The ack record of watermark `seq` in `edgeloop.acks`.
    Ack { seq: u64 },
}

type Delivered = Result<OwnedDeliveryResult, Canceled>;

/// A record's delivery report, with what the bridge knows of the record.
type Pending = future::Join<DeliveryFuture, future::Ready<InFlight>>;

fn pending(delivery: DeliveryFuture, meta: InFlight) -> Pending {
    future::join(delivery, future::ready(meta))
}

pub fn producer(
    kafka: &KafkaConfig,
    bridge: &BridgeConfig,
    stats: Arc<BrokerStats>,
) -> Result<Producer, BridgeError> {
    let linger = bridge.linger.as_millis().to_string();
    let statistics = bridge.statistics_interval.as_millis().to_string();
    kafka
        .client_config(&[
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("compression.type", &bridge.compression),
            ("linger.ms", &linger),
            ("client.id", "edgeloop-bridge"),
            ("statistics.interval.ms", &statistics),
        ])
        .create_with_context(BridgeContext { stats })
        .map_err(BridgeError::Producer)
}

/// What the bridge starts from: watermarks restored from `edgeloop.acks`,
/// and the consumer that keeps following it from where the restore ended.
#[derive(Default)]
pub struct Restored {
    pub tracker: AckTracker,
    pub log: AckLog,
    pub follow: Option<AckFollow>,
}

/// Following `edgeloop.acks` after start-up (crate::replicas).
pub struct AckFollow {
    pub consumer: Arc<compacted::CompactedConsumer>,
    /// Which devices are connected here, to be told a merged watermark.
    pub replica: Arc<crate::replicas::Replica>,
}

/// A device's watermark from one record of `edgeloop.acks`; `None` for a
/// tombstone or a record that does not decode (logged and counted).
fn ack_record(message: &impl rdkafka::Message, stats: &BrokerStats) -> Option<(String, u64)> {
    let device = message
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|d| edgeloop_proto::device_id::validate(d).is_ok());
    let ack = message.payload().map(Ack::decode);
    match (device, ack) {
        (Some(device), Some(Ok(ack))) if ack.committed_seq > validate::MAX_SEQ => {
            // Written before seqs were bounded (a first batch at seq
            // 2^64 - 1 made the watermark u64::MAX): taking it would
            // skip every batch of the device forever.
            tracing::warn!(
                %device,
                committed_seq = ack.committed_seq,
                "skipping an ack record past the largest possible seq (2^63 - 1)"
            );
            BrokerStats::add(&stats.records_undecodable, 1);
            None
        }
        (Some(device), Some(Ok(ack))) => Some((device.to_string(), ack.committed_seq)),
        // A tombstone: nothing to take for that device.
        (Some(_), None) => None,
        (device, ack) => {
            tracing::warn!(
                topic = topics::KAFKA_ACKS,
                partition = message.partition(),
                offset = message.offset(),
                key = ?message.key().map(String::from_utf8_lossy),
                valid_device = device.is_some(),
                error = ?ack.and_then(Result::err).map(|e| e.to_string()),
                "skipping an ack record that does not decode"
            );
            BrokerStats::add(&stats.records_undecodable, 1);
            None
        }
    }
}

/// Reads `edgeloop.acks` from its beginning to its end (within `timeout`),
/// republishes each device's watermark retained on `ack/{device}` and
/// returns the state the bridge continues from, with the consumer still
/// assigned so the bridge keeps following the topic (crate::replicas).
/// Call it before subscribing to telemetry.
pub async fn restore_acks(
    kafka: &KafkaConfig,
    timeout: Duration,
    link_tx: &mut LinkTx,
    replica: Arc<crate::replicas::Replica>,
    stats: &BrokerStats,
) -> Result<Restored, BridgeError> {
    let consumer = compacted::consumer(kafka, "edgeloop-bridge-acks")?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut catch_up =
        compacted::assign_from_beginning(&consumer, topics::KAFKA_ACKS, timeout).await?;
    let mut watermarks: BTreeMap<String, u64> = BTreeMap::new();
    while !catch_up.done() {
        let received = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .map_err(|_| BridgeError::Restore {
                topic: topics::KAFKA_ACKS,
                reason: format!("not read to its end within {timeout:?}"),
            })?;
        let message = match received {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(partition)) => {
                catch_up.on_end(partition);
                continue;
            }
            // Transport errors: the consumer's context logs them.
            Err(e) => {
                tracing::debug!(topic = topics::KAFKA_ACKS, error = %e, "reading acks from Kafka");
                continue;
            }
        };
        catch_up.on_record(message.partition(), message.offset());
        if let Some((device, seq)) = ack_record(&message, stats) {
            let w = watermarks.entry(device).or_default();
            *w = (*w).max(seq);
        }
    }
    let mut restored = Restored {
        follow: Some(AckFollow {
            consumer: consumer.clone(),
            replica,
        }),
        ..Restored::default()
    };
    for (device, seq) in watermarks {
        if seq == 0 {
            continue;
        }
        restored.tracker.restore(&device, seq);
        restored.log.restored(&device, seq);
        publish_ack(link_tx, &device, seq, stats).await?;
        BrokerStats::add(&stats.acks_restored, 1);
    }
    tracing::info!(
        devices = BrokerStats::get(&stats.acks_restored),
        "ack watermarks restored from Kafka and retained"
    );
    Ok(restored)
}

/// A record of `edgeloop.acks` read while following it: merged into the
/// tracker (only up), and marked as logged so it is never written back
/// (crate::replicas).
fn on_followed(
    device: &str,
    seq: u64,
    tracker: &mut AckTracker,
    log: &mut AckLog,
    replica: &crate::replicas::Replica,
    stats: &BrokerStats,
) {
    BrokerStats::add(&stats.acks_followed, 1);
    log.restored(device, seq);
    if tracker.merge(device, seq, replica.is_connected(device)) {
        BrokerStats::add(&stats.acks_merged, 1);
        tracing::debug!(%device, seq, "ack watermark raised by a record of edgeloop.acks");
    }
}

/// Runs the bridge until `shutdown`; then stops taking telemetry, waits up to
/// `grace` for Kafka to acknowledge what it took, and publishes the last acks.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    producer: Producer,
    config: BridgeConfig,
    mut link_tx: LinkTx,
    mut link_rx: LinkRx,
    restored: Restored,
    backpressure: Arc<Backpressure>,
    shutdown: CancellationToken,
    grace: Duration,
    stats: Arc<BrokerStats>,
) -> Result<(), BridgeError> {
    let Restored {
        mut tracker,
        mut log,
        follow,
    } = restored;
    let mut in_flight = FuturesUnordered::new();
    // Readings and status records in `in_flight` (ack records are bounded by
    // the number of devices and not counted).
    let mut telemetry_in_flight = 0usize;
    let mut ack_tick = tokio::time::interval(config.ack_interval);
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    // Since when the bridge has been ready to read and found nothing.
    let mut idle_since: Option<Instant> = None;

    loop {
        let can_take =
            stop_deadline.is_none() && telemetry_in_flight < config.max_in_flight_batches;
        if !can_take {
            idle_since = None;
        } else if idle_since.is_none() {
            idle_since = Some(Instant::now());
        }
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (delivered, record): (Delivered, InFlight) = done;
                if !matches!(record.kind, Kind::Ack { .. }) {
                    telemetry_in_flight -= 1;
                }
                on_delivered(delivered, record, &mut tracker, &mut log, &stats);
            }
            _ = ack_tick.tick() => {
                if idle_since.is_some_and(|t| t.elapsed() >= backpressure::IDLE_REFILL) {
                    backpressure.refill();
                }
                flush_acks(&producer, &mut tracker, &mut log, &mut link_tx, &mut in_flight, &stats).await?;
            }
            notification = link_rx.next(), if can_take => {
                match notification {
                    Ok(Some(Notification::Forward(forward))) => {
                        idle_since = None;
                        if Backpressure::counts(&forward.publish.topic) {
                            backpressure.give_back(backpressure.cost(
                                forward.publish.topic.len(),
                                forward.publish.payload.len(),
                            ));
                        }
                        if let Some(sent) = take(&producer, &mut tracker, forward.publish, &config.batch_limits, &stats).await {
                            in_flight.push(sent);
                            telemetry_in_flight += 1;
                        }
                    }
                    Ok(Some(Notification::Unschedule)) => {
                        link_rx.wake().await.map_err(|e| BridgeError::Link(e.to_string()))?;
                    }
                    Ok(Some(_)) | Ok(None) => {}
                    Err(e) => return Err(BridgeError::Link(e.to_string())),
                }
            }
            received = async {
                match &follow {
                    Some(f) => f.consumer.recv().await,
                    None => std::future::pending().await,
                }
            }, if follow.is_some() => {
                match received {
                    Ok(message) => {
                        if let (Some((device, seq)), Some(f)) = (ack_record(&message, &stats), &follow) {
                            on_followed(&device, seq, &mut tracker, &mut log, &f.replica, &stats);
                        }
                    }
                    Err(KafkaError::PartitionEOF(_)) => {}
                    // Transport errors: the consumer's context logs them,
                    // and librdkafka reconnects by itself.
                    Err(e) => tracing::debug!(topic = topics::KAFKA_ACKS, error = %e, "following acks in Kafka"),
                }
            }
            _ = shutdown.cancelled(), if stop_deadline.is_none() => {
                tracing::info!(in_flight = telemetry_in_flight, "bridge stopping: flushing to Kafka");
                stop_deadline = Some(tokio::time::Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(stop_deadline.unwrap_or_else(tokio::time::Instant::now)), if stop_deadline.is_some() => {
                tracing::warn!(
                    in_flight = telemetry_in_flight,
                    ack_records_in_flight = log.in_flight(),
                    "bridge grace period over with records unacknowledged by Kafka"
                );
                break;
            }
        }
        BrokerStats::set(&stats.in_flight, telemetry_in_flight as u64);
        BrokerStats::set(&stats.lag_bytes, backpressure.lag_bytes());
        if stop_deadline.is_some() && telemetry_in_flight == 0 {
            // Everything taken is delivered: publish the last watermarks,
            // write them to edgeloop.acks, then stop once Kafka has them.
            flush_acks(
                &producer,
                &mut tracker,
                &mut log,
                &mut link_tx,
                &mut in_flight,
                &stats,
            )
            .await?;
            if in_flight.is_empty() && !log.busy() {
                break;
            }
        }
    }
    // Give the router a moment to route the last acks before the caller exits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

fn on_delivered(
    delivered: Delivered,
    record: InFlight,
    tracker: &mut AckTracker,
    log: &mut AckLog,
    stats: &BrokerStats,
) {
    let ok = matches!(delivered, Ok(Ok(_)));
    if ok {
        stats.delivery_latency.observe(record.sent.elapsed());
    }
    let error = match &delivered {
        Ok(Err((e, _))) => Some(e.to_string()),
        Err(_) => Some("the producer went away".to_string()),
        Ok(Ok(_)) => None,
    };
    match record.kind {
        Kind::Readings {
            first,
            end,
            readings,
            tracked,
        } => {
            if let Some(error) = error {
                tracing::warn!(device = %record.device, first_seq = first, %error, "Kafka did not take a record; the device will resend it");
                BrokerStats::add(&stats.delivery_errors, 1);
            } else {
                BrokerStats::add(&stats.batches_in_kafka, 1);
                BrokerStats::add(&stats.readings_in_kafka, readings);
            }
            if tracked {
                tracker.on_delivered(&record.device, first, end, ok);
            }
        }
        Kind::Status => {
            if let Some(error) = error {
                tracing::warn!(device = %record.device, %error, "Kafka did not take a device status");
                BrokerStats::add(&stats.delivery_errors, 1);
            }
        }
        Kind::DeadLetter => {
            if let Some(error) = error {
                tracing::warn!(device = %record.device, %error, "Kafka did not take the dead letter of a refused device status");
                BrokerStats::add(&stats.delivery_errors, 1);
            }
        }
        Kind::Ack { seq } => {
            if let Some(error) = &error {
                tracing::warn!(device = %record.device, seq, %error, "Kafka did not take an ack record; writing it again");
                BrokerStats::add(&stats.ack_record_errors, 1);
            } else {
                BrokerStats::add(&stats.ack_records, 1);
            }
            log.on_written(&record.device, seq, ok);
        }
    }
}

/// Changed watermarks: published to their devices, and written to
/// `edgeloop.acks` (at most one record per device on its way).
async fn flush_acks(
    producer: &Producer,
    tracker: &mut AckTracker,
    log: &mut AckLog,
    link_tx: &mut LinkTx,
    in_flight: &mut FuturesUnordered<Pending>,
    stats: &BrokerStats,
) -> Result<(), BridgeError> {
    for (device, watermark) in tracker.take_dirty() {
        publish_ack(link_tx, &device, watermark, stats).await?;
        log.offer(&device, watermark);
    }
    for (device, seq) in log.to_write() {
        let payload = Ack { committed_seq: seq }.encode_to_vec();
        let record = FutureRecord::to(topics::KAFKA_ACKS)
            .key(device.as_bytes())
            .payload(&payload);
        match producer.send_result(record) {
            Ok(delivery) => {
                count_produced(stats, device.len() + payload.len());
                in_flight.push(pending(
                    delivery,
                    InFlight {
                        device,
                        kind: Kind::Ack { seq },
                        sent: Instant::now(),
                    },
                ));
            }
            Err((e, _)) => {
                // Tried again on the next tick.
                if matches!(
                    e,
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                ) {
                    BrokerStats::add(&stats.enqueue_retries, 1);
                } else {
                    tracing::warn!(%device, error = %e, "could not enqueue an ack record for Kafka");
                    BrokerStats::add(&stats.ack_record_errors, 1);
                }
                log.on_written(&device, seq, false);
            }
        }
    }
    Ok(())
}

fn count_produced(stats: &BrokerStats, bytes: usize) {
    BrokerStats::add(&stats.records_produced, 1);
    BrokerStats::add(&stats.bytes_produced, bytes as u64);
}

/// What the bridge makes of a telemetry payload from `device`.
#[derive(Debug, PartialEq)]
enum Telemetry {
    /// A valid batch of seqs `[first, end)`: acknowledged once in Kafka.
    Valid {
        first: u64,
        end: u64,
        readings: u64,
        profile: String,
    },
    /// Refused for its content, its seqs real: acknowledged once in Kafka,
    /// where the processor dead-letters it and records `[first, end)` in
    /// `losses` (`invalid_batch`).
    Invalid {
        first: u64,
        end: u64,
        reason: String,
    },
    /// Refused, no seqs to take (does not decode, names another device,
    /// seqs past 2^63 - 1): forwarded for dead-lettering, never acknowledged.
    Refused { reason: String },
}

/// Judges a telemetry payload with the check the processor runs too.
fn judge_telemetry(device: &str, payload: &[u8], limits: &BatchLimits) -> Telemetry {
    match validate::decode_batch(device, payload, limits) {
        Ok(batch) => Telemetry::Valid {
            first: batch.first_seq,
            end: batch.end_seq(),
            readings: batch.readings.len() as u64,
            profile: batch.profile,
        },
        Err(refused) => match refused.lost {
            Some(lost) => Telemetry::Invalid {
                first: lost.first_seq,
                end: lost.end_seq,
                reason: refused.reason.to_string(),
            },
            None => Telemetry::Refused {
                reason: refused.reason.to_string(),
            },
        },
    }
}

/// The `schema` header of a record of `edgeloop.readings`: the protobuf
/// message its value holds, versioned by its package.
pub const SCHEMA_BATCH: &str = "edgeloop.v1.ReadingBatch";
/// The `schema` header of a record of `edgeloop.status`.
pub const SCHEMA_STATUS: &str = "edgeloop.v1.DeviceStatus";

/// Decides what to do with one telemetry publish and, if it goes to Kafka,
/// enqueues it there. Waits (backpressure) while librdkafka's queue is full.
async fn take(
    producer: &Producer,
    tracker: &mut AckTracker,
    publish: Publish,
    limits: &BatchLimits,
    stats: &BrokerStats,
) -> Option<Pending> {
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let (device, mut kafka_topic) = if let Some(d) = topics::device_of_telemetry(&topic) {
        (d.to_owned(), topics::KAFKA_READINGS)
    } else if let Some(d) = topics::device_of_status(&topic) {
        (d.to_owned(), topics::KAFKA_STATUS)
    } else {
        tracing::warn!(%topic, "ignoring a publish outside telemetry/ and status/");
        return None;
    };
    let mut refusal: Option<String> = None;
    let mut profile: Option<String> = None;
    let schema = if kafka_topic == topics::KAFKA_STATUS {
        SCHEMA_STATUS
    } else {
        SCHEMA_BATCH
    };
    let kind = if kafka_topic == topics::KAFKA_STATUS {
        // Device status goes to the compacted status topic as it is, if it
        // is the device's own. The ack the device holds is a floor for its
        // watermark.
        BrokerStats::add(&stats.statuses_received, 1);
        match validate::decode_status(&device, publish.payload.as_ref()) {
            Ok(status) => {
                profile = Some(status.profile.clone());
                if tracker.raise_to_device_ack(&device, status.acked_seq) {
                    BrokerStats::add(&stats.watermarks_raised_by_device, 1);
                    tracing::info!(
                        %device,
                        acked_seq = status.acked_seq,
                        "ack watermark raised to the ack the device holds (the restore had less)"
                    );
                }
                Kind::Status
            }
            Err(reason) => {
                tracing::warn!(%device, %reason, "refusing a device status: dead-lettered instead of filed");
                BrokerStats::add(&stats.statuses_refused, 1);
                kafka_topic = topics::KAFKA_DEADLETTER;
                refusal = Some(reason.to_string());
                Kind::DeadLetter
            }
        }
    } else {
        BrokerStats::add(&stats.batches_received, 1);
        // The seqs to acknowledge once the record is in Kafka, if any.
        let (seqs, readings) = match judge_telemetry(&device, publish.payload.as_ref(), limits) {
            Telemetry::Valid {
                first,
                end,
                readings,
                profile: p,
            } => {
                profile = Some(p);
                (Some((first, end)), readings)
            }
            Telemetry::Invalid { first, end, reason } => {
                tracing::debug!(%device, first_seq = first, end_seq = end, %reason, "an invalid batch: acknowledged, and recorded as lost by the processor");
                BrokerStats::add(&stats.batches_invalid, 1);
                (Some((first, end)), 0)
            }
            Telemetry::Refused { reason } => {
                tracing::debug!(%device, %reason, "a refused batch: forwarded for dead-lettering, not acknowledged");
                BrokerStats::add(&stats.malformed_forwarded, 1);
                (None, 0)
            }
        };
        match seqs {
            Some((first, end)) => {
                if tracker.on_received(&device, first, end) == Take::Skip {
                    BrokerStats::add(&stats.batches_skipped, 1);
                    return None;
                }
                Kind::Readings {
                    first,
                    end,
                    readings,
                    tracked: true,
                }
            }
            None => Kind::Readings {
                first: 0,
                end: 0,
                readings: 0,
                tracked: false,
            },
        }
    };
    // What a Kafka user filters on without decoding the payload (the
    // bridge's record contract, docs/device-protocol.md "In Kafka").
    let mut headers = OwnedHeaders::new_with_capacity(7)
        .insert(Header {
            key: "device_id",
            value: Some(device.as_str()),
        })
        .insert(Header {
            key: "schema",
            value: Some(schema),
        })
        .insert(Header {
            key: "content-type",
            value: Some("application/x-protobuf"),
        });
    if let Some(profile) = profile.as_deref().filter(|p| !p.is_empty()) {
        headers = headers.insert(Header {
            key: "profile",
            value: Some(profile),
        });
    }
    if let Some(reason) = refusal.as_deref() {
        headers = headers
            .insert(Header {
                key: "reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "source_topic",
                value: Some(topic.as_str()),
            })
            .insert(Header {
                key: "written_by",
                value: Some("edgeloop-bridge"),
            });
    }
    let mut record = FutureRecord::to(kafka_topic)
        .key(device.as_bytes())
        .payload(publish.payload.as_ref())
        .headers(headers);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => {
                count_produced(stats, device.len() + publish.payload.len());
                let record = InFlight {
                    device,
                    kind,
                    sent: Instant::now(),
                };
                return Some(pending(delivery, record));
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                BrokerStats::add(&stats.enqueue_retries, 1);
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => {
                tracing::warn!(%device, error = %e, "could not enqueue a batch for Kafka; the device will resend it");
                BrokerStats::add(&stats.delivery_errors, 1);
                if let Kind::Readings {
                    first,
                    end,
                    tracked: true,
                    ..
                } = kind
                {
                    tracker.on_delivered(&device, first, end, false);
                }
                return None;
            }
        }
    }
}

/// Publishes `seq` retained on `ack/{device}`. A watermark of 0 (nothing
/// acknowledged) is not published: its encoding is empty, and an empty
/// retained publish would clear the topic instead.
async fn publish_ack(
    link_tx: &mut LinkTx,
    device: &str,
    seq: u64,
    stats: &BrokerStats,
) -> Result<(), BridgeError> {
    if seq == 0 {
        return Ok(());
    }
    let payload = Ack { committed_seq: seq }.encode_to_vec();
    let publish = Publish::new(
        bytes::Bytes::from(topics::ack(device)),
        bytes::Bytes::from(payload),
        true,
    );
    link_tx
        .send(Packet::Publish(publish, None))
        .await
        .map_err(|e| BridgeError::Link(e.to_string()))?;
    BrokerStats::add(&stats.acks_published, 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_proto::v1::{Reading, ReadingBatch};

    fn batch(device: &str, first_seq: u64, values: usize) -> Vec<u8> {
        ReadingBatch {
            device_id: device.into(),
            profile: "f32".into(),
            first_seq,
            channels: vec!["temp".into(), "hum".into()],
            readings: vec![Reading {
                ts_micros: 1_700_000_000_000_000,
                values: vec![1.0; values],
                true_label: String::new(),
                predictions: Vec::new(),
            }],
            loss: None,
        }
        .encode_to_vec()
    }

    #[test]
    fn an_invalid_batch_is_acknowledged_as_lost_and_a_forged_or_impossible_one_is_not() {
        let limits = BatchLimits::default();
        assert_eq!(
            judge_telemetry("d", &batch("d", 5, 2), &limits),
            Telemetry::Valid {
                first: 5,
                end: 6,
                readings: 1,
                profile: "f32".into(),
            }
        );
        // Three values for two channels: its seqs are taken (and recorded as
        // lost downstream), so the device does not resend it forever.
        assert!(matches!(
            judge_telemetry("d", &batch("d", 5, 3), &limits),
            Telemetry::Invalid {
                first: 5,
                end: 6,
                ..
            }
        ));
        // Another device's name, seq 2^64 - 1, garbage: nothing is taken.
        for (payload, why) in [
            (batch("other", 5, 2), "names device \"other\""),
            (batch("d", u64::MAX, 2), "largest seq"),
            (b"\xff\xff".to_vec(), "does not decode"),
        ] {
            match judge_telemetry("d", &payload, &limits) {
                Telemetry::Refused { reason } => assert!(reason.contains(why), "{reason}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_followed_ack_record_is_merged_but_never_written_back() {
        let stats = BrokerStats::default();
        let replica =
            crate::replicas::Replica::new("a".into(), None, Arc::new(BrokerStats::default()));
        let (mut tracker, mut log) = (AckTracker::default(), AckLog::default());
        // This replica acknowledged 10 and logged it.
        tracker.on_received("d", 0, 10);
        tracker.on_delivered("d", 0, 10, true);
        for (device, seq) in tracker.take_dirty() {
            log.offer(&device, seq);
        }
        assert_eq!(log.to_write(), vec![("d".to_string(), 10)]);
        log.on_written("d", 10, true);
        // Its own record comes back, then another replica's higher one,
        // then a stale lower one.
        for seq in [10, 25, 7] {
            on_followed("d", seq, &mut tracker, &mut log, &replica, &stats);
        }
        assert_eq!(tracker.watermark("d"), Some(25));
        assert_eq!(BrokerStats::get(&stats.acks_followed), 3);
        assert_eq!(BrokerStats::get(&stats.acks_merged), 1);
        // Not connected here: nothing to publish; and whatever is offered,
        // no record goes back to Kafka.
        assert!(tracker.take_dirty().is_empty());
        log.offer("d", 25);
        assert!(log.to_write().is_empty());
        assert!(!log.busy());
        // What this replica's own deliveries add past it is written.
        tracker.on_received("d", 25, 30);
        tracker.on_delivered("d", 25, 30, true);
        for (device, seq) in tracker.take_dirty() {
            log.offer(&device, seq);
        }
        assert_eq!(log.to_write(), vec![("d".to_string(), 30)]);
    }

    #[test]
    fn a_first_batch_at_the_last_u64_seq_never_moves_the_watermark() {
        // What made the bridge publish an ack of u64::MAX: the tracker took
        // the batch's end (saturated to u64::MAX) as its first watermark.
        let mut tracker = AckTracker::default();
        let judged = judge_telemetry("d", &batch("d", u64::MAX, 2), &BatchLimits::default());
        if let Telemetry::Valid { first, end, .. } | Telemetry::Invalid { first, end, .. } = judged
        {
            tracker.on_received("d", first, end);
        }
        assert_eq!(tracker.watermark("d"), None);
        assert!(tracker.take_dirty().is_empty());
    }
}
