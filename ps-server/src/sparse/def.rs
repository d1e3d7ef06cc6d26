//! What a sparse table is: row width, storage, how a new row starts, the optimizer of its
//! rows, and the policy that keeps its memory bounded. Everything a registration must agree on.

use parasync_proto::names;
use parasync_tensor::DType;

use super::rows::RowOptimizer;

/// Widest row a table accepts, in elements.
pub const MAX_DIM: u32 = 1 << 16;

/// A sparse table: rows of `dim` elements created on first use, keyed by `u64` ids.
#[derive(Clone, Debug, PartialEq)]
pub struct TableDef {
    /// Unique among the shard's tables (tables and dense variables have separate names).
    pub name: String,
    /// Elements per row.
    pub dim: u32,
    /// Storage element type of the rows (optimizer slots are always f32).
    pub dtype: DType,
    /// How a new row starts.
    pub init: RowInit,
    /// The update of one row from its summed gradient.
    pub optimizer: RowOptimizer,
    /// When an id that has no row gets one.
    pub admission: Admission,
    /// What makes room when the table is full.
    pub eviction: Eviction,
    /// Rows this shard holds at most (0: no limit).
    pub capacity: u64,
}

impl TableDef {
    /// Checks the definition; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        names::check_name(&self.name, names::MAX_NAME_BYTES)?;
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(format!("dim must be 1..={MAX_DIM}, got {}", self.dim));
        }
        self.init.validate()?;
        self.optimizer.validate().map_err(|e| format!("optimizer: {e}"))?;
        match self.admission {
            Admission::Always => {}
            Admission::MinCount(0) => return Err("admission min_count must be at least 1".into()),
            Admission::MinCount(_) => {}
            Admission::Probability { p, .. } => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(format!("admission probability must be in (0, 1], got {p}"));
                }
            }
        }
        match self.eviction {
            Eviction::None => {}
            Eviction::Lru | Eviction::Lfu if self.capacity == 0 => {
                return Err(format!("eviction {} needs a capacity (rows per shard)", self.eviction.name()))
            }
            Eviction::Ttl { steps: 0 } => return Err("eviction ttl needs steps >= 1".into()),
            _ => {}
        }
        Ok(())
    }

    /// Bytes one row holds in its values and optimizer slots (the raw figure that memory per
    /// row is measured against).
    pub fn row_bytes(&self) -> u64 {
        self.dim as u64 * (self.dtype.size() as u64 + 4 * self.optimizer.num_slots() as u64)
    }

    /// Human-readable differences from `other`, empty if they agree.
    pub fn differences(&self, other: &TableDef) -> Vec<String> {
        let mut d = Vec::new();
        if self.dim != other.dim {
            d.push(format!("dim {} vs {}", self.dim, other.dim));
        }
        if self.dtype != other.dtype {
            d.push(format!("storage dtype {} vs {}", self.dtype.name(), other.dtype.name()));
        }
        if self.init != other.init {
            d.push(format!("initializer {:?} vs {:?}", self.init, other.init));
        }
        if self.optimizer != other.optimizer {
            d.push(format!("optimizer {:?} vs {:?}", self.optimizer, other.optimizer));
        }
        if self.admission != other.admission {
            d.push(format!("admission {:?} vs {:?}", self.admission, other.admission));
        }
        if self.eviction != other.eviction || self.capacity != other.capacity {
            d.push(format!(
                "eviction {:?} with capacity {} vs {:?} with capacity {}",
                self.eviction, self.capacity, other.eviction, other.capacity
            ));
        }
        d
    }
}

/// How a new row starts. A row's values depend only on the seed and its id: the same id
/// starts with the same row on every run, whichever shard holds it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowInit {
    /// All zeros.
    Zeros,
    /// Uniform in `[low, high)`.
    Uniform { low: f32, high: f32, seed: u64 },
    /// Normal with this mean and standard deviation.
    Normal { mean: f32, stddev: f32, seed: u64 },
}

