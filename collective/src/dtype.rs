//! Element types, reduction operators and the reduction kernels.
//!
//! Every kernel folds values in the order it is given them, one element at a time, so a fixed
//! call order gives bitwise identical results whatever the timing. bf16 is widened to f32,
//! reduced in f32 and rounded once (round-to-nearest-even) at the end.

use std::fmt;

#[cfg(target_endian = "big")]
compile_error!(
    "parasync-collective moves raw little-endian bytes and supports little-endian targets only"
);

/// Element type of a tensor taking part in a collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE-754 binary32.
    F32,
    /// bfloat16 (upper half of an f32); reduced in f32, rounded once.
    Bf16,
    /// IEEE-754 binary64.
    F64,
    /// Two's complement 32-bit integer (sums wrap).
    I32,
    /// Two's complement 64-bit integer (sums wrap).
    I64,
}

impl DType {
    /// Every dtype, for tests and benchmarks that cover them all.
    pub const ALL: [DType; 5] = [DType::F32, DType::Bf16, DType::F64, DType::I32, DType::I64];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 => 2,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// Lower-case name used in flags, tables and messages.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    /// Wire code of the dtype in frame headers.
    pub(crate) const fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::Bf16 => 2,
            DType::F64 => 3,
            DType::I32 => 4,
            DType::I64 => 5,
        }
    }

    /// Inverse of [`DType::code`].
    pub(crate) fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
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
            "f32" | "float32" | "float" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            "f64" | "float64" | "double" => Ok(DType::F64),
            "i32" | "int32" => Ok(DType::I32),
            "i64" | "int64" => Ok(DType::I64),
            other => Err(format!(
                "unknown dtype {other:?} (expected f32, bf16, f64, i32 or i64)"
            )),
        }
    }
}

/// How allreduce and reduce_scatter combine the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum (integers wrap on overflow).
    Sum,
    /// Sum divided by the number of ranks (integers: truncated toward zero).
    Avg,
    /// Minimum; a NaN anywhere gives NaN.
    Min,
    /// Maximum; a NaN anywhere gives NaN.
    Max,
}

impl ReduceOp {
    /// Every operator, for tests that cover them all.
    pub const ALL: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max];

    /// Lower-case name used in messages.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
        }
    }

    /// Wire code in frame headers (0 means "no reduction").
    pub(crate) const fn code(self) -> u8 {
        match self {
            ReduceOp::Sum => 1,
            ReduceOp::Avg => 2,
            ReduceOp::Min => 3,
            ReduceOp::Max => 4,
        }
    }

    /// Inverse of [`ReduceOp::code`].
    pub(crate) fn from_code(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|o| o.code() == code)
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs `$body` with the type alias `$T` set to the Rust element type of the [`DType`] value
/// `$dtype`: for callers (the C and Python bindings) that hold a buffer of a dtype known only
/// at run time.
///
/// ```
/// use parasync_collective::{with_element, DType};
/// let size = with_element!(DType::Bf16, T => std::mem::size_of::<T>());
/// assert_eq!(size, 2);
/// ```
#[macro_export]
macro_rules! with_element {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::Bf16 => {
                type $T = $crate::Bf16;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
        }
    };
}

/// A bfloat16 value, stored as its 16-bit pattern (the upper half of the f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Rounds `x` to the nearest bf16, ties to even.
    pub fn from_f32(x: f32) -> Bf16 {
        Bf16(parasync_tensor::bf16::from_f32_rne(x))
    }

    /// The exact f32 value of this bf16.
    pub fn to_f32(self) -> f32 {
        parasync_tensor::bf16::to_f32(self.0)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
    impl Sealed for super::Bf16 {}
}

