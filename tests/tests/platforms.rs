//! Multi-platform images and the Skiff image as an OCI referrer of the
//! original, with real parts only: Debian's docker-registry (distribution
//! 2.8, which has no referrers API: the fallback tag scheme is what works
//! there), skopeo, real FUSE mounts.
//!
//! The two-platform image is built from the fixture: its linux/amd64
//! manifest as it is, and a linux/arm64/v8 manifest over the same layers
//! with a config of its own (nothing of the arm64 platform is executed).

// Tests and their set-up state what they expect of each step.
#![allow(clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use skiff_registry::media::{OCI_INDEX, OCI_MANIFEST, SKIFF_ARTIFACT_TYPE};
use skiff_registry::referrers::fallback_tag;
use skiff_registry::{Digest, DockerRef, RegistryConfig, RegistryWriter};
use skiff_tests::harness::{
    fixture_layout, import_in_chroot, on_path, remove_all, run, scratch_root, skiff,
};
use skiff_tests::services::{summary_value, Registry, SkiffMount};

fn work_dir(name: &str) -> PathBuf {
    let dir = scratch_root().join(name);
    remove_all(&dir);
    dir
}

fn sha256_hex(bytes: &[u8]) -> String {
    Digest::of(bytes).to_hex()
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = sha256_hex(bytes);
    let path = layout.join("blobs/sha256").join(&hex);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    (format!("sha256:{hex}"), bytes.len())
}

/// An OCI layout at `dir` holding tag `multi`: an index of the fixture
/// (linux/amd64) and a linux/arm64/v8 manifest over the same layers with
/// its own config. Blobs of the fixture are hard-linked (copied across
/// filesystems), never written.
fn two_platform_layout(dir: &Path) -> PathBuf {
    let src = fixture_layout();
    let layout = dir.join("multi-layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("creating the layout");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    for entry in fs::read_dir(src.join("blobs/sha256")).expect("fixture blobs") {
        let entry = entry.expect("fixture blob");
        let to = blobs.join(entry.file_name());
        if fs::hard_link(entry.path(), &to).is_err() {
            fs::copy(entry.path(), &to).expect("copying a fixture blob");
        }
    }
    let index: Value =
        serde_json::from_slice(&fs::read(src.join("index.json")).expect("fixture index"))
            .expect("fixture index JSON");
    let desc = &index["manifests"][0];
    let hex = desc["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .expect("fixture manifest digest");
    let manifest_bytes = fs::read(blobs.join(hex)).expect("fixture manifest");
    let manifest: Value = serde_json::from_slice(&manifest_bytes).expect("manifest JSON");
    let config_hex = manifest["config"]["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .expect("config digest");
    let mut config: Value =
        serde_json::from_slice(&fs::read(blobs.join(config_hex)).expect("config"))
            .expect("config JSON");
    assert_eq!(config["architecture"], "amd64", "the fixture is amd64");
    config["architecture"] = json!("arm64");
    config["variant"] = json!("v8");
    let (arm_config, arm_config_size) =
        put_blob(&layout, &serde_json::to_vec(&config).expect("config"));
    let mut arm = manifest.clone();
    arm["config"]["digest"] = json!(arm_config);
    arm["config"]["size"] = json!(arm_config_size);
    let (arm_digest, arm_size) = put_blob(&layout, &serde_json::to_vec(&arm).expect("manifest"));
    let idx = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": desc["digest"], "size": desc["size"],
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": arm_digest, "size": arm_size,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
             "annotations": {"org.example.note": "same layers, own config"}},
        ],
        "annotations": {"org.opencontainers.image.title": "fixture, two platforms"},
    });
    let (idx_digest, idx_size) = put_blob(&layout, &serde_json::to_vec(&idx).expect("index"));
    let top = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_INDEX, "digest": idx_digest, "size": idx_size,
                       "annotations": {"org.opencontainers.image.ref.name": "multi"}}],
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&top).expect("top"),
    )
    .expect("index");
    layout
}

