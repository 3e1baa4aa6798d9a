//! The in-memory model of an image: what the converter builds, the writer
//! serialises and [`crate::Bootstrap::to_tree`] gives back.
//!
//! The model is deliberately looser than the format: nodes may be left
//! unreachable (the converter's whiteouts) and node numbering is arbitrary.
//! [`canonicalize`] maps a tree to the one form the format can express
//! (reachable nodes only, numbered breadth-first), so that round trips can
//! be compared with `==`.

use std::collections::{BTreeMap, VecDeque};

use crate::layout::{MAX_NAME_LEN, MAX_SYMLINK_LEN, MAX_XATTR_VALUE_LEN, PERM_MASK, S_IFMT};
use crate::{ChunkHash, Digest, FormatError};

/// Index of a node in [`ImageTree::nodes`].
pub type NodeId = usize;

/// The type of a file, as `S_IFMT` and `d_type` distinguish them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl FileKind {
    /// All kinds, in `dirent_type` order.
    pub const ALL: [FileKind; 7] = [
        FileKind::Regular,
        FileKind::Directory,
        FileKind::Symlink,
        FileKind::CharDevice,
        FileKind::BlockDevice,
        FileKind::Fifo,
        FileKind::Socket,
    ];

    /// The `S_IFMT` bits of `st_mode` for this kind.
    pub fn s_ifmt(self) -> u32 {
        match self {
            FileKind::Regular => 0o100000,
            FileKind::Directory => 0o040000,
            FileKind::Symlink => 0o120000,
            FileKind::CharDevice => 0o020000,
            FileKind::BlockDevice => 0o060000,
            FileKind::Fifo => 0o010000,
            FileKind::Socket => 0o140000,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        let fmt = mode & S_IFMT;
        FileKind::ALL.into_iter().find(|k| k.s_ifmt() == fmt)
    }

    /// The DIRENTS `file_type` code: 1 regular, 2 directory, 3 symlink,
    /// 4 char device, 5 block device, 6 fifo, 7 socket.
    pub fn dirent_type(self) -> u8 {
        match self {
            FileKind::Regular => 1,
            FileKind::Directory => 2,
            FileKind::Symlink => 3,
            FileKind::CharDevice => 4,
            FileKind::BlockDevice => 5,
            FileKind::Fifo => 6,
            FileKind::Socket => 7,
        }
    }

    /// The kind with DIRENTS `file_type` code `t`, if any.
    pub fn from_dirent_type(t: u8) -> Option<FileKind> {
        FileKind::ALL.into_iter().find(|k| k.dirent_type() == t)
    }

    /// A short lowercase name (`"dir"`, `"file"`, ...), for dumps and messages.
    pub fn name(self) -> &'static str {
        match self {
            FileKind::Regular => "file",
            FileKind::Directory => "dir",
            FileKind::Symlink => "symlink",
            FileKind::CharDevice => "chardev",
            FileKind::BlockDevice => "blockdev",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
        }
    }
}

/// Ownership, permissions and modification time of a node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Attrs {
    /// Permission bits only (`0o7777`, setuid/setgid/sticky included); the
    /// type bits come from [`NodeData`]. The writer rejects other bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Seconds since the epoch; may be negative.
    pub mtime_sec: i64,
    /// Nanoseconds, < 10^9.
    pub mtime_nsec: u32,
}

/// One chunk placed in a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileChunk {
    /// Offset in the file of the chunk's first byte.
    pub file_offset: u64,
    /// Index into [`ImageTree::chunks`].
    pub chunk_index: u32,
}

/// What a node is, with the data of its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeData {
    /// A directory: names (without `.` and `..`) to nodes.
    Directory {
        /// Entries by name.
        entries: BTreeMap<Vec<u8>, NodeId>,
    },
    /// A regular file.
    Regular {
        /// File size; bytes covered by no chunk are holes (zeros).
        size: u64,
        /// Chunk map, sorted by offset, non-overlapping, within `size`.
        chunks: Vec<FileChunk>,
    },
    /// A symbolic link.
    Symlink {
        /// The target, 1..=4095 bytes without NUL.
        target: Vec<u8>,
    },
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

