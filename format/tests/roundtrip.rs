//! Hand-built trees through writer and reader: every file kind, hard links,
//! xattrs, odd modes and times, sparse files, odd names; plus the writer's
//! refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::Builder;
use skiff_format::layout::FEATURE_BLAKE3_CHUNKS;
use skiff_format::{
    canonicalize, write_bootstrap, Bootstrap, ChunkHash, FileChunk, FileKind, FormatError, InodeId,
    NodeData, PrefetchRange,
};

/// A tree with one of everything; returns it with the ids of interesting nodes.
fn everything() -> (Builder, [usize; 6]) {
    let mut b = Builder::new();
    let bin = b.dir(0, b"bin");
    let ls = b.file(bin, b"ls", &[1000, 2000, 500]);
    b.add(
        bin,
        b"sh",
        NodeData::Symlink {
            target: b"ls".to_vec(),
        },
    );
    let dev = b.dir(0, b"dev");
    b.add(dev, b"null", NodeData::CharDevice { major: 1, minor: 3 });
    b.add(dev, b"sda", NodeData::BlockDevice { major: 8, minor: 0 });
    b.add(dev, b"fifo", NodeData::Fifo);
    b.add(dev, b"sock", NodeData::Socket);
    b.dir(0, b"empty");
    // A hard link: the same node in two directories.
    let usr = b.dir(0, b"usr");
    let usr_bin = b.dir(usr, b"bin");
    b.link(usr_bin, b"ls-link", ls);
    // Sparse: chunks at 0 and 1 MiB in a 2 MiB file.
    let c0 = b.chunk(4096);
    let c1 = b.chunk(4096);
    let sparse = b.add(
        0,
        b"sparse",
        NodeData::Regular {
            size: 2 << 20,
            chunks: vec![
                FileChunk {
                    file_offset: 0,
                    chunk_index: c0,
                },
                FileChunk {
                    file_offset: 1 << 20,
                    chunk_index: c1,
                },
            ],
        },
    );
    // A chunk shared by two files (dedup) and an empty file.
    b.add(
        0,
        b"dup",
        NodeData::Regular {
            size: 4096,
            chunks: vec![FileChunk {
                file_offset: 0,
                chunk_index: c0,
            }],
        },
    );
    b.add(
        0,
        b"zero-length",
        NodeData::Regular {
            size: 0,
            chunks: vec![],
        },
    );
    // Deep path.
    let mut deep = 0;
    for i in 0..40 {
        deep = b.dir(deep, format!("d{i}").as_bytes());
    }
    let leaf = b.file(deep, b"leaf", &[7]);
    // Non-UTF-8 names, and names that sort oddly as bytes.
    b.file(0, b"\xff\xfe-latin1-\xe9", &[3]);
    b.file(0, b"A-upper", &[3]);
    b.file(0, b"\x01ctrl", &[3]);
    // Attributes.
    let caps = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
        .to_vec();
    let ping = b.file(bin, b"ping", &[100]);
    {
        let n = &mut b.tree.nodes[ping];
        n.attrs.mode = 0o4755;
        n.xattrs.insert(b"security.capability".to_vec(), caps);
        n.xattrs.insert(b"user.empty".to_vec(), Vec::new());
        n.xattrs.insert(b"user.big".to_vec(), vec![0xab; 65536]);
    }
    b.tree.nodes[usr].attrs.mode = 0o2775;
    let tmp = b.dir(0, b"tmp");
    b.tree.nodes[tmp].attrs.mode = 0o1777;
    b.tree.nodes[tmp].attrs.mtime_sec = -86_400 * 365;
    b.tree.nodes[tmp].attrs.mtime_nsec = 999_999_999;
    b.tree.nodes[leaf].attrs.mtime_nsec = 123_456_789;
    b.tree.nodes[leaf].attrs.uid = 65534;
    b.tree.nodes[leaf].attrs.gid = u32::MAX;
    b.tree.nodes[0]
        .xattrs
        .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
    b.tree.prefetch = vec![leaf, ls];
    // The middle of `ls` first, then its head (format 1.3).
    b.tree.prefetch_ranges = vec![
        PrefetchRange {
            node: ls,
            first: 1,
            count: 2,
        },
        PrefetchRange {
            node: ls,
            first: 0,
            count: 1,
        },
    ];
    // An unreferenced chunk stays.
    b.chunk(10);
    (b, [bin, ls, sparse, usr_bin, leaf, ping])
}

