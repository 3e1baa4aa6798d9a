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
//! 3. **Decode.** Each stored frame of a fetched run is decoded once (in
//!    parallel: decoding is the CPU-bound half) and each chunk in it (one,
//!    or the members of a shared frame) verified on its own, handed to its
//!    guard (which wakes the threads parked on it) and queued for the disk
//!    cache. A chunk that fails verification is fetched once more on its
//!    own; a second failure is the answer.
//!
//!    With a disk cache, what is fetched ahead of any reader (prefetch,
//!    readahead, the optional part of a read's fetch window, the other
//!    members of a shared frame) is not decoded here: its stored bytes go
//!    to the disk cache as they came, and the read that wants a chunk
//!    decodes and verifies it there, once ([`Fetcher::load_from_disk`]; a
//!    chunk damaged in transit then fails that check, is deleted and
//!    fetched again). Decoding and hashing at fetch time would be a second
//!    decode for every chunk that is read, and a wasted one for every chunk
//!    that never is. A shared frame (packed small files) goes to disk once,
//!    as one file under its [`ChunkRequest::frame_key`], not as a file per
//!    member: creating files is most of what writing the cache costs.
//!
//!    Such a load from a registry (readahead, prefetch: nothing to decode)
//!    is *streamed*: each run is one Range GET handed over in pieces of
//!    about [`STREAM_PIECE`] bytes ([`BlobStore::read_range_pieces`]), and
//!    each piece's frames go to the disk cache, their guards released, as
//!    soon as it has arrived. So its requests can be large without a reader
//!    parked on a chunk waiting for the end of the request, and it holds
//!    about two pieces of the budget per run, not the run.
//!
//! A failed run or a chunk that does not verify fails only the chunks
//! concerned: their guards are dropped without a value.
//!
//! [`BlobStore::read_range_until`]: skiff_registry::BlobStore::read_range_until
//! [`BlobStore::read_range_pieces`]: skiff_registry::BlobStore::read_range_pieces

use std::sync::Arc;
use std::time::Instant;

use skiff_format::chunk::{
    decode_chunk_into, decode_chunk_owned, decode_frame, decode_frame_into, slice_of_frame,
};
use skiff_format::{ChunkInfo, Digest, FormatError, MAX_CHUNK_SIZE};

use crate::cache::{ChunkData, Owned};
use crate::chunk::{plan_runs, Backend, ChunkRequest, Run};
use crate::disk::{DiskCache, Stored};
use crate::error::ChunkError;
use crate::link::LinkEstimate;
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

/// Largest prefetch request: 2 MiB. With a disk cache a prefetch load
/// holds only its stored bytes of the in-flight budget (it decodes
/// nothing), so the prefetch's requests in flight hold at most 6 MiB
/// ([`crate::prefetch::PREFETCH_IN_FLIGHT`]) of the default 8 MiB and a
/// reader's request still fits. Most requests
/// are smaller anyway: a list's files are scattered, and runs end at gaps
/// of more than [`PREFETCH_MAX_GAP`]. Measured with the import's list over
/// 100 Mbit/s with 20 ms RTT: one 8 MiB request at a time (the budget let
/// no second one in) 4.7 s; three of 2 MiB 4.0 s, 104 requests for the
/// list instead of 99.
pub const PREFETCH_MAX_REQUEST: u64 = 2 << 20;
/// Target size of the pieces a streamed request is handed over in (see
/// `Fetcher::stream_run`): pieces end at frame boundaries, so a piece may be
/// one frame larger.
pub const STREAM_PIECE: u64 = 256 << 10;
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
    /// A reader waits for it: what it fetches is decoded and verified at
    /// once, not left in the disk cache for later.
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

/// A piece of a streamed run (see `Fetcher::stream_run`): where it starts
/// in the blob, and the owners of each stored frame in it, in blob order.
struct Piece<'a> {
    base: u64,
    frames: Vec<Vec<Owned<'a>>>,
}

