//! Prefetch of the image's PREFETCH list after mounting.
//!
//! After the mount is ready, [`spawn_prefetch`] walks the PREFETCH list (the
//! files a workload read first, in order; or every regular file with
//! `--prefetch-all`) on a thread of its own. It takes files in list order
//! into windows of about 32 MiB of chunks that are neither in memory nor on
//! disk, sorts each window by blob offset and coalesces it into requests of
//! up to 8 MiB, bridging gaps of up to 64 KiB (a few wasted bytes cost less
//! than a round trip), and fetches those with a bounded number of threads.
//! So early files are local early, and the whole list costs few requests.
//! Prefetch yields to readers: before each request it waits (up to 200 ms)
//! while any foreground fetch is in flight, and it shares single-flight
//! guards with them, so a chunk is never fetched twice. It stops at
//! unmount.
//!
//! Its buffers are bounded by the mount's in-flight budget like every
//! other load (see [`crate::workers::ByteBudget`]): at most `threads`
//! requests of at most [`PREFETCH_MAX_REQUEST`] are made at once, and a
//! window's list of chunk records (about 100 bytes per chunk) is its only
//! other memory.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_format::{Bootstrap, FileKind, FormatError, InodeId};

use crate::chunk::{file_chunk_requests, plan_runs, ChunkRequest};
use crate::fetch::{foreground_busy, PREFETCH_MAX_GAP, PREFETCH_MAX_REQUEST};
use crate::image::Image;
use crate::metrics::Metrics;
use crate::source::ChunkSource;
use crate::workers::run_parallel;

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
/// Longest wait for foreground fetches before a prefetch request.
const YIELD_MAX: Duration = Duration::from_millis(200);

/// Starts prefetching on a thread of its own; see the module documentation.
pub(crate) fn spawn_prefetch(
    image: Arc<Image>,
    source: Arc<ChunkSource>,
    mode: PrefetchMode,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let ids = match prefetch_ids(image.bootstrap(), mode) {
        Ok(ids) if ids.is_empty() => return None,
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!("prefetch list unusable: {e}");
            return None;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("skiff-prefetch".into())
        .spawn(move || {
            let t = Instant::now();
            prefetch(&image, &source, &ids, threads.max(1), &stop);
            let m = source.metrics();
            m.prefetch_finished.store(true, Ordering::Relaxed);
            tracing::info!(
                files = ids.len(),
                chunks = m.prefetch_done.load(Ordering::Relaxed),
                failed = m.prefetch_failed.load(Ordering::Relaxed),
                "prefetch finished in {:.2} s",
                t.elapsed().as_secs_f64()
            );
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("cannot start the prefetch thread: {e}");
            None
        }
    }
}

fn prefetch_ids(b: &Bootstrap<'_>, mode: PrefetchMode) -> Result<Vec<InodeId>, FormatError> {
    Ok(match mode {
        PrefetchMode::None => Vec::new(),
        PrefetchMode::List => b.prefetch()?,
        PrefetchMode::All => (0..b.inode_count())
            .map(InodeId)
            .filter(|&id| {
                b.inode(id)
                    .and_then(|i| i.kind())
                    .is_ok_and(|k| k == FileKind::Regular)
            })
            .collect(),
    })
}

fn prefetch(
    image: &Image,
    source: &ChunkSource,
    ids: &[InodeId],
    threads: usize,
    stop: &AtomicBool,
) {
    let b = image.bootstrap();
    let mut seen = HashSet::new();
    let mut window: Vec<ChunkRequest> = Vec::new();
    let mut bytes = 0u64;
    for &id in ids {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Directories and others in a hand-made list are skipped.
        let Ok(mut reqs) = file_chunk_requests(b, id, 0, u64::MAX) else {
            continue;
        };
        // A shared frame comes whole: keep all of its members.
        reqs.extend(crate::chunk::frame_siblings(b, &reqs));
        for r in reqs {
            if seen.insert(r.info.digest) && !source.is_local(&r.info.digest) {
                bytes += u64::from(r.info.compressed_size);
                window.push(r);
            }
        }
        if bytes >= PREFETCH_WINDOW {
            prefetch_window(source, &std::mem::take(&mut window), threads, stop);
            bytes = 0;
        }
    }
    prefetch_window(source, &window, threads, stop);
}

fn prefetch_window(
    source: &ChunkSource,
    window: &[ChunkRequest],
    threads: usize,
    stop: &AtomicBool,
) {
    if window.is_empty() {
        return;
    }
    let m = source.metrics();
    Metrics::add(&m.prefetch_planned, window.len() as u64);
    let runs = plan_runs(window, PREFETCH_MAX_REQUEST, PREFETCH_MAX_GAP);
    run_parallel(runs, threads, |run| {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let t = Instant::now();
        while foreground_busy(m) && t.elapsed() < YIELD_MAX && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let reqs: Vec<ChunkRequest> = run
            .members
            .iter()
            .filter_map(|&k| window.get(k).copied())
            .collect();
        let (_, failed) = source.prefetch(&reqs);
        Metrics::add(&m.prefetch_failed, failed);
        Metrics::add(
            &m.prefetch_done,
            reqs.len() as u64 - failed.min(reqs.len() as u64),
        );
    });
}
