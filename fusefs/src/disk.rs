//! The disk cache: stored chunk bytes on local disk, shared by every image
//! of a node, bounded by bytes with least-recently-used eviction.
//!
//! # Layout
//!
//! `DIR/chunks/ab/abcdef…` holds the *stored* form (the zstd frame, or the
//! raw bytes) of the chunk whose uncompressed SHA-256 is `abcdef…`, or the
//! stored bytes of a shared frame of packed small files under a key naming
//! where the frame is stored (`ChunkRequest::frame_key`: the blob's
//! digest, offset and size; the cache itself only sees keys). Keying by
//! the content digest is what lets images share: two images with a common
//! base layer, or chunks deduplicated across image versions, use one file.
//! Storing the compressed form halves the bytes written next to caching
//! decompressed data (what Nydus does), and decoding a chunk again costs
//! less than reading twice the bytes back. The stored form is told by its
//! length: a raw chunk is exactly `uncompressed_size` bytes and a zstd frame
//! is always shorter (the converter keeps zstd only when it saves 1/32), so
//! the file of a chunk that two images compressed differently still serves
//! both.
//!
//! # Integrity
//!
//! Nothing from the cache is trusted: every read back is decoded and
//! verified (SHA-256) by the caller before a byte is served, and a file
//! that fails ([`DiskCache::discard`]) is deleted and the chunk refetched.
//! So the fetch path may write chunks it has not verified: those fetched
//! ahead of any reader (readahead, prefetch, fetch windows) are written as
//! they came and verified once, when read, instead of twice. Files are written to `.tmp-PID-N` in their final directory and
//! renamed into place, so a chunk is visible only when complete; there is no
//! fsync, because a file torn by a power cut is caught by the read-back
//! verification like any other damage. Temporary files whose writer is dead
//! (its PID is gone) or that are older than an hour are removed by the
//! start-up scan.
//!
//! # Bound and eviction: the watermarks
//!
//! The cache follows two watermarks ([`Watermarks`]): it grows until the
//! *high* watermark, then evicts least recently used chunks down to the
//! *low* one. Each is a number of bytes or a percentage of the size of the
//! filesystem that holds the cache ([`CacheLimit`]: `10g`, `20%`), resolved
//! once when the cache is opened; the low watermark defaults to 90% of the
//! high one. A gap between the two makes eviction rare and batched: one
//! sort of the index per (high - low) bytes written.
//!
//! An in-memory index maps each known chunk to its size and a recency tick,
//! in sharded maps (no global lock on the read path: a hit touches one
//! shard). The index is rebuilt at start by a scan of the directory, on the
//! writer thread so that mounting does not wait for it; scanned files get
//! ticks ordered by their access/modification time (`max(atime, mtime)`;
//! with `relatime` the first read after a write moves atime), below every
//! tick handed out live. Lookups do not need the index: they open the file,
//! so chunks written by another daemon on the same directory are found too
//! (and then indexed).
//!
//! All writes and evictions happen on one writer thread fed by a bounded
//! queue: the reader that fetched a chunk hands its bytes over and returns.
//! Until its file is in place a queued chunk is *pending*: a lookup that
//! finds no file finds its bytes there, so a chunk is never fetched again
//! because its write has not happened yet.
//! Before writing, the writer makes room: when the known total plus the new
//! file would pass the high watermark, it sorts the index by tick and
//! deletes the oldest files down to the low watermark. So the directory
//! never holds more than the high watermark plus the file being written, as
//! far as this daemon knows. Several daemons may
//! share a directory: each evicts by its own view, refreshed by a rescan
//! when it evicts (at most every 30 s); a file another daemon evicted is
//! just a miss.
//!
//! # Disk full
//!
//! A failed write (ENOSPC, EDQUOT, EIO) removes the temporary file, is
//! logged once at warn level (later ones at debug) and counted; the chunk was
//! already served from memory, so readers never notice.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use skiff_format::Digest;

