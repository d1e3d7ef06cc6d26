//! The safetensors file format, written as a stream and read by ranges.
//!
//! A file is an 8-byte little-endian header length, a JSON header (padded with spaces to a
//! multiple of 8) mapping each tensor's name to its dtype, shape and byte range, an optional
//! `__metadata__` map of strings, and then the tensors' bytes back to back. The `safetensors`
//! Python package (and PyTorch, numpy, JAX through it) opens these files as they are.
//!
//! Writing streams each tensor from the caller's memory into the file (no file-sized buffer)
//! and computes the CRC-32 of every byte written on the way, which the checkpoint manifest
//! records; reading parses the header, checks it, and reads element ranges of one tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use parasync_tensor::DType;

/// Largest header accepted when reading (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Bytes handed to the kernel per write: large, so the disk sees long sequential writes.
const WRITE_BUFFER_BYTES: usize = 8 << 20;

/// The format's name of a storage dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::Bf16 => "BF16",
    }
}

fn parse_dtype(name: &str) -> anyhow::Result<DType> {
    match name {
        "F32" => Ok(DType::F32),
        "BF16" => Ok(DType::Bf16),
        other => bail!("dtype {other:?} (only F32 and BF16 are used here)"),
    }
}

/// One tensor to write: its name, dtype, shape and little-endian bytes.
pub struct TensorOut<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: &'a [u8],
}

/// What a write produced: the file's size and the CRC-32 of all its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub crc32: u32,
}

