//! Models: the compacted Kafka topic `edgeloop.models` (key `task/profile`,
//! value `ModelUpdate`) → retained MQTT `models/{task}/{profile}`, QoS 1.
//!
//! rumqttd keeps retained messages only in memory, so `edgeloop.models` is
//! their source of truth. At start-up the bridge reads it from the beginning
//! to its end before the MQTT listener opens ([`Models::catch_up`]), so a
//! device that connects finds every model retained; then it keeps following
//! the topic ([`Models::follow`]) and republishes each new record.
//!
//! - Only the highest `version` per (task, profile) is published: a record
//!   with a lower version than one already published is logged and counted
//!   (`edgeloop_bridge_models_stale_total`), not published. An equal version
//!   is published again (a record read twice).
//! - A record that does not decode as a `ModelUpdate`, or whose task or
//!   profile cannot be a topic level, is logged and counted
//!   (`edgeloop_bridge_records_undecodable_total`) and skipped.
//! - A tombstone (a key with no value: the model was withdrawn) clears the
//!   retained message (an empty retained publish, MQTT's way) and forgets the
//!   version.
//!
//! The publishes go through a rumqttd local link of their own, retained. A
//! local link can only publish QoS 0 in rumqttd 0.20 (`Publish`'s QoS field is
//! private to the crate), but rumqttd sets the QoS of every message it
//! forwards, retained ones included, to the subscription's: a device that
//! subscribes to `models/…` with QoS 1 receives the model with QoS 1 and the
//! retain flag (the end-to-end test checks both).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgeloop_kafka::KafkaConfig;
use edgeloop_proto::v1::ModelUpdate;
use edgeloop_proto::{topics, Message as _};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use tokio_util::sync::CancellationToken;

use super::compacted::{self, CatchUp};
use super::BridgeError;
use crate::stats::BrokerStats;

/// What to do with one record of `edgeloop.models`.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Publish `payload` retained on `topic`.
    Publish { topic: String, version: u64 },
    /// Clear the retained message of `topic` (a tombstone).
    Clear { topic: String },
    /// A lower version than the one published.
    Stale {
        topic: String,
        version: u64,
        published: u64,
    },
    /// Not a usable record; the reason is a sentence.
    Undecodable(String),
}

/// The highest version published per model topic, and the rules above.
#[derive(Debug, Default)]
pub struct Versions {
    published: HashMap<String, u64>,
}

impl Versions {
    pub fn decide(&mut self, key: Option<&[u8]>, payload: Option<&[u8]>) -> Decision {
        let Some(payload) = payload else {
            let Some((task, profile)) = key
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.split_once('/'))
                .filter(|(t, p)| topics::is_topic_level(t) && topics::is_topic_level(p))
            else {
                return Decision::Undecodable(format!(
                    "a tombstone whose key {:?} is not task/profile",
                    key.map(String::from_utf8_lossy)
                ));
            };
            let topic = topics::models(task, profile);
            self.published.remove(&topic);
            return Decision::Clear { topic };
        };
        let update = match ModelUpdate::decode(payload) {
            Ok(u) => u,
            Err(e) => return Decision::Undecodable(format!("not a ModelUpdate: {e}")),
        };
        if !topics::is_topic_level(&update.task) || !topics::is_topic_level(&update.profile) {
            return Decision::Undecodable(format!(
                "task {:?} / profile {:?} cannot name a topic (empty, or with '/', '+' or '#')",
                update.task, update.profile
            ));
        }
        let topic = topics::models(&update.task, &update.profile);
        match self.published.get(&topic) {
            Some(&published) if update.version < published => Decision::Stale {
                topic,
                version: update.version,
                published,
            },
            _ => {
                self.published.insert(topic.clone(), update.version);
                Decision::Publish {
                    topic,
                    version: update.version,
                }
            }
        }
    }
}

/// The follower of `edgeloop.models`.
pub struct Models {
    consumer: Arc<compacted::CompactedConsumer>,
    versions: Versions,
    link_tx: LinkTx,
    link_rx: LinkRx,
    stats: Arc<BrokerStats>,
}

impl Models {
    /// Assigns `edgeloop.models` from the beginning and publishes every model
    /// in it, up to the end it has now, within `timeout`.
    pub async fn catch_up(
        kafka: &KafkaConfig,
        timeout: Duration,
        link_tx: LinkTx,
        link_rx: LinkRx,
        stats: Arc<BrokerStats>,
    ) -> Result<Models, BridgeError> {
        let consumer = compacted::consumer(kafka, "edgeloop-bridge-models")?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut catch_up =
            compacted::assign_from_beginning(&consumer, topics::KAFKA_MODELS, timeout).await?;
        let mut models = Models {
            consumer,
            versions: Versions::default(),
            link_tx,
            link_rx,
            stats,
        };
        let consumer = models.consumer.clone();
        while !catch_up.done() {
            let received = tokio::time::timeout_at(deadline, consumer.recv())
                .await
                .map_err(|_| BridgeError::Restore {
                    topic: topics::KAFKA_MODELS,
                    reason: format!("not read to its end within {timeout:?}"),
                })?;
            if let Some(publish) = models.on_received(received, Some(&mut catch_up)) {
                models.publish(publish).await?;
            }
        }
        tracing::info!(
            models = models.versions.published.len(),
            "models restored from Kafka and retained"
        );
        Ok(models)
    }

