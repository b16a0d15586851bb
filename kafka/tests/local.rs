//! The local Apache Kafka of `edgeloop up`, the chaos soak and the tests,
//! against itself: what a node held survives a SIGKILL and a SIGTERM, and a
//! three-node cluster keeps taking `acks=all` writes with its partition
//! leader killed. Needs Java 17+ and the jars of scripts/setup.sh.

use std::time::Duration;

use edgeloop_kafka::local::{KafkaInstall, LocalKafka, LocalKafkaOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn install() -> Result<KafkaInstall> {
    Ok(KafkaInstall::locate(|k| std::env::var_os(k))?)
}

async fn produce(bootstrap: &str, topic: &str, values: std::ops::Range<u32>) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        .create()?;
    for v in values {
        producer
            .send(
                FutureRecord::to(topic).key("k").payload(&v.to_string()),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Every value in partition 0 of `topic`, in order.
fn read_all(bootstrap: &str, topic: &str) -> Result<Vec<u32>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "local-kafka-test")
        .set("enable.auto.commit", "false")
        .create()?;
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(30))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < high {
        if std::time::Instant::now() > deadline {
            return Err(format!("read {} of {high} records of {topic}", out.len()).into());
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            out.push(std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_what_it_acknowledged_across_a_kill_and_a_clean_stop() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut kafka = LocalKafka::start(&install()?, &LocalKafkaOptions::single(dir.path())).await?;
    let bootstrap = kafka.bootstrap();
    produce(&bootstrap, "t", 0..100).await?;
    kafka.kill_keeping_storage().await;
    kafka.start_again().await?;
    assert_eq!(kafka.bootstrap(), bootstrap, "restarted on another address");
    produce(&bootstrap, "t", 100..200).await?;
    kafka.stop_keeping_storage(Duration::from_secs(30)).await;
    // A clean stop leaves Kafka's clean-shutdown marker in its log dir.
    assert!(
        dir.path().join("data/.kafka_cleanshutdown").exists(),
        "no clean-shutdown marker after SIGTERM"
    );
    kafka.start_again().await?;
    assert_eq!(read_all(&bootstrap, "t")?, (0..200).collect::<Vec<_>>());
    let log = std::fs::read_to_string(dir.path().join("kafka.log"))?;
    assert_eq!(
        log.matches("Kafka Server started").count(),
        3,
        "three starts in one log"
    );
    kafka.stop(Duration::from_secs(30)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_node_refuses_a_second_start_on_its_address() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = LocalKafka::start(
        &install()?,
        &LocalKafkaOptions::single(&dir.path().join("a")),
    )
    .await?;
    let taken: std::net::SocketAddr = kafka.bootstrap().parse()?;
    let second = LocalKafka::start(
        &install()?,
        &LocalKafkaOptions {
            listen: Some(taken),
            ..LocalKafkaOptions::single(&dir.path().join("b"))
        },
    )
    .await;
    match second {
        Err(e) => assert!(e.to_string().contains("already in use"), "{e}"),
        Ok(_) => return Err("a second Kafka started on a taken address".into()),
    }
    kafka.stop(Duration::from_secs(30)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_taking_acks_all_writes_with_the_leader_killed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut kafka = LocalKafka::start(
        &install()?,
        &LocalKafkaOptions {
            nodes: 3,
            max_heap: "384m".into(),
            ..LocalKafkaOptions::single(dir.path())
        },
    )
    .await?;
    let bootstrap = kafka.bootstrap();
    assert_eq!(bootstrap.split(',').count(), 3);
    produce(&bootstrap, "replicated", 0..50).await?;
    let leader = kafka
        .leader("replicated", 0)
        .ok_or("the partition has no leader")?;
    kafka.kill_node(leader).await;
    assert!(!kafka.running(leader));
    // Two of three replicas are left: min.insync.replicas=2 is met, and a
    // new leader takes the writes.
    produce(&bootstrap, "replicated", 50..100).await?;
    let new_leader = kafka.leader("replicated", 0).ok_or("no new leader")?;
    assert_ne!(new_leader, leader, "the killed node still leads");
    kafka.start_node(leader).await?;
    assert!(kafka.running(leader));
    assert_eq!(
        read_all(&bootstrap, "replicated")?,
        (0..100).collect::<Vec<_>>()
    );
    kafka.stop(Duration::from_secs(30)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_topics_edgeloop_creates_keep_about_one_record_per_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = LocalKafka::start(&install()?, &LocalKafkaOptions::single(dir.path())).await?;
    let mut config = edgeloop_kafka::KafkaConfig {
        bootstrap_servers: kafka.bootstrap(),
        partitions: 1,
        ..Default::default()
    };
    // Segments close after 200 ms here (an hour by default) so that the
    // test sees the cleaner at work.
    config
        .compacted_topic_config
        .insert("segment.ms".into(), "200".into());
    edgeloop_kafka::ensure_compacted_topics(&config, &["acks"]).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()?;
    let written = 400u32;
    for round in 0..(written / 10) {
        for key in 0..10u32 {
            producer
                .send(
                    FutureRecord::to("acks")
                        .key(&format!("device-{key}"))
                        .payload(&format!("{round}")),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", "compaction-test")
        .create()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (low, high) = consumer.fetch_watermarks("acks", 0, Duration::from_secs(10))?;
        assert_eq!(high, i64::from(written));
        // What is left from the start: the latest value of each key, and
        // the records of the segment still open.
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset("acks", 0, Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let mut left = 0u32;
        let mut latest = std::collections::HashMap::new();
        let mut next = low;
        while next < high && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(500)) {
                let m = m?;
                next = m.offset() + 1;
                left += 1;
                latest.insert(
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                );
            }
        }
        assert_eq!(latest.len(), 10, "a key lost its latest record");
        let last_round = format!("{}", written / 10 - 1).into_bytes();
        assert!(
            latest.values().all(|v| *v == last_round),
            "a key's latest value is not its last"
        );
        if left < written / 2 {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{left} of {written} records still there after 90 s: not compacted"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    kafka.stop(Duration::from_secs(30)).await;
    Ok(())
}
