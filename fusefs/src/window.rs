//! The fetch window: what a read that misses brings along from its blob.
//!
//! A miss fetches the chunks the read needs, the other members of any
//! shared frame among them (their bytes come with the frame), and then the
//! chunks that follow in the blob, back to back, up to the window counted
//! in stored bytes from the first needed chunk.
//!
//! Over a network the window saves round trips whatever order the reads
//! come in, and with a disk cache what it brings is stored undecoded, for
//! the reader that wants it to verify. From a local store (an OCI layout on
//! this node: [`BlobStore::is_local`]) a request costs a system call, and
//! a local image has no disk cache: every chunk brought along is decoded
//! and verified at once, for the memory cache. That pays for a reader that
//! walks through the blob and is waste for one that jumps. Measured from
//! the bench's local layouts with their blobs in the page cache, 3 runs
//! each, the window always open against this rule: 10,000 files of the
//! 100k-small-files image in random order 16.9-20.8 s (daemon CPU 24-30
//! s: 1.74 million chunks decoded for 10,000 read) against 3.2-3.3 s (2.5
//! s); 20,000 in path order 1.8-2.4 s against 2.1-2.3 s; `import numpy,
//! pandas` 1.28-1.35 s (CPU 0.97 s) against 0.92-0.99 s (0.59 s); 2,000
//! random 4 KiB reads of the 2 GiB file 1.6-1.9 s against 1.2-1.7 s.
//! So from a local store the window opens only for a miss that starts
//! where the last miss in its blob ended, or a little past it (a reader
//! that skips a file), or within the window behind it ([`Streams`]).
//!
//! Over a network the window adapts to what it brings and to the link
//! ([`Adaptive`]). What it brought and a later read took from the disk
//! cache is a miss saved, worth a round trip; what it brought costs its
//! transfer. Both are counted in bytes of the link ([`Link`]'s bytes per
//! round trip, fitted to the requests' timings): every [`EVAL_MISSES`]
//! misses the window doubles while the round trips saved are worth twice
//! the bytes brought (bytes cost the node's link beyond this workload),
//! and halves when they fall under half of them, between
//! the configured window and its maximum. A tiny start (`python3 -c pass`)
//! misses too few times to grow it; random reads across many files of a
//! package grow it, because the files beside each one are read later.
//!
//! An adaptive window is the aligned block of the blob around the miss
//! (both sides of the needed chunks), so that the windows of later misses
//! fall on whole blocks, fetched or not; windows that start where the last
//! one ended are cut short by every chunk fetched before, and a reader
//! that jumps around a blob it has partly fetched then makes a round trip
//! for a few KiB at a time. A block holds the chunks whose first byte is
//! in it, the last of them ending past it: a chunk that straddles two
//! blocks used to belong to neither, and the read that needed it made a
//! round trip for that one chunk (19 of the 70 foreground requests of
//! reading every file were under 64 KiB). Alternated runs over 100 Mbit/s
//! with 20 ms RTT (straddlers in the block against left out, medians): `import
//! numpy, pandas` 6.38 vs 6.56 s (7 runs each), random reads across 1,500
//! files 11.68 vs 13.28 s (2), every file 11.28 vs 11.32 s (3), but
//! `python3 -c pass` 1.71 vs 1.65 s (6: a tiny start pays the straddlers'
//! bytes), and the 256 MiB file over 1 Gbit/s with 1 ms unchanged (2.58 vs
//! 2.54 s, 3). Once the window has grown, the read fetches
//! only the starting window on either side of its chunks (it waits for
//! what its request brings: MiBs would make every miss wait for the link),
//! and the rest of the block, and whatever chunks that are local already
//! cut off, goes to the readahead pool in the background
//! (`fs.rs` `split_ahead`).
//!
//! Over a link known to take more than [`HANDOFF_SECS`] to move the
//! starting window (256 KiB: 21 ms at 100 Mbit/s, 2 ms at 1 Gbit/s), a
//! read does not wait for the window at all ([`FetchWindow::hands_off`]):
//! it fetches its own chunks (and the rest of a shared frame among them)
//! and hands the window, up to the first local chunk on each side, to the
//! readahead pool at the same moment; a later read of a chunk still in
//! flight waits on its guard. The miss then costs a round trip and its own
//! bytes, not the block's. Alternated runs over 100 Mbit/s with 20 ms RTT
//! (handing off against waiting, medians of 3): `python3 -c pass` 1.54 vs
//! 1.67 s, `import numpy, pandas` 5.70 vs 5.96 s, random reads across
//! 1,500 files 11.0-11.8 vs 12.4-12.8 s (2), every file 11.26-11.37 vs
//! 11.37 s (2). Bytes over the link: the import 53.7-54.4 MB against
//! 46.7-51.4 MB (0.42x the image against 0.38x; not traced further), the
//! others the same or fewer (random reads 103-107 MB against 107-111). Over 1 Gbit/s
//! with 1 ms a second request costs more than the 2 ms it saves (the
//! registry's time per request, the hop through the pool): handing off
//! there made the tiny start, random reads and every file 5-10% slower.
//! Until the link is known (the first requests) the read keeps its window:
//! handing off from the first miss was about as fast over 100 Mbit/s
//! (`python3 -c pass` 1.52 s, the import 5.58 s) and slower over 1 Gbit/s
//! (the import 1.9-2.4 s against 1.8-2.1 s).
//!
//! Measured over 100 Mbit/s with 20 ms RTT (`scripts/bench-coldstart`,
//! one run each; random reads across 1,500 files / `python3 -c pass` /
//! `import numpy, pandas`): fixed windows of 256 KiB 17.2 / 1.6 / 8.4 s,
//! 1 MiB 14.0 / 2.1 / 8.0 s, 4 MiB 12.3 / 4.5 / 8.6 s; adaptive, forward
//! only 16.6 / 1.4 / 6.8 s; adaptive in aligned blocks with the rest in
//! the background 12.4 / 1.5 / 6.2 s (Nydus 2.4.4 in an earlier run of the
//! same bench: 14.5 / 2.2 / 8.3 s).
//!
//! [`BlobStore::is_local`]: skiff_registry::BlobStore::is_local
//! [`Link`]: crate::link::Link

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use skiff_format::{Bootstrap, Digest};

