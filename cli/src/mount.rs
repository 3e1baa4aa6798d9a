//! `skiff mount`: serve an image read-only with FUSE, in the foreground.
//!
//! Opening the image reads its manifest and bootstrap and nothing else; the
//! mount is served as soon as the bootstrap is checksummed. One line on
//! stdout says when the mount is ready (scripts wait for it, or for
//! `--pid-file`); logs go to stderr (`RUST_LOG`). SIGINT or SIGTERM
//! unmounts and exits 0.
//!
//! # Failover
//!
//! As root, `skiff mount` is a *keeper* (see `skiff_fusefs::keeper`): it
//! holds the FUSE connection and runs the serving daemon as a child
//! *worker* (the same binary with `--serve-fd`). When the worker dies, a
//! new one takes the mount over and readers only see a pause; `skiff
//! upgrade` replaces the binary under a live mount the same way. Without
//! root (or with `--no-failover`) the mount is served in this process.
//!
//! The store stack: the image's blob store (`LocalBlobStore` for `oci:`,
//! `RegistryBlobStore` for `docker://`, with its request/retry counters)
//! under the coalescing fetch path, the disk cache (`--cache-dir`, shared by
//! every mount on the node, bounded by `--cache-size`) and the memory cache
//! (`--cache-mb`). Memory for chunk data is bounded by `--cache-mb` plus
//! `--in-flight-mb`; a read waits for the network at most
//! `--read-budget-secs`. The process sets glibc malloc parameters that
//! return freed chunk buffers to the system first (see `crate::malloc`).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use skiff_fusefs::disk::{CacheLimit, Watermarks};
use skiff_fusefs::keeper::{self, FirstWorker, KeeperOptions, WorkerFds};
use skiff_fusefs::session::{adopt_inherited, Connection};
use skiff_fusefs::{
    Backend, BackgroundFetch, Daemon, DiskCache, MountOptions, PrefetchMode, Stopped,
};
use skiff_registry::skiff::{open_image_for, open_image_pinned, SkiffImage};
use skiff_registry::{BootstrapCache, ImageRef, Platform, RegistryConfig};

/// The `--background-fetch` setting (`None`: off).
#[derive(Debug, Clone, Copy)]
pub struct BackgroundSetting(pub Option<BackgroundFetch>);

fn parse_background(s: &str) -> Result<BackgroundSetting, String> {
    BackgroundFetch::parse(s).map(BackgroundSetting)
}

