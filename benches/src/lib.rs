//! Inputs shared by the criterion micro-benchmarks in `benches/`: synthetic
//! trees and data, deterministic so that runs compare.
//!
//! Run them with `cargo bench -p skiff-benches` (or `--bench bootstrap`,
//! `--bench chunk`, `--bench chunking`, `--bench load`).

use std::collections::BTreeMap;

use skiff_format::{
    encode_chunk, Attrs, BlobInfo, ChunkHash, ChunkInfo, Digest, FileChunk, FormatError, ImageTree,
    Node, NodeData, NodeId,
};

/// A deterministic pseudo-random generator (xorshift64*), so that the
/// benchmarks need no `rand` and always see the same bytes.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `len` bytes that compress about like program files (roughly 2.5:1 with
/// zstd): words from a small vocabulary with random numbers between them.
pub fn compressible_data(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"import ",
        b"def ",
        b"return ",
        b"self",
        b"value",
        b"numpy",
        b"(",
        b")",
        b":\n    ",
        b"\n",
        b" = ",
        b"None",
        b"for ",
        b" in ",
        b"range",
        b"if ",
        b"else",
        b"class ",
        b"array",
        b"dtype",
        b"int64",
        b"float",
        b"__init__",
        b", ",
    ];
    let mut rng = XorShift::new(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = rng.next_u64();
        if r % 5 == 0 {
            out.extend_from_slice(format!("{}", r >> 40).as_bytes());
        } else {
            out.extend_from_slice(WORDS[(r >> 8) as usize % WORDS.len()]);
        }
    }
    out.truncate(len);
    out
}

/// The name of file `i` in a synthetic directory.
pub fn file_name(i: usize) -> Vec<u8> {
    format!("file-{i:06}.py").into_bytes()
}

/// The name of directory `d` under the root.
pub fn dir_name(d: usize) -> Vec<u8> {
    format!("dir-{d:04}").into_bytes()
}

/// A synthetic image tree of `files` regular files spread over directories
/// of `per_dir` files each (`/dir-DDDD/file-IIIIII.py`), each file with one
/// chunk of a shared blob. Returns the tree and the paths of every file.
pub fn synthetic_tree(files: usize, per_dir: usize) -> (ImageTree, Vec<Vec<u8>>) {
    let dir_attrs = Attrs {
        mode: 0o755,
        ..Attrs::default()
    };
    let file_attrs = Attrs {
        mode: 0o644,
        mtime_sec: 1_700_000_000,
        ..Attrs::default()
    };
    let mut tree = ImageTree {
        chunk_size_hint: 128 << 10,
        ..ImageTree::default()
    };
    tree.nodes.push(Node {
        attrs: dir_attrs.clone(),
        data: NodeData::Directory {
            entries: BTreeMap::new(),
        },
        xattrs: BTreeMap::new(),
    });
    let mut paths = Vec::with_capacity(files);
    let dirs = files.div_ceil(per_dir.max(1));
    let mut offset = 0u64;
    for d in 0..dirs {
        let dir_id: NodeId = tree.nodes.len();
        tree.nodes.push(Node {
            attrs: dir_attrs.clone(),
            data: NodeData::Directory {
                entries: BTreeMap::new(),
            },
            xattrs: BTreeMap::new(),
        });
        add_entry(&mut tree, 0, dir_name(d), dir_id);
        for i in (d * per_dir)..((d + 1) * per_dir).min(files) {
            let size = 1024 + (i as u32 % 4096);
            let chunk_index = tree.chunks.len() as u32;
            tree.chunks.push(ChunkInfo {
                digest: tree.chunk_hash.digest(&(i as u64).to_le_bytes()),
                hash: tree.chunk_hash,
                blob_index: 0,
                compressed: true,
                compressed_offset: offset,
                compressed_size: size / 2,
                uncompressed_size: size,
                frame: None,
            });
            offset += u64::from(size / 2);
            let file_id = tree.nodes.len();
            tree.nodes.push(Node {
                attrs: file_attrs.clone(),
                data: NodeData::Regular {
                    size: u64::from(size),
                    chunks: vec![FileChunk {
                        file_offset: 0,
                        chunk_index,
                    }],
                },
                xattrs: BTreeMap::new(),
            });
            add_entry(&mut tree, dir_id, file_name(i), file_id);
            let mut path = b"/".to_vec();
            path.extend_from_slice(&dir_name(d));
            path.push(b'/');
            path.extend_from_slice(&file_name(i));
            paths.push(path);
        }
    }
    let uncompressed: u64 = tree
        .chunks
        .iter()
        .map(|c| u64::from(c.uncompressed_size))
        .sum();
    tree.blobs.push(BlobInfo {
        digest: Digest::of(b"synthetic blob"),
        size: offset,
        uncompressed_size: uncompressed,
        chunk_count: tree.chunks.len() as u32,
    });
    (tree, paths)
}

fn add_entry(tree: &mut ImageTree, dir: NodeId, name: Vec<u8>, child: NodeId) {
    if let NodeData::Directory { entries } = &mut tree.nodes[dir].data {
        entries.insert(name, child);
    }
}

/// `data` stored as a chunk at zstd `level` (raw when zstd saves nothing),
/// at byte `offset` of blob 0: the stored bytes and the chunk's record
/// (a BLAKE3 digest, as the converter makes).
pub fn stored_chunk(
    data: &[u8],
    level: i32,
    offset: u64,
) -> Result<(Vec<u8>, ChunkInfo), FormatError> {
    let (stored, compressed) = encode_chunk(data, level)?;
    let info = ChunkInfo {
        digest: ChunkHash::Blake3.digest(data),
        hash: ChunkHash::Blake3,
        blob_index: 0,
        compressed,
        compressed_offset: offset,
        compressed_size: stored.len() as u32,
        uncompressed_size: data.len() as u32,
        frame: None,
    };
    Ok((stored, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_tree_round_trips() {
        let (tree, paths) = synthetic_tree(1000, 100);
        let buf = skiff_format::write_bootstrap(&tree).unwrap();
        let b = skiff_format::Bootstrap::parse(&buf).unwrap();
        assert_eq!(b.inode_count(), 1 + 10 + 1000);
        for p in &paths {
            assert!(b.resolve_path(p).unwrap().is_some(), "{p:?}");
        }
        assert!(b.resolve_path(b"/dir-0000/missing").unwrap().is_none());
    }

    #[test]
    fn compressible_data_is_deterministic_and_compresses() {
        let a = compressible_data(1 << 16, 7);
        assert_eq!(a, compressible_data(1 << 16, 7));
        let (stored, compressed) = skiff_format::encode_chunk(&a, 3).unwrap();
        assert!(compressed && stored.len() < a.len() / 2);
    }
}
