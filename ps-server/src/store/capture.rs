//! A variable's whole state as of one version, taken for a checkpoint, and the state a
//! restore puts back.
//!
//! Taking one costs no copy: the values and the optimizer slots are shared with the live
//! variable, and the next update copies them before it writes (see `apply`), so pushes are
//! never held back for longer than that copy while a checkpoint is written.

use std::sync::Arc;

use parasync_tensor::DType;

use super::def::VariableDef;
use super::variable::{Values, Variable, VariableState};
use crate::error::{Error, Result};
use crate::optimizer::OptimizerSnapshot;

/// One variable's definition, version, values, optimizer state and worker clocks.
#[derive(Clone, Debug)]
pub struct VariableCapture {
    pub def: VariableDef,
    /// Completed sync steps, or applied updates.
    pub version: u64,
    pub optimizer: OptimizerSnapshot,
    /// Bounded mode: each worker's pushed steps (empty in the other modes).
    pub worker_clocks: Vec<u64>,
    /// Per worker, the last push its client had applied and its result (so that a retry
    /// of it after a restore is still answered, not applied again).
    pub last_pushes: Vec<(u32, super::PushId, super::PushResult)>,
    values: Arc<Values>,
}

impl VariableCapture {
    pub(super) fn take(var: &Variable, st: &VariableState) -> VariableCapture {
        VariableCapture {
            def: var.def.clone(),
            version: st.clock.version(),
            optimizer: st.optimizer.snapshot(),
            worker_clocks: st.clock.worker_clocks().to_vec(),
            last_pushes: {
                let mut v: Vec<_> = st.last_push.iter().map(|(w, (id, r))| (*w, *id, *r)).collect();
                v.sort_by_key(|e| e.0);
                v
            },
            values: Arc::clone(&st.values),
        }
    }

    /// The values in their storage dtype, as little-endian bytes.
    #[cfg(target_endian = "little")]
    pub fn values_le_bytes(&self) -> &[u8] {
        match &*self.values {
            Values::F32(v) => parasync_tensor::f32_as_le_bytes(v),
            Values::Bf16(v) => parasync_tensor::u16_as_le_bytes(v),
        }
    }

    /// The values widened to f32 (tests).
    pub fn values_f32(&self) -> Vec<f32> {
        match &*self.values {
            Values::F32(v) => v.clone(),
            Values::Bf16(v) => v.iter().map(|&w| parasync_tensor::bf16::to_f32(w)).collect(),
        }
    }
}

/// The state of a variable read back from a checkpoint.
#[derive(Debug)]
pub struct RestoredVariable {
    pub version: u64,
    /// The values in the definition's storage dtype.
    pub values: Values,
    pub optimizer: OptimizerSnapshot,
    pub worker_clocks: Vec<u64>,
    /// As [`VariableCapture::last_pushes`] (empty for a part cut from several old ones).
    pub last_pushes: Vec<(u32, super::PushId, super::PushResult)>,
}

impl RestoredVariable {
    /// Checks the values' dtype and size against the definition.
    pub(super) fn check(&self, def: &VariableDef, len: usize) -> Result<()> {
        let (dtype, n) = match &self.values {
            Values::F32(v) => (DType::F32, v.len()),
            Values::Bf16(v) => (DType::Bf16, v.len()),
        };
        if dtype != def.dtype || n != len {
            return Err(Error::invalid(&def.name, format!("checkpoint holds {n} {dtype} values, the variable has {len} {}", def.dtype)));
        }
        Ok(())
    }
}
