//! [`ChunkSource`]: verified, decompressed chunks on demand, from the
//! memory cache ([`crate::cache`]), else the disk cache and the network
//! ([`crate::fetch`]).
//!
//! [`ChunkSource::get_many`] serves a FUSE read that needs several chunks:
//!
//! 1. Each distinct chunk is looked up in memory without waiting. A miss
//!    makes this thread the owner of its load; a chunk that another thread
//!    is loading is set aside and waited for at the end, after this thread
//!    has loaded (and released) every chunk it owns, so two readers can
//!    never wait on each other.
//! 2. The owned chunks (plus, with [`get_with_read_ahead`], chunks that
//!    extend one of its requests) go to the fetcher: disk, then network.
//! 3. The set-aside chunks are waited for, each until the read's deadline.
//!
//! The caller turns the first failure into `EIO`. [`ChunkSource::get_local`]
//! is the part of this that never waits on the network: the FUSE thread
//! answers with it when every chunk is in memory or on disk, and otherwise
//! hands the read to the read pool, or, from local blobs, loads it itself
//! (see [`crate::fs`]).
//!
//! [`ChunkSource::prefetch`] runs the same machinery for background work,
//! with two differences: chunks already on disk are skipped rather than
//! loaded into memory, and runs may bridge gaps (see
//! [`plan_runs`](crate::plan_runs)).
//!
//! [`get_with_read_ahead`]: ChunkSource::get_with_read_ahead

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use skiff_format::Digest;

use crate::cache::{ChunkData, Lookup, MemoryCache, Owned};
use crate::chunk::{Backend, ChunkRequest, ListedChunks};
use crate::disk::DiskCache;
use crate::error::ChunkError;
use crate::fetch::{
    Fetcher, Plan, RecentFrames, SourceOptions, PREFETCH_MAX_GAP, PREFETCH_MAX_REQUEST,
};
use crate::link::LinkEstimate;
use crate::metrics::Metrics;
use crate::window::Brought;
use crate::workers::ByteBudget;

/// Which chunks of a batch (a readahead window, a prefetch window) are
/// already on this node, for those who fetch ahead: a request that is
/// local is not fetched again. A shared frame's file is looked up once for
/// all of its members in the batch, and a member counts as local only
/// through its frame or the memory cache (the file of a
/// member that another image stored as a chunk of its own is not looked
/// for: at worst the frame, at most a pack size, is fetched again; a
/// reader still finds that file first).
pub struct LocalCheck<'s> {
    source: &'s ChunkSource,
    frames: HashMap<Digest, bool>,
}

impl LocalCheck<'_> {
    /// Whether `req` is in memory or on disk, as above.
    pub fn is_local(&mut self, req: &ChunkRequest) -> bool {
        if self.source.memory.contains(&req.info.digest) {
            return true;
        }
        let Some(disk) = self.source.disk() else {
            return false;
        };
        match req.frame_key() {
            Some(key) => *self
                .frames
                .entry(key)
                .or_insert_with(|| disk.contains(&key)),
            None => disk.contains(&req.info.digest),
        }
    }
}

/// Chunks on demand: memory cache, disk cache, coalesced verified fetches.
pub struct ChunkSource {
    memory: MemoryCache,
    fetcher: Fetcher,
    metrics: Arc<Metrics>,
    /// What fetch windows brought and reads took from disk since.
    brought: Arc<Brought>,
    /// The chunks of the image's prefetch list, once its prefetch starts.
    listed: OnceLock<Arc<ListedChunks>>,
}

impl ChunkSource {
    /// A source reading from `backend`, with the optional `disk` cache.
    pub fn new(
        backend: Backend,
        disk: Option<Arc<DiskCache>>,
        opts: SourceOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        if backend.store.is_local() {
            crate::buffers::raise_bound(crate::buffers::MAX_POOLED_LOCAL);
        }
        ChunkSource {
            memory: MemoryCache::new(opts.memory_bytes),
            fetcher: Fetcher {
                backend,
                disk,
                metrics: metrics.clone(),
                budget: ByteBudget::new(opts.in_flight_bytes),
                opts,
                frames: RecentFrames::default(),
                link: Arc::new(LinkEstimate::default()),
            },
            metrics,
            brought: Arc::new(Brought::default()),
            listed: OnceLock::new(),
        }
    }

