//! The fetch path through real FUSE mounts: coalescing of adjacent chunks,
//! single flight under merging, the disk cache (restart reuse, corrupt
//! files, the size bound, a full disk), fetch failures, access recording
//! and prefetch, and the metrics socket.
//!
//! Faults and counts are injected *around* a real `LocalBlobStore` (a
//! wrapper that counts, delays or fails range reads), never instead of it.
//! These need root, `/dev/fuse` and `fusermount3`: without them they fail,
//! they do not skip.

// In a test a failed expectation is the failure we want reported.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use skiff_format::chunk::encode_chunk;
use skiff_format::{
    write_bootstrap, Attrs, BlobInfo, Bootstrap, ChunkHash, ChunkInfo, Digest, FileChunk,
    ImageTree, Node, NodeData,
};
use skiff_fusefs::{Backend, Daemon, DiskCache, MountOptions, PrefetchMode};
use skiff_registry::{BlobStore, LocalBlobStore, RegistryError};

const CHUNK: usize = 64 << 10;

fn require_fuse() {
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    assert!(
        skiff_tests::harness::on_path("fusermount3"),
        "fusermount3 is missing: apt-get install fuse3"
    );
    assert!(nix::unistd::geteuid().is_root(), "run these tests as root");
}

/// Pseudo-random bytes, different for each seed; every other 4 KiB block
/// is compressible so that chunks come in both stored forms.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096 + seed as usize) % 2 == 0 {
                (i % 251) as u8
            } else {
                (x >> 24) as u8
            }
        })
        .collect()
}

/// An image of flat files in one blob, in a real OCI layout directory.
struct Image {
    layout: tempfile::TempDir,
    files: BTreeMap<String, Vec<u8>>,
    chunks: Vec<ChunkInfo>,
    /// Chunk indices of each file.
    file_chunks: BTreeMap<String, Vec<u32>>,
    blob: Digest,
    blob_len: u64,
}

impl Image {
    /// `n` files `f00`, `f01`... of `size(i)` bytes, contents seeded from
    /// `seed + i`.
    fn of_files(n: usize, size: impl Fn(usize) -> usize, seed: u64) -> Image {
        let files: Vec<(String, Vec<u8>)> = (0..n)
            .map(|i| (format!("f{i:02}"), data(size(i), seed + i as u64)))
            .collect();
        let refs: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
        Image::build(&refs)
    }

    fn build(files: &[(&str, Vec<u8>)]) -> Image {
        let layout = tempfile::tempdir().unwrap();
        fs::create_dir_all(layout.path().join("blobs/sha256")).unwrap();
        let mut blob = Vec::new();
        let mut chunks: Vec<ChunkInfo> = Vec::new();
        let mut file_chunks = BTreeMap::new();
        let mut maps = Vec::new();
        for (name, content) in files {
            let mut map = Vec::new();
            let mut idx = Vec::new();
            for (i, piece) in content.chunks(CHUNK).enumerate() {
                let digest = ChunkHash::Blake3.digest(piece);
                let index = match chunks.iter().position(|c| c.digest == digest) {
                    Some(i) => i,
                    None => {
                        let (stored, compressed) = encode_chunk(piece, 3).unwrap();
                        chunks.push(ChunkInfo {
                            digest,
                            hash: ChunkHash::Blake3,
                            blob_index: 0,
                            compressed,
                            compressed_offset: blob.len() as u64,
                            compressed_size: stored.len() as u32,
                            uncompressed_size: piece.len() as u32,
                            frame: None,
                        });
                        blob.extend_from_slice(&stored);
                        chunks.len() - 1
                    }
                };
                map.push(FileChunk {
                    file_offset: (i * CHUNK) as u64,
                    chunk_index: index as u32,
                });
                idx.push(index as u32);
            }
            file_chunks.insert(name.to_string(), idx);
            maps.push(map);
        }
        let digest = Digest::of(&blob);
        fs::write(
            layout.path().join("blobs/sha256").join(digest.to_hex()),
            &blob,
        )
        .unwrap();
        Image {
            layout,
            files: files
                .iter()
                .map(|(n, d)| (n.to_string(), d.clone()))
                .collect(),
            chunks,
            file_chunks,
            blob: digest,
            blob_len: blob.len() as u64,
        }
    }

