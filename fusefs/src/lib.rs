//! skiff-fusefs: serves a Skiff image as a read-only FUSE filesystem.
//!
//! Layers, bottom up. The *backend* ([`Backend`]) is a
//! [`skiff_registry::BlobStore`]: `LocalBlobStore` for a layout on disk,
//! `RegistryBlobStore` for HTTP Range requests (it retries inside), with
//! the store's own counters when it has any. The *source* ([`ChunkSource`])
//! turns blob ranges into verified chunk data: a memory cache of
//! decompressed chunks bounded by bytes, a [`DiskCache`] of stored
//! (compressed) chunks shared by all images of a node, and below them a
//! fetch path that merges adjacent missing chunks into few range requests
//! and runs independent ones in parallel; concurrent misses on one chunk do
//! the work once. Every chunk is verified (SHA-256 of the decoded data)
//! before it is served or cached, and again when read back from disk. The
//! *filesystem* ([`SkiffFs`]) answers the kernel from the bootstrap, read
//! in place, and from the source.
//!
//! The read path: `read(ino, offset, size)` clamps the range at the end of
//! the file, asks the bootstrap for the chunks that overlap it, takes them
//! from memory, then disk, then the network (see [`cache`]), copies the
//! overlapping parts out and leaves holes as zeros. A chunk that cannot be
//! fetched or verified makes that read fail with `EIO` and a log line naming
//! the chunk, its digest, its blob and the file; other files are unaffected.
//!
//! Off the read path (see [`background`]): chunk readahead for sequential
//! readers, prefetch of the image's PREFETCH list after mounting, recording
//! of the files a workload reads (to make such a list), and metrics on a
//! unix socket ([`metrics`]).
//!
//! Failover (see [`keeper`]): as root the FUSE connection is held by a
//! keeper process and served by a worker; a worker that dies is replaced
//! and the new one takes the live mount over, so readers see a pause and no
//! error.
//!
//! Mount time does not grow with the image: the bootstrap is checksummed and
//! served, nothing walks the tree and no data is read at mount.
//!
//! # Layout
//! - [`chunk`]: [`ChunkRequest`], the [`Backend`] seam and request planning
//!   ([`plan_runs`]: coalescing of adjacent chunks).
//! - [`cache`]: [`ChunkSource`]: memory cache, disk lookups, coalesced
//!   parallel fetches, verification, single flight.
//! - [`disk`]: [`DiskCache`]: stored chunks on disk, crash-safe, LRU-bounded,
//!   shareable between daemons; `skiff cache` helpers.
//! - [`background`]: readahead, prefetch, access recording.
//! - [`image`]: [`Image`], the bootstrap bytes and their parsed view in one cell.
//! - [`fs`]: [`SkiffFs`], the `fuser::Filesystem` (thin adapters over `do_*`).
//! - [`daemon`]: mounting, mountpoint checks, signals, unmounting ([`Daemon`]).
//! - [`error`]: [`FsError`] and its errno mapping, [`ChunkError`], [`DaemonError`].
//! - [`metrics`]: counters of the read path ([`Metrics`]), Prometheus text
//!   and the socket that serves it.
//! - [`session`]: the FUSE connection of a mount ([`session::Connection`]):
//!   fuser's own mount, or a keeper's descriptor, mounted fresh or taken
//!   over live.
//! - [`keeper`]: the process that holds a mount's connection across the
//!   death or upgrade of the one serving it.

pub mod background;
pub mod cache;
pub mod chunk;
pub mod daemon;
pub mod disk;
pub mod error;
pub mod fs;
pub mod image;
pub mod keeper;
pub mod metrics;
pub mod session;

pub use background::PrefetchMode;
pub use cache::{ChunkData, ChunkSource, SourceOptions};
pub use chunk::{plan_runs, Backend, ChunkRequest, Run};
pub use daemon::{check_mountpoint, mount, Daemon, MountOptions, Stopped};
pub use disk::{DiskCache, DiskStats};
pub use error::{ChunkError, DaemonError, FsError};
pub use fs::SkiffFs;
pub use image::{BootstrapBytes, Image};
pub use metrics::{Metrics, MetricsSnapshot};
