//! An annotated, human-readable dump of every byte structure in a
//! bootstrap: the superblock field by field with offsets, the section table,
//! then every record of every section with its field names.
//!
//! The dump shows records as stored, without interpreting or validating
//! them beyond what [`Bootstrap::parse`] checked, so it is also the tool for
//! looking at a bootstrap that [`Bootstrap::validate`] rejects. A snapshot
//! test pins its output for a small tree, which pins `docs/format.md` to the
//! code: a layout change shows up as a diff of named fields.

use std::fmt::Write as _;
use std::mem::offset_of;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::layout::{
    section_name, BlobRecord, ChunkRecord, DirentRecord, FileChunkRecord, InodeRecord,
    PrefetchRangeRecord, SectionEntry, Superblock, XattrRecord, SECTION_BLOBS, SECTION_BLOCK_CRCS,
    SECTION_CHUNKS, SECTION_DIRENTS, SECTION_ENTRY_SIZE, SECTION_FILE_CHUNKS, SECTION_INODES,
    SECTION_PREFETCH, SECTION_PREFETCH_RANGES, SECTION_STRINGS, SECTION_XATTRS, SUPERBLOCK_SIZE,
};
use crate::{Bootstrap, Digest, FileKind, FormatError};

/// Appends a line to the dump; writing to a `String` cannot fail.
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Longest string shown inline after a record.
const SHOW_MAX: usize = 64;

/// Renders the whole bootstrap as annotated text; see the module docs.
pub fn dump(bootstrap: &Bootstrap<'_>) -> Result<String, FormatError> {
    let mut out = String::new();
    let sb = bootstrap.superblock();
    line!(out, "skiff bootstrap, {} bytes", bootstrap.as_bytes().len());
    line!(out, "superblock @0x0000, {SUPERBLOCK_SIZE} bytes");
    let hint = sb.chunk_size_hint.get();
    let fields: [(usize, &str, String); 13] = [
        (offset_of!(Superblock, magic), "magic", hex_bytes(&sb.magic)),
        (offset_of!(Superblock, major), "major", sb.major.to_string()),
        (offset_of!(Superblock, minor), "minor", sb.minor.to_string()),
        (
            offset_of!(Superblock, flags),
            "flags",
            format!(
                "{:#010x} (chunk digests: {})",
                sb.flags.get(),
                bootstrap.chunk_hash()
            ),
        ),
        (
            offset_of!(Superblock, total_size),
            "total_size",
            sb.total_size.to_string(),
        ),
        (
            offset_of!(Superblock, section_count),
            "section_count",
            sb.section_count.to_string(),
        ),
        (
            offset_of!(Superblock, inode_count),
            "inode_count",
            sb.inode_count.to_string(),
        ),
        (
            offset_of!(Superblock, chunk_count),
            "chunk_count",
            sb.chunk_count.to_string(),
        ),
        (
            offset_of!(Superblock, blob_count),
            "blob_count",
            sb.blob_count.to_string(),
        ),
        (
            offset_of!(Superblock, root_inode),
            "root_inode",
            sb.root_inode.to_string(),
        ),
        (
            offset_of!(Superblock, chunk_size_hint),
            "chunk_size_hint",
            format!(
                "{hint:#018x} (target {}, chunker {})",
                hint & 0xffff_ffff,
                (hint >> 32) & 0xff
            ),
        ),
        (
            offset_of!(Superblock, header_crc),
            "header_crc",
            format!("{:#010x}", sb.header_crc.get()),
        ),
        (
            offset_of!(Superblock, reserved),
            "reserved",
            hex_bytes(&sb.reserved),
        ),
    ];
    for (off, name, value) in fields {
        line!(out, "  @{off:#04x} {name:<16} {value}");
    }

    let table = bootstrap.sections();
    line!(
        out,
        "section table @{SUPERBLOCK_SIZE:#06x}, {} entries",
        table.len()
    );
    for (i, e) in table.iter().enumerate() {
        line!(
            out,
            "  entry {i} @{:#06x}: kind={} ({}) record_size={} offset={:#06x} length={} crc={:#010x}",
            SUPERBLOCK_SIZE + i * SECTION_ENTRY_SIZE,
            e.kind.get(),
            section_name(e.kind.get()),
            e.record_size.get(),
            e.offset.get(),
            e.length.get(),
            e.crc.get()
        );
    }

    let strings = bootstrap.section_bytes(SECTION_STRINGS).unwrap_or_default();
    let show = |offset: u32, len: u32| -> String {
        let s = offset as usize;
        match s.checked_add(len as usize).and_then(|e| strings.get(s..e)) {
            Some(bytes) => quote(bytes),
            None => "<beyond STRINGS>".to_owned(),
        }
    };
    for entry in table {
        dump_section(&mut out, bootstrap, entry, &show);
    }
    Ok(out)
}

