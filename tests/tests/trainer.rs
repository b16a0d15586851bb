//! End to end: the real `edgeloop processor` (a child process) reads a
//! simulated fleet's readings from a real Apache Kafka, labels
//! them with the shipped rules, trains a model per device profile on its
//! trainer thread, gates it and writes it with its lineage.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgeloop_agent::source::simulator::{Simulator, SimulatorConfig};
use edgeloop_proto::model::Artifact;
use edgeloop_proto::v1::{Reading, ReadingBatch};
use edgeloop_proto::{topics, Message as _};
use edgeloop_tests::{http_get, start_kafka, wait_for, Component};

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

const RULES: &str = include_str!("../../config/rules.example.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_processor_trains_gates_and_writes_a_model_per_profile_from_a_simulated_fleet(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let metrics = edgeloop_tests::free_addr()?;
    std::fs::write(dir.path().join("rules.toml"), RULES)?;
    let trainer_dir = dir.path().join("trainer");
    // The shipped example config, with training on and small buffers so a
    // first model comes after ~1 500 examples.
    let example = include_str!("../../config/processor.example.toml");
    let mut config: toml::Table = toml::from_str(example)?;
    let trainer = config
        .get_mut("trainer")
        .and_then(|t| t.as_table_mut())
        .context("[trainer] in the example config")?;
    trainer.insert("enabled".into(), true.into());
    trainer.insert(
        "dir".into(),
        trainer_dir.to_string_lossy().into_owned().into(),
    );
    trainer.insert("window_examples".into(), 2000.into());
    trainer.insert("reservoir_examples".into(), 1000.into());
    trainer.insert("retrain_every_examples".into(), 1500.into());
    config.insert(
        "rules_file".into(),
        dir.path()
            .join("rules.toml")
            .to_string_lossy()
            .into_owned()
            .into(),
    );
    let config_path = dir.path().join("processor.toml");
    std::fs::write(&config_path, toml::to_string(&config)?)?;

    let config_arg = config_path.to_string_lossy().into_owned();
    let (bootstrap, listen) = (kafka.bootstrap(), metrics.to_string());
    let mut processor = Component::start(
        &edgeloop_bin(),
        "processor",
        &[
            "processor",
            "--config",
            &config_arg,
            "--kafka",
            &bootstrap,
            "--metrics-listen",
            &listen,
        ],
        dir.path(),
    )?;
    // The processor creates the topics before it serves /metrics.
    wait_for(Duration::from_secs(120), "the processor's /metrics", || {
        let running = processor.check_running();
        async move {
            running?;
            Ok(http_get(metrics, "/metrics").await.ok().map(|_| ()))
        }
    })
    .await
    .with_context(|| processor.tail_log())?;
    // 4 simulated devices × 1 000 readings, 50 per Kafka record.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()?;
    let channels: Vec<String> = SimulatorConfig::default()
        .channels
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for d in 0..4u64 {
        let device = format!("sim-{d}");
        let mut sim = Simulator::new(SimulatorConfig {
            seed: 40 + d,
            anomaly_rate: 0.01,
            ..SimulatorConfig::default()
        });
        for chunk in 0..20u64 {
            let readings = (0..50u64)
                .map(|i| {
                    let r = sim.next_reading();
                    let seq = chunk * 50 + i;
                    Reading {
                        ts_micros: 1_800_000_000_000_000 + seq as i64 * 100_000,
                        values: r.values,
                        true_label: r.label.to_string(),
                        predictions: Vec::new(),
                    }
                })
                .collect();
            let batch = ReadingBatch {
                device_id: device.clone(),
                profile: "mcu8".into(),
                first_seq: chunk * 50,
                channels: channels.clone(),
                readings,
                loss: None,
            };
            producer
                .send(
                    rdkafka::producer::FutureRecord::to(topics::KAFKA_READINGS)
                        .key(&device)
                        .payload(&batch.encode_to_vec()),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
    }

    let models = trainer_dir.join("models/anomaly");
    wait_for(
        Duration::from_secs(600),
        "a model for both profiles",
        || {
            let running = processor.check_running();
            let done = ["mcu8", "gateway"]
                .iter()
                .all(|p| models.join(p).join("v1.bin").exists());
            async move {
                running?;
                Ok(done.then_some(()))
            }
        },
    )
    .await
    .with_context(|| processor.tail_log())?;

    for (profile, format) in [("mcu8", "edgeloop-int8-v1"), ("gateway", "edgeloop-f32-v1")] {
        let artifact = Artifact::decode(&std::fs::read(models.join(profile).join("v1.bin"))?)?;
        ensure!(
            artifact.format() == format,
            "{profile}: {}",
            artifact.format()
        );
        let lineage: serde_json::Value =
            serde_json::from_slice(&std::fs::read(models.join(profile).join("v1.json"))?)?;
        ensure!(lineage["version"] == 1, "{lineage}");
        ensure!(lineage["decision"] == "published", "{lineage}");
        ensure!(lineage["rules_versions"][0] == "sim-v1", "{lineage}");
        ensure!(
            lineage["train_offsets"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{lineage}"
        );
        println!(
            "{profile}: held-out macro-F1 {} accuracy {} ({} bytes, fit {} ms)",
            lineage["candidate"]["macro_f1"],
            lineage["candidate"]["accuracy"],
            lineage["model_bytes"],
            lineage["fit_millis"]
        );
    }
    let log = std::fs::read_to_string(trainer_dir.join("decisions.jsonl"))?;
    ensure!(log.lines().count() >= 2, "{log}");
    let exposition = http_get(metrics, "/metrics").await?;
    ensure!(
        exposition.contains(
            "edgeloop_trainer_gate_decisions_total{task=\"anomaly\",profile=\"mcu8\",decision=\"published\"}"
        ),
        "{exposition}"
    );
    Ok(())
}
