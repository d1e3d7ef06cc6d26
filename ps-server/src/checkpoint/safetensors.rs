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


/// The format's name of a storage dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    Dtype::from(dtype).name()
}

/// The element types a checkpoint file holds: values in a storage dtype, and the ids,
/// row bookkeeping and admission counts of sparse tables as unsigned integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    U64,
    U32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::U32 => 4,
            Dtype::Bf16 => 2,
            Dtype::U64 => 8,
        }
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::Bf16 => "BF16",
            Dtype::U64 => "U64",
            Dtype::U32 => "U32",
        }
    }

    /// The storage dtype this is, if it is one.
    pub fn storage(self) -> Option<DType> {
        match self {
            Dtype::F32 => Some(DType::F32),
            Dtype::Bf16 => Some(DType::Bf16),
            Dtype::U64 | Dtype::U32 => None,
        }
    }
}

impl From<DType> for Dtype {
    fn from(d: DType) -> Dtype {
        match d {
            DType::F32 => Dtype::F32,
            DType::Bf16 => Dtype::Bf16,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn parse_dtype(name: &str) -> anyhow::Result<Dtype> {
    match name {
        "F32" => Ok(Dtype::F32),
        "BF16" => Ok(Dtype::Bf16),
        "U64" => Ok(Dtype::U64),
        "U32" => Ok(Dtype::U32),
        other => bail!("dtype {other:?} (only F32, BF16, U64 and U32 are used here)"),
    }
}

/// Little-endian bytes of `u64`s.
pub fn u64_le_bytes(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes of `u32`s.
pub fn u32_le_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `u64`s from their little-endian bytes (a multiple of 8).
pub fn u64s_from_le(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
}

/// `u32`s from their little-endian bytes (a multiple of 4).
pub fn u32s_from_le(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()
}

/// One tensor to write: its name, dtype, shape and little-endian bytes.
pub struct TensorOut<'a> {
    pub name: String,
    pub dtype: Dtype,
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
            t.dtype.name(),
            elements * t.dtype.size() as u64,
            t.data.len()
        );
        let end = offset + t.data.len() as u64;
        let entry = serde_json::json!({ "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end] });
        ensure!(t.name != "__metadata__", "a tensor may not be called __metadata__");
        ensure!(header.insert(t.name.clone(), entry).is_none(), "two tensors are called {}", t.name);
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    json.resize(json.len().next_multiple_of(8), b' ');

    let total = 8 + json.len() as u64 + offset;
    let mut out = FileSink::create(path, total)?;
    out.write(&(json.len() as u64).to_le_bytes())?;
    out.write(&json)?;
    for t in tensors {
        out.write(t.data).with_context(|| format!("writing {}", path.display()))?;
    }
    out.finish().with_context(|| format!("writing {}", path.display()))
}

/// Size of the staging buffers of direct writes: large, so the disk sees long sequential writes.
const DIRECT_CHUNK: usize = 8 << 20;
/// Alignment O_DIRECT asks of buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;

/// Where a file's bytes go: with O_DIRECT where the filesystem allows it (the page cache
/// would double the memory traffic and, on many virtual disks, halve the rate), through a
/// pipeline of aligned staging buffers written by a thread of its own while the caller
/// fills the next; else through a plain buffered writer. Either way the CRC-32 of every
/// byte is computed on the way.
enum FileSink {
    Direct(DirectWriter),
    Buffered(CrcWriter<BufWriter<File>>),
}

impl FileSink {
    /// A sink for a file of `size` bytes: small files (a few chunks) go through the page
    /// cache, where an I/O thread and staging buffers would cost more than they save.
    fn create(path: &Path, size: u64) -> anyhow::Result<FileSink> {
        #[cfg(target_os = "linux")]
        if size >= 4 * DIRECT_CHUNK as u64 {
            use std::os::unix::fs::OpenOptionsExt;
            let direct = std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(path);
            if let Ok(file) = direct {
                return Ok(FileSink::Direct(DirectWriter::new(file)));
            }
        }
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let capacity = usize::try_from(size).unwrap_or(DIRECT_CHUNK).clamp(4096, DIRECT_CHUNK);
        Ok(FileSink::Buffered(CrcWriter { inner: BufWriter::with_capacity(capacity, file), crc: crc32fast::Hasher::new(), bytes: 0 }))
    }

    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        match self {
            FileSink::Direct(d) => d.write(data),
            FileSink::Buffered(b) => Ok(b.write_all(data)?),
        }
    }

    /// Writes what is left, fsyncs, and returns the size and checksum.
    fn finish(self) -> anyhow::Result<Written> {
        match self {
            FileSink::Direct(d) => d.finish(),
            FileSink::Buffered(out) => {
                let written = Written { bytes: out.bytes, crc32: out.crc.finalize() };
                let file = out.inner.into_inner().map_err(|e| e.into_error())?;
                file.sync_all().context("fsync")?;
                Ok(written)
            }
        }
    }
}

/// A staging buffer aligned for O_DIRECT.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let storage = vec![0u8; DIRECT_CHUNK + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        Aligned { storage, start }
    }

    fn buf(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + DIRECT_CHUNK]
    }
}

