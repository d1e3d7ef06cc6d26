//! One variable: its values and state behind a lock that runtime threads wait for without
//! blocking, and the snapshots of its values that pulls read.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use parasync_tensor::{bf16, DType};
use tokio::sync::watch;

use super::def::VariableDef;
use super::gradient::Gradient;
use super::spare::Spares;
use crate::consistency::VariableClock;
use crate::optimizer::OptimizerState;

/// Stored values in the variable's storage dtype.
#[derive(Clone, Debug)]
pub enum Values {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Values {
    /// Overwrites these values with `other`'s when both have the same dtype and length.
    pub(super) fn copy_from(&mut self, other: &Values) -> bool {
        match (self, other) {
            (Values::F32(a), Values::F32(b)) if a.len() == b.len() => a.copy_from_slice(b),
            (Values::Bf16(a), Values::Bf16(b)) if a.len() == b.len() => a.copy_from_slice(b),
            _ => return false,
        }
        true
    }

    pub(super) fn from_f32(dtype: DType, v: Vec<f32>) -> Values {
        match dtype {
            DType::F32 => Values::F32(v),
            DType::Bf16 => Values::Bf16(v.iter().map(|&x| bf16::from_f32_rne(x)).collect()),
        }
    }
}


/// Mutable part of a variable, guarded by its lock.
pub(super) struct VariableState {
    /// Shared with the pulls in flight (each holds the version it started with), and
    /// copied by an update only while one is: so a pull never mixes two versions, and
    /// never holds an update back for the length of its transfer.
    pub(super) values: Arc<Values>,
    pub(super) optimizer: OptimizerState,
    pub(super) clock: VariableClock<Gradient>,
    /// When the first gradient of the current sync step arrived (step-latency metric).
    pub(super) step_started: Option<Instant>,
    /// Registered with values to follow, and they have not been assigned yet.
    pub(super) awaiting_values: bool,
    /// Per worker, the last push its client had applied here and its result (a retry of
    /// it is answered with the result instead of being applied again).
    pub(super) last_push: std::collections::HashMap<u32, (super::PushId, super::PushResult)>,
}

/// One variable on this shard.
pub struct Variable {
    pub(super) def: VariableDef,
    pub(super) len: usize,
    /// Seed of stochastic rounding, derived from the name so each variable differs.
    pub(super) rounding_seed: u64,
    pub(super) state: RwLock<VariableState>,
    /// Notified whenever the write lock is released, for readers waiting on a runtime
    /// thread (see [`Variable::read_async`]).
    pub(super) unlocked: tokio::sync::Notify,
    /// Bumped on every accepted push, so waiting pulls re-check their gate.
    pub(super) changed: watch::Sender<u64>,
    /// Gradient buffers kept from applied pushes: large buffers are otherwise fresh
    /// mappings whose page faults cost as much as the copy into them.
    pub(super) spare: parking_lot::Mutex<Spares>,
    /// A values buffer a finished pull handed back: an update that must copy the values
    /// (a pull still reads them) copies into it instead of a fresh allocation, whose page
    /// faults would cost more than the copy.
    pub(super) spare_values: SpareValues,
}

pub(super) type SpareValues = Arc<parking_lot::Mutex<Option<Values>>>;

/// The write lock of a variable's state; dropping it wakes the readers that wait for it
/// on runtime threads.
pub(super) struct WriteGuard<'a> {
    guard: Option<parking_lot::RwLockWriteGuard<'a, VariableState>>,
    unlocked: &'a tokio::sync::Notify,
}

impl std::ops::Deref for WriteGuard<'_> {
    type Target = VariableState;
    fn deref(&self) -> &VariableState {
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut VariableState {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.guard = None; // unlock first, then wake
        self.unlocked.notify_waiters();
    }
}


impl Variable {
    pub(super) fn new(def: VariableDef, len: usize, state: VariableState, spares: Arc<super::SpareBudget>) -> Variable {
        Variable {
            rounding_seed: fnv1a(def.name.as_bytes()),
            def,
            len,
            state: RwLock::new(state),
            unlocked: tokio::sync::Notify::new(),
            changed: watch::channel(0).0,
            spare: parking_lot::Mutex::new(Spares::new(spares)),
            spare_values: SpareValues::default(),
        }
    }