/// One file, directory or special file. A node named by several directory
/// entries is a hard link (one inode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Ownership, permissions, mtime.
    pub attrs: Attrs,
    /// Kind and kind-specific data.
    pub data: NodeData,
    /// Extended attributes, full names (`user.foo`) to values.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Node {
    /// The kind of this node.
    pub fn kind(&self) -> FileKind {
        match self.data {
            NodeData::Directory { .. } => FileKind::Directory,
            NodeData::Regular { .. } => FileKind::Regular,
            NodeData::Symlink { .. } => FileKind::Symlink,
            NodeData::CharDevice { .. } => FileKind::CharDevice,
            NodeData::BlockDevice { .. } => FileKind::BlockDevice,
            NodeData::Fifo => FileKind::Fifo,
            NodeData::Socket => FileKind::Socket,
        }
    }
}

/// Where one chunk is stored and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Digest of the uncompressed data under `hash`.
    pub digest: Digest,
    /// The function `digest` is made with: the image's
    /// ([`ImageTree::chunk_hash`]), for every chunk of it.
    pub hash: ChunkHash,
    /// Index into [`ImageTree::blobs`].
    pub blob_index: u32,
    /// Stored as one zstd frame (else raw).
    pub compressed: bool,
    /// Offset of the stored bytes in the blob.
    pub compressed_offset: u64,
    /// Length of the stored bytes.
    pub compressed_size: u32,
    /// Length of the chunk data.
    pub uncompressed_size: u32,
    /// Set when the chunk is a slice of a zstd frame shared with other
    /// chunks (format 1.1): `compressed_offset`/`compressed_size` then
    /// locate the whole frame.
    pub frame: Option<SharedFrame>,
}

/// Where a chunk lies in a zstd frame that packs several chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SharedFrame {
    /// Offset of the chunk's data in the decoded frame.
    pub offset: u32,
    /// Length of the decoded frame.
    pub size: u32,
}

/// One data blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// SHA-256 of the blob as stored (its OCI digest).
    pub digest: Digest,
    /// Length of the blob.
    pub size: u64,
    /// Sum of the uncompressed sizes of its chunks.
    pub uncompressed_size: u64,
    /// Number of chunks stored in it.
    pub chunk_count: u32,
}

/// A part of a regular file to fetch first after mount: entries
/// `first..first + count` of its chunk map (1.3, PREFETCH_RANGES).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchRange {
    /// The file.
    pub node: NodeId,
    /// Index of the first entry in the file's chunk map.
    pub first: u32,
    /// Number of entries, at least 1.
    pub count: u32,
}

/// A whole image's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageTree {
    /// All nodes; `nodes[0]` is the root directory. Nodes not reachable from
    /// the root are not written.
    pub nodes: Vec<Node>,
    /// All chunks; [`FileChunk::chunk_index`] indexes this. Every chunk is
    /// written, referenced or not, because it still occupies its blob.
    pub chunks: Vec<ChunkInfo>,
    /// All blobs; [`ChunkInfo::blob_index`] indexes this.
    pub blobs: Vec<BlobInfo>,
    /// Nodes to fetch first after mount, in order.
    pub prefetch: Vec<NodeId>,
    /// Parts of regular files to fetch first after mount, in order (1.3,
    /// PREFETCH_RANGES; empty: none, and the section is not written).
    pub prefetch_ranges: Vec<PrefetchRange>,
    /// Stored in the superblock; informational.
    pub chunk_size_hint: u64,
    /// The function of every chunk's digest (the superblock's
    /// `FEATURE_BLAKE3_CHUNKS`); every [`ChunkInfo::hash`] must be this.
    pub chunk_hash: ChunkHash,
}

