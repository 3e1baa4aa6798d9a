//! The mounted image: the bootstrap bytes and the parsed [`Bootstrap`]
//! borrowing them, held together in one self-referential cell.
//!
//! The owner is anything that derefs to bytes: the `Vec` a registry read
//! decompressed the bootstrap into, or a memory map of a bootstrap file made
//! by the caller. Opening checks the header and section table and walks
//! nothing; a format 1.2 bootstrap is then checked block by block (64 KiB,
//! CRC-32) the first time anything in a block is read
//! ([`Bootstrap::parse_lazy`]), so a mount reads and checks the pages it
//! serves, not the whole bootstrap (an older one is checked whole at open);
//! each block is asked of the disk whole before its check
//! ([`skiff_registry::bootcache::will_need`]), in one read rather than a
//! fault per page.
//! Every access is a bounds-checked read of a record in place.
//!
//! Parsing does not walk the tree, so a bootstrap whose checksums are right
//! may still lie (a chunk map out of order, entries unsorted, an offset past
//! a section). [`Image::checked`] runs [`Bootstrap::check_inode`] the first
//! time an inode is served and remembers the verdict (one byte per inode),
//! so that a lying inode is an error every time, never a wrong answer.
//!
//! [`Image::chunks_in_blob`] finds the chunks of a stored range of a blob
//! (readahead and background fetch walk blobs in stored order).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use skiff_format::{BlockMarks, Bootstrap, ChunkInfo, FormatError, InodeId};

/// [`Image::checked`] states of an inode.
const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// Bytes of a bootstrap: a `Vec<u8>`, a `memmap2::Mmap`, ...
pub type BootstrapBytes = Box<dyn AsRef<[u8]> + Send + Sync>;

/// The bytes and the record of which of their blocks passed their check.
struct Checked {
    bytes: BootstrapBytes,
    marks: BlockMarks,
}

self_cell::self_cell!(
    struct BootstrapCell {
        owner: Checked,
        #[covariant]
        dependent: Bootstrap,
    }
);

/// A parsed bootstrap that owns its bytes.
pub struct Image {
    cell: BootstrapCell,
    len: usize,
    /// Per inode: [`UNCHECKED`], [`GOOD`] or [`BAD`].
    verdicts: Vec<AtomicU8>,
    /// Built on first use by [`Image::chunks_in_blob`].
    blob_order: OnceLock<BlobOrder>,
}

impl Image {
    /// Opens `bytes` (checksums as described in the module documentation).
    pub fn new(bytes: BootstrapBytes) -> Result<Image, FormatError> {
        let len = (*bytes).as_ref().len();
        let owner = Checked {
            bytes,
            // A block is read whole before its first check: one disk read
            // instead of a fault per page when the bytes are a file map.
            marks: BlockMarks::for_len(len).with_hint(skiff_registry::bootcache::will_need),
        };
        let cell = BootstrapCell::try_new(owner, |o| {
            Bootstrap::parse_lazy((*o.bytes).as_ref(), &o.marks)
        })?;
        let inodes = cell.borrow_dependent().inode_count() as usize;
        let verdicts = (0..inodes).map(|_| AtomicU8::new(UNCHECKED)).collect();
        Ok(Image {
            cell,
            len,
            verdicts,
            blob_order: OnceLock::new(),
        })
    }

    /// `id` after [`Bootstrap::check_inode`]: the first call checks the
    /// inode and the records it owns, later calls read the verdict. Two
    /// threads may both check an inode the first time; they agree.
    pub fn checked(&self, id: InodeId) -> Result<InodeId, FormatError> {
        let Some(verdict) = self.verdicts.get(id.index()) else {
            // Out of range: the reader's own error.
            self.bootstrap().inode(id)?;
            return Ok(id);
        };
        match verdict.load(Ordering::Relaxed) {
            GOOD => Ok(id),
            state => {
                // BAD is checked again, for the message (an error path only).
                let result = self.bootstrap().check_inode(id);
                if state == UNCHECKED {
                    let v = if result.is_ok() { GOOD } else { BAD };
                    verdict.store(v, Ordering::Relaxed);
                }
                result.map(|()| id)
            }
        }
    }

