//! Block checksums (format 1.2): CRC-32s of a bootstrap in 64 KiB blocks,
//! so that a reader can verify the bytes it reads on first use instead of
//! the whole bootstrap at open.
//!
//! The BLOCK_CRCS section is the last section of the file. Its entries cover
//! `[table_end, offset of BLOCK_CRCS)` (every section and every padding
//! byte between them; the header has its own CRC) in blocks of
//! [`CRC_BLOCK_SIZE`] bytes, the last one shorter. A reader that opens a
//! bootstrap lazily ([`crate::Bootstrap::parse_lazy`]) checks the header,
//! the section table and the BLOCK_CRCS section's own CRC at open, which
//! reads a few KB, and checks each block the first time any record in it is
//! read; [`BlockMarks`] remembers which blocks passed. The mount of a large
//! image then reads the pages it serves instead of the whole bootstrap.
//!
//! The per-section CRCs stay in the section table, so a 1.1 reader (which
//! ignores the unknown section kind) still verifies everything at open.

use std::sync::atomic::{AtomicU64, Ordering};

use zerocopy::little_endian::U32;
use zerocopy::FromBytes;

use crate::layout::{SectionEntry, Superblock, SECTION_BLOCK_CRCS};
use crate::FormatError;

/// Bytes covered by one BLOCK_CRCS entry.
pub const CRC_BLOCK_SIZE: usize = 64 << 10;

/// Number of blocks that cover `len` bytes.
pub fn block_count(len: usize) -> usize {
    len.div_ceil(CRC_BLOCK_SIZE)
}

/// Whether the section table at the start of `buf` lists a BLOCK_CRCS
/// section, so that [`crate::Bootstrap::parse_lazy`] will check it block by
/// block. Reads only the header and checks nothing: a caller uses it to
/// choose how to read the file (whole or by page) before opening it.
pub fn has_block_crcs(buf: &[u8]) -> bool {
    let Ok((superblock, rest)) = Superblock::ref_from_prefix(buf) else {
        return false;
    };
    let count = superblock.section_count.get() as usize;
    let table = rest.get(..count.saturating_mul(size_of::<SectionEntry>()));
    table
        .and_then(|t| <[SectionEntry]>::ref_from_bytes(t).ok())
        .is_some_and(|t| t.iter().any(|e| e.kind.get() == SECTION_BLOCK_CRCS))
}

/// The block CRCs of `covered` (the bytes from the end of the section table
/// to the start of BLOCK_CRCS), as the section stores them.
pub fn block_crcs(covered: &[u8]) -> Vec<U32> {
    covered
        .chunks(CRC_BLOCK_SIZE)
        .map(|b| U32::new(crc32fast::hash(b)))
        .collect()
}

/// Which blocks of a lazily verified bootstrap have passed their check: one
/// bit per block, shared by every thread reading the bootstrap.
pub struct BlockMarks {
    words: Box<[AtomicU64]>,
    before_check: Option<fn(&[u8])>,
}

impl BlockMarks {
    /// Marks for a bootstrap of `len` bytes, all blocks unchecked.
    pub fn for_len(len: usize) -> BlockMarks {
        let words = block_count(len).div_ceil(64);
        BlockMarks {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            before_check: None,
        }
    }

    /// Calls `hint` with the bytes of each block just before its first
    /// check. A reader whose bootstrap is a file mapping advised for random
    /// access uses it to ask for the whole block at once: the check reads
    /// every byte of it, and one 64 KiB read costs far less than sixteen
    /// page faults that each wait for the disk in turn.
    pub fn with_hint(mut self, hint: fn(&[u8])) -> BlockMarks {
        self.before_check = Some(hint);
        self
    }

    /// Blocks these marks can record.
    pub fn capacity(&self) -> usize {
        self.words.len() * 64
    }

    fn is_set(&self, block: usize) -> bool {
        self.words
            .get(block / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (block % 64)) != 0)
    }

    fn set(&self, block: usize) {
        if let Some(w) = self.words.get(block / 64) {
            w.fetch_or(1 << (block % 64), Ordering::Relaxed);
        }
    }

    /// Blocks marked as checked.
    pub fn checked(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }
}

impl std::fmt::Debug for BlockMarks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockMarks({} checked)", self.checked())
    }
}

/// The lazy verifier of one opened bootstrap: the covered range, its block
/// CRCs and the marks. Cheap to copy.
#[derive(Clone, Copy)]
pub(crate) struct LazyBlocks<'a> {
    /// The bootstrap.
    pub buf: &'a [u8],
    /// First covered byte (the end of the section table).
    pub start: usize,
    /// End of the covered bytes (the offset of BLOCK_CRCS).
    pub end: usize,
    /// One CRC per block.
    pub crcs: &'a [U32],
    /// What has been checked.
    pub marks: &'a BlockMarks,
}

impl LazyBlocks<'_> {
    /// Checks the blocks that hold `buf[offset..offset + len]`, each once.
    /// Bytes outside the covered range were checked at open.
    pub fn check(&self, offset: usize, len: usize) -> Result<(), FormatError> {
        let from = offset.max(self.start);
        let to = offset.saturating_add(len).min(self.end);
        if from >= to {
            return Ok(());
        }
        let first = (from - self.start) / CRC_BLOCK_SIZE;
        let last = (to - 1 - self.start) / CRC_BLOCK_SIZE;
        for block in first..=last {
            if !self.marks.is_set(block) {
                self.check_block(block)?;
                self.marks.set(block);
            }
        }
        Ok(())
    }

    /// Checks every block (what an eager open does).
    pub fn check_all(&self) -> Result<(), FormatError> {
        self.check(self.start, self.end - self.start)
    }

    fn check_block(&self, block: usize) -> Result<(), FormatError> {
        let from = self.start + block * CRC_BLOCK_SIZE;
        let to = (from + CRC_BLOCK_SIZE).min(self.end);
        let bytes = self.buf.get(from..to).unwrap_or_default();
        if let Some(hint) = self.marks.before_check {
            hint(bytes);
        }
        let expected = self.crcs.get(block).map_or(0, |c| c.get());
        let actual = crc32fast::hash(bytes);
        if expected != actual {
            return Err(FormatError::BlockChecksumMismatch {
                offset: from as u64,
                expected,
                actual,
            });
        }
        Ok(())
    }
}
