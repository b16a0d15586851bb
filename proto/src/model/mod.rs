//! Models as the device runs them: the float model, its int8 quantization
//! the TFLite way, the integer-only kernel, the artifact formats and the
//! `.tflite` export. No I/O.
//!
//! - [`FloatModel`]: one fully connected layer (multinomial logistic
//!   regression) over standardized features; `f32` inference for the `f32`
//!   device profile.
//! - [`quantize()`]: float model + calibration inputs → [`Int8Model`]
//!   (affine int8 activations, symmetric per-output-channel int8 weights,
//!   int32 bias, fixed-point requantization).
//! - [`Int8Model::predict`]: input quantization (the only float step), then
//!   the integer-only kernel ([`kernel`]), bit-identical to TensorFlow Lite
//!   Micro's `FULLY_CONNECTED` int8 reference kernel.
//! - [`fixed_point`]: TFLite's `QuantizeMultiplier` and
//!   `MultiplyByQuantizedMultiplier` (double rounding).
//! - [`codec`]: the `edgeloop-int8-v1` and `edgeloop-f32-v1` artifacts,
//!   `encode()` / `decode()` (decode never panics).
//! - [`tflite`]: [`Int8Model::to_tflite`], a standard TFLite flatbuffer.
//!
//! `docs/models.md` describes the formats and the scheme.

pub mod codec;
pub mod fixed_point;
pub mod kernel;
mod quantize;
pub mod tflite;

pub use codec::{Artifact, CodecError};
pub use quantize::{choose_quantization_params, quantize};

use crate::features::{FeatureError, FeatureSet};

/// `ModelUpdate.format` of an int8 artifact.
pub const INT8_FORMAT: &str = "edgeloop-int8-v1";
/// `ModelUpdate.format` of an f32 artifact.
pub const F32_FORMAT: &str = "edgeloop-f32-v1";

/// Largest number of classes a model may have.
pub const MAX_CLASSES: usize = 256;
/// Largest number of inputs (features) a model may have. Also bounds the
/// int32 accumulator: `4096 * 255 * 127 < 2^31`, so the kernel's sums cannot
/// overflow before the bias is added.
pub const MAX_INPUTS: usize = 4096;

/// Why a model could not be built, quantized or run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A field's length does not fit the others.
    #[error("model field `{field}` has {got} entries; {expected} expected")]
    Shape {
        /// The field.
        field: &'static str,
        /// What it has.
        got: usize,
        /// What it should have.
        expected: usize,
    },
    /// A number is NaN, infinite, or out of its range.
    #[error("model field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The input given to `predict` has the wrong length.
    #[error("the model takes {expected} features; {got} were given")]
    InputLength {
        /// Given.
        got: usize,
        /// Expected.
        expected: usize,
    },
    /// An input feature is NaN or infinite.
    #[error("input feature {index} is not finite")]
    InputNotFinite {
        /// Its position.
        index: usize,
    },
    /// Quantization needs at least one calibration input.
    #[error("quantization needs at least one calibration input")]
    NoCalibrationData,
    /// The feature set is invalid.
    #[error(transparent)]
    Features(#[from] FeatureError),
}

/// What a model predicts for one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction<L> {
    /// Index into the model's classes of the highest logit (the first one
    /// on a tie, as TFLite's ARG_MAX).
    pub class: usize,
    /// The logits: `i8` for the int8 model, `f32` for the float one.
    pub logits: Vec<L>,
}

/// The float model: `logits = W · ((x - mean) / std) + b`, one row of `W`
/// per class. What the trainer fits and the `f32` profile runs.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatModel {
    pub(crate) features: FeatureSet,
    pub(crate) classes: Vec<String>,
    pub(crate) mean: Vec<f32>,
    pub(crate) std: Vec<f32>,
    pub(crate) weights: Vec<f32>,
    pub(crate) bias: Vec<f32>,
}

impl FloatModel {
    /// Builds a validated model. `weights` is row-major, `classes.len()`
    /// rows of `features.len()` columns; `mean` and `std` have one entry per
    /// feature (`std` > 0), `bias` one per class.
    pub fn new(
        features: FeatureSet,
        classes: Vec<String>,
        mean: Vec<f32>,
        std: Vec<f32>,
        weights: Vec<f32>,
        bias: Vec<f32>,
    ) -> Result<Self, ModelError> {
        let model = Self {
            features,
            classes,
            mean,
            std,
            weights,
            bias,
        };
        model.validate()?;
        Ok(model)
    }

    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        self.features.validate()?;
        let n_in = self.features.len();
        validate_common(n_in, &self.classes, &self.mean, &self.std)?;
        shape("weights", self.weights.len(), n_in * self.classes.len())?;
        shape("bias", self.bias.len(), self.classes.len())?;
        all_finite("weights", &self.weights)?;
        all_finite("bias", &self.bias)
    }

    /// The feature set the model reads.
    pub fn features(&self) -> &FeatureSet {
        &self.features
    }
    /// Class labels, in logit order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
    /// Number of inputs (features).
    pub fn n_inputs(&self) -> usize {
        self.features.len()
    }

    /// `(x - mean) / std`, per feature, in f32.
    pub fn standardize(&self, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        standardize(x, &self.mean, &self.std)
    }

    /// Float logits, summed in f32 left to right (deterministic).
    pub fn logits(&self, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        let z = self.standardize(x)?;
        Ok(self.logits_standardized(&z))
    }

    pub(crate) fn logits_standardized(&self, z: &[f32]) -> Vec<f32> {
        self.weights
            .chunks(z.len().max(1))
            .zip(&self.bias)
            .map(|(row, b)| row.iter().zip(z).fold(0.0f32, |acc, (w, v)| acc + w * v) + b)
            .collect()
    }

    /// The `f32` profile's inference: logits and the predicted class.
    pub fn predict(&self, x: &[f32]) -> Result<Prediction<f32>, ModelError> {
        let logits = self.logits(x)?;
        let class = argmax(&logits);
        Ok(Prediction { class, logits })
    }
}

