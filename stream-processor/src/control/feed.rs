//! Follows the compacted topics `edgeloop.status` (key device id,
//! `DeviceStatus`), `edgeloop.models` (key `task/profile`, `ModelUpdate`)
//! and `edgeloop.pins` (key `task/profile`, JSON [`Pin`]) from their
//! beginning, for the control API.
//!
//! Each follower assigns itself every partition (no consumer group, no
//! commits: a restart reads the topic again, which for a compacted topic is
//! the table it holds) and keeps going after it reached the end the topic
//! had at the start (then its [`FeedHealth::caught_up`] turns true). A
//! record that does not decode is logged and skipped; it never stops the
//! follower. A status record is filed under its key, the device whose topic
//! it came on, and only if [`validate::check_status`] passes: one naming
//! another device, or with a time or seq out of range, is refused and
//! counted (`edgeloop_processor_statuses_refused_total`). If Kafka cannot be reached the follower retries every few
//! seconds and reports the error in its health.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeloop_proto::v1::{DeviceStatus, ModelUpdate};
use edgeloop_proto::{topics, validate, Message as _};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message as _};
use tokio_util::sync::CancellationToken;

use super::registry::Pin;
use super::{lock, ControlError, FeedHealth, State};
use crate::stats::ProcessorStats;

/// Ignores end-of-partition events (expected: they mark "caught up").
pub struct FeedContext;

impl ClientContext for FeedContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        tracing::warn!(%error, %reason, "librdkafka (control API feed)");
    }
}

impl ConsumerContext for FeedContext {}

type Feed = StreamConsumer<FeedContext>;

/// Which topic, and what to do with each record.
#[derive(Clone, Copy)]
enum Kind {
    Status,
    Models,
    Pins,
}

impl Kind {
    fn topic(self) -> &'static str {
        match self {
            Kind::Status => topics::KAFKA_STATUS,
            Kind::Models => topics::KAFKA_MODELS,
            Kind::Pins => topics::KAFKA_PINS,
        }
    }

    fn health(self, state: &State) -> &Mutex<FeedHealth> {
        match self {
            Kind::Status => &state.status_feed,
            Kind::Models => &state.models_feed,
            Kind::Pins => &state.pins_feed,
        }
    }
}

/// Starts the followers.
pub fn spawn(state: Arc<State>, shutdown: CancellationToken) -> Result<(), ControlError> {
    for kind in [Kind::Status, Kind::Models, Kind::Pins] {
        let consumer: Feed = state
            .kafka
            .client_config(&[
                ("group.id", "edgeloop-control"),
                ("client.id", "edgeloop-control"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("enable.partition.eof", "true"),
                ("auto.offset.reset", "earliest"),
            ])
            .create_with_context(FeedContext)
            .map_err(|e| ControlError::Kafka(e.to_string()))?;
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move { follow(kind, Arc::new(consumer), &state, &shutdown).await });
    }
    Ok(())
}

