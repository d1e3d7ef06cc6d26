//! Server-side optimizers, applied to one variable at a time.
//!
//! A variable's [`OptimizerState`] owns its hyper-parameters, its current learning rate, its
//! update count and the `f32` slot vectors its method needs (momentum buffer, squared-gradient
//! accumulator, Adam moments). Slots stay `f32` even when the variable is stored as bf16:
//! bf16 has 8 significant bits, so moments kept in it would swallow small contributions.
//!
//! The math follows PyTorch's `torch.optim` (SGD, Adagrad, Adam / AdamW), per element in `f32`.
//! Variables can be as large as 1 GiB, so an update matches on the optimizer kind and the
//! storage type once and then runs a loop monomorphised for that pair: the per-element loop
//! never allocates and never branches on the method.

use std::sync::Arc;

use parasync_tensor::bf16;

/// Hyper-parameters of one variable's optimizer.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerSpec {
    /// Stochastic gradient descent, optionally with (Nesterov) momentum.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor in `[0, 1)`; 0 keeps no momentum buffer.
        momentum: f32,
        /// Step along the look-ahead `g + momentum * buf` instead of `buf`; requires momentum > 0.
        nesterov: bool,
    },
    /// Adagrad: per-element learning rates shrinking with the accumulated squared gradients.
    Adagrad {
        /// Learning rate.
        lr: f32,
        /// Starting value of the squared-gradient accumulator.
        initial_accumulator: f32,
        /// Added to the accumulator's square root to keep the division finite.
        epsilon: f32,
    },
    /// Adam; with `decoupled` it is AdamW (weight decay applied to the parameters, not the
    /// gradient); without it a non-zero weight_decay is classic L2 (added to the gradient).
    Adam {
        /// Learning rate.
        lr: f32,
        /// Decay rate of the first-moment (mean) estimate, in `[0, 1)`.
        beta1: f32,
        /// Decay rate of the second-moment (uncentred variance) estimate, in `[0, 1)`.
        beta2: f32,
        /// Added to the second moment's square root to keep the division finite; > 0.
        epsilon: f32,
        /// Weight-decay factor; 0 disables it.
        weight_decay: f32,
        /// Decay the parameters directly (AdamW) instead of adding `weight_decay * p` to the
        /// gradient.
        decoupled: bool,
    },
}

impl OptimizerSpec {
    /// Checks every hyper-parameter; the error names the optimizer, the bad hyper-parameter,
    /// the constraint it breaks and its value, so it can be shown to the user as is.
    ///
    /// Specs that fail validation must not be given to [`OptimizerState::new`]: they do not
    /// panic there, but the numbers they produce are meaningless.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|e| format!("{}: {e}", self.name()))
    }

    fn check(&self) -> Result<(), String> {
        match *self {
            OptimizerSpec::Sgd {
                lr,
                momentum,
                nesterov,
            } => {
                non_negative("lr", lr)?;
                unit_interval("momentum", momentum)?;
                if nesterov && momentum <= 0.0 {
                    return Err(format!(
                        "nesterov requires momentum > 0 (it steps along the momentum buffer), \
                         got momentum {momentum}"
                    ));
                }
            }
            OptimizerSpec::Adagrad {
                lr,
                initial_accumulator,
                epsilon,
            } => {
                non_negative("lr", lr)?;
                non_negative("initial_accumulator", initial_accumulator)?;
                non_negative("epsilon", epsilon)?;
                if initial_accumulator == 0.0 && epsilon == 0.0 {
                    return Err("initial_accumulator and epsilon are both 0, so an element \
                                whose gradients are all 0 would compute 0 / 0 = NaN; \
                                make one of them positive"
                        .to_string());
                }
            }
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                epsilon,
                weight_decay,
                ..
            } => {
                non_negative("lr", lr)?;
                unit_interval("beta1", beta1)?;
                unit_interval("beta2", beta2)?;
                if !(epsilon.is_finite() && epsilon > 0.0) {
                    return Err(format!(
                        "epsilon must be finite and > 0 (it keeps the division by sqrt(v) finite), \
                         got {epsilon}"
                    ));
                }
                non_negative("weight_decay", weight_decay)?;
            }
        }
        Ok(())
    }

    /// The configured learning rate.
    pub fn learning_rate(&self) -> f32 {
        match *self {
            OptimizerSpec::Sgd { lr, .. }
            | OptimizerSpec::Adagrad { lr, .. }
            | OptimizerSpec::Adam { lr, .. } => lr,
        }
    }

    /// Lower-case method name, as used in flags and messages: `sgd`, `adagrad`, `adam` or
    /// `adamw` (Adam with decoupled weight decay).
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerSpec::Sgd { .. } => "sgd",
            OptimizerSpec::Adagrad { .. } => "adagrad",
            OptimizerSpec::Adam {
                decoupled: false, ..
            } => "adam",
            OptimizerSpec::Adam {
                decoupled: true, ..
            } => "adamw",
        }
    }

    /// Number of `f32` slot vectors (each as long as the variable) the method keeps: SGD 1
    /// with momentum and 0 without, Adagrad 1, Adam 2. Lets callers budget memory.
    /// Names of the slots, in the order the state keeps them (PyTorch's names where it has
    /// the same slot): what a checkpoint calls them.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match *self {
            OptimizerSpec::Sgd { momentum, .. } if momentum > 0.0 => &["momentum_buffer"],
            OptimizerSpec::Sgd { .. } => &[],
            OptimizerSpec::Adagrad { .. } => &["sum"],
            OptimizerSpec::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    pub fn num_slots(&self) -> usize {
        match *self {
            OptimizerSpec::Sgd { momentum, .. } => usize::from(momentum > 0.0),
            OptimizerSpec::Adagrad { .. } => 1,
            OptimizerSpec::Adam { .. } => 2,
        }
    }
}

fn non_negative(what: &str, value: f32) -> Result<(), String> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(format!("{what} must be finite and >= 0, got {value}"))
    }
}

