//! Work done off the read path: chunk readahead for sequential readers,
//! prefetch of the image's PREFETCH list, and recording which files a
//! workload reads (to make such a list).
//!
//! # Readahead
//!
//! The kernel already reads ahead in pages (the mount's bdi is raised to
//! 1 MiB), but each FUSE read still waits for its chunks to be fetched and
//! decoded one read at a time: a large file read front to back goes at the
//! speed of one decoder. [`Readahead`] watches each file's reads; when a
//! read starts where the previous one of that file ended (or a little past
//! it: the kernel issues readahead reads out of order), the chunks of the
//! next `window` bytes are queued for a small pool of background threads,
//! which load them through [`ChunkSource::get_many`] (merged requests,
//! parallel decode) into the memory cache. Each file remembers how far it
//! has been read ahead, so a stream queues each window once, when the reader
//! is half way through the previous one. The queue is bounded: when it is
//! full, readahead is skipped (the reader fetches for itself), never waited
//! for.
//!
//! # Prefetch
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
//! # Access recording
//!
//! [`AccessLog`] notes each file the first time it is read (a flag per
//! inode, so later reads cost one atomic load) and writes the paths, one per
//! line in first-read order, atomically (temporary file + rename), when
//! asked: periodically and at unmount. `skiff convert --prefetch-list`
//! turns that file into the PREFETCH table.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_format::{Bootstrap, FileKind, FormatError, InodeId};

use crate::cache::{foreground_busy, run_parallel, ChunkSource};
use crate::chunk::{plan_runs, ChunkRequest};
use crate::image::Image;
use crate::metrics::Metrics;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

type Job = Box<dyn FnOnce() + Send>;

/// A few threads running queued jobs; a full queue refuses new ones.
pub(crate) struct Pool {
    tx: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    pub(crate) fn new(name: &str, threads: usize, queue: usize) -> Pool {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    let job = lock(&rx).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => tracing::warn!("cannot start a {name} thread: {e}"),
            }
        }
        Pool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        }
    }

    /// Queues `job`; false if the queue is full or the pool stopped.
    pub(crate) fn try_submit(&self, job: Job) -> bool {
        match lock(&self.tx).as_ref() {
            Some(tx) => tx.try_send(job).is_ok(),
            None => false,
        }
    }

    /// Runs what is queued and stops the threads.
    pub(crate) fn shutdown(&self) {
        drop(lock(&self.tx).take());
        for h in lock(&self.threads).drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// End of the furthest read so far.
    next: u64,
    /// Bytes up to here are read ahead (or queued).
    ahead_until: u64,
}

/// Chunk readahead for sequential readers; see the module documentation.
pub(crate) struct Readahead {
    window: u64,
    streams: Vec<Mutex<HashMap<u64, Stream>>>,
    pool: Pool,
}

const STREAM_SHARDS: usize = 16;
/// Files tracked per shard before the shard is forgotten.
const MAX_STREAMS_PER_SHARD: usize = 4096;

