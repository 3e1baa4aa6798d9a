//! End-to-end tests with real containerd (Debian's 1.6), runc, a registry
//! on 127.0.0.1 and `skiff snapshotter` as containerd's proxy plugin.
//!
//! - A plain OCI image (imported with `ctr images import`, no labels) is
//!   unpacked by containerd into the snapshotter's overlay snapshots and
//!   runs; a container's writes do not leak into the image.
//! - A Skiff image pulled with `ctr-remote image rpull` is mounted lazily:
//!   the pull fetches manifest, config and bootstrap only, and containers
//!   run from it.
//! - Restarting the snapshotter while a container runs: it keeps reading.
//!
//! Needs root, containerd, runc, ctr-remote (stargz-snapshotter), skopeo,
//! docker-registry and the `skiff` binary (`SKIFF_BIN`); a missing one fails
//! the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest as _, Sha256};

const PLAIN_IMAGE: &str = "skiff.test/plain:1";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An OCI archive of a small two-layer image: the fixture's Debian base
/// layer and a layer of our own (`/skiff-layer2.txt`), named
/// [`PLAIN_IMAGE`].
fn plain_image_archive(dir: &Path) -> PathBuf {
    let fixture = fixture_layout();
    let manifest = manifest_of(&fixture, "python");
    let base = manifest["layers"][0].clone();
    let mut config = read_json(&blob_path(
        &fixture,
        manifest["config"]["digest"].as_str().unwrap(),
    ));

    let mut layer2 = tar::Builder::new(Vec::new());
    let body = b"second layer\n";
    let mut h = tar::Header::new_ustar();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    layer2
        .append_data(&mut h, "skiff-layer2.txt", &body[..])
        .unwrap();
    let layer2 = layer2.into_inner().unwrap();
    let layer2_digest = format!("sha256:{}", sha256_hex(&layer2));

    let diff0 = config["rootfs"]["diff_ids"][0].clone();
    config["rootfs"]["diff_ids"] = serde_json::json!([diff0, layer2_digest]);
    config.as_object_mut().unwrap().remove("history");
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [
            base,
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer2_digest, "size": layer2.len()},
        ],
    }))
    .unwrap();
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": PLAIN_IMAGE, "org.opencontainers.image.ref.name": "1"},
        }],
    }))
    .unwrap();

    let path = dir.join("plain.tar");
    let mut ar = tar::Builder::new(fs::File::create(&path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        ar.append_data(&mut h, name, bytes).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (digest, bytes) in [
        (&manifest_digest, &manifest),
        (&config_digest, &config),
        (&layer2_digest, &layer2),
    ] {
        add(
            &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
            bytes,
        );
    }
    let base_digest = base["digest"].as_str().unwrap();
    ar.append_path_with_name(
        blob_path(&fixture, base_digest),
        format!("blobs/sha256/{}", base_digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    ar.into_inner().unwrap().flush().unwrap();
    path
}

/// `ctr images import` of the plain image through the snapshotter.
fn import_plain(rig: &Rig) {
    let archive = plain_image_archive(rig.path());
    let mut c = rig.ctd.ctr();
    c.args(["images", "import", "--snapshotter", "skiff"])
        .arg(&archive);
    check_for(&mut c, Duration::from_secs(300));
}

#[test]
fn plain_oci_image_runs_through_the_snapshotter() {
    let rig = Rig::new("plain");
    import_plain(&rig);
    let snaps = rig.snapshots();
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "two committed layer snapshots expected:\n{snaps}"
    );
    let out = rig.ctd.run_container(
        PLAIN_IMAGE,
        "plain-1",
        &[
            "sh",
            "-c",
            "cat /etc/os-release; cat /skiff-layer2.txt; echo leaked > /leak.txt; cat /leak.txt",
        ],
    );
    assert!(out.contains("Debian GNU/Linux 12"), "os-release: {out}");
    assert!(
        out.contains("second layer"),
        "the upper layer is missing: {out}"
    );
    assert!(out.contains("leaked"), "the container cannot write: {out}");
    let out = rig.ctd.run_container(
        PLAIN_IMAGE,
        "plain-2",
        &["sh", "-c", "test -e /leak.txt && echo LEAK || echo clean"],
    );
    assert_eq!(
        out.trim(),
        "clean",
        "a container's write leaked into the image"
    );
    // Only the image's layers are left: the containers' snapshots are gone.
    let snaps = rig.snapshots();
    assert_eq!(snaps.lines().count(), 3, "{snaps}");
}

#[test]
fn skiff_image_is_pulled_lazily_and_runs() {
    need("docker-registry", "docker-registry");
    let rig = Rig::new("skiff");
    let registry = Registry::start(rig.path());
    let (reference, layout) = push_skiff_image(rig.path(), &registry);
    rpull_skiff(&rig, &registry, &reference, &layout);
    assert_eq!(rig.sn.daemon_pids().len(), 1, "one image mount expected");

    let out = rig.ctd.run_container(
        &reference,
        "skiff-1",
        &[
            "sh",
            "-c",
            "cat /etc/os-release; echo leaked > /leak.txt; cat /leak.txt",
        ],
    );
    assert!(out.contains("Debian GNU/Linux 12"), "os-release: {out}");
    assert!(out.contains("leaked"), "{out}");
    let out = rig.ctd.run_container(
        &reference,
        "skiff-2",
        &[
            "python3",
            "-c",
            "import numpy, pandas, os; print('ok', os.path.exists('/leak.txt'))",
        ],
    );
    assert_eq!(
        out.trim(),
        "ok False",
        "python import or leak check failed: {out}"
    );
    for mnt in rig.sn.mount_dirs() {
        assert!(
            !mnt.join("leak.txt").exists(),
            "a write reached the image mount"
        );
        // The daemon's metrics socket counts what the containers fetched.
        let id = mnt
            .parent()
            .and_then(|p| p.file_name())
            .unwrap()
            .to_string_lossy();
        let short: String = id.trim_start_matches("sha256-").chars().take(16).collect();
        let sock = rig.sn.root.join("metrics").join(format!("{short}.sock"));
        let text = scrape(&sock);
        let fetched = metric(&text, "skiff_fetch_bytes_total");
        assert!(
            fetched > 0.0,
            "nothing fetched according to {}:\n{text}",
            sock.display()
        );
    }
    // ... into the disk cache the snapshotter's config names.
    let cached = fs::read_dir(rig.sn.root.with_extension("cache").join("chunks"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(cached > 0, "no chunk in the configured disk cache");

    // Removing the image releases its mount.
    let pids = rig.sn.daemon_pids();
    rig.ctd.clean_namespace();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|p| daemon_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "the image mount daemon still runs 30 s after the image was removed:\n{}",
            rig.snapshots()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a container reading files in a loop, restarts the snapshotter,
/// and checks that the container kept reading and that new containers
/// still start.
fn restart_while_running(rig: &mut Rig, image: &str, files: &str) {
    restart_while_running_with(rig, image, files, Snapshotter::restart);
}

fn restart_while_running_with(
    rig: &mut Rig,
    image: &str,
    files: &str,
    restart: impl FnOnce(&mut Snapshotter),
) {
    let script = format!(
        "i=0; while true; do cat {files} > /dev/null && i=$((i+1)) && echo $i > /count.tmp && mv /count.tmp /count; sleep 0.05; done"
    );
    rig.ctd
        .start_container(image, "reader", &["sh", "-c", &script]);
    let count = |rig: &Rig, n: u32| -> u64 {
        let out = rig
            .ctd
            .exec("reader", &format!("count-{n}"), &["cat", "/count"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while count(rig, n) == 0 {
        n += 1;
        assert!(Instant::now() < deadline, "the reader never read its files");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pids = rig.sn.daemon_pids();
    let before = count(rig, 1000);
    restart(&mut rig.sn);
    rig.ctd.wait_for_plugin(&rig.sn.log);
    std::thread::sleep(Duration::from_secs(1));
    let after = count(rig, 1001);
    assert!(
        after > before,
        "the container stopped reading across the restart ({before} -> {after})"
    );
    assert_eq!(
        rig.sn.daemon_pids(),
        pids,
        "the image mount daemons changed"
    );
    for p in &pids {
        assert!(daemon_alive(*p), "image mount daemon {p} died");
    }
    let out = rig
        .ctd
        .exec("reader", "cat-after", &["cat", "/etc/os-release"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Debian"),
        "reading after the restart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rig
        .ctd
        .run_container(image, "after-restart", &["cat", "/etc/os-release"]);
    assert!(out.contains("Debian"), "{out}");
}

#[test]
fn restart_with_a_plain_image_keeps_the_container_reading() {
    let mut rig = Rig::new("restart-plain");
    import_plain(&rig);
    restart_while_running(&mut rig, PLAIN_IMAGE, "/etc/os-release /skiff-layer2.txt");
}

#[test]
fn restart_with_a_skiff_image_keeps_the_container_reading() {
    need("docker-registry", "docker-registry");
    let mut rig = Rig::new("restart-skiff");
    let registry = Registry::start(rig.path());
    let (reference, layout) = push_skiff_image(rig.path(), &registry);
    rpull_skiff(&rig, &registry, &reference, &layout);
    restart_while_running(&mut rig, &reference, "/etc/os-release /usr/bin/python3");
    // Files never read before the restart still load (fetched afterwards).
    let out = rig.ctd.exec(
        "reader",
        "python-after",
        &["python3", "-c", "import pandas; print('ok')"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report_fault(
        "snapshotter-restart",
        "survived: the container kept reading across a SIGTERM restart; python imports files fetched afterwards",
    );
}

#[test]
fn snapshotter_killed_9_with_a_skiff_image_keeps_the_container_reading() {
    need("docker-registry", "docker-registry");
    let mut rig = Rig::new("kill9-skiff");
    let registry = Registry::start(rig.path());
    let (reference, layout) = push_skiff_image(rig.path(), &registry);
    rpull_skiff(&rig, &registry, &reference, &layout);
    restart_while_running_with(
        &mut rig,
        &reference,
        "/etc/os-release /usr/bin/python3",
        Snapshotter::kill9_restart,
    );
    let out = rig.ctd.exec(
        "reader",
        "python-after-kill",
        &["python3", "-c", "import numpy; print('ok')"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report_fault(
        "snapshotter-kill-9",
        "survived: the container kept reading across kill -9 and restart; image mounts kept; new containers start",
    );
}

/// The sha256 of `path` inside container `id` (through `ctr tasks exec`).
fn sha_in_container(rig: &Rig, id: &str, exec_id: &str, path: &str) -> String {
    let out = rig.ctd.exec(id, exec_id, &["sha256sum", path]);
    assert!(
        out.status.success(),
        "sha256sum {path} in {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The sha256 of `path` in the fixture's reference tree.
fn reference_sha(path: &str) -> String {
    let p = skiff_tests::harness::umoci_rootfs().join(path.trim_start_matches('/'));
    sha256_hex(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

#[test]
fn containerd_restart_keeps_a_lazy_container_running() {
    need("docker-registry", "docker-registry");
    let mut rig = Rig::new("ctd-restart");
    let registry = Registry::start(rig.path());
    let (reference, layout) = push_skiff_image(rig.path(), &registry);
    rpull_skiff(&rig, &registry, &reference, &layout);
    rig.ctd
        .start_container(&reference, "long", &["sleep", "3600"]);
    let pids = rig.sn.daemon_pids();
    rig.ctd.restart();
    rig.ctd.wait_for_plugin(&rig.sn.log);
    // The container lives on, and reads files never read before from the
    // lazy mount, byte for byte.
    for (i, f) in [
        "/usr/bin/python3.11",
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    ]
    .iter()
    .enumerate()
    {
        let got = sha_in_container(&rig, "long", &format!("sha-{i}"), f);
        assert_eq!(got, reference_sha(f), "{f} after the containerd restart");
    }
    assert_eq!(rig.sn.daemon_pids(), pids, "the image mounts changed");
    let out = rig.ctd.run_container(
        &reference,
        "after-ctd-restart",
        &["python3", "-c", "import pandas; print('ok')"],
    );
    assert_eq!(out.trim(), "ok", "{out}");
    report_fault(
        "containerd-restart",
        "survived: the running container read files fetched lazily after the restart, sha256 equal to the reference; new containers start",
    );
}

#[test]
fn image_removed_while_a_container_runs() {
    need("docker-registry", "docker-registry");
    let rig = Rig::new("image-rm");
    let registry = Registry::start(rig.path());
    let (reference, layout) = push_skiff_image(rig.path(), &registry);
    rpull_skiff(&rig, &registry, &reference, &layout);
    rig.ctd
        .start_container(&reference, "running", &["sleep", "3600"]);
    let pids = rig.sn.daemon_pids();
    assert_eq!(pids.len(), 1, "one image mount expected");
    let mut c = rig.ctd.ctr();
    c.args(["images", "rm", "--sync", &reference]);
    check_for(&mut c, Duration::from_secs(60));
    // The running container still reads correct data, also of files it
    // never read before (fetched lazily after the image is gone).
    for (i, f) in [
        "/usr/bin/python3.11",
        "/usr/local/lib/python3.11/dist-packages/numpy/__init__.py",
        "/etc/os-release",
    ]
    .iter()
    .enumerate()
    {
        let got = sha_in_container(&rig, "running", &format!("rm-{i}"), f);
        assert_eq!(got, reference_sha(f), "{f} after the image was removed");
    }
    assert!(
        daemon_alive(pids[0]),
        "the image mount died with a container on it"
    );
    // The container goes: the mount is released.
    rig.ctd.clean_namespace();
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon_alive(pids[0]) {
        assert!(
            Instant::now() < deadline,
            "the image mount still runs after its last container went:\n{}",
            rig.snapshots()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    report_fault(
        "image-removed-while-running",
        "survived: the container read 3 files correctly after `ctr images rm`; the mount was released when the container went",
    );
}
