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
//! Around the FUSE session, the daemon runs the background parts (see
//! [`crate::readahead`] and [`crate::access`]): the disk cache's writer, readahead,
//! prefetch of the image's PREFETCH list once the mount is ready, the access
//! recorder (written every few seconds and at unmount) and the metrics
//! socket. Unmounting stops them in order: prefetch and readahead first,
//! then the access list is written and the disk cache flushed, so that a
//! new daemon on the same cache directory finds everything this one fetched.
//!
//! Mounts are `ro`, `nodev`, `nosuid`, `noatime` and `default_permissions`
//! (the kernel checks permissions against the image's modes), `fsname=skiff`,
//! type `fuse.skiff`; `dev`, `suid` and `allow_other` only when asked.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, MountOption, SessionACL};

use crate::access::AccessLog;
use crate::chunk::Backend;
use crate::disk::DiskCache;
use crate::error::DaemonError;
use crate::fetch::SourceOptions;
use crate::fs::SkiffFs;
use crate::image::{BootstrapBytes, Image};
use crate::metrics::{render_prometheus, Gauges, Metrics, MetricsServer, MetricsSnapshot};
use crate::prefetch::{spawn_prefetch, PrefetchMode};
use crate::readahead::{Readahead, ReadaheadOptions, DEFAULT_READAHEAD};
use crate::rest::BackgroundFetch;
use crate::session::{self, Connection};
use crate::source::ChunkSource;
use crate::workers::Pool;

/// How a mount is made.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// FUSE worker threads; also the read pool's threads over a network
    /// (from local blobs the FUSE threads read themselves).
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
    /// On a miss, also fetch the chunks that follow in the same blob, up to
    /// this many stored bytes per request (0: only what the read needs).
    pub fetch_window: u64,
    /// Over a network, the fetch window grows up to this many stored bytes
    /// while the round trips it saves are worth its bytes (see
    /// [`crate::window`]); at or below `fetch_window` it stays fixed.
    pub fetch_window_max: u64,
    /// The disk cache of stored chunks (`None`: memory only).
    pub disk_cache: Option<Arc<DiskCache>>,
    /// Largest merged range request of a read, in bytes.
    pub max_request_bytes: u64,
    /// Range requests of one read in flight at once.
    pub fetch_parallel: usize,
    /// Readahead in blob order (`max_window` 0: off; off anyway without a
    /// disk cache).
    pub readahead: ReadaheadOptions,
    /// What to prefetch once mounted.
    pub prefetch: PrefetchMode,
    /// Fetch the rest of the image in the background after the prefetch
    /// list (`None`: off; off anyway without a disk cache).
    pub background_fetch: Option<BackgroundFetch>,
    /// Prefetch requests in flight at once, at most (default 12, and at most
    /// [`crate::prefetch::PREFETCH_IN_FLIGHT`] bytes of them; see
    /// [`crate::prefetch`]).
    pub prefetch_threads: usize,
    /// Write the paths of the files read, in first-read order, to this file
    /// (every few seconds and at unmount).
    pub record_access: Option<PathBuf>,
    /// Serve Prometheus metrics on this unix socket.
    pub metrics_socket: Option<PathBuf>,
    /// How long a read may wait for chunks that are not local, counted from
    /// when the kernel's request arrived; then it fails with `EIO`. Reads
    /// that need the network wait on a pool of their own, never on a FUSE
    /// thread, so metadata and local reads are served meanwhile.
    pub read_budget: Duration,
    /// Bytes of chunk data fetched or being decoded at once (reads,
    /// readahead and prefetch together).
    pub in_flight_bytes: u64,
}

impl MountOptions {
    /// Defaults: 8 threads, a 4 MiB memory cache, 8 MiB in flight, a 30 s
    /// read budget, 1 MiB readahead, nodev, nosuid.
    pub fn new(mountpoint: impl Into<PathBuf>) -> MountOptions {
        MountOptions {
            mountpoint: mountpoint.into(),
            threads: 8,
            cache_bytes: crate::fetch::DEFAULT_MEMORY_CACHE,
            allow_other: false,
            dev: false,
            suid: false,
            force_unmount: false,
            readahead_kb: 1024,
            fetch_window: DEFAULT_FETCH_WINDOW,
            fetch_window_max: DEFAULT_FETCH_WINDOW_MAX,
            disk_cache: None,
            max_request_bytes: crate::fetch::DEFAULT_MAX_REQUEST,
            fetch_parallel: crate::fetch::DEFAULT_MAX_PARALLEL,
            readahead: DEFAULT_READAHEAD,
            prefetch: PrefetchMode::List,
            background_fetch: None,
            prefetch_threads: 12,
            record_access: None,
            metrics_socket: None,
            read_budget: crate::fs::DEFAULT_READ_BUDGET,
            in_flight_bytes: crate::fetch::DEFAULT_IN_FLIGHT,
        }
    }
}