/// Subdirectory of the cache directory that holds the chunk files.
pub const CHUNKS_DIR: &str = "chunks";
/// Prefix of temporary files (written, then renamed into place).
pub const TEMP_PREFIX: &str = ".tmp-";
/// The node's cache directory when `skiff mount` runs as root (its
/// default; the snapshotter's daemons run as root).
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/skiff";
/// Default bound of the disk cache: 10 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;
/// The default low watermark, in percent of the high one.
pub const DEFAULT_LOW_PERCENT_OF_HIGH: u64 = 90;
/// Chunks waiting for the writer thread. Each holds its stored bytes, or
/// the fetched run of at most [`SHARE_BUFFER_MAX`] they were cut from (see
/// [`Stored`]), so this bounds the queue's memory at 16 MiB at worst; in
/// practice the queued chunks come from one or two runs (a readahead
/// window's, a read's), so about 2 MiB. A reader that finds the queue full
/// waits for one write, which is local.
const WRITE_QUEUE: usize = 16;
/// Index shards.
const SHARDS: usize = 64;
/// Ticks handed out live start here; scanned files rank below.
const LIVE_TICKS: u64 = 1 << 40;
/// Temporary files older than this are removed even if their writer lives.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// A rescan before eviction at most this often.
const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// A watermark of the disk cache: bytes, or a percentage of the size of
/// the filesystem that holds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheLimit {
    /// A number of bytes.
    Bytes(u64),
    /// A percentage (0-100] of the filesystem's size.
    Percent(f64),
}

impl CacheLimit {
    /// Parses `10g`, `512m`, `1048576` (see [`parse_size`]) or `20%`.
    pub fn parse(s: &str) -> Result<CacheLimit, String> {
        let t = s.trim();
        match t.strip_suffix('%') {
            Some(p) => {
                let pct: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("'{t}' is not a percentage (examples: 20%, 7.5%)"))?;
                if !(pct > 0.0 && pct <= 100.0) {
                    return Err(format!(
                        "'{t}': a percentage of the filesystem must be above 0 and at most 100"
                    ));
                }
                Ok(CacheLimit::Percent(pct))
            }
            None => parse_size(t).map(CacheLimit::Bytes),
        }
    }

    /// The limit in bytes on a filesystem of `fs_bytes` bytes.
    pub fn bytes(&self, fs_bytes: u64) -> u64 {
        match *self {
            CacheLimit::Bytes(b) => b,
            // f64 keeps 53 bits: exact to the byte below 8 PiB.
            CacheLimit::Percent(p) => (fs_bytes as f64 * p / 100.0) as u64,
        }
    }
}

impl std::str::FromStr for CacheLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheLimit::parse(s)
    }
}

impl std::fmt::Display for CacheLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheLimit::Bytes(b) => write!(f, "{b}"),
            CacheLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The high and low watermarks of a disk cache, in bytes: above `high`
/// the cache evicts down to `low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// Eviction starts when a write would pass this.
    pub high: u64,
    /// Eviction stops at this.
    pub low: u64,
}

impl Watermarks {
    /// `high`, with the low watermark at its default (90% of it).
    pub fn from_high(high: u64) -> Watermarks {
        Watermarks {
            high,
            low: high / 100 * DEFAULT_LOW_PERCENT_OF_HIGH,
        }
    }

    /// The watermarks of the cache at `dir` (which must exist): percentages
    /// are taken of the size of its filesystem. Without `low`, 90% of the
    /// high watermark. A low watermark above the high one is an error.
    pub fn resolve(
        dir: &Path,
        high: CacheLimit,
        low: Option<CacheLimit>,
    ) -> Result<Watermarks, String> {
        let needs_fs =
            matches!(high, CacheLimit::Percent(_)) || matches!(low, Some(CacheLimit::Percent(_)));
        let fs_bytes = if needs_fs {
            let st = nix::sys::statvfs::statvfs(dir)
                .map_err(|e| format!("cannot size the filesystem of {}: {e}", dir.display()))?;
            st.blocks().saturating_mul(st.fragment_size())
        } else {
            0
        };
        let h = high.bytes(fs_bytes);
        let w = match low {
            None => Watermarks::from_high(h),
            Some(l) => Watermarks {
                high: h,
                low: l.bytes(fs_bytes),
            },
        };
        if w.low > w.high {
            return Err(format!(
                "the low watermark ({}, {} bytes) is above the high watermark ({high}, {} bytes)",
                low.map(|l| l.to_string()).unwrap_or_default(),
                w.low,
                w.high
            ));
        }
        Ok(w)
    }
}