/// Arguments of `skiff mount`.
#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// The image: oci:DIR[:TAG] or docker://REF. An ordinary (not
    /// converted) docker:// image is mounted through the Skiff image
    /// attached to it as an OCI referrer (see `skiff convert`).
    pub image: String,
    /// The platform to pick from an index: os/arch[/variant] (default: this host's).
    #[arg(long)]
    pub platform: Option<Platform>,
    /// An existing directory to mount it on.
    pub mountpoint: PathBuf,
    /// FUSE worker threads, and over a network as many threads of reads
    /// that wait for chunks (from local blobs a read is CPU work, done on
    /// the FUSE thread).
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Memory cache of decompressed chunks, in MiB. The page cache keeps
    /// what was read and the disk cache what was fetched: this only spares
    /// decoding a chunk twice when two reads share it.
    #[arg(long, default_value_t = skiff_fusefs::fetch::DEFAULT_MEMORY_CACHE >> 20)]
    pub cache_mb: u64,
    /// Bytes of chunk data being fetched or decoded at once, in MiB (reads,
    /// readahead and prefetch together): with the memory cache, what bounds
    /// the daemon's memory.
    #[arg(long, default_value_t = skiff_fusefs::fetch::DEFAULT_IN_FLIGHT >> 20)]
    pub in_flight_mb: u64,
    /// How long a read may wait for chunks that are not on the node, in
    /// seconds from its request (retries included); then it fails with EIO.
    /// Reads that wait never hold the threads that answer metadata and
    /// local reads.
    #[arg(long, default_value_t = skiff_fusefs::fs::DEFAULT_READ_BUDGET.as_secs_f64())]
    pub read_budget_secs: f64,
    /// Readahead of the mount in KiB (0: the kernel's default).
    #[arg(long, default_value_t = 1024)]
    pub readahead_kb: u32,
    /// On a miss, also fetch the chunks that follow in the same blob, up to
    /// this many KiB of stored data per request (0: only what a read needs).
    /// Trades bytes for round trips, which dominate a cold start.
    #[arg(long, default_value_t = skiff_fusefs::daemon::DEFAULT_FETCH_WINDOW / 1024)]
    pub fetch_window_kb: u64,
    /// Over a network the fetch window grows, up to this many KiB, while
    /// the round trips it saves (reads later served by what it brought)
    /// are worth its bytes on the link; it shrinks back when they are not
    /// (at --fetch-window-kb or below: fixed).
    #[arg(long, default_value_t = skiff_fusefs::daemon::DEFAULT_FETCH_WINDOW_MAX / 1024)]
    pub fetch_window_max_kb: u64,
    /// Let users other than the one mounting access the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Honour device nodes in the image (default: nodev).
    #[arg(long)]
    pub dev: bool,
    /// Honour setuid/setgid bits in the image (default: nosuid).
    #[arg(long)]
    pub suid: bool,
    /// Lazily unmount a stale FUSE mount left at MOUNTPOINT by a dead daemon.
    #[arg(long)]
    pub force_unmount: bool,
    /// Write the daemon's PID to this file once the mount is ready.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Disk cache of fetched chunks and verified bootstraps, shared by all
    /// mounts of the node; chunks of `oci:` images are cached only when this
    /// is given (their blobs are local already)
    /// [default: /var/cache/skiff as root, else $XDG_CACHE_HOME/skiff or ~/.cache/skiff].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bound of the disk cache, its high watermark: bytes (10g, 512m) or a
    /// percentage of its filesystem's size (20%). Beyond it the least
    /// recently used chunks are evicted down to --cache-low.
    #[arg(long, value_name = "SIZE|N%", default_value = "10g", value_parser = CacheLimit::parse)]
    pub cache_size: CacheLimit,
    /// Low watermark of the disk cache: eviction stops at it (bytes or a
    /// percentage of the filesystem) [default: 90% of --cache-size].
    #[arg(long, value_name = "SIZE|N%", value_parser = CacheLimit::parse)]
    pub cache_low: Option<CacheLimit>,
    /// Keep fetched chunks and the bootstrap in memory only (no disk cache).
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_disk_cache: bool,
    /// Largest merged range request for a read, in KiB.
    #[arg(long, default_value_t = skiff_fusefs::fetch::DEFAULT_MAX_REQUEST / 1024)]
    pub max_request_kb: u64,
    /// Readahead in blob order: the largest window, in KiB of stored data,
    /// fetched in the background ahead of a reader that walks through what
    /// the image stores together (a large file, a whole tree); windows start
    /// at 256 KiB and double while the reader keeps going (0: off; off too
    /// without a disk cache).
    #[arg(long, default_value_t = skiff_fusefs::readahead::DEFAULT_READAHEAD.max_window / 1024)]
    pub chunk_readahead_kb: u64,
    /// Range requests of readahead in flight at once.
    #[arg(long, default_value_t = skiff_fusefs::readahead::DEFAULT_READAHEAD.threads)]
    pub readahead_requests: usize,
    /// Stored KiB per readahead request (streamed: what arrives is used at
    /// once, so a large request costs no reader a wait).
    #[arg(long, default_value_t = skiff_fusefs::readahead::DEFAULT_READAHEAD.request / 1024)]
    pub readahead_request_kb: u64,
    /// A file read from its start (a program, a library, a file being
    /// copied) is fetched whole in the background at its first miss, if it
    /// is stored in at most this many KiB; of a larger file, its first this
    /// many KiB when the miss is among them (0: off; off without a disk
    /// cache).
    #[arg(long, default_value_t = skiff_fusefs::readahead::DEFAULT_READAHEAD.whole_file / 1024)]
    pub whole_file_kb: u64,
    /// Fetch every file of the image in the background after mounting
    /// (default: only the image's prefetch list, if it has one).
    #[arg(long, conflicts_with = "no_prefetch")]
    pub prefetch_all: bool,
    /// Fetch the rest of the image in the background after the prefetch
    /// list, so that later reads of any file are local: `off`, `on`, or a
    /// cap in bytes per second (`12m`). Beside other fetches it keeps one
    /// request of 1 MiB in flight, three when alone; it stops at the disk
    /// cache's low watermark. It pays for workloads that read most of the
    /// image and slows those that read a part (see docs/operations.md).
    /// Needs the disk cache.
    #[arg(long, value_name = "off|on|RATE", default_value = "off", value_parser = parse_background)]
    pub background_fetch: BackgroundSetting,
    /// Do not prefetch anything.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Write what the workload reads, in first-read order, to FILE: one
    /// line per stretch of a file, PATH<TAB>OFFSET<TAB>LENGTH, or PATH when
    /// it is the whole file (every few seconds and at unmount); for `skiff
    /// convert --prefetch-list`.
    #[arg(long, value_name = "FILE")]
    pub record_access: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`) on this unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,
    /// Serve the mount in this process: no keeper, so a crash of the daemon
    /// unmounts (reads then fail with ENOTCONN). Implied when not root.
    #[arg(long)]
    pub no_failover: bool,
    /// Where the keeper records its state (`keeper.json`, for `skiff
    /// upgrade`) [default: /run/skiff/mounts/HASH of the mountpoint].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Internal (the snapshotter): read the credentials of the image's
    /// registry from descriptor N, a sealed memory file (JSON), never from
    /// disk or the command line. A keeper's workers inherit it.
    #[arg(long, value_name = "N", hide = true)]
    pub registry_credentials_fd: Option<i32>,
    /// Internal (worker): serve the keeper's /dev/fuse descriptor N.
    #[arg(long, value_name = "N", hide = true)]
    pub serve_fd: Option<i32>,
    /// Internal (worker): write one byte to descriptor N once serving.
    #[arg(long, value_name = "N", hide = true, requires = "serve_fd")]
    pub ready_fd: Option<i32>,
    /// Internal (worker): the mount exists; take it over.
    #[arg(long, hide = true, requires = "serve_fd")]
    pub takeover: bool,
    /// Internal (keeper after an upgrade): resume with descriptor N.
    #[arg(long, value_name = "N", hide = true, conflicts_with = "serve_fd")]
    pub keeper_fd: Option<i32>,
}

