//! Spare gradient buffers kept for reuse, within the shard's byte budget.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parasync_tensor::DType;

use super::gradient::Gradient;
use crate::metrics::Metrics;

/// At most one spare gradient buffer per wire dtype, so that a variable pushed in both
/// (workers with different wire settings) reuses a buffer for each instead of dropping one
/// and mapping the other afresh on every switch. Every kept byte is charged to the shard's
/// [`SpareBudget`], so spares never grow past it however many variables are pushed.
#[derive(Debug)]
pub(super) struct Spares {
    pub(super) f32: Option<Vec<f32>>,
    pub(super) bf16: Option<Vec<u16>>,
    pub(super) budget: Arc<SpareBudget>,
}

impl Spares {
    pub(super) fn new(budget: Arc<SpareBudget>) -> Self {
        Spares { f32: None, bf16: None, budget }
    }

    /// A buffer of `len` elements for `wire` values: the spare one, or a new one.
    pub(super) fn take(&mut self, wire: DType, len: usize) -> Gradient {
        let spare = match wire {
            DType::F32 => self.f32.take().map(Gradient::F32),
            DType::Bf16 => self.bf16.take().map(Gradient::Bf16),
        };
        match spare {
            Some(g) => {
                self.budget.release(g.bytes());
                g
            }
            None => match wire {
                DType::F32 => Gradient::F32(vec![0.0; len]),
                DType::Bf16 => Gradient::Bf16(vec![0; len]),
            },
        }
    }

    /// Keeps `buf` unless a spare of its dtype is already kept or the budget is spent.
    pub(super) fn keep(&mut self, buf: Gradient) {
        let free = match &buf {
            Gradient::F32(_) => self.f32.is_none(),
            Gradient::Bf16(_) => self.bf16.is_none(),
        };
        if !free || !self.budget.reserve(buf.bytes()) {
            return;
        }
        match buf {
            Gradient::F32(v) => self.f32 = Some(v),
            Gradient::Bf16(v) => self.bf16 = Some(v),
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        let kept = [self.f32.take().map(Gradient::F32), self.bf16.take().map(Gradient::Bf16)];
        self.budget.release(kept.iter().flatten().map(Gradient::bytes).sum());
    }
}

/// The bytes a shard may keep in spare gradient buffers, over all its variables; the bytes
/// in use are the `parasync_spare_buffer_bytes` gauge.
#[derive(Debug)]
pub struct SpareBudget {
    limit: usize,
    metrics: Arc<Metrics>,
}

impl SpareBudget {
    /// A budget of `limit` bytes, counted in `metrics`.
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        SpareBudget { limit, metrics }
    }

    /// Bytes kept now.
    pub fn used(&self) -> usize {
        self.metrics.spare_buffer_bytes.load(Relaxed) as usize
    }

    pub(super) fn reserve(&self, bytes: usize) -> bool {
        let limit = self.limit as u64;
        let add = |u: u64| u.checked_add(bytes as u64).filter(|&t| t <= limit);
        self.metrics.spare_buffer_bytes.fetch_update(Relaxed, Relaxed, add).is_ok()
    }

    pub(super) fn release(&self, bytes: usize) {
        self.metrics.spare_buffer_bytes.fetch_sub(bytes as u64, Relaxed);
    }
}
