//! A 64-128-10 ReLU MLP with softmax cross-entropy, written as plain f32 loops.
//!
//! Parameters travel through the parameter server as flat `Vec<f32>`s, so the model works
//! directly on `&[Vec<f32>]` in [`parameter_specs`] order rather than owning a struct. Weights
//! are `[in, out]` row-major, which lets every matrix loop run its innermost index over a
//! contiguous row (`out`), the layout the compiler vectorises well. The demo runs on two cores,
//! so the kernels also skip zero inputs: digit images are about half zero pixels and ReLU zeroes
//! about half the hidden units, which roughly halves the work of both layers.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::digits::{Dataset, CLASSES, FEATURES};

/// Width of the hidden layer.
pub const HIDDEN: usize = 128;

/// Rows per forward pass in [`accuracy`]: bounds scratch memory on large datasets.
const EVAL_CHUNK: usize = 256;

/// Names and shapes of the parameters in the order they are registered/pushed/pulled:
/// ("mlp/w1",[64,128]), ("mlp/b1",[128]), ("mlp/w2",[128,10]), ("mlp/b2",[10]). Weights are [in, out] row-major.
pub fn parameter_specs() -> Vec<(String, Vec<usize>)> {
    vec![
        ("mlp/w1".to_string(), vec![FEATURES, HIDDEN]),
        ("mlp/b1".to_string(), vec![HIDDEN]),
        ("mlp/w2".to_string(), vec![HIDDEN, CLASSES]),
        ("mlp/b2".to_string(), vec![CLASSES]),
    ]
}

/// Initial values: Glorot/He-uniform weights from a seeded RNG, zero biases. Same seed → same values.
///
/// The hidden layer feeds a ReLU, so it uses He-uniform (`±sqrt(6 / fan_in)`), which keeps the
/// activation variance from halving at each ReLU; the output layer feeds softmax and uses
/// Glorot-uniform (`±sqrt(6 / (fan_in + fan_out))`).
pub fn init_params(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut uniform = |len: usize, limit: f32| -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-limit..limit)).collect()
    };
    let he = (6.0 / FEATURES as f32).sqrt();
    let glorot = (6.0 / (HIDDEN + CLASSES) as f32).sqrt();
    let w1 = uniform(FEATURES * HIDDEN, he);
    let w2 = uniform(HIDDEN * CLASSES, glorot);
    vec![w1, vec![0.0; HIDDEN], w2, vec![0.0; CLASSES]]
}

/// Mean cross-entropy loss over the batch and gradients (same layout as params) for a mini-batch.
///
/// An empty batch gives loss 0 and zero gradients, so pushing its result is a no-op rather than
/// a NaN that would poison the shared parameters. Panics if `params` does not match
/// [`parameter_specs`].
pub fn loss_and_grads(params: &[Vec<f32>], batch: &Dataset) -> (f32, Vec<Vec<f32>>) {
    // Unpacking checks every shape before any work; only w2 is needed past the forward pass.
    let [_, _, w2, _] = unpack(params);
    let mut gw1 = vec![0f32; FEATURES * HIDDEN];
    let mut gb1 = vec![0f32; HIDDEN];
    let mut gw2 = vec![0f32; HIDDEN * CLASSES];
    let mut gb2 = vec![0f32; CLASSES];
    let n = batch.len();
    if n == 0 {
        return (0.0, vec![gw1, gb1, gw2, gb2]);
    }

    let acts = forward(params, &batch.x, n);
    // The loss is a mean of n values near ln(10); summing in f64 keeps the last bits honest for
    // callers (and the gradient check) that difference two nearby losses.
    let mut loss = 0f64;
    let scale = 1.0 / n as f32;
    let mut dlogits = [0f32; CLASSES];
    let mut dhidden = [0f32; HIDDEN];
    for b in 0..n {
        let x = batch.row(b);
        let hidden = &acts.hidden[b * HIDDEN..(b + 1) * HIDDEN];
        let logits = &acts.logits[b * CLASSES..(b + 1) * CLASSES];
        let label = batch.y[b] as usize;

        // Softmax shifted by the max logit so exp never overflows; loss = logsumexp - logit[y].
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (d, &z) in dlogits.iter_mut().zip(logits) {
            *d = (z - max).exp();
            sum += *d;
        }
        loss += f64::from(sum.ln() + max - logits[label]);
        // d(mean loss)/d(logits) = (softmax - onehot) / n.
        let inv = scale / sum;
        for d in dlogits.iter_mut() {
            *d *= inv;
        }
        dlogits[label] -= scale;

        for (g, &d) in gb2.iter_mut().zip(&dlogits) {
            *g += d;
        }
        for (k, &h) in hidden.iter().enumerate() {
            // A dead unit (h == 0) contributes nothing to w2 and passes no gradient back.
            if h == 0.0 {
                dhidden[k] = 0.0;
                continue;
            }
            let w2_row = &w2[k * CLASSES..(k + 1) * CLASSES];
            let gw2_row = &mut gw2[k * CLASSES..(k + 1) * CLASSES];
            let mut dh = 0f32;
            for ((g, &w), &d) in gw2_row.iter_mut().zip(w2_row).zip(&dlogits) {
                *g += h * d;
                dh += w * d;
            }
            dhidden[k] = dh;
        }

        for (g, &d) in gb1.iter_mut().zip(&dhidden) {
            *g += d;
        }
        for (i, &xi) in x.iter().enumerate() {
            if xi == 0.0 {
                continue;
            }
            let gw1_row = &mut gw1[i * HIDDEN..(i + 1) * HIDDEN];
            for (g, &d) in gw1_row.iter_mut().zip(&dhidden) {
                *g += xi * d;
            }
        }
    }
    ((loss / n as f64) as f32, vec![gw1, gb1, gw2, gb2])
}

