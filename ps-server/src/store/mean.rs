//! The aggregation numerics of sync mode: the mean of a step's gradients in worker order.

use parasync_tensor::bf16;

use super::gradient::Gradient;

/// Sums gradients in the given (worker-id) order and divides by their count, reusing the
/// first buffer: the result depends only on the set of gradients, never on arrival order.
///
/// The sums run a block of [`MEAN_BLOCK`] elements at a time in a small buffer that stays
/// in cache, so each gradient is read once and the result written once. An element whose
/// f32 sum overflows (finite gradients near 3e38) is summed again in f64 and divided there,
/// so finite gradients always give a finite mean.
///
/// Returns the mean and the gradient buffers it no longer needs, for reuse.
pub fn mean_in_worker_order(grads: Vec<(u32, Gradient)>) -> (Vec<f32>, Vec<Gradient>) {
    let k = grads.len();
    let mut it = grads.into_iter();
    let (_, first) = it.next().expect("a completed step has at least one gradient");
    let mut rest: Vec<Gradient> = it.map(|(_, g)| g).collect();
    let (mut acc, widened) = match first {
        Gradient::F32(v) => (v, None),
        Gradient::Bf16(w) => (w.iter().map(|&x| bf16::to_f32(x)).collect(), Some(Gradient::Bf16(w))),
    };
    let mut sum = [0f32; MEAN_BLOCK];
    let mut start = 0;
    while start < acc.len() {
        let end = (start + MEAN_BLOCK).min(acc.len());
        let sum = &mut sum[..end - start];
        sum.copy_from_slice(&acc[start..end]);
        for g in &rest {
            g.add_range_to(start, sum);
        }
        // (An exponent of all ones is infinity or NaN; the OR of the tests vectorizes.)
        if !sum.iter().fold(false, |any, &s| any | (s.to_bits() & 0x7f80_0000 == 0x7f80_0000)) {
            acc[start..end].iter_mut().zip(sum.iter()).for_each(|(a, &s)| *a = s / k as f32);
        } else {
            for (i, &s) in sum.iter().enumerate() {
                let at = start + i;
                acc[at] = if s.is_finite() {
                    s / k as f32
                } else {
                    // Overflowed, or a non-finite gradient (when those are allowed): in f64
                    // a sum of finite f32 values cannot overflow.
                    let wide = rest.iter().fold(acc[at] as f64, |a, g| a + g.get(at) as f64);
                    (wide / k as f64) as f32
                };
            }
        }
        start = end;
    }
    rest.extend(widened);
    (acc, rest)
}

/// Elements summed at a time by [`mean_in_worker_order`] (8 KiB of partial sums).
pub(super) const MEAN_BLOCK: usize = 2048;
