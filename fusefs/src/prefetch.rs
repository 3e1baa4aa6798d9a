//! Prefetch of the image's PREFETCH list after mounting, then (when set)
//! the background fetch of the rest ([`crate::rest`]) on the same thread.
//!
//! After the mount is ready, [`spawn_prefetch`] walks the image's prefetch
//! list on a thread of its own: the parts of files a workload read first, in
//! order (PREFETCH_RANGES, format 1.3: stretches of chunk maps, so that a
//! workload that maps a few pages of a large library does not wait for all
//! of it), else the files PREFETCH names, whole; or every regular file with
//! `--prefetch-all`. A list that fails its checks is not followed (a
//! warning; the mount serves as usual). It takes the parts in list order
//! into windows of about 32 MiB of chunks that are neither in memory nor on
//! disk, sorts each window by blob offset and coalesces it into requests of
//! up to 2 MiB, bridging gaps of up to 64 KiB (a few wasted bytes cost less
//! than a round trip), and hands the requests, in order, to fetching
//! threads (twelve by default) through a short queue: planning runs ahead
//! of fetching, so the link never idles between windows, and early files
//! are local early. At most 6 MiB of requests are in flight between them
//! ([`PREFETCH_IN_FLIGHT`]): three of 2 MiB, which leaves a reader's
//! request its room in the mount's 8 MiB in-flight budget, or up to twelve
//! smaller ones. A list of stretches makes many small requests (the
//! import's average 280 KiB; random reads across 1,500 files, W5 of the
//! cold-start bench, 41 KiB), and a few of them at a time leave a link
//! with 20 ms RTT idle between replies. Over 100 Mbit/s + 20 ms, one run
//! each: the import with its list 3.15 s with three in flight, 2.99 s with
//! six, 2.91 s with twelve; W5 with its list 3.98 s with six, 3.18 s with
//! twelve. Planning windows of 4 MiB instead of 32 (list order kept more
//! closely, fewer requests merged) made W5 slower: 4.57 s.
//!
//! While a list is fetched, a reader may get ahead of it and miss. A read
//! whose chunks are all listed then brings along (fetch window, readahead)
//! only listed chunks ([`ListedChunks`], set before the first request): the
//! list says what the workload reads next, and the neighbours it does not
//! name were 3.2 MB of the import's 33 MB over 100 Mbit/s with 20 ms RTT. A
//! read of something the list does not name opens its window as usual.
//!
//! Prefetch shares single-flight guards with readers, so a chunk is never
//! fetched twice, but it does not stop for them: the list is what the
//! workload reads first, so a reader that misses mostly waits for what
//! prefetch is about to bring. Waiting (up to 200 ms) while any reader's
//! fetch was in flight, as prefetch once did, cost the import with its list
//! 0.3-0.4 s of 4.3 over 100 Mbit/s with 20 ms RTT (the link idled while the
//! reader's small requests crossed it), and a 20 ms wait still 0.2 s. It
//! stops at unmount.
//!
//! # Background fetch of the rest
//!
//! With a [`BackgroundFetch`] setting, the same thread then fetches the
//! rest of the image in stored order ([`crate::rest`]).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use skiff_format::{Bootstrap, FileChunkRecord, FileKind, FormatError, InodeId};

use crate::chunk::{plan_runs, records_requests, stored_bytes, ChunkRequest, ListedChunks};
use crate::fetch::{PREFETCH_MAX_GAP, PREFETCH_MAX_REQUEST};
use crate::image::Image;
use crate::metrics::Metrics;
use crate::rest::BackgroundFetch;
use crate::source::ChunkSource;
use crate::workers::{lock, ByteBudget};

/// What to prefetch after mounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefetchMode {
    /// Nothing.
    None,
    /// The image's PREFETCH list (nothing if it is empty).
    #[default]
    List,
    /// Every regular file of the image.
    All,
}

/// Prefetch works in windows of about this many stored bytes.
const PREFETCH_WINDOW: u64 = 32 << 20;
/// Stored bytes of prefetch requests in flight at once, at most: three
/// requests of [`PREFETCH_MAX_REQUEST`], or more smaller ones (up to the
/// mount's `prefetch_threads`, twelve by default).
pub const PREFETCH_IN_FLIGHT: u64 = 6 << 20;

/// Starts prefetching on a thread of its own; see the module documentation.
pub(crate) fn spawn_prefetch(
    image: Arc<Image>,
    source: Arc<ChunkSource>,
    mode: PrefetchMode,
    threads: usize,
    background: Option<BackgroundFetch>,
    stop: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let ids = match prefetch_parts(image.bootstrap(), mode) {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!("prefetch list unusable: {e}");
            Vec::new()
        }
    };
    let background = background.filter(|_| source.disk().is_some());
    if ids.is_empty() && background.is_none() {
        return None;
    }
    let spawned = std::thread::Builder::new()
        .name("skiff-prefetch".into())
        .spawn(move || {
            let t = Instant::now();
            let m = source.metrics();
            if mode == PrefetchMode::List && !ids.is_empty() {
                // What reads the list foresaw bring along (see `ListedChunks`).
                let b = image.bootstrap();
                let listed = ids
                    .iter()
                    .filter_map(|p| part_records(b, p).ok())
                    .flatten()
                    .map(|fc| fc.chunk_index());
                source.set_listed(ListedChunks::new(listed));
            }
            if !ids.is_empty() {
                prefetch(&image, &source, &ids, threads.max(1), &stop);
                tracing::info!(
                    parts = ids.len(),
                    chunks = m.prefetch_done.load(Ordering::Relaxed),
                    failed = m.prefetch_failed.load(Ordering::Relaxed),
                    "prefetch finished in {:.2} s",
                    t.elapsed().as_secs_f64()
                );
            }
            m.prefetch_finished.store(true, Ordering::Relaxed);
            if let Some(bg) = background {
                let t = Instant::now();
                let (bytes, why) = crate::rest::fetch_rest(&image, &source, bg, &stop);
                m.background_finished.store(true, Ordering::Relaxed);
                tracing::info!(
                    bytes,
                    "background fetch {why} after {:.2} s",
                    t.elapsed().as_secs_f64()
                );
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("cannot start the prefetch thread: {e}");
            None
        }
    }
}