/// O_DIRECT writes of full aligned chunks on a thread of its own; the caller copies into
/// the next chunk (and checksums it) meanwhile.
struct DirectWriter {
    file: std::sync::Arc<File>,
    current: Aligned,
    filled: usize,
    offset: u64,
    crc: crc32fast::Hasher,
    bytes: u64,
    to_writer: Option<std::sync::mpsc::SyncSender<(Aligned, u64)>>,
    spare: std::sync::mpsc::Receiver<Aligned>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl DirectWriter {
    fn new(file: File) -> DirectWriter {
        let file = std::sync::Arc::new(file);
        let (to_writer, jobs) = std::sync::mpsc::sync_channel::<(Aligned, u64)>(1);
        let (give_back, spare) = std::sync::mpsc::channel::<Aligned>();
        let f = std::sync::Arc::clone(&file);
        let writer = std::thread::Builder::new()
            .name("checkpoint-io".into())
            .spawn(move || {
                for (mut chunk, offset) in jobs {
                    f.write_all_at(chunk.buf(), offset)?;
                    let _ = give_back.send(chunk);
                }
                Ok(())
            })
            .expect("spawning the checkpoint I/O thread");
        DirectWriter {
            file,
            current: Aligned::new(),
            filled: 0,
            offset: 0,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
            to_writer: Some(to_writer),
            spare,
            writer: Some(writer),
        }
    }

    fn write(&mut self, mut data: &[u8]) -> anyhow::Result<()> {
        while !data.is_empty() {
            let n = (DIRECT_CHUNK - self.filled).min(data.len());
            let dst = &mut self.current.buf()[self.filled..self.filled + n];
            dst.copy_from_slice(&data[..n]);
            self.crc.update(dst);
            self.filled += n;
            self.bytes += n as u64;
            data = &data[n..];
            if self.filled == DIRECT_CHUNK {
                self.send_current()?;
            }
        }
        Ok(())
    }

    /// Hands the full current chunk to the I/O thread and takes an empty one.
    fn send_current(&mut self) -> anyhow::Result<()> {
        // Two chunks in flight at most (one queued, one being written) plus the one filling.
        let next = match self.spare.try_recv() {
            Ok(b) => b,
            Err(_) if self.offset < 2 * DIRECT_CHUNK as u64 => Aligned::new(),
            Err(_) => match self.spare.recv() {
                Ok(b) => b,
                Err(_) => return Err(self.stop().err().unwrap_or_else(|| anyhow::anyhow!("the checkpoint I/O thread stopped"))),
            },
        };
        let full = std::mem::replace(&mut self.current, next);
        let sent = self.to_writer.as_ref().expect("open until finish").send((full, self.offset));
        if sent.is_err() {
            return Err(self.stop().err().unwrap_or_else(|| anyhow::anyhow!("the checkpoint I/O thread stopped")));
        }
        self.offset += DIRECT_CHUNK as u64;
        self.filled = 0;
        Ok(())
    }

    /// Closes the queue and waits for the I/O thread: its error, if it had one.
    fn stop(&mut self) -> anyhow::Result<()> {
        self.to_writer.take();
        match self.writer.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => Err(anyhow::Error::new(e).context("O_DIRECT write")),
            Some(Err(_)) => Err(anyhow::anyhow!("the checkpoint I/O thread panicked")),
            _ => Ok(()),
        }
    }

    fn finish(mut self) -> anyhow::Result<Written> {
        self.stop()?;
        if self.filled > 0 {
            // The tail, padded to the alignment with zeros, then cut back to its length.
            let padded = self.filled.next_multiple_of(DIRECT_ALIGN);
            self.current.buf()[self.filled..padded].fill(0);
            self.file.write_all_at(&self.current.buf()[..padded], self.offset)?;
        }
        self.file.set_len(self.bytes)?;
        self.file.sync_all().context("fsync")?;
        Ok(Written { bytes: self.bytes, crc32: self.crc.clone().finalize() })
    }
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
    let mut buf = vec![0u8; DIRECT_CHUNK];
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
    pub dtype: Dtype,
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
    /// Where the tensors' bytes begin (8 + the header's length).
    pub data_start: u64,
    /// The file's size.
    pub size: u64,
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
        Ok(Reader { file, path: path.to_path_buf(), tensors, metadata, data_start, size })
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

