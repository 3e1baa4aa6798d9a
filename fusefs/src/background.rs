//! Work done beside the read path: chunk readahead for sequential readers,
//! and recording which files a workload reads (to make a prefetch list;
//! prefetch itself is in [`crate::prefetch`]).
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
//! # Access recording
//!
//! [`AccessLog`] notes each file the first time it is read (a flag per
//! inode, so later reads cost one atomic load) and writes the paths, one per
//! line in first-read order, atomically (temporary file + rename), when
//! asked: periodically and at unmount. `skiff convert --prefetch-list`
//! turns that file into the PREFETCH table.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use skiff_format::InodeId;

use crate::chunk::{file_chunk_requests, ChunkRequest};
use crate::image::Image;
use crate::metrics::Metrics;
use crate::source::ChunkSource;
use crate::workers::{lock, Pool};

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
            let Ok(mut reqs) = file_chunk_requests(image.bootstrap(), id, from, to) else {
                return;
            };
            reqs.extend(crate::chunk::frame_siblings(image.bootstrap(), &reqs));
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
        if queued.is_err() {
            tracing::trace!("readahead queue full");
        }
    }

    pub(crate) fn shutdown(&self) {
        self.pool.shutdown();
    }
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
    pub(crate) fn write(&self, image: &Image) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let ids = lock(&self.order).clone();
        let mut text = String::new();
        for id in ids {
            let p = image.path_of(id);
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