    /// The bootstrap, with `prefetch` (paths) as its PREFETCH table.
    fn bootstrap(&self, prefetch: &[String]) -> Vec<u8> {
        let attrs = |mode| Attrs {
            mode,
            uid: 0,
            gid: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 0,
        };
        let mut nodes = vec![Node {
            attrs: attrs(0o755),
            data: NodeData::Directory {
                entries: BTreeMap::new(),
            },
            xattrs: BTreeMap::new(),
        }];
        let mut entries = BTreeMap::new();
        for (name, content) in &self.files {
            let chunks = self.file_chunks[name]
                .iter()
                .enumerate()
                .map(|(i, &c)| FileChunk {
                    file_offset: (i * CHUNK) as u64,
                    chunk_index: c,
                })
                .collect();
            nodes.push(Node {
                attrs: attrs(0o644),
                data: NodeData::Regular {
                    size: content.len() as u64,
                    chunks,
                },
                xattrs: BTreeMap::new(),
            });
            entries.insert(name.as_bytes().to_vec(), nodes.len() - 1);
        }
        let ids: BTreeMap<String, usize> = entries
            .iter()
            .map(|(k, v)| (format!("/{}", String::from_utf8_lossy(k)), *v))
            .collect();
        nodes[0].data = NodeData::Directory { entries };
        let uncompressed = self
            .chunks
            .iter()
            .map(|c| u64::from(c.uncompressed_size))
            .sum();
        let tree = ImageTree {
            nodes,
            chunks: self.chunks.clone(),
            blobs: vec![BlobInfo {
                digest: self.blob,
                size: self.blob_len,
                uncompressed_size: uncompressed,
                chunk_count: self.chunks.len() as u32,
            }],
            prefetch: prefetch
                .iter()
                .filter_map(|p| ids.get(p).copied())
                .collect(),
            prefetch_ranges: Vec::new(),
            chunk_size_hint: CHUNK as u64,
            chunk_hash: ChunkHash::Blake3,
        };
        write_bootstrap(&tree).unwrap()
    }

    /// Stored bytes of the chunks of `name`.
    fn stored_bytes(&self, name: &str) -> u64 {
        self.file_chunks[name]
            .iter()
            .map(|&c| u64::from(self.chunks[c as usize].compressed_size))
            .sum()
    }
}

/// Counts, slows down or fails range reads of a real [`LocalBlobStore`].
struct Faulty {
    inner: LocalBlobStore,
    reads: AtomicU64,
    bytes: AtomicU64,
    delay_ms: AtomicU64,
    /// Reads in their delay now, and the most there ever were at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    fail: AtomicBool,
    /// Claims to be a local store ([`BlobStore::is_local`]), as the
    /// `LocalBlobStore` it wraps is; by default it stands for a network.
    local: AtomicBool,
    /// Damage in transit: blob offsets whose byte is flipped in the first
    /// answer that covers them.
    flip_once: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl Faulty {
    fn new(layout: &Path) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner: LocalBlobStore::new(layout).unwrap(),
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            local: AtomicBool::new(false),
            flip_once: Default::default(),
        })
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
}

impl BlobStore for Faulty {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, RegistryError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(len, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst)));
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(RegistryError::Invalid("injected failure".into()));
        }
        let mut bytes = self.inner.read_range(digest, offset, len)?;
        let mut flip = self.flip_once.lock().unwrap();
        let hit: Vec<u64> = flip.range(offset..offset + len).copied().collect();
        for at in hit {
            flip.remove(&at);
            bytes[(at - offset) as usize] ^= 0x40;
        }
        Ok(bytes)
    }

    fn blob_size(&self, digest: &Digest) -> Result<u64, RegistryError> {
        self.inner.blob_size(digest)
    }

    fn is_local(&self) -> bool {
        self.local.load(Ordering::SeqCst)
    }
}

/// A mount; unmounted on drop, even when a test fails.
struct TestMount {
    mnt: tempfile::TempDir,
    daemon: Option<Daemon>,
}