impl RowInit {
    fn validate(&self) -> Result<(), String> {
        match *self {
            RowInit::Zeros => Ok(()),
            RowInit::Uniform { low, high, .. } => {
                if !(low.is_finite() && high.is_finite() && low < high && (high as f64 - low as f64) <= f32::MAX as f64) {
                    Err(format!("uniform initializer needs finite low < high at a finite distance, got [{low}, {high})"))
                } else {
                    Ok(())
                }
            }
            RowInit::Normal { mean, stddev, .. } => {
                if !(mean.is_finite() && stddev.is_finite() && stddev >= 0.0)
                    || (mean.abs() as f64 + 10.0 * stddev as f64) > f32::MAX as f64
                {
                    Err(format!("normal initializer needs a finite mean and 0 <= stddev, within f32 range at 10 stddev; got mean {mean}, stddev {stddev}"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Writes the initial row of `id` into `row`.
    pub fn fill(&self, id: u64, row: &mut [f32]) {
        match *self {
            RowInit::Zeros => row.fill(0.0),
            RowInit::Uniform { low, high, seed } => {
                let mut g = RowRng::new(seed, id);
                let span = high as f64 - low as f64;
                for x in row.iter_mut() {
                    // (The f64 product can round up to `high` only within f32 rounding.)
                    *x = ((low as f64 + g.unit() * span) as f32).min(f32_below(high));
                }
            }
            RowInit::Normal { mean, stddev, seed } => {
                let mut g = RowRng::new(seed, id);
                let mut i = 0;
                while i < row.len() {
                    // Box–Muller: two uniforms give two independent normals.
                    let u1 = 1.0 - g.unit(); // (0, 1]
                    let u2 = g.unit();
                    let r = (-2.0 * u1.ln()).sqrt();
                    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
                    row[i] = (mean as f64 + stddev as f64 * r * c) as f32;
                    if i + 1 < row.len() {
                        row[i + 1] = (mean as f64 + stddev as f64 * r * s) as f32;
                    }
                    i += 2;
                }
            }
        }
    }
}

/// The largest f32 below `x` (for a finite `x`).
fn f32_below(x: f32) -> f32 {
    if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else if x == 0.0 {
        -f32::from_bits(1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// SplitMix64's increment (2^64 / golden ratio).
pub(crate) const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

pub(crate) use parasync_proto::sparse::mix64;

/// The random numbers of one id's row: SplitMix64 started from the seed and the id. Defined
/// here, not by a library, so the rows stay the same across versions of everything else.
struct RowRng(u64);

impl RowRng {
    fn new(seed: u64, id: u64) -> Self {
        RowRng(mix64(seed ^ mix64(id ^ GOLDEN_GAMMA)))
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        (mix64(self.0) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// When an id without a row gets one. Until then a lookup returns the id's initial row and
/// an update of it is dropped (and counted).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admission {
    /// On its first update.
    Always,
    /// On its `n`-th update (the updates before it are dropped).
    MinCount(u32),
    /// Each update of an id without a row creates it with probability `p`: decided by a
    /// hash of the seed, the id and how often the id was seen, so the same stream admits the
    /// same ids on every run.
    Probability { p: f32, seed: u64 },
}

/// What makes room when a shard's table holds `capacity` rows and a new one is due.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Eviction {
    /// Nothing: new rows past the capacity are not created (their updates are dropped and
    /// counted).
    None,
    /// The rows updated longest ago go first.
    Lru,
    /// The rows updated least often go first (ties: the least recently updated).
    Lfu,
    /// Rows not updated for `steps` steps go: at every `steps`-th step, and when the table is
    /// full (if none is that old then, new rows are not created). The steps are those the
    /// pushes carry, each taken as at most [`STEP_WINDOW`](super::STEP_WINDOW) past the
    /// highest the table has applied.
    Ttl { steps: u64 },
}

impl Eviction {
    /// Lower-case name, as in flags and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Eviction::None => "none",
            Eviction::Lru => "lru",
            Eviction::Lfu => "lfu",
            Eviction::Ttl { .. } => "ttl",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_rows_depend_on_seed_and_id_only() {
        let init = RowInit::Normal { mean: 0.5, stddev: 0.1, seed: 7 };
        let (mut a, mut b, mut c) = (vec![0.0; 9], vec![0.0; 9], vec![0.0; 9]);
        init.fill(42, &mut a);
        init.fill(42, &mut b);
        init.fill(43, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / 9.0;
        assert!((mean - 0.5).abs() < 0.15, "{a:?}");
        let u = RowInit::Uniform { low: -0.25, high: 0.25, seed: 1 };
        let mut big = vec![0.0; 10_000];
        u.fill(9, &mut big);
        assert!(big.iter().all(|&x| (-0.25..0.25).contains(&x)));
        let m = big.iter().map(|&x| x as f64).sum::<f64>() / 1e4;
        assert!(m.abs() < 0.01, "{m}");
        // Stable across versions: the first values of a fixed row are part of the format.
        let mut first = [0.0f32; 2];
        RowInit::Uniform { low: 0.0, high: 1.0, seed: 0 }.fill(0, &mut first);
        assert_eq!(first, [first_expected().0, first_expected().1]);
    }

    /// The first two uniforms of seed 0, id 0, computed from the definition of [`RowRng`].
    fn first_expected() -> (f32, f32) {
        let s0 = mix64(mix64(GOLDEN_GAMMA));
        let u = |k: u64| ((mix64(s0.wrapping_add(k.wrapping_mul(GOLDEN_GAMMA))) >> 11) as f64 / (1u64 << 53) as f64) as f32;
        (u(1), u(2))
    }

    #[test]
    fn bad_definitions_say_what_is_wrong() {
        let ok = TableDef {
            name: "emb".into(),
            dim: 8,
            dtype: DType::F32,
            init: RowInit::Zeros,
            optimizer: RowOptimizer::Sgd { lr: 0.1 },
            admission: Admission::Always,
            eviction: Eviction::None,
            capacity: 0,
        };
        assert!(ok.validate().is_ok());
        let bad = |f: &dyn Fn(&mut TableDef)| {
            let mut d = ok.clone();
            f(&mut d);
            d.validate().unwrap_err()
        };
        assert!(bad(&|d| d.dim = 0).contains("dim"));
        assert!(bad(&|d| d.name = "a\nb".into()).contains("control"));
        assert!(bad(&|d| d.admission = Admission::MinCount(0)).contains("min_count"));
        assert!(bad(&|d| d.admission = Admission::Probability { p: 1.5, seed: 0 }).contains("probability"));
        assert!(bad(&|d| d.eviction = Eviction::Lru).contains("capacity"));
        assert!(bad(&|d| d.eviction = Eviction::Ttl { steps: 0 }).contains("ttl"));
        assert!(bad(&|d| d.init = RowInit::Uniform { low: 1.0, high: 1.0, seed: 0 }).contains("low < high"));
        assert!(bad(&|d| d.optimizer = RowOptimizer::Sgd { lr: f32::NAN }).contains("lr"));
    }
}
