//! Bootstraps for unit tests: one file whose chunks are given.

use std::collections::BTreeMap;

use skiff_format::{
    write_bootstrap, Attrs, BlobInfo, ChunkInfo, Digest, FileChunk, ImageTree, Node, NodeData,
};

/// A bootstrap of one file, `/f`, made of `chunks` in order (file offsets
/// from their uncompressed sizes), all stored in one blob, `Digest::of(b"blob")`.
pub(crate) fn one_file_bootstrap(chunks: Vec<ChunkInfo>) -> Vec<u8> {
    let attrs = |mode| Attrs {
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
    };
    let mut file_chunks = Vec::with_capacity(chunks.len());
    let mut size = 0u64;
    for (n, c) in chunks.iter().enumerate() {
        file_chunks.push(FileChunk {
            file_offset: size,
            chunk_index: n as u32,
        });
        size += u64::from(c.uncompressed_size);
    }
    let stored = chunks
        .iter()
        .map(|c| c.compressed_offset + u64::from(c.compressed_size))
        .max()
        .unwrap_or(0);
    let file = Node {
        attrs: attrs(0o644),
        data: NodeData::Regular {
            size,
            chunks: file_chunks,
        },
        xattrs: BTreeMap::new(),
    };
    let root = Node {
        attrs: attrs(0o755),
        data: NodeData::Directory {
            entries: BTreeMap::from([(b"f".to_vec(), 1)]),
        },
        xattrs: BTreeMap::new(),
    };
    let hash = chunks
        .first()
        .map_or(skiff_format::ChunkHash::Sha256, |c| c.hash);
    let tree = ImageTree {
        nodes: vec![root, file],
        blobs: vec![BlobInfo {
            digest: Digest::of(b"blob"),
            size: stored,
            uncompressed_size: size,
            chunk_count: chunks.len() as u32,
        }],
        chunk_size_hint: chunks.first().map_or(0, |c| u64::from(c.uncompressed_size)),
        chunks,
        prefetch: Vec::new(),
        prefetch_ranges: Vec::new(),
        chunk_hash: hash,
    };
    write_bootstrap(&tree).expect("a valid test tree")
}