use crate::chunk::{frame_siblings, ChunkRequest};
use crate::link::LinkEstimate;
use crate::metrics::Metrics;

/// Misses between two decisions on the window's size.
pub(crate) const EVAL_MISSES: u64 = 16;
/// Seconds of transfer of the starting window past which a read hands
/// the window to the readahead pool and fetches only its own chunks (see
/// the module documentation): 5 ms, the order of what a second request
/// costs (the registry's time per request, a hop through the pool).
pub(crate) const HANDOFF_SECS: f64 = 0.005;
/// Chunks brought by windows and not yet read that are remembered; past
/// it, newly brought chunks are not tracked (nor counted as brought).
const MAX_PENDING: usize = 1 << 16;

/// What a mount's misses fetch besides the chunks they need.
pub(crate) struct FetchWindow {
    /// Stored bytes from the first needed chunk (0: no window); the
    /// smallest the window gets when it adapts.
    bytes: u64,
    /// Local stores only: the window opens for sequential misses.
    streams: Option<Streams>,
    /// Remote stores with a window that may grow.
    adaptive: Option<Adaptive>,
}

impl FetchWindow {
    /// A window of `bytes`, opened for every miss, or (`local`) for misses
    /// that continue their blob's last one.
    pub(crate) fn new(bytes: u64, local: bool) -> FetchWindow {
        FetchWindow {
            bytes,
            streams: local.then(|| Streams::new(bytes)),
            adaptive: None,
        }
    }

    /// A window over a remote store that starts at `bytes` and adapts up
    /// to `max` (see [`Adaptive`]), learning from `brought` and `link`.
    pub(crate) fn adaptive(
        bytes: u64,
        max: u64,
        brought: Arc<Brought>,
        link: Arc<LinkEstimate>,
        metrics: Arc<Metrics>,
    ) -> FetchWindow {
        let adaptive = (bytes > 0 && max > bytes).then(|| Adaptive {
            min: bytes,
            max,
            current: AtomicU64::new(bytes),
            misses: AtomicU64::new(0),
            brought,
            link,
            metrics,
        });
        FetchWindow {
            bytes,
            streams: None,
            adaptive,
        }
    }

