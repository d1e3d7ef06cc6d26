//! What a variable is and how it starts: definitions, their validation, initialisers.

use parasync_tensor::DType;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::optimizer::OptimizerSpec;

/// Largest variable a shard accepts, in elements (4 GiB of f32).
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
    /// Number of elements, after checking the definition is usable.
    pub fn validate(&self) -> Result<usize> {
        if self.name.is_empty() || self.name.len() > 1024 {
            return Err(Error::invalid(&self.name, "a variable name must have 1 to 1024 bytes"));
        }
        if self.shape.is_empty() {
            return Err(Error::invalid(&self.name, "shape must have at least one dimension"));
        }
        let mut n: u64 = 1;
        for &d in &self.shape {
            if d == 0 {
                return Err(Error::invalid(&self.name, format!("shape {:?} has a zero dimension", self.shape)));
            }
            n = n.checked_mul(d).filter(|&n| n <= MAX_ELEMENTS).ok_or_else(|| {
                Error::invalid(&self.name, format!("shape {:?} exceeds the {MAX_ELEMENTS}-element limit", self.shape))
            })?;
        }
        self.optimizer.validate().map_err(|e| Error::invalid(&self.name, format!("optimizer: {e}")))?;
        Ok(n as usize)
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
            Init::Constant(c) => vec![*c; n],
            Init::Uniform { low, high, seed } => {
                if !low.is_finite() || !high.is_finite() || low >= high {
                    return Err(Error::invalid(name, format!("uniform initializer needs finite low < high, got [{low}, {high})")));
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(*seed);
                (0..n).map(|_| rng.gen_range(*low..*high)).collect()
            }
            Init::Normal { mean, stddev, seed } => {
                if !mean.is_finite() || !stddev.is_finite() || *stddev < 0.0 {
                    return Err(Error::invalid(name, format!("normal initializer needs a finite mean and stddev >= 0, got {mean}, {stddev}")));
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