/// The raw manifest a reference resolves to (no platform choice).
fn raw_manifest(reference: &str) -> Vec<u8> {
    run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(reference))
    .stdout
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Attaches a stand-in signature (an artifact with its own
/// `artifactType`) to `subject` through the fallback tag, as a signing
/// tool does on a registry without the referrers API.
fn attach_signature(registry: &Registry, repo: &str, subject: &Digest, subject_size: u64) {
    let r: DockerRef = format!("{}/{repo}", registry.host())
        .parse()
        .expect("reference");
    let w = RegistryWriter::new(&r, &RegistryConfig::default()).expect("writer");
    let (empty, _) = w.put_blob_bytes(b"{}").expect("empty config");
    let (sig, sig_size) = w.put_blob_bytes(b"not really a signature").expect("sig");
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.oci(), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sig.oci(), "size": sig_size}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.oci(), "size": subject_size},
    });
    let bytes = serde_json::to_vec(&manifest).expect("manifest");
    w.attach_referrer(
        subject,
        &bytes,
        OCI_MANIFEST,
        "application/vnd.example.signature",
    )
    .expect("attaching the signature");
}

#[test]
fn two_platform_index_converts_and_the_original_reference_mounts_lazily() {
    assert!(on_path("skopeo"), "skopeo is missing: run scripts/setup");
    let dir = work_dir("platforms");
    let layout = two_platform_layout(&dir);
    let layout_ref = format!("oci:{}:multi", layout.display());

    // From a layout to a layout: an index of two Skiff images; the arm64
    // platform's layers are the amd64 ones, converted once.
    let out_a = dir.join("out-a");
    let conv = json_of(&skiff([
        "convert",
        "--no-progress",
        "--json",
        &layout_ref,
        &format!("oci:{}:multi", out_a.display()),
    ]));
    assert_eq!(conv["media_type"], OCI_INDEX, "{conv}");
    let platforms = conv["platforms"].as_array().expect("platforms");
    assert_eq!(platforms.len(), 2, "{conv}");
    assert_eq!(platforms[0]["platform"], "linux/amd64");
    assert_eq!(platforms[1]["platform"], "linux/arm64/v8");
    assert_eq!(platforms[0]["reuse"]["layers_reused"], 0, "{conv}");
    assert_eq!(platforms[1]["reuse"]["layers_reused"], 2, "{conv}");
    assert_eq!(
        platforms[0]["bootstrap_layer"], platforms[1]["bootstrap_layer"],
        "same layers, same bootstrap"
    );
    assert_ne!(
        platforms[0]["manifest_digest"],
        platforms[1]["manifest_digest"]
    );
    // The index keeps the platforms and annotations of the source's.
    let index_hex = conv["manifest_digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .expect("index digest");
    let index: Value = serde_json::from_slice(
        &fs::read(out_a.join("blobs/sha256").join(index_hex)).expect("the index blob"),
    )
    .expect("index JSON");
    assert_eq!(index["manifests"][1]["platform"]["variant"], "v8");
    assert_eq!(
        index["manifests"][1]["annotations"]["org.example.note"],
        "same layers, own config"
    );
    assert_eq!(
        index["annotations"]["org.opencontainers.image.title"],
        "fixture, two platforms"
    );
    // Deterministic: a second conversion elsewhere gives the same index.
    let out_b = dir.join("out-b");
    let again = json_of(&skiff([
        "convert",
        "--no-progress",
        "--json",
        &layout_ref,
        &format!("oci:{}:multi", out_b.display()),
    ]));
    assert_eq!(again["manifest_digest"], conv["manifest_digest"]);
    // The tools pick the host's platform, or --platform.
    let arm = json_of(&skiff([
        "inspect",
        "--json",
        "--platform",
        "linux/arm64",
        &format!("oci:{}:multi", out_a.display()),
    ]));
    assert_eq!(arm["manifest_digest"], platforms[1]["manifest_digest"]);
    let host = json_of(&skiff([
        "inspect",
        "--json",
        &format!("oci:{}:multi", out_a.display()),
    ]));
    assert_eq!(host["manifest_digest"], platforms[0]["manifest_digest"]);
    let only_arm = json_of(&skiff([
        "convert",
        "--no-progress",
        "--json",
        "--platform",
        "linux/arm64",
        &layout_ref,
        &format!("oci:{}:arm", out_a.display()),
    ]));
    assert_eq!(only_arm["platforms"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        only_arm["platforms"][0]["manifest_digest"],
        platforms[1]["manifest_digest"]
    );

    // The same image in a registry without referrers API, signed.
    let registry = Registry::start(&dir.join("registry"));
    let original = format!("docker://{}/src/app:1", registry.host());
    run(Command::new("skopeo")
        .args(["copy", "-q", "--all", "--dest-tls-verify=false"])
        .arg(&layout_ref)
        .arg(&original));
    let index_before = raw_manifest(&original);
    let src_index: Value = serde_json::from_slice(&index_before).expect("index JSON");
    let amd64: Digest = src_index["manifests"][0]["digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .expect("amd64 digest");
    let amd64_size = src_index["manifests"][0]["size"].as_u64().expect("size");
    attach_signature(&registry, "src/app", &amd64, amd64_size);
    let amd64_before = raw_manifest(&format!(
        "docker://{}/src/app@{}",
        registry.host(),
        amd64.oci()
    ));

    // CI's command: convert to another repository; each Skiff manifest is
    // attached to its original as a referrer.
    let skiff_ref = format!("docker://{}/dst/app:1-skiff", registry.host());
    let conv = json_of(&skiff([
        "convert",
        "--no-progress",
        "--json",
        &original,
        &skiff_ref,
    ]));
    assert_eq!(conv["media_type"], OCI_INDEX, "{conv}");
    let referrers = conv["referrers"].as_array().expect("referrers");
    assert_eq!(referrers.len(), 2, "{conv}");
    for r in referrers {
        assert_eq!(r["via"], "fallback-tag", "{conv}");
    }
    assert_eq!(referrers[0]["subject"], amd64.to_string());
    let skiff_amd64 = conv["platforms"][0]["manifest_digest"].clone();
    let bytes_out = conv["platforms"][0]["stats"]["bytes_out"]
        .as_u64()
        .expect("bytes_out");

    // The original and its signature are untouched; the fallback index
    // lists both the signature and the Skiff image.
    assert_eq!(
        raw_manifest(&original),
        index_before,
        "the original index changed"
    );
    assert_eq!(
        raw_manifest(&format!(
            "docker://{}/src/app@{}",
            registry.host(),
            amd64.oci()
        )),
        amd64_before
    );
    let fallback: Value = serde_json::from_slice(&raw_manifest(&format!(
        "docker://{}/src/app:{}",
        registry.host(),
        fallback_tag(&amd64)
    )))
    .expect("fallback index JSON");
    let types: Vec<&str> = fallback["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter_map(|m| m["artifactType"].as_str())
        .collect();
    assert_eq!(
        types,
        ["application/vnd.example.signature", SKIFF_ARTIFACT_TYPE],
        "{fallback}"
    );

    // A second conversion replaces the Skiff entry, keeps the signature.
    skiff(["convert", "--no-progress", &original, &skiff_ref]);
    let fallback2: Value = serde_json::from_slice(&raw_manifest(&format!(
        "docker://{}/src/app:{}",
        registry.host(),
        fallback_tag(&amd64)
    )))
    .expect("fallback index JSON");
    assert_eq!(fallback2["manifests"], fallback["manifests"]);

    // inspect of the original lists its referrers and names Skiff's.
    let listed = skiff(["inspect", &original]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("application/vnd.example.signature"), "{text}");
    let skiff_line = text
        .lines()
        .find(|l| l.contains("Skiff mounts this one"))
        .unwrap_or_else(|| panic!("no Skiff referrer named:\n{text}"));
    assert!(
        skiff_line.contains(skiff_amd64.as_str().unwrap_or("?")),
        "{text}"
    );
    let arm_listed = json_of(&skiff([
        "inspect",
        "--json",
        "--platform",
        "linux/arm64",
        &original,
    ]));
    assert_eq!(
        arm_listed["manifest_digest"],
        conv["platforms"][1]["manifest_digest"]
    );
    skiff(["check", &original]);

    // The ORIGINAL reference mounts lazily and runs the workload.
    let mut mount = SkiffMount::start(&original, &dir.join("mount"), &[]);
    import_in_chroot(&mount.mnt);
    let (status, summary_line) = mount.terminate();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let fetched = summary_value(&summary_line, "bytes_fetched").expect("exit summary");
    println!(
        "original reference: python import fetched {fetched} of {bytes_out} bytes ({:.1}%)",
        fetched as f64 * 100.0 / bytes_out as f64
    );
    // The import reads about 30% of the image; the fetch window brings
    // some neighbours along when the round trips they save pay for them
    // (fusefs window.rs). Under half: lazy; a mount that fetched all is 100%.
    assert!(
        fetched > 0 && fetched * 2 < bytes_out,
        "{summary_line} (image {bytes_out} B)"
    );
}

#[test]
fn an_original_without_skiff_referrer_is_refused_clearly_and_no_referrer_attaches_none() {
    assert!(on_path("skopeo"), "skopeo is missing: run scripts/setup");
    let dir = work_dir("platforms-none");
    let registry = Registry::start(&dir.join("registry"));
    let original = format!("docker://{}/src/plain:1", registry.host());
    run(Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(skiff_tests::harness::fixture_image())
        .arg(&original));
    let digest = Digest::of(&raw_manifest(&original));
    skiff([
        "convert",
        "--no-progress",
        "--no-referrer",
        &original,
        &format!("docker://{}/src/plain:1-skiff", registry.host()),
    ]);
    // No fallback tag was written.
    let tag_lookup = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!(
            "docker://{}/src/plain:{}",
            registry.host(),
            fallback_tag(&digest)
        ))
        .output()
        .expect("skopeo");
    assert!(!tag_lookup.status.success(), "a fallback tag exists");
    // inspect says so, mount refuses with a clear message.
    let listed = skiff(["inspect", &original]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("Skiff would mount: none"), "{text}");
    let failed = SkiffMount::try_start_env(&original, &dir.join("mount"), &[], &[]);
    let Err(f) = failed else {
        panic!("an original without Skiff referrer mounted");
    };
    let log = fs::read_to_string(&f.log_path).unwrap_or_default();
    assert!(
        log.contains("not a Skiff image and has no Skiff referrer"),
        "{log}"
    );
}

#[test]
fn a_docker_manifest_list_converts_every_platform() {
    assert!(on_path("skopeo"), "skopeo is missing: run scripts/setup");
    let dir = work_dir("platforms-list");
    let layout = two_platform_layout(&dir);
    let registry = Registry::start(&dir.join("registry"));
    let list = format!("docker://{}/src/list:1", registry.host());
    run(Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--all",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:multi", layout.display()))
        .arg(&list));
    let raw: Value = serde_json::from_slice(&raw_manifest(&list)).expect("list JSON");
    assert_eq!(
        raw["mediaType"],
        skiff_registry::media::DOCKER_MANIFEST_LIST,
        "skopeo did not write a manifest list"
    );
    let out = dir.join("out");
    let conv = json_of(&skiff([
        "convert",
        "--no-progress",
        "--json",
        &list,
        &format!("oci:{}:list", out.display()),
    ]));
    assert_eq!(conv["media_type"], OCI_INDEX, "{conv}");
    let names: Vec<&str> = conv["platforms"]
        .as_array()
        .expect("platforms")
        .iter()
        .filter_map(|p| p["platform"].as_str())
        .collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64/v8"], "{conv}");
    assert_eq!(conv["platforms"][1]["reuse"]["layers_reused"], 2, "{conv}");
    // A layout destination: no referrers.
    assert_eq!(conv["referrers"].as_array().map(Vec::len), Some(0));
    skiff([
        "check",
        "--platform",
        "linux/arm64",
        &format!("oci:{}:list", out.display()),
    ]);
}
