//! The parameter-server client behind `ParasyncPsClient`: [`BlockingClient`] calls, with
//! C buffers borrowed in place (no copies of tensors).

mod spec;

use std::ffi::c_char;
use std::ptr::NonNull;

use parasync_client::{ps_addresses_from_env, BlockingClient, PushSummary};

use crate::args::{self, Region};
use crate::error::{guard, Error, ParasyncStatus, Result};

pub use spec::*;

/// A connection to every shard of a parameter-server job (opaque).
///
/// One client may be used from several threads at once (a pull waiting for a future step
/// does not hold up a push from another thread); `parasync_ps_register` waits for calls in
/// flight. Free it with `parasync_ps_free` once no call is using it.
pub struct ParasyncPsClient {
    client: BlockingClient,
}

/// What the shards did with a push.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParasyncPushSummary {
    /// Parts applied now, or accepted for their sync step (a large variable travels as
    /// several parts).
    pub accepted: usize,
    /// Parts dropped as late gradients for a sync step that had already completed.
    pub dropped_stale: usize,
    /// Parts sent more than once (a broken connection, a shard that restarted).
    pub retried: usize,
    /// Of the accepted parts, those an earlier attempt had applied (its reply was lost):
    /// applied once, not twice.
    pub duplicate: usize,
}

impl From<PushSummary> for ParasyncPushSummary {
    fn from(s: PushSummary) -> Self {
        ParasyncPushSummary { accepted: s.accepted, dropped_stale: s.dropped_stale, retried: s.retried, duplicate: s.duplicate }
    }
}

/// Never abandon a call: C callers have no way to ask yet.
fn never() -> bool {
    false
}

/// Fills `*out` with the default options (worker 0, f32 on the wire, 30 s to connect, the
/// server's pull timeout, the data plane on).
///
/// # Safety
/// `out` is NULL (an error) or valid for writing a `ParasyncPsOptions`.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_options_default(out: *mut ParasyncPsOptions) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_options_default_impl(out) })
}

unsafe fn ps_options_default_impl(out: *mut ParasyncPsOptions) -> Result<()> {
    let out = args::out(out, "out")?;
    let defaults = ParasyncPsOptions::from_client(&parasync_client::ClientOptions::default());
    // SAFETY: checked non-null; valid by the caller's contract.
    unsafe { args::write(out, defaults) };
    Ok(())
}

/// Fills `*out` with a default variable: no name or shape yet (set `name`, `shape`, `ndim`),
/// f32 storage, SGD with learning rate 0.01, zeros. The fields of the other optimizer and
/// initializer kinds hold usable values too (Adam: beta1 0.9, beta2 0.999, epsilon 1e-8;
/// uniform in [0, 1); normal with mean 0, stddev 1), so choosing a kind and a learning rate is
/// enough.
///
/// # Safety
/// `out` is NULL (an error) or valid for writing a `ParasyncVariableSpec`.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_variable_spec_default(out: *mut ParasyncVariableSpec) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { variable_spec_default_impl(out) })
}

unsafe fn variable_spec_default_impl(out: *mut ParasyncVariableSpec) -> Result<()> {
    let out = args::out(out, "out")?;
    // SAFETY: checked non-null; valid by the caller's contract.
    unsafe { args::write(out, ParasyncVariableSpec::default_spec()) };
    Ok(())
}

/// Connects to every shard, retrying until `connect_timeout_ms`, and stores the new client
/// in `*out` (`*out` is set to NULL first, so it stays NULL on failure).
///
/// `addrs` holds `n_addrs` shard addresses (`"host:port"`, shard order). With `n_addrs` = 0
/// the addresses come from `TF_CONFIG` (`cluster.ps`). `opts` may be NULL for the defaults.
/// Fails with `PARASYNC_STATUS_UNAVAILABLE` when a shard cannot be reached in time.
///
/// # Safety
/// `addrs` holds `n_addrs` NUL-terminated strings (or is NULL when `n_addrs` is 0); `opts` is
/// NULL or points to a `ParasyncPsOptions`; `out` is valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_connect(
    addrs: *const *const c_char,
    n_addrs: usize,
    opts: *const ParasyncPsOptions,
    out: *mut *mut ParasyncPsClient,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_connect_impl(addrs, n_addrs, opts, out) })
}

