//! Readahead in blob order: keeping the link busy while a reader walks
//! through what the converter stored next to each other.
//!
//! The converter writes each layer's chunks into its blob in the order of
//! the tree (files by path, each file's chunks in order, small files packed
//! into shared frames). So a workload that reads a large file front to
//! back, or a whole directory tree (a build, `find | xargs cat`, a virus
//! scan, an ML image loading its packages), walks forward through the
//! blob, whatever file boundaries it crosses. Fetching only what each FUSE
//! read needs makes every file a round trip, and over a link with 20 ms of
//! RTT those round trips, not the bandwidth, decide the time.
//!
//! [`Readahead`] watches every read in *blob* space: the stored range of
//! the chunks it needs (one call per read, a lock and a few comparisons).
//! A blob whose reads keep landing at or a little past the furthest point
//! read so far ([`SLACK`] either way: directory order and blob order differ
//! a little, and deduplicated chunks live elsewhere) is a *stream*. Once a
//! stream is confirmed ([`CONFIRM`] reads in a row), the chunks of the next
//! `window` stored bytes are fetched in the background, and the window
//! doubles with each step the reader takes into it, from `min_window` up to
//! `max_window` (the way mountpoint-s3's prefetcher grows its requests): a
//! reader that jumps elsewhere costs at most one small window, a reader
//! that keeps going soon has several requests of `request` bytes in
//! flight at once, which is what fills a link with a long round trip. The
//! next window is queued when the reader is half way through the current
//! one, so it arrives before it is needed.
//!
//! Fetched chunks go where every fetched chunk goes: verified, into the
//! memory cache and the disk cache, so the reader finds them locally; a
//! reader that gets there while they are still in flight waits on their
//! single-flight guards instead of fetching them again. Readahead shares
//! the mount's budget of bytes in flight with reads and prefetch, and its
//! queue is bounded: when it is full a window is skipped (the reader
//! fetches for itself), never waited for. Without a disk cache, fetched
//! chunks would outlive only the small memory cache: readahead is off.
//!
//! A workload that reads a few scattered files (a tiny start, random reads)
//! never forms a stream and costs no byte of readahead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::chunk::ChunkRequest;
use crate::image::Image;
use crate::metrics::Metrics;
use crate::source::ChunkSource;
use crate::workers::{lock, Pool};

/// How far before the furthest point read so far, or after the end of what
/// is read ahead, a read may land and still continue its blob's stream.
pub const SLACK: u64 = 1 << 20;
/// Reads in a row that make a stream.
pub const CONFIRM: u32 = 2;
/// A stream is read ahead only while its reads needed at least 1 in
/// `DENSE_DIV` of the stored bytes it has passed over.
pub const DENSE_DIV: u64 = 2;
/// Queued readahead requests, beyond those in flight.
const QUEUE: usize = 32;

/// Sizes of blob-order readahead; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadaheadOptions {
    /// First window of a new stream, in stored bytes.
    pub min_window: u64,
    /// Largest window, in stored bytes (0 turns readahead off).
    pub max_window: u64,
    /// Stored bytes per range request.
    pub request: u64,
    /// Requests in flight at once.
    pub threads: usize,
}

