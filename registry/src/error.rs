//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

use skiff_format::Digest;

/// Everything that can go wrong while reading or writing images.
///
/// Each message names the file, digest, tag or reference at fault, so that a
/// caller can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An image reference (`oci:DIR[:TAG]`, ...) that does not parse.
    #[error("invalid image reference '{reference}': {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A reference with a transport this crate does not know.
    #[error(
        "unknown transport '{transport}' in '{reference}' — expected oci:DIR[:TAG], docker-archive:FILE or docker://REF"
    )]
    UnknownTransport {
        /// The transport prefix (with its colon), or the empty string if none.
        transport: String,
        /// The reference as given.
        reference: String,
    },
    /// A `--platform` string that does not parse.
    #[error("invalid platform '{0}': expected os/arch[/variant], e.g. linux/amd64")]
    InvalidPlatform(String),
    /// Image content that is malformed or inconsistent: the message says
    /// which image and which part.
    #[error("{0}")]
    Invalid(String),
    /// A tag, image or blob that is not there.
    #[error("{0}")]
    NotFound(String),
    /// Content whose SHA-256 is not what its descriptor says.
    #[error("{what}: digest mismatch: manifest says {expected}, content is {actual}")]
    DigestMismatch {
        /// What was read (blob, manifest or layer, and of which image).
        what: String,
        /// The digest the descriptor promised.
        expected: Digest,
        /// The digest of the bytes actually read.
        actual: Digest,
    },
    /// Content whose length is not what its descriptor says.
    #[error("{what}: size mismatch: manifest says {expected} bytes, content is {actual} bytes")]
    SizeMismatch {
        /// What was read.
        what: String,
        /// The size the descriptor promised.
        expected: u64,
        /// The size actually found (or a lower bound if reading stopped early).
        actual: u64,
    },
    /// No manifest of an index matches the wanted platform.
    #[error("{image}: no manifest for platform {wanted}; available: {available}")]
    NoMatchingPlatform {
        /// The image reference.
        image: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index offers, comma-separated.
        available: String,
    },
    /// A feature that is planned but not built yet.
    #[error("{0}")]
    Unsupported(String),
    /// A registry answered with an HTTP status the operation cannot use.
    #[error("registry {registry}, repository {repository}: {what}: HTTP {status}{detail}")]
    Http {
        /// The registry (`host[:port]`).
        registry: String,
        /// The repository.
        repository: String,
        /// The operation, e.g. `GET blob sha256:...`.
        what: String,
        /// The HTTP status code.
        status: u16,
        /// The registry's error message, if it sent one (starts with `: `).
        detail: String,
    },
    /// A registry could not be reached, or kept failing, through all retries.
    #[error("registry {registry}: {what}: failed after {attempts} attempt(s): {detail}")]
    Network {
        /// The registry (`host[:port]`) or mirror.
        registry: String,
        /// The operation.
        what: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last error.
        detail: String,
    },
    /// A registry refused the credentials, or needs some and has none.
    #[error("registry {registry}: authentication failed: {detail}")]
    Auth {
        /// The registry (`host[:port]`).
        registry: String,
        /// What went wrong (never a secret).
        detail: String,
    },
    /// A registry configuration that cannot be used.
    #[error("registry configuration: {0}")]
    Config(String),
}

impl RegistryError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> RegistryError {
        RegistryError::Io {
            path: path.into(),
            source,
        }
    }
}