    /// Whether a read should leave its window to the readahead pool rather
    /// than wait for it: over a link where the starting window's transfer
    /// takes more than [`HANDOFF_SECS`] (an adaptive window only, once the
    /// link is known).
    pub(crate) fn hands_off(&self) -> bool {
        self.adaptive.as_ref().is_some_and(|a| {
            a.link
                .estimate()
                .is_some_and(|link| a.min as f64 / link.rate > HANDOFF_SECS)
        })
    }

    /// The window it starts with (and never goes below), in stored bytes.
    pub(crate) fn base(&self) -> u64 {
        self.bytes
    }

    /// Whether the window has grown past where it started: what it brings
    /// is being read, so the parts of it that local chunks cut off from a
    /// read's request are worth fetching too (in the background: `fs.rs`).
    pub(crate) fn grown(&self) -> bool {
        self.adaptive
            .as_ref()
            .is_some_and(|a| a.current.load(Ordering::Relaxed) > a.min)
    }

    /// The window's bound in stored bytes now.
    pub(crate) fn bytes(&self) -> u64 {
        self.adaptive
            .as_ref()
            .map_or(self.bytes, |a| a.current.load(Ordering::Relaxed))
    }

    /// The chunks a miss of `reqs` (in file order) fetches besides them:
    /// the rest of any shared frame they need and what follows the last
    /// one in its blob; from a local store, nothing unless the miss
    /// continues its blob's last one (the frame is decoded anyway, but
    /// verifying members that nobody reads would cost more than decoding
    /// the frame again for the one that is).
    pub(crate) fn ahead(&self, b: &Bootstrap<'_>, reqs: &[ChunkRequest]) -> Vec<ChunkRequest> {
        let (Some(first), Some(last)) = (reqs.first(), reqs.last()) else {
            return Vec::new();
        };
        let blob = last.info.blob_index;
        let open = self
            .streams
            .as_ref()
            .is_none_or(|s| s.continues(blob, first.start()));
        let mut ahead = Vec::new();
        if open {
            ahead = frame_siblings(b, reqs);
            let bytes = self.bytes();
            if bytes > 0 && self.adaptive.is_some() && first.info.blob_index == blob {
                // The aligned block of the blob around the miss: windows
                // of later misses then fall on whole blocks, fetched or
                // not, instead of being cut short by what earlier windows
                // brought. Each chunk is in the block of its first byte.
                let block = first.start() / bytes * bytes;
                ahead.extend(chunks_before(b, first, block));
                ahead.extend(chunks_after(b, last, block, bytes, true));
            } else if bytes > 0 {
                ahead.extend(chunks_after(b, last, first.start(), bytes, false));
            }
        }
        if let Some(a) = &self.adaptive {
            a.on_miss();
        }
        if let Some(streams) = &self.streams {
            let end = ahead
                .iter()
                .filter(|r| r.info.blob_index == blob)
                .map(ChunkRequest::end)
                .fold(last.end(), u64::max);
            streams.ended(blob, end);
        }
        ahead
    }
}

/// A read's window, split: what the read fetches with its own chunks, and
/// the stored ranges it leaves to the background.
pub(crate) struct Split {
    /// Chunks of the window fetched in the read's own request(s).
    pub(crate) mine: Vec<ChunkRequest>,
    /// On either side, what lies past the read's share up to the first
    /// local chunk: the part of the window that needs no second thought.
    pub(crate) near: Vec<RestRange>,
    /// On either side, what lies from the first local chunk on (local
    /// chunks included: whoever fetches it skips them).
    pub(crate) far: Vec<RestRange>,
}

/// A stored range of a blob left to the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RestRange {
    /// The blob's index in the bootstrap.
    pub(crate) blob: u32,
    /// The blob's digest.
    pub(crate) digest: Digest,
    /// First stored byte.
    pub(crate) from: u64,
    /// One past the last stored byte.
    pub(crate) to: u64,
}

