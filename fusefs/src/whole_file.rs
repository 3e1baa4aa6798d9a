//! Whole files ahead: a file that is read from its start and then misses
//! is fetched whole, in the background.
//!
//! Programs and libraries are read from their start (the ELF header, by
//! `execve` or the dynamic loader) and then by page faults wherever the
//! code runs: `python3 -c pass` misses 7 times in `python3.11`, each a
//! round trip that the interpreter waits for, one after the other. Reading
//! from the start is also what `cat`, a bytecode loader or a model loader
//! does. So at the first miss of a file that has been read from offset 0
//! (by a read that did not cover it), the stored range of the whole file goes to the
//! readahead pool (streamed requests; the read itself fetches only its
//! own chunks and window as before, and a later read of a chunk in flight
//! waits on its guard). A file never read at its start (random access: a
//! database, W5's reads) is left alone, and so is one spread over several
//! blobs, or one whose chunks are scattered among other files'
//! (deduplicated): fetching its stretch of the blob would bring mostly
//! other files. Of a file larger than the bound
//! (`ReadaheadOptions::whole_file`, 4 MiB stored by default) only the head
//! is fetched, the chunks from its start up to the bound, and only when
//! the miss is among them: a model or a JDK read through from its start
//! has its first MiBs on the way before readahead's stream is confirmed,
//! and a large library's loader, which reads its headers and tables near
//! the start, finds them fetched.
//!
//! Alternated runs on the bench's `python` image, one mount each, caches
//! dropped, without against with (4 MiB): over 100 Mbit/s with 20 ms RTT
//! `python3 -c pass` 1.51-1.67 s against 1.30 s (3 runs each, 11.7 MB
//! over the link against 9.4: the file's own requests replace the windows
//! that its misses brought along), `import numpy, pandas` 5.54-5.83 s against
//! 5.47-5.70 s, reading every file 11.42-11.44 s against 11.29-11.44 s (2),
//! random reads across 1,500 files unchanged (only the interpreter's own
//! files start at 0); over 1 Gbit/s with 1 ms `python3 -c pass` 0.44-0.48 s
//! against 0.34-0.38 s and the import 1.95-2.01 s against 1.73-1.92 s.
//! A bound of 16 MiB, when any first miss counted, made the import slower
//! (5.54-5.62 s against 5.33-5.53 s without).
//!
//! The heads of larger files, alternated bench runs (3 each, without
//! against with): over 100 Mbit/s with 20 ms RTT `import numpy, pandas`
//! 5.92-6.28 s against 5.48-5.98 s (224-232 requests against 191-195;
//! which heads saved the misses was not traced), the 256 MiB file
//! 22.40-22.45 s against 22.34-22.38 s; over 1 Gbit/s with 1 ms the import
//! 2.30-3.04 s against 1.96-2.42 s and the 256 MiB file 2.58-2.87 s
//! against 2.58-2.69 s; reading every file (2 runs) and `python3 -c pass`
//! unchanged.

use std::collections::HashMap;
use std::sync::Mutex;

use skiff_format::{Bootstrap, InodeId};

use crate::chunk::ChunkRequest;
use crate::window::RestRange;
use crate::workers::lock;

/// What is known of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A read began at offset 0 and ended before its end.
    FromStart,
    /// Its stored range went to the readahead pool.
    Fetched,
}

/// The files read from their start, per mount.
#[derive(Debug)]
pub(crate) struct WholeFiles {
    /// Largest stored size fetched whole, and of a larger file's head.
    max: u64,
    files: Mutex<HashMap<u32, Seen>>,
}

impl WholeFiles {
    /// Whole files up to `max` stored bytes (`None` for 0: off).
    pub(crate) fn new(max: u64) -> Option<WholeFiles> {
        (max > 0).then(|| WholeFiles {
            max,
            files: Mutex::new(HashMap::new()),
        })
    }

    /// Notes a read of `[offset, end)` of file `id` of `size` bytes, hit
    /// or miss: one from the start that ends before the end marks the file
    /// (only such files are remembered).
    pub(crate) fn on_read(&self, id: InodeId, offset: u64, end: u64, size: u64) {
        if offset == 0 && end < size {
            lock(&self.files).entry(id.0).or_insert(Seen::FromStart);
        }
    }