/// The default disk cache directory: /var/cache/skiff for root, else the
/// user's cache directory.
pub fn default_cache_dir() -> Option<PathBuf> {
    if is_root() {
        return Some(PathBuf::from(skiff_fusefs::disk::DEFAULT_CACHE_DIR));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("skiff"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("skiff"))
}

fn is_root() -> bool {
    // /proc/self is owned by the effective user.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Opens the disk cache of chunks: an explicit --cache-dir must work; the
/// default one falls back to memory only, with a warning. An image in a
/// local layout (`oci:`) gets none unless --cache-dir asks: its blobs are
/// on local disk already, and a second copy, a file per chunk, only costs
/// (reading the blob is several times faster on a cold page cache).
fn open_disk_cache(
    args: &MountArgs,
    reference: &ImageRef,
) -> anyhow::Result<Option<Arc<DiskCache>>> {
    let explicit = args.cache_dir.is_some();
    if args.no_disk_cache || (!explicit && !matches!(reference, ImageRef::Docker(_))) {
        return Ok(None);
    }
    let Some(dir) = args.cache_dir.clone().or_else(default_cache_dir) else {
        tracing::warn!("no cache directory (no HOME): caching in memory only");
        return Ok(None);
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        if explicit {
            return Err(e).with_context(|| format!("disk cache {}", dir.display()));
        }
        tracing::warn!("disk cache {}: {e}; caching in memory only", dir.display());
        return Ok(None);
    }
    let marks = Watermarks::resolve(&dir, args.cache_size, args.cache_low)
        .map_err(|e| anyhow::anyhow!("--cache-size / --cache-low: {e}"))?;
    match DiskCache::open_with(&dir, marks) {
        Ok(c) => Ok(Some(Arc::new(c))),
        Err(e) if !explicit => {
            tracing::warn!("disk cache {}: {e}; caching in memory only", dir.display());
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("disk cache {}", dir.display())),
    }
}

/// `--read-budget-secs` as a duration: positive and finite.
fn read_budget(secs: f64) -> anyhow::Result<Duration> {
    // NaN is not above 0 either.
    if secs.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        anyhow::bail!("--read-budget-secs must be above 0, not {secs}");
    }
    Duration::try_from_secs_f64(secs).context("--read-budget-secs")
}

/// Runs `skiff mount`: returns once the mount is gone.
pub fn run(args: MountArgs) -> anyhow::Result<ExitCode> {
    // Before any thread: the keeper's first worker is forked from it.
    crate::malloc::apply();
    if args.serve_fd.is_none() && !args.no_failover {
        if is_root() {
            return run_keeper(&args);
        }
        tracing::info!("not root: serving in this process (no failover)");
    }
    serve(args)?;
    Ok(ExitCode::SUCCESS)
}

/// The arguments this process got after the binary, with the `--FLAG N`
/// pairs of `drop` (and their `--FLAG=N` forms) left out.
fn own_args(drop: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let a = a.into_string().map_err(|a| {
            anyhow::anyhow!("argument {a:?} is not UTF-8: a keeper cannot pass it on")
        })?;
        if drop.contains(&a.as_str()) {
            args.next();
            continue;
        }
        if drop.iter().any(|d| a.starts_with(&format!("{d}="))) {
            continue;
        }
        out.push(a);
    }
    Ok(out)
}

