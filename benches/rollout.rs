//! Model rollout: the time from publishing a model to every device of a
//! simulated fleet reporting that it applied it (issue 6's benchmark).
//!
//! `cargo bench --bench rollout` (`EDGELOOP_ROLLOUT_DEVICES`, default 1000):
//! a single-node Apache Kafka, the broker (gate, rumqttd,
//! bridge) and the fleet run on this machine; every device is an
//! `edgeloop_agent::run` with its own MQTT connection, spool and the
//! provisioned public key, subscribed to `models/anomaly/f32`. Once every
//! device has reported itself online, the bench signs a model and produces
//! it to `edgeloop.models`, the path the processor's publisher takes; the
//! bridge retains it on `models/anomaly/f32`; each device verifies it,
//! stores it and reports `DeviceStatus.applied_model_versions`. The
//! latency of a device is its first status naming the new version (its
//! `ts_micros`, set by the device when it reports; same host, same clock)
//! minus the moment the bench began producing the model. Two rollouts: v1
//! to devices with no model, then v2 to devices running v1.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use edgeloop_agent::{AgentConfig, AgentStats};
use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{Artifact, FloatModel};
use edgeloop_proto::v1::{DeviceStatus, ModelUpdate};
use edgeloop_proto::{signing, topics, Message as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const TASK: &str = "anomaly";
const PROFILE: &str = "f32";

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A small float model over the simulator's channels (its weights do not
/// matter here: devices run whatever verifies).
fn artifact(seed: f32) -> Result<Artifact> {
    let features = FeatureSet {
        channels: ["temperature", "humidity", "vibration"]
            .map(String::from)
            .to_vec(),
        window: 10,
    };
    let n = features.len();
    let classes: Vec<String> = ["normal", "spike", "drift", "stuck"]
        .map(String::from)
        .to_vec();
    let weights = (0..n * classes.len())
        .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.5)
        .collect();
    Ok(Artifact::F32(FloatModel::new(
        features,
        classes,
        vec![0.0; n],
        vec![1.0; n],
        weights,
        vec![0.0; 4],
    )?))
}

fn update(version: u64, key: &signing::SigningKey) -> Result<ModelUpdate> {
    let artifact = artifact(version as f32)?;
    let mut u = ModelUpdate {
        task: TASK.into(),
        profile: PROFILE.into(),
        version,
        format: artifact.format().into(),
        artifact: artifact.encode().into(),
        published_at_micros: now_micros(),
        lineage_json: "{\"bench\":\"rollout\"}".into(),
        ..Default::default()
    };
    signing::sign_update(&mut u, key);
    Ok(u)
}

/// Follows `edgeloop.status` from the beginning.
fn status_consumer(bootstrap: &str) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "rollout-bench")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topics::KAFKA_STATUS), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            assignment.add_partition_offset(topics::KAFKA_STATUS, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Polls statuses until `done` says every device is there; `each` sees
/// every status. Fails after `limit`.
fn follow(
    consumer: &BaseConsumer,
    limit: Duration,
    what: &str,
    mut each: impl FnMut(&DeviceStatus) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let Some(payload) = m.payload() else { continue };
                let Ok(status) = DeviceStatus::decode(payload) else {
                    continue;
                };
                if each(&status) {
                    return Ok(());
                }
            }
            Some(Err(e)) => bail!("reading {}: {e}", topics::KAFKA_STATUS),
            None => {}
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn rollout(
    bootstrap: &str,
    consumer: &BaseConsumer,
    devices: usize,
    version: u64,
    key: &signing::SigningKey,
) -> Result<Vec<f64>> {
    let u = update(version, key)?;
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .create()?;
    let t0 = now_micros();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topics::KAFKA_MODELS)
                .key(&topics::model_key(TASK, PROFILE))
                .payload(&u.encode_to_vec()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let produced = now_micros() - t0;
    let mut applied: HashMap<String, i64> = HashMap::new();
    follow(
        consumer,
        Duration::from_secs(300),
        &format!("every device to report v{version}"),
        |s| {
            if s.applied_model_versions.get(TASK).copied().unwrap_or(0) >= version {
                applied
                    .entry(s.device_id.clone())
                    .or_insert(s.ts_micros - t0);
            }
            applied.len() >= devices
        },
    )
    .with_context(|| format!("{} of {devices} devices reported", applied.len()))?;
    let mut ms: Vec<f64> = applied.values().map(|us| *us as f64 / 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "rollout v{version}: {} devices applied it; publish to device report p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (producing to Kafka took {:.0} ms)",
        ms.len(),
        quantile(&ms, 0.5),
        quantile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN),
        produced as f64 / 1000.0,
    );
    Ok(ms)
}

