//! Mounting an image and serving it until unmounted or signalled.
//!
//! [`Daemon::start`] checks the mountpoint (a FUSE mount left by a crashed
//! daemon shows as `ENOTCONN` on `stat`: reported, or lazily unmounted with
//! `force_unmount`), parses the bootstrap (CRCs only, no walk), mounts with
//! fuser on `threads` threads and returns once the kernel has completed the
//! FUSE handshake: from then on the whole tree is served. [`Daemon::wait`]
//! blocks until SIGINT or SIGTERM (then unmounts: normally, or lazily with a
//! warning if files are still open) or until someone else unmounts, and
//! returns the final counters.
//!
//! Mounts are `ro`, `nodev`, `nosuid`, `noatime` and `default_permissions`
//! (the kernel checks permissions against the image's modes), `fsname=skiff`,
//! type `fuse.skiff`; `dev`, `suid` and `allow_other` only when asked.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::cache::ChunkSource;
use crate::chunk::ChunkFetcher;
use crate::error::DaemonError;
use crate::fs::SkiffFs;
use crate::image::{BootstrapBytes, Image};
use crate::metrics::{Metrics, MetricsSnapshot};

/// How a mount is made.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// FUSE worker threads.
    pub threads: usize,
    /// Bound of the memory cache of decompressed chunks, in bytes.
    pub cache_bytes: u64,
    /// Let other users than the mounting one access the mount (`allow_other`).
    pub allow_other: bool,
    /// Honour device nodes (default: `nodev`).
    pub dev: bool,
    /// Honour setuid/setgid bits (default: `nosuid`).
    pub suid: bool,
    /// Lazily unmount a stale FUSE mount found at the mountpoint, then mount.
    pub force_unmount: bool,
    /// Readahead of the mount in KiB, set on its bdi after mounting (0 keeps
    /// the kernel's default).
    pub readahead_kb: u32,
}

impl MountOptions {
    /// Defaults: 8 threads, 64 MiB of cache, 1 MiB readahead, nodev, nosuid.
    pub fn new(mountpoint: impl Into<PathBuf>) -> MountOptions {
        MountOptions {
            mountpoint: mountpoint.into(),
            threads: 8,
            cache_bytes: 64 << 20,
            allow_other: false,
            dev: false,
            suid: false,
            force_unmount: false,
            readahead_kb: 1024,
        }
    }
}

/// A mounted image being served.
pub struct Daemon {
    /// Set by the SIGINT/SIGTERM handlers.
    stop: Arc<AtomicBool>,
    session: Option<BackgroundSession>,
    /// Disconnects when the filesystem is dropped, i.e. the session is over.
    fs_gone: std::sync::mpsc::Receiver<()>,
    mountpoint: PathBuf,
    image: Arc<Image>,
    source: Arc<ChunkSource>,
    ready_in: Duration,
}

/// Why [`Daemon::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGINT or SIGTERM: the daemon unmounted.
    Signal,
    /// The mount went away without us (`fusermount3 -u`, `umount`).
    Unmounted,
}

impl Daemon {
    /// Mounts `bootstrap` at `opts.mountpoint`, reading file data through
    /// `fetcher`, and returns once the mount serves requests.
    pub fn start(
        opts: &MountOptions,
        bootstrap: BootstrapBytes,
        fetcher: Arc<dyn ChunkFetcher>,
    ) -> Result<Daemon, DaemonError> {
        let t0 = Instant::now();
        // Handlers go in before the mount exists: a signal that arrives as
        // soon as the mount is announced must unmount it, not kill us.
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, stop.clone()).map_err(|e| DaemonError::Io {
                context: "installing signal handlers".into(),
                source: e,
            })?;
        }
        check_mountpoint(&opts.mountpoint, opts.force_unmount)?;
        let image = Arc::new(Image::new(bootstrap)?);
        let metrics = Arc::new(Metrics::default());
        let source = Arc::new(ChunkSource::new(fetcher, opts.cache_bytes, metrics));
        let (alive, fs_gone) = std::sync::mpsc::channel();
        let fs = SkiffFs::new(image.clone(), source.clone()).with_drop_signal(alive);
        let mut config = Config::default();
        config.mount_options = mount_options(opts);
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let session =
            fuser::spawn_mount2(fs, &opts.mountpoint, &config).map_err(|e| DaemonError::Io {
                context: format!("mounting at {}", opts.mountpoint.display()),
                source: e,
            })?;
        let ready_in = t0.elapsed();
        if opts.readahead_kb > 0 {
            set_readahead(&opts.mountpoint, opts.readahead_kb);
        }
        tracing::info!(
            mountpoint = %opts.mountpoint.display(),
            inodes = image.bootstrap().inode_count(),
            bootstrap_bytes = image.len(),
            threads = opts.threads,
            cache_bytes = opts.cache_bytes,
            "mounted in {:.1} ms",
            ready_in.as_secs_f64() * 1e3
        );
        Ok(Daemon {
            stop,
            session: Some(session),
            fs_gone,
            mountpoint: opts.mountpoint.clone(),
            image,
            source,
            ready_in,
        })
    }

    /// Inodes in the image.
    pub fn inode_count(&self) -> u32 {
        self.image.bootstrap().inode_count()
    }

    /// Length of the bootstrap in bytes.
    pub fn bootstrap_len(&self) -> usize {
        self.image.len()
    }

    /// Time from [`Daemon::start`] to a served mount.
    pub fn ready_in(&self) -> Duration {
        self.ready_in
    }

    /// The live counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.source.metrics()
    }

    /// Serves until SIGINT/SIGTERM (then unmounts) or until the mount is
    /// unmounted by someone else; returns why, with the final counters.
    pub fn wait(mut self) -> Result<(Stopped, MetricsSnapshot), DaemonError> {
        let why = loop {
            if self.stop.load(Ordering::Relaxed) {
                break Stopped::Signal;
            }
            if self.session.as_ref().is_none_or(|s| s.guard.is_finished()) {
                break Stopped::Unmounted;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        match why {
            Stopped::Signal => {
                tracing::info!("signal received: unmounting {}", self.mountpoint.display())
            }
            Stopped::Unmounted => tracing::info!("{} was unmounted", self.mountpoint.display()),
        }
        let metrics = self.unmount()?;
        Ok((why, metrics))
    }

    /// Unmounts (lazily if busy), waits for the FUSE threads to finish and
    /// returns the final counters.
    pub fn unmount(&mut self) -> Result<MetricsSnapshot, DaemonError> {
        if let Some(session) = self.session.take() {
            let result = if session.guard.is_finished() {
                session.join()
            } else {
                session.umount_and_join()
            };
            match result {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!(
                        "{} is busy: detaching it lazily; the daemon exits when the last open file is closed",
                        self.mountpoint.display()
                    );
                    lazy_unmount(&self.mountpoint)?;
                }
                Err(e) => {
                    tracing::debug!("unmounting {}: {e}", self.mountpoint.display());
                    if is_mounted(&self.mountpoint) {
                        lazy_unmount(&self.mountpoint)?;
                    }
                }
            }
            // A failed unmount leaves the session thread running detached:
            // wait for it to drop the filesystem.
            let _ = self.fs_gone.recv();
            let m = self.metrics().snapshot();
            tracing::info!(
                cached_chunks = self.source.cached_chunks(),
                cached_bytes = self.source.cached_bytes(),
                "unmounted {}: {m}",
                self.mountpoint.display()
            );
        }
        Ok(self.metrics().snapshot())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::error!("unmounting {}: {e}", self.mountpoint.display());
        }
    }
}

