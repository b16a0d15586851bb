//! Time per prediction of the int8 kernel (what the agent runs per window),
//! next to the f32 model and the feature extraction, for a small model
//! (2 channels → 12 features, 3 classes) and a large one (64 channels →
//! 384 features, 16 classes).
//!
//! `cargo bench -p edgeloop-proto --bench int8`. Prints figures; asserts
//! nothing.

// A benchmark program: a failure ends it with the reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{quantize, FloatModel};
use edgeloop_proto::v1::Reading;

fn per_call(iterations: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iterations / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(iterations)
}

fn run(channels: usize, classes: usize, window: usize) {
    let names: Vec<String> = (0..channels).map(|c| format!("ch{c}")).collect();
    let features = FeatureSet {
        channels: names.clone(),
        window,
    };
    let n_in = features.len();
    let weights: Vec<f32> = (0..n_in * classes)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let model = FloatModel::new(
        features.clone(),
        (0..classes).map(|c| format!("class{c}")).collect(),
        vec![0.0; n_in],
        vec![1.0; n_in],
        weights,
        vec![0.0; classes],
    )
    .unwrap();
    let calibration: Vec<Vec<f32>> = (0..200)
        .map(|k| {
            (0..n_in)
                .map(|i| ((k * 31 + i * 17) % 200) as f32 / 50.0 - 2.0)
                .collect()
        })
        .collect();
    let start = Instant::now();
    let int8 = quantize(&model, &calibration).unwrap();
    let quantize_us = start.elapsed().as_secs_f64() * 1e6;
    let readings: Vec<Reading> = (0..window as i64)
        .map(|t| Reading {
            ts_micros: t * 1_000_000,
            values: (0..channels)
                .map(|c| (t as f64 * 0.1 + c as f64).sin())
                .collect(),
            true_label: String::new(),
            predictions: Vec::new(),
        })
        .collect();
    let x = features.extract(&names, &readings).unwrap();
    let q = int8.quantize_input(&x).unwrap();
    let iterations = if n_in > 100 { 20_000 } else { 200_000 };
    let extract = per_call(iterations / 10, || {
        black_box(
            features
                .extract(black_box(&names), black_box(&readings))
                .unwrap(),
        );
    });
    let f32_ns = per_call(iterations, || {
        black_box(model.predict(black_box(&x)).unwrap());
    });
    let int8_ns = per_call(iterations, || {
        black_box(int8.predict(black_box(&x)).unwrap());
    });
    let kernel_ns = per_call(iterations, || {
        black_box(int8.predict_quantized(black_box(&q)).unwrap());
    });
    println!(
        "{channels:>3} channels x window {window:>3} -> {n_in:>3} features, {classes:>2} classes: \
         features {extract:>8.0} ns, f32 predict {f32_ns:>6.0} ns, int8 predict {int8_ns:>6.0} ns \
         (kernel alone {kernel_ns:>6.0} ns), quantize {quantize_us:.0} us, \
         artifact {} B, .tflite {} B",
        int8.encode().len(),
        int8.to_tflite().len()
    );
}

fn main() {
    run(2, 3, 16);
    run(64, 16, 64);
}
