//! The keeper: a small process that holds a mount's FUSE connection so that
//! the mount outlives the process serving it.
//!
//! `skiff mount` (as root) is a keeper. It opens `/dev/fuse` and starts a
//! *worker*, a child that inherits the descriptor, opens the image, mounts
//! it on that descriptor and serves it (see [`crate::session`]). The first
//! worker is forked from the keeper before the keeper starts a thread
//! ([`FirstWorker`]); the later ones execute the binary again (`skiff
//! mount --serve-fd N`). The keeper holds the same open file, so when the
//! worker dies (`kill -9`, OOM, a panic) the connection stays up: the kernel
//! queues new requests, the keeper starts another worker at once, and that
//! one takes the connection over and has the kernel send again whatever the
//! dead one had read but not answered (`FUSE_NOTIFY_RESEND`). Readers see a
//! pause, never an error.
//!
//! The keeper does no I/O on the image and allocates nearly nothing; it
//! waits for three kinds of event, each on a thread of its own that feeds
//! one channel: signals, the worker's "ready" byte (a pipe), and the
//! worker's exit.
//!
//! - SIGTERM / SIGINT: passed to the worker, which unmounts; then the keeper
//!   exits with the worker's status.
//! - The worker exits and the connection is gone (unmounted): the keeper
//!   exits too.
//! - The worker exits and the connection is up: a new worker takes over,
//!   at once the first time and with a growing pause (up to
//!   [`MAX_BACKOFF`]) while workers keep failing before they are ready;
//!   after [`MAX_FAILED_STARTS`] of those in a row the keeper gives up and
//!   detaches the mount (readers then get `ENOTCONN`).
//! - SIGHUP: a hot upgrade. The keeper reads `upgrade_to` from its state
//!   file (written by `skiff upgrade`), asks the worker to hand over
//!   (SIGUSR1: it flushes its caches and exits without unmounting), and
//!   `execve`s the new binary with its own arguments and the descriptor
//!   number (`--keeper-fd`): same PID, same connection. The new keeper
//!   starts a worker of the new binary, which takes over.
//!
//! # State
//!
//! Each keeper has a state directory (the snapshotter gives each image
//! `ROOT/mounts/ID/`; by hand, `/run/skiff/mounts/HASH/`, see
//! [`default_state_dir`]). `keeper.json` ([`KeeperState`], versioned) says
//! who serves what: PIDs, mountpoint, descriptor, binary, arguments, how
//! many workers have served and the last takeover's pause. The worker adds
//! `image.json` (the manifest it resolved), so that its successors open the
//! same image without asking the registry.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::error::DaemonError;
use crate::process;
use crate::session::{adopt_inherited, connection_alive, open_device};

/// Version of [`KeeperState`]'s layout; a keeper refuses to resume from
/// another.
pub const STATE_VERSION: u32 = 1;
/// The state file in a keeper's state directory.
pub const STATE_FILE: &str = "keeper.json";
/// The resolved image, written by the first worker.
pub const IMAGE_FILE: &str = "image.json";
/// An upgrade request (`{"binary": PATH}`), written by [`upgrade`] and
/// consumed by the keeper on SIGHUP.
pub const UPGRADE_FILE: &str = "upgrade.json";
/// Longest pause between two failed worker starts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Worker starts that fail in a row (exit before ready) before the keeper
/// gives up on a mount that was served before.
pub const MAX_FAILED_STARTS: u32 = 30;
/// How long a worker asked to hand over gets before it is killed.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Exit status of a worker that handed its mount over (SIGUSR1).
pub const EXIT_HANDED_OVER: i32 = 75;

/// What a keeper records in `keeper.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeeperState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The keeper's PID (the same across upgrades: it `execve`s).
    pub keeper_pid: i32,
    /// The worker serving now, if any.
    pub worker_pid: Option<i32>,
    /// Where the image is mounted.
    pub mountpoint: PathBuf,
    /// The `/dev/fuse` descriptor number in the keeper.
    pub fuse_fd: RawFd,
    /// The binary the keeper runs.
    pub binary: PathBuf,
    /// The keeper's arguments after the binary (`mount ...`), without the
    /// ones only a resumed keeper gets.
    pub args: Vec<String>,
    /// Workers started so far.
    pub workers_started: u64,
    /// Takeovers of the mount by a new worker (crashes and upgrades).
    pub takeovers: u64,
    /// The pause of the last takeover: from the old worker's end to the new
    /// one serving, in milliseconds.
    pub last_pause_ms: Option<u64>,
    /// Upgrades done by this keeper.
    pub upgrades: u64,
    /// Why the last upgrade failed, if it did.
    pub upgrade_error: Option<String>,
}

