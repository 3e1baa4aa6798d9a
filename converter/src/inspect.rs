//! What `skiff inspect` shows: an image summary, a path's attributes, a
//! directory listing and a file's chunk map, as serialisable values.

use serde::Serialize;
use skiff_format::{Bootstrap, Digest, FileKind, InodeId};

use crate::error::ConvertError;

/// The summary of an image.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Bootstrap size in bytes.
    pub bootstrap_bytes: u64,
    /// Inodes.
    pub inodes: u32,
    /// Inodes per type.
    pub regular_files: u64,
    /// Directories.
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Devices, fifos and sockets.
    pub special: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
    /// Distinct chunks.
    pub chunks: u32,
    /// Uncompressed bytes of distinct chunks.
    pub chunk_bytes: u64,
    /// Chunker setting recorded by the converter.
    pub chunk_size_hint: u64,
    /// The hash of the chunk digests: `blake3` or `sha256`.
    pub chunk_hash: String,
    /// Data blobs.
    pub blobs: Vec<BlobLine>,
    /// Inodes to prefetch.
    pub prefetch: usize,
}

/// One data blob.
#[derive(Debug, Serialize)]
pub struct BlobLine {
    /// Digest.
    pub digest: Digest,
    /// Stored size.
    pub size: u64,
    /// Uncompressed size of its chunks.
    pub uncompressed_size: u64,
    /// Chunks.
    pub chunks: u32,
}

/// `stat` of one path.
#[derive(Debug, Serialize)]
pub struct Stat {
    /// The path asked for.
    pub path: String,
    /// Inode number (as the mount shows it).
    pub ino: u64,
    /// Type.
    pub kind: String,
    /// Full st_mode in octal.
    pub mode: String,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Size.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Device numbers (major, minor).
    pub rdev: (u32, u32),
    /// Symlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Extended attributes (values as lossy text; binary values hex-escaped).
    pub xattrs: Vec<(String, String)>,
    /// Directory entries (name, type).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<(String, String)>,
    /// Chunk map of a regular file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkLine>,
}

/// One line of a file's chunk map.
#[derive(Debug, Serialize)]
pub struct ChunkLine {
    /// Offset in the file.
    pub file_offset: u64,
    /// Chunk table index.
    pub chunk: u32,
    /// Uncompressed length.
    pub size: u32,
    /// Digest of the data, `<hash>:<hex>` (`blake3:` or `sha256:`, the
    /// image's chunk hash).
    pub digest: String,
    /// Blob table index.
    pub blob: u32,
    /// Offset in the blob.
    pub blob_offset: u64,
    /// Stored length.
    pub stored_size: u32,
    /// zstd frame (else raw).
    pub compressed: bool,
}

/// A type's short name.
pub fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Regular => "file",
        FileKind::Directory => "dir",
        FileKind::Symlink => "symlink",
        FileKind::CharDevice => "char",
        FileKind::BlockDevice => "block",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
    }
}

/// Summarises an image (walks the inode table once).
pub fn summary(b: &Bootstrap<'_>, bootstrap_bytes: u64) -> Result<Summary, ConvertError> {
    let mut s = Summary {
        bootstrap_bytes,
        inodes: b.inode_count(),
        regular_files: 0,
        directories: 0,
        symlinks: 0,
        special: 0,
        file_bytes: 0,
        chunks: b.chunk_count(),
        chunk_bytes: 0,
        chunk_size_hint: b.chunk_size_hint(),
        chunk_hash: b.chunk_hash().to_string(),
        blobs: Vec::new(),
        prefetch: b.prefetch()?.len(),
    };
    for i in 0..b.inode_count() {
        let inode = b.inode(InodeId(i))?;
        match inode.kind()? {
            FileKind::Regular => {
                s.regular_files += 1;
                s.file_bytes += inode.size();
            }
            FileKind::Directory => s.directories += 1,
            FileKind::Symlink => s.symlinks += 1,
            _ => s.special += 1,
        }
    }
    for i in 0..b.chunk_count() {
        s.chunk_bytes += u64::from(b.chunk(i)?.uncompressed_size);
    }
    for i in 0..b.blob_count() {
        let blob = b.blob(i)?;
        s.blobs.push(BlobLine {
            digest: blob.digest,
            size: blob.size,
            uncompressed_size: blob.uncompressed_size,
            chunks: blob.chunk_count,
        });
    }
    Ok(s)
}

fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// Describes one path (not following symlinks).
pub fn stat(b: &Bootstrap<'_>, path: &str) -> Result<Stat, ConvertError> {
    let id = b.resolve_path(path.as_bytes())?.ok_or_else(|| {
        ConvertError::Invalid(format!("{path}: no such file or directory in the image"))
    })?;
    let inode = b.inode(id)?;
    let kind = inode.kind()?;
    let mut st = Stat {
        path: path.to_string(),
        ino: u64::from(id.0) + 1,
        kind: kind_name(kind).into(),
        mode: format!("{:o}", inode.mode()),
        uid: inode.uid(),
        gid: inode.gid(),
        nlink: inode.nlink(),
        size: inode.size(),
        mtime: inode.mtime(),
        rdev: inode.rdev(),
        target: None,
        xattrs: Vec::new(),
        entries: Vec::new(),
        chunks: Vec::new(),
    };
    for x in b.xattrs(id)? {
        let (name, value) = x?;
        st.xattrs.push((escape(name), escape(value)));
    }
    match kind {
        FileKind::Symlink => st.target = Some(escape(b.symlink_target(id)?)),
        FileKind::Directory => {
            for e in b.dir_entries(id)? {
                let e = e?;
                st.entries.push((escape(e.name), kind_name(e.kind).into()));
            }
        }
        FileKind::Regular => {
            for fc in b.file_chunks(id)? {
                let c = b.chunk(fc.chunk_index())?;
                st.chunks.push(ChunkLine {
                    file_offset: fc.file_offset(),
                    chunk: fc.chunk_index(),
                    size: c.uncompressed_size,
                    digest: c.hash.label(&c.digest),
                    blob: c.blob_index,
                    blob_offset: c.compressed_offset,
                    stored_size: c.compressed_size,
                    compressed: c.compressed,
                });
            }
        }
        _ => {}
    }
    Ok(st)
}
