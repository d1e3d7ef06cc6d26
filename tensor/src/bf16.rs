//! bfloat16 conversions: round-to-nearest-even and stochastic rounding.
//!
//! A bf16 value is stored as the `u16` holding the upper 16 bits of the `f32` with the
//! same sign, exponent and leading 7 mantissa bits.

/// Widens a bf16 word to the `f32` it represents (exact).
#[inline]
pub fn to_f32(word: u16) -> f32 {
    f32::from_bits((word as u32) << 16)
}

/// Rounds `x` to the nearest bf16, ties to even. NaN stays NaN (quiet, sign kept);
/// infinities stay infinite; values beyond the largest finite bf16 round to infinity,
/// as IEEE rounding prescribes; subnormals round like any other value.
#[inline]
pub fn from_f32_rne(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        // Keep the sign and force a quiet-NaN payload so truncation cannot make it Inf.
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7FFF + lsb);
    (rounded >> 16) as u16
}

/// Rounds `x` to one of its two neighbouring bf16 values at random, with probability
/// proportional to closeness: `random` supplies 16 uniform bits. The expected value of
/// the result equals `x` (for finite `x` whose neighbours are finite).
#[inline]
pub fn from_f32_stochastic(x: f32, random: u16) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    if x.is_infinite() {
        return (bits >> 16) as u16;
    }
    let rounded = bits.wrapping_add(random as u32);
    (rounded >> 16) as u16
}
