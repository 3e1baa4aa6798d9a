//! Conversion at CI scale, with real parts only (Debian's docker-registry on
//! 127.0.0.1, real FUSE mounts, umoci as the reference extractor):
//!
//! - a second image on the fixture's base layer (plus an application layer
//!   made of real Debian packages' files) reuses the converted base layer
//!   from each place a record can be found (chunk dictionary, the target
//!   repository's record tag, the local cache into a layout and into
//!   another repository, which cross-mounts the blob): no chunking or compression
//!   of the base layer, only the new layer's data pushed, output
//!   byte-identical to a fresh conversion, both images mount and match;
//! - a second version of the fixture with one package removed, converted
//!   with the first as chunk dictionary: the pair costs at most 1.2x one
//!   image in registry storage; `skiff check` passes on the registry
//!   images and a `skopeo copy` of the image mounts from the copy.

// Tests state what they expect of each step.
#![allow(clippy::expect_used)]

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use skiff_tests::harness::{
    fixture_image, fixture_layout, on_path, remove_all, run, scratch_root, skiff, umoci_rootfs,
};
use skiff_tests::services::{Registry, SkiffMount};
use skiff_tests::treedump::{compare_named, dump, DumpOptions, MtimeMode};

fn work_dir(name: &str) -> PathBuf {
    let dir = scratch_root().join(name);
    remove_all(&dir);
    fs::create_dir_all(&dir).expect("create the work directory");
    dir
}

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    layout.join("blobs").join("sha256").join(hex)
}

/// The fixture's manifest and config.
fn fixture_manifest() -> (Value, Value) {
    let layout = fixture_layout();
    let index = read_json(&layout.join("index.json"));
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("fixture index")
        .to_string();
    let manifest = read_json(&blob_path(&layout, &digest));
    let config = read_json(&blob_path(
        &layout,
        manifest["config"]["digest"].as_str().expect("config"),
    ));
    (manifest, config)
}

fn sha256_file(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    format!(
        "sha256:{}",
        text.split_whitespace().next().expect("sha256sum output")
    )
}

/// A layer for [`write_image`]: the compressed blob and its diff ID.
struct Layer {
    blob: PathBuf,
    diff_id: String,
}

/// Writes an OCI layout at `dir` with one image `tag`: the fixture's config
/// (runtime settings kept) over `layers` (gzip tars).
fn write_image(dir: &Path, tag: &str, layers: &[Layer]) {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).expect("layout blobs");
    let put = |bytes: &[u8]| -> (String, u64) {
        let path = dir.join("tmp-blob");
        fs::write(&path, bytes).expect("write blob");
        let d = sha256_file(&path);
        fs::rename(&path, blob_path(dir, &d)).expect("rename blob");
        (d, bytes.len() as u64)
    };
    let mut descs = Vec::new();
    for l in layers {
        let d = sha256_file(&l.blob);
        let size = fs::metadata(&l.blob).expect("layer").len();
        let dest = blob_path(dir, &d);
        if !dest.exists() {
            fs::copy(&l.blob, &dest).expect("copy layer");
        }
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": size,
        }));
    }
    let (_, mut config) = fixture_manifest();
    config["rootfs"] = json!({
        "type": "layers",
        "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
    });
    config["history"] = Value::Array(
        layers
            .iter()
            .map(|_| json!({"created_by": "layer_reuse test"}))
            .collect(),
    );
    let (cd, cs) = put(&serde_json::to_vec(&config).expect("config"));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).expect("manifest"));
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index"),
    )
    .expect("index.json");
}

/// The fixture's layers: (blob path, diff ID).
fn fixture_layers() -> Vec<Layer> {
    let (manifest, config) = fixture_manifest();
    let layout = fixture_layout();
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .zip(config["rootfs"]["diff_ids"].as_array().expect("diff_ids"))
        .map(|(l, d)| Layer {
            blob: blob_path(&layout, l["digest"].as_str().expect("digest")),
            diff_id: d.as_str().expect("diff id").to_string(),
        })
        .collect()
}

