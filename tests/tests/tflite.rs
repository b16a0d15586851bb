//! The int8 model against TensorFlow Lite Micro: edgeloop's integer kernel
//! (`edgeloop_proto::model`) and TFLM's interpreter (the `tflite-micro` PyPI
//! package, installed by scripts/setup.sh) run the same exported `.tflite`
//! on a corpus of inputs, and every int8 output must be identical. Also
//! measures the accuracy the int8 model loses against the f32 model on
//! held-out data from a known distribution.
//!
//! The data: windows of 16 one-second readings of two channels (temp, hum)
//! from three classes that overlap on purpose — `steady`, `heating` (temp
//! rises), `humid` (hum is higher) — turned into features by
//! `FeatureSet::extract`, the function the agent runs. The model is a
//! softmax regression fitted here by gradient descent (the trainer's
//! smartcore fit is another issue; any fitted weights do).

use std::path::Path;

use anyhow::{ensure, Context, Result};
use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{quantize, FloatModel, Int8Model};
use edgeloop_proto::v1::Reading;

const REFERENCE: &str = include_str!("tflm_reference.py");
const CLASSES: [&str; 3] = ["steady", "heating", "humid"];

/// splitmix64: a small seeded generator, so every run sees the same data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }
    fn int8(&mut self) -> i8 {
        self.next_u64() as u8 as i8
    }
}

fn feature_set() -> FeatureSet {
    FeatureSet {
        channels: vec!["temp".into(), "hum".into()],
        window: 16,
    }
}

/// One window of readings of class `class`, and its features.
fn sample(rng: &mut Rng, class: usize) -> Result<Vec<f32>> {
    let temp0 = 21.0 + 1.5 * rng.normal();
    let hum0 = 45.0 + 5.0 * rng.normal() + if class == 2 { 8.0 } else { 0.0 };
    let slope = if class == 1 {
        0.12 + 0.08 * rng.normal()
    } else {
        0.03 * rng.normal()
    };
    let readings: Vec<Reading> = (0..16)
        .map(|t| Reading {
            ts_micros: 1_750_000_000_000_000 + t * 1_000_000,
            values: vec![
                temp0 + slope * t as f64 + 0.5 * rng.normal(),
                hum0 + 2.0 * rng.normal(),
            ],
            true_label: CLASSES[class].into(),
            predictions: Vec::new(),
        })
        .collect();
    let channels = vec!["temp".to_string(), "hum".to_string()];
    Ok(feature_set().extract(&channels, &readings)?)
}

fn dataset(rng: &mut Rng, n: usize) -> Result<Vec<(Vec<f32>, usize)>> {
    (0..n)
        .map(|_| {
            let class = rng.below(CLASSES.len());
            Ok((sample(rng, class)?, class))
        })
        .collect()
}

/// Softmax regression by full-batch gradient descent on standardized
/// features (f64), with a little L2.
fn fit(train: &[(Vec<f32>, usize)]) -> Result<FloatModel> {
    let n_in = feature_set().len();
    let n_out = CLASSES.len();
    let n = train.len() as f64;
    let mut mean = vec![0f64; n_in];
    for (x, _) in train {
        for (m, v) in mean.iter_mut().zip(x) {
            *m += f64::from(*v) / n;
        }
    }
    let mut std = vec![0f64; n_in];
    for (x, _) in train {
        for ((s, v), m) in std.iter_mut().zip(x).zip(&mean) {
            *s += (f64::from(*v) - m).powi(2) / n;
        }
    }
    let std: Vec<f64> = std.iter().map(|s| s.sqrt().max(1e-6)).collect();
    let z: Vec<Vec<f64>> = train
        .iter()
        .map(|(x, _)| {
            x.iter()
                .zip(&mean)
                .zip(&std)
                .map(|((v, m), s)| (f64::from(*v) - m) / s)
                .collect()
        })
        .collect();
    let mut w = vec![0f64; n_out * n_in];
    let mut b = vec![0f64; n_out];
    for _ in 0..400 {
        let mut gw = vec![0f64; n_out * n_in];
        let mut gb = vec![0f64; n_out];
        for (zi, (_, y)) in z.iter().zip(train) {
            let logits: Vec<f64> = (0..n_out)
                .map(|c| b[c] + (0..n_in).map(|i| w[c * n_in + i] * zi[i]).sum::<f64>())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = exp.iter().sum();
            for c in 0..n_out {
                let g = exp[c] / total - f64::from(u8::from(c == *y));
                gb[c] += g / n;
                for i in 0..n_in {
                    gw[c * n_in + i] += g * zi[i] / n;
                }
            }
        }
        for (wi, gi) in w.iter_mut().zip(&gw) {
            *wi -= 0.5 * (gi + 1e-3 * *wi);
        }
        for (bi, gi) in b.iter_mut().zip(&gb) {
            *bi -= 0.5 * gi;
        }
    }
    Ok(FloatModel::new(
        feature_set(),
        CLASSES.iter().map(|c| c.to_string()).collect(),
        mean.iter().map(|v| *v as f32).collect(),
        std.iter().map(|v| *v as f32).collect(),
        w.iter().map(|v| *v as f32).collect(),
        b.iter().map(|v| *v as f32).collect(),
    )?)
}