/// One loaded chunk: its position and its data (`None`: fetched ahead of
/// any reader and left in the disk cache unverified, for the reader to
/// verify), or its error.
pub(crate) type Loaded = (usize, Result<Option<ChunkData>, ChunkError>);

/// The disk and network half of a [`ChunkSource`](crate::ChunkSource).
pub(crate) struct Fetcher {
    pub(crate) backend: Backend,
    pub(crate) disk: Option<Arc<DiskCache>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) opts: SourceOptions,
    pub(crate) budget: ByteBudget,
    /// Shared frames recently decoded from the disk cache.
    pub(crate) frames: RecentFrames,
    /// The link to a remote store, from the timings of reads' requests.
    pub(crate) link: Arc<LinkEstimate>,
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
                        Ok((pos, data)) => results.push((pos, Ok(Some(data)))),
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
        // Fetched ahead of every reader from a remote store into a disk
        // cache: nothing is decoded, so each run streams (see `stream_run`)
        // and holds about two pieces of the budget, not itself. Otherwise
        // the share of the budget is the stored runs and the chunks decoded
        // from them, both alive until the decode below is done. Chunks
        // fetched ahead of any reader are not decoded when there is a disk
        // cache (see `finish_fetched`): only their stored bytes count.
        let streams = self.disk.is_some() && !plan.foreground && !self.backend.store.is_local();
        let decodes =
            |pos: usize| self.disk.is_none() || (plan.foreground && pos < plan.optional_from);
        let bytes: u64 = tasks
            .iter()
            .map(|(run, members)| {
                if streams {
                    return run.len.min(2 * STREAM_PIECE);
                }
                let decoded: u64 = members
                    .iter()
                    .filter(|o| decodes(o.pos))
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
        if streams {
            let streamed = run_parallel(tasks, self.opts.max_parallel, |(run, members)| {
                self.stream_run(reqs, &run, members, plan)
            });
            results.extend(streamed.into_iter().flatten().flatten());
            drop(permit);
            return results;
        }
        let fetched = run_parallel(tasks, self.opts.max_parallel, |(run, members)| {
            (self.fetch_run(&run, plan), run, members)
        });
        // Decode tasks: the members of one stored frame (one chunk, or the
        // chunks of a shared frame, decoded once for all of them).
        let mut decode: Vec<(Arc<Vec<u8>>, u64, Vec<Owned<'a>>)> = Vec::new();
        let mut bufs = Vec::new();
        for (res, run, members) in fetched.into_iter().flatten() {
            match res {
                Ok(buf) => {
                    let buf = Arc::new(buf);
                    bufs.push(buf.clone());
                    let mut last: Option<(u64, u32)> = None;
                    for o in members {
                        let frame = reqs
                            .get(o.pos)
                            .filter(|r| r.info.frame.is_some())
                            .map(|r| (r.start(), r.info.compressed_size));
                        match decode.last_mut() {
                            Some((_, _, group)) if frame.is_some() && frame == last => {
                                group.push(o)
                            }
                            _ => decode.push((buf.clone(), run.offset, vec![o])),
                        }
                        last = frame;
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
        let decoded = run_parallel(decode, self.opts.decode_threads, |(buf, base, group)| {
            self.finish_fetched(reqs, &buf, base, group, plan)
        });
        // Runs that no disk-queue entry shares go back to the pool.
        bufs.into_iter().for_each(crate::buffers::recycle);
        let mut again = Vec::new();
        for (pos, r) in decoded.into_iter().flatten().flatten() {
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

    /// Cuts one stored frame out of a fetched run and hands its stored
    /// bytes to the disk cache: a chunk of its own under its digest, a
    /// shared frame once under its [`ChunkRequest::frame_key`]. Then, if a
    /// reader waits for a chunk of `group` (one chunk, or members of a
    /// shared frame), decodes the frame once, verifies those chunks and
    /// fills the memory cache; chunks fetched ahead of any reader are left
    /// on disk unverified (see the module documentation). A chunk that does
    /// not verify comes back with its guard, so that the caller may fetch
    /// it again.
    #[allow(clippy::type_complexity)]
    fn finish_fetched<'a>(
        &self,
        reqs: &[ChunkRequest],
        buf: &Arc<Vec<u8>>,
        base: u64,
        group: Vec<Owned<'a>>,
        plan: Plan,
    ) -> Vec<(usize, Result<Option<ChunkData>, (ChunkError, Owned<'a>)>)> {
        let first = group.first().and_then(|o| reqs.get(o.pos));
        let range = first.and_then(|req| {
            let from = usize::try_from(req.start().saturating_sub(base)).ok()?;
            Some(from..from.checked_add(req.info.compressed_size as usize)?)
        });
        let stored = range.and_then(|r| buf.get(r.clone()).map(|s| (s, r)));
        let (Some(first), Some(stored)) = (first, stored) else {
            return group
                .into_iter()
                .map(|o| {
                    let e = ChunkError::Fetch("internal: run shorter than its chunks".into());
                    (o.pos, Err((e, o)))
                })
                .collect();
        };
        let wanted = |pos: usize| plan.foreground && pos < plan.optional_from;
        let (stored, range) = stored;
        let Some(disk) = &self.disk else {
            return self.verify_fetched(reqs, first, stored, group, None);
        };
        // Cut out of the run without a copy (see `Stored`); `range` lies
        // within `buf`, checked above.
        let Some(part) = Stored::cut(buf, range) else {
            return self.verify_fetched(reqs, first, stored, group, None);
        };
        // A frame fetched ahead of every reader is not decoded here: the
        // reader decodes and verifies it from disk.
        let ahead = !group.iter().any(|o| wanted(o.pos));
        match first.frame_key() {
            Some(key) => {
                disk.insert(key, part);
                if ahead {
                    return self.left_unverified(group);
                }
                // A reader waits for some members: decode the frame for
                // them; the others are in the frame's file.
                let (now, later): (Vec<Owned<'a>>, Vec<Owned<'a>>) =
                    group.into_iter().partition(|o| wanted(o.pos));
                let mut out = self.verify_fetched(reqs, first, stored, now, None);
                out.extend(self.left_unverified(later));
                out
            }
            None if ahead => {
                disk.insert(first.info.digest, part);
                self.left_unverified(group)
            }
            None => self.verify_fetched(reqs, first, stored, group, Some((disk, part))),
        }
    }

    /// Chunks whose stored bytes went to the disk cache unverified: counted,
    /// and their guards dropped (a reader waiting for one wakes and finds it
    /// on disk).
    #[allow(clippy::type_complexity)]
    fn left_unverified<'a>(
        &self,
        group: Vec<Owned<'a>>,
    ) -> Vec<(usize, Result<Option<ChunkData>, (ChunkError, Owned<'a>)>)> {
        Metrics::add(&self.metrics.chunks_fetched, group.len() as u64);
        Metrics::add(&self.metrics.chunks_unverified, group.len() as u64);
        group.into_iter().map(|o| (o.pos, Ok(None))).collect()
    }

    /// Decodes `stored` (the frame of `first`) once, verifies each chunk of
    /// `group` in it and fills the memory cache; a chunk of its own is also
    /// queued for the disk cache once verified (`disk`: the cache and the
    /// same stored bytes, cut out of their run).
    #[allow(clippy::type_complexity)]
    fn verify_fetched<'a>(
        &self,
        reqs: &[ChunkRequest],
        first: &ChunkRequest,
        stored: &[u8],
        group: Vec<Owned<'a>>,
        disk: Option<(&Arc<DiskCache>, Stored)>,
    ) -> Vec<(usize, Result<Option<ChunkData>, (ChunkError, Owned<'a>)>)> {
        if group.is_empty() {
            return Vec::new();
        }
        // Sizes are checked by the decode: until then, no more than a chunk.
        let size = first
            .info
            .frame
            .map_or(first.info.uncompressed_size, |f| f.size);
        let mut frame = crate::buffers::take(size.min(MAX_CHUNK_SIZE) as usize);
        if let Err(e) = decode_frame_into(&first.info, stored, &mut frame) {
            Metrics::add(&self.metrics.chunk_errors, group.len() as u64);
            let message = e.to_string();
            let mut error = Some(e);
            return group
                .into_iter()
                .map(|o| {
                    let e = error
                        .take()
                        .unwrap_or_else(|| FormatError::Corrupt(message.clone()));
                    (o.pos, Err((ChunkError::Decode(e), o)))
                })
                .collect();
        }
        let shared = first.info.frame.is_some();
        let mut frame = Some(frame);
        let mut out = Vec::with_capacity(group.len());
        for o in group {
            let pos = o.pos;
            let (Some(req), Some(bytes)) = (reqs.get(pos), frame.as_ref()) else {
                let e = ChunkError::Fetch("internal: bad position".into());
                out.push((pos, Err((e, o))));
                continue;
            };
            let checked = match slice_of_frame(&req.info, bytes) {
                Ok(d) if shared => Ok(Some(d.to_vec())),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            let data = match checked {
                Ok(Some(data)) => data,
                // A chunk of its own: its frame is its data, moved.
                Ok(None) => frame.take().unwrap_or_default(),
                Err(e) => {
                    Metrics::add(&self.metrics.chunk_errors, 1);
                    out.push((pos, Err((ChunkError::Decode(e), o))));
                    continue;
                }
            };
            Metrics::add(&self.metrics.chunks_fetched, 1);
            let data = Arc::new(data);
            o.fill(&data);
            if let (Some((disk, part)), false) = (&disk, shared) {
                disk.insert(req.info.digest, part.clone());
            }
            out.push((pos, Ok(Some(data))));
        }
        // A shared frame's members were copied out of it.
        if let Some(frame) = frame {
            crate::buffers::give(frame);
        }
        out
    }

    /// One range request of chunks fetched ahead of every reader into the
    /// disk cache, streamed: the run is cut at frame boundaries into pieces
    /// of about [`STREAM_PIECE`] bytes, and each piece's frames go to the
    /// disk cache (and their guards are released, waking any reader
    /// parked on them) as soon as the piece has arrived, not when the
    /// whole request has. A request can then be large (a few round trips
    /// and little per-request cost at the registry for a long sequential
    /// read) without a reader waiting for its last byte. A failure fails
    /// only the chunks of the pieces not handed over.
    fn stream_run<'a>(
        &self,
        reqs: &[ChunkRequest],
        run: &Run,
        members: Vec<Owned<'a>>,
        plan: Plan,
    ) -> Vec<Loaded> {
        let m = &self.metrics;
        let _in_flight = InFlight::new(m);
        let t = Instant::now();
        // Frames in blob order (a chunk of its own, or the members of one
        // shared frame: start, end, owners), then pieces of whole frames.
        let mut frames: Vec<(u64, u64, Vec<Owned<'a>>)> = Vec::new();
        for o in members {
            let Some(req) = reqs.get(o.pos) else { continue };
            let (start, end) = (req.start(), req.end());
            match frames.last_mut() {
                Some((s, _, group)) if req.info.frame.is_some() && *s == start => group.push(o),
                _ => frames.push((start, end, vec![o])),
            }
        }
        let run_end = run.offset.saturating_add(run.len);
        let mut pieces: Vec<Piece<'a>> = Vec::new();
        let mut lens: Vec<u64> = Vec::new();
        let mut from = run.offset;
        for (_, end, group) in frames {
            let end = end.clamp(from, run_end);
            match (pieces.last_mut(), lens.last_mut()) {
                (Some(p), Some(len)) if end - p.base <= STREAM_PIECE => {
                    p.frames.push(group);
                    *len = end - p.base;
                }
                _ => {
                    pieces.push(Piece {
                        base: from,
                        frames: vec![group],
                    });
                    lens.push(end - from);
                }
            }
            from = end;
        }
        if let (Some(p), Some(len)) = (pieces.last(), lens.last_mut()) {
            // The run may end past its last chunk (it never does today).
            *len = run_end.saturating_sub(p.base);
        }
        let mut slots: Vec<Option<Piece<'a>>> = pieces.into_iter().map(Some).collect();
        let mut out: Vec<Loaded> = Vec::new();
        let mut got = 0u64;
        let r = self.backend.store.read_range_pieces(
            &run.blob,
            run.offset,
            &lens,
            plan.deadline,
            &mut |i, bytes| {
                let Some(piece) = slots.get_mut(i).and_then(Option::take) else {
                    return;
                };
                got += bytes.len() as u64;
                let buf = Arc::new(bytes);
                for group in piece.frames {
                    let done = self.finish_fetched(reqs, &buf, piece.base, group, plan);
                    out.extend(
                        done.into_iter()
                            .map(|(pos, r)| (pos, r.map_err(|(e, _)| e))),
                    );
                }
            },
        );
        let took = t.elapsed();
        m.fetch_latency.observe(took);
        Metrics::add(&m.fetch_requests, 1);
        Metrics::add(&m.bytes_fetched, got);
        tracing::debug!(
            blob = %run.blob,
            offset = run.offset,
            len = run.len,
            pieces = lens.len(),
            ms = took.as_secs_f64() * 1e3,
            ok = r.is_ok(),
            "range request, streamed"
        );
        if let Err(e) = r {
            Metrics::add(&m.fetch_errors, 1);
            let msg = format!(
                "reading {} bytes at offset {} of blob {}: {e}",
                run.len, run.offset, run.blob
            );
            for piece in slots.into_iter().flatten() {
                for group in piece.frames {
                    Metrics::add(&m.chunk_errors, group.len() as u64);
                    out.extend(
                        group
                            .into_iter()
                            .map(|o| (o.pos, Err(ChunkError::Fetch(msg.clone())))),
                    );
                }
            }
        }
        out
    }

    /// One range request, counted and timed.
    fn fetch_run(&self, run: &Run, plan: Plan) -> Result<Vec<u8>, String> {
        let m = &self.metrics;
        let _in_flight = InFlight::new(m);
        let t = Instant::now();
        let store = &self.backend.store;
        let r = match plan.deadline {
            // A local read never waits long: into a recycled buffer, given
            // back once the run is decoded (see `load_owned`).
            _ if store.is_local() => {
                let mut buf = crate::buffers::take(run.len as usize);
                store
                    .read_range_into(&run.blob, run.offset, run.len, &mut buf)
                    .map(|()| buf)
            }
            Some(d) => store.read_range_until(&run.blob, run.offset, run.len, d),
            None => store.read_range(&run.blob, run.offset, run.len),
        };
        let took = t.elapsed();
        m.fetch_latency.observe(took);
        Metrics::add(&m.fetch_requests, 1);
        tracing::debug!(
            blob = %run.blob,
            offset = run.offset,
            len = run.len,
            foreground = plan.foreground,
            ms = took.as_secs_f64() * 1e3,
            ok = r.is_ok(),
            "range request"
        );
        match r {
            Ok(bytes) if bytes.len() as u64 == run.len => {
                Metrics::add(&m.bytes_fetched, run.len);
                // Reads' requests only: prefetch and readahead run many
                // at once and would make the link look slower than it is.
                if plan.foreground && !store.is_local() {
                    self.link.record(run.len, took.as_secs_f64());
                }
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

    /// A chunk from the disk cache, verified: its own file, else the file
    /// of the shared frame that holds it. A file that fails is deleted.
    pub(crate) fn load_from_disk(&self, disk: &DiskCache, req: &ChunkRequest) -> Option<ChunkData> {
        let raw = u64::from(req.info.uncompressed_size);
        let max = raw.max(u64::from(req.info.compressed_size));
        let Some(bytes) = disk.get(&req.info.digest, max) else {
            return self.load_from_frame(disk, req);
        };
        let len = u32::try_from(bytes.len()).ok()?;
        // The stored form is told by its length (see `disk`): the file may
        // come from another image that compressed the chunk otherwise.
        // A chunk's own file is always its own stored form, also for a
        // chunk that the image keeps in a shared frame.
        let info = ChunkInfo {
            compressed: u64::from(len) != raw,
            compressed_size: len,
            frame: None,
            ..req.info
        };
        let decoded = if info.compressed {
            // Into a recycled buffer; the file's bytes are done with.
            let mut out = crate::buffers::take(raw.min(u64::from(MAX_CHUNK_SIZE)) as usize);
            let r = decode_chunk_into(&info, &bytes, &mut out).map(|()| out);
            crate::buffers::give(bytes);
            r
        } else {
            decode_chunk_owned(&info, bytes)
        };
        match decoded {
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

    /// A member of a shared frame from the frame's file, verified. The
    /// decoded frame is kept among the [`RecentFrames`], so that reading
    /// the frame's files one after the other (a tree walked in order)
    /// decodes it once.
    fn load_from_frame(&self, disk: &DiskCache, req: &ChunkRequest) -> Option<ChunkData> {
        let key = req.frame_key()?;
        let frame = match self.frames.get(&key) {
            Some(frame) => frame,
            None => {
                let bytes = disk.get(&key, u64::from(req.info.compressed_size))?;
                match decode_frame(&req.info, &bytes) {
                    Ok(frame) => self.frames.put(key, frame),
                    Err(e) => {
                        tracing::debug!(
                            "disk cache copy of the frame of chunk {}: {e}",
                            req.info.digest
                        );
                        Metrics::add(&self.metrics.disk_corrupt, 1);
                        disk.discard(&key);
                        return None;
                    }
                }
            }
        };
        match slice_of_frame(&req.info, &frame) {
            Ok(data) => {
                Metrics::add(&self.metrics.disk_hits, 1);
                Some(Arc::new(data.to_vec()))
            }
            Err(e) => {
                tracing::debug!(
                    "disk cache copy of the frame of chunk {}: {e}",
                    req.info.digest
                );
                Metrics::add(&self.metrics.disk_corrupt, 1);
                self.frames.forget(&key);
                disk.discard(&key);
                None
            }
        }
    }
}

/// How many decoded shared frames [`RecentFrames`] keeps: at most 64 KiB
/// each (the converter's pack size; 1 MiB at worst for a hostile image), so
/// 512 KiB to 8 MiB.
const RECENT_FRAMES: usize = 8;

/// The last shared frames decoded from the disk cache, decoded, so that the
/// members of one frame read one after the other cost one decode (their
/// members are still verified one by one when taken out). Direct-mapped by
/// key, a lock per slot: no lock shared by all reads.
#[derive(Default)]
pub(crate) struct RecentFrames {
    slots: [FrameSlot; RECENT_FRAMES],
}

/// A slot of [`RecentFrames`]: a frame's disk key and its decoded bytes.
type FrameSlot = std::sync::Mutex<Option<(Digest, Arc<Vec<u8>>)>>;

impl RecentFrames {
    fn slot(&self, key: &Digest) -> &FrameSlot {
        &self.slots[usize::from(key.0[0]) % RECENT_FRAMES]
    }

    fn get(&self, key: &Digest) -> Option<Arc<Vec<u8>>> {
        match &*crate::workers::lock(self.slot(key)) {
            Some((k, frame)) if k == key => Some(frame.clone()),
            _ => None,
        }
    }

    fn put(&self, key: Digest, frame: Vec<u8>) -> Arc<Vec<u8>> {
        let frame = Arc::new(frame);
        *crate::workers::lock(self.slot(&key)) = Some((key, frame.clone()));
        frame
    }

    fn forget(&self, key: &Digest) {
        let mut slot = crate::workers::lock(self.slot(key));
        if slot.as_ref().is_some_and(|(k, _)| k == key) {
            *slot = None;
        }
    }
}

/// Counts a request in flight until dropped.
struct InFlight<'a> {
    m: &'a Metrics,
}

impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        Metrics::add(&m.fetch_in_flight, 1);
        InFlight { m }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        Metrics::sub(&self.m.fetch_in_flight, 1);
    }
}
