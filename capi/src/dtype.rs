//! Element types and reduction operators as C passes them: plain integers with named
//! constants, checked on entry, so that an out-of-range value is a `PARASYNC_STATUS_USAGE`
//! error rather than an invalid Rust enum.

use parasync_client::DType as PsDType;
use parasync_collective::{DType as CommDType, ReduceOp};

use crate::error::{Error, Result};

/// Element type of a buffer: one of the `PARASYNC_DTYPE_*` constants.
///
/// The parameter server stores and moves `F32` and `BF16`; collectives take all five.
/// `BF16` buffers hold the raw 16-bit patterns (`uint16_t`, the upper half of an `f32`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParasyncDtype(pub u32);

/// IEEE-754 binary32 (`float`).
pub const PARASYNC_DTYPE_F32: ParasyncDtype = ParasyncDtype(1);
/// bfloat16 as `uint16_t` bit patterns.
pub const PARASYNC_DTYPE_BF16: ParasyncDtype = ParasyncDtype(2);
/// IEEE-754 binary64 (`double`); collectives only.
pub const PARASYNC_DTYPE_F64: ParasyncDtype = ParasyncDtype(3);
/// `int32_t` (sums wrap); collectives only.
pub const PARASYNC_DTYPE_I32: ParasyncDtype = ParasyncDtype(4);
/// `int64_t` (sums wrap); collectives only.
pub const PARASYNC_DTYPE_I64: ParasyncDtype = ParasyncDtype(5);

const DTYPES: [(ParasyncDtype, CommDType); 5] = [
    (PARASYNC_DTYPE_F32, CommDType::F32),
    (PARASYNC_DTYPE_BF16, CommDType::Bf16),
    (PARASYNC_DTYPE_F64, CommDType::F64),
    (PARASYNC_DTYPE_I32, CommDType::I32),
    (PARASYNC_DTYPE_I64, CommDType::I64),
];

impl ParasyncDtype {
    /// The collectives' dtype; `what` names the argument in the error.
    pub(crate) fn to_comm(self, what: &str) -> Result<CommDType> {
        DTYPES.iter().find(|(c, _)| *c == self).map(|&(_, d)| d).ok_or_else(|| {
            Error::usage(format!(
                "{what} is {}, not a PARASYNC_DTYPE_* value (F32 = 1, BF16 = 2, F64 = 3, I32 = 4, I64 = 5)",
                self.0
            ))
        })
    }

    /// The parameter server's dtype (`F32` or `BF16`).
    pub(crate) fn to_ps(self, what: &str) -> Result<PsDType> {
        match self.to_comm(what)? {
            CommDType::F32 => Ok(PsDType::F32),
            CommDType::Bf16 => Ok(PsDType::Bf16),
            other => Err(Error::usage(format!(
                "{what} is {other}: the parameter server stores and moves f32 and bf16 only"
            ))),
        }
    }

    /// The constant for a parameter-server dtype.
    pub(crate) fn from_ps(d: PsDType) -> ParasyncDtype {
        match d {
            PsDType::F32 => PARASYNC_DTYPE_F32,
            PsDType::Bf16 => PARASYNC_DTYPE_BF16,
        }
    }
}

/// How allreduce and reduce_scatter combine the ranks' values: one of the
/// `PARASYNC_REDUCE_*` constants.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParasyncReduceOp(pub u32);

/// Sum (integers wrap on overflow).
pub const PARASYNC_REDUCE_SUM: ParasyncReduceOp = ParasyncReduceOp(1);
/// Sum divided by the number of ranks (integers: truncated toward zero).
pub const PARASYNC_REDUCE_AVG: ParasyncReduceOp = ParasyncReduceOp(2);
/// Minimum; a NaN anywhere gives NaN.
pub const PARASYNC_REDUCE_MIN: ParasyncReduceOp = ParasyncReduceOp(3);
/// Maximum; a NaN anywhere gives NaN.
pub const PARASYNC_REDUCE_MAX: ParasyncReduceOp = ParasyncReduceOp(4);

impl ParasyncReduceOp {
    /// The collectives' operator.
    pub(crate) fn to_comm(self) -> Result<ReduceOp> {
        match self {
            PARASYNC_REDUCE_SUM => Ok(ReduceOp::Sum),
            PARASYNC_REDUCE_AVG => Ok(ReduceOp::Avg),
            PARASYNC_REDUCE_MIN => Ok(ReduceOp::Min),
            PARASYNC_REDUCE_MAX => Ok(ReduceOp::Max),
            ParasyncReduceOp(other) => Err(Error::usage(format!(
                "op is {other}, not a PARASYNC_REDUCE_* value (SUM = 1, AVG = 2, MIN = 3, MAX = 4)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_both_ways_and_strangers_are_refused() {
        for (c, d) in DTYPES {
            assert_eq!(c.to_comm("dtype").unwrap(), d);
        }
        for d in [PsDType::F32, PsDType::Bf16] {
            assert_eq!(ParasyncDtype::from_ps(d).to_ps("wire_dtype").unwrap(), d);
        }
        assert!(format!("{:?}", ParasyncDtype(0).to_comm("dtype").unwrap_err()).contains("dtype is 0, not a PARASYNC_DTYPE_"));
        assert!(format!("{:?}", PARASYNC_DTYPE_I64.to_ps("wire_dtype").unwrap_err()).contains("wire_dtype is i64"));
        assert_eq!(PARASYNC_REDUCE_MAX.to_comm().unwrap(), ReduceOp::Max);
        assert!(ParasyncReduceOp(0).to_comm().is_err());
    }
}