impl KeeperState {
    /// Reads `DIR/keeper.json`; an unknown version is an error.
    pub fn load(dir: &Path) -> Result<KeeperState, DaemonError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| DaemonError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        })?;
        let state: KeeperState = serde_json::from_slice(&bytes).map_err(|e| DaemonError::Io {
            context: format!("parsing {}", path.display()),
            source: std::io::Error::other(e),
        })?;
        if state.version != STATE_VERSION {
            return Err(DaemonError::Io {
                context: format!("{}", path.display()),
                source: std::io::Error::other(format!(
                    "state version {} (this binary reads version {STATE_VERSION})",
                    state.version
                )),
            });
        }
        Ok(state)
    }

    /// Writes `DIR/keeper.json` atomically (temporary file + rename).
    pub fn save(&self, dir: &Path) -> Result<(), DaemonError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| DaemonError::Io {
            context: "encoding the keeper state".into(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&dir.join(STATE_FILE), &bytes)
    }
}

/// Writes `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DaemonError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            DaemonError::Io {
                context: format!("writing {}", path.display()),
                source: e,
            }
        })
}

/// The state directory of a keeper started by hand for `mountpoint`:
/// `/run/skiff/mounts/` and the first 16 hex digits of the SHA-256 of the
/// mountpoint's canonical path.
pub fn default_state_dir(mountpoint: &Path) -> PathBuf {
    use sha2::Digest as _;
    let canonical = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let hash = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let short: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    PathBuf::from("/run/skiff/mounts").join(short)
}

/// How a keeper runs.
#[derive(Debug, Clone)]
pub struct KeeperOptions {
    /// Its state directory (created, mode 0700).
    pub state_dir: PathBuf,
    /// The mountpoint.
    pub mountpoint: PathBuf,
    /// The keeper's own arguments after the binary (`mount ...`), to
    /// `execve` them on an upgrade.
    pub args: Vec<String>,
    /// The worker's arguments after the binary (`mount ...`); the keeper
    /// adds `--serve-fd N --ready-fd N [--takeover]`.
    pub worker_args: Vec<String>,
    /// Written with the keeper's PID once the mount serves.
    pub pid_file: Option<PathBuf>,
    /// Resume with this descriptor (after an upgrade's `execve`).
    pub resume_fd: Option<RawFd>,
}

/// The descriptors a worker serves with.
#[derive(Debug, Clone, Copy)]
pub struct WorkerFds {
    /// The FUSE connection (`--serve-fd`).
    pub fuse_fd: RawFd,
    /// The pipe to write one byte to once the mount serves (`--ready-fd`).
    pub ready_fd: RawFd,
}

/// The first worker of a new connection, run in a child forked from the
/// keeper: it serves the mount with the descriptors given and returns the
/// child's exit status. Forked rather than executed, it starts without a
/// second execution of the binary (about 3 ms, more when the binary's pages
/// are not in memory). Later workers are executed, so that a crashed worker
/// is replaced by a fresh process, and an upgrade by the new binary.
pub type FirstWorker = Box<dyn FnOnce(WorkerFds) -> i32>;

/// What the keeper waits for.
enum Event {
    Signal(i32),
    Ready(u64),
    Exited(u64, ExitStatus),
    /// Worker `generation` was asked to hand over that long ago.
    HandOverTimeout(u64),
}

/// A worker being started or serving.
struct Worker {
    generation: u64,
    pid: i32,
    ready: bool,
    started: Instant,
}