/// Fraction of rows classified correctly (the arg-max logit equals the label).
///
/// Returns 0.0 for an empty dataset. Panics if `params` does not match [`parameter_specs`].
pub fn accuracy(params: &[Vec<f32>], data: &Dataset) -> f64 {
    // Checked even when there is nothing to evaluate, so a shape bug is not hidden by an empty set.
    unpack(params);
    if data.is_empty() {
        return 0.0;
    }
    let mut correct = 0usize;
    for start in (0..data.len()).step_by(EVAL_CHUNK) {
        let end = (start + EVAL_CHUNK).min(data.len());
        let acts = forward(
            params,
            &data.x[start * FEATURES..end * FEATURES],
            end - start,
        );
        for (logits, &label) in acts.logits.chunks_exact(CLASSES).zip(&data.y[start..end]) {
            if argmax(logits) == label as usize {
                correct += 1;
            }
        }
    }
    correct as f64 / data.len() as f64
}

/// Iterator-like helper: mini-batch index lists for one epoch, shuffled with a seeded RNG (seed, epoch).
///
/// Every index in `0..n` appears exactly once; all batches have `batch_size` indices except
/// possibly a shorter last one. The order depends only on `(seed, epoch)`, so a restarted worker
/// replays the same batches. Panics if `batch_size` is 0.
pub fn epoch_batches(n: usize, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch_size must be positive");
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(epoch_seed(seed, epoch)));
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}

/// Mixes `(seed, epoch)` into one RNG seed.
///
/// Plain `seed + epoch` would make (seed 0, epoch 1) and (seed 1, epoch 0) shuffle identically,
/// and `seed` alone would repeat the dataset split's permutation; a SplitMix64 finaliser over a
/// salted combination avoids both.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    const SALT: u64 = 0x6261_7463_6865_7321; // "batches!"
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch) ^ SALT;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-row activations of one forward pass, kept for the backward pass.
struct Activations {
    /// Post-ReLU hidden layer, `n * HIDDEN` row-major.
    hidden: Vec<f32>,
    /// Output logits (before softmax), `n * CLASSES` row-major.
    logits: Vec<f32>,
}