/// Writes `tensors` (names distinct) and `metadata` to `path`, then fsyncs it. The caller
/// picks a temporary name and renames it once the file is complete.
pub fn write(path: &Path, tensors: &[TensorOut<'_>], metadata: &BTreeMap<String, String>) -> anyhow::Result<Written> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0u64;
    for t in tensors {
        let elements: u64 = t.shape.iter().product();
        ensure!(
            elements * t.dtype.size() as u64 == t.data.len() as u64,
            "tensor {}: shape {:?} of {} needs {} bytes, got {}",
            t.name,
            t.shape,
            dtype_name(t.dtype),
            elements * t.dtype.size() as u64,
            t.data.len()
        );
        let end = offset + t.data.len() as u64;
        let entry = serde_json::json!({ "dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [offset, end] });
        ensure!(t.name != "__metadata__", "a tensor may not be called __metadata__");
        ensure!(header.insert(t.name.clone(), entry).is_none(), "two tensors are called {}", t.name);
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    json.resize(json.len().next_multiple_of(8), b' ');

    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = CrcWriter { inner: BufWriter::with_capacity(WRITE_BUFFER_BYTES, file), crc: crc32fast::Hasher::new(), bytes: 0 };
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    for t in tensors {
        out.write_all(t.data).with_context(|| format!("writing {}", path.display()))?;
    }
    let written = Written { bytes: out.bytes, crc32: out.crc.clone().finalize() };
    let file = out.inner.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("fsync of {}", path.display()))?;
    Ok(written)
}

/// A writer that counts and checksums what goes through it.
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The CRC-32 and size of a whole file, read sequentially.
pub fn file_crc32(path: &Path) -> anyhow::Result<Written> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; WRITE_BUFFER_BYTES];
    let mut bytes = 0u64;
    loop {
        let n = file.read_at(&mut buf, bytes).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Written { bytes, crc32: crc.finalize() })
}

/// One tensor of a file being read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Byte range within the file (not the data section).
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// An open safetensors file: its tensors and metadata.
pub struct Reader {
    file: File,
    path: std::path::PathBuf,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

impl Reader {
    /// Opens `path` and checks its header: every tensor's range lies inside the file and
    /// matches its dtype and shape.
    pub fn open(path: &Path) -> anyhow::Result<Reader> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).with_context(|| format!("{}: shorter than a safetensors header", path.display()))?;
        let n = u64::from_le_bytes(len);
        ensure!(n <= MAX_HEADER_BYTES && 8 + n <= size, "{}: header of {n} bytes does not fit a {size}-byte file", path.display());
        let mut json = vec![0u8; n as usize];
        file.read_exact_at(&mut json, 8)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&json).with_context(|| format!("{}: header is not a JSON object", path.display()))?;
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(v).with_context(|| format!("{}: __metadata__ is not a map of strings", path.display()))?;
                continue;
            }
            let info = Self::tensor_info(&v, data_start, size).with_context(|| format!("{}: tensor {name}", path.display()))?;
            tensors.insert(name, info);
        }
        Ok(Reader { file, path: path.to_path_buf(), tensors, metadata })
    }

    fn tensor_info(v: &serde_json::Value, data_start: u64, size: u64) -> anyhow::Result<TensorInfo> {
        #[derive(serde::Deserialize)]
        struct Entry {
            dtype: String,
            shape: Vec<u64>,
            data_offsets: [u64; 2],
        }
        let e: Entry = serde_json::from_value(v.clone())?;
        let dtype = parse_dtype(&e.dtype)?;
        let [a, b] = e.data_offsets;
        let elements = e.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).context("shape overflows")?;
        ensure!(a <= b && b.checked_add(data_start).is_some_and(|end| end <= size), "bytes {a}..{b} lie outside the file");
        ensure!(b - a == elements * dtype.size() as u64, "{} bytes for shape {:?} of {}", b - a, e.shape, e.dtype);
        Ok(TensorInfo { dtype, shape: e.shape, start: data_start + a, end: data_start + b })
    }

    /// The path this reader opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor called `name`.
    pub fn info(&self, name: &str) -> anyhow::Result<&TensorInfo> {
        self.tensors.get(name).with_context(|| format!("{}: no tensor {name}", self.path.display()))
    }

    /// Reads elements `range` of tensor `name` as little-endian bytes into `out`, whose
    /// length must be the range's in bytes.
    pub fn read_elements(&self, name: &str, range: std::ops::Range<u64>, out: &mut [u8]) -> anyhow::Result<()> {
        let info = self.info(name)?;
        let size = info.dtype.size() as u64;
        ensure!(range.start <= range.end && range.end <= info.elements(), "{name}: elements {range:?} of {}", info.elements());
        ensure!(out.len() as u64 == (range.end - range.start) * size, "{name}: buffer of {} bytes for {range:?}", out.len());
        self.file
            .read_exact_at(out, info.start + range.start * size)
            .with_context(|| format!("reading {name} from {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_with_its_metadata_and_checksum() {
        let dir = tempdir();
        let path = dir.join("t.safetensors");
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let b: Vec<u16> = vec![0x3f80, 0x4000, 0xbf80];
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        let w = write(
            &path,
            &[
                TensorOut { name: "w".into(), dtype: DType::F32, shape: vec![3, 4], data: parasync_tensor::f32_as_le_bytes(&a) },
                TensorOut { name: "h".into(), dtype: DType::Bf16, shape: vec![3], data: parasync_tensor::u16_as_le_bytes(&b) },
            ],
            &meta,
        )
        .unwrap();
        assert_eq!(w, file_crc32(&path).unwrap());
        assert_eq!(w.bytes, std::fs::metadata(&path).unwrap().len());
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.metadata, meta);
        assert_eq!(r.info("w").unwrap().shape, vec![3, 4]);
        let mut out = vec![0u8; 5 * 4];
        r.read_elements("w", 4..9, &mut out).unwrap();
        assert_eq!(out, parasync_tensor::f32_as_le_bytes(&a[4..9]));
        let mut out = vec![0u8; 6];
        r.read_elements("h", 0..3, &mut out).unwrap();
        assert_eq!(out, parasync_tensor::u16_as_le_bytes(&b));
        assert!(r.read_elements("w", 10..13, &mut [0u8; 12]).is_err());
        let header_len = u64::from_le_bytes(std::fs::read(&path).unwrap()[..8].try_into().unwrap());
        assert_eq!(header_len % 8, 0, "the header is padded to 8 bytes");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let dir = tempdir();
        let path = dir.join("bad.safetensors");
        std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        assert!(Reader::open(&path).err().unwrap().to_string().contains("does not fit"));
        let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 8]);
        std::fs::write(&path, &bytes).unwrap();
        let err = format!("{:#}", Reader::open(&path).err().unwrap());
        assert!(err.contains("outside the file"), "{err}");
        let err = write(&path, &[TensorOut { name: "x".into(), dtype: DType::F32, shape: vec![2], data: &[0u8; 4] }], &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("needs 8 bytes, got 4"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("parasync-st-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
