//! skiff-fusefs: serves a Skiff image as a read-only FUSE filesystem.
//!
//! Layers, bottom up. The *backend* ([`Backend`]) is a
//! [`skiff_registry::BlobStore`]: `LocalBlobStore` for a layout on disk,
//! `RegistryBlobStore` for HTTP Range requests (it retries inside, within a
//! deadline its caller may shorten), with the store's own counters when it
//! has any. The *source* ([`ChunkSource`]) turns blob ranges into verified
//! chunk data: a small memory cache of decompressed chunks that is also
//! the single-flight point ([`cache`]), a [`DiskCache`] of stored
//! (compressed) chunks shared by all images of a node, and below them a
//! fetch path ([`fetch`]) that merges adjacent missing chunks into few
//! range requests, runs independent ones in parallel and holds at most a
//! fixed budget of bytes in flight ([`ByteBudget`]). Every chunk is
//! verified (SHA-256 of the decoded data) before it is served or cached,
//! and again when read back from disk. The *filesystem* ([`SkiffFs`])
//! answers the kernel from the bootstrap, read in place, and from the
//! source.
//!
//! The read path, top to bottom:
//! 1. [`fs`]: `read(ino, offset, size)` clamps the range at the end of the
//!    file and asks the bootstrap for the chunks that overlap it (on the
//!    FUSE thread; no I/O).
//! 2. [`source`]: if every chunk is in memory or on disk
//!    ([`ChunkSource::get_local`]), the reply is assembled and sent on the
//!    FUSE thread. Otherwise, over a network, the read, its `ReplyData` and
//!    a deadline (its arrival plus the mount's read budget) go to the read
//!    pool ([`workers`]) and the FUSE thread returns at once: a stalled
//!    registry never holds the threads that answer metadata and local
//!    reads. From blobs on this node (an OCI layout) the FUSE thread goes
//!    on with the steps below itself: there a read is CPU work.
//! 3. [`cache`]: on a pool thread, each chunk is looked up in memory; a
//!    miss owns the chunk's load, a chunk that another reader is loading is
//!    waited for until the deadline.
//! 4. [`fetch`]: owned chunks come from the disk cache, else from the
//!    network (coalesced runs, within the in-flight budget and the
//!    deadline), are verified, handed to their waiters and queued for the
//!    disk cache.
//! 5. [`reply`]: the reply is the one chunk that covers the read, as
//!    cached, or the overlapping parts copied out in file order, holes as
//!    zeros.
//!
//! A chunk that cannot be fetched or verified by the deadline makes that
//! read fail with `EIO` and a log line naming the chunk, its digest, its
//! blob and the file; other files are unaffected.
//!
//! Beside the read path: readahead in blob order for readers that walk
//! through what was stored together ([`readahead`]), access recording
//! ([`access`]), prefetch of the image's PREFETCH list after
//! mounting ([`prefetch`]), the background fetch of the rest ([`rest`]),
//! and metrics on a unix socket ([`metrics`]).
//!
//! Failover (see [`keeper`]): as root the FUSE connection is held by a
//! keeper process and served by a worker; a worker that dies is replaced
//! and the new one takes the live mount over, so readers see a pause and no
//! error.
//!
//! Mount time does not grow with the image: the bootstrap is checksummed and
//! served, nothing walks the tree and no data is read at mount.
//!
//! Memory is bounded by design: the memory cache (`cache_bytes`, 4 MiB by
//! default), the bytes in flight (`in_flight_bytes`, 8 MiB), the disk
//! cache's write queue (16 stored chunks), the recycled large buffers (1 MiB,
//! 4 MiB for local blobs, [`buffers`]), the queues of the pools (jobs of
//! a few hundred bytes). Everything else a mount holds is its bootstrap.
//!
//! # Layout
//! Modules depend on those listed before them, never the other way.
//! - [`error`]: [`FsError`] and its errno mapping, [`ChunkError`], [`DaemonError`].
//! - [`metrics`]: counters of the read path ([`Metrics`]), Prometheus text
//!   and the socket that serves it.
//! - [`workers`]: the long-lived pools, scoped parallel runs and the
//!   in-flight [`ByteBudget`].
//! - [`image`]: [`Image`], the bootstrap bytes and their parsed view in one
//!   cell, per-inode checks, paths for messages.
//! - [`chunk`]: [`ChunkRequest`], the [`Backend`] seam, the chunks of a file
//!   range and request planning ([`plan_runs`]: coalescing of adjacent chunks).
//! - [`disk`]: [`DiskCache`]: stored chunks on disk, crash-safe, bounded by
//!   high/low watermarks with LRU eviction, shareable between daemons;
//!   `skiff cache` helpers.
//! - [`reclaim`]: what one image holds in the node's cache directory
//!   (`Usage` of its snapshot) and deleting it when the image is removed.
//! - [`buffers`]: large buffers of the read path recycled (decoded chunks,
//!   runs read from local blobs, assembled replies).
//! - [`cache`]: [`MemoryCache`]: decoded chunks in memory, single flight.
//! - [`link`]: the link to a remote store (round trip, rate), fitted to
//!   the timings of reads' requests.
//! - [`fetch`]: disk lookups, coalesced fetches within a deadline and the
//!   budget, decode, verification, one refetch.
//! - [`source`]: [`ChunkSource`]: memory, then the fetcher; local-only reads.
//! - [`readahead`]: streams in blob order and their background fetches.
//! - [`access`]: the files read, for a prefetch list.
//! - [`rest`]: the background fetch of the rest of the image (a node
//!   setting, off by default).
//! - [`prefetch`]: the PREFETCH list after mounting, then the rest.
//! - [`window`]: what a read's miss fetches besides its own chunks, and how
//!   much: over a network, as much as the round trips it saves are worth.
//! - [`whole_file`]: files read from their start, fetched whole (large
//!   ones: their head) at their first miss.
//! - [`reply`]: a read's reply from the chunks that cover it.
//! - [`fs`]: [`SkiffFs`], the `fuser::Filesystem` (thin adapters over `do_*`),
//!   the hand-off of reads to the read pool (over a network).
//! - [`session`]: the FUSE connection of a mount ([`session::Connection`]):
//!   fuser's own mount, or a keeper's descriptor, mounted fresh or taken
//!   over live.
//! - [`daemon`]: mounting, mountpoint checks, signals, unmounting ([`Daemon`]).
//! - [`process`]: whether a PID is a live `skiff mount` (`/proc` checks
//!   that wait out a process's `execve`).
//! - [`keeper`]: the process that holds a mount's connection across the
//!   death or upgrade of the one serving it.

