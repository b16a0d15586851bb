//! The production model publisher: signed `ModelUpdate`s on the compacted
//! Kafka topic `edgeloop.models` (key `task/profile`), which the broker's
//! bridge turns into the retained MQTT message `models/{task}/{profile}`.
//!
//! Kafka is the source of truth for versions, not this process: the control
//! API's rollback and pin (`edgeloop ctl models …`, possibly in another
//! processor) also write `edgeloop.models` and `edgeloop.pins`. So the
//! publisher follows both topics from their beginning, on two threads
//! (`models-follow`, `pins-follow`), into a shared table:
//!
//! - per (task, profile), the highest version seen, and the decoded artifacts
//!   of the most recent [`CACHED_VERSIONS`] versions whose signature verifies
//!   with the publisher's own key (for [`Publisher::live`] and for the parity
//!   check of devices' predictions);
//! - per (task, profile), the pinned version, if any.
//!
//! [`KafkaPublisher::start`] waits (at most the given time) until both
//! topics are caught up: every partition read up to the end it had at the
//! start. If the wait ends first, the publisher starts all the same, with a warning; the
//! followers keep reading.
//!
//! [`Publisher::publish`] first brings the table up to the topics' current
//! ends (bounded), then, unless the (task, profile) is pinned
//! ([`PublishError::Pinned`]), publishes version `highest known + 1`, signed
//! ([`signing::sign_update`]), produced with `acks=all`, and waits for Kafka
//! to take it. `live()` is the highest version and its artifact: after a
//! rollback, the rolled-back artifact, which is what devices run. Every
//! version published is also written to the optional [`DirPublisher`]
//! mirror (`DIR/models/{task}/{profile}/v{N}.bin/.json`) for humans and
//! `edgeloop report`; a failed mirror write is logged, not fatal.
//!
//! Two publishers of the same (task, profile) (two processor replicas with
//! training on) could still pick the same version between reading the topic
//! and producing: run one trainer per (task, profile).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgeloop_kafka::KafkaConfig;
use edgeloop_proto::model::Artifact;
use edgeloop_proto::signing::{self, SigningKey, VerifyingKey};
use edgeloop_proto::v1::ModelUpdate;
use edgeloop_proto::{topics, Message as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::Message as _;

use super::publish::{DirPublisher, PublishError, Publisher};
use crate::control::feed::FeedContext;
use crate::control::registry::Pin;

/// Decoded artifacts kept per (task, profile): the most recent versions.
pub const CACHED_VERSIONS: usize = 32;
/// Longest wait, before a publication, for the table to reach the topics'
/// current ends.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long Kafka may take to acknowledge a model (`message.timeout.ms`).
const DELIVERY_TIMEOUT_MS: &str = "30000";

/// What the followers know.
#[derive(Debug, Default)]
struct Known {
    lanes: HashMap<(String, String), Lane>,
    pins: HashMap<(String, String), u64>,
    /// (topic, partition) → the next offset to read.
    next: HashMap<(&'static str, i32), i64>,
    /// Topics read up to the end they had when following started.
    caught_up: HashMap<&'static str, bool>,
}

#[derive(Debug, Default)]
struct Lane {
    /// The highest version seen, whether or not its artifact is kept.
    highest: u64,
    /// version → artifact (verified; the most recent [`CACHED_VERSIONS`]).
    artifacts: BTreeMap<u64, Arc<Artifact>>,
}

/// Sets its flag when dropped: tells the blocking start-up that the future
/// waiting for it is gone.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn lock(known: &Mutex<Known>) -> std::sync::MutexGuard<'_, Known> {
    known.lock().unwrap_or_else(|p| p.into_inner())
}

/// Publishes to `edgeloop.models` (see the module docs).
pub struct KafkaPublisher {
    producer: FutureProducer,
    key: SigningKey,
    known: Arc<Mutex<Known>>,
    stop: Arc<AtomicBool>,
    followers: Vec<JoinHandle<()>>,
    mirror: Option<DirPublisher>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("mirror", &self.mirror)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// Creates the topics if needed, starts following them and waits (at
    /// most `catch_up`) until they are caught up.
    ///
    /// Cancel-safe: dropped (a shutdown during start-up), it stops waiting
    /// at once, and the publisher it was building stops its followers.
    pub async fn start(
        kafka: &KafkaConfig,
        key: SigningKey,
        mirror: Option<DirPublisher>,
        catch_up: Duration,
    ) -> Result<KafkaPublisher, PublishError> {
        edgeloop_kafka::ensure_compacted_topics(kafka, &[topics::KAFKA_MODELS, topics::KAFKA_PINS])
            .await
            .map_err(|e| PublishError::Kafka(e.to_string()))?;
        let kafka = kafka.clone();
        let abandoned = AbandonOnDrop(Arc::new(AtomicBool::new(false)));
        let gone = abandoned.0.clone();
        let connected = tokio::task::spawn_blocking(move || {
            Self::connect_until(&kafka, key, mirror, catch_up, &gone)
        })
        .await;
        drop(abandoned);
        connected.map_err(|e| PublishError::Kafka(e.to_string()))?
    }

    /// [`KafkaPublisher::start`] without creating the topics; blocking.
    pub fn connect(
        kafka: &KafkaConfig,
        key: SigningKey,
        mirror: Option<DirPublisher>,
        catch_up: Duration,
    ) -> Result<KafkaPublisher, PublishError> {
        Self::connect_until(kafka, key, mirror, catch_up, &AtomicBool::new(false))
    }

    /// [`KafkaPublisher::connect`], whose wait for the followers to catch up
    /// ends early once `abandoned` is set.
    fn connect_until(
        kafka: &KafkaConfig,
        key: SigningKey,
        mirror: Option<DirPublisher>,
        catch_up: Duration,
        abandoned: &AtomicBool,
    ) -> Result<KafkaPublisher, PublishError> {
        let producer: FutureProducer = kafka
            .client_config(&[
                ("acks", "all"),
                ("enable.idempotence", "false"),
                ("client.id", "edgeloop-trainer"),
                ("message.timeout.ms", DELIVERY_TIMEOUT_MS),
            ])
            .create()
            .map_err(|e| PublishError::Kafka(format!("creating the producer: {e}")))?;
        let known = Arc::new(Mutex::new(Known::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let verify = key.verifying_key();
        let mut followers = Vec::new();
        for topic in [topics::KAFKA_MODELS, topics::KAFKA_PINS] {
            let consumer = follower(kafka, topic)?;
            let (known, stop) = (known.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("{}-follow", topic.trim_start_matches("edgeloop.")))
                .spawn(move || follow(topic, consumer, &known, &stop, &verify))
                .map_err(|e| PublishError::Kafka(format!("starting a follower thread: {e}")))?;
            followers.push(thread);
        }
        let publisher = KafkaPublisher {
            producer,
            key,
            known,
            stop,
            followers,
            mirror,
        };
        let deadline = Instant::now() + catch_up;
        loop {
            if publisher.caught_up() {
                tracing::info!(
                    lanes = lock(&publisher.known).lanes.len(),
                    "the model publisher read edgeloop.models and edgeloop.pins"
                );
                break;
            }
            if abandoned.load(Ordering::Relaxed) {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    ?catch_up,
                    "edgeloop.models and edgeloop.pins not caught up in time; publishing from what was read, and following on"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(publisher)
    }

    /// Whether both topics were read to the ends they had when following
    /// started.
    pub fn caught_up(&self) -> bool {
        let k = lock(&self.known);
        [topics::KAFKA_MODELS, topics::KAFKA_PINS]
            .iter()
            .all(|t| k.caught_up.get(t).copied().unwrap_or(false))
    }

    /// The pinned version of (task, profile), if pinned.
    pub fn pinned(&self, task: &str, profile: &str) -> Option<u64> {
        lock(&self.known)
            .pins
            .get(&(task.to_string(), profile.to_string()))
            .copied()
    }

    /// The highest version of (task, profile) seen on `edgeloop.models`.
    pub fn highest(&self, task: &str, profile: &str) -> Option<u64> {
        lock(&self.known)
            .lanes
            .get(&(task.to_string(), profile.to_string()))
            .map(|l| l.highest)
            .filter(|v| *v > 0)
    }

    /// Waits (at most [`SYNC_TIMEOUT`]) until the followers have read up to
    /// the topics' ends as Kafka reports them now. Best effort: on a timeout or error, what is known is used.
    fn sync(&self) {
        let client = self.producer.client();
        let timeout = Duration::from_secs(2);
        let mut ends: Vec<((&'static str, i32), i64)> = Vec::new();
        for topic in [topics::KAFKA_MODELS, topics::KAFKA_PINS] {
            let metadata = match client.fetch_metadata(Some(topic), timeout) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "cannot read the topic's ends before publishing");
                    return;
                }
            };
            for t in metadata.topics() {
                for p in t.partitions() {
                    match client.fetch_watermarks(topic, p.id(), timeout) {
                        Ok((low, high)) if high > low => ends.push(((topic, p.id()), high)),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(topic, partition = p.id(), error = %e, "cannot read the partition's end before publishing");
                            return;
                        }
                    }
                }
            }
        }
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while Instant::now() < deadline {
            {
                let k = lock(&self.known);
                let reached = ends
                    .iter()
                    .all(|(tp, high)| k.next.get(tp).is_some_and(|n| n >= high));
                if reached {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(
            "the model publisher did not reach the ends of edgeloop.models and edgeloop.pins in {SYNC_TIMEOUT:?}; publishing from what it read"
        );
    }
}

impl Drop for KafkaPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for f in self.followers.drain(..) {
            let _ = f.join();
        }
    }
}

fn follower(
    kafka: &KafkaConfig,
    topic: &'static str,
) -> Result<BaseConsumer<FeedContext>, PublishError> {
    let consumer: BaseConsumer<FeedContext> = kafka
        .client_config(&[
            ("group.id", "edgeloop-trainer"),
            ("client.id", "edgeloop-trainer"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
            ("fetch.wait.max.ms", "100"),
        ])
        .create_with_context(FeedContext)
        .map_err(|e| PublishError::Kafka(format!("creating the {topic} consumer: {e}")))?;
    Ok(consumer)
}

/// Assigns every partition of `topic` from the beginning; returns
/// partition → its end now (partitions with records only).
fn assign(
    consumer: &BaseConsumer<FeedContext>,
    topic: &'static str,
    stop: &AtomicBool,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let stopped = || stop.load(Ordering::Relaxed);
    let (assignment, ends) =
        edgeloop_kafka::topic_ends_until(consumer, topic, Duration::from_secs(5), &stopped)?;
    consumer.assign(&assignment)?;
    Ok(ends)
}

/// A follower thread: reads `topic` into `known` until `stop`.
fn follow(
    topic: &'static str,
    consumer: BaseConsumer<FeedContext>,
    known: &Mutex<Known>,
    stop: &AtomicBool,
    verify: &VerifyingKey,
) {
    let mut remaining = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match assign(&consumer, topic, stop) {
            Ok(ends) => break ends,
            Err(_) if stop.load(Ordering::Relaxed) => return,
            Err(e) => {
                tracing::warn!(topic, error = %e, "the model publisher cannot follow the topic yet; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    lock(known).caught_up.insert(topic, remaining.is_empty());
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let (partition, offset) = (message.partition(), message.offset());
                let mut k = lock(known);
                apply(topic, &mut k, &message, verify);
                k.next.insert((topic, partition), offset + 1);
                if remaining
                    .get(&partition)
                    .is_some_and(|end| offset + 1 >= *end)
                {
                    remaining.remove(&partition);
                }
                if remaining.is_empty() {
                    k.caught_up.insert(topic, true);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                remaining.remove(&partition);
                if remaining.is_empty() {
                    lock(known).caught_up.insert(topic, true);
                }
            }
            Some(Err(e)) => {
                tracing::debug!(topic, error = %e, "the model publisher reading its topic");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn apply(topic: &'static str, k: &mut Known, message: &BorrowedMessage<'_>, verify: &VerifyingKey) {
    let key = message.key().map(String::from_utf8_lossy);
    let lane_key = key
        .as_deref()
        .and_then(|k| k.split_once('/'))
        .map(|(t, p)| (t.to_string(), p.to_string()));
    let (partition, offset) = (message.partition(), message.offset());
    match (topic, message.payload()) {
        (topics::KAFKA_PINS, None) => {
            if let Some(lane) = lane_key {
                k.pins.remove(&lane);
            }
        }
        (topics::KAFKA_PINS, Some(payload)) => match serde_json::from_slice::<Pin>(payload) {
            Ok(pin) => {
                k.pins.insert((pin.task, pin.profile), pin.version);
            }
            Err(e) => {
                tracing::warn!(partition, offset, error = %e, "a pin record that is not a pin; skipped")
            }
        },
        (_, None) => {
            // A tombstone: the model of (task, profile) was withdrawn. Its
            // highest version stays known: devices refuse lower versions.
            if let Some(lane) = lane_key.and_then(|l| k.lanes.get_mut(&l)) {
                lane.artifacts.clear();
            }
        }
        (_, Some(payload)) => match ModelUpdate::decode(payload) {
            Ok(update) => remember(k, &update, verify, partition, offset),
            Err(e) => {
                tracing::warn!(partition, offset, error = %e, "a model record that is not a ModelUpdate; skipped")
            }
        },
    }
}

/// Takes a `ModelUpdate` read (or published) into the table.
fn remember(
    k: &mut Known,
    update: &ModelUpdate,
    verify: &VerifyingKey,
    partition: i32,
    offset: i64,
) {
    let lane = k
        .lanes
        .entry((update.task.clone(), update.profile.clone()))
        .or_default();
    lane.highest = lane.highest.max(update.version);
    if let Err(e) = signing::verify_update(update, verify) {
        tracing::warn!(task = %update.task, profile = %update.profile, version = update.version, partition, offset, error = %e,
            "a model in edgeloop.models does not verify with the trainer's key (control.signing_key_file and trainer.signing_key_file should be the same key); devices will refuse it; versions continue above it");
        return;
    }
    match Artifact::decode(&update.artifact) {
        Ok(a) => {
            lane.artifacts.insert(update.version, Arc::new(a));
            while lane.artifacts.len() > CACHED_VERSIONS {
                lane.artifacts.pop_first();
            }
        }
        Err(e) => {
            tracing::warn!(task = %update.task, profile = %update.profile, version = update.version, error = %e, "a model in edgeloop.models whose artifact does not decode")
        }
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Publisher for KafkaPublisher {
    fn live(&self, task: &str, profile: &str) -> Result<Option<(u64, Artifact)>, PublishError> {
        let k = lock(&self.known);
        let Some(lane) = k.lanes.get(&(task.to_string(), profile.to_string())) else {
            return Ok(None);
        };
        // The highest version, if its artifact is known (verified and
        // decoded); otherwise devices run none the trainer can compare with.
        Ok(lane
            .artifacts
            .get(&lane.highest)
            .map(|a| (lane.highest, Artifact::clone(a))))
    }

    fn publish(
        &mut self,
        task: &str,
        profile: &str,
        artifact: &Artifact,
        lineage: &serde_json::Value,
    ) -> Result<u64, PublishError> {
        self.sync();
        if let Some(version) = self.pinned(task, profile) {
            return Err(PublishError::Pinned { version });
        }
        let version = self.highest(task, profile).unwrap_or(0) + 1;
        let mut lineage = lineage.clone();
        if let Some(obj) = lineage.as_object_mut() {
            obj.insert("version".into(), version.into());
            obj.insert("format".into(), artifact.format().into());
        }
        let mut update = ModelUpdate {
            task: task.to_string(),
            profile: profile.to_string(),
            version,
            artifact: artifact.encode().into(),
            format: artifact.format().to_string(),
            published_at_micros: now_micros(),
            lineage_json: lineage.to_string(),
            ..Default::default()
        };
        signing::sign_update(&mut update, &self.key);
        let payload = update.encode_to_vec();
        let key = topics::model_key(task, profile);
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topics::KAFKA_MODELS)
            .key(key.as_str())
            .payload(payload.as_slice());
        let delivery = self.producer.send_result(record).map_err(|(e, _)| {
            PublishError::Kafka(format!("queueing for {}: {e}", topics::KAFKA_MODELS))
        })?;
        // The trainer has its own thread: waiting here blocks nothing else.
        let delivered = futures::executor::block_on(delivery)
            .map_err(|_| PublishError::Kafka("the producer was dropped before delivery".into()))?
            .map_err(|(e, _)| {
                PublishError::Kafka(format!("publishing to {}: {e}", topics::KAFKA_MODELS))
            })?;
        tracing::info!(
            task,
            profile,
            version,
            partition = delivered.partition,
            offset = delivered.offset,
            "model published to edgeloop.models"
        );
        {
            let verify = self.key.verifying_key();
            remember(
                &mut lock(&self.known),
                &update,
                &verify,
                delivered.partition,
                delivered.offset,
            );
        }
        if let Some(mirror) = &self.mirror {
            if let Err(e) = mirror.write(task, profile, version, artifact, &lineage) {
                tracing::warn!(task, profile, version, error = %e, "the model is published, but its copy under trainer.dir could not be written");
            }
        }
        Ok(version)
    }

    fn artifact(&self, task: &str, profile: &str, version: u64) -> Option<Arc<Artifact>> {
        lock(&self.known)
            .lanes
            .get(&(task.to_string(), profile.to_string()))
            .and_then(|l| l.artifacts.get(&version).cloned())
    }
}
