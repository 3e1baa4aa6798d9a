//! Large buffers of the read path, recycled: decoded chunks, stored runs
//! read from local blobs, and replies assembled from several chunks.
//!
//! The daemon runs with a fixed 64 KiB mmap threshold (see `skiff mount`'s
//! malloc settings): each such buffer is then a fresh mapping, and its
//! memory goes back to the system when it is freed, which keeps a daemon's
//! memory at what it holds. The price was paid on every buffer: a page
//! fault and a zeroed page per 4 KiB written, and an unmap that interrupts
//! the other CPUs. Buffers now come back here: a chunk's when the memory
//! cache evicts it with no reader still holding it, a run's once its
//! chunks are decoded (unless the disk queue shares it), a reply's once it
//! is sent. A take gets the smallest buffer that fits, else the largest,
//! grown (a grown mapping keeps its pages), so that a buffer too small for
//! anything is not held for nothing.
//!
//! The bound: [`MAX_POOLED`] (1 MiB) for blobs that come over a network,
//! where the buffers of the HTTP client dominate and a larger pool only
//! held more; [`MAX_POOLED_LOCAL`] (4 MiB) for blobs on this node, where
//! every read is a run, decodes and usually an assembled 1 MiB reply.
//! Measured against the previous read path (1 MiB of decoded chunks only),
//! 3 runs each: the 2 GiB file of a local image read cold, 5.5-6.0 ->
//! 4.0-4.2 s, daemon CPU 8.6-9.3 -> 6.2-6.7 s, minor faults 1.13 million
//! -> 0.27 million, VmHWM 21-22 -> 30 MiB (back to 21 MiB since the read
//! pool has one thread per CPU for local blobs, see `daemon`); every file of the fixture
//! image, local, CPU 2.0-2.1 -> 1.55-1.75 s, VmHWM 24 -> 29-30 MiB; every
//! file of it from a registry, CPU 2.9-3.2 -> 2.6-2.9 s, VmHWM 31-33 MiB
//! both (a 4 MiB pool there: VmHWM +6 MiB, no gain).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of buffers kept for reuse, at most (in capacity), by a daemon
/// whose blobs come over a network.
pub const MAX_POOLED: usize = 1 << 20;
/// The bound when the blobs are files on this node (see the module
/// documentation for why it is larger).
pub const MAX_POOLED_LOCAL: usize = 4 << 20;
/// Buffers smaller than this come from the heap anyway: not kept.
pub const MIN_POOLED: usize = 64 << 10;

/// Buffers kept for reuse, bounded in bytes of capacity.
pub(crate) struct BufferPool {
    bufs: Mutex<Vec<Vec<u8>>>,
    max_bytes: AtomicUsize,
}

/// The process's pool: the memory cache gives to it, decodes take from it.
static POOL: BufferPool = BufferPool::new(MAX_POOLED);

impl BufferPool {
    /// An empty pool that keeps at most `max_bytes` of capacity.
    pub(crate) const fn new(max_bytes: usize) -> BufferPool {
        BufferPool {
            bufs: Mutex::new(Vec::new()),
            max_bytes: AtomicUsize::new(max_bytes),
        }
    }

    /// Raises the bound to `max_bytes` (never lowers it).
    pub(crate) fn raise_bound(&self, max_bytes: usize) {
        self.max_bytes.fetch_max(max_bytes, Ordering::Relaxed);
    }

    /// An empty buffer that can hold `len` bytes without growing: a
    /// recycled one if one is large enough, else a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest that fits; else the largest, grown: growing a
            // mapping keeps its pages, and a buffer too small to fit
            // anything left here would be held for nothing.
            let fit = bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .or_else(|| bufs.iter().enumerate().max_by_key(|(_, b)| b.capacity()))
                .map(|(i, _)| i);
            if let Some(i) = fit {
                let mut buf = bufs.swap_remove(i);
                drop(bufs);
                buf.reserve_exact(len);
                return buf;
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
        if held + buf.capacity() <= self.max_bytes.load(Ordering::Relaxed) {
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

/// [`BufferPool::raise_bound`] of the process's pool.
pub(crate) fn raise_bound(max_bytes: usize) {
    POOL.raise_bound(max_bytes)
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

    #[test]
    fn a_buffer_too_small_is_grown_rather_than_kept_and_the_bound_only_rises() {
        let pool = BufferPool::new(MAX_POOLED);
        pool.give(Vec::with_capacity(MIN_POOLED));
        pool.give(Vec::with_capacity(MIN_POOLED * 2));
        // Nothing fits 4x: the largest is taken and grown.
        let grown = pool.take(MIN_POOLED * 4);
        assert!(grown.capacity() >= MIN_POOLED * 4);
        assert_eq!(pool.held(), MIN_POOLED, "the smaller one stays");
        // The smallest that fits is taken.
        pool.give(grown);
        let fit = pool.take(MIN_POOLED);
        assert_eq!(fit.capacity(), MIN_POOLED);
        pool.raise_bound(MAX_POOLED_LOCAL);
        pool.raise_bound(MIN_POOLED);
        for _ in 0..(MAX_POOLED_LOCAL / MIN_POOLED) + 4 {
            pool.give(Vec::with_capacity(MIN_POOLED));
        }
        assert!(
            pool.held() > MAX_POOLED,
            "raised: {} bytes pooled",
            pool.held()
        );
        assert!(
            pool.held() <= MAX_POOLED_LOCAL,
            "{} bytes pooled",
            pool.held()
        );
    }
}
