//! Training time per retrain against the number of examples the trainer
//! fits on (sliding window + reservoir), for each device numerics.
//!
//! `cargo bench --bench trainer -- [ROWS,ROWS,...]` (default
//! 1000,5000,20000,50000). Simulated devices (3 channels, window 10, task
//! `anomaly` with 4 classes, labelled with the simulator's truth), one
//! retrain per size and profile, through the trainer's public API
//! (`ingest`, `maybe_retrain`): split, smartcore fit, quantization (int8),
//! the gate's evaluation of the candidate, the decision log. No Kafka: the
//! models go to a temporary directory. Prints figures; asserts nothing.

// A benchmark program: a failure ends it with the reason, like a test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use edgeloop_agent::source::simulator::{Simulator, SimulatorConfig};
use edgeloop_processor::labeller::Labelled;
use edgeloop_processor::trainer::config::TrainerConfig;
use edgeloop_processor::trainer::{DirPublisher, LabelledBatch, Trainer, TrainerStats};
use edgeloop_proto::v1::{Reading, ReadingBatch};

const DEVICES: u64 = 10;
const BATCH: u64 = 50;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(|a| a.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 5_000, 20_000, 50_000]);
    let channels: Vec<String> = SimulatorConfig::default()
        .channels
        .iter()
        .map(|c| c.name.clone())
        .collect();
    println!(
        "rows (window + reservoir) | profile | retrain wall ms | fit+build ms | held-out macro-F1"
    );
    for &rows in &sizes {
        for profile in ["mcu8", "gateway"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = TrainerConfig::simulator(&channels, dir.path().to_path_buf());
            config.profiles.retain(|p| p.name == profile);
            config.window_examples = rows / 2;
            config.reservoir_examples = rows - rows / 2;
            // One retrain, started by hand once the buffer is full.
            config.retrain_every_examples = u64::MAX;
            config.gate.min_holdout = 1;
            let publisher = DirPublisher::new(&config.dir);
            let mut trainer = Trainer::new(config, publisher, Arc::new(TrainerStats::default()));
            // Enough readings to fill the window and the reservoir (plus the
            // first readings of each device, whose window is short).
            let per_device = (rows as u64 / DEVICES + BATCH).div_ceil(BATCH) * BATCH;
            for b in batches(&channels, per_device) {
                trainer.ingest(&b);
            }
            assert!(trainer.buffered("anomaly", profile) >= rows);
            // The time trigger fires on the next call.
            let later = Instant::now() + std::time::Duration::from_secs(3600);
            let start = Instant::now();
            let decisions = trainer.maybe_retrain(later);
            let wall = start.elapsed();
            let d = decisions.first().expect("a retrain");
            println!(
                "{rows:>6} | {profile:>7} ({}) | {:>8.1} | {:>6} | {:.3}",
                d.numerics,
                wall.as_secs_f64() * 1e3,
                d.fit_millis,
                d.candidate.macro_f1
            );
        }
    }
}

/// `DEVICES` simulated devices × `per_device` readings, in batches of
/// `BATCH`, each reading labelled with the simulator's truth.
fn batches(channels: &[String], per_device: u64) -> Vec<LabelledBatch> {
    let mut sims: Vec<Simulator> = (0..DEVICES)
        .map(|d| {
            Simulator::new(SimulatorConfig {
                seed: 100 + d,
                anomaly_rate: 0.02,
                ..SimulatorConfig::default()
            })
        })
        .collect();
    let mut out = Vec::new();
    for chunk in 0..per_device / BATCH {
        for (d, sim) in sims.iter_mut().enumerate() {
            let mut readings = Vec::new();
            let mut labels = Vec::new();
            for i in 0..BATCH {
                let r = sim.next_reading();
                let seq = chunk * BATCH + i;
                readings.push(Reading {
                    ts_micros: 1_800_000_000_000_000 + seq as i64 * 100_000,
                    values: r.values,
                    ..Default::default()
                });
                labels.push(Labelled {
                    label: Some(r.label.to_string()),
                    confidence: Some(1.0),
                });
            }
            out.push(LabelledBatch {
                batch: ReadingBatch {
                    device_id: format!("sim-{d}"),
                    profile: "sim".into(),
                    first_seq: chunk * BATCH,
                    channels: channels.to_vec(),
                    readings,
                    loss: None,
                },
                labels,
                rules_version: Some("truth".into()),
                partition: 0,
                offset: chunk as i64,
            });
        }
    }
    out
}