    /// At a miss of file `id` whose chunks include `first`: the stored
    /// range of the whole file, once, if it was read from its start and it
    /// is one dense stretch of `first`'s blob within the bound; of a larger
    /// file, that of its chunks from its start up to the bound, if `first`
    /// is among them.
    pub(crate) fn on_miss(
        &self,
        b: &Bootstrap<'_>,
        id: InodeId,
        first: &ChunkRequest,
    ) -> Option<RestRange> {
        match lock(&self.files).get_mut(&id.0) {
            Some(seen) if *seen == Seen::FromStart => *seen = Seen::Fetched,
            _ => return None,
        }
        let blob = first.info.blob_index;
        let (mut from, mut to, mut stored) = (u64::MAX, 0u64, 0u64);
        let mut last_frame = None;
        // A file larger than the bound: its head, when the miss is in it.
        let (mut cut, mut has_miss) = (false, false);
        for rec in b.file_chunks(id).ok()? {
            if stored >= self.max {
                cut = true;
                break;
            }
            let c = b.chunk(rec.chunk_index()).ok()?;
            if c.blob_index != blob {
                return None;
            }
            has_miss |= rec.chunk_index() == first.index;
            let end = c
                .compressed_offset
                .saturating_add(u64::from(c.compressed_size));
            // The members of a shared frame point at the same stored bytes.
            if last_frame != Some(c.compressed_offset) {
                stored = stored.saturating_add(u64::from(c.compressed_size));
            }
            last_frame = c.frame.map(|_| c.compressed_offset);
            from = from.min(c.compressed_offset);
            to = to.max(end);
        }
        if cut && !has_miss {
            return None;
        }
        let span = to.checked_sub(from).filter(|&s| s > 0)?;
        // Scattered (chunks shared with other files): the span would be
        // mostly theirs.
        if span > stored.saturating_mul(2) {
            return None;
        }
        Some(RestRange {
            blob,
            digest: first.blob,
            from,
            to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::one_file_bootstrap;
    use skiff_format::{ChunkHash, ChunkInfo, Digest};

    /// Chunks of 64 KiB stored in 16 KiB each, at `offsets` of the blob.
    fn chunks(offsets: &[u64]) -> Vec<ChunkInfo> {
        offsets
            .iter()
            .enumerate()
            .map(|(n, &o)| ChunkInfo {
                digest: Digest::of(&[n as u8]),
                hash: ChunkHash::Blake3,
                blob_index: 0,
                compressed: true,
                compressed_offset: o,
                compressed_size: 16 << 10,
                uncompressed_size: 64 << 10,
                frame: None,
            })
            .collect()
    }

    fn first_req(b: &Bootstrap<'_>, id: InodeId) -> ChunkRequest {
        let rec = b.file_chunks(id).unwrap()[1];
        ChunkRequest {
            index: rec.chunk_index(),
            info: b.chunk(rec.chunk_index()).unwrap(),
            blob: Digest::of(b"blob"),
        }
    }

    #[test]
    fn a_file_read_from_its_start_is_fetched_whole_at_its_first_miss_only() {
        let bytes = one_file_bootstrap(chunks(&[0, 16 << 10, 32 << 10, 48 << 10]));
        let b = Bootstrap::parse(&bytes).unwrap();
        let id = b.resolve_path(b"/f").unwrap().unwrap();
        let size = 256 << 10;
        let miss = first_req(&b, id);

        // Read only in the middle: random access, left alone.
        let whole = WholeFiles::new(1 << 20).unwrap();
        whole.on_read(id, 64 << 10, 128 << 10, size);
        assert_eq!(whole.on_miss(&b, id, &miss), None);

        let whole = WholeFiles::new(1 << 20).unwrap();
        whole.on_read(id, 0, 4096, size);
        whole.on_read(id, 0, 4096, size);
        let range = whole.on_miss(&b, id, &miss).expect("fetched whole");
        assert_eq!((range.blob, range.from, range.to), (0, 0, 64 << 10));
        assert_eq!(range.digest, Digest::of(b"blob"));
        assert_eq!(whole.on_miss(&b, id, &miss), None, "once");

        // Larger than the bound: its head, when the miss is in it (the
        // rest is left to readahead's streams).
        let small = WholeFiles::new(32 << 10).unwrap();
        small.on_read(id, 0, 4096, size);
        let head = small.on_miss(&b, id, &miss).expect("the head");
        assert_eq!((head.from, head.to), (0, 32 << 10));
        let small = WholeFiles::new(32 << 10).unwrap();
        small.on_read(id, 0, 4096, size);
        let last = b.file_chunks(id).unwrap()[3];
        let past = ChunkRequest {
            index: last.chunk_index(),
            info: b.chunk(last.chunk_index()).unwrap(),
            blob: Digest::of(b"blob"),
        };
        assert_eq!(small.on_miss(&b, id, &past), None, "a miss past the head");

        // A first read that covers the file leaves nothing to fetch.
        let whole = WholeFiles::new(1 << 20).unwrap();
        whole.on_read(id, 0, size, size);
        assert_eq!(whole.on_miss(&b, id, &miss), None);
        assert!(WholeFiles::new(0).is_none(), "0 is off");
    }

    #[test]
    fn a_file_scattered_through_its_blob_is_not_fetched_whole() {
        // 64 KiB stored over a span of 1 MiB: mostly other files' chunks.
        let bytes = one_file_bootstrap(chunks(&[0, 300 << 10, 600 << 10, 1008 << 10]));
        let b = Bootstrap::parse(&bytes).unwrap();
        let id = b.resolve_path(b"/f").unwrap().unwrap();
        let whole = WholeFiles::new(16 << 20).unwrap();
        whole.on_read(id, 0, 4096, 256 << 10);
        assert_eq!(whole.on_miss(&b, id, &first_req(&b, id)), None);
    }
}
