//! The converter's error type.

use std::io;

/// What can go wrong while converting, unpacking or checking an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// A layer's tar stream could not be read or holds an entry Skiff refuses.
    #[error("layer {layer}, entry '{entry}': {message}")]
    Entry {
        /// Which layer (index and digest when known).
        layer: String,
        /// The entry's path as written in the tar.
        entry: String,
        /// What is wrong.
        message: String,
    },
    /// A layer as a whole is unreadable (compression, truncation, digest).
    #[error("layer {layer}: {message}")]
    Layer {
        /// Which layer.
        layer: String,
        /// What is wrong.
        message: String,
    },
    /// Input that breaks a rule of the image format or of the options.
    #[error("{0}")]
    Invalid(String),
    /// The bootstrap could not be written or read.
    #[error("bootstrap: {0}")]
    Format(#[from] skiff_format::FormatError),
    /// Reading or writing an image through the registry crate failed.
    #[error(transparent)]
    Registry(#[from] skiff_registry::RegistryError),
    /// A chunk failed verification, named by file and chunk.
    #[error("{path}: chunk {chunk} ({digest}) at file offset {offset}: {message}")]
    Chunk {
        /// Path of (one of) the file(s) using the chunk.
        path: String,
        /// Index of the chunk in the bootstrap's chunk table.
        chunk: u32,
        /// The chunk's digest.
        digest: skiff_format::Digest,
        /// Offset of the chunk in that file.
        offset: u64,
        /// What is wrong.
        message: String,
    },
    /// Local I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Adds a context sentence to I/O errors.
pub(crate) trait IoContext<T> {
    /// Wraps the error with `context`.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ConvertError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ConvertError> {
        self.map_err(|source| ConvertError::Io {
            context: context(),
            source,
        })
    }
}

impl From<io::Error> for ConvertError {
    fn from(source: io::Error) -> Self {
        ConvertError::Io {
            context: "reading".into(),
            source,
        }
    }
}
