//! Real parts for the snapshotter's end-to-end tests: a private containerd
//! (root, state, socket) with the skiff proxy plugin, the snapshotter itself
//! (`skiff snapshotter`), a registry on 127.0.0.1, and the fixture image.
//!
//! Every part is a guard that stops what it started when dropped (tasks,
//! containers, the FUSE daemons the snapshotter started, lazily unmounting
//! whatever is left under the test directory). A missing program fails the
//! test with a message naming the package; nothing is skipped.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod rig;
pub use rig::*;
pub use skiff_tests::services::{stop_child, tail_of, Registry};

pub use skiff_tests::harness::{fixture_image, fixture_layout, run, scratch_root, skiff_bin};

/// Fails unless `program` is installed, naming its Debian package.
pub fn need(program: &str, package: &str) {
    if !skiff_tests::harness::on_path(program) {
        panic!("{program} is missing: install it (scripts/setup does: apt-get install {package})");
    }
}

/// Fails unless the test runs as root (containerd, mounts).
pub fn need_root() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("the containerd tests need root (containerd, runc, FUSE and overlay mounts)");
    }
}

/// A fresh directory under the scratch root, removed (after unmounting
/// anything left below it) when dropped.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        // Short: unix socket paths must stay below 108 bytes.
        let path = scratch_root().join(format!("sn-{name}-{}", std::process::id()));
        unmount_below(&path);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        unmount_below(&self.path);
        if std::env::var_os("SKIFF_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(Path::new(&p), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs `cmd` with a deadline; returns its output (killed at the deadline).
pub fn run_for(cmd: &mut Command, limit: Duration) -> Output {
    let line = skiff_tests::harness::command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let s = child.wait().unwrap();
            eprintln!("`{line}` killed after {} s", limit.as_secs());
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Like [`run_for`], panicking (with the output) unless the command succeeds.
pub fn check_for(cmd: &mut Command, limit: Duration) -> String {
    let line = skiff_tests::harness::command_line(cmd);
    let out = run_for(cmd, limit);
    if !out.status.success() {
        panic!(
            "command failed ({}): {line}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Text appended to a log file since a mark.
pub struct LogMark {
    path: PathBuf,
    offset: u64,
}

impl LogMark {
    pub fn new(path: &Path) -> LogMark {
        let offset = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        LogMark {
            path: path.to_path_buf(),
            offset,
        }
    }

    pub fn since(&self) -> String {
        let mut f = fs::File::open(&self.path).unwrap();
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }
}

/// Waits until the log at `path` has not grown for `quiet` (at most a
/// minute): what a failed client left running (containerd goes on
/// downloading the other layers of a pull whose unpack failed) has ended.
pub fn wait_for_quiet_log(path: &Path, quiet: Duration) {
    let size = || fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    let (mut last, mut since) = (size(), Instant::now());
    while since.elapsed() < quiet && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
        let now = size();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// A private containerd with the skiff proxy plugin.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub plugin_socket: PathBuf,
    pub namespace: String,
    child: Child,
}

impl Containerd {
    /// Starts containerd in `dir` with the plugin's socket at
    /// `DIR/skiff.sock`; `namespace` is used by [`Containerd::ctr`].
    pub fn start(dir: &Path, namespace: &str) -> Containerd {
        Containerd::start_with(dir, namespace, None)
    }

    /// Starts containerd in `dir` with its CRI plugin on, configured by
    /// `cri` (the body of `[plugins."io.containerd.grpc.v1.cri"]`, its
    /// sub-tables included); the namespace is CRI's, `k8s.io`.
    pub fn start_cri(dir: &Path, cri: &str) -> Containerd {
        Containerd::start_with(dir, "k8s.io", Some(cri))
    }

    fn start_with(dir: &Path, namespace: &str, cri: Option<&str>) -> Containerd {
        need_root();
        need("containerd", "containerd");
        need("ctr", "containerd");
        need("runc", "runc");
        let socket = dir.join("ctd.sock");
        let plugin_socket = dir.join("skiff.sock");
        let plugins = match cri {
            None => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_owned(),
            Some(_) => String::new(),
        };
        let mut config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{plugins}[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[proxy_plugins.skiff]
  type = "snapshot"
  address = "{plugin}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            plugin = plugin_socket.display(),
        );
        if let Some(cri) = cri {
            config.push_str("[plugins.\"io.containerd.grpc.v1.cri\"]\n");
            config.push_str(cri);
        }
        fs::write(dir.join("containerd.toml"), config).unwrap();
        // containerd 1.6 puts shim sockets there whatever the config says.
        fs::create_dir_all("/run/containerd/s").unwrap();
        fs::create_dir_all(dir.join("fifo")).unwrap();
        fs::create_dir_all(dir.join("runc")).unwrap();
        let child = Containerd::spawn(dir);
        let ctd = Containerd {
            dir: dir.to_path_buf(),
            socket,
            plugin_socket,
            namespace: namespace.to_owned(),
            child,
        };
        ctd.wait_until_up();
        ctd
    }

    fn spawn(dir: &Path) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("containerd.log"))
            .unwrap();
        Command::new("containerd")
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start containerd: {e}"))
    }

    /// Stops containerd (SIGTERM; its shims and containers keep running)
    /// and starts it again on the same root, state and socket.
    pub fn restart(&mut self) {
        stop_child(&mut self.child, "containerd");
        self.child = Containerd::spawn(&self.dir);
        self.wait_until_up();
    }

    fn wait_until_up(&self) {
        let (ctd, dir) = (self, &self.dir);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run_for(
                Command::new("ctr")
                    .arg("--address")
                    .arg(&ctd.socket)
                    .arg("version"),
                Duration::from_secs(10),
            );
            if out.status.success() {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not answer within 30 s:\n{}",
                    tail_of(&dir.join("containerd.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `ctr` command against this containerd, in its namespace.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace);
        c
    }

    /// `ctr run --snapshotter skiff --rm IMAGE ID ARGS...`: its stdout.
    pub fn run_container(&self, image: &str, id: &str, args: &[&str]) -> String {
        let mut c = self.ctr();
        c.args(["run", "--snapshotter", "skiff", "--rm", "--fifo-dir"])
            .arg(self.dir.join("fifo"))
            .arg("--runc-root")
            .arg(self.dir.join("runc"))
            .arg(image)
            .arg(id)
            .args(args);
        check_for(&mut c, Duration::from_secs(180))
    }

    /// `ctr run -d`: starts a container in the background.
    pub fn start_container(&self, image: &str, id: &str, args: &[&str]) {
        let mut c = self.ctr();
        c.args(["run", "-d", "--snapshotter", "skiff", "--fifo-dir"])
            .arg(self.dir.join("fifo"))
            .arg("--runc-root")
            .arg(self.dir.join("runc"))
            .arg(image)
            .arg(id)
            .args(args);
        check_for(&mut c, Duration::from_secs(180));
    }

    /// `ctr tasks exec`: runs a process in a running container; its output.
    pub fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> Output {
        let mut c = self.ctr();
        c.args(["tasks", "exec", "--fifo-dir"])
            .arg(self.dir.join("fifo"))
            .args(["--exec-id", exec_id, id])
            .args(args);
        run_for(&mut c, Duration::from_secs(60))
    }

    /// Waits until containerd reaches the skiff plugin
    /// (`ctr snapshots --snapshotter skiff ls` answers).
    pub fn wait_for_plugin(&self, sn_log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = self.ctr();
            c.args(["snapshots", "--snapshotter", "skiff", "ls"]);
            if run_for(&mut c, Duration::from_secs(10)).status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd cannot reach the skiff snapshotter after 30 s\n--- snapshotter ---\n{}\n--- containerd ---\n{}",
                    tail_of(sn_log, 30),
                    tail_of(&self.dir.join("containerd.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Removes every task, container and image of the namespace.
    pub fn clean_namespace(&self) {
        let list = |what: &[&str]| -> Vec<String> {
            let mut c = self.ctr();
            c.args(what);
            let out = run_for(&mut c, Duration::from_secs(20));
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        };
        for task in list(&["tasks", "ls", "-q"]) {
            let mut c = self.ctr();
            c.args(["tasks", "kill", "-s", "SIGKILL", &task]);
            run_for(&mut c, Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(200));
            let mut c = self.ctr();
            c.args(["tasks", "delete", "-f", &task]);
            run_for(&mut c, Duration::from_secs(20));
        }
        for container in list(&["containers", "ls", "-q"]) {
            let mut c = self.ctr();
            c.args(["containers", "delete", &container]);
            run_for(&mut c, Duration::from_secs(20));
        }
        for image in list(&["images", "ls", "-q"]) {
            let mut c = self.ctr();
            c.args(["images", "rm", "--sync", &image]);
            run_for(&mut c, Duration::from_secs(60));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.clean_namespace();
        stop_child(&mut self.child, "containerd");
    }
}

/// The snapshotter (`skiff snapshotter`).
pub struct Snapshotter {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The `skiff` binary it runs (and starts image daemons from).
    pub bin: PathBuf,
    /// Appended to the generated configuration file.
    pub extra_config: String,
    child: Option<Child>,
}

impl Snapshotter {
    /// Starts `skiff snapshotter --root ROOT --address SOCKET` (log in
    /// `ROOT.log`) and waits for its socket.
    pub fn start(root: &Path, socket: &Path) -> Snapshotter {
        Snapshotter::start_with(root, socket, "")
    }

    /// [`Snapshotter::start`] with `extra` appended to its configuration
    /// file (TOML tables other than `[mount]`).
    pub fn start_with(root: &Path, socket: &Path, extra: &str) -> Snapshotter {
        let mut sn = Snapshotter {
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            log: root.with_extension("log"),
            bin: skiff_bin(),
            extra_config: extra.to_owned(),
            child: None,
        };
        sn.spawn();
        sn
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // A disk cache of its own: the node-wide default would carry
        // chunks from one test (or run) to the next.
        let config = self.root.with_extension("toml");
        fs::write(
            &config,
            format!(
                "[mount]\ncache_dir = \"{}\"\n{}",
                self.root.with_extension("cache").display(),
                self.extra_config
            ),
        )
        .unwrap();
        let child = Command::new(&self.bin)
            .arg("snapshotter")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,skiff_snapshotter=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start skiff snapshotter: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "skiff snapshotter exited ({status}):\n{}",
                        tail_of(&self.log, 30)
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "skiff snapshotter did not serve within 60 s:\n{}",
                    tail_of(&self.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGTERM) and starts it again on the same root and socket.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, "skiff snapshotter");
        }
        self.spawn();
    }

    /// Stops it and starts binary `bin` on the same root and socket (the
    /// snapshotter's half of an upgrade).
    pub fn restart_with(&mut self, bin: &Path) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, "skiff snapshotter");
        }
        self.bin = bin.to_path_buf();
        self.spawn();
    }

    /// `kill -9` (a crash), then starts it again on the same root and socket.
    pub fn kill9_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// PIDs of the image mount daemons its metadata records.
    pub fn daemon_pids(&self) -> Vec<i32> {
        let Ok(bytes) = fs::read(self.root.join("metadata.json")) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        v.get("images")
            .and_then(|i| i.as_object())
            .map(|images| {
                images
                    .values()
                    .filter_map(|m| m.get("pid").and_then(|p| p.as_i64()))
                    .map(|p| p as i32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mount points of the image mounts (`ROOT/mounts/*/mnt`).
    pub fn mount_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.root.join("mounts"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path().join("mnt"))
                    .filter(|p| p.exists())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let pids = self.daemon_pids();
        stop_server(self.child.take(), "skiff snapshotter", &pids, &self.root);
    }
}

/// Stops a server (`child`, named `name` in messages) and the image daemons
/// it started (`pids`, read before it stopped), then unmounts what is left
/// below `root`: a test leaves no process or mount behind, pass or fail.
pub fn stop_server(child: Option<Child>, name: &str, pids: &[i32], root: &Path) {
    if let Some(mut c) = child {
        stop_child(&mut c, name);
    }
    for &pid in pids {
        if pid > 1 && daemon_alive(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    unmount_below(root);
}

/// Whether process `pid` is a live `skiff mount` (not a zombie; a keeper
/// in the middle of an upgrade's `execve` counts as live).
pub fn daemon_alive(pid: i32) -> bool {
    skiff_fusefs::process::is_live_mount_process(pid)
}

/// The blob digests GET in an access log excerpt.
pub fn blobs_fetched(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let i = l.find("/blobs/sha256:")?;
            let rest = &l[i + "/blobs/".len()..];
            Some(rest.chars().take(7 + 64).collect())
        })
        .collect()
}

/// Appends a line to the fault report `scripts/faults` prints
/// (`TARGET/skiff-test-tmp/faults-report.txt`).
pub fn report_fault(fault: &str, outcome: &str) {
    use std::io::Write as _;
    let path = scratch_root().join("faults-report.txt");
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{fault}\t{outcome}");
    }
    eprintln!("FAULT {fault}: {outcome}");
}

/// `GET /metrics` on a daemon's unix socket: the body.
pub fn scrape(sock: &Path) -> String {
    use std::io::Write as _;
    let mut stream = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: skiff\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
    reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}
