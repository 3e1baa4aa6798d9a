//! Verified, decompressed chunks: the memory cache, the disk cache and the
//! coalescing fetch path, in [`ChunkSource`].
//!
//! # The read path
//!
//! [`ChunkSource::get_many`] serves a FUSE read that needs several chunks:
//!
//! 1. **Memory.** Each distinct chunk (keyed by its digest, so identical
//!    chunks of two files share one entry) is looked up in a byte-bounded
//!    memory cache of decompressed data. A miss hands this thread a
//!    placeholder *guard* for the chunk (quick_cache's
//!    `get_value_or_guard`, with a zero timeout so it never waits here): it
//!    now owns loading that chunk, and any other thread that wants it parks
//!    on the guard. A chunk whose guard someone else holds is set aside and
//!    waited for at the end, after this thread has released every guard it
//!    owns, so two readers can never wait on each other.
//! 2. **Disk.** Each owned chunk is looked up in the [`DiskCache`] (one
//!    `open`), decoded and verified; a file that fails is deleted and the
//!    chunk falls through to the network.
//! 3. **Network.** The remaining chunks are grouped by [`plan_runs`]: same
//!    blob, exactly adjacent, at most `max_request_bytes` per run. Runs are
//!    fetched in parallel (at most `max_parallel` at once); each chunk of a
//!    fetched run is decoded and verified on its own (in parallel: decoding
//!    is the CPU-bound half), then inserted into memory (which wakes the
//!    threads parked on it) and queued for the disk cache.
//!
//! A failed run or a chunk that does not verify fails only the chunks
//! concerned: their guards are dropped without a value, so an error is
//! never cached and the next waiter tries for itself. The caller turns the
//! first failure into `EIO`. The memory cache is sharded with a lock per
//! shard held only for a lookup or insert, never across a fetch: there is
//! no global lock on the read path.
//!
//! [`ChunkSource::prefetch`] runs the same machinery for background work,
//! with two differences: chunks already on disk are skipped rather than
//! loaded into memory, and runs may bridge gaps (see [`plan_runs`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, DefaultLifecycle, GuardResult, PlaceholderGuard};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};
use skiff_format::chunk::decode_chunk;
use skiff_format::{ChunkInfo, Digest};

use crate::chunk::{plan_runs, Backend, ChunkRequest, Run};
use crate::disk::DiskCache;
use crate::error::ChunkError;
use crate::metrics::Metrics;

/// Decompressed, verified chunk data, shared by the cache and readers.
pub type ChunkData = Arc<Vec<u8>>;

/// Weighs a cached chunk by its length (plus a little for the entry itself,
/// so that a cache of empty chunks is still bounded).
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteWeighter;

impl Weighter<Digest, ChunkData> for ByteWeighter {
    fn weight(&self, _key: &Digest, val: &ChunkData) -> u64 {
        val.len() as u64 + 64
    }
}

type Guard<'a> = PlaceholderGuard<
    'a,
    Digest,
    ChunkData,
    ByteWeighter,
    DefaultHashBuilder,
    DefaultLifecycle<Digest, ChunkData>,
>;

/// Default bound of one merged range request for reads: 4 MiB.
pub const DEFAULT_MAX_REQUEST: u64 = 4 << 20;
/// Default number of range requests of one read in flight at once.
pub const DEFAULT_MAX_PARALLEL: usize = 8;

/// How a [`ChunkSource`] fetches.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Bound of the memory cache of decompressed data, in bytes (0 disables it).
    pub memory_bytes: u64,
    /// Largest merged range request of a read, in bytes.
    pub max_request_bytes: u64,
    /// Range requests of one read in flight at once.
    pub max_parallel: usize,
    /// Threads that decode the chunks of one read in parallel.
    pub decode_threads: usize,
}

