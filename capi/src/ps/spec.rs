//! The structs C fills to connect and to declare variables, and their conversion to the
//! client's [`ClientOptions`] and [`VariableSpec`].

use std::ffi::c_char;
use std::time::Duration;

use parasync_client::{AuthToken, ClientOptions, ClientTls, Init, Optimizer, VariableSpec};

use crate::args;
use crate::dtype::ParasyncDtype;
use crate::error::{Error, Result};

/// How a client connects and moves tensors. Fill it with `parasync_ps_options_default`,
/// then change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ParasyncPsOptions {
    /// This worker's id, `0..num_workers` (the order sync mode sums gradients in).
    pub worker_id: u32,
    /// Element type on the wire for pushed gradients, and for pulled values unless
    /// `pull_wire_dtype` is set: `PARASYNC_DTYPE_F32` or `PARASYNC_DTYPE_BF16`
    /// (independent of how variables are stored).
    pub wire_dtype: ParasyncDtype,
    /// Element type on the wire for pulled values; 0 (the default): the same as `wire_dtype`.
    pub pull_wire_dtype: ParasyncDtype,
    /// How long to keep retrying, in milliseconds, while the shards start.
    pub connect_timeout_ms: u64,
    /// How long a shard may hold a pull waiting for its step, in milliseconds; 0 (the
    /// default): the server's own limit.
    pub pull_timeout_ms: u64,
    /// Move tensor bytes over each shard's plain-TCP data plane when it offers one (the
    /// default); gRPC otherwise. Same results either way.
    pub data_plane: bool,
    /// The secret the shards require (their `--auth-token-file`), NUL-terminated; NULL (the
    /// default): `PARASYNC_AUTH_TOKEN`, or the file `PARASYNC_AUTH_TOKEN_FILE` names, if set.
    pub auth_token: *const c_char,
    /// Path of the PEM file of the authority the shards' certificates chain to: talk TLS to
    /// shards started with `--tls-cert`. NULL (the default): `PARASYNC_TLS_CA` if set, else
    /// plain TCP.
    pub tls_ca: *const c_char,
    /// Paths of this client's PEM certificate and key, for shards that require one
    /// (`--tls-client-ca`); NULL: none.
    pub tls_cert: *const c_char,
    pub tls_key: *const c_char,
    /// The name the shards' certificates carry, when it is not the host dialled; NULL: the
    /// host.
    pub tls_domain: *const c_char,
}

impl ParasyncPsOptions {
    /// The C view of the client's options.
    pub(crate) fn from_client(o: &ClientOptions) -> ParasyncPsOptions {
        ParasyncPsOptions {
            worker_id: o.worker_id,
            wire_dtype: ParasyncDtype::from_ps(o.wire_dtype),
            pull_wire_dtype: o.pull_wire_dtype.map_or(ParasyncDtype(0), ParasyncDtype::from_ps),
            connect_timeout_ms: millis(o.connect_timeout),
            pull_timeout_ms: o.pull_timeout.map_or(0, millis),
            data_plane: o.data_plane,
            auth_token: std::ptr::null(),
            tls_ca: std::ptr::null(),
            tls_cert: std::ptr::null(),
            tls_key: std::ptr::null(),
            tls_domain: std::ptr::null(),
        }
    }

