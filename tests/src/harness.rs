//! Locating the parts an end-to-end test needs, and running commands.
//!
//! Every helper here panics with a message saying what is missing and how to
//! get it: a test that lacks a component fails, it never skips.
//!
//! Environment:
//! - `SKIFF_BIN`: the `skiff` binary (default `TARGET/release/skiff`).
//! - `SKIFF_FIXTURES`: the fixtures directory (default `../shared/fixtures`
//!   beside the repository).
//! - `CARGO_TARGET_DIR`: the target directory (default `target/` of the
//!   workspace); caches live in `TARGET/skiff-test-cache`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo target directory: `CARGO_TARGET_DIR`, else `target/` in the
/// workspace root.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The `skiff` binary: `SKIFF_BIN`, else `TARGET/release/skiff`.
///
/// # Panics
/// When the file does not exist.
pub fn skiff_bin() -> PathBuf {
    let (bin, from) = match std::env::var_os("SKIFF_BIN") {
        Some(b) if !b.is_empty() => (PathBuf::from(b), "SKIFF_BIN"),
        _ => (target_dir().join("release").join("skiff"), "the default"),
    };
    if !bin.is_file() {
        panic!(
            "the skiff binary is missing: {} ({from}) does not exist. Build it with \
             `cargo build --release -p skiff` (scripts/test does), or set SKIFF_BIN",
            bin.display()
        );
    }
    bin
}

/// The fixtures directory: `SKIFF_FIXTURES`, else `../shared/fixtures`
/// relative to the workspace root.
///
/// # Panics
/// When the directory does not hold `images/index.json`.
pub fn fixtures_dir() -> PathBuf {
    let (dir, from) = match std::env::var_os("SKIFF_FIXTURES") {
        Some(d) if !d.is_empty() => (PathBuf::from(d), "SKIFF_FIXTURES"),
        _ => (
            workspace_root().join("..").join("shared").join("fixtures"),
            "the default",
        ),
    };
    if !dir.join("images").join("index.json").is_file() {
        panic!(
            "the fixtures are missing: {}/images/index.json ({from}) does not exist. \
             Set SKIFF_FIXTURES to the directory that holds images/ (the fixture OCI layout)",
            dir.display()
        );
    }
    // Canonical, so that references built from it hold no `..`.
    fs::canonicalize(&dir).unwrap_or(dir)
}

/// The fixture OCI layout directory (`FIXTURES/images`).
pub fn fixture_layout() -> PathBuf {
    fixtures_dir().join("images")
}

/// The fixture image reference in skopeo's syntax: `oci:FIXTURES/images:python`.
pub fn fixture_image() -> String {
    format!("oci:{}:python", fixture_layout().display())
}

/// A directory for test scratch space under the target directory
/// (`TARGET/skiff-test-tmp`), created if needed; make temporary directories
/// inside it (it is on the same filesystem as the caches).
///
/// # Panics
/// When the directory cannot be created.
pub fn scratch_root() -> PathBuf {
    let dir = target_dir().join("skiff-test-tmp");
    if let Err(e) = fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// The command line of `cmd`, for messages.
pub fn command_line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(shell_word));
    parts.join(" ")
}

fn shell_word(a: &OsStr) -> String {
    let s = a.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@+,%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The last `max` bytes of some output, as text.
fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&bytes[start..]);
    if start > 0 {
        format!("[... {start} bytes cut ...]{text}")
    } else {
        text.into_owned()
    }
}

/// Runs `cmd` to completion, capturing stdout and stderr.
///
/// # Panics
/// When the command cannot be started (names the program).
pub fn run_unchecked(cmd: &mut Command) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run `{}`: {e}", command_line(cmd)),
    }
}

/// Runs `cmd` and returns its output when it exits with status 0.
///
/// # Panics
/// When the command cannot be started or fails: the message holds the
/// command line, the exit status and the tails of stdout and stderr.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_unchecked(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            command_line(cmd),
            tail(&out.stdout, 4000),
            tail(&out.stderr, 8000)
        );
    }
    out
}

/// The python workload (`import numpy, pandas`) in a chroot of `root` (a
/// mount of the fixture image); its output when it succeeds.
///
/// # Panics
/// When it fails, with the reason (see [`run`]).
pub fn import_in_chroot(root: &Path) -> Output {
    run(Command::new("chroot").arg(root).args([
        "python3",
        "-c",
        "import numpy, pandas; print(numpy.__name__, pandas.__name__)",
    ]))
}