/// Runs the network on `n` rows of `x` (`n * FEATURES` values).
fn forward(params: &[Vec<f32>], x: &[f32], n: usize) -> Activations {
    let [w1, b1, w2, b2] = unpack(params);
    debug_assert_eq!(x.len(), n * FEATURES);
    let mut hidden = Vec::with_capacity(n * HIDDEN);
    let mut logits = Vec::with_capacity(n * CLASSES);
    for row in x.chunks_exact(FEATURES) {
        let start = hidden.len();
        hidden.extend_from_slice(b1);
        let h = &mut hidden[start..];
        for (i, &xi) in row.iter().enumerate() {
            if xi == 0.0 {
                continue;
            }
            for (acc, &w) in h.iter_mut().zip(&w1[i * HIDDEN..(i + 1) * HIDDEN]) {
                *acc += xi * w;
            }
        }
        for v in h.iter_mut() {
            *v = v.max(0.0);
        }

        let start = logits.len();
        logits.extend_from_slice(b2);
        let z = &mut logits[start..];
        for (k, &hk) in hidden[hidden.len() - HIDDEN..].iter().enumerate() {
            if hk == 0.0 {
                continue;
            }
            for (acc, &w) in z.iter_mut().zip(&w2[k * CLASSES..(k + 1) * CLASSES]) {
                *acc += hk * w;
            }
        }
    }
    Activations { hidden, logits }
}

/// Splits `params` into `[w1, b1, w2, b2]`, panicking with the offending name if a length is
/// wrong: a mismatch means the caller pulled the wrong tensors, and silently reading past a
/// shorter vector's intent would train garbage.
fn unpack(params: &[Vec<f32>]) -> [&[f32]; 4] {
    let specs = parameter_specs();
    assert_eq!(
        params.len(),
        specs.len(),
        "expected {} parameter tensors",
        specs.len()
    );
    for (p, (name, shape)) in params.iter().zip(&specs) {
        let want: usize = shape.iter().product();
        assert_eq!(
            p.len(),
            want,
            "{name} has {} values, expected {want}",
            p.len()
        );
    }
    [&params[0], &params[1], &params[2], &params[3]]
}

