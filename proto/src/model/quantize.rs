//! Post-training int8 quantization of a [`FloatModel`] from calibration
//! data, the way the TFLite converter does it.

use super::{requant_multipliers, FloatModel, Int8Model, ModelError, QuantParams};

/// TFLite's `ChooseQuantizationParams<int8_t>(rmin, rmax)`: an affine int8
/// quantization covering `[rmin, rmax]` widened to include 0 (so zero is
/// exactly representable), with the zero point nudged to an integer.
/// A degenerate range (`rmin == rmax == 0`) gets scale 1, zero point 0.
pub fn choose_quantization_params(rmin: f32, rmax: f32) -> QuantParams {
    let rmin = f64::from(rmin.min(0.0));
    let rmax = f64::from(rmax.max(0.0));
    let (qmin, qmax) = (-128.0f64, 127.0f64);
    if rmax - rmin <= 0.0 || !(rmax - rmin).is_finite() {
        return QuantParams {
            scale: 1.0,
            zero_point: 0,
        };
    }
    let scale = (rmax - rmin) / (qmax - qmin);
    // As TFLite: take the zero point from whichever end has the smaller
    // rounding error, then nudge into range and round.
    let zp_from_min = qmin - rmin / scale;
    let zp_from_max = qmax - rmax / scale;
    let err_min = qmin.abs() + (rmin / scale).abs();
    let err_max = qmax.abs() + (rmax / scale).abs();
    let zp = if err_min < err_max {
        zp_from_min
    } else {
        zp_from_max
    };
    let nudged = if zp < qmin {
        qmin
    } else if zp > qmax {
        qmax
    } else {
        zp.round()
    };
    QuantParams {
        scale: scale as f32,
        zero_point: nudged as i32,
    }
}

/// Quantizes `model` to int8, calibrating the input and output ranges on
/// `calibration` (raw feature vectors, as given to [`FloatModel::predict`];
/// a few hundred representative ones are plenty).
///
/// - input: affine int8 over the range of the standardized calibration
///   inputs (including 0);
/// - weights: symmetric int8 per output channel, `scale_c = max|w_c| / 127`,
///   values in -127..=127;
/// - bias: int32, `round(b_c / (input_scale * scale_c))`, zero point 0;
/// - output: affine int8 over the range of the float logits on the
///   calibration inputs (including 0);
/// - requantization: `QuantizeMultiplier(input_scale * scale_c /
///   output_scale)` per channel, as TFLM computes it.
pub fn quantize(model: &FloatModel, calibration: &[Vec<f32>]) -> Result<Int8Model, ModelError> {
    model.validate()?;
    if calibration.is_empty() {
        return Err(ModelError::NoCalibrationData);
    }
    let n_in = model.n_inputs();
    let (mut in_min, mut in_max) = (0.0f32, 0.0f32);
    let (mut out_min, mut out_max) = (0.0f32, 0.0f32);
    for x in calibration {
        let z = model.standardize(x)?;
        for v in &z {
            in_min = in_min.min(*v);
            in_max = in_max.max(*v);
        }
        for v in model.logits_standardized(&z) {
            out_min = out_min.min(v);
            out_max = out_max.max(v);
        }
    }
    let input = choose_quantization_params(in_min, in_max);
    let output = choose_quantization_params(out_min, out_max);

    let mut weights = Vec::with_capacity(model.weights.len());
    let mut weight_scales = Vec::with_capacity(model.classes.len());
    let mut bias = Vec::with_capacity(model.classes.len());
    for (row, b) in model.weights.chunks(n_in.max(1)).zip(&model.bias) {
        let max_abs = row.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let scale = if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 };
        weights.extend(
            row.iter()
                .map(|w| (w / scale).round().clamp(-127.0, 127.0) as i8),
        );
        weight_scales.push(scale);
        let bias_scale = f64::from(input.scale) * f64::from(scale);
        let q = (f64::from(*b) / bias_scale).round();
        bias.push(q.clamp(-(i32::MAX as f64), i32::MAX as f64) as i32);
    }
    let multipliers = requant_multipliers(input.scale, &weight_scales, output.scale);
    // A multiplier that underflows to zero would silence a class.
    if let Some(c) = multipliers.iter().position(|(m, _)| *m == 0) {
        return Err(ModelError::Invalid {
            field: "weight_scales",
            reason: format!("class {c}'s requantization multiplier underflows to zero; its weights are negligible"),
        });
    }
    let int8 = Int8Model {
        features: model.features.clone(),
        classes: model.classes.clone(),
        mean: model.mean.clone(),
        std: model.std.clone(),
        input,
        output,
        weights,
        weight_scales,
        bias,
        multipliers,
    };
    int8.validate()?;
    Ok(int8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::FeatureSet;

    #[test]
    fn quantization_params_cover_the_range_and_zero() {
        let p = choose_quantization_params(-1.0, 1.0);
        assert_eq!(p.scale, (2.0f64 / 255.0) as f32);
        // Both ends give -0.5, which std::round takes to -1.
        assert_eq!(p.zero_point, -1);
        let p = choose_quantization_params(0.0, 2.55);
        assert_eq!(p.zero_point, -128);
        let p = choose_quantization_params(-2.55, 0.0);
        assert_eq!(p.zero_point, 127);
        let p = choose_quantization_params(1.0, 2.0); // widened to [0, 2]
        assert_eq!(p.zero_point, -128);
        assert_eq!(p.quantize(0.0), -128);
    }

    fn model() -> Result<FloatModel, ModelError> {
        let features = FeatureSet {
            channels: vec!["x".into()],
            window: 1,
        };
        // 6 features, 3 classes.
        let weights: Vec<f32> = (0..18).map(|i| (i as f32 - 9.0) * 0.37).collect();
        FloatModel::new(
            features,
            vec!["a".into(), "b".into(), "c".into()],
            vec![0.0; 6],
            vec![1.0; 6],
            weights,
            vec![0.5, -0.25, 0.0],
        )
    }

    #[test]
    fn quantized_model_follows_the_float_model() -> Result<(), ModelError> {
        let model = model()?;
        let calibration: Vec<Vec<f32>> = (0..50)
            .map(|k| {
                (0..6)
                    .map(|i| ((k * 7 + i * 3) % 11) as f32 / 5.0 - 1.0)
                    .collect()
            })
            .collect();
        let q = quantize(&model, &calibration)?;
        assert!(q.weights.iter().all(|w| *w >= -127));
        // The largest weight of each row maps to ±127.
        for row in q.weights.chunks(6) {
            assert_eq!(row.iter().map(|w| w.unsigned_abs()).max(), Some(127));
        }
        let mut agree = 0;
        for x in &calibration {
            let f = model.predict(x)?;
            let i = q.predict(x)?;
            let deq: Vec<f32> = i.logits.iter().map(|l| q.output.dequantize(*l)).collect();
            for (a, b) in f.logits.iter().zip(&deq) {
                assert!(
                    (a - b).abs() < 4.0 * q.output.scale,
                    "float {a} vs int8 {b}"
                );
            }
            agree += usize::from(f.class == i.class);
        }
        assert!(agree >= 45, "int8 agrees with f32 on {agree}/50");
        Ok(())
    }

    #[test]
    fn no_calibration_data_is_an_error() -> Result<(), ModelError> {
        assert_eq!(quantize(&model()?, &[]), Err(ModelError::NoCalibrationData));
        Ok(())
    }
}
