//! The byte layout of a bootstrap, mirroring `docs/format.md`.
//!
//! Every record is a `#[repr(C)]` struct of little-endian zerocopy integers,
//! so it has alignment 1 ([`Unaligned`]) and can be viewed in place in any
//! buffer, mmapped or not. Sizes are pinned by compile-time asserts; field
//! offsets are given in each field's doc comment and checked by a unit test
//! with `offset_of!`. Reserved fields are spelled out so that a record's
//! bytes are fully determined (and writers write zeros there).

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first 8 bytes of every bootstrap: `\x89SKF\r\n\x1a\n`. Like PNG's,
/// the high byte and the CR LF / SUB bytes detect 7-bit and newline mangling.
pub const MAGIC: [u8; 8] = *b"\x89SKF\r\n\x1a\n";
/// Major version written and accepted. A reader refuses any other major.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version written. Readers accept any minor of their major; a
/// feature an older reader must not ignore sets a [`Superblock`] flag.
pub const VERSION_MINOR: u16 = 4;
/// Superblock flag (1.1): some chunks are slices of shared zstd frames
/// ([`CHUNK_FLAG_SHARED_FRAME`]). A 1.0 reader refuses the bootstrap at open.
pub const FEATURE_SHARED_FRAMES: u32 = 1;
/// Superblock flag (1.4): every CHUNKS `digest` is a BLAKE3 (32-byte output)
/// of the chunk's data instead of a SHA-256 ([`crate::ChunkHash`]). A reader
/// before 1.4 refuses the bootstrap at open: it could verify no chunk.
pub const FEATURE_BLAKE3_CHUNKS: u32 = 2;
/// The superblock flags this reader knows.
pub const KNOWN_FEATURES: u32 = FEATURE_SHARED_FRAMES | FEATURE_BLAKE3_CHUNKS;
/// Size of the [`Superblock`].
pub const SUPERBLOCK_SIZE: usize = 64;
/// Size of one [`SectionEntry`].
pub const SECTION_ENTRY_SIZE: usize = 32;
/// Every section starts at a multiple of this.
pub const SECTION_ALIGN: u64 = 8;
/// Offset of `header_crc` in the superblock.
pub const HEADER_CRC_OFFSET: usize = 52;

/// Section kind: [`InodeRecord`]s.
pub const SECTION_INODES: u32 = 1;
/// Section kind: [`DirentRecord`]s.
pub const SECTION_DIRENTS: u32 = 2;
/// Section kind: [`FileChunkRecord`]s.
pub const SECTION_FILE_CHUNKS: u32 = 3;
/// Section kind: [`ChunkRecord`]s.
pub const SECTION_CHUNKS: u32 = 4;
/// Section kind: [`XattrRecord`]s.
pub const SECTION_XATTRS: u32 = 5;
/// Section kind: raw string bytes.
pub const SECTION_STRINGS: u32 = 6;
/// Section kind: [`BlobRecord`]s.
pub const SECTION_BLOBS: u32 = 7;
/// Section kind: little-endian `u32` inode indices.
pub const SECTION_PREFETCH: u32 = 8;
/// Section kind (1.2): little-endian `u32` CRC-32s of the bootstrap in
/// 64 KiB blocks, for verification on first read (see [`crate::blocks`]).
/// Optional; when present, the last section.
pub const SECTION_BLOCK_CRCS: u32 = 9;
/// Section kind (1.3): [`PrefetchRangeRecord`]s, the parts of files to
/// fetch first after mount, in order. Optional; when present, a reader that
/// knows it fetches these instead of the whole files PREFETCH names.
pub const SECTION_PREFETCH_RANGES: u32 = 10;
/// The kinds a 1.x bootstrap must contain, each exactly once, in the order
/// the writer lays them out.
pub const SECTION_KINDS: [u32; 8] = [
    SECTION_INODES,
    SECTION_DIRENTS,
    SECTION_FILE_CHUNKS,
    SECTION_CHUNKS,
    SECTION_XATTRS,
    SECTION_STRINGS,
    SECTION_BLOBS,
    SECTION_PREFETCH,
];

