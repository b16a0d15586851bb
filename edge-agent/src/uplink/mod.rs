//! The uplink: spool → MQTT, and the ack watermark back.
//!
//! - Readings are read from the spool and published as one `ReadingBatch`
//!   per MQTT message, QoS 1, on `telemetry/{device}`: a batch goes out when
//!   `batch_size` readings are waiting or the oldest has waited `linger`
//!   (by default 0: each spool sync's readings go out as soon as they are on
//!   disk). A range the spool lost goes out as a loss report in its place.
//! - At most `max_unacked_readings` are outstanding beyond the watermark.
//! - The agent subscribes to its retained `ack/{device}`; each `Ack` frees the
//!   spool below `committed_seq`.
//! - After every (re)connect, and whenever the watermark has not moved for
//!   `resend_after` while readings are outstanding, sending restarts at the
//!   watermark: a broker crash or a lost message can only cause a re-send.
//! - Drain order after an outage: `in_order` sends the backlog first;
//!   `live_first` starts a second lane at the newest readings and gives the
//!   backlog `backlog_share` of the batches while both have something to send.
//! - A retained `status/{device}` (`DeviceStatus`) is published on connect,
//!   every `status_interval` and when losses change; the last will marks the
//!   device offline.
//! - Reconnects back off exponentially with jitter.
//!
//! The MQTT event loop runs in its own task; this loop never blocks on it
//! (publishes use `try_publish`), so acks are always read.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeloop_proto::v1::{Ack, DeviceStatus, LossReport, ReadingBatch};
use edgeloop_proto::{topics, Message};
use rand::Rng;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, DrainOrder};
use crate::models::ModelLink;
use crate::spool::{Chunk, SharedSpool, SpoolError};
use crate::stats::AgentStats;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("the MQTT event loop of {device} stopped unexpectedly")]
    EventLoopGone { device: String },
    #[error("invalid agent config: {0}")]
    Config(String),
}