/// Runs a keeper until its mount is gone; returns the exit code to use.
/// `first_worker` serves a new connection in a forked child (see
/// [`FirstWorker`]); without it, or when the process already runs threads
/// (a fork copies only the calling one), every worker is executed.
pub fn run(opts: &KeeperOptions, first_worker: Option<FirstWorker>) -> Result<i32, DaemonError> {
    let io = |context: String| move |e: std::io::Error| DaemonError::Io { context, source: e };
    std::fs::create_dir_all(&opts.state_dir)
        .map_err(io(format!("creating {}", opts.state_dir.display())))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&opts.state_dir, std::fs::Permissions::from_mode(0o700));
    }
    let binary = std::env::current_exe().map_err(io("finding this binary".into()))?;
    // The descriptor: a new connection, or the one the previous binary
    // held (same number: `execve` keeps it).
    let (fd, resumed) = match opts.resume_fd {
        Some(raw) => (adopt_inherited(raw)?, true),
        None => (open_device()?, false),
    };
    let raw = fd.as_raw_fd();
    // The descriptor must survive `execve` (for the workers and upgrades).
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| DaemonError::Io {
        context: "keeping the FUSE descriptor across exec".into(),
        source: e.into(),
    })?;
    // Before the keeper starts any thread of its own.
    let mut forked = match first_worker {
        Some(start) if !resumed && single_threaded() => Some(fork_worker(raw, start)?),
        _ => None,
    };
    let mut state = match (resumed, KeeperState::load(&opts.state_dir)) {
        (true, Ok(s)) => s,
        (true, Err(e)) => return Err(e),
        (false, _) => KeeperState {
            version: STATE_VERSION,
            keeper_pid: 0,
            worker_pid: None,
            mountpoint: opts.mountpoint.clone(),
            fuse_fd: raw,
            binary: binary.clone(),
            args: opts.args.clone(),
            workers_started: 0,
            takeovers: 0,
            last_pause_ms: None,
            upgrades: 0,
            upgrade_error: None,
        },
    };
    state.keeper_pid = std::process::id() as i32;
    state.fuse_fd = raw;
    state.binary = binary.clone();
    state.args = opts.args.clone();
    if resumed {
        state.upgrades += 1;
        state.upgrade_error = None;
    } else {
        // A stale image.json of an earlier mount must not pin this one.
        let _ = std::fs::remove_file(opts.state_dir.join(IMAGE_FILE));
    }
    state.save(&opts.state_dir)?;

    let (tx, rx) = mpsc::channel::<Event>();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(io("installing signal handlers".into()))?;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("skiff-keeper-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if tx.send(Event::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .map_err(io("starting the signal thread".into()))?;
    }

    let mut generation = 0u64;
    // The first worker of a new connection mounts it; every later one (and
    // every one after an upgrade) takes it over.
    let mut takeover = resumed;
    let mut served_once = resumed;
    let mut failed_starts = 0u32;
    let mut stopping = false;
    let mut upgrading: Option<PathBuf> = None;
    // When the previous worker ended: the start of a takeover's pause.
    let mut gap_since: Option<Instant> = resumed.then(Instant::now);
    loop {
        generation += 1;
        let worker = match forked.take() {
            Some(child) => watch_worker(generation, child.pid, child.ready, child.exit, &tx)?,
            None => spawn_worker(&binary, opts, raw, takeover, generation, &tx)?,
        };
        state.worker_pid = Some(worker.pid);
        state.workers_started += 1;
        state.save(&opts.state_dir)?;
        let mut worker = worker;
        // Wait for this worker's end, handling everything on the way.
        let status = loop {
            let Ok(event) = rx.recv() else {
                return Err(DaemonError::Io {
                    context: "keeper".into(),
                    source: std::io::Error::other("event channel closed"),
                });
            };
            match event {
                Event::Ready(g) if g == worker.generation => {
                    worker.ready = true;
                    failed_starts = 0;
                    if let Some(since) = gap_since.take() {
                        let pause = since.elapsed();
                        state.takeovers += 1;
                        state.last_pause_ms = Some(pause.as_millis() as u64);
                        tracing::info!(
                            worker = worker.pid,
                            "worker took over {} after a pause of {:.1} ms",
                            opts.mountpoint.display(),
                            pause.as_secs_f64() * 1e3
                        );
                    }
                    state.save(&opts.state_dir)?;
                    if !served_once {
                        served_once = true;
                        if let Some(p) = &opts.pid_file {
                            write_atomic(p, format!("{}\n", std::process::id()).as_bytes())?;
                        }
                    }
                }
                Event::Ready(_) => {}
                Event::Exited(g, status) if g == worker.generation => break status,
                Event::Exited(..) => {}
                Event::HandOverTimeout(g) if g == worker.generation => {
                    tracing::warn!(
                        worker = worker.pid,
                        "the worker did not hand over within {HAND_OVER_TIMEOUT:?}: killing it"
                    );
                    signal(worker.pid, Signal::SIGKILL);
                }
                Event::HandOverTimeout(_) => {}
                Event::Signal(sig) if sig == signal_hook::consts::SIGHUP => {
                    match take_upgrade_request(&opts.state_dir) {
                        Ok(Some(new)) if !stopping => {
                            tracing::info!(
                                "upgrade: handing {} over to {}",
                                opts.mountpoint.display(),
                                new.display()
                            );
                            upgrading = Some(new);
                            signal(worker.pid, Signal::SIGUSR1);
                            let generation = worker.generation;
                            let tx = tx.clone();
                            // A worker that does not hand over in time is
                            // killed (its requests are sent again anyway);
                            // the loop does it, and only while that worker
                            // has not exited, so a reused PID is never hit.
                            let _ = std::thread::Builder::new()
                                .name("skiff-keeper-timeout".into())
                                .spawn(move || {
                                    std::thread::sleep(HAND_OVER_TIMEOUT);
                                    let _ = tx.send(Event::HandOverTimeout(generation));
                                });
                        }
                        Ok(_) => tracing::info!("SIGHUP without an upgrade to do"),
                        Err(e) => tracing::warn!(
                            "SIGHUP: {e}: {}",
                            std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
                        ),
                    }
                }
                Event::Signal(sig) => {
                    tracing::info!("signal {sig}: stopping the worker, which unmounts");
                    stopping = true;
                    signal(worker.pid, Signal::SIGTERM);
                }
            }
        };
        state.worker_pid = None;
        let alive = connection_alive(fd.as_fd());
        let code = status.code();
        // Debug only: when the mount ends here, the worker's own last
        // words (its error, or its exit summary) are the ones to read.
        tracing::debug!(
            worker = worker.pid,
            "worker exited ({status}); connection {}",
            if alive { "up" } else { "closed" }
        );
        if !alive || stopping {
            state.save(&opts.state_dir)?;
            finish(opts, &fd);
            return Ok(match code {
                Some(c) => c,
                None if stopping => 0,
                None => 1,
            });
        }
        if !served_once {
            // The first worker failed before the mount ever served: a
            // start-up error, reported by the worker's own output. A
            // mount it made is left without a server: detach it.
            let _ = nix::mount::umount2(&opts.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            finish(opts, &fd);
            return Ok(code.filter(|c| *c != 0).unwrap_or(1));
        }
        gap_since.get_or_insert_with(Instant::now);
        takeover = true;
        if let Some(new) = upgrading.take() {
            let err = exec_upgrade(&new, opts, raw);
            // Only reached when the new binary could not be run: carry on
            // with this one.
            tracing::error!("upgrade to {} failed: {err}", new.display());
            state.upgrade_error = Some(format!("{}: {err}", new.display()));
            state.save(&opts.state_dir)?;
            continue;
        }
        if !worker.ready {
            failed_starts += 1;
            if failed_starts >= MAX_FAILED_STARTS {
                tracing::error!(
                    "{failed_starts} workers in a row failed to start: detaching {}",
                    opts.mountpoint.display()
                );
                state.save(&opts.state_dir)?;
                let _ = nix::mount::umount2(&opts.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                finish(opts, &fd);
                return Ok(1);
            }
            let pause = Duration::from_millis(50u64 << failed_starts.min(6)).min(MAX_BACKOFF);
            tracing::warn!(
                "worker {} died before serving (after {:.1} s); next one in {:?}",
                worker.pid,
                worker.started.elapsed().as_secs_f64(),
                pause
            );
            std::thread::sleep(pause);
        } else {
            tracing::warn!(
                worker = worker.pid,
                "worker died ({status}) while serving {}: starting another",
                opts.mountpoint.display()
            );
        }
    }
}

/// The mount is gone: removes the pid file and the state (and the state
/// directory when nothing else is in it); the descriptor closes when the
/// process exits.
fn finish(opts: &KeeperOptions, _fd: &OwnedFd) {
    if let Some(p) = &opts.pid_file {
        let _ = std::fs::remove_file(p);
    }
    for f in [STATE_FILE, IMAGE_FILE, UPGRADE_FILE] {
        let _ = std::fs::remove_file(opts.state_dir.join(f));
    }
    let _ = std::fs::remove_dir(&opts.state_dir);
}

/// Sends `sig` to `pid`, ignoring a process that is gone.
fn signal(pid: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid), sig);
}

