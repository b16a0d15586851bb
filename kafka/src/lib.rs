//! Kafka client settings and topic set-up shared by the broker's bridge and
//! the stream processor. edgeloop reaches Kafka only through rdkafka
//! (librdkafka); this crate holds what both sides configure the same way.
//!
//! - [`KafkaConfig`]: bootstrap servers, topic layout, and the
//!   `librdkafka_options` pass-through map.
//! - [`ensure_topics`]: creates the topics edgeloop needs, at start-up,
//!   because some Kafka-API brokers (Tansu on SQLite) refuse produce requests
//!   to a topic that does not exist yet.
//! - [`local`]: a Kafka-API broker (Tansu) run as a child process, for one
//!   machine and for tests.

pub mod local;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

/// How to reach Kafka. Shared by every component that talks to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Partitions of each topic edgeloop creates at start-up (existing topics
    /// are left as they are). The readings topic's partition count bounds how
    /// many processors can share the work.
    pub partitions: i32,
    /// Replication factor of the topics edgeloop creates.
    pub replication_factor: i32,
    /// Create missing topics at start-up.
    pub create_topics: bool,
    /// Extra librdkafka settings, passed through as they are (for example
    /// `"security.protocol" = "ssl"`). They override edgeloop's own.
    pub librdkafka_options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            partitions: 4,
            replication_factor: 1,
            create_topics: true,
            librdkafka_options: BTreeMap::new(),
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
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), Error> {
    if !config.create_topics {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        config
            .client_config(&[])
            .create()
            .map_err(|source| Error::Client {
                bootstrap: config.bootstrap_servers.clone(),
                source,
            })?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| Error::CreateTopic {
            topic: topics.join(","),
            reason: e.to_string(),
        })?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created Kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}
