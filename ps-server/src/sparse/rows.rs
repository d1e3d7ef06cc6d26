//! The optimizers of sparse rows: each update touches only the rows a step pushed, with the
//! row's own slots and, for Adam, the row's own step count ("lazy" Adam: a row's moments and
//! bias correction advance only when the row is updated, as in TensorFlow's LazyAdam).
//!
//! Per element in f32, like the dense optimizers (`crate::optimizer`); SGD, Adagrad and Adam
//! follow `torch.optim`, FTRL-proximal follows TensorFlow's `Ftrl` (learning-rate power −½).

/// The optimizer of a table's rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOptimizer {
    /// `w -= lr * g`.
    Sgd { lr: f32 },
    /// `acc += g²; w -= lr * g / (sqrt(acc) + epsilon)`.
    Adagrad { lr: f32, initial_accumulator: f32, epsilon: f32 },
    /// Adam with a step count per row: `t` counts the row's own updates.
    Adam { lr: f32, beta1: f32, beta2: f32, epsilon: f32 },
    /// FTRL-proximal: per element a linear term `z` and an accumulator `n`;
    /// `w = 0` while `|z| <= l1`, else `(sign(z) l1 − z) / ((beta + sqrt(n)) / lr + 2 l2)`.
    Ftrl { lr: f32, initial_accumulator: f32, l1: f32, l2: f32, beta: f32 },
}

