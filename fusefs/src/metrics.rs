//! Counters of the daemon, kept with relaxed atomics so that the read path
//! never takes a lock to count; logged at unmount and meant for export.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by the filesystem threads.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `read` requests served (successfully or not).
    pub reads: AtomicU64,
    /// File bytes returned by `read`.
    pub bytes_read: AtomicU64,
    /// Chunks fetched from the blob store (cache misses that did the work).
    pub chunks_fetched: AtomicU64,
    /// Stored (compressed) bytes fetched from the blob store.
    pub bytes_fetched: AtomicU64,
    /// Chunk lookups answered by the memory cache (including waits on a
    /// fetch another thread was already doing).
    pub cache_hits: AtomicU64,
    /// Chunk lookups that had to fetch.
    pub cache_misses: AtomicU64,
    /// Chunks that could not be fetched or failed verification.
    pub chunk_errors: AtomicU64,
    /// `read` requests answered with an error.
    pub read_errors: AtomicU64,
}

impl Metrics {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            reads: get(&self.reads),
            bytes_read: get(&self.bytes_read),
            chunks_fetched: get(&self.chunks_fetched),
            bytes_fetched: get(&self.bytes_fetched),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            chunk_errors: get(&self.chunk_errors),
            read_errors: get(&self.read_errors),
        }
    }
}

/// The counters of [`Metrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`Metrics::reads`].
    pub reads: u64,
    /// See [`Metrics::bytes_read`].
    pub bytes_read: u64,
    /// See [`Metrics::chunks_fetched`].
    pub chunks_fetched: u64,
    /// See [`Metrics::bytes_fetched`].
    pub bytes_fetched: u64,
    /// See [`Metrics::cache_hits`].
    pub cache_hits: u64,
    /// See [`Metrics::cache_misses`].
    pub cache_misses: u64,
    /// See [`Metrics::chunk_errors`].
    pub chunk_errors: u64,
    /// See [`Metrics::read_errors`].
    pub read_errors: u64,
}

impl fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reads={} bytes_read={} chunks_fetched={} bytes_fetched={} cache_hits={} cache_misses={} chunk_errors={} read_errors={}",
            self.reads,
            self.bytes_read,
            self.chunks_fetched,
            self.bytes_fetched,
            self.cache_hits,
            self.cache_misses,
            self.chunk_errors,
            self.read_errors
        )
    }
}