    /// The registered definition.
    pub fn def(&self) -> &VariableDef {
        &self.def
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a variable with no elements (never: shapes have no zero dimension).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `f` under the read lock. While an update holds the write lock (a large one runs
    /// on the blocking pool for up to seconds), this waits asynchronously: a runtime thread
    /// parked on the lock would stall every other request it serves.
    pub(super) async fn read_async<R>(&self, f: impl FnOnce(&VariableState) -> R) -> R {
        loop {
            let unlocked = self.unlocked.notified();
            tokio::pin!(unlocked);
            // Registered before the attempt, so a release right after it is not missed.
            unlocked.as_mut().enable();
            if let Some(st) = self.state.try_read() {
                return f(&st);
            }
            unlocked.await;
        }
    }

    /// The state under the write lock; releasing it wakes readers waiting in
    /// [`Variable::read_async`].
    pub(super) fn write(&self) -> WriteGuard<'_> {
        WriteGuard { guard: Some(self.state.write()), unlocked: &self.unlocked }
    }

    /// Current version (completed sync steps, or applied async updates).
    pub async fn version(&self) -> u64 {
        self.read_async(|st| st.clock.version()).await
    }

    /// The version, in bounded mode each worker's pushed steps, and the optimizer's
    /// current learning rate, from one read.
    pub async fn version_clocks_and_rate(&self) -> (u64, Vec<u64>, f32) {
        self.read_async(|st| (st.clock.version(), st.clock.worker_clocks().to_vec(), st.optimizer.learning_rate())).await
    }

    /// The current values and their version, for a pull: later updates leave them as they
    /// are (they copy the values first while a snapshot is alive).
    pub async fn values_snapshot(&self) -> ValuesSnapshot {
        self.read_async(|st| ValuesSnapshot {
            values: Some(Arc::clone(&st.values)),
            version: st.clock.version(),
            spare: Arc::clone(&self.spare_values),
        })
        .await
    }

    /// Encodes elements `start..end` of the current values as `wire` into `out`; returns
    /// the version they belong to.
    pub async fn encode_range(&self, start: usize, end: usize, wire: DType, out: &mut Vec<u8>) -> u64 {
        let snap = self.values_snapshot().await;
        snap.encode_range(start, end, wire, out);
        snap.version()
    }

    /// A copy of all values widened to f32 (tests, checkpoints, small reads).
    pub fn snapshot(&self) -> (u64, Vec<f32>) {
        let st = self.state.read();
        let v = match &*st.values {
            Values::F32(v) => v.clone(),
            Values::Bf16(v) => v.iter().map(|&w| bf16::to_f32(w)).collect(),
        };
        (st.clock.version(), v)
    }
}


/// A variable's values as of one version (see [`Variable::values_snapshot`]).
pub struct ValuesSnapshot {
    /// Always `Some` until dropped.
    values: Option<Arc<Values>>,
    version: u64,
    spare: SpareValues,
}

impl Drop for ValuesSnapshot {
    /// The last reader of values an update has replaced hands their buffer back for reuse.
    fn drop(&mut self) {
        if let Some(Ok(values)) = self.values.take().map(Arc::try_unwrap) {
            *self.spare.lock() = Some(values);
        }
    }
}

impl ValuesSnapshot {
    pub(super) fn values(&self) -> &Values {
        self.values.as_deref().expect("values are present until drop")
    }

    /// The version these values belong to.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Encodes elements `start..end` as `wire` into `out`.
    pub fn encode_range(&self, start: usize, end: usize, wire: DType, out: &mut Vec<u8>) {
        match self.values() {
            Values::F32(v) => parasync_tensor::encode_f32(&v[start..end], wire, out),
            Values::Bf16(v) => parasync_tensor::encode_bf16(&v[start..end], wire, out),
        }
    }

    /// The values as little-endian f32 bytes, when they are stored as f32 on a
    /// little-endian machine (the data plane writes a pull straight from here).
    pub fn f32_le_bytes(&self) -> Option<&[u8]> {
        match self.values() {
            #[cfg(target_endian = "little")]
            Values::F32(v) => Some(parasync_tensor::f32_as_le_bytes(v)),
            _ => None,
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}
