//! Reading a bootstrap in place.
//!
//! [`Bootstrap::parse`] checks the superblock, the section table and every
//! CRC, then keeps one typed sub-slice per section; it does not walk the
//! tree, so opening costs one pass of CRC-32 over the bytes and nothing that
//! grows with the number of files. Every later access is O(1) or a binary
//! search, and bounds-checks the record fields it follows (a correct CRC
//! proves the bytes are what the writer wrote, not that the writer was sane).
//! [`Bootstrap::validate`] is the full structural check, for `skiff check`
//! and for anyone about to trust the whole tree ([`Bootstrap::to_tree`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::blocks::{block_count, BlockMarks, LazyBlocks};
use crate::layout::{
    section_name, section_record_size, BlobRecord, ChunkRecord, DirentRecord, FileChunkRecord,
    InodeRecord, PrefetchRangeRecord, SectionEntry, Superblock, XattrRecord,
    CHUNK_FLAG_SHARED_FRAME, CHUNK_FLAG_ZSTD, FEATURE_BLAKE3_CHUNKS, FEATURE_SHARED_FRAMES,
    KNOWN_FEATURES, MAGIC, PERM_MASK, SECTION_ALIGN, SECTION_BLOBS, SECTION_BLOCK_CRCS,
    SECTION_CHUNKS, SECTION_DIRENTS, SECTION_ENTRY_SIZE, SECTION_FILE_CHUNKS, SECTION_INODES,
    SECTION_KINDS, SECTION_PREFETCH, SECTION_PREFETCH_RANGES, SECTION_STRINGS, SECTION_XATTRS,
    SUPERBLOCK_SIZE, S_IFMT, VERSION_MAJOR,
};
use crate::tree::{
    check_attrs, check_chunk, check_chunk_map, check_name, check_symlink, check_xattr, Attrs,
    BlobInfo, ChunkInfo, FileChunk, FileKind, ImageTree, Node, NodeData, PrefetchRange,
    SharedFrame,
};
use crate::writer::header_crc;
use crate::{ChunkHash, Digest, FormatError};

type Result<T, E = FormatError> = std::result::Result<T, E>;

fn corrupt(msg: String) -> FormatError {
    FormatError::Corrupt(msg)
}

fn oob(what: String) -> FormatError {
    FormatError::OutOfBounds { what }
}

/// The index of an inode in INODES. The FUSE inode number is index + 1
/// (FUSE reserves 0, and 1 is the root).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeId(pub u32);

impl InodeId {
    /// The index as `usize`.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The FUSE inode number, index + 1.
    pub fn ino(self) -> u64 {
        u64::from(self.0) + 1
    }

    /// The inode with FUSE inode number `ino`, if `ino` is in 1..=2^32.
    pub fn from_ino(ino: u64) -> Option<InodeId> {
        ino.checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .map(InodeId)
    }
}

impl fmt::Display for InodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A view of one INODES record.
#[derive(Clone, Copy, Debug)]
pub struct Inode<'a> {
    id: InodeId,
    rec: &'a InodeRecord,
}

impl<'a> Inode<'a> {
    /// Which inode this is.
    pub fn id(&self) -> InodeId {
        self.id
    }

    /// The raw record.
    pub fn record(&self) -> &'a InodeRecord {
        self.rec
    }

    /// The file type, from the `S_IFMT` bits of `mode`.
    pub fn kind(&self) -> Result<FileKind> {
        FileKind::from_mode(self.mode()).ok_or_else(|| {
            corrupt(format!(
                "inode {}: mode {:#o} has no valid file type",
                self.id,
                self.mode()
            ))
        })
    }

    /// The full `st_mode`: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.rec.mode.get()
    }

    /// The permission bits (`0o7777`).
    pub fn perm(&self) -> u32 {
        self.mode() & PERM_MASK
    }

    /// Owner.
    pub fn uid(&self) -> u32 {
        self.rec.uid.get()
    }

    /// Group.
    pub fn gid(&self) -> u32 {
        self.rec.gid.get()
    }

    /// Link count.
    pub fn nlink(&self) -> u32 {
        self.rec.nlink.get()
    }

    /// Regular file size, symlink target length, or 0.
    pub fn size(&self) -> u64 {
        self.rec.size.get()
    }

    /// Modification time: (seconds since the epoch, nanoseconds).
    pub fn mtime(&self) -> (i64, u32) {
        (self.rec.mtime_sec.get(), self.rec.mtime_nsec.get())
    }

    /// Parent directory (the root is its own parent; for non-directories,
    /// the directory of the first name). Not bounds-checked here.
    pub fn parent(&self) -> InodeId {
        InodeId(self.rec.parent.get())
    }

    /// Device numbers (major, minor); (0, 0) for non-devices.
    pub fn rdev(&self) -> (u32, u32) {
        (self.rec.rdev_major.get(), self.rec.rdev_minor.get())
    }

    /// `data_start` as stored.
    pub fn data_start(&self) -> u32 {
        self.rec.data_start.get()
    }

    /// `data_count` as stored: entries, chunk map length or target length.
    pub fn data_count(&self) -> u32 {
        self.rec.data_count.get()
    }

    /// Number of extended attributes.
    pub fn xattr_count(&self) -> u32 {
        self.rec.xattr_count.get()
    }
}

/// One directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// The name, 1..=255 bytes.
    pub name: &'a [u8],
    /// The inode named (checked to be in range).
    pub inode: InodeId,
    /// The type recorded in the entry.
    pub kind: FileKind,
}

/// A parsed bootstrap borrowing its bytes. Cheap to copy: a handful of
/// slices.
#[derive(Clone, Copy)]
pub struct Bootstrap<'a> {
    buf: &'a [u8],
    superblock: &'a Superblock,
    table: &'a [SectionEntry],
    inodes: &'a [InodeRecord],
    dirents: &'a [DirentRecord],
    file_chunks: &'a [FileChunkRecord],
    chunks: &'a [ChunkRecord],
    xattrs: &'a [XattrRecord],
    strings: &'a [u8],
    blobs: &'a [BlobRecord],
    prefetch: &'a [U32],
    /// PREFETCH_RANGES (1.3); empty without the section.
    prefetch_ranges: &'a [PrefetchRangeRecord],
    /// Set when the bootstrap was opened lazily: blocks are checked on
    /// first read instead of at open.
    lazy: Option<LazyBlocks<'a>>,
}

