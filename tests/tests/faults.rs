//! Faults, with real parts: Debian's docker-registry serving the converted
//! fixture, the fault-injecting proxy (`scripts/fault-proxy.py`) in front
//! of it, and a lazy FUSE mount (`skiff mount docker://PROXY/...`).
//!
//! For each network fault (connection reset, stall before the response,
//! stall in the body, 503, 429 with `Retry-After`, truncated body, flipped
//! byte, expiring bearer tokens) a test checks that
//! - a fault that passes (a few requests) is ridden out: the read returns
//!   the right bytes;
//! - while the fault lasts, a read fails with `EIO` (never wrong bytes),
//!   within a bounded number of requests and without hanging;
//! - once the fault clears, the same read returns the right bytes.
//!
//! Local faults: a full disk under the cache, a cache file damaged on disk,
//! `kill -9` of the daemon in the middle of reads, and unmounting while
//! files are open.
//!
//! Every byte read is compared with the fixture's reference tree
//! (`umoci unpack`). A line per fault goes to
//! `TARGET/skiff-test-tmp/faults-report.txt` for `scripts/faults`.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use skiff_tests::faultproxy::{wait_until, FaultyRegistry};
use skiff_tests::harness::{reference_files, remove_all, scratch_root, skiff_cmd, umoci_rootfs};
use skiff_tests::services::SkiffMount;

/// Attempts per request in the registry configuration of these tests.
const MAX_ATTEMPTS: u64 = 4;

/// The registry configuration of the mounts here: short timeouts, so that
/// a permanent fault fails a read within seconds (the defaults are 30 s
/// per read and 120 s per operation).
const REGISTRY_CONFIG: &str = "use_docker_config = false
use_env_proxy = false
connect_timeout_ms = 2000
read_timeout_ms = 2000

[retry]
max_attempts = 4
initial_backoff_ms = 100
max_backoff_ms = 1000
deadline_ms = 20000
";

/// Longest a read may take before the test calls it a hang (far above
/// what the retry budget allows).
const HANG: Duration = Duration::from_secs(120);

