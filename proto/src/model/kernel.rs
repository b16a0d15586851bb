//! The integer-only int8 kernel: TFLite's reference
//! `reference_integer_ops::FullyConnectedPerChannel` (what TensorFlow Lite
//! Micro runs for an int8 FULLY_CONNECTED whose weights have one scale per
//! output channel), for a batch of one.
//!
//! For each output channel `c`:
//!
//! ```text
//! acc  = Σ_i (input[i] - input_zero_point) * weight[c][i]     (int32)
//! acc += bias[c]                                              (int32)
//! acc  = MultiplyByQuantizedMultiplier(acc, multiplier[c], shift[c])
//! acc += output_zero_point
//! out[c] = clamp(acc, -128, 127)                              (no fused activation)
//! ```
//!
//! No floating point. Weights are symmetric (zero point 0). The sum cannot
//! overflow for models within [`super::MAX_INPUTS`]; the bias addition wraps
//! as int32 arithmetic does on TFLM's targets.

use super::fixed_point::multiply_by_quantized_multiplier;

/// Runs the layer. `weights` is row-major with `input.len()` columns and
/// one row per entry of `bias`; `multipliers[c]` is `(quantized_multiplier,
/// shift)`. Rows or multipliers missing for a bias entry yield fewer outputs
/// (callers validate shapes first; this function never panics).
pub fn fully_connected(
    input: &[i8],
    input_zero_point: i32,
    weights: &[i8],
    bias: &[i32],
    multipliers: &[(i32, i32)],
    output_zero_point: i32,
) -> Vec<i8> {
    accumulators(input, input_zero_point, weights, bias)
        .into_iter()
        .zip(multipliers)
        .map(|(acc, (multiplier, shift))| requantize(acc, *multiplier, *shift, output_zero_point))
        .collect()
}

/// The int32 accumulators `Σ (input - zp) * weight + bias`, one per output
/// channel, before requantization.
pub fn accumulators(input: &[i8], input_zero_point: i32, weights: &[i8], bias: &[i32]) -> Vec<i32> {
    let input_offset = -input_zero_point;
    let depth = input.len().max(1);
    weights
        .chunks_exact(depth)
        .zip(bias)
        .map(|(row, b)| {
            let mut acc: i32 = 0;
            for (x, w) in input.iter().zip(row) {
                acc = acc.wrapping_add((i32::from(*x) + input_offset).wrapping_mul(i32::from(*w)));
            }
            acc.wrapping_add(*b)
        })
        .collect()
}

/// One accumulator to int8: `clamp(MultiplyByQuantizedMultiplier(acc, m,
/// shift) + output_zero_point, -128, 127)`.
pub fn requantize(acc: i32, multiplier: i32, shift: i32, output_zero_point: i32) -> i8 {
    let scaled = multiply_by_quantized_multiplier(acc, multiplier, shift);
    scaled.wrapping_add(output_zero_point).clamp(-128, 127) as i8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixed_point::quantize_multiplier;

    #[test]
    fn computes_by_hand_example() {
        // 2 inputs, 2 outputs; input zp -1 (offset +1); multiplier 0.5.
        let (m, s) = quantize_multiplier(0.5);
        let out = fully_connected(
            &[3, -1],
            -1,
            &[2, 1, -1, 4],
            &[10, -10],
            &[(m, s), (m, s)],
            5,
        );
        // c0: (4*2 + 0*1 + 10) * 0.5 + 5 = 14; c1: (4*-1 + 0*4 - 10) * 0.5 + 5 = -2.
        assert_eq!(out, vec![14, -2]);
    }

    #[test]
    fn output_saturates_at_both_ends() {
        let (m, s) = quantize_multiplier(1.0);
        let out = fully_connected(
            &[127, 127],
            0,
            &[127, 127, -127, -127],
            &[0, 0],
            &[(m, s), (m, s)],
            0,
        );
        assert_eq!(out, vec![127, -128]);
    }
}