/// An element type collectives can move and reduce.
///
/// Sealed: implemented for `f32`, [`Bf16`], `f64`, `i32` and `i64` only, all plain data
/// without padding, which is what lets buffers be viewed as raw little-endian bytes.
pub trait Element: Copy + Send + Sync + Default + 'static + sealed::Sealed {
    /// The dtype tag of this type.
    const DTYPE: DType;
    /// The type partial reductions are kept in (f32 for bf16, the type itself otherwise).
    type Acc: Element<Acc = Self::Acc>;
    /// Widens a value to the accumulator type (exact).
    fn load(self) -> Self::Acc;
    /// Narrows an accumulated value back (bf16: round to nearest even).
    fn store(acc: Self::Acc) -> Self;
    /// `op(a, b)`: the fold step. The order of arguments is part of determinism.
    fn combine(a: Self::Acc, b: Self::Acc, op: ReduceOp) -> Self::Acc;
    /// Divides an accumulated sum by the rank count (for [`ReduceOp::Avg`]).
    fn divide(acc: Self::Acc, n: usize) -> Self::Acc;
}

macro_rules! float_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            type Acc = $t;
            #[inline]
            fn load(self) -> $t {
                self
            }
            #[inline]
            fn store(acc: $t) -> $t {
                acc
            }
            #[inline]
            fn combine(a: $t, b: $t, op: ReduceOp) -> $t {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a + b,
                    ReduceOp::Min => {
                        if a.is_nan() || b.is_nan() {
                            <$t>::NAN
                        } else if b < a {
                            b
                        } else {
                            a
                        }
                    }
                    ReduceOp::Max => {
                        if a.is_nan() || b.is_nan() {
                            <$t>::NAN
                        } else if b > a {
                            b
                        } else {
                            a
                        }
                    }
                }
            }
            #[inline]
            fn divide(acc: $t, n: usize) -> $t {
                acc / n as $t
            }
        }
    };
}
float_element!(f32, DType::F32);
float_element!(f64, DType::F64);

macro_rules! int_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            type Acc = $t;
            #[inline]
            fn load(self) -> $t {
                self
            }
            #[inline]
            fn store(acc: $t) -> $t {
                acc
            }
            #[inline]
            fn combine(a: $t, b: $t, op: ReduceOp) -> $t {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                }
            }
            #[inline]
            fn divide(acc: $t, n: usize) -> $t {
                acc / n as $t
            }
        }
    };
}
int_element!(i32, DType::I32);
int_element!(i64, DType::I64);

impl Element for Bf16 {
    const DTYPE: DType = DType::Bf16;
    type Acc = f32;
    #[inline]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline]
    fn store(acc: f32) -> Bf16 {
        Bf16::from_f32(acc)
    }
    #[inline]
    fn combine(a: f32, b: f32, op: ReduceOp) -> f32 {
        f32::combine(a, b, op)
    }
    #[inline]
    fn divide(acc: f32, n: usize) -> f32 {
        acc / n as f32
    }
}

/// Views a slice of elements as its little-endian bytes.
pub fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: `Element` is sealed to padding-free plain-data types; any byte pattern of them
    // is a valid `u8`, and the length covers exactly the slice's memory.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Views a mutable slice of elements as its little-endian bytes.
pub fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; in addition every byte pattern is a valid `T` (f32/f64 accept
    // any bits, integers and `Bf16` too), so writes through the byte view cannot break `T`.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Views bytes that were cut from an `A` slice (aligned, whole elements) as `A` again.
/// Panics if `b` is misaligned or not a whole number of elements.
pub(crate) fn from_bytes_mut<A: Element>(b: &mut [u8]) -> &mut [A] {
    let size = std::mem::size_of::<A>();
    assert!(
        b.len().is_multiple_of(size)
            && (b.as_ptr() as usize).is_multiple_of(std::mem::align_of::<A>()),
        "misaligned element bytes"
    );
    // SAFETY: alignment and length are checked above; every bit pattern is a valid `A`.
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast::<A>(), b.len() / size) }
}

/// `acc[i] = load(x[i])`.
#[inline]
fn load_into_portable<T: Element>(acc: &mut [T::Acc], x: &[T]) {
    debug_assert_eq!(acc.len(), x.len());
    for (a, v) in acc.iter_mut().zip(x) {
        *a = v.load();
    }
}