/// Counters and sizes of a disk cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Chunks in the index.
    pub entries: u64,
    /// Bytes of those chunks.
    pub bytes: u64,
    /// The bound: the high watermark.
    pub limit: u64,
    /// The low watermark: eviction frees down to it.
    pub low: u64,
    /// Bytes evicted.
    pub evicted_bytes: u64,
    /// Chunks written.
    pub writes: u64,
    /// Writes that failed.
    pub write_errors: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Files deleted because they failed verification.
    pub discarded: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    tick: u64,
}

/// The stored bytes of one cache entry, as handed to [`DiskCache::insert`]:
/// a range of a shared buffer, so that the chunks cut out of one fetched
/// run are queued without a copy each (a copy is an allocation of the
/// chunk's size, and above glibc's mmap threshold that is a fresh mapping
/// to fault in). A queued entry keeps its whole buffer alive until it is
/// written, so [`Stored::cut`] shares only buffers of at most
/// [`SHARE_BUFFER_MAX`]: the writer's queue (16 entries) then pins at most
/// 16 times that, and larger buffers (prefetch requests of 8 MiB) are
/// copied.
#[derive(Clone)]
pub struct Stored {
    buf: Arc<Vec<u8>>,
    range: Range<usize>,
}

/// Largest buffer that [`Stored::cut`] shares instead of copying from: a
/// read's or a readahead's range request (1 MiB by default).
pub const SHARE_BUFFER_MAX: usize = 1 << 20;

impl Stored {
    /// `range` of `buf`: shared if `buf` is at most [`SHARE_BUFFER_MAX`]
    /// bytes, else copied. `None` if `range` is not within `buf`.
    pub fn cut(buf: &Arc<Vec<u8>>, range: Range<usize>) -> Option<Stored> {
        let part = buf.get(range.clone())?;
        Some(if buf.len() <= SHARE_BUFFER_MAX {
            Stored {
                buf: buf.clone(),
                range,
            }
        } else {
            Stored::from(part.to_vec())
        })
    }

    /// Whether `self` and `other` are the same range of the same buffer.
    fn same(&self, other: &Stored) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf) && self.range == other.range
    }
}

impl From<Vec<u8>> for Stored {
    fn from(bytes: Vec<u8>) -> Stored {
        let range = 0..bytes.len();
        Stored {
            buf: Arc::new(bytes),
            range,
        }
    }
}

impl std::ops::Deref for Stored {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // `cut` and `from` make only ranges within the buffer.
        self.buf.get(self.range.clone()).unwrap_or_default()
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stored({} bytes)", self.range.len())
    }
}

enum Msg {
    Insert(Digest, Stored),
    Flush(mpsc::Sender<()>),
}

struct Inner {
    chunks: PathBuf,
    limit: u64,
    low: u64,
    evicted_bytes: AtomicU64,
    shards: Vec<Mutex<HashMap<Digest, Entry>>>,
    total: AtomicU64,
    tick: AtomicU64,
    writes: AtomicU64,
    write_errors: AtomicU64,
    evictions: AtomicU64,
    discarded: AtomicU64,
    temp_seq: AtomicU64,
    full_logged: AtomicBool,
    /// Chunks queued for writing whose file is not in place yet. Looked at
    /// only when the file is missing (a miss, about to go to the network).
    pending: Mutex<HashMap<Digest, Stored>>,
}

/// A bounded, LRU-evicting, crash-safe cache of stored chunk bytes on disk.
pub struct DiskCache {
    inner: Arc<Inner>,
    tx: Mutex<Option<SyncSender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dir: PathBuf,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .field("limit", &self.inner.limit)
            .finish()
    }
}