    /// A best-effort path of an inode for log messages and access lists: the
    /// first name of each ancestor, found by scanning its parent (only on error
    /// paths and when an access list is written).
    pub fn path_of(&self, id: InodeId) -> String {
        let b = self.bootstrap();
        let mut parts: Vec<String> = Vec::new();
        let mut cur = id;
        for _ in 0..4096 {
            if cur == b.root() {
                break;
            }
            let Ok(inode) = b.inode(cur) else { break };
            let parent = inode.parent();
            let name = (0..b.dir_len(parent).unwrap_or(0))
                .filter_map(|i| b.dir_entry(parent, i).ok())
                .find(|e| e.inode == cur)
                .map(|e| String::from_utf8_lossy(e.name).into_owned());
            parts.push(name.unwrap_or_else(|| format!("<inode {}>", cur.0)));
            cur = parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// The chunks stored in blob `blob` (its index in BLOBS) that start in
    /// `[from, to)` of it, in stored order, with their CHUNKS indices. The
    /// first call makes the index (one pass over the chunk table; for a
    /// format 1.1 table, which is in blob order, a few bytes per blob,
    /// else four bytes per chunk): call it off the FUSE threads.
    pub fn chunks_in_blob(&self, blob: u32, from: u64, to: u64) -> Vec<(u32, ChunkInfo)> {
        let b = self.bootstrap();
        self.blob_order
            .get_or_init(|| BlobOrder::build(b))
            .chunks_in(b, blob, from, to)
    }

    /// The parsed bootstrap.
    pub fn bootstrap(&self) -> &Bootstrap<'_> {
        self.cell.borrow_dependent()
    }

    /// Length of the bootstrap in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bootstrap is empty (never true for a parsed one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The chunks of each blob in stored order, for finding those of a range.
enum BlobOrder {
    /// The chunk table is in (blob, offset) order (format 1.1 writes it so):
    /// each blob's chunks are a slice of it, `[start, end)` by blob index.
    Sorted(Vec<(u32, u32)>),
    /// Any other table: chunk indices sorted by (blob, offset), and each
    /// blob's slice of that list.
    Listed(Vec<u32>, Vec<(u32, u32)>),
}

impl BlobOrder {
    fn build(b: &Bootstrap<'_>) -> BlobOrder {
        let n = b.chunk_count();
        let blobs = b.blob_count() as usize;
        let key = |i: u32| b.chunk(i).ok().map(|c| (c.blob_index, c.compressed_offset));
        let keys: Vec<Option<(u32, u64)>> = (0..n).map(key).collect();
        let sorted = keys.iter().all(Option::is_some) && keys.windows(2).all(|w| w[0] <= w[1]);
        let mut order: Vec<u32> = (0..n).collect();
        if !sorted {
            order.sort_by_key(|&i| keys.get(i as usize).copied().flatten());
        }
        let mut ranges = vec![(0u32, 0u32); blobs];
        let mut k = 0usize;
        while k < order.len() {
            let blob = keys
                .get(order[k] as usize)
                .copied()
                .flatten()
                .map(|(b, _)| b as usize);
            let start = k;
            while k < order.len()
                && keys
                    .get(order[k] as usize)
                    .copied()
                    .flatten()
                    .map(|(b, _)| b as usize)
                    == blob
            {
                k += 1;
            }
            if let Some(slot) = blob.and_then(|b| ranges.get_mut(b)) {
                *slot = (start as u32, k as u32);
            }
        }
        if sorted {
            BlobOrder::Sorted(ranges)
        } else {
            BlobOrder::Listed(order, ranges)
        }
    }

    /// The chunks of blob `blob` that start in `[from, to)`, in order.
    fn chunks_in(&self, b: &Bootstrap<'_>, blob: u32, from: u64, to: u64) -> Vec<(u32, ChunkInfo)> {
        let (ranges, list) = match self {
            BlobOrder::Sorted(r) => (r, None),
            BlobOrder::Listed(l, r) => (r, Some(l)),
        };
        let Some(&(start, end)) = ranges.get(blob as usize) else {
            return Vec::new();
        };
        let at = |k: u32| -> Option<(u32, ChunkInfo)> {
            let i = match list {
                Some(l) => *l.get(k as usize)?,
                None => k,
            };
            Some((i, b.chunk(i).ok()?))
        };
        // First position whose chunk starts at or after `from`.
        let (mut lo, mut hi) = (start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match at(mid) {
                Some((_, c)) if c.compressed_offset < from => lo = mid + 1,
                _ => hi = mid,
            }
        }
        let mut out = Vec::new();
        for k in lo..end {
            match at(k) {
                Some((i, c)) if c.compressed_offset < to => out.push((i, c)),
                _ => break,
            }
        }
        out
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("len", &self.len).finish()
    }
}