/// `acc[i] = combine(acc[i], load(x[i]))`: `x` is folded in after what `acc` holds.
#[inline]
fn fold_into_portable<T: Element>(acc: &mut [T::Acc], x: &[T], op: ReduceOp) {
    debug_assert_eq!(acc.len(), x.len());
    match op {
        // A branch-free loop per operator lets the compiler vectorize the common sum.
        ReduceOp::Sum | ReduceOp::Avg => {
            for (a, v) in acc.iter_mut().zip(x) {
                *a = T::combine(*a, v.load(), ReduceOp::Sum);
            }
        }
        ReduceOp::Min => {
            for (a, v) in acc.iter_mut().zip(x) {
                *a = T::combine(*a, v.load(), ReduceOp::Min);
            }
        }
        ReduceOp::Max => {
            for (a, v) in acc.iter_mut().zip(x) {
                *a = T::combine(*a, v.load(), ReduceOp::Max);
            }
        }
    }
}

/// `out[i] = store(finish(acc[i]))`: divides for `Avg`, then narrows (bf16 rounds once here).
#[inline]
fn finish_into_portable<T: Element>(out: &mut [T], acc: &[T::Acc], op: ReduceOp, n: usize) {
    debug_assert_eq!(acc.len(), out.len());
    if op == ReduceOp::Avg {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = T::store(T::divide(*a, n));
        }
    } else {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = T::store(*a);
        }
    }
}

/// `own[i] = store(finish(combine(partial[i], load(own[i]))))`: the last fold of a ring
/// reduction, written straight into the output (same numerics as `fold_into` then `finish_into`).
#[inline]
fn fold_finish_portable<T: Element>(own: &mut [T], partial: &[T::Acc], op: ReduceOp, n: usize) {
    debug_assert_eq!(own.len(), partial.len());
    match op {
        ReduceOp::Avg => {
            for (o, p) in own.iter_mut().zip(partial) {
                *o = T::store(T::divide(T::combine(*p, o.load(), ReduceOp::Sum), n));
            }
        }
        ReduceOp::Sum => {
            for (o, p) in own.iter_mut().zip(partial) {
                *o = T::store(T::combine(*p, o.load(), ReduceOp::Sum));
            }
        }
        _ => {
            for (o, p) in own.iter_mut().zip(partial) {
                *o = T::store(T::combine(*p, o.load(), op));
            }
        }
    }
}

/// `acc[i] = combine(load(first[i]), load(second[i]))`: the first fold of the pairwise exchange.
#[inline]
fn fold_two_portable<T: Element>(acc: &mut [T::Acc], first: &[T], second: &[T], op: ReduceOp) {
    for ((a, f), s) in acc.iter_mut().zip(first).zip(second) {
        *a = T::combine(f.load(), s.load(), op);
    }
}

/// `own[i] = store(finish(combine(load(own[i]), load(theirs[i]))))` (two ranks, last fold).
#[inline]
fn fold_finish_two_portable<T: Element>(own: &mut [T], theirs: &[T], op: ReduceOp, n: usize) {
    for (o, t) in own.iter_mut().zip(theirs) {
        let a = T::combine(o.load(), t.load(), op);
        *o = T::store(if op == ReduceOp::Avg {
            T::divide(a, n)
        } else {
            a
        });
    }
}

/// `own[i] = store(finish(combine(acc[i], load(theirs[i]))))` (last fold of the pairwise exchange).
#[inline]
fn fold_finish_acc_portable<T: Element>(
    own: &mut [T],
    acc: &[T::Acc],
    theirs: &[T],
    op: ReduceOp,
    n: usize,
) {
    for ((o, a), t) in own.iter_mut().zip(acc).zip(theirs) {
        let a = T::combine(*a, t.load(), op);
        *o = T::store(if op == ReduceOp::Avg {
            T::divide(a, n)
        } else {
            a
        });
    }
}

/// Defines `$name`, which runs `$portable` compiled for AVX2 when the CPU has it (the same
/// element-wise IEEE operations, only wider: results are bitwise identical either way).
macro_rules! dispatch {
    ($name:ident, $portable:ident, $avx2:ident, ($($arg:ident: $ty:ty),*), ($($call:ident),*)) => {
        #[doc = concat!("Runs `", stringify!($portable), "`, vectorized with AVX2 where available.")]
        #[inline]
        pub(crate) fn $name<T: Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { $avx2::<T>($($call),*) };
            }
            $portable::<T>($($call),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2<T: Element>($($arg: $ty),*) {
            $portable::<T>($($call),*)
        }
    };
}

