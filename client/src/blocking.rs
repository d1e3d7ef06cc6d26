//! [`BlockingClient`]: the per-step client for callers that are not async (the C ABI, the
//! Python binding, plain threads).
//!
//! Every call runs the async [`Client`] to completion on the calling thread, on one tokio
//! runtime shared by the whole process. Calls take `&self` (registration too), so one client
//! may be used from several threads at once: a pull that waits for a future step does not
//! hold up a push from another thread. A long wait can be abandoned: the `_interruptible`
//! calls ask a caller-given check every [`INTERRUPT_POLL`] and, when it says stop, drop the
//! call (its connections are closed, nothing is half-applied by this client) and return
//! [`ErrorKind::Interrupted`].

use std::future::Future;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use crate::client::{Client, ClientOptions, PushSummary, ShardInfo};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::VariableSpec;

/// How often a blocked call asks whether to stop.
pub const INTERRUPT_POLL: Duration = Duration::from_millis(50);

/// The process's runtime for blocking clients. It has no threads of its own: the threads
/// blocked in calls drive it (one of them at a time polls the sockets and wakes the others),
/// so a reply wakes the caller directly instead of an I/O thread that then wakes the caller:
/// one thread hop less per call, about 12 µs on the project's VM for a 100 B round trip.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("start the client runtime")
    })
}

/// Runs `fut` on the calling thread; every [`INTERRUPT_POLL`] asks `stop`, and abandons the
/// call when it answers true.
fn block_on<T>(fut: impl Future<Output = Result<T>>, stop: &mut dyn FnMut() -> bool) -> Result<T> {
    runtime().block_on(async {
        tokio::pin!(fut);
        // (Not `interval()`, whose first tick is due at once: awaiting it costs a turn of the
        // timer wheel, about a millisecond, on every call.)
        let first = tokio::time::Instant::now() + INTERRUPT_POLL;
        let mut tick = tokio::time::interval_at(first, INTERRUPT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return r,
                _ = tick.tick() => {
                    if stop() {
                        return Err(Error::new(ErrorKind::Interrupted, "interrupted while waiting for the parameter server"));
                    }
                }
            }
        }
    })
}

fn never() -> bool {
    false
}

/// A [`Client`] with blocking calls (see the module documentation).
pub struct BlockingClient {
    /// Written only by [`BlockingClient::register`]; every other call reads.
    inner: RwLock<Client>,
}

impl BlockingClient {
    /// Connects to every shard (see [`Client::connect`]).
    pub fn connect(addrs: &[String], opts: ClientOptions) -> Result<BlockingClient> {
        Self::connect_interruptible(addrs, opts, &mut never)
    }

    /// [`BlockingClient::connect`], abandoned when `stop` says so.
    pub fn connect_interruptible(addrs: &[String], opts: ClientOptions, stop: &mut dyn FnMut() -> bool) -> Result<BlockingClient> {
        let client = block_on(Client::connect(addrs, opts), stop)?;
        Ok(BlockingClient { inner: RwLock::new(client) })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Client> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.read().num_shards()
    }

    /// The options in force.
    pub fn options(&self) -> ClientOptions {
        self.read().options().clone()
    }

    /// Number of registered variables (0 before [`BlockingClient::register`]).
    pub fn num_variables(&self) -> usize {
        self.read().specs().len()
    }

    /// Registers the model (see [`Client::register`]); waits for calls in flight on other threads.
    pub fn register(&self, specs: Vec<VariableSpec>, stop: &mut dyn FnMut() -> bool) -> Result<()> {
        let mut c = self.inner.write().unwrap_or_else(|p| p.into_inner());
        block_on(c.register(specs), stop)
    }

    /// Pulls the values of `step` into caller buffers (see [`Client::pull_into`]).
    pub fn pull_into<B: AsMut<[f32]>>(&self, step: u64, out: &mut [B], stop: &mut dyn FnMut() -> bool) -> Result<()> {
        block_on(self.read().pull_into(step, out), stop)
    }

    /// Pushes one gradient per variable (see [`Client::push`]).
    pub fn push(&self, step: u64, grads: &[&[f32]], stop: &mut dyn FnMut() -> bool) -> Result<PushSummary> {
        block_on(self.read().push(step, grads), stop)
    }

    /// Pushes and receives the next step's values in one round trip (see [`Client::push_pull`]).
    pub fn push_pull<B: AsMut<[f32]>>(
        &self,
        step: u64,
        grads: &[&[f32]],
        out: &mut [B],
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<PushSummary> {
        block_on(self.read().push_pull(step, grads, out), stop)
    }

    /// Sets the learning rate of every variable on every shard.
    pub fn set_learning_rate(&self, lr: f32, stop: &mut dyn FnMut() -> bool) -> Result<()> {
        block_on(self.read().set_learning_rate(lr), stop)
    }

    /// Every shard writes a checkpoint of `step` (see [`Client::checkpoint`]).
    pub fn checkpoint(&self, step: u64, stop: &mut dyn FnMut() -> bool) -> Result<Vec<crate::CheckpointFile>> {
        block_on(self.read().checkpoint(step), stop)
    }

    /// Creates a sparse table on every shard (see [`Client::register_table`]).
    pub fn register_table(&self, spec: &crate::TableSpec, stop: &mut dyn FnMut() -> bool) -> Result<()> {
        block_on(self.read().register_table(spec), stop)
    }

    /// Rows of a table by id into `out` (see [`Client::lookup`]); returns the lowest version.
    pub fn lookup(&self, table: &str, ids: &[u64], step: u64, out: &mut [f32], stop: &mut dyn FnMut() -> bool) -> Result<u64> {
        block_on(self.read().lookup(table, ids, step, out), stop)
    }

    /// Gradient rows of a table by id (see [`Client::push_sparse`]).
    pub fn push_sparse(
        &self,
        table: &str,
        ids: &[u64],
        grads: &[f32],
        step: u64,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<crate::SparsePushSummary> {
        block_on(self.read().push_sparse(table, ids, grads, step), stop)
    }

    /// Every shard's mode and variables.
    pub fn shard_info(&self, stop: &mut dyn FnMut() -> bool) -> Result<Vec<ShardInfo>> {
        block_on(self.read().shard_info(), stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_when_the_check_says_stop_and_not_before() {
        let mut asked = 0;
        let started = std::time::Instant::now();
        let r: Result<()> = block_on(std::future::pending(), &mut || {
            asked += 1;
            asked == 3
        });
        let e = r.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Interrupted);
        assert_eq!(asked, 3);
        assert!(started.elapsed() >= INTERRUPT_POLL * 2, "{:?}", started.elapsed());
        assert_eq!(block_on(async { Ok(7) }, &mut never).unwrap(), 7);
    }

    #[test]
    fn connecting_to_nothing_is_a_usage_error() {
        let e = BlockingClient::connect(&[], ClientOptions::default()).err().expect("no addresses");
        assert_eq!(e.kind, ErrorKind::Usage);
    }
}