/// Splits the window `ahead` of a read that needs `needed`: the chunks
/// among or overlapping the needed ones are the read's; on each side the
/// read takes the nearest chunks, up to the first one that `is_local` or
/// past `share` stored bytes; the rest of that side up to the first local
/// chunk is `near`, and from there on `far`.
pub(crate) fn split_window(
    needed: &[ChunkRequest],
    ahead: &[ChunkRequest],
    share: u64,
    mut is_local: impl FnMut(&ChunkRequest) -> bool,
) -> Split {
    let mut split = Split {
        mine: Vec::new(),
        near: Vec::new(),
        far: Vec::new(),
    };
    let (Some(lo), Some(hi)) = (
        needed.iter().map(ChunkRequest::start).min(),
        needed.iter().map(ChunkRequest::end).max(),
    ) else {
        split.mine = ahead.to_vec();
        return split;
    };
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for r in ahead {
        if r.end() <= lo {
            before.push(*r);
        } else if r.start() >= hi {
            after.push(*r);
        } else {
            split.mine.push(*r);
        }
    }
    // Nearest first on each side.
    before.sort_by_key(|r| std::cmp::Reverse(r.start()));
    after.sort_by_key(ChunkRequest::start);
    for side in [&before, &after] {
        let local = side.iter().position(&mut is_local).unwrap_or(side.len());
        let mut taken = 0u64;
        let shared = side[..local]
            .iter()
            .position(|r| {
                taken = taken.saturating_add(u64::from(r.info.compressed_size));
                taken > share
            })
            .unwrap_or(local);
        split.mine.extend_from_slice(&side[..shared]);
        split.near.extend(rest_range(&side[shared..local]));
        split.far.extend(rest_range(&side[local..]));
    }
    split
}

/// The stored range the chunks `left` (of one blob) span, if any.
fn rest_range(left: &[ChunkRequest]) -> Option<RestRange> {
    let from = left.iter().map(ChunkRequest::start).min()?;
    let to = left.iter().map(ChunkRequest::end).max()?;
    let r = left.first()?;
    Some(RestRange {
        blob: r.info.blob_index,
        digest: r.blob,
        from,
        to,
    })
}

/// The chunks that fetch windows brought and no read has taken yet, and
/// what came of them since the window's last decision.
///
/// Every read that takes a brought chunk counts as a miss saved, though
/// several reads of one block of the starting window would have cost one
/// miss between them without the grown window. Counting once per such
/// block instead grew the window more slowly and cost the import more
/// round trips than it saved bytes (alternated runs of the cold-start
/// bench's `import numpy, pandas`: 6.85 against 6.50 s over 100 Mbit/s +
/// 20 ms, 2.20 against 1.97 s over 1 Gbit/s + 1 ms; random reads across
/// many files unchanged), so the count stays per read.
#[derive(Default)]
pub(crate) struct Brought {
    inner: Mutex<BroughtInner>,
}

#[derive(Default)]
struct BroughtInner {
    /// Chunk indexes brought and not read since.
    pending: HashSet<u32>,
    /// Stored bytes brought since the last decision.
    bytes: u64,
    /// Reads since the last decision that took a brought chunk from disk
    /// instead of going to the network.
    saved: u64,
}

impl Brought {
    /// The chunks of `ahead` went over the link with a read that needed
    /// others (a shared frame's members count once, by the frame).
    pub(crate) fn fetched(&self, ahead: &[ChunkRequest]) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut last_frame = None;
        for r in ahead {
            if g.pending.len() >= MAX_PENDING {
                break;
            }
            if g.pending.insert(r.index) {
                let frame = r.info.frame.map(|_| r.start());
                if frame.is_none() || frame != last_frame {
                    g.bytes += u64::from(r.info.compressed_size);
                }
                last_frame = frame;
            }
        }
    }

    /// A read took `from_disk` from the disk cache: a miss saved if any of
    /// them was brought by a window.
    pub(crate) fn read(&self, from_disk: &[ChunkRequest]) {
        if from_disk.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut hit = false;
        for r in from_disk {
            hit |= g.pending.remove(&r.index);
        }
        if hit {
            g.saved += 1;
        }
    }

    /// (bytes brought, misses saved) since the last call, and a new count.
    fn take(&self) -> (u64, u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let out = (g.bytes, g.saved);
        g.bytes = 0;
        g.saved = 0;
        out
    }
}

/// A fetch window that grows and shrinks with what it is worth (see the
/// module documentation).
pub(crate) struct Adaptive {
    min: u64,
    max: u64,
    current: AtomicU64,
    misses: AtomicU64,
    brought: Arc<Brought>,
    link: Arc<LinkEstimate>,
    metrics: Arc<Metrics>,
}