/// Index of the largest value (the first one on ties).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Instant;

    fn digits() -> Dataset {
        Dataset::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz")).unwrap()
    }

    #[test]
    fn specs_match_init() {
        let specs = parameter_specs();
        let names: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["mlp/w1", "mlp/b1", "mlp/w2", "mlp/b2"]);
        let params = init_params(7);
        for (p, (name, shape)) in params.iter().zip(&specs) {
            assert_eq!(p.len(), shape.iter().product::<usize>(), "{name}");
        }
        assert_eq!(params, init_params(7));
        assert_ne!(params[0], init_params(8)[0]);
        assert!(params[1].iter().chain(&params[3]).all(|&b| b == 0.0));
        let he = (6.0f32 / 64.0).sqrt();
        assert!(params[0].iter().all(|w| w.abs() <= he));
        // Not degenerate: the weights actually spread over the range.
        assert!(params[0].iter().any(|w| w.abs() > he * 0.9));
    }

    #[test]
    fn epoch_batches_cover_each_index_once() {
        let batches = epoch_batches(100, 32, 5, 0);
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [32, 32, 32, 4]);
        let mut all: Vec<usize> = batches.concat();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(batches, epoch_batches(100, 32, 5, 0));
        assert_ne!(batches, epoch_batches(100, 32, 5, 1));
        assert_ne!(batches, epoch_batches(100, 32, 6, 0));
        assert_ne!(epoch_batches(100, 32, 0, 1), epoch_batches(100, 32, 1, 0));
        assert!(epoch_batches(0, 32, 0, 0).is_empty());
    }

    #[test]
    fn loss_is_stable_for_huge_logits() {
        let mut params = init_params(0);
        // Push one logit far beyond where a naive exp() would overflow f32.
        params[3][3] = 1.0e4;
        let batch = digits().rows(&[0, 1, 2]);
        let (loss, grads) = loss_and_grads(&params, &batch);
        assert!(loss.is_finite() && loss > 1.0e3, "loss {loss}");
        assert!(grads.iter().flatten().all(|g| g.is_finite()));
    }

    #[test]
    fn empty_batch_is_a_no_op() {
        let (loss, grads) = loss_and_grads(&init_params(0), &Dataset::default());
        assert_eq!(loss, 0.0);
        assert!(grads.iter().flatten().all(|&g| g == 0.0));
        assert_eq!(accuracy(&init_params(0), &Dataset::default()), 0.0);
    }

    #[test]
    #[should_panic(expected = "mlp/w2")]
    fn wrong_shape_names_the_parameter() {
        let mut params = init_params(0);
        params[2].pop();
        loss_and_grads(&params, &Dataset::default());
    }

    /// Compares analytic gradients with central differences on random coordinates of each
    /// parameter, at a point with random (non-zero) biases so every term is exercised.
    #[test]
    fn gradients_match_finite_differences() {
        let data = digits();
        let mut rng = StdRng::seed_from_u64(42);
        let mut params = init_params(1);
        for p in [1, 3] {
            for b in params[p].iter_mut() {
                *b = rng.gen_range(-0.2..0.2);
            }
        }
        let idx: Vec<usize> = (0..6).map(|_| rng.gen_range(0..data.len())).collect();
        let batch = data.rows(&idx);
        let (_, grads) = loss_and_grads(&params, &batch);

        // Large enough that f32 rounding in the loss (~1e-7) is negligible next to the
        // difference, small enough that the O(eps^2) truncation error is too.
        let eps = 1e-2f32;
        let pre_relu = |j: usize| -> Vec<f32> {
            // Recover the hidden pre-activations only where needed to spot ReLU kinks.
            (0..batch.len())
                .map(|b| {
                    let x = batch.row(b);
                    params[1][j]
                        + (0..FEATURES)
                            .map(|i| x[i] * params[0][i * HIDDEN + j])
                            .sum::<f32>()
                })
                .collect()
        };
        let mut checked = 0;
        for (p, (name, _)) in parameter_specs().iter().enumerate() {
            let mut nonzero = 0;
            let mut tries = 0;
            while nonzero < 4 {
                tries += 1;
                assert!(
                    tries < 500,
                    "{name}: could not find enough informative coordinates"
                );
                let c = rng.gen_range(0..params[p].len());
                // A perturbation of w1/b1 that moves a hidden unit across 0 makes the finite
                // difference straddle the ReLU kink; such coordinates say nothing about the code.
                if p <= 1 {
                    let j = if p == 0 { c % HIDDEN } else { c };
                    if pre_relu(j).iter().any(|z| z.abs() < 2.0 * eps) {
                        continue;
                    }
                }
                let mut plus = params.clone();
                plus[p][c] += eps;
                let mut minus = params.clone();
                minus[p][c] -= eps;
                let numeric = (f64::from(loss_and_grads(&plus, &batch).0)
                    - f64::from(loss_and_grads(&minus, &batch).0))
                    / (2.0 * f64::from(eps));
                let analytic = f64::from(grads[p][c]);
                let tol = 2e-4 + 1e-2 * numeric.abs().max(analytic.abs());
                assert!(
                    (numeric - analytic).abs() <= tol,
                    "{name}[{c}]: analytic {analytic:e} vs numeric {numeric:e}"
                );
                checked += 1;
                if analytic.abs() > 1e-3 {
                    nonzero += 1;
                }
            }
        }
        assert!(checked >= 16);
    }

    /// Single-process SGD on the 80/20 split must learn the task; this is the baseline the
    /// distributed demo is compared against.
    #[test]
    fn sgd_reaches_95_percent() {
        let (train, test) = digits().split(0.2, 0);
        let mut params = init_params(0);
        let lr = 0.1f32;
        let start = Instant::now();
        let mut loss = f32::NAN;
        for epoch in 0..30 {
            let mut total = 0f32;
            let batches = epoch_batches(train.len(), 32, 0, epoch);
            for idx in &batches {
                let (l, grads) = loss_and_grads(&params, &train.rows(idx));
                total += l;
                for (p, g) in params.iter_mut().zip(&grads) {
                    for (w, d) in p.iter_mut().zip(g) {
                        *w -= lr * d;
                    }
                }
            }
            loss = total / batches.len() as f32;
        }
        let acc = accuracy(&params, &test);
        eprintln!(
            "sgd: train loss {loss:.4}, test accuracy {acc:.4}, {:.2?}",
            start.elapsed()
        );
        assert!(acc >= 0.95, "held-out accuracy {acc}");
    }
}
