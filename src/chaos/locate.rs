//! Where the readings lost unexplained went, asked of Kafka while it still
//! runs: a reading acknowledged to its device but in neither Parquet table
//! is either in `edgeloop.readings` (the processor has not written it: is
//! its group's committed offset past it, or is it stuck before it?) or not
//! (Kafka lost what it acknowledged, or the bridge acknowledged what Kafka
//! never took). The soak's report carries the answer, so a failure says
//! which side to look at.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use edgeloop_proto::topics;
use edgeloop_proto::v1::ReadingBatch;
use edgeloop_proto::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message as _;

/// For each `(device, seq)` of `missing`, where it is in the readings topic
/// and where `group`'s committed offset stands on that partition, as
/// sentences (one per reading, then one per partition).
pub fn locate(
    bootstrap: &str,
    group: &str,
    missing: &BTreeMap<String, Vec<u64>>,
) -> anyhow::Result<Vec<String>> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let (assignment, ends) =
        edgeloop_kafka::topic_ends(&consumer, topics::KAFKA_READINGS, timeout)?;
    let committed = edgeloop_kafka::committed_offsets(&consumer, &assignment, timeout)?;
    consumer.assign(&assignment)?;
    let mut found: HashMap<(String, u64), (i32, i64)> = HashMap::new();
    let mut positions: HashMap<i32, i64> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while ends
        .iter()
        .any(|(p, end)| positions.get(p).is_none_or(|at| at + 1 < *end))
        && std::time::Instant::now() < deadline
    {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        positions.insert(message.partition(), message.offset());
        let Some(batch) = message.payload().and_then(|p| ReadingBatch::decode(p).ok()) else {
            continue;
        };
        let Some(seqs) = missing.get(&batch.device_id) else {
            continue;
        };
        let range = batch.first_seq..batch.first_seq + batch.readings.len() as u64;
        for seq in seqs.iter().filter(|s| range.contains(s)) {
            found
                .entry((batch.device_id.clone(), *seq))
                .or_insert((message.partition(), message.offset()));
        }
    }
    let mut out = Vec::new();
    for (device, seqs) in missing {
        for seq in seqs {
            out.push(match found.get(&(device.clone(), *seq)) {
                Some((p, offset)) => format!(
                    "{device} seq {seq}: in {} partition {p} at offset {offset}",
                    topics::KAFKA_READINGS
                ),
                None => format!(
                    "{device} seq {seq}: not in {} (Kafka does not hold it)",
                    topics::KAFKA_READINGS
                ),
            });
        }
    }
    for e in committed.elements() {
        let p = e.partition();
        out.push(format!(
            "partition {p}: log end {}, read up to {}, group {group} committed {:?}",
            ends.get(&p).copied().unwrap_or(0),
            positions.get(&p).map_or(-1, |o| o + 1),
            e.offset()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_reading_is_found_in_kafka_or_said_not_to_be_there() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let kafka = edgeloop_tests::start_kafka(dir.path()).await?;
        let config = edgeloop_kafka::KafkaConfig {
            bootstrap_servers: kafka.bootstrap(),
            ..Default::default()
        };
        edgeloop_kafka::ensure_topics(&config, &[topics::KAFKA_READINGS]).await?;
        for device in ["d", "e"] {
            let batch = edgeloop_tests::batch(device, 0, 10);
            edgeloop_tests::produce(&kafka, topics::KAFKA_READINGS, device, &batch).await?;
        }
        let missing = BTreeMap::from([("d".to_string(), vec![5, 50])]);
        let bootstrap = kafka.bootstrap();
        let lines =
            tokio::task::spawn_blocking(move || locate(&bootstrap, "nobody", &missing)).await??;
        assert!(
            lines[0].starts_with("d seq 5: in edgeloop.readings partition ")
                && lines[0].ends_with(" at offset 0"),
            "{lines:?}"
        );
        assert_eq!(
            lines[1],
            "d seq 50: not in edgeloop.readings (Kafka does not hold it)"
        );
        // One line per partition: two hold a record each (or one holds both).
        let partitions = &lines[2..];
        assert_eq!(partitions.len(), config.partitions as usize, "{lines:?}");
        let held: usize = partitions
            .iter()
            .filter_map(|l| {
                l.split("log end ")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum::<usize>();
        assert_eq!(held, 2, "{lines:?}");
        Ok(())
    }
}
