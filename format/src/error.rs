//! The one error type of this crate.
//!
//! Every message names the record, field and value that was wrong, because
//! the reader of the message is usually someone holding a broken bootstrap
//! and a hex editor, not a debugger.

/// Everything that can go wrong when reading, writing or checking Skiff data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The buffer does not start with [`crate::layout::MAGIC`].
    #[error("bad magic: not a skiff bootstrap")]
    BadMagic,
    /// The major version is not one this reader understands.
    #[error(
        "unsupported bootstrap version {major}.{minor} (this reader supports {}.x)",
        crate::layout::VERSION_MAJOR
    )]
    UnsupportedVersion {
        /// Major version found in the superblock.
        major: u16,
        /// Minor version found in the superblock.
        minor: u16,
    },
    /// The superblock `flags` field has bits this reader does not know.
    #[error("superblock flags {0:#010x} name incompatible features this reader lacks")]
    UnknownFlags(u32),
    /// The buffer ends before a structure it must contain.
    #[error("truncated {what}: need {needed} bytes, have {available}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A CRC-32 does not match the bytes it covers.
    #[error("{section} checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        /// The header or the name of the section.
        section: &'static str,
        /// The CRC stored in the bootstrap.
        expected: u32,
        /// The CRC of the bytes as they are.
        actual: u32,
    },
    /// A block CRC (format 1.2, BLOCK_CRCS) does not match the 64 KiB block
    /// at `offset`: the bootstrap was damaged after it was written.
    #[error("bootstrap block at offset {offset} checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    BlockChecksumMismatch {
        /// Offset of the block in the bootstrap.
        offset: u64,
        /// The CRC stored in BLOCK_CRCS.
        expected: u32,
        /// The CRC of the bytes as they are.
        actual: u32,
    },
    /// An index, offset or range points outside the data it refers to.
    #[error("out of bounds: {what}")]
    OutOfBounds {
        /// Which record and field, with the values involved.
        what: String,
    },
    /// A directory operation was applied to an inode (index given) that is not a directory.
    #[error("inode {0} is not a directory")]
    NotADirectory(u32),
    /// A file operation was applied to an inode (index given) that is not a regular file.
    #[error("inode {0} is not a regular file")]
    NotARegularFile(u32),
    /// A symlink operation was applied to an inode (index given) that is not a symlink.
    #[error("inode {0} is not a symlink")]
    NotASymlink(u32),
    /// The bootstrap is internally inconsistent.
    #[error("corrupt bootstrap: {0}")]
    Corrupt(String),
    /// A string is not a valid SHA-256 digest.
    #[error("bad digest {0:?}: expected \"sha256:\" followed by 64 lowercase hex digits")]
    BadDigest(String),
    /// A chunk hash name other than `sha256` or `blake3`.
    #[error("unknown chunk hash {0:?}: expected \"sha256\" or \"blake3\"")]
    BadChunkHash(String),
    /// Chunk data does not hash to the digest recorded for it.
    #[error(
        "chunk digest mismatch: expected {}, got {}",
        hash.label(expected),
        hash.label(actual)
    )]
    ChunkDigestMismatch {
        /// The image's chunk hash function.
        hash: crate::ChunkHash,
        /// The digest in the CHUNKS record.
        expected: crate::Digest,
        /// The digest of the decoded data.
        actual: crate::Digest,
    },
    /// Stored or decoded chunk data has the wrong length.
    #[error("chunk {field} mismatch: expected {expected} bytes, got {actual}")]
    ChunkLength {
        /// `compressed_size` or `uncompressed_size`.
        field: &'static str,
        /// The length the CHUNKS record promises.
        expected: u64,
        /// The length found.
        actual: u64,
    },
    /// zstd could not compress or decompress a chunk.
    #[error("zstd: {0}")]
    Decompress(String),
    /// An [`crate::ImageTree`] given to the writer breaks a rule of the format.
    #[error("invalid tree: {0}")]
    InvalidTree(String),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
