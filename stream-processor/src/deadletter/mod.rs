//! The dead-letter topic: a record that could not be turned into rows is
//! produced to `edgeloop.deadletter` with its original key and bytes and
//! headers saying why (`reason`) and where it came from (`source_topic`,
//! `source_partition`, `source_offset`, plus the original headers). The
//! processor waits for Kafka's acknowledgement before it commits past it, so
//! a dead letter is never lost.

use std::time::Duration;

use edgeloop_kafka::KafkaConfig;
use edgeloop_proto::topics;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("could not create the dead-letter producer: {0}")]
    Create(KafkaError),
    #[error("Kafka did not take the dead letter of {topic}[{partition}]@{offset}: {source}")]
    Produce {
        topic: String,
        partition: i32,
        offset: i64,
        source: KafkaError,
    },
}

pub struct DeadLetters {
    producer: FutureProducer,
}

impl DeadLetters {
    pub fn new(kafka: &KafkaConfig) -> Result<DeadLetters, DeadLetterError> {
        let producer = kafka
            .client_config(&[
                ("acks", "all"),
                ("enable.idempotence", "true"),
                ("client.id", "edgeloop-processor-deadletter"),
            ])
            .create()
            .map_err(DeadLetterError::Create)?;
        Ok(DeadLetters { producer })
    }

    /// Produces the dead letter of `message` and waits for Kafka to take it.
    pub fn send(&self, message: &BorrowedMessage<'_>, reason: &str) -> Result<(), DeadLetterError> {
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "source_topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "source_partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "source_offset",
                value: Some(&offset),
            });
        if let Some(original) = message.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let mut record = FutureRecord::to(topics::KAFKA_DEADLETTER)
            .payload(message.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        let delivery = self.producer.send(record, Duration::from_secs(30));
        futures::executor::block_on(delivery)
            .map(|_| ())
            .map_err(|(source, _)| DeadLetterError::Produce {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                source,
            })
    }
}