/// Default [`ReadaheadOptions`]: windows from 1 MiB to 16 MiB, in requests
/// of 1 MiB, 4 in flight. 16 MiB is about a second and a half of a
/// 100 Mbit/s link, enough to hide a round trip of a few tens of ms behind
/// each request; 4 requests of 1 MiB keep such a link full.
pub const DEFAULT_READAHEAD: ReadaheadOptions = ReadaheadOptions {
    min_window: 1 << 20,
    max_window: 16 << 20,
    request: 1 << 20,
    threads: 4,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stream {
    /// End of the furthest read so far.
    next: u64,
    /// Stored bytes up to here are read ahead (or queued).
    ahead: u64,
    /// The next window to queue (0: not a stream yet).
    window: u64,
    /// Reads in a row that continued the stream.
    streak: u32,
    /// Where the stream started.
    origin: u64,
    /// Stored bytes the stream's reads needed (overlaps counted again).
    used: u64,
}

/// Blob-order readahead of one mount; see the module documentation.
pub(crate) struct Readahead {
    opts: ReadaheadOptions,
    streams: Mutex<HashMap<u32, Stream>>,
    pool: Pool,
}

impl Readahead {
    /// Readahead with `opts` (`max_window` must be above 0).
    pub(crate) fn new(opts: ReadaheadOptions) -> Readahead {
        let opts = ReadaheadOptions {
            min_window: opts.min_window.clamp(1, opts.max_window.max(1)),
            request: opts.request.max(64 << 10),
            threads: opts.threads.max(1),
            ..opts
        };
        Readahead {
            opts,
            streams: Mutex::new(HashMap::new()),
            pool: Pool::new("skiff-readahead", opts.threads, QUEUE),
        }
    }

    /// Notes a read of stored range `[start, end)` of blob `blob` (`missed`:
    /// it needs the network); returns the stored range to read ahead, if
    /// any.
    fn observe(&self, blob: u32, start: u64, end: u64, missed: bool) -> Option<(u64, u64)> {
        let mut map = lock(&self.streams);
        let s = map.entry(blob).or_default();
        let continues = s.streak > 0
            && start.saturating_add(SLACK) >= s.next
            && start <= s.next.max(s.ahead).saturating_add(SLACK);
        if !continues && !missed {
            // Only a miss starts a stream: a workload served from what
            // prefetch or an earlier run brought needs no readahead.
            return None;
        }
        if !continues {
            *s = Stream {
                next: end,
                ahead: end,
                window: 0,
                streak: 1,
                origin: start,
                used: end.saturating_sub(start),
            };
            return None;
        }
        s.next = s.next.max(end);
        s.streak = s.streak.saturating_add(1);
        s.used = s.used.saturating_add(end.saturating_sub(start));
        // A reader that skips most of what it passes (imports that read a
        // few modules of a large package) is not worth reading ahead for:
        // what it would bring would mostly be waste.
        let span = s.next.saturating_sub(s.origin);
        if s.streak < CONFIRM || s.used.saturating_mul(DENSE_DIV) < span {
            return None;
        }
        let window = if s.window == 0 {
            self.opts.min_window
        } else {
            s.window
        };
        if s.ahead >= s.next.saturating_add(window / 2) {
            return None;
        }
        let from = s.ahead.max(s.next);
        let to = s.next.saturating_add(window);
        s.window = window.saturating_mul(2).min(self.opts.max_window);
        s.ahead = to;
        Some((from, to))
    }

    /// Called on every read with the chunks it needs (`missed`: some are
    /// not local): reads ahead in the blob of its first chunk when the read
    /// continues a stream there.
    pub(crate) fn on_read(
        &self,
        image: &Arc<Image>,
        source: &Arc<ChunkSource>,
        reqs: &[ChunkRequest],
        missed: bool,
    ) {
        let Some(first) = reqs.first() else {
            return;
        };
        let blob = first.info.blob_index;
        let end = reqs
            .iter()
            .filter(|r| r.info.blob_index == blob)
            .map(ChunkRequest::end)
            .max()
            .unwrap_or_else(|| first.end());
        let Some((from, to)) = self.observe(blob, first.start(), end, missed) else {
            return;
        };
        let mut at = from;
        while at < to {
            let piece = (at, to.min(at.saturating_add(self.opts.request)));
            at = piece.1;
            let (image, source) = (image.clone(), source.clone());
            let digest = first.blob;
            let job = move || {
                // The first call builds the index (a pass over the chunk
                // table): here, not at mount and not on a FUSE thread.
                let reqs: Vec<ChunkRequest> = image
                    .chunks_in_blob(blob, piece.0, piece.1)
                    .into_iter()
                    .filter(|(_, c)| !source.is_local(&c.digest))
                    .map(|(i, info)| ChunkRequest {
                        index: i,
                        info,
                        blob: digest,
                    })
                    .collect();
                if reqs.is_empty() {
                    return;
                }
                Metrics::add(&source.metrics().readahead_chunks, reqs.len() as u64);
                // Failures surface to the reader when it gets there.
                let _ = source.prefetch(&reqs);
            };
            if self.pool.try_submit(Box::new(job)).is_err() {
                tracing::trace!("readahead queue full");
                return;
            }
        }
    }

    pub(crate) fn shutdown(&self) {
        self.pool.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ra() -> Readahead {
        Readahead::new(ReadaheadOptions {
            min_window: MIB,
            max_window: 4 * MIB,
            request: MIB,
            threads: 1,
        })
    }

    #[test]
    fn a_stream_starts_on_misses_and_its_window_grows() {
        let ra = ra();
        // A first miss is not a stream yet; the next read that continues
        // it is, and the first window follows it.
        assert_eq!(ra.observe(0, 0, 100_000, true), None);
        assert_eq!(
            ra.observe(0, 100_000, 200_000, false),
            Some((200_000, 200_000 + MIB))
        );
        // Reading on: each range starts where the last one ended, the
        // ranges grow to the bound and stay ahead of the reader.
        let mut ahead = 200_000 + MIB;
        let mut widest = 0;
        let mut at = 200_000;
        for _ in 0..60 {
            if let Some((from, to)) = ra.observe(0, at, at + 100_000, false) {
                assert_eq!(from, ahead, "contiguous");
                assert!(to - from <= 4 * MIB, "{from}..{to}");
                widest = widest.max(to - from);
                ahead = to;
            }
            at += 100_000;
            assert!(ahead > at, "ahead of the reader at {at}");
        }
        assert!(widest > 2 * MIB, "the window grew: {widest}");
        // Other blobs are streams of their own.
        assert_eq!(ra.observe(1, 0, 10, true), None);
    }

    #[test]
    fn local_reads_and_sparse_readers_get_no_readahead() {
        let ra = ra();
        // Reads served locally never start a stream.
        for k in 0..10 {
            assert_eq!(ra.observe(0, k * 1000, (k + 1) * 1000, false), None);
        }
        // A reader that needs a little of each MiB it passes (forward, but
        // skipping most) is not worth reading ahead for.
        for k in 0..10u64 {
            let start = k * 900_000;
            assert_eq!(ra.observe(2, start, start + 4096, true), None, "read {k}");
        }
        // A jump elsewhere ends a stream: the next read starts over.
        assert_eq!(ra.observe(3, 0, 1000, true), None);
        assert!(ra.observe(3, 1000, 2000, true).is_some());
        assert_eq!(ra.observe(3, 100 * MIB, 100 * MIB + 1000, true), None);
    }
}
