//! Deterministic placement of variables on shards.
//!
//! Every worker computes the same placement from the same variable list and shard count,
//! so no coordination is needed: small variables go whole to the least-loaded shard
//! (largest first, balanced by bytes); large ones are split into row blocks over all
//! shards, like TensorFlow's `MinSizePartitioner`, and into blocks of at most
//! `max_part_bytes` (like `MaxSizePartitioner`), so that even on one shard a large
//! tensor moves as several streams in parallel.

use parasync_tensor::DType;

/// One contiguous piece of a variable on one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Shard holding this piece.
    pub shard: usize,
    /// Name of the piece on the shard: the variable name, or `name/part-i-of-n` for a split one.
    pub name: String,
    /// Shape of the piece (rows of the variable's first dimension, other dimensions kept).
    pub shape: Vec<usize>,
    /// Element range of the piece within the whole variable (row-major, so contiguous).
    pub elements: std::ops::Range<usize>,
}

/// Where every variable lives: `parts[v]` are the pieces of variable `v`, in row order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Pieces of each variable, indexed like the input.
    pub parts: Vec<Vec<Part>>,
    /// Bytes placed on each shard.
    pub shard_bytes: Vec<usize>,
}

/// Computes the placement of variables `(name, shape, dtype)` on `num_shards` shards.
/// Variables of at least `split_bytes` bytes are split into `num_shards` row blocks, and
/// into as many as needed to keep each block within `max_part_bytes`, but never into more
/// blocks than they have rows (a variable with fewer rows than shards spreads over as many
/// shards as it has rows); block `i` goes to shard `(first + i) % num_shards`, where
/// `first` is the least-loaded shard.
///
/// The result depends on the set of variables, not on the order they are listed in
/// (variables are taken by name), so workers that list them differently still agree.
/// Names must be distinct.
pub fn place(vars: &[(&str, &[usize], DType)], num_shards: usize, split_bytes: usize, max_part_bytes: usize) -> Placement {
    assert!(num_shards > 0, "placement needs at least one shard");
    let mut parts: Vec<Vec<Part>> = vec![Vec::new(); vars.len()];
    let mut load = vec![0usize; num_shards];
    let size = |shape: &[usize]| shape.iter().product::<usize>();
    let mut whole = Vec::new();
    let mut by_name: Vec<usize> = (0..vars.len()).collect();
    by_name.sort_by(|&a, &b| vars[a].0.cmp(vars[b].0));
    for i in by_name {
        let (name, shape, dtype) = &vars[i];
        let n = size(shape);
        let bytes = n * dtype.size();
        let rows = shape.first().copied().unwrap_or(1);
        let by_size = bytes.div_ceil(max_part_bytes.max(1));
        let nparts = num_shards.max(by_size).min(rows);
        if nparts > 1 && bytes >= split_bytes {
            let row_elems = n / rows.max(1);
            let first = (0..num_shards).min_by_key(|&s| (load[s], s)).expect("at least one shard");
            for p in 0..nparts {
                let (r0, r1) = (p * rows / nparts, (p + 1) * rows / nparts);
                let shard = (first + p) % num_shards;
                let mut pshape = shape.to_vec();
                pshape[0] = r1 - r0;
                load[shard] += (r1 - r0) * row_elems * dtype.size();
                parts[i].push(Part {
                    shard,
                    name: format!("{name}/part-{p}-of-{nparts}"),
                    shape: pshape,
                    elements: r0 * row_elems..r1 * row_elems,
                });
            }
        } else {
            whole.push((i, bytes));
        }
    }
    // Largest first (then by name) onto the least-loaded shard (then lowest index).
    whole.sort_by(|a, b| b.1.cmp(&a.1).then(vars[a.0].0.cmp(vars[b.0].0)));
    for (i, bytes) in whole {
        let shard = (0..num_shards).min_by_key(|&s| (load[s], s)).expect("at least one shard");
        load[shard] += bytes;
        let (name, shape, _) = vars[i];
        parts[i].push(Part { shard, name: name.to_string(), shape: shape.to_vec(), elements: 0..size(shape) });
    }
    Placement { parts, shard_bytes: load }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_variables_are_listed_in_does_not_matter() {
        let vars: Vec<(&str, &[usize], DType)> = vec![
            ("l1/w", &[256, 256], DType::F32),
            ("l2/w", &[256, 256], DType::F32),
            ("emb", &[5000, 64], DType::F32), // split over the shards
            ("l1/b", &[256], DType::F32),
            ("l2/b", &[256], DType::F32),
            ("head", &[512, 300], DType::Bf16),
        ];
        let by_name = |vars: &[(&str, &[usize], DType)]| {
            let p = place(vars, 3, 1 << 20, 16 << 20);
            let mut v: Vec<(String, Vec<Part>)> = vars.iter().map(|x| x.0.to_string()).zip(p.parts).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            (v, p.shard_bytes)
        };
        let want = by_name(&vars);
        let mut reversed = vars.clone();
        reversed.reverse();
        assert_eq!(by_name(&reversed), want);
        let mut rotated = vars.clone();
        rotated.rotate_left(2);
        assert_eq!(by_name(&rotated), want);
    }

    #[test]
    fn small_variables_balance_by_bytes() {
        let vars: Vec<(&str, &[usize], DType)> = vec![
            ("w1", &[64, 128], DType::F32),
            ("b1", &[128], DType::F32),
            ("w2", &[128, 10], DType::F32),
            ("b2", &[10], DType::F32),
        ];
        let p = place(&vars, 2, 1 << 20, 16 << 20);
        let shards: Vec<usize> = p.parts.iter().map(|v| v[0].shard).collect();
        assert_eq!(shards, vec![0, 1, 1, 1]);
        assert_eq!(p.shard_bytes, vec![64 * 128 * 4, (128 + 1280 + 10) * 4]);
        assert!(p.parts.iter().all(|v| v.len() == 1));
    }

    #[test]
    fn large_variables_split_into_row_blocks_covering_all_rows() {
        let vars: Vec<(&str, &[usize], DType)> = vec![("emb", &[1001, 256], DType::F32), ("b", &[4], DType::Bf16)];
        let p = place(&vars, 3, 1 << 19, 16 << 20);
        let emb = &p.parts[0];
        assert_eq!(emb.len(), 3);
        assert_eq!(emb[0].name, "emb/part-0-of-3");
        let rows: Vec<usize> = emb.iter().map(|q| q.shape[0]).collect();
        assert_eq!(rows, vec![333, 334, 334]);
        assert_eq!(emb[0].elements.start, 0);
        assert_eq!(emb[2].elements.end, 1001 * 256);
        for w in emb.windows(2) {
            assert_eq!(w[0].elements.end, w[1].elements.start);
        }
        assert_eq!(p.parts[1][0].shard, 0, "ties go to the lowest shard");
    }

    #[test]
    fn placement_is_deterministic_and_one_shard_keeps_everything_whole() {
        let vars: Vec<(&str, &[usize], DType)> = vec![("a", &[4096, 1024], DType::F32), ("b", &[7], DType::F32)];
        assert_eq!(place(&vars, 4, 1024, 16 << 20), place(&vars, 4, 1024, 16 << 20));
        let p = place(&vars, 1, 1024, 64 << 20);
        assert!(p.parts.iter().all(|v| v.len() == 1 && v[0].shard == 0));
    }

    #[test]
    fn large_variables_split_by_size_even_on_one_shard() {
        let vars: Vec<(&str, &[usize], DType)> = vec![("big", &[4096, 4096], DType::F32)]; // 64 MiB
        let p = place(&vars, 1, 1 << 20, 16 << 20);
        assert_eq!(p.parts[0].len(), 4);
        assert!(p.parts[0].iter().all(|q| q.shard == 0 && q.shape == vec![1024, 4096]));
        let p = place(&vars, 3, 1 << 20, 16 << 20);
        let shards: Vec<usize> = p.parts[0].iter().map(|q| q.shard).collect();
        assert_eq!(shards, vec![0, 1, 2, 0]);
        // a tensor with fewer rows than the size rule asks for is cut into at most its rows
        let thin: Vec<(&str, &[usize], DType)> = vec![("t", &[2, 1 << 24], DType::F32)];
        assert_eq!(place(&thin, 1, 1 << 20, 16 << 20).parts[0].len(), 2);
        // and with fewer rows than shards it still spreads, a row to a shard
        let p = place(&thin, 4, 1 << 20, 16 << 20);
        let got: Vec<(usize, Vec<usize>)> = p.parts[0].iter().map(|q| (q.shard, q.shape.clone())).collect();
        assert_eq!(got, vec![(0, vec![1, 1 << 24]), (1, vec![1, 1 << 24])]);
        assert_eq!(p.shard_bytes, vec![64 << 20, 64 << 20, 0, 0]);
    }
}