async fn run(dir: &Path, devices: usize) -> Result<()> {
    let kafka = edgeloop_tests::start_kafka(dir).await?;
    let bootstrap = kafka.bootstrap();
    let mqtt = edgeloop_tests::free_addr()?;
    let mut broker = edgeloop_broker::BrokerConfig::default();
    broker.mqtt.listen = mqtt;
    broker.mqtt.max_connections = broker.mqtt.max_connections.max(devices + 100);
    broker.auth.allow_anonymous = true;
    broker.kafka.bootstrap_servers = bootstrap.clone();
    let stop = CancellationToken::new();
    let ready = CancellationToken::new();
    let broker_task = tokio::spawn(edgeloop_broker::run(
        broker,
        stop.clone(),
        ready.clone(),
        Arc::new(edgeloop_broker::stats::BrokerStats::default()),
    ));
    tokio::time::timeout(Duration::from_secs(60), ready.cancelled())
        .await
        .context("the broker did not start")?;

    let key = signing::SigningKey::from_bytes(&[7; 32]);
    let public = dir.join("signing.pub");
    std::fs::write(
        &public,
        signing::to_hex(key.verifying_key().as_bytes()) + "\n",
    )?;
    let mut agent = AgentConfig {
        profile: PROFILE.into(),
        ..AgentConfig::default()
    };
    agent.mqtt.host = mqtt.ip().to_string();
    agent.mqtt.port = mqtt.port();
    agent.spool.dir = dir.join("spool");
    agent.models.verify_key_file = Some(public);
    if let edgeloop_agent::config::SourceConfig::Simulator(sim) = &mut agent.source {
        sim.rate_hz = 1.0;
    }
    let fleet_stop = CancellationToken::new();
    let fleet = {
        let stop = fleet_stop.clone();
        tokio::spawn(edgeloop_agent::run_fleet(
            agent,
            "rollout",
            devices,
            stop,
            Arc::new(AgentStats::default()),
        ))
    };
    let started = Instant::now();
    let consumer = status_consumer(&bootstrap)?;
    let mut online = std::collections::HashSet::new();
    follow(
        &consumer,
        Duration::from_secs(300),
        "every device to report online",
        |s| {
            if s.online {
                online.insert(s.device_id.clone());
            }
            online.len() >= devices
        },
    )?;
    println!(
        "{devices} devices online after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    rollout(&bootstrap, &consumer, devices, 1, &key).await?;
    rollout(&bootstrap, &consumer, devices, 2, &key).await?;
    fleet_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(60), fleet).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), broker_task).await;
    kafka.stop(Duration::from_secs(5)).await;
    Ok(())
}

fn main() -> Result<()> {
    // `cargo test --benches` runs every bench binary with `--bench`-less
    // arguments; this one only runs under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let devices = std::env::var("EDGELOOP_ROLLOUT_DEVICES")
        .ok()
        .map(|v| v.parse::<usize>())
        .transpose()
        .context("EDGELOOP_ROLLOUT_DEVICES")?
        .unwrap_or(1000);
    let dir = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "model rollout to {devices} simulated devices ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    runtime.block_on(run(dir.path(), devices))
}