impl TestMount {
    fn new(bootstrap: Vec<u8>, store: Arc<Faulty>, opts: impl FnOnce(&mut MountOptions)) -> Self {
        require_fuse();
        let mnt = tempfile::tempdir().unwrap();
        let mut o = MountOptions::new(mnt.path());
        o.threads = 4;
        // Isolate the mechanism under test: no speculative fetches unless asked.
        o.fetch_window = 0;
        o.readahead.max_window = 0;
        opts(&mut o);
        let daemon = Daemon::start(&o, Box::new(bootstrap), Backend::new(store)).expect("mount");
        TestMount {
            mnt,
            daemon: Some(daemon),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel.trim_start_matches('/'))
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// Unmounts and returns the final counters.
    fn finish(mut self) -> skiff_fusefs::MetricsSnapshot {
        let mut d = self.daemon.take().unwrap();
        d.unmount().unwrap()
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.unmount();
        }
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(self.mnt.path())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn disk(dir: &Path, limit: u64) -> Option<Arc<DiskCache>> {
    Some(Arc::new(DiskCache::open(dir, limit).unwrap()))
}

/// A mount of `img` with readahead at its defaults and a disk cache in
/// `cache` (readahead needs one).
fn readahead_mount(img: &Image, store: &Arc<Faulty>, cache: &Path) -> TestMount {
    TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.readahead = skiff_fusefs::readahead::DEFAULT_READAHEAD;
        o.disk_cache = disk(cache, 1 << 30);
    })
}

fn read_all(m: &TestMount, img: &Image) {
    for (name, want) in &img.files {
        let got = fs::read(m.p(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *want, "{name}: contents differ");
    }
}

/// Sum of the lengths of the files under `dir` (what the cache occupies).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[test]
fn a_sequential_read_is_a_few_merged_requests() {
    let img = Image::build(&[("big", data(4 << 20, 1))]);
    let blob_len = img.blob_len;
    let mut counts = Vec::new();
    for bound in [4u64 << 20, 1 << 20] {
        let store = Faulty::new(img.layout.path());
        let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
            o.max_request_bytes = bound;
        });
        read_all(&m, &img);
        let metrics = m.finish();
        // 64 chunks; the kernel asks in reads of up to 1 MiB, each one merged
        // request (so the bound of 4 MiB does not lower the count below 4).
        let per_read_limit = (4u64 << 20).div_ceil(bound.min(1 << 20));
        eprintln!(
            "4 MiB file, bound {bound}: {} requests, {} bytes for {blob_len} stored ({metrics})",
            store.reads(),
            store.bytes.load(Ordering::SeqCst)
        );
        assert!(
            store.reads() <= per_read_limit + 2,
            "{} requests with a bound of {bound}",
            store.reads()
        );
        assert_eq!(metrics.chunks_fetched, 64);
        assert_eq!(
            store.bytes.load(Ordering::SeqCst),
            blob_len,
            "no byte twice"
        );
        counts.push(store.reads());
    }
    // With the fetch window (read-ahead in the blob), one request can cover
    // the file: ceil(4 MiB / bound).
    let store = Faulty::new(img.layout.path());
    // No disk cache here: what is fetched ahead waits for its reader in
    // the memory cache, which must hold the window (the default, 4 MiB,
    // is for mounts with a disk cache).
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.max_request_bytes = 4 << 20;
        o.fetch_window = 4 << 20;
        o.cache_bytes = 64 << 20;
    });
    read_all(&m, &img);
    drop(m);
    eprintln!("with a 4 MiB fetch window: {} requests", store.reads());
    assert!(store.reads() <= 2, "{} requests", store.reads());
    // Readahead in blob order (it needs a disk cache, where what it
    // fetches waits for its reader), on a file long enough for a stream to
    // form (the kernel reads 1 MiB at a time; a stream takes 4 reads): the
    // file arrives in requests of 1 MiB of stored bytes, each byte fetched
    // once, and what readahead brought is verified when it is read.
    let img = Image::build(&[("big", data(24 << 20, 2))]);
    let store = Faulty::new(img.layout.path());
    let cache = tempfile::tempdir().unwrap();
    let m = readahead_mount(&img, &store, cache.path());
    read_all(&m, &img);
    let metrics = m.finish();
    eprintln!("with readahead: {} requests ({metrics})", store.reads());
    assert!(
        store.reads() <= img.blob_len.div_ceil(1 << 20) + 8,
        "{} requests",
        store.reads()
    );
    assert!(metrics.readahead_chunks > 0, "{metrics}");
    assert!(metrics.disk_hits > 0, "{metrics}");
    assert_eq!(store.bytes.load(Ordering::SeqCst), img.blob_len);
}

