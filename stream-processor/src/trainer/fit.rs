//! Fitting a candidate with smartcore, building it in a profile's numerics,
//! and measuring a model on held-out examples in those numerics.
//!
//! The model is the `proto` float model: a multinomial logistic regression
//! over standardized features (`logits = W·((x - mean)/std) + b`). smartcore's
//! `LogisticRegression` (L-BFGS, L2 penalty `alpha/2·‖W‖²`) is fitted on the
//! standardized features; its coefficients become `W` and `b`. With two
//! classes smartcore fits one row (`sigmoid(w·z + b) > ½`), which becomes the
//! logits `[0, w·z + b]`: the same decision under `argmax` (ties go to the
//! first class in both). The model's classes are those present in the
//! training examples, by name.

use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{quantize, Artifact, FloatModel, ModelError};
use serde::Serialize;
use smartcore::linalg::basic::arrays::Array;
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linear::logistic_regression::{LogisticRegression, LogisticRegressionParameters};

use super::buffer::Example;
use super::config::Numerics;

/// Why a candidate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("training needs examples of at least two classes; it has {0}")]
    OneClass(usize),
    #[error("smartcore could not fit the logistic regression: {0}")]
    Smartcore(String),
    #[error("the fitted model is invalid: {0}")]
    Model(#[from] ModelError),
}

/// A model of either numerics, as the device runs it.
pub fn predict(model: &Artifact, x: &[f32]) -> Result<usize, ModelError> {
    match model {
        Artifact::Int8(m) => m.predict(x).map(|p| p.class),
        Artifact::F32(m) => m.predict(x).map(|p| p.class),
    }
}

/// The class names of a model.
pub fn classes(model: &Artifact) -> &[String] {
    match model {
        Artifact::Int8(m) => m.classes(),
        Artifact::F32(m) => m.classes(),
    }
}

/// Fits the float model on `train` (class indices into `task_classes`).
pub fn fit(
    features: &FeatureSet,
    task_classes: &[String],
    train: &[&Example],
    l2: f64,
) -> Result<FloatModel, FitError> {
    let n_in = features.len();
    let mut present: Vec<usize> = train.iter().map(|e| e.class).collect();
    present.sort_unstable();
    present.dedup();
    if present.len() < 2 {
        return Err(FitError::OneClass(present.len()));
    }
    // Standardization, in f64 over the training examples.
    let n = train.len() as f64;
    let mut mean = vec![0f64; n_in];
    for e in train {
        for (m, v) in mean.iter_mut().zip(&e.features) {
            *m += f64::from(*v) / n;
        }
    }
    let mut var = vec![0f64; n_in];
    for e in train {
        for ((s, v), m) in var.iter_mut().zip(&e.features).zip(&mean) {
            *s += (f64::from(*v) - m).powi(2) / n;
        }
    }
    // A constant feature gets std 1 (it carries no information; the model
    // requires std > 0).
    let std: Vec<f32> = var
        .iter()
        .map(|v| {
            let s = v.sqrt() as f32;
            if s.is_finite() && s > 1e-6 {
                s
            } else {
                1.0
            }
        })
        .collect();
    let mean: Vec<f32> = mean.iter().map(|m| *m as f32).collect();
    let rows: Vec<Vec<f64>> = train
        .iter()
        .map(|e| {
            e.features
                .iter()
                .zip(&mean)
                .zip(&std)
                .map(|((x, m), s)| f64::from((x - m) / s))
                .collect()
        })
        .collect();
    let x = DenseMatrix::from_2d_vec(&rows).map_err(|e| FitError::Smartcore(e.to_string()))?;
    // smartcore's classes are the sorted distinct labels: `present`.
    let y: Vec<i32> = train.iter().map(|e| e.class as i32).collect();
    let params = LogisticRegressionParameters::default().with_alpha(l2);
    let lr =
        LogisticRegression::fit(&x, &y, params).map_err(|e| FitError::Smartcore(e.to_string()))?;
    let coefficients = lr.coefficients();
    let intercept = lr.intercept();
    let k = present.len();
    let (mut weights, mut bias) = (Vec::with_capacity(k * n_in), Vec::with_capacity(k));
    if k == 2 {
        weights.extend(std::iter::repeat_n(0f32, n_in));
        bias.push(0f32);
        weights.extend((0..n_in).map(|j| *coefficients.get((0, j)) as f32));
        bias.push(*intercept.get((0, 0)) as f32);
    } else {
        for c in 0..k {
            weights.extend((0..n_in).map(|j| *coefficients.get((c, j)) as f32));
            bias.push(*intercept.get((c, 0)) as f32);
        }
    }
    let names = present
        .iter()
        .map(|&c| {
            task_classes
                .get(c)
                .cloned()
                .unwrap_or_else(|| c.to_string())
        })
        .collect();
    Ok(FloatModel::new(
        features.clone(),
        names,
        mean,
        std,
        weights,
        bias,
    )?)
}

