//! Reading a compacted Kafka topic as a table: every partition assigned from
//! its beginning, read up to the end it had when reading started.
//!
//! The consumer never joins a consumer group and never commits (partitions
//! are assigned, not subscribed; `group.id` is set only because librdkafka
//! wants one), so a broker that restarts or dies holds nothing up for anyone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgeloop_kafka::KafkaConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::BridgeError;

/// The context of the consumers here: an end-of-partition event that reaches
/// librdkafka's main queue (when a consumer is closed, for one) is expected,
/// not an error.
pub struct CompactedContext;

impl ClientContext for CompactedContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!(%reason, "end of partition");
        } else {
            tracing::warn!(%error, %reason, "librdkafka (compacted topic consumer)");
        }
    }
}

impl ConsumerContext for CompactedContext {}

pub type CompactedConsumer = StreamConsumer<CompactedContext>;

/// A consumer for reading compacted topics from the beginning.
pub fn consumer(
    kafka: &KafkaConfig,
    client_id: &str,
) -> Result<Arc<CompactedConsumer>, BridgeError> {
    kafka
        .client_config(&[
            ("group.id", client_id),
            ("client.id", client_id),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
        ])
        .create_with_context(CompactedContext)
        .map(Arc::new)
        .map_err(BridgeError::Consumer)
}

/// Which partitions still have records to read before the end they had when
/// reading started.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// partition → high watermark at the start
    remaining: HashMap<i32, i64>,
}

impl CatchUp {
    /// A record at `offset` of `partition` was read.
    pub fn on_record(&mut self, partition: i32, offset: i64) {
        if self
            .remaining
            .get(&partition)
            .is_some_and(|high| offset + 1 >= *high)
        {
            self.remaining.remove(&partition);
        }
    }

    /// The consumer reached the current end of `partition`.
    pub fn on_end(&mut self, partition: i32) {
        self.remaining.remove(&partition);
    }

    pub fn done(&self) -> bool {
        self.remaining.is_empty()
    }
}

/// Assigns every partition of `topic` to `consumer` from its beginning;
/// returns what must be read to reach the end the partitions have now.
pub async fn assign_from_beginning(
    consumer: &Arc<CompactedConsumer>,
    topic: &'static str,
    timeout: Duration,
) -> Result<CatchUp, BridgeError> {
    let c = consumer.clone();
    tokio::task::spawn_blocking(move || -> Result<CatchUp, KafkaError> {
        let metadata = c.fetch_metadata(Some(topic), timeout)?;
        let mut assignment = TopicPartitionList::new();
        let mut catch_up = CatchUp::default();
        for t in metadata.topics() {
            if let Some(e) = t.error() {
                return Err(KafkaError::MetadataFetch(e.into()));
            }
            for p in t.partitions() {
                let (low, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
                assignment.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                if high > low {
                    catch_up.remaining.insert(p.id(), high);
                }
            }
        }
        if assignment.count() == 0 {
            return Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            ));
        }
        c.assign(&assignment)?;
        Ok(catch_up)
    })
    .await
    .map_err(|e| BridgeError::Restore {
        topic,
        reason: e.to_string(),
    })?
    .map_err(|e| BridgeError::Restore {
        topic,
        reason: e.to_string(),
    })
}

/// Assigns every partition of `topic` to `consumer` at the end it has now
/// (resolved here, not when fetching starts, so that every record written
/// after this returns is read).
pub async fn assign_at_end(
    consumer: &Arc<CompactedConsumer>,
    topic: &'static str,
    timeout: Duration,
) -> Result<(), BridgeError> {
    let c = consumer.clone();
    tokio::task::spawn_blocking(move || -> Result<(), KafkaError> {
        let metadata = c.fetch_metadata(Some(topic), timeout)?;
        let mut assignment = TopicPartitionList::new();
        for t in metadata.topics() {
            if let Some(e) = t.error() {
                return Err(KafkaError::MetadataFetch(e.into()));
            }
            for p in t.partitions() {
                let (_, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
                assignment.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
            }
        }
        if assignment.count() == 0 {
            return Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            ));
        }
        c.assign(&assignment)
    })
    .await
    .map_err(|e| BridgeError::Restore {
        topic,
        reason: e.to_string(),
    })?
    .map_err(|e| BridgeError::Restore {
        topic,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_up_ends_when_every_partition_reached_its_end() {
        let mut c = CatchUp {
            remaining: HashMap::from([(0, 3), (1, 10)]),
        };
        c.on_record(0, 1);
        assert!(!c.done());
        c.on_record(0, 2);
        // Partition 1's last records were compacted away: its end is reported.
        c.on_end(1);
        assert!(c.done());
    }
}
