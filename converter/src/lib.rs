//! skiff-converter: OCI layers in, a Skiff image out; and back again.
//!
//! The converter reads an image's layers in order, applies them with OCI
//! whiteout semantics to one merged tree, cuts file contents into chunks,
//! deduplicates them by SHA-256 (within a layer, across layers and against
//! chunk dictionaries of earlier images), compresses each new chunk as its own
//! zstd frame into one data blob per layer, and finally writes the bootstrap
//! (docs/format.md). The same crate holds the tools that prove nothing was
//! lost: [`unpack`](unpack::unpack) writes the tree back out and
//! [`check`](check::check) verifies every checksum and chunk.
//!
//! Architecture invariant: this crate never publishes anything itself. Data
//! blobs go to a [`BlobSink`] (which makes them visible only when complete) and
//! the caller writes the manifest last, so a failed conversion leaves nothing
//! that looks like a finished image.
//!
//! # Layout
//! - [`convert`]: the driver, [`Converter`], its options and figures.
//! - [`layer`]: one tar stream into the tree (PAX, GNU, xattrs, hard links).
//! - [`tree`]: the merged tree and whiteout rules.
//! - [`chunker`]: fixed-size and FastCDC chunking over a reusable buffer.
//! - [`pipeline`]: parallel compression and ordered blob writing.
//! - [`cold`]: the files stored after the rest of their layer's blob.
//! - [`decompress`]: gzip/zstd/plain sniffing and diff ID hashing.
//! - [`image`]: whole-image conversion from a reference to a published image.
//! - [`inspect`]: summaries, `stat` and chunk maps for `skiff inspect`.
//! - [`publish`]: the OCI config and manifest of a converted image.
//! - [`record`]: layer records, the reusable result of converting one layer.
//! - [`reuse`]: where records are found (a cache directory, earlier images,
//!   the target registry) and kept.
//! - [`unpack`]: the image's tree back to a directory.
//! - [`check`]: end-to-end verification of an image.

pub mod check;
pub mod chunker;
pub mod cold;
pub mod convert;
pub mod decompress;
mod error;
pub mod image;
pub mod inspect;
pub mod layer;
pub mod pipeline;
pub mod prefetch;
pub mod publish;
pub mod record;
pub mod reuse;
pub mod tree;
pub mod unpack;

pub use chunker::{Chunking, LargeFiles};
pub use convert::{
    BlobOrigin, ConvertOptions, Converted, Converter, LayerOutcome, Progress, Stats,
    DEFAULT_PACK_SIZE,
};
pub use error::ConvertError;
pub use pipeline::{BlobOut, BlobSink};
pub use record::LayerRecord;