/// A worker's "ready" pipe: (read end, write end), both close-on-exec.
fn ready_pipe() -> Result<(OwnedFd, OwnedFd), DaemonError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| DaemonError::Io {
        context: "creating the ready pipe".into(),
        source: e.into(),
    })
}

/// How the keeper learns that a worker has exited.
type WaitExit = Box<dyn FnOnce() -> std::io::Result<ExitStatus> + Send>;

/// A worker forked from the keeper, not yet watched.
struct ForkedWorker {
    pid: i32,
    ready: OwnedFd,
    exit: WaitExit,
}

/// Whether this process runs one thread only (`/proc/self/task`).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

/// Forks the first worker, which runs `start` and exits with its status.
/// Call it only while the process has a single thread.
fn fork_worker(fuse_fd: RawFd, start: FirstWorker) -> Result<ForkedWorker, DaemonError> {
    let (ready_r, ready_w) = ready_pipe()?;
    // What the keeper buffered must not be written twice.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // SAFETY: the caller runs a single thread (`single_threaded`), so the
    // child is a whole copy of the process: no lock is held by a thread
    // that the child lacks. The child never returns into the caller: it
    // runs `start` and exits.
    #[allow(unsafe_code)]
    let forked = unsafe { nix::unistd::fork() };
    match forked.map_err(|e| DaemonError::Io {
        context: "forking the first worker".into(),
        source: e.into(),
    })? {
        nix::unistd::ForkResult::Child => {
            drop(ready_r);
            let fds = WorkerFds {
                fuse_fd,
                ready_fd: std::os::fd::IntoRawFd::into_raw_fd(ready_w),
            };
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(fds)))
                .unwrap_or(101);
            std::process::exit(code)
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_w);
            Ok(ForkedWorker {
                pid: child.as_raw(),
                ready: ready_r,
                exit: Box::new(move || wait_forked(child)),
            })
        }
    }
}

