//! TFLite's fixed-point arithmetic, bit for bit.
//!
//! These are the functions TensorFlow Lite's reference kernels and TensorFlow
//! Lite Micro use to requantize an int32 accumulator to int8
//! (`tensorflow/lite/kernels/internal/common.h`, `quantization_util.cc` and
//! gemmlowp's `fixedpoint.h`). They are the *double-rounding* variant (the
//! default build, without `TFLITE_SINGLE_ROUNDING`): first a rounding
//! doubling high multiply, then a rounding right shift. XNNPACK rounds once
//! and differs by one on a few percent of outputs; edgeloop matches TFLM.
//!
//! Integer overflow behaves as TFLite's builds do in practice: the left
//! shift in [`multiply_by_quantized_multiplier`] wraps (in C++ it is
//! undefined; with the multipliers [`quantize_multiplier`] produces for a
//! scale below one it never happens).

/// `QuantizeMultiplier(double, int32_t*, int*)`: splits a positive real
/// multiplier into a Q31 fixed-point mantissa in `[2^30, 2^31)` and a power
/// of two exponent, so that `m ≈ quantized_multiplier * 2^(shift - 31)`.
///
/// Returns `(0, 0)` for zero, for multipliers too small to represent
/// (`shift < -31`, as TFLite does), and for non-finite or negative input
/// (TFLite would abort; callers validate scales before this).
pub fn quantize_multiplier(double_multiplier: f64) -> (i32, i32) {
    if double_multiplier == 0.0 || !double_multiplier.is_finite() || double_multiplier < 0.0 {
        return (0, 0);
    }
    let (q, mut shift) = frexp(double_multiplier);
    // TfLiteRound is std::round: halves away from zero, as f64::round.
    let mut q_fixed = (q * (1i64 << 31) as f64).round() as i64;
    if q_fixed == 1i64 << 31 {
        q_fixed /= 2;
        shift += 1;
    }
    if shift < -31 {
        shift = 0;
        q_fixed = 0;
    }
    // q is in [0.5, 1), so q_fixed is in [2^30, 2^31 - 1] here (or 0).
    let q_fixed = i32::try_from(q_fixed).unwrap_or(i32::MAX);
    (q_fixed, shift)
}

/// C's `frexp` for a positive finite double: `x = fraction * 2^exponent`
/// with `fraction` in `[0.5, 1)`. Subnormals are normalised first.
fn frexp(x: f64) -> (f64, i32) {
    let bits = x.to_bits();
    let raw_exponent = ((bits >> 52) & 0x7ff) as i32;
    if raw_exponent == 0 {
        // Subnormal: scale up by 2^64 (exact), then correct the exponent.
        let (fraction, exponent) = frexp(x * f64::from_bits(0x43f0_0000_0000_0000));
        return (fraction, exponent - 64);
    }
    let exponent = raw_exponent - 1022;
    let fraction = f64::from_bits((bits & !(0x7ff << 52)) | (1022u64 << 52));
    (fraction, exponent)
}

/// gemmlowp `SaturatingRoundingDoublingHighMul`: the high 32 bits of
/// `2 * a * b`, rounded to nearest (positive ties up, negative ties towards
/// zero, from gemmlowp's nudge), saturating the one
/// overflowing case `a == b == i32::MIN`.
pub fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == b && a == i32::MIN {
        return i32::MAX;
    }
    let ab = i64::from(a) * i64::from(b);
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // C++ integer division truncates towards zero, as Rust's does.
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp `RoundingDivideByPOT`: `x / 2^exponent`, rounded to nearest with
/// ties away from zero. `exponent` must be in `0..=31`; values outside are
/// clamped to that range.
pub fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    let exponent = exponent.clamp(0, 31);
    let mask: i32 = ((1i64 << exponent) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> exponent) + i32::from(remainder > threshold)
}