#[derive(Debug)]
enum LinkEvent {
    Connected,
    Disconnected,
    Ack(u64),
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The device's status as it stands.
fn status(
    config: &AgentConfig,
    spool: &SharedSpool,
    online: bool,
    models: Option<&ModelLink>,
) -> DeviceStatus {
    let backlog = spool.with(|s| s.backlog());
    let (next_seq, acked_seq, _) = spool.positions();
    let now = now_micros();
    DeviceStatus {
        device_id: config.device_id.clone(),
        profile: config.profile.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        online,
        ts_micros: now,
        backlog_records: backlog.records,
        backlog_bytes: backlog.bytes,
        oldest_unacked_ms: backlog
            .oldest_ts_micros
            .map_or(0, |ts| (now - ts).max(0) as u64 / 1000),
        applied_model_versions: models
            .map(|m| m.models.applied_versions())
            .unwrap_or_default(),
        lost_readings: backlog.lost_readings,
        last_model_error: models.map(|m| m.models.last_error()).unwrap_or_default(),
        next_seq,
        acked_seq,
    }
}

/// The next batch from `from` on (at most `max` readings).
fn next_batch(
    spool: &SharedSpool,
    config: &AgentConfig,
    from: u64,
    max: usize,
) -> Result<Option<ReadingBatch>, SpoolError> {
    let device = &config.device_id;
    Ok(spool.with(|s| s.read(from, max))?.map(|chunk| match chunk {
        Chunk::Readings {
            first_seq,
            channels,
            readings,
        } => ReadingBatch {
            device_id: device.clone(),
            profile: config.profile.clone(),
            first_seq,
            channels,
            readings,
            loss: None,
        },
        Chunk::Lost(loss) => ReadingBatch {
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
    }))
}

/// The MQTT options of a connection to `server`, with `will` as the last
/// will on `status_topic`.
fn mqtt_options(
    config: &AgentConfig,
    (host, port): &(String, u16),
    status_topic: &str,
    will: Vec<u8>,
) -> MqttOptions {
    let mut options = MqttOptions::new(&config.device_id, host, *port);
    options
        .set_keep_alive(config.mqtt.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(config.mqtt.max_packet_bytes, config.mqtt.max_packet_bytes)
        .set_inflight(config.mqtt.max_inflight)
        .set_last_will(LastWill::new(status_topic, will, QoS::AtLeastOnce, true));
    if let (Some(user), Some(pass)) = (&config.mqtt.username, &config.mqtt.password) {
        options.set_credentials(user, pass);
    }
    options
}

/// Which lane the next batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Backlog,
    Live,
}

/// Runs the uplink until the source is done and everything is acknowledged,
/// or until `shutdown` plus the grace period.
pub async fn run(
    config: &AgentConfig,
    spool: Arc<SharedSpool>,
    shutdown: CancellationToken,
    source_done: CancellationToken,
    stats: Arc<AgentStats>,
    models: Option<mpsc::Sender<(String, Vec<u8>)>>,
    updater: Option<ModelLink>,
) -> Result<(), UplinkError> {
    let device = config.device_id.clone();
    let telemetry_topic = topics::telemetry(&device);
    let ack_topic = topics::ack(&device);
    let status_topic = topics::status(&device);
    let up = &config.uplink;

    let servers = config.mqtt.servers().map_err(UplinkError::Config)?;
    let will = status(config, &spool, false, updater.as_ref()).encode_to_vec();
    let options = mqtt_options(config, &servers[0], &status_topic, will.clone());
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut network = eventloop.network_options();
    network.set_connection_timeout(config.mqtt.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);

    let (event_tx, mut events) = mpsc::channel::<LinkEvent>(256);
    let stop_loop = CancellationToken::new();
    let loop_task = {
        let stop = stop_loop.clone();
        let ack_topic = ack_topic.clone();
        let (min, max) = (up.reconnect_min, up.reconnect_max);
        let device = device.clone();
        let models = models.clone();
        let updater = updater.clone();
        let (config, spool, status_topic) = (config.clone(), spool.clone(), status_topic.clone());
        let (servers, stats) = (servers.clone(), stats.clone());
        tokio::spawn(async move {
            let mut backoff = min;
            let (mut server, mut will) = (0usize, will);
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
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic.starts_with("models/") => {
                        if let Some(link) = updater.as_ref().filter(|l| l.wants(&p.topic)) {
                            if link
                                .deliveries
                                .try_send((p.topic.clone(), p.payload.clone()))
                                .is_err()
                            {
                                tracing::warn!(%device, topic = %p.topic, "model updater busy; the retained model comes again on reconnect");
                            }
                        }
                        if let Some(relay) = &models {
                            if relay
                                .try_send((p.topic.clone(), p.payload.to_vec()))
                                .is_err()
                            {
                                tracing::warn!(%device, topic = %p.topic, "model relay busy; the retained model comes again on reconnect");
                            }
                        }
                        None
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::debug!(%device, error = %e, "MQTT connection lost");
                        // The will set at start-up would report the models
                        // of then: renew it for the next connection.
                        if updater.is_some() {
                            will = status(&config, &spool, false, updater.as_ref()).encode_to_vec();
                            eventloop.mqtt_options.set_last_will(LastWill::new(
                                &status_topic,
                                will.clone(),
                                QoS::AtLeastOnce,
                                true,
                            ));
                        }
                        // With several brokers, the next connection goes to
                        // the next one.
                        if servers.len() > 1 {
                            server = (server + 1) % servers.len();
                            let (host, port) = &servers[server];
                            tracing::debug!(%device, %host, port, "trying the next broker");
                            eventloop.mqtt_options = mqtt_options(
                                &config,
                                &servers[server],
                                &status_topic,
                                will.clone(),
                            );
                            AgentStats::add(&stats.server_switches, 1);
                        }
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
    // The backlog lane (in order from the watermark) and, with live_first
    // after an outage, the live lane that started at the newest readings.
    let mut cursor = watermark;
    let mut live: Option<u64> = None;
    let (mut backlog_batches, mut live_batches) = (0u64, 0u64);
    let mut highest_sent = watermark;
    let mut last_progress = Instant::now();
    let mut pending_since: Option<Instant> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut status_due = Instant::now() + up.status_interval;
    let mut reported_lost = spool.with(|s| s.backlog().lost_readings);
    // Wakes for the linger, the status and the resend timer; new readings on
    // disk wake the loop themselves.
    let tick_every = if up.linger.is_zero() {
        Duration::from_millis(100)
    } else {
        (up.linger / 2).max(Duration::from_millis(5))
    };
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backlog_gauge = (0u64, 0u64, 0u64);
    let (mut uplink_gauge, mut connected_gauge) = (0u64, 0u64);
    let mut oldest_reported: Option<i64> = None;
    AgentStats::move_gauge(&stats.uplinks, &mut uplink_gauge, 1);
    // A model was applied or refused: the status goes out at once (and
    // stays wanted until it did).
    let mut status_wanted = false;

    let result = loop {
        let data = spool.data.notified();
        let models_changed = async {
            match &updater {
                Some(link) => link.models.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        let mut publish_status = false;
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
                    // A gateway relays every model topic (its own included);
                    // a device takes those of its profile.
                    let model_filter = if models.is_some() {
                        Some(topics::MODELS_FILTER.to_string())
                    } else {
                        updater.as_ref().map(ModelLink::filter)
                    };
                    if let Some(filter) = model_filter {
                        if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                            tracing::warn!(%device, error = %e, "could not subscribe to the model topics");
                        }
                    }
                    cursor = watermark;
                    let (_, _, durable) = spool.positions();
                    live = (up.drain_order == DrainOrder::LiveFirst
                        && durable.saturating_sub(watermark) > 2 * up.batch_size as u64)
                        .then_some(durable);
                    (backlog_batches, live_batches) = (0, 0);
                    last_progress = Instant::now();
                    publish_status = true;
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
            _ = models_changed => status_wanted = true,
            _ = tick.tick() => {}
            _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + config.shutdown_grace);
            }
        }

        let backlog = spool.with(|s| s.backlog());
        AgentStats::move_gauge(
            &stats.backlog_readings,
            &mut backlog_gauge.0,
            backlog.records,
        );
        AgentStats::move_gauge(&stats.backlog_bytes, &mut backlog_gauge.1, backlog.bytes);
        AgentStats::move_gauge(
            &stats.readings_lost,
            &mut backlog_gauge.2,
            backlog.lost_readings,
        );
        AgentStats::move_gauge(
            &stats.uplinks_connected,
            &mut connected_gauge,
            u64::from(connected),
        );
        if backlog.oldest_ts_micros != oldest_reported {
            oldest_reported = backlog.oldest_ts_micros;
            stats.set_oldest_unacked(&device, oldest_reported);
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
                "shutdown grace period over with readings unacknowledged; they stay in the spool"
            );
            break Ok(());
        }
        if !connected {
            continue;
        }
        if publish_status
            || status_wanted
            || Instant::now() >= status_due
            || backlog.lost_readings != reported_lost
        {
            let payload = status(config, &spool, true, updater.as_ref()).encode_to_vec();
            if client
                .try_publish(&status_topic, QoS::AtLeastOnce, true, payload)
                .is_ok()
            {
                status_due = Instant::now() + up.status_interval;
                reported_lost = backlog.lost_readings;
                status_wanted = false;
            }
        }
        if cursor > watermark && last_progress.elapsed() >= up.resend_after {
            tracing::info!(%device, from = watermark, "ack watermark stalled; sending again from it");
            cursor = watermark;
            live = None;
            last_progress = Instant::now();
        }
        loop {
            // The backlog lane ends where the live lane started.
            if live.is_some_and(|l| cursor >= l) {
                cursor = live.take().unwrap_or(cursor).max(cursor);
            }
            let backlog_end = live
                .unwrap_or(durable)
                .min(watermark + up.max_unacked_readings);
            let backlog_avail = backlog_end.saturating_sub(cursor);
            let live_avail = live.map_or(0, |l| {
                durable.min(l + up.max_unacked_readings).saturating_sub(l)
            });
            let lingered = (backlog_avail > 0 || live_avail > 0) && {
                let since = *pending_since.get_or_insert_with(Instant::now);
                since.elapsed() >= up.linger || done || drain_deadline.is_some()
            };
            let full = up.batch_size as u64;
            // A partial backlog batch goes when the backlog ends there (the
            // live lane starts), or, with no live lane, once it has lingered;
            // never because the in-flight window cut it short.
            let backlog_ready = backlog_avail >= full
                || (backlog_avail > 0
                    && match live {
                        Some(l) => backlog_end == l,
                        None => backlog_end == durable && lingered,
                    });
            let live_ready = live_avail >= full || (live_avail > 0 && lingered);
            let backlog_turn = (backlog_batches as f64)
                < up.backlog_share * (backlog_batches + live_batches + 1) as f64;
            let lane = match (backlog_ready, live_ready) {
                (true, true) if backlog_turn => Lane::Backlog,
                (_, true) => Lane::Live,
                (true, false) => Lane::Backlog,
                (false, false) => {
                    if backlog_avail == 0 && live_avail == 0 {
                        pending_since = None;
                    }
                    break;
                }
            };
            let from = match lane {
                Lane::Backlog => cursor,
                Lane::Live => live.unwrap_or(cursor),
            };
            let max = match lane {
                Lane::Backlog => backlog_avail.min(full) as usize,
                Lane::Live => up.batch_size,
            };
            let batch = match next_batch(&spool, config, from, max) {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(%device, error = %e, "could not read the spool");
                    break;
                }
            };
            let first_seq = batch.first_seq;
            let end = batch.end_seq();
            let is_loss = batch.loss.is_some();
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
            if is_loss {
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
            match lane {
                Lane::Backlog => {
                    cursor = end;
                    backlog_batches += 1;
                }
                Lane::Live => {
                    live = Some(end);
                    live_batches += 1;
                }
            }
            pending_since = None;
        }
    };

    AgentStats::move_gauge(&stats.backlog_readings, &mut backlog_gauge.0, 0);
    AgentStats::move_gauge(&stats.backlog_bytes, &mut backlog_gauge.1, 0);
    AgentStats::move_gauge(&stats.uplinks_connected, &mut connected_gauge, 0);
    stats.set_oldest_unacked(&device, None);
    AgentStats::move_gauge(&stats.uplinks, &mut uplink_gauge, 0);
    if connected {
        // A clean stop: say so in the retained status, then disconnect (no
        // last will on a clean DISCONNECT).
        let payload = status(config, &spool, false, updater.as_ref()).encode_to_vec();
        let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, payload);
        let _ = client.try_disconnect();
        // Give the event loop a moment to send them.
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
