//! The node cache's watermarks with real parts: a lazy `skiff mount` of the
//! converted fixture from Debian's docker-registry, a disk cache far smaller
//! than what the reads fetch, and the daemon's metrics socket.
//!
//! - In bytes (`--cache-size 2m --cache-low 1m`): the chunk files never hold
//!   more than the high watermark plus one chunk, eviction ran, and the
//!   metrics show both watermarks and the bytes evicted.
//! - In percent of the filesystem (`--cache-size 0.0001%`): the watermark
//!   the daemon reports is that share of the cache's filesystem (statvfs).
//!
//! Every byte read is compared with the fixture's reference tree.

use std::fs;
use std::path::{Path, PathBuf};

use skiff_tests::faultproxy::{fixture_registry_storage, FIXTURE_REPO};
use skiff_tests::harness::{reference_files, remove_all, scratch_root, umoci_rootfs};
use skiff_tests::services::{metric_value, scrape_metrics, Registry, SkiffMount};

fn work_dir(name: &str) -> PathBuf {
    let dir = scratch_root().join(format!("cache-watermarks-{name}"));
    remove_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Bytes and count of the chunk files under `cache/chunks`.
fn chunk_files(cache: &Path) -> (u64, u64, u64) {
    let (mut bytes, mut files, mut largest) = (0, 0, 0);
    let Ok(top) = fs::read_dir(cache.join("chunks")) else {
        return (0, 0, 0);
    };
    for sub in top.flatten() {
        let Ok(rd) = fs::read_dir(sub.path()) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp") {
                continue;
            }
            if let Ok(m) = e.metadata() {
                bytes += m.len();
                files += 1;
                largest = largest.max(m.len());
            }
        }
    }
    (bytes, files, largest)
}

fn mount(registry: &Registry, dir: &Path, extra: &[&str]) -> (SkiffMount, PathBuf, PathBuf) {
    let cache = dir.join("cache");
    let metrics = dir.join("metrics.sock");
    let config = dir.join("registry.toml");
    fs::write(
        &config,
        "use_docker_config = false\nuse_env_proxy = false\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (c, m) = (cache.display().to_string(), metrics.display().to_string());
    let mut args = vec!["--no-prefetch", "--cache-dir", &c, "--metrics-socket", &m];
    args.extend_from_slice(extra);
    let mnt = SkiffMount::start_env(
        &format!("docker://{}/{FIXTURE_REPO}", registry.host()),
        &dir.join("mount"),
        &args,
        &[("SKIFF_REGISTRY_CONFIG", &config.display().to_string())],
    );
    (mnt, cache, metrics)
}

#[test]
fn eviction_keeps_the_cache_between_its_watermarks() {
    let dir = work_dir("bytes");
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    let (mnt, cache, metrics) = mount(
        &registry,
        &dir,
        &["--cache-size", "2m", "--cache-low", "1m"],
    );
    let (high, low) = (2u64 << 20, 1u64 << 20);
    let files = reference_files(128 << 10, 2 << 20);
    let mut read = 0u64;
    let mut worst = 0u64;
    for rel in files.iter().step_by(3).take(40) {
        let got = fs::read(mnt.p(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"));
        let want = fs::read(umoci_rootfs().join(rel)).unwrap_or_else(|e| panic!("{e}"));
        assert!(got == want, "WRONG BYTES in {rel}");
        read += got.len() as u64;
        let (bytes, _, largest) = chunk_files(&cache);
        worst = worst.max(bytes);
        // The writer makes room before each write: at most the high
        // watermark plus the chunk being written.
        assert!(
            bytes <= high + largest,
            "{bytes} bytes of chunk files above the high watermark {high} after {rel}"
        );
    }
    assert!(
        read > 4 * high,
        "read only {read} bytes: not enough to evict"
    );
    let text = scrape_metrics(&metrics);
    let mark = |m: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "skiff_disk_cache_watermark_bytes{{mark=\"{m}\"}} "
                ))
                .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or_else(|| panic!("no {m} watermark in the metrics:\n{text}"))
    };
    assert_eq!((mark("high"), mark("low")), (high, low));
    let evictions = metric_value(&text, "skiff_disk_cache_evictions_total");
    let evicted = metric_value(&text, "skiff_disk_cache_evicted_bytes_total");
    assert!(evictions > 0.0 && evicted > 0.0, "{text}");
    let (bytes, files_now, _) = chunk_files(&cache);
    eprintln!(
        "read {read} bytes through a {high}/{low} cache: at most {worst} bytes of chunk files, now {bytes} in {files_now} files; {evictions} evictions, {evicted} bytes evicted"
    );
}

#[test]
fn a_watermark_in_percent_is_a_share_of_the_cache_filesystem() {
    let dir = work_dir("percent");
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    let (mnt, cache, metrics) = mount(
        &registry,
        &dir,
        &["--cache-size", "0.0001%", "--cache-low", "0.00005%"],
    );
    let st = nix::sys::statvfs::statvfs(&cache).unwrap_or_else(|e| panic!("statvfs: {e}"));
    let fs_bytes = st.blocks() * st.fragment_size();
    let high = (fs_bytes as f64 * 0.0001 / 100.0) as u64;
    let rel = &reference_files(128 << 10, 2 << 20)[0];
    let got = fs::read(mnt.p(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"));
    assert_eq!(
        got.len() as u64,
        fs::metadata(umoci_rootfs().join(rel)).map_or(0, |m| m.len())
    );
    let text = scrape_metrics(&metrics);
    assert_eq!(
        metric_value(&text, "skiff_disk_cache_limit_bytes") as u64,
        high,
        "{fs_bytes}-byte filesystem:\n{text}"
    );
}

#[test]
fn a_low_watermark_above_the_high_one_is_refused() {
    let dir = work_dir("refused");
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    let config = dir.join("registry.toml");
    fs::write(&config, "use_docker_config = false\n").unwrap_or_else(|e| panic!("{e}"));
    let cache = dir.join("cache").display().to_string();
    let failure = SkiffMount::try_start_env(
        &format!("docker://{}/{FIXTURE_REPO}", registry.host()),
        &dir.join("mount"),
        &[
            "--cache-dir",
            &cache,
            "--cache-size",
            "1m",
            "--cache-low",
            "2m",
        ],
        &[("SKIFF_REGISTRY_CONFIG", &config.display().to_string())],
    )
    .err()
    .unwrap_or_else(|| panic!("a low watermark above the high one was accepted"));
    assert!(
        failure.log.contains("above the high watermark"),
        "{}",
        failure.log
    );
    assert!(failure.status.is_some_and(|s| !s.success()));
}