    /// The client's options: the client's defaults, with every field of this struct applied.
    ///
    /// # Safety
    /// `auth_token` and the `tls_*` fields are NULL or NUL-terminated strings.
    pub(crate) unsafe fn to_client(self) -> Result<ClientOptions> {
        // SAFETY: the caller's contract.
        let path = |p: *const c_char, what: &str| -> Result<Option<std::path::PathBuf>> {
            match p.is_null() {
                true => Ok(None),
                false => Ok(Some(unsafe { args::string(p, what)? }.into())),
            }
        };
        let (ca, cert, key) = (path(self.tls_ca, "options.tls_ca")?, path(self.tls_cert, "options.tls_cert")?, path(self.tls_key, "options.tls_key")?);
        let domain = path(self.tls_domain, "options.tls_domain")?.map(|d| d.to_string_lossy().into_owned());
        let tls = match ca {
            Some(ca) => Some(
                ClientTls::from_files(&ca, cert.as_deref(), key.as_deref(), domain).map_err(|e| Error::usage(format!("options.tls_ca: {e}")))?,
            ),
            None if cert.is_some() || key.is_some() || domain.is_some() => {
                return Err(Error::usage("options.tls_cert, tls_key and tls_domain need options.tls_ca"))
            }
            None => None,
        };
        let auth_token = match self.auth_token.is_null() {
            true => None,
            // SAFETY: the caller's contract.
            false => Some(
                AuthToken::new(unsafe { args::string(self.auth_token, "options.auth_token")? })
                    .map_err(|e| Error::usage(format!("options.auth_token: {e}")))?,
            ),
        };
        Ok(ClientOptions {
            auth_token,
            tls,
            worker_id: self.worker_id,
            wire_dtype: self.wire_dtype.to_ps("options.wire_dtype")?,
            pull_wire_dtype: match self.pull_wire_dtype {
                ParasyncDtype(0) => None,
                d => Some(d.to_ps("options.pull_wire_dtype")?),
            },
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            pull_timeout: (self.pull_timeout_ms > 0).then(|| Duration::from_millis(self.pull_timeout_ms)),
            data_plane: self.data_plane,
            ..ClientOptions::default()
        })
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Which optimizer the server applies to a variable: one of the `PARASYNC_OPTIMIZER_*`
/// constants.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParasyncOptimizerKind(pub u32);

/// SGD, with momentum (Nesterov optionally) when `momentum` is non-zero.
pub const PARASYNC_OPTIMIZER_SGD: ParasyncOptimizerKind = ParasyncOptimizerKind(1);
/// Adagrad.
pub const PARASYNC_OPTIMIZER_ADAGRAD: ParasyncOptimizerKind = ParasyncOptimizerKind(2);
/// Adam (a non-zero `weight_decay` is added to the gradient, L2 style).
pub const PARASYNC_OPTIMIZER_ADAM: ParasyncOptimizerKind = ParasyncOptimizerKind(3);
/// AdamW (decoupled weight decay).
pub const PARASYNC_OPTIMIZER_ADAMW: ParasyncOptimizerKind = ParasyncOptimizerKind(4);

/// A variable's optimizer and its hyper-parameters; each kind reads only its own fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ParasyncOptimizer {
    /// Which optimizer (`PARASYNC_OPTIMIZER_*`).
    pub kind: ParasyncOptimizerKind,
    /// Learning rate (every kind).
    pub lr: f32,
    /// SGD: momentum factor; 0 is plain SGD.
    pub momentum: f32,
    /// SGD: Nesterov momentum.
    pub nesterov: bool,
    /// Adagrad: starting value of the squared-gradient accumulator.
    pub initial_accumulator: f32,
    /// Adam, AdamW: decay of the first moment.
    pub beta1: f32,
    /// Adam, AdamW: decay of the second moment.
    pub beta2: f32,
    /// Adagrad, Adam, AdamW: added to the denominator.
    pub epsilon: f32,
    /// Adam (L2, added to the gradient), AdamW (decoupled).
    pub weight_decay: f32,
}

impl ParasyncOptimizer {
    /// The fields `optimizer` sets, over `self` (which keeps the others).
    fn with(mut self, optimizer: &Optimizer) -> ParasyncOptimizer {
        match *optimizer {
            Optimizer::Sgd { lr, momentum, nesterov } => {
                (self.kind, self.lr, self.momentum, self.nesterov) = (PARASYNC_OPTIMIZER_SGD, lr, momentum, nesterov);
            }
            Optimizer::Adagrad { lr, initial_accumulator, epsilon } => {
                (self.kind, self.lr, self.initial_accumulator, self.epsilon) = (PARASYNC_OPTIMIZER_ADAGRAD, lr, initial_accumulator, epsilon);
            }
            Optimizer::Adam { lr, beta1, beta2, epsilon, weight_decay } => {
                (self.kind, self.lr, self.beta1, self.beta2, self.epsilon, self.weight_decay) =
                    (PARASYNC_OPTIMIZER_ADAM, lr, beta1, beta2, epsilon, weight_decay);
            }
            Optimizer::AdamW { lr, beta1, beta2, epsilon, weight_decay } => {
                (self.kind, self.lr, self.beta1, self.beta2, self.epsilon, self.weight_decay) =
                    (PARASYNC_OPTIMIZER_ADAMW, lr, beta1, beta2, epsilon, weight_decay);
            }
        }
        self
    }

