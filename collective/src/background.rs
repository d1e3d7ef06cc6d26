//! Handle-returning collectives: a [`Communicator`] on its own thread, so that a trainer can
//! overlap communication with compute.
//!
//! Operations run one at a time, in the order they were submitted (the order that every
//! rank must agree on). Each submission moves its buffer to the worker and the [`Handle`]
//! gives it back with the result. [`BackgroundCommunicator::run`] runs an operation on the
//! calling thread instead, on buffers it borrows, after every operation submitted before it:
//! blocking calls (and the bindings' in-place calls on caller memory) cost no thread hop.

use crate::comm::Communicator;
use crate::dtype::{Element, ReduceOp};
use crate::error::{Error, Result};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce(&mut Communicator) + Send>;

/// What the caller threads and the worker share.
struct Shared {
    comm: Mutex<Communicator>,
    /// Jobs submitted and not finished yet.
    pending: Mutex<usize>,
    /// Signalled whenever `pending` drops to zero.
    drained: Condvar,
}

/// A communicator running on a background thread.
pub struct BackgroundCommunicator {
    /// Taken by submitters (and by [`BackgroundCommunicator::run`] until its turn comes), so
    /// that operations start in the order they were asked for.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    rank: usize,
    world_size: usize,
}

/// The pending result of a submitted operation.
#[must_use = "an operation's result (and its buffer) comes back only through wait()"]
pub struct Handle<R> {
    rx: mpsc::Receiver<Result<R>>,
}

impl<R> Handle<R> {
    /// Blocks until the operation is over; gives back the buffer holding the result.
    pub fn wait(self) -> Result<R> {
        self.rx
            .recv()
            .unwrap_or_else(|_| Err(Error::Poisoned("background worker stopped".into())))
    }

    /// The result if the operation is over, or the handle back if it is not.
    pub fn try_wait(self) -> std::result::Result<Result<R>, Handle<R>> {
        match self.rx.try_recv() {
            Ok(r) => Ok(r),
            Err(mpsc::TryRecvError::Empty) => Err(self),
            Err(mpsc::TryRecvError::Disconnected) => {
                Ok(Err(Error::Poisoned("background worker stopped".into())))
            }
        }
    }

