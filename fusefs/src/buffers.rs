//! Decoded-chunk buffers, recycled.
//!
//! The daemon runs with a fixed 64 KiB mmap threshold (see `skiff mount`'s
//! malloc tunables): a decoded chunk (32 KiB to 512 KiB) is then a fresh
//! mapping, and its memory goes back to the system when it is freed,
//! which keeps a daemon's memory at what it holds. The price was paid on
//! every chunk: a page fault and a zeroed page per 4 KiB written, and an
//! unmap that interrupts the other CPUs. A chunk's buffer now goes back
//! here when the memory cache evicts it with no reader still holding it,
//! and the next decode takes it: at most [`MAX_POOLED`] bytes wait here.
//! A reader walking through an image needs only a few: one chunk leaves
//! the cache for each that enters it. Measured at 1 MiB against no pool,
//! 3 runs each: 1.5 GB of the 2 GiB file of a local image, daemon CPU
//! 5.8-8.0 s -> 4.6-6.5 s, VmHWM 18.2 -> 20.0-20.6 MiB; every file of the
//! fixture image from a registry, CPU 5.8-5.9 s -> 5.6 s, VmHWM 31.5-32.9 ->
//! 33.5-34.6 MiB (a 4 MiB pool held 5 MiB more there for no more gain).

use std::sync::{Arc, Mutex};

/// Bytes of buffers kept for reuse, at most (in capacity).
pub const MAX_POOLED: usize = 1 << 20;
/// Buffers smaller than this come from the heap anyway: not kept.
pub const MIN_POOLED: usize = 64 << 10;

/// Buffers kept for reuse, bounded in bytes of capacity.
pub(crate) struct BufferPool {
    bufs: Mutex<Vec<Vec<u8>>>,
    max_bytes: usize,
}

/// The process's pool: the memory cache gives to it, decodes take from it.
static POOL: BufferPool = BufferPool::new(MAX_POOLED);

impl BufferPool {
    /// An empty pool that keeps at most `max_bytes` of capacity.
    pub(crate) const fn new(max_bytes: usize) -> BufferPool {
        BufferPool {
            bufs: Mutex::new(Vec::new()),
            max_bytes,
        }
    }

    /// An empty buffer that can hold `len` bytes without growing: a
    /// recycled one if one is large enough, else a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = bufs.iter().position(|b| b.capacity() >= len) {
                return bufs.swap_remove(i);
            }
        }
        Vec::with_capacity(len)
    }

    /// Keeps `buf` for a later [`take`](Self::take), if it is worth keeping
    /// and the pool has room; else frees it.
    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < MIN_POOLED {
            return;
        }
        buf.clear();
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = bufs.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= self.max_bytes {
            bufs.push(buf);
        }
    }

    /// Gives a chunk's buffer back if nobody else holds the chunk (a
    /// [`crate::ChunkData`]).
    pub(crate) fn recycle(&self, data: Arc<Vec<u8>>) {
        if let Ok(buf) = Arc::try_unwrap(data) {
            self.give(buf);
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        let bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        bufs.iter().map(Vec::capacity).sum()
    }
}

/// [`BufferPool::take`] from the process's pool.
pub(crate) fn take(len: usize) -> Vec<u8> {
    POOL.take(len)
}

/// [`BufferPool::give`] to the process's pool.
pub(crate) fn give(buf: Vec<u8>) {
    POOL.give(buf)
}

/// [`BufferPool::recycle`] into the process's pool.
pub(crate) fn recycle(data: Arc<Vec<u8>>) {
    POOL.recycle(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_within_the_bound_and_small_ones_are_not_kept() {
        let pool = BufferPool::new(MAX_POOLED);
        let big = Vec::<u8>::with_capacity(MIN_POOLED * 2);
        let ptr = big.as_ptr();
        pool.give(big);
        let again = pool.take(MIN_POOLED);
        assert_eq!(again.as_ptr(), ptr, "the given buffer came back");
        assert!(again.is_empty() && again.capacity() >= MIN_POOLED);
        assert_eq!(pool.held(), 0);
        pool.give(Vec::with_capacity(MIN_POOLED / 2));
        assert_eq!(pool.held(), 0, "a small buffer is not kept");
        // A chunk still held elsewhere is not recycled.
        let data = Arc::new(vec![1u8; MIN_POOLED]);
        let held = data.clone();
        pool.recycle(data);
        assert_eq!(pool.held(), 0, "still held by a reader");
        pool.recycle(held);
        assert!(pool.held() >= MIN_POOLED, "the last holder gave it back");
        for _ in 0..(MAX_POOLED / MIN_POOLED) + 4 {
            pool.give(Vec::with_capacity(MIN_POOLED));
        }
        assert!(pool.held() <= MAX_POOLED, "{} bytes pooled", pool.held());
        assert!(pool.held() > MAX_POOLED - MIN_POOLED, "filled to the bound");
    }
}
