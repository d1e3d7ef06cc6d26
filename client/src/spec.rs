//! What a trainer declares about its variables: shape, storage dtype, optimizer, initial values.

use parasync_proto::ps;
use parasync_tensor::DType;

/// Server-side optimizer of a variable.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// SGD with optional (Nesterov) momentum.
    Sgd { lr: f32, momentum: f32, nesterov: bool },
    /// Adagrad.
    Adagrad { lr: f32, initial_accumulator: f32, epsilon: f32 },
    /// Adam (L2 `weight_decay` added to the gradient when non-zero).
    Adam { lr: f32, beta1: f32, beta2: f32, epsilon: f32, weight_decay: f32 },
    /// AdamW (decoupled weight decay).
    AdamW { lr: f32, beta1: f32, beta2: f32, epsilon: f32, weight_decay: f32 },
}

impl Optimizer {
    /// Plain SGD.
    pub fn sgd(lr: f32) -> Self {
        Optimizer::Sgd { lr, momentum: 0.0, nesterov: false }
    }

    /// Adam with the usual defaults (0.9, 0.999, 1e-8).
    pub fn adam(lr: f32) -> Self {
        Optimizer::Adam { lr, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0 }
    }

    pub(crate) fn to_proto(&self) -> ps::Optimizer {
        use ps::optimizer::Kind;
        let kind = match *self {
            Optimizer::Sgd { lr, momentum, nesterov } => Kind::Sgd(ps::Sgd { learning_rate: lr, momentum, nesterov }),
            Optimizer::Adagrad { lr, initial_accumulator, epsilon } => {
                Kind::Adagrad(ps::Adagrad { learning_rate: lr, initial_accumulator, epsilon })
            }
            Optimizer::Adam { lr, beta1, beta2, epsilon, weight_decay } => {
                Kind::Adam(ps::Adam { learning_rate: lr, beta1, beta2, epsilon, weight_decay, decoupled: false })
            }
            Optimizer::AdamW { lr, beta1, beta2, epsilon, weight_decay } => {
                Kind::Adam(ps::Adam { learning_rate: lr, beta1, beta2, epsilon, weight_decay, decoupled: true })
            }
        };
        ps::Optimizer { kind: Some(kind) }
    }
}

/// Initial values of a variable. Every worker may register the same spec; the first
/// registration initialises, later identical ones change nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// Zeros.
    Zeros,
    /// One value everywhere.
    Constant(f32),
    /// Uniform in `[low, high)`, generated on the server from `seed` (per piece).
    Uniform { low: f32, high: f32, seed: u64 },
    /// Normal, generated on the server from `seed` (per piece).
    Normal { mean: f32, stddev: f32, seed: u64 },
    /// Explicit values (row-major, one per element).
    Values(Vec<f32>),
    /// The values another worker registers with [`Init::Values`] (the chief's, say): this
    /// worker brings none of its own, so whichever worker registers first, the values are
    /// that worker's. Until they arrive, pulls wait (up to the pull timeout) and pushes are
    /// refused. A variable that already holds values keeps them.
    Adopt,
}

/// A variable as a trainer declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct VariableSpec {
    /// Unique name.
    pub name: String,
    /// Dimensions, row-major.
    pub shape: Vec<usize>,
    /// Storage dtype on the server.
    pub dtype: DType,
    /// Optimizer the server applies.
    pub optimizer: Optimizer,
    /// Initial values.
    pub init: Init,
    /// bf16 storage rounds stochastically.
    pub stochastic_rounding: bool,
}

impl VariableSpec {
    /// An `f32` variable with plain SGD and zeros; adjust fields as needed.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        VariableSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: DType::F32,
            optimizer: Optimizer::sgd(0.01),
            init: Init::Zeros,
            stochastic_rounding: false,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True if the shape has a zero dimension.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(crate) fn dtype_to_proto(d: DType) -> i32 {
    match d {
        DType::F32 => ps::Dtype::F32 as i32,
        DType::Bf16 => ps::Dtype::Bf16 as i32,
    }
}
