//! The per-image FUSE daemons: `skiff mount` processes, one per image.
//!
//! Each daemon runs in its own session (through `setsid`) with its output
//! in a log file, so that it outlives a restart of the snapshotter and
//! keeps serving the containers whose overlays sit on its mount. As root a
//! `skiff mount` is a keeper that holds the FUSE connection and runs the
//! serving worker as its child (see `skiff_fusefs::keeper`): a worker that
//! dies is replaced without breaking the containers, and `skiff upgrade
//! ROOT/mounts` moves every image to a new binary. Files of image `ID` live
//! in `ROOT/mounts/ID/`: `mnt` (the mount point), `pid` (the keeper's,
//! written once the mount is ready), `daemon.log`, and the keeper's state
//! (`keeper.json`, `image.json`). The
//! daemon's metrics (Prometheus text, when `mount.metrics` is on) are served
//! on `ROOT/metrics/SHORT.sock`, `SHORT` being the first 16 hex digits of
//! the image digest: a unix socket path must fit in 108 bytes.
//!
//! # Credentials
//!
//! A private image's credentials (from the [`Keychain`], that is from
//! kubelet's `PullImage`) reach its daemon on a descriptor, never on disk
//! or in its arguments or environment: a sealed memory file
//! (`memfd_create`, then sealed against writes, growing and shrinking)
//! holding [`PassedCredentials`] as JSON becomes the daemon's standard
//! input, and `--registry-credentials-fd 0` tells it to read them there.
//! As root `skiff mount` is a keeper: it never reads them, its workers
//! inherit its standard input (every worker it starts, after a crash or
//! an upgrade, reads the same sealed file from its start through
//! `/proc/self/fd/0`), so the credentials live as long as the mount, for
//! re-authenticating when tokens expire. Only root (or the daemon's own
//! user, under the kernel's ptrace checks) can read another process's
//! descriptors, as it can read its memory.
//!
//! Everything here that touches the mount point (`statfs`, unmount) runs on
//! a blocking thread: a FUSE mount whose daemon hangs would otherwise stall
//! the runtime.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, FUSE_SUPER_MAGIC};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use skiff_registry::Credentials;

use crate::config::MountConfig;
use crate::keychain::Keychain;
use crate::Error;

/// The `skiff mount` option that names the descriptor of the credentials.
pub const CREDENTIALS_FD_ARG: &str = "--registry-credentials-fd";
/// Largest credentials file read.
const MAX_CREDENTIALS_BYTES: u64 = 64 << 10;

/// What a mount daemon gets on its credentials descriptor: the registry
/// the credentials are for, and them. `Debug` hides the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedCredentials {
    /// `host[:port]` as in the image reference.
    pub registry: String,
    /// The user name and password (or identity token).
    pub credentials: Credentials,
}

/// A sealed memory file holding `passed` as JSON (for a child's stdin).
pub fn credentials_file(passed: &PassedCredentials) -> Result<OwnedFd, Error> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Internal(format!(
            "passing credentials to a mount daemon: {what}: {e}"
        ))
    };
    let json = serde_json::to_vec(passed).map_err(|e| fail("encoding", &e))?;
    let fd = memfd_create(
        c"skiff-registry-credentials",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| fail("memfd_create", &e))?;
    let mut file = fs::File::from(fd);
    file.write_all(&json).map_err(|e| fail("writing", &e))?;
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(|e| fail("sealing", &e))?;
    Ok(OwnedFd::from(file))
}

