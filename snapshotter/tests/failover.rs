//! Failover and hot upgrade under real containerd: a container keeps
//! reading, with no error and no wrong byte, while its image's FUSE worker
//! is killed with -9 again and again, and while the snapshotter and every
//! image daemon are moved to a new binary (`skiff upgrade`).
//!
//! The container re-reads numpy's files on 16 threads and checks each
//! against the digest it read first; the host drops its caches before each
//! fault so that the reads reach the FUSE daemon. The container writes its
//! counters to `/status`: reads done, errors, wrong digests, and the longest
//! time between two completed reads (the pause a reader saw).
//!
//! Needs what `containerd.rs` needs; a missing program fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// The reader: 16 threads over numpy's files, digests against the first
/// read, counters in /status every 100 ms.
const READER: &str = r#"
import hashlib, os, threading, time
root = "/usr/local/lib/python3.11/dist-packages/numpy"
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
def digest(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)
ref = {p: digest(p) for p in files}
st = {"reads": 0, "errors": 0, "wrong": 0, "maxgap": 0.0, "last": time.monotonic()}
lock = threading.Lock()
def reader(k):
    i = k
    while True:
        p = files[i % len(files)]
        i += 16
        try:
            ok = digest(p) == ref[p]
        except OSError as e:
            with lock:
                st["errors"] += 1
            print("ERROR", p, e, flush=True)
            continue
        now = time.monotonic()
        with lock:
            st["reads"] += 1
            st["maxgap"] = max(st["maxgap"], now - st["last"])
            st["last"] = now
            if not ok:
                st["wrong"] += 1
                print("WRONG", p, flush=True)
for k in range(16):
    threading.Thread(target=reader, args=(k,), daemon=True).start()
while True:
    time.sleep(0.1)
    with lock:
        s = "%d %d %d %.3f" % (st["reads"], st["errors"], st["wrong"], st["maxgap"])
    with open("/status.tmp", "w") as f:
        f.write(s)
    os.replace("/status.tmp", "/status")
"#;

/// The reader's counters.
#[derive(Debug, Clone, Copy, Default)]
struct Status {
    reads: u64,
    errors: u64,
    wrong: u64,
    max_gap_s: f64,
}

