//! The mounted image: the bootstrap bytes and the parsed [`Bootstrap`]
//! borrowing them, held together in one self-referential cell.
//!
//! The owner is anything that derefs to bytes: the `Vec` a registry read
//! decompressed the bootstrap into, or a memory map of a bootstrap file made
//! by the caller. Parsing checks the header and section CRCs once (O(size),
//! a few ms for a large image) and walks nothing; every later access is a
//! bounds-checked read of a record in place.
//!
//! Parsing does not walk the tree, so a bootstrap whose checksums are right
//! may still lie (a chunk map out of order, entries unsorted, an offset past
//! a section). [`Image::checked`] runs [`Bootstrap::check_inode`] the first
//! time an inode is served and remembers the verdict (one byte per inode),
//! so that a lying inode is an error every time, never a wrong answer.

use std::sync::atomic::{AtomicU8, Ordering};

use skiff_format::{Bootstrap, FormatError, InodeId};

/// [`Image::checked`] states of an inode.
const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// Bytes of a bootstrap: a `Vec<u8>`, a `memmap2::Mmap`, ...
pub type BootstrapBytes = Box<dyn AsRef<[u8]> + Send + Sync>;

self_cell::self_cell!(
    struct BootstrapCell {
        owner: BootstrapBytes,
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
}

impl Image {
    /// Parses (and checksums) `bytes`.
    pub fn new(bytes: BootstrapBytes) -> Result<Image, FormatError> {
        let len = (*bytes).as_ref().len();
        let cell = BootstrapCell::try_new(bytes, |b| Bootstrap::parse((**b).as_ref()))?;
        let inodes = cell.borrow_dependent().inode_count() as usize;
        let verdicts = (0..inodes).map(|_| AtomicU8::new(UNCHECKED)).collect();
        Ok(Image {
            cell,
            len,
            verdicts,
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

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("len", &self.len).finish()
    }
}