/// Default [`MountOptions::fetch_window`]: 256 KiB. A larger window trades
/// bytes for round trips; measured over 100 Mbit/s with 20 ms RTT
/// (`scripts/bench-coldstart` with `SKIFF_MOUNT_FLAGS`, one run each, at
/// c357dd8; W1 import / W4 `python3 -c pass` / W5 random reads, seconds and
/// W1's share of the image fetched): 256 KiB 8.98 / 1.56 / 17.14 (32%),
/// 512 KiB 7.66 / 1.72 / 15.70 (35%), 768 KiB 7.83 / 1.81 / 14.92 (40%),
/// 1 MiB 7.21 / 2.08 / 14.19 (42%). Over a network the window starts
/// here and grows while what it brings is read (see [`crate::window`]):
/// adaptive, 6.2 / 1.5 / 12.4 s (38%).
pub const DEFAULT_FETCH_WINDOW: u64 = 256 << 10;
/// Default [`MountOptions::fetch_window_max`]: 4 MiB, where random reads
/// across the fixture's files stopped gaining (the figures in
/// [`crate::window`]).
pub const DEFAULT_FETCH_WINDOW_MAX: u64 = 4 << 20;

/// Reads queued for the read pool beyond those it is fetching: the
/// kernel's background reads (`MAX_BACKGROUND` in [`crate::fs`]) plus as
/// many synchronous ones. A job is a `ReplyData` and a few chunk records;
/// a read that finds the queue full waits on its FUSE thread instead.
const READ_QUEUE: usize = 128;

/// How often the access list is written while mounted.
const ACCESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// A mounted image being served.
pub struct Daemon {
    /// Set by the SIGINT/SIGTERM handlers.
    stop: Arc<AtomicBool>,
    /// Set by SIGUSR1 on a kept connection: hand the mount over to the
    /// keeper's next server (exit without unmounting).
    hand_over: Arc<AtomicBool>,
    /// The connection is held by a keeper too (see [`crate::keeper`]).
    kept: bool,
    session: Option<BackgroundSession>,
    /// Disconnects when the filesystem is dropped, i.e. the session is over.
    fs_gone: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    mountpoint: PathBuf,
    image: Arc<Image>,
    source: Arc<ChunkSource>,
    ready_in: Duration,
    readahead: Option<Arc<Readahead>>,
    /// Over a network only: reads from local blobs stay on the FUSE
    /// threads.
    read_pool: Option<Arc<Pool>>,
    access: Option<Arc<AccessLog>>,
    prefetch_stop: Arc<AtomicBool>,
    prefetch: Option<std::thread::JoinHandle<()>>,
    metrics_server: Option<MetricsServer>,
    final_metrics: Option<MetricsSnapshot>,
}

/// Why [`Daemon::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGINT or SIGTERM: the daemon unmounted.
    Signal,
    /// The mount went away without us (`fusermount3 -u`, `umount`).
    Unmounted,
    /// SIGUSR1 on a kept connection: the mount stays, served next by the
    /// keeper's new server (a hot upgrade).
    HandedOver,
}

impl Daemon {
    /// Mounts `bootstrap` at `opts.mountpoint`, reading file data from
    /// `backend` (through `opts.disk_cache` and the memory cache), and
    /// returns once the mount serves requests.
    pub fn start(
        opts: &MountOptions,
        bootstrap: BootstrapBytes,
        backend: Backend,
    ) -> Result<Daemon, DaemonError> {
        Daemon::start_on(opts, bootstrap, backend, Connection::Mount)
    }

