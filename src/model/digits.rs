//! The UCI optical-digits dataset (8x8 images, 10 classes) as used by `parasync demo`.
//!
//! The file is a gzip CSV with no header: 64 pixel columns (integers 0..=16) followed by the
//! label (0..=9). Pixels are scaled to [0, 1] on load so the model never sees raw counts.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context};
use flate2::read::GzDecoder;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The data set shipped in `data/` (CC BY 4.0, see `data/README.md`), built into the program
/// so that an installed binary needs no file beside it.
const BUILT_IN: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// Pixels per image (8x8); the width of one row of [`Dataset::x`].
pub const FEATURES: usize = 64;
/// Number of classes (digits 0..=9).
pub const CLASSES: usize = 10;
/// Largest raw pixel value in the file; pixels are divided by it on load.
const MAX_PIXEL: u32 = 16;

/// A set of labelled digit images held in memory.
///
/// Invariant: `x.len() == y.len() * FEATURES` and every label is `< CLASSES`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// Pixels, `len() * FEATURES` values row-major, each scaled to [0, 1].
    pub x: Vec<f32>,
    /// One label per row, in 0..CLASSES.
    pub y: Vec<u8>,
}

impl Dataset {
    /// Number of rows (images).
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when the dataset has no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The pixels of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * FEATURES..(i + 1) * FEATURES]
    }

    /// Reads a gzip CSV of digits (see the module docs for the format).
    ///
    /// Blank lines are ignored. Any malformed row is an error naming the file and the 1-based
    /// line number, so a corrupt or wrong file is caught before training starts.
    pub fn load(path: &Path) -> anyhow::Result<Dataset> {
        let file =
            File::open(path).with_context(|| format!("opening dataset {}", path.display()))?;
        Self::parse_gz(file, &path.display().to_string())
    }

    /// The digits data built into the program (`data/digits.csv.gz`).
    pub fn built_in() -> anyhow::Result<Dataset> {
        Self::parse_gz(BUILT_IN, "the built-in digits data")
    }

    /// [`Dataset::load`] of `path`, or [`Dataset::built_in`] without one.
    pub fn load_or_built_in(path: Option<&Path>) -> anyhow::Result<Dataset> {
        path.map_or_else(Self::built_in, Self::load)
    }

    /// Parses gzip CSV bytes from `source`, called `name` in errors.
    fn parse_gz(source: impl std::io::Read, name: &str) -> anyhow::Result<Dataset> {
        let reader = BufReader::new(GzDecoder::new(source));
        let mut data = Dataset::default();
        for (index, line) in reader.lines().enumerate() {
            let lineno = index + 1;
            let line = line.with_context(|| format!("reading {name} (gzip CSV) at line {lineno}"))?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            parse_row(line, &mut data).with_context(|| format!("{name}: line {lineno}"))?;
        }
        if data.is_empty() {
            bail!("{name}: no rows");
        }
        Ok(data)
    }

    /// Deterministic shuffled split: (train, test) with `test_fraction` of rows in test, by a seeded permutation.
    ///
    /// The test size is `round(len * test_fraction)`; every row lands in exactly one half, and
    /// the same `(test_fraction, seed)` always gives the same split, so every worker in a
    /// distributed run can compute it independently and agree.
    ///
    /// Panics if `test_fraction` is not in [0, 1].
    pub fn split(&self, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        assert!(
            (0.0..=1.0).contains(&test_fraction),
            "test_fraction must be in [0, 1], got {test_fraction}"
        );
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        let n_test = (self.len() as f64 * test_fraction).round() as usize;
        let (test, train) = order.split_at(n_test);
        (self.rows(train), self.rows(test))
    }

    /// Rows i where i % parts == part (a worker's shard of the training data).
    ///
    /// The shards for `part in 0..parts` cover every row exactly once. Panics if
    /// `part >= parts`.
    pub fn shard(&self, part: usize, parts: usize) -> Dataset {
        assert!(part < parts, "shard {part} out of range for {parts} parts");
        let idx: Vec<usize> = (part..self.len()).step_by(parts).collect();
        self.rows(&idx)
    }

    /// Gathers the rows at `idx` (in that order, repeats allowed) into a new dataset.
    ///
    /// Panics if an index is out of range.
    pub fn rows(&self, idx: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(idx.len() * FEATURES);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            x.extend_from_slice(self.row(i));
            y.push(self.y[i]);
        }
        Dataset { x, y }
    }
}

/// Parses one CSV line and appends it to `data`; on error `data` is left unchanged.
fn parse_row(line: &str, data: &mut Dataset) -> anyhow::Result<()> {
    let mut pixels = [0f32; FEATURES];
    let mut fields = line.split(',');
    for (col, pixel) in pixels.iter_mut().enumerate() {
        let field = fields
            .next()
            .with_context(|| format!("expected {} columns, found {col}", FEATURES + 1))?;
        let value = parse_int(field, col + 1, MAX_PIXEL)?;
        *pixel = value as f32 / MAX_PIXEL as f32;
    }
    let field = fields
        .next()
        .with_context(|| format!("expected {} columns, found {FEATURES}", FEATURES + 1))?;
    let label = parse_int(field, FEATURES + 1, CLASSES as u32 - 1)?;
    let extra = fields.count();
    if extra > 0 {
        bail!(
            "expected {} columns, found {}",
            FEATURES + 1,
            FEATURES + 1 + extra
        );
    }
    data.x.extend_from_slice(&pixels);
    data.y.push(label as u8);
    Ok(())
}

