//! Where stored chunk bytes come from: the blob store behind a [`Backend`],
//! the chunks of a file range ([`file_chunk_requests`]), the planning of
//! range requests ([`plan_runs`]) and the set of chunks a prefetch list
//! names ([`ListedChunks`]).
//!
//! The seam at the network boundary is [`skiff_registry::BlobStore`]: a
//! `LocalBlobStore` for a layout on disk, a `RegistryBlobStore` for HTTP
//! Range requests (which retries inside). A store returns the *stored* form
//! of chunks exactly as they sit in their blob; verifying and decompressing
//! is the job of [`crate::fetch`], above every store, so that
//! no store can let unverified bytes through.
//!
//! # Coalescing
//!
//! A blob stores its chunks back to back in the order the converter met
//! them, so the chunks of one file usually sit next to each other. When a
//! read needs several chunks that no cache has, [`plan_runs`] sorts them by
//! (blob, offset) and merges neighbours into *runs*: one `read_range` per
//! run instead of one per chunk. Two chunks join a run when they are in the
//! same blob, the gap between the end of the run and the next chunk is at
//! most `max_gap` bytes (0 for reads: only exactly adjacent chunks, so not a
//! byte more is fetched than asked for; up to 64 KiB for prefetch, where a
//! few wasted bytes cost less than a round trip), and the run stays within
//! `max_bytes` (1 MiB for reads, 8 MiB for prefetch): long enough to make
//! round trips rare, short enough that one slow request does not hold up a
//! reader for long and that independent runs can go in parallel. A chunk
//! larger than `max_bytes` is a run of its own.

use std::sync::Arc;

use skiff_format::{Bootstrap, ChunkInfo, Digest, FileChunkRecord, FormatError, InodeId};
use skiff_registry::{BlobStore, FetchStats};

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

impl ChunkRequest {
    /// First byte of the stored chunk in its blob.
    pub fn start(&self) -> u64 {
        self.info.compressed_offset
    }

    /// One past the last byte of the stored chunk in its blob.
    pub fn end(&self) -> u64 {
        self.info
            .compressed_offset
            .saturating_add(u64::from(self.info.compressed_size))
    }

    /// The disk cache's key of the shared frame (format 1.1) that stores
    /// this chunk; `None` for a chunk stored on its own. A frame has no
    /// digest of its own, so the key names where it is stored (its blob's
    /// digest, offset and size: a blob never changes under its digest); the
    /// bytes under it are checked like any disk bytes, by the digest of
    /// each member a read takes out of them.
    pub fn frame_key(&self) -> Option<Digest> {
        self.info.frame?;
        let mut name = Vec::with_capacity(64);
        name.extend_from_slice(b"skiff shared frame\0");
        name.extend_from_slice(&self.blob.0);
        name.extend_from_slice(&self.info.compressed_offset.to_le_bytes());
        name.extend_from_slice(&self.info.compressed_size.to_le_bytes());
        Some(Digest::of(&name))
    }
}

/// A counter snapshot provided by a store that keeps counters.
pub type StatsFn = Arc<dyn Fn() -> FetchStats + Send + Sync>;

/// The blob store a mount reads from, with its counters if it has any.
#[derive(Clone)]
pub struct Backend {
    /// Where ranges of blobs are read.
    pub store: Arc<dyn BlobStore>,
    /// The store's own counters (requests, retries, errors), for metrics.
    pub stats: Option<StatsFn>,
}

impl Backend {
    /// A backend without counters of its own.
    pub fn new(store: Arc<dyn BlobStore>) -> Backend {
        Backend { store, stats: None }
    }

    /// Adds the store's counters: e.g. `move || registry_store.stats()`.
    pub fn with_stats(mut self, stats: impl Fn() -> FetchStats + Send + Sync + 'static) -> Backend {
        self.stats = Some(Arc::new(stats));
        self
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("stats", &self.stats.is_some())
            .finish()
    }
}

/// One range request: a span of a blob covering some chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The blob.
    pub blob: Digest,
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Positions (in the slice given to [`plan_runs`]) of the chunks it covers,
    /// by offset.
    pub members: Vec<usize>,
}

/// The stored bytes of `reqs` (what fetching them moves, gaps aside).
pub(crate) fn stored_bytes(reqs: &[ChunkRequest]) -> u64 {
    reqs.iter().map(|r| u64::from(r.info.compressed_size)).sum()
}

/// Groups `reqs` into runs; see the module documentation. Every position of
/// `reqs` is in exactly one run.
pub fn plan_runs(reqs: &[ChunkRequest], max_bytes: u64, max_gap: u64) -> Vec<Run> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| (reqs[i].blob.0, reqs[i].start()));
    let mut runs: Vec<Run> = Vec::new();
    for i in order {
        let r = &reqs[i];
        if let Some(run) = runs.last_mut() {
            let end = run.offset.saturating_add(run.len);
            let new_end = end.max(r.end());
            if run.blob == r.blob
                && r.start() >= run.offset
                && r.start().saturating_sub(end) <= max_gap
                && new_end - run.offset <= max_bytes
            {
                run.len = new_end - run.offset;
                run.members.push(i);
                continue;
            }
        }
        runs.push(Run {
            blob: r.blob,
            offset: r.start(),
            len: r.end() - r.start(),
            members: vec![i],
        });
    }
    runs
}

/// The chunk requests of the part `[from, to)` of regular file `id`
/// (everything when `to` is `u64::MAX`).
pub fn file_chunk_requests(
    b: &Bootstrap<'_>,
    id: InodeId,
    from: u64,
    to: u64,
) -> Result<Vec<ChunkRequest>, FormatError> {
    let records = if to == u64::MAX && from == 0 {
        b.file_chunks(id)?
    } else {
        b.chunks_in_range(id, from, to.saturating_sub(from))?
    };
    records_requests(b, records)
}

