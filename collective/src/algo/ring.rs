//! Ring and chain algorithms: neighbour-to-neighbour, pipelined in chunks of
//! `chunk_bytes`. Reduce-scatter then allgather sends 2(n-1)/n of the buffer per rank.

use super::{typed, Ctx, Scratch};
use crate::dtype::{
    as_bytes, as_bytes_mut, finish_into, fold_finish, fold_finish_acc, fold_finish_two, fold_into,
    fold_two, from_bytes_mut, load_into, Element, ReduceOp,
};
use crate::error::Result;
use crate::schedule::{
    allgather_step, chain_position, chunk_count, left, reduce_scatter_step, right, Partition,
};
use crate::transport::{RecvOp, SendOp};
use std::ops::Range;

/// Piece `k` of `range` cut into chunks of `chunk` elements, or `None` past the last piece.
fn piece(range: &Range<usize>, k: usize, chunk: usize) -> Option<Range<usize>> {
    if k >= chunk_count(range.len(), chunk) {
        return None;
    }
    let start = range.start + k * chunk;
    Some(start..(start + chunk).min(range.end))
}

/// Borrows two non-overlapping ranges of `buf`, one shared and one mutable.
fn disjoint<T>(buf: &mut [T], a: Range<usize>, b: Range<usize>) -> (&[T], &mut [T]) {
    if a.start <= b.start && a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    } else {
        debug_assert!(b.end <= a.start, "ranges overlap: {a:?} {b:?}");
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.len()], &mut lo[b])
    }
}

/// Ring reduce-scatter over `local` cut by `part`: returns the accumulated (not yet
/// finished) segment `me`, folded in the order `me+1, …, me`.
fn reduce_scatter_phase<'s, T: Element>(
    ctx: &mut Ctx,
    a: &'s mut Vec<u64>,
    b: &'s mut Vec<u64>,
    local: &[T],
    part: Partition,
    op: ReduceOp,
) -> Result<&'s [T::Acc]> {
    let (me, n) = (ctx.rank(), ctx.n());
    let m = part.max_len();
    let mut cur = typed::<T::Acc>(a, m);
    let mut nxt = typed::<T::Acc>(b, m);
    let (first, _) = reduce_scatter_step(me, n, 0);
    let first = if n == 1 {
        part.range(me)
    } else {
        part.range(first)
    };
    load_into(&mut cur[..first.len()], &local[first]);
    let (lt, rt) = (left(me, n), right(me, n));
    let size = std::mem::size_of::<T::Acc>();
    for step in 0..n - 1 {
        let (ss, rs) = reduce_scatter_step(me, n, step);
        let (slen, rr) = (part.range(ss).len(), part.range(rs));
        let mine = &local[rr.clone()];
        // Partial of ranks rs+1..me-1 arrives; this rank's own values are folded in after it,
        // frame by frame while later frames are still on the wire.
        let mut fold = |off: usize, bytes: &mut [u8]| {
            let acc = from_bytes_mut::<T::Acc>(bytes);
            let at = off / size;
            fold_into(acc, &mine[at..at + acc.len()], op);
        };
        ctx.stream::<T::Acc>(
            Some((rt, as_bytes(&cur[..slen]))),
            Some((lt, as_bytes_mut(&mut nxt[..rr.len()]))),
            &mut fold,
        )?;
        std::mem::swap(&mut cur, &mut nxt);
    }
    Ok(&cur[..part.range(me).len()])
}

/// Pairwise-exchange reduce-scatter for types reduced in a wider accumulator (bf16): at step
/// `k` (1..n) rank `r` sends its raw segment `r+k` to rank `r+k` and receives segment `r`
/// from rank `r-k`, folding it in f32 frame by frame as it arrives. The wire carries bf16
/// (half the bytes of f32, the same (n-1)/n per rank as the ring), the sum is rounded once,
/// and segment `j` is folded in the fixed order `j, j-1, …, j+1`.
fn pairwise_reduce_scatter_phase<'s, T: Element>(
    ctx: &mut Ctx,
    a: &'s mut Vec<u64>,
    b: &mut Vec<u64>,
    local: &[T],
    part: Partition,
    op: ReduceOp,
) -> Result<&'s [T::Acc]> {
    let (me, n) = (ctx.rank(), ctx.n());
    let own = part.range(me);
    let acc = typed::<T::Acc>(a, own.len());
    load_into(acc, &local[own.clone()]);
    let incoming = typed::<T>(b, own.len());
    let size = std::mem::size_of::<T>();
    for k in 1..n {
        let (to, from) = ((me + k) % n, (me + n - k) % n);
        let mut fold = |off: usize, bytes: &mut [u8]| {
            let theirs = from_bytes_mut::<T>(bytes);
            let at = off / size;
            fold_into(&mut acc[at..at + theirs.len()], theirs, op);
        };
        ctx.stream::<T>(
            Some((to, as_bytes(&local[part.range(to)]))),
            Some((from, as_bytes_mut(incoming))),
            &mut fold,
        )?;
    }
    Ok(acc)
}