    /// Sets the chunks of the image's prefetch list (once; later calls are
    /// ignored): what a read of listed chunks brings along is then limited
    /// to listed chunks (see [`ChunkSource::listed_for`]).
    pub(crate) fn set_listed(&self, listed: ListedChunks) {
        let _ = self.listed.set(Arc::new(listed));
    }

    /// The prefetch list's chunks when every chunk of `reqs` is listed: the
    /// list foresaw this read, so what it brings along (fetch window,
    /// readahead) should be what the list names and nothing else. `None`
    /// without a list or for a read the list did not foresee.
    pub(crate) fn listed_for(&self, reqs: &[ChunkRequest]) -> Option<Arc<ListedChunks>> {
        self.listed.get().filter(|l| l.all_listed(reqs)).cloned()
    }

    /// What the fetch windows of reads brought, for the window to learn
    /// from (see [`crate::window`]).
    pub(crate) fn brought(&self) -> &Arc<Brought> {
        &self.brought
    }

    /// The link to the store, fitted to the timings of its range requests.
    pub(crate) fn link(&self) -> &Arc<LinkEstimate> {
        &self.fetcher.link
    }

    /// The counters this source updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The backend it fetches from.
    pub fn backend(&self) -> &Backend {
        &self.fetcher.backend
    }