/// The name of a section kind as the spec writes it, or `"unknown"`.
pub fn section_name(kind: u32) -> &'static str {
    match kind {
        SECTION_INODES => "INODES",
        SECTION_DIRENTS => "DIRENTS",
        SECTION_FILE_CHUNKS => "FILE_CHUNKS",
        SECTION_CHUNKS => "CHUNKS",
        SECTION_XATTRS => "XATTRS",
        SECTION_STRINGS => "STRINGS",
        SECTION_BLOBS => "BLOBS",
        SECTION_PREFETCH => "PREFETCH",
        SECTION_BLOCK_CRCS => "BLOCK_CRCS",
        SECTION_PREFETCH_RANGES => "PREFETCH_RANGES",
        _ => "unknown",
    }
}

/// The record size of a known section kind (0 for the byte section STRINGS),
/// or `None` for kinds this version does not know.
pub fn section_record_size(kind: u32) -> Option<u32> {
    let size = match kind {
        SECTION_INODES => size_of::<InodeRecord>(),
        SECTION_DIRENTS => size_of::<DirentRecord>(),
        SECTION_FILE_CHUNKS => size_of::<FileChunkRecord>(),
        SECTION_CHUNKS => size_of::<ChunkRecord>(),
        SECTION_XATTRS => size_of::<XattrRecord>(),
        SECTION_STRINGS => 0,
        SECTION_BLOBS => size_of::<BlobRecord>(),
        SECTION_PREFETCH | SECTION_BLOCK_CRCS => size_of::<U32>(),
        SECTION_PREFETCH_RANGES => size_of::<PrefetchRangeRecord>(),
        _ => return None,
    };
    // All sizes above are small constants.
    Some(size as u32)
}

/// CHUNKS `flags` bit 0: the chunk is stored as one zstd frame.
pub const CHUNK_FLAG_ZSTD: u32 = 1;
/// CHUNKS `flags` bit 1 (1.1, with [`FEATURE_SHARED_FRAMES`]): the zstd
/// frame at `compressed_offset` holds several chunks (small files packed
/// together); this chunk is `frame_offset..frame_offset+uncompressed_size`
/// of its decoded `frame_size` bytes. Always set together with bit 0.
pub const CHUNK_FLAG_SHARED_FRAME: u32 = 2;
/// Largest uncompressed chunk: 16 MiB.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Largest stored chunk: 16 MiB + 64 KiB, room for zstd's worst-case framing.
pub const MAX_STORED_CHUNK_SIZE: u32 = (16 << 20) + (64 << 10);
/// Longest file name and longest xattr name.
pub const MAX_NAME_LEN: usize = 255;
/// Longest xattr value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: usize = 65536;
/// Longest symlink target (Linux `PATH_MAX` less the terminating NUL).
pub const MAX_SYMLINK_LEN: usize = 4095;

/// `S_IFMT`: the file-type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170000;
/// The permission bits of `st_mode`, including setuid, setgid and sticky.
pub const PERM_MASK: u32 = 0o7777;

/// The superblock, at offset 0 (64 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct Superblock {
    /// @0: [`MAGIC`].
    pub magic: [u8; 8],
    /// @8: major version, [`VERSION_MAJOR`].
    pub major: U16,
    /// @10: minor version.
    pub minor: U16,
    /// @12: incompatible feature bits, `FEATURE_*` (none in 1.0).
    pub flags: U32,
    /// @16: length of the bootstrap in bytes.
    pub total_size: U64,
    /// @24: number of [`SectionEntry`]s following the superblock.
    pub section_count: U32,
    /// @28: records in INODES.
    pub inode_count: U32,
    /// @32: records in CHUNKS.
    pub chunk_count: U32,
    /// @36: records in BLOBS.
    pub blob_count: U32,
    /// @40: index of the root directory (0).
    pub root_inode: U32,
    /// @44: bits 0..31 target chunk size, bits 32..39 chunker; informational.
    pub chunk_size_hint: U64,
    /// @52: CRC-32 of the superblock with this field zeroed, then the section table.
    pub header_crc: U32,
    /// @56: reserved, zero.
    pub reserved: [u8; 8],
}

/// One entry of the section table (32 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct SectionEntry {
    /// @0: section kind, `SECTION_*`.
    pub kind: U32,
    /// @4: size of one record, 0 for a byte section.
    pub record_size: U32,
    /// @8: offset of the section; a multiple of [`SECTION_ALIGN`].
    pub offset: U64,
    /// @16: length in bytes.
    pub length: U64,
    /// @24: CRC-32 of the section's bytes.
    pub crc: U32,
    /// @28: reserved, zero.
    pub reserved: U32,
}