/// Waits for the forked worker `pid` to exit.
fn wait_forked(pid: Pid) -> std::io::Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt as _;
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                return Ok(ExitStatus::from_raw((code & 0xff) << 8))
            }
            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, core)) => {
                return Ok(ExitStatus::from_raw(
                    sig as i32 | if core { 0x80 } else { 0 },
                ))
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Executes worker `generation` of `binary` on `fuse_fd` and watches it.
fn spawn_worker(
    binary: &Path,
    opts: &KeeperOptions,
    fuse_fd: RawFd,
    takeover: bool,
    generation: u64,
    tx: &mpsc::Sender<Event>,
) -> Result<Worker, DaemonError> {
    let (ready_r, ready_w) = ready_pipe()?;
    nix::fcntl::fcntl(
        ready_w.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| DaemonError::Io {
        context: "handing the ready pipe down".into(),
        source: e.into(),
    })?;
    let mut cmd = Command::new(binary);
    cmd.args(&opts.worker_args)
        .arg("--serve-fd")
        .arg(fuse_fd.to_string())
        .arg("--ready-fd")
        .arg(ready_w.as_raw_fd().to_string());
    if takeover {
        cmd.arg("--takeover");
    }
    let mut child: Child = cmd.spawn().map_err(|e| DaemonError::Io {
        context: "starting a worker".into(),
        source: e,
    })?;
    // Our copy of the write end must go, or EOF never comes.
    drop(ready_w);
    let pid = child.id() as i32;
    watch_worker(generation, pid, ready_r, Box::new(move || child.wait()), tx)
}

/// Starts the thread that reports worker `generation`'s readiness (a byte
/// on `ready`, the read end of its pipe) and then its exit on `tx`.
fn watch_worker(
    generation: u64,
    pid: i32,
    ready: OwnedFd,
    exit: WaitExit,
    tx: &mpsc::Sender<Event>,
) -> Result<Worker, DaemonError> {
    let tx = tx.clone();
    std::thread::Builder::new()
        .name(format!("skiff-keeper-worker-{generation}"))
        .spawn(move || {
            let mut ready = std::fs::File::from(ready);
            let mut byte = [0u8; 1];
            if matches!(std::io::Read::read(&mut ready, &mut byte), Ok(1)) {
                let _ = tx.send(Event::Ready(generation));
            }
            drop(ready);
            match exit() {
                Ok(status) => {
                    let _ = tx.send(Event::Exited(generation, status));
                }
                Err(e) => tracing::error!("waiting for worker {generation}: {e}"),
            }
        })
        .map_err(|e| DaemonError::Io {
            context: "starting a worker thread".into(),
            source: e,
        })?;
    Ok(Worker {
        generation,
        pid,
        ready: false,
        started: Instant::now(),
    })
}

/// `execve`s `binary` as this keeper, keeping the descriptor; returns only
/// on failure.
fn exec_upgrade(binary: &Path, opts: &KeeperOptions, fuse_fd: RawFd) -> String {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;
    let mut argv: Vec<OsString> = vec![binary.as_os_str().to_owned()];
    argv.extend(opts.args.iter().map(OsString::from));
    argv.push("--keeper-fd".into());
    argv.push(fuse_fd.to_string().into());
    let cargs: Result<Vec<CString>, _> = argv.iter().map(|a| CString::new(a.as_bytes())).collect();
    let path = CString::new(binary.as_os_str().as_bytes());
    match (path, cargs) {
        (Ok(path), Ok(cargs)) => match nix::unistd::execv(&path, &cargs) {
            Ok(never) => match never {},
            Err(e) => e.to_string(),
        },
        _ => "a NUL byte in the binary's path or the arguments".into(),
    }
}

/// What `skiff upgrade` asks of a keeper.
#[derive(Debug, Serialize, Deserialize)]
struct UpgradeRequest {
    binary: PathBuf,
}

/// Reads and removes the keeper's upgrade request, if there is one.
fn take_upgrade_request(dir: &Path) -> Result<Option<PathBuf>, DaemonError> {
    let path = dir.join(UPGRADE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(DaemonError::Io {
                context: format!("reading {}", path.display()),
                source: e,
            })
        }
    };
    let _ = std::fs::remove_file(&path);
    let req: UpgradeRequest = serde_json::from_slice(&bytes).map_err(|e| DaemonError::Io {
        context: format!("parsing {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    Ok(Some(req.binary))
}

/// The outcome of one keeper's upgrade.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    /// The keeper's state directory.
    pub state_dir: PathBuf,
    /// Its mountpoint.
    pub mountpoint: PathBuf,
    /// The keeper's PID (unchanged by the upgrade).
    pub keeper_pid: i32,
    /// The worker before.
    pub old_worker: Option<i32>,
    /// The worker of the new binary.
    pub new_worker: Option<i32>,
    /// The pause readers saw, in milliseconds.
    pub pause_ms: Option<u64>,
}

/// The keeper state directories under `dir`: `dir` itself when it has a
/// `keeper.json`, else its subdirectories that have one (the snapshotter's
/// `ROOT/mounts`).
pub fn state_dirs(dir: &Path) -> Vec<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return vec![dir.to_path_buf()];
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join(STATE_FILE).is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Hot upgrade of the keeper of state directory `dir` to `binary`: asks it
/// (an upgrade request and SIGHUP) to hand its mount over to a worker of
/// the new binary, and waits up to `timeout` until that worker serves.
pub fn upgrade(dir: &Path, binary: &Path, timeout: Duration) -> Result<UpgradeReport, DaemonError> {
    let err = |message: String| DaemonError::Io {
        context: format!("upgrading the keeper of {}", dir.display()),
        source: std::io::Error::other(message),
    };
    let before = KeeperState::load(dir)?;
    if !process::is_live_mount_process(before.keeper_pid) {
        return Err(err(format!(
            "its keeper (PID {}) is not running",
            before.keeper_pid
        )));
    }
    let binary = binary.canonicalize().map_err(|e| DaemonError::Io {
        context: format!("the new binary {}", binary.display()),
        source: e,
    })?;
    let request = serde_json::to_vec(&UpgradeRequest {
        binary: binary.clone(),
    })
    .map_err(|e| err(e.to_string()))?;
    write_atomic(&dir.join(UPGRADE_FILE), &request)?;
    kill(Pid::from_raw(before.keeper_pid), Signal::SIGHUP)
        .map_err(|e| err(format!("signalling PID {}: {e}", before.keeper_pid)))?;
    let deadline = Instant::now() + timeout;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        // The keeper rewrites the file atomically; a read between two
        // writes still sees a whole one.
        if let Ok(now) = KeeperState::load(dir) {
            if now.upgrades > before.upgrades && now.takeovers > before.takeovers {
                return Ok(UpgradeReport {
                    state_dir: dir.to_path_buf(),
                    mountpoint: now.mountpoint,
                    keeper_pid: now.keeper_pid,
                    old_worker: before.worker_pid,
                    new_worker: now.worker_pid,
                    pause_ms: now.last_pause_ms,
                });
            }
            if let Some(e) = now
                .upgrade_error
                .filter(|_| now.upgrades == before.upgrades)
            {
                if Some(&e) != before.upgrade_error.as_ref() {
                    return Err(err(e));
                }
            }
        }
        if !process::is_live_mount_process(before.keeper_pid) {
            return Err(err(format!(
                "its keeper (PID {}) exited during the upgrade",
                before.keeper_pid
            )));
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "no worker of {} served within {:?}",
                binary.display(),
                timeout
            )));
        }
    }
}