pub mod access;
pub mod buffers;
pub mod cache;
pub mod chunk;
pub mod daemon;
pub mod disk;
pub mod error;
pub mod fetch;
pub mod fs;
pub mod image;
pub mod keeper;
pub mod link;
pub mod metrics;
pub mod prefetch;
pub mod process;
pub mod readahead;
pub mod reclaim;
pub mod reply;
pub mod rest;
pub mod session;
pub mod source;
#[cfg(test)]
mod testutil;
pub mod whole_file;
pub mod window;
pub mod workers;

pub use cache::{ChunkData, MemoryCache};
pub use chunk::{file_chunk_requests, frame_siblings, plan_runs, Backend, ChunkRequest, Run};
pub use daemon::{check_mountpoint, mount, Daemon, MountOptions, Stopped};
pub use disk::{CacheLimit, DiskCache, DiskStats, Watermarks};
pub use error::{ChunkError, DaemonError, FsError};
pub use fetch::SourceOptions;
pub use fs::SkiffFs;
pub use image::{BootstrapBytes, Image};
pub use metrics::{Metrics, MetricsSnapshot};
pub use prefetch::PrefetchMode;
pub use reply::{assemble, ReplyBytes};
pub use rest::BackgroundFetch;
pub use source::ChunkSource;
pub use workers::ByteBudget;
