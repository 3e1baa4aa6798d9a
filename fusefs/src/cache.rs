//! Verified, decompressed chunks, and a memory cache of them bounded by bytes.
//!
//! [`ChunkSource::get`] is the read path's one way to chunk data: look the
//! chunk up in the cache (keyed by its digest, so identical chunks of two
//! files share one entry); on a miss fetch the stored bytes through the
//! [`ChunkFetcher`], decode them with [`skiff_format::decode_chunk`], which
//! checks the SHA-256 before anything else sees a byte, and insert the result.
//!
//! Concurrent misses on one chunk do the work once: the cache hands the first
//! thread a placeholder guard and parks the others on it until the value is
//! inserted (quick_cache's `get_value_or_guard`). If the first thread fails,
//! its guard is dropped and the next waiter tries for itself, so an error is
//! never cached. The cache is sharded with a lock per shard held only for a
//! lookup or insert, never across a fetch: there is no global lock on the read
//! path.
//!
//! [`ChunkSource::get_many`] serves a read that spans several chunks: cached
//! chunks are taken at once and the missing ones fetched in parallel on
//! scoped threads, because a 1 MiB read of 64 KiB chunks needs 16 of them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use quick_cache::sync::{Cache, GuardResult};
use quick_cache::Weighter;
use skiff_format::Digest;

use crate::chunk::{ChunkFetcher, ChunkRequest};
use crate::error::ChunkError;
use crate::metrics::Metrics;

/// Decompressed, verified chunk data, shared by the cache and readers.
pub type ChunkData = Arc<Vec<u8>>;

/// Weighs a cached chunk by its length (plus a little for the entry itself,
/// so that a cache of empty chunks is still bounded).
#[derive(Clone, Copy, Debug, Default)]
struct ByteWeighter;

impl Weighter<Digest, ChunkData> for ByteWeighter {
    fn weight(&self, _key: &Digest, val: &ChunkData) -> u64 {
        val.len() as u64 + 64
    }
}

/// At most this many threads fetch the chunks of one read in parallel.
const MAX_PARALLEL_FETCHES: usize = 8;

/// Chunks on demand: fetcher, verification, decompression and memory cache.
pub struct ChunkSource {
    fetcher: Arc<dyn ChunkFetcher>,
    cache: Cache<Digest, ChunkData, ByteWeighter>,
    metrics: Arc<Metrics>,
}

impl ChunkSource {
    /// A source reading through `fetcher` with a memory cache of at most
    /// `cache_bytes` bytes of decompressed data (0 disables the cache).
    pub fn new(fetcher: Arc<dyn ChunkFetcher>, cache_bytes: u64, metrics: Arc<Metrics>) -> Self {
        // quick_cache wants an estimate of the item count; 64 KiB is the
        // default average chunk size.
        let items = usize::try_from(cache_bytes / 65536)
            .unwrap_or(usize::MAX)
            .max(16);
        ChunkSource {
            fetcher,
            cache: Cache::with_weighter(items, cache_bytes.max(1), ByteWeighter),
            metrics,
        }
    }

    /// The counters this source updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Bytes currently held by the cache (decompressed data plus per-entry overhead).
    pub fn cached_bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// Number of chunks currently cached.
    pub fn cached_chunks(&self) -> usize {
        self.cache.len()
    }

    /// The decompressed, verified data of one chunk.
    pub fn get(&self, req: &ChunkRequest) -> Result<ChunkData, ChunkError> {
        match self.cache.get_value_or_guard(&req.info.digest, None) {
            GuardResult::Value(v) => {
                Metrics::add(&self.metrics.cache_hits, 1);
                Ok(v)
            }
            GuardResult::Guard(guard) => {
                Metrics::add(&self.metrics.cache_misses, 1);
                let data = self.load(req)?;
                // A chunk larger than a cache shard is not kept; that is fine.
                let _ = guard.insert(data.clone());
                Ok(data)
            }
            // Only returned when a timeout is given.
            GuardResult::Timeout => self.load(req),
        }
    }

