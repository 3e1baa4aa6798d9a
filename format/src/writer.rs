//! Serialising an [`ImageTree`] into a bootstrap.
//!
//! The writer first checks the tree strictly (dangling entries, directories
//! reached twice), then canonicalises it (drops unreachable nodes, numbers the
//! rest breadth-first) and lays out the sections in kind order. Every choice
//! depends only on the tree (BTreeMap order, first-occurrence string order,
//! no timestamps or hash-map iteration), so the output is deterministic.

use std::collections::HashMap;

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::blocks::block_crcs;
use crate::layout::{
    BlobRecord, ChunkRecord, DirentRecord, FileChunkRecord, InodeRecord, PrefetchRangeRecord,
    SectionEntry, Superblock, XattrRecord, CHUNK_FLAG_SHARED_FRAME, CHUNK_FLAG_ZSTD,
    FEATURE_BLAKE3_CHUNKS, FEATURE_SHARED_FRAMES, HEADER_CRC_OFFSET, MAGIC, SECTION_ALIGN,
    SECTION_BLOBS, SECTION_BLOCK_CRCS, SECTION_CHUNKS, SECTION_DIRENTS, SECTION_ENTRY_SIZE,
    SECTION_FILE_CHUNKS, SECTION_INODES, SECTION_KINDS, SECTION_PREFETCH, SECTION_PREFETCH_RANGES,
    SECTION_STRINGS, SECTION_XATTRS, SUPERBLOCK_SIZE, VERSION_MAJOR, VERSION_MINOR,
};
use crate::tree::{
    bfs_order, canonicalize, check_attrs, check_chunk, check_chunk_map, check_name, check_symlink,
    check_xattr, FileKind, ImageTree, NodeData,
};
use crate::{ChunkHash, FormatError};

fn invalid(msg: String) -> FormatError {
    FormatError::InvalidTree(msg)
}

fn to_u32(n: usize, what: &str) -> Result<u32, FormatError> {
    u32::try_from(n).map_err(|_| invalid(format!("{what} {n} does not fit in 32 bits")))
}

/// The STRINGS section under construction: each distinct string once, in
/// order of first use.
#[derive(Default)]
struct Strings<'t> {
    bytes: Vec<u8>,
    index: HashMap<&'t [u8], u32>,
}

impl<'t> Strings<'t> {
    fn add(&mut self, s: &'t [u8]) -> Result<u32, FormatError> {
        // Empty strings (empty xattr values) need no bytes; offset 0 is
        // always in bounds for length 0.
        if s.is_empty() {
            return Ok(0);
        }
        if let Some(&off) = self.index.get(s) {
            return Ok(off);
        }
        let off = to_u32(self.bytes.len(), "STRINGS offset")?;
        to_u32(self.bytes.len().saturating_add(s.len()), "STRINGS size")?;
        self.bytes.extend_from_slice(s);
        self.index.insert(s, off);
        Ok(off)
    }
}

/// Serialises `tree` into a bootstrap.
///
/// Deterministic: equal trees give identical bytes, and
/// `write_bootstrap(t) == write_bootstrap(&canonicalize(t))`. Fails with
/// [`FormatError::InvalidTree`] on anything the format cannot express (see
/// `docs/format.md`): bad names, unsorted or overlapping chunk maps, dangling
/// indices, directories reached twice, out-of-range sizes.
pub fn write_bootstrap(tree: &ImageTree) -> Result<Vec<u8>, FormatError> {
    match tree.nodes.first() {
        None => {
            return Err(invalid(
                "the tree has no nodes (node 0 must be the root)".into(),
            ))
        }
        Some(root) if root.kind() != FileKind::Directory => {
            return Err(invalid(format!(
                "root node 0 is a {}, not a directory",
                root.kind().name()
            )))
        }
        Some(_) => {}
    }
    let (order, _) = bfs_order(tree, true)?;
    if let Some((i, p)) = tree
        .prefetch
        .iter()
        .enumerate()
        .find(|(_, &p)| p >= tree.nodes.len())
    {
        return Err(invalid(format!(
            "prefetch entry {i} names node {p}, but there are only {} nodes",
            tree.nodes.len()
        )));
    }
    check_prefetch_ranges(tree)?;
    serialize(&canonicalize(tree), &order)
}