    fn to_client(self, what: &str) -> Result<Optimizer> {
        let ParasyncOptimizer { kind, lr, momentum, nesterov, initial_accumulator, beta1, beta2, epsilon, weight_decay } = self;
        match kind {
            PARASYNC_OPTIMIZER_SGD => Ok(Optimizer::Sgd { lr, momentum, nesterov }),
            PARASYNC_OPTIMIZER_ADAGRAD => Ok(Optimizer::Adagrad { lr, initial_accumulator, epsilon }),
            PARASYNC_OPTIMIZER_ADAM => Ok(Optimizer::Adam { lr, beta1, beta2, epsilon, weight_decay }),
            PARASYNC_OPTIMIZER_ADAMW => Ok(Optimizer::AdamW { lr, beta1, beta2, epsilon, weight_decay }),
            ParasyncOptimizerKind(other) => Err(Error::usage(format!(
                "{what}.optimizer.kind is {other}, not a PARASYNC_OPTIMIZER_* value (SGD = 1, ADAGRAD = 2, ADAM = 3, ADAMW = 4)"
            ))),
        }
    }
}

/// How a variable's first registration fills it: one of the `PARASYNC_INIT_*` constants.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParasyncInitKind(pub u32);

/// Zeros.
pub const PARASYNC_INIT_ZEROS: ParasyncInitKind = ParasyncInitKind(1);
/// `constant` everywhere.
pub const PARASYNC_INIT_CONSTANT: ParasyncInitKind = ParasyncInitKind(2);
/// Uniform in `[low, high)`, drawn on the server from `seed`.
pub const PARASYNC_INIT_UNIFORM: ParasyncInitKind = ParasyncInitKind(3);
/// Normal with `mean` and `stddev`, drawn on the server from `seed`.
pub const PARASYNC_INIT_NORMAL: ParasyncInitKind = ParasyncInitKind(4);
/// The `n_values` floats at `values` (row-major, one per element).
pub const PARASYNC_INIT_VALUES: ParasyncInitKind = ParasyncInitKind(5);
/// The values another worker registers with `PARASYNC_INIT_VALUES` (the chief's): this
/// worker brings none; its pulls wait for them.
pub const PARASYNC_INIT_ADOPT: ParasyncInitKind = ParasyncInitKind(6);

/// A variable's initial values; each kind reads only its own fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ParasyncInit {
    /// Which initializer (`PARASYNC_INIT_*`).
    pub kind: ParasyncInitKind,
    /// `CONSTANT`: the value.
    pub constant: f32,
    /// `UNIFORM`: lower bound (inclusive).
    pub low: f32,
    /// `UNIFORM`: upper bound (exclusive).
    pub high: f32,
    /// `NORMAL`: mean.
    pub mean: f32,
    /// `NORMAL`: standard deviation.
    pub stddev: f32,
    /// `UNIFORM`, `NORMAL`: random seed (every worker registering the same seed gets the
    /// same values).
    pub seed: u64,
    /// `VALUES`: the initial values, read during the call only.
    pub values: *const f32,
    /// `VALUES`: how many floats `values` holds (the variable's element count).
    pub n_values: usize,
}

/// One variable as a trainer declares it. Fill it with `parasync_ps_variable_spec_default`,
/// then set at least `name`, `shape` and `ndim`. The pointers are read during
/// `parasync_ps_register` only.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ParasyncVariableSpec {
    /// Unique name, NUL-terminated UTF-8.
    pub name: *const c_char,
    /// Dimensions, row-major (`ndim` of them).
    pub shape: *const usize,
    /// Number of dimensions.
    pub ndim: usize,
    /// How the server stores it: `PARASYNC_DTYPE_F32` or `PARASYNC_DTYPE_BF16` (updates are
    /// computed in f32 either way).
    pub dtype: ParasyncDtype,
    /// bf16 storage rounds stochastically instead of to nearest.
    pub stochastic_rounding: bool,
    /// The optimizer the server applies to pushed gradients.
    pub optimizer: ParasyncOptimizer,
    /// Initial values.
    pub init: ParasyncInit,
}

