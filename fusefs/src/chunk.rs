//! Where stored chunk bytes come from: the [`ChunkFetcher`] seam.
//!
//! A fetcher returns the *stored* form of a chunk (a zstd frame or raw bytes)
//! exactly as it sits in its blob; verifying and decompressing is the job of
//! [`crate::cache::ChunkSource`], above every fetcher, so that no fetcher can
//! let unverified bytes through. Today the one real fetcher is
//! [`StoreFetcher`], a range read on a [`BlobStore`]; a disk cache, HTTP range
//! fetches and coalescing of adjacent chunks slot in here as further
//! implementations (or wrappers) without touching the filesystem.

use std::sync::Arc;

use skiff_format::{ChunkInfo, Digest};
use skiff_registry::BlobStore;

/// One chunk to produce: its CHUNKS record and the digest of its blob.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRequest {
    /// CHUNKS index (for messages).
    pub index: u32,
    /// The CHUNKS record.
    pub info: ChunkInfo,
    /// Digest of the blob that stores it.
    pub blob: Digest,
}

/// Produces the stored bytes of chunks.
pub trait ChunkFetcher: Send + Sync {
    /// Returns the `compressed_size` stored bytes of `req` from its blob.
    fn fetch(&self, req: &ChunkRequest) -> Result<Vec<u8>, String>;
}

/// A [`ChunkFetcher`] that reads byte ranges of blobs from a [`BlobStore`].
pub struct StoreFetcher {
    store: Arc<dyn BlobStore>,
}

impl StoreFetcher {
    /// Fetches from `store`.
    pub fn new(store: Arc<dyn BlobStore>) -> StoreFetcher {
        StoreFetcher { store }
    }
}

impl ChunkFetcher for StoreFetcher {
    fn fetch(&self, req: &ChunkRequest) -> Result<Vec<u8>, String> {
        let len = u64::from(req.info.compressed_size);
        let bytes = self
            .store
            .read_range(&req.blob, req.info.compressed_offset, len)
            .map_err(|e| e.to_string())?;
        if bytes.len() as u64 != len {
            return Err(format!(
                "blob {} gave {} bytes at offset {}, expected {len}",
                req.blob,
                bytes.len(),
                req.info.compressed_offset
            ));
        }
        Ok(bytes)
    }
}