/// Every prefetch range names a regular file and lies within its chunk map.
fn check_prefetch_ranges(tree: &ImageTree) -> Result<(), FormatError> {
    for (i, r) in tree.prefetch_ranges.iter().enumerate() {
        let map_len = match tree.nodes.get(r.node).map(|n| &n.data) {
            Some(NodeData::Regular { chunks, .. }) => chunks.len(),
            Some(_) => {
                return Err(invalid(format!(
                    "prefetch range {i} names node {}, which is not a regular file",
                    r.node
                )))
            }
            None => {
                return Err(invalid(format!(
                    "prefetch range {i} names node {}, but there are only {} nodes",
                    r.node,
                    tree.nodes.len()
                )))
            }
        };
        let end = u64::from(r.first) + u64::from(r.count);
        if r.count == 0 || end > map_len as u64 {
            return Err(invalid(format!(
                "prefetch range {i}: entries {}..{end} of a chunk map of {map_len}",
                r.first
            )));
        }
    }
    Ok(())
}

/// Lays out a canonical tree. `order[new] = old` only serves error messages,
/// which name nodes as the caller numbered them.
fn serialize(tree: &ImageTree, order: &[usize]) -> Result<Vec<u8>, FormatError> {
    let n = tree.nodes.len();
    let old = |i: usize| order.get(i).copied().unwrap_or(i);
    let inode_count = to_u32(n, "node count")?;
    let chunk_count = to_u32(tree.chunks.len(), "chunk count")?;
    let blob_count = to_u32(tree.blobs.len(), "blob count")?;

    for (i, c) in tree.chunks.iter().enumerate() {
        check_chunk(c, tree.blobs.len()).map_err(|e| invalid(format!("chunk {i}: {e}")))?;
        if c.hash != tree.chunk_hash {
            return Err(invalid(format!(
                "chunk {i}: its digest is a {} but the image's chunk digests are {}",
                c.hash, tree.chunk_hash
            )));
        }
    }

    // Parents and link counts, from the entries. The canonical tree is in
    // BFS order, so the first directory (by index) naming a node is the one
    // that first reached it.
    let mut parent: Vec<Option<u32>> = vec![None; n];
    let mut refs = vec![0u32; n];
    let mut subdirs = vec![0u32; n];
    if let Some(p) = parent.first_mut() {
        *p = Some(0);
    }
    for (i, node) in tree.nodes.iter().enumerate() {
        let NodeData::Directory { entries } = &node.data else {
            continue;
        };
        for (name, &child) in entries {
            check_name(name).map_err(|e| invalid(format!("entry of node {}: {e}", old(i))))?;
            let (Some(p), Some(r)) = (parent.get_mut(child), refs.get_mut(child)) else {
                return Err(invalid(format!("node {} names a missing node", old(i))));
            };
            *r = r
                .checked_add(1)
                .ok_or_else(|| invalid(format!("node {} has too many links", old(child))))?;
            if p.is_none() {
                *p = Some(to_u32(i, "node index")?);
            }
            if tree
                .nodes
                .get(child)
                .is_some_and(|c| c.kind() == FileKind::Directory)
            {
                if let Some(s) = subdirs.get_mut(i) {
                    *s = s
                        .checked_add(1)
                        .ok_or_else(|| invalid("too many subdirectories".into()))?;
                }
            }
        }
    }

    let mut strings = Strings::default();
    let mut inodes = Vec::with_capacity(n);
    let mut dirents = Vec::new();
    let mut file_chunks = Vec::new();
    let mut xattrs = Vec::new();

    for (i, node) in tree.nodes.iter().enumerate() {
        let who = || format!("node {}", old(i));
        check_attrs(node.attrs.mode, node.attrs.mtime_nsec)
            .map_err(|e| invalid(format!("{}: {e}", who())))?;
        let kind = node.kind();

        let xattr_start = to_u32(xattrs.len(), "XATTRS index")?;
        for (name, value) in &node.xattrs {
            check_xattr(name, value.len()).map_err(|e| invalid(format!("{}: {e}", who())))?;
            xattrs.push(XattrRecord {
                name_offset: U32::new(strings.add(name)?),
                // check_xattr bounds both lengths.
                name_len: U16::new(name.len() as u16),
                reserved: U16::ZERO,
                value_offset: U32::new(strings.add(value)?),
                value_len: U32::new(value.len() as u32),
            });
        }
        let xattr_count = to_u32(node.xattrs.len(), "xattr count")?;

        let (mut size, mut data_start, mut data_count, mut rdev) = (0u64, 0u32, 0u32, (0u32, 0u32));
        match &node.data {
            NodeData::Directory { entries } => {
                data_start = to_u32(dirents.len(), "DIRENTS index")?;
                data_count = to_u32(entries.len(), "entry count")?;
                for (name, &child) in entries {
                    let child_kind = tree
                        .nodes
                        .get(child)
                        .map(|c| c.kind())
                        .ok_or_else(|| invalid(format!("{} names a missing node", who())))?;
                    dirents.push(DirentRecord {
                        name_offset: U32::new(strings.add(name)?),
                        // check_name bounded the length to 255 above.
                        name_len: U16::new(name.len() as u16),
                        file_type: child_kind.dirent_type(),
                        reserved0: 0,
                        inode: U32::new(to_u32(child, "inode index")?),
                        reserved1: U32::ZERO,
                    });
                }
            }
            NodeData::Regular {
                size: file_size,
                chunks,
            } => {
                check_chunk_map(*file_size, chunks.iter().copied(), |ci| {
                    tree.chunks
                        .get(ci as usize)
                        .map(|c| c.uncompressed_size)
                        .ok_or_else(|| {
                            format!("chunk_index {ci} >= chunk count {}", tree.chunks.len())
                        })
                })
                .map_err(|e| invalid(format!("{}: {e}", who())))?;
                size = *file_size;
                data_start = to_u32(file_chunks.len(), "FILE_CHUNKS index")?;
                data_count = to_u32(chunks.len(), "chunk map length")?;
                file_chunks.extend(chunks.iter().map(|fc| FileChunkRecord {
                    file_offset: U64::new(fc.file_offset),
                    chunk_index: U32::new(fc.chunk_index),
                    reserved: U32::ZERO,
                }));
            }
            NodeData::Symlink { target } => {
                check_symlink(target).map_err(|e| invalid(format!("{}: {e}", who())))?;
                size = target.len() as u64;
                data_start = strings.add(target)?;
                data_count = to_u32(target.len(), "symlink length")?;
            }
            NodeData::CharDevice { major, minor } | NodeData::BlockDevice { major, minor } => {
                rdev = (*major, *minor);
            }
            NodeData::Fifo | NodeData::Socket => {}
        }

        let nlink = if kind == FileKind::Directory {
            subdirs
                .get(i)
                .and_then(|s| s.checked_add(2))
                .ok_or_else(|| invalid(format!("{}: link count overflows", who())))?
        } else {
            refs.get(i).copied().unwrap_or(0)
        };
        inodes.push(InodeRecord {
            mode: U32::new(kind.s_ifmt() | node.attrs.mode),
            uid: U32::new(node.attrs.uid),
            gid: U32::new(node.attrs.gid),
            nlink: U32::new(nlink),
            size: U64::new(size),
            mtime_sec: I64::new(node.attrs.mtime_sec),
            mtime_nsec: U32::new(node.attrs.mtime_nsec),
            parent: U32::new(parent.get(i).copied().flatten().unwrap_or(0)),
            data_start: U32::new(data_start),
            data_count: U32::new(data_count),
            xattr_start: U32::new(xattr_start),
            xattr_count: U32::new(xattr_count),
            rdev_major: U32::new(rdev.0),
            rdev_minor: U32::new(rdev.1),
        });
    }

    let chunks: Vec<ChunkRecord> = tree
        .chunks
        .iter()
        .map(|c| ChunkRecord {
            digest: c.digest.0,
            blob_index: U32::new(c.blob_index),
            flags: U32::new(match (c.compressed, c.frame.is_some()) {
                (true, true) => CHUNK_FLAG_ZSTD | CHUNK_FLAG_SHARED_FRAME,
                (true, false) => CHUNK_FLAG_ZSTD,
                (false, _) => 0,
            }),
            compressed_offset: U64::new(c.compressed_offset),
            compressed_size: U32::new(c.compressed_size),
            uncompressed_size: U32::new(c.uncompressed_size),
            frame_offset: U32::new(c.frame.map_or(0, |f| f.offset)),
            frame_size: U32::new(c.frame.map_or(0, |f| f.size)),
        })
        .collect();
    let blobs: Vec<BlobRecord> = tree
        .blobs
        .iter()
        .map(|b| BlobRecord {
            digest: b.digest.0,
            size: U64::new(b.size),
            uncompressed_size: U64::new(b.uncompressed_size),
            chunk_count: U32::new(b.chunk_count),
            reserved: [0; 12],
        })
        .collect();
    let prefetch = tree
        .prefetch
        .iter()
        .map(|&p| to_u32(p, "prefetch inode").map(U32::new))
        .collect::<Result<Vec<U32>, _>>()?;

    let prefetch_ranges = tree
        .prefetch_ranges
        .iter()
        .map(|r| {
            Ok(PrefetchRangeRecord {
                inode: U32::new(to_u32(r.node, "prefetch range inode")?),
                first: U32::new(r.first),
                count: U32::new(r.count),
            })
        })
        .collect::<Result<Vec<_>, FormatError>>()?;

    let mut sections: Vec<(u32, &[u8])> = vec![
        (SECTION_INODES, inodes.as_bytes()),
        (SECTION_DIRENTS, dirents.as_bytes()),
        (SECTION_FILE_CHUNKS, file_chunks.as_bytes()),
        (SECTION_CHUNKS, chunks.as_bytes()),
        (SECTION_XATTRS, xattrs.as_bytes()),
        (SECTION_STRINGS, &strings.bytes),
        (SECTION_BLOBS, blobs.as_bytes()),
        (SECTION_PREFETCH, prefetch.as_bytes()),
    ];
    debug_assert!(sections.iter().map(|s| s.0).eq(SECTION_KINDS));
    // 1.3: only when there are ranges, so that a tree without them gives
    // the same sections as before.
    if !prefetch_ranges.is_empty() {
        sections.push((SECTION_PREFETCH_RANGES, prefetch_ranges.as_bytes()));
    }

    let table_end = SUPERBLOCK_SIZE + (sections.len() + 1) * SECTION_ENTRY_SIZE;
    let mut out = vec![0u8; table_end];
    let mut table = Vec::with_capacity(sections.len() + 1);
    for (kind, bytes) in sections {
        pad_to_align(&mut out);
        table.push(SectionEntry {
            kind: U32::new(kind),
            record_size: U32::new(crate::layout::section_record_size(kind).unwrap_or(0)),
            offset: U64::new(out.len() as u64),
            length: U64::new(bytes.len() as u64),
            crc: U32::new(crc32fast::hash(bytes)),
            reserved: U32::ZERO,
        });
        out.extend_from_slice(bytes);
    }
    // Block CRCs (1.2) of everything from the table's end to here, as the
    // last section.
    pad_to_align(&mut out);
    let crcs = block_crcs(out.get(table_end..).unwrap_or_default());
    table.push(SectionEntry {
        kind: U32::new(SECTION_BLOCK_CRCS),
        record_size: U32::new(crate::layout::section_record_size(SECTION_BLOCK_CRCS).unwrap_or(0)),
        offset: U64::new(out.len() as u64),
        length: U64::new(crcs.as_bytes().len() as u64),
        crc: U32::new(crc32fast::hash(crcs.as_bytes())),
        reserved: U32::ZERO,
    });
    out.extend_from_slice(crcs.as_bytes());
    // A whole number of 8-byte units keeps a concatenation aligned.
    pad_to_align(&mut out);

    let superblock = Superblock {
        magic: MAGIC,
        major: U16::new(VERSION_MAJOR),
        minor: U16::new(VERSION_MINOR),
        flags: U32::new(
            if tree.chunks.iter().any(|c| c.frame.is_some()) {
                FEATURE_SHARED_FRAMES
            } else {
                0
            } | match tree.chunk_hash {
                ChunkHash::Sha256 => 0,
                ChunkHash::Blake3 => FEATURE_BLAKE3_CHUNKS,
            },
        ),
        total_size: U64::new(out.len() as u64),
        section_count: U32::new(to_u32(table.len(), "section count")?),
        inode_count: U32::new(inode_count),
        chunk_count: U32::new(chunk_count),
        blob_count: U32::new(blob_count),
        root_inode: U32::ZERO,
        chunk_size_hint: U64::new(tree.chunk_size_hint),
        header_crc: U32::ZERO,
        reserved: [0; 8],
    };
    write_header(&mut out, &superblock, &table)?;
    Ok(out)
}