/// The breadth-first order of the nodes reachable from the root: the order
/// of inode numbers. Returns that order and, for each old id, its new index.
///
/// With `strict`, a dangling entry or a directory reached a second time is an
/// error; without, dangling entries are skipped and a second reach of a
/// directory is treated like a hard link (it is numbered once either way, so
/// this always terminates).
pub(crate) fn bfs_order(
    tree: &ImageTree,
    strict: bool,
) -> Result<(Vec<NodeId>, Vec<Option<u32>>), FormatError> {
    let mut order = Vec::new();
    let mut new_of: Vec<Option<u32>> = vec![None; tree.nodes.len()];
    if tree.nodes.is_empty() {
        return Ok((order, new_of));
    }
    let mut queue = VecDeque::new();
    order.push(0);
    if let Some(slot) = new_of.get_mut(0) {
        *slot = Some(0);
    }
    queue.push_back(0usize);
    while let Some(dir) = queue.pop_front() {
        let Some(NodeData::Directory { entries }) = tree.nodes.get(dir).map(|n| &n.data) else {
            continue;
        };
        for (name, &child) in entries {
            let Some(slot) = new_of.get_mut(child) else {
                if strict {
                    return Err(FormatError::InvalidTree(format!(
                        "entry {:?} of node {dir} names node {child}, but there are only {} nodes",
                        name.escape_ascii().to_string(),
                        tree.nodes.len()
                    )));
                }
                continue;
            };
            let is_dir = tree
                .nodes
                .get(child)
                .is_some_and(|n| n.kind() == FileKind::Directory);
            match slot {
                Some(_) if is_dir && strict => {
                    return Err(FormatError::InvalidTree(format!(
                        "directory node {child} is reached a second time, by entry {:?} of node {dir} (directories cannot be hard links)",
                        name.escape_ascii().to_string()
                    )));
                }
                Some(_) => {}
                None => {
                    let new = u32::try_from(order.len()).map_err(|_| {
                        FormatError::InvalidTree("more than 2^32 reachable nodes".into())
                    })?;
                    *slot = Some(new);
                    order.push(child);
                    if is_dir {
                        queue.push_back(child);
                    }
                }
            }
        }
    }
    Ok((order, new_of))
}

/// The canonical form of `tree`: only nodes reachable from the root, numbered
/// breadth-first with entries in name order (the inode order of the format);
/// prefetch entries and ranges naming unreachable or nonexistent nodes dropped; chunks,
/// blobs and the chunk size hint unchanged.
///
/// This is total so that tests can call it on anything: dangling directory
/// entries are dropped and a directory reached twice stays shared (the writer
/// rejects both). `to_tree(write_bootstrap(t)) == canonicalize(t)` for every
/// tree the writer accepts.
pub fn canonicalize(tree: &ImageTree) -> ImageTree {
    // Cannot fail without `strict`, but stay total rather than unwrap.
    let Ok((order, new_of)) = bfs_order(tree, false) else {
        return ImageTree::default();
    };
    let remap = |old: NodeId| new_of.get(old).copied().flatten().map(|n| n as NodeId);
    let nodes = order
        .iter()
        .filter_map(|&old| tree.nodes.get(old))
        .map(|node| {
            let data = match &node.data {
                NodeData::Directory { entries } => NodeData::Directory {
                    entries: entries
                        .iter()
                        .filter_map(|(name, &child)| Some((name.clone(), remap(child)?)))
                        .collect(),
                },
                other => other.clone(),
            };
            Node {
                attrs: node.attrs.clone(),
                data,
                xattrs: node.xattrs.clone(),
            }
        })
        .collect();
    ImageTree {
        nodes,
        chunks: tree.chunks.clone(),
        blobs: tree.blobs.clone(),
        prefetch: tree.prefetch.iter().filter_map(|&p| remap(p)).collect(),
        prefetch_ranges: tree
            .prefetch_ranges
            .iter()
            .filter_map(|r| {
                Some(PrefetchRange {
                    node: remap(r.node)?,
                    ..*r
                })
            })
            .collect(),
        chunk_size_hint: tree.chunk_size_hint,
        chunk_hash: tree.chunk_hash,
    }
}

/// Checks a directory entry name: 1..=255 bytes, no `/` or NUL, not `.`/`..`.
/// The error says what is wrong with it.
pub fn check_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name length {} not in 1..={MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(format!(
            "name {:?} contains '/' or NUL",
            name.escape_ascii().to_string()
        ));
    }
    if name == b"." || name == b".." {
        return Err(format!(
            "name {:?} is reserved",
            name.escape_ascii().to_string()
        ));
    }
    Ok(())
}

/// Checks an xattr name (1..=255 bytes, no NUL) and value (<= 65536 bytes).
pub(crate) fn check_xattr(name: &[u8], value_len: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "xattr name length {} not in 1..={MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.contains(&0) {
        return Err(format!(
            "xattr name {:?} contains NUL",
            name.escape_ascii().to_string()
        ));
    }
    if value_len > MAX_XATTR_VALUE_LEN {
        return Err(format!(
            "xattr {:?} value length {value_len} > {MAX_XATTR_VALUE_LEN}",
            name.escape_ascii().to_string()
        ));
    }
    Ok(())
}

