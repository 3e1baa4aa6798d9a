//! skiff-fusefs: serves a Skiff image as a read-only FUSE filesystem.
//!
//! Three layers, bottom up. A *fetcher* ([`ChunkFetcher`]) returns the stored
//! bytes of a chunk: today a range read of a local blob ([`StoreFetcher`]);
//! later a disk cache over HTTP range requests. A *source* ([`ChunkSource`])
//! turns stored bytes into data: it verifies the SHA-256, decompresses, and
//! keeps the result in a memory cache bounded by bytes, where concurrent
//! misses on one chunk fetch it once. The *filesystem* ([`SkiffFs`]) answers
//! the kernel from the bootstrap, read in place, and from the source.
//!
//! The read path: `read(ino, offset, size)` clamps the range at the end of
//! the file, asks the bootstrap for the chunks that overlap it, takes the
//! cached ones and fetches the missing ones in parallel, copies the
//! overlapping parts out and leaves holes as zeros. A chunk that cannot be
//! fetched or verified makes that read fail with `EIO` and a log line naming
//! the chunk, its digest, its blob and the file; other files are unaffected.
//!
//! Mount time does not grow with the image: the bootstrap is checksummed and
//! served, nothing walks the tree and no data is read at mount.
//!
//! # Layout
//! - [`chunk`]: the [`ChunkFetcher`] seam and [`StoreFetcher`] over a `BlobStore`.
//! - [`cache`]: [`ChunkSource`]: verification, decompression, byte-bounded
//!   single-flight memory cache, parallel fetch of a read's chunks.
//! - [`image`]: [`Image`], the bootstrap bytes and their parsed view in one cell.
//! - [`fs`]: [`SkiffFs`], the `fuser::Filesystem` (thin adapters over `do_*`).
//! - [`daemon`]: mounting, mountpoint checks, signals, unmounting ([`Daemon`]).
//! - [`error`]: [`FsError`] and its errno mapping, [`ChunkError`], [`DaemonError`].
//! - [`metrics`]: atomic counters of the read path ([`Metrics`]).

pub mod cache;
pub mod chunk;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod image;
pub mod metrics;

pub use cache::{ChunkData, ChunkSource};
pub use chunk::{ChunkFetcher, ChunkRequest, StoreFetcher};
pub use daemon::{check_mountpoint, mount, Daemon, MountOptions, Stopped};
pub use error::{ChunkError, DaemonError, FsError};
pub use fs::SkiffFs;
pub use image::{BootstrapBytes, Image};
pub use metrics::{Metrics, MetricsSnapshot};