fn status(rig: &Rig, n: &mut u32) -> Status {
    *n += 1;
    let out = rig
        .ctd
        .exec("reader", &format!("status-{n}"), &["cat", "/status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    if f.len() != 4 {
        return Status::default();
    }
    Status {
        reads: f[0].parse().unwrap_or(0),
        errors: f[1].parse().unwrap_or(0),
        wrong: f[2].parse().unwrap_or(0),
        max_gap_s: f[3].parse().unwrap_or(0.0),
    }
}

/// A rig with the Skiff fixture pulled lazily and the reader running in
/// container `reader`, past its first pass.
fn reading_rig(name: &str) -> (Rig, Registry) {
    need("docker-registry", "docker-registry");
    let rig = Rig::new(name);
    let registry = Registry::start(rig.path());
    let (reference, layout) = push_skiff_image(rig.path(), &registry);
    rpull_skiff(&rig, &registry, &reference, &layout);
    rig.ctd
        .start_container(&reference, "reader", &["python3", "-c", READER]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    while status(&rig, &mut n).reads < 100 {
        assert!(
            Instant::now() < deadline,
            "the reader never got going:\n{}",
            tail_of(&rig.sn.log, 30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    (rig, registry)
}

/// The keeper state of the one image mount.
fn keeper_state(rig: &Rig) -> (PathBuf, serde_json::Value) {
    let dirs: Vec<PathBuf> = fs::read_dir(rig.sn.root.join("mounts"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("keeper.json").is_file())
        .collect();
    assert_eq!(dirs.len(), 1, "one image mount expected: {dirs:?}");
    let v = read_json(&dirs[0].join("keeper.json"));
    (dirs[0].clone(), v)
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Waits until the keeper reports `takeovers` takeovers; returns its state.
fn wait_takeovers(rig: &Rig, takeovers: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = keeper_state(rig);
        if v["takeovers"].as_u64().unwrap_or(0) >= takeovers && v["worker_pid"].is_i64() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no new worker served within 60 s: {v}\n{}",
            tail_of(&rig.sn.log, 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks the reader after the faults: no error, no wrong byte, still
/// reading, still running. Returns its last counters.
fn check_reader(rig: &Rig, before: Status, what: &str) -> Status {
    std::thread::sleep(Duration::from_secs(2));
    let mut n = 1000;
    let after = status(rig, &mut n);
    assert_eq!(after.errors, 0, "read errors {what}: {after:?}");
    assert_eq!(after.wrong, 0, "wrong bytes {what}: {after:?}");
    assert!(
        after.reads > before.reads,
        "the container stopped reading {what}: {before:?} -> {after:?}"
    );
    let mut c = rig.ctd.ctr();
    c.args(["tasks", "ls"]);
    let tasks = check_for(&mut c, Duration::from_secs(30));
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("reader") && l.contains("RUNNING")),
        "the container is not running {what}:\n{tasks}"
    );
    after
}

fn exe_of(pid: i64) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

#[test]
fn image_daemon_killed_9_twenty_times_while_a_container_reads() {
    let (rig, _registry) = reading_rig("failover-kill9");
    let mut n = 0;
    let before = status(&rig, &mut n);
    let (_, first) = keeper_state(&rig);
    let keeper = first["keeper_pid"].as_i64().unwrap();
    let mut takeovers = first["takeovers"].as_u64().unwrap();
    let mut pauses = Vec::new();
    for _ in 0..20 {
        let (_, v) = keeper_state(&rig);
        let worker = v["worker_pid"].as_i64().expect("a serving worker");
        drop_caches();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        takeovers += 1;
        let v = wait_takeovers(&rig, takeovers);
        assert_ne!(v["worker_pid"].as_i64(), Some(worker));
        pauses.push(v["last_pause_ms"].as_u64().unwrap_or(0));
        // Let the readers through the new worker before the next fault.
        std::thread::sleep(Duration::from_millis(300));
    }
    let after = check_reader(&rig, before, "across 20 kill -9 of the image daemon");
    let (_, last) = keeper_state(&rig);
    assert_eq!(
        last["keeper_pid"].as_i64(),
        Some(keeper),
        "the keeper changed"
    );
    pauses.sort_unstable();
    let line = format!(
        "survived: 20 kill -9 of the worker with 16 readers and dropped caches: {} reads, 0 errors, 0 wrong; takeover pause median {} ms, max {} ms; longest reader gap {:.0} ms",
        after.reads - before.reads,
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        after.max_gap_s * 1e3
    );
    report_fault("image-daemon-kill-9", &line);
}

/// Copies the binary under test to `dir/name` (a "new version").
fn binary_copy(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    fs::copy(skiff_bin(), &to).unwrap();
    to
}

#[test]
fn hot_upgrade_of_the_snapshotter_and_image_daemons_while_a_container_reads() {
    let (mut rig, _registry) = reading_rig("failover-upgrade");
    let mut n = 0;
    let before = status(&rig, &mut n);
    let (_, first) = keeper_state(&rig);
    let keeper = first["keeper_pid"].as_i64().unwrap();
    let mut pauses = Vec::new();
    for (round, name) in ["skiff-v2", "skiff-v3", "skiff-v4"].into_iter().enumerate() {
        let new = binary_copy(rig.path(), name);
        // The documented sequence: the snapshotter restarts on the new
        // binary (its mounts outlive it), then `skiff upgrade` moves every
        // image daemon.
        rig.sn.restart_with(&new);
        rig.ctd.wait_for_plugin(&rig.sn.log);
        drop_caches();
        let mut c = std::process::Command::new(&new);
        c.arg("upgrade")
            .arg("--binary")
            .arg(&new)
            .arg("--json")
            .arg(rig.sn.root.join("mounts"));
        let out = check_for(&mut c, Duration::from_secs(120));
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["keeper_pid"].as_i64(), Some(keeper), "{report}");
        pauses.push(report["pause_ms"].as_u64().unwrap_or(0));
        let (_, v) = keeper_state(&rig);
        assert_eq!(v["upgrades"].as_u64(), Some(round as u64 + 1), "{v}");
        let worker = v["worker_pid"].as_i64().unwrap();
        assert_eq!(exe_of(keeper), new, "the keeper runs the new binary");
        assert_eq!(exe_of(worker), new, "the worker runs the new binary");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(rig.sn.daemon_pids(), vec![keeper as i32]);
    let after = check_reader(&rig, before, "across three hot upgrades");
    // A new container starts from the upgraded snapshotter.
    let (_, v) = keeper_state(&rig);
    assert!(v["worker_pid"].is_i64());
    report_fault(
        "hot-upgrade",
        &format!(
            "survived: 3 upgrades of the snapshotter and the image daemon with 16 readers: {} reads, 0 errors, 0 wrong; pauses {:?} ms; longest reader gap {:.0} ms",
            after.reads - before.reads,
            pauses,
            after.max_gap_s * 1e3
        ),
    );
}