#[test]
fn from_a_local_store_the_fetch_window_serves_readers_that_walk_not_those_that_jump() {
    // 64 files of one chunk each, in one blob, read from a local store
    // with a 256 KiB window: in path order the window brings the next
    // files along; interleaved halves (f00, f32, f01, f33...: every miss
    // about a megabyte away from the last) fetch each file on its own, so
    // that nothing is decoded that no one reads.
    let img = Image::of_files(64, |_| CHUNK, 40);
    let run = |order: &[&String]| {
        let store = Faulty::new(img.layout.path());
        store.local.store(true, Ordering::SeqCst);
        let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
            o.fetch_window = 256 << 10;
            o.cache_bytes = 64 << 20;
        });
        for name in order {
            let got = fs::read(m.p(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(got == img.files[*name], "{name}: contents differ");
        }
        let metrics = m.finish();
        (store.reads(), metrics)
    };
    let names: Vec<&String> = img.files.keys().collect();
    let (walk_reads, walk) = run(&names);
    let jumps: Vec<&String> = (0..32).flat_map(|i| [names[i], names[i + 32]]).collect();
    let (jump_reads, jump) = run(&jumps);
    eprintln!("in path order: {walk_reads} requests ({walk}); interleaved: {jump_reads} ({jump})");
    assert!(
        walk_reads <= 64 / 4,
        "the window served the walker: {walk_reads} requests"
    );
    assert_eq!(walk.chunks_fetched, 64, "each chunk once: {walk}");
    assert_eq!(jump_reads, 64, "one request per file: {jump}");
    assert_eq!(jump.chunks_fetched, 64, "nothing brought along: {jump}");
}

#[test]
fn damage_in_transit_of_what_readahead_brought_is_caught_when_read() {
    // Readahead writes what it fetched to the disk cache unverified. One
    // chunk in eight of the file's second half (where readahead is well
    // ahead of the reader) is damaged the first time it crosses the link:
    // the reader must still get exactly the file, with no error, by
    // refetching what fails its check.
    let img = Image::build(&[("big", data(24 << 20, 3))]);
    let store = Faulty::new(img.layout.path());
    let n = img.chunks.len();
    store.flip_once.lock().unwrap().extend(
        img.chunks[n / 2..]
            .iter()
            .step_by(8)
            .map(|c| c.compressed_offset + u64::from(c.compressed_size) / 2),
    );
    let cache = tempfile::tempdir().unwrap();
    let m = readahead_mount(&img, &store, cache.path());
    read_all(&m, &img);
    let metrics = m.finish();
    eprintln!("damaged readahead: {} requests ({metrics})", store.reads());
    assert!(metrics.readahead_chunks > 0, "{metrics}");
    // Caught on read from the disk cache, deleted and fetched again.
    assert!(metrics.disk_corrupt > 0, "{metrics}");
    assert!(store.bytes.load(Ordering::SeqCst) > img.blob_len);
    assert_eq!(metrics.read_errors, 0, "{metrics}");
}

#[test]
fn concurrent_readers_fetch_each_chunk_once() {
    let img = Image::build(&[("big", data(4 << 20, 2))]);
    let store = Faulty::new(img.layout.path());
    store.delay_ms.store(20, Ordering::SeqCst);
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |_| {});
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (m, img, barrier) = (&m, &img, &barrier);
            s.spawn(move || {
                barrier.wait();
                // Different threads start at different places.
                let want = &img.files["big"];
                let f = fs::File::open(m.p("big")).unwrap();
                let start = (t * 512 * 1024) % (4 << 20);
                let mut buf = vec![0u8; 256 * 1024];
                for k in 0..16u64 {
                    let off = (start + k * 256 * 1024) % (4 << 20);
                    let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf, off).unwrap();
                    assert!(buf[..n] == want[off as usize..off as usize + n]);
                }
            });
        }
    });
    let metrics = m.finish();
    eprintln!(
        "8 concurrent readers: {} requests ({metrics})",
        store.reads()
    );
    assert_eq!(metrics.chunks_fetched, 64, "each chunk fetched once");
    assert_eq!(store.bytes.load(Ordering::SeqCst), img.blob_len);
}