    /// Waits at most `timeout`: the result, or the handle back if the operation is not over.
    pub fn wait_timeout(
        self,
        timeout: std::time::Duration,
    ) -> std::result::Result<Result<R>, Handle<R>> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Ok(Err(Error::Poisoned("background worker stopped".into())))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A job that panicked leaves the communicator as it was between frames at worst; the
    // error it returns (or the dropped handle) already reports it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BackgroundCommunicator {
    /// Moves `comm` to a new worker thread.
    pub fn new(comm: Communicator) -> BackgroundCommunicator {
        let (rank, world_size) = (comm.rank(), comm.world_size());
        let shared = Arc::new(Shared {
            comm: Mutex::new(comm),
            pending: Mutex::new(0),
            drained: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let on_worker = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name(format!("collective-rank{rank}"))
            .spawn(move || {
                for job in rx {
                    // A panicking job drops its result sender, so its handle reports the
                    // failure; the count below must still go down.
                    let run = std::panic::AssertUnwindSafe(|| job(&mut lock(&on_worker.comm)));
                    let _ = std::panic::catch_unwind(run);
                    let mut pending = lock(&on_worker.pending);
                    *pending -= 1;
                    if *pending == 0 {
                        on_worker.drained.notify_all();
                    }
                }
            })
            .expect("spawn collective worker thread");
        BackgroundCommunicator {
            jobs: Mutex::new(Some(tx)),
            shared,
            worker: Some(worker),
            rank,
            world_size,
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Number of submitted operations not finished yet.
    pub fn pending(&self) -> usize {
        *lock(&self.shared.pending)
    }

    /// Queues `f` on the worker; the handle yields its result.
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Communicator) -> Result<R> + Send + 'static,
    ) -> Handle<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        let jobs = lock(&self.jobs);
        if let Some(jobs) = jobs.as_ref() {
            *lock(&self.shared.pending) += 1;
            if jobs.send(job).is_err() {
                // The worker is gone; the handle reports it.
                *lock(&self.shared.pending) -= 1;
            }
        }
        Handle { rx }
    }

    /// Runs `f` on the calling thread once every operation submitted before has finished
    /// (later submissions wait for it). `f` may borrow: this is the blocking call.
    pub fn run<R>(&self, f: impl FnOnce(&mut Communicator) -> Result<R>) -> Result<R> {
        let _turn = lock(&self.jobs);
        let mut pending = lock(&self.shared.pending);
        while *pending > 0 {
            pending = self
                .shared
                .drained
                .wait(pending)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(pending);
        let mut comm = lock(&self.shared.comm);
        f(&mut comm)
    }

    /// Starts an in-place allreduce of `buf`.
    pub fn allreduce<T: Element>(&self, mut buf: Vec<T>, op: ReduceOp) -> Handle<Vec<T>> {
        self.submit(move |c| c.allreduce(&mut buf, op).map(|()| buf))
    }

    /// Starts a fused allreduce of many tensors (see [`Communicator::allreduce_fused`]).
    pub fn allreduce_fused<T: Element>(
        &self,
        mut tensors: Vec<Vec<T>>,
        op: ReduceOp,
        bucket_bytes: usize,
    ) -> Handle<Vec<Vec<T>>> {
        self.submit(move |c| {
            let mut views: Vec<&mut [T]> = tensors.iter_mut().map(|t| t.as_mut_slice()).collect();
            c.allreduce_fused(&mut views, op, bucket_bytes)?;
            Ok(tensors)
        })
    }

    /// Starts a broadcast of `root`'s `buf`.
    pub fn broadcast<T: Element>(&self, mut buf: Vec<T>, root: usize) -> Handle<Vec<T>> {
        self.submit(move |c| c.broadcast(&mut buf, root).map(|()| buf))
    }

    /// Starts an allgather of `send`; the result has `world_size × send.len()` elements.
    pub fn allgather<T: Element>(&self, send: Vec<T>) -> Handle<Vec<T>> {
        self.submit(move |c| {
            let mut recv = vec![T::default(); send.len() * c.world_size()];
            c.allgather(&send, &mut recv).map(|()| recv)
        })
    }

    /// Starts a reduce_scatter of `send`; the result is this rank's block.
    pub fn reduce_scatter<T: Element>(&self, send: Vec<T>, op: ReduceOp) -> Handle<Vec<T>> {
        self.submit(move |c| {
            let mut recv = vec![T::default(); send.len() / c.world_size()];
            c.reduce_scatter(&send, &mut recv, op).map(|()| recv)
        })
    }

    /// Starts a barrier.
    pub fn barrier(&self) -> Handle<()> {
        self.submit(|c| c.barrier())
    }

    /// Waits for every queued operation and gives the communicator back.
    pub fn into_inner(mut self) -> Communicator {
        self.stop_worker();
        let shared = Arc::clone(&self.shared);
        drop(self);
        match Arc::try_unwrap(shared) {
            Ok(s) => s.comm.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(_) => unreachable!("the worker has stopped, so no one else holds the state"),
        }
    }

    fn stop_worker(&mut self) {
        lock(&self.jobs).take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for BackgroundCommunicator {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CommConfig;
    use crate::transport::mem;

    fn pair() -> Vec<BackgroundCommunicator> {
        mem::network(2)
            .into_iter()
            .map(|t| {
                BackgroundCommunicator::new(Communicator::new(Box::new(t), CommConfig::default()))
            })
            .collect()
    }

    #[test]
    fn a_blocking_call_runs_after_the_submitted_ones_on_borrowed_buffers() {
        let ranks = pair();
        std::thread::scope(|s| {
            for bg in &ranks {
                s.spawn(move || {
                    let me = bg.rank() as f32;
                    let first = bg.allreduce(vec![me; 3], ReduceOp::Sum);
                    let second = bg.broadcast(vec![me; 2], 1);
                    let mut borrowed = [me + 10.0; 4];
                    bg.run(|c| c.allreduce(&mut borrowed, ReduceOp::Max))
                        .unwrap();
                    assert_eq!(bg.pending(), 0);
                    assert_eq!(borrowed, [11.0; 4]);
                    assert_eq!(first.wait().unwrap(), vec![1.0; 3]);
                    assert_eq!(second.wait().unwrap(), vec![1.0; 2]);
                    let third = bg.barrier();
                    third.wait().unwrap();
                });
            }
        });
        for bg in ranks {
            assert_eq!(bg.into_inner().next_seq(), 4);
        }
    }

    #[test]
    fn a_panicking_job_is_reported_and_does_not_wedge_later_calls() {
        let mut ranks = pair();
        let bg = ranks.remove(0);
        let h = bg.submit::<()>(|_| panic!("job failed"));
        assert!(matches!(h.wait(), Err(Error::Poisoned(_))));
        assert_eq!(bg.run(|c| Ok(c.rank())).unwrap(), 0);
    }
}