    /// Keeps following `edgeloop.models` until `shutdown`.
    pub async fn follow(mut self, shutdown: CancellationToken) -> Result<(), BridgeError> {
        let consumer = self.consumer.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                received = consumer.recv() => {
                    if let Some(publish) = self.on_received(received, None) {
                        self.publish(publish).await?;
                    }
                }
                // Nothing is subscribed on this link; drained all the same.
                notification = self.link_rx.next() => {
                    notification.map_err(|e| BridgeError::Link(e.to_string()))?;
                }
            }
        }
    }

    /// Publishes `(topic, payload)` retained through the link (see the
    /// module docs for its QoS).
    async fn publish(&mut self, (topic, payload): (String, Vec<u8>)) -> Result<(), BridgeError> {
        let publish = Publish::new(bytes::Bytes::from(topic), bytes::Bytes::from(payload), true);
        self.link_tx
            .send(Packet::Publish(publish, None))
            .await
            .map_err(|e| BridgeError::Link(e.to_string()))?;
        Ok(())
    }

    fn on_received(
        &mut self,
        received: Result<BorrowedMessage<'_>, KafkaError>,
        catch_up: Option<&mut CatchUp>,
    ) -> Option<(String, Vec<u8>)> {
        let message = match received {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(partition)) => {
                if let Some(c) = catch_up {
                    c.on_end(partition);
                }
                return None;
            }
            // Transport errors: the consumer's context logs them, and
            // librdkafka reconnects by itself.
            Err(e) => {
                tracing::debug!(topic = topics::KAFKA_MODELS, error = %e, "reading models from Kafka");
                return None;
            }
        };
        let (partition, offset) = (message.partition(), message.offset());
        if let Some(c) = catch_up {
            c.on_record(partition, offset);
        }
        match self.versions.decide(message.key(), message.payload()) {
            Decision::Publish { topic, version } => {
                tracing::info!(%topic, version, partition, offset, "publishing model retained");
                BrokerStats::add(&self.stats.models_republished, 1);
                Some((topic, message.payload().unwrap_or_default().to_vec()))
            }
            Decision::Clear { topic } => {
                tracing::info!(%topic, partition, offset, "model withdrawn (tombstone): clearing the retained message");
                BrokerStats::add(&self.stats.models_cleared, 1);
                Some((topic, Vec::new()))
            }
            Decision::Stale {
                topic,
                version,
                published,
            } => {
                tracing::warn!(%topic, version, published, partition, offset, "ignoring a model older than the one published");
                BrokerStats::add(&self.stats.models_stale, 1);
                None
            }
            Decision::Undecodable(reason) => {
                tracing::warn!(topic = topics::KAFKA_MODELS, partition, offset, %reason, "skipping a model record");
                BrokerStats::add(&self.stats.records_undecodable, 1);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(task: &str, profile: &str, version: u64) -> Vec<u8> {
        ModelUpdate {
            task: task.into(),
            profile: profile.into(),
            version,
            artifact: vec![1, 2, 3].into(),
            ..ModelUpdate::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn only_the_highest_version_is_published() {
        let mut v = Versions::default();
        let key = Some(b"anomaly/int8".as_slice());
        assert_eq!(
            v.decide(key, Some(&update("anomaly", "int8", 3))),
            Decision::Publish {
                topic: "models/anomaly/int8".into(),
                version: 3
            }
        );
        assert_eq!(
            v.decide(key, Some(&update("anomaly", "int8", 2))),
            Decision::Stale {
                topic: "models/anomaly/int8".into(),
                version: 2,
                published: 3
            }
        );
        assert!(matches!(
            v.decide(key, Some(&update("anomaly", "int8", 3))),
            Decision::Publish { version: 3, .. }
        ));
        // Another profile is another model.
        assert!(matches!(
            v.decide(None, Some(&update("anomaly", "f32", 1))),
            Decision::Publish { version: 1, .. }
        ));
    }

    #[test]
    fn garbage_and_bad_names_are_undecodable_not_a_panic() {
        let mut v = Versions::default();
        assert!(matches!(
            v.decide(None, Some(b"\xff\xfe not protobuf")),
            Decision::Undecodable(_)
        ));
        assert!(matches!(
            v.decide(None, Some(&update("a/b", "int8", 1))),
            Decision::Undecodable(_)
        ));
        assert!(matches!(
            v.decide(None, Some(&update("", "int8", 1))),
            Decision::Undecodable(_)
        ));
        assert!(matches!(
            v.decide(Some(b"no-slash"), None),
            Decision::Undecodable(_)
        ));
    }

    #[test]
    fn a_tombstone_clears_and_forgets_the_version() {
        let mut v = Versions::default();
        v.decide(None, Some(&update("anomaly", "int8", 5)));
        assert_eq!(
            v.decide(Some(b"anomaly/int8"), None),
            Decision::Clear {
                topic: "models/anomaly/int8".into()
            }
        );
        assert!(matches!(
            v.decide(None, Some(&update("anomaly", "int8", 1))),
            Decision::Publish { version: 1, .. }
        ));
    }
}