/// The pairwise exchange of [`pairwise_reduce_scatter_phase`] for in-place allreduce, with
/// the folds fused into as few passes as possible: the first step folds this rank's values
/// and the arriving ones together, the last one writes the rounded result straight into
/// `buf` (same fold order, same numerics).
fn pairwise_in_place<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    buf: &mut [T],
    part: Partition,
    op: ReduceOp,
) -> Result<()> {
    let (me, n) = (ctx.rank(), ctx.n());
    let own = part.range(me);
    let acc = typed::<T::Acc>(&mut s.a, own.len());
    let incoming = typed::<T>(&mut s.b, own.len());
    let size = std::mem::size_of::<T>();
    for k in 1..n {
        let (to, from) = ((me + k) % n, (me + n - k) % n);
        let (send, mine) = disjoint(buf, part.range(to), own.clone());
        let (first, last) = (k == 1, k == n - 1);
        let mut fold = |off: usize, bytes: &mut [u8]| {
            let theirs = from_bytes_mut::<T>(bytes);
            let r = off / size..off / size + theirs.len();
            match (first, last) {
                (true, true) => fold_finish_two(&mut mine[r], theirs, op, n),
                (true, false) => fold_two(&mut acc[r.clone()], &mine[r], theirs, op),
                (false, true) => fold_finish_acc(&mut mine[r.clone()], &acc[r], theirs, op, n),
                (false, false) => fold_into(&mut acc[r], theirs, op),
            }
        };
        ctx.stream::<T>(
            Some((to, as_bytes(send))),
            Some((from, as_bytes_mut(incoming))),
            &mut fold,
        )?;
    }
    Ok(())
}

/// Ring allgather in place: rank `r` holds segment `r` of `buf` and ends with all of them.
fn allgather_phase<T: Element>(ctx: &mut Ctx, buf: &mut [T], part: Partition) -> Result<()> {
    let (me, n) = (ctx.rank(), ctx.n());
    let (lt, rt) = (left(me, n), right(me, n));
    for step in 0..n - 1 {
        let (ss, rs) = allgather_step(me, n, step);
        let (sbuf, rbuf) = disjoint(buf, part.range(ss), part.range(rs));
        ctx.stream::<T>(
            Some((rt, as_bytes(sbuf))),
            Some((lt, as_bytes_mut(rbuf))),
            &mut |_, _| {},
        )?;
    }
    Ok(())
}

/// Allreduce as reduce-scatter then ring allgather, in place. Types reduced in their own
/// type use the ring (the first step sends straight from `buf`, the last folds the arriving
/// partials straight into `buf`, frame by frame); bf16 uses the pairwise exchange.
pub(crate) fn allreduce_ring<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    buf: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let (me, n) = (ctx.rank(), ctx.n());
    ctx.announce(&mut s.pool)?;
    let part = Partition::new(buf.len(), n);
    if n == 1 {
        let acc = typed::<T::Acc>(&mut s.a, buf.len());
        load_into(acc, buf);
        finish_into(buf, acc, op, 1);
        return Ok(());
    }
    if T::DTYPE != <T::Acc as Element>::DTYPE {
        pairwise_in_place(ctx, s, buf, part, op)?;
        return allgather_phase(ctx, buf, part);
    }
    let m = part.max_len();
    let mut cur = typed::<T::Acc>(&mut s.a, m);
    let mut nxt = typed::<T::Acc>(&mut s.b, m);
    let size = std::mem::size_of::<T::Acc>();
    let (lt, rt) = (left(me, n), right(me, n));
    for step in 0..n - 1 {
        let (ss, rs) = reduce_scatter_step(me, n, step);
        let (sr, rr) = (part.range(ss), part.range(rs));
        let last = step == n - 2;
        let slen = sr.len();
        let (sseg, rseg) = disjoint(buf, sr, rr.clone());
        // Here the accumulator type is the element type: step 0 sends the raw values.
        let send = if step == 0 {
            as_bytes(sseg)
        } else {
            as_bytes(&cur[..slen])
        };
        let mut fold = |off: usize, bytes: &mut [u8]| {
            let partial = from_bytes_mut::<T::Acc>(bytes);
            let at = off / size;
            let own = &mut rseg[at..at + partial.len()];
            if last {
                fold_finish(own, partial, op, n);
            } else {
                fold_into(partial, own, op);
            }
        };
        ctx.stream::<T::Acc>(
            Some((rt, send)),
            Some((lt, as_bytes_mut(&mut nxt[..rr.len()]))),
            &mut fold,
        )?;
        std::mem::swap(&mut cur, &mut nxt);
    }
    allgather_phase(ctx, buf, part)
}