    /// The tensor called `name`.
    pub fn info(&self, name: &str) -> anyhow::Result<&TensorInfo> {
        self.tensors.get(name).with_context(|| format!("{}: no tensor {name}", self.path.display()))
    }

    /// Reads the whole file once, front to back: tensors listed in `into` (name, buffer of
    /// exactly its bytes) straight into their buffers, everything else into a scratch
    /// buffer; returns the size and CRC-32 of all the bytes read.
    pub fn read_all_into(&self, into: Vec<(&str, &mut [u8])>) -> anyhow::Result<Written> {
        let mut targets = Vec::with_capacity(into.len());
        for (name, buf) in into {
            let info = self.info(name)?;
            ensure!(buf.len() as u64 == info.end - info.start, "{name}: a {}-byte buffer for {} bytes", buf.len(), info.end - info.start);
            targets.push((info.start, buf));
        }
        targets.sort_by_key(|t| t.0);
        let mut crc = crc32fast::Hasher::new();
        let mut scratch = vec![0u8; DIRECT_CHUNK];
        let mut pos = 0u64;
        let read_skipped = |crc: &mut crc32fast::Hasher, scratch: &mut [u8], from: u64, to: u64| -> anyhow::Result<()> {
            let mut at = from;
            while at < to {
                let n = (to - at).min(scratch.len() as u64) as usize;
                self.file.read_exact_at(&mut scratch[..n], at)?;
                crc.update(&scratch[..n]);
                at += n as u64;
            }
            Ok(())
        };
        for (start, buf) in targets {
            ensure!(start >= pos, "{}: tensors overlap", self.path.display());
            read_skipped(&mut crc, &mut scratch, pos, start)?;
            for (k, chunk) in buf.chunks_mut(DIRECT_CHUNK).enumerate() {
                self.file.read_exact_at(chunk, start + (k * DIRECT_CHUNK) as u64).with_context(|| format!("reading {}", self.path.display()))?;
                crc.update(chunk);
            }
            pos = start + buf.len() as u64;
        }
        read_skipped(&mut crc, &mut scratch, pos, self.size)?;
        Ok(Written { bytes: self.size, crc32: crc.finalize() })
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
                TensorOut { name: "w".into(), dtype: Dtype::F32, shape: vec![3, 4], data: parasync_tensor::f32_as_le_bytes(&a) },
                TensorOut { name: "h".into(), dtype: Dtype::Bf16, shape: vec![3], data: parasync_tensor::u16_as_le_bytes(&b) },
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
    fn a_file_of_several_direct_chunks_and_a_ragged_tail_reads_back() {
        let dir = tempdir();
        let path = dir.join("big.safetensors");
        let a: Vec<f32> = (0..(5 * DIRECT_CHUNK / 8 + 123)).map(|i| (i as f32).sin()).collect();
        let b: Vec<u16> = (0..(DIRECT_CHUNK / 2 + 77) as u32).map(|i| i as u16).collect();
        let w = write(
            &path,
            &[
                TensorOut { name: "a".into(), dtype: Dtype::F32, shape: vec![a.len() as u64], data: parasync_tensor::f32_as_le_bytes(&a) },
                TensorOut { name: "b".into(), dtype: Dtype::Bf16, shape: vec![b.len() as u64], data: parasync_tensor::u16_as_le_bytes(&b) },
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(w.bytes > 3 * DIRECT_CHUNK as u64 && w.bytes % DIRECT_ALIGN as u64 != 0);
        assert_eq!(w, file_crc32(&path).unwrap(), "size and CRC as written");
        let r = Reader::open(&path).unwrap();
        let mut out = vec![0f32; a.len()];
        r.read_elements("a", 0..a.len() as u64, parasync_tensor::f32_as_le_bytes_mut(&mut out)).unwrap();
        assert_eq!(out, a);
        let mut out = vec![0u16; b.len()];
        r.read_elements("b", 0..b.len() as u64, parasync_tensor::u16_as_le_bytes_mut(&mut out)).unwrap();
        assert_eq!(out, b);
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
        let err = write(&path, &[TensorOut { name: "x".into(), dtype: Dtype::F32, shape: vec![2], data: &[0u8; 4] }], &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("needs 8 bytes, got 4"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("parasync-st-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
