//! Property tests: random trees round-trip through writer and reader, the
//! writer is deterministic, and every reader entry point copes with the result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;
use skiff_format::{
    canonicalize, write_bootstrap, Attrs, BlobInfo, Bootstrap, ChunkHash, ChunkInfo, Digest,
    FileChunk, ImageTree, Node, NodeData, PrefetchRange,
};

#[derive(Debug, Clone)]
enum Op {
    Dir(Index, Vec<u8>),
    File(Index, Vec<u8>, Vec<(u64, Index)>, u64),
    Symlink(Index, Vec<u8>, Vec<u8>),
    Special(Index, Vec<u8>, u8, u32, u32),
    Link(Index, Vec<u8>, Index),
    Orphan(Vec<(u64, Index)>),
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, 1..6).prop_map(|mut n| {
        for b in &mut n {
            if *b == b'/' {
                *b = b'_';
            }
        }
        if n == b"." || n == b".." {
            n.push(b'x');
        }
        n
    })
}

fn attrs() -> impl Strategy<Value = Attrs> {
    (
        0u32..=0o7777,
        any::<u32>(),
        any::<u32>(),
        any::<i64>(),
        0u32..1_000_000_000,
    )
        .prop_map(|(mode, uid, gid, mtime_sec, mtime_nsec)| Attrs {
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
        })
}

type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

fn xattrs() -> impl Strategy<Value = Xattrs> {
    prop::collection::btree_map(
        "(user|security|trusted)\\.[a-z]{1,8}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..20),
        0..3,
    )
}

fn chunk_layout() -> impl Strategy<Value = Vec<(u64, Index)>> {
    prop::collection::vec(
        (prop_oneof![Just(0u64), 0u64..10_000], any::<Index>()),
        0..5,
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<Index>(), name()).prop_map(|(d, n)| Op::Dir(d, n)),
        4 => (any::<Index>(), name(), chunk_layout(), 0u64..100).prop_map(|(d, n, c, t)| Op::File(d, n, c, t)),
        1 => (any::<Index>(), name(), prop::collection::vec(1u8..=255, 1..30)).prop_map(|(d, n, t)| Op::Symlink(d, n, t)),
        1 => (any::<Index>(), name(), 0u8..4, any::<u32>(), any::<u32>()).prop_map(|(d, n, k, a, b)| Op::Special(d, n, k, a, b)),
        2 => (any::<Index>(), name(), any::<Index>()).prop_map(|(d, n, t)| Op::Link(d, n, t)),
        1 => chunk_layout().prop_map(Op::Orphan),
    ]
}

fn chunks() -> impl Strategy<Value = Vec<(u32, bool, u8)>> {
    prop::collection::vec((1u32..70_000, any::<bool>(), 0u8..3), 1..12)
}