#[test]
fn disk_cache_survives_a_restart_and_corrupt_files_are_refetched() {
    let img = Image::of_files(6, |i| 300_000 + i * 50_000, 10);
    let cache = tempfile::tempdir().unwrap();

    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), 1 << 30);
    });
    read_all(&m, &img);
    let first = m.finish();
    let cold_reads = store.reads();
    assert!(cold_reads > 0);
    // Compressed bytes on disk: exactly the blob, nothing decompressed.
    assert_eq!(dir_bytes(cache.path()), img.blob_len);

    // A new daemon on the same directory: not one request.
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), 1 << 30);
    });
    read_all(&m, &img);
    let second = m.finish();
    eprintln!(
        "cold: {cold_reads} requests ({first}); after restart: {} requests ({second})",
        store.reads()
    );
    assert_eq!(store.reads(), 0, "restart reuse");
    assert_eq!(second.disk_hits, img.chunks.len() as u64);

    // Damage one chunk file and leave a torn temporary file behind.
    let victim = img.chunks[img.file_chunks["f03"][1] as usize];
    let hex = victim.digest.to_hex();
    let file = cache.path().join("chunks").join(&hex[..2]).join(&hex);
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&file, &bytes).unwrap();
    let torn = file.with_file_name(".tmp-4000000001-7");
    fs::write(&torn, &bytes[..10]).unwrap();
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), 1 << 30);
    });
    read_all(&m, &img);
    let third = m.finish();
    assert_eq!(store.reads(), 1, "only the damaged chunk is refetched");
    assert_eq!(third.disk_corrupt, 1);
    assert!(!torn.exists(), "a torn temporary file is cleaned");
    assert_eq!(
        fs::read(&file).unwrap().len(),
        victim.compressed_size as usize
    );
    assert_eq!(dir_bytes(cache.path()), img.blob_len);
}

#[test]
fn the_disk_cache_bound_holds_under_a_larger_workload() {
    let img = Image::of_files(24, |_| 400_000, 100);
    let limit = 1u64 << 20;
    assert!(img.blob_len > 4 * limit);
    let cache = tempfile::tempdir().unwrap();
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), limit);
        o.cache_bytes = 256 << 10;
    });
    let done = AtomicBool::new(false);
    let max_seen = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                max_seen.fetch_max(dir_bytes(cache.path()), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        for _ in 0..2 {
            read_all(&m, &img);
        }
        m.daemon().source().disk().unwrap().flush();
        done.store(true, Ordering::SeqCst);
    });
    let stats = m.daemon().source().disk().unwrap().stats();
    let max_seen = max_seen.load(Ordering::SeqCst).max(dir_bytes(cache.path()));
    eprintln!(
        "{} stored bytes through a {limit}-byte cache: at most {max_seen} on disk; {stats:?}",
        img.blob_len
    );
    assert!(
        max_seen <= limit + CHUNK as u64,
        "{max_seen} bytes on disk, bound {limit}"
    );
    assert!(stats.evictions > 0);
}

#[test]
fn a_full_cache_disk_still_serves() {
    require_fuse();
    let img = Image::of_files(8, |_| 200_000, 200);
    let cache = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=192k", "tmpfs"])
        .arg(cache.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _tmpfs = Unmount(cache.path());
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        // The bound is far above what the disk holds.
        o.disk_cache = disk(cache.path(), 1 << 30);
    });
    read_all(&m, &img);
    m.daemon().source().disk().unwrap().flush();
    let stats = m.daemon().source().disk().unwrap().stats();
    // Served again (from memory or the network), still right.
    read_all(&m, &img);
    drop(m);
    eprintln!(
        "tmpfs of 192 KiB for {} stored bytes: {stats:?}",
        img.blob_len
    );
    assert!(stats.write_errors > 0, "{stats:?}");
    // No partial file is visible: every chunk file there verifies.
    let mut visible = 0;
    for c in &img.chunks {
        let hex = c.digest.to_hex();
        let p = cache.path().join("chunks").join(&hex[..2]).join(&hex);
        if let Ok(bytes) = fs::read(&p) {
            assert_eq!(
                bytes.len(),
                c.compressed_size as usize,
                "partial file {hex}"
            );
            visible += 1;
        }
    }
    let temps = fs::read_dir(cache.path().join("chunks"))
        .unwrap()
        .flatten()
        .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .count();
    assert_eq!(temps, 0, "temporary files left");
    assert!(visible > 0);
}

#[test]
fn a_failed_fetch_is_eio_and_the_daemon_recovers() {
    let img = Image::build(&[("a", data(500_000, 3)), ("b", data(100_000, 4))]);
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |_| {});
    store.fail.store(true, Ordering::SeqCst);
    let err = fs::read(m.p("a")).expect_err("a failed fetch must fail the read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    store.fail.store(false, Ordering::SeqCst);
    read_all(&m, &img);
    let metrics = m.finish();
    assert!(
        metrics.fetch_errors >= 1 && metrics.read_errors >= 1,
        "{metrics}"
    );
}