/// Reads the credentials a daemon was given on descriptor `fd` (from the
/// start of the file, through `/proc/self/fd`, so that every worker of a
/// keeper reads them whole).
pub fn read_passed_credentials(fd: i32) -> Result<PassedCredentials, String> {
    let path = format!("/proc/self/fd/{fd}");
    let file = fs::File::open(&path).map_err(|e| format!("descriptor {fd}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("descriptor {fd}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "descriptor {fd} is not a file (the snapshotter passes a sealed memory file)"
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIALS_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("descriptor {fd}: {e}"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| format!("descriptor {fd} does not hold registry credentials"))
}

/// How long a stopping daemon gets before its mount is detached anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a health check of a mount may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts, checks and stops `skiff mount` daemons.
#[derive(Debug, Clone)]
pub struct Daemons {
    dir: PathBuf,
    skiff_bin: PathBuf,
    options: MountConfig,
    keychain: Option<Arc<Keychain>>,
}

/// Whether a recorded daemon still serves its mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The process lives and the mount answers.
    Alive,
    /// The process is gone, or the mount does not answer.
    Dead,
}

impl Daemons {
    /// Daemons with their files under `dir` (`ROOT/mounts`), run from
    /// `skiff_bin`.
    pub fn new(dir: PathBuf, skiff_bin: PathBuf, options: MountConfig) -> Daemons {
        Daemons {
            dir,
            skiff_bin,
            options,
            keychain: None,
        }
    }

    /// The node's disk cache directory the daemons use (`mount.cache_dir`,
    /// else `skiff mount`'s default as root).
    pub fn cache_dir(&self) -> PathBuf {
        self.options
            .cache_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(skiff_fusefs::disk::DEFAULT_CACHE_DIR))
    }

    /// Gives each new daemon the credentials `keychain` holds for its
    /// image's repository.
    pub fn with_keychain(mut self, keychain: Arc<Keychain>) -> Daemons {
        self.keychain = Some(keychain);
        self
    }

    /// The mount point of image `id`.
    pub fn mount_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("mnt")
    }

    fn pid_file(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("pid")
    }

    /// The metrics socket of image `id`'s daemon; `None` when its path
    /// would not fit in a unix socket address.
    pub fn metrics_socket(&self, id: &str) -> Option<PathBuf> {
        let short: String = id
            .trim_start_matches("sha256-")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(16)
            .collect();
        let base = self.dir.parent().unwrap_or(&self.dir);
        let path = base.join("metrics").join(format!("{short}.sock"));
        // sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
        (path.as_os_str().len() < 108).then_some(path)
    }

    /// The log file of image `id`'s daemon.
    pub fn log_file(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("daemon.log")
    }

    /// Starts a daemon mounting `source` for image `id`; returns its PID
    /// once the mount is ready. A stale mount left on the mount point is
    /// detached first.
    pub async fn start(&self, id: &str, source: &str) -> Result<i32, Error> {
        let credentials = self
            .keychain
            .as_ref()
            .and_then(|k| k.for_image(source))
            .map(|(registry, credentials)| PassedCredentials {
                registry,
                credentials,
            });
        self.start_with_credentials(id, source, credentials).await
    }

    /// [`start`](Self::start) with the credentials `credentials` (passed on
    /// a sealed memory file) instead of the keychain's.
    pub async fn start_with_credentials(
        &self,
        id: &str,
        source: &str,
        credentials: Option<PassedCredentials>,
    ) -> Result<i32, Error> {
        let mnt = self.mount_dir(id);
        let pid_file = self.pid_file(id);
        let log_file = self.log_file(id);
        let mount_err = |message: String| Error::Mount {
            dir: mnt.clone(),
            message,
        };
        {
            let mnt = mnt.clone();
            let pid_file = pid_file.clone();
            tokio::task::spawn_blocking(move || -> Result<(), Error> {
                detach_if_mounted(&mnt);
                fs::create_dir_all(&mnt).map_err(|e| Error::io(&mnt, e))?;
                match fs::remove_file(&pid_file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(Error::io(&pid_file, e))
                    }
                    _ => Ok(()),
                }
            })
            .await??;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .map_err(|e| Error::io(&log_file, e))?;
        let log2 = log.try_clone().map_err(|e| Error::io(&log_file, e))?;
        let setsid = ["/usr/bin/setsid", "/bin/setsid"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file());
        let mut cmd = match setsid {
            Some(s) => {
                let mut c = tokio::process::Command::new(s);
                c.arg(&self.skiff_bin);
                c
            }
            None => {
                // No setsid(1): at least leave our process group, so that
                // a signal to it (a terminal's Ctrl-C) spares the daemon.
                let mut c = tokio::process::Command::new(&self.skiff_bin);
                c.process_group(0);
                c
            }
        };
        cmd.arg("mount")
            .arg(source)
            .arg(&mnt)
            .args(["--allow-other", "--dev", "--suid", "--force-unmount"])
            .arg("--threads")
            .arg(self.options.threads.to_string())
            .arg("--cache-mb")
            .arg(self.options.cache_mb.to_string())
            .arg("--read-budget-secs")
            .arg(self.options.read_budget_secs.to_string())
            .arg("--readahead-kb")
            .arg(self.options.readahead_kb.to_string())
            .arg("--fetch-window-kb")
            .arg(self.options.fetch_window_kb.to_string())
            .arg("--fetch-window-max-kb")
            .arg(self.options.fetch_window_max_kb.to_string())
            .arg("--cache-size")
            .arg(&self.options.cache_size)
            .arg("--background-fetch")
            .arg(&self.options.background_fetch)
            .arg("--pid-file")
            .arg(&pid_file)
            // The keeper's state beside the mount: `skiff upgrade ROOT/mounts`
            // finds every image's keeper there.
            .arg("--state-dir")
            .arg(self.dir.join(id));
        if let Some(dir) = &self.options.cache_dir {
            cmd.arg("--cache-dir").arg(dir);
        }
        if let Some(low) = &self.options.cache_low {
            cmd.arg("--cache-low").arg(low);
        }
        if self.options.metrics {
            match self.metrics_socket(id) {
                Some(sock) => {
                    if let Some(dir) = sock.parent() {
                        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                    }
                    cmd.arg("--metrics-socket").arg(sock);
                }
                None => tracing::warn!(
                    image = id,
                    "the root directory's path is too long for a metrics socket; metrics off"
                ),
            }
        }
        let stdin = match &credentials {
            Some(passed) => {
                cmd.arg(CREDENTIALS_FD_ARG).arg("0");
                Stdio::from(credentials_file(passed)?)
            }
            None => Stdio::null(),
        };
        cmd.stdin(stdin)
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        tracing::info!(
            image = id,
            source,
            mountpoint = %mnt.display(),
            credentials = credentials.is_some(),
            "starting skiff mount"
        );
        let mut child = cmd
            .spawn()
            .map_err(|e| mount_err(format!("cannot run {}: {e}", self.skiff_bin.display())))?;
        let deadline = Instant::now() + Duration::from_secs(self.options.ready_timeout_secs);
        loop {
            if let Some(status) = child.try_wait().map_err(|e| mount_err(e.to_string()))? {
                return Err(mount_err(format!(
                    "skiff mount {source} exited ({status}) before its mount was ready: {}",
                    log_tail(&log_file)
                )));
            }
            if let Some(pid) = read_pid(&pid_file) {
                if is_fuse_mount(&mnt).await {
                    tracing::info!(image = id, pid, "image mounted");
                    // The child handle is dropped: tokio reaps it if it
                    // exits while we run; after a restart, init does.
                    return Ok(pid);
                }
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(mount_err(format!(
                    "skiff mount {source} was not ready after {} s: {}",
                    self.options.ready_timeout_secs,
                    log_tail(&log_file)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the daemon `pid` of image `id` still serves its mount.
    pub async fn check(&self, id: &str, pid: Option<i32>) -> Health {
        let mnt = self.mount_dir(id);
        let alive = pid.is_some_and(|p| process_serves(p, &mnt));
        if alive && is_fuse_mount(&mnt).await {
            Health::Alive
        } else {
            Health::Dead
        }
    }

    /// Stops the daemon of image `id` (SIGTERM; it unmounts and exits),
    /// detaches the mount if it is still there, and removes its files.
    pub async fn stop(&self, id: &str, pid: Option<i32>) -> Result<(), Error> {
        let mnt = self.mount_dir(id);
        if let Some(pid) = pid.filter(|p| process_serves(*p, &mnt)) {
            tracing::info!(image = id, pid, "stopping skiff mount");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while process_serves(pid, &mnt) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let dir = self.dir.join(id);
        tokio::task::spawn_blocking(move || {
            detach_if_mounted(&mnt);
            // Only our own files: never recurse into a mount point.
            let _ = fs::remove_dir(&mnt);
            for f in [
                "pid",
                "daemon.log",
                skiff_fusefs::keeper::STATE_FILE,
                skiff_fusefs::keeper::IMAGE_FILE,
                skiff_fusefs::keeper::UPGRADE_FILE,
            ] {
                let _ = fs::remove_file(dir.join(f));
            }
            let _ = fs::remove_dir(&dir);
        })
        .await?;
        Ok(())
    }
}

/// Reads a PID file.
fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether process `pid` lives (not a zombie) and is a `skiff mount` of `mnt`.
pub fn process_serves(pid: i32, mnt: &Path) -> bool {
    let Some(cmdline) = skiff_fusefs::process::cmdline(pid) else {
        return false;
    };
    let mnt = mnt.as_os_str().as_encoded_bytes();
    let mut args = cmdline.split(|b| *b == 0);
    args.clone().any(|a| a == b"mount") && args.any(|a| a == mnt)
}

/// Whether `dir` is a FUSE mount that answers `statfs` (on a blocking
/// thread, with a timeout).
pub async fn is_fuse_mount(dir: &Path) -> bool {
    let dir = dir.to_path_buf();
    let check = tokio::task::spawn_blocking(move || {
        statfs(&dir).is_ok_and(|s| s.filesystem_type() == FUSE_SUPER_MAGIC)
    });
    matches!(
        tokio::time::timeout(CHECK_TIMEOUT, check).await,
        Ok(Ok(true))
    )
}

/// Lazily detaches whatever is mounted on `dir` (a stale FUSE mount of a
/// dead daemon answers ENOTCONN); blocking.
pub fn detach_if_mounted(dir: &Path) {
    // A mount point is on another device than its parent, or answers
    // ENOTCONN when its FUSE daemon is gone.
    let stale = match (fs::metadata(dir), dir.parent().map(fs::metadata)) {
        (Err(e), _) => e.raw_os_error() == Some(nix::libc::ENOTCONN),
        (Ok(m), Some(Ok(p))) => {
            use std::os::unix::fs::MetadataExt as _;
            m.dev() != p.dev()
        }
        _ => false,
    };
    if stale {
        match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => tracing::info!(dir = %dir.display(), "detached a stale mount"),
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot detach a stale mount: {e}"),
        }
    }
}

/// The last lines of a daemon's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        format!("(nothing in {})", path.display())
    } else {
        let mut lines = lines;
        lines.reverse();
        format!("{} (log: {})", lines.join(" | "), path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_pass_through_a_sealed_memory_file() -> Result<(), String> {
        let passed = PassedCredentials {
            registry: "r.lan:5000".into(),
            credentials: Credentials::new("u", "hunter2"),
        };
        let fd = credentials_file(&passed).map_err(|e| e.to_string())?;
        let raw = fd.as_raw_fd();
        // Read twice: every worker of a keeper reads the file whole.
        assert_eq!(read_passed_credentials(raw)?, passed);
        assert_eq!(read_passed_credentials(raw)?, passed);
        // Sealed: nobody can change what later workers read.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{raw}"))
            .map_err(|e| e.to_string())?;
        assert!(
            f.write_all(b"x").is_err(),
            "the credentials file is writable"
        );
        assert!(!format!("{passed:?}").contains("hunter2"));
        Ok(())
    }

    #[test]
    fn a_descriptor_without_credentials_is_an_error() {
        let dir = std::env::temp_dir().join(format!("skiff-creds-test-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let path = dir.join("not-credentials");
        let _ = fs::write(&path, b"{}");
        if let Ok(f) = fs::File::open(&path) {
            let e = read_passed_credentials(f.as_raw_fd());
            assert!(e.is_err_and(|m| m.contains("does not hold registry credentials")));
        }
        assert!(read_passed_credentials(987_654).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