/// The keeper: holds the FUSE connection, runs workers that serve it.
fn run_keeper(args: &MountArgs) -> anyhow::Result<ExitCode> {
    let reference: ImageRef = args
        .image
        .parse()
        .with_context(|| format!("image '{}'", args.image))?;
    drop(reference);
    if args.keeper_fd.is_none() {
        skiff_fusefs::check_mountpoint(&args.mountpoint, args.force_unmount)
            .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    }
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| keeper::default_state_dir(&args.mountpoint));
    let keeper_args = own_args(&["--keeper-fd"])?;
    let mut worker_args = own_args(&["--keeper-fd", "--pid-file", "--state-dir"])?;
    worker_args.push("--state-dir".into());
    worker_args.push(state_dir.to_string_lossy().into_owned());
    // The first worker: this process's arguments as a worker's.
    let mut first = args.clone();
    first.keeper_fd = None;
    first.pid_file = None;
    first.state_dir = Some(state_dir.clone());
    first.takeover = false;
    let first_worker: FirstWorker = Box::new(move |fds: WorkerFds| {
        first.serve_fd = Some(fds.fuse_fd);
        first.ready_fd = Some(fds.ready_fd);
        match serve(first) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("skiff: error: {e:#}");
                1
            }
        }
    });
    let opts = KeeperOptions {
        state_dir,
        mountpoint: args.mountpoint.clone(),
        args: keeper_args,
        worker_args,
        pid_file: args.pid_file.clone(),
        resume_fd: args.keeper_fd,
    };
    let code = keeper::run(&opts, Some(first_worker)).context("keeping the mount")?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Opens the image: a worker that takes a mount over uses the manifest its