#[test]
fn recorded_accesses_become_a_prefetch_list_that_is_fetched_unread() {
    let img = Image::build(&[
        ("app", data(700_000, 5)),
        ("lib", data(300_000, 6)),
        ("other", data(600_000, 7)),
        ("unused", data(200_000, 8)),
    ]);
    let work = tempfile::tempdir().unwrap();
    let list = work.path().join("access.txt");

    // Record: read lib, then app (twice), then part of other.
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store, |o| {
        o.record_access = Some(list.clone());
    });
    fs::read(m.p("lib")).unwrap();
    fs::read(m.p("app")).unwrap();
    fs::read(m.p("app")).unwrap();
    let mut f = fs::File::open(m.p("other")).unwrap();
    let mut head = [0u8; 10];
    f.read_exact(&mut head).unwrap();
    drop(f);
    drop(m);
    let recorded = fs::read_to_string(&list).unwrap();
    // Whole files by path; of `other` the stretch the kernel asked for
    // (the 10 bytes and its readahead), as PATH<TAB>OFFSET<TAB>LENGTH.
    let lines: Vec<&str> = recorded.lines().collect();
    assert_eq!(lines.len(), 3, "{recorded:?}");
    assert_eq!(lines[..2], ["/lib", "/app"], "{recorded:?}");
    let stretch: Vec<&str> = lines[2].split('\t').collect();
    assert_eq!(stretch[..2], ["/other", "0"], "{recorded:?}");
    let len: u64 = stretch[2].parse().unwrap();
    assert!((10..600_000).contains(&len), "{recorded:?}");

    // The list's files become the PREFETCH table; mount with an empty cache.
    let paths: Vec<String> = lines
        .iter()
        .map(|l| l.split('\t').next().unwrap_or_default().to_string())
        .collect();
    let bootstrap = img.bootstrap(&paths);
    let b = Bootstrap::parse(&bootstrap).unwrap();
    assert_eq!(b.prefetch().unwrap().len(), 3);
    let cache = tempfile::tempdir().unwrap();
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(bootstrap.clone(), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), 1 << 30);
        o.prefetch = PrefetchMode::List;
    });
    let t = Instant::now();
    while !m.daemon().prefetch_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "prefetch never ended"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let after_prefetch = m.daemon().snapshot();
    let listed = img.stored_bytes("lib") + img.stored_bytes("app") + img.stored_bytes("other");
    eprintln!(
        "prefetch: {} requests, {} bytes for {listed} listed stored bytes ({after_prefetch})",
        store.reads(),
        store.bytes.load(Ordering::SeqCst)
    );
    assert_eq!(after_prefetch.reads, 0, "nothing was read");
    assert_eq!(
        after_prefetch.prefetch_done,
        after_prefetch.prefetch_planned
    );
    assert!(store.bytes.load(Ordering::SeqCst) >= listed);
    assert!(
        store.bytes.load(Ordering::SeqCst) < listed + img.stored_bytes("unused"),
        "unlisted files were fetched"
    );
    assert!(store.reads() <= 2, "{} requests", store.reads());
    // The listed files are now local; foreground reads are still right.
    let before = store.reads();
    for name in ["app", "lib", "other"] {
        assert!(fs::read(m.p(name)).unwrap() == img.files[name]);
    }
    assert_eq!(store.reads(), before, "listed files fetched again");
    assert!(fs::read(m.p("unused")).unwrap() == img.files["unused"]);
    assert!(store.reads() > before);
    drop(m);

    // Prefetch and foreground reads at once, over a slow store: all correct.
    let store = Faulty::new(img.layout.path());
    store.delay_ms.store(5, Ordering::SeqCst);
    let m = TestMount::new(bootstrap, store.clone(), |o| {
        o.prefetch = PrefetchMode::All;
        o.max_request_bytes = 128 << 10;
    });
    read_all(&m, &img);
    let metrics = m.finish();
    assert!(
        metrics.chunks_fetched <= img.chunks.len() as u64,
        "a chunk fetched twice: {metrics}"
    );
}

