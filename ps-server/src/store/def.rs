//! What a variable is and how it starts: definitions, their validation, initialisers.

use parasync_proto::names;
use parasync_tensor::DType;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::optimizer::OptimizerSpec;

/// Largest variable a shard accepts by default, in elements (4 GiB of f32).
pub const MAX_ELEMENTS: u64 = 1 << 30;

/// What a variable is: everything a registration must agree on.
#[derive(Clone, Debug, PartialEq)]
pub struct VariableDef {
    /// Unique name on this shard (a partitioned variable's parts carry their part in the name).
    pub name: String,
    /// Dimensions, row-major; the first is the row dimension that partitioning splits.
    pub shape: Vec<u64>,
    /// Storage element type.
    pub dtype: DType,
    /// Optimizer applied to pushed gradients.
    pub optimizer: OptimizerSpec,
    /// bf16 storage rounds stochastically instead of to nearest even.
    pub stochastic_rounding: bool,
}

impl VariableDef {
    /// Number of elements, after checking the definition is usable and has at most
    /// `max_elements`.
    pub fn validate(&self, max_elements: u64) -> Result<usize> {
        // The client's own names have at most MAX_NAME_BYTES; a split variable's parts add
        // their `/part-i-of-n`.
        names::check_name(&self.name, names::MAX_NAME_BYTES + names::PART_SUFFIX_BYTES)
            .map_err(|reason| Error::invalid(&self.name, reason))?;
        if self.shape.is_empty() {
            return Err(Error::invalid(&self.name, "shape must have at least one dimension"));
        }
        let mut n: u64 = 1;
        for &d in &self.shape {
            if d == 0 {
                return Err(Error::invalid(&self.name, format!("shape {:?} has a zero dimension", self.shape)));
            }
            n = n.checked_mul(d).filter(|&n| n <= max_elements).ok_or_else(|| {
                Error::ResourceExhausted {
                    variable: self.name.clone(),
                    reason: format!("shape {:?} exceeds this shard's {max_elements}-element limit per variable (--max-variable-elements)", self.shape),
                }
            })?;
        }
        self.optimizer.validate().map_err(|e| Error::invalid(&self.name, format!("optimizer: {e}")))?;
        Ok(n as usize)
    }

    /// Bytes a variable of `len` elements holds: its values and its optimizer's f32 slots.
    pub fn bytes_held(&self, len: usize) -> u64 {
        len as u64 * (self.dtype.size() as u64 + 4 * self.optimizer.num_slots() as u64)
    }

    /// Human-readable differences from `other`, empty if they agree.
    pub fn differences(&self, other: &VariableDef) -> Vec<String> {
        let mut d = Vec::new();
        if self.shape != other.shape {
            d.push(format!("shape {:?} vs {:?}", self.shape, other.shape));
        }
        if self.dtype != other.dtype {
            d.push(format!("dtype {} vs {}", self.dtype, other.dtype));
        }
        if self.optimizer != other.optimizer {
            d.push(format!("optimizer {:?} vs {:?}", self.optimizer, other.optimizer));
        }
        if self.stochastic_rounding != other.stochastic_rounding {
            d.push("stochastic rounding differs".into());
        }
        d
    }
}

/// Initial values of a new variable.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// Every element the same value.
    Constant(f32),
    /// Uniform in `[low, high)` from a seeded generator (same seed → same values).
    Uniform { low: f32, high: f32, seed: u64 },
    /// Normal from a seeded generator.
    Normal { mean: f32, stddev: f32, seed: u64 },
    /// Explicit values, one per element.
    Values(Vec<f32>),
    /// Zeros for now; the creator assigns the real values next (too large to travel in the
    /// registration). Until then pulls wait and gradient pushes are refused.
    AssignedLater,
}