/// TFLite's `MultiplyByQuantizedMultiplier(int32_t x, int32_t
/// quantized_multiplier, int shift)`, the double-rounding reference version:
/// `x * quantized_multiplier * 2^(shift - 31)`, rounded.
pub fn multiply_by_quantized_multiplier(x: i32, quantized_multiplier: i32, shift: i32) -> i32 {
    let left_shift = shift.max(0);
    let right_shift = (-shift).max(0);
    let shifted = x.wrapping_mul(1i32.wrapping_shl(left_shift.min(31) as u32));
    rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(shifted, quantized_multiplier),
        right_shift,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values: the powers of two are those of TFLite's
    // quantization_util_test.cc (QuantizeMultiplier, Underflow); the rest
    // are worked out by hand from the C++ definitions, including the
    // asymmetric tie rule of SaturatingRoundingDoublingHighMul (its nudge
    // for a negative product is 1 - 2^30, so a negative tie goes to zero).
    // The end-to-end check against TFLM itself is tests/tests/tflite.rs.

    #[test]
    fn quantize_multiplier_matches_tflite_test_values() {
        // quantization_util_test.cc, QuantizeMultiplier:
        assert_eq!(quantize_multiplier(0.0), (0, 0));
        assert_eq!(quantize_multiplier(1.0), (1 << 30, 1));
        assert_eq!(quantize_multiplier(0.5), (1 << 30, 0));
        assert_eq!(quantize_multiplier(0.25), (1 << 30, -1));
        assert_eq!(quantize_multiplier(0.125), (1 << 30, -2));
        assert_eq!(quantize_multiplier(2.0), (1 << 30, 2));
        assert_eq!(
            quantize_multiplier(-1.0),
            (0, 0),
            "negative is rejected, not aborted"
        );
        // 0.75 = 0.75 * 2^0 -> 0.75 * 2^31 = 1610612736.
        assert_eq!(quantize_multiplier(0.75), (1_610_612_736, 0));
        // Underflow: 2^-33 = 0.5 * 2^-32 is too small and becomes zero;
        // 2^-32 is still representable with shift -31.
        assert_eq!(quantize_multiplier(2f64.powi(-33)), (0, 0));
        assert_eq!(quantize_multiplier(2f64.powi(-32)), (1 << 30, -31));
        // A mantissa that rounds up to 2^31 is halved and the shift bumped.
        let just_below_one = 1.0 - 2f64.powi(-40);
        assert_eq!(quantize_multiplier(just_below_one), (1 << 30, 1));
    }

    #[test]
    fn frexp_matches_c() {
        assert_eq!(frexp(1.0), (0.5, 1));
        assert_eq!(frexp(0.3), (0.6, -1));
        assert_eq!(frexp(8.0), (0.5, 4));
        let tiny = f64::from_bits(1); // smallest subnormal, 2^-1074
        assert_eq!(frexp(tiny), (0.5, -1073));
    }

    #[test]
    fn saturating_rounding_doubling_high_mul_matches_gemmlowp() {
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN),
            i32::MAX
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MAX, i32::MAX),
            i32::MAX - 1
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(1 << 30, 1 << 30),
            1 << 29
        );
        // 2*a*b / 2^32 with a = 3, b = 2^30: 3 * 2^31 / 2^32 = 1.5 -> 2.
        assert_eq!(saturating_rounding_doubling_high_mul(3, 1 << 30), 2);
        // Positive ties round up, negative ties towards zero (gemmlowp's
        // nudge is 1 - 2^30 for a negative product): -1.5 -> -1, -0.5 -> 0.
        assert_eq!(saturating_rounding_doubling_high_mul(-3, 1 << 30), -1);
        assert_eq!(saturating_rounding_doubling_high_mul(-1, 1 << 30), 0);
        assert_eq!(saturating_rounding_doubling_high_mul(1, 1 << 30), 1);
        assert_eq!(saturating_rounding_doubling_high_mul(-5, 1 << 30), -2);
        // Just below a half rounds towards zero.
        assert_eq!(saturating_rounding_doubling_high_mul(1, (1 << 30) - 1), 0);
        assert_eq!(saturating_rounding_doubling_high_mul(-1, (1 << 30) - 1), 0);
    }

    #[test]
    fn rounding_divide_by_pot_rounds_ties_away_from_zero() {
        assert_eq!(rounding_divide_by_pot(5, 1), 3); // 2.5 -> 3
        assert_eq!(rounding_divide_by_pot(-5, 1), -3); // -2.5 -> -3
        assert_eq!(rounding_divide_by_pot(7, 2), 2); // 1.75 -> 2
        assert_eq!(rounding_divide_by_pot(-7, 2), -2);
        assert_eq!(rounding_divide_by_pot(6, 2), 2); // 1.5 -> 2
        assert_eq!(rounding_divide_by_pot(-6, 2), -2); // -1.5 -> -2
        assert_eq!(rounding_divide_by_pot(5, 2), 1); // 1.25 -> 1
        assert_eq!(rounding_divide_by_pot(-5, 2), -1);
        assert_eq!(rounding_divide_by_pot(i32::MAX, 31), 1);
        assert_eq!(rounding_divide_by_pot(i32::MIN, 31), -1);
        assert_eq!(rounding_divide_by_pot(12345, 0), 12345);
    }

    #[test]
    fn double_rounding_differs_from_single_rounding_where_tflm_does() {
        // x * 0.5 * 2^-1 with the multiplier 2^30 (0.5) and shift -1:
        // exact value 3 * 0.25 = 0.75 -> single rounding gives 1; the double
        // rounding first gives round(1.5) = 2, then round(2 / 2) = 1.
        assert_eq!(multiply_by_quantized_multiplier(3, 1 << 30, -1), 1);
        // x = 1: exact 0.25 -> 0 with single rounding; double rounding
        // rounds 0.5 up to 1 first, then 1/2 = 0.5 up to 1. This is the
        // TFLM behaviour edgeloop must reproduce.
        assert_eq!(multiply_by_quantized_multiplier(1, 1 << 30, -1), 1);
        // -3 * 0.25 = -0.75: -1.5 -> -1 (negative tie), then -0.5 -> -1.
        assert_eq!(multiply_by_quantized_multiplier(-3, 1 << 30, -1), -1);
        // -1 * 0.25: the first step already gives 0.
        assert_eq!(multiply_by_quantized_multiplier(-1, 1 << 30, -1), 0);
    }

    #[test]
    fn multiply_by_quantized_multiplier_with_left_shift() {
        // multiplier 1.0 = (2^30, shift 1): identity.
        let (m, s) = quantize_multiplier(1.0);
        for x in [-1000, -1, 0, 1, 7, 123_456] {
            assert_eq!(multiply_by_quantized_multiplier(x, m, s), x);
        }
        let (m, s) = quantize_multiplier(3.0);
        assert_eq!(multiply_by_quantized_multiplier(100, m, s), 300);
    }
}