#[test]
fn the_metrics_socket_serves_prometheus_text() {
    let img = Image::build(&[("a", data(300_000, 9))]);
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("metrics.sock");
    let cache = tempfile::tempdir().unwrap();
    let store = Faulty::new(img.layout.path());
    let m = TestMount::new(img.bootstrap(&[]), store, |o| {
        o.metrics_socket = Some(sock.clone());
        o.disk_cache = disk(cache.path(), 1 << 30);
    });
    read_all(&m, &img);
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: skiff\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let mut samples = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with('#') {
            let mut w = line.split_whitespace();
            assert_eq!(w.next(), Some("#"));
            assert!(matches!(w.next(), Some("HELP" | "TYPE")), "{line}");
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        samples.insert(name.to_string(), v);
    }
    assert!(samples["skiff_fetch_requests_total"] >= 1.0);
    assert!(samples["skiff_fetch_bytes_total"] >= 1.0);
    assert!(samples["skiff_reads_total"] >= 1.0);
    assert!(samples.contains_key("skiff_cache_hits_total{cache=\"memory\"}"));
    assert!(samples.contains_key("skiff_cache_misses_total{cache=\"disk\"}"));
    assert!(samples.contains_key("skiff_fetch_in_flight"));
    assert!(samples.contains_key("skiff_disk_cache_bytes"));
    assert!(samples.contains_key("skiff_prefetch_chunks{state=\"done\"}"));
    assert_eq!(
        samples["skiff_fetch_duration_seconds_count"],
        samples["skiff_fetch_duration_seconds_bucket{le=\"+Inf\"}"]
    );
    assert_eq!(
        samples["skiff_fetch_duration_seconds_count"],
        samples["skiff_fetch_requests_total"]
    );
    drop(m);
    assert!(!sock.exists(), "socket left behind");
}

/// Waits until the daemon's background fetch has ended; returns the chunks
/// it fetched.
fn background_settled(m: &TestMount) -> u64 {
    let metrics = m.daemon().source().metrics();
    for _ in 0..1000 {
        if metrics.background_finished.load(Ordering::SeqCst) {
            return metrics.background_done.load(Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the background fetch never ended");
}

#[test]
fn background_fetch_brings_the_rest_and_stops_at_the_low_watermark() {
    // About 12 MB: a dozen background requests.
    let img = Image::of_files(40, |_| 300_000, 300);
    // On: with nothing read, the whole image comes, once, with as many
    // requests in flight as the background fetch makes when alone (each
    // takes 20 ms here); reads then need no request.
    let cache = tempfile::tempdir().unwrap();
    let store = Faulty::new(img.layout.path());
    store.delay_ms.store(20, Ordering::SeqCst);
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), 1 << 30);
        o.background_fetch = Some(skiff_fusefs::BackgroundFetch { rate: 0 });
    });
    let done = background_settled(&m);
    let before = store.reads();
    assert_eq!(store.bytes.load(Ordering::SeqCst), img.blob_len);
    let most = store.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=skiff_fusefs::rest::BACKGROUND_REQUESTS as u64).contains(&most),
        "{most} requests in flight at once"
    );
    store.delay_ms.store(0, Ordering::SeqCst);
    read_all(&m, &img);
    assert_eq!(store.reads(), before, "every read was local");
    let metrics = m.finish();
    assert_eq!(metrics.background_done, done);
    assert!(done > 0, "{metrics}");
    // A disk cache whose low watermark is under half of the image: the
    // background fetch stops there, it does not evict to go on.
    let cache = tempfile::tempdir().unwrap();
    let store = Faulty::new(img.layout.path());
    let limit = img.blob_len / 2;
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), limit);
        o.background_fetch = Some(skiff_fusefs::BackgroundFetch { rate: 0 });
    });
    background_settled(&m);
    m.daemon().source().disk().unwrap().flush();
    let stats = m.daemon().source().disk().unwrap().stats();
    let fetched = store.bytes.load(Ordering::SeqCst);
    eprintln!(
        "{} stored bytes, cache bound {limit}: background fetched {fetched}; {stats:?}",
        img.blob_len
    );
    assert!(
        fetched > 0 && fetched < img.blob_len,
        "it stopped: {fetched}"
    );
    assert_eq!(stats.evictions, 0, "it never evicts: {stats:?}");
    // Off (the default): nothing is fetched before a read.
    let store = Faulty::new(img.layout.path());
    let cache = tempfile::tempdir().unwrap();
    let m = TestMount::new(img.bootstrap(&[]), store.clone(), |o| {
        o.disk_cache = disk(cache.path(), 1 << 30);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(store.reads(), 0);
    drop(m);
}