fn unit_interval(what: &str, value: f32) -> Result<(), String> {
    // `contains` is false for NaN, so NaN is rejected too.
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{what} must be in [0, 1) (1 or more never forgets old gradients), got {value}"
        ))
    }
}

/// How bf16 storage rounds the f32 result of an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Round to the nearest bf16, ties to even: deterministic, but an update smaller than
    /// half a bf16 step is lost every time.
    NearestEven,
    /// Round up or down at random with probability proportional to closeness, so the
    /// expected stored value equals the f32 result and small updates survive on average.
    Stochastic,
}

/// Optimizer state of one variable: hyper-parameters, current learning rate, update count and
/// f32 slots.
pub struct OptimizerState {
    /// Hyper-parameters as configured; its `lr` stays the initial learning rate.
    spec: OptimizerSpec,
    /// Learning rate used by the next update; starts at the spec's, changed by schedules.
    lr: f32,
    /// Completed `apply_*` calls: Adam's step `t` and part of the stochastic-rounding seed.
    updates: u64,
    /// Number of elements of the variable; every slot has this length.
    len: usize,
    /// `spec.num_slots()` vectors of `len` elements: SGD `[buf]`, Adagrad `[acc]`, Adam `[m, v]`.
    /// Shared with a checkpoint being written, and copied by an update only while one is.
    slots: Vec<Arc<Vec<f32>>>,
}

/// The optimizer state of one variable as of one update, for a checkpoint: the slots are
/// shared with the live state until its next update (which copies them first).
#[derive(Clone, Debug)]
pub struct OptimizerSnapshot {
    /// The learning rate the next update would use.
    pub lr: f32,
    /// Updates applied so far (Adam's `t`).
    pub updates: u64,
    /// The slots, named by [`OptimizerSpec::slot_names`].
    pub slots: Vec<Arc<Vec<f32>>>,
}

impl OptimizerState {
    /// Creates the state for a variable of `len` elements. Slots are allocated now, zeroed
    /// except the Adagrad accumulator, which starts at `initial_accumulator`. (Zeroed vectors
    /// come from `calloc`, so an untouched slot costs no physical memory until the first update.)
    pub fn new(spec: OptimizerSpec, len: usize) -> Self {
        let fill = match spec {
            OptimizerSpec::Adagrad {
                initial_accumulator,
                ..
            } => initial_accumulator,
            _ => 0.0,
        };
        let slots = (0..spec.num_slots()).map(|_| Arc::new(vec![fill; len])).collect();
        OptimizerState {
            lr: spec.learning_rate(),
            spec,
            updates: 0,
            len,
            slots,
        }
    }

    /// The state restored from a checkpoint: `slots` in [`OptimizerSpec::slot_names`] order,
    /// each of `len` elements.
    pub fn restored(spec: OptimizerSpec, len: usize, snapshot: OptimizerSnapshot) -> Result<Self, String> {
        let names = spec.slot_names();
        if snapshot.slots.len() != names.len() {
            return Err(format!("{} keeps {} slot(s) ({}), the checkpoint has {}", spec.name(), names.len(), names.join(", "), snapshot.slots.len()));
        }
        if let Some((i, s)) = snapshot.slots.iter().enumerate().find(|(_, s)| s.len() != len) {
            return Err(format!("slot {} has {} elements, the variable {len}", names[i], s.len()));
        }
        if !snapshot.lr.is_finite() || snapshot.lr < 0.0 {
            return Err(format!("learning rate {} is not finite and >= 0", snapshot.lr));
        }
        Ok(OptimizerState { spec, lr: snapshot.lr, updates: snapshot.updates, len, slots: snapshot.slots })
    }

    /// The learning rate, update count and slots as they are now (no copy: the slots are
    /// shared until the next update).
    pub fn snapshot(&self) -> OptimizerSnapshot {
        OptimizerSnapshot { lr: self.lr, updates: self.updates, slots: self.slots.clone() }
    }

    /// The hyper-parameters as configured (the learning rate in it is the initial one; see
    /// [`learning_rate`](Self::learning_rate) for the current one).
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// The learning rate the next update uses (before `lr_scale`).
    pub fn learning_rate(&self) -> f32 {
        self.lr
    }