// Readers are shared between FUSE worker threads and copied freely.
const _: fn() = || {
    fn assert_shareable<T: Send + Sync + Copy>() {}
    assert_shareable::<Bootstrap<'static>>();
    assert_shareable::<Inode<'static>>();
};

impl fmt::Debug for Bootstrap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bootstrap")
            .field("total_size", &self.buf.len())
            .field("inodes", &self.inodes.len())
            .field("dirents", &self.dirents.len())
            .field("file_chunks", &self.file_chunks.len())
            .field("chunks", &self.chunks.len())
            .field("xattrs", &self.xattrs.len())
            .field("strings", &self.strings.len())
            .field("blobs", &self.blobs.len())
            .field("prefetch", &self.prefetch.len())
            .field("prefetch_ranges", &self.prefetch_ranges.len())
            .finish()
    }
}

fn records<T>(bytes: &[u8], kind: u32) -> Result<&[T]>
where
    T: FromBytes + KnownLayout + Immutable + Unaligned,
{
    <[T]>::ref_from_bytes(bytes).map_err(|_| {
        corrupt(format!(
            "{} length {} is not a whole number of records",
            section_name(kind),
            bytes.len()
        ))
    })
}

fn to_usize(v: u64, what: impl FnOnce() -> String) -> Result<usize> {
    usize::try_from(v).map_err(|_| oob(what()))
}