/// The path of a chunk's file under `chunks` (`DIR/chunks`).
pub fn chunk_path(chunks: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.to_hex();
    let prefix = hex.get(..2).unwrap_or("00").to_string();
    chunks.join(prefix).join(hex)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps updated in single statements: a panic cannot leave them torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DiskCache {
    /// Opens (creating it if needed) the cache at `dir`, bounded by `limit`
    /// bytes (the low watermark at 90% of it). The scan of what is already
    /// there runs in the background.
    pub fn open(dir: &Path, limit: u64) -> io::Result<DiskCache> {
        DiskCache::open_with(dir, Watermarks::from_high(limit))
    }

    /// [`open`](Self::open) with both watermarks.
    pub fn open_with(dir: &Path, marks: Watermarks) -> io::Result<DiskCache> {
        let limit = marks.high;
        let chunks = dir.join(CHUNKS_DIR);
        fs::create_dir_all(&chunks)?;
        // Fail now, not on the first write, if the directory is not writable.
        let probe = chunks.join(format!("{TEMP_PREFIX}{}-probe", std::process::id()));
        File::create(&probe)?;
        let _ = fs::remove_file(&probe);
        let inner = Arc::new(Inner {
            chunks,
            limit,
            low: marks.low.min(limit),
            evicted_bytes: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            total: AtomicU64::new(0),
            tick: AtomicU64::new(LIVE_TICKS),
            writes: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            temp_seq: AtomicU64::new(0),
            full_logged: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::sync_channel(WRITE_QUEUE);
        let worker = inner.clone();
        let writer = std::thread::Builder::new()
            .name("skiff-disk-cache".into())
            .spawn(move || worker.run(rx))?;
        Ok(DiskCache {
            inner,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            dir: dir.to_path_buf(),
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored bytes of chunk `digest` if the cache has a file for it
    /// (or has it queued for writing) of at most `max_len` bytes.
    /// Unverified: decode before use, and [`discard`](Self::discard) what
    /// fails.
    pub fn get(&self, digest: &Digest, max_len: u64) -> Option<Vec<u8>> {
        // The queue first: the writer renames a file into place before it
        // drops the pending entry, so a chunk that is not pending now is
        // in its file if anywhere, and one open answers (a miss costs one
        // failed path walk, not two).
        if let Some(bytes) = lock(&self.inner.pending).get(digest) {
            return (bytes.len() as u64 <= max_len).then(|| bytes.to_vec());
        }
        let path = chunk_path(&self.inner.chunks, digest);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!("disk cache: opening {}: {e}", path.display());
                }
                // Evicted by another daemon, or never here.
                self.inner.forget(digest);
                return None;
            }
        };
        let size = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        if size > max_len {
            // Not a file this chunk can have: damaged, let the caller refetch.
            self.discard(digest);
            return None;
        }
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        if let Err(e) = file.read_to_end(&mut buf) {
            tracing::debug!("disk cache: reading {}: {e}", path.display());
            return None;
        }
        self.inner.touch(digest, buf.len() as u64);
        Some(buf)
    }

    /// Whether the cache has a file for `digest` (one `stat`), or has it
    /// queued for writing.
    pub fn contains(&self, digest: &Digest) -> bool {
        // The queue first: a map lookup, where the file is a path walk.
        lock(&self.inner.pending).contains_key(digest)
            || chunk_path(&self.inner.chunks, digest).is_file()
    }

    /// Queues the stored bytes of chunk `digest` for writing (they need not
    /// be verified yet: every read back is). Blocks only when the writer is
    /// [`WRITE_QUEUE`] chunks behind.
    pub fn insert(&self, digest: Digest, stored: impl Into<Stored>) {
        let stored = stored.into();
        if stored.len() as u64 > self.inner.limit {
            return;
        }
        let tx = lock(&self.tx).clone();
        if let Some(tx) = tx {
            lock(&self.inner.pending).insert(digest, stored.clone());
            if tx.send(Msg::Insert(digest, stored)).is_err() {
                lock(&self.inner.pending).remove(&digest);
            }
        }
    }

    /// Deletes the file of `digest`: it failed verification.
    pub fn discard(&self, digest: &Digest) {
        let path = chunk_path(&self.inner.chunks, digest);
        tracing::warn!(
            "disk cache: {} failed verification; deleted, refetching the chunk",
            path.display()
        );
        // A queued copy is dropped too, so that the writer skips it.
        lock(&self.inner.pending).remove(digest);
        let _ = fs::remove_file(&path);
        self.inner.forget(digest);
        self.inner.discarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until every chunk queued so far is written (or failed).
    pub fn flush(&self) {
        let tx = lock(&self.tx).clone();
        if let Some(tx) = tx {
            let (done, wait) = mpsc::channel();
            if tx.send(Msg::Flush(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// Counters and sizes.
    pub fn stats(&self) -> DiskStats {
        let i = &self.inner;
        let entries = i.shards.iter().map(|s| lock(s).len() as u64).sum();
        DiskStats {
            entries,
            bytes: i.total.load(Ordering::Relaxed),
            limit: i.limit,
            low: i.low,
            evicted_bytes: i.evicted_bytes.load(Ordering::Relaxed),
            writes: i.writes.load(Ordering::Relaxed),
            write_errors: i.write_errors.load(Ordering::Relaxed),
            evictions: i.evictions.load(Ordering::Relaxed),
            discarded: i.discarded.load(Ordering::Relaxed),
        }
    }

    /// Writes what is queued and stops the writer thread.
    pub fn close(&self) {
        let tx = lock(&self.tx).take();
        drop(tx);
        if let Some(w) = lock(&self.writer).take() {
            let _ = w.join();
        }
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn shard(&self, digest: &Digest) -> &Mutex<HashMap<Digest, Entry>> {
        let i = usize::from(digest.0[0]) % SHARDS;
        // `i < SHARDS == shards.len()`.
        &self.shards[i]
    }

    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }

    /// Records an access (indexing the file if another daemon wrote it).
    fn touch(&self, digest: &Digest, size: u64) {
        let tick = self.next_tick();
        let mut shard = lock(self.shard(digest));
        match shard.get_mut(digest) {
            Some(e) => e.tick = tick,
            None => {
                shard.insert(*digest, Entry { size, tick });
                self.total.fetch_add(size, Ordering::Relaxed);
            }
        }
    }

    /// Drops `digest` from the index.
    fn forget(&self, digest: &Digest) {
        if let Some(e) = lock(self.shard(digest)).remove(digest) {
            self.total.fetch_sub(e.size, Ordering::Relaxed);
        }
    }

    /// The writer thread: scan, then write and evict until the queue closes.
    fn run(self: Arc<Self>, rx: Receiver<Msg>) {
        let t = Instant::now();
        match self.rescan(true) {
            Ok(n) => tracing::info!(
                dir = %self.chunks.display(),
                chunks = n,
                bytes = self.total.load(Ordering::Relaxed),
                limit = self.limit,
                "disk cache scanned in {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => tracing::warn!("disk cache: scanning {}: {e}", self.chunks.display()),
        }
        let mut last_scan = Instant::now();
        // Startup may have found more than the bound (a smaller --cache-size).
        self.make_room(0, &mut last_scan);
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Insert(digest, bytes) => {
                    // Discarded while queued (it failed verification): skip.
                    let queued = lock(&self.pending)
                        .get(&digest)
                        .is_some_and(|p| p.same(&bytes));
                    if queued {
                        self.write(digest, &bytes, &mut last_scan);
                        let mut pending = lock(&self.pending);
                        if pending.get(&digest).is_some_and(|p| p.same(&bytes)) {
                            pending.remove(&digest);
                        }
                    }
                }
                Msg::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    fn write(&self, digest: Digest, bytes: &[u8], last_scan: &mut Instant) {
        let size = bytes.len() as u64;
        if lock(self.shard(&digest)).contains_key(&digest)
            && chunk_path(&self.chunks, &digest).is_file()
        {
            return;
        }
        self.make_room(size, last_scan);
        let path = chunk_path(&self.chunks, &digest);
        match self.write_file(&path, bytes) {
            Ok(()) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                let tick = self.next_tick();
                let mut shard = lock(self.shard(&digest));
                if let Some(old) = shard.insert(digest, Entry { size, tick }) {
                    self.total.fetch_sub(old.size, Ordering::Relaxed);
                }
                self.total.fetch_add(size, Ordering::Relaxed);
            }
            Err(e) => {
                self.write_errors.fetch_add(1, Ordering::Relaxed);
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "disk cache: cannot write {}: {e}; serving from the network (logged once)",
                        path.display()
                    );
                } else {
                    tracing::debug!("disk cache: cannot write {}: {e}", path.display());
                }
            }
        }
    }

    /// Writes `bytes` to a temporary file next to `path` and renames it
    /// into place; on any error the temporary file is removed.
    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::other("chunk path has no parent"))?;
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            self.temp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = match File::create_new(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir)?;
                File::create_new(&tmp)?
            }
            Err(e) => return Err(e),
        };
        let result = file
            .write_all(bytes)
            .and_then(|()| file.flush())
            .and_then(|()| fs::rename(&tmp, path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Evicts least recently used files until `incoming` more bytes fit.
    fn make_room(&self, incoming: u64, last_scan: &mut Instant) {
        if self.total.load(Ordering::Relaxed) + incoming <= self.limit {
            return;
        }
        // Other daemons on this directory may have written or evicted files.
        if last_scan.elapsed() >= RESCAN_EVERY {
            if let Err(e) = self.rescan(false) {
                tracing::debug!("disk cache: rescanning: {e}");
            }
            *last_scan = Instant::now();
            if self.total.load(Ordering::Relaxed) + incoming <= self.limit {
                return;
            }
        }
        let target = self.low.saturating_sub(incoming);
        let mut all: Vec<(u64, Digest, u64)> = Vec::new();
        for shard in &self.shards {
            all.extend(lock(shard).iter().map(|(d, e)| (e.tick, *d, e.size)));
        }
        all.sort_unstable_by_key(|&(tick, _, _)| tick);
        let mut evicted = 0u64;
        for (_, digest, size) in all {
            if self.total.load(Ordering::Relaxed) <= target {
                break;
            }
            match fs::remove_file(chunk_path(&self.chunks, &digest)) {
                Ok(()) => {
                    evicted += 1;
                    self.evicted_bytes.fetch_add(size, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::debug!("disk cache: evicting {digest}: {e}"),
            }
            self.forget(&digest);
        }
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        tracing::debug!(
            evicted,
            bytes = self.total.load(Ordering::Relaxed),
            "disk cache: evicted"
        );
    }

    /// Rebuilds the index from the directory. At start (`initial`), files
    /// get ticks ranked by their times and stale temporary files are
    /// removed; later, files this daemon did not know get a live tick and
    /// entries whose files are gone are dropped.
    fn rescan(&self, initial: bool) -> io::Result<usize> {
        let found = scan(&self.chunks, true)?;
        let mut known: HashMap<Digest, ()> = HashMap::with_capacity(found.files.len());
        let mut files = found.files;
        files.sort_unstable_by_key(|f| f.time);
        for (rank, f) in files.iter().enumerate() {
            known.insert(f.digest, ());
            let mut shard = lock(self.shard(&f.digest));
            if shard.contains_key(&f.digest) {
                continue;
            }
            let tick = if initial {
                rank as u64
            } else {
                self.next_tick()
            };
            shard.insert(f.digest, Entry { size: f.size, tick });
            self.total.fetch_add(f.size, Ordering::Relaxed);
        }
        if !initial {
            for shard in &self.shards {
                let mut shard = lock(shard);
                shard.retain(|d, e| {
                    let keep = known.contains_key(d);
                    if !keep {
                        self.total.fetch_sub(e.size, Ordering::Relaxed);
                    }
                    keep
                });
            }
        }
        Ok(files.len())
    }
}

/// One chunk file found by [`scan`].
#[derive(Debug, Clone)]
struct Found {
    digest: Digest,
    size: u64,
    /// `max(atime, mtime)` in nanoseconds since the epoch.
    time: i128,
}

struct Scan {
    files: Vec<Found>,
    temp_removed: u64,
}

/// Lists the chunk files under `chunks` (`xx/<64 hex>`), removing stale
/// temporary files when `clean` and ignoring anything else.
fn scan(chunks: &Path, clean: bool) -> io::Result<Scan> {
    let mut out = Scan {
        files: Vec::new(),
        temp_removed: 0,
    };
    let top = match fs::read_dir(chunks) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for sub in top.flatten() {
        let Ok(entries) = fs::read_dir(sub.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
                if clean && temp_is_stale(rest, &e.path()) && fs::remove_file(e.path()).is_ok() {
                    out.temp_removed += 1;
                }
                continue;
            }
            let Ok(digest) = name.parse::<Digest>() else {
                continue;
            };
            let Ok(md) = e.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            let time = ns(md.atime(), md.atime_nsec()).max(ns(md.mtime(), md.mtime_nsec()));
            out.files.push(Found {
                digest,
                size: md.len(),
                time,
            });
        }
    }
    Ok(out)
}

/// Whether a temporary file `.tmp-PID-N` is left over: its writer is dead
/// or it is older than [`STALE_TEMP`].
fn temp_is_stale(rest: &str, path: &Path) -> bool {
    let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
    let alive = pid.is_some_and(|p| Path::new("/proc").join(p.to_string()).exists());
    let old = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > STALE_TEMP);
    !alive || old
}

/// What a cache directory holds, for `skiff cache show`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Chunk files.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Counts the chunk files of the cache at `dir` (removing stale temporary files).
pub fn usage(dir: &Path) -> io::Result<Usage> {
    let s = scan(&dir.join(CHUNKS_DIR), true)?;
    Ok(Usage {
        entries: s.files.len() as u64,
        bytes: s.files.iter().map(|f| f.size).sum(),
    })
}

/// Deletes the least recently used chunk files of the cache at `dir` until
/// it holds at most `max_bytes`; returns what was removed. Safe while
/// daemons use the directory: to them a deleted file is a miss.
pub fn trim(dir: &Path, max_bytes: u64) -> io::Result<Usage> {
    let chunks = dir.join(CHUNKS_DIR);
    let mut s = scan(&chunks, true)?;
    s.files.sort_unstable_by_key(|f| f.time);
    let mut total: u64 = s.files.iter().map(|f| f.size).sum();
    let mut removed = Usage::default();
    for f in &s.files {
        if total <= max_bytes {
            break;
        }
        match fs::remove_file(chunk_path(&chunks, &f.digest)) {
            Ok(()) => {
                removed.entries += 1;
                removed.bytes += f.size;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        total = total.saturating_sub(f.size);
    }
    Ok(removed)
}

/// Deletes every chunk file of the cache at `dir`.
pub fn clear(dir: &Path) -> io::Result<Usage> {
    trim(dir, 0)
}

/// Parses a size: a number of bytes with an optional binary suffix
/// `k`, `m`, `g` or `t` (`10g`, `512M`, `1048576`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{t}' is not a size (examples: 10g, 512m, 1048576)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{t}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u32) -> Digest {
        Digest::of(&i.to_le_bytes())
    }

    fn files_bytes(dir: &Path) -> u64 {
        usage(dir).unwrap().bytes
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999t").is_err());
    }

    #[test]
    fn write_read_back_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        c.insert(digest(1), vec![7u8; 1000]);
        c.flush();
        assert_eq!(c.get(&digest(1), 1000).unwrap(), vec![7u8; 1000]);
        assert!(c.get(&digest(2), 1000).is_none());
        // Too long for what the chunk can be: discarded.
        assert!(c.get(&digest(1), 999).is_none());
        assert!(!c.contains(&digest(1)));
        c.insert(digest(3), vec![3u8; 10]);
        c.close();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        c.flush();
        assert_eq!(c.stats().entries, 1);
        assert_eq!(c.get(&digest(3), 10).unwrap(), vec![3u8; 10]);
        let hex = digest(3).to_hex();
        assert!(dir
            .path()
            .join("chunks")
            .join(&hex[..2])
            .join(&hex)
            .is_file());
    }

    #[test]
    fn leftover_temp_files_are_ignored_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("chunks/ab");
        fs::create_dir_all(&sub).unwrap();
        // A writer that died (no such PID) mid-write.
        let dead = sub.join(format!("{TEMP_PREFIX}4000000000-1"));
        fs::write(&dead, b"partial").unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        c.flush();
        assert!(!dead.exists(), "stale temp file kept");
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn eviction_is_lru_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 10_000;
        let c = DiskCache::open(dir.path(), limit).unwrap();
        for i in 0..5 {
            c.insert(digest(i), vec![i as u8; 1000]);
        }
        c.flush();
        // Chunk 0 is used again: chunk 1 is now the oldest.
        assert!(c.get(&digest(0), 1000).is_some());
        for i in 5..40 {
            c.insert(digest(i), vec![i as u8; 1000]);
            c.flush();
            assert!(files_bytes(dir.path()) <= limit, "bound passed at {i}");
            if i == 10 {
                assert!(c.contains(&digest(0)), "recently used chunk evicted");
                assert!(!c.contains(&digest(1)), "least recently used chunk kept");
            }
        }
        assert!(c.stats().evictions > 0);
        assert_eq!(c.stats().bytes, files_bytes(dir.path()));
    }

    #[test]
    fn limits_parse() {
        assert_eq!(CacheLimit::parse("10g"), Ok(CacheLimit::Bytes(10 << 30)));
        assert_eq!(CacheLimit::parse(" 20% "), Ok(CacheLimit::Percent(20.0)));
        assert_eq!(CacheLimit::parse("7.5%"), Ok(CacheLimit::Percent(7.5)));
        for bad in ["0%", "101%", "-1%", "x%", "%", "ten"] {
            assert!(CacheLimit::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(CacheLimit::Percent(25.0).bytes(1000), 250);
        assert_eq!(CacheLimit::Bytes(7).bytes(1000), 7);
    }

    #[test]
    fn watermarks_resolve_against_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let st = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let fs_bytes = st.blocks() * st.fragment_size();
        let w = Watermarks::resolve(
            dir.path(),
            CacheLimit::Percent(10.0),
            Some(CacheLimit::Percent(5.0)),
        )
        .unwrap();
        assert_eq!(w.high, (fs_bytes as f64 * 0.10) as u64);
        assert_eq!(w.low, (fs_bytes as f64 * 0.05) as u64);
        let w = Watermarks::resolve(dir.path(), CacheLimit::Bytes(1000), None).unwrap();
        assert_eq!(
            w,
            Watermarks {
                high: 1000,
                low: 900
            }
        );
        let e = Watermarks::resolve(
            dir.path(),
            CacheLimit::Bytes(1000),
            Some(CacheLimit::Bytes(2000)),
        )
        .unwrap_err();
        assert!(e.contains("above the high watermark"), "{e}");
        assert!(
            Watermarks::resolve(&dir.path().join("missing"), CacheLimit::Percent(1.0), None)
                .is_err()
        );
    }

    #[test]
    fn eviction_runs_from_the_high_to_the_low_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let marks = Watermarks {
            high: 20_000,
            low: 8_000,
        };
        let c = DiskCache::open_with(dir.path(), marks).unwrap();
        // Up to the high watermark nothing is evicted.
        for i in 0..20 {
            c.insert(digest(i), vec![i as u8; 1000]);
        }
        c.flush();
        assert_eq!(files_bytes(dir.path()), 20_000);
        assert_eq!(c.stats().evictions, 0);
        // One more chunk passes it: the oldest go until the low watermark
        // leaves room for the new one, then it is written.
        c.insert(digest(20), vec![20u8; 1000]);
        c.flush();
        assert_eq!(files_bytes(dir.path()), 8_000);
        let s = c.stats();
        assert_eq!((s.evictions, s.evicted_bytes), (13, 13_000));
        assert_eq!((s.limit, s.low), (20_000, 8_000));
        for i in 0..13 {
            assert!(!c.contains(&digest(i)), "old chunk {i} kept");
        }
        for i in 13..21 {
            assert!(c.contains(&digest(i)), "recent chunk {i} evicted");
        }
        // The next eviction waits until the high watermark again.
        for i in 21..33 {
            c.insert(digest(i), vec![0u8; 1000]);
        }
        c.flush();
        assert_eq!(files_bytes(dir.path()), 20_000);
        assert_eq!(c.stats().evictions, 13);
    }

    #[test]
    fn trim_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10 {
            c.insert(digest(i), vec![0u8; 100]);
        }
        c.close();
        assert_eq!(
            usage(dir.path()).unwrap(),
            Usage {
                entries: 10,
                bytes: 1000
            }
        );
        assert_eq!(trim(dir.path(), 450).unwrap().entries, 6);
        assert_eq!(usage(dir.path()).unwrap().bytes, 400);
        clear(dir.path()).unwrap();
        assert_eq!(usage(dir.path()).unwrap().entries, 0);
    }
}