impl Adaptive {
    /// Counts a miss; every [`EVAL_MISSES`], decides the window's size.
    fn on_miss(&self) {
        let n = self.misses.fetch_add(1, Ordering::Relaxed) + 1;
        if n % EVAL_MISSES != 0 {
            return;
        }
        let (brought, saved) = self.brought.take();
        let Some(link) = self.link.estimate() else {
            return;
        };
        let current = self.current.load(Ordering::Relaxed);
        let next = next_window(
            current,
            self.min,
            self.max,
            brought,
            saved,
            link.bytes_per_round_trip(),
        );
        if next != current {
            tracing::debug!(
                brought,
                saved,
                rtt_ms = link.rtt * 1e3,
                rate_mb_s = link.rate / 1e6,
                "fetch window {} -> {} KiB",
                current >> 10,
                next >> 10
            );
            self.current.store(next, Ordering::Relaxed);
        }
        self.metrics
            .fetch_window_bytes
            .store(next, Ordering::Relaxed);
    }
}

/// The window after a period that brought `brought` stored bytes and saved
/// `saved` misses, each worth `round_trip` bytes of transfer: doubled when
/// the saving is worth twice the bytes, halved when under half of them,
/// kept in `min..=max`. A period that brought under a round trip's worth
/// decides nothing.
fn next_window(current: u64, min: u64, max: u64, brought: u64, saved: u64, round_trip: f64) -> u64 {
    let worth = saved as f64 * round_trip;
    let cost = brought as f64;
    if cost < round_trip {
        current
    } else if worth >= 2.0 * cost {
        current.saturating_mul(2).min(max)
    } else if worth * 2.0 < cost {
        (current / 2).max(min)
    } else {
        current
    }
    .clamp(min, max.max(min))
}

/// How far past where its blob's last miss ended a miss may start and
/// still continue it: a reader that skips a small file or two still walks.
pub(crate) const SKIP: u64 = 64 << 10;

/// Where the last miss of each blob ended, to tell a reader that walks
/// through a blob from one that jumps.
pub(crate) struct Streams {
    /// How far behind the last end a miss may start and still continue it
    /// (the window: the kernel's reads of one file arrive in parallel,
    /// slightly out of order).
    behind: u64,
    ends: Mutex<HashMap<u32, u64>>,
}