    /// The disk cache, if any.
    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.fetcher.disk.as_ref()
    }

    /// Bytes currently held by the memory cache (decompressed data plus per-entry overhead).
    pub fn cached_bytes(&self) -> u64 {
        self.memory.weight()
    }

    /// Number of chunks currently in the memory cache.
    pub fn cached_chunks(&self) -> usize {
        self.memory.len()
    }

    /// Bytes of chunk data being fetched or decoded now (bounded by
    /// [`SourceOptions::in_flight_bytes`]).
    pub fn in_flight_bytes(&self) -> u64 {
        self.fetcher.budget.in_use()
    }

    /// Whether chunk `digest` is in the memory cache.
    pub fn in_memory(&self, digest: &Digest) -> bool {
        self.memory.contains(digest)
    }

    /// Whether chunk `req` is in memory or on disk: a [`LocalCheck`] of
    /// one request.
    pub fn is_local(&self, req: &ChunkRequest) -> bool {
        self.local_check().is_local(req)
    }

    /// A [`LocalCheck`] for one batch of requests.
    pub fn local_check(&self) -> LocalCheck<'_> {
        LocalCheck {
            source: self,
            frames: HashMap::new(),
        }
    }

    fn read_plan(&self, deadline: Option<Instant>) -> Plan {
        Plan {
            max_bytes: self.fetcher.opts.max_request_bytes,
            max_gap: 0,
            foreground: true,
            use_disk: true,
            optional_from: usize::MAX,
            refetch_corrupt: true,
            deadline,
        }
    }

    /// The decompressed, verified data of one chunk.
    pub fn get(&self, req: &ChunkRequest) -> Result<ChunkData, ChunkError> {
        self.get_many(std::slice::from_ref(req))
            .map_err(|(_, e)| e)?
            .pop()
            .ok_or_else(not_produced)
    }

    /// The data of several chunks, in order; see the module documentation.
    /// On failure returns the position in `reqs` of a chunk that failed,
    /// with its error.
    pub fn get_many(&self, reqs: &[ChunkRequest]) -> Result<Vec<ChunkData>, (usize, ChunkError)> {
        self.get_with_read_ahead(reqs, &[], 0, None)
    }

    /// The data of `reqs` if every chunk is in memory or on disk (and
    /// verifies there), without waiting for any other thread's load or
    /// the network; `None` otherwise. Chunks read from disk are kept in
    /// memory, so that the next FUSE read of the same chunk does not
    /// decode it again.
    pub fn get_local(&self, reqs: &[ChunkRequest]) -> Option<Vec<ChunkData>> {
        let mut out: Vec<ChunkData> = Vec::with_capacity(reqs.len());
        let mut from_disk = Vec::new();
        for req in reqs {
            let d = &req.info.digest;
            let data = match self.memory.peek(d) {
                Some(v) => {
                    Metrics::add(&self.metrics.cache_hits, 1);
                    v
                }
                None => {
                    let disk = self.disk()?;
                    let v = self.fetcher.load_from_disk(disk, req)?;
                    self.memory.insert(*d, v.clone());
                    from_disk.push(*req);
                    v
                }
            };
            // The cache is keyed by digest: a record that lies about the
            // size of its digest's data is left to the full path, which
            // reports it.
            if data.len() != req.info.uncompressed_size as usize {
                return None;
            }
            out.push(data);
        }
        self.brought.read(&from_disk);
        Some(out)
    }

    /// [`get_many`](Self::get_many), also loading the chunks of `ahead`
    /// (those that follow the last one in its blob) that are in no cache,
    /// when they extend a request the read makes anyway: more bytes per
    /// round trip, no extra round trip. Requests may grow to `max_request`
    /// bytes if that is above the configured bound. Failures of `ahead`
    /// chunks are ignored: a later read that needs them reports them.
    /// Gives up by `deadline` (network, waits for other readers' loads and
    /// for the in-flight budget included).
    pub fn get_with_read_ahead(
        &self,
        reqs: &[ChunkRequest],
        ahead: &[ChunkRequest],
        max_request: u64,
        deadline: Option<Instant>,
    ) -> Result<Vec<ChunkData>, (usize, ChunkError)> {
        let mut out: Vec<Option<Result<ChunkData, ChunkError>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut first: HashMap<Digest, usize> = HashMap::with_capacity(reqs.len());
        let mut owned = Vec::new();
        let mut waiting = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            if first.contains_key(&req.info.digest) {
                continue;
            }
            first.insert(req.info.digest, i);
            match self.memory.lookup(&req.info.digest, i) {
                Lookup::Hit(v) => {
                    Metrics::add(&self.metrics.cache_hits, 1);
                    out[i] = Some(Ok(v));
                }
                Lookup::Miss(o) => {
                    Metrics::add(&self.metrics.cache_misses, 1);
                    owned.push(o);
                }
                Lookup::Busy => waiting.push(i),
            }
        }
        let mut all: Vec<ChunkRequest> = Vec::new();
        if !owned.is_empty() && !ahead.is_empty() {
            all.extend_from_slice(reqs);
            let mut local = self.local_check();
            for r in ahead {
                if first.contains_key(&r.info.digest) || local.is_local(r) {
                    continue;
                }
                first.insert(r.info.digest, usize::MAX);
                if let Lookup::Miss(o) = self.memory.lookup(&r.info.digest, all.len()) {
                    owned.push(o);
                    all.push(*r);
                }
            }
        }
        if !owned.is_empty() {
            let mut plan = self.read_plan(deadline);
            if !all.is_empty() {
                plan.max_bytes = plan.max_bytes.max(max_request);
                if !self.fetcher.backend.store.is_local() {
                    self.brought.fetched(&all[reqs.len()..]);
                }
            }
            plan.optional_from = reqs.len();
            let list = if all.is_empty() { reqs } else { &all[..] };
            for (pos, r) in self.fetcher.load_owned(list, owned, plan) {
                if let Some(slot) = out.get_mut(pos) {
                    // A chunk the read needs is never left unverified.
                    *slot = Some(r.and_then(|d| d.ok_or_else(not_produced)));
                }
            }
        }
        // Every guard of ours is released: now wait for the others' chunks.
        for i in waiting {
            out[i] = Some(self.get_blocking(&reqs[i], deadline));
        }
        let mut data: Vec<ChunkData> = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            let src = first.get(&req.info.digest).copied().unwrap_or(i);
            // A repeated chunk copies its first position, which came before.
            let v = if src < i {
                data.get(src).cloned()
            } else {
                match out.get_mut(i).and_then(Option::take) {
                    Some(Ok(d)) => Some(d),
                    Some(Err(e)) => return Err((i, e)),
                    None => None,
                }
            };
            match v {
                // The cache is keyed by digest: a record that lies about the
                // size of its digest's data gets an error, never data that
                // would shift the bytes after it.
                Some(d) if d.len() != req.info.uncompressed_size as usize => {
                    return Err((
                        i,
                        ChunkError::RecordMismatch {
                            digest: req.info.digest,
                            expected: req.info.uncompressed_size,
                            actual: d.len(),
                        },
                    ));
                }
                Some(d) => data.push(d),
                None => {
                    return Err((i, not_produced()));
                }
            }
        }
        Ok(data)
    }

    /// One chunk, waiting for another thread's load (until `deadline`) if
    /// there is one.
    fn get_blocking(
        &self,
        req: &ChunkRequest,
        deadline: Option<Instant>,
    ) -> Result<ChunkData, ChunkError> {
        let owned = match self.memory.wait(&req.info.digest, 0, deadline) {
            Lookup::Hit(v) => {
                Metrics::add(&self.metrics.cache_hits, 1);
                return Ok(v);
            }
            Lookup::Miss(o) => {
                Metrics::add(&self.metrics.cache_misses, 1);
                o
            }
            Lookup::Busy if deadline.is_some() => {
                return Err(ChunkError::Fetch(
                    "the read's deadline passed while another reader was fetching this chunk"
                        .into(),
                ));
            }
            // Not returned without a deadline; load without a guard.
            Lookup::Busy => Owned::unguarded(0),
        };
        self.fetcher
            .load_owned(
                std::slice::from_ref(req),
                vec![owned],
                self.read_plan(deadline),
            )
            .pop()
            .map(|(_, r)| r.and_then(|d| d.ok_or_else(not_produced)))
            .unwrap_or_else(|| Err(not_produced()))
    }

    /// Fetches (without reading them) chunks that are neither in memory nor
    /// on disk, merging runs across gaps, in requests of at most
    /// [`PREFETCH_MAX_REQUEST`]; for background prefetch. Returns the number
    /// of chunks loaded and of chunks that failed.
    pub fn prefetch(&self, reqs: &[ChunkRequest]) -> (u64, u64) {
        self.prefetch_in(reqs, PREFETCH_MAX_REQUEST)
    }

    /// [`prefetch`](Self::prefetch) in requests of at most `max_request`
    /// stored bytes (readahead's own request size).
    pub fn prefetch_in(&self, reqs: &[ChunkRequest], max_request: u64) -> (u64, u64) {
        let mut owned = Vec::new();
        let mut seen = HashMap::new();
        let mut local = self.local_check();
        for (i, req) in reqs.iter().enumerate() {
            if seen.insert(req.info.digest, ()).is_some() || local.is_local(req) {
                continue;
            }
            // Skip what another thread is loading or has loaded meanwhile.
            if let Lookup::Miss(o) = self.memory.lookup(&req.info.digest, i) {
                owned.push(o);
            }
        }
        let plan = Plan {
            max_bytes: max_request,
            max_gap: PREFETCH_MAX_GAP,
            foreground: false,
            use_disk: false,
            optional_from: usize::MAX,
            refetch_corrupt: false,
            deadline: None,
        };
        let (mut ok, mut failed) = (0, 0);
        for (_, r) in self.fetcher.load_owned(reqs, owned, plan) {
            match r {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    }
}

/// The error of a chunk that a load did not hand back (a bug, not input).
fn not_produced() -> ChunkError {
    ChunkError::Fetch("internal: chunk not produced".into())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Barrier;

    use skiff_format::chunk::encode_chunk;
    use skiff_format::{ChunkInfo, Digest};
    use skiff_registry::{BlobStore, LocalBlobStore, RegistryError};

    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// Counts range reads through a real [`LocalBlobStore`], slowly, so
    /// that concurrent misses overlap.
    struct CountingStore {
        inner: LocalBlobStore,
        reads: AtomicU64,
        bytes: AtomicU64,
        delay: Duration,
    }

    impl BlobStore for CountingStore {
        fn read_range(
            &self,
            digest: &Digest,
            offset: u64,
            len: u64,
        ) -> Result<Vec<u8>, RegistryError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(len, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.inner.read_range(digest, offset, len)
        }

        fn blob_size(&self, digest: &Digest) -> Result<u64, RegistryError> {
            self.inner.blob_size(digest)
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        reqs: Vec<ChunkRequest>,
        datas: Vec<Vec<u8>>,
        store: Arc<CountingStore>,
        blob_path: std::path::PathBuf,
    }

    impl Fixture {
        /// The fixture of the blob at `blob_path` in the layout `dir`, read
        /// through a [`CountingStore`] that waits `delay` per read.
        fn new(
            dir: tempfile::TempDir,
            reqs: Vec<ChunkRequest>,
            datas: Vec<Vec<u8>>,
            blob_path: std::path::PathBuf,
            delay: Duration,
        ) -> Fixture {
            let store = Arc::new(CountingStore {
                inner: LocalBlobStore::new(dir.path()).unwrap(),
                reads: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                delay,
            });
            Fixture {
                dir,
                reqs,
                datas,
                store,
                blob_path,
            }
        }

        fn reads(&self) -> u64 {
            self.store.reads.load(Ordering::SeqCst)
        }

        fn source(&self, memory: u64, disk: Option<Arc<DiskCache>>) -> ChunkSource {
            ChunkSource::new(
                Backend::new(self.store.clone()),
                disk,
                SourceOptions {
                    memory_bytes: memory,
                    ..SourceOptions::default()
                },
                Arc::default(),
            )
        }
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
                digest: skiff_format::ChunkHash::Blake3.digest(&data),
                hash: skiff_format::ChunkHash::Blake3,
                blob_index: 0,
                compressed,
                compressed_offset: blob.len() as u64,
                compressed_size: stored.len() as u32,
                uncompressed_size: data.len() as u32,
                frame: None,
            });
            blob.extend_from_slice(&stored);
            datas.push(data);
        }
        let blob_digest = Digest::of(&blob);
        let blob_path = blobs.join(blob_digest.to_hex());
        std::fs::write(&blob_path, &blob).unwrap();
        let reqs = infos
            .into_iter()
            .enumerate()
            .map(|(i, info)| ChunkRequest {
                index: i as u32,
                info,
                blob: blob_digest,
            })
            .collect();
        Fixture::new(dir, reqs, datas, blob_path, delay)
    }

    #[test]
    fn serves_verified_data_and_caches_it() {
        let f = fixture(4, 10_000, Duration::ZERO);
        let source = f.source(1 << 20, None);
        for _ in 0..3 {
            for (req, data) in f.reqs.iter().zip(&f.datas) {
                assert_eq!(source.get(req).unwrap().as_slice(), data.as_slice());
            }
        }
        assert_eq!(f.reads(), 4);
        let m = source.metrics().snapshot();
        assert_eq!((m.cache_misses, m.cache_hits, m.chunks_fetched), (4, 8, 4));
    }

    #[test]
    fn byte_bound_is_respected() {
        let f = fixture(64, 16 << 10, Duration::ZERO);
        let bound = 256 << 10;
        let source = f.source(bound, None);
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

    /// 16 readers miss one slow chunk at once, with `memory` bytes of
    /// memory cache: it is fetched once.
    fn concurrent_misses_fetch_once_with(memory: u64) {
        let f = fixture(1, 50_000, Duration::from_millis(100));
        let source = f.source(memory, None);
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
        assert_eq!(f.reads(), 1);
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        concurrent_misses_fetch_once_with(1 << 20);
    }

    #[test]
    fn concurrent_misses_fetch_once_without_a_memory_cache() {
        // The memory cache is off: single flight still holds, since the
        // waiters get the value from the owner's guard.
        concurrent_misses_fetch_once_with(0);
    }

    #[test]
    fn a_waiter_gives_up_at_its_deadline() {
        // One reader fetches a slow chunk; another wants it with a short
        // deadline and gets an error by then, not the data later.
        let f = fixture(1, 50_000, Duration::from_millis(500));
        let source = f.source(1 << 20, None);
        std::thread::scope(|s| {
            let owner = s.spawn(|| source.get(&f.reqs[0]).map(|d| d.len()));
            std::thread::sleep(Duration::from_millis(100));
            let deadline = Instant::now() + Duration::from_millis(100);
            let got = source.get_with_read_ahead(&f.reqs, &[], 0, Some(deadline));
            // Had it waited for the owner's fetch, it would have its data.
            assert!(got.is_err(), "a waiter past its deadline got data");
            assert_eq!(owner.join().ok().and_then(Result::ok), Some(50_000));
        });
        assert_eq!(f.reads(), 1);
    }

    #[test]
    fn adjacent_misses_are_one_request() {
        let f = fixture(16, 20_000, Duration::ZERO);
        let source = f.source(8 << 20, None);
        let got = source.get_many(&f.reqs).unwrap();
        for (g, d) in got.iter().zip(&f.datas) {
            assert_eq!(g.as_slice(), d.as_slice());
        }
        assert_eq!(f.reads(), 1, "16 adjacent chunks, one request");
        let blob_len = std::fs::metadata(&f.blob_path).unwrap().len();
        assert_eq!(f.store.bytes.load(Ordering::SeqCst), blob_len);
        let m = source.metrics().snapshot();
        assert_eq!((m.fetch_requests, m.chunks_fetched), (1, 16));
        // A request bound splits it.
        let small = ChunkSource::new(
            Backend::new(f.store.clone()),
            None,
            SourceOptions {
                max_request_bytes: blob_len / 3,
                ..SourceOptions::default()
            },
            Arc::default(),
        );
        small.get_many(&f.reqs).unwrap();
        assert!((4..=6).contains(&(f.reads() - 1)), "{}", f.reads() - 1);
    }

    #[test]
    fn single_flight_holds_across_merged_runs() {
        // Many readers ask for overlapping windows of the same chunks at
        // once: every chunk is still fetched exactly once.
        let f = fixture(32, 20_000, Duration::from_millis(30));
        let source = f.source(64 << 20, None);
        let barrier = Barrier::new(8);
        std::thread::scope(|s| {
            for t in 0..8usize {
                let (source, f, barrier) = (&source, &f, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    // Windows of 16 chunks starting at 0, 2, 4, .. 16: all 32 chunks.
                    let lo = t * 16 / 7;
                    let window = &f.reqs[lo..lo + 16];
                    let got = source.get_many(window).unwrap();
                    for (g, d) in got.iter().zip(&f.datas[lo..lo + 16]) {
                        assert_eq!(g.as_slice(), d.as_slice());
                    }
                });
            }
        });
        let m = source.metrics().snapshot();
        let fetched_chunks = m.chunks_fetched;
        assert_eq!(fetched_chunks, 32, "every chunk fetched once");
        assert!(m.fetch_requests <= 16, "{} requests", m.fetch_requests);
    }

    #[test]
    fn get_many_fetches_runs_in_parallel_and_in_order() {
        let f = fixture(16, 20_000, Duration::from_millis(50));
        // Every other chunk: no two adjacent, 8 separate runs.
        let reqs: Vec<_> = f.reqs.iter().step_by(2).copied().collect();
        let source = f.source(8 << 20, None);
        let t = Instant::now();
        let got = source.get_many(&reqs).unwrap();
        // 8 fetches of 50 ms on 8 threads: about 50 ms, far below 400.
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        for (g, d) in got.iter().zip(f.datas.iter().step_by(2)) {
            assert_eq!(g.as_slice(), d.as_slice());
        }
        assert_eq!(f.reads(), 8);
    }

    #[test]
    fn a_record_that_lies_about_its_digests_size_is_an_error() {
        let f = fixture(3, 30_000, Duration::ZERO);
        let source = f.source(1 << 20, None);
        let mut liar = f.reqs[0];
        liar.index = 7;
        liar.info.uncompressed_size -= 1;
        // Once with the digest already cached, once loaded in the same call
        // as the honest record, and once on its own: never served.
        assert!(source.get(&f.reqs[0]).is_ok());
        for reqs in [vec![liar], vec![f.reqs[0], liar]] {
            match source.get_many(&reqs) {
                Err((
                    i,
                    ChunkError::RecordMismatch {
                        expected, actual, ..
                    },
                )) => {
                    assert_eq!(i, reqs.len() - 1);
                    assert_eq!(expected as usize + 1, actual);
                }
                other => panic!("a lying record gave {other:?}"),
            }
        }
        let fresh = f.source(1 << 20, None);
        assert!(fresh.get(&liar).is_err());
    }

    #[test]
    fn damaged_chunk_is_an_error_and_not_cached() {
        let f = fixture(3, 30_000, Duration::ZERO);
        let mut blob = std::fs::read(&f.blob_path).unwrap();
        let target = &f.reqs[1].info;
        blob[(target.compressed_offset + u64::from(target.compressed_size) / 2) as usize] ^= 0x40;
        std::fs::write(&f.blob_path, &blob).unwrap();
        let source = f.source(1 << 20, None);
        assert!(matches!(source.get(&f.reqs[1]), Err(ChunkError::Decode(_))));
        // Fetched once more on its own (damage in transit), then an error.
        assert_eq!(
            f.reads(),
            2,
            "one refetch of a chunk that fails verification"
        );
        assert!(source.get(&f.reqs[1]).is_err());
        assert_eq!(f.reads(), 4, "errors are not cached");
        assert_eq!(
            source.get(&f.reqs[0]).unwrap().as_slice(),
            f.datas[0].as_slice()
        );
        // In one merged run, only the damaged chunk fails.
        let fresh = f.source(1 << 20, None);
        match fresh.get_many(&f.reqs) {
            Err((i, _)) => assert_eq!(i, 1),
            Ok(_) => panic!("a damaged chunk was served"),
        }
        assert_eq!(
            fresh.get(&f.reqs[2]).unwrap().as_slice(),
            f.datas[2].as_slice()
        );
        assert!(source.metrics().snapshot().chunk_errors >= 2);
    }

    /// A blob holding one shared zstd frame of `n` small chunks of `size`
    /// bytes each (packed small files).
    fn frame_fixture(n: usize, size: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let datas: Vec<Vec<u8>> = (0..n)
            .map(|i| (0..size).map(|j| ((j % 13) * (i + 1)) as u8).collect())
            .collect();
        let (stored, compressed) = encode_chunk(&datas.concat(), 3).unwrap();
        assert!(compressed);
        std::fs::write(blobs.join(Digest::of(&stored).to_hex()), &stored).unwrap();
        let reqs = datas
            .iter()
            .enumerate()
            .map(|(i, data)| ChunkRequest {
                index: i as u32,
                info: ChunkInfo {
                    digest: skiff_format::ChunkHash::Blake3.digest(data),
                    hash: skiff_format::ChunkHash::Blake3,
                    blob_index: 0,
                    compressed: true,
                    compressed_offset: 0,
                    compressed_size: stored.len() as u32,
                    uncompressed_size: size as u32,
                    frame: Some(skiff_format::SharedFrame {
                        offset: (i * size) as u32,
                        size: (n * size) as u32,
                    }),
                },
                blob: Digest::of(&stored),
            })
            .collect();
        let blob_path = blobs.join(Digest::of(&stored).to_hex());
        Fixture::new(dir, reqs, datas, blob_path, Duration::ZERO)
    }

    #[test]
    fn a_shared_frames_file_makes_all_its_members_local() {
        let f = frame_fixture(6, 3000);
        let disk = Arc::new(DiskCache::open(&f.dir.path().join("cache"), 1 << 30).unwrap());
        let source = f.source(0, Some(disk.clone()));
        let mut check = source.local_check();
        assert!(
            f.reqs.iter().all(|r| !check.is_local(r)),
            "nothing local yet"
        );
        // Fetched ahead of any reader: the frame's file, unverified.
        assert_eq!(source.prefetch(&f.reqs), (6, 0));
        disk.flush();
        assert_eq!(f.reads(), 1, "one frame, one request");
        let mut check = source.local_check();
        assert!(
            f.reqs.iter().all(|r| check.is_local(r)),
            "local through the frame"
        );
        assert!(f.reqs.iter().all(|r| source.is_local(r)));
        assert_eq!(source.prefetch(&f.reqs), (0, 0), "nothing fetched again");
        // Readers get the members from the frame's file, verified.
        let got = source.get_many(&f.reqs).unwrap();
        for (g, d) in got.iter().zip(&f.datas) {
            assert_eq!(g.as_slice(), d.as_slice());
        }
        assert_eq!(f.reads(), 1);
    }

    #[test]
    fn disk_cache_serves_a_new_source_and_corrupt_files_are_refetched() {
        let f = fixture(8, 20_000, Duration::ZERO);
        let cache_dir = f.dir.path().join("cache");
        let disk = Arc::new(DiskCache::open(&cache_dir, 1 << 30).unwrap());
        let a = f.source(0, Some(disk.clone()));
        a.get_many(&f.reqs).unwrap();
        disk.flush();
        assert_eq!(f.reads(), 1);
        // Stored (compressed) bytes on disk, not decompressed ones.
        let on_disk = crate::disk::usage(&cache_dir).unwrap();
        let blob_len = std::fs::metadata(&f.blob_path).unwrap().len();
        assert_eq!((on_disk.entries, on_disk.bytes), (8, blob_len));
        // A new source (a restart) on the same directory fetches nothing.
        drop(a);
        disk.close();
        let disk = Arc::new(DiskCache::open(&cache_dir, 1 << 30).unwrap());
        let b = f.source(0, Some(disk.clone()));
        let got = b.get_many(&f.reqs).unwrap();
        for (g, d) in got.iter().zip(&f.datas) {
            assert_eq!(g.as_slice(), d.as_slice());
        }
        assert_eq!(f.reads(), 1, "restart reuse");
        assert_eq!(b.metrics().snapshot().disk_hits, 8);
        // Damage one file: detected, deleted, refetched, never served.
        let hex = f.reqs[3].info.digest.to_hex();
        let file = cache_dir.join("chunks").join(&hex[..2]).join(&hex);
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        std::fs::write(&file, &bytes).unwrap();
        let c = f.source(0, Some(disk.clone()));
        assert_eq!(c.get(&f.reqs[3]).unwrap().as_slice(), f.datas[3].as_slice());
        assert_eq!(f.reads(), 2);
        assert_eq!(c.metrics().snapshot().disk_corrupt, 1);
        disk.flush();
        assert_eq!(std::fs::read(&file).unwrap().len(), bytes.len());
        assert_eq!(c.get(&f.reqs[3]).unwrap().as_slice(), f.datas[3].as_slice());
        assert_eq!(f.reads(), 2, "the rewritten file serves");
    }

    #[test]
    fn prefetch_skips_local_chunks_and_bridges_gaps() {
        let f = fixture(10, 20_000, Duration::ZERO);
        let disk = Arc::new(DiskCache::open(&f.dir.path().join("cache"), 1 << 30).unwrap());
        let source = f.source(0, Some(disk.clone()));
        source.get(&f.reqs[4]).unwrap();
        disk.flush();
        assert_eq!(f.reads(), 1);
        let (ok, failed) = source.prefetch(&f.reqs);
        assert_eq!((ok, failed), (9, 0));
        // One request across the local chunk's gap.
        assert_eq!(f.reads(), 2);
        disk.flush();
        assert_eq!(
            crate::disk::usage(&f.dir.path().join("cache"))
                .unwrap()
                .entries,
            10
        );
        assert_eq!(source.prefetch(&f.reqs), (0, 0));
        assert_eq!(f.reads(), 2);
    }

    #[test]
    fn only_reads_the_list_foresaw_are_limited_to_it() {
        let f = fixture(6, 1000, Duration::ZERO);
        let source = f.source(0, None);
        assert!(source.listed_for(&f.reqs[..1]).is_none(), "no list yet");
        let listed: Vec<u32> = f.reqs[..3].iter().map(|r| r.index).collect();
        source.set_listed(ListedChunks::new(listed));
        let l = source.listed_for(&f.reqs[1..3]).expect("all listed");
        assert!(l.contains(f.reqs[0].index) && !l.contains(f.reqs[3].index));
        assert!(source.listed_for(&f.reqs[2..4]).is_none(), "one unlisted");
        assert!(source.listed_for(&[]).is_none());
    }
}
