//! The trainer's Kafka model publisher against a real Kafka-API broker
//! (Apache Kafka): signed versions on `edgeloop.models`, versions written by
//! another producer (a rollback through the control API) followed, and
//! publishing held while `edgeloop.pins` pins the (task, profile).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgeloop_kafka::KafkaConfig;
use edgeloop_processor::control::registry::Pin;
use edgeloop_processor::labeller::Labelled;
use edgeloop_processor::trainer::config::{DeviceProfile, Numerics, TaskConfig, TrainerConfig};
use edgeloop_processor::trainer::gate::Verdict;
use edgeloop_processor::trainer::{
    DirPublisher, KafkaPublisher, LabelledBatch, PublishError, Publisher, Trainer, TrainerStats,
};
use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{quantize, Artifact, FloatModel};
use edgeloop_proto::signing::{self, SigningKey};
use edgeloop_proto::v1::{ModelUpdate, Reading, ReadingBatch};
use edgeloop_proto::{topics, Message as _};
use edgeloop_tests::{produce, read_topic, start_kafka, wait_for};

const TASK: &str = "anomaly";
const PROFILE: &str = "mcu8";

fn features() -> FeatureSet {
    FeatureSet {
        channels: vec!["a".into()],
        window: 1,
    }
}

fn artifact(numerics: Numerics, bias: f32) -> Result<Artifact> {
    let mut weights = vec![0f32; 12];
    weights[6 + 5] = 1.0;
    let float = FloatModel::new(
        features(),
        vec!["low".into(), "high".into()],
        vec![0.0; 6],
        vec![1.0; 6],
        weights,
        vec![0.0, bias],
    )?;
    Ok(match numerics {
        Numerics::F32 => Artifact::F32(float),
        Numerics::Int8 => {
            let calibration: Vec<Vec<f32>> = (0..20).map(|i| vec![i as f32 / 2.0; 6]).collect();
            Artifact::Int8(quantize(&float, &calibration)?)
        }
    })
}

fn publish(p: &mut KafkaPublisher, a: &Artifact) -> Result<u64, PublishError> {
    // The publisher blocks until Kafka has the model (it runs on the
    // trainer's own thread in the processor).
    tokio::task::block_in_place(|| {
        p.publish(
            TASK,
            PROFILE,
            a,
            &serde_json::json!({"decision": "published"}),
        )
    })
}

fn models(kafka: &edgeloop_kafka::local::LocalKafka) -> Result<Vec<(String, ModelUpdate)>> {
    read_topic(kafka, topics::KAFKA_MODELS)?
        .into_iter()
        .map(|m| {
            use rdkafka::Message as _;
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            Ok((key, ModelUpdate::decode(m.payload().unwrap_or_default())?))
        })
        .collect()
}