impl Streams {
    fn new(behind: u64) -> Streams {
        Streams {
            behind,
            ends: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a miss starting at `start` in `blob` continues the last
    /// one: at most [`SKIP`] past where it ended, or the window behind.
    fn continues(&self, blob: u32, start: u64) -> bool {
        let ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        ends.get(&blob).is_some_and(|&end| {
            start <= end.saturating_add(SKIP) && start.saturating_add(self.behind) >= end
        })
    }

    /// Records that the last miss in `blob` fetched up to `end`.
    fn ended(&self, blob: u32, end: u64) {
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        ends.insert(blob, end);
    }
}

/// The chunks that precede `first` in its blob, back to back (or in the
/// same shared frame), starting at `from` or later; in blob order.
fn chunks_before(b: &Bootstrap<'_>, first: &ChunkRequest, from: u64) -> Vec<ChunkRequest> {
    let mut before = Vec::new();
    let mut next = *first;
    let mut index = first.index;
    while let Some(i) = index.checked_sub(1) {
        let Ok(info) = b.chunk(i) else {
            break;
        };
        let req = ChunkRequest {
            index: i,
            info,
            blob: next.blob,
        };
        let same_frame = info.frame.is_some()
            && info.compressed_offset == next.info.compressed_offset
            && info.compressed_size == next.info.compressed_size;
        if info.blob_index != next.info.blob_index
            || (!same_frame && req.end() != next.start())
            || req.start() < from
        {
            break;
        }
        before.push(req);
        next = req;
        index = i;
    }
    before.reverse();
    before
}

/// The chunks that follow `last` in its blob, back to back (or in the same
/// shared frame), ending at most `window` stored bytes after `first_offset`;
/// with `by_start`, starting within them (an aligned block of the blob
/// holds the chunks whose first byte is in it, the last one may end past
/// it: see [`FetchWindow::ahead`]).
fn chunks_after(
    b: &Bootstrap<'_>,
    last: &ChunkRequest,
    first_offset: u64,
    window: u64,
    by_start: bool,
) -> Vec<ChunkRequest> {
    let mut ahead = Vec::new();
    let mut prev = *last;
    let mut index = last.index;
    while let Some(next) = index.checked_add(1) {
        let Ok(info) = b.chunk(next) else {
            break;
        };
        let req = ChunkRequest {
            index: next,
            info,
            blob: prev.blob,
        };
        // Next in the blob, or the next member of the same shared frame
        // (its bytes come with the frame).
        let same_frame = info.frame.is_some()
            && info.compressed_offset == prev.info.compressed_offset
            && info.compressed_size == prev.info.compressed_size;
        if info.blob_index != prev.info.blob_index
            || (!same_frame && req.start() != prev.end())
            || if by_start {
                req.start().saturating_sub(first_offset) >= window
            } else {
                req.end().saturating_sub(first_offset) > window
            }
        {
            break;
        }
        ahead.push(req);
        prev = req;
        index = next;
    }
    ahead
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_doubles_while_saved_round_trips_are_worth_twice_the_bytes_brought() {
        let (min, max) = (256 << 10, 4 << 20);
        // 250 kB per round trip (100 Mbit/s, 20 ms).
        let rt = 250e3;
        // 4 MiB brought saved 40 misses (10 MB of round trips): grow.
        assert_eq!(next_window(min, min, max, 4 << 20, 40, rt), 512 << 10);
        assert_eq!(
            next_window(max, min, max, 4 << 20, 40, rt),
            max,
            "at the bound"
        );
        // 4 MiB brought saved 10 misses (2.5 MB): between half and twice, keep.
        assert_eq!(next_window(1 << 20, min, max, 4 << 20, 10, rt), 1 << 20);
        // Saved almost nothing: shrink, not below the configured window.
        assert_eq!(next_window(1 << 20, min, max, 4 << 20, 1, rt), 512 << 10);
        assert_eq!(next_window(min, min, max, 4 << 20, 0, rt), min);
        // Too little brought to judge.
        assert_eq!(next_window(1 << 20, min, max, 100_000, 0, rt), 1 << 20);
    }

    /// Chunk `index` of blob 0, 1000 stored bytes at `offset`.
    fn req(index: u32, offset: u64) -> ChunkRequest {
        ChunkRequest {
            index,
            info: skiff_format::ChunkInfo {
                digest: skiff_format::ChunkHash::Blake3.digest(&index.to_le_bytes()),
                hash: skiff_format::ChunkHash::Blake3,
                blob_index: 0,
                compressed: true,
                compressed_offset: offset,
                compressed_size: 1000,
                uncompressed_size: 2000,
                frame: None,
            },
            blob: Digest::of(b"blob"),
        }
    }

    #[test]
    fn a_read_takes_its_windows_nearest_chunks_up_to_a_local_one_or_its_share() {
        // Needed: chunk 3 at 3000; the window: chunks 0-2 before, 4-8 after.
        let needed = [req(3, 3000)];
        let ahead: Vec<ChunkRequest> = [0, 1, 2, 4, 5, 6, 7, 8]
            .into_iter()
            .map(|i| req(i, u64::from(i) * 1000))
            .collect();
        let indexes = |v: &[ChunkRequest]| {
            let mut i: Vec<u32> = v.iter().map(|r| r.index).collect();
            i.sort_unstable();
            i
        };
        let ranges = |v: &[RestRange]| v.iter().map(|r| (r.from, r.to)).collect::<Vec<_>>();
        let all = split_window(&needed, &ahead, u64::MAX, |_| false);
        assert_eq!(indexes(&all.mine), [0, 1, 2, 4, 5, 6, 7, 8]);
        assert!(all.near.is_empty() && all.far.is_empty());

        // Chunk 6 is on disk: the read stops before it; 6-8 are far.
        let holed = split_window(&needed, &ahead, u64::MAX, |r| r.index == 6);
        assert_eq!(indexes(&holed.mine), [0, 1, 2, 4, 5]);
        assert!(holed.near.is_empty());
        assert_eq!(ranges(&holed.far), [(6000, 9000)]);

        // A share of 2000 bytes a side: 1-2 and 4-5; 0 and 6-8 are near.
        let shared = split_window(&needed, &ahead, 2000, |_| false);
        assert_eq!(indexes(&shared.mine), [1, 2, 4, 5]);
        assert_eq!(ranges(&shared.near), [(0, 1000), (6000, 9000)]);
        assert!(shared.far.is_empty());

        // No share, chunk 7 on disk: near up to it, far from it.
        let both = split_window(&needed, &ahead, 0, |r| r.index == 7);
        assert!(indexes(&both.mine).is_empty());
        assert_eq!(ranges(&both.near), [(0, 3000), (4000, 7000)]);
        assert_eq!(ranges(&both.far), [(7000, 9000)]);

        // No needed chunk: the window is the read's.
        assert_eq!(split_window(&[], &ahead, 0, |_| true).mine.len(), 8);
    }

    #[test]
    fn an_aligned_window_holds_the_chunks_that_start_in_its_block() {
        // Blocks of 2500 stored bytes over chunks of 1000: chunk 2
        // (2000..3000) starts in block 0 and ends in block 1.
        let bytes = crate::testutil::one_file_bootstrap(
            (0..8).map(|i| req(i, 1000 * u64::from(i)).info).collect(),
        );
        let b = Bootstrap::parse(&bytes).unwrap();
        let w = FetchWindow::adaptive(2500, 10_000, Arc::default(), Arc::default(), Arc::default());
        let indexes = |v: Vec<ChunkRequest>| v.iter().map(|r| r.index).collect::<Vec<_>>();
        // A miss in block 0 brings the chunk that straddles its end: left
        // out, it would be a request of its own for whichever read needs it.
        let c = |i: u32| req(i, 1000 * u64::from(i));
        assert_eq!(indexes(w.ahead(&b, &[c(0)])), [1, 2]);
        // A miss in block 1 (2500..5000): chunk 2 is block 0's, chunk 4
        // (4000..5000) its own, chunk 5 starts in block 2.
        assert_eq!(indexes(w.ahead(&b, &[c(3)])), [4]);
        assert_eq!(indexes(w.ahead(&b, &[c(2)])), [0, 1]);
    }

    #[test]
    fn a_read_hands_its_window_off_when_the_link_takes_long_to_move_it() {
        // A link of `mbit` and 20 ms per request, seen through requests of
        // 16 KiB to 1 MiB.
        let seen = |mbit: f64| {
            let link = Arc::new(LinkEstimate::default());
            for i in 0..16u64 {
                let bytes = (16 << 10) + i * (64 << 10);
                link.record(bytes, 0.020 + bytes as f64 * 8.0 / (mbit * 1e6));
            }
            FetchWindow::adaptive(256 << 10, 4 << 20, Arc::default(), link, Arc::default())
        };
        // 256 KiB: 21 ms at 100 Mbit/s, 2 ms at 1 Gbit/s.
        assert!(seen(100.0).hands_off());
        assert!(!seen(1000.0).hands_off());
        // Not before the link is known, and never for a fixed window.
        let unknown = FetchWindow::adaptive(
            256 << 10,
            4 << 20,
            Arc::default(),
            Arc::default(),
            Arc::default(),
        );
        assert!(!unknown.hands_off());
        assert!(!FetchWindow::new(256 << 10, false).hands_off());
    }

    #[test]
    fn brought_chunks_count_once_when_read_and_a_read_saves_one_miss() {
        let b = Brought::default();
        b.fetched(&[req(1, 0), req(2, 1000), req(3, 2000)]);
        b.read(&[req(1, 0), req(2, 1000)]);
        b.read(&[req(2, 1000)]);
        b.read(&[req(9, 9000)]);
        b.read(&[]);
        assert_eq!(b.take(), (3000, 1), "one read took two brought chunks");
        b.read(&[req(3, 2000)]);
        assert_eq!(b.take(), (0, 1));
        assert_eq!(b.take(), (0, 0));
    }

    #[test]
    fn a_miss_continues_its_blobs_last_one_a_skip_ahead_or_a_window_behind() {
        let s = Streams::new(256 << 10);
        assert!(!s.continues(0, 0), "no stream before the first miss");
        s.ended(0, 1 << 20);
        assert!(s.continues(0, 1 << 20), "right where it ended");
        assert!(s.continues(0, (1 << 20) + SKIP), "a small skip");
        assert!(s.continues(0, (1 << 20) - (256 << 10)), "the window behind");
        assert!(!s.continues(0, (1 << 20) + SKIP + 1), "a jump ahead");
        assert!(!s.continues(0, (1 << 20) - (256 << 10) - 1), "a jump back");
        assert!(!s.continues(1, 1 << 20), "another blob has its own stream");
        s.ended(0, 90 << 20);
        assert!(
            !s.continues(0, 1 << 20) && s.continues(0, 90 << 20),
            "moved on"
        );
    }
}