fn work_dir(name: &str) -> PathBuf {
    let dir = scratch_root().join(format!("faults-{name}"));
    remove_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Appends a line to the report `scripts/faults` prints.
fn report(fault: &str, outcome: &str) {
    let path = scratch_root().join("faults-report.txt");
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{fault}\t{outcome}");
    }
    eprintln!("FAULT {fault}: {outcome}");
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The reference bytes of `rel`.
fn reference(rel: &str) -> Vec<u8> {
    let p = umoci_rootfs().join(rel);
    fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// What a read through the mount gave.
#[derive(Debug)]
enum Outcome {
    /// The right bytes.
    Correct,
    /// An error (never wrong bytes: those panic).
    Failed(std::io::Error),
}

/// Reads `len` bytes at `offset` of `rel` (all of it when `len` is None)
/// through the mount in a thread; panics on a wrong byte or when the read
/// has not returned after [`HANG`].
fn read_at(mount: &SkiffMount, rel: &str, offset: u64, len: Option<usize>) -> Outcome {
    let path = mount.p(rel);
    let want = reference(rel);
    let end = len.map_or(want.len(), |l| (offset as usize + l).min(want.len()));
    let want = want[offset as usize..end].to_vec();
    let (tx, rx) = mpsc::channel();
    let shown = rel.to_owned();
    std::thread::spawn(move || {
        let r = fs::File::open(&path).and_then(|f| {
            let mut buf = vec![0u8; want.len()];
            let mut got = 0;
            while got < buf.len() {
                let n = f.read_at(&mut buf[got..], offset + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            buf.truncate(got);
            Ok(buf)
        });
        let outcome = match r {
            Ok(buf) => {
                assert!(
                    buf == want,
                    "WRONG BYTES read from {shown} at offset {offset}: {} bytes, sha256 {} (expected {} bytes, {})",
                    buf.len(),
                    sha256(&buf),
                    want.len(),
                    sha256(&want)
                );
                Outcome::Correct
            }
            Err(e) => Outcome::Failed(e),
        };
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(HANG) {
        Ok(o) => o,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "reading {rel} through the mount hung for {} s",
                HANG.as_secs()
            )
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the reader of {rel} panicked (see above)")
        }
    }
}

fn read_all(mount: &SkiffMount, rel: &str) -> Outcome {
    read_at(mount, rel, 0, None)
}

/// A lazy mount of the converted fixture through the proxy.
struct Rig {
    net: FaultyRegistry,
    mount: SkiffMount,
}

impl Rig {
    fn new(name: &str, extra: &[&str]) -> Rig {
        let dir = work_dir(name);
        let net = FaultyRegistry::start(&dir);
        let mount = mount_via(&net, &dir, extra, &[]);
        Rig { net, mount }
    }
}

/// Mounts the fixture through `net`'s proxy at `dir/mnt` with the
/// configuration above: no prefetch, no readahead, no fetch window, so
/// that each read makes its own requests.
fn mount_via(net: &FaultyRegistry, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> SkiffMount {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let config = dir.join("registry.toml");
    fs::write(&config, REGISTRY_CONFIG).unwrap_or_else(|e| panic!("writing the config: {e}"));
    let config = config.display().to_string();
    let metrics = dir.join("metrics.sock").display().to_string();
    let mut args = vec![
        "--no-prefetch",
        "--chunk-readahead-kb",
        "0",
        "--fetch-window-kb",
        "0",
        "--metrics-socket",
        &metrics,
    ];
    args.extend_from_slice(extra);
    let mut envs = vec![("SKIFF_REGISTRY_CONFIG", config.as_str())];
    envs.extend_from_slice(env);
    SkiffMount::start_env(&net.image(), dir, &args, &envs)
}

/// The errno of a failed read.
fn errno(o: &Outcome) -> Option<i32> {
    match o {
        Outcome::Failed(e) => e.raw_os_error(),
        Outcome::Correct => None,
    }
}

/// The network fault test: a passing fault, a lasting one, recovery.
/// `transient` and `lasting` are fault JSON objects (without `count` for
/// the lasting one). Files: three different ones, never read before.
fn network_fault(name: &str, transient: &str, lasting: &str) {
    let rig = Rig::new(name, &[]);
    let files = reference_files(300 << 10, 2 << 20);
    assert!(files.len() > 40, "too few reference files: {}", files.len());
    // Different files for each phase, spread over the tree.
    let pick = |i: usize| files[(i * 7919 + name.len() * 31) % files.len()].clone();
    let (a, b) = (pick(1), pick(2));
    let p = &rig.net.proxy;

    // A fault that passes after a few requests: the retries ride it out.
    p.reset_stats();
    p.set_fault(transient);
    let o = read_all(&rig.mount, &a);
    let injected = p.stat("faults_injected");
    assert!(
        matches!(o, Outcome::Correct),
        "{name}: a passing fault ({injected} injected) failed the read of {a}: {o:?}\n{}",
        rig.mount.logs()
    );
    assert!(injected > 0, "{name}: the fault was never injected");
    let transient_requests = p.stat("range_requests");

    // A lasting fault: EIO, within a bounded number of requests.
    p.clear();
    p.reset_stats();
    p.set_fault(lasting);
    let t = Instant::now();
    let o = read_at(&rig.mount, &b, 0, Some(4096));
    let took = t.elapsed();
    let requests = p.stat("range_requests");
    assert_eq!(
        errno(&o),
        Some(libc::EIO),
        "{name}: a lasting fault must fail the read with EIO: {o:?}"
    );
    // One FUSE read (plus the kernel's retry of one page) per failed user
    // read, each retried MAX_ATTEMPTS times at most, maybe in a few runs.
    let bound = MAX_ATTEMPTS * 2 * 8;
    assert!(
        requests > 0 && requests <= bound,
        "{name}: {requests} range requests for one failed read (bound {bound})"
    );

    // The fault clears: the same read succeeds.
    p.clear();
    let o = read_all(&rig.mount, &b);
    assert!(
        matches!(o, Outcome::Correct),
        "{name}: the read of {b} still fails after the fault cleared: {o:?}\n{}",
        rig.mount.logs()
    );
    report(
        name,
        &format!(
            "survived: passing fault ridden out ({injected} injected, {transient_requests} requests); \
             lasting fault -> EIO after {requests} requests in {:.1} s; recovered",
            took.as_secs_f64()
        ),
    );
}

#[test]
fn connection_reset() {
    network_fault(
        "connection-reset",
        r#"{"kind":"reset","count":2}"#,
        r#"{"kind":"reset"}"#,
    );
}

#[test]
fn stall_before_the_response() {
    network_fault(
        "stall-headers",
        r#"{"kind":"stall","count":1,"stall_seconds":30}"#,
        r#"{"kind":"stall","stall_seconds":60}"#,
    );
}

#[test]
fn stall_in_the_body() {
    network_fault(
        "stall-body",
        r#"{"kind":"stall_body","count":1,"stall_seconds":30}"#,
        r#"{"kind":"stall_body","stall_seconds":60}"#,
    );
}

#[test]
fn server_errors() {
    network_fault(
        "http-503",
        r#"{"kind":"status","status":503,"count":2}"#,
        r#"{"kind":"status","status":503}"#,
    );
}

#[test]
fn too_many_requests_with_retry_after() {
    network_fault(
        "http-429-retry-after",
        r#"{"kind":"retry_after","retry_after":1,"count":2}"#,
        r#"{"kind":"retry_after","retry_after":1}"#,
    );
}

#[test]
fn truncated_bodies() {
    network_fault(
        "truncated-body",
        r#"{"kind":"truncate","count":2}"#,
        r#"{"kind":"truncate"}"#,
    );
}

#[test]
fn flipped_bytes() {
    network_fault(
        "flipped-byte",
        r#"{"kind":"flip","count":1}"#,
        r#"{"kind":"flip"}"#,
    );
}

#[test]
fn expiring_tokens() {
    let dir = work_dir("tokens");
    let net = FaultyRegistry::start(&dir);
    let p = &net.proxy;
    // Tokens good for 3 requests or 2 seconds, whichever comes first: the
    // registry turns them down long before the client expects it to.
    p.set_auth(r#"{"mode":"bearer","ttl_seconds":2,"max_uses":3}"#);
    let mount = mount_via(&net, &dir, &[], &[]);
    let files = reference_files(300 << 10, 2 << 20);
    p.reset_stats();
    let mut read = 0;
    for (i, f) in files.iter().step_by(files.len() / 12).take(12).enumerate() {
        let o = read_all(&mount, f);
        assert!(
            matches!(o, Outcome::Correct),
            "expiring tokens: reading {f} failed: {o:?}\n{}",
            mount.logs()
        );
        read += 1;
        if i == 5 {
            // Past the tokens' lifetime, too.
            std::thread::sleep(Duration::from_millis(2100));
        }
    }
    let (issued, unauthorized, requests) = (
        p.stat("tokens_issued"),
        p.stat("unauthorized"),
        p.stat("requests"),
    );
    assert!(
        issued > 1 && unauthorized > 0,
        "expected tokens to expire and be renewed: {}",
        p.stats()
    );
    // Each 401 costs one request more, never a loop.
    assert!(
        unauthorized <= issued + 1 && requests <= 2 * (requests - unauthorized) + 1,
        "{}",
        p.stats()
    );

    // The token server refuses: reads fail at once, no retry storm.
    p.set_auth(
        r#"{"mode":"bearer","ttl_seconds":2,"max_uses":3,"username":"someone","password":"else"}"#,
    );
    p.reset_stats();
    let b = &files[files.len() / 2 + 3];
    let o = read_at(&mount, b, 0, Some(4096));
    assert_eq!(errno(&o), Some(libc::EIO), "refused token: {o:?}");
    let tries = p.stat("token_requests");
    assert!(
        tries > 0 && tries <= 2 * MAX_ATTEMPTS * 8,
        "{tries} token requests for one failed read"
    );
    // The registry takes tokens again: the read succeeds.
    p.set_auth(r#"{"mode":"bearer","ttl_seconds":2,"max_uses":3}"#);
    let o = read_all(&mount, b);
    assert!(
        matches!(o, Outcome::Correct),
        "after the token server recovered: {o:?}"
    );
    report(
        "expiring-token",
        &format!(
            "survived: {read} files read with tokens expiring after 3 uses or 2 s \
             ({issued} tokens issued, {unauthorized} 401s); token server refusing -> EIO after {tries} token requests; recovered"
        ),
    );
}

/// Longest a walk of the tree or a read of local data may take while the
/// registry is stalled before the test calls it a hang: a hang detector,
/// not a measure of speed (they take milliseconds).
const STALL_HANG: Duration = Duration::from_secs(10);

/// Runs `f` on a thread; panics if it has not returned after `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} hung for {} s", limit.as_secs())
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked (see above)"),
    }
}

/// `ls -lR`: readdir and lstat of every entry under `root`; the number of
/// entries.
fn walk(root: &Path) -> std::io::Result<u64> {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            n += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(n)
}

/// Drops the page cache of `path` (`POSIX_FADV_DONTNEED`), so that the
/// next read of it reaches the daemon.
fn drop_page_cache(path: &Path) {
    if let Ok(f) = fs::File::open(path) {
        let _ = nix::fcntl::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// The registry stalls every blob request (issue 15, part 4): a listing of
/// the whole tree and reads of data already on the node are answered while
/// readers of data that is not wait on the network, and those readers get
/// `EIO` within the read budget, not after minutes.
#[test]
fn stalled_registry_leaves_metadata_and_local_reads_alone() {
    /// The read budget the mount gets (`--read-budget-secs`).
    const BUDGET: Duration = Duration::from_secs(3);
    /// What a failing read may take beyond the budget: the kernel retries
    /// a failed page once with a read of its own, which has a budget too,
    /// and the time a request waits in the kernel before the daemon reads
    /// it is nobody's budget (a loaded CI machine once took 15.8 s). The
    /// bound tells "within the budget, give or take the kernel" from "as
    /// long as the stall" (300 s); the report line shows the slowest.
    const SLACK: Duration = Duration::from_secs(27);
    let dir = work_dir("stalled-registry");
    let net = FaultyRegistry::start(&dir);
    let budget = BUDGET.as_secs().to_string();
    let mount = mount_via(
        &net,
        &dir,
        &["--read-budget-secs", &budget, "--threads", "4"],
        &[],
    );
    let files = reference_files(64 << 10, 1 << 20);
    assert!(files.len() > 60, "too few reference files: {}", files.len());
    let pick = |i: usize| files[(i * 7919) % files.len()].clone();
    let local: Vec<String> = (0..5).map(pick).collect();
    for f in &local {
        must_read(&mount, f, "before the stall");
    }
    let p = &net.proxy;
    p.set_fault(r#"{"kind":"stall","match":"blobs","stall_seconds":300}"#);

    // Far more readers of data that is not local than FUSE threads: every
    // one of them waits on the network at once.
    let cold: Vec<String> = (5..21).map(pick).filter(|f| !local.contains(f)).collect();
    let t = Instant::now();
    let readers: Vec<_> = cold
        .iter()
        .map(|f| {
            let path = mount.p(f);
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = fs::read(&path);
                (r.map(|b| b.len()), t.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // Metadata: the whole tree, listed and stat'ed.
    let root = mount.mnt.clone();
    let entries = within(STALL_HANG, "walking the tree during the stall", move || {
        walk(&root)
    });
    let entries = entries.unwrap_or_else(|e| panic!("walking the tree during the stall: {e}"));
    assert!(entries > 1000, "only {entries} entries in the tree");

    // Data on the node (the disk cache), with the page cache dropped so
    // that the reads reach the daemon.
    for f in &local {
        drop_page_cache(&mount.p(f));
        let path = mount.p(f);
        let want = reference(f);
        let got = within(
            STALL_HANG,
            "reading a local file during the stall",
            move || fs::read(path),
        );
        match got {
            Ok(b) => assert!(b == want, "WRONG BYTES from {f} during the stall"),
            Err(e) => panic!("reading {f}, fetched before the stall, failed during it: {e}"),
        }
    }
    let listed_in = t.elapsed();

    // The readers of data that is not local: EIO within the budget.
    let mut failed = 0;
    let mut slowest = Duration::ZERO;
    for (f, r) in cold.iter().zip(readers) {
        let (r, took) = r
            .join()
            .unwrap_or_else(|_| panic!("the reader of {f} panicked"));
        match r {
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "reading {f}: {e}");
                assert!(
                    took <= BUDGET + SLACK,
                    "reading {f} failed after {took:?}, budget {BUDGET:?}\n{}",
                    mount.logs()
                );
                slowest = slowest.max(took);
                failed += 1;
            }
            // Its data was fetched alongside an earlier file's: fine, if right.
            Ok(n) => assert_eq!(n, reference(f).len(), "short read of {f}"),
        }
    }
    assert!(failed > 0, "no reader waited on the stalled registry");

    // The registry answers again: so does the mount.
    p.clear();
    for f in cold.iter().take(3) {
        must_read(&mount, f, "after the stall");
    }
    report(
        "stalled-registry",
        &format!(
            "survived: {entries} entries listed and {} local files read while {} readers waited; \
             {failed} failed with EIO (the slowest after {:.1} s, budget {} s); recovered ({:.1} s to list)",
            local.len(),
            cold.len(),
            slowest.as_secs_f64(),
            BUDGET.as_secs(),
            listed_in.as_secs_f64()
        ),
    );
}

/// Files of the reference tree to read in the local fault tests: `n`
/// spread over the tree, 64 KiB to 1 MiB each.
fn some_files(n: usize) -> Vec<String> {
    let files = reference_files(64 << 10, 1 << 20);
    assert!(files.len() > n, "too few reference files");
    let step = files.len() / n;
    files.into_iter().step_by(step).take(n).collect()
}

fn must_read(mount: &SkiffMount, rel: &str, what: &str) {
    let o = read_all(mount, rel);
    assert!(
        matches!(o, Outcome::Correct),
        "{what}: reading {rel} failed: {o:?}\n{}",
        mount.logs()
    );
}

/// Files left half-written in a cache directory (`.tmp-*`).
fn temp_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![cache.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(p);
            }
        }
    }
    out
}

/// Chunk files in a cache directory.
fn chunk_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(cache.join("chunks")) else {
        return out;
    };
    for d in rd.flatten() {
        if let Ok(rd) = fs::read_dir(d.path()) {
            out.extend(
                rd.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| e.path()),
            );
        }
    }
    out.sort();
    out
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        skiff_tests::harness::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0700"))
                .arg("tmpfs")
                .arg(path),
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn disk_full_under_the_cache() {
    let dir = work_dir("disk-full");
    let net = FaultyRegistry::start(&dir);
    // 1 MiB of disk for a cache allowed 1 GiB: writes fail with ENOSPC.
    let cache_dir = dir.join("small");
    let tmpfs = Tmpfs::mount(&cache_dir, "1m");
    let cache = cache_dir.display().to_string();
    let files = some_files(24);
    let metrics_sock = dir.join("metrics.sock");
    {
        let mut mount = mount_via(
            &net,
            &dir,
            &["--cache-dir", &cache, "--cache-size", "1g"],
            &[],
        );
        for f in &files {
            must_read(&mount, f, "disk full");
        }
        let text = skiff_tests::services::scrape_metrics(&metrics_sock);
        let errors = metric_value(&text, "skiff_disk_cache_write_errors_total");
        let writes = metric_value(&text, "skiff_disk_cache_writes_total");
        assert!(
            errors > 0.0,
            "the cache never ran out of space ({writes} writes):\n{text}"
        );
        let (status, _) = mount.terminate();
        assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
        report(
            "disk-full",
            &format!(
                "survived: {} files read correctly with the cache disk full \
                 ({writes} chunks written, {errors} writes failed)",
                files.len()
            ),
        );
    }
    let leftovers = temp_files(&cache_dir);
    assert!(
        leftovers.is_empty(),
        "half-written files left: {leftovers:?}"
    );
    let cached = chunk_files(&cache_dir).len();
    assert!(cached > 0, "nothing was cached at all");

    // What the cache holds is sound: with the network down, every file it
    // holds whole is served from it, and nothing in it fails verification.
    net.proxy.set_fault(r#"{"kind":"status","status":503}"#);
    let mount = mount_via(
        &net,
        &dir.join("again"),
        &["--cache-dir", &cache, "--cache-size", "1g"],
        &[],
    );
    let mut from_disk = 0;
    for f in &files {
        match read_all(&mount, f) {
            Outcome::Correct => from_disk += 1,
            Outcome::Failed(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{f}: {e}"),
        }
    }
    let text = skiff_tests::services::scrape_metrics(&dir.join("again").join("metrics.sock"));
    assert_eq!(
        metric_value(&text, "skiff_disk_cache_corrupt_total"),
        0.0,
        "a corrupt entry in the cache:\n{text}"
    );
    assert!(
        from_disk > 0,
        "no file could be served from the cache ({cached} chunks in it)"
    );
    drop(mount);
    drop(tmpfs);
}

use skiff_tests::services::metric_value;

#[test]
fn cache_file_damaged_on_disk() {
    let dir = work_dir("cache-damaged");
    let net = FaultyRegistry::start(&dir);
    let cache_dir = dir.join("cache-kept");
    let cache = cache_dir.display().to_string();
    let files = some_files(12);
    {
        let mut mount = mount_via(&net, &dir.join("first"), &["--cache-dir", &cache], &[]);
        for f in &files {
            must_read(&mount, f, "filling the cache");
        }
        mount.terminate();
    }
    // Damage every cached chunk: one byte flipped in some, some cut short,
    // some emptied, some replaced by another chunk's file.
    let chunks = chunk_files(&cache_dir);
    assert!(chunks.len() > 10, "only {} chunks cached", chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        let mut bytes = fs::read(c).unwrap_or_else(|e| panic!("{}: {e}", c.display()));
        match i % 4 {
            0 => {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x55;
            }
            1 => bytes.truncate(bytes.len() / 3),
            2 => bytes.clear(),
            _ => bytes = fs::read(&chunks[(i + 1) % chunks.len()]).unwrap_or_default(),
        }
        fs::write(c, &bytes).unwrap_or_else(|e| panic!("{}: {e}", c.display()));
    }
    net.proxy.reset_stats();
    let mount = mount_via(&net, &dir.join("second"), &["--cache-dir", &cache], &[]);
    for f in &files {
        must_read(&mount, f, "damaged cache");
    }
    let text = skiff_tests::services::scrape_metrics(&dir.join("second").join("metrics.sock"));
    let corrupt = metric_value(&text, "skiff_disk_cache_corrupt_total");
    let refetched = net.proxy.stat("range_requests");
    assert!(
        corrupt > 0.0 && refetched > 0,
        "damaged files not detected ({corrupt}) or not refetched ({refetched} requests):\n{text}"
    );
    report(
        "cache-file-damaged",
        &format!(
            "survived: {} chunk files damaged, {corrupt} detected on read and refetched \
             ({refetched} range requests); {} files read correctly",
            chunks.len(),
            files.len()
        ),
    );
}

/// Eight readers over `files`, each checking every byte, again and again
/// until `stop` is set (once through at least); returns a channel on which
/// each sends (reads done, reads failed) when through.
fn start_readers(
    mnt: &Path,
    files: &[String],
    stop: &Arc<AtomicBool>,
) -> mpsc::Receiver<(u64, u64)> {
    let (tx, rx) = mpsc::channel();
    for t in 0..8 {
        let tx = tx.clone();
        let files = files.to_vec();
        let mnt = mnt.to_path_buf();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            loop {
                for f in files.iter().skip(t).step_by(8) {
                    match fs::read(mnt.join(f)) {
                        Ok(b) => {
                            assert!(b == reference(f), "WRONG BYTES in {f} around kill -9");
                            ok += 1;
                        }
                        Err(_) => failed += 1,
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            let _ = tx.send((ok, failed));
        });
    }
    rx
}

/// Waits for the eight readers of [`start_readers`]: (done, failed).
fn join_readers(rx: mpsc::Receiver<(u64, u64)>, what: &str) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..8 {
        let (o, f) = rx
            .recv_timeout(HANG)
            .unwrap_or_else(|e| panic!("a reader hung or panicked after {what}: {e}"));
        ok += o;
        failed += f;
    }
    (ok, failed)
}

#[test]
fn kill_9_in_the_middle_of_reads() {
    let dir = work_dir("kill-9");
    let net = FaultyRegistry::start(&dir);
    let cache_dir = dir.join("cache-kept");
    let cache = cache_dir.display().to_string();
    let files = some_files(200);
    let mut mount = mount_via(&net, &dir, &["--cache-dir", &cache], &[]);
    let mnt = mount.mnt.clone();
    // The serving worker dies under the readers, three times: its keeper
    // starts another, which takes the mount over; no read fails.
    let stop = Arc::new(AtomicBool::new(false));
    let rx = start_readers(&mnt, &files, &stop);
    let mut workers = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        let killed = mount.kill9_worker().expect("a worker serves the mount");
        workers.push(killed);
        assert!(
            wait_until(Duration::from_secs(30), || mount
                .serving_pid()
                .is_some_and(|p| !workers.contains(&p))),
            "no new worker after kill -9 of {killed}: {}",
            mount.logs()
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (failover_ok, failover_failed) = join_readers(rx, "kill -9 of the worker");
    assert_eq!(
        failover_failed,
        0,
        "reads failed when the worker died ({failover_ok} done): {}",
        mount.logs()
    );
    // Keeper and worker die together: nothing is left to serve.
    let stop = Arc::new(AtomicBool::new(false));
    let rx = start_readers(&mnt, &files, &stop);
    std::thread::sleep(Duration::from_millis(700));
    // Cached pages would still read with no daemon at all.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    mount.kill9();
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = join_readers(rx, "kill -9 of keeper and worker");
    assert!(failed > 0, "the daemon died after every read had finished");
    // The dead daemon left a stale mount behind (statfs, unlike stat, is
    // never answered from the kernel's attribute cache).
    let stale = nix::sys::statvfs::statvfs(&mnt).err();
    assert_eq!(
        stale,
        Some(nix::errno::Errno::ENOTCONN),
        "no stale mount after kill -9"
    );
    // A new daemon refuses it, with a message saying what to do...
    let refused = skiff_tests::harness::run_unchecked(
        skiff_cmd(["mount", &net.image()])
            .arg(&mnt)
            .args(["--cache-dir", &cache]),
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("--force-unmount"),
        "mounting over a stale mount: {}\n{stderr}",
        refused.status
    );
    // ... and with --force-unmount cleans it up and serves the same cache.
    let mount = mount_via(&net, &dir, &["--cache-dir", &cache, "--force-unmount"], &[]);
    for f in files.iter().step_by(4) {
        must_read(&mount, f, "after kill -9");
    }
    let cleaned = wait_until(Duration::from_secs(30), || {
        temp_files(&cache_dir).is_empty()
    });
    assert!(
        cleaned,
        "temporary files of the dead daemon left: {:?}",
        temp_files(&cache_dir)
    );
    report(
        "kill-9-daemon",
        &format!(
            "survived: kill -9 of the worker three times under 8 readers: {failover_ok} reads, \
             none failed (a new worker took over); keeper and worker killed together: {ok} reads \
             done and {failed} failed (none wrong); stale mount refused, then cleaned by \
             --force-unmount; {} files read correctly from the same cache",
            files.len().div_ceil(4)
        ),
    );
}

#[test]
fn unmount_while_files_are_open() {
    let dir = work_dir("unmount-open");
    let net = FaultyRegistry::start(&dir);
    let files = some_files(6);
    for how in ["umount -l", "SIGTERM"] {
        let sub = dir.join(how.replace(' ', "-"));
        let mut mount = mount_via(&net, &sub, &[], &[]);
        let open: Vec<(String, fs::File)> = files
            .iter()
            .map(|f| {
                let file = fs::File::open(mount.p(f))
                    .unwrap_or_else(|e| panic!("opening {f} on the mount: {e}"));
                (f.clone(), file)
            })
            .collect();
        // Half of each before, the rest after the unmount.
        let read_part = |file: &fs::File, f: &str, first: bool| {
            let want = reference(f);
            let half = want.len() / 2;
            let (from, to) = if first { (0, half) } else { (half, want.len()) };
            let mut buf = vec![0u8; to - from];
            file.read_exact_at(&mut buf, from as u64)
                .unwrap_or_else(|e| panic!("{how}: reading {f} [{from}..{to}]: {e}"));
            assert!(
                buf == want[from..to],
                "WRONG BYTES in {f} [{from}..{to}] ({how})"
            );
        };
        for (f, file) in &open {
            read_part(file, f, true);
        }
        match how {
            "umount -l" => {
                skiff_tests::harness::run(Command::new("umount").arg("-l").arg(&mount.mnt));
            }
            _ => {
                let pid = mount.pid().unwrap_or_else(|| panic!("no daemon"));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        };
        // The mount point is free at once; the open files still read.
        assert!(
            wait_until(Duration::from_secs(30), || !is_mount_point(&mount.mnt)),
            "{how}: still mounted"
        );
        for (f, file) in &open {
            read_part(file, f, false);
        }
        assert!(
            mount.try_wait().is_none(),
            "{how}: the daemon quit with files open"
        );
        drop(open);
        // The last close ends the daemon.
        let exited = wait_until(Duration::from_secs(60), || mount.try_wait().is_some());
        assert!(
            exited,
            "{how}: the daemon still runs after the last file was closed"
        );
        report(
            &format!("unmount-with-open-files ({how})"),
            &format!(
                "survived: {} open files read to the end after the unmount; the daemon exited on the last close",
                files.len()
            ),
        );
    }
}

/// Whether `path` is a mount point (in /proc/self/mountinfo).
fn is_mount_point(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A streamed range (readahead's requests: one Range GET handed over in
/// pieces as they arrive) whose body is cut off half way resumes with a
/// second request for the pieces not handed over: every piece once, in
/// order, none short, the bytes those of the blob.
#[test]
fn a_streamed_range_cut_off_resumes_at_the_first_piece_not_handed_over() {
    use skiff_registry::{BlobStore as _, DockerRef, RegistryBlobStore, RegistryConfig};
    let dir = work_dir("streamed_range");
    let net = FaultyRegistry::start(&dir);
    let image = net.image();
    let r: DockerRef = image
        .trim_start_matches("docker://")
        .parse()
        .expect("the fixture's reference parses");
    let store = RegistryBlobStore::new(&r, &RegistryConfig::default()).expect("a store");
    let manifest = store
        .client()
        .fetch_manifest("skiff", None)
        .expect("the fixture's manifest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest.bytes).expect("the manifest is JSON");
    let (digest, size) = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["digest"].as_str()?.to_owned(), l["size"].as_u64()?)))
        .max_by_key(|(_, size)| *size)
        .expect("a layer");
    assert!(size > 4 << 20, "the largest blob is only {size} bytes");
    let digest = digest.parse().expect("a sha256 digest");
    let (offset, pieces) = (12_345u64, [300_000u64, 1, 700_000, 1 << 20, 2_000_000]);
    let total: u64 = pieces.iter().sum();
    let whole = store
        .read_range(&digest, offset, total)
        .expect("the range, unfaulted");

    let p = &net.proxy;
    p.reset_stats();
    // The first range request sends half its body and closes.
    p.set_fault(r#"{"kind": "truncate", "match": "range", "count": 1}"#);
    let mut got: Vec<(usize, Vec<u8>)> = Vec::new();
    store
        .read_range_pieces(&digest, offset, &pieces, None, &mut |i, bytes| {
            got.push((i, bytes))
        })
        .expect("the streamed range rides out a cut-off body");
    assert_eq!(p.stat("faults_injected"), 1, "the fault was injected once");
    assert_eq!(
        p.stat("range_requests"),
        2,
        "one request, then one to resume"
    );
    let order: Vec<usize> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        order,
        (0..pieces.len()).collect::<Vec<_>>(),
        "each piece once, in order"
    );
    for ((_, bytes), len) in got.iter().zip(pieces) {
        assert_eq!(bytes.len() as u64, len, "a piece of the size asked");
    }
    let joined: Vec<u8> = got.into_iter().flat_map(|(_, b)| b).collect();
    assert!(joined == whole, "the pieces are the blob's bytes");
    report(
        "streamed range cut off",
        "resumed at the first piece not handed over: 2 requests, every byte right",
    );
}
