//! Direct (one-exchange) algorithms: every rank talks to every rank at once. Latency-optimal
//! for small messages; they fold contributions in rank order `0..n`.

use super::{typed, Ctx, OpPool, Scratch};
use crate::dtype::{as_bytes, as_bytes_mut, finish_into, fold_into, load_into, Element, ReduceOp};
use crate::error::Result;
use crate::transport::{RecvOp, SendOp};

/// Index of peer `p`'s slot among the `n-1` peers of rank `me`.
fn slot(p: usize, me: usize) -> usize {
    if p < me {
        p
    } else {
        p - 1
    }
}

/// Folds `n` contributions in rank order into `out`: rank `me`'s is `own`, peer `p`'s is the
/// `slot(p)`-th block of `others`.
fn fold_rank_order<T: Element>(
    out: &mut [T],
    own: &[T],
    others: &[T],
    me: usize,
    n: usize,
    op: ReduceOp,
    acc_buf: &mut Vec<u64>,
) {
    let count = own.len();
    let contribution = |r: usize| -> &[T] {
        if r == me {
            own
        } else {
            let s = slot(r, me);
            &others[s * count..(s + 1) * count]
        }
    };
    let acc = typed::<T::Acc>(acc_buf, count);
    load_into(acc, contribution(0));
    for r in 1..n {
        fold_into(acc, contribution(r), op);
    }
    finish_into(out, acc, op, n);
}

/// Allreduce: send the whole buffer to every peer, receive theirs, fold in rank order.
pub(crate) fn allreduce_direct<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    buf: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let (me, n, count) = (ctx.rank(), ctx.n(), buf.len());
    let others = typed::<T>(&mut s.a, (n - 1) * count);
    exchange_with_every_peer(ctx, &mut s.pool, buf, others.chunks_mut(count.max(1)), count)?;
    let others = typed::<T>(&mut s.a, (n - 1) * count);
    // `buf` is both a contribution and the output: fold into the accumulator, then finish.
    let acc = typed::<T::Acc>(&mut s.b, count);
    // Plain loops keep borrows simple: rank 0 first, then 1..n in order.
    for r in 0..n {
        let part: &[T] = if r == me {
            buf
        } else {
            let sl = slot(r, me);
            &others[sl * count..(sl + 1) * count]
        };
        if r == 0 {
            load_into(acc, part);
        } else {
            fold_into(acc, part, op);
        }
    }
    finish_into(buf, acc, op, n);
    Ok(())
}

/// Reduce-scatter: send block `p` to rank `p`, receive every rank's block `me`, fold in rank order.
pub(crate) fn reduce_scatter_direct<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    send: &[T],
    recv: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let (me, n, count) = (ctx.rank(), ctx.n(), recv.len());
    let others = typed::<T>(&mut s.a, (n - 1) * count);
    {
        let mut sends = s.pool.take_sends();
        let mut recvs = s.pool.take_recvs();
        let mut blocks = others.chunks_mut(count.max(1));
        for p in (0..n).filter(|&p| p != me) {
            sends.push(SendOp {
                peer: p,
                payload: as_bytes(&send[p * count..(p + 1) * count]),
            });
            let block: &mut [T] = if count == 0 {
                &mut []
            } else {
                blocks.next().expect("one block per peer")
            };
            recvs.push(RecvOp {
                peer: p,
                buf: as_bytes_mut(block),
            });
        }
        ctx.exchange(&sends, &mut recvs)?;
        s.pool.put_sends(sends);
        s.pool.put_recvs(recvs);
    }
    let others = typed::<T>(&mut s.a, (n - 1) * count);
    fold_rank_order(
        recv,
        &send[me * count..(me + 1) * count],
        others,
        me,
        n,
        op,
        &mut s.b,
    );
    Ok(())
}

/// Broadcast: the root sends to every rank; the others send empty announcements.
pub(crate) fn broadcast_direct<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    buf: &mut [T],
    root: usize,
) -> Result<()> {
    let (me, n) = (ctx.rank(), ctx.n());
    let mut sends = s.pool.take_sends();
    let mut recvs = s.pool.take_recvs();
    if me == root {
        for p in (0..n).filter(|&p| p != me) {
            sends.push(SendOp {
                peer: p,
                payload: as_bytes(buf),
            });
            recvs.push(RecvOp {
                peer: p,
                buf: &mut [],
            });
        }
        ctx.exchange(&sends, &mut recvs)?;
    } else {
        let mut target = Some(as_bytes_mut(buf));
        for p in (0..n).filter(|&p| p != me) {
            sends.push(SendOp {
                peer: p,
                payload: &[],
            });
            let b: &mut [u8] = if p == root {
                target.take().expect("one root")
            } else {
                &mut []
            };
            recvs.push(RecvOp { peer: p, buf: b });
        }
        ctx.exchange(&sends, &mut recvs)?;
    }
    s.pool.put_sends(sends);
    s.pool.put_recvs(recvs);
    Ok(())
}

/// Allgather in place: block `me` of `buf` goes to every peer; block `p` comes from rank `p`.
pub(crate) fn allgather_direct<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    buf: &mut [T],
) -> Result<()> {
    let (me, n) = (ctx.rank(), ctx.n());
    let count = buf.len() / n;
    let (before, rest) = buf.split_at_mut(me * count);
    let (mine, after) = rest.split_at_mut(count);
    let blocks = before
        .chunks_mut(count.max(1))
        .chain(after.chunks_mut(count.max(1)));
    exchange_with_every_peer(ctx, &mut s.pool, mine, blocks, count)
}

/// Sends `payload` to every other rank and receives each peer's `count` elements into the
/// next of `blocks` (peers in rank order, skipping this rank): the one exchange behind the
/// direct allreduce and allgather.
fn exchange_with_every_peer<'a, T: Element>(
    ctx: &mut Ctx,
    pool: &mut OpPool,
    payload: &[T],
    mut blocks: impl Iterator<Item = &'a mut [T]>,
    count: usize,
) -> Result<()> {
    let me = ctx.rank();
    let mut sends = pool.take_sends();
    let mut recvs = pool.take_recvs();
    for p in (0..ctx.n()).filter(|&p| p != me) {
        sends.push(SendOp {
            peer: p,
            payload: as_bytes(payload),
        });
        let block: &mut [T] = if count == 0 {
            &mut []
        } else {
            blocks.next().expect("one block per peer")
        };
        recvs.push(RecvOp {
            peer: p,
            buf: as_bytes_mut(block),
        });
    }
    ctx.exchange(&sends, &mut recvs)?;
    pool.put_sends(sends);
    pool.put_recvs(recvs);
    Ok(())
}

/// Barrier: an exchange of empty frames between every pair of ranks.
pub(crate) fn barrier(ctx: &mut Ctx, s: &mut Scratch) -> Result<()> {
    ctx.announce(&mut s.pool)
}
