//! Pushed gradients: held in their wire type, collected from a push's chunks and checked.

use parasync_tensor::{bf16, DType};

use super::variable::Variable;
use crate::error::{Error, Result};
use crate::optimizer::Grad;

/// A pushed gradient, held as it arrived: `f32` values, or bf16 words (half the memory;
/// widened to `f32` inside the update, so the result is the same as decoding first).
#[derive(Clone, Debug, PartialEq)]
pub enum Gradient {
    /// One `f32` per element.
    F32(Vec<f32>),
    /// One bf16 word per element.
    Bf16(Vec<u16>),
}

impl Gradient {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Gradient::F32(v) => v.len(),
            Gradient::Bf16(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, for the optimizer.
    pub fn as_grad(&self) -> Grad<'_> {
        match self {
            Gradient::F32(v) => Grad::F32(v),
            Gradient::Bf16(v) => Grad::Bf16(v),
        }
    }

    /// Bytes held by the buffer.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Gradient::F32(v) => v.capacity() * 4,
            Gradient::Bf16(v) => v.capacity() * 2,
        }
    }

    /// The values as `f32` (exact).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Gradient::F32(v) => v,
            Gradient::Bf16(v) => v.iter().map(|&w| bf16::to_f32(w)).collect(),
        }
    }

    /// Adds the values from element `start` on to `acc` (as many as it holds).
    pub(super) fn add_range_to(&self, start: usize, acc: &mut [f32]) {
        let end = start + acc.len();
        match self {
            Gradient::F32(g) => acc.iter_mut().zip(&g[start..end]).for_each(|(a, &x)| *a += x),
            Gradient::Bf16(g) => acc.iter_mut().zip(&g[start..end]).for_each(|(a, &w)| *a += bf16::to_f32(w)),
        }
    }

    /// Element `i` as f32.
    pub(super) fn get(&self, i: usize) -> f32 {
        match self {
            Gradient::F32(g) => g[i],
            Gradient::Bf16(g) => bf16::to_f32(g[i]),
        }
    }
}

impl From<Vec<f32>> for Gradient {
    fn from(v: Vec<f32>) -> Self {
        Gradient::F32(v)
    }
}


/// Collects one pushed tensor from its chunks as they arrive, in the wire's element type
/// (bf16 stays bf16: half the memory, widened inside the update), so the server holds the
/// gradient once and never the whole message.
#[derive(Debug)]
pub struct GradientBuffer {
    name: String,
    wire: DType,
    check_finite: bool,
    values: Gradient,
    filled: usize,
}

impl GradientBuffer {
    /// A buffer for a tensor of `var`'s size arriving as `wire` with `num_elements` announced.
    pub fn new(var: &Variable, wire: DType, num_elements: u64, check_finite: bool) -> Result<Self> {
        if num_elements != var.len as u64 {
            return Err(Error::invalid(
                &var.def.name,
                format!("push announces {num_elements} elements, but the variable has shape {:?} ({} elements)", var.def.shape, var.len),
            ));
        }
        // Every element is overwritten before `finish` succeeds, so a recycled buffer's old
        // contents never leak into a result.
        let values = var.spare.lock().take(wire, var.len);
        Ok(GradientBuffer { name: var.def.name.clone(), wire, check_finite, values, filled: 0 })
    }

    /// Decodes one chunk of wire bytes into the next free elements.
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let n = parasync_tensor::element_count(bytes.len(), self.wire)
            .map_err(|e| Error::invalid(&self.name, format!("chunk at element {}: {e}", self.filled)))?;
        self.check_room(n)?;
        let range = self.filled..self.filled + n;
        match &mut self.values {
            Gradient::F32(v) => {
                parasync_tensor::decode_into(bytes, DType::F32, &mut v[range]).map_err(|e| Error::invalid(&self.name, e.to_string()))?;
            }
            Gradient::Bf16(v) => {
                for (dst, src) in v[range].iter_mut().zip(bytes.chunks_exact(2)) {
                    *dst = u16::from_le_bytes([src[0], src[1]]);
                }
            }
        }
        self.accept(n)
    }

    /// Elements still to come.
    pub fn remaining(&self) -> usize {
        self.values.len() - self.filled
    }

    /// The wire dtype the values arrive in.
    pub fn wire(&self) -> DType {
        self.wire
    }

    /// Where the next `n` elements go, as bytes to receive into directly (on a
    /// little-endian machine the wire layout is the in-memory layout); `None` on others.
    /// Follow with [`GradientBuffer::commit_direct`].
    pub fn direct_slot(&mut self, n: usize) -> Option<&mut [u8]> {
        let end = (self.filled + n).min(self.values.len());
        #[cfg(target_endian = "little")]
        return Some(match &mut self.values {
            Gradient::F32(v) => parasync_tensor::f32_as_le_bytes_mut(&mut v[self.filled..end]),
            Gradient::Bf16(v) => parasync_tensor::u16_as_le_bytes_mut(&mut v[self.filled..end]),
        });
        #[cfg(not(target_endian = "little"))]
        {
            let _ = end;
            None
        }
    }

    /// Accepts `n` elements received through [`GradientBuffer::direct_slot`].
    pub fn commit_direct(&mut self, n: usize) -> Result<()> {
        self.check_room(n)?;
        self.accept(n)
    }

    pub(super) fn check_room(&self, n: usize) -> Result<()> {
        if self.filled + n > self.values.len() {
            return Err(Error::invalid(
                &self.name,
                format!("data overruns the variable: {} elements sent, the variable has {}", self.filled + n, self.values.len()),
            ));
        }
        Ok(())
    }

    /// Checks the `n` elements after the filled ones and counts them as filled.
    pub(super) fn accept(&mut self, n: usize) -> Result<()> {
        let range = self.filled..self.filled + n;
        if self.check_finite {
            let bad = match &self.values {
                Gradient::F32(v) => parasync_tensor::first_non_finite(&v[range]),
                Gradient::Bf16(v) => parasync_tensor::first_non_finite_bf16(&v[range]),
            };
            if let Some(i) = bad {
                let at = self.filled + i;
                let value = match &self.values {
                    Gradient::F32(v) => v[at],
                    Gradient::Bf16(v) => bf16::to_f32(v[at]),
                };
                return Err(Error::invalid(
                    &self.name,
                    format!("gradient element {at} is {value} (non-finite gradients are rejected)"),
                ));
            }
        }
        self.filled += n;
        Ok(())
    }

    /// The complete tensor, or an error if the stream ended early.
    pub fn finish(self) -> Result<Gradient> {
        if self.filled != self.values.len() {
            return Err(Error::invalid(
                &self.name,
                format!("stream ended after {} of {} elements", self.filled, self.values.len()),
            ));
        }
        Ok(self.values)
    }
}
