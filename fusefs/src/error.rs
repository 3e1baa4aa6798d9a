//! The errors of this crate, and the one place where they become errno values.
//!
//! Every `Filesystem` method of [`crate::fs`] returns `Result<_, FsError>` from
//! its `do_*` body; [`FsError::errno`] is the only translation to the numbers
//! the kernel sees. A corrupt bootstrap record or a bad chunk is `EIO`, never
//! a panic and never wrong bytes.

use skiff_format::FormatError;

/// Why a chunk could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The stored bytes could not be read from the blob store.
    #[error("fetching the stored bytes: {0}")]
    Fetch(String),
    /// The stored bytes do not decode to the chunk (bad zstd frame, wrong
    /// length or digest mismatch): the blob is damaged.
    #[error("decoding: {0}")]
    Decode(#[source] FormatError),
    /// The data of the chunk's digest (verified, or shared with another
    /// chunk of the same digest) is not as long as this chunk's record
    /// says: the bootstrap's records disagree with each other.
    #[error(
        "the data of digest {digest} is {actual} bytes, but this chunk's record says {expected}"
    )]
    RecordMismatch {
        /// The digest in the chunk record.
        digest: skiff_format::Digest,
        /// The record's `uncompressed_size`.
        expected: u32,
        /// The length of the data of that digest.
        actual: usize,
    },
}

/// Errors of the filesystem operations.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such entry or inode (`ENOENT`).
    #[error("no such file or directory")]
    NotFound,
    /// A directory operation on something that is not one (`ENOTDIR`).
    #[error("not a directory")]
    NotDir,
    /// A file operation on a directory (`EISDIR`).
    #[error("is a directory")]
    IsDir,
    /// Any modification: the image is immutable (`EROFS`).
    #[error("read-only file system")]
    ReadOnly,
    /// The extended attribute does not exist (`ENODATA`).
    #[error("no such attribute")]
    NoAttr,
    /// The caller's buffer is too small for the answer (`ERANGE`).
    #[error("result too large for the buffer")]
    Range,
    /// A name longer than 255 bytes (`ENAMETOOLONG`).
    #[error("name too long")]
    NameTooLong,
    /// `SEEK_DATA` past the last data or an offset past the end (`ENXIO`).
    #[error("no data or hole at this offset")]
    NoSuchOffset,
    /// An argument that does not apply, e.g. readlink of a regular file (`EINVAL`).
    #[error("invalid argument")]
    Invalid,
    /// The bootstrap is corrupt where this operation looked (`EIO`).
    #[error("bootstrap: {0}")]
    Format(#[from] FormatError),
    /// The read's budget was spent before its chunks could be fetched
    /// (`EIO`: the reader is told the data is unavailable, as for a failed
    /// fetch).
    #[error("the read's time budget was spent waiting to fetch")]
    TimedOut,
    /// A chunk could not be fetched or failed verification (`EIO`).
    #[error("chunk {index}: {source}")]
    Chunk {
        /// CHUNKS index of the chunk.
        index: u32,
        /// What went wrong.
        #[source]
        source: ChunkError,
    },
}

impl FsError {
    /// The errno this error is reported as.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid => libc::EINVAL,
            FsError::NoSuchOffset => libc::ENXIO,
            FsError::Format(FormatError::NotADirectory(_)) => libc::ENOTDIR,
            FsError::Format(FormatError::NotASymlink(_)) => libc::EINVAL,
            FsError::Format(_) | FsError::TimedOut | FsError::Chunk { .. } => libc::EIO,
        }
    }

    /// Whether this error means something is broken (as opposed to an
    /// ordinary answer such as `ENOENT`), so that it deserves a log line.
    pub fn is_failure(&self) -> bool {
        self.errno() == libc::EIO
    }
}

/// Errors of mounting and running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The mountpoint is missing or not a directory.
    #[error("mountpoint {path}: {message}")]
    Mountpoint {
        /// The mountpoint.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A FUSE mount is left at the mountpoint by a daemon that died.
    #[error(
        "stale mount at {0} left by a dead daemon; run `fusermount3 -u {0}` (or pass --force-unmount)"
    )]
    StaleMount(String),
    /// The bootstrap does not parse or validate.
    #[error("invalid bootstrap")]
    Bootstrap(#[from] FormatError),
    /// Mounting, unmounting or serving failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
