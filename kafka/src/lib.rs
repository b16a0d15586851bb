//! Kafka client settings and topic set-up shared by the broker's bridge and
//! the stream processor. edgeloop reaches Kafka only through rdkafka
//! (librdkafka); this crate holds what both sides configure the same way.
//!
//! - [`KafkaConfig`]: bootstrap servers, topic layout, and the
//!   `librdkafka_options` pass-through map.
//! - [`ensure_topics`]: creates the topics edgeloop needs, at start-up, with
//!   the partitions and replication factor of the config (a cluster may
//!   have automatic creation off, or create with other settings);
//!   [`ensure_compacted_topics`] does the
//!   same for topics that keep the latest record per key
//!   (`cleanup.policy=compact`).
//! - [`topic_ends`]: every partition of a topic from its beginning, and
//!   where each ends now (for followers of compacted topics).
//! - [`local`]: Apache Kafka (KRaft, one node or several) run as child
//!   processes from its Maven jars, for one machine, chaos runs and tests.

pub mod local;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

/// What [`topic_ends`] returns: the assignment and partition → high watermark.
pub type TopicEnds = (
    rdkafka::TopicPartitionList,
    std::collections::HashMap<i32, i64>,
);

/// Every partition of `topic`, each from its beginning (an assignment for
/// a follower that reads the topic whole), and partition → its high
/// watermark now, for the partitions that hold records. An error if the
/// topic is unknown or has no partition.
///
/// A partition without a leader yet (a topic created a moment ago, or a
/// leader election under way) is waited for, up to [`LEADER_WAIT`].
pub fn topic_ends<C, K>(
    consumer: &K,
    topic: &str,
    timeout: Duration,
) -> Result<TopicEnds, KafkaError>
where
    C: rdkafka::consumer::ConsumerContext,
    K: rdkafka::consumer::Consumer<C>,
{
    topic_ends_until(consumer, topic, timeout, &|| false)
}