    /// Sets the learning rate for later updates (e.g. from a schedule). The caller checks it
    /// the way [`OptimizerSpec::validate`] checks `lr` (finite, >= 0).
    pub fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }

    /// Number of `apply_*` calls so far (Adam's `t`).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// One update of f32 parameters with `grad` (same length, caller guarantees). The effective
    /// learning rate is learning_rate() * lr_scale (lr_scale lets async mode divide lr by
    /// staleness).
    ///
    /// # Panics
    /// If `params` or `grad` is not as long as the variable this state was created for: a
    /// silent partial update would be worse.
    pub fn apply_f32(&mut self, params: &mut [f32], grad: &[f32], lr_scale: f32) {
        self.apply(F32Words, params, grad, lr_scale);
    }

    /// [`apply_f32`](Self::apply_f32) with a gradient that may be held as bf16 words, widened
    /// element by element inside the update loop (no f32 copy of the gradient is made).
    pub fn apply_f32_grad(&mut self, params: &mut [f32], grad: Grad<'_>, lr_scale: f32) {
        match grad {
            Grad::F32(g) => self.apply(F32Words, params, g, lr_scale),
            Grad::Bf16(g) => self.apply(F32Words, params, Bf16Grad(g), lr_scale),
        }
    }

    /// [`apply_bf16`](Self::apply_bf16) with a gradient that may be held as bf16 words.
    pub fn apply_bf16_grad(&mut self, params: &mut [u16], grad: Grad<'_>, lr_scale: f32, rounding: Rounding, seed: u64) {
        match grad {
            Grad::F32(g) => self.apply_rounded(params, g, lr_scale, rounding, seed),
            Grad::Bf16(g) => self.apply_rounded(params, Bf16Grad(g), lr_scale, rounding, seed),
        }
    }

    /// The same for bf16 storage (u16 words as in [`parasync_tensor::bf16`]): each parameter is
    /// widened to f32, updated in f32, and rounded back with `rounding` (Stochastic uses a fast
    /// PRNG seeded from `seed` and the element index / update count, so it is reproducible for a
    /// given seed).
    ///
    /// The random bits of element `i` in update `n` are a hash of `(seed, n, i)`: the result
    /// depends on neither the order the elements are visited in nor how the variable might
    /// be split into chunks. Slots stay `f32` and see the unrounded values.
    ///
    /// # Panics
    /// As [`apply_f32`](Self::apply_f32).
    pub fn apply_bf16(
        &mut self,
        params: &mut [u16],
        grad: &[f32],
        lr_scale: f32,
        rounding: Rounding,
        seed: u64,
    ) {
        self.apply_rounded(params, grad, lr_scale, rounding, seed)
    }

    /// An update of bf16 storage with either gradient type, rounded as `rounding` says.
    fn apply_rounded<G: GradValues>(&mut self, params: &mut [u16], grad: G, lr_scale: f32, rounding: Rounding, seed: u64) {
        match rounding {
            Rounding::NearestEven => self.apply(Bf16Nearest, params, grad, lr_scale),
            Rounding::Stochastic => {
                let key = self.stochastic_key(seed);
                self.apply(Bf16Stochastic { key }, params, grad, lr_scale)
            }
        }
    }

    /// Key of stochastic rounding for the next update: keyed by the number this update will
    /// have, so successive updates draw fresh bits.
    fn stochastic_key(&self, seed: u64) -> u64 {
        mix64(seed ^ mix64(self.updates.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
    }

    fn apply<S: Storage, G: GradValues>(
        &mut self,
        storage: S,
        params: &mut [S::Word],
        grad: G,
        lr_scale: f32,
    ) {
        self.apply_with(storage, params, grad, lr_scale, true)
    }

    /// [`apply`](Self::apply), with the AVX2 build of the kernels when `simd` is set and the
    /// CPU has it (tests compare both builds bit for bit).
    fn apply_with<S: Storage, G: GradValues>(
        &mut self,
        storage: S,
        params: &mut [S::Word],
        grad: G,
        lr_scale: f32,
        simd: bool,
    ) {
        assert_eq!(
            params.len(),
            self.len,
            "parameter length differs from the variable's"
        );
        assert_eq!(
            grad.len(),
            self.len,
            "gradient length differs from the variable's"
        );
        self.updates += 1;
        let lr = self.lr * lr_scale;
        #[cfg(target_arch = "x86_64")]
        if simd && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.kernels_avx2(storage, params, grad, lr) };
        }
        let _ = simd;
        self.kernels(storage, params, grad, lr)
    }

    /// [`kernels`](Self::kernels) compiled with AVX2: eight lanes per instruction, which
    /// halves Adam's time here. The element math is the same IEEE operations in the same
    /// order (no fused multiply-add), so results are bitwise identical to the baseline build
    /// for finite values. (With NaN inputs, which only `--allow-non-finite` lets in, the
    /// parameters still agree, but a slot may keep the other operand's NaN payload or sign:
    /// the compiler may order the operands of a commutative `+` or `*` differently.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn kernels_avx2<S: Storage, G: GradValues>(&mut self, storage: S, params: &mut [S::Word], grad: G, lr: f32) {
        self.kernels(storage, params, grad, lr)
    }

    /// One update of every element with learning rate `lr` (the update count already advanced).
    #[inline(always)]
    fn kernels<S: Storage, G: GradValues>(&mut self, storage: S, params: &mut [S::Word], grad: G, lr: f32) {
        // A checkpoint still writing the slots keeps its copy; this update works on another.
        let mut slots: Vec<&mut [f32]> = self.slots.iter_mut().map(|s| Arc::make_mut(s).as_mut_slice()).collect();
        match (&self.spec, slots.as_mut_slice()) {
            (OptimizerSpec::Sgd { .. }, []) => sgd(storage, params, grad, lr),
            (
                &OptimizerSpec::Sgd {
                    momentum,
                    nesterov: false,
                    ..
                },
                [buf],
            ) => sgd_momentum::<S, G, false>(storage, params, grad, buf, lr, momentum),
            (
                &OptimizerSpec::Sgd {
                    momentum,
                    nesterov: true,
                    ..
                },
                [buf],
            ) => sgd_momentum::<S, G, true>(storage, params, grad, buf, lr, momentum),
            (&OptimizerSpec::Adagrad { epsilon, .. }, [acc]) => {
                adagrad(storage, params, grad, acc, lr, epsilon)
            }
            (
                &OptimizerSpec::Adam {
                    beta1,
                    beta2,
                    epsilon,
                    weight_decay,
                    decoupled,
                    ..
                },
                [m, v],
            ) => {
                // Scalars in f64 as PyTorch does (Python floats); only the element math is f32.
                let t = self.updates as f64;
                let bias1 = 1.0 - f64::from(beta1).powf(t);
                let bias2 = 1.0 - f64::from(beta2).powf(t);
                let step = AdamStep {
                    beta1,
                    beta2,
                    one_minus_beta1: 1.0 - beta1,
                    one_minus_beta2: 1.0 - beta2,
                    step_size: (f64::from(lr) / bias1) as f32,
                    inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
                    epsilon,
                    l2: weight_decay,
                    // Multiplying by exactly 1.0 leaves every value, NaN and Inf included, as is.
                    decay: if decoupled {
                        1.0 - lr * weight_decay
                    } else {
                        1.0
                    },
                };
                if !decoupled && weight_decay > 0.0 {
                    adam::<S, G, true>(storage, params, grad, m, v, &step)
                } else {
                    // Not `g + 0 * p`: that would turn an infinite parameter's gradient into NaN.
                    adam::<S, G, false>(storage, params, grad, m, v, &step)
                }
            }
            _ => {
                unreachable!("new() allocates spec.num_slots() slots, matching the patterns above")
            }
        }
    }
}

