//! Element types and their little-endian byte encoding.
//!
//! Every Parasync crate moves tensors as raw little-endian bytes; this crate holds the one
//! definition of the element types (`f32`, `bf16`), the bf16 rounding rules, and the
//! conversions between `f32` values and wire bytes.

pub mod bf16;
mod huge;
mod pool;

pub use huge::{advise_huge_pages, filled_vec};
pub use pool::BufferPool;

use std::fmt;

/// Element type of stored or transmitted tensor data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE-754 binary32.
    F32,
    /// bfloat16: the upper half of an `f32` (8-bit exponent, 7-bit mantissa).
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// Lower-case name, as used in flags and messages (`f32`, `bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            other => Err(format!("unknown dtype {other:?} (expected f32 or bf16)")),
        }
    }
}

/// Byte data that does not fit the element type or the expected element count.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodingError {
    /// The byte length is not a multiple of the element size.
    #[error("{len} bytes is not a whole number of {dtype} elements ({size} bytes each)")]
    Ragged { len: usize, dtype: DType, size: usize },
    /// More elements were supplied than the destination holds.
    #[error("{got} elements do not fit: expected {expected}")]
    Overflow { got: usize, expected: usize },
}

/// Number of elements that `len` bytes of `dtype` hold, or an error if they do not divide.
pub fn element_count(len: usize, dtype: DType) -> Result<usize, EncodingError> {
    if !len.is_multiple_of(dtype.size()) {
        return Err(EncodingError::Ragged { len, dtype, size: dtype.size() });
    }
    Ok(len / dtype.size())
}

/// Appends `values` to `out` encoded as `dtype` (bf16 rounds to nearest even).
pub fn encode_f32(values: &[f32], dtype: DType, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend_from_slice(f32_as_le_bytes(values)),
        DType::Bf16 => {
            out.reserve(values.len() * 2);
            let start = out.len();
            let dst = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
            // SAFETY: `reserve` made room for 2 bytes per value after `start`.
            unsafe { simd::dispatch_encode_bf16(values, dst) };
            // SAFETY: every byte up to the new length was written just above.
            unsafe { out.set_len(start + values.len() * 2) }
        }
    }
}

/// Writes `values` encoded as `dtype` into `out`, which holds exactly their encoded bytes
/// (`values.len() * dtype.size()`; panics otherwise).
pub fn encode_f32_into(values: &[f32], dtype: DType, out: &mut [u8]) {
    assert_eq!(out.len(), values.len() * dtype.size(), "encode_f32_into: output of the wrong size");
    match dtype {
        DType::F32 => out.copy_from_slice(f32_as_le_bytes(values)),
        // SAFETY: `out` holds 2 bytes per value.
        DType::Bf16 => unsafe { simd::dispatch_encode_bf16(values, out.as_mut_ptr()) },
    }
}

/// The bytes of `values` as little-endian f32 data, without copying (on little-endian
/// targets the in-memory layout already is the wire layout).
#[cfg(target_endian = "little")]
pub fn f32_as_le_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and no invalid bit patterns; u8 has alignment 1; the
    // length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// The storage of `values` as bytes to receive little-endian f32 data into directly (the