/// TFLite's single-rounding `MultiplyByQuantizedMultiplier`
/// (`TFLITE_SINGLE_ROUNDING`, XNNPACK's behaviour): to count how many corpus
/// outputs sit where the two rounding modes disagree.
fn single_rounding(acc: i32, multiplier: i32, shift: i32, zero_point: i32) -> i8 {
    let total_shift = 31 - shift;
    let round = 1i64 << (total_shift - 1);
    let result = (i64::from(acc) * i64::from(multiplier) + round) >> total_shift;
    (result + i64::from(zero_point)).clamp(-128, 127) as i8
}

/// Runs TFLM on `rows`; its int8 outputs and JSON report.
fn run_tflm(
    dir: &Path,
    tflite: &[u8],
    rows: &[Vec<i8>],
    n_in: usize,
) -> Result<(Vec<i8>, serde_json::Value)> {
    let model = dir.join("model.tflite");
    let inputs = dir.join("inputs.bin");
    let outputs = dir.join("outputs.bin");
    std::fs::write(&model, tflite)?;
    let bytes: Vec<u8> = rows.iter().flatten().map(|v| *v as u8).collect();
    std::fs::write(&inputs, bytes)?;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(REFERENCE)
        .arg(&model)
        .arg(&inputs)
        .arg(&outputs)
        .arg(n_in.to_string())
        .output()
        .context("python3 (scripts/setup.sh installs tflite-micro)")?;
    ensure!(
        out.status.success(),
        "TFLM reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let outputs = std::fs::read(&outputs)?
        .into_iter()
        .map(|b| b as i8)
        .collect();
    Ok((outputs, report))
}

/// What a corpus exercised.
struct Stats {
    outputs: usize,
    saturated: usize,
    rounding_edges: usize,
}

/// Runs `corpus` through edgeloop's kernel and through TFLM on the exported
/// `.tflite`; fails unless every output is identical and the file reads back
/// as intended with TFLite's own schema code.
fn compare_with_tflm(int8: &Int8Model, corpus: &[Vec<i8>]) -> Result<Stats> {
    let n_in = int8.n_inputs();
    let n_out = int8.classes().len();
    // Our outputs, and where they sit: saturated, or where single rounding
    // (XNNPACK) would differ from TFLM's double rounding.
    let out_zp = int8.output_quantization().zero_point;
    let mut ours: Vec<i8> = Vec::new();
    let (mut saturated, mut rounding_edges) = (0usize, 0usize);
    for row in corpus {
        let logits = int8.logits_quantized(row)?;
        let accs = int8.accumulators(row)?;
        for ((logit, acc), (m, s)) in logits.iter().zip(&accs).zip(int8.multipliers()) {
            saturated += usize::from(*logit == -128 || *logit == 127);
            rounding_edges += usize::from(single_rounding(*acc, *m, *s, out_zp) != *logit);
        }
        ours.extend(logits);
    }

    let dir = tempfile::tempdir()?;
    let (theirs, report) = run_tflm(dir.path(), &int8.to_tflite(), corpus, n_in)?;

    // The file as TFLite's own generated schema code reads it.
    let structure = &report["structure"];
    ensure!(
        structure["version"] == 3 && structure["identifier_ok"] == true,
        "schema version 3, identifier TFL3: {structure}"
    );
    ensure!(
        structure["operators"] == serde_json::json!([9]),
        "one FULLY_CONNECTED: {structure}"
    );
    let weights = &structure["tensors"][1];
    ensure!(
        weights["type"] == 9 && weights["scales"] == n_out && weights["quantized_dimension"] == 0,
        "int8 weights with one scale per class on dimension 0: {structure}"
    );
    ensure!(
        structure["tensors"][2]["type"] == 2,
        "int32 bias: {structure}"
    );
    let standardization: Vec<f64> =
        serde_json::from_value(structure["metadata"]["edgeloop.standardization"].clone())?;
    let (mean, std) = int8.standardization();
    let expected: Vec<f64> = mean.iter().chain(std).map(|v| f64::from(*v)).collect();
    ensure!(
        standardization == expected,
        "standardization metadata: {standardization:?}"
    );
    ensure!(
        report["input"]["zero_points"][0] == int8.input_quantization().zero_point
            && report["output"]["zero_points"][0] == int8.output_quantization().zero_point,
        "TFLM read other zero points: {report}"
    );

    ensure!(
        theirs.len() == ours.len(),
        "TFLM gave {} outputs for our {}",
        theirs.len(),
        ours.len()
    );
    let mismatches: Vec<usize> = (0..ours.len()).filter(|i| ours[*i] != theirs[*i]).collect();
    if let Some(first) = mismatches.first() {
        let row = first / n_out;
        anyhow::bail!(
            "{} of {} int8 outputs differ from TFLM; first: input row {row} {:?}: ours {:?}, TFLM {:?}",
            mismatches.len(),
            ours.len(),
            corpus[row],
            &ours[row * n_out..(row + 1) * n_out],
            &theirs[row * n_out..(row + 1) * n_out]
        );
    }
    Ok(Stats {
        outputs: ours.len(),
        saturated,
        rounding_edges,
    })
}

#[test]
fn int8_kernel_matches_tflite_micro_bit_for_bit_and_stays_close_to_f32() -> Result<()> {
    let mut rng = Rng(0x5eed_0006);
    let train = dataset(&mut rng, 1500)?;
    let held_out = dataset(&mut rng, 3000)?;
    let float = fit(&train)?;
    let calibration: Vec<Vec<f32>> = train.iter().take(500).map(|(x, _)| x.clone()).collect();
    let int8 = quantize(&float, &calibration)?;
    // What the device receives: the artifact, decoded.
    let int8 = Int8Model::decode(&int8.encode())?;
    let n_in = int8.n_inputs();
    // Per-channel weights: the rows must really have different scales, or
    // TFLM's per-channel path would not be tested.
    let scales = int8.weight_scales();
    println!("weight scales per class: {scales:?}");
    ensure!(
        scales.iter().any(|s| *s != scales[0]),
        "all weight scales are equal; the per-channel path is not exercised"
    );

    // Accuracy on held-out data, f32 against int8 (the int8 path starts
    // from the same raw features and quantizes them itself).
    let (mut right_f32, mut right_int8, mut agree) = (0usize, 0usize, 0usize);
    let mut corpus: Vec<Vec<i8>> = Vec::new();
    for (x, y) in &held_out {
        let f = float.predict(x)?;
        let q = int8.predict(x)?;
        right_f32 += usize::from(f.class == *y);
        right_int8 += usize::from(q.class == *y);
        agree += usize::from(f.class == q.class);
        corpus.push(int8.quantize_input(x)?);
    }
    let n = held_out.len() as f64;
    let (acc_f32, acc_int8) = (right_f32 as f64 / n, right_int8 as f64 / n);
    println!(
        "held-out accuracy: f32 {:.4}, int8 {:.4}, gap {:+.4}; int8 predicts the f32 class on {:.4}",
        acc_f32,
        acc_int8,
        acc_int8 - acc_f32,
        agree as f64 / n
    );
    ensure!(
        acc_f32 > 0.6,
        "the f32 model learned too little ({acc_f32:.3}); the data has structure"
    );
    ensure!(
        (acc_f32 - acc_int8).abs() <= 0.01,
        "int8 accuracy {acc_int8:.4} is more than 1 point from f32's {acc_f32:.4}"
    );

    // Saturating inputs: every value at -128 or 127, alternating, and
    // features far outside the calibration range (huge logits that clip).
    corpus.push(vec![-128; n_in]);
    corpus.push(vec![127; n_in]);
    corpus.push(
        (0..n_in)
            .map(|i| if i % 2 == 0 { 127 } else { -128 })
            .collect(),
    );
    corpus.push(
        (0..n_in)
            .map(|i| if i % 2 == 0 { -128 } else { 127 })
            .collect(),
    );
    for (x, _) in held_out.iter().take(200) {
        let far: Vec<f32> = x.iter().map(|v| v * 25.0 - 300.0).collect();
        corpus.push(int8.quantize_input(&far)?);
    }
    // Uniformly random int8 inputs.
    for _ in 0..5000 {
        corpus.push((0..n_in).map(|_| rng.int8()).collect());
    }
    // Rounding edges: random inputs, kept where TFLM's double rounding and
    // a single rounding give different outputs (ties and near-ties of the
    // requantization), until 300 such inputs are found.
    let mut edges_found = 0;
    for _ in 0..500_000 {
        if edges_found == 300 {
            break;
        }
        let row: Vec<i8> = (0..n_in).map(|_| rng.int8()).collect();
        let logits = int8.logits_quantized(&row)?;
        let accs = int8.accumulators(&row)?;
        let zp = int8.output_quantization().zero_point;
        let edge = logits
            .iter()
            .zip(&accs)
            .zip(int8.multipliers())
            .any(|((l, a), (m, s))| single_rounding(*a, *m, *s, zp) != *l);
        if edge {
            edges_found += 1;
            corpus.push(row);
        }
    }

    let stats = compare_with_tflm(&int8, &corpus)?;
    println!(
        "corpus: {} inputs, {} outputs, {} saturated, {} where single rounding would differ; all identical to TFLM",
        corpus.len(),
        stats.outputs,
        stats.saturated,
        stats.rounding_edges
    );
    ensure!(
        stats.saturated > 100,
        "the corpus must exercise saturation ({})",
        stats.saturated
    );
    ensure!(
        stats.rounding_edges >= 300,
        "the corpus must include rounding-edge cases ({})",
        stats.rounding_edges
    );
    Ok(())
}

/// A model whose requantization multipliers are above one (positive shift,
/// the left-shift path of MultiplyByQuantizedMultiplier): its rows sum to
/// (nearly) zero and it is calibrated on inputs along the all-equal
/// diagonal, so the calibrated logit range is tiny while the input range is
/// wide. Inputs on the diagonal with one or two values nudged give
/// mid-range outputs; random inputs saturate.
#[test]
fn int8_kernel_matches_tflite_micro_when_multipliers_exceed_one() -> Result<()> {
    let n_in = feature_set().len();
    let mut rng = Rng(0x5eed_0106);
    let mut weights = Vec::new();
    for _ in 0..CLASSES.len() {
        let row: Vec<f64> = (0..n_in).map(|_| rng.uniform() * 2.0 - 1.0).collect();
        let mean = row.iter().sum::<f64>() / n_in as f64;
        weights.extend(row.iter().map(|w| (w - mean) as f32));
    }
    let float = FloatModel::new(
        feature_set(),
        CLASSES.iter().map(|c| c.to_string()).collect(),
        vec![0.0; n_in],
        vec![1.0; n_in],
        weights,
        vec![0.008, -0.005, 0.003],
    )?;
    let calibration: Vec<Vec<f32>> = (-20..=20).map(|t| vec![t as f32 / 10.0; n_in]).collect();
    let int8 = Int8Model::decode(&quantize(&float, &calibration)?.encode())?;
    let shifts: Vec<i32> = int8.multipliers().iter().map(|(_, s)| *s).collect();
    println!("multipliers: {:?}", int8.multipliers());
    ensure!(
        shifts.iter().all(|s| *s > 0),
        "the model must have multipliers above one: {shifts:?}"
    );
    let mut corpus: Vec<Vec<i8>> = vec![vec![-128; n_in], vec![127; n_in]];
    for _ in 0..4000 {
        let base = rng.int8();
        let mut row = vec![base; n_in];
        for _ in 0..1 + rng.below(2) {
            let i = rng.below(n_in);
            let nudge = rng.below(5) as i32 - 2;
            row[i] = (i32::from(row[i]) + nudge).clamp(-128, 127) as i8;
        }
        corpus.push(row);
    }
    for _ in 0..1000 {
        corpus.push((0..n_in).map(|_| rng.int8()).collect());
    }
    let stats = compare_with_tflm(&int8, &corpus)?;
    let mid = stats.outputs - stats.saturated;
    println!(
        "corpus: {} inputs, {} outputs, {} saturated, {} mid-range, {} where single rounding would differ; all identical to TFLM",
        corpus.len(),
        stats.outputs,
        stats.saturated,
        mid,
        stats.rounding_edges
    );
    ensure!(
        mid > 1000,
        "too few mid-range outputs ({mid}) to test the rounding"
    );
    ensure!(
        stats.saturated > 1000,
        "too few saturated outputs ({})",
        stats.saturated
    );
    Ok(())
}