/// A gradient as the server holds it: `f32` values, or the bf16 words it arrived as.
#[derive(Clone, Copy, Debug)]
pub enum Grad<'a> {
    /// One `f32` per element.
    F32(&'a [f32]),
    /// One bf16 word per element (widening to `f32` is exact).
    Bf16(&'a [u16]),
}

/// How a kernel reads gradient values: generic, so each (gradient, storage, method) triple
/// compiles to its own tight loop.
trait GradValues: Copy {
    type Iter: Iterator<Item = f32>;
    fn values(self) -> Self::Iter;
    fn len(self) -> usize;
}

impl<'a> GradValues for &'a [f32] {
    type Iter = std::iter::Copied<std::slice::Iter<'a, f32>>;
    #[inline(always)]
    fn values(self) -> Self::Iter {
        self.iter().copied()
    }
    fn len(self) -> usize {
        <[f32]>::len(self)
    }
}

/// bf16 gradient words, widened as the kernel reads them.
#[derive(Clone, Copy)]
struct Bf16Grad<'a>(&'a [u16]);

impl<'a> GradValues for Bf16Grad<'a> {
    type Iter = std::iter::Map<std::slice::Iter<'a, u16>, fn(&u16) -> f32>;
    #[inline(always)]
    fn values(self) -> Self::Iter {
        self.0.iter().map(widen)
    }
    fn len(self) -> usize {
        self.0.len()
    }
}

#[inline(always)]
fn widen(w: &u16) -> f32 {
    bf16::to_f32(*w)
}

/// How a kernel widens a stored parameter to `f32` and narrows the updated value back.
/// Kernels are generic over it so each (method, storage) pair compiles to its own tight loop.
trait Storage: Copy {
    /// One stored element.
    type Word: Copy;
    /// The exact `f32` value of a stored element.
    fn load(word: Self::Word) -> f32;
    /// The stored form of `value`, the new value of element `index`.
    fn store(self, index: usize, value: f32) -> Self::Word;
}

#[derive(Clone, Copy)]
struct F32Words;

impl Storage for F32Words {
    type Word = f32;
    #[inline(always)]
    fn load(word: f32) -> f32 {
        word
    }
    #[inline(always)]
    fn store(self, _index: usize, value: f32) -> f32 {
        value
    }
}

#[derive(Clone, Copy)]
struct Bf16Nearest;

impl Storage for Bf16Nearest {
    type Word = u16;
    #[inline(always)]
    fn load(word: u16) -> f32 {
        bf16::to_f32(word)
    }
    #[inline(always)]
    fn store(self, _index: usize, value: f32) -> u16 {
        bf16::from_f32_rne(value)
    }
}

#[derive(Clone, Copy)]
struct Bf16Stochastic {
    /// Mix of the seed and the update number; element `i` hashes `key + i * GOLDEN_GAMMA`.
    key: u64,
}

impl Storage for Bf16Stochastic {
    type Word = u16;
    #[inline(always)]
    fn load(word: u16) -> f32 {
        bf16::to_f32(word)
    }
    #[inline(always)]
    fn store(self, index: usize, value: f32) -> u16 {
        // A counter-based generator (SplitMix64 evaluated at the element's index) rather than
        // a sequential one: no state carried between elements, and any element's bits can
        // be recomputed on their own.
        let bits = mix64(
            self.key
                .wrapping_add((index as u64).wrapping_mul(GOLDEN_GAMMA)),
        );
        bf16::from_f32_stochastic(value, (bits >> 48) as u16)
    }
}

/// SplitMix64's increment (2^64 / golden ratio): consecutive multiples are spread evenly.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijection whose outputs for nearby inputs look independent.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// The kernels below follow torch.optim's formulas. They avoid `mul_add`: on targets without
// FMA it is a slow library call, and plain operations keep results identical everywhere.

#[inline(always)]
fn sgd<S: Storage, G: GradValues>(s: S, params: &mut [S::Word], grad: G, lr: f32) {
    for (i, (w, g)) in params.iter_mut().zip(grad.values()).enumerate() {
        *w = s.store(i, S::load(*w) - lr * g);
    }
}

#[inline(always)]
fn sgd_momentum<S: Storage, G: GradValues, const NESTEROV: bool>(
    s: S,
    params: &mut [S::Word],
    grad: G,
    buf: &mut [f32],
    lr: f32,
    momentum: f32,
) {
    for (i, ((w, g), b)) in params.iter_mut().zip(grad.values()).zip(buf.iter_mut()).enumerate() {
        // The buffer starts at 0, so the first update sets it to g as PyTorch's clone does.
        let nb = momentum * *b + g;
        *b = nb;
        let d = if NESTEROV { g + momentum * nb } else { nb };
        *w = s.store(i, S::load(*w) - lr * d);
    }
}

#[inline(always)]
fn adagrad<S: Storage, G: GradValues>(
    s: S,
    params: &mut [S::Word],
    grad: G,
    acc: &mut [f32],
    lr: f32,
    epsilon: f32,
) {
    for (i, ((w, g), a)) in params.iter_mut().zip(grad.values()).zip(acc.iter_mut()).enumerate() {
        let na = *a + g * g;
        *a = na;
        *w = s.store(i, S::load(*w) - lr * g / (na.sqrt() + epsilon));
    }
}