/// Affine quantization of a tensor: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantParams {
    /// Positive, finite.
    pub scale: f32,
    /// In `-128..=127`.
    pub zero_point: i32,
}

impl QuantParams {
    fn validate(&self, field: &'static str) -> Result<(), ModelError> {
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(invalid(
                field,
                format!("scale {} is not a positive finite number", self.scale),
            ));
        }
        if !(-128..=127).contains(&self.zero_point) {
            return Err(invalid(
                field,
                format!("zero point {} is outside -128..=127", self.zero_point),
            ));
        }
        Ok(())
    }

    /// TFLite's QUANTIZE: `clamp(round(x / scale) + zero_point, -128, 127)`,
    /// `round` halving away from zero (`std::round`).
    pub fn quantize(&self, x: f32) -> i8 {
        let q = (x / self.scale).round() as i64 + i64::from(self.zero_point);
        q.clamp(-128, 127) as i8
    }

    /// `scale * (q - zero_point)`.
    pub fn dequantize(&self, q: i8) -> f32 {
        self.scale * (i32::from(q) - self.zero_point) as f32
    }
}

/// The int8 model: the float model's standardization, then int8 input
/// quantization, then an integer-only fully connected layer whose int8
/// output is the logits. Built by [`quantize()`] or [`Int8Model::decode`].
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Model {
    pub(crate) features: FeatureSet,
    pub(crate) classes: Vec<String>,
    pub(crate) mean: Vec<f32>,
    pub(crate) std: Vec<f32>,
    pub(crate) input: QuantParams,
    pub(crate) output: QuantParams,
    /// Row-major, one row per class, symmetric (zero point 0), -127..=127.
    pub(crate) weights: Vec<i8>,
    /// One scale per class (output channel).
    pub(crate) weight_scales: Vec<f32>,
    /// int32, scale `input.scale * weight_scales[c]`, zero point 0.
    pub(crate) bias: Vec<i32>,
    /// `(quantized_multiplier, shift)` per class, derived from the scales
    /// exactly as TFLM derives them (see [`requant_multipliers`]).
    pub(crate) multipliers: Vec<(i32, i32)>,
}

impl Int8Model {
    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        self.features.validate()?;
        let n_in = self.features.len();
        let n_out = self.classes.len();
        validate_common(n_in, &self.classes, &self.mean, &self.std)?;
        self.input.validate("input quantization")?;
        self.output.validate("output quantization")?;
        shape("weights", self.weights.len(), n_in * n_out)?;
        shape("weight_scales", self.weight_scales.len(), n_out)?;
        shape("bias", self.bias.len(), n_out)?;
        if self.weights.contains(&i8::MIN) {
            return Err(invalid(
                "weights",
                "-128 is not allowed in symmetric int8 weights".into(),
            ));
        }
        for s in &self.weight_scales {
            if !(s.is_finite() && *s > 0.0) {
                return Err(invalid(
                    "weight_scales",
                    format!("{s} is not a positive finite number"),
                ));
            }
        }
        let expected =
            requant_multipliers(self.input.scale, &self.weight_scales, self.output.scale);
        if self.multipliers != expected {
            return Err(invalid(
                "multipliers",
                "they are not the ones the scales give (QuantizeMultiplier)".into(),
            ));
        }
        Ok(())
    }

    /// The feature set the model reads.
    pub fn features(&self) -> &FeatureSet {
        &self.features
    }
    /// Class labels, in logit order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
    /// Number of inputs (features).
    pub fn n_inputs(&self) -> usize {
        self.features.len()
    }
    /// Quantization of the (standardized) input tensor.
    pub fn input_quantization(&self) -> QuantParams {
        self.input
    }
    /// Quantization of the output (logits) tensor.
    pub fn output_quantization(&self) -> QuantParams {
        self.output
    }

    /// Symmetric weight scales, one per class (output channel).
    pub fn weight_scales(&self) -> &[f32] {
        &self.weight_scales
    }
    /// `(quantized_multiplier, shift)` per class, as TFLM derives them.
    pub fn multipliers(&self) -> &[(i32, i32)] {
        &self.multipliers
    }

    /// The int32 accumulators (`Σ (q - zp) * w + bias`) per class, before
    /// requantization: for tests and diagnostics.
    pub fn accumulators(&self, input: &[i8]) -> Result<Vec<i32>, ModelError> {
        if input.len() != self.n_inputs() {
            return Err(ModelError::InputLength {
                got: input.len(),
                expected: self.n_inputs(),
            });
        }
        Ok(kernel::accumulators(
            input,
            self.input.zero_point,
            &self.weights,
            &self.bias,
        ))
    }

    /// Standardizes and quantizes raw features to the int8 input tensor:
    /// the only float arithmetic on the device's inference path.
    pub fn quantize_input(&self, x: &[f32]) -> Result<Vec<i8>, ModelError> {
        let z = standardize(x, &self.mean, &self.std)?;
        Ok(z.iter().map(|v| self.input.quantize(*v)).collect())
    }

    /// The integer-only kernel on an already quantized input: int8 logits.
    pub fn logits_quantized(&self, input: &[i8]) -> Result<Vec<i8>, ModelError> {
        if input.len() != self.n_inputs() {
            return Err(ModelError::InputLength {
                got: input.len(),
                expected: self.n_inputs(),
            });
        }
        Ok(kernel::fully_connected(
            input,
            self.input.zero_point,
            &self.weights,
            &self.bias,
            &self.multipliers,
            self.output.zero_point,
        ))
    }

    /// The `int8` profile's inference from raw features: int8 logits and
    /// the predicted class.
    pub fn predict(&self, x: &[f32]) -> Result<Prediction<i8>, ModelError> {
        let q = self.quantize_input(x)?;
        self.predict_quantized(&q)
    }

    /// Inference from an already quantized input.
    pub fn predict_quantized(&self, q: &[i8]) -> Result<Prediction<i8>, ModelError> {
        let logits = self.logits_quantized(q)?;
        let class = argmax(&logits);
        Ok(Prediction { class, logits })
    }
}