/// The candidate as the profile's devices run it: quantized (calibrated on
/// up to 1000 training inputs, evenly spread) for `int8`, as is for `f32`.
pub fn build(
    float: FloatModel,
    numerics: Numerics,
    train: &[&Example],
) -> Result<Artifact, FitError> {
    match numerics {
        Numerics::F32 => Ok(Artifact::F32(float)),
        Numerics::Int8 => {
            let step = (train.len() / 1000).max(1);
            let calibration: Vec<Vec<f32>> = train
                .iter()
                .step_by(step)
                .map(|e| e.features.clone())
                .collect();
            Ok(Artifact::Int8(quantize(&float, &calibration)?))
        }
    }
}

/// A model's quality on held-out examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Metrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub examples: usize,
}

/// Accuracy and macro-F1 of `(truth, predicted)` pairs; macro-F1 averages
/// the F1 of every class that occurs in the truth or the predictions.
pub fn score(pairs: &[(usize, Option<usize>)]) -> Metrics {
    use std::collections::BTreeMap;
    let mut per: BTreeMap<usize, (f64, f64, f64)> = BTreeMap::new(); // tp, fp, fn
    let mut right = 0usize;
    for &(t, p) in pairs {
        if p == Some(t) {
            right += 1;
            per.entry(t).or_default().0 += 1.0;
        } else {
            per.entry(t).or_default().2 += 1.0;
            if let Some(p) = p {
                per.entry(p).or_default().1 += 1.0;
            }
        }
    }
    let f1s: Vec<f64> = per
        .values()
        .map(|&(tp, fp, fn_)| {
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            }
        })
        .collect();
    Metrics {
        accuracy: if pairs.is_empty() {
            0.0
        } else {
            right as f64 / pairs.len() as f64
        },
        macro_f1: if f1s.is_empty() {
            0.0
        } else {
            f1s.iter().sum::<f64>() / f1s.len() as f64
        },
        examples: pairs.len(),
    }
}

/// Evaluates `model` in its own numerics on `held_out`: the prediction's
/// class name is mapped to the task's class index (a class the model does
/// not know, or an input it refuses, counts as wrong).
pub fn evaluate(model: &Artifact, task_classes: &[String], held_out: &[&Example]) -> Metrics {
    let names = classes(model);
    let pairs: Vec<(usize, Option<usize>)> = held_out
        .iter()
        .map(|e| {
            let p = predict(model, &e.features)
                .ok()
                .and_then(|c| names.get(c))
                .and_then(|name| task_classes.iter().position(|t| t == name));
            (e.class, p)
        })
        .collect();
    score(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn score_counts_accuracy_and_macro_f1() {
        // class 0: tp 2, fn 1; class 1: tp 1, fp 1.
        let m = score(&[(0, Some(0)), (0, Some(0)), (0, Some(1)), (1, Some(1))]);
        assert_eq!(m.accuracy, 0.75);
        let f0 = 2.0 * 2.0 / (4.0 + 1.0);
        let f1 = 2.0 / (2.0 + 1.0);
        assert!((m.macro_f1 - (f0 + f1) / 2.0).abs() < 1e-12);
    }

    fn ex(x: f32, class: usize) -> Example {
        Example {
            features: vec![x, 1.0, 0.0, 0.0, 0.0, 0.0],
            class,
            ts_micros: 0,
            partition: 0,
            offset: 0,
            rules_version: Arc::from("v"),
        }
    }

    #[test]
    fn a_separable_binary_task_is_learned_in_both_numerics() -> Result<(), FitError> {
        let fs = FeatureSet {
            channels: vec!["a".into()],
            window: 1,
        };
        let classes = vec!["low".to_string(), "high".to_string()];
        let data: Vec<Example> = (0..200)
            .map(|i| ex(i as f32 / 10.0, usize::from(i >= 100)))
            .collect();
        let refs: Vec<&Example> = data.iter().collect();
        let float = fit(&fs, &classes, &refs, 0.1)?;
        for numerics in [Numerics::F32, Numerics::Int8] {
            let model = build(float.clone(), numerics, &refs)?;
            let m = evaluate(&model, &classes, &refs);
            assert!(m.accuracy > 0.97, "{numerics:?}: {m:?}");
        }
        Ok(())
    }
}