/// Mounts and serves until a signal or an unmount: [`Daemon::start`] then
/// [`Daemon::wait`].
pub fn mount(
    opts: &MountOptions,
    bootstrap: BootstrapBytes,
    fetcher: Arc<dyn ChunkFetcher>,
) -> Result<MetricsSnapshot, DaemonError> {
    let daemon = Daemon::start(opts, bootstrap, fetcher)?;
    Ok(daemon.wait()?.1)
}

fn mount_options(opts: &MountOptions) -> Vec<MountOption> {
    let mut o = vec![
        MountOption::FSName("skiff".into()),
        MountOption::Subtype("skiff".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        if opts.dev {
            MountOption::Dev
        } else {
            MountOption::NoDev
        },
        if opts.suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
    ];
    if opts.allow_other {
        o.push(MountOption::CUSTOM("allow_other".into()));
    }
    o
}

/// Checks that `path` is a directory we can mount on; a stale FUSE mount
/// (ENOTCONN) is an error, or lazily unmounted when `force`.
///
/// `stat` alone does not tell: the kernel may answer it from attributes it
/// cached before the daemon died (this filesystem hands out long TTLs), so
/// `statfs`, which always reaches the daemon, is asked too.
pub fn check_mountpoint(path: &Path, force: bool) -> Result<(), DaemonError> {
    let shown = path.display().to_string();
    let probe = std::fs::metadata(path).and_then(|m| {
        nix::sys::statvfs::statvfs(path)
            .map(|_| m)
            .map_err(std::io::Error::from)
    });
    match probe {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(DaemonError::Mountpoint {
            path: shown,
            message: "not a directory".into(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            if !force {
                return Err(DaemonError::StaleMount(shown));
            }
            tracing::warn!("lazily unmounting the stale mount at {shown}");
            lazy_unmount(path)?;
            check_mountpoint(path, false)
        }
        Err(e) => Err(DaemonError::Mountpoint {
            path: shown,
            message: e.to_string(),
        }),
    }
}

/// Whether `path` is a mount point in this mount namespace.
fn is_mounted(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else {
        return false;
    };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = canonical.to_string_lossy().replace(' ', "\\040");
    mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

fn lazy_unmount(path: &Path) -> Result<(), DaemonError> {
    use nix::mount::{umount2, MntFlags};
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => fusermount(path, true),
        Err(e) => Err(DaemonError::Io {
            context: format!("unmounting {}", path.display()),
            source: e.into(),
        }),
    }
}

/// `fusermount3 -u [-z] PATH`, for when we are not root.
fn fusermount(path: &Path, lazy: bool) -> Result<(), DaemonError> {
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let status = cmd.arg(path).status().map_err(|e| DaemonError::Io {
        context: "running fusermount3 (package fuse3)".into(),
        source: e,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(DaemonError::Io {
            context: format!("fusermount3 -u {}", path.display()),
            source: std::io::Error::other(format!("exited with {status}")),
        })
    }
}

/// Raises the readahead of the mount's bdi: the kernel's FUSE default is
/// 128 KiB, small next to chunks of 64 KiB to 1 MiB. Best effort.
fn set_readahead(mountpoint: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = m.dev();
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, kb.to_string()) {
        Ok(()) => tracing::debug!("{knob} = {kb}"),
        Err(e) => tracing::debug!("cannot set {knob}: {e}"),
    }
}
