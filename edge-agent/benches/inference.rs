//! On-device inference as the agent runs it: the time per prediction of
//! `Models::annotate` (the reading appended to the device's history, the
//! features of its window by `proto`, the kernel, the `Prediction` built),
//! for an int8 and an f32 artifact of the same model.
//!
//! `cargo bench -p edgeloop-agent --bench inference -- [READINGS]`
//! (default 200,000 readings per case, appended in batches of 10 as the
//! simulator does). Prints figures; asserts nothing.

// A benchmark program: a failure ends it with the reason, like a test.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use edgeloop_agent::models::Models;
use edgeloop_agent::source::simulator::{Simulator, SimulatorConfig};
use edgeloop_agent::AgentStats;
use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{quantize, Artifact, FloatModel};
use edgeloop_proto::signing::{sign_update, SigningKey};
use edgeloop_proto::v1::{ModelUpdate, Reading};
use edgeloop_proto::Message;

const BATCH: usize = 10;

fn readings(n: usize) -> Vec<Reading> {
    let mut sim = Simulator::new(SimulatorConfig::default());
    (0..n)
        .map(|i| Reading {
            ts_micros: 1_800_000_000_000_000 + i as i64 * 100_000,
            values: sim.next_reading().values,
            true_label: String::new(),
            predictions: Vec::new(),
        })
        .collect()
}

/// A model over `channels` of the simulator with `window` and 3 classes,
/// weights spread over every feature.
fn float_model(channels: &[&str], window: usize) -> FloatModel {
    let features = FeatureSet {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        window,
    };
    let n_in = features.len();
    let weights = (0..3 * n_in)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
        .collect();
    FloatModel::new(
        features,
        vec!["normal".into(), "spike".into(), "drift".into()],
        vec![20.0; n_in],
        vec![5.0; n_in],
        weights,
        vec![0.1, -0.2, 0.05],
    )
    .expect("a valid model")
}

fn run_case(name: &str, artifact: Artifact, all: &[Reading]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::from_bytes(&[1; 32]);
    let stats = Arc::new(AgentStats::default());
    let channels = SimulatorConfig::default()
        .channels
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let models = Models::open(
        "bench",
        "int8",
        channels,
        key.verifying_key(),
        dir.path(),
        stats.clone(),
    )
    .expect("model store");
    let mut update = ModelUpdate {
        task: "anomaly".into(),
        profile: "int8".into(),
        version: 1,
        artifact: artifact.encode().into(),
        format: artifact.format().into(),
        ..ModelUpdate::default()
    };
    sign_update(&mut update, &key);
    let outcome = models.apply("models/anomaly/int8", &update.encode_to_vec());
    assert!(
        matches!(outcome, edgeloop_agent::models::Outcome::Applied { .. }),
        "{outcome:?}"
    );
    let mut batches: Vec<Vec<Reading>> = all.chunks(BATCH).map(<[Reading]>::to_vec).collect();
    let start = Instant::now();
    for batch in &mut batches {
        models.annotate(batch);
    }
    let elapsed = start.elapsed();
    let made = AgentStats::get(&stats.predictions_made);
    let failed = AgentStats::get(&stats.predictions_failed);
    println!(
        "{name:<44} {:>8.0} ns/prediction  ({made} predictions, {failed} failed, {:.2} s)",
        elapsed.as_nanos() as f64 / made.max(1) as f64,
        elapsed.as_secs_f64()
    );
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let all = readings(n);
    for (channels, window) in [
        (&["temperature", "humidity"][..], 16),
        (&["temperature", "humidity", "vibration"][..], 64),
    ] {
        let float = float_model(channels, window);
        let calibration: Vec<Vec<f32>> = (0..64)
            .map(|i| {
                (0..float.n_inputs())
                    .map(|j| 10.0 + ((i * 7 + j * 3) % 30) as f32)
                    .collect()
            })
            .collect();
        let int8 = quantize(&float, &calibration).expect("quantizes");
        let what = format!("{} channels, window {window}", channels.len());
        run_case(&format!("int8 ({what})"), Artifact::Int8(int8), &all);
        run_case(&format!("f32  ({what})"), Artifact::F32(float), &all);
    }
}