impl RowOptimizer {
    /// Lower-case name: `sgd`, `adagrad`, `adam` (lazy) or `ftrl`.
    pub fn name(&self) -> &'static str {
        match self {
            RowOptimizer::Sgd { .. } => "sgd",
            RowOptimizer::Adagrad { .. } => "adagrad",
            RowOptimizer::Adam { .. } => "adam",
            RowOptimizer::Ftrl { .. } => "ftrl",
        }
    }

    /// The configured learning rate.
    pub fn learning_rate(&self) -> f32 {
        match *self {
            RowOptimizer::Sgd { lr }
            | RowOptimizer::Adagrad { lr, .. }
            | RowOptimizer::Adam { lr, .. }
            | RowOptimizer::Ftrl { lr, .. } => lr,
        }
    }

    /// Slots per row element (each `dim` f32 per row).
    pub fn num_slots(&self) -> usize {
        match self {
            RowOptimizer::Sgd { .. } => 0,
            RowOptimizer::Adagrad { .. } => 1,
            RowOptimizer::Adam { .. } | RowOptimizer::Ftrl { .. } => 2,
        }
    }

    /// Names of the slots, in storage order.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match self {
            RowOptimizer::Sgd { .. } => &[],
            RowOptimizer::Adagrad { .. } => &["accumulator"],
            RowOptimizer::Adam { .. } => &["m", "v"],
            RowOptimizer::Ftrl { .. } => &["linear", "accumulator"],
        }
    }

    /// The value every slot element of a new row starts at.
    pub fn slot_start(&self, slot: usize) -> f32 {
        match (*self, slot) {
            (RowOptimizer::Adagrad { initial_accumulator, .. }, 0) => initial_accumulator,
            (RowOptimizer::Ftrl { initial_accumulator, .. }, 1) => initial_accumulator,
            _ => 0.0,
        }
    }

    /// Checks the hyper-parameters; the error names the bad one and its value.
    pub fn validate(&self) -> Result<(), String> {
        let non_negative = |what: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{}: {what} must be finite and >= 0, got {v}", self.name()))
            }
        };
        let unit = |what: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{}: {what} must be in [0, 1), got {v}", self.name()))
            }
        };
        match *self {
            RowOptimizer::Sgd { lr } => non_negative("lr", lr),
            RowOptimizer::Adagrad { lr, initial_accumulator, epsilon } => {
                non_negative("lr", lr)?;
                non_negative("initial_accumulator", initial_accumulator)?;
                non_negative("epsilon", epsilon)?;
                if initial_accumulator == 0.0 && epsilon == 0.0 {
                    return Err("adagrad: initial_accumulator and epsilon are both 0 (0 / 0 for a zero gradient); make one positive".into());
                }
                Ok(())
            }
            RowOptimizer::Adam { lr, beta1, beta2, epsilon } => {
                non_negative("lr", lr)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                if !(epsilon.is_finite() && epsilon > 0.0) {
                    return Err(format!("adam: epsilon must be finite and > 0, got {epsilon}"));
                }
                Ok(())
            }
            RowOptimizer::Ftrl { lr, initial_accumulator, l1, l2, beta } => {
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(format!("ftrl: lr must be finite and > 0 (it divides), got {lr}"));
                }
                non_negative("initial_accumulator", initial_accumulator)?;
                non_negative("l1", l1)?;
                non_negative("l2", l2)?;
                non_negative("beta", beta)?;
                if initial_accumulator == 0.0 && beta == 0.0 && l2 == 0.0 {
                    return Err("ftrl: initial_accumulator, beta and l2 are all 0 (a division by 0 for a zero gradient); make one positive".into());
                }
                Ok(())
            }
        }
    }

    /// One update of row `w` with its (summed) gradient `g` at learning rate `lr` (the table's
    /// current rate, times any staleness scale). `s0` and `s1` are the row's slots (empty
    /// where the method keeps fewer); `steps` is the row's update count (Adam's `t`).
    #[inline(always)]
    pub fn apply(&self, lr: f32, w: &mut [f32], s0: &mut [f32], s1: &mut [f32], steps: &mut u32, g: &[f32]) {
        *steps = steps.saturating_add(1);
        match *self {
            RowOptimizer::Sgd { .. } => {
                for (w, &g) in w.iter_mut().zip(g) {
                    *w -= lr * g;
                }
            }
            RowOptimizer::Adagrad { epsilon, .. } => {
                for ((w, acc), &g) in w.iter_mut().zip(s0.iter_mut()).zip(g) {
                    *acc += g * g;
                    *w -= lr * g / (acc.sqrt() + epsilon);
                }
            }
            RowOptimizer::Adam { beta1, beta2, epsilon, .. } => {
                let t = *steps as i32;
                let c1 = 1.0 - beta1.powi(t);
                let c2 = 1.0 - beta2.powi(t);
                for (((w, m), v), &g) in w.iter_mut().zip(s0.iter_mut()).zip(s1.iter_mut()).zip(g) {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *w -= lr * (*m / c1) / ((*v / c2).sqrt() + epsilon);
                }
            }
            RowOptimizer::Ftrl { l1, l2, beta, .. } => {
                for (((w, z), n), &g) in w.iter_mut().zip(s0.iter_mut()).zip(s1.iter_mut()).zip(g) {
                    let n_new = *n + g * g;
                    let sigma = (n_new.sqrt() - n.sqrt()) / lr;
                    *z += g - sigma * *w;
                    *n = n_new;
                    *w = if z.abs() <= l1 { 0.0 } else { (l1.copysign(*z) - *z) / ((beta + n.sqrt()) / lr + 2.0 * l2) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(opt: RowOptimizer, w0: &[f32], grads: &[&[f32]]) -> (Vec<f32>, Vec<f32>, Vec<f32>, u32) {
        let mut w = w0.to_vec();
        let mut s0 = vec![opt.slot_start(0); if opt.num_slots() > 0 { w.len() } else { 0 }];
        let mut s1 = vec![opt.slot_start(1); if opt.num_slots() > 1 { w.len() } else { 0 }];
        let mut steps = 0;
        for g in grads {
            opt.apply(opt.learning_rate(), &mut w, &mut s0, &mut s1, &mut steps, g);
        }
        (w, s0, s1, steps)
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() <= 1e-6 * y.abs().max(1.0), "{a:?} vs {b:?}");
        }
    }

    // The expected figures below were worked out by hand from the formulas in the doc
    // comments (with exact decimal arithmetic), not by running this code.

    #[test]
    fn sgd_row_update() {
        let (w, ..) = run(RowOptimizer::Sgd { lr: 0.5 }, &[1.0, -2.0], &[&[2.0, 1.0], &[0.5, -4.0]]);
        // 1 − 0.5·2 − 0.5·0.5 = −0.25; −2 − 0.5·1 + 0.5·4 = −0.5
        assert_eq!(w, [-0.25, -0.5]);
    }

    #[test]
    fn adagrad_row_update() {
        let opt = RowOptimizer::Adagrad { lr: 0.1, initial_accumulator: 0.0, epsilon: 0.0 };
        let (w, acc, ..) = run(opt, &[1.0], &[&[3.0], &[4.0]]);
        // acc 9 → w = 1 − 0.1·3/3 = 0.9; acc 25 → w = 0.9 − 0.1·4/5 = 0.82
        assert_eq!(acc, [25.0]);
        close(&w, &[0.82]);
    }

    #[test]
    fn lazy_adam_counts_steps_per_row() {
        let opt = RowOptimizer::Adam { lr: 0.1, beta1: 0.5, beta2: 0.75, epsilon: 1e-8 };
        // Step 1: m = 0.5·2 = 1, v = 0.25·4 = 1; m̂ = 1/0.5 = 2, v̂ = 1/0.25 = 4; w = 1 − 0.1·2/2 = 0.9.
        let (w, m, v, t) = run(opt, &[1.0], &[&[2.0]]);
        assert_eq!((m[0], v[0], t), (1.0, 1.0, 1));
        close(&w, &[0.9]);
        // Step 2 (g = 4): m = 0.5 + 2 = 2.5, v = 0.75 + 4 = 4.75; m̂ = 2.5/0.75 = 10/3,
        // v̂ = 4.75/0.4375 = 76/7; w = 0.9 − 0.1·(10/3)/sqrt(76/7) = 0.9 − 0.101159...
        let (w, m, v, t) = run(opt, &[1.0], &[&[2.0], &[4.0]]);
        assert_eq!((m[0], v[0], t), (2.5, 4.75, 2));
        close(&w, &[0.9 - 0.1 * (10.0 / 3.0) / (76.0f64 / 7.0).sqrt()]);
    }

    #[test]
    fn ftrl_row_update() {
        let opt = RowOptimizer::Ftrl { lr: 0.5, initial_accumulator: 1.0, l1: 0.5, l2: 0.25, beta: 1.0 };
        // w0 = 0, g = 3: n = 1 + 9 = 10, sigma = (sqrt 10 − 1)/0.5, z = 3 − sigma·0 = 3;
        // |z| > l1: w = (0.5 − 3) / ((1 + sqrt 10)/0.5 + 0.5) = −2.5 / (2 + 2 sqrt 10 + 0.5)
        let (w, z, n, _) = run(opt, &[0.0], &[&[3.0]]);
        assert_eq!((z[0], n[0]), (3.0, 10.0));
        close(&w, &[-2.5 / (2.5 + 2.0 * 10f64.sqrt())]);
        // A small gradient keeps |z| <= l1: the element stays exactly 0.
        let (w, z, ..) = run(opt, &[0.0], &[&[0.4]]);
        assert_eq!((w[0], z[0]), (0.0, 0.4));
        // Then g = −1 from w = 0 (n = 1.16 → 2.16): z = 0.4 − 1 − sigma·0 = −0.6, |z| > 0.5:
        // w = (−0.5 + 0.6) / ((1 + sqrt 2.16)/0.5 + 0.5).
        let (w, ..) = run(opt, &[0.0], &[&[0.4], &[-1.0]]);
        close(&w, &[0.1 / ((1.0 + 2.16f64.sqrt()) / 0.5 + 0.5)]);
    }

    #[test]
    fn bad_hyper_parameters_are_named() {
        assert!(RowOptimizer::Sgd { lr: -1.0 }.validate().unwrap_err().contains("lr"));
        let adam = RowOptimizer::Adam { lr: 0.1, beta1: 1.0, beta2: 0.9, epsilon: 1e-8 };
        assert!(adam.validate().unwrap_err().contains("beta1"));
        let ftrl = RowOptimizer::Ftrl { lr: 0.0, initial_accumulator: 0.1, l1: 0.0, l2: 0.0, beta: 0.0 };
        assert!(ftrl.validate().unwrap_err().contains("lr"));
    }
}