impl Init {
    pub(super) fn materialize(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        Ok(match self {
            Init::Zeros | Init::AssignedLater => vec![0.0; n],
            Init::Constant(c) if !c.is_finite() => {
                return Err(Error::invalid(name, format!("constant initializer needs a finite value, got {c}")));
            }
            Init::Constant(c) => vec![*c; n],
            Init::Uniform { low, high, seed } => {
                // (high - low) must be finite too: the sampler scales by it (±3e38 overflows).
                if !low.is_finite() || !high.is_finite() || low >= high || !(high - low).is_finite() {
                    return Err(Error::invalid(name, format!("uniform initializer needs finite low < high a finite distance apart, got [{low}, {high})")));
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(*seed);
                (0..n).map(|_| rng.gen_range(*low..*high)).collect()
            }
            Init::Normal { mean, stddev, seed } => {
                // Samples reach about 9 stddev from the mean: keep them finite in f32.
                let reach = f64::from(mean.abs()) + 10.0 * f64::from(*stddev);
                if !mean.is_finite() || !stddev.is_finite() || *stddev < 0.0 || reach > f64::from(f32::MAX) {
                    return Err(Error::invalid(
                        name,
                        format!("normal initializer needs a finite mean and 0 <= stddev with |mean| + 10 stddev <= f32::MAX, got {mean}, {stddev}"),
                    ));
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(*seed);
                (0..n)
                    .map(|_| {
                        // Box-Muller: exact enough for initialisation and free of extra crates.
                        let u1: f64 = 1.0 - rng.gen::<f64>();
                        let u2: f64 = rng.gen();
                        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                        mean + stddev * z as f32
                    })
                    .collect()
            }
            Init::Values(v) => {
                if v.len() != n {
                    return Err(Error::invalid(name, format!("initial values have {} elements, the shape needs {n}", v.len())));
                }
                v.clone()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::OptimizerSpec;

    fn def(name: &str) -> VariableDef {
        VariableDef {
            name: name.into(),
            shape: vec![4],
            dtype: DType::F32,
            optimizer: OptimizerSpec::Sgd { lr: 0.1, momentum: 0.0, nesterov: false },
            stochastic_rounding: false,
        }
    }

    fn refused(init: Init) -> String {
        match init.materialize("v", 4) {
            Err(Error::InvalidArgument { reason, .. }) => reason,
            other => panic!("{init:?} must be refused, got {other:?}"),
        }
    }

    #[test]
    fn initializer_ranges_that_would_overflow_are_refused_not_panicked_on() {
        // ±3e38 are finite, their distance is not: the sampler used to panic on it
        assert!(refused(Init::Uniform { low: -3e38, high: 3e38, seed: 1 }).contains("finite distance"));
        assert!(refused(Init::Uniform { low: 1.0, high: 1.0, seed: 1 }).contains("low < high"));
        assert!(refused(Init::Uniform { low: f32::NAN, high: 1.0, seed: 1 }).contains("low < high"));
        assert!(refused(Init::Normal { mean: 0.0, stddev: 1e38, seed: 1 }).contains("10 stddev"));
        assert!(refused(Init::Normal { mean: 0.0, stddev: -1.0, seed: 1 }).contains("stddev"));
        assert!(refused(Init::Constant(f32::INFINITY)).contains("finite"));
        let wide = Init::Uniform { low: -1e38, high: 1e38, seed: 1 }.materialize("v", 1000).unwrap();
        assert!(wide.iter().all(|x| x.is_finite() && (-1e38..1e38).contains(x)));
        let normal = Init::Normal { mean: 0.0, stddev: 3e37, seed: 1 }.materialize("v", 1000).unwrap();
        assert!(normal.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn names_are_bounded_printable_and_errors_quote_them_cut() {
        assert!(def("layer/w").validate(MAX_ELEMENTS).is_ok());
        assert!(def(&format!("{}/part-12-of-16", "a".repeat(256))).validate(MAX_ELEMENTS).is_ok());
        for bad in ["", "a\0b", "line\nbreak", "cr\r", "   "] {
            assert!(def(bad).validate(MAX_ELEMENTS).is_err(), "{bad:?} must be refused");
        }
        let long = "x".repeat(16 << 10);
        let msg = def(&long).validate(MAX_ELEMENTS).unwrap_err().to_string();
        assert!(msg.len() < 400, "the error repeats the whole name: {} bytes", msg.len());
        assert!(msg.contains("(16384 bytes)") && msg.contains("1 to 296 bytes"), "{msg}");
    }
}