impl Default for SourceOptions {
    /// 64 MiB of memory cache, 4 MiB requests, 8 in parallel, one decoder per CPU.
    fn default() -> Self {
        SourceOptions {
            memory_bytes: 64 << 20,
            max_request_bytes: DEFAULT_MAX_REQUEST,
            max_parallel: DEFAULT_MAX_PARALLEL,
            decode_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// How one batch of owned chunks is loaded.
#[derive(Debug, Clone, Copy)]
struct Plan {
    max_bytes: u64,
    max_gap: u64,
    /// A reader waits for it (prefetch yields to these).
    foreground: bool,
    /// Look in the disk cache first.
    use_disk: bool,
    /// Positions from here on are optional (read-ahead): not looked up on
    /// disk, and fetched only as part of a run that has a required chunk.
    optional_from: usize,
    /// Fetch a required chunk once more, on its own, when what came over
    /// the network fails verification (damage in transit).
    refetch_corrupt: bool,
}

/// Largest prefetch request.
pub const PREFETCH_MAX_REQUEST: u64 = 8 << 20;
/// Largest gap a prefetch request bridges.
pub const PREFETCH_MAX_GAP: u64 = 64 << 10;

/// A chunk this thread has to produce, and its guard in the memory cache
/// (`None` when the cache could not give one).
struct Owned<'a> {
    pos: usize,
    guard: Option<Guard<'a>>,
}

impl Owned<'_> {
    fn fill(self, data: &ChunkData) {
        if let Some(g) = self.guard {
            // A chunk larger than a cache shard is not kept; that is fine.
            let _ = g.insert(data.clone());
        }
    }
}

type Loaded = (usize, Result<ChunkData, ChunkError>);

/// Chunks on demand: memory cache, disk cache, coalesced verified fetches.
pub struct ChunkSource {
    backend: Backend,
    disk: Option<Arc<DiskCache>>,
    cache: Cache<Digest, ChunkData, ByteWeighter>,
    metrics: Arc<Metrics>,
    opts: SourceOptions,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChunkSource {
    /// A source reading from `backend`, with the optional `disk` cache.
    pub fn new(
        backend: Backend,
        disk: Option<Arc<DiskCache>>,
        opts: SourceOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        // quick_cache wants an estimate of the item count; 64 KiB is the
        // default average chunk size.
        let items = usize::try_from(opts.memory_bytes / 65536)
            .unwrap_or(usize::MAX)
            .max(16);
        // quick_cache admits new entries into a "cold" part of each shard
        // (3% by default) and promotes them when read again. Readahead and
        // fetch windows insert chunks that nobody has read yet; in a 3%
        // part they were evicted before their reader came (a cold 2 GiB read
        // fetched 1.6x the blob). Half the cache for new entries, and a
        // shard per 8 MiB, keep a window's chunks until they are read.
        let shards = usize::try_from(opts.memory_bytes >> 23)
            .unwrap_or(usize::MAX)
            .clamp(1, 16)
            .next_power_of_two();
        let cache = OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(opts.memory_bytes.max(1))
            .hot_allocation(0.5)
            .shards(shards)
            .build()
            .map(|o| {
                Cache::with_options(
                    o,
                    ByteWeighter,
                    DefaultHashBuilder::default(),
                    DefaultLifecycle::default(),
                )
            })
            .unwrap_or_else(|_| {
                Cache::with_weighter(items, opts.memory_bytes.max(1), ByteWeighter)
            });
        ChunkSource {
            backend,
            disk,
            cache,
            metrics,
            opts,
        }
    }

    /// The counters this source updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The backend it fetches from.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The disk cache, if any.
    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// Bytes currently held by the memory cache (decompressed data plus per-entry overhead).
    pub fn cached_bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// Number of chunks currently in the memory cache.
    pub fn cached_chunks(&self) -> usize {
        self.cache.len()
    }

    /// Whether chunk `digest` is in the memory cache.
    pub fn in_memory(&self, digest: &Digest) -> bool {
        self.cache.contains_key(digest)
    }

    /// Whether chunk `digest` is in memory or on disk.
    pub fn is_local(&self, digest: &Digest) -> bool {
        self.cache.contains_key(digest) || self.disk.as_ref().is_some_and(|d| d.contains(digest))
    }

    fn read_plan(&self) -> Plan {
        Plan {
            max_bytes: self.opts.max_request_bytes,
            max_gap: 0,
            foreground: true,
            use_disk: true,
            optional_from: usize::MAX,
            refetch_corrupt: true,
        }
    }

    /// The decompressed, verified data of one chunk.
    pub fn get(&self, req: &ChunkRequest) -> Result<ChunkData, ChunkError> {
        self.get_many(std::slice::from_ref(req))
            .map_err(|(_, e)| e)?
            .pop()
            .ok_or_else(|| ChunkError::Fetch("internal: chunk not produced".into()))
    }

    /// The data of several chunks, in order; see the module documentation.
    /// On failure returns the position in `reqs` of a chunk that failed,
    /// with its error.
    pub fn get_many(&self, reqs: &[ChunkRequest]) -> Result<Vec<ChunkData>, (usize, ChunkError)> {
        self.get_with_read_ahead(reqs, &[], 0)
    }

    /// [`get_many`](Self::get_many), also loading the chunks of `ahead`
    /// (those that follow the last one in its blob) that are in no cache,
    /// when they extend a request the read makes anyway: more bytes per
    /// round trip, no extra round trip. Requests may grow to `max_request`
    /// bytes if that is above the configured bound. Failures of `ahead`
    /// chunks are ignored: a later read that needs them reports them.
    pub fn get_with_read_ahead(
        &self,
        reqs: &[ChunkRequest],
        ahead: &[ChunkRequest],
        max_request: u64,
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
            match self
                .cache
                .get_value_or_guard(&req.info.digest, Some(Duration::ZERO))
            {
                GuardResult::Value(v) => {
                    Metrics::add(&self.metrics.cache_hits, 1);
                    out[i] = Some(Ok(v));
                }
                GuardResult::Guard(g) => {
                    Metrics::add(&self.metrics.cache_misses, 1);
                    owned.push(Owned {
                        pos: i,
                        guard: Some(g),
                    });
                }
                GuardResult::Timeout => waiting.push(i),
            }
        }
        let mut all: Vec<ChunkRequest> = Vec::new();
        if !owned.is_empty() && !ahead.is_empty() {
            all.extend_from_slice(reqs);
            for r in ahead {
                if first.contains_key(&r.info.digest) || self.is_local(&r.info.digest) {
                    continue;
                }
                first.insert(r.info.digest, usize::MAX);
                if let GuardResult::Guard(g) = self
                    .cache
                    .get_value_or_guard(&r.info.digest, Some(Duration::ZERO))
                {
                    owned.push(Owned {
                        pos: all.len(),
                        guard: Some(g),
                    });
                    all.push(*r);
                }
            }
        }
        if !owned.is_empty() {
            let mut plan = self.read_plan();
            if !all.is_empty() {
                plan.max_bytes = plan.max_bytes.max(max_request);
            }
            plan.optional_from = reqs.len();
            let list = if all.is_empty() { reqs } else { &all[..] };
            for (pos, r) in self.load_owned(list, owned, plan) {
                if let Some(slot) = out.get_mut(pos) {
                    *slot = Some(r);
                }
            }
        }
        // Every guard of ours is released: now wait for the others' chunks.
        for i in waiting {
            out[i] = Some(self.get_blocking(&reqs[i]));
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
                    return Err((i, ChunkError::Fetch("internal: chunk not produced".into())));
                }
            }
        }
        Ok(data)
    }

    /// One chunk, waiting for another thread's load if there is one.
    fn get_blocking(&self, req: &ChunkRequest) -> Result<ChunkData, ChunkError> {
        let guard = match self.cache.get_value_or_guard(&req.info.digest, None) {
            GuardResult::Value(v) => {
                Metrics::add(&self.metrics.cache_hits, 1);
                return Ok(v);
            }
            GuardResult::Guard(g) => {
                Metrics::add(&self.metrics.cache_misses, 1);
                Some(g)
            }
            // Not returned without a timeout; load without a guard.
            GuardResult::Timeout => None,
        };
        let owned = vec![Owned { pos: 0, guard }];
        self.load_owned(std::slice::from_ref(req), owned, self.read_plan())
            .pop()
            .map(|(_, r)| r)
            .unwrap_or_else(|| Err(ChunkError::Fetch("internal: chunk not produced".into())))
    }

    /// Fetches (without reading them) chunks that are neither in memory nor
    /// on disk, merging runs across gaps; for background prefetch. Returns
    /// the number of chunks loaded and of chunks that failed.
    pub fn prefetch(&self, reqs: &[ChunkRequest]) -> (u64, u64) {
        let mut owned = Vec::new();
        let mut seen = HashMap::new();
        for (i, req) in reqs.iter().enumerate() {
            if seen.insert(req.info.digest, ()).is_some() || self.is_local(&req.info.digest) {
                continue;
            }
            // Skip what another thread is loading or has loaded meanwhile.
            if let GuardResult::Guard(g) = self
                .cache
                .get_value_or_guard(&req.info.digest, Some(Duration::ZERO))
            {
                owned.push(Owned {
                    pos: i,
                    guard: Some(g),
                });
            }
        }
        let plan = Plan {
            max_bytes: PREFETCH_MAX_REQUEST,
            max_gap: PREFETCH_MAX_GAP,
            foreground: false,
            use_disk: false,
            optional_from: usize::MAX,
            refetch_corrupt: false,
        };
        let (mut ok, mut failed) = (0, 0);
        for (_, r) in self.load_owned(reqs, owned, plan) {
            match r {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    }

    /// Loads the chunks owned by this thread: disk first, then coalesced
    /// fetches. Returns one result per owned chunk.
    fn load_owned<'a>(
        &'a self,
        reqs: &[ChunkRequest],
        owned: Vec<Owned<'a>>,
        plan: Plan,
    ) -> Vec<Loaded> {
        let mut results: Vec<Loaded> = Vec::with_capacity(owned.len());
        let (owned, optional): (Vec<Owned<'a>>, Vec<Owned<'a>>) =
            owned.into_iter().partition(|o| o.pos < plan.optional_from);
        let mut to_fetch = match self.disk.as_ref().filter(|_| plan.use_disk) {
            Some(disk) => {
                let mut rest = Vec::new();
                let outcomes = run_parallel(owned, self.opts.decode_threads, |o: Owned<'a>| {
                    match reqs.get(o.pos).and_then(|r| self.load_from_disk(disk, r)) {
                        Some(data) => {
                            let pos = o.pos;
                            o.fill(&data);
                            Ok((pos, data))
                        }
                        None => Err(o),
                    }
                });
                for x in outcomes.into_iter().flatten() {
                    match x {
                        Ok((pos, data)) => results.push((pos, Ok(data))),
                        Err(o) => rest.push(o),
                    }
                }
                Metrics::add(&self.metrics.disk_misses, rest.len() as u64);
                rest
            }
            None => owned,
        };
        if to_fetch.is_empty() {
            return results;
        }
        to_fetch.extend(optional);
        let fetch_reqs: Vec<ChunkRequest> = to_fetch
            .iter()
            .filter_map(|o| reqs.get(o.pos).copied())
            .collect();
        if fetch_reqs.len() != to_fetch.len() {
            // Positions come from `reqs` itself; this cannot happen.
            for o in to_fetch {
                results.push((
                    o.pos,
                    Err(ChunkError::Fetch("internal: bad position".into())),
                ));
            }
            return results;
        }
        let runs = plan_runs(&fetch_reqs, plan.max_bytes, plan.max_gap);
        let mut slots: Vec<Option<Owned<'a>>> = to_fetch.into_iter().map(Some).collect();
        let tasks: Vec<(Run, Vec<Owned<'a>>)> = runs
            .into_iter()
            // A run of read-ahead chunks only is not worth a round trip
            // (dropping it releases their guards).
            .filter(|run| {
                run.members.iter().any(|&k| {
                    slots
                        .get(k)
                        .and_then(Option::as_ref)
                        .is_some_and(|o| o.pos < plan.optional_from)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|run| {
                let members = run
                    .members
                    .iter()
                    .filter_map(|&k| slots.get_mut(k).and_then(Option::take))
                    .collect();
                (run, members)
            })
            .collect();
        let fetched = run_parallel(tasks, self.opts.max_parallel, |(run, members)| {
            (self.fetch_run(&run, plan.foreground), run, members)
        });
        let mut decode = Vec::new();
        for (res, run, members) in fetched.into_iter().flatten() {
            match res {
                Ok(buf) => {
                    let buf = Arc::new(buf);
                    for o in members {
                        decode.push((buf.clone(), run.offset, o));
                    }
                }
                Err(msg) => {
                    Metrics::add(&self.metrics.chunk_errors, members.len() as u64);
                    for o in members {
                        results.push((o.pos, Err(ChunkError::Fetch(msg.clone()))));
                    }
                }
            }
        }
        let decoded = run_parallel(decode, self.opts.decode_threads, |(buf, base, o)| {
            let pos = o.pos;
            (pos, self.finish_fetched(reqs.get(pos), &buf, base, o))
        });
        let mut again = Vec::new();
        for (pos, r) in decoded.into_iter().flatten() {
            match r {
                Ok(data) => results.push((pos, Ok(data))),
                Err((e, o)) if plan.refetch_corrupt && pos < plan.optional_from => {
                    if let Some(req) = reqs.get(pos) {
                        // The chunk's digest and the error are left to the
                        // line that names its file, if the second fetch fails.
                        let _ = e;
                        tracing::warn!(
                            "chunk {} (blob {}, offset {}) failed verification after a fetch; fetching it again",
                            req.index,
                            req.blob,
                            req.start()
                        );
                    }
                    again.push(o);
                }
                Err((e, _)) => results.push((pos, Err(e))),
            }
        }
        if !again.is_empty() {
            // Once, each chunk on its own: a second failure is the answer.
            let retry = Plan {
                max_bytes: 0,
                max_gap: 0,
                use_disk: false,
                refetch_corrupt: false,
                ..plan
            };
            results.extend(self.load_owned(reqs, again, retry));
        }
        results
    }

    /// Cuts one chunk out of a fetched run, verifies it, and fills the
    /// caches. A chunk that does not verify comes back with its guard, so
    /// that the caller may fetch it again.
    fn finish_fetched<'a>(
        &self,
        req: Option<&ChunkRequest>,
        buf: &[u8],
        base: u64,
        o: Owned<'a>,
    ) -> Result<ChunkData, (ChunkError, Owned<'a>)> {
        let Some(req) = req else {
            return Err((ChunkError::Fetch("internal: bad position".into()), o));
        };
        let from = usize::try_from(req.start().saturating_sub(base)).unwrap_or(usize::MAX);
        let to = from.saturating_add(req.info.compressed_size as usize);
        let Some(stored) = buf.get(from..to) else {
            return Err((
                ChunkError::Fetch("internal: run shorter than its chunks".into()),
                o,
            ));
        };
        match decode_chunk(&req.info, stored) {
            Ok(data) => {
                Metrics::add(&self.metrics.chunks_fetched, 1);
                let data = Arc::new(data);
                o.fill(&data);
                if let Some(disk) = &self.disk {
                    disk.insert(req.info.digest, stored.to_vec());
                }
                Ok(data)
            }
            Err(e) => {
                Metrics::add(&self.metrics.chunk_errors, 1);
                Err((ChunkError::Decode(e), o))
            }
        }
    }

    /// One range request, counted and timed.
    fn fetch_run(&self, run: &Run, foreground: bool) -> Result<Vec<u8>, String> {
        let m = &self.metrics;
        let _in_flight = InFlight::new(m, foreground);
        let t = Instant::now();
        let r = self
            .backend
            .store
            .read_range(&run.blob, run.offset, run.len);
        m.fetch_latency.observe(t.elapsed());
        Metrics::add(&m.fetch_requests, 1);
        match r {
            Ok(bytes) if bytes.len() as u64 == run.len => {
                Metrics::add(&m.bytes_fetched, run.len);
                Ok(bytes)
            }
            Ok(bytes) => {
                Metrics::add(&m.fetch_errors, 1);
                Err(format!(
                    "blob {} gave {} bytes at offset {}, expected {}",
                    run.blob,
                    bytes.len(),
                    run.offset,
                    run.len
                ))
            }
            Err(e) => {
                Metrics::add(&m.fetch_errors, 1);
                Err(format!(
                    "reading {} bytes at offset {} of blob {}: {e}",
                    run.len, run.offset, run.blob
                ))
            }
        }
    }

    /// A chunk from the disk cache, verified; a file that fails is deleted.
    fn load_from_disk(&self, disk: &DiskCache, req: &ChunkRequest) -> Option<ChunkData> {
        let raw = u64::from(req.info.uncompressed_size);
        let max = raw.max(u64::from(req.info.compressed_size));
        let bytes = disk.get(&req.info.digest, max)?;
        let len = u32::try_from(bytes.len()).ok()?;
        // The stored form is told by its length (see `disk`): the file may
        // come from another image that compressed the chunk otherwise.
        let info = ChunkInfo {
            compressed: u64::from(len) != raw,
            compressed_size: len,
            ..req.info
        };
        match decode_chunk(&info, &bytes) {
            Ok(data) => {
                Metrics::add(&self.metrics.disk_hits, 1);
                Some(Arc::new(data))
            }
            Err(e) => {
                tracing::debug!("disk cache copy of chunk {}: {e}", req.info.digest);
                Metrics::add(&self.metrics.disk_corrupt, 1);
                disk.discard(&req.info.digest);
                None
            }
        }
    }
}

/// Counts a request in flight until dropped.
struct InFlight<'a> {
    m: &'a Metrics,
    foreground: bool,
}

impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics, foreground: bool) -> Self {
        Metrics::add(&m.fetch_in_flight, 1);
        if foreground {
            Metrics::add(&m.foreground_in_flight, 1);
        }
        InFlight { m, foreground }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        Metrics::sub(&self.m.fetch_in_flight, 1);
        if self.foreground {
            Metrics::sub(&self.m.foreground_in_flight, 1);
        }
    }
}