impl ParasyncVariableSpec {
    /// The defaults of `parasync_ps_variable_spec_default`: the client's defaults for a new
    /// variable (f32, plain SGD, zeros), no name or shape, and for the fields of the other
    /// kinds Adam's usual hyper-parameters (`epsilon`, which Adagrad shares, too), an Adagrad
    /// accumulator starting at 0 (as PyTorch's), and unit distributions.
    pub(crate) fn default_spec() -> ParasyncVariableSpec {
        let base = VariableSpec::new("", &[]);
        let neutral = ParasyncOptimizer {
            kind: PARASYNC_OPTIMIZER_SGD,
            lr: 0.0,
            momentum: 0.0,
            nesterov: false,
            initial_accumulator: 0.0,
            beta1: 0.0,
            beta2: 0.0,
            epsilon: 0.0,
            weight_decay: 0.0,
        };
        let optimizer = neutral.with(&Optimizer::adam(0.0)).with(&base.optimizer);
        ParasyncVariableSpec {
            name: std::ptr::null(),
            shape: std::ptr::null(),
            ndim: 0,
            dtype: ParasyncDtype::from_ps(base.dtype),
            stochastic_rounding: base.stochastic_rounding,
            optimizer,
            init: ParasyncInit {
                kind: PARASYNC_INIT_ZEROS,
                constant: 0.0,
                low: 0.0,
                high: 1.0,
                mean: 0.0,
                stddev: 1.0,
                seed: 0,
                values: std::ptr::null(),
                n_values: 0,
            },
        }
    }