    /// [`Daemon::start`] on a given [`Connection`]: a keeper's `/dev/fuse`
    /// descriptor to mount, or a live mount to take over.
    pub fn start_on(
        opts: &MountOptions,
        bootstrap: BootstrapBytes,
        backend: Backend,
        conn: Connection,
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
        let hand_over = Arc::new(AtomicBool::new(false));
        let kept = conn.is_kept();
        if kept {
            signal_hook::flag::register(signal_hook::consts::SIGUSR1, hand_over.clone()).map_err(
                |e| DaemonError::Io {
                    context: "installing signal handlers".into(),
                    source: e,
                },
            )?;
        }
        // A mount being taken over is ours and unserved: a `stat` of it
        // would wait for this very process.
        let takeover = conn.is_takeover();
        if !takeover {
            check_mountpoint(&opts.mountpoint, opts.force_unmount)?;
        }
        let image = Arc::new(Image::new(bootstrap)?);
        let metrics = Arc::new(Metrics::default());
        let source = Arc::new(ChunkSource::new(
            backend,
            opts.disk_cache.clone(),
            SourceOptions {
                memory_bytes: opts.cache_bytes,
                max_request_bytes: opts.max_request_bytes.max(1),
                max_parallel: opts.fetch_parallel.max(1),
                in_flight_bytes: opts.in_flight_bytes,
                ..SourceOptions::default()
            },
            metrics,
        ));
        let readahead = (opts.readahead.max_window > 0 && opts.disk_cache.is_some())
            .then(|| Arc::new(Readahead::new(opts.readahead)));
        let access = opts
            .record_access
            .as_ref()
            .map(|p| Arc::new(AccessLog::new(p)));
        let metrics_server = match &opts.metrics_socket {
            Some(path) => Some(start_metrics(path, &source)?),
            None => None,
        };
        // Over a network, as many reads wait at once as there are FUSE
        // threads; READ_QUEUE more wait for one of them. From blobs on
        // this node a read is CPU work (a pread, a decode, a hash), as a
        // kernel filesystem's read in its reader's context: the FUSE
        // thread that took it does it, and there is no read pool. Handing
        // it to a pool cost two thread wake-ups per read. Measured on 2
        // CPUs, cold, the pool (one thread per CPU) against the FUSE
        // thread: 20,000 of the 100,000 small files in random order
        // 6.1-6.9 -> 5.2-5.4 s (daemon CPU 4.4-4.9 -> 3.8-3.9 s), all of
        // them in path order 6.7-6.8 -> 6.1-6.2 s, the fixture's files in
        // random order 4.1-4.6 -> 3.5-3.7 s, the 2 GiB file 5.2-7.0 ->
        // 3.9-4.9 s (CPU 8.0-11.3 -> 6.4-7.9 s; VmHWM 23 -> 29-30 MiB:
        // up to eight reads at once hold their buffers, within the
        // in-flight budget), `import numpy, pandas` unchanged (0.84-0.92 s).
        let read_pool = (!source.backend().store.is_local())
            .then(|| Arc::new(Pool::new("skiff-read", opts.threads.max(1), READ_QUEUE)));
        let (alive, fs_gone) = std::sync::mpsc::channel();
        let fs = SkiffFs::new(image.clone(), source.clone())
            .with_fetch_window(opts.fetch_window, opts.fetch_window_max)
            .with_read_pool(read_pool.clone(), opts.read_budget)
            .with_readahead(readahead.clone())
            .with_access_log(access.clone())
            .with_drop_signal(alive);
        let acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        let session = session::start(
            fs,
            conn,
            &opts.mountpoint,
            mount_options(opts),
            acl,
            opts.threads,
        )?;
        let ready_in = t0.elapsed();
        // The bdi keeps its readahead across a takeover.
        if opts.readahead_kb > 0 && !takeover {
            set_readahead(&opts.mountpoint, opts.readahead_kb);
        }
        tracing::info!(
            mountpoint = %opts.mountpoint.display(),
            inodes = image.bootstrap().inode_count(),
            bootstrap_bytes = image.len(),
            threads = opts.threads,
            cache_bytes = opts.cache_bytes,
            disk_cache = ?opts.disk_cache.as_ref().map(|d| d.dir().display().to_string()),
            "mounted in {:.1} ms",
            ready_in.as_secs_f64() * 1e3
        );
        // Prefetch starts once the mount serves: it never delays readiness.
        let prefetch_stop = Arc::new(AtomicBool::new(false));
        let prefetch = spawn_prefetch(
            image.clone(),
            source.clone(),
            opts.prefetch,
            opts.prefetch_threads,
            opts.background_fetch,
            prefetch_stop.clone(),
        );
        Ok(Daemon {
            stop,
            hand_over,
            kept,
            session: Some(session),
            fs_gone: std::sync::Mutex::new(fs_gone),
            mountpoint: opts.mountpoint.clone(),
            image,
            source,
            ready_in,
            readahead,
            read_pool,
            access,
            prefetch_stop,
            prefetch,
            metrics_server,
            final_metrics: None,
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

    /// The counters now, with the blob store's own if it keeps any.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut m = self.metrics().snapshot();
        m.store = self.source.backend().stats.as_ref().map(|f| f());
        m
    }

    /// The chunk source (memory cache, disk cache, fetch path).
    pub fn source(&self) -> &Arc<ChunkSource> {
        &self.source
    }

    /// Whether prefetch has gone through its list (true when there is none).
    pub fn prefetch_finished(&self) -> bool {
        self.prefetch.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Writes the access list now (if recording and it changed).
    pub fn write_access_list(&self) {
        if let Some(log) = &self.access {
            if let Err(e) = log.write(&self.image) {
                tracing::warn!("writing the access list: {e}");
            }
        }
    }

    /// Serves until SIGINT/SIGTERM (then unmounts) or until the mount is
    /// unmounted by someone else; returns why, with the final counters.
    pub fn wait(mut self) -> Result<(Stopped, MetricsSnapshot), DaemonError> {
        let mut last_write = Instant::now();
        let why = loop {
            if last_write.elapsed() >= ACCESS_LOG_EVERY {
                self.write_access_list();
                last_write = Instant::now();
            }
            if self.stop.load(Ordering::Relaxed) {
                break Stopped::Signal;
            }
            if self.hand_over.load(Ordering::Relaxed) {
                break Stopped::HandedOver;
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
            Stopped::HandedOver => {
                tracing::info!(
                    "handing {} over to the keeper's next server",
                    self.mountpoint.display()
                );
                return Ok((why, self.hand_over_now()));
            }
        }
        let metrics = self.unmount()?;
        Ok((why, metrics))
    }

    /// Stops everything but the FUSE threads and keeps the mount: prefetch
    /// and readahead stop, the access list is written, the disk cache
    /// flushed. The caller then exits; requests this process has read but
    /// not answered are sent again to the next server (see
    /// [`crate::session`]).
    fn hand_over_now(&mut self) -> MetricsSnapshot {
        self.prefetch_stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.prefetch.take() {
            let _ = p.join();
        }
        if let Some(ra) = self.readahead.take() {
            ra.shutdown();
        }
        self.write_access_list();
        if let Some(d) = self.source.disk() {
            d.flush();
        }
        self.metrics_server = None;
        let m = self.snapshot();
        // Never unmount from here on, not even from `Drop`.
        self.session = None;
        self.final_metrics = Some(m);
        m
    }

    /// Unmounts (lazily if busy), waits for the FUSE threads to finish and
    /// returns the final counters.
    pub fn unmount(&mut self) -> Result<MetricsSnapshot, DaemonError> {
        if let Some(m) = self.final_metrics {
            return Ok(m);
        }
        self.prefetch_stop.store(true, Ordering::Relaxed);
        if let Some(session) = self.session.take() {
            let result = if session.guard.is_finished() {
                session.join()
            } else if self.kept {
                // fuser did not mount it, so it cannot unmount it: the
                // unmount aborts the connection and the threads end.
                match nix::mount::umount(&self.mountpoint) {
                    Ok(()) => session.join(),
                    Err(e) => Err(std::io::Error::from(e)),
                }
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
            let _ = self
                .fs_gone
                .lock()
                .map(|rx| rx.recv())
                .unwrap_or_else(|p| p.into_inner().recv());
        }
        if let Some(p) = self.prefetch.take() {
            let _ = p.join();
        }
        // The session is over: queued reads reply to nobody.
        if let Some(pool) = &self.read_pool {
            pool.shutdown();
        }
        if let Some(ra) = self.readahead.take() {
            ra.shutdown();
        }
        self.write_access_list();
        let disk = self.source.disk().map(|d| {
            d.flush();
            d.stats()
        });
        self.metrics_server = None;
        let m = self.snapshot();
        tracing::info!(
            cached_chunks = self.source.cached_chunks(),
            cached_bytes = self.source.cached_bytes(),
            disk_chunks = disk.map(|d| d.entries),
            disk_bytes = disk.map(|d| d.bytes),
            "unmounted {}: {m}",
            self.mountpoint.display()
        );
        self.final_metrics = Some(m);
        Ok(m)
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
    backend: Backend,
) -> Result<MetricsSnapshot, DaemonError> {
    let daemon = Daemon::start(opts, bootstrap, backend)?;
    Ok(daemon.wait()?.1)
}

/// Serves the source's counters on the unix socket `path`.
fn start_metrics(path: &Path, source: &Arc<ChunkSource>) -> Result<MetricsServer, DaemonError> {
    let s = source.clone();
    let render = Arc::new(move || {
        let gauges = Gauges {
            memory_bytes: s.cached_bytes(),
            memory_chunks: s.cached_chunks() as u64,
            disk: s.disk().map(|d| d.stats()),
        };
        let store = s.backend().stats.as_ref().map(|f| f());
        render_prometheus(s.metrics(), &gauges, store.as_ref())
    });
    MetricsServer::start(path, render).map_err(|e| DaemonError::Io {
        context: format!("metrics socket {}", path.display()),
        source: e,
    })
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