/// A file to prefetch: the entries `chunks` of its chunk map, or all of it.
type Part = (InodeId, Option<Range<u32>>);

/// What `mode` prefetches, in order: the image's PREFETCH_RANGES when it
/// has them (format 1.3), else the files PREFETCH names, whole.
fn prefetch_parts(b: &Bootstrap<'_>, mode: PrefetchMode) -> Result<Vec<Part>, FormatError> {
    Ok(match mode {
        PrefetchMode::None => Vec::new(),
        PrefetchMode::List => {
            let ranges = b.prefetch_ranges()?;
            if ranges.is_empty() {
                b.prefetch()?.into_iter().map(|id| (id, None)).collect()
            } else {
                ranges.into_iter().map(|(id, r)| (id, Some(r))).collect()
            }
        }
        PrefetchMode::All => (0..b.inode_count())
            .map(InodeId)
            .filter(|&id| {
                b.inode(id)
                    .and_then(|i| i.kind())
                    .is_ok_and(|k| k == FileKind::Regular)
            })
            .map(|id| (id, None))
            .collect(),
    })
}

/// The chunk-map records of one part; an error for a directory or other
/// non-file in a hand-made list (which prefetch skips).
fn part_records<'a>(
    b: &Bootstrap<'a>,
    (id, chunks): &Part,
) -> Result<&'a [FileChunkRecord], FormatError> {
    let map = b.file_chunks(*id)?;
    Ok(match chunks {
        None => map,
        // Checked within the map by `prefetch_ranges`.
        Some(r) => map
            .get(r.start as usize..r.end as usize)
            .unwrap_or_default(),
    })
}

/// Prefetches the parts `ids`: one thread plans requests in list order
/// (see [`plan_prefetch`]) and `threads` threads fetch them as they come,
/// so that the link never idles between windows.
fn prefetch(image: &Image, source: &ChunkSource, ids: &[Part], threads: usize, stop: &AtomicBool) {
    let (tx, rx) = mpsc::sync_channel::<Vec<ChunkRequest>>(threads);
    let rx = Mutex::new(rx);
    let in_flight = ByteBudget::new(PREFETCH_IN_FLIGHT);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Ok(reqs) = lock(&rx).recv() else { break };
                let bytes = stored_bytes(&reqs);
                let _permit = in_flight.acquire(bytes, None);
                if !stop.load(Ordering::Relaxed) {
                    prefetch_request(source, &reqs);
                }
            });
        }
        plan_prefetch(image, source, ids, stop, &tx);
        drop(tx);
    });
}

/// Cuts the list into windows of about [`PREFETCH_WINDOW`] stored bytes
/// of chunks that are not local, each into requests by blob offset, and
/// hands them to `tx` in list order (blocking while the fetching threads
/// are busy). Returns at the end of the list, at `stop`, or when the
/// fetching threads are gone.
fn plan_prefetch(
    image: &Image,
    source: &ChunkSource,
    ids: &[Part],
    stop: &AtomicBool,
    tx: &mpsc::SyncSender<Vec<ChunkRequest>>,
) {
    let b = image.bootstrap();
    let m = source.metrics();
    let mut seen = HashSet::new();
    let mut window: Vec<ChunkRequest> = Vec::new();
    let mut bytes = 0u64;
    let send = |window: &[ChunkRequest]| -> bool {
        Metrics::add(&m.prefetch_planned, window.len() as u64);
        let runs = plan_runs(window, PREFETCH_MAX_REQUEST, PREFETCH_MAX_GAP);
        runs.into_iter().all(|run| {
            let reqs = run
                .members
                .iter()
                .filter_map(|&k| window.get(k).copied())
                .collect();
            tx.send(reqs).is_ok()
        })
    };
    // Frames looked up once per window (see `LocalCheck`).
    let mut local = source.local_check();
    for part in ids {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Directories and others in a hand-made list are skipped.
        let Ok(mut reqs) = part_records(b, part).and_then(|records| records_requests(b, records))
        else {
            continue;
        };
        // A shared frame comes whole: keep all of its members.
        reqs.extend(crate::chunk::frame_siblings(b, &reqs));
        for r in reqs {
            if seen.insert(r.info.digest) && !local.is_local(&r) {
                bytes += u64::from(r.info.compressed_size);
                window.push(r);
            }
        }
        if bytes >= PREFETCH_WINDOW {
            if !send(&std::mem::take(&mut window)) {
                return;
            }
            bytes = 0;
            local = source.local_check();
        }
    }
    if !window.is_empty() {
        send(&window);
    }
}

/// One prefetch request: the chunks of `reqs` that are still missing.
fn prefetch_request(source: &ChunkSource, reqs: &[ChunkRequest]) {
    let m = source.metrics();
    let (_, failed) = source.prefetch(reqs);
    Metrics::add(&m.prefetch_failed, failed);
    Metrics::add(
        &m.prefetch_done,
        reqs.len() as u64 - failed.min(reqs.len() as u64),
    );
}