/// Parses a non-negative integer field (1-based column `col`) that must be `<= max`.
fn parse_int(field: &str, col: usize, max: u32) -> anyhow::Result<u32> {
    let field = field.trim();
    let value: u32 = field
        .parse()
        .with_context(|| format!("column {col}: {field:?} is not a non-negative integer"))?;
    if value > max {
        bail!("column {col}: {value} is out of range 0..={max}");
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn data_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz")
    }

    /// A small dataset whose row i has label i % 10 and all pixels equal to i, so rows can be
    /// identified after shuffling.
    fn numbered(n: usize) -> Dataset {
        Dataset {
            x: (0..n)
                .flat_map(|i| std::iter::repeat_n(i as f32, FEATURES))
                .collect(),
            y: (0..n).map(|i| (i % CLASSES) as u8).collect(),
        }
    }

    fn ids(d: &Dataset) -> Vec<usize> {
        (0..d.len()).map(|i| d.row(i)[0] as usize).collect()
    }

    fn write_gz(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("parasync-{}-{name}", std::process::id()));
        let mut enc = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        path
    }

    #[test]
    fn the_built_in_copy_is_the_file() {
        assert_eq!(Dataset::built_in().unwrap(), Dataset::load(&data_path()).unwrap());
        assert_eq!(Dataset::load_or_built_in(None).unwrap().len(), 1797);
    }

    #[test]
    fn loads_real_file() {
        let d = Dataset::load(&data_path()).unwrap();
        assert_eq!(d.len(), 1797);
        assert_eq!(d.x.len(), 1797 * FEATURES);
        assert!(d.x.iter().all(|&p| (0.0..=1.0).contains(&p)));
        assert!(
            d.x.contains(&1.0),
            "pixels should reach the top of the range"
        );
        let mut seen = [0usize; CLASSES];
        for &label in &d.y {
            seen[label as usize] += 1;
        }
        // Each digit appears roughly 180 times; all ten must be present.
        assert!(seen.iter().all(|&c| c > 150), "label counts {seen:?}");
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let good = vec!["0"; FEATURES + 1].join(",");
        let cases = [
            ("short", format!("{good}\n1,2,3\n"), "line 2"),
            (
                "label",
                format!(
                    "{good}\n{}\n",
                    [vec!["0"; FEATURES].join(","), "10".into()].join(",")
                ),
                "column 65",
            ),
            (
                "pixel",
                format!("17,{}\n", vec!["0"; FEATURES].join(",")),
                "column 1",
            ),
            (
                "text",
                format!("{good}\n\nx,{}\n", vec!["0"; FEATURES].join(",")),
                "line 3",
            ),
            ("long", format!("{good},0\n"), "found 66"),
            ("empty", String::new(), "no rows"),
        ];
        for (name, text, want) in cases {
            let path = write_gz(name, &text);
            let err = format!("{:#}", Dataset::load(&path).unwrap_err());
            std::fs::remove_file(&path).ok();
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
            assert!(
                err.contains(want),
                "{name}: {err:?} should mention {want:?}"
            );
        }
        let missing = Path::new("/nonexistent/digits.csv.gz");
        let err = format!("{:#}", Dataset::load(missing).unwrap_err());
        assert!(err.contains("/nonexistent/digits.csv.gz"), "{err}");
    }

    #[test]
    fn split_sizes_determinism_and_disjointness() {
        let d = numbered(1797);
        let (train, test) = d.split(0.2, 0);
        assert_eq!(test.len(), 359); // round(1797 * 0.2) = round(359.4)
        assert_eq!(train.len(), 1797 - 359);
        assert_eq!(d.split(0.2, 0), (train.clone(), test.clone()));
        assert_ne!(
            d.split(0.2, 1).1,
            test,
            "a different seed should shuffle differently"
        );

        let mut all: Vec<usize> = ids(&train).into_iter().chain(ids(&test)).collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..1797).collect::<Vec<_>>(),
            "every row in exactly one half"
        );
        // Labels travel with their pixels.
        for (i, &id) in ids(&train).iter().enumerate() {
            assert_eq!(train.y[i] as usize, id % CLASSES);
        }

        assert_eq!(d.split(0.0, 3).1.len(), 0);
        assert_eq!(d.split(1.0, 3).0.len(), 0);
    }

    #[test]
    fn shards_cover_every_row_once() {
        let d = numbered(103);
        for parts in [1, 2, 3, 7] {
            let mut all = Vec::new();
            for part in 0..parts {
                let s = d.shard(part, parts);
                assert!(ids(&s).iter().all(|&id| id % parts == part));
                all.extend(ids(&s));
            }
            all.sort_unstable();
            assert_eq!(all, (0..103).collect::<Vec<_>>(), "parts = {parts}");
        }
    }

    #[test]
    fn rows_gathers_in_order() {
        let d = numbered(5);
        let g = d.rows(&[4, 0, 4]);
        assert_eq!(ids(&g), vec![4, 0, 4]);
        assert_eq!(g.y, vec![4, 0, 4]);
        assert!(d.rows(&[]).is_empty());
    }
}