unsafe fn ps_connect_impl(
    addrs: *const *const c_char,
    n_addrs: usize,
    opts: *const ParasyncPsOptions,
    out: *mut *mut ParasyncPsClient,
) -> Result<()> {
    let out = args::out(out, "out")?;
    // SAFETY (this block): the caller's contract.
    unsafe {
        args::write(out, std::ptr::null_mut());
        let opts = match opts.is_null() {
            true => parasync_client::ClientOptions::default(),
            false => args::handle(opts, "opts")?.to_client()?,
        };
        let addrs = match n_addrs {
            0 => ps_addresses_from_env()?.ok_or_else(|| {
                Error::usage("n_addrs is 0 and TF_CONFIG lists no parameter servers (cluster.ps): give the shard addresses")
            })?,
            n => args::slice(addrs, n, "addrs")?
                .iter()
                .enumerate()
                .map(|(i, &a)| args::string(a, &format!("addrs[{i}]")).map(str::to_string))
                .collect::<Result<Vec<_>>>()?,
        };
        let client = BlockingClient::connect(&addrs, opts)?;
        args::write(out, Box::into_raw(Box::new(ParasyncPsClient { client })));
    }
    Ok(())
}

/// Closes the client's connections and frees it. NULL is ignored.
///
/// # Safety
/// `client` is NULL or came from `parasync_ps_connect`, was not freed yet, and no call is
/// using it.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_free(client: *mut ParasyncPsClient) {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_free_impl(client) });
}

unsafe fn ps_free_impl(client: *mut ParasyncPsClient) -> Result<()> {
    if !client.is_null() {
        // SAFETY: the caller's contract: ours, from `Box::into_raw`, freed once.
        drop(unsafe { Box::from_raw(client) });
    }
    Ok(())
}

/// Registers the model's `n` variables on their shards (idempotent: every worker may call it
/// with the same specs; a conflicting registration fails with
/// `PARASYNC_STATUS_ALREADY_EXISTS`). Fixes the variable order of later pulls and pushes.
///
/// # Safety
/// `specs` points to `n` specs whose pointers are valid as documented on
/// `ParasyncVariableSpec` (or is NULL when `n` is 0); `client` is a live client.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_register(
    client: *const ParasyncPsClient,
    specs: *const ParasyncVariableSpec,
    n: usize,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_register_impl(client, specs, n) })
}

unsafe fn ps_register_impl(client: *const ParasyncPsClient, specs: *const ParasyncVariableSpec, n: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let client = args::handle(client, "client")?;
        let specs = args::slice(specs, n, "specs")?
            .iter()
            .enumerate()
            .map(|(i, s)| s.to_client(&format!("specs[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        Ok(client.client.register(specs, &mut never)?)
    }
}

/// The `n` pointers and lengths of one call's tensors, checked: `what[i]` (such as `outs[1]`)
/// names each in errors.
///
/// # Safety
/// `ptrs` and `lens` each hold `n` entries (or are NULL when `n` is 0).
unsafe fn tensors<'a, P: Copy>(ptrs: *const P, lens: *const usize, n: usize, what: &str) -> Result<(&'a [P], &'a [usize])> {
    // SAFETY: the caller's contract.
    unsafe { Ok((args::slice(ptrs, n, what)?, args::slice(lens, n, "lens")?)) }
}

/// Borrows C buffers as `&mut [f32]` once [`args::disjoint`] has checked them.
///
/// # Safety
/// Each `outs[i]` holds `lens[i]` floats that nothing else uses during the call.
unsafe fn borrow_outs<'a>(outs: &[*mut f32], lens: &[usize]) -> Result<Vec<&'a mut [f32]>> {
    let borrow = |(i, (&p, &len)): (usize, (&*mut f32, &usize))| {
        // SAFETY: the caller's contract; overlaps were refused before.
        unsafe { args::slice_mut(p, len, &format!("outs[{i}]")) }
    };
    outs.iter().zip(lens).enumerate().map(borrow).collect()
}

/// Pulls the values of `step` into caller buffers: `outs[i]` receives variable `i` (in
/// registration order), whose element count `lens[i]` must be. Sync mode waits until the
/// step exists (up to the pull timeout: `PARASYNC_STATUS_TIMEOUT`); bounded mode waits for
/// the slowest worker.
///
/// # Safety
/// `outs` and `lens` hold `n` entries (or are NULL when `n` is 0), and each `outs[i]` is
/// valid for writing `lens[i]` floats; `client` is a live client.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_pull(
    client: *const ParasyncPsClient,
    step: u64,
    outs: *const *mut f32,
    lens: *const usize,
    n: usize,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_pull_impl(client, step, outs, lens, n) })
}

