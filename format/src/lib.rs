//! The Skiff on-disk format: the bootstrap (all of an image's metadata, read
//! in place from a memory map) and the encoding of the chunks its data blobs
//! are made of. `docs/format.md` is the normative description; this crate is
//! its one implementation, shared by the converter (which writes) and by
//! `mount`, `inspect`, `check` and `unpack` (which read).
//!
//! # Architecture invariant
//!
//! This crate does no I/O and never panics on input. It works on `&[u8]` and
//! `Vec<u8>`; the caller chooses between mmap and `read`, and between a local
//! file and a registry. Every offset and index that comes from a buffer is
//! bounds-checked (`get`, `checked_*`) and every failure is a
//! [`FormatError`] naming the record, field and value. There is no `unsafe`.
//!
//! # API boundary
//!
//! - Writing: build an [`ImageTree`] and call [`write_bootstrap`]; encode
//!   chunk data with [`encode_chunk`].
//! - Reading: [`Bootstrap::parse`] a buffer (checks header, section table and
//!   every CRC; O(size) for the CRCs and O(sections) otherwise, so mount time
//!   does not depend on the file count), then ask it for inodes, directory
//!   entries (binary search), xattrs and chunk maps. Fetch a chunk's stored
//!   bytes from its blob, then [`decode_chunk`] them (which verifies the
//!   chunk's digest: SHA-256, or BLAKE3 in a 1.4 image that says so).
//! - Checking: [`Bootstrap::validate`] walks the whole structure;
//!   [`Bootstrap::to_tree`] decodes it back into an [`ImageTree`] (for
//!   `unpack` and round-trip tests); [`dump()`] renders every record as text.
//!
//! Round trip: `to_tree(write_bootstrap(t)) == canonicalize(t)` for every
//! tree the writer accepts, and equal trees give identical bytes.
//!
//! # Layout
//!
//! - [`layout`]: the byte layout as constants and `#[repr(C)]` zerocopy
//!   records, mirroring `docs/format.md` table for table.
//! - [`tree`]: the in-memory model ([`ImageTree`], [`Node`], [`ChunkInfo`],
//!   ...) and [`canonicalize`].
//! - [`writer`]: [`write_bootstrap`], which checks and serialises a tree.
//! - [`reader`]: [`Bootstrap`], the zero-copy reader over a borrowed buffer,
//!   with its [`InodeId`], [`Inode`] and [`DirEntry`] views.
//! - [`chunk`]: [`encode_chunk`] and [`decode_chunk`], one chunk to and from
//!   its stored form (zstd frame or raw), with verification.
//! - [`dump`](mod@dump): the annotated text dump used by `skiff inspect` and the
//!   snapshot test that keeps the spec and the code in step.
//! - [`digest`]: [`Digest`], a SHA-256 written `sha256:<hex>`, and
//!   [`ChunkHash`], the function of an image's chunk digests.
//! - [`error`]: [`FormatError`], the one error type.

pub mod blocks;
pub mod chunk;
pub mod digest;
pub mod dump;
pub mod error;
pub mod layout;
pub mod reader;
pub mod tree;
pub mod writer;

pub use blocks::BlockMarks;
pub use chunk::{
    decode_chunk, decode_chunk_into, decode_chunk_owned, decode_frame, encode_chunk,
    slice_of_frame, MAX_CHUNK_SIZE,
};
pub use digest::{ChunkHash, Digest};
pub use dump::dump;
pub use error::FormatError;
pub use layout::FileChunkRecord;
pub use reader::{Bootstrap, DirEntry, Inode, InodeId};
pub use tree::{
    canonicalize, check_name, Attrs, BlobInfo, ChunkInfo, FileChunk, FileKind, ImageTree, Node,
    NodeData, NodeId, PrefetchRange, SharedFrame,
};
pub use writer::{reseal, write_bootstrap};
