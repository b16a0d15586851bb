//! The device side of model updates, against the real parts: Apache Kafka,
//! `edgeloop broker` (whose bridge republishes
//! `edgeloop.models` retained on `models/{task}/{profile}`) as a child
//! process, and an agent in-process with a provisioned public key. Signed
//! updates are produced to Kafka as the model publisher would; what the
//! agent did is read back from Kafka: its `DeviceStatus` in
//! `edgeloop.status`, its readings (with predictions) in `edgeloop.readings`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_agent::config::SourceConfig;
use edgeloop_agent::source::simulator::{Simulator, SimulatorConfig};
use edgeloop_agent::{AgentConfig, AgentStats};
use edgeloop_kafka::local::LocalKafka;
use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{quantize, Artifact, FloatModel, Int8Model};
use edgeloop_proto::signing::{self, SigningKey};
use edgeloop_proto::v1::{DeviceStatus, ModelUpdate, Reading, ReadingBatch};
use edgeloop_proto::{topics, Message as _};
use edgeloop_tests::{kafka_consumer, produce, start_kafka, wait_for, Component};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const TASK: &str = "anomaly";
const PROFILE: &str = "int8";
const DEVICE: &str = "model-device";

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

async fn start_broker(
    kafka: &LocalKafka,
    dir: &std::path::Path,
) -> Result<(Component, SocketAddr)> {
    let mqtt = edgeloop_tests::free_addr()?;
    let (listen, bootstrap) = (mqtt.to_string(), kafka.bootstrap());
    let args = [
        "broker",
        "--listen",
        &listen,
        "--kafka",
        &bootstrap,
        "--allow-anonymous",
    ];
    let mut broker = Component::start(&edgeloop_bin(), "broker", &args, dir)?;
    wait_for(Duration::from_secs(60), "the MQTT listener", || {
        let running = broker.check_running();
        async move {
            running?;
            Ok(tokio::net::TcpStream::connect(mqtt).await.ok().map(|_| ()))
        }
    })
    .await?;
    Ok((broker, mqtt))
}

/// An int8 model over temperature and humidity, window 4: class `hot` when
/// the last temperature is above the window's mean. The simulator's noise
/// flips that from reading to reading, so both classes occur and a
/// prediction over any other window would show.
fn int8_model() -> Result<Int8Model> {
    let features = FeatureSet {
        channels: vec!["temperature".into(), "humidity".into()],
        window: 4,
    };
    let n_in = features.len();
    // Standardization around the simulator's levels (mean, min, max, std,
    // slope, last per channel).
    let mean = [
        21.0, 21.0, 21.0, 0.0, 0.0, 21.0, 45.0, 45.0, 45.0, 0.0, 0.0, 45.0,
    ];
    let mut weights = vec![0.0f32; 2 * n_in];
    weights[n_in + 5] = 1.0; // + temperature.last
    weights[n_in] = -1.0; // - temperature.mean
    let float = FloatModel::new(
        features.clone(),
        vec!["normal".into(), "hot".into()],
        mean.to_vec(),
        vec![0.5; n_in],
        weights,
        vec![0.0, 0.0],
    )?;
    // Calibration: features of simulated readings, as the trainer would see.
    let mut sim = Simulator::new(SimulatorConfig::default());
    let channels: Vec<String> = SimulatorConfig::default()
        .channels
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let readings: Vec<Reading> = (0..400)
        .map(|i| Reading {
            ts_micros: 1_800_000_000_000_000 + i * 100_000,
            values: sim.next_reading().values,
            true_label: String::new(),
            predictions: Vec::new(),
        })
        .collect();
    let calibration = (4..readings.len())
        .map(|end| features.extract(&channels, &readings[end - 4..end]))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(quantize(&float, &calibration)?)
}

fn update(version: u64, artifact: &Artifact, key: &SigningKey) -> ModelUpdate {
    let mut u = ModelUpdate {
        task: TASK.into(),
        profile: PROFILE.into(),
        version,
        artifact: artifact.encode().into(),
        format: artifact.format().into(),
        published_at_micros: 1_800_000_000_000_000,
        lineage_json: format!("{{\"test\":{version}}}"),
        ..ModelUpdate::default()
    };
    signing::sign_update(&mut u, key);
    u
}