dispatch!(load_into, load_into_portable, load_into_avx2, (acc: &mut [T::Acc], x: &[T]), (acc, x));
dispatch!(fold_into, fold_into_portable, fold_into_avx2, (acc: &mut [T::Acc], x: &[T], op: ReduceOp), (acc, x, op));
dispatch!(finish_into, finish_into_portable, finish_into_avx2, (out: &mut [T], acc: &[T::Acc], op: ReduceOp, n: usize), (out, acc, op, n));
dispatch!(fold_finish, fold_finish_portable, fold_finish_avx2, (own: &mut [T], partial: &[T::Acc], op: ReduceOp, n: usize), (own, partial, op, n));
dispatch!(fold_two, fold_two_portable, fold_two_avx2, (acc: &mut [T::Acc], first: &[T], second: &[T], op: ReduceOp), (acc, first, second, op));
dispatch!(fold_finish_two, fold_finish_two_portable, fold_finish_two_avx2, (own: &mut [T], theirs: &[T], op: ReduceOp, n: usize), (own, theirs, op, n));
dispatch!(fold_finish_acc, fold_finish_acc_portable, fold_finish_acc_avx2, (own: &mut [T], acc: &[T::Acc], theirs: &[T], op: ReduceOp, n: usize), (own, acc, theirs, op, n));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_codes_round_trip_and_parse() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert_eq!(DType::from_code(0), None);
        assert!("f16".parse::<DType>().is_err());
        for o in ReduceOp::ALL {
            assert_eq!(ReduceOp::from_code(o.code()), Some(o));
        }
    }

    #[test]
    fn combine_table() {
        let cases: &[(f32, f32, ReduceOp, f32)] = &[
            (1.0, 2.0, ReduceOp::Sum, 3.0),
            (1.0, 2.0, ReduceOp::Min, 1.0),
            (1.0, 2.0, ReduceOp::Max, 2.0),
            (-0.5, -3.0, ReduceOp::Min, -3.0),
        ];
        for &(a, b, op, want) in cases {
            assert_eq!(f32::combine(a, b, op), want, "{a} {op} {b}");
        }
        assert!(f32::combine(f32::NAN, 1.0, ReduceOp::Max).is_nan());
        assert!(f32::combine(1.0, f32::NAN, ReduceOp::Min).is_nan());
        assert_eq!(i32::combine(i32::MAX, 1, ReduceOp::Sum), i32::MIN);
        assert_eq!(i64::divide(-7, 2), -3);
    }

    #[test]
    fn bf16_is_reduced_in_f32_and_rounded_once() {
        // 1 + 2^-8 is not a bf16; summing 256 copies of 2^-8 onto 1 in bf16 would stay at 1
        // (each step rounds back), in f32 it reaches 2 exactly.
        let tiny = Bf16::from_f32(1.0 / 256.0);
        let mut acc = vec![1.0f32];
        for _ in 0..256 {
            fold_into(&mut acc, &[tiny], ReduceOp::Sum);
        }
        let mut out = [Bf16::default()];
        finish_into(&mut out, &acc, ReduceOp::Sum, 1);
        assert_eq!(out[0].to_f32(), 2.0);
    }

    #[test]
    fn avg_divides_once_at_the_end() {
        let mut acc = vec![0i32; 1];
        load_into(&mut acc, &[7i32]);
        fold_into(&mut acc, &[8i32], ReduceOp::Avg);
        let mut out = [0i32];
        finish_into(&mut out, &acc, ReduceOp::Avg, 2);
        assert_eq!(out[0], 7);
    }

    #[test]
    fn byte_views_are_little_endian() {
        let v = [1.0f32, -2.0];
        assert_eq!(&as_bytes(&v)[..4], &1.0f32.to_le_bytes());
        let mut w = [Bf16(0); 2];
        as_bytes_mut(&mut w).copy_from_slice(&[0x80, 0x3f, 0, 0x40]);
        assert_eq!(w[0].to_f32(), 1.0);
        assert_eq!(w[1].to_f32(), 2.0);
    }
}