/// Checks a symlink target: 1..=4095 bytes, no NUL.
pub(crate) fn check_symlink(target: &[u8]) -> Result<(), String> {
    if target.is_empty() || target.len() > MAX_SYMLINK_LEN {
        return Err(format!(
            "symlink target length {} not in 1..={MAX_SYMLINK_LEN}",
            target.len()
        ));
    }
    if target.contains(&0) {
        return Err("symlink target contains NUL".into());
    }
    Ok(())
}

/// Checks permission bits and mtime.
pub(crate) fn check_attrs(mode: u32, mtime_nsec: u32) -> Result<(), String> {
    if mode & !PERM_MASK != 0 {
        return Err(format!("mode {mode:#o} has bits outside {PERM_MASK:#o}"));
    }
    if mtime_nsec >= 1_000_000_000 {
        return Err(format!("mtime_nsec {mtime_nsec} >= 10^9"));
    }
    Ok(())
}

/// Checks a chunk record's own fields against the blob count.
pub(crate) fn check_chunk(info: &ChunkInfo, blob_count: usize) -> Result<(), String> {
    use crate::layout::{MAX_CHUNK_SIZE, MAX_STORED_CHUNK_SIZE};
    if info.blob_index as usize >= blob_count {
        return Err(format!(
            "blob_index {} >= blob count {blob_count}",
            info.blob_index
        ));
    }
    if info.uncompressed_size == 0 || info.uncompressed_size > MAX_CHUNK_SIZE {
        return Err(format!(
            "uncompressed_size {} not in 1..={MAX_CHUNK_SIZE}",
            info.uncompressed_size
        ));
    }
    if info.compressed_size == 0 || info.compressed_size > MAX_STORED_CHUNK_SIZE {
        return Err(format!(
            "compressed_size {} not in 1..={MAX_STORED_CHUNK_SIZE}",
            info.compressed_size
        ));
    }
    if !info.compressed && info.compressed_size != info.uncompressed_size {
        return Err(format!(
            "raw chunk has compressed_size {} != uncompressed_size {}",
            info.compressed_size, info.uncompressed_size
        ));
    }
    if let Some(f) = info.frame {
        if !info.compressed {
            return Err("a chunk in a shared frame is not marked zstd".into());
        }
        if f.size == 0 || f.size > MAX_CHUNK_SIZE {
            return Err(format!("frame_size {} not in 1..={MAX_CHUNK_SIZE}", f.size));
        }
        if u64::from(f.offset) + u64::from(info.uncompressed_size) > u64::from(f.size) {
            return Err(format!(
                "frame_offset {} + uncompressed_size {} beyond frame_size {}",
                f.offset, info.uncompressed_size, f.size
            ));
        }
    }
    if info
        .compressed_offset
        .checked_add(u64::from(info.compressed_size))
        .is_none()
    {
        return Err(format!(
            "compressed_offset {} + compressed_size {} overflows",
            info.compressed_offset, info.compressed_size
        ));
    }
    Ok(())
}

/// Checks a file's chunk map: sorted, non-overlapping, within `size`, and
/// naming existing chunks. `chunk_len` gives a chunk's uncompressed size.
pub(crate) fn check_chunk_map(
    size: u64,
    chunks: impl IntoIterator<Item = FileChunk>,
    chunk_len: impl Fn(u32) -> Result<u32, String>,
) -> Result<(), String> {
    let mut prev_end = 0u64;
    for (i, fc) in chunks.into_iter().enumerate() {
        let len = chunk_len(fc.chunk_index).map_err(|e| format!("chunk map entry {i}: {e}"))?;
        if fc.file_offset < prev_end {
            return Err(format!(
                "chunk map entry {i}: file_offset {} < end {prev_end} of the previous entry (unsorted or overlapping)",
                fc.file_offset
            ));
        }
        let end = fc.file_offset.checked_add(u64::from(len)).ok_or_else(|| {
            format!(
                "chunk map entry {i}: file_offset {} + {len} overflows",
                fc.file_offset
            )
        })?;
        if end > size {
            return Err(format!(
                "chunk map entry {i}: file_offset {} + chunk size {len} beyond file size {size}",
                fc.file_offset
            ));
        }
        prev_end = end;
    }
    Ok(())
}
