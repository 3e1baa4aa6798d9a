//! Soak: 32 threads read random ranges of random files through a lazy
//! mount of the fixture image (Debian's docker-registry on 127.0.0.1),
//! with a memory cache and a disk cache far smaller than the image, so
//! that both evict all the time. Every byte is compared with the reference
//! tree (`umoci unpack`). Asserts zero mismatches and zero errors, a
//! bounded daemon RSS and no file descriptor leak; prints the figures.
//!
//! `SKIFF_SOAK_OPS` sets the number of reads (default 60,000, about a
//! minute in release on two cores; `scripts/faults` runs 200,000). The
//! kernel's page cache is dropped for each range before it is read
//! (`POSIX_FADV_DONTNEED` on that file only), so every read reaches the
//! daemon.

use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use skiff_tests::faultproxy::{fixture_registry_storage, FIXTURE_REPO};
use skiff_tests::harness::{reference_files_sized, remove_all, scratch_root, umoci_rootfs};
use skiff_tests::services::{metric_value, scrape_metrics, Registry, SkiffMount};

const THREADS: usize = 32;
const DEFAULT_OPS: u64 = 60_000;
/// Longest range read in one operation.
const MAX_LEN: u64 = 256 << 10;

/// xorshift64*: a small deterministic generator per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counts {
    ops: AtomicU64,
    bytes: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
}

#[test]
fn soak_random_reads_with_constant_eviction() {
    let ops: u64 = std::env::var("SKIFF_SOAK_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_OPS);
    let dir = scratch_root().join("soak");
    remove_all(&dir);
    let reference = umoci_rootfs();
    let all = Arc::new(reference_files_sized(1, u64::MAX));
    assert!(all.len() > 10_000, "{} files in the reference", all.len());
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    let image = format!("docker://{}/{FIXTURE_REPO}", registry.host());
    let metrics = dir.join("metrics.sock");
    let metrics_arg = metrics.display().to_string();
    // 16 MiB of memory and 48 MiB of disk for an image of about 125 MB of
    // stored chunks (360 MB unpacked).
    let mut mount = SkiffMount::start(
        &image,
        &dir.join("mount"),
        &[
            "--cache-mb",
            "16",
            "--cache-size",
            "48m",
            "--metrics-socket",
            &metrics_arg,
        ],
    );
    // The serving worker holds the memory and descriptors (its keeper
    // only holds the FUSE connection).
    let pid = mount.serving_pid().unwrap_or_else(|| panic!("no daemon"));
    let (rss_before, fds_before) = (vm_rss_kib(pid), open_fds(pid));
    let counts = Arc::new(Counts::default());
    let mnt = mount.mnt.clone();
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (all, counts, mnt, reference) =
            (all.clone(), counts.clone(), mnt.clone(), reference.clone());
        let per_thread = ops / THREADS as u64 + u64::from((t as u64) < ops % THREADS as u64);
        handles.push(std::thread::spawn(move || {
            let mut rng =
                Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc));
            let mut got = vec![0u8; MAX_LEN as usize];
            let mut want = vec![0u8; MAX_LEN as usize];
            for _ in 0..per_thread {
                let (rel, size) = &all[rng.below(all.len() as u64) as usize];
                let offset = rng.below(*size);
                // Mostly small reads, some large ones.
                let cap = [4 << 10, 64 << 10, MAX_LEN][rng.below(3) as usize];
                let len = (1 + rng.below(cap)).min(size - offset) as usize;
                counts.ops.fetch_add(1, Ordering::Relaxed);
                let r = fs::File::open(mnt.join(rel)).and_then(|f| {
                    // Best effort: a failure only makes the read a page-cache hit.
                    let _ = nix::fcntl::posix_fadvise(
                        f.as_raw_fd(),
                        offset as i64,
                        len as i64,
                        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                    );
                    f.read_exact_at(&mut got[..len], offset)
                });
                if let Err(e) = r {
                    if counts.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("soak: reading {rel} [{offset}+{len}]: {e}");
                    }
                    continue;
                }
                let reference_file = fs::File::open(reference.join(rel))
                    .and_then(|f| f.read_exact_at(&mut want[..len], offset));
                if let Err(e) = reference_file {
                    panic!("reading the reference {rel}: {e}");
                }
                counts.bytes.fetch_add(len as u64, Ordering::Relaxed);
                if got[..len] != want[..len]
                    && counts.mismatches.fetch_add(1, Ordering::Relaxed) < 5
                {
                    eprintln!("soak: MISMATCH in {rel} [{offset}+{len}]");
                }
            }
        }));
    }
    for h in handles {
        if h.join().is_err() {
            panic!("a soak thread panicked");
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let text = scrape_metrics(&metrics);
    let (rss_after, fds_after) = (vm_rss_kib(pid), open_fds(pid));
    let evictions = metric_value(&text, "skiff_disk_cache_evictions_total");
    let disk_bytes = metric_value(&text, "skiff_disk_cache_bytes");
    let fetched = metric_value(&text, "skiff_fetch_bytes_total");
    let requests = metric_value(&text, "skiff_fetch_requests_total");
    let mem_hits = metric_value(&text, "skiff_cache_hits_total{cache=\"memory\"}");
    let disk_hits = metric_value(&text, "skiff_cache_hits_total{cache=\"disk\"}");
    let c = &counts;
    let line = format!(
        "soak: {} ops, {} bytes read and checked, {} mismatches, {} errors in {secs:.1} s on {THREADS} threads; \
         fetched {fetched} bytes in {requests} requests; hits: memory {mem_hits}, disk {disk_hits}; \
         disk cache evictions {evictions} (holding {disk_bytes} bytes); \
         daemon RSS {rss_before} -> {rss_after} KiB, fds {fds_before} -> {fds_after}",
        c.ops.load(Ordering::Relaxed),
        c.bytes.load(Ordering::Relaxed),
        c.mismatches.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
    );
    eprintln!("{line}");
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(scratch_root().join("soak-report.txt"))
    {
        let _ = writeln!(f, "{line}");
    }
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "{line}");
    assert_eq!(c.errors.load(Ordering::Relaxed), 0, "{line}");
    assert_eq!(c.ops.load(Ordering::Relaxed), ops, "{line}");
    assert!(evictions > 0.0, "the disk cache never evicted: {line}");
    // 16 MiB of chunk cache: a few hundred MiB of RSS would be a leak.
    assert!(rss_after < 512 << 10, "daemon RSS {rss_after} KiB: {line}");
    // Keep-alive connections to the registry (at most 32 idle) come and
    // go; a leak over this many operations would be thousands.
    assert!(fds_after <= fds_before + 40, "fd leak? {line}");
    let (status, summary) = mount.terminate();
    assert!(status.is_some_and(|s| s.success()), "{status:?} {summary}");
    drop(registry);
    remove_all(&dir.join("mount").join("cache"));
}
