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
    let lsb = (bits >> 16) & 1;
    // An arithmetic shift gives the same low 16 bits as a logical one, and lets SSE2
    // narrow eight lanes at once with a signed pack.
    let rounded = ((bits.wrapping_add(0x7FFF + lsb) as i32) >> 16) as u16;
    // Keep the sign and force a quiet-NaN payload so truncation cannot make it Inf. Both
    // results are computed and one selected, so loops over slices vectorise.
    let nan = (((bits as i32) >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 word as the `f32` bit pattern it stands for, to build inputs bit by bit.
    fn f(bits: u32) -> f32 {
        f32::from_bits(bits)
    }

    #[test]
    fn exact_values_round_trip() {
        // (value, bf16 word): every value is representable, so both directions are exact.
        let cases = [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3F80),
            (-1.0, 0xBF80),
            (-2.0, 0xC000),
            (0.5, 0x3F00),
            (1.0078125, 0x3F81), // 1 + 2^-7, the next bf16 after 1
            (256.0, 0x4380),
            (-3.5, 0xC060),
            (f(0x7F7F_0000), 0x7F7F), // largest finite bf16, about 3.39e38
            (f32::MIN_POSITIVE, 0x0080),
            (f(0x0001_0000), 0x0001), // smallest bf16 subnormal, 2^-133
            (f(0x807F_0000), 0x807F), // largest negative bf16 subnormal
            (f32::INFINITY, 0x7F80),
            (f32::NEG_INFINITY, 0xFF80),
        ];
        for (x, word) in cases {
            assert_eq!(from_f32_rne(x), word, "{x:e}");
            assert_eq!(to_f32(word).to_bits(), x.to_bits(), "{word:#06x}");
        }
    }

    #[test]
    fn nearest_even_rounding() {
        // (f32 bits, expected word). The low 16 bits are what rounding drops; 0x8000 is a tie.
        let cases = [
            // Ties go to the even neighbour: 1 + 2^-8 down to 1, 1 + 3 * 2^-8 up to 1 + 2^-6.
            (0x3F80_8000u32, 0x3F80u16),
            (0x3F81_8000, 0x3F82),
            // Just below and just above a tie.
            (0x3F80_7FFF, 0x3F80),
            (0x3F80_8001, 0x3F81),
            (0x3F81_7FFF, 0x3F81),
            (0x3F81_8001, 0x3F82),
            // The same for negative values: rounding acts on the magnitude.
            (0xBF80_8000, 0xBF80),
            (0xBF81_8000, 0xBF82),
            (0xBF80_7FFF, 0xBF80),
            (0xBF80_8001, 0xBF81),
            // A carry out of the mantissa moves to the next binade: just under 2 rounds to 2.
            (0x3FFF_8000, 0x4000),
            (0x3FFF_FFFF, 0x4000),
            (0xBFFF_FFFF, 0xC000),
            // Largest finite f32 values: below the midpoint above the largest finite bf16 they
            // round to it; at the midpoint (odd mantissa) and beyond they overflow to infinity.
            (0x7F7F_7FFF, 0x7F7F),
            (0x7F7F_8000, 0x7F80),
            (0x7F7F_FFFF, 0x7F80), // f32::MAX
            (0xFF7F_FFFF, 0xFF80), // f32::MIN
            // Subnormals round like normal numbers. f32's smallest subnormal and anything up to
            // half of bf16's smallest subnormal (a tie, to even) go to zero; a bit more rounds up.
            (0x0000_0001, 0x0000),
            (0x0000_4000, 0x0000),
            (0x0000_8000, 0x0000),
            (0x0000_8001, 0x0001),
            (0x0000_C000, 0x0001),
            (0x8000_C000, 0x8001),
            (0x8000_0001, 0x8000), // negative, rounds to -0.0
            (0x0001_8000, 0x0002),
            (0x0001_7FFF, 0x0001),
            // The largest subnormal rounds up into the smallest normal.
            (0x007F_8000, 0x0080),
            (0x007F_FFFF, 0x0080),
        ];
        for (bits, word) in cases {
            let got = from_f32_rne(f(bits));
            assert_eq!(got, word, "{bits:#010x}: got {got:#06x}, want {word:#06x}");
        }
    }

    /// NaN inputs, including ones whose payload sits only in the low 16 bits (which plain
    /// truncation would turn into infinity) and the all-ones payload (where adding a rounding
    /// bias would carry into the sign).
    const NANS: [u32; 8] = [
        0x7FC0_0000, // f32::NAN
        0xFFC0_0000,
        0x7F80_0001,
        0xFF80_0001,
        0x7F80_8000,
        0x7F80_FFFF,
        0x7FFF_FFFF,
        0xFFFF_FFFF,
    ];

    #[test]
    fn nan_stays_nan_with_its_sign() {
        for bits in NANS {
            let negative = bits >> 31 == 1;
            let mut outputs = vec![from_f32_rne(f(bits))];
            outputs
                .extend([0u16, 1, 0x7FFF, 0x8000, 0xFFFF].map(|r| from_f32_stochastic(f(bits), r)));
            for word in outputs {
                let y = to_f32(word);
                assert!(y.is_nan(), "{bits:#010x} became {word:#06x}");
                assert_eq!(
                    y.is_sign_negative(),
                    negative,
                    "{bits:#010x} became {word:#06x}"
                );
            }
        }
    }

    /// Inputs exactly representable in bf16.
    const EXACT: [u32; 10] = [
        0x0000_0000,
        0x8000_0000,
        0x3F80_0000,
        0xC000_0000,
        0x0001_0000, // smallest subnormal
        0x8001_0000,
        0x0080_0000, // smallest normal
        0x7F7F_0000, // largest finite
        0x7F80_0000, // +Inf
        0xFF80_0000, // -Inf
    ];

    #[test]
    fn stochastic_leaves_exact_values_unchanged() {
        for bits in EXACT {
            for r in 0..=u16::MAX {
                let got = from_f32_stochastic(f(bits), r);
                assert_eq!(
                    u32::from(got) << 16,
                    bits,
                    "{bits:#010x} with random {r:#06x}"
                );
            }
        }
    }

    #[test]
    fn stochastic_rounds_up_with_probability_equal_to_the_position() {
        // Inputs between two neighbouring bf16 values `lo` (truncation) and `lo + 1` (next in
        // magnitude): positive and negative, normal and subnormal, around the subnormal/normal
        // boundary and where the upper neighbour lies in the next binade.
        let inputs = [
            0x3F80_0001u32,
            0x3F80_4000,
            0x3F80_8000,
            0x3F80_C000,
            0x3F80_FFFF,
            0xBF80_4000,
            0xC123_4567,
            0x0000_0001, // f32's smallest subnormal, between 0 and bf16's smallest
            0x0000_8000,
            0x8000_C000,
            0x007F_1234, // upper neighbour is the smallest normal
            0x3FFF_9ABC, // upper neighbour is 2.0
            0x7F7E_FFFF,
        ];
        for bits in inputs {
            let lo = (bits >> 16) as u16;
            let position = bits & 0xFFFF; // fractional position times 2^16
            let mut ups = 0u32;
            let mut sum = 0.0f64;
            for r in 0..=u16::MAX {
                let got = from_f32_stochastic(f(bits), r);
                assert!(
                    got == lo || got == lo + 1,
                    "{bits:#010x} with random {r:#06x} gave {got:#06x}"
                );
                ups += u32::from(got != lo);
                sum += f64::from(to_f32(got));
            }
            // Over all 2^16 random inputs the round-ups are exactly position / 2^16 ...
            assert_eq!(ups, position, "{bits:#010x}");
            // ... so the mean is exactly the input (the sum is exact in f64: 8-bit
            // significands from at most two adjacent binades, 2^16 of them).
            assert_eq!(sum / 65536.0, f64::from(f(bits)), "{bits:#010x}");
        }
    }

    #[test]
    fn stochastic_keeps_infinities() {
        for r in [0u16, 1, 0x8000, 0xFFFF] {
            assert_eq!(from_f32_stochastic(f32::INFINITY, r), 0x7F80);
            assert_eq!(from_f32_stochastic(f32::NEG_INFINITY, r), 0xFF80);
        }
    }
}