    /// The data of several chunks, in order, fetching the missing ones in
    /// parallel. On failure returns the position in `reqs` of a chunk that
    /// failed, with its error.
    pub fn get_many(&self, reqs: &[ChunkRequest]) -> Result<Vec<ChunkData>, (usize, ChunkError)> {
        let mut out: Vec<Option<ChunkData>> = Vec::with_capacity(reqs.len());
        let mut missing = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            match self.cache.get(&req.info.digest) {
                Some(v) => {
                    Metrics::add(&self.metrics.cache_hits, 1);
                    out.push(Some(v));
                }
                None => {
                    missing.push(i);
                    out.push(None);
                }
            }
        }
        if missing.len() == 1 {
            let i = missing[0];
            out[i] = Some(self.get(&reqs[i]).map_err(|e| (i, e))?);
        } else if missing.len() > 1 {
            let fetched = self.fetch_parallel(reqs, &missing);
            for (i, result) in missing.iter().copied().zip(fetched) {
                out[i] = Some(result.map_err(|e| (i, e))?);
            }
        }
        let mut data = Vec::with_capacity(out.len());
        for (i, v) in out.into_iter().enumerate() {
            // Every slot was filled above; an empty one would be a bug here,
            // reported as an error rather than a panic.
            data.push(
                v.ok_or_else(|| (i, ChunkError::Fetch("internal: chunk not produced".into())))?,
            );
        }
        Ok(data)
    }

    fn fetch_parallel(
        &self,
        reqs: &[ChunkRequest],
        missing: &[usize],
    ) -> Vec<Result<ChunkData, ChunkError>> {
        let results: Vec<Mutex<Option<Result<ChunkData, ChunkError>>>> =
            missing.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let workers = missing.len().min(MAX_PARALLEL_FETCHES);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = missing.get(k) else { break };
                    let r = self.get(&reqs[i]);
                    if let Some(Ok(mut slot)) = results.get(k).map(Mutex::lock) {
                        *slot = Some(r);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|m| {
                m.into_inner().ok().flatten().unwrap_or_else(|| {
                    Err(ChunkError::Fetch("internal: fetch thread failed".into()))
                })
            })
            .collect()
    }

    fn load(&self, req: &ChunkRequest) -> Result<ChunkData, ChunkError> {
        let stored = self.fetcher.fetch(req).map_err(|e| {
            Metrics::add(&self.metrics.chunk_errors, 1);
            ChunkError::Fetch(e)
        })?;
        Metrics::add(&self.metrics.chunks_fetched, 1);
        Metrics::add(&self.metrics.bytes_fetched, stored.len() as u64);
        let data = skiff_format::chunk::decode_chunk(&req.info, &stored).map_err(|e| {
            Metrics::add(&self.metrics.chunk_errors, 1);
            ChunkError::Decode(e)
        })?;
        Ok(Arc::new(data))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Barrier;
    use std::time::Duration;

    use skiff_format::chunk::encode_chunk;
    use skiff_format::{ChunkInfo, Digest};
    use skiff_registry::LocalBlobStore;

    use super::*;
    use crate::chunk::StoreFetcher;

    /// Counts fetches through a real [`StoreFetcher`], slowly, so that
    /// concurrent misses overlap.
    struct CountingFetcher {
        inner: StoreFetcher,
        fetches: AtomicU64,
        delay: Duration,
    }

    impl ChunkFetcher for CountingFetcher {
        fn fetch(&self, req: &ChunkRequest) -> Result<Vec<u8>, String> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.inner.fetch(req)
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        reqs: Vec<ChunkRequest>,
        datas: Vec<Vec<u8>>,
        fetcher: Arc<CountingFetcher>,
        blob_path: std::path::PathBuf,
    }

    /// A blob of `n` chunks of `size` bytes each in a real OCI layout dir.
    fn fixture(n: usize, size: usize, delay: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let mut blob = Vec::new();
        let mut infos = Vec::new();
        let mut datas = Vec::new();
        for i in 0..n {
            // Half compressible, half not, so both stored forms are covered.
            let data: Vec<u8> = (0..size)
                .map(|j| {
                    if i % 2 == 0 {
                        ((j % 7) + i) as u8
                    } else {
                        ((j * 2654435761usize) >> 13) as u8 ^ i as u8
                    }
                })
                .collect();
            let (stored, compressed) = encode_chunk(&data, 3).unwrap();
            infos.push(ChunkInfo {
                digest: Digest::of(&data),
                blob_index: 0,
                compressed,
                compressed_offset: blob.len() as u64,
                compressed_size: stored.len() as u32,
                uncompressed_size: data.len() as u32,
            });
            blob.extend_from_slice(&stored);
            datas.push(data);
        }
        let blob_digest = Digest::of(&blob);
        let blob_path = blobs.join(blob_digest.to_hex());
        std::fs::write(&blob_path, &blob).unwrap();
        let store = Arc::new(LocalBlobStore::new(dir.path()).unwrap());
        let fetcher = Arc::new(CountingFetcher {
            inner: StoreFetcher::new(store),
            fetches: AtomicU64::new(0),
            delay,
        });
        let reqs = infos
            .into_iter()
            .enumerate()
            .map(|(i, info)| ChunkRequest {
                index: i as u32,
                info,
                blob: blob_digest,
            })
            .collect();
        Fixture {
            _dir: dir,
            reqs,
            datas,
            fetcher,
            blob_path,
        }
    }

    #[test]
    fn serves_verified_data_and_caches_it() {
        let f = fixture(4, 10_000, Duration::ZERO);
        let source = ChunkSource::new(f.fetcher.clone(), 1 << 20, Arc::default());
        for _ in 0..3 {
            for (req, data) in f.reqs.iter().zip(&f.datas) {
                assert_eq!(source.get(req).unwrap().as_slice(), data.as_slice());
            }
        }
        assert_eq!(f.fetcher.fetches.load(Ordering::SeqCst), 4);
        let m = source.metrics().snapshot();
        assert_eq!((m.cache_misses, m.cache_hits, m.chunks_fetched), (4, 8, 4));
    }

    #[test]
    fn byte_bound_is_respected() {
        let f = fixture(64, 16 << 10, Duration::ZERO);
        let bound = 256 << 10;
        let source = ChunkSource::new(f.fetcher.clone(), bound, Arc::default());
        for req in &f.reqs {
            source.get(req).unwrap();
            assert!(
                source.cached_bytes() <= bound,
                "{} > {bound}",
                source.cached_bytes()
            );
        }
        assert!(source.cached_chunks() < 64);
        assert!(source.cached_chunks() > 0);
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        let f = fixture(1, 50_000, Duration::from_millis(100));
        let source = ChunkSource::new(f.fetcher.clone(), 1 << 20, Arc::default());
        let barrier = Barrier::new(16);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    barrier.wait();
                    let data = source.get(&f.reqs[0]).unwrap();
                    assert_eq!(data.as_slice(), f.datas[0].as_slice());
                });
            }
        });
        assert_eq!(f.fetcher.fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn get_many_fetches_in_parallel_and_in_order() {
        let f = fixture(16, 20_000, Duration::from_millis(50));
        let source = ChunkSource::new(f.fetcher.clone(), 8 << 20, Arc::default());
        let t = std::time::Instant::now();
        let got = source.get_many(&f.reqs).unwrap();
        // 16 fetches of 50 ms on 8 threads: about 100 ms, far below 800.
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        for (g, d) in got.iter().zip(&f.datas) {
            assert_eq!(g.as_slice(), d.as_slice());
        }
        assert_eq!(f.fetcher.fetches.load(Ordering::SeqCst), 16);
    }

    #[test]
    fn damaged_chunk_is_an_error_and_not_cached() {
        let f = fixture(3, 30_000, Duration::ZERO);
        let mut blob = std::fs::read(&f.blob_path).unwrap();
        let target = &f.reqs[1].info;
        blob[(target.compressed_offset + u64::from(target.compressed_size) / 2) as usize] ^= 0x40;
        std::fs::write(&f.blob_path, &blob).unwrap();
        let source = ChunkSource::new(f.fetcher.clone(), 1 << 20, Arc::default());
        assert!(matches!(source.get(&f.reqs[1]), Err(ChunkError::Decode(_))));
        assert!(source.get(&f.reqs[1]).is_err());
        assert_eq!(
            f.fetcher.fetches.load(Ordering::SeqCst),
            2,
            "errors are not cached"
        );
        assert_eq!(
            source.get(&f.reqs[0]).unwrap().as_slice(),
            f.datas[0].as_slice()
        );
        match source.get_many(&f.reqs) {
            Err((i, _)) => assert_eq!(i, 1),
            Ok(_) => panic!("a damaged chunk was served"),
        }
        assert!(source.metrics().snapshot().chunk_errors >= 2);
    }
}
