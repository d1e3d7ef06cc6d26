//! The algorithms: sequences of transport exchanges that carry out one collective.
//!
//! Two families: *direct* (every rank sends to every rank in one exchange; latency-optimal,
//! used for small messages) and *ring/chain* (neighbour-to-neighbour, pipelined in chunks;
//! bandwidth-optimal, used for large ones). Every operation's first exchange involves every
//! pair of ranks (its data frames, or empty announcements), so a mismatched call is seen by
//! every rank. Reduction orders are fixed: direct folds ranks `0, 1, …, n-1`; the ring folds
//! segment `j` in the order `j+1, …, j` (see [`crate::schedule`]).

mod ring;
mod small;

pub(crate) use ring::{allgather_ring, allreduce_ring, broadcast_chain, reduce_scatter_ring};
pub(crate) use small::{
    allgather_direct, allreduce_direct, barrier, broadcast_direct, reduce_scatter_direct,
};

use crate::dtype::Element;
use crate::error::Result;
use crate::frame::OpDesc;
use crate::transport::{Deadline, RecvOp, SendOp, Transport};

/// What one running operation needs: the transport, its description, its deadline.
pub(crate) struct Ctx<'a> {
    /// The communicator's transport.
    pub t: &'a mut dyn Transport,
    /// The operation as this rank called it.
    pub op: OpDesc,
    /// When it must be over.
    pub deadline: Deadline,
    /// Elements per frame of pipelined algorithms.
    pub chunk_bytes: usize,
}

impl Ctx<'_> {
    pub fn rank(&self) -> usize {
        self.t.rank()
    }

    pub fn n(&self) -> usize {
        self.t.world_size()
    }

    /// One exchange of this operation.
    pub fn exchange(&mut self, sends: &[SendOp<'_>], recvs: &mut [RecvOp<'_>]) -> Result<()> {
        self.t.exchange(&self.op, sends, recvs, self.deadline)
    }

    /// Streams `send` to one peer while receiving `recv` from another in frames of
    /// `chunk_bytes` (rounded to whole elements of `T`), calling `on_frame` per received frame.
    pub fn stream<T: Element>(
        &mut self,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        on_frame: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        let frame = self.chunk_elems::<T>() * std::mem::size_of::<T>();
        self.t
            .stream(&self.op, send, recv, frame, self.deadline, on_frame)
    }

    /// Chunk length in elements of type `T`.
    pub fn chunk_elems<T: Element>(&self) -> usize {
        (self.chunk_bytes / std::mem::size_of::<T>()).max(1)
    }

    /// An exchange of empty frames with every peer: every rank checks every other's call.
    pub fn announce(&mut self, pool: &mut OpPool) -> Result<()> {
        let (me, n) = (self.rank(), self.n());
        let mut sends = pool.take_sends();
        let mut recvs = pool.take_recvs();
        for p in (0..n).filter(|&p| p != me) {
            sends.push(SendOp {
                peer: p,
                payload: &[],
            });
            recvs.push(RecvOp {
                peer: p,
                buf: &mut [],
            });
        }
        let r = self.exchange(&sends, &mut recvs);
        pool.put_sends(sends);
        pool.put_recvs(recvs);
        r
    }
}

/// Reusable buffers of a communicator, so that the hot path allocates nothing once warm.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Receive area / first accumulator (u64 for alignment of any element type).
    pub a: Vec<u64>,
    /// Second accumulator.
    pub b: Vec<u64>,
    /// Fusion bucket.
    pub fusion: Vec<u64>,
    /// Recycled operation lists.
    pub pool: OpPool,
}

/// Views the first `len` elements of an aligned buffer as `A`, growing it if needed. A
/// buffer grown to 4 MiB or more is put on transparent huge pages
/// ([`parasync_tensor::filled_vec`]): these buffers (fusion buckets, bf16 accumulators)
/// are what peers on the same host read with `process_vm_readv`, which looks up and pins
/// every page it reads.
pub(crate) fn typed<A: Element>(v: &mut Vec<u64>, len: usize) -> &mut [A] {
    let words = (len * std::mem::size_of::<A>()).div_ceil(8);
    if v.len() < words {
        let mut grown = parasync_tensor::filled_vec(words, 0u64);
        grown[..v.len()].copy_from_slice(v);
        *v = grown;
    }
    // SAFETY: u64 storage is aligned for every `Element` (alignment <= 8), the byte length
    // covers `len` elements, and every bit pattern is a valid `Element`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<A>(), len) }
}

/// Lists of exchange operations kept between calls (their lifetimes are erased by clearing).
#[derive(Default)]
pub(crate) struct OpPool {
    sends: Vec<SendOp<'static>>,
    recvs: Vec<RecvOp<'static>>,
}

impl OpPool {
    pub fn take_sends<'a>(&mut self) -> Vec<SendOp<'a>> {
        recycle(std::mem::take(&mut self.sends))
    }

    pub fn take_recvs<'a>(&mut self) -> Vec<RecvOp<'a>> {
        recycle_recvs(std::mem::take(&mut self.recvs))
    }

    pub fn put_sends(&mut self, v: Vec<SendOp<'_>>) {
        self.sends = recycle(v);
    }

    pub fn put_recvs(&mut self, v: Vec<RecvOp<'_>>) {
        self.recvs = recycle_recvs(v);
    }
}

/// Empties `v` and reuses its allocation for another lifetime (in-place collect of an empty
/// iterator between same-layout types keeps the buffer).
fn recycle<'a, 'b>(mut v: Vec<SendOp<'a>>) -> Vec<SendOp<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("cleared")).collect()
}

fn recycle_recvs<'a, 'b>(mut v: Vec<RecvOp<'a>>) -> Vec<RecvOp<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("cleared")).collect()
}

#[cfg(test)]
mod tests {
    use super::typed;

    /// Growing keeps what the buffer held, whether the new size is small or large enough
    /// for huge pages, and a later smaller view reuses the same storage.
    #[test]
    fn typed_grows_keeping_contents() {
        let mut v: Vec<u64> = Vec::new();
        typed::<f32>(&mut v, 3).copy_from_slice(&[1.0, 2.0, 3.0]);
        let big = typed::<f32>(&mut v, 5 << 20); // 20 MiB: on huge pages where offered
        assert_eq!(big.len(), 5 << 20);
        assert_eq!(&big[..3], &[1.0, 2.0, 3.0]);
        big[(5 << 20) - 1] = 7.0;
        let ptr = v.as_ptr();
        let small = typed::<f32>(&mut v, 10);
        assert_eq!(&small[..3], &[1.0, 2.0, 3.0]);
        assert_eq!(v.as_ptr(), ptr);
        assert_eq!(typed::<f32>(&mut v, 5 << 20)[(5 << 20) - 1], 7.0);
    }
}
