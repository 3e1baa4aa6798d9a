//! A test rig (containerd + the snapshotter in a test directory) and the
//! Skiff fixture image pushed to a registry and pulled lazily through it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::*;

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The fixture's manifest in `layout` (tag `python`).
pub fn manifest_of(layout: &Path, tag: &str) -> serde_json::Value {
    let index = read_json(&layout.join("index.json"));
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()))
        .clone();
    read_json(&blob_path(layout, desc["digest"].as_str().unwrap()))
}

/// The parts of one test: its directory, the snapshotter, containerd
/// (dropped in reverse: containerd cleans its namespace while the
/// snapshotter still serves).
pub struct Rig {
    pub ctd: Containerd,
    pub sn: Snapshotter,
    pub dir: TestDir,
}

impl Rig {
    pub fn new(name: &str) -> Rig {
        need_root();
        let dir = TestDir::new(name);
        let sn = Snapshotter::start(&dir.path.join("sn"), &dir.path.join("skiff.sock"));
        let ctd = Containerd::start(&dir.path, &format!("skiff-test-{name}"));
        assert_eq!(ctd.plugin_socket, sn.socket);
        ctd.wait_for_plugin(&sn.log);
        Rig { ctd, sn, dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    pub fn snapshots(&self) -> String {
        let mut c = self.ctd.ctr();
        c.args(["snapshots", "--snapshotter", "skiff", "ls"]);
        check_for(&mut c, Duration::from_secs(30))
    }
}

/// Converts the fixture into a Skiff image (an OCI layout in `dir`) and
/// pushes it to `registry` as `skiff/python:1`; returns the reference and
/// the layout.
pub fn push_skiff_image(dir: &Path, registry: &Registry) -> (String, PathBuf) {
    need("skopeo", "skopeo");
    let layout = dir.join("skiff-image");
    skiff_tests::harness::skiff([
        "convert".to_owned(),
        fixture_image(),
        format!("oci:{}:python", layout.display()),
    ]);
    let reference = format!("{}/skiff/python:1", registry.host());
    let mut c = Command::new("skopeo");
    c.args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:python", layout.display()))
        .arg(format!("docker://{reference}"));
    check_for(&mut c, Duration::from_secs(300));
    (reference, layout)
}

/// `ctr-remote image rpull --plain-http --snapshotter skiff REFERENCE` on
/// the rig's containerd.
pub fn rpull_command(rig: &Rig, reference: &str) -> Command {
    let mut c = Command::new("ctr-remote");
    c.arg("--address")
        .arg(&rig.ctd.socket)
        .args(["--namespace", &rig.ctd.namespace])
        .args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "skiff",
            reference,
        ]);
    c
}

/// `ctr-remote image rpull` of a Skiff image: fetches manifest, config and
/// bootstrap only; returns the digests of the data blobs.
pub fn rpull_skiff(rig: &Rig, registry: &Registry, reference: &str, layout: &Path) -> Vec<String> {
    need("ctr-remote", "stargz-snapshotter");
    let manifest = manifest_of(layout, "python");
    let layers = manifest["layers"].as_array().unwrap();
    let data_blobs: Vec<String> = layers
        .iter()
        .filter(|l| l["annotations"]["dev.skiff.bootstrap"] != "true")
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    let media_types: Vec<&str> = layers
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    let mark = LogMark::new(&registry.log);
    let mut c = rpull_command(rig, reference);
    let out = run_for(&mut c, Duration::from_secs(300));
    let fetched = blobs_fetched(&mark.since());
    let data_fetched: Vec<&String> = fetched.iter().filter(|d| data_blobs.contains(d)).collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let not_layers: Vec<&&str> = media_types
        .iter()
        .filter(|m| !m.starts_with("application/vnd.oci.image.layer."))
        .collect();
    assert!(
        not_layers.is_empty() && data_fetched.is_empty() && out.status.success(),
        "ctr-remote rpull of a Skiff image must fetch only manifest, config and bootstrap and succeed.\n\
         Layer media types containerd does not treat as layers (it fetches them whole as \
         plain blobs and then fails to unpack them; they must start with \
         'application/vnd.oci.image.layer.' for containerd 1.6's images.IsLayerType): {not_layers:?}\n\
         data blobs fetched: {data_fetched:?}\nexit: {}\n--- ctr-remote stderr ---\n{}\n--- snapshotter ---\n{}",
        out.status,
        stderr.lines().rev().take(15).collect::<Vec<_>>().join("\n"),
        tail_of(&rig.sn.log, 20)
    );
    data_blobs
}
