//! Loading chunks that are not in memory: the disk cache, then the
//! network, with verification and one refetch of damage in transit.
//!
//! [`Fetcher::load`] takes the chunks a caller owns (see
//! [`crate::cache::Owned`]) and a [`Plan`]:
//!
//! 1. **Disk.** Each chunk is looked up in the [`DiskCache`] (one `open`),
//!    decoded and verified; a file that fails is deleted and the chunk
//!    falls through to the network.
//! 2. **Network.** The rest are grouped by [`plan_runs`]: same blob,
//!    adjacent (or within `max_gap` for prefetch), at most `max_bytes` per
//!    run. The load first takes its share of the mount's [`ByteBudget`] (the
//!    runs plus the chunks decoded from them), waiting until its deadline
//!    at most. Runs are fetched in parallel (at most `max_parallel` at once),
//!    each through [`BlobStore::read_range_until`] when the plan has a
//!    deadline, so that a stalled registry gives up when the reader does.
//! 3. **Decode.** Each chunk of a fetched run is decoded and verified on its
//!    own (in parallel: decoding is the CPU-bound half), handed to its
//!    guard (which wakes the threads parked on it) and queued for the disk
//!    cache. A chunk that fails verification is fetched once more on its
//!    own; a second failure is the answer.
//!
//! A failed run or a chunk that does not verify fails only the chunks
//! concerned: their guards are dropped without a value.
//!
//! [`BlobStore::read_range_until`]: skiff_registry::BlobStore::read_range_until

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use skiff_format::chunk::decode_chunk;
use skiff_format::ChunkInfo;

use crate::cache::{ChunkData, Owned};
use crate::chunk::{plan_runs, Backend, ChunkRequest, Run};
use crate::disk::DiskCache;
use crate::error::ChunkError;
use crate::metrics::Metrics;
use crate::workers::{run_parallel, ByteBudget};

/// Default bound of one merged range request for reads: 1 MiB. Round
/// trips are what a cold start waits for, but a larger request mostly
/// holds memory: the kernel asks for at most 1 MiB per FUSE read.
pub const DEFAULT_MAX_REQUEST: u64 = 1 << 20;
/// Default number of range requests of one load in flight at once.
pub const DEFAULT_MAX_PARALLEL: usize = 8;
/// Default [`SourceOptions::in_flight_bytes`]: 8 MiB of fetched and decoded
/// chunk data per mount, whatever the number of threads (a FUSE read is at
/// most 1 MiB of data, a readahead window 4 MiB).
pub const DEFAULT_IN_FLIGHT: u64 = 8 << 20;
/// Default [`SourceOptions::memory_bytes`]: 4 MiB. The page cache keeps
/// what readers read and the disk cache what was fetched; this only saves
/// decoding a chunk twice when two FUSE reads share it (the kernel's reads
/// do not end on chunk boundaries), which needs a few chunks, not a copy of
/// the working set.
pub const DEFAULT_MEMORY_CACHE: u64 = 4 << 20;

/// Largest prefetch request.
pub const PREFETCH_MAX_REQUEST: u64 = 8 << 20;
/// Largest gap a prefetch request bridges.
pub const PREFETCH_MAX_GAP: u64 = 64 << 10;

/// How a [`ChunkSource`](crate::ChunkSource) fetches.
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
    /// Bytes of chunk data (fetched runs and their decoded chunks) held in
    /// flight at once by all loads of the source; see [`ByteBudget`].
    pub in_flight_bytes: u64,
}

impl Default for SourceOptions {
    /// [`DEFAULT_MEMORY_CACHE`], [`DEFAULT_MAX_REQUEST`],
    /// [`DEFAULT_MAX_PARALLEL`], one decoder per CPU, [`DEFAULT_IN_FLIGHT`].
    fn default() -> Self {
        SourceOptions {
            memory_bytes: DEFAULT_MEMORY_CACHE,
            max_request_bytes: DEFAULT_MAX_REQUEST,
            max_parallel: DEFAULT_MAX_PARALLEL,
            decode_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            in_flight_bytes: DEFAULT_IN_FLIGHT,
        }
    }
}

/// How one batch of owned chunks is loaded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) max_bytes: u64,
    pub(crate) max_gap: u64,
    /// A reader waits for it (prefetch yields to these).
    pub(crate) foreground: bool,
    /// Look in the disk cache first.
    pub(crate) use_disk: bool,
    /// Positions from here on are optional (read-ahead): not looked up on
    /// disk, and fetched only as part of a run that has a required chunk.
    pub(crate) optional_from: usize,
    /// Fetch a required chunk once more, on its own, when what came over
    /// the network fails verification (damage in transit).
    pub(crate) refetch_corrupt: bool,
    /// Give up by then (a reader's budget); `None`: the store's own.
    pub(crate) deadline: Option<Instant>,
}

/// One loaded chunk: its position and its data or error.
pub(crate) type Loaded = (usize, Result<ChunkData, ChunkError>);

/// The disk and network half of a [`ChunkSource`](crate::ChunkSource).
pub(crate) struct Fetcher {
    pub(crate) backend: Backend,
    pub(crate) disk: Option<Arc<DiskCache>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) opts: SourceOptions,
    pub(crate) budget: ByteBudget,
}

impl Fetcher {
    /// Loads the chunks owned by this thread: disk first, then coalesced
    /// fetches. Returns one result per owned chunk.
    pub(crate) fn load_owned<'a>(
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
        // The share of the budget: the stored runs and the chunks decoded
        // from them, both alive until the decode below is done.
        let bytes: u64 = tasks
            .iter()
            .map(|(run, members)| {
                let decoded: u64 = members
                    .iter()
                    .filter_map(|o| reqs.get(o.pos))
                    .map(|r| u64::from(r.info.uncompressed_size))
                    .sum();
                run.len.saturating_add(decoded)
            })
            .sum();
        let Some(permit) = self.budget.acquire(bytes, plan.deadline) else {
            Metrics::add(&self.metrics.chunk_errors, tasks.len() as u64);
            for (_, members) in tasks {
                for o in members {
                    results.push((
                        o.pos,
                        Err(ChunkError::Fetch(
                            "the read's deadline passed while other fetches held the in-flight budget".into(),
                        )),
                    ));
                }
            }
            return results;
        };
        let fetched = run_parallel(tasks, self.opts.max_parallel, |(run, members)| {
            (self.fetch_run(&run, plan), run, members)
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
        drop(permit);
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
    fn fetch_run(&self, run: &Run, plan: Plan) -> Result<Vec<u8>, String> {
        let m = &self.metrics;
        let _in_flight = InFlight::new(m, plan.foreground);
        let t = Instant::now();
        let store = &self.backend.store;
        let r = match plan.deadline {
            Some(d) => store.read_range_until(&run.blob, run.offset, run.len, d),
            None => store.read_range(&run.blob, run.offset, run.len),
        };
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
    pub(crate) fn load_from_disk(&self, disk: &DiskCache, req: &ChunkRequest) -> Option<ChunkData> {
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