async fn live_version(p: &KafkaPublisher, want: u64, what: &str) -> Result<()> {
    wait_for(Duration::from_secs(20), what, || {
        let live = p.live(TASK, PROFILE).map(|l| l.map(|(v, _)| v));
        async move { Ok((live? == Some(want)).then_some(())) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_publisher_signs_versions_follows_rollbacks_and_holds_while_pinned() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let config = KafkaConfig {
        bootstrap_servers: kafka.bootstrap(),
        ..KafkaConfig::default()
    };
    let key = SigningKey::from_bytes(&[7; 32]);
    let mirror = dir.path().join("trainer");
    let catch_up = Duration::from_secs(20);
    let mut p = KafkaPublisher::start(
        &config,
        key.clone(),
        Some(DirPublisher::new(&mirror)),
        catch_up,
    )
    .await?;
    ensure!(p.live(TASK, PROFILE)?.is_none());

    // v1 (f32) and v2 (int8): signed, keyed task/profile, lineage kept.
    let (a1, a2) = (
        artifact(Numerics::F32, -5.5)?,
        artifact(Numerics::Int8, -4.5)?,
    );
    ensure!(publish(&mut p, &a1)? == 1);
    ensure!(publish(&mut p, &a2)? == 2);
    let records = models(&kafka)?;
    ensure!(records.len() == 2, "{} records", records.len());
    let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
    for (i, (k, u)) in records.iter().enumerate() {
        ensure!(k == "anomaly/mcu8", "key {k}");
        ensure!(u.version == i as u64 + 1 && u.task == TASK && u.profile == PROFILE);
        signing::verify_update(u, &key.verifying_key())
            .with_context(|| format!("v{} does not verify", u.version))?;
        ensure!(
            signing::verify_update(u, &other).is_err(),
            "verifies with any key"
        );
        ensure!(u.published_at_micros > 0);
        let lineage: serde_json::Value = serde_json::from_str(&u.lineage_json)?;
        ensure!(lineage["decision"] == "published" && lineage["version"] == u.version);
        ensure!(Artifact::decode(&u.artifact)?.format() == u.format);
    }
    ensure!(records[0].1.format == "edgeloop-f32-v1" && records[1].1.format == "edgeloop-int8-v1");
    // The mirror for humans and `edgeloop report`.
    ensure!(mirror.join("models/anomaly/mcu8/v2.bin").exists());
    ensure!(p.live(TASK, PROFILE)?.map(|(v, _)| v) == Some(2));

    // A rollback by another producer (the control API republishes v1's
    // artifact as v3): followed; v3 is live with v1's artifact; the next
    // publication is v4.
    let mut rollback = records[0].1.clone();
    rollback.version = 3;
    rollback.lineage_json = r#"{"rollback":{"republishes_version":1}}"#.into();
    signing::sign_update(&mut rollback, &key);
    produce(
        &kafka,
        topics::KAFKA_MODELS,
        &topics::model_key(TASK, PROFILE),
        &rollback.encode_to_vec(),
    )
    .await?;
    live_version(&p, 3, "the rollback to be live").await?;
    ensure!(p.live(TASK, PROFILE)?.map(|(_, a)| a) == Some(a1.clone()));
    ensure!(p.artifact(TASK, PROFILE, 2).as_deref() == Some(&a2));
    ensure!(publish(&mut p, &a2)? == 4);

    // A publisher started afresh catches up with what is in the topic.
    drop(p);
    let p = KafkaPublisher::start(&config, key.clone(), None, catch_up).await?;
    ensure!(
        p.live(TASK, PROFILE)?.map(|(v, _)| v) == Some(4),
        "after a restart: {:?}",
        p.live(TASK, PROFILE)?.map(|(v, _)| v)
    );

    // A pin: nothing is published; the trainer's decision says why.
    let pin = Pin {
        task: TASK.into(),
        profile: PROFILE.into(),
        version: 4,
        pinned_at_micros: 1,
    };
    produce(
        &kafka,
        topics::KAFKA_PINS,
        &topics::model_key(TASK, PROFILE),
        &serde_json::to_vec(&pin)?,
    )
    .await?;
    wait_for(Duration::from_secs(20), "the pin to be read", || {
        let pinned = p.pinned(TASK, PROFILE);
        async move { Ok((pinned == Some(4)).then_some(())) }
    })
    .await?;
    let stats = Arc::new(TrainerStats::default());
    let mut trainer = Trainer::new(trainer_config(dir.path()), p, stats);
    let mut decisions = Vec::new();
    for b in labelled(400) {
        trainer.ingest(&b);
        decisions.extend(tokio::task::block_in_place(|| {
            trainer.maybe_retrain(std::time::Instant::now())
        }));
    }
    let d = decisions.first().context("no retrain")?;
    ensure!(d.decision == Verdict::Pinned, "{d:?}");
    ensure!(d.reason.starts_with("pinned at v4"), "{}", d.reason);
    ensure!(d.version.is_none() && d.live_version == Some(4), "{d:?}");
    ensure!(models(&kafka)?.len() == 4, "nothing published while pinned");
    drop(trainer);

    // Unpinned (a tombstone): publishing resumes above every version.
    let mut p = KafkaPublisher::start(&config, key.clone(), None, catch_up).await?;
    ensure!(
        p.pinned(TASK, PROFILE) == Some(4),
        "pins are caught up at start"
    );
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()?;
    producer
        .send(
            rdkafka::producer::FutureRecord::<str, [u8]>::to(topics::KAFKA_PINS)
                .key(&topics::model_key(TASK, PROFILE)),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    wait_for(Duration::from_secs(20), "the unpin to be read", || {
        let pinned = p.pinned(TASK, PROFILE);
        async move { Ok(pinned.is_none().then_some(())) }
    })
    .await?;
    ensure!(publish(&mut p, &a1)? == 5);
    Ok(())
}

fn trainer_config(dir: &std::path::Path) -> TrainerConfig {
    let mut c = TrainerConfig {
        enabled: true,
        dir: dir.join("pinned-trainer"),
        profiles: vec![DeviceProfile {
            name: PROFILE.into(),
            numerics: Numerics::Int8,
            max_model_bytes: 4096,
            features: features(),
            tasks: vec![TASK.into()],
        }],
        tasks: vec![TaskConfig {
            name: TASK.into(),
            classes: vec!["low".into(), "high".into()],
            other: None,
        }],
        retrain_every_examples: 300,
        ..TrainerConfig::default()
    };
    c.gate.min_holdout = 20;
    c
}

/// `n` readings of one device, one per batch, labelled `high` above 5.
fn labelled(n: u64) -> Vec<LabelledBatch> {
    (0..n)
        .map(|seq| {
            let v = (seq * 7 % 11) as f64;
            LabelledBatch {
                batch: ReadingBatch {
                    device_id: "d".into(),
                    profile: PROFILE.into(),
                    first_seq: seq,
                    channels: vec!["a".into()],
                    readings: vec![Reading {
                        ts_micros: 1_800_000_000_000_000 + seq as i64 * 100_000,
                        values: vec![v],
                        ..Default::default()
                    }],
                    loss: None,
                },
                labels: vec![Labelled {
                    label: Some(if v > 5.0 { "high" } else { "low" }.into()),
                    confidence: Some(1.0),
                }],
                rules_version: Some("r1".into()),
                partition: 0,
                offset: seq as i64,
            }
        })
        .collect()
}
