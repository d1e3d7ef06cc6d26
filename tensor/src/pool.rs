//! Reusable byte buffers for streamed tensor chunks.
//!
//! Encoding a large tensor produces one megabyte-sized buffer per chunk. Allocated fresh,
//! each is a new mapping whose page faults (and the heap trims after it is freed) cost as
//! much as the copy into it; a pool hands the same few buffers out again.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A shared pool of byte buffers. Cloning shares the pool.
#[derive(Clone, Debug, Default)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Buffers kept for reuse at most (enough for the chunks in flight on a few streams).
const MAX_POOLED: usize = 16;

impl BufferPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer with room for at least `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self.free.lock().map(|mut f| f.pop()).ok().flatten().unwrap_or_default();
        buf.clear();
        buf.reserve(capacity);
        buf
    }

    /// Wraps `buf` as `Bytes` that return the buffer to this pool when the last reference drops.
    pub fn freeze(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: Arc::clone(&self.free) })
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.lock() {
            if free.len() < MAX_POOLED {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_after_the_bytes_drop() {
        let pool = BufferPool::new();
        let mut b = pool.take(1024);
        b.extend_from_slice(b"hello");
        let ptr = b.as_ptr();
        let bytes = pool.freeze(b);
        assert_eq!(&bytes[..], b"hello");
        let clone = bytes.slice(1..3);
        drop(bytes);
        assert!(pool.free.lock().unwrap().is_empty(), "still referenced by a slice");
        drop(clone);
        let again = pool.take(10);
        assert_eq!(again.as_ptr(), ptr, "the same allocation is reused");
        assert!(again.is_empty());
    }
}