/// The chunk requests of chunk-map records (of one file or several).
pub fn records_requests(
    b: &Bootstrap<'_>,
    records: &[FileChunkRecord],
) -> Result<Vec<ChunkRequest>, FormatError> {
    let mut reqs = Vec::with_capacity(records.len());
    for fc in records {
        let info = b.chunk(fc.chunk_index())?;
        let blob = b.blob(info.blob_index)?;
        reqs.push(ChunkRequest {
            index: fc.chunk_index(),
            info,
            blob: blob.digest,
        });
    }
    Ok(reqs)
}

/// The chunks an image's prefetch list names, by chunk-table index: while
/// a list is being fetched, what a read of listed chunks brings along (its
/// fetch window, readahead) is limited to listed chunks, since the list
/// says what the workload reads next (see [`crate::prefetch`]).
#[derive(Debug, Default)]
pub struct ListedChunks {
    bits: Vec<u64>,
}

impl ListedChunks {
    /// The set of `indices`.
    pub fn new(indices: impl IntoIterator<Item = u32>) -> ListedChunks {
        let mut bits = Vec::new();
        for i in indices {
            let word = i as usize / 64;
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            if let Some(w) = bits.get_mut(word) {
                *w |= 1 << (i % 64);
            }
        }
        ListedChunks { bits }
    }

    /// Whether chunk `index` is listed.
    pub fn contains(&self, index: u32) -> bool {
        self.bits
            .get(index as usize / 64)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Whether every chunk of `reqs` is listed (and there is one).
    pub fn all_listed(&self, reqs: &[ChunkRequest]) -> bool {
        !reqs.is_empty() && reqs.iter().all(|r| self.contains(r.index))
    }
}

/// The other members of the shared frames (format 1.1) that `reqs` name:
/// a fetch of one member downloads the whole frame, so its siblings come
/// along at no cost in bytes, and left behind they would cost the frame
/// again each. Members of a frame are neighbours in the chunk table (it is
/// in blob order), so this walks both ways from each request.
pub fn frame_siblings(b: &Bootstrap<'_>, reqs: &[ChunkRequest]) -> Vec<ChunkRequest> {
    let mut out: Vec<ChunkRequest> = Vec::new();
    let mut seen: std::collections::HashSet<u32> = reqs.iter().map(|r| r.index).collect();
    for r in reqs.iter().filter(|r| r.info.frame.is_some()) {
        let same = |i: u32| {
            b.chunk(i).ok().filter(|c| {
                c.frame.is_some()
                    && c.blob_index == r.info.blob_index
                    && c.compressed_offset == r.info.compressed_offset
                    && c.compressed_size == r.info.compressed_size
            })
        };
        let mut push = |index: u32, info: ChunkInfo| {
            if seen.insert(index) {
                out.push(ChunkRequest {
                    index,
                    info,
                    blob: r.blob,
                });
            }
        };
        let mut i = r.index;
        while let Some(prev) = i.checked_sub(1) {
            let Some(info) = same(prev) else { break };
            push(prev, info);
            i = prev;
        }
        let mut i = r.index;
        while let Some(next) = i.checked_add(1) {
            let Some(info) = same(next) else { break };
            push(next, info);
            i = next;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(blob: u8, offset: u64, size: u32) -> ChunkRequest {
        ChunkRequest {
            index: 0,
            info: ChunkInfo {
                digest: skiff_format::ChunkHash::Blake3.digest(&offset.to_le_bytes()),
                hash: skiff_format::ChunkHash::Blake3,
                blob_index: 0,
                compressed: true,
                compressed_offset: offset,
                compressed_size: size,
                uncompressed_size: size * 2,
                frame: None,
            },
            blob: Digest([blob; 32]),
        }
    }

    #[test]
    fn listed_chunks_is_a_set_of_indices() {
        let l = ListedChunks::new([0, 63, 64, 1000]);
        for i in [0, 63, 64, 1000] {
            assert!(l.contains(i), "{i}");
        }
        for i in [1, 62, 65, 999, 1001, u32::MAX] {
            assert!(!l.contains(i), "{i}");
        }
        assert!(!ListedChunks::default().contains(0));
    }

    #[test]
    fn adjacent_chunks_merge_up_to_the_bound() {
        // Ten adjacent 100-byte chunks, given out of order.
        let reqs: Vec<_> = (0..10).rev().map(|i| req(1, i * 100, 100)).collect();
        let runs = plan_runs(&reqs, 450, 0);
        let lens: Vec<u64> = runs.iter().map(|r| r.len).collect();
        assert_eq!(lens, [400, 400, 200]);
        assert_eq!(runs[0].offset, 0);
        assert_eq!(runs[0].members, [9, 8, 7, 6]);
        let mut all: Vec<usize> = runs.iter().flat_map(|r| r.members.clone()).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn gaps_and_blobs_split_runs() {
        let reqs = [
            req(1, 0, 100),
            req(1, 150, 100),
            req(2, 250, 100),
            req(1, 250, 10),
        ];
        // Without gaps: 0..100 | 150..260 (two adjacent chunks) | blob 2.
        assert_eq!(plan_runs(&reqs, 1 << 20, 0).len(), 3);
        let runs = plan_runs(&reqs, 1 << 20, 64);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].offset, runs[0].len), (0, 260));
        assert_eq!(runs[0].members, [0, 1, 3]);
    }

    #[test]
    fn a_chunk_larger_than_the_bound_is_alone() {
        let reqs = [req(1, 0, 100), req(1, 100, 1000), req(1, 1100, 100)];
        let runs = plan_runs(&reqs, 500, 0);
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[1].len, 1000);
    }
}
