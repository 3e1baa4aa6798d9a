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
//! [`BlobStore::is_local`]: skiff_registry::BlobStore::is_local

use std::collections::HashMap;
use std::sync::Mutex;

use skiff_format::Bootstrap;

use crate::chunk::{frame_siblings, ChunkRequest};

/// What a mount's misses fetch besides the chunks they need.
pub(crate) struct FetchWindow {
    /// Stored bytes from the first needed chunk (0: no window).
    bytes: u64,
    /// Local stores only: the window opens for sequential misses.
    streams: Option<Streams>,
}

impl FetchWindow {
    /// A window of `bytes`, opened for every miss, or (`local`) for misses
    /// that continue their blob's last one.
    pub(crate) fn new(bytes: u64, local: bool) -> FetchWindow {
        FetchWindow {
            bytes,
            streams: local.then(|| Streams::new(bytes)),
        }
    }

    /// The window's bound in stored bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
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
            if self.bytes > 0 {
                ahead.extend(chunks_after(b, last, first.start(), self.bytes));
            }
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

/// The chunks that follow `last` in its blob, back to back (or in the same
/// shared frame), ending at most `window` stored bytes after `first_offset`.
fn chunks_after(
    b: &Bootstrap<'_>,
    last: &ChunkRequest,
    first_offset: u64,
    window: u64,
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
            || req.end().saturating_sub(first_offset) > window
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
