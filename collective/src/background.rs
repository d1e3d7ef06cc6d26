//! Handle-returning collectives: a [`Communicator`] on its own thread, so that a trainer can
//! overlap communication with compute.
//!
//! Operations run one at a time, in the order they were submitted (the order that every
//! rank must agree on). Each submission moves its buffer to the worker and the [`Handle`]
//! gives it back with the result.

use crate::comm::Communicator;
use crate::dtype::{Element, ReduceOp};
use crate::error::{Error, Result};
use std::sync::mpsc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce(&mut Communicator) + Send>;

/// A communicator running on a background thread.
pub struct BackgroundCommunicator {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<Communicator>>,
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
}

impl BackgroundCommunicator {
    /// Moves `comm` to a new worker thread.
    pub fn new(comm: Communicator) -> BackgroundCommunicator {
        let (rank, world_size) = (comm.rank(), comm.world_size());
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new()
            .name(format!("collective-rank{rank}"))
            .spawn(move || {
                let mut comm = comm;
                for job in rx {
                    job(&mut comm);
                }
                comm
            })
            .expect("spawn collective worker thread");
        BackgroundCommunicator {
            jobs: Some(tx),
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

    /// Queues `f` on the worker; the handle yields its result.
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Communicator) -> Result<R> + Send + 'static,
    ) -> Handle<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        if let Some(jobs) = &self.jobs {
            // A send error means the worker is gone; the handle then reports it.
            let _ = jobs.send(job);
        }
        Handle { rx }
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
        self.jobs.take();
        self.worker
            .take()
            .expect("worker present")
            .join()
            .expect("collective worker panicked")
    }
}

impl Drop for BackgroundCommunicator {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