    /// The client's spec; `what` (such as `specs[2]`) names it in errors.
    ///
    /// # Safety
    /// The pointers in `self` are null or valid as documented on the struct.
    pub(crate) unsafe fn to_client(self, what: &str) -> Result<VariableSpec> {
        // SAFETY: the caller's contract, for each pointer.
        let (name, shape) = unsafe {
            (args::string(self.name, &format!("{what}.name"))?, args::slice(self.shape, self.ndim, &format!("{what}.shape"))?)
        };
        let i = &self.init;
        let init = match i.kind {
            PARASYNC_INIT_ZEROS => Init::Zeros,
            PARASYNC_INIT_CONSTANT => Init::Constant(i.constant),
            PARASYNC_INIT_UNIFORM => Init::Uniform { low: i.low, high: i.high, seed: i.seed },
            PARASYNC_INIT_NORMAL => Init::Normal { mean: i.mean, stddev: i.stddev, seed: i.seed },
            // SAFETY: the caller's contract.
            PARASYNC_INIT_VALUES => Init::Values(unsafe { args::slice(i.values, i.n_values, &format!("{what}.init.values"))? }.to_vec()),
            PARASYNC_INIT_ADOPT => Init::Adopt,
            ParasyncInitKind(other) => {
                return Err(Error::usage(format!(
                    "{what}.init.kind is {other}, not a PARASYNC_INIT_* value (ZEROS = 1, CONSTANT = 2, UNIFORM = 3, NORMAL = 4, VALUES = 5, ADOPT = 6)"
                )))
            }
        };
        Ok(VariableSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype: self.dtype.to_ps(&format!("{what}.dtype"))?,
            optimizer: self.optimizer.to_client(what)?,
            init,
            stochastic_rounding: self.stochastic_rounding,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{PARASYNC_DTYPE_BF16, PARASYNC_DTYPE_F32};
    use parasync_client::DType;

    #[test]
    fn options_round_trip_through_c() {
        let c = ParasyncPsOptions::from_client(&ClientOptions::default());
        assert_eq!((c.wire_dtype, c.pull_wire_dtype, c.pull_timeout_ms, c.data_plane), (PARASYNC_DTYPE_F32, ParasyncDtype(0), 0, true));
        assert_eq!(c.connect_timeout_ms, 30_000);
        assert!(c.auth_token.is_null());
        let opts = ParasyncPsOptions { worker_id: 3, pull_wire_dtype: PARASYNC_DTYPE_BF16, pull_timeout_ms: 250, auth_token: c"s3cret".as_ptr(), ..c };
        // SAFETY: the token is a C string literal.
        let back = unsafe { opts.to_client() }.unwrap();
        assert_eq!(back.worker_id, 3);
        assert_eq!(back.pull_wire_dtype, Some(DType::Bf16));
        assert_eq!(back.pull_timeout, Some(Duration::from_millis(250)));
        assert_eq!(back.auth_token.as_ref().map(|t| t.expose()), Some("s3cret"));
        // SAFETY: no pointers.
        let bad = unsafe { ParasyncPsOptions { wire_dtype: ParasyncDtype(9), ..c }.to_client() }.unwrap_err();
        assert!(format!("{bad:?}").contains("options.wire_dtype is 9"), "{bad:?}");
        // SAFETY: a C string literal.
        let spaced = unsafe { ParasyncPsOptions { auth_token: c"two words".as_ptr(), ..c }.to_client() }.unwrap_err();
        assert!(format!("{spaced:?}").contains("options.auth_token"), "{spaced:?}");
        // SAFETY: C string literals.
        let missing = unsafe { ParasyncPsOptions { tls_ca: c"/nonexistent/ca.pem".as_ptr(), ..c }.to_client() }.unwrap_err();
        assert!(format!("{missing:?}").contains("options.tls_ca: reading the CA file /nonexistent/ca.pem"), "{missing:?}");
        // SAFETY: C string literals.
        let alone = unsafe { ParasyncPsOptions { tls_cert: c"client.pem".as_ptr(), ..c }.to_client() }.unwrap_err();
        assert!(format!("{alone:?}").contains("need options.tls_ca"), "{alone:?}");
    }

    #[test]
    fn a_default_spec_with_a_name_and_shape_is_the_clients_default_variable() {
        let shape = [2usize, 3];
        let spec = ParasyncVariableSpec { name: c"w".as_ptr(), shape: shape.as_ptr(), ndim: 2, ..ParasyncVariableSpec::default_spec() };
        // SAFETY: the pointers are live for the call.
        let rust = unsafe { spec.to_client("specs[0]") }.unwrap();
        assert_eq!(rust, VariableSpec::new("w", &[2, 3]));
        let adam = ParasyncOptimizer { kind: PARASYNC_OPTIMIZER_ADAM, lr: 0.5, ..spec.optimizer };
        assert_eq!(adam.to_client("s").unwrap(), Optimizer::adam(0.5));
    }

    #[test]
    fn explicit_values_are_copied_and_bad_kinds_are_named() {
        let (shape, values) = ([3usize], [1.0f32, 2.0, 3.0]);
        let mut spec = ParasyncVariableSpec { name: c"b".as_ptr(), shape: shape.as_ptr(), ndim: 1, ..ParasyncVariableSpec::default_spec() };
        spec.init = ParasyncInit { kind: PARASYNC_INIT_VALUES, values: values.as_ptr(), n_values: 3, ..spec.init };
        // SAFETY: the pointers are live for the calls.
        unsafe {
            assert_eq!(spec.to_client("specs[1]").unwrap().init, Init::Values(values.to_vec()));
            spec.init.values = std::ptr::null();
            let e = format!("{:?}", spec.to_client("specs[1]").unwrap_err());
            assert!(e.contains("specs[1].init.values is NULL but 3 elements"), "{e}");
            spec.init.kind = ParasyncInitKind(0);
            assert!(format!("{:?}", spec.to_client("specs[1]").unwrap_err()).contains("specs[1].init.kind is 0"));
            spec.init.kind = PARASYNC_INIT_ZEROS;
            spec.optimizer.kind = ParasyncOptimizerKind(7);
            assert!(format!("{:?}", spec.to_client("specs[1]").unwrap_err()).contains("specs[1].optimizer.kind is 7"));
            spec.optimizer.kind = PARASYNC_OPTIMIZER_SGD;
            spec.name = std::ptr::null();
            assert!(format!("{:?}", spec.to_client("specs[1]").unwrap_err()).contains("specs[1].name is NULL"));
        }
    }
}
