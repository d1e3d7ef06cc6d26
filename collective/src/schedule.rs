//! Which block goes where, and when: the pure schedules of the algorithms (no I/O).
//!
//! A buffer of `count` elements is cut into `n` segments as evenly as possible (the first
//! `count % n` segments get one more element). Segments are then cut into chunks of at most
//! `chunk` elements, one frame each, so that sending, receiving and reducing are pipelined.
//!
//! Ring reduce-scatter is laid out so that rank `r` ends up owning segment `r` (what
//! `reduce_scatter` must return): at step `s` (0..n-1) rank `r` sends segment `r-s-1`
//! to its right neighbour and receives segment `r-s-2` from its left one. Segment `j` is
//! therefore accumulated in the fixed order `j+1, j+2, …, j` (indices mod `n`), whatever
//! the timing. Ring allgather then circulates the owned segments: at step `s` rank `r`
//! sends segment `r-s` and receives `r-s-1`.

use std::ops::Range;

/// Even split of `count` elements into `parts` segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Total elements.
    pub count: usize,
    /// Number of segments (at least 1).
    pub parts: usize,
}

impl Partition {
    /// Splits `count` into `parts` segments; `parts` must be at least 1.
    pub fn new(count: usize, parts: usize) -> Partition {
        assert!(parts > 0, "a partition needs at least one part");
        Partition { count, parts }
    }

    /// Element range of segment `j`.
    pub fn range(&self, j: usize) -> Range<usize> {
        let base = self.count / self.parts;
        let extra = self.count % self.parts;
        let start = j * base + j.min(extra);
        start..start + base + usize::from(j < extra)
    }

    /// The largest segment's length.
    pub fn max_len(&self) -> usize {
        self.count.div_ceil(self.parts)
    }
}

/// `(rank + n - k) mod n` for any `k`, without underflow.
fn back(rank: usize, k: usize, n: usize) -> usize {
    (rank + n - k % n) % n
}

/// Right neighbour in the ring.
pub fn right(rank: usize, n: usize) -> usize {
    (rank + 1) % n
}

/// Left neighbour in the ring.
pub fn left(rank: usize, n: usize) -> usize {
    (rank + n - 1) % n
}

/// Ring reduce-scatter step `s` of rank `r`: `(segment sent right, segment received from left)`.
pub fn reduce_scatter_step(rank: usize, n: usize, step: usize) -> (usize, usize) {
    (back(rank, step + 1, n), back(rank, step + 2, n))
}

/// Ring allgather step `s` of rank `r`: `(segment sent right, segment received from left)`.
pub fn allgather_step(rank: usize, n: usize, step: usize) -> (usize, usize) {
    (back(rank, step, n), back(rank, step + 1, n))
}

/// The order in which ranks' contributions to segment `j` are folded by the ring.
pub fn ring_fold_order(j: usize, n: usize) -> impl Iterator<Item = usize> {
    (1..=n).map(move |k| (j + k) % n)
}

/// Position of `rank` in the broadcast chain from `root` (root is 0).
pub fn chain_position(rank: usize, root: usize, n: usize) -> usize {
    (rank + n - root) % n
}

/// Splits `range` into consecutive pieces of at most `chunk` elements (one empty piece for an
/// empty range, so that every segment still sends one frame).
pub fn chunks(range: Range<usize>, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    let n = range.len().div_ceil(chunk).max(1);
    (0..n).map(move |i| {
        let start = range.start + i * chunk;
        start..(start + chunk).min(range.end)
    })
}

/// Number of pieces [`chunks`] yields.
pub fn chunk_count(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_table() {
        let table: &[(usize, usize, &[Range<usize>])] = &[
            (0, 3, &[0..0, 0..0, 0..0]),
            (1, 3, &[0..1, 1..1, 1..1]),
            (7, 3, &[0..3, 3..5, 5..7]),
            (6, 3, &[0..2, 2..4, 4..6]),
            (5, 1, &[0..5, 5..5][..1]),
        ];
        for (count, parts, want) in table {
            let p = Partition::new(*count, *parts);
            let got: Vec<_> = (0..*parts).map(|j| p.range(j)).collect();
            assert_eq!(&got, want, "count {count} parts {parts}");
            assert!(got.iter().all(|r| r.len() <= p.max_len()));
        }
    }

    #[test]
    fn ring_steps_for_four_ranks() {
        // (rank, step) -> (send, recv)
        let table = [
            ((0, 0), (3, 2)),
            ((0, 1), (2, 1)),
            ((0, 2), (1, 0)),
            ((1, 0), (0, 3)),
            ((3, 2), (0, 3)),
        ];
        for ((r, s), want) in table {
            assert_eq!(reduce_scatter_step(r, 4, s), want, "rank {r} step {s}");
        }
        assert_eq!(allgather_step(2, 4, 0), (2, 1));
        assert_eq!(allgather_step(2, 4, 2), (0, 3));
    }

    /// Simulates the schedule symbolically for every n: what each rank sends at step s is
    /// what its right neighbour expects, every rank forwards what it just received, the
    /// final owner of segment r is rank r, and every segment folds every rank exactly once.
    #[test]
    fn ring_schedule_is_consistent_for_every_world_size() {
        for n in 1..=9 {
            // contributions[r][j] = ranks folded into rank r's partial of segment j
            let mut held: Vec<Vec<Vec<usize>>> =
                (0..n).map(|r| (0..n).map(|_| vec![r]).collect()).collect();
            for s in 0..n.saturating_sub(1) {
                let sent: Vec<(usize, Vec<usize>)> = (0..n)
                    .map(|r| {
                        let (seg, _) = reduce_scatter_step(r, n, s);
                        (seg, held[r][seg].clone())
                    })
                    .collect();
                for r in 0..n {
                    let (_, recv) = reduce_scatter_step(r, n, s);
                    let (seg, partial) = &sent[left(r, n)];
                    assert_eq!(*seg, recv, "n {n} step {s} rank {r}");
                    let mut folded = partial.clone();
                    folded.push(r);
                    held[r][recv] = folded;
                    if s + 1 < n - 1 {
                        assert_eq!(
                            reduce_scatter_step(r, n, s + 1).0,
                            recv,
                            "forwards what it received"
                        );
                    }
                }
            }
            for (r, h) in held.iter().enumerate() {
                let order: Vec<usize> = ring_fold_order(r, n).collect();
                assert_eq!(
                    h[r], order,
                    "n {n}: rank {r} owns segment {r} folded in ring order"
                );
            }
            // allgather: rank r starts with segment r and ends with all.
            let mut have: Vec<Vec<bool>> =
                (0..n).map(|r| (0..n).map(|j| j == r).collect()).collect();
            for s in 0..n.saturating_sub(1) {
                let snapshot = have.clone();
                for r in 0..n {
                    let (send, recv) = allgather_step(r, n, s);
                    assert!(
                        snapshot[r][send],
                        "n {n} step {s}: rank {r} sends a segment it holds"
                    );
                    assert_eq!(allgather_step(left(r, n), n, s).0, recv);
                    have[r][recv] = true;
                }
            }
            assert!(have.iter().all(|h| h.iter().all(|&x| x)), "n {n}");
        }
    }

    #[test]
    fn chunking_table() {
        let got: Vec<_> = chunks(10..20, 4).collect();
        assert_eq!(got, vec![10..14, 14..18, 18..20]);
        assert_eq!(chunks(5..5, 4).collect::<Vec<_>>(), vec![5..5]);
        assert_eq!(chunk_count(0, 4), 1);
        assert_eq!(chunk_count(9, 4), 3);
        assert_eq!(chain_position(1, 3, 4), 2);
    }
}