/// [`topic_ends`], which stops asking again once `stop()` is true (a
/// shutdown): then it returns the last answer, an error, at most one
/// request's `timeout` after `stop` turned true.
pub fn topic_ends_until<C, K>(
    consumer: &K,
    topic: &str,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<TopicEnds, KafkaError>
where
    C: rdkafka::consumer::ConsumerContext,
    K: rdkafka::consumer::Consumer<C>,
{
    let deadline = std::time::Instant::now() + LEADER_WAIT;
    loop {
        match topic_ends_once(consumer, topic, timeout) {
            Err(e) if is_transient(&e) && std::time::Instant::now() < deadline && !stop() => {
                tracing::debug!(topic, error = %e, "a partition has no leader yet; asking again");
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// How long [`topic_ends`] and topic creation wait for every partition of a
/// topic to have a leader, and [`committed_offsets`] for a group coordinator.
pub const LEADER_WAIT: Duration = Duration::from_secs(30);

/// The offsets `consumer`'s group has committed on `partitions`, waiting
/// up to [`LEADER_WAIT`] for the group's coordinator: on a cluster no group
/// has used yet, the first request makes Kafka create `__consumer_offsets`,
/// and until its partitions have leaders the answer is "not coordinator"
/// or "coordinator not available" (librdkafka does not ask again itself).
pub fn committed_offsets<C, K>(
    consumer: &K,
    partitions: &rdkafka::TopicPartitionList,
    timeout: Duration,
) -> Result<rdkafka::TopicPartitionList, KafkaError>
where
    C: rdkafka::consumer::ConsumerContext,
    K: rdkafka::consumer::Consumer<C>,
{
    let deadline = std::time::Instant::now() + LEADER_WAIT;
    loop {
        match consumer.committed_offsets(partitions.clone(), timeout) {
            Err(e) if is_transient(&e) && std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "the group's coordinator is not ready; asking again");
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// Whether `e` says a partition's leader or a group's coordinator is not
/// (yet) known, or a node did not answer in time (a cluster starting, or
/// busy): an answer to ask again shortly, not a fault.
fn is_transient(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
        )
    )
}

fn topic_ends_once<C, K>(
    consumer: &K,
    topic: &str,
    timeout: Duration,
) -> Result<TopicEnds, KafkaError>
where
    C: rdkafka::consumer::ConsumerContext,
    K: rdkafka::consumer::Consumer<C>,
{
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for t in metadata.topics() {
        if let Some(e) = t.error() {
            return Err(KafkaError::MetadataFetch(e.into()));
        }
        for p in t.partitions() {
            if let Some(e) = p.error() {
                return Err(KafkaError::MetadataFetch(e.into()));
            }
            if p.leader() < 0 {
                return Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::LeaderNotAvailable,
                ));
            }
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            assignment.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)?;
            if high > low {
                ends.insert(p.id(), high);
            }
        }
    }
    if assignment.count() == 0 {
        return Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    Ok((assignment, ends))
}

/// How to reach Kafka. Shared by every component that talks to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Partitions of each topic edgeloop creates at start-up (existing topics
    /// are left as they are); 12 by default. The readings topic's partition
    /// count bounds how many processors can share the work: 12 leaves room
    /// to grow from one processor to twelve without adding partitions, which
    /// moves devices between partitions (docs/kubernetes.md).
    pub partitions: i32,
    /// Replication factor of the topics edgeloop creates.
    pub replication_factor: i32,
    /// Create missing topics at start-up.
    pub create_topics: bool,
    /// Extra librdkafka settings, passed through as they are (for example
    /// `"security.protocol" = "ssl"`). They override edgeloop's own.
    pub librdkafka_options: BTreeMap<String, String>,
    /// Topic settings of the compacted topics edgeloop creates (acks,
    /// status, models, pins), beside `cleanup.policy=compact`. Kafka
    /// compacts only closed segments, and its default segment lives 7 days
    /// or 1 GiB: the defaults here (a segment closes after an hour, and is
    /// cleaned once a tenth of it is superseded) keep these topics near one
    /// record per key.
    pub compacted_topic_config: BTreeMap<String, String>,
}

/// The default [`KafkaConfig::compacted_topic_config`].
pub fn default_compacted_topic_config() -> BTreeMap<String, String> {
    [
        ("segment.ms", "3600000"),
        ("min.cleanable.dirty.ratio", "0.1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            partitions: 12,
            replication_factor: 1,
            create_topics: true,
            librdkafka_options: BTreeMap::new(),
            compacted_topic_config: default_compacted_topic_config(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid kafka config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("could not create a Kafka client for {bootstrap}: {source}")]
    Client {
        bootstrap: String,
        source: KafkaError,
    },
    #[error("could not create Kafka topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    /// The creation request got no answer (retried by [`ensure_topics`]).
    #[error("Kafka did not answer the creation of topic {topic}: {reason}")]
    Unanswered { topic: String, reason: String },
}

impl KafkaConfig {
    /// Checks the fields; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), Error> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(Error::Config {
                field: "kafka.bootstrap_servers",
                reason: "must name at least one host:port".into(),
            });
        }
        if self.partitions < 1 {
            return Err(Error::Config {
                field: "kafka.partitions",
                reason: format!("must be at least 1, not {}", self.partitions),
            });
        }
        if self.replication_factor < 1 {
            return Err(Error::Config {
                field: "kafka.replication_factor",
                reason: format!("must be at least 1, not {}", self.replication_factor),
            });
        }
        Ok(())
    }

    /// A librdkafka config with the bootstrap servers, the given settings of
    /// the caller, then `librdkafka_options` on top.
    pub fn client_config(&self, settings: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in settings {
            config.set(*key, *value);
        }
        for (key, value) in &self.librdkafka_options {
            config.set(key, value);
        }
        config
    }
}

/// Creates each topic that does not exist yet. A topic that already exists is
/// fine; any other failure is an error naming the topic.
///
/// While Kafka does not answer it tries again for up to
/// [`CREATE_TOPICS_RETRY_FOR`]. The future is cancel-safe: dropped (a
/// shutdown during start-up), it stops retrying at once, and its wait for
/// the new topics' leaders (a blocking thread) stops within one request.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), Error> {
    create_topics(config, topics, &[], None).await
}