fn build(
    ops: Vec<Op>,
    chunk_specs: Vec<(u32, bool, u8)>,
    node_attrs: Vec<(Attrs, Xattrs)>,
    prefetch: Vec<Index>,
    hint: u64,
) -> ImageTree {
    let blobs: Vec<BlobInfo> = (0..3u8)
        .map(|i| BlobInfo {
            digest: Digest::of(&[i]),
            size: 1 << 30,
            uncompressed_size: 1 << 31,
            chunk_count: 5,
        })
        .collect();
    // Both chunk hash functions, by the hint's low bit (any u64).
    let hash = if hint & 1 == 0 {
        ChunkHash::Sha256
    } else {
        ChunkHash::Blake3
    };
    let chunks: Vec<ChunkInfo> = chunk_specs
        .iter()
        .enumerate()
        .map(|(i, &(size, compressed, blob))| ChunkInfo {
            digest: hash.digest(&i.to_le_bytes()),
            hash,
            blob_index: u32::from(blob),
            compressed,
            compressed_offset: i as u64 * 100_000,
            compressed_size: if compressed { size / 3 + 1 } else { size },
            uncompressed_size: size,
            frame: None,
        })
        .collect();
    let mut nodes = vec![Node {
        attrs: Attrs {
            mode: 0o755,
            ..Default::default()
        },
        data: NodeData::Directory {
            entries: BTreeMap::new(),
        },
        xattrs: BTreeMap::new(),
    }];
    let mut dirs = vec![0usize];
    let mut non_dirs: Vec<usize> = Vec::new();
    let file_data = |layout: &[(u64, Index)], tail: u64| {
        let mut off = 0u64;
        let mut map = Vec::new();
        for (gap, idx) in layout {
            off += gap;
            let ci = idx.index(chunks.len());
            map.push(FileChunk {
                file_offset: off,
                chunk_index: ci as u32,
            });
            off += u64::from(chunks[ci].uncompressed_size);
        }
        NodeData::Regular {
            size: off + tail,
            chunks: map,
        }
    };
    for op in ops {
        let (dir, name, data) = match op {
            Op::Dir(d, n) => (
                d,
                n,
                NodeData::Directory {
                    entries: BTreeMap::new(),
                },
            ),
            Op::File(d, n, layout, tail) => (d, n, file_data(&layout, tail)),
            Op::Symlink(d, n, t) => (d, n, NodeData::Symlink { target: t }),
            Op::Special(d, n, k, major, minor) => (
                d,
                n,
                match k {
                    0 => NodeData::CharDevice { major, minor },
                    1 => NodeData::BlockDevice { major, minor },
                    2 => NodeData::Fifo,
                    _ => NodeData::Socket,
                },
            ),
            Op::Link(d, n, t) => {
                if non_dirs.is_empty() {
                    continue;
                }
                let target = non_dirs[t.index(non_dirs.len())];
                let dir = dirs[d.index(dirs.len())];
                if let NodeData::Directory { entries } = &mut nodes[dir].data {
                    entries.insert(n, target);
                }
                continue;
            }
            Op::Orphan(layout) => {
                // Never linked: the writer must drop it.
                nodes.push(Node {
                    attrs: Attrs::default(),
                    data: file_data(&layout, 0),
                    xattrs: BTreeMap::new(),
                });
                continue;
            }
        };
        let id = nodes.len();
        let is_dir = matches!(data, NodeData::Directory { .. });
        let (a, x) = node_attrs
            .get(id % node_attrs.len().max(1))
            .cloned()
            .unwrap_or_default();
        nodes.push(Node {
            attrs: a,
            data,
            xattrs: x,
        });
        let parent = dirs[dir.index(dirs.len())];
        if let NodeData::Directory { entries } = &mut nodes[parent].data {
            // Replacing an entry leaves the old node unreachable: also fine.
            entries.insert(name, id);
        }
        if is_dir {
            dirs.push(id);
        } else {
            non_dirs.push(id);
        }
    }
    let n = nodes.len();
    let prefetch: Vec<usize> = prefetch.into_iter().map(|i| i.index(n)).collect();
    // A range of each prefetched file with a chunk map.
    let prefetch_ranges = prefetch
        .iter()
        .enumerate()
        .filter_map(|(k, &p)| match &nodes[p].data {
            NodeData::Regular { chunks, .. } if !chunks.is_empty() => {
                let m = chunks.len() as u32;
                let first = k as u32 % m;
                Some(PrefetchRange {
                    node: p,
                    first,
                    count: m - first,
                })
            }
            _ => None,
        })
        .collect();
    ImageTree {
        nodes,
        chunks,
        blobs,
        prefetch,
        prefetch_ranges,
        chunk_size_hint: hint,
        chunk_hash: hash,
    }
}

fn tree() -> impl Strategy<Value = ImageTree> {
    (
        prop::collection::vec(op(), 0..40),
        chunks(),
        prop::collection::vec((attrs(), xattrs()), 1..8),
        prop::collection::vec(any::<Index>(), 0..4),
        any::<u64>(),
    )
        .prop_map(|(ops, c, a, p, h)| build(ops, c, a, p, h))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(tree in tree()) {
        let bytes = write_bootstrap(&tree).unwrap();
        let boot = Bootstrap::parse(&bytes).unwrap();
        boot.validate().unwrap();
        let back = boot.to_tree().unwrap();
        let canon = canonicalize(&tree);
        prop_assert_eq!(&back, &canon);
        prop_assert_eq!(&write_bootstrap(&tree).unwrap(), &bytes);
        prop_assert_eq!(&write_bootstrap(&canon).unwrap(), &bytes);
        prop_assert_eq!(common::exercise(&bytes), (true, true));
    }

    #[test]
    fn lookup_finds_every_entry(tree in tree()) {
        let bytes = write_bootstrap(&tree).unwrap();
        let boot = Bootstrap::parse(&bytes).unwrap();
        let canon = canonicalize(&tree);
        for (i, node) in canon.nodes.iter().enumerate() {
            if let NodeData::Directory { entries } = &node.data {
                let dir = skiff_format::InodeId(i as u32);
                for (name, &child) in entries {
                    prop_assert_eq!(boot.lookup(dir, name).unwrap(), Some(skiff_format::InodeId(child as u32)));
                    let mut missing = name.clone();
                    missing.push(0);
                    prop_assert_eq!(boot.lookup(dir, &missing).unwrap(), None);
                }
            }
        }
    }

    #[test]
    fn chunks_in_range_matches_linear_scan(tree in tree(), offset in 0u64..200_000, len in 0u64..100_000) {
        let bytes = write_bootstrap(&tree).unwrap();
        let boot = Bootstrap::parse(&bytes).unwrap();
        let canon = canonicalize(&tree);
        for (i, node) in canon.nodes.iter().enumerate() {
            if let NodeData::Regular { chunks, .. } = &node.data {
                let expected: Vec<u64> = chunks
                    .iter()
                    .filter(|c| {
                        let end = c.file_offset + u64::from(canon.chunks[c.chunk_index as usize].uncompressed_size);
                        len > 0 && c.file_offset < offset + len && end > offset
                    })
                    .map(|c| c.file_offset)
                    .collect();
                let got: Vec<u64> = boot
                    .chunks_in_range(skiff_format::InodeId(i as u32), offset, len)
                    .unwrap()
                    .iter()
                    .map(|r| r.file_offset())
                    .collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