/// Whether foreground fetches are in flight (prefetch waits for them).
pub(crate) fn foreground_busy(m: &Metrics) -> bool {
    m.foreground_in_flight.load(Ordering::Relaxed) > 0
}

/// Applies `f` to every task on at most `threads` scoped threads (inline
/// when there is one task or one thread), returning the results in task
/// order; `None` only where `f` panicked.
pub(crate) fn run_parallel<T: Send, R: Send>(
    tasks: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<Option<R>> {
    let n = tasks.len();
    if n <= 1 || threads <= 1 {
        return tasks.into_iter().map(|t| Some(f(t))).collect();
    }
    let queue: Mutex<VecDeque<(usize, T)>> = Mutex::new(tasks.into_iter().enumerate().collect());
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.min(n) {
            s.spawn(|| loop {
                let next = lock(&queue).pop_front();
                let Some((i, t)) = next else { break };
                let r = f(t);
                if let Some(slot) = lock(&results).get_mut(i) {
                    *slot = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Barrier;

    use skiff_format::chunk::encode_chunk;
    use skiff_format::{ChunkInfo, Digest};
    use skiff_registry::{BlobStore, LocalBlobStore, RegistryError};

    use super::*;

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
        let store = Arc::new(CountingStore {
            inner: LocalBlobStore::new(dir.path()).unwrap(),
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
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
            dir,
            reqs,
            datas,
            store,
            blob_path,
        }
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

    #[test]
    fn concurrent_misses_fetch_once() {
        let f = fixture(1, 50_000, Duration::from_millis(100));
        let source = f.source(1 << 20, None);
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
}
