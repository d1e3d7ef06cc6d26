//! Protobuf ↔ domain conversions, in one place. Proto types stop here.

use parasync_proto::ps;
use parasync_tensor::DType;

use crate::error::{Error, Result};
use crate::optimizer::OptimizerSpec;
use crate::store::{Init, VariableDef};

/// The element type a request names, or an error naming the field and the variable.
pub fn dtype(value: i32, field: &str, variable: &str) -> Result<DType> {
    match ps::Dtype::try_from(value) {
        Ok(ps::Dtype::F32) => Ok(DType::F32),
        Ok(ps::Dtype::Bf16) => Ok(DType::Bf16),
        Ok(ps::Dtype::Unspecified) => Err(Error::invalid(variable, format!("{field} is not set (use f32 or bf16)"))),
        Err(_) => Err(Error::invalid(variable, format!("{field} has unknown value {value} (use f32 or bf16)"))),
    }
}

/// The proto value of a dtype.
pub fn dtype_to_proto(d: DType) -> i32 {
    match d {
        DType::F32 => ps::Dtype::F32 as i32,
        DType::Bf16 => ps::Dtype::Bf16 as i32,
    }
}

fn optimizer(o: Option<ps::Optimizer>, variable: &str) -> Result<OptimizerSpec> {
    use ps::optimizer::Kind;
    let kind = o.and_then(|o| o.kind).ok_or_else(|| Error::invalid(variable, "no optimizer given"))?;
    Ok(match kind {
        Kind::Sgd(s) => OptimizerSpec::Sgd { lr: s.learning_rate, momentum: s.momentum, nesterov: s.nesterov },
        Kind::Adagrad(a) => OptimizerSpec::Adagrad {
            lr: a.learning_rate,
            initial_accumulator: a.initial_accumulator,
            epsilon: a.epsilon,
        },
        Kind::Adam(a) => OptimizerSpec::Adam {
            lr: a.learning_rate,
            beta1: a.beta1,
            beta2: a.beta2,
            epsilon: a.epsilon,
            weight_decay: a.weight_decay,
            decoupled: a.decoupled,
        },
    })
}

fn init(i: Option<ps::Initializer>, variable: &str) -> Result<Init> {
    use ps::initializer::Kind;
    Ok(match i.and_then(|i| i.kind) {
        None => Init::Zeros,
        Some(Kind::Constant(c)) => Init::Constant(c),
        Some(Kind::Uniform(u)) => Init::Uniform { low: u.low, high: u.high, seed: u.seed },
        Some(Kind::Normal(n)) => Init::Normal { mean: n.mean, stddev: n.stddev, seed: n.seed },
        Some(Kind::ValuesFollow(_)) => Init::AssignedLater,
        Some(Kind::Values(v)) => {
            let d = dtype(v.dtype, "initial values dtype", variable)?;
            let values = parasync_tensor::decode_vec(&v.data, d)
                .map_err(|e| Error::invalid(variable, format!("initial values: {e}")))?;
            Init::Values(values)
        }
    })
}

/// A registration request as a definition and its initializer.
pub fn register_request(r: ps::RegisterRequest) -> Result<(VariableDef, Init)> {
    let dtype = dtype(r.storage_dtype, "storage_dtype", &r.name)?;
    let optimizer = optimizer(r.optimizer, &r.name)?;
    let init = init(r.init, &r.name)?;
    Ok((VariableDef { name: r.name, shape: r.shape, dtype, optimizer, stochastic_rounding: r.stochastic_rounding }, init))
}

/// A table registration as a definition (validated by the caller).
pub fn register_table_request(r: ps::RegisterTableRequest) -> Result<crate::sparse::TableDef> {
    use crate::sparse::{Admission, Eviction, RowInit, RowOptimizer, TableDef};
    let name = r.name;
    let dtype = dtype(r.storage_dtype, "storage_dtype", &name)?;
    let init = match r.init.and_then(|i| i.kind) {
        None => RowInit::Zeros,
        Some(ps::row_initializer::Kind::Uniform(u)) => RowInit::Uniform { low: u.low, high: u.high, seed: u.seed },
        Some(ps::row_initializer::Kind::Normal(n)) => RowInit::Normal { mean: n.mean, stddev: n.stddev, seed: n.seed },
    };
    use ps::row_optimizer::Kind;
    let optimizer = match r.optimizer.and_then(|o| o.kind).ok_or_else(|| Error::invalid(&name, "no optimizer given"))? {
        Kind::Sgd(s) if s.momentum != 0.0 || s.nesterov => {
            return Err(Error::invalid(&name, "sgd of a table takes no momentum (rows are updated only when pushed)"))
        }
        Kind::Sgd(s) => RowOptimizer::Sgd { lr: s.learning_rate },
        Kind::Adagrad(a) => RowOptimizer::Adagrad { lr: a.learning_rate, initial_accumulator: a.initial_accumulator, epsilon: a.epsilon },
        Kind::Adam(a) if a.weight_decay != 0.0 || a.decoupled => {
            return Err(Error::invalid(&name, "adam of a table takes no weight decay (rows are updated only when pushed)"))
        }
        Kind::Adam(a) => RowOptimizer::Adam { lr: a.learning_rate, beta1: a.beta1, beta2: a.beta2, epsilon: a.epsilon },
        Kind::Ftrl(f) => RowOptimizer::Ftrl {
            lr: f.learning_rate,
            initial_accumulator: f.initial_accumulator,
            l1: f.l1,
            l2: f.l2,
            beta: f.beta,
        },
    };
    let admission = match (r.admit_min_count, r.admit_probability) {
        (0 | 1, p) if p == 0.0 => Admission::Always,
        (n, p) if p == 0.0 => Admission::MinCount(n),
        (0 | 1, p) => Admission::Probability { p, seed: r.admit_seed },
        (n, p) => {
            return Err(Error::invalid(&name, format!("admission takes admit_min_count ({n}) or admit_probability ({p}), not both")))
        }
    };
    let eviction = match ps::EvictionPolicy::try_from(r.eviction) {
        Ok(ps::EvictionPolicy::None) => Eviction::None,
        Ok(ps::EvictionPolicy::Lru) => Eviction::Lru,
        Ok(ps::EvictionPolicy::Lfu) => Eviction::Lfu,
        Ok(ps::EvictionPolicy::Ttl) => Eviction::Ttl { steps: r.ttl_steps },
        Err(_) => return Err(Error::invalid(&name, format!("eviction has unknown value {}", r.eviction))),
    };
    if r.ttl_steps != 0 && !matches!(eviction, Eviction::Ttl { .. }) {
        return Err(Error::invalid(&name, "ttl_steps is set but the eviction policy is not ttl"));
    }
    Ok(TableDef { name, dim: r.dim, dtype, init, optimizer, admission, eviction, capacity: r.capacity })
}
