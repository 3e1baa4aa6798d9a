//! Real services for end-to-end tests: a registry on loopback and a
//! `skiff mount` daemon, each stopped (and unmounted) when dropped, even when
//! the test fails.
//!
//! These panic with a clear message when a component is missing or does not
//! come up: a test that cannot run its real parts fails, it never skips.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{on_path, skiff_bin};

/// Stops a child: SIGTERM, then SIGKILL after 10 s.
pub fn stop_child(child: &mut Child, what: &str) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{what} did not stop on SIGTERM: killing it");
    let _ = child.kill();
    child.wait().ok()
}

/// The last `n` lines of a text file (for failure messages).
pub fn tail_of(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Debian's `docker-registry` (distribution 2.8) on 127.0.0.1, storage in a
/// directory of the test, access log on.
pub struct Registry {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its log (access log included).
    pub log: PathBuf,
    child: Child,
}

impl Registry {
    /// Starts a registry keeping its data and log under `dir`.
    pub fn start(dir: &Path) -> Registry {
        Registry::start_on(dir, &dir.join("registry"))
    }

    /// Starts a registry with its config and log under `dir`, serving the
    /// storage in `storage` (which several registries may read at once).
    pub fn start_on(dir: &Path, storage: &Path) -> Registry {
        Registry::start_full(dir, storage, None)
    }

    /// Starts a registry under `dir` that requires HTTP Basic auth
    /// (htpasswd, bcrypt) for `user` with `password`.
    pub fn start_with_htpasswd(dir: &Path, user: &str, password: &str) -> Registry {
        assert!(
            on_path("htpasswd"),
            "htpasswd is missing: run scripts/setup (Debian package apache2-utils)"
        );
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .unwrap_or_else(|e| panic!("cannot run htpasswd: {e}"));
        assert!(out.status.success(), "htpasswd failed: {out:?}");
        let file = dir.join("htpasswd");
        fs::write(&file, &out.stdout).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
            file.display()
        );
        Registry::start_full(dir, &dir.join("registry"), Some(&auth))
    }

    fn start_full(dir: &Path, storage: &Path, auth: Option<&str>) -> Registry {
        assert!(
            on_path("docker-registry"),
            "docker-registry is missing: run scripts/setup (Debian package docker-registry)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"));
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ) + auth.unwrap_or("");
        let config_path = dir.join("registry.yml");
        fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("writing the registry config: {e}"));
        let log = dir.join("registry.log");
        let f =
            fs::File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = f.try_clone().unwrap_or_else(|e| panic!("log file: {e}"));
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start docker-registry: {e}"));
        let mut registry = Registry { port, log, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || matches!(registry.child.try_wait(), Ok(Some(_))) {
                panic!(
                    "the registry did not listen on 127.0.0.1:{port}:\n{}",
                    tail_of(&registry.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop_child(&mut self.child, "docker-registry");
    }
}

/// A running `skiff mount IMAGE MNT`; unmounted and reaped on drop.
pub struct SkiffMount {
    child: Option<Child>,
    /// The mount point.
    pub mnt: PathBuf,
    /// The daemon's stdout and stderr.
    pub log: PathBuf,
    /// The "skiff: mounted ..." line.
    pub ready_line: String,
}

impl SkiffMount {
    /// Mounts `image` at `dir/mnt` with `extra` flags and waits until it
    /// serves (120 s at most).
    pub fn start(image: &str, dir: &Path, extra: &[&str]) -> SkiffMount {
        SkiffMount::start_env(image, dir, extra, &[])
    }

    /// [`SkiffMount::start`] with extra environment variables for the
    /// daemon (`RUST_LOG` among them overrides the default `info`). A stale
    /// mount left at `dir/mnt` is cleaned up first, unless `extra` holds
    /// `--force-unmount` (then the daemon must deal with it itself).
    pub fn start_env(image: &str, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> SkiffMount {
        match SkiffMount::try_start_env(image, dir, extra, env) {
            Ok(m) => m,
            Err(f) => panic!(
                "skiff mount did not become ready ({}):\n{}",
                f.reason,
                tail_of(&f.log_path, 30)
            ),
        }
    }

    /// [`SkiffMount::start_env`] for a mount that may be refused: when the
    /// daemon exits (or does not get ready within 120 s) it is reaped and
    /// the failure returned, with its exit status and log.
    pub fn try_start_env(
        image: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<SkiffMount, MountFailure> {
        assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
        assert!(
            on_path("fusermount3"),
            "fusermount3 is missing: install fuse3"
        );
        let mnt = dir.join("mnt");
        let log = dir.join("mount.log");
        // Each mount gets its own empty disk cache unless the caller names
        // one: the node-wide default would carry chunks from one test (or
        // run) to the next and make "cold" reads warm.
        let mut cache_args: Vec<String> = Vec::new();
        if !extra
            .iter()
            .any(|a| *a == "--cache-dir" || *a == "--no-disk-cache")
        {
            let cache = dir.join("cache");
            let _ = fs::remove_dir_all(&cache);
            cache_args = vec!["--cache-dir".into(), cache.display().to_string()];
        }
        // The keeper's state stays in the test's directory.
        if !extra.contains(&"--state-dir") {
            cache_args.push("--state-dir".into());
            cache_args.push(dir.join("state").display().to_string());
        }
        if !extra.contains(&"--force-unmount") {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&mnt)
                .stderr(Stdio::null())
                .status();
            fs::create_dir_all(&mnt).unwrap_or_else(|e| panic!("creating {}: {e}", mnt.display()));
        }
        // A stale mount point fails create_dir_all: the daemon reports it.
        let _ = fs::create_dir_all(&mnt);
        let log_file = fs::File::create(&log).unwrap_or_else(|e| panic!("creating the log: {e}"));
        let mut child = Command::new(skiff_bin())
            .arg("mount")
            .arg(image)
            .arg(&mnt)
            .args(&cache_args)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start skiff mount: {e}"));
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut m = SkiffMount {
            child: Some(child),
            mnt,
            log,
            ready_line: String::new(),
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.starts_with("skiff: mounted") => m.ready_line = line,
            other => {
                let status = m
                    .child
                    .take()
                    .and_then(|mut c| stop_child(&mut c, "skiff mount"));
                return Err(MountFailure {
                    reason: format!("{other:?}"),
                    status,
                    log: m.logs(),
                    log_path: m.log.clone(),
                });
            }
        }
        // Later stdout lines (the exit summary) go to the log's side file.
        let summary = m.log.with_extension("stdout");
        std::thread::spawn(move || {
            let lines: Vec<String> = rx.iter().collect();
            let _ = fs::write(summary, lines.join("\n"));
        });
        Ok(m)
    }

    /// The daemon's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process serving the FUSE requests: the keeper's worker (as
    /// root, `skiff mount` is a keeper with the serving daemon as its
    /// child), or the daemon itself when it has no child
    /// (`--no-failover`). Its memory and descriptors are the daemon's.
    pub fn serving_pid(&self) -> Option<u32> {
        let pid = self.pid()?;
        Some(child_of(pid).unwrap_or(pid))
    }

    /// `kill -9` of the serving worker only: its keeper starts another,
    /// which takes the mount over.
    pub fn kill9_worker(&self) -> Option<u32> {
        let pid = self.pid()?;
        let worker = child_of(pid)?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        Some(worker)
    }

    /// `kill -9` of the keeper and its worker, reaped: nothing is left to
    /// serve the mount, which stays behind stale (`ENOTCONN`), as a crash
    /// of both leaves it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let worker = child_of(child.id());
            let _ = child.kill();
            if let Some(w) = worker {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(w as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // Wait until the worker is gone (not our child: no reaping).
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{w}/exe")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = child.wait();
        }
    }

    /// The daemon's exit status, if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// The daemon's log (stderr) so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel.trim_start_matches('/'))
    }

    /// SIGTERM; returns the exit status and the exit summary line.
    pub fn terminate(&mut self) -> (Option<ExitStatus>, String) {
        let status = self
            .child
            .take()
            .and_then(|mut c| stop_child(&mut c, "skiff mount"));
        let side = self.log.with_extension("stdout");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut summary = String::new();
        while Instant::now() < deadline {
            summary = fs::read_to_string(&side).unwrap_or_default();
            if summary.contains("skiff: unmounted") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (status, summary)
    }
}

impl Drop for SkiffMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
            stop_child(&mut child, "skiff mount");
        }
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// The first child process of `pid` (`/proc/PID/task/PID/children`).
pub fn child_of(pid: u32) -> Option<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Why [`SkiffMount::try_start_env`] did not give a mount.
#[derive(Debug)]
pub struct MountFailure {
    /// What came instead of the ready line (e.g. the daemon's stdout closing).
    pub reason: String,
    /// The daemon's exit status (`None` if it could not be reaped).
    pub status: Option<ExitStatus>,
    /// The daemon's stderr.
    pub log: String,
    /// Where that log is.
    pub log_path: PathBuf,
}

/// A counter of an exit summary line (`name=VALUE`).
pub fn summary_value(summary: &str, name: &str) -> Option<u64> {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// `GET /metrics` on a daemon's metrics socket: the Prometheus text.
///
/// # Panics
/// When the socket does not answer with 200.
pub fn scrape_metrics(sock: &Path) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: skiff\r\nConnection: close\r\n\r\n")
        .unwrap_or_else(|e| panic!("writing to {}: {e}", sock.display()));
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .unwrap_or_else(|e| panic!("reading from {}: {e}", sock.display()));
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "metrics socket {}: {reply}",
        sock.display()
    );
    reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of an unlabelled metric in Prometheus text (0 when absent).
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}