/// A `Command` for the `skiff` binary with `args` (see [`skiff_bin`]).
pub fn skiff_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(skiff_bin());
    cmd.args(args);
    cmd
}

/// Runs `skiff ARGS...` and returns its output; panics when it fails (see
/// [`run`]).
pub fn skiff<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut skiff_cmd(args))
}

/// True when `program` is found on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The reference root filesystem of the fixture image, as `umoci unpack`
/// writes it; made once and cached in
/// `TARGET/skiff-test-cache/python-bundle-KEY/rootfs`, where KEY is taken from
/// the digest of the fixture's `index.json` (the bundle's `.complete` file
/// marks a finished one).
///
/// umoci reads a copy of the fixture layout, so the fixtures are never
/// written. Concurrent callers (threads or processes) are safe: each builds
/// in its own temporary directory and the first rename wins.
///
/// # Panics
/// When umoci or the fixtures are missing, or the unpack fails.
pub fn umoci_rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(build_umoci_rootfs).clone()
}

fn build_umoci_rootfs() -> PathBuf {
    let cache = target_dir().join("skiff-test-cache");
    let layout = fixture_layout();
    // Keyed by the fixture's index.json, so a changed fixture is unpacked anew.
    let index = match fs::read(layout.join("index.json")) {
        Ok(b) => b,
        Err(e) => panic!("cannot read {}/index.json: {e}", layout.display()),
    };
    let key = &hex::encode(Sha256::digest(&index))[..16];
    let bundle = cache.join(format!("python-bundle-{key}"));
    let marker = bundle.join(".complete");
    if marker.is_file() {
        return bundle.join("rootfs");
    }
    if !on_path("umoci") {
        panic!("umoci is missing: install it (scripts/setup does: apt-get install umoci)");
    }
    let tmp = cache.join(format!("python-bundle.tmp-{}", std::process::id()));
    remove_all(&tmp);
    if let Err(e) = fs::create_dir_all(&tmp) {
        panic!("cannot create {}: {e}", tmp.display());
    }
    let layout_copy = tmp.join("layout");
    run(Command::new("cp").arg("-a").arg(&layout).arg(&layout_copy));
    let tmp_bundle = tmp.join("bundle");
    let image = format!("{}:python", layout_copy.display());
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(&image)
        .arg(&tmp_bundle));
    if let Err(e) = fs::write(
        tmp_bundle.join(".complete"),
        b"umoci unpack of the fixture\n",
    ) {
        panic!("cannot write {}: {e}", tmp_bundle.display());
    }
    if !marker.is_file() {
        // A stale, incomplete bundle from an interrupted run.
        remove_all(&bundle);
    }
    match fs::rename(&tmp_bundle, &bundle) {
        Ok(()) => {}
        Err(e) if marker.is_file() => {
            // Another process finished first: use its bundle.
            let _ = e;
        }
        Err(e) => panic!(
            "cannot move {} to {}: {e}",
            tmp_bundle.display(),
            bundle.display()
        ),
    }
    remove_all(&tmp);
    bundle.join("rootfs")
}

/// Removes a directory tree if it exists.
///
/// # Panics
/// When it exists and cannot be removed.
pub fn remove_all(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", dir.display()),
    }
}

/// `len` deterministic pseudo-random bytes (xorshift), different for each
/// `seed`: test data that does not compress and is the same in every run.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Runs one case of a table-driven test, catching its panic, so that every
/// case runs and the test reports all failures at the end: `Err` holds
/// "`name`: the panic message".
pub fn catch_case<T>(name: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let message = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{name}: {message}")
    })
}

/// Regular files of the reference tree (see [`umoci_rootfs`]) between `min`
/// and `max` bytes, as relative paths, sorted.
pub fn reference_files(min: u64, max: u64) -> Vec<String> {
    reference_files_sized(min, max)
        .into_iter()
        .map(|(rel, _)| rel)
        .collect()
}

/// [`reference_files`] with each file's size.
pub fn reference_files_sized(min: u64, max: u64) -> Vec<(String, u64)> {
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
                        out.push((rel.to_string_lossy().into_owned(), len));
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// A CA named `ca_name` and a server certificate for 127.0.0.1 signed by
/// it, made with openssl under `dir`: (ca.pem, cert.pem, key.pem).
pub fn test_certs(dir: &Path, ca_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("req.csr"),
    );
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-subj")
        .arg(format!("/CN={ca_name}"))
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    let ext = dir.join("ext.cnf");
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", ext.display()));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    (ca, cert, key)
}