/// Member names of a gzip tar, as written in it.
fn tar_members(blob: &Path) -> Vec<String> {
    let out = run(Command::new("tar").arg("-tzf").arg(blob));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The members of `blob` that belong to Debian packages `packages`
/// (their dpkg file lists, read from the layer itself, and their
/// `/var/lib/dpkg/info` files); directories only with `dirs`.
fn package_members(blob: &Path, packages: &[&str], dirs: bool, work: &Path) -> Vec<String> {
    let members = tar_members(blob);
    let lists = work.join("dpkg-lists");
    remove_all(&lists);
    fs::create_dir_all(&lists).expect("lists dir");
    run(Command::new("tar")
        .arg("-xzf")
        .arg(blob)
        .arg("-C")
        .arg(&lists)
        .arg("--wildcards")
        .arg("var/lib/dpkg/info/*.list"));
    let mut wanted: HashSet<String> = HashSet::new();
    for p in packages {
        let info = lists.join("var/lib/dpkg/info");
        let list = [format!("{p}.list"), format!("{p}:amd64.list")]
            .into_iter()
            .map(|n| info.join(n))
            .find(|f| f.is_file())
            .unwrap_or_else(|| panic!("package {p} is not in the layer"));
        for line in fs::read_to_string(&list).expect("dpkg list").lines() {
            let name = line.trim_start_matches('/');
            if !name.is_empty() && name != "." {
                wanted.insert(name.to_string());
            }
        }
        let prefix = format!("var/lib/dpkg/info/{p}");
        for m in &members {
            if m.starts_with(&prefix) {
                wanted.insert(m.clone());
            }
        }
    }
    remove_all(&lists);
    members
        .into_iter()
        .filter(|m| wanted.contains(m.trim_end_matches('/')))
        .filter(|m| dirs || !m.ends_with('/'))
        .collect()
}

fn gzip_layer(tar: &Path) -> Layer {
    let diff_id = sha256_file(tar);
    let gz = tar.with_extension("tar.gz");
    let out = run(Command::new("pigz").arg("-n").arg("-c").arg(tar));
    fs::write(&gz, &out.stdout).expect("write the gzip layer");
    fs::remove_file(tar).expect("remove the tar");
    Layer { blob: gz, diff_id }
}

/// An application layer of real Debian packages' files, taken (with their
/// owners, modes and times) from the fixture's second layer.
fn app_layer(work: &Path, packages: &[&str]) -> Layer {
    let l2 = &fixture_layers()[1];
    let names = package_members(&l2.blob, packages, true, work);
    assert!(names.len() > 100, "only {} files", names.len());
    let list = work.join("app-members");
    fs::write(&list, names.join("\n") + "\n").expect("member list");
    let x = work.join("app-x");
    remove_all(&x);
    fs::create_dir_all(&x).expect("extract dir");
    run(Command::new("tar")
        .args(["--no-recursion", "--no-wildcards", "-xzf"])
        .arg(&l2.blob)
        .arg("-C")
        .arg(&x)
        .arg("-T")
        .arg(&list));
    let tar = work.join("app.tar");
    run(Command::new("tar")
        .args(["--sort=name", "--numeric-owner", "--no-recursion", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&x)
        .arg("-T")
        .arg(&list));
    remove_all(&x);
    gzip_layer(&tar)
}

/// The fixture's second layer without the files of Debian package `pkg`.
fn layer_without(work: &Path, pkg: &str) -> Layer {
    let l2 = &fixture_layers()[1];
    let names = package_members(&l2.blob, &[pkg], false, work);
    assert!(names.len() > 10, "only {} files of {pkg}", names.len());
    let list = work.join("removed-members");
    fs::write(&list, names.join("\n") + "\n").expect("member list");
    let tar = work.join("v2-app.tar");
    // Python's tarfile keeps every entry's PAX records (times, xattrs) as
    // they are; GNU tar --delete mangles PAX entries of this layer.
    assert!(on_path("python3"), "python3 is missing: run scripts/setup");
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, tarfile\n\
             drop = set(open(sys.argv[3]).read().split('\\n'))\n\
             with tarfile.open(sys.argv[1], 'r:gz') as src, \
             tarfile.open(sys.argv[2], 'w', format=tarfile.PAX_FORMAT) as dst:\n\
             \x20   for m in src:\n\
             \x20       if m.name in drop: continue\n\
             \x20       dst.addfile(m, src.extractfile(m) if m.isreg() else None)\n",
        )
        .arg(&l2.blob)
        .arg(&tar)
        .arg(&list));
    gzip_layer(&tar)
}