/// Reduce-scatter: rank `r` receives block `r` of the reduction of every rank's `send`.
pub(crate) fn reduce_scatter_ring<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    send: &[T],
    recv: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let n = ctx.n();
    ctx.announce(&mut s.pool)?;
    let part = Partition::new(send.len(), n);
    let acc = if T::DTYPE != <T::Acc as Element>::DTYPE {
        pairwise_reduce_scatter_phase(ctx, &mut s.a, &mut s.b, send, part, op)?
    } else {
        reduce_scatter_phase(ctx, &mut s.a, &mut s.b, send, part, op)?
    };
    finish_into(recv, acc, op, n);
    Ok(())
}

/// Allgather in place over the ring (block `me` of `buf` is this rank's contribution).
pub(crate) fn allgather_ring<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    buf: &mut [T],
) -> Result<()> {
    let n = ctx.n();
    ctx.announce(&mut s.pool)?;
    allgather_phase(ctx, buf, Partition::new(buf.len(), n))
}

/// Broadcast along the chain `root, root+1, …`, pipelined: a rank forwards chunk `k-1`
/// while it receives chunk `k`.
pub(crate) fn broadcast_chain<T: Element>(
    ctx: &mut Ctx,
    s: &mut Scratch,
    buf: &mut [T],
    root: usize,
) -> Result<()> {
    let (me, n) = (ctx.rank(), ctx.n());
    ctx.announce(&mut s.pool)?;
    if n == 1 {
        return Ok(());
    }
    let (lt, rt) = (left(me, n), right(me, n));
    let pos = chain_position(me, root, n);
    let chunk = ctx.chunk_elems::<T>();
    let all = 0..buf.len();
    let pieces = chunk_count(buf.len(), chunk);
    if pos == 0 {
        for k in 0..pieces {
            let c = piece(&all, k, chunk).expect("k < pieces");
            ctx.exchange(
                &[SendOp {
                    peer: rt,
                    payload: as_bytes(&buf[c]),
                }],
                &mut [],
            )?;
        }
        return Ok(());
    }
    for k in 0..=pieces {
        let sc = if pos + 1 < n && k >= 1 {
            piece(&all, k - 1, chunk)
        } else {
            None
        };
        let rc = piece(&all, k, chunk);
        let (sbuf, rbuf) = disjoint(
            buf,
            sc.clone().unwrap_or(0..0),
            rc.clone().unwrap_or(all.end..all.end),
        );
        let send = sc.map(|_| SendOp {
            peer: rt,
            payload: as_bytes(sbuf),
        });
        let mut recv = rc.map(|_| RecvOp {
            peer: lt,
            buf: as_bytes_mut(rbuf),
        });
        ctx.exchange(send.as_slice(), recv.as_mut_slice())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_borrows_either_order() {
        let mut v = [0, 1, 2, 3, 4, 5];
        let (a, b) = disjoint(&mut v, 0..2, 4..6);
        assert_eq!(a, &[0, 1]);
        b[0] = 9;
        let (a, b) = disjoint(&mut v, 4..6, 1..3);
        assert_eq!(a, &[9, 5]);
        assert_eq!(b, &mut [1, 2]);
        let (a, b) = disjoint(&mut v, 0..0, 6..6);
        assert!(a.is_empty() && b.is_empty());
    }

    #[test]
    fn pieces_cover_the_range() {
        assert_eq!(piece(&(3..10), 0, 4), Some(3..7));
        assert_eq!(piece(&(3..10), 1, 4), Some(7..10));
        assert_eq!(piece(&(3..10), 2, 4), None);
        assert_eq!(piece(&(3..3), 0, 4), Some(3..3));
    }
}