/// A consumer of every partition of `topic` from the beginning.
fn follow(kafka: &LocalKafka, topic: &str, group: &str) -> Result<BaseConsumer> {
    let consumer = kafka_consumer(kafka, group)?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            assignment.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Polls `consumer` until `done` returns `Some` for a record's payload, for
/// at most `limit`.
async fn poll_until<T>(
    consumer: &BaseConsumer,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&[u8]) -> Result<Option<T>>,
) -> Result<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        ensure!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        let polled = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(100)));
        match polled {
            Some(Ok(m)) => {
                if let Some(v) = done(m.payload().unwrap_or_default())? {
                    return Ok(v);
                }
            }
            Some(Err(e)) => bail!("polling for {what}: {e}"),
            None => tokio::task::yield_now().await,
        }
    }
}

/// The next status of the device (in `edgeloop.status`) that satisfies `ok`.
async fn status_where(
    statuses: &BaseConsumer,
    what: &str,
    ok: impl Fn(&DeviceStatus) -> bool,
) -> Result<DeviceStatus> {
    poll_until(statuses, Duration::from_secs(60), what, |payload| {
        let s = DeviceStatus::decode(payload)?;
        Ok((s.device_id == DEVICE && ok(&s)).then_some(s))
    })
    .await
}

fn applied(s: &DeviceStatus) -> Option<u64> {
    s.applied_model_versions.get(TASK).copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_applies_signed_models_predicts_with_them_and_refuses_bad_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let (_broker, mqtt) = start_broker(&kafka, dir.path()).await?;

    // The provisioned public key, as `edgeloop keys generate` writes it.
    let key = SigningKey::from_bytes(&[7; 32]);
    let intruder = SigningKey::from_bytes(&[8; 32]);
    let key_file = dir.path().join("models.pub");
    std::fs::write(
        &key_file,
        signing::to_hex(key.verifying_key().as_bytes()) + "\n",
    )?;

    let mut config = AgentConfig {
        device_id: DEVICE.into(),
        profile: PROFILE.into(),
        ..AgentConfig::default()
    };
    config.spool.dir = dir.path().join("spool");
    config.spool.sync_interval = Duration::from_millis(20);
    config.mqtt.host = mqtt.ip().to_string();
    config.mqtt.port = mqtt.port();
    config.uplink.batch_size = 50;
    config.uplink.linger = Duration::from_millis(50);
    config.shutdown_grace = Duration::from_secs(5);
    config.source = SourceConfig::Simulator(SimulatorConfig {
        rate_hz: 10.0,
        speedup: 20.0,
        seed: 3,
        ..SimulatorConfig::default()
    });
    config.models.verify_key_file = Some(key_file);
    let shutdown = CancellationToken::new();
    let stats = Arc::new(AgentStats::default());
    let agent = tokio::spawn(edgeloop_agent::run(
        config.clone(),
        shutdown.clone(),
        stats.clone(),
    ));
    let statuses = follow(&kafka, topics::KAFKA_STATUS, "test-statuses")?;
    status_where(&statuses, "the agent's first status", |s| s.online).await?;

    let artifact = Artifact::Int8(int8_model()?);
    let Artifact::Int8(model) = &artifact else {
        bail!("not int8")
    };
    let key_of = topics::model_key(TASK, PROFILE);
    let publish = |u: ModelUpdate| {
        let (kafka, key_of) = (&kafka, key_of.clone());
        async move { produce(kafka, topics::KAFKA_MODELS, &key_of, &u.encode_to_vec()).await }
    };

    // Version 1, signed: applied and reported.
    publish(update(1, &artifact, &key)).await?;
    let s = status_where(&statuses, "version 1 applied", |s| applied(s) == Some(1)).await?;
    ensure!(s.last_model_error.is_empty(), "{}", s.last_model_error);
    let stored = config
        .spool
        .dir
        .join("models")
        .join(format!("{TASK}.update"));
    ensure!(
        stored.is_file(),
        "the model is not stored at {}",
        stored.display()
    );

    // Readings taken since carry its predictions, and they are what the
    // kernel gives on the readings they name.
    let readings = follow(&kafka, topics::KAFKA_READINGS, "test-readings")?;
    let (checked, labels) = {
        let mut checked = 0usize;
        let mut labels = std::collections::BTreeSet::new();
        poll_until(
            &readings,
            Duration::from_secs(60),
            "readings with predictions",
            |payload| {
                let batch = ReadingBatch::decode(payload)?;
                for (i, r) in batch.readings.iter().enumerate() {
                    let Some(p) = r.predictions.iter().find(|p| p.task == TASK) else {
                        continue;
                    };
                    ensure!(p.model_version == 1, "{p:?}");
                    ensure!(p.window >= 1 && p.window <= 4, "{p:?}");
                    let w = p.window as usize;
                    if w == 4 && i + 1 >= w {
                        // Recompute from the readings seq - 3 ..= seq.
                        let x = model
                            .features()
                            .extract(&batch.channels, &batch.readings[i + 1 - w..=i])?;
                        let class = model.predict(&x)?.class;
                        ensure!(
                            model.classes()[class] == p.label,
                            "seq {}: device said {}, the kernel says {}",
                            batch.first_seq + i as u64,
                            p.label,
                            model.classes()[class]
                        );
                        checked += 1;
                        labels.insert(p.label.clone());
                    }
                }
                Ok((checked >= 200).then_some(()))
            },
        )
        .await?;
        (checked, labels)
    };
    ensure!(checked >= 200);
    ensure!(labels.len() == 2, "only {labels:?} predicted");

    // Tampered: one byte of the artifact changed after signing.
    let mut tampered = update(2, &artifact, &key);
    let mut bytes = tampered.artifact.to_vec();
    bytes[30] ^= 0x01;
    tampered.artifact = bytes.into();
    publish(tampered).await?;
    let s = status_where(&statuses, "the tampered version 2 refused", |s| {
        s.last_model_error.contains("version 2")
    })
    .await?;
    ensure!(
        s.last_model_error.contains("SHA-256"),
        "{}",
        s.last_model_error
    );
    ensure!(applied(&s) == Some(1), "{s:?}");

    // Signed with another key.
    publish(update(3, &artifact, &intruder)).await?;
    let s = status_where(&statuses, "version 3 (another key) refused", |s| {
        s.last_model_error.contains("version 3")
    })
    .await?;
    ensure!(
        s.last_model_error.contains("signature"),
        "{}",
        s.last_model_error
    );
    ensure!(applied(&s) == Some(1), "{s:?}");

    // A higher valid version is applied.
    publish(update(4, &artifact, &key)).await?;
    let s = status_where(&statuses, "version 4 applied", |s| applied(s) == Some(4)).await?;
    ensure!(s.last_model_error.is_empty(), "{}", s.last_model_error);

    // A lower version. The bridge only republishes a lower version after a
    // tombstone (the model withdrawn), so withdraw it first; the device
    // keeps its model through the cleared retained message.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()?;
    producer
        .send(
            rdkafka::producer::FutureRecord::<str, [u8]>::to(topics::KAFKA_MODELS).key(&key_of),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    publish(update(2, &artifact, &key)).await?;
    let s = status_where(&statuses, "the lower version 2 refused", |s| {
        s.last_model_error.contains("lower than version 4")
    })
    .await?;
    ensure!(
        s.last_model_error.contains("version 2"),
        "{}",
        s.last_model_error
    );
    ensure!(applied(&s) == Some(4), "{s:?}");

    ensure!(AgentStats::get(&stats.model_updates_applied) == 2);
    ensure!(AgentStats::get(&stats.model_updates_refused) >= 3);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .context("the agent did not stop")???;
    Ok(())
}