/// `umoci unpack` of `layout:tag`: the reference root filesystem.
fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    assert!(on_path("umoci"), "umoci is missing: run scripts/setup");
    remove_all(bundle);
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle));
    bundle.join("rootfs")
}

fn convert(args: &[&str]) -> Value {
    let mut all = vec!["convert", "--no-progress", "--json"];
    all.extend_from_slice(args);
    let out = skiff(&all);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "skiff convert --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn mount_matches(image: &str, reference: &Path, dir: &Path, what: &str) {
    let mount = SkiffMount::start(image, dir, &[]);
    let opts = DumpOptions::all().with_mtime(MtimeMode::Exact);
    let want = dump(reference, &opts).expect("dump the reference");
    let got = dump(&mount.mnt, &opts).expect("dump the mount");
    if let Err(report) = compare_named(&want, "umoci", &got, what) {
        panic!("{what} differs from umoci unpack:\n{report}");
    }
    eprintln!("{what}: {} paths match umoci unpack", got.len());
}

fn reuse_of(summary: &Value, layer: usize) -> Option<String> {
    summary["reuse"]["layers"][layer]["reused_from"]
        .as_str()
        .map(str::to_string)
}

fn u(summary: &Value, key: &str) -> u64 {
    summary["reuse"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("reuse.{key} missing in {summary}"))
}

