//! Readahead in blob order: keeping the link busy while a reader walks
//! through what the converter stored next to each other.
//!
//! The converter writes each layer's chunks into its blob in the order of
//! the tree (files by path, each file's chunks in order, small files packed
//! into shared frames), the files a start rarely reads (tests, docs,
//! Python sources beside their bytecode) after the rest. So a workload
//! that reads a large file front to back, or a whole directory tree (a
//! build, `find | xargs cat`, a virus scan, an ML image loading its
//! packages), walks forward through the blob, whatever file boundaries it
//! crosses. Fetching only what each FUSE
//! read needs makes every file a round trip, and over a link with 20 ms of
//! RTT those round trips, not the bandwidth, decide the time.
//!
//! [`Readahead`] watches every read in *blob* space: the stored range of
//! the chunks it needs (one call per read, a lock and a few comparisons).
//! A blob whose reads keep landing at or just past the furthest point read
//! so far (up to [`SLACK`] behind it: directory order and blob order differ
//! a little; at most [`GAP`] past it, or anywhere in what is already read
//! ahead) is a *stream*. Once a
//! stream is confirmed ([`CONFIRM`] reads in a row), the chunks of the next
//! `window` stored bytes are fetched in the background. The window grows
//! with what the stream has shown: the stored bytes its reads needed, from
//! `min_window` up to `max_window` (mountpoint-s3's prefetcher also grows
//! its requests as a reader keeps going). A reader that stops soon (one
//! directory of python modules) leaves little behind; one that keeps going
//! soon has several requests of `request` bytes in flight at once, which is
//! what fills a link with a long round trip. The
//! next window is queued when the reader is half way through the current
//! one, so it arrives before it is needed.
//!
//! The reader's order is not quite the blob's: a layer's tar stores paths
//! sorted whole (`python3.11/` before `python3/`), a walk of the tree takes
//! each directory's names in order (`python3` first). A walker then jumps
//! back and forth in the blob, and each jump would start a stream from
//! nothing: four serial misses, a window from its minimum. A blob whose
//! last stream was read ahead starts the next one confirmed by two reads
//! and with half the window the last one reached. Over 100 Mbit/s with
//! 20 ms RTT, 3 runs each: reading every file of the fixture 11.34-11.55 s
//! (before: 11.58-11.73 s); `import numpy, pandas` 6.40-6.52 s (before:
//! 6.47-6.80 s), 50 MB over the link instead of 46-50.
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

use crate::chunk::{ChunkRequest, ListedChunks};
use crate::image::Image;
use crate::metrics::Metrics;
use crate::source::ChunkSource;
use crate::window::RestRange;
use crate::workers::{lock, Pool};

/// How far before the furthest point read so far a read may land and still
/// continue its blob's stream.
pub const SLACK: u64 = 1 << 20;
/// How far past the furthest point read so far (or past what is read ahead,
/// if that is further) a read may start and still
/// continue the stream: a reader that skips more (page faults of a mapped
/// library, a few modules of a large package) is not walking the blob.
pub const GAP: u64 = 64 << 10;
/// Reads in a row that make a stream.
pub const CONFIRM: u32 = 4;
/// A stream is read ahead only while its reads needed at least 1 in
/// `DENSE_DIV - 1` in `DENSE_DIV` of the stored bytes it has passed over.
pub const DENSE_DIV: u64 = 4;
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
    /// Largest stored size of a file fetched whole at its first miss after
    /// a read from its start, and of the head fetched of a larger one (0:
    /// never; see [`crate::whole_file`]).
    pub whole_file: u64,
}