unsafe fn ps_pull_impl(client: *const ParasyncPsClient, step: u64, outs: *const *mut f32, lens: *const usize, n: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let client = args::handle(client, "client")?;
        let (outs, lens) = tensors(outs, lens, n, "outs")?;
        args::disjoint(outs.iter().zip(lens).enumerate().map(|(i, (&p, &l))| Region::of(p, l, true, format!("outs[{i}]"))).collect())?;
        let mut bufs = borrow_outs(outs, lens)?;
        Ok(client.client.pull_into(step, &mut bufs, &mut never)?)
    }
}

/// Pushes one gradient per variable for `step`: `grads[i]` holds `lens[i]` floats, variable
/// `i`'s element count. `summary` may be NULL; otherwise it receives what the shards did.
///
/// # Safety
/// `grads` and `lens` hold `n` entries (or are NULL when `n` is 0), and each `grads[i]` is
/// valid for reading `lens[i]` floats; `summary` is NULL or writable; `client` is a live
/// client.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_push(
    client: *const ParasyncPsClient,
    step: u64,
    grads: *const *const f32,
    lens: *const usize,
    n: usize,
    summary: *mut ParasyncPushSummary,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_push_impl(client, step, grads, lens, n, summary) })
}

unsafe fn ps_push_impl(
    client: *const ParasyncPsClient,
    step: u64,
    grads: *const *const f32,
    lens: *const usize,
    n: usize,
    summary: *mut ParasyncPushSummary,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let client = args::handle(client, "client")?;
        let summary = args::optional_out(summary, "summary")?;
        let (grads, lens) = tensors(grads, lens, n, "grads")?;
        let grads = borrow_grads(grads, lens)?;
        let done = client.client.push(step, &grads, &mut never)?;
        write_summary(summary, done);
    }
    Ok(())
}

/// Writes `done` through `summary` unless the caller passed NULL.
///
/// # Safety
/// `summary` is valid for writing a `ParasyncPushSummary`.
unsafe fn write_summary(summary: Option<NonNull<ParasyncPushSummary>>, done: PushSummary) {
    if let Some(summary) = summary {
        // SAFETY: the caller's contract.
        unsafe { args::write(summary, done.into()) };
    }
}

/// Borrows C gradient buffers.
///
/// # Safety
/// Each `grads[i]` holds `lens[i]` floats that nothing writes during the call.
unsafe fn borrow_grads<'a>(grads: &[*const f32], lens: &[usize]) -> Result<Vec<&'a [f32]>> {
    let borrow = |(i, (&p, &len)): (usize, (&*const f32, &usize))| {
        // SAFETY: the caller's contract.
        unsafe { args::slice(p, len, &format!("grads[{i}]")) }
    };
    grads.iter().zip(lens).enumerate().map(borrow).collect()
}