/// The requantization multipliers TFLM computes in `Prepare` for a
/// per-channel int8 FULLY_CONNECTED: per output channel,
/// `QuantizeMultiplier((double)input_scale * (double)weight_scale[c] /
/// (double)output_scale)` (`PopulateConvolutionQuantizationParams`).
pub fn requant_multipliers(
    input_scale: f32,
    weight_scales: &[f32],
    output_scale: f32,
) -> Vec<(i32, i32)> {
    weight_scales
        .iter()
        .map(|ws| {
            fixed_point::quantize_multiplier(
                f64::from(input_scale) * f64::from(*ws) / f64::from(output_scale),
            )
        })
        .collect()
}

/// Index of the largest value; the first one on a tie.
pub fn argmax<T: PartialOrd + Copy>(values: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if let Some(b) = values.get(best) {
            if v > b {
                best = i;
            }
        }
    }
    best
}

fn standardize(x: &[f32], mean: &[f32], std: &[f32]) -> Result<Vec<f32>, ModelError> {
    if x.len() != mean.len() {
        return Err(ModelError::InputLength {
            got: x.len(),
            expected: mean.len(),
        });
    }
    x.iter()
        .zip(mean.iter().zip(std))
        .enumerate()
        .map(|(index, (v, (m, s)))| {
            if v.is_finite() {
                Ok((v - m) / s)
            } else {
                Err(ModelError::InputNotFinite { index })
            }
        })
        .collect()
}

fn validate_common(
    n_in: usize,
    classes: &[String],
    mean: &[f32],
    std: &[f32],
) -> Result<(), ModelError> {
    if n_in > MAX_INPUTS {
        return Err(invalid(
            "features",
            format!("{n_in} inputs; at most {MAX_INPUTS} are allowed"),
        ));
    }
    if classes.len() < 2 || classes.len() > MAX_CLASSES {
        return Err(invalid(
            "classes",
            format!(
                "{} classes; between 2 and {MAX_CLASSES} are allowed",
                classes.len()
            ),
        ));
    }
    for (i, c) in classes.iter().enumerate() {
        if c.is_empty() || c.len() > 255 || classes[..i].contains(c) {
            return Err(invalid(
                "classes",
                format!("class {i} (`{c}`) is empty, too long or repeated"),
            ));
        }
    }
    shape("mean", mean.len(), n_in)?;
    shape("std", std.len(), n_in)?;
    all_finite("mean", mean)?;
    for s in std {
        if !(s.is_finite() && *s > 0.0) {
            return Err(invalid(
                "std",
                format!("{s} is not a positive finite number"),
            ));
        }
    }
    Ok(())
}

fn shape(field: &'static str, got: usize, expected: usize) -> Result<(), ModelError> {
    if got == expected {
        Ok(())
    } else {
        Err(ModelError::Shape {
            field,
            got,
            expected,
        })
    }
}

fn all_finite(field: &'static str, values: &[f32]) -> Result<(), ModelError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(invalid(field, format!("entry {i} is not finite"))),
    }
}

fn invalid(field: &'static str, reason: String) -> ModelError {
    ModelError::Invalid { field, reason }
}