/// A binary search whose probe may fail: the first index in `0..len` for
/// which `pred` is false, assuming it is true then false along the range.
/// On unsorted (hostile) data the answer is some index in range.
fn partition_point(len: usize, mut pred: impl FnMut(usize) -> Result<bool>) -> Result<usize> {
    let (mut lo, mut hi) = (0usize, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid)? {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

impl<'a> Bootstrap<'a> {
    /// Opens a bootstrap: checks magic, version, flags, `total_size`, the
    /// header CRC, the section table (each known kind once, aligned, in
    /// bounds, no overlap, zero padding, whole records), the record counts,
    /// every section CRC, every block CRC (1.2), and that the root is a
    /// directory.
    ///
    /// Works on any alignment of `buf`.
    pub fn parse(buf: &'a [u8]) -> Result<Self> {
        Self::open(buf, None)
    }

    /// Opens a bootstrap for reading in place, checking each 64 KiB block
    /// the first time a record in it is read (format 1.2, see
    /// [`crate::blocks`]) instead of every byte at open: the header, the
    /// section table, the BLOCK_CRCS section and the root inode's block are
    /// checked here, so opening reads a few KB whatever the image's size.
    /// `marks` come from [`BlockMarks::for_len`] of `buf`'s length and
    /// outlive the reader. A bootstrap without block CRCs (1.0, 1.1), or
    /// marks too small for it, is checked whole at open as by
    /// [`Bootstrap::parse`].
    ///
    /// Every accessor then returns only checked bytes (a damaged block is
    /// [`FormatError::BlockChecksumMismatch`] on every read of it); only
    /// [`Bootstrap::as_bytes`] and [`Bootstrap::section_bytes`] hand out
    /// raw bytes: call [`Bootstrap::check_all_blocks`] first.
    pub fn parse_lazy(buf: &'a [u8], marks: &'a BlockMarks) -> Result<Self> {
        Self::open(buf, Some(marks))
    }

    fn open(buf: &'a [u8], marks: Option<&'a BlockMarks>) -> Result<Self> {
        let len = buf.len() as u64;
        let (superblock, _) =
            Superblock::ref_from_prefix(buf).map_err(|_| FormatError::Truncated {
                what: "superblock",
                needed: SUPERBLOCK_SIZE as u64,
                available: len,
            })?;
        if superblock.magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let (major, minor) = (superblock.major.get(), superblock.minor.get());
        if major != VERSION_MAJOR {
            return Err(FormatError::UnsupportedVersion { major, minor });
        }
        if superblock.flags.get() & !KNOWN_FEATURES != 0 {
            return Err(FormatError::UnknownFlags(superblock.flags.get()));
        }
        let total_size = superblock.total_size.get();
        if total_size > len {
            return Err(FormatError::Truncated {
                what: "bootstrap",
                needed: total_size,
                available: len,
            });
        }
        if total_size != len {
            return Err(corrupt(format!(
                "total_size {total_size} but the buffer holds {len} bytes"
            )));
        }

        let section_count = u64::from(superblock.section_count.get());
        let table_end = SUPERBLOCK_SIZE as u64 + section_count * SECTION_ENTRY_SIZE as u64;
        let table_bytes = usize::try_from(table_end)
            .ok()
            .and_then(|end| buf.get(SUPERBLOCK_SIZE..end))
            .ok_or(FormatError::Truncated {
                what: "section table",
                needed: table_end,
                available: len,
            })?;
        let table: &[SectionEntry] = records(table_bytes, 0)?;
        let expected_crc = superblock.header_crc.get();
        let actual_crc = header_crc(superblock.as_bytes(), table_bytes);
        if expected_crc != actual_crc {
            return Err(FormatError::ChecksumMismatch {
                section: "header",
                expected: expected_crc,
                actual: actual_crc,
            });
        }

        let mut found: [Option<&'a [u8]>; SECTION_KINDS.len()] = [None; SECTION_KINDS.len()];
        let mut block_crcs: Option<(usize, &'a [u8])> = None;
        let mut prefetch_ranges: Option<&'a [u8]> = None;
        let has_blocks = table.iter().any(|e| e.kind.get() == SECTION_BLOCK_CRCS);
        // Lazily: only the BLOCK_CRCS section's own CRC now, the rest by block.
        let lazy = has_blocks && marks.is_some_and(|m| m.capacity() >= block_count(buf.len()));
        let mut spans = Vec::with_capacity(table.len());
        for (i, entry) in table.iter().enumerate() {
            let kind = entry.kind.get();
            let name = section_name(kind);
            let (offset, length) = (entry.offset.get(), entry.length.get());
            if offset % SECTION_ALIGN != 0 {
                return Err(corrupt(format!(
                    "section {i} ({name}): offset {offset} is not a multiple of {SECTION_ALIGN}"
                )));
            }
            let end = offset.checked_add(length).filter(|&e| e <= len).ok_or_else(|| {
                oob(format!("section {i} ({name}): offset {offset} + length {length} beyond total_size {len}"))
            })?;
            // Both fit in the buffer length, hence in usize.
            let bytes = buf.get(offset as usize..end as usize).unwrap_or_default();
            let crc = if lazy && kind != SECTION_BLOCK_CRCS {
                entry.crc.get()
            } else {
                crc32fast::hash(bytes)
            };
            if crc != entry.crc.get() {
                return Err(FormatError::ChecksumMismatch {
                    section: name,
                    expected: entry.crc.get(),
                    actual: crc,
                });
            }
            if let Some(size) = section_record_size(kind) {
                if entry.record_size.get() != size {
                    return Err(corrupt(format!(
                        "section {i} ({name}): record_size {} but {name} records are {size} bytes",
                        entry.record_size.get()
                    )));
                }
                if size != 0 && length % u64::from(size) != 0 {
                    return Err(corrupt(format!(
                        "section {i} ({name}): length {length} is not a multiple of record_size {size}"
                    )));
                }
                if kind == SECTION_BLOCK_CRCS {
                    if block_crcs.is_some() {
                        return Err(corrupt(format!("section {i}: a second {name} section")));
                    }
                    // Both fit in the buffer length, hence in usize.
                    block_crcs = Some((offset as usize, bytes));
                }
                if kind == SECTION_PREFETCH_RANGES {
                    if prefetch_ranges.is_some() {
                        return Err(corrupt(format!("section {i}: a second {name} section")));
                    }
                    prefetch_ranges = Some(bytes);
                }
                // Known kinds are 1..=8.
                if let Some(slot) = found.get_mut(kind as usize - 1) {
                    if slot.is_some() {
                        return Err(corrupt(format!("section {i}: a second {name} section")));
                    }
                    *slot = Some(bytes);
                }
            }
            spans.push((offset, end, i));
        }
        // Sections in file order: no overlap, nothing inside the header, and
        // the gaps zero, so that every byte of the file is covered by a CRC
        // or by this check and no flipped bit goes unnoticed.
        spans.sort_unstable();
        // Lazily, the gaps inside the covered range are checked with their
        // blocks (against the writer's CRC, not for zero).
        let gaps_from = match block_crcs {
            Some((offset, _)) if lazy => offset as u64,
            _ => 0,
        };
        let mut cursor = table_end;
        for &(offset, end, i) in spans.iter().chain(std::iter::once(&(len, len, usize::MAX))) {
            if offset < cursor {
                return Err(corrupt(format!(
                    "section {i} ({}): offset {offset} overlaps the header or the section before it (which ends at {cursor})",
                    table.get(i).map_or("unknown", |e| section_name(e.kind.get()))
                )));
            }
            let gap = if cursor < gaps_from {
                &[]
            } else {
                buf.get(cursor as usize..offset as usize)
                    .unwrap_or_default()
            };
            if let Some(pos) = gap.iter().position(|&b| b != 0) {
                return Err(corrupt(format!(
                    "nonzero padding byte at offset {}",
                    cursor + pos as u64
                )));
            }
            cursor = end;
        }

        let section = |kind: u32| -> Result<&'a [u8]> {
            found
                .get(kind as usize - 1)
                .copied()
                .flatten()
                .ok_or_else(|| corrupt(format!("no {} section", section_name(kind))))
        };
        let blocks = match block_crcs {
            Some((offset, bytes)) => Some(Self::blocks(
                buf,
                table_end,
                offset,
                bytes,
                marks.filter(|_| lazy),
            )?),
            None => None,
        };
        if let Some(blocks) = &blocks {
            if !lazy {
                blocks.check_all()?;
            }
        }
        let this = Bootstrap {
            lazy: blocks.filter(|_| lazy),
            buf,
            superblock,
            table,
            inodes: records(section(SECTION_INODES)?, SECTION_INODES)?,
            dirents: records(section(SECTION_DIRENTS)?, SECTION_DIRENTS)?,
            file_chunks: records(section(SECTION_FILE_CHUNKS)?, SECTION_FILE_CHUNKS)?,
            chunks: records(section(SECTION_CHUNKS)?, SECTION_CHUNKS)?,
            xattrs: records(section(SECTION_XATTRS)?, SECTION_XATTRS)?,
            strings: section(SECTION_STRINGS)?,
            blobs: records(section(SECTION_BLOBS)?, SECTION_BLOBS)?,
            prefetch: records(section(SECTION_PREFETCH)?, SECTION_PREFETCH)?,
            prefetch_ranges: records(prefetch_ranges.unwrap_or_default(), SECTION_PREFETCH_RANGES)?,
        };
        let counts = [
            (
                "inode_count",
                superblock.inode_count.get(),
                this.inodes.len(),
                "INODES",
            ),
            (
                "chunk_count",
                superblock.chunk_count.get(),
                this.chunks.len(),
                "CHUNKS",
            ),
            (
                "blob_count",
                superblock.blob_count.get(),
                this.blobs.len(),
                "BLOBS",
            ),
        ];
        for (field, stored, actual, name) in counts {
            if stored as usize != actual {
                return Err(corrupt(format!(
                    "superblock {field} {stored} but {name} holds {actual} records"
                )));
            }
        }
        if superblock.root_inode.get() != 0 {
            return Err(corrupt(format!(
                "root_inode {} (must be 0)",
                superblock.root_inode.get()
            )));
        }
        let root = this.inode(this.root())?;
        if root.kind()? != FileKind::Directory {
            return Err(corrupt(format!(
                "root inode is a {}, not a directory",
                root.kind()?.name()
            )));
        }
        Ok(this)
    }

    /// The lazy verifier of the BLOCK_CRCS section at `offset`: it must be
    /// the last section and hold one CRC per block of the bytes from
    /// `table_end` to it. Without marks (an eager open) or with marks too
    /// small, the verifier gets marks of its own.
    fn blocks(
        buf: &'a [u8],
        table_end: u64,
        offset: usize,
        bytes: &'a [u8],
        marks: Option<&'a BlockMarks>,
    ) -> Result<LazyBlocks<'a>> {
        let start = table_end as usize;
        let covered = offset.saturating_sub(start);
        let count = block_count(covered);
        if bytes.len() != count * 4 {
            return Err(corrupt(format!(
                "BLOCK_CRCS holds {} bytes but the {covered} bytes before it need {count} CRCs",
                bytes.len()
            )));
        }
        if buf.len().saturating_sub(offset + bytes.len()) >= SECTION_ALIGN as usize {
            return Err(corrupt(format!(
                "BLOCK_CRCS at offset {offset} is not the last section"
            )));
        }
        let crcs = records(bytes, SECTION_BLOCK_CRCS)?;
        // An eager open checks each block once, so it needs no marks.
        static NO_MARKS: std::sync::OnceLock<BlockMarks> = std::sync::OnceLock::new();
        let marks = marks.unwrap_or_else(|| NO_MARKS.get_or_init(|| BlockMarks::for_len(0)));
        Ok(LazyBlocks {
            buf,
            start,
            end: offset,
            crcs,
            marks,
        })
    }

    /// `s` (a sub-slice of the bootstrap) after its blocks are checked.
    fn checked<T>(&self, s: &'a [T]) -> Result<&'a [T]> {
        if let Some(lazy) = &self.lazy {
            let offset = (s.as_ptr() as usize).wrapping_sub(self.buf.as_ptr() as usize);
            lazy.check(offset, std::mem::size_of_val(s))?;
        }
        Ok(s)
    }

    /// Checks every block of a lazily opened bootstrap now (no-op
    /// otherwise: [`Bootstrap::parse`] checked them at open).
    pub fn check_all_blocks(&self) -> Result<()> {
        self.lazy.as_ref().map_or(Ok(()), LazyBlocks::check_all)
    }

    /// Whether blocks are checked on first read ([`Bootstrap::parse_lazy`]
    /// of a 1.2 bootstrap).
    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some()
    }

    /// The whole bootstrap, as stored (see [`Bootstrap::parse_lazy`]).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// The superblock.
    pub fn superblock(&self) -> &'a Superblock {
        self.superblock
    }

    /// The section table, in stored order.
    pub fn sections(&self) -> &'a [SectionEntry] {
        self.table
    }

    /// The root directory.
    pub fn root(&self) -> InodeId {
        InodeId(self.superblock.root_inode.get())
    }

    /// Number of inodes.
    pub fn inode_count(&self) -> u32 {
        // parse checked it equals the superblock's u32 count.
        self.inodes.len() as u32
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Number of blobs.
    pub fn blob_count(&self) -> u32 {
        self.blobs.len() as u32
    }

    /// The superblock's chunk size hint (informational).
    pub fn chunk_size_hint(&self) -> u64 {
        self.superblock.chunk_size_hint.get()
    }

    /// The function of the image's chunk digests: BLAKE3 when the superblock
    /// sets [`FEATURE_BLAKE3_CHUNKS`] (1.4), else SHA-256.
    pub fn chunk_hash(&self) -> ChunkHash {
        if self.superblock.flags.get() & FEATURE_BLAKE3_CHUNKS != 0 {
            ChunkHash::Blake3
        } else {
            ChunkHash::Sha256
        }
    }

    /// The inode `id`, O(1).
    pub fn inode(&self, id: InodeId) -> Result<Inode<'a>> {
        let rec = self
            .inodes
            .get(id.index())
            .ok_or_else(|| oob(format!("inode {id} >= inode count {}", self.inodes.len())))?;
        self.checked(std::slice::from_ref(rec))?;
        Ok(Inode { id, rec })
    }

    fn range<T>(
        &self,
        slice: &'a [T],
        start: u32,
        count: u32,
        section: &str,
        who: impl FnOnce() -> String,
    ) -> Result<&'a [T]> {
        let s = start as usize;
        let recs = s
            .checked_add(count as usize)
            .and_then(|e| slice.get(s..e))
            .ok_or_else(|| {
                oob(format!(
                    "{}: start {start} + count {count} beyond {section} ({} records)",
                    who(),
                    slice.len()
                ))
            })?;
        self.checked(recs)
    }

    fn string(&self, offset: u32, len: u32, who: impl FnOnce() -> String) -> Result<&'a [u8]> {
        let s = offset as usize;
        let bytes = s
            .checked_add(len as usize)
            .and_then(|e| self.strings.get(s..e))
            .ok_or_else(|| {
                oob(format!(
                    "{}: offset {offset} + len {len} beyond STRINGS ({} bytes)",
                    who(),
                    self.strings.len()
                ))
            })?;
        self.checked(bytes)
    }

    fn inode_of_kind(&self, id: InodeId, kind: FileKind) -> Result<Inode<'a>> {
        let inode = self.inode(id)?;
        if inode.kind()? != kind {
            return Err(match kind {
                FileKind::Directory => FormatError::NotADirectory(id.0),
                FileKind::Regular => FormatError::NotARegularFile(id.0),
                _ => FormatError::NotASymlink(id.0),
            });
        }
        Ok(inode)
    }

    /// The DIRENTS records of `dir` and the global index of the first.
    fn dir_records(&self, dir: InodeId) -> Result<(&'a [DirentRecord], u32)> {
        let inode = self.inode_of_kind(dir, FileKind::Directory)?;
        let start = inode.data_start();
        let recs = self.range(self.dirents, start, inode.data_count(), "DIRENTS", || {
            format!("inode {dir} entries")
        })?;
        Ok((recs, start))
    }

    fn entry_from(&self, dir: InodeId, global: u64, rec: &DirentRecord) -> Result<DirEntry<'a>> {
        let who = || format!("dirent {global} of inode {dir}");
        let name = self.string(rec.name_offset.get(), u32::from(rec.name_len.get()), who)?;
        let kind = FileKind::from_dirent_type(rec.file_type).ok_or_else(|| {
            corrupt(format!(
                "{}: file_type {} not in 1..=7",
                who(),
                rec.file_type
            ))
        })?;
        let inode = InodeId(rec.inode.get());
        if inode.index() >= self.inodes.len() {
            return Err(oob(format!(
                "{}: inode {inode} >= inode count {}",
                who(),
                self.inodes.len()
            )));
        }
        Ok(DirEntry { name, inode, kind })
    }

    fn entry_at(
        &self,
        dir: InodeId,
        recs: &'a [DirentRecord],
        start: u32,
        index: usize,
    ) -> Result<DirEntry<'a>> {
        let global = u64::from(start) + index as u64;
        let rec = recs.get(index).ok_or_else(|| {
            oob(format!(
                "entry {index} of inode {dir}: directory has {} entries",
                recs.len()
            ))
        })?;
        self.entry_from(dir, global, rec)
    }

    /// The entry of `dir` named `name` (binary search), with its type.
    pub fn lookup_entry(&self, dir: InodeId, name: &[u8]) -> Result<Option<DirEntry<'a>>> {
        let (recs, start) = self.dir_records(dir)?;
        let i = partition_point(recs.len(), |i| {
            Ok(self.entry_at(dir, recs, start, i)?.name < name)
        })?;
        if i < recs.len() {
            let entry = self.entry_at(dir, recs, start, i)?;
            if entry.name == name {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// The inode that `dir` names `name`, by binary search. Errors with
    /// [`FormatError::NotADirectory`] if `dir` is not a directory.
    pub fn lookup(&self, dir: InodeId, name: &[u8]) -> Result<Option<InodeId>> {
        Ok(self.lookup_entry(dir, name)?.map(|e| e.inode))
    }

    /// Number of entries in `dir` (without `.` and `..`).
    pub fn dir_len(&self, dir: InodeId) -> Result<u32> {
        let (recs, _) = self.dir_records(dir)?;
        Ok(recs.len() as u32)
    }

    /// Entry `index` of `dir`, in name order.
    pub fn dir_entry(&self, dir: InodeId, index: u32) -> Result<DirEntry<'a>> {
        let (recs, start) = self.dir_records(dir)?;
        self.entry_at(dir, recs, start, index as usize)
    }

    /// All entries of `dir`, in name order.
    pub fn dir_entries(
        &self,
        dir: InodeId,
    ) -> Result<impl Iterator<Item = Result<DirEntry<'a>>> + 'a> {
        let (recs, start) = self.dir_records(dir)?;
        let this = *self;
        Ok(recs
            .iter()
            .enumerate()
            .map(move |(i, rec)| this.entry_from(dir, u64::from(start) + i as u64, rec)))
    }

    /// The target of symlink `id`.
    pub fn symlink_target(&self, id: InodeId) -> Result<&'a [u8]> {
        let inode = self.inode_of_kind(id, FileKind::Symlink)?;
        self.string(inode.data_start(), inode.data_count(), || {
            format!("inode {id} symlink target")
        })
    }

    fn xattr_records(&self, id: InodeId) -> Result<(&'a [XattrRecord], u32)> {
        let inode = self.inode(id)?;
        let start = inode.rec.xattr_start.get();
        let recs = self.range(self.xattrs, start, inode.xattr_count(), "XATTRS", || {
            format!("inode {id} xattrs")
        })?;
        Ok((recs, start))
    }

    fn xattr_from(
        &self,
        id: InodeId,
        global: u64,
        rec: &XattrRecord,
    ) -> Result<(&'a [u8], &'a [u8])> {
        let who = || format!("xattr {global} of inode {id}");
        let name = self.string(rec.name_offset.get(), u32::from(rec.name_len.get()), || {
            format!("{} name", who())
        })?;
        let value = self.string(rec.value_offset.get(), rec.value_len.get(), || {
            format!("{} value", who())
        })?;
        Ok((name, value))
    }

    /// The extended attributes of `id`, as (name, value), in name order.
    pub fn xattrs(
        &self,
        id: InodeId,
    ) -> Result<impl Iterator<Item = Result<(&'a [u8], &'a [u8])>> + 'a> {
        let (recs, start) = self.xattr_records(id)?;
        let this = *self;
        Ok(recs
            .iter()
            .enumerate()
            .map(move |(i, rec)| this.xattr_from(id, u64::from(start) + i as u64, rec)))
    }

    /// The value of xattr `name` of `id`, by binary search.
    pub fn getxattr(&self, id: InodeId, name: &[u8]) -> Result<Option<&'a [u8]>> {
        let (recs, start) = self.xattr_records(id)?;
        let at = |i: usize| -> Result<(&'a [u8], &'a [u8])> {
            let rec = recs
                .get(i)
                .ok_or_else(|| oob(format!("xattr {i} of inode {id}")))?;
            self.xattr_from(id, u64::from(start) + i as u64, rec)
        };
        let i = partition_point(recs.len(), |i| Ok(at(i)?.0 < name))?;
        if i < recs.len() {
            let (n, v) = at(i)?;
            if n == name {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The chunk map of regular file `id`, sorted by file offset.
    pub fn file_chunks(&self, id: InodeId) -> Result<&'a [FileChunkRecord]> {
        let inode = self.inode_of_kind(id, FileKind::Regular)?;
        self.range(
            self.file_chunks,
            inode.data_start(),
            inode.data_count(),
            "FILE_CHUNKS",
            || format!("inode {id} chunk map"),
        )
    }

    /// The chunk map records of `id` that overlap bytes `[offset, offset + len)`
    /// of the file, by binary search. Holes between them read as zeros.
    pub fn chunks_in_range(
        &self,
        id: InodeId,
        offset: u64,
        len: u64,
    ) -> Result<&'a [FileChunkRecord]> {
        let recs = self.file_chunks(id)?;
        if len == 0 {
            return Ok(&[]);
        }
        let end = offset.saturating_add(len);
        let chunk_end = |i: usize| -> Result<u64> {
            let rec = recs
                .get(i)
                .ok_or_else(|| oob(format!("chunk map entry {i} of inode {id}")))?;
            let index = rec.chunk_index();
            let chunk = self.chunk_record(index).map_err(|e| match e {
                FormatError::OutOfBounds { what } => {
                    oob(format!("inode {id} chunk map entry {i}: {what}"))
                }
                e => e,
            })?;
            Ok(rec
                .file_offset()
                .saturating_add(u64::from(chunk.uncompressed_size.get())))
        };
        let lo = partition_point(recs.len(), |i| Ok(chunk_end(i)? <= offset))?;
        let hi = partition_point(recs.len(), |i| {
            Ok(recs.get(i).is_some_and(|r| r.file_offset() < end))
        })?;
        Ok(recs.get(lo..hi).unwrap_or_default())
    }

    /// The CHUNKS record `index`, its block checked.
    fn chunk_record(&self, index: u32) -> Result<&'a ChunkRecord> {
        let rec = self.chunks.get(index as usize).ok_or_else(|| {
            oob(format!(
                "chunk {index} >= chunk count {}",
                self.chunks.len()
            ))
        })?;
        self.checked(std::slice::from_ref(rec))?;
        Ok(rec)
    }

    /// Chunk `index`, with its fields checked (flags, sizes, blob index).
    pub fn chunk(&self, index: u32) -> Result<ChunkInfo> {
        let rec = self.chunk_record(index)?;
        let flags = rec.flags.get();
        let known = if self.superblock.flags.get() & FEATURE_SHARED_FRAMES != 0 {
            CHUNK_FLAG_ZSTD | CHUNK_FLAG_SHARED_FRAME
        } else {
            CHUNK_FLAG_ZSTD
        };
        if flags & !known != 0 {
            return Err(corrupt(format!(
                "chunk {index}: flags {flags:#x} has unknown bits"
            )));
        }
        let frame = if flags & CHUNK_FLAG_SHARED_FRAME != 0 {
            Some(SharedFrame {
                offset: rec.frame_offset.get(),
                size: rec.frame_size.get(),
            })
        } else {
            if rec.frame_offset.get() != 0 || rec.frame_size.get() != 0 {
                return Err(corrupt(format!(
                    "chunk {index}: frame fields set without the shared-frame flag"
                )));
            }
            None
        };
        let info = ChunkInfo {
            frame,
            digest: Digest(rec.digest),
            hash: self.chunk_hash(),
            blob_index: rec.blob_index.get(),
            compressed: flags & CHUNK_FLAG_ZSTD != 0,
            compressed_offset: rec.compressed_offset.get(),
            compressed_size: rec.compressed_size.get(),
            uncompressed_size: rec.uncompressed_size.get(),
        };
        check_chunk(&info, self.blobs.len()).map_err(|e| corrupt(format!("chunk {index}: {e}")))?;
        Ok(info)
    }

    /// Blob `index`.
    pub fn blob(&self, index: u32) -> Result<BlobInfo> {
        let rec = self
            .blobs
            .get(index as usize)
            .ok_or_else(|| oob(format!("blob {index} >= blob count {}", self.blobs.len())))?;
        self.checked(std::slice::from_ref(rec))?;
        Ok(BlobInfo {
            digest: Digest(rec.digest),
            size: rec.size.get(),
            uncompressed_size: rec.uncompressed_size.get(),
            chunk_count: rec.chunk_count.get(),
        })
    }

    /// The prefetch list, each entry checked to be an inode.
    pub fn prefetch(&self) -> Result<Vec<InodeId>> {
        self.checked(self.prefetch)?
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = InodeId(p.get());
                if id.index() >= self.inodes.len() {
                    return Err(oob(format!(
                        "prefetch entry {i}: inode {id} >= inode count {}",
                        self.inodes.len()
                    )));
                }
                Ok(id)
            })
            .collect()
    }

    /// The prefetch ranges (1.3, PREFETCH_RANGES) in order: a regular file
    /// and the entries of its chunk map to fetch, each checked to lie within
    /// that map. Empty when the bootstrap has no such section.
    pub fn prefetch_ranges(&self) -> Result<Vec<(InodeId, std::ops::Range<u32>)>> {
        self.checked(self.prefetch_ranges)?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let id = InodeId(r.inode.get());
                if id.index() >= self.inodes.len() {
                    return Err(oob(format!(
                        "prefetch range {i}: inode {id} >= inode count {}",
                        self.inodes.len()
                    )));
                }
                let map_len = self.file_chunks(id)?.len() as u64;
                let (first, count) = (r.first.get(), r.count.get());
                let end = u64::from(first) + u64::from(count);
                if count == 0 || end > map_len {
                    return Err(corrupt(format!(
                        "prefetch range {i}: entries {first}..{end} of inode {id}'s chunk map of {map_len}"
                    )));
                }
                // end <= map_len, which came from a u32 count.
                Ok((id, first..end as u32))
            })
            .collect()
    }

    /// The inode at `path` (`/usr/bin/ls` or `usr/bin/ls`; empty components
    /// and `.` are skipped, `..` goes to the parent). Symlinks are not
    /// followed: a path through a symlink or a non-directory gives `None`.
    pub fn resolve_path(&self, path: &[u8]) -> Result<Option<InodeId>> {
        let mut cur = self.root();
        for comp in path.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => continue,
                b".." => {
                    cur = self.inode(cur)?.parent();
                    continue;
                }
                _ => {}
            }
            if self.inode(cur)?.kind()? != FileKind::Directory {
                return Ok(None);
            }
            match self.lookup(cur, comp)? {
                Some(next) => cur = next,
                None => return Ok(None),
            }
        }
        // `..` may have led to an unchecked parent index.
        self.inode(cur)?;
        Ok(Some(cur))
    }

    /// The checks of [`Bootstrap::validate`] that concern inode `id` alone
    /// and the records it owns, in O(number of those records): its mode and
    /// times; its parent is a directory; its xattrs are in range, valid and
    /// sorted; a directory's entries are in range, validly named, strictly
    /// sorted and typed as the inodes they name; a regular file's chunk map
    /// is sorted, non-overlapping, within the file and names valid chunks; a
    /// symlink's target is in range and as long as its size.
    ///
    /// What it cannot see is how inodes relate to each other (cycles,
    /// records shared by two inodes, link counts, the order of records):
    /// that takes the walk of `validate`. A reader that serves a bootstrap
    /// without validating it all (the FUSE daemon) runs this once per inode
    /// before using it, so that a lying record is an error, not a wrong
    /// answer.
    pub fn check_inode(&self, id: InodeId) -> Result<()> {
        if self.check_own_records(id)? == FileKind::Directory {
            self.check_entries(id)?;
        }
        Ok(())
    }

    /// [`check_inode`](Self::check_inode) but for a directory's entries
    /// (which `validate` checks in its walk); returns the inode's kind.
    fn check_own_records(&self, id: InodeId) -> Result<FileKind> {
        let inode = self.inode(id)?;
        let kind = inode.kind()?;
        let bad = |m: String| corrupt(format!("inode {id}: {m}"));
        if inode.mode() & !(S_IFMT | PERM_MASK) != 0 {
            return Err(bad(format!("mode {:#o} has unknown bits", inode.mode())));
        }
        check_attrs(inode.perm(), inode.mtime().1).map_err(bad)?;
        let parent = inode.parent();
        if self.inode(parent)?.kind()? != FileKind::Directory {
            return Err(bad(format!("parent {parent} is not a directory")));
        }

        let (xrecs, xstart) = self.xattr_records(id)?;
        let mut prev: Option<&[u8]> = None;
        for (k, rec) in xrecs.iter().enumerate() {
            let (name, value) = self.xattr_from(id, u64::from(xstart) + k as u64, rec)?;
            check_xattr(name, value.len()).map_err(bad)?;
            if prev.is_some_and(|p| p >= name) {
                return Err(bad(format!(
                    "xattr {:?} out of order or repeated",
                    name.escape_ascii().to_string()
                )));
            }
            prev = Some(name);
        }

        let (size, rdev) = (inode.size(), inode.rdev());
        let data = (inode.data_start(), inode.data_count());
        match kind {
            FileKind::Directory | FileKind::Fifo | FileKind::Socket => {
                if size != 0 || rdev != (0, 0) {
                    return Err(bad(format!(
                        "a {} with size {size} and rdev {rdev:?}",
                        kind.name()
                    )));
                }
                if kind != FileKind::Directory && data != (0, 0) {
                    return Err(bad(format!("a {} with data {data:?}", kind.name())));
                }
            }
            FileKind::Regular => {
                let recs = self.file_chunks(id)?;
                let map = recs.iter().map(|r| FileChunk {
                    file_offset: r.file_offset(),
                    chunk_index: r.chunk_index(),
                });
                check_chunk_map(size, map, |ci| {
                    self.chunk(ci)
                        .map(|c| c.uncompressed_size)
                        .map_err(|e| e.to_string())
                })
                .map_err(bad)?;
                if rdev != (0, 0) {
                    return Err(bad(format!("a regular file with rdev {rdev:?}")));
                }
            }
            FileKind::Symlink => {
                let target = self.symlink_target(id)?;
                check_symlink(target).map_err(bad)?;
                if size != target.len() as u64 || rdev != (0, 0) {
                    return Err(bad(format!("a symlink with size {size} and rdev {rdev:?}")));
                }
            }
            FileKind::CharDevice | FileKind::BlockDevice => {
                if size != 0 || data != (0, 0) {
                    return Err(bad(format!("a device with size {size} and data {data:?}")));
                }
            }
        }
        Ok(kind)
    }

    /// The entries of directory `dir`: in range, validly named, strictly
    /// sorted, each typed as the inode it names.
    fn check_entries(&self, dir: InodeId) -> Result<()> {
        let (recs, start) = self.dir_records(dir)?;
        let mut prev: Option<&[u8]> = None;
        for (i, rec) in recs.iter().enumerate() {
            let (entry, _) = self.checked_entry(dir, u64::from(start) + i as u64, rec, prev)?;
            prev = Some(entry.name);
        }
        Ok(())
    }

    /// Entry `global` of directory `dir` (record `rec`), checked: a valid
    /// name that sorts strictly after `prev` (the entry before it), typed
    /// as the inode it names. Returns the entry and that inode's kind.
    fn checked_entry(
        &self,
        dir: InodeId,
        global: u64,
        rec: &DirentRecord,
        prev: Option<&[u8]>,
    ) -> Result<(DirEntry<'a>, FileKind)> {
        let entry = self.entry_from(dir, global, rec)?;
        let who = || format!("dirent {global} of inode {dir}");
        check_name(entry.name).map_err(|e| corrupt(format!("{}: {e}", who())))?;
        if let Some(p) = prev {
            if p >= entry.name {
                return Err(corrupt(format!(
                    "{}: name {:?} does not sort after {:?}",
                    who(),
                    entry.name.escape_ascii().to_string(),
                    p.escape_ascii().to_string()
                )));
            }
        }
        let child_kind = self.inode(entry.inode)?.kind()?;
        if child_kind != entry.kind {
            return Err(corrupt(format!(
                "{}: file_type {} ({}) but inode {} is a {}",
                who(),
                rec.file_type,
                entry.kind.name(),
                entry.inode,
                child_kind.name()
            )));
        }
        Ok((entry, child_kind))
    }

    /// The full structural check: every record reachable and consistent with
    /// `docs/format.md`. Inodes are numbered breadth-first and every
    /// directory is reached once (so cycles are found, and the walk visits
    /// each directory once: linear time on any input); entries are valid,
    /// strictly sorted names whose type matches their inode; records of
    /// DIRENTS, FILE_CHUNKS and XATTRS are each owned by exactly one inode,
    /// in inode order; `parent` and `nlink` are what the tree implies; chunk
    /// maps are sorted, non-overlapping and within the file; chunks, blobs
    /// and prefetch entries are in range.
    pub fn validate(&self) -> Result<()> {
        let n = self.inodes.len();
        for i in 0..self.chunk_count() {
            self.chunk(i)?;
        }
        self.prefetch()?;
        self.prefetch_ranges()?;

        let mut seen = vec![false; n];
        let mut refs = vec![0u32; n];
        let mut subdirs = vec![0u32; n];
        let mut parent = vec![0u32; n];
        let root = self.root();
        if let Some(s) = seen.get_mut(root.index()) {
            *s = true;
        }
        let mut next: u64 = 1;
        let mut dirent_cursor: u64 = 0;
        let mut queue = VecDeque::from([root]);
        while let Some(dir) = queue.pop_front() {
            let (recs, start) = self.dir_records(dir)?;
            if u64::from(start) != dirent_cursor {
                return Err(corrupt(format!(
                    "inode {dir}: entries start at DIRENTS {start}, expected {dirent_cursor} (entries are stored in inode order)"
                )));
            }
            dirent_cursor += recs.len() as u64;
            let mut prev: Option<&[u8]> = None;
            for (i, rec) in recs.iter().enumerate() {
                let global = u64::from(start) + i as u64;
                let (entry, child_kind) = self.checked_entry(dir, global, rec, prev)?;
                prev = Some(entry.name);
                let child = entry.inode;
                let who = || format!("dirent {global} of inode {dir}");
                let (Some(seen_c), Some(refs_c), Some(parent_c)) = (
                    seen.get_mut(child.index()),
                    refs.get_mut(child.index()),
                    parent.get_mut(child.index()),
                ) else {
                    return Err(oob(format!("{}: inode {child}", who())));
                };
                *refs_c = refs_c.saturating_add(1);
                if *seen_c {
                    if child_kind == FileKind::Directory {
                        return Err(corrupt(format!(
                            "{}: directory inode {child} is reached a second time (a cycle or a directory hard link)",
                            who()
                        )));
                    }
                    continue;
                }
                if u64::from(child.0) != next {
                    return Err(corrupt(format!(
                        "{}: inode {child} is first reached here, so it should be numbered {next} (breadth-first order)",
                        who()
                    )));
                }
                *seen_c = true;
                *parent_c = dir.0;
                next += 1;
                if child_kind == FileKind::Directory {
                    if let Some(s) = subdirs.get_mut(dir.index()) {
                        *s = s.saturating_add(1);
                    }
                    queue.push_back(child);
                }
            }
        }
        if next != n as u64 {
            return Err(corrupt(format!(
                "inodes {next}..{n} are not reachable from the root"
            )));
        }
        if dirent_cursor != self.dirents.len() as u64 {
            return Err(corrupt(format!(
                "DIRENTS holds {} records but directories own {dirent_cursor}",
                self.dirents.len()
            )));
        }

        let mut chunk_cursor: u64 = 0;
        let mut xattr_cursor: u64 = 0;
        for (i, ((&refs, &subdirs), &parent)) in refs.iter().zip(&subdirs).zip(&parent).enumerate()
        {
            let id = InodeId(i as u32);
            // The walk above checked every directory's entries.
            let kind = self.check_own_records(id)?;
            let inode = self.inode(id)?;
            let bad = |m: String| corrupt(format!("inode {id}: {m}"));
            if inode.parent().0 != parent {
                return Err(bad(format!(
                    "parent {} but it is first reached from inode {parent}",
                    inode.parent()
                )));
            }
            let nlink = if kind == FileKind::Directory {
                subdirs.saturating_add(2)
            } else {
                refs
            };
            if inode.nlink() != nlink {
                return Err(bad(format!(
                    "nlink {} but the tree gives {nlink}",
                    inode.nlink()
                )));
            }
            let xstart = inode.rec.xattr_start.get();
            if u64::from(xstart) != xattr_cursor {
                return Err(bad(format!("xattr_start {xstart}, expected {xattr_cursor} (xattrs are stored in inode order)")));
            }
            xattr_cursor += u64::from(inode.xattr_count());
            if kind == FileKind::Regular {
                let start = inode.data_start();
                if u64::from(start) != chunk_cursor {
                    return Err(bad(format!(
                        "chunk map starts at FILE_CHUNKS {start}, expected {chunk_cursor} (maps are stored in inode order)"
                    )));
                }
                chunk_cursor += u64::from(inode.data_count());
            }
        }
        if chunk_cursor != self.file_chunks.len() as u64 {
            return Err(corrupt(format!(
                "FILE_CHUNKS holds {} records but files own {chunk_cursor}",
                self.file_chunks.len()
            )));
        }
        if xattr_cursor != self.xattrs.len() as u64 {
            return Err(corrupt(format!(
                "XATTRS holds {} records but inodes own {xattr_cursor}",
                self.xattrs.len()
            )));
        }
        Ok(())
    }

    /// Decodes the whole bootstrap into the model, node i = inode i, after
    /// [`Bootstrap::validate`]. The result is canonical:
    /// `to_tree(write_bootstrap(t)) == canonicalize(t)`.
    pub fn to_tree(&self) -> Result<ImageTree> {
        self.validate()?;
        let mut nodes = Vec::with_capacity(self.inodes.len());
        for i in 0..self.inode_count() {
            let id = InodeId(i);
            let inode = self.inode(id)?;
            let data = match inode.kind()? {
                FileKind::Directory => NodeData::Directory {
                    entries: self
                        .dir_entries(id)?
                        .map(|e| e.map(|e| (e.name.to_vec(), e.inode.index())))
                        .collect::<Result<BTreeMap<_, _>>>()?,
                },
                FileKind::Regular => NodeData::Regular {
                    size: inode.size(),
                    chunks: self
                        .file_chunks(id)?
                        .iter()
                        .map(|r| FileChunk {
                            file_offset: r.file_offset(),
                            chunk_index: r.chunk_index(),
                        })
                        .collect(),
                },
                FileKind::Symlink => NodeData::Symlink {
                    target: self.symlink_target(id)?.to_vec(),
                },
                FileKind::CharDevice => NodeData::CharDevice {
                    major: inode.rdev().0,
                    minor: inode.rdev().1,
                },
                FileKind::BlockDevice => NodeData::BlockDevice {
                    major: inode.rdev().0,
                    minor: inode.rdev().1,
                },
                FileKind::Fifo => NodeData::Fifo,
                FileKind::Socket => NodeData::Socket,
            };
            let (mtime_sec, mtime_nsec) = inode.mtime();
            nodes.push(Node {
                attrs: Attrs {
                    mode: inode.perm(),
                    uid: inode.uid(),
                    gid: inode.gid(),
                    mtime_sec,
                    mtime_nsec,
                },
                data,
                xattrs: self
                    .xattrs(id)?
                    .map(|x| x.map(|(k, v)| (k.to_vec(), v.to_vec())))
                    .collect::<Result<BTreeMap<_, _>>>()?,
            });
        }
        Ok(ImageTree {
            nodes,
            chunks: (0..self.chunk_count())
                .map(|i| self.chunk(i))
                .collect::<Result<_>>()?,
            blobs: (0..self.blob_count())
                .map(|i| self.blob(i))
                .collect::<Result<_>>()?,
            prefetch: self.prefetch()?.into_iter().map(InodeId::index).collect(),
            prefetch_ranges: self
                .prefetch_ranges()?
                .into_iter()
                .map(|(id, r)| PrefetchRange {
                    node: id.index(),
                    first: r.start,
                    count: r.end - r.start,
                })
                .collect(),
            chunk_size_hint: self.chunk_size_hint(),
            chunk_hash: self.chunk_hash(),
        })
    }

    /// The bytes of the first section of `kind`, if present, as stored (see
    /// [`Bootstrap::parse_lazy`]).
    pub fn section_bytes(&self, kind: u32) -> Option<&'a [u8]> {
        let entry = self.table.iter().find(|e| e.kind.get() == kind)?;
        let offset = to_usize(entry.offset.get(), String::new).ok()?;
        let length = to_usize(entry.length.get(), String::new).ok()?;
        self.buf.get(offset..offset.checked_add(length)?)
    }
}
