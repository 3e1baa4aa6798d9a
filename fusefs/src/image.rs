//! The mounted image: the bootstrap bytes and the parsed [`Bootstrap`]
//! borrowing them, held together in one self-referential cell.
//!
//! The owner is anything that derefs to bytes: the `Vec` a registry read
//! decompressed the bootstrap into, or a memory map of a bootstrap file made
//! by the caller. Parsing checks the header and section CRCs once (O(size),
//! a few ms for a large image) and walks nothing; every later access is a
//! bounds-checked read of a record in place.

use skiff_format::{Bootstrap, FormatError};

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
}

impl Image {
    /// Parses (and checksums) `bytes`.
    pub fn new(bytes: BootstrapBytes) -> Result<Image, FormatError> {
        let len = (*bytes).as_ref().len();
        let cell = BootstrapCell::try_new(bytes, |b| Bootstrap::parse((**b).as_ref()))?;
        Ok(Image { cell, len })
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