/// Default [`ReadaheadOptions`]: windows from 256 KiB to 16 MiB, in
/// requests of 8 MiB, 2 in flight. 16 MiB is about a second and a half of a
/// 100 Mbit/s link, enough to hide a round trip of a few tens of ms behind
/// each request. Requests are streamed (each piece of a request reaches
/// the disk cache as it arrives, see `Fetcher::stream_run`), so their size
/// costs no reader a wait, and few large requests cost the registry less
/// than many small ones: Debian's docker-registry here spends about 6 ms of
/// CPU on every Range request, whatever its size. Reading a 256 MiB file
/// over 1 Gbit/s with 1 ms RTT, 3 runs each: requests of 1 MiB, 4 in
/// flight, 2.58-2.72 s (283-286 requests); 8 MiB, 2 in flight, 2.39-2.40 s
/// (69-72 requests); reading every file of the fixture over 100 Mbit/s
/// with 20 ms RTT: 11.50-11.63 s and 11.37-11.59 s.
pub const DEFAULT_READAHEAD: ReadaheadOptions = ReadaheadOptions {
    min_window: 256 << 10,
    max_window: 16 << 20,
    request: 8 << 20,
    threads: 2,
    whole_file: 4 << 20,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stream {
    /// End of the furthest read so far.
    next: u64,
    /// Stored bytes up to here are read ahead (or queued).
    ahead: u64,
    /// Reads in a row that continued the stream.
    streak: u32,
    /// Where the stream started.
    origin: u64,
    /// Stored bytes the stream's reads needed (overlaps counted again).
    used: u64,
    /// The window this stream starts from: half of what the blob's last
    /// read-ahead stream had read, when a reader that walked the blob
    /// jumped elsewhere in it (0: none).
    resume: u64,
}

impl Stream {
    /// Confirmed, and dense enough to read ahead for: a reader that skips
    /// most of what it passes (imports that read a few modules of a large
    /// package) is not worth it, what it would bring would mostly be waste.
    fn walking(&self) -> bool {
        let span = self.next.saturating_sub(self.origin);
        self.streak >= CONFIRM
            && self.used.saturating_mul(DENSE_DIV) >= span.saturating_mul(DENSE_DIV - 1)
    }
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
    fn observe(
        &self,
        blob: u32,
        start: u64,
        end: u64,
        used: u64,
        missed: bool,
    ) -> Option<(u64, u64)> {
        let mut map = lock(&self.streams);
        let s = map.entry(blob).or_default();
        // Within what is read ahead, a read continues the stream wherever
        // it lands: the reader skipped a file or two (stored elsewhere by
        // deduplication, or met later in directory order), and what it
        // reads next was fetched for it. Beyond, only a small step does.
        let continues = s.streak > 0
            && start.saturating_add(SLACK) >= s.next
            && start <= s.next.saturating_add(GAP).max(s.ahead);
        if !continues && !missed {
            // Only a miss starts a stream: a workload served from what
            // prefetch or an earlier run brought needs no readahead.
            return None;
        }
        if !continues {
            // A walker that jumps elsewhere in its blob walks on from there
            // (see the module documentation).
            let walked = s.walking();
            *s = Stream {
                next: end,
                ahead: end,
                streak: if walked { CONFIRM - 1 } else { 1 },
                origin: start,
                used,
                resume: if walked {
                    s.used.min(self.opts.max_window) / 2
                } else {
                    0
                },
            };
            return None;
        }
        s.next = s.next.max(end);
        s.streak = s.streak.saturating_add(1);
        s.used = s.used.saturating_add(used);
        if !s.walking() {
            return None;
        }
        // The window is what the stream has shown it reads: a
        // reader that stops soon (one directory of modules) leaves little
        // behind, one that keeps going soon has the largest window.
        let window = s
            .used
            .max(s.resume)
            .clamp(self.opts.min_window, self.opts.max_window);
        if s.ahead >= s.next.saturating_add(window / 2) {
            return None;
        }
        let from = s.ahead.max(s.next);
        let to = s.next.saturating_add(window);
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
        read_bytes: u64,
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
        // What the read needed of the stored range: a page fault of a
        // mapped library needs 4 KiB of a chunk that may hold a MiB.
        let raw: u64 = reqs
            .iter()
            .map(|r| u64::from(r.info.uncompressed_size))
            .sum();
        let span = end.saturating_sub(first.start());
        let used = if raw > read_bytes {
            (span as u128 * u128::from(read_bytes) / u128::from(raw.max(1))) as u64
        } else {
            span
        };
        let Some((from, to)) = self.observe(blob, first.start(), end, used, missed) else {
            return;
        };
        // A read the prefetch list foresaw reads ahead only what it lists.
        let keep = source.listed_for(reqs);
        let range = RestRange {
            blob,
            digest: first.blob,
            from,
            to,
        };
        self.submit(image, source, range, keep, |source, reqs| {
            Metrics::add(&source.metrics().readahead_chunks, reqs.len() as u64);
        });
    }

    /// Queues the fetch of the non-local chunks of `range`, a whole file's
    /// stored range or its head (see [`crate::whole_file`]).
    pub(crate) fn fetch_whole_file(
        &self,
        image: &Arc<Image>,
        source: &Arc<ChunkSource>,
        range: RestRange,
    ) {
        self.submit(image, source, range, None, |_, _| {});
    }

    /// The readahead options in use.
    pub(crate) fn options(&self) -> &ReadaheadOptions {
        &self.opts
    }

    /// Fetches in the background the chunks of stored range `range` of a
    /// blob that are not local: the parts of a read's
    /// fetch window that chunks this node has already cut off from the
    /// read's own request (the read does not wait for them). They count
    /// as brought by the window (see [`crate::window`]). With `keep`, only
    /// the chunks it holds (the window of a read the prefetch list foresaw).
    pub(crate) fn fetch_window_rest(
        &self,
        image: &Arc<Image>,
        source: &Arc<ChunkSource>,
        range: RestRange,
        keep: Option<Arc<ListedChunks>>,
    ) {
        self.submit(image, source, range, keep, |source, reqs| {
            source.brought().fetched(reqs);
        });
    }

    /// Queues the fetch of the non-local chunks of `range` (of those `keep`
    /// holds, with one), in requests of the configured size;
    /// `counted` sees each request's chunks first. Stops at a full queue.
    fn submit(
        &self,
        image: &Arc<Image>,
        source: &Arc<ChunkSource>,
        range: RestRange,
        keep: Option<Arc<ListedChunks>>,
        counted: fn(&ChunkSource, &[ChunkRequest]),
    ) {
        let RestRange {
            blob,
            digest,
            from,
            to,
        } = range;
        let mut at = from;
        while at < to {
            let piece = (at, to.min(at.saturating_add(self.opts.request)));
            at = piece.1;
            let (image, source, keep) = (image.clone(), source.clone(), keep.clone());
            let request = self.opts.request;
            let job = move || {
                // The first call builds the index (a pass over the chunk
                // table): here, not at mount and not on a FUSE thread.
                let mut local = source.local_check();
                let reqs: Vec<ChunkRequest> = image
                    .chunks_in_blob(blob, piece.0, piece.1)
                    .into_iter()
                    .map(|(i, info)| ChunkRequest {
                        index: i,
                        info,
                        blob: digest,
                    })
                    .filter(|r| keep.as_ref().is_none_or(|k| k.contains(r.index)))
                    .filter(|r| !local.is_local(r))
                    .collect();
                if reqs.is_empty() {
                    return;
                }
                counted(&source, &reqs);
                // Failures surface to the reader when it gets there. One
                // request per piece (streamed: see `Fetcher::stream_run`).
                let _ = source.prefetch_in(&reqs, request);
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
            min_window: 256 << 10,
            max_window: 4 * MIB,
            request: MIB,
            threads: 1,
            whole_file: 0,
        })
    }

    /// A read of `[start, end)` that needed all of it.
    fn read(ra: &Readahead, blob: u32, start: u64, end: u64, missed: bool) -> Option<(u64, u64)> {
        ra.observe(blob, start, end, end - start, missed)
    }

    #[test]
    fn a_stream_starts_on_misses_and_its_window_grows() {
        let ra = ra();
        // A miss, then reads that continue it: a stream once confirmed.
        let mut at = 0;
        let mut first = None;
        for k in 0..CONFIRM {
            first = read(&ra, 0, at, at + 100_000, k == 0);
            at += 100_000;
        }
        let (from, to) = first.expect("confirmed: the first window");
        assert_eq!(from, at);
        assert_eq!(to - from, at.max(256 << 10), "what the stream read");
        // Reading on: each range starts where the last one ended, the
        // ranges grow to the bound and stay ahead of the reader.
        let mut ahead = to;
        let mut widest = 0;
        for _ in 0..80 {
            if let Some((from, to)) = read(&ra, 0, at, at + 100_000, false) {
                assert_eq!(from, ahead, "contiguous");
                // The window counts from the end of the read.
                let window = to - (at + 100_000);
                assert!(window <= 4 * MIB, "{from}..{to} at {at}");
                widest = widest.max(window);
                ahead = to;
            }
            at += 100_000;
            assert!(ahead > at, "ahead of the reader at {at}");
        }
        assert!(widest > 3 * MIB, "the window grew: {widest}");
        // Other blobs are streams of their own.
        assert_eq!(read(&ra, 1, 0, 10, true), None);
    }

    #[test]
    fn local_reads_and_sparse_readers_get_no_readahead() {
        let ra = ra();
        // Reads served locally never start a stream.
        for k in 0..10 {
            assert_eq!(read(&ra, 0, k * 1000, (k + 1) * 1000, false), None);
        }
        // A reader that skips ahead more than GAP is not walking the blob.
        for k in 0..10u64 {
            let start = k * (GAP + 8192);
            assert_eq!(read(&ra, 2, start, start + 4096, true), None, "read {k}");
        }
        // Adjacent reads that each needed a page of a large chunk (faults
        // of a mapped library) are sparse: no readahead.
        for k in 0..10u64 {
            let got = ra.observe(4, k * 100_000, (k + 1) * 100_000, 400, true);
            assert_eq!(got, None, "read {k}");
        }
        // A jump beyond what is read ahead ends a stream: the next reads
        // start over.
        for k in 0..CONFIRM as u64 {
            read(&ra, 3, k * 1000, (k + 1) * 1000, true);
        }
        assert_eq!(read(&ra, 3, 100 * MIB, 100 * MIB + 1000, true), None);
    }

    #[test]
    fn a_walker_that_jumps_elsewhere_in_its_blob_walks_on_sooner() {
        let ra = ra();
        let mut at = 0;
        for k in 0..20 {
            read(&ra, 0, at, at + 100_000, k == 0);
            at += 100_000;
        }
        // A jump back (the next directory in the reader's order is stored
        // earlier): one more read confirms the new stream, whose first
        // window is half of what the last one had read (2 MB).
        let back = 50 * MIB;
        assert_eq!(read(&ra, 0, back, back + 100_000, true), None);
        let (from, to) = read(&ra, 0, back + 100_000, back + 200_000, true)
            .expect("a walker's new stream is confirmed by its second read");
        assert_eq!(from, back + 200_000);
        assert_eq!(
            to - from,
            1_000_000,
            "half of the 2 MB the last stream read"
        );
        // A reader that never walked the blob (scattered misses) still
        // needs CONFIRM reads in a row: the read that continues its last
        // miss is only the second.
        for k in 0..3u64 {
            let start = k * 10 * MIB;
            assert_eq!(read(&ra, 1, start, start + 100_000, true), None);
        }
        let at = 20 * MIB + 100_000;
        assert_eq!(read(&ra, 1, at, at + 100_000, true), None);
    }

    #[test]
    fn a_reader_that_skips_within_what_is_read_ahead_keeps_its_stream() {
        let ra = ra();
        let mut at = 0;
        let mut window = None;
        for k in 0..CONFIRM {
            window = read(&ra, 0, at, at + 100_000, k == 0).or(window);
            at += 100_000;
        }
        let (_, ahead) = window.expect("a stream");
        // A skip of more than GAP, but within what was read ahead: the
        // stream goes on (the reads after it are local, and they still
        // move the readahead forward).
        let skip = at + 2 * GAP;
        assert!(skip + 100_000 < ahead, "{skip} in {ahead}");
        let mut at = skip;
        let mut more = None;
        for _ in 0..20 {
            more = more.or(read(&ra, 0, at, at + 100_000, false));
            at += 100_000;
        }
        let (from, _) = more.expect("readahead went on after the skip");
        assert_eq!(from, ahead, "contiguous with what was read ahead");
        // Beyond what is read ahead, the same skip ends it.
        let far = 100 * MIB;
        assert_eq!(read(&ra, 0, far, far + 100_000, false), None);
        assert_eq!(read(&ra, 0, far + 100_000, far + 200_000, false), None);
    }
}