/// An INODES record (64 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct InodeRecord {
    /// @0: full `st_mode`: type bits and permission bits.
    pub mode: U32,
    /// @4: owner.
    pub uid: U32,
    /// @8: group.
    pub gid: U32,
    /// @12: link count as POSIX reports it.
    pub nlink: U32,
    /// @16: regular: file size; symlink: target length; others 0.
    pub size: U64,
    /// @24: modification time, signed seconds since the epoch.
    pub mtime_sec: I64,
    /// @32: nanoseconds of the modification time, < 10^9.
    pub mtime_nsec: U32,
    /// @36: index of the parent directory (of the first name, for non-directories).
    pub parent: U32,
    /// @40: first DIRENTS / FILE_CHUNKS index, or STRINGS offset of a symlink target.
    pub data_start: U32,
    /// @44: number of DIRENTS / FILE_CHUNKS records, or symlink target length.
    pub data_count: U32,
    /// @48: first XATTRS index.
    pub xattr_start: U32,
    /// @52: number of XATTRS records.
    pub xattr_count: U32,
    /// @56: device major number.
    pub rdev_major: U32,
    /// @60: device minor number.
    pub rdev_minor: U32,
}

/// A DIRENTS record (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct DirentRecord {
    /// @0: STRINGS offset of the name.
    pub name_offset: U32,
    /// @4: name length, 1..=255.
    pub name_len: U16,
    /// @6: file type, 1..=7 (see [`crate::FileKind::dirent_type`]).
    pub file_type: u8,
    /// @7: reserved, zero.
    pub reserved0: u8,
    /// @8: index of the inode named.
    pub inode: U32,
    /// @12: reserved, zero.
    pub reserved1: U32,
}

/// A FILE_CHUNKS record (16 bytes): one chunk placed in one file.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq,
)]
#[repr(C)]
pub struct FileChunkRecord {
    /// @0: offset in the file of the chunk's first byte.
    pub file_offset: U64,
    /// @8: CHUNKS index.
    pub chunk_index: U32,
    /// @12: reserved, zero.
    pub reserved: U32,
}

impl FileChunkRecord {
    /// Offset in the file of the chunk's first byte.
    pub fn file_offset(&self) -> u64 {
        self.file_offset.get()
    }

    /// Index of the chunk in CHUNKS.
    pub fn chunk_index(&self) -> u32 {
        self.chunk_index.get()
    }
}

/// A CHUNKS record (64 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ChunkRecord {
    /// @0: SHA-256 of the uncompressed data.
    pub digest: [u8; 32],
    /// @32: BLOBS index of the blob holding the chunk.
    pub blob_index: U32,
    /// @36: [`CHUNK_FLAG_ZSTD`], optionally with [`CHUNK_FLAG_SHARED_FRAME`], or 0.
    pub flags: U32,
    /// @40: offset of the stored bytes in the blob.
    pub compressed_offset: U64,
    /// @48: length of the stored bytes.
    pub compressed_size: U32,
    /// @52: length of the chunk data.
    pub uncompressed_size: U32,
    /// @56: with [`CHUNK_FLAG_SHARED_FRAME`]: offset of the chunk's data in
    /// the decoded frame; else zero.
    pub frame_offset: U32,
    /// @60: with [`CHUNK_FLAG_SHARED_FRAME`]: the decoded frame's length;
    /// else zero.
    pub frame_size: U32,
}

/// An XATTRS record (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct XattrRecord {
    /// @0: STRINGS offset of the full name.
    pub name_offset: U32,
    /// @4: name length, 1..=255.
    pub name_len: U16,
    /// @6: reserved, zero.
    pub reserved: U16,
    /// @8: STRINGS offset of the value.
    pub value_offset: U32,
    /// @12: value length, 0..=65536.
    pub value_len: U32,
}

/// A BLOBS record (64 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct BlobRecord {
    /// @0: SHA-256 of the blob as stored.
    pub digest: [u8; 32],
    /// @32: blob length.
    pub size: U64,
    /// @40: sum of the uncompressed sizes of its chunks.
    pub uncompressed_size: U64,
    /// @48: number of CHUNKS records stored in it.
    pub chunk_count: U32,
    /// @52: reserved, zero.
    pub reserved: [u8; 12],
}

/// A PREFETCH_RANGES record (12 bytes, 1.3): entries `first..first + count`
/// of a regular file's chunk map (its FILE_CHUNKS records, in file order).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct PrefetchRangeRecord {
    /// @0: inode index of the file.
    pub inode: U32,
    /// @4: index of the first entry in the file's chunk map.
    pub first: U32,
    /// @8: number of entries, at least 1.
    pub count: U32,
}

