//! Helpers shared by the integration tests: a tree builder, a byte-level
//! patcher for hand-made hostile bootstraps, and `exercise`, which calls
//! every reader entry point and must never panic.

#![allow(dead_code)]

use std::collections::BTreeMap;

use skiff_format::layout::SECTION_ENTRY_SIZE;
use skiff_format::{
    reseal, write_bootstrap, Attrs, BlobInfo, Bootstrap, ChunkHash, ChunkInfo, Digest, FileChunk,
    ImageTree, InodeId, Node, NodeData, NodeId,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Builds trees by path-free calls: `add(parent, name, data)`.
pub struct Builder {
    pub tree: ImageTree,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    pub fn new() -> Self {
        Builder {
            tree: ImageTree {
                nodes: vec![node(
                    0o755,
                    NodeData::Directory {
                        entries: BTreeMap::new(),
                    },
                )],
                chunks: Vec::new(),
                blobs: vec![BlobInfo {
                    digest: Digest::of(b"blob 0"),
                    size: 0,
                    uncompressed_size: 0,
                    chunk_count: 0,
                }],
                prefetch: Vec::new(),
                prefetch_ranges: Vec::new(),
                chunk_size_hint: (1 << 32) | 65536,
                chunk_hash: ChunkHash::Blake3,
            },
        }
    }

    /// Adds a new node named `name` in directory `parent`.
    pub fn add(&mut self, parent: NodeId, name: &[u8], data: NodeData) -> NodeId {
        let mode = match data {
            NodeData::Directory { .. } => 0o755,
            NodeData::Symlink { .. } => 0o777,
            _ => 0o644,
        };
        self.tree.nodes.push(node(mode, data));
        let id = self.tree.nodes.len() - 1;
        self.link(parent, name, id);
        id
    }

    /// Adds an entry `name` in `parent` for the existing node `target`.
    pub fn link(&mut self, parent: NodeId, name: &[u8], target: NodeId) {
        match &mut self.tree.nodes[parent].data {
            NodeData::Directory { entries } => {
                entries.insert(name.to_vec(), target);
            }
            _ => panic!("node {parent} is not a directory"),
        }
    }

    pub fn dir(&mut self, parent: NodeId, name: &[u8]) -> NodeId {
        self.add(
            parent,
            name,
            NodeData::Directory {
                entries: BTreeMap::new(),
            },
        )
    }

    /// Adds a chunk of `size` bytes in blob 0; returns its index.
    pub fn chunk(&mut self, size: u32) -> u32 {
        let i = self.tree.chunks.len() as u32;
        let offset = self.tree.blobs[0].size;
        self.tree.chunks.push(ChunkInfo {
            digest: ChunkHash::Blake3.digest(format!("chunk {i}").as_bytes()),
            hash: ChunkHash::Blake3,
            blob_index: 0,
            compressed: i % 2 == 0,
            compressed_offset: offset,
            compressed_size: if i % 2 == 0 { size / 2 + 1 } else { size },
            uncompressed_size: size,
            frame: None,
        });
        let c = self.tree.chunks[i as usize];
        let b = &mut self.tree.blobs[0];
        b.size += u64::from(c.compressed_size);
        b.uncompressed_size += u64::from(size);
        b.chunk_count += 1;
        i
    }

    /// Adds a regular file whose chunks of `sizes` are laid end to end.
    pub fn file(&mut self, parent: NodeId, name: &[u8], sizes: &[u32]) -> NodeId {
        let mut offset = 0;
        let mut chunks = Vec::new();
        for &s in sizes {
            let chunk_index = self.chunk(s);
            chunks.push(FileChunk {
                file_offset: offset,
                chunk_index,
            });
            offset += u64::from(s);
        }
        self.add(
            parent,
            name,
            NodeData::Regular {
                size: offset,
                chunks,
            },
        )
    }

    pub fn write(&self) -> Vec<u8> {
        write_bootstrap(&self.tree).expect("tree should be writable")
    }
}

pub fn node(mode: u32, data: NodeData) -> Node {
    Node {
        attrs: Attrs {
            mode,
            uid: 0,
            gid: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 0,
        },
        data,
        xattrs: BTreeMap::new(),
    }
}

/// Byte offset of record `index` of section `kind` in `buf`.
pub fn record_offset(buf: &[u8], kind: u32, index: usize) -> usize {
    let count = u32::from_le_bytes(buf[24..28].try_into().unwrap()) as usize;
    for i in 0..count {
        let e = 64 + i * SECTION_ENTRY_SIZE;
        let k = u32::from_le_bytes(buf[e..e + 4].try_into().unwrap());
        if k == kind {
            let rs = u32::from_le_bytes(buf[e + 4..e + 8].try_into().unwrap()) as usize;
            let off = u64::from_le_bytes(buf[e + 8..e + 16].try_into().unwrap()) as usize;
            return off + index * rs;
        }
    }
    panic!("no section of kind {kind}")
}

/// Edits record `index` of section `kind` in place, then recomputes every CRC
/// so that only the structural checks stand between the edit and the reader.
pub fn patch<T>(buf: &mut [u8], kind: u32, index: usize, edit: impl FnOnce(&mut T))
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable,
{
    let off = record_offset(buf, kind, index);
    let size = std::mem::size_of::<T>();
    let mut rec = T::read_from_bytes(&buf[off..off + size]).unwrap();
    edit(&mut rec);
    buf[off..off + size].copy_from_slice(rec.as_bytes());
    reseal(buf).unwrap();
}

/// Calls every reader entry point on `data`. Errors are fine, panics are
/// bugs. Returns whether the bootstrap parsed and validated.
pub fn exercise(data: &[u8]) -> (bool, bool) {
    let Ok(b) = Bootstrap::parse(data) else {
        return (false, false);
    };
    let valid = b.validate().is_ok();
    let tree = b.to_tree();
    assert_eq!(valid, tree.is_ok(), "validate and to_tree disagree");
    if let Ok(tree) = &tree {
        // A valid bootstrap decodes to a tree the writer accepts, and that
        // tree survives another round trip unchanged.
        let again = write_bootstrap(tree).expect("a validated tree must be writable");
        let back = Bootstrap::parse(&again).unwrap().to_tree().unwrap();
        assert_eq!(&back, tree);
    }
    let _ = skiff_format::dump(&b);
    let _ = b.prefetch();
    let _ = b.prefetch_ranges();
    for i in 0..b.chunk_count().min(1000) {
        let _ = b.chunk(i);
    }
    for i in 0..b.blob_count().min(1000) {
        let _ = b.blob(i);
    }
    let _ = b.chunk(u32::MAX);
    let _ = b.blob(u32::MAX);
    let _ = b.inode(InodeId(u32::MAX));
    for i in 0..b.inode_count().min(1000) {
        let id = InodeId(i);
        let Ok(inode) = b.inode(id) else { continue };
        // Every inode of a valid bootstrap passes the per-inode check.
        let checked = b.check_inode(id);
        assert!(
            !valid || checked.is_ok(),
            "validate passes but check_inode({i}) fails: {checked:?}"
        );
        let _ = (
            inode.kind(),
            inode.mode(),
            inode.nlink(),
            inode.size(),
            inode.mtime(),
        );
        let _ = b.inode(inode.parent());
        let _ = b.dir_len(id);
        let _ = b.dir_entry(id, 0);
        let _ = b.dir_entry(id, u32::MAX);
        if let Ok(entries) = b.dir_entries(id) {
            for e in entries.take(100).flatten() {
                let _ = b.lookup(id, e.name);
            }
        }
        let _ = b.lookup(id, b"no such name");
        let _ = b.lookup(id, b"");
        let _ = b.symlink_target(id);
        if let Ok(x) = b.xattrs(id) {
            for (name, _) in x.take(100).flatten() {
                let _ = b.getxattr(id, name);
            }
        }
        let _ = b.getxattr(id, b"user.none");
        let _ = b.file_chunks(id);
        for (off, len) in [
            (0, 1),
            (0, u64::MAX),
            (4096, 8192),
            (u64::MAX, u64::MAX),
            (1, 0),
        ] {
            let _ = b.chunks_in_range(id, off, len);
        }
    }
    for p in [
        &b"/"[..],
        b"a/b/c",
        b"/..",
        b"../../x",
        b"bin/ls",
        b"//a//./b/",
    ] {
        let _ = b.resolve_path(p);
    }
    (true, valid)
}