/// first predecessor resolved (`image.json`), so that it needs no registry
/// round trip and serves exactly the same image.
fn open(
    args: &MountArgs,
    reference: &ImageRef,
    config: &RegistryConfig,
    bootstrap_cache: Option<&BootstrapCache>,
) -> anyhow::Result<SkiffImage> {
    let pinned = args
        .state_dir
        .as_ref()
        .filter(|_| args.serve_fd.is_some())
        .map(|d| d.join(keeper::IMAGE_FILE));
    if let Some(path) = pinned.as_ref().filter(|_| args.takeover) {
        if let Ok(bytes) = std::fs::read(path) {
            let saved: SavedImage = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?;
            let digest = saved
                .manifest_digest
                .parse()
                .with_context(|| format!("the digest in {}", path.display()))?;
            return open_image_pinned(
                reference,
                config,
                digest,
                saved.manifest.as_bytes(),
                bootstrap_cache,
            )
            .with_context(|| format!("opening {} from {}", args.image, path.display()));
        }
    }
    let image = open_image_for(reference, config, args.platform.as_ref(), bootstrap_cache)
        .with_context(|| format!("opening {}", args.image))?;
    if let Some(subject) = image.subject {
        tracing::info!(
            "{}: Skiff image {} attached to {subject}",
            args.image,
            image.manifest_digest
        );
    }
    if let Some(path) = pinned {
        let saved = SavedImage {
            version: 1,
            reference: args.image.clone(),
            manifest_digest: image.manifest_digest.to_string(),
            manifest: String::from_utf8_lossy(&image.manifest_bytes).into_owned(),
        };
        // Without it a successor resolves the reference again: slower, and
        // it needs the registry; so a failure here is only a warning.
        match serde_json::to_vec(&saved) {
            Ok(bytes) => {
                if let Err(e) = keeper::write_atomic(&path, &bytes) {
                    tracing::warn!("{:#}", anyhow::Error::new(e));
                }
            }
            Err(e) => tracing::warn!("encoding {}: {e}", path.display()),
        }
    }
    Ok(image)
}

/// The bootstrap the daemon reads, shared with the code that starts its
/// read-ahead once the mount serves.
struct SharedBootstrap(Arc<skiff_registry::BootstrapBytes>);

impl AsRef<[u8]> for SharedBootstrap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// `image.json` in a keeper's state directory.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedImage {
    version: u32,
    reference: String,
    manifest_digest: String,
    manifest: String,
}

/// Tells the keeper that this worker serves: one byte on the ready pipe.
/// The pipe is written through /proc (a descriptor number cannot become a
/// `File` without `unsafe`; opening a pipe's /proc entry reaches the pipe).
fn signal_ready(fd: i32) {
    let path = format!("/proc/self/fd/{fd}");
    match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(mut f) => {
            if let Err(e) = f.write_all(b"1") {
                tracing::warn!("telling the keeper we serve: {e}");
            }
        }
        Err(e) => tracing::warn!("telling the keeper we serve ({path}): {e}"),
    }
    let _ = nix::unistd::close(fd);
}