const _: () = assert!(size_of::<Superblock>() == SUPERBLOCK_SIZE);
const _: () = assert!(size_of::<SectionEntry>() == SECTION_ENTRY_SIZE);
const _: () = assert!(size_of::<InodeRecord>() == 64);
const _: () = assert!(size_of::<DirentRecord>() == 16);
const _: () = assert!(size_of::<FileChunkRecord>() == 16);
const _: () = assert!(size_of::<ChunkRecord>() == 64);
const _: () = assert!(size_of::<XattrRecord>() == 16);
const _: () = assert!(size_of::<BlobRecord>() == 64);
const _: () = assert!(size_of::<PrefetchRangeRecord>() == 12);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// Pins the offsets the docs give; a reordered field fails here.
    #[test]
    fn field_offsets_match_spec() {
        assert_eq!(offset_of!(Superblock, major), 8);
        assert_eq!(offset_of!(Superblock, flags), 12);
        assert_eq!(offset_of!(Superblock, total_size), 16);
        assert_eq!(offset_of!(Superblock, section_count), 24);
        assert_eq!(offset_of!(Superblock, inode_count), 28);
        assert_eq!(offset_of!(Superblock, chunk_count), 32);
        assert_eq!(offset_of!(Superblock, blob_count), 36);
        assert_eq!(offset_of!(Superblock, root_inode), 40);
        assert_eq!(offset_of!(Superblock, chunk_size_hint), 44);
        assert_eq!(offset_of!(Superblock, header_crc), HEADER_CRC_OFFSET);
        assert_eq!(offset_of!(Superblock, reserved), 56);
        assert_eq!(offset_of!(SectionEntry, offset), 8);
        assert_eq!(offset_of!(SectionEntry, length), 16);
        assert_eq!(offset_of!(SectionEntry, crc), 24);
        assert_eq!(offset_of!(InodeRecord, size), 16);
        assert_eq!(offset_of!(InodeRecord, mtime_sec), 24);
        assert_eq!(offset_of!(InodeRecord, mtime_nsec), 32);
        assert_eq!(offset_of!(InodeRecord, parent), 36);
        assert_eq!(offset_of!(InodeRecord, data_start), 40);
        assert_eq!(offset_of!(InodeRecord, xattr_start), 48);
        assert_eq!(offset_of!(InodeRecord, rdev_major), 56);
        assert_eq!(offset_of!(DirentRecord, name_len), 4);
        assert_eq!(offset_of!(DirentRecord, file_type), 6);
        assert_eq!(offset_of!(DirentRecord, inode), 8);
        assert_eq!(offset_of!(FileChunkRecord, chunk_index), 8);
        assert_eq!(offset_of!(ChunkRecord, blob_index), 32);
        assert_eq!(offset_of!(ChunkRecord, flags), 36);
        assert_eq!(offset_of!(ChunkRecord, compressed_offset), 40);
        assert_eq!(offset_of!(ChunkRecord, compressed_size), 48);
        assert_eq!(offset_of!(ChunkRecord, uncompressed_size), 52);
        assert_eq!(offset_of!(ChunkRecord, frame_offset), 56);
        assert_eq!(offset_of!(ChunkRecord, frame_size), 60);
        assert_eq!(offset_of!(XattrRecord, value_offset), 8);
        assert_eq!(offset_of!(XattrRecord, value_len), 12);
        assert_eq!(offset_of!(BlobRecord, size), 32);
        assert_eq!(offset_of!(BlobRecord, uncompressed_size), 40);
        assert_eq!(offset_of!(BlobRecord, chunk_count), 48);
        assert_eq!(offset_of!(PrefetchRangeRecord, first), 4);
        assert_eq!(offset_of!(PrefetchRangeRecord, count), 8);
    }

    #[test]
    fn known_kinds_have_sizes() {
        for kind in SECTION_KINDS {
            assert!(section_record_size(kind).is_some());
            assert_ne!(section_name(kind), "unknown");
        }
        assert_eq!(section_record_size(SECTION_BLOCK_CRCS), Some(4));
        assert_eq!(section_name(SECTION_BLOCK_CRCS), "BLOCK_CRCS");
        assert_eq!(section_record_size(SECTION_PREFETCH_RANGES), Some(12));
        assert_eq!(section_name(SECTION_PREFETCH_RANGES), "PREFETCH_RANGES");
        assert_eq!(section_record_size(11), None);
    }
}
