//! [`Error`], the snapshotter's one error type, and how it maps to gRPC
//! status codes (which containerd's client maps back to its `errdefs`).

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the snapshotter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot (or parent) by that name: `NotFound`.
    #[error("{0}: not found")]
    NotFound(String),
    /// A snapshot by that name exists already: `AlreadyExists`. Also the
    /// answer to a `Prepare` of a layer that the snapshotter provides itself.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the operation (e.g. committing
    /// a view, removing a snapshot with children): `FailedPrecondition`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A malformed request (empty key, unknown update field, bad filter):
    /// `InvalidArgument`.
    #[error("{0}")]
    InvalidArgument(String),
    /// A file system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path operated on.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The metadata file cannot be read or written.
    #[error("metadata {}: {message}", path.display())]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An image could not be resolved or opened.
    #[error("image {reference}: {message}")]
    Image {
        /// The image reference.
        reference: String,
        /// What went wrong.
        message: String,
    },
    /// A FUSE daemon could not be started, checked or stopped.
    #[error("image mount {}: {message}", dir.display())]
    Mount {
        /// The mount point.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The configuration cannot be used.
    #[error("configuration: {0}")]
    Config(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(String),
    /// Anything else that should not happen (a task panicked, ...).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// The gRPC status code containerd maps to the matching `errdefs` error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::Image { .. } | Error::Mount { .. } => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Error {
        Error::Internal(format!("a blocking task failed: {e}"))
    }
}
