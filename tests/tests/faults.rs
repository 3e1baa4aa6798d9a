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
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use skiff_tests::faultproxy::{wait_until, FaultyRegistry};
use skiff_tests::harness::{remove_all, scratch_root, skiff_cmd, umoci_rootfs};
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

/// Regular files of the reference tree between `min` and `max` bytes
/// (relative paths, sorted).
fn reference_files(min: u64, max: u64) -> Vec<String> {
    let root = umoci_rootfs();
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if (min..=max).contains(&len) {
                    if let Ok(rel) = e.path().strip_prefix(&root) {
                        out.push(rel.to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    out.sort();
    out
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
            panic!("reading {rel} through the mount hung for {} s", HANG.as_secs())
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
    dir: PathBuf,
    net: FaultyRegistry,
    mount: SkiffMount,
}

impl Rig {
    fn new(name: &str, extra: &[&str]) -> Rig {
        let dir = work_dir(name);
        let net = FaultyRegistry::start(&dir);
        let mount = mount_via(&net, &dir, extra, &[]);
        Rig { dir, net, mount }
    }
}

/// Mounts the fixture through `net`'s proxy at `dir/mnt` with the
/// configuration above: no prefetch, no readahead, no fetch window, so
/// that each read makes its own requests.
fn mount_via(
    net: &FaultyRegistry,
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> SkiffMount {
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
        "{name}: the read of {b} still fails after the fault cleared: {o:?}"
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
    assert!(matches!(o, Outcome::Correct), "after the token server recovered: {o:?}");
    report(
        "expiring-token",
        &format!(
            "survived: {read} files read with tokens expiring after 3 uses or 2 s \
             ({issued} tokens issued, {unauthorized} 401s); token server refusing -> EIO after {tries} token requests; recovered"
        ),
    );
}