#[test]
fn a_second_image_on_the_same_base_reuses_the_converted_base_layer() {
    assert!(on_path("skopeo"), "skopeo is missing: run scripts/setup");
    let dir = work_dir("layer-reuse-base");
    let registry = Registry::start(&dir.join("registry"));
    let reg = registry.host();
    let cache = dir.join("layer-cache");
    let cache_arg = cache.display().to_string();

    // Image B: the fixture's base layer + an application layer of openssl,
    // ca-certificates and libssl3's files.
    let app = app_layer(&dir, &["openssl", "ca-certificates", "libssl3"]);
    let base = fixture_layers().remove(0);
    let layout_b = dir.join("image-b");
    write_image(&layout_b, "app", &[base, app]);
    let src_b = format!("oci:{}:app", layout_b.display());

    // The fixture, converted first (keeping its layers in the cache).
    let first = format!("docker://{reg}/skiff/python:1");
    let s1 = convert(&["--cache-dir", &cache_arg, &fixture_image(), &first]);
    assert_eq!(u(&s1, "layers_converted"), 2, "{s1}");
    let base_blob = s1["reuse"]["layers"][0]["blob"]
        .as_str()
        .expect("the base layer has a blob")
        .to_string();

    // The reference: B converted afresh (no reuse of any kind).
    let fresh_dir = dir.join("fresh");
    let fresh = convert(&[
        "--no-layer-reuse",
        &src_b,
        &format!("oci:{}:app", fresh_dir.display()),
    ]);
    assert_eq!(u(&fresh, "layers_converted"), 2);
    let fresh_app_blob = fresh["reuse"]["layers"][1]["blob"]
        .as_str()
        .expect("the app layer has a blob")
        .to_string();
    let app_blob_size = fs::metadata(blob_path(&fresh_dir, &fresh_app_blob))
        .expect("app blob")
        .len();
    let fresh_dict = convert(&[
        "--no-layer-reuse",
        "--chunk-dict",
        &first,
        &src_b,
        &format!("oci:{}:app-dict", fresh_dir.display()),
    ]);

    // (1) Another repository, the first image as chunk dictionary: the base
    // layer comes from the dictionary's record, its blob is cross-mounted.
    let b1 = format!("docker://{reg}/skiff/app:1");
    let s = convert(&["--chunk-dict", &first, &src_b, &b1]);
    eprintln!("B with the first image as chunk dictionary: {}", s["reuse"]);
    assert!(
        reuse_of(&s, 0).is_some_and(|f| f.starts_with("chunk-dict")),
        "{s}"
    );
    assert_eq!(reuse_of(&s, 1), None);
    assert_eq!(u(&s, "layers_reused"), 1);
    assert!(u(&s, "blobs_mounted") >= 1, "{s}");
    // Only the new layer's data (plus metadata: bootstrap, layer records,
    // config, manifests) is sent.
    let metadata = s["bootstrap_layer_bytes"].as_u64().expect("bootstrap") + (4 << 20);
    assert!(
        u(&s, "bytes_pushed") <= app_blob_size + metadata,
        "pushed {} B, the app blob is {app_blob_size} B: {s}",
        u(&s, "bytes_pushed")
    );
    assert_eq!(
        s["manifest_digest"], fresh_dict["manifest_digest"],
        "reuse through the dictionary is byte-identical to a fresh conversion with it"
    );

    // (2) The first image's repository, no local state: the record tag there.
    let b2 = format!("docker://{reg}/skiff/python:app");
    let s = convert(&[&src_b, &b2]);
    eprintln!("B into the first image's repository: {}", s["reuse"]);
    assert!(
        reuse_of(&s, 0).is_some_and(|f| f.starts_with("registry tag skiff-layer-")),
        "{s}"
    );
    assert_eq!(u(&s, "layers_reused"), 1);
    assert!(u(&s, "blobs_skipped") >= 1, "{s}");
    assert!(u(&s, "bytes_pushed") <= app_blob_size + metadata, "{s}");
    assert_eq!(s["manifest_digest"], fresh["manifest_digest"]);
    // The base layer was neither chunked nor compressed: what was
    // compressed is exactly what the application layer stores.
    let app = &fresh["reuse"]["layers"][1];
    assert_eq!(
        Some(u(&s, "chunks_compressed")),
        app["stored_chunks"].as_u64(),
        "{s}"
    );
    assert_eq!(
        Some(u(&s, "bytes_compressed")),
        app["stored_bytes"].as_u64(),
        "{s}"
    );
    assert!(u(&s, "bytes_compressed") < u(&fresh, "bytes_compressed") / 2);

    // (3) The local cache, into a layout.
    let cached_dir = dir.join("cached");
    let s = convert(&[
        "--cache-dir",
        &cache_arg,
        &src_b,
        &format!("oci:{}:app", cached_dir.display()),
    ]);
    assert_eq!(reuse_of(&s, 0).as_deref(), Some("cache"), "{s}");
    assert_eq!(s["manifest_digest"], fresh["manifest_digest"]);
    assert_eq!(
        fs::read(blob_path(&cached_dir, &base_blob)).expect("base blob from the cache"),
        fs::read(blob_path(&fresh_dir, &base_blob)).expect("fresh base blob"),
    );
    remove_all(&cached_dir);

    // (4) The local cache, into another repository of the registry: the
    // base blob is cross-mounted from where the first conversion put it
    // (the cache remembers), not uploaded from the cache.
    let b4 = format!("docker://{reg}/skiff/cached:1");
    let s = convert(&["--cache-dir", &cache_arg, &src_b, &b4]);
    eprintln!("B from the cache into a new repository: {}", s["reuse"]);
    assert_eq!(reuse_of(&s, 0).as_deref(), Some("cache"), "{s}");
    assert!(u(&s, "blobs_mounted") >= 1, "{s}");
    assert!(u(&s, "bytes_pushed") <= app_blob_size + metadata, "{s}");
    assert_eq!(s["manifest_digest"], fresh["manifest_digest"]);

    // Every blob each bootstrap needs is in each manifest, verified.
    for image in [&first, &b1, &b2, &b4] {
        skiff(["check", image.as_str()]);
    }

    // Both images mount and match their sources.
    mount_matches(&first, &umoci_rootfs(), &dir.join("mount-a"), "image A");
    let reference_b = umoci_unpack(&layout_b, "app", &dir.join("bundle-b"));
    mount_matches(&b1, &reference_b, &dir.join("mount-b1"), "image B (dict)");
    mount_matches(&b2, &reference_b, &dir.join("mount-b2"), "image B (tag)");
    drop(registry);
    remove_all(&dir);
}