/// Serves the mount in this process (a worker, or without failover).
fn serve(args: MountArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let reference: ImageRef = args
        .image
        .parse()
        .with_context(|| format!("image '{}'", args.image))?;
    let config = match &reference {
        ImageRef::Docker(d) => {
            let mut config = RegistryConfig::from_env()?;
            if let Some(fd) = args.registry_credentials_fd {
                let passed = skiff_snapshotter::daemon::read_passed_credentials(fd)
                    .map_err(anyhow::Error::msg)
                    .context("--registry-credentials-fd")?;
                // Only ever sent to the registry they were given for.
                if passed.registry == d.registry {
                    config.auths.insert(passed.registry, passed.credentials);
                } else {
                    tracing::warn!(
                        "credentials passed for {} ignored: the image is on {}",
                        passed.registry,
                        d.registry
                    );
                }
            }
            config
        }
        _ => RegistryConfig::default(),
    };
    // Verified bootstraps are kept uncompressed beside the chunk cache and
    // mapped by later mounts of the same image (also for `oci:` images).
    let cache_dir = if args.no_disk_cache {
        None
    } else {
        args.cache_dir.clone().or_else(default_cache_dir)
    };
    let bootstrap_cache = cache_dir.map(|dir| BootstrapCache::new(&dir));
    let image = open(&args, &reference, &config, bootstrap_cache.as_ref())?;
    let mut opts = MountOptions::new(&args.mountpoint);
    opts.threads = args.threads.max(1);
    opts.cache_bytes = args.cache_mb.saturating_mul(1 << 20);
    opts.in_flight_bytes = args.in_flight_mb.saturating_mul(1 << 20).max(1 << 20);
    opts.read_budget = read_budget(args.read_budget_secs)?;
    opts.readahead_kb = args.readahead_kb;
    opts.fetch_window = args.fetch_window_kb.saturating_mul(1024);
    opts.fetch_window_max = args.fetch_window_max_kb.saturating_mul(1024);
    opts.allow_other = args.allow_other;
    opts.dev = args.dev;
    opts.suid = args.suid;
    opts.force_unmount = args.force_unmount;
    opts.disk_cache = open_disk_cache(&args, &reference)?;
    opts.max_request_bytes = args.max_request_kb.saturating_mul(1024).max(1);
    opts.readahead.max_window = args.chunk_readahead_kb.saturating_mul(1024);
    opts.readahead.threads = args.readahead_requests.max(1);
    opts.readahead.request = args.readahead_request_kb.saturating_mul(1024).max(64 << 10);
    opts.readahead.whole_file = args.whole_file_kb.saturating_mul(1024);
    opts.prefetch = if args.no_prefetch {
        PrefetchMode::None
    } else if args.prefetch_all {
        PrefetchMode::All
    } else {
        PrefetchMode::List
    };
    opts.background_fetch = args.background_fetch.0;
    opts.record_access = args.record_access.clone();
    opts.metrics_socket = args.metrics_socket.clone();
    let mut backend = Backend::new(image.store.clone());
    if let Some(registry) = image.registry_store.clone() {
        backend = backend.with_stats(move || registry.stats());
    }
    let conn = match args.serve_fd {
        Some(fd) => {
            let fd = adopt_inherited(fd)?;
            if args.takeover {
                Connection::Takeover(fd)
            } else {
                Connection::Fresh(fd)
            }
        }
        None => Connection::Mount,
    };
    let bootstrap = Arc::new(image.bootstrap);
    let daemon = Daemon::start_on(
        &opts,
        Box::new(SharedBootstrap(Arc::clone(&bootstrap))),
        backend,
        conn,
    )
    .with_context(|| format!("mounting {} at {}", args.image, args.mountpoint.display()))?;
    if let Some(fd) = args.ready_fd {
        signal_ready(fd);
    }
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", pid_file.display()))?;
    }
    if args.takeover {
        tracing::info!(
            "took over {} in {:.1} ms",
            args.mountpoint.display(),
            t0.elapsed().as_secs_f64() * 1e3
        );
    } else {
        println!(
            "skiff: mounted {} at {} ({} inodes, bootstrap {} bytes, ready in {:.1} ms)",
            args.image,
            args.mountpoint.display(),
            daemon.inode_count(),
            daemon.bootstrap_len(),
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    // The mount serves, having read a few pages of the bootstrap: the rest
    // may now stream in from disk for the tree walks to come.
    bootstrap.read_ahead();
    drop(bootstrap);
    let (why, metrics) = daemon.wait().context("serving the mount")?;
    if why == Stopped::HandedOver {
        // The mount stays; the keeper's next worker serves it. Exit at
        // once: nothing may unmount it on the way out.
        tracing::info!("handed over: {metrics}");
        std::process::exit(keeper::EXIT_HANDED_OVER);
    }
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    // The exit summary: what this mount read and fetched, for the operator.
    // Not println!: whoever started us may have closed our stdout by now.
    let _ = writeln!(
        std::io::stdout(),
        "skiff: unmounted {}: {metrics}",
        args.mountpoint.display()
    );
    Ok(())
}