/// Per-update constants of Adam, hoisted out of the element loop.
struct AdamStep {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    /// `lr / (1 - beta1^t)`: folds the first-moment bias correction into the step.
    step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`: the second-moment bias correction, applied to `sqrt(v)`.
    inv_sqrt_bias2: f32,
    epsilon: f32,
    /// L2 factor added to the gradient (used only by the `L2 = true` kernel).
    l2: f32,
    /// Decoupled decay `1 - lr * weight_decay` for AdamW, exactly 1 otherwise.
    decay: f32,
}

#[inline(always)]
fn adam<S: Storage, G: GradValues, const L2: bool>(
    s: S,
    params: &mut [S::Word],
    grad: G,
    m: &mut [f32],
    v: &mut [f32],
    k: &AdamStep,
) {
    let iter = params
        .iter_mut()
        .zip(grad.values())
        .zip(m.iter_mut())
        .zip(v.iter_mut())
        .enumerate();
    for (i, (((w, g), m), v)) in iter {
        let p = S::load(*w);
        let g = if L2 { g + k.l2 * p } else { g };
        let p = p * k.decay;
        let nm = k.beta1 * *m + k.one_minus_beta1 * g;
        let nv = k.beta2 * *v + k.one_minus_beta2 * g * g;
        *m = nm;
        *v = nv;
        // lr * mhat / (sqrt(vhat) + eps), with the bias corrections folded into the constants.
        *w = s.store(
            i,
            p - k.step_size * nm / (nv.sqrt() * k.inv_sqrt_bias2 + k.epsilon),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sgd_spec(lr: f32, momentum: f32, nesterov: bool) -> OptimizerSpec {
        OptimizerSpec::Sgd {
            lr,
            momentum,
            nesterov,
        }
    }

    fn adam_spec(lr: f32, weight_decay: f32, decoupled: bool) -> OptimizerSpec {
        OptimizerSpec::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay,
            decoupled,
        }
    }

    fn adagrad_spec(lr: f32) -> OptimizerSpec {
        OptimizerSpec::Adagrad {
            lr,
            initial_accumulator: 0.1,
            epsilon: 1e-10,
        }
    }

    /// One spec of every kind the kernels distinguish.
    fn all_specs() -> Vec<OptimizerSpec> {
        vec![
            sgd_spec(0.125, 0.0, false),
            sgd_spec(0.125, 0.9, false),
            sgd_spec(0.125, 0.9, true),
            adagrad_spec(0.125),
            adam_spec(0.0625, 0.0, false),
            adam_spec(0.0625, 0.5, true),
            adam_spec(0.0625, 0.5, false),
        ]
    }

    const P0: [f32; 3] = [1.0, -2.0, 0.5];
    const GRADS: [[f32; 3]; 3] = [[0.5, -1.0, 2.0], [0.25, 0.5, -1.5], [-0.5, 1.0, 0.75]];

    /// Rounding error scales with the magnitudes that went into a value (about 1 here), not
    /// with the result, so the tolerance is relative above 1 and absolute below.
    fn assert_close(got: f32, want: f64, what: &str) {
        let tol = 1e-6 * want.abs().max(1.0);
        assert!(
            (f64::from(got) - want).abs() <= tol,
            "{what}: got {got}, want {want}"
        );
    }

    #[test]
    fn updates_match_hand_computed_values() {
        // Parameters start at P0 and take GRADS[0], GRADS[1], GRADS[2]; `want[k]` holds the
        // parameters after step k + 1, computed in f64 with the formulas of the module docs.
        let cases: Vec<(&str, OptimizerSpec, [[f64; 3]; 3])> = vec![
            // p -= 0.1 g: [1 - 0.05, -2 + 0.1, 0.5 - 0.2] = [0.95, -1.9, 0.3],
            // then [0.95 - 0.025, -1.9 - 0.05, 0.3 + 0.15],
            // then [0.925 + 0.05, -1.95 - 0.1, 0.45 - 0.075].
            (
                "sgd",
                sgd_spec(0.1, 0.0, false),
                [
                    [0.95, -1.9, 0.3],
                    [0.925, -1.95, 0.45],
                    [0.975, -2.05, 0.375],
                ],
            ),
            // buf1 = g1 = [0.5, -1, 2] (so step 1 equals plain SGD);
            // buf2 = 0.9 buf1 + g2 = [0.7, -0.4, 0.3] -> p2 = p1 - 0.1 buf2 = [0.88, -1.86, 0.27];
            // buf3 = 0.9 buf2 + g3 = [0.13, 0.64, 1.02] -> p3 = [0.867, -1.924, 0.168].
            (
                "sgd momentum",
                sgd_spec(0.1, 0.9, false),
                [
                    [0.95, -1.9, 0.3],
                    [0.88, -1.86, 0.27],
                    [0.867, -1.924, 0.168],
                ],
            ),
            // Same buffers; d = g + 0.9 buf:
            // d1 = 1.9 g1 = [0.95, -1.9, 3.8] -> p1 = [0.905, -1.81, 0.12];
            // d2 = g2 + 0.9 buf2 = [0.88, 0.14, -1.23] -> p2 = [0.817, -1.824, 0.243];
            // d3 = g3 + 0.9 buf3 = [-0.383, 1.576, 1.668] -> p3 = [0.8553, -1.9816, 0.0762].
            (
                "sgd nesterov",
                sgd_spec(0.1, 0.9, true),
                [
                    [0.905, -1.81, 0.12],
                    [0.817, -1.824, 0.243],
                    [0.8553, -1.9816, 0.0762],
                ],
            ),
            // acc starts at 0.1: acc1 = [0.35, 1.1, 4.1];
            // p1 = p0 - 0.1 g1 / sqrt(acc1)
            //    = [1 - 0.05 / 0.591608, -2 + 0.1 / 1.048809, 0.5 - 0.2 / 2.024846];
            // acc2 = [0.4125, 1.35, 6.35]; acc3 = [0.6625, 2.35, 6.9125].
            (
                "adagrad",
                adagrad_spec(0.1),
                [
                    [0.9154845745414341, -1.9046537410845317, 0.40122704033991907],
                    [0.8765596273394185, -1.9476868893720214, 0.4607527245974978],
                    [0.9379891390152665, -2.0129196966731104, 0.4322265398062466],
                ],
            ),
            // Step 1: mhat = g, vhat = g^2, so p1 = p0 - 0.01 g / (|g| + 1e-8) ~ p0 - 0.01 sign(g);
            // step 2: m2 = 0.09 g1 + 0.1 g2, v2 = 0.000999 g1^2 + 0.001 g2^2, mhat = m2 / 0.19,
            // vhat = v2 / 0.001999, and so on for step 3 (bias 0.271 and 0.002997001).
            (
                "adam",
                adam_spec(0.01, 0.0, false),
                [
                    [0.9900000002, -1.9900000001, 0.49000000005],
                    [0.9806782040477462, -1.9873366297370902, 0.48910674998100023],
                    [0.9795703733601093, -1.9900635976150691, 0.4866084309307172],
                ],
            ),
            // As Adam, but each step first scales p by 1 - 0.01 * 0.1 = 0.999:
            // p1 = 0.999 p0 - 0.01 sign(g) = [0.989, -1.988, 0.4895] (to 1e-9).
            (
                "adamw",
                adam_spec(0.01, 0.1, true),
                [
                    [0.9890000002, -1.9880000001, 0.48950000005],
                    [0.9786892040475462, -1.9833486297369902, 0.48811724998095024],
                    [0.9766026841558618, -1.9840922489852322, 0.4851308136806863],
                ],
            ),
            // As Adam with g replaced by g + 0.1 p: g1' = [0.6, -1.2, 2.05]; step 1 still moves
            // each p by about 0.01 sign(g'); later steps differ from plain Adam.
            (
                "adam l2",
                adam_spec(0.01, 0.1, false),
                [
                    [0.9900000001666667, -1.9900000000833333, 0.49000000004878047],
                    [0.980465827519045, -1.985312258721214, 0.48883224622257],
                    [0.9772928152861048, -1.9857475144524848, 0.48603427575776],
                ],
            ),
        ];
        for (name, spec, want) in cases {
            spec.validate().unwrap();
            let mut state = OptimizerState::new(spec, P0.len());
            let mut p = P0;
            for (step, (g, want)) in GRADS.iter().zip(want).enumerate() {
                state.apply_f32(&mut p, g, 1.0);
                assert_eq!(state.updates(), step as u64 + 1, "{name}");
                for (i, (&got, want)) in p.iter().zip(want).enumerate() {
                    assert_close(got, want, &format!("{name} step {} element {i}", step + 1));
                }
            }
        }
    }

    #[test]
    fn plain_sgd_with_unit_lr_is_exact_on_integers() {
        let mut state = OptimizerState::new(sgd_spec(1.0, 0.0, false), 5);
        let mut p = [0.0f32, 7.0, -3.0, 1_000_000.0, 16_777_000.0];
        let g = [5.0f32, -2.0, -4.0, 123_456.0, -216.0];
        let want: Vec<f32> = p.iter().zip(&g).map(|(p, g)| p - g).collect();
        state.apply_f32(&mut p, &g, 1.0);
        assert_eq!(p.to_vec(), want);
        assert_eq!(p, [-5.0, 9.0, 1.0, 876_544.0, 16_777_216.0]);
    }

    #[test]
    fn validate_accepts_good_specs_and_names_the_bad_hyper_parameter() {
        let adam = |beta1, beta2, epsilon, weight_decay| OptimizerSpec::Adam {
            lr: 0.001,
            beta1,
            beta2,
            epsilon,
            weight_decay,
            decoupled: true,
        };
        let adagrad = |lr, initial_accumulator, epsilon| OptimizerSpec::Adagrad {
            lr,
            initial_accumulator,
            epsilon,
        };
        // (spec, None if valid, else a fragment the error must contain)
        let cases: Vec<(OptimizerSpec, Option<&str>)> = vec![
            (sgd_spec(0.1, 0.0, false), None),
            (sgd_spec(0.0, 0.0, false), None),
            (sgd_spec(0.1, 0.9, true), None),
            (
                sgd_spec(-0.1, 0.0, false),
                Some("sgd: lr must be finite and >= 0, got -0.1"),
            ),
            (
                sgd_spec(f32::NAN, 0.0, false),
                Some("sgd: lr must be finite and >= 0, got NaN"),
            ),
            (
                sgd_spec(f32::INFINITY, 0.0, false),
                Some("sgd: lr must be finite"),
            ),
            (
                sgd_spec(0.1, 1.0, false),
                Some("sgd: momentum must be in [0, 1)"),
            ),
            (
                sgd_spec(0.1, -0.5, false),
                Some("sgd: momentum must be in [0, 1)"),
            ),
            (
                sgd_spec(0.1, f32::NAN, false),
                Some("momentum must be in [0, 1)"),
            ),
            (
                sgd_spec(0.1, 0.0, true),
                Some("sgd: nesterov requires momentum > 0"),
            ),
            (adagrad(0.1, 0.1, 1e-10), None),
            (adagrad(0.1, 0.0, 1e-10), None),
            (adagrad(0.1, 0.1, 0.0), None),
            (adagrad(-1.0, 0.1, 1e-10), Some("adagrad: lr must be")),
            (
                adagrad(0.1, -0.1, 1e-10),
                Some("adagrad: initial_accumulator must be finite and >= 0"),
            ),
            (
                adagrad(0.1, 0.1, -1e-10),
                Some("adagrad: epsilon must be finite and >= 0"),
            ),
            (
                adagrad(0.1, 0.0, 0.0),
                Some("adagrad: initial_accumulator and epsilon are both 0"),
            ),
            (adam(0.9, 0.999, 1e-8, 0.0), None),
            (adam(0.0, 0.0, 1e-8, 0.01), None),
            (
                adam(1.0, 0.999, 1e-8, 0.0),
                Some("adamw: beta1 must be in [0, 1)"),
            ),
            (
                adam(0.9, 1.0, 1e-8, 0.0),
                Some("adamw: beta2 must be in [0, 1)"),
            ),
            (adam(0.9, -0.1, 1e-8, 0.0), Some("beta2 must be in [0, 1)")),
            (
                adam(0.9, 0.999, 0.0, 0.0),
                Some("adamw: epsilon must be finite and > 0"),
            ),
            (
                adam(0.9, 0.999, f32::INFINITY, 0.0),
                Some("epsilon must be finite and > 0"),
            ),
            (
                adam(0.9, 0.999, 1e-8, -0.01),
                Some("adamw: weight_decay must be finite and >= 0"),
            ),
            (
                adam(0.9, 0.999, 1e-8, f32::NAN),
                Some("weight_decay must be finite and >= 0, got NaN"),
            ),
            (
                adam_spec(-0.001, 0.0, false),
                Some("adam: lr must be finite and >= 0"),
            ),
        ];
        for (spec, want) in cases {
            match (spec.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(fragment)) => {
                    assert!(e.contains(fragment), "{spec:?}: {e:?} lacks {fragment:?}")
                }
                (got, want) => panic!("{spec:?}: got {got:?}, want error {want:?}"),
            }
        }
    }

    #[test]
    fn spec_accessors() {
        // (spec, name, learning rate, slots)
        let cases = [
            (sgd_spec(0.5, 0.0, false), "sgd", 0.5, 0),
            (sgd_spec(0.5, 0.9, false), "sgd", 0.5, 1),
            (sgd_spec(0.5, 0.9, true), "sgd", 0.5, 1),
            (adagrad_spec(0.25), "adagrad", 0.25, 1),
            (adam_spec(0.125, 0.0, false), "adam", 0.125, 2),
            (adam_spec(0.125, 0.1, false), "adam", 0.125, 2),
            (adam_spec(0.125, 0.1, true), "adamw", 0.125, 2),
        ];
        for (spec, name, lr, slots) in cases {
            assert_eq!(spec.name(), name, "{spec:?}");
            assert_eq!(spec.learning_rate(), lr, "{spec:?}");
            assert_eq!(spec.num_slots(), slots, "{spec:?}");
            let state = OptimizerState::new(spec.clone(), 4);
            assert_eq!(state.spec(), &spec);
            assert_eq!(state.learning_rate(), lr);
            assert_eq!(state.updates(), 0);
            assert_eq!(state.slots.len(), slots);
        }
    }

    #[test]
    fn adagrad_accumulator_starts_at_initial_value() {
        let spec = OptimizerSpec::Adagrad {
            lr: 1.0,
            initial_accumulator: 3.0,
            epsilon: 0.0,
        };
        let mut state = OptimizerState::new(spec, 1);
        let mut p = [10.0f32];
        // acc = 3 + 1^2 = 4, so p = 10 - 1 / 2.
        state.apply_f32(&mut p, &[1.0], 1.0);
        assert_eq!(p, [9.5]);
    }

    #[test]
    fn set_learning_rate_applies_to_later_updates() {
        let mut state = OptimizerState::new(sgd_spec(1.0, 0.0, false), 2);
        let mut p = [10.0f32, 20.0];
        state.apply_f32(&mut p, &[1.0, 2.0], 1.0);
        assert_eq!(p, [9.0, 18.0]);
        state.set_learning_rate(0.5);
        assert_eq!(state.learning_rate(), 0.5);
        assert_eq!(
            state.spec().learning_rate(),
            1.0,
            "the spec keeps the configured rate"
        );
        state.apply_f32(&mut p, &[1.0, 2.0], 1.0);
        assert_eq!(p, [8.5, 17.0]);
    }

    /// `lr_scale` and `set_learning_rate` must agree for every method, including AdamW's
    /// decoupled decay, which also uses the effective rate. lr * 0.5 is exact in binary,
    /// so the results are bit-identical.
    #[test]
    fn lr_scale_multiplies_the_learning_rate() {
        for spec in all_specs() {
            let mut scaled = OptimizerState::new(spec.clone(), P0.len());
            let mut halved = OptimizerState::new(spec.clone(), P0.len());
            halved.set_learning_rate(spec.learning_rate() * 0.5);
            let mut full = OptimizerState::new(spec.clone(), P0.len());
            let (mut a, mut b, mut c) = (P0, P0, P0);
            for g in &GRADS {
                scaled.apply_f32(&mut a, g, 0.5);
                halved.apply_f32(&mut b, g, 1.0);
                full.apply_f32(&mut c, g, 1.0);
            }
            assert_eq!(a, b, "{spec:?}");
            assert_ne!(a, c, "{spec:?}: lr_scale had no effect");
        }
    }

    #[test]
    fn bf16_nearest_even_rounds_the_f32_result() {
        for spec in all_specs() {
            let mut reference = OptimizerState::new(spec.clone(), P0.len());
            let mut state = OptimizerState::new(spec.clone(), P0.len());
            let mut words = P0.map(bf16::from_f32_rne);
            for g in &GRADS {
                // The reference starts every step from the stored (already rounded) values.
                let mut want = words.map(bf16::to_f32);
                reference.apply_f32(&mut want, g, 0.75);
                state.apply_bf16(&mut words, g, 0.75, Rounding::NearestEven, 7);
                assert_eq!(words, want.map(bf16::from_f32_rne), "{spec:?}");
            }
        }
    }

    #[test]
    fn the_avx2_build_of_the_kernels_gives_the_same_bits_as_the_baseline() {
        // Odd lengths (vector tails), values across many magnitudes, and a few specials.
        let n = 1003;
        let mut x: u32 = 12345;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 2f32.powi((x % 40) as i32 - 20)
        };
        let p0: Vec<f32> = (0..n).map(|_| next()).collect();
        let grads: Vec<Vec<f32>> = (0..4).map(|_| (0..n).map(|_| next()).collect()).collect();
        let mut specs = all_specs();
        specs.push(OptimizerSpec::Adam { lr: 0.01, beta1: 0.8, beta2: 0.99, epsilon: 1e-6, weight_decay: 0.1, decoupled: false });
        for spec in specs {
            let mut a = OptimizerState::new(spec.clone(), n);
            let mut b = OptimizerState::new(spec.clone(), n);
            let (mut pa, mut pb) = (p0.clone(), p0.clone());
            let mut wa: Vec<u16> = p0.iter().map(|&v| bf16::from_f32_rne(v)).collect();
            let mut wb = wa.clone();
            for g in &grads {
                let words: Vec<u16> = g.iter().map(|&v| bf16::from_f32_rne(v)).collect();
                a.apply_with(F32Words, &mut pa, g.as_slice(), 0.5, true);
                b.apply_with(F32Words, &mut pb, g.as_slice(), 0.5, false);
                a.apply_with(Bf16Nearest, &mut wa, Bf16Grad(&words), 0.5, true);
                b.apply_with(Bf16Nearest, &mut wb, Bf16Grad(&words), 0.5, false);
                let key = a.stochastic_key(9);
                a.apply_with(Bf16Stochastic { key }, &mut wa, g.as_slice(), 1.0, true);
                b.apply_with(Bf16Stochastic { key }, &mut wb, g.as_slice(), 1.0, false);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&pa), bits(&pb), "{spec:?}: f32 storage");
            assert_eq!(wa, wb, "{spec:?}: bf16 storage");
            for (sa, sb) in a.slots.iter().zip(&b.slots) {
                assert_eq!(bits(sa), bits(sb), "{spec:?}: slots");
            }
        }
    }

    #[test]
    fn bf16_gradient_words_update_exactly_as_their_f32_values() {
        // Gradients with more mantissa than bf16 holds, so a wrong widening would show.
        let grads: Vec<Vec<f32>> = (0..4).map(|k| (0..64).map(|i| ((i * 7 + k) as f32 * 0.37).sin() * 3.3).collect()).collect();
        let p0: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos()).collect();
        for spec in all_specs() {
            for rounding in [None, Some(Rounding::NearestEven), Some(Rounding::Stochastic)] {
                let mut by_f32 = OptimizerState::new(spec.clone(), 64);
                let mut by_words = OptimizerState::new(spec.clone(), 64);
                let (mut pf, mut pw) = (p0.clone(), p0.clone());
                let (mut bf, mut bw): (Vec<u16>, Vec<u16>) = (p0.iter().map(|&x| bf16::from_f32_rne(x)).collect(), Vec::new());
                bw.clone_from(&bf);
                for g in &grads {
                    let words: Vec<u16> = g.iter().map(|&x| bf16::from_f32_rne(x)).collect();
                    let widened: Vec<f32> = words.iter().map(|&w| bf16::to_f32(w)).collect();
                    match rounding {
                        None => {
                            by_f32.apply_f32(&mut pf, &widened, 0.5);
                            by_words.apply_f32_grad(&mut pw, Grad::Bf16(&words), 0.5);
                        }
                        Some(r) => {
                            by_f32.apply_bf16(&mut bf, &widened, 0.5, r, 3);
                            by_words.apply_bf16_grad(&mut bw, Grad::Bf16(&words), 0.5, r, 3);
                        }
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&pw), bits(&pf), "{spec:?} f32 storage");
                assert_eq!(bw, bf, "{spec:?} {rounding:?}");
                assert_eq!(by_words.slots, by_f32.slots, "{spec:?}: slots agree too");
            }
        }
    }

    /// Stochastic rounding of `start - step` (held in f32 by the slots-free SGD with lr 1)
    /// over `len` elements and `rounds` updates, each restarting from `start`; returns the
    /// fraction of results that rounded away from `start`.
    fn fraction_rounded_away(start: f32, step: f32, len: usize, rounds: usize, seed: u64) -> f64 {
        let mut state = OptimizerState::new(sgd_spec(1.0, 0.0, false), len);
        let grad = vec![step; len];
        let start_word = bf16::from_f32_rne(start);
        let mut away = 0usize;
        for _ in 0..rounds {
            let mut words = vec![start_word; len];
            state.apply_bf16(&mut words, &grad, 1.0, Rounding::Stochastic, seed);
            for &w in &words {
                // Only the neighbours of start - step are possible: start or the next bf16.
                assert!(
                    w == start_word || w == start_word + 1,
                    "{w:#06x} is not a neighbour"
                );
                away += usize::from(w != start_word);
            }
        }
        away as f64 / (len * rounds) as f64
    }

    #[test]
    fn bf16_stochastic_rounding_is_unbiased() {
        // bf16 steps by 2^-7 in [1, 2). (gradient, expected fraction rounded up): a gradient
        // of -2^-8 lands exactly halfway, -2^-9 a quarter of the way, -3 * 2^-9 three quarters.
        let cases = [
            (-(2f32.powi(-8)), 0.5),
            (-(2f32.powi(-9)), 0.25),
            (-3.0 * 2f32.powi(-9), 0.75),
        ];
        for (g, want) in cases {
            // 20 000 samples: the standard deviation of the fraction is below 0.0036.
            let got = fraction_rounded_away(1.0, g, 1000, 20, 42);
            assert!(
                (got - want).abs() < 0.02,
                "gradient {g}: rounded up {got}, want {want}"
            );
        }
    }

    #[test]
    fn bf16_stochastic_rounding_keeps_small_updates_that_nearest_even_loses() {
        // 1000 steps of +2^-10, an eighth of a bf16 step in [1, 2): nearest-even rounds every
        // one away, stochastic rounding adds up to 1 + 1000 / 1024 on average.
        let len = 256;
        let grad = vec![-(2f32.powi(-10)); len];
        let mut nearest = OptimizerState::new(sgd_spec(1.0, 0.0, false), len);
        let mut stochastic = OptimizerState::new(sgd_spec(1.0, 0.0, false), len);
        let one = bf16::from_f32_rne(1.0);
        let (mut a, mut b) = (vec![one; len], vec![one; len]);
        for _ in 0..1000 {
            nearest.apply_bf16(&mut a, &grad, 1.0, Rounding::NearestEven, 0);
            stochastic.apply_bf16(&mut b, &grad, 1.0, Rounding::Stochastic, 0);
        }
        assert!(a.iter().all(|&w| w == one));
        let mean = b.iter().map(|&w| f64::from(bf16::to_f32(w))).sum::<f64>() / len as f64;
        // Each element rounds up about 125 times in 1000 (binomial, standard deviation about
        // 10.5 steps of 2^-7, i.e. 0.08); the mean of 256 elements has one of about 0.005.
        assert!((mean - (1.0 + 1000.0 / 1024.0)).abs() < 0.03, "mean {mean}");
    }

    #[test]
    fn bf16_stochastic_rounding_is_reproducible_for_a_seed() {
        let run = |seed| {
            let mut state = OptimizerState::new(adam_spec(0.001, 0.01, true), 512);
            let mut words = vec![bf16::from_f32_rne(1.0); 512];
            let grads: Vec<f32> = (0..512).map(|i| (i as f32 - 256.0) / 100.0).collect();
            for _ in 0..3 {
                state.apply_bf16(&mut words, &grads, 1.0, Rounding::Stochastic, seed);
            }
            words
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