/// Bytes of every blob a registry stores (its storage, content-addressed:
/// a blob in several repositories is stored once).
fn registry_bytes(root: &Path) -> u64 {
    let blobs = root.join("registry/docker/registry/v2/blobs");
    let out = run(Command::new("find")
        .arg(&blobs)
        .args(["-type", "f", "-name", "data", "-printf", "%s\n"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

#[test]
fn a_changed_package_costs_little_with_the_first_image_as_dictionary() {
    assert!(on_path("skopeo"), "skopeo is missing: run scripts/setup");
    let dir = work_dir("layer-reuse-version");
    let layers = fixture_layers();
    let v2_app = layer_without(&dir, "python3-lib2to3");
    let layout_v2 = dir.join("image-v2");
    let base = Layer {
        blob: layers[0].blob.clone(),
        diff_id: layers[0].diff_id.clone(),
    };
    write_image(&layout_v2, "v2", &[base, v2_app]);
    let src_v1 = fixture_image();
    let src_v2 = format!("oci:{}:v2", layout_v2.display());

    // Plain OCI: both versions in one registry.
    let oci_dir = dir.join("r-oci");
    let (oci_one, oci_pair) = {
        let r = Registry::start(&oci_dir);
        let copy = |src: &str, tag: &str| {
            run(Command::new("skopeo")
                .args(["copy", "-q", "--dest-tls-verify=false"])
                .arg(src)
                .arg(format!("docker://{}/app:{tag}", r.host())));
        };
        copy(&src_v1, "1");
        let one = registry_bytes(&oci_dir);
        copy(&src_v2, "2");
        (one, registry_bytes(&oci_dir))
    };
    remove_all(&oci_dir);

    // Skiff without a dictionary (and without layer reuse).
    let plain_dir = dir.join("r-plain");
    let plain_pair = {
        let r = Registry::start(&plain_dir);
        for (src, tag) in [(&src_v1, "1"), (&src_v2, "2")] {
            convert(&[
                "--no-layer-reuse",
                src,
                &format!("docker://{}/app:{tag}", r.host()),
            ]);
        }
        registry_bytes(&plain_dir)
    };
    remove_all(&plain_dir);

    // Skiff, the second version with the first as chunk dictionary.
    let dict_dir = dir.join("r-dict");
    let r = Registry::start(&dict_dir);
    let v1 = format!("docker://{}/app:1", r.host());
    let v2 = format!("docker://{}/app:2", r.host());
    convert(&[&src_v1, &v1]);
    let skiff_one = registry_bytes(&dict_dir);
    let s2 = convert(&["--chunk-dict", &v1, &src_v2, &v2]);
    let dict_pair = registry_bytes(&dict_dir);
    eprintln!("second version: {}", s2["reuse"]);
    assert_eq!(u(&s2, "layers_reused"), 1, "the base layer is reused: {s2}");

    let ratio = |a: u64, b: u64| a as f64 / b as f64;
    eprintln!(
        "registry bytes: plain OCI one {oci_one}, pair {oci_pair} ({:.3}x); \
         Skiff one {skiff_one}; pair without dictionary {plain_pair} ({:.3}x); \
         pair with the first as dictionary {dict_pair} ({:.3}x one Skiff image, {:.3}x one OCI image)",
        ratio(oci_pair, oci_one),
        ratio(plain_pair, skiff_one),
        ratio(dict_pair, skiff_one),
        ratio(dict_pair, oci_one),
    );
    assert!(
        dict_pair as f64 <= 1.2 * skiff_one as f64,
        "the pair costs {dict_pair} B, more than 1.2x one image ({skiff_one} B)"
    );
    assert!(dict_pair < plain_pair, "the dictionary saves nothing");

    // The registry images are complete and sound.
    skiff(["check", &v1]);
    skiff(["check", &v2]);

    // Any OCI tool can copy the image (every blob it needs is in its
    // manifest), and the copy mounts and matches the source.
    let copy = dir.join("copy");
    run(Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(&v2)
        .arg(format!("oci:{}:v2", copy.display())));
    drop(r);
    remove_all(&dict_dir);
    let copied = format!("oci:{}:v2", copy.display());
    skiff(["check", &copied]);
    let reference = umoci_unpack(&layout_v2, "v2", &dir.join("bundle-v2"));
    mount_matches(
        &copied,
        &reference,
        &dir.join("mount-v2"),
        "v2 (skopeo copy)",
    );
    remove_all(&dir);
}