fn pad_to_align(out: &mut Vec<u8>) {
    let align = SECTION_ALIGN as usize;
    let padded = out.len().div_ceil(align) * align;
    out.resize(padded, 0);
}

/// Writes superblock and table into the first bytes of `out`, with the header CRC.
fn write_header(
    out: &mut [u8],
    superblock: &Superblock,
    table: &[SectionEntry],
) -> Result<(), FormatError> {
    let mut sb = *superblock;
    sb.header_crc = U32::new(header_crc(sb.as_bytes(), table.as_bytes()));
    let table_end = SUPERBLOCK_SIZE + table.as_bytes().len();
    let header = out
        .get_mut(..table_end)
        .ok_or_else(|| invalid("buffer shorter than its header".into()))?;
    let (sb_bytes, table_bytes) = header.split_at_mut(SUPERBLOCK_SIZE);
    sb_bytes.copy_from_slice(sb.as_bytes());
    table_bytes.copy_from_slice(table.as_bytes());
    Ok(())
}

/// The header CRC: the superblock with its `header_crc` field taken as zero,
/// then the section table.
pub(crate) fn header_crc(superblock: &[u8], table: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(superblock.get(..HEADER_CRC_OFFSET).unwrap_or_default());
    h.update(&[0; 4]);
    h.update(superblock.get(HEADER_CRC_OFFSET + 4..).unwrap_or_default());
    h.update(table);
    h.finalize()
}