impl Readahead {
    /// Reads ahead `window` bytes on `threads` threads.
    pub(crate) fn new(window: u64, threads: usize) -> Readahead {
        Readahead {
            window,
            streams: (0..STREAM_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            pool: Pool::new("skiff-readahead", threads, 16),
        }
    }

    /// Notes a read of `[offset, end)` of file `ino` (of `size` bytes);
    /// returns the range to read ahead, if any.
    fn observe(&self, ino: u64, offset: u64, end: u64, size: u64) -> Option<(u64, u64)> {
        let shard = self.streams.get(ino as usize % STREAM_SHARDS)?;
        let mut map = lock(shard);
        if map.len() >= MAX_STREAMS_PER_SHARD && !map.contains_key(&ino) {
            map.clear();
        }
        let s = map.entry(ino).or_default();
        let sequential = offset > 0
            && offset >= s.next.saturating_sub(self.window)
            && offset <= s.next.saturating_add(self.window / 2);
        s.next = s.next.max(end);
        if !sequential || end >= size {
            return None;
        }
        // Queue the next window when the reader is half way through this one.
        if s.ahead_until >= end.saturating_add(self.window / 2) {
            return None;
        }
        let from = s.ahead_until.max(end);
        let to = end.saturating_add(self.window).min(size);
        if from >= to {
            return None;
        }
        s.ahead_until = to;
        Some((from, to))
    }

    /// Called on every read: queues readahead when the read is sequential.
    pub(crate) fn on_read(
        &self,
        image: &Arc<Image>,
        source: &Arc<ChunkSource>,
        id: InodeId,
        offset: u64,
        end: u64,
        size: u64,
    ) {
        let Some((from, to)) = self.observe(id.ino(), offset, end, size) else {
            return;
        };
        let (image, source) = (image.clone(), source.clone());
        let queued = self.pool.try_submit(Box::new(move || {
            let Ok(reqs) = file_chunk_requests(image.bootstrap(), id, from, to) else {
                return;
            };
            let missing: Vec<ChunkRequest> = reqs
                .into_iter()
                .filter(|r| !source.in_memory(&r.info.digest))
                .collect();
            if missing.is_empty() {
                return;
            }
            Metrics::add(&source.metrics().readahead_chunks, missing.len() as u64);
            // Failures surface to the reader when it gets there.
            let _ = source.get_many(&missing);
        }));
        if !queued {
            tracing::trace!("readahead queue full");
        }
    }

    pub(crate) fn shutdown(&self) {
        self.pool.shutdown();
    }
}

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
        let Ok(reqs) = file_chunk_requests(b, id, 0, u64::MAX) else {
            continue;
        };
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
    let runs = plan_runs(
        window,
        crate::cache::PREFETCH_MAX_REQUEST,
        crate::cache::PREFETCH_MAX_GAP,
    );
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

/// The files read so far, in first-read order; see the module documentation.
pub(crate) struct AccessLog {
    path: PathBuf,
    seen: Vec<AtomicBool>,
    order: Mutex<Vec<InodeId>>,
    dirty: AtomicBool,
}

impl AccessLog {
    /// A log for an image of `inodes` inodes, written to `path`.
    pub(crate) fn new(path: &Path, inodes: u32) -> AccessLog {
        AccessLog {
            path: path.to_path_buf(),
            seen: (0..inodes).map(|_| AtomicBool::new(false)).collect(),
            order: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
        }
    }

    /// Notes a read of `id`.
    pub(crate) fn record(&self, id: InodeId) {
        let Some(flag) = self.seen.get(id.index()) else {
            return;
        };
        if flag.load(Ordering::Relaxed) || flag.swap(true, Ordering::Relaxed) {
            return;
        }
        lock(&self.order).push(id);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the list if it changed since the last write.
    pub(crate) fn write(&self, b: &Bootstrap<'_>) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let ids = lock(&self.order).clone();
        let mut text = String::new();
        for id in ids {
            let p = crate::fs::path_of(b, id);
            // A name with a newline cannot be written one per line.
            if !p.contains('\n') {
                text.push_str(&p);
                text.push('\n');
            }
        }
        let tmp = self.path.with_file_name(format!(
            ".{}.{}.tmp",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            self.dirty.store(true, Ordering::Relaxed);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_follows_sequential_streams_only() {
        let ra = Readahead::new(1 << 20, 1);
        let size = 100 << 20;
        let kb = |k: u64| k << 10;
        // The first read of a file is not a stream yet.
        assert_eq!(ra.observe(1, 0, kb(128), size), None);
        // The next one is: the window after it is queued.
        assert_eq!(
            ra.observe(1, kb(128), kb(256), size),
            Some((kb(256), kb(256) + (1 << 20)))
        );
        // Within the first half of the window: nothing more.
        assert_eq!(ra.observe(1, kb(256), kb(384), size), None);
        // Past half way: the next part.
        let got = ra.observe(1, kb(384), kb(896), size).unwrap();
        assert_eq!(got, (kb(256) + (1 << 20), kb(896) + (1 << 20)));
        // A random read elsewhere is not sequential.
        assert_eq!(ra.observe(1, 50 << 20, (50 << 20) + 4096, size), None);
        // Near the end of the file, the window is clipped.
        assert_eq!(ra.observe(2, 0, 4096, 8192), None);
        assert_eq!(ra.observe(2, 4096, 8192, 8192), None);
    }
}