/// [`ensure_topics`], adding to `retries` each time it asks Kafka again
/// after no answer (a metric of the caller's).
pub async fn ensure_topics_counted(
    config: &KafkaConfig,
    topics: &[&str],
    retries: &AtomicU64,
) -> Result<(), Error> {
    create_topics(config, topics, &[], Some(retries)).await
}

/// Like [`ensure_topics`] (cancel-safe too), for topics read as a table of
/// the latest record per key: a topic it creates has `cleanup.policy=compact`. A topic that
/// already exists is left as it is, with a warning if its cleanup policy is
/// not `compact` (its old records may then be deleted by retention).
pub async fn ensure_compacted_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), Error> {
    let mut settings = vec![("cleanup.policy", "compact")];
    settings.extend(
        config
            .compacted_topic_config
            .iter()
            .filter(|(k, _)| k.as_str() != "cleanup.policy")
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    create_topics(config, topics, &settings, None).await?;
    if config.create_topics {
        warn_unless_compacted(config, topics).await;
    }
    Ok(())
}

fn admin(config: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, Error> {
    client(config)
}

/// A librdkafka client of any kind with the config's settings only.
fn client<T: rdkafka::config::FromClientConfig>(config: &KafkaConfig) -> Result<T, Error> {
    config
        .client_config(&[])
        .create()
        .map_err(|source| Error::Client {
            bootstrap: config.bootstrap_servers.clone(),
            source,
        })
}

/// How long [`ensure_topics`] keeps trying while Kafka does not answer (it
/// is down, or starting, or too slow to answer within the admin request's
/// 30 s): a broker or processor started while Kafka restarts waits for it
/// instead of exiting at once (`edgeloop chaos` restarts a broker while
/// Kafka is down).
pub const CREATE_TOPICS_RETRY_FOR: Duration = Duration::from_secs(120);

async fn create_topics(
    config: &KafkaConfig,
    topics: &[&str],
    topic_config: &[(&str, &str)],
    retries: Option<&AtomicU64>,
) -> Result<(), Error> {
    create_topics_within(
        config,
        topics,
        topic_config,
        CREATE_TOPICS_RETRY_FOR,
        retries,
    )
    .await
}

/// [`create_topics`], retrying a request that fails as a whole (no answer,
/// time-out) with a growing pause (1 s, 2 s, … 5 s) for up to `retry_for`.
/// A per-topic refusal is final. Each retry adds one to `retries`.
async fn create_topics_within(
    config: &KafkaConfig,
    topics: &[&str],
    topic_config: &[(&str, &str)],
    retry_for: Duration,
    retries: Option<&AtomicU64>,
) -> Result<(), Error> {
    if !config.create_topics {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + retry_for;
    let mut pause = Duration::from_secs(1);
    loop {
        match create_topics_once(config, topics, topic_config).await {
            Err(Error::Unanswered { topic, reason })
                if tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::warn!(%topic, %reason, retry_in = ?pause, "Kafka did not answer the topic creation; trying again");
                if let Some(retries) = retries {
                    retries.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(Error::Unanswered { topic, reason }) => {
                return Err(Error::CreateTopic {
                    topic,
                    reason: format!("{reason} (Kafka did not answer for {retry_for:?})"),
                })
            }
            other => return other,
        }
    }
}

async fn create_topics_once(
    config: &KafkaConfig,
    topics: &[&str],
    topic_config: &[(&str, &str)],
) -> Result<(), Error> {
    let admin = admin(config)?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            topic_config.iter().fold(
                NewTopic::new(
                    name,
                    config.partitions,
                    TopicReplication::Fixed(config.replication_factor),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| Error::Unanswered {
            topic: topics.join(","),
            reason: e.to_string(),
        })?;
    let mut to_wait = Vec::new();
    for result in results {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, ?topic_config, "created Kafka topic");
                to_wait.push(name);
            }
            // Perhaps created a moment ago by another replica starting at
            // the same time: its leaders are waited for too.
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => to_wait.push(name),
            Err((topic, code)) => {
                return Err(Error::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    wait_for_leaders(config, &to_wait).await
}

/// Sets its flag when dropped: tells a blocking thread that the future
/// waiting for it is gone.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Waits (up to [`LEADER_WAIT`]) until every partition of `topics` has a
/// leader: Kafka answers a creation before the controller has elected
/// them, and a produce or a watermark query in between fails. If this
/// future is dropped, the blocking wait stops within one request.
async fn wait_for_leaders(config: &KafkaConfig, topics: &[String]) -> Result<(), Error> {
    if topics.is_empty() {
        return Ok(());
    }
    let consumer: rdkafka::consumer::BaseConsumer = client(config)?;
    let topics = topics.to_vec();
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let stopped = stop.0.clone();
    // topic_ends asks again (up to LEADER_WAIT) while a partition has no
    // leader, and fails if one still has none.
    let waited = tokio::task::spawn_blocking(move || {
        let stop = || stopped.load(Ordering::Relaxed);
        for topic in topics {
            if stop() {
                break;
            }
            if let Err(e) = topic_ends_until(&consumer, &topic, Duration::from_secs(5), &stop) {
                return Err(Error::Unanswered {
                    topic,
                    reason: format!("its partitions had no leader within {LEADER_WAIT:?}: {e}"),
                });
            }
        }
        Ok(())
    })
    .await;
    drop(stop);
    waited.unwrap_or_else(|e| {
        Err(Error::Unanswered {
            topic: String::new(),
            reason: format!("the wait for leaders failed: {e}"),
        })
    })
}

/// Logs a warning for each topic whose `cleanup.policy` does not include
/// `compact`. Best effort: a broker that cannot describe configs is only
/// noted at debug level.
async fn warn_unless_compacted(config: &KafkaConfig, topics: &[&str]) {
    let Ok(admin) = admin(config) else {
        return;
    };
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = match admin.describe_configs(specifiers.iter(), &options).await {
        Ok(results) => results,
        Err(e) => {
            tracing::debug!(error = %e, "could not describe the compacted topics' configs");
            return;
        }
    };
    for (topic, result) in topics.iter().zip(results) {
        match result {
            Ok(resource) => {
                let policy = resource
                    .get("cleanup.policy")
                    .and_then(|entry| entry.value.clone());
                if let Some(policy) = policy.filter(|p| !p.contains("compact")) {
                    tracing::warn!(
                        %topic,
                        %policy,
                        "this topic should have cleanup.policy=compact: it is read as the latest record per key, and with {policy} Kafka may delete records still needed"
                    );
                }
            }
            Err(e) => {
                tracing::debug!(%topic, error = %e, "could not describe the topic's config")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn topic_creation_retries_while_kafka_does_not_answer_then_names_the_topic(
    ) -> Result<(), Box<dyn std::error::Error>> {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = KafkaConfig {
            bootstrap_servers: format!("127.0.0.1:{port}"),
            librdkafka_options: [("socket.timeout.ms".to_string(), "2000".to_string())]
                .into_iter()
                .collect(),
            ..KafkaConfig::default()
        };
        let started = std::time::Instant::now();
        let retries = AtomicU64::new(0);
        let result = create_topics_within(
            &config,
            &["t1"],
            &[],
            Duration::from_secs(4),
            Some(&retries),
        )
        .await;
        let Err(Error::CreateTopic { topic, reason }) = result else {
            return Err(format!("expected CreateTopic, got {result:?}").into());
        };
        assert_eq!(topic, "t1");
        assert!(reason.contains("did not answer"), "{reason}");
        assert!(started.elapsed() >= Duration::from_secs(1), "no retry");
        assert!(retries.load(Ordering::Relaxed) >= 1, "no retry counted");
        Ok(())
    }
}