/// Recomputes, in place, every section CRC and then the header CRC of a
/// bootstrap whose superblock and section table are readable, leaving every
/// other byte alone. Sections that lie outside the buffer keep their CRC.
///
/// This is for tests and fuzzing: it turns an edited bootstrap into one that
/// passes the checksum checks, so that the structural checks behind them get
/// exercised.
pub fn reseal(buf: &mut [u8]) -> Result<(), FormatError> {
    let truncated = |what, needed: usize, available: usize| FormatError::Truncated {
        what,
        needed: needed as u64,
        available: available as u64,
    };
    let len = buf.len();
    let sb_bytes = buf
        .get(..SUPERBLOCK_SIZE)
        .ok_or_else(|| truncated("superblock", SUPERBLOCK_SIZE, len))?;
    let sb = Superblock::read_from_bytes(sb_bytes)
        .map_err(|_| truncated("superblock", SUPERBLOCK_SIZE, len))?;
    let table_end = (sb.section_count.get() as usize)
        .checked_mul(SECTION_ENTRY_SIZE)
        .and_then(|t| t.checked_add(SUPERBLOCK_SIZE))
        .filter(|&e| e <= len)
        .ok_or_else(|| truncated("section table", usize::MAX, len))?;
    let table_bytes = buf.get(SUPERBLOCK_SIZE..table_end).unwrap_or_default();
    let mut table = <[SectionEntry]>::ref_from_bytes(table_bytes)
        .map_err(|_| truncated("section table", table_end, len))?
        .to_vec();
    reseal_blocks(buf, table_end, &table);
    for entry in &mut table {
        let range = usize::try_from(entry.offset.get())
            .ok()
            .zip(usize::try_from(entry.length.get()).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?));
        if let Some(bytes) = range.and_then(|r| buf.get(r)) {
            entry.crc = U32::new(crc32fast::hash(bytes));
        }
    }
    write_header(buf, &sb, &table)
}

/// Recomputes the BLOCK_CRCS section of a bootstrap in place, when the
/// table has one of the right length within the buffer.
fn reseal_blocks(buf: &mut [u8], table_end: usize, table: &[SectionEntry]) {
    let Some(entry) = table.iter().find(|e| e.kind.get() == SECTION_BLOCK_CRCS) else {
        return;
    };
    let Some((offset, length)) = usize::try_from(entry.offset.get())
        .ok()
        .zip(usize::try_from(entry.length.get()).ok())
    else {
        return;
    };
    let Some(covered) = buf.get(table_end..offset) else {
        return;
    };
    let crcs = block_crcs(covered);
    if crcs.as_bytes().len() != length {
        return;
    }
    if let Some(dst) = offset
        .checked_add(length)
        .and_then(|end| buf.get_mut(offset..end))
    {
        dst.copy_from_slice(crcs.as_bytes());
    }
}