fn dump_section(
    out: &mut String,
    bootstrap: &Bootstrap<'_>,
    entry: &SectionEntry,
    show: &dyn Fn(u32, u32) -> String,
) {
    let kind = entry.kind.get();
    let base = entry.offset.get();
    let bytes = usize::try_from(base)
        .ok()
        .zip(usize::try_from(entry.length.get()).ok())
        .and_then(|(o, l)| bootstrap.as_bytes().get(o..o.checked_add(l)?))
        .unwrap_or_default();
    let name = section_name(kind);
    match kind {
        SECTION_INODES => each::<InodeRecord>(out, name, base, bytes, |i, r| {
            let mode = r.mode.get();
            let kind = FileKind::from_mode(mode).map_or("?", FileKind::name);
            format!(
                "inode {i}: mode={mode:06o} ({kind}) uid={} gid={} nlink={} size={} mtime={}.{:09} parent={} data_start={} data_count={} xattr_start={} xattr_count={} rdev={}:{}",
                r.uid, r.gid, r.nlink, r.size, r.mtime_sec, r.mtime_nsec.get(), r.parent, r.data_start,
                r.data_count, r.xattr_start, r.xattr_count, r.rdev_major, r.rdev_minor
            )
        }),
        SECTION_DIRENTS => each::<DirentRecord>(out, name, base, bytes, |i, r| {
            format!(
                "dirent {i}: name_offset={} name_len={} file_type={} inode={} name={}",
                r.name_offset,
                r.name_len,
                r.file_type,
                r.inode,
                show(r.name_offset.get(), r.name_len.get().into())
            )
        }),
        SECTION_FILE_CHUNKS => each::<FileChunkRecord>(out, name, base, bytes, |i, r| {
            format!(
                "file_chunk {i}: file_offset={} chunk_index={}",
                r.file_offset, r.chunk_index
            )
        }),
        SECTION_CHUNKS => each::<ChunkRecord>(out, name, base, bytes, |i, r| {
            let frame = if r.flags.get() & crate::layout::CHUNK_FLAG_SHARED_FRAME != 0 {
                format!(
                    " frame_offset={} frame_size={}",
                    r.frame_offset, r.frame_size
                )
            } else {
                String::new()
            };
            format!(
                "chunk {i}: digest={} blob_index={} flags={:#x} compressed_offset={} compressed_size={} uncompressed_size={}{frame}",
                bootstrap.chunk_hash().label(&Digest(r.digest)),
                r.blob_index,
                r.flags.get(),
                r.compressed_offset,
                r.compressed_size,
                r.uncompressed_size
            )
        }),
        SECTION_XATTRS => each::<XattrRecord>(out, name, base, bytes, |i, r| {
            format!(
                "xattr {i}: name_offset={} name_len={} value_offset={} value_len={} {} = {}",
                r.name_offset,
                r.name_len,
                r.value_offset,
                r.value_len,
                show(r.name_offset.get(), r.name_len.get().into()),
                show(r.value_offset.get(), r.value_len.get())
            )
        }),
        SECTION_BLOBS => each::<BlobRecord>(out, name, base, bytes, |i, r| {
            format!(
                "blob {i}: digest={} size={} uncompressed_size={} chunk_count={}",
                Digest(r.digest),
                r.size,
                r.uncompressed_size,
                r.chunk_count
            )
        }),
        SECTION_PREFETCH => each::<U32>(out, name, base, bytes, |i, r| {
            format!("prefetch {i}: inode={r}")
        }),
        SECTION_PREFETCH_RANGES => each::<PrefetchRangeRecord>(out, name, base, bytes, |i, r| {
            format!(
                "prefetch range {i}: inode={} chunk map entries {}+{}",
                r.inode, r.first, r.count
            )
        }),
        SECTION_BLOCK_CRCS => each::<U32>(out, name, base, bytes, |i, r| {
            format!("block {i}: crc={:#010x}", r.get())
        }),
        SECTION_STRINGS => {
            line!(out, "{name} @{base:#06x}, {} bytes", bytes.len());
            hexdump(out, base, bytes);
        }
        _ => {
            line!(
                out,
                "unknown section (kind {kind}) @{base:#06x}, {} bytes",
                bytes.len()
            );
            hexdump(out, base, bytes);
        }
    }
}

/// One line per record of a record section, prefixed with its offset.
fn each<T>(
    out: &mut String,
    name: &str,
    base: u64,
    bytes: &[u8],
    describe: impl Fn(usize, &T) -> String,
) where
    T: FromBytes + KnownLayout + Immutable + Unaligned,
{
    let size = size_of::<T>();
    let Ok(recs) = <[T]>::ref_from_bytes(bytes) else {
        line!(
            out,
            "{name} @{base:#06x}: {} bytes, not a whole number of {size}-byte records",
            bytes.len()
        );
        hexdump(out, base, bytes);
        return;
    };
    line!(
        out,
        "{name} @{base:#06x}, {} records of {size} bytes",
        recs.len()
    );
    for (i, rec) in recs.iter().enumerate() {
        let at = base.saturating_add((i * size) as u64);
        line!(out, "  @{at:#06x} {}", describe(i, rec));
    }
}

fn hexdump(out: &mut String, base: u64, bytes: &[u8]) {
    for (i, row) in bytes.chunks(16).enumerate() {
        let ascii: String = row
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        line!(
            out,
            "  @{:#06x} {:<47} |{ascii}|",
            base.saturating_add(i as u64 * 16),
            hex_bytes(row)
        );
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A byte string as a quoted, escaped literal, shortened if long.
fn quote(bytes: &[u8]) -> String {
    let shown = bytes.get(..SHOW_MAX).unwrap_or(bytes);
    let more = if bytes.len() > SHOW_MAX { "..." } else { "" };
    format!("\"{}\"{more}", shown.escape_ascii())
}
