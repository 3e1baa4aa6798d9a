//! Faults at the network boundary, around the real registry: the
//! fault-injecting proxy (`scripts/fault-proxy.py`) in front of a
//! [`Registry`], switched at runtime, and a registry already holding the
//! fixture image converted by Skiff.
//!
//! The proxy forwards every request to the real registry unless a fault is
//! in force; faults (connection resets, stalls, 5xx, 429 with
//! `Retry-After`, truncated or corrupted bodies) and bearer-token auth with
//! expiring tokens are set through its control endpoints, and its counters
//! say how many requests a client made. See the script's own documentation
//! for the control protocol.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::harness::{fixture_image, fixture_layout, on_path, run, skiff_bin, target_dir};
use crate::services::{stop_child, tail_of, Registry};

/// The repository and tag of the converted fixture in
/// [`fixture_registry_storage`].
pub const FIXTURE_REPO: &str = "skiff/python:skiff";

/// The fault-injecting proxy, stopped when dropped.
pub struct FaultProxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its stderr.
    pub log: PathBuf,
    child: Child,
}

/// The proxy script in the repository.
pub fn proxy_script() -> PathBuf {
    crate::harness::workspace_root()
        .join("scripts")
        .join("fault-proxy.py")
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream`
    /// (`host:port`), its log under `dir`.
    pub fn start(upstream: &str, dir: &Path) -> FaultProxy {
        FaultProxy::start_with(upstream, dir, &[])
    }

    /// [`FaultProxy::start`] serving TLS with the certificate `cert` and
    /// its key `key` (PEM files).
    pub fn start_tls(upstream: &str, dir: &Path, cert: &Path, key: &Path) -> FaultProxy {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        FaultProxy::start_with(upstream, dir, &["--tls-cert", &cert, "--tls-key", &key])
    }

    /// [`FaultProxy::start`] with extra arguments (`--tls-cert`, `--tls-key`).
    pub fn start_with(upstream: &str, dir: &Path, args: &[&str]) -> FaultProxy {
        assert!(
            on_path("python3"),
            "python3 is missing: run scripts/setup (Debian package python3)"
        );
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let log = dir.join("fault-proxy.log");
        let err = fs::File::create(&log).unwrap_or_else(|e| panic!("creating the log: {e}"));
        let mut child = Command::new("python3")
            .arg(proxy_script())
            .arg("--upstream")
            .arg(upstream)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the fault proxy: {e}"));
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "the fault proxy did not start ({line:?}):\n{}",
                    tail_of(&log, 20)
                )
            });
        FaultProxy { port, log, child }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// One request to a control endpoint: the response body.
    fn control(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("connecting to the fault proxy: {e}"));
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host(),
            body.len()
        );
        s.write_all(req.as_bytes())
            .unwrap_or_else(|e| panic!("writing to the fault proxy: {e}"));
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .unwrap_or_else(|e| panic!("reading from the fault proxy: {e}"));
        assert!(
            reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
            "fault proxy {path}: {reply}"
        );
        reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }

    /// Sets the fault in force (a JSON object, see the script); `{}` or
    /// `{"kind":"none"}` switches faults off.
    pub fn set_fault(&self, json: &str) {
        self.control("POST", "/_proxy/fault", json);
    }

    /// Switches faults off.
    pub fn clear(&self) {
        self.set_fault(r#"{"kind":"none"}"#);
    }

    /// Sets the auth mode (a JSON object, see the script).
    pub fn set_auth(&self, json: &str) {
        self.control("POST", "/_proxy/auth", json);
    }

    /// The counters (JSON).
    pub fn stats(&self) -> serde_json::Value {
        let body = self.control("GET", "/_proxy/stats", "");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("fault proxy stats {body:?}: {e}"))
    }

    /// One counter of [`FaultProxy::stats`].
    pub fn stat(&self, name: &str) -> u64 {
        self.stats()[name].as_u64().unwrap_or(0)
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        self.control("POST", "/_proxy/reset", "");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        stop_child(&mut self.child, "fault proxy");
    }
}

/// Registry storage (for [`Registry::start_on`]) holding the fixture image
/// converted by `skiff convert` as [`FIXTURE_REPO`]; made once and kept in
/// `TARGET/skiff-test-cache/skiff-registry-KEY`, where KEY comes from the
/// fixture's `index.json` and the `skiff` binary (size and mtime), so a new
/// build converts again. Registries only read it: many may serve it at once.
///
/// # Panics
/// When a part is missing or the conversion fails.
pub fn fixture_registry_storage() -> PathBuf {
    static STORAGE: OnceLock<PathBuf> = OnceLock::new();
    STORAGE.get_or_init(build_storage).clone()
}

fn build_storage() -> PathBuf {
    let cache = target_dir().join("skiff-test-cache");
    let index = fs::read(fixture_layout().join("index.json"))
        .unwrap_or_else(|e| panic!("reading the fixture's index.json: {e}"));
    let bin = skiff_bin();
    let meta = fs::metadata(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let mut h = Sha256::new();
    h.update(&index);
    h.update(meta.len().to_le_bytes());
    if let Ok(t) = meta.modified() {
        h.update(format!("{t:?}").as_bytes());
    }
    let key = &hex::encode(h.finalize())[..16];
    let done = cache.join(format!("skiff-registry-{key}"));
    if done.join(".complete").is_file() {
        return done;
    }
    let tmp = cache.join(format!("skiff-registry.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("creating {}: {e}", tmp.display()));
    {
        let registry = Registry::start_on(&tmp, &tmp.join("storage"));
        let target = format!("docker://{}/{FIXTURE_REPO}", registry.host());
        run(Command::new(&bin)
            .args(["convert", "--no-progress"])
            .arg(fixture_image())
            .arg(&target));
    }
    let storage = tmp.join("storage");
    fs::write(storage.join(".complete"), b"skiff convert of the fixture\n")
        .unwrap_or_else(|e| panic!("writing the marker: {e}"));
    // Older keys (an older binary) are of no use any more.
    if let Ok(rd) = fs::read_dir(&cache) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("skiff-registry-") && e.path() != done {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if fs::rename(&storage, &done).is_err() && !done.join(".complete").is_file() {
        panic!("cannot move {} to {}", storage.display(), done.display());
    }
    let _ = fs::remove_dir_all(&tmp);
    done
}

/// A registry serving [`fixture_registry_storage`] with a [`FaultProxy`]
/// in front, both under `dir`; dropped in order (proxy first).
pub struct FaultyRegistry {
    /// The proxy (what clients talk to).
    pub proxy: FaultProxy,
    /// The real registry behind it.
    pub registry: Registry,
}

impl FaultyRegistry {
    /// Starts both.
    pub fn start(dir: &Path) -> FaultyRegistry {
        let storage = fixture_registry_storage();
        let registry = Registry::start_on(&dir.join("registry"), &storage);
        let proxy = FaultProxy::start(&registry.host(), &dir.join("proxy"));
        FaultyRegistry { proxy, registry }
    }

    /// The converted fixture through the proxy: `docker://127.0.0.1:PROXY/skiff/python:skiff`.
    pub fn image(&self) -> String {
        format!("docker://{}/{FIXTURE_REPO}", self.proxy.host())
    }
}

/// Waits until `f` is true, at most `limit`; whether it became true.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