/// kernel copies socket data straight into the tensor; no decode pass).
#[cfg(target_endian = "little")]
pub fn f32_as_le_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `f32_as_le_bytes`; every byte pattern written is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// The bytes of bf16 words as little-endian data, without copying.
#[cfg(target_endian = "little")]
pub fn u16_as_le_bytes(words: &[u16]) -> &[u8] {
    // SAFETY: as in `f32_as_le_bytes`.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// The storage of bf16 words as bytes to receive little-endian bf16 data into directly.
#[cfg(target_endian = "little")]
pub fn u16_as_le_bytes_mut(words: &mut [u16]) -> &mut [u8] {
    // SAFETY: u16 has no padding and every bit pattern is valid; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// Index of the first NaN or infinite bf16 word (all exponent bits set), if any.
pub fn first_non_finite_bf16(words: &[u16]) -> Option<usize> {
    // |w| >= 0x7f80 exactly when adding 0x0080 to |w| carries into the top bit: an
    // and, an add and an or per word, folded per block (vectorises); the position is
    // searched only in the rare rejected case.
    let any_bad = words.chunks(1024).any(|b| b.iter().fold(0u16, |acc, w| acc | ((w & 0x7fff) + 0x0080)) & 0x8000 != 0);
    if any_bad {
        words.iter().position(|w| w & 0x7f80 == 0x7f80)
    } else {
        None
    }
}

/// Index of the first NaN or infinite element, if any.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    // As for bf16: |x| >= 0x7f80_0000 (Inf or NaN) exactly when adding 0x0080_0000 carries
    // into the sign bit.
    let any_bad = values
        .chunks(1024)
        .any(|b| b.iter().fold(0u32, |acc, x| acc | ((x.to_bits() & 0x7fff_ffff) + 0x0080_0000)) & 0x8000_0000 != 0);
    if any_bad {
        values.iter().position(|x| !x.is_finite())
    } else {
        None
    }
}

/// Appends bf16 storage words to `out` encoded as `dtype`.
pub fn encode_bf16(words: &[u16], dtype: DType, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => {
            let start = out.len();
            out.resize(start + words.len() * 4, 0);
            for (dst, w) in out[start..].chunks_exact_mut(4).zip(words) {
                dst.copy_from_slice(&bf16::to_f32(*w).to_le_bytes());
            }
        }
        DType::Bf16 => {
            let start = out.len();
            out.resize(start + words.len() * 2, 0);
            for (dst, w) in out[start..].chunks_exact_mut(2).zip(words) {
                dst.copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

/// The bf16 conversion loops, compiled twice: for the baseline target and with AVX2, picked
/// at run time (the AVX2 build converts 8 values per instruction instead of 4).
mod simd {
    use super::bf16;

    /// Writes `values` as little-endian bf16 words from `dst` on.
    ///
    /// # Safety
    /// `dst` must be valid for `2 * values.len()` bytes of writes (any alignment).
    #[inline(always)]
    unsafe fn encode_bf16(values: &[f32], dst: *mut u8) {
        for (i, v) in values.iter().enumerate() {
            // SAFETY: within the caller's bound; the unaligned store needs no alignment.
            unsafe { dst.add(2 * i).cast::<u16>().write_unaligned(bf16::from_f32_rne(*v).to_le()) }
        }
    }

    /// Widens the little-endian bf16 words at `src` into `out`.
    ///
    /// # Safety
    /// `src` must be valid for `2 * out.len()` bytes of reads (any alignment).
    #[inline(always)]
    unsafe fn decode_bf16(src: *const u8, out: &mut [f32]) {
        for (i, dst) in out.iter_mut().enumerate() {
            // SAFETY: within the caller's bound; the load needs no alignment.
            let word = unsafe { src.add(2 * i).cast::<u16>().read_unaligned() };
            *dst = bf16::to_f32(u16::from_le(word));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn encode_bf16_avx2(values: &[f32], dst: *mut u8) {
        unsafe { encode_bf16(values, dst) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_bf16_avx2(src: *const u8, out: &mut [f32]) {
        unsafe { decode_bf16(src, out) }
    }

    /// [`encode_bf16`] in the best build this CPU runs.
    ///
    /// # Safety
    /// As [`encode_bf16`].
    pub(super) unsafe fn dispatch_encode_bf16(values: &[f32], dst: *mut u8) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2; the caller upholds the bound.
            return unsafe { encode_bf16_avx2(values, dst) };
        }
        unsafe { encode_bf16(values, dst) }
    }

    /// [`decode_bf16`] with non-temporal stores: the widened values go to memory without
    /// first reading each destination cache line in (a third less memory traffic) and
    /// without evicting what the caller has in cache. For outputs much larger than the
    /// caches, which are not read again right away.
    ///
    /// # Safety
    /// As [`decode_bf16`]; the CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_bf16_avx2_stream(src: *const u8, out: &mut [f32]) {
        use std::arch::x86_64::{__m128i, __m256i, _mm256_cvtepu16_epi32, _mm256_slli_epi32, _mm256_stream_si256, _mm_loadu_si128, _mm_sfence};
        // Scalar up to the first 32-byte boundary of `out`, which the streaming store needs.
        let head = out.as_ptr().align_offset(32).min(out.len());
        unsafe { decode_bf16(src, &mut out[..head]) };
        let body = (out.len() - head) / 8 * 8;
        let (dst, src8) = (unsafe { out.as_mut_ptr().add(head) }, unsafe { src.add(2 * head) });
        for i in (0..body).step_by(8) {
            // SAFETY: 16 source bytes and 32 aligned destination bytes, all within the
            // caller's bounds (i + 8 <= body).
            unsafe {
                let words = _mm_loadu_si128(src8.add(2 * i).cast::<__m128i>());
                let widened = _mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16);
                _mm256_stream_si256(dst.add(i).cast::<__m256i>(), widened);
            }
        }
        // Streaming stores are weakly ordered: fence them before the caller sees the values.
        _mm_sfence();
        unsafe { decode_bf16(src.add(2 * (head + body)), &mut out[head + body..]) };
    }

    /// Outputs of at least this many bytes are written with non-temporal stores; smaller
    /// ones (a tensor a trainer may read right away from its caches) with plain stores.
    pub(super) const STREAM_BYTES: usize = 1 << 20;

    /// [`decode_bf16`] in the best build this CPU runs.
    ///
    /// # Safety
    /// As [`decode_bf16`].
    pub(super) unsafe fn dispatch_decode_bf16(src: *const u8, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            if std::mem::size_of_val(out) >= STREAM_BYTES {
                // SAFETY: the CPU has AVX2; the caller upholds the bound.
                return unsafe { decode_bf16_avx2_stream(src, out) };
            }
            // SAFETY: the CPU has AVX2; the caller upholds the bound.
            return unsafe { decode_bf16_avx2(src, out) };
        }
        unsafe { decode_bf16(src, out) }
    }
}

/// Decodes `bytes` of `dtype` into `out`, which must have room for exactly the encoded
/// element count; returns the number of elements written.
pub fn decode_into(bytes: &[u8], dtype: DType, out: &mut [f32]) -> Result<usize, EncodingError> {
    let n = element_count(bytes.len(), dtype)?;
    if n > out.len() {
        return Err(EncodingError::Overflow { got: n, expected: out.len() });
    }
    match dtype {
        #[cfg(target_endian = "little")]
        DType::F32 => {
            // SAFETY: `out[..n]` holds exactly `bytes.len()` bytes of f32 storage, any bit
            // pattern is a valid f32, and the regions cannot overlap (one is borrowed mutably).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().cast::<u8>(), bytes.len()) }
        }
        #[cfg(not(target_endian = "little"))]
        DType::F32 => {
            for (dst, src) in out[..n].iter_mut().zip(bytes.chunks_exact(4)) {
                *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            }
        }
        // SAFETY: `bytes` holds `2 * n` bytes and `out` at least `n` elements.
        DType::Bf16 => unsafe { simd::dispatch_decode_bf16(bytes.as_ptr(), &mut out[..n]) },
    }
    Ok(n)
}

/// Like [`decode_into`], and also reports the index (within `out`) of the first element
/// that is NaN or infinite (checked block by block right after each block is written).
pub fn decode_into_checked(bytes: &[u8], dtype: DType, out: &mut [f32]) -> Result<(usize, Option<usize>), EncodingError> {
    let n = element_count(bytes.len(), dtype)?;
    if n > out.len() {
        return Err(EncodingError::Overflow { got: n, expected: out.len() });
    }
    decode_into(bytes, dtype, &mut out[..n])?;
    Ok((n, first_non_finite(&out[..n])))
}

/// Decodes a whole byte buffer of `dtype` into a new vector.
pub fn decode_vec(bytes: &[u8], dtype: DType) -> Result<Vec<f32>, EncodingError> {
    let n = element_count(bytes.len(), dtype)?;
    let mut out = vec![0.0; n];
    decode_into(bytes, dtype, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_is_exact() {
        let v = [0.0f32, -1.5, f32::MIN_POSITIVE, 3.4e38, f32::INFINITY];
        let mut b = Vec::new();
        encode_f32(&v, DType::F32, &mut b);
        assert_eq!(b.len(), 20);
        assert_eq!(decode_vec(&b, DType::F32).unwrap(), v);
    }

    #[test]
    fn bf16_wire_halves_bytes_and_keeps_representable_values() {
        let v = [1.0f32, -2.0, 0.5, 256.0];
        let mut b = Vec::new();
        encode_f32(&v, DType::Bf16, &mut b);
        assert_eq!(b.len(), 8);
        assert_eq!(decode_vec(&b, DType::Bf16).unwrap(), v);
    }

    #[test]
    fn checked_decode_finds_the_first_non_finite_element() {
        for dtype in [DType::F32, DType::Bf16] {
            let mut v = vec![1.5f32; 300];
            let mut b = Vec::new();
            encode_f32(&v, dtype, &mut b);
            let mut out = vec![0.0; 300];
            assert_eq!(decode_into_checked(&b, dtype, &mut out).unwrap(), (300, None));
            assert_eq!(out, v);
            for (i, bad) in [(0, f32::NAN), (77, f32::INFINITY), (299, f32::NEG_INFINITY)] {
                v[i] = bad;
                b.clear();
                encode_f32(&v, dtype, &mut b);
                assert_eq!(decode_into_checked(&b, dtype, &mut out).unwrap(), (300, Some(i)), "{dtype} {i}");
                v[i] = 1.5;
            }
            v[150] = f32::INFINITY;
            v[200] = f32::NAN;
            b.clear();
            encode_f32(&v, dtype, &mut b);
            assert_eq!(decode_into_checked(&b, dtype, &mut out).unwrap().1, Some(150), "{dtype}");
        }
    }

    #[test]
    fn bulk_bf16_conversions_match_the_scalar_rules_bit_for_bit() {
        // Bit patterns spread over every exponent, plus ties, NaNs, infinities and subnormals,
        // at odd offsets so the unaligned paths run too.
        let mut x: u32 = 0x9E37_79B9;
        let mut values: Vec<f32> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(x)
            })
            .collect();
        values.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, f32::MIN_POSITIVE / 3.0]);
        values.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), f32::from_bits(0x7f7f_ffff)]);
        for offset in [0usize, 1] {
            let mut out = vec![0xAAu8; offset];
            encode_f32(&values, DType::Bf16, &mut out);
            let words: Vec<u16> = out[offset..].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            let expected: Vec<u16> = values.iter().map(|&v| bf16::from_f32_rne(v)).collect();
            assert_eq!(words, expected, "offset {offset}");
            let mut back = vec![0f32; values.len()];
            decode_into(&out[offset..], DType::Bf16, &mut back).unwrap();
            let widened: Vec<u32> = expected.iter().map(|&w| bf16::to_f32(w).to_bits()).collect();
            assert_eq!(back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), widened);
        }
    }

    #[test]
    fn large_bf16_decodes_match_the_scalar_rule_at_every_alignment() {
        // Outputs above the streaming-store threshold, starting at every 4-byte offset within a
        // 32-byte line and with ragged ends.
        let n = simd::STREAM_BYTES / 4 + 37;
        let words: Vec<u16> = (0..n as u32 + 16).map(|i| (i.wrapping_mul(0x9E37) ^ (i >> 3)) as u16).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = vec![0f32; n + 16];
        for shift in 0..8 {
            for skip in [0usize, 1] {
                let dst = &mut out[shift..shift + n - skip];
                decode_into(&bytes[2 * skip..2 * (skip + dst.len())], DType::Bf16, dst).unwrap();
                for (i, v) in dst.iter().enumerate() {
                    assert_eq!(v.to_bits(), bf16::to_f32(words[skip + i]).to_bits(), "shift {shift} skip {skip} at {i}");
                }
            }
        }
    }

    #[test]
    fn non_finite_bf16_words_are_found() {
        let mut w: Vec<u16> = (0..2000).map(|i| bf16::from_f32_rne(i as f32 - 1000.0)).collect();
        assert_eq!(first_non_finite_bf16(&w), None);
        w[1500] = bf16::from_f32_rne(f32::NEG_INFINITY);
        w[1700] = bf16::from_f32_rne(f32::NAN);
        assert_eq!(first_non_finite_bf16(&w), Some(1500));
        // the largest finite values are not flagged
        assert_eq!(first_non_finite_bf16(&[0x7f7f, 0xff7f]), None);
        assert_eq!(first_non_finite(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE, -0.0]), None);
        let mut v = vec![1.0f32; 3000];
        v[2999] = f32::NEG_INFINITY;
        v[2500] = f32::from_bits(0x7f80_0001); // a signalling NaN
        assert_eq!(first_non_finite(&v), Some(2500));
    }

    #[test]
    fn ragged_and_overflowing_bytes_are_errors() {
        assert!(matches!(decode_vec(&[0u8; 5], DType::F32), Err(EncodingError::Ragged { .. })));
        let mut out = [0.0f32; 1];
        assert_eq!(
            decode_into(&[0u8; 8], DType::F32, &mut out),
            Err(EncodingError::Overflow { got: 2, expected: 1 })
        );
    }
}
