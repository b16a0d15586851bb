//! The uplink: spool → MQTT, and the ack watermark back.
//!
//! - Readings are read from the spool from a send cursor and published as one
//!   `ReadingBatch` per MQTT message, QoS 1, on `telemetry/{device}`: a batch
//!   goes out when `batch_size` readings are waiting or the oldest has waited
//!   `linger`.
//! - At most `max_unacked_readings` are outstanding beyond the watermark.
//! - The agent subscribes to its retained `ack/{device}`; each `Ack` frees the
//!   spool below `committed_seq`.
//! - After every (re)connect, and whenever the watermark has not moved for
//!   `resend_after` while readings are outstanding, the cursor goes back to the
//!   watermark: a broker crash or a lost message can only cause a re-send.
//! - Reconnects back off exponentially with jitter.
//!
//! The MQTT event loop runs in its own task; this loop never blocks on it
//! (publishes use `try_publish`), so acks are always read.

use std::sync::Arc;
use std::time::Duration;

use edgeloop_proto::v1::{Ack, LossReport, ReadingBatch};
use edgeloop_proto::{topics, Message};
use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::spool::{Chunk, SharedSpool};
use crate::stats::AgentStats;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("the MQTT event loop of {device} stopped unexpectedly")]
    EventLoopGone { device: String },
}

#[derive(Debug)]
enum LinkEvent {
    Connected,
    Disconnected,
    Ack(u64),
}