/// Assigns every partition from its beginning; returns partition → the end
/// it has now (only partitions with records).
/// Its wait for leaders ends (within one request) once `shutdown` is cancelled.
async fn assign(
    consumer: &Arc<Feed>,
    topic: &'static str,
    shutdown: &CancellationToken,
) -> Result<HashMap<i32, i64>, String> {
    let c = consumer.clone();
    let shutdown = shutdown.clone();
    tokio::task::spawn_blocking(move || -> Result<HashMap<i32, i64>, KafkaError> {
        let stop = || shutdown.is_cancelled();
        let (assignment, ends) =
            edgeloop_kafka::topic_ends_until(&*c, topic, Duration::from_secs(5), &stop)?;
        c.assign(&assignment)?;
        Ok(ends)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("assigning {topic}: {e}"))
}

async fn follow(kind: Kind, consumer: Arc<Feed>, state: &State, shutdown: &CancellationToken) {
    let topic = kind.topic();
    // The broker creates the status and models topics, but the processor
    // may start first; the pins topic is the control API's own.
    let created = edgeloop_kafka::ensure_compacted_topics(
        &state.kafka,
        &[
            topics::KAFKA_STATUS,
            topics::KAFKA_MODELS,
            topics::KAFKA_PINS,
        ],
    );
    // Cancel-safe: dropped on a shutdown, it stops retrying.
    let created = tokio::select! {
        biased;
        () = shutdown.cancelled() => return,
        created = created => created,
    };
    if let Err(e) = created {
        tracing::warn!(topic, error = %e, "could not create the topic; following it all the same");
    }
    let mut remaining = loop {
        match assign(&consumer, topic, shutdown).await {
            Ok(ends) => break ends,
            Err(_) if shutdown.is_cancelled() => return,
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot follow the topic yet; retrying");
                lock(kind.health(state)).error = Some(e);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    {
        let mut h = lock(kind.health(state));
        h.error = None;
        h.caught_up = remaining.is_empty();
    }
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = consumer.recv() => m,
        };
        match received {
            Ok(message) => {
                let (partition, offset) = (message.partition(), message.offset());
                apply(kind, state, &message);
                if let Kind::Models = kind {
                    lock(&state.models_read).insert(partition, offset + 1);
                }
                if remaining
                    .get(&partition)
                    .is_some_and(|end| offset + 1 >= *end)
                {
                    remaining.remove(&partition);
                }
                let mut h = lock(kind.health(state));
                h.records += 1;
                h.error = None;
                h.caught_up |= remaining.is_empty();
            }
            Err(KafkaError::PartitionEOF(partition)) => {
                remaining.remove(&partition);
                lock(kind.health(state)).caught_up |= remaining.is_empty();
            }
            Err(e) => {
                tracing::debug!(topic, error = %e, "reading a control API feed");
                lock(kind.health(state)).error = Some(e.to_string());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

fn apply(kind: Kind, state: &State, message: &BorrowedMessage<'_>) {
    let key = message.key().map(String::from_utf8_lossy);
    let (partition, offset) = (message.partition(), message.offset());
    match (kind, message.payload()) {
        (Kind::Status, None) => {
            // A tombstone: the device was removed from the table.
            if let Some(key) = key {
                lock(&state.statuses).remove(key.as_ref());
            }
        }
        (Kind::Status, Some(payload)) => {
            let key = key.as_deref().unwrap_or_default();
            if let Err(reason) = file_status_record(&state.statuses, &state.stats, key, payload) {
                tracing::warn!(partition, offset, key, %reason, "a status record refused");
            }
        }
        (Kind::Models, None) => {
            if let Some((task, profile)) = key.as_deref().and_then(|k| k.split_once('/')) {
                lock(&state.registry).withdraw(task, profile);
            }
        }
        (Kind::Models, Some(payload)) => match ModelUpdate::decode(payload) {
            Ok(update) => lock(&state.registry).insert(update, partition, offset),
            Err(e) => {
                tracing::warn!(partition, offset, error = %e, "a model record that is not a ModelUpdate; skipped")
            }
        },
        (Kind::Pins, None) => {
            if let Some((task, profile)) = key.as_deref().and_then(|k| k.split_once('/')) {
                lock(&state.registry)
                    .pins
                    .remove(&(task.to_string(), profile.to_string()));
            }
        }
        (Kind::Pins, Some(payload)) => match serde_json::from_slice::<Pin>(payload) {
            Ok(pin) => {
                lock(&state.registry)
                    .pins
                    .insert((pin.task, pin.profile), pin.version);
            }
            Err(e) => {
                tracing::warn!(partition, offset, error = %e, "a pin record that is not a pin; skipped")
            }
        },
    }
}

/// Files the status record of key `key` (the device whose `status/` topic it
/// came on, as the bridge keys it) as that device's newest report, unless an
/// older one. The key is the identity: a status naming another device, or
/// with a time or seq out of range, is refused (and counted), never filed
/// under the device it names.
fn file_status_record(
    statuses: &Mutex<BTreeMap<String, DeviceStatus>>,
    stats: &ProcessorStats,
    key: &str,
    payload: &[u8],
) -> Result<(), validate::InvalidStatus> {
    let status = validate::decode_status(key, payload).inspect_err(|_| {
        ProcessorStats::add(&stats.statuses_refused, 1);
    })?;
    let mut statuses = lock(statuses);
    // Keep the newest report: a record read out of order (or the last will
    // published after a newer report) does not turn back the clock, but the
    // online flag of a last will at the same time does apply.
    let newer = statuses
        .get(&status.device_id)
        .is_none_or(|old| status.ts_micros >= old.ts_micros || !status.online);
    if newer {
        statuses.insert(status.device_id.clone(), status);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn status(device: &str, agent: &str, ts_micros: i64) -> Vec<u8> {
        DeviceStatus {
            device_id: device.into(),
            agent_version: agent.into(),
            online: true,
            ts_micros,
            ..DeviceStatus::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn a_status_from_one_device_naming_another_is_refused_and_counted_not_filed() {
        let statuses = Mutex::new(BTreeMap::new());
        let stats = ProcessorStats::default();
        let now = 1_700_000_000_000_000;
        file_status_record(&statuses, &stats, "b", &status("b", "b's own", now))
            .expect("b's own status is filed");
        // Published on status/a, so keyed a, but naming b, and newer.
        let forged = file_status_record(&statuses, &stats, "a", &status("b", "forged", now + 1));
        assert!(
            matches!(forged, Err(validate::InvalidStatus::DeviceMismatch { .. })),
            "{forged:?}"
        );
        // A status from year 292,277 would pin b's record for good.
        assert!(file_status_record(&statuses, &stats, "b", &status("b", "far", i64::MAX)).is_err());
        assert!(file_status_record(&statuses, &stats, "b", b"\xff\xff").is_err());
        let statuses = lock(&statuses);
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        assert_eq!(statuses["b"].agent_version, "b's own");
        assert_eq!(stats.statuses_refused.load(Ordering::Relaxed), 3);
    }
}