/// Pushes the gradients of `step` and receives, in the same round trip, the values of
/// `step + 1` into `outs` (sync: once the step completes on every shard). Same as
/// `parasync_ps_push` then `parasync_ps_pull(step + 1)`, in one call per part. `grads[i]` and
/// `outs[i]` both hold `lens[i]` floats and may not overlap. When a push was accepted but
/// the pull then failed, the message says "the push was accepted": do not push that
/// gradient again.
///
/// # Safety
/// As for `parasync_ps_push` and `parasync_ps_pull`.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_push_pull(
    client: *const ParasyncPsClient,
    step: u64,
    grads: *const *const f32,
    outs: *const *mut f32,
    lens: *const usize,
    n: usize,
    summary: *mut ParasyncPushSummary,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_push_pull_impl(client, step, grads, outs, lens, n, summary) })
}

unsafe fn ps_push_pull_impl(
    client: *const ParasyncPsClient,
    step: u64,
    grads: *const *const f32,
    outs: *const *mut f32,
    lens: *const usize,
    n: usize,
    summary: *mut ParasyncPushSummary,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let client = args::handle(client, "client")?;
        let summary = args::optional_out(summary, "summary")?;
        let (grads, lens) = tensors(grads, lens, n, "grads")?;
        let outs = args::slice(outs, n, "outs")?;
        let written = outs.iter().zip(lens).enumerate().map(|(i, (&p, &l))| Region::of(p, l, true, format!("outs[{i}]")));
        let read = grads.iter().zip(lens).enumerate().map(|(i, (&p, &l))| Region::of(p, l, false, format!("grads[{i}]")));
        args::disjoint(written.chain(read).collect())?;
        let grads = borrow_grads(grads, lens)?;
        let mut bufs = borrow_outs(outs, lens)?;
        let done = client.client.push_pull(step, &grads, &mut bufs, &mut never)?;
        write_summary(summary, done);
    }
    Ok(())
}

/// Sets the learning rate of every variable on every shard (for schedules).
///
/// # Safety
/// `client` is a live client.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_set_learning_rate(client: *const ParasyncPsClient, lr: f32) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_set_learning_rate_impl(client, lr) })
}

unsafe fn ps_set_learning_rate_impl(client: *const ParasyncPsClient, lr: f32) -> Result<()> {
    // SAFETY: the caller's contract.
    let client = unsafe { args::handle(client, "client")? };
    Ok(client.client.set_learning_rate(lr, &mut never)?)
}

/// Has every shard write a checkpoint of `step` and returns once all are on disk (the
/// shards run with `--checkpoint-dir`). Sync mode: call it from one worker with the step it
/// is about to push; every variable is saved as that step left it. Async / bounded: each
/// shard saves its variables as they are, under the name `step-<step>`.
///
/// # Safety
/// `client` is a live client.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_checkpoint(client: *const ParasyncPsClient, step: u64) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_checkpoint_impl(client, step) })
}

unsafe fn ps_checkpoint_impl(client: *const ParasyncPsClient, step: u64) -> Result<()> {
    // SAFETY: the caller's contract.
    let client = unsafe { args::handle(client, "client")? };
    client.client.checkpoint(step, &mut never)?;
    Ok(())
}

/// Stores in `*out` the number of registered variables (0 before `parasync_ps_register`):
/// the `n` that pulls and pushes take.
///
/// # Safety
/// `client` is a live client; `out` is valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_num_variables(client: *const ParasyncPsClient, out: *mut usize) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_num_variables_impl(client, out) })
}

unsafe fn ps_num_variables_impl(client: *const ParasyncPsClient, out: *mut usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let (client, out) = (args::handle(client, "client")?, args::out(out, "out")?);
        args::write(out, client.client.num_variables());
    }
    Ok(())
}

/// Stores in `*out` the number of shards the client is connected to.
///
/// # Safety
/// `client` is a live client; `out` is valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn parasync_ps_num_shards(client: *const ParasyncPsClient, out: *mut usize) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { ps_num_shards_impl(client, out) })
}

unsafe fn ps_num_shards_impl(client: *const ParasyncPsClient, out: *mut usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let (client, out) = (args::handle(client, "client")?, args::out(out, "out")?);
        args::write(out, client.client.num_shards());
    }
    Ok(())
}