#[test]
fn round_trip_everything() {
    let (b, _) = everything();
    let bytes = b.write();
    let boot = Bootstrap::parse(&bytes).unwrap();
    boot.validate().unwrap();
    let tree = boot.to_tree().unwrap();
    assert_eq!(tree, canonicalize(&b.tree));
    // Deterministic, and canonical input gives the same bytes.
    assert_eq!(write_bootstrap(&b.tree).unwrap(), bytes);
    assert_eq!(write_bootstrap(&tree).unwrap(), bytes);
}

#[test]
fn reader_answers() {
    let (b, _) = everything();
    let bytes = b.write();
    let boot = Bootstrap::parse(&bytes).unwrap();
    let root = boot.root();
    assert_eq!(root, InodeId(0));
    assert_eq!(
        boot.inode(root).unwrap().kind().unwrap(),
        FileKind::Directory
    );
    assert_eq!(boot.inode(root).unwrap().parent(), root);

    let ls = boot.resolve_path(b"/bin/ls").unwrap().unwrap();
    assert_eq!(boot.resolve_path(b"bin/ls").unwrap(), Some(ls));
    assert_eq!(boot.resolve_path(b"usr/bin/ls-link").unwrap(), Some(ls));
    assert_eq!(
        boot.resolve_path(b"/usr/bin/../../bin/./ls").unwrap(),
        Some(ls)
    );
    assert_eq!(boot.resolve_path(b"/bin/ls/x").unwrap(), None);
    assert_eq!(boot.resolve_path(b"/bin/sh/x").unwrap(), None);
    assert_eq!(boot.resolve_path(b"/nope").unwrap(), None);
    assert_eq!(boot.resolve_path(b"/").unwrap(), Some(root));

    let inode = boot.inode(ls).unwrap();
    assert_eq!(inode.nlink(), 2);
    assert_eq!(inode.size(), 3500);
    assert_eq!(inode.mode(), 0o100644);
    assert_eq!(inode.parent(), boot.resolve_path(b"bin").unwrap().unwrap());
    assert_eq!(boot.file_chunks(ls).unwrap().len(), 3);
    let offsets =
        |r: &[skiff_format::FileChunkRecord]| r.iter().map(|c| c.file_offset()).collect::<Vec<_>>();
    assert_eq!(offsets(boot.chunks_in_range(ls, 0, 1).unwrap()), [0]);
    assert_eq!(
        offsets(boot.chunks_in_range(ls, 999, 2).unwrap()),
        [0, 1000]
    );
    assert_eq!(
        offsets(boot.chunks_in_range(ls, 1000, 2000).unwrap()),
        [1000]
    );
    assert_eq!(
        offsets(boot.chunks_in_range(ls, 1000, 2001).unwrap()),
        [1000, 3000]
    );
    assert_eq!(
        offsets(boot.chunks_in_range(ls, 0, u64::MAX).unwrap()),
        [0, 1000, 3000]
    );
    assert_eq!(
        offsets(boot.chunks_in_range(ls, 3500, 10).unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(
        offsets(boot.chunks_in_range(ls, 10, 0).unwrap()),
        Vec::<u64>::new()
    );

    let sparse = boot.resolve_path(b"sparse").unwrap().unwrap();
    assert_eq!(
        offsets(boot.chunks_in_range(sparse, 4096, 4096).unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(
        offsets(boot.chunks_in_range(sparse, 4000, 1 << 20).unwrap()),
        [0, 1 << 20]
    );

    let bin = boot.resolve_path(b"bin").unwrap().unwrap();
    let names: Vec<_> = boot
        .dir_entries(bin)
        .unwrap()
        .map(|e| e.unwrap().name.to_vec())
        .collect();
    assert_eq!(names, [b"ls".to_vec(), b"ping".to_vec(), b"sh".to_vec()]);
    assert_eq!(boot.dir_len(bin).unwrap(), 3);
    assert_eq!(boot.dir_entry(bin, 2).unwrap().kind, FileKind::Symlink);
    assert!(boot.dir_entry(bin, 3).is_err());
    assert_eq!(boot.inode(bin).unwrap().nlink(), 2);
    assert_eq!(boot.inode(root).unwrap().nlink(), 2 + 6);

    let sh = boot.lookup(bin, b"sh").unwrap().unwrap();
    assert_eq!(boot.symlink_target(sh).unwrap(), b"ls");
    assert_eq!(boot.inode(sh).unwrap().size(), 2);
    assert!(matches!(
        boot.symlink_target(ls),
        Err(FormatError::NotASymlink(_))
    ));
    assert!(matches!(
        boot.lookup(ls, b"x"),
        Err(FormatError::NotADirectory(_))
    ));
    assert!(matches!(
        boot.file_chunks(bin),
        Err(FormatError::NotARegularFile(_))
    ));
    assert_eq!(boot.lookup(bin, b"zzz").unwrap(), None);
    assert_eq!(boot.lookup(bin, b"a").unwrap(), None);

    let ping = boot.lookup(bin, b"ping").unwrap().unwrap();
    assert_eq!(boot.inode(ping).unwrap().perm(), 0o4755);
    assert_eq!(boot.getxattr(ping, b"user.empty").unwrap(), Some(&b""[..]));
    assert_eq!(
        boot.getxattr(ping, b"user.big").unwrap().unwrap().len(),
        65536
    );
    assert_eq!(
        boot.getxattr(ping, b"security.capability")
            .unwrap()
            .unwrap()[0],
        1
    );
    assert_eq!(boot.getxattr(ping, b"user.nope").unwrap(), None);
    assert_eq!(boot.xattrs(ping).unwrap().count(), 3);

    let null = boot.resolve_path(b"/dev/null").unwrap().unwrap();
    assert_eq!(boot.inode(null).unwrap().rdev(), (1, 3));
    assert_eq!(
        boot.inode(null).unwrap().kind().unwrap(),
        FileKind::CharDevice
    );
    let tmp = boot.resolve_path(b"/tmp").unwrap().unwrap();
    assert_eq!(boot.inode(tmp).unwrap().mode(), 0o41777);
    assert_eq!(
        boot.inode(tmp).unwrap().mtime(),
        (-86_400 * 365, 999_999_999)
    );

    let prefetch = boot.prefetch().unwrap();
    assert_eq!(prefetch[1], ls);
    assert_eq!(
        boot.prefetch_ranges().unwrap(),
        vec![(ls, 1..3), (ls, 0..1)]
    );
    assert_eq!(boot.chunk_size_hint(), (1 << 32) | 65536);
    assert_eq!(boot.blob_count(), 1);
    assert_eq!(boot.chunk_count() as usize, b.tree.chunks.len());
    assert_eq!(boot.chunk(0).unwrap(), b.tree.chunks[0]);
    assert!(boot.chunk(boot.chunk_count()).is_err());
    assert_eq!(InodeId::from_ino(ls.ino()), Some(ls));
}

#[test]
fn inodes_are_numbered_breadth_first() {
    let mut b = Builder::new();
    let z = b.dir(0, b"z");
    let a = b.dir(0, b"a");
    let deep = b.file(z, b"f", &[1]);
    b.file(a, b"g", &[1]);
    b.file(0, b"m", &[1]);
    let bytes = b.write();
    let boot = Bootstrap::parse(&bytes).unwrap();
    // Root 0; its entries a, m, z are 1, 2, 3; then a/g = 4, z/f = 5.
    assert_eq!(boot.resolve_path(b"a").unwrap(), Some(InodeId(1)));
    assert_eq!(boot.resolve_path(b"m").unwrap(), Some(InodeId(2)));
    assert_eq!(boot.resolve_path(b"z").unwrap(), Some(InodeId(3)));
    assert_eq!(boot.resolve_path(b"a/g").unwrap(), Some(InodeId(4)));
    assert_eq!(boot.resolve_path(b"z/f").unwrap(), Some(InodeId(5)));
    let _ = (z, a, deep);
}

#[test]
fn unreachable_nodes_are_dropped_and_strings_shared() {
    let mut b = Builder::new();
    let d = b.dir(0, b"same");
    b.file(d, b"same", &[1]);
    let orphan = b.file(0, b"gone", &[1]);
    if let NodeData::Directory { entries } = &mut b.tree.nodes[0].data {
        entries.remove(&b"gone"[..]);
    }
    b.tree.prefetch = vec![orphan];
    b.tree.prefetch_ranges = vec![PrefetchRange {
        node: orphan,
        first: 0,
        count: 1,
    }];
    let bytes = b.write();
    let boot = Bootstrap::parse(&bytes).unwrap();
    assert_eq!(boot.inode_count(), 3);
    assert!(boot.prefetch().unwrap().is_empty());
    assert!(boot.prefetch_ranges().unwrap().is_empty());
    // No ranges left: no PREFETCH_RANGES section.
    assert!(boot
        .section_bytes(skiff_format::layout::SECTION_PREFETCH_RANGES)
        .is_none());
    // "same" is stored once.
    let strings = boot
        .section_bytes(skiff_format::layout::SECTION_STRINGS)
        .unwrap();
    assert_eq!(strings, b"same");
    // The orphan's chunk is still there.
    assert_eq!(boot.chunk_count(), 2);
}

#[test]
fn unaligned_buffer() {
    let (b, _) = everything();
    let bytes = b.write();
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(&bytes);
    let boot = Bootstrap::parse(&shifted[1..]).unwrap();
    assert_eq!(boot.to_tree().unwrap(), canonicalize(&b.tree));
}

/// A tree whose chunk digests are SHA-256 (what every writer before 1.4
/// wrote) is written without the BLAKE3 flag and read back as SHA-256; a
/// BLAKE3 tree sets the flag.
#[test]
fn the_chunk_hash_is_in_the_superblock_flags() {
    let (mut b, _) = everything();
    let blake3 = b.write();
    let flags = |bytes: &[u8]| u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    assert_eq!(
        flags(&blake3) & FEATURE_BLAKE3_CHUNKS,
        FEATURE_BLAKE3_CHUNKS
    );
    let boot = Bootstrap::parse(&blake3).unwrap();
    assert_eq!(boot.chunk_hash(), ChunkHash::Blake3);
    assert!((0..boot.chunk_count()).all(|i| boot.chunk(i).unwrap().hash == ChunkHash::Blake3));

    b.tree.chunk_hash = ChunkHash::Sha256;
    for c in &mut b.tree.chunks {
        c.hash = ChunkHash::Sha256;
    }
    let sha = b.write();
    assert_eq!(flags(&sha) & FEATURE_BLAKE3_CHUNKS, 0);
    let boot = Bootstrap::parse(&sha).unwrap();
    assert_eq!(boot.chunk_hash(), ChunkHash::Sha256);
    assert_eq!(boot.to_tree().unwrap(), canonicalize(&b.tree));
}

fn refused(b: &Builder, needle: &str) {
    match write_bootstrap(&b.tree) {
        Err(FormatError::InvalidTree(msg)) => {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidTree containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn writer_refuses_bad_trees() {
    for name in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
        let mut b = Builder::new();
        b.file(0, name, &[1]);
        refused(&b, "name");
    }

    let mut b = Builder::new();
    let d = b.dir(0, b"d");
    b.link(d, b"loop", 0);
    refused(&b, "second time");

    let mut b = Builder::new();
    let d = b.dir(0, b"d");
    b.link(0, b"d2", d);
    refused(&b, "second time");

    let mut b = Builder::new();
    b.link(0, b"dangling", 99);
    refused(&b, "only");

    // One hash function per image.
    let mut b = Builder::new();
    b.file(0, b"f", &[10, 10]);
    b.tree.chunks[1].hash = ChunkHash::Sha256;
    refused(&b, "chunk 1: its digest is a sha256");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[10, 10]);
    if let NodeData::Regular { chunks, .. } = &mut b.tree.nodes[f].data {
        chunks.swap(0, 1);
    }
    refused(&b, "unsorted or overlapping");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[10, 10]);
    if let NodeData::Regular { chunks, .. } = &mut b.tree.nodes[f].data {
        chunks[1].file_offset = 5;
    }
    refused(&b, "overlapping");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[10]);
    if let NodeData::Regular { size, .. } = &mut b.tree.nodes[f].data {
        *size = 9;
    }
    refused(&b, "beyond file size");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[10]);
    if let NodeData::Regular { chunks, .. } = &mut b.tree.nodes[f].data {
        chunks[0].chunk_index = 7;
    }
    refused(&b, "chunk_index 7");

    let mut b = Builder::new();
    b.chunk(10);
    b.tree.chunks[0].blob_index = 3;
    refused(&b, "blob_index 3");

    let mut b = Builder::new();
    b.chunk(10);
    b.tree.chunks[0].compressed = false;
    b.tree.chunks[0].compressed_size = 9;
    refused(&b, "raw chunk");

    let mut b = Builder::new();
    b.chunk(0);
    refused(&b, "uncompressed_size 0");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[1]);
    b.tree.nodes[f].attrs.mode = 0o100644;
    refused(&b, "mode");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[1]);
    b.tree.nodes[f].attrs.mtime_nsec = 1_000_000_000;
    refused(&b, "mtime_nsec");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[1]);
    b.tree.nodes[f].xattrs.insert(vec![b'x'; 256], vec![]);
    refused(&b, "xattr name length");

    let mut b = Builder::new();
    let f = b.file(0, b"f", &[1]);
    b.tree.nodes[f]
        .xattrs
        .insert(b"user.x".to_vec(), vec![0; 65537]);
    refused(&b, "value length");

    let mut b = Builder::new();
    b.add(0, b"l", NodeData::Symlink { target: vec![] });
    refused(&b, "symlink target length");

    let mut b = Builder::new();
    b.tree.prefetch = vec![5];
    refused(&b, "prefetch");

    for (first, count, needle) in [(0, 3, "entries 0..3"), (1, 0, "entries 1..1")] {
        let mut b = Builder::new();
        let f = b.file(0, b"f", &[1, 1]);
        b.tree.prefetch_ranges = vec![PrefetchRange {
            node: f,
            first,
            count,
        }];
        refused(&b, needle);
    }
    let mut b = Builder::new();
    b.tree.prefetch_ranges = vec![PrefetchRange {
        node: 0,
        first: 0,
        count: 1,
    }];
    refused(&b, "not a regular file");

    let mut b = Builder::new();
    b.tree.nodes[0].data = NodeData::Fifo;
    refused(&b, "root");

    refused(
        &Builder {
            tree: Default::default(),
        },
        "no nodes",
    );
}

#[test]
fn canonicalize_is_total_and_idempotent() {
    let mut b = Builder::new();
    let d = b.dir(0, b"d");
    b.link(d, b"up", 0);
    b.link(d, b"dangling", 1000);
    let c = canonicalize(&b.tree);
    assert_eq!(canonicalize(&c), c);
    assert_eq!(canonicalize(&Default::default()), Default::default());
    let NodeData::Directory { entries } = &c.nodes[1].data else {
        panic!()
    };
    assert_eq!(entries, &BTreeMap::from([(b"up".to_vec(), 0)]));
}