/// Runs the uplink until the source is done and everything is acknowledged,
/// or until `shutdown` plus the grace period.
pub async fn run(
    config: &AgentConfig,
    spool: Arc<SharedSpool>,
    shutdown: CancellationToken,
    source_done: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<(), UplinkError> {
    let device = config.device_id.clone();
    let telemetry_topic = topics::telemetry(&device);
    let ack_topic = topics::ack(&device);
    let up = &config.uplink;

    let mut options = MqttOptions::new(&device, &config.mqtt.host, config.mqtt.port);
    options
        .set_keep_alive(config.mqtt.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(config.mqtt.max_packet_bytes, config.mqtt.max_packet_bytes)
        .set_inflight(config.mqtt.max_inflight);
    if let (Some(user), Some(pass)) = (&config.mqtt.username, &config.mqtt.password) {
        options.set_credentials(user, pass);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);

    let (event_tx, mut events) = mpsc::channel::<LinkEvent>(256);
    let stop_loop = CancellationToken::new();
    let loop_task = {
        let stop = stop_loop.clone();
        let ack_topic = ack_topic.clone();
        let (min, max) = (up.reconnect_min, up.reconnect_max);
        let device = device.clone();
        tokio::spawn(async move {
            let mut backoff = min;
            loop {
                let polled = tokio::select! {
                    _ = stop.cancelled() => break,
                    polled = eventloop.poll() => polled,
                };
                let event = match polled {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = min;
                        Some(LinkEvent::Connected)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                        match Ack::decode(p.payload.as_ref()) {
                            Ok(ack) => Some(LinkEvent::Ack(ack.committed_seq)),
                            Err(e) => {
                                tracing::warn!(%device, error = %e, "ignoring an ack that does not decode");
                                None
                            }
                        }
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::debug!(%device, error = %e, "MQTT connection lost");
                        if event_tx.send(LinkEvent::Disconnected).await.is_err() {
                            break;
                        }
                        let jitter = rand::thread_rng().gen_range(0.5..1.5);
                        let wait = backoff.mul_f64(jitter);
                        backoff = (backoff * 2).min(max);
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        None
                    }
                };
                if let Some(event) = event {
                    if event_tx.send(event).await.is_err() {
                        break;
                    }
                }
            }
        })
    };

    let mut connected = false;
    let mut ever_connected = false;
    let (_, mut watermark, _) = spool.positions();
    let mut cursor = watermark;
    let mut highest_sent = watermark;
    let mut last_progress = Instant::now();
    let mut pending_since: Option<Instant> = None;
    let mut drain_deadline: Option<Instant> = None;
    let tick_every = (up.linger / 2).max(Duration::from_millis(5));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let result = loop {
        let data = spool.data.notified();
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Some(LinkEvent::Connected) => {
                    if ever_connected {
                        AgentStats::add(&stats.reconnects, 1);
                    }
                    connected = true;
                    ever_connected = true;
                    // The subscription is re-made on every connect (clean
                    // session); the retained ack arrives right after it.
                    if let Err(e) = client.try_subscribe(&ack_topic, QoS::AtLeastOnce) {
                        tracing::warn!(%device, error = %e, "could not subscribe to the ack topic");
                    }
                    cursor = watermark;
                    last_progress = Instant::now();
                }
                Some(LinkEvent::Disconnected) => connected = false,
                Some(LinkEvent::Ack(n)) => {
                    if n > watermark {
                        let (_, _, durable) = spool.positions();
                        let n = n.min(durable);
                        AgentStats::add(&stats.readings_acknowledged, n - watermark);
                        watermark = n;
                        if let Err(e) = spool.acknowledge(n) {
                            tracing::error!(%device, error = %e, "could not free acknowledged readings");
                        }
                        cursor = cursor.max(watermark);
                        last_progress = Instant::now();
                    }
                }
                None => break Err(UplinkError::EventLoopGone { device: device.clone() }),
            },
            _ = data => {}
            _ = tick.tick() => {}
            _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + config.shutdown_grace);
            }
        }

        let (next_seq, _, durable) = spool.positions();
        let done = source_done.is_cancelled();
        if done && watermark >= next_seq {
            break Ok(());
        }
        if drain_deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                %device,
                unacknowledged = next_seq - watermark,
                "shutdown grace period over with readings unacknowledged"
            );
            break Ok(());
        }
        if !connected {
            continue;
        }
        if cursor > watermark && last_progress.elapsed() >= up.resend_after {
            tracing::info!(%device, from = watermark, "ack watermark stalled; sending again from it");
            cursor = watermark;
            last_progress = Instant::now();
        }
        // Publish whole batches, then a partial one once it has lingered.
        loop {
            let limit = durable.min(watermark + up.max_unacked_readings);
            let available = limit.saturating_sub(cursor);
            if available == 0 {
                pending_since = None;
                break;
            }
            if available < up.batch_size as u64 {
                let since = *pending_since.get_or_insert_with(Instant::now);
                let flush = since.elapsed() >= up.linger || done || drain_deadline.is_some();
                if !flush || limit < durable {
                    break;
                }
            }
            let batch = match spool.with(|s| s.read(cursor, up.batch_size)) {
                Ok(Some(Chunk::Readings {
                    first_seq,
                    channels,
                    readings,
                })) => ReadingBatch {
                    device_id: device.clone(),
                    profile: config.profile.clone(),
                    first_seq,
                    channels,
                    readings,
                    loss: None,
                },
                Ok(Some(Chunk::Lost(loss))) => ReadingBatch {
                    device_id: device.clone(),
                    profile: config.profile.clone(),
                    first_seq: loss.first_seq,
                    channels: Vec::new(),
                    readings: Vec::new(),
                    loss: Some(LossReport {
                        device_id: device.clone(),
                        first_seq: loss.first_seq,
                        end_seq: loss.end_seq,
                        reason: loss.reason,
                        detected_at_micros: loss.detected_at_micros,
                    }),
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(%device, error = %e, "could not read the spool");
                    break;
                }
            };
            let first_seq = batch.first_seq;
            let end = batch.end_seq();
            let batch_is_loss = batch.loss.is_some();
            if client
                .try_publish(
                    &telemetry_topic,
                    QoS::AtLeastOnce,
                    false,
                    batch.encode_to_vec(),
                )
                .is_err()
            {
                // The request queue is full: the event loop is busy or
                // reconnecting. Try again on the next wake-up.
                break;
            }
            AgentStats::add(&stats.batches_published, 1);
            if batch_is_loss {
                AgentStats::add(&stats.loss_reports_sent, 1);
            }
            if end > highest_sent {
                AgentStats::add(&stats.readings_published, end - highest_sent.max(first_seq));
                AgentStats::add(
                    &stats.readings_resent,
                    highest_sent.saturating_sub(first_seq),
                );
                highest_sent = end;
            } else {
                AgentStats::add(&stats.readings_resent, end - first_seq);
            }
            cursor = end;
            pending_since = None;
        }
    };

    if connected {
        let _ = client.try_disconnect();
        // Give the event loop a moment to send the DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Some(event) = events.recv().await {
                if matches!(event, LinkEvent::Disconnected) {
                    break;
                }
            }
        })
        .await;
    }
    stop_loop.cancel();
    let _ = loop_task.await;
    result
}
