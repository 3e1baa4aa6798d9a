//! Acceptance: output is a function of the input and the options only.
//!
//! Converting the same input twice into two fresh layouts gives
//! byte-identical layouts (`oci-layout`, `index.json`, manifests, configs,
//! data blobs, bootstrap layer). So does converting with a different number
//! of threads, and converting the same tars stored as tar, tar+gzip or
//! tar+zstd (the output names layers by their diff IDs, which do not depend
//! on compression). An OCI layout source converted twice is identical too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;
use skiff_converter::ConvertOptions;
use skiff_format::Digest;

/// Three layers with a bit of everything: shared contents, hard links,
/// whiteouts, an opaque directory, xattrs, nanosecond times, holes.
fn layers(comps: [Comp; 3]) -> Vec<(Vec<Op>, Comp)> {
    let mut rng = Rng(2024);
    let shared = rng.bytes(300_000);
    let mut holes = rng.text(5000);
    holes.resize(600_000, 0);
    let mut l1: Vec<Op> = vec![Entry::dir("etc", 0o755).into()];
    for i in 0..40 {
        let content = match i % 4 {
            0 => shared.clone(),
            1 => rng.text(20_000 + i * 997),
            2 => rng.bytes(5_000 + i * 131),
            _ => Vec::new(),
        };
        l1.push(
            Entry::file(format!("d{}/f{i}", i % 5), 0o644, content)
                .mtime(1_600_000_000 + i as i64, (i as u32) * 1_000_003)
                .into(),
        );
    }
    l1.push(Entry::hardlink("etc/link", "d0/f0").into());
    l1.push(
        Entry::file("sparse", 0o600, holes)
            .xattr("user.k", "v")
            .into(),
    );
    let l2: Vec<Op> = vec![
        whiteout("d1/f1"),
        opaque("d2"),
        Entry::file("d2/new", 0o644, shared.clone()).into(),
        Entry::file("big", 0o755, rng.bytes(2 << 20)).into(),
        Entry::symlink("bin", "usr/bin").into(),
    ];
    let l3: Vec<Op> = vec![
        Entry::file("d3/f3", 0o600, rng.text(50_000))
            .owner(1000, 1000)
            .into(),
        Entry::hardlink("d4/extra", "big").into(),
        whiteout("big"),
    ];
    vec![(l1, comps[0]), (l2, comps[1]), (l3, comps[2])]
}

fn convert_fresh(
    layers: &[PathBuf],
    dest: &Path,
    options: ConvertOptions,
) -> BTreeMap<String, Vec<u8>> {
    convert_layers(layers, dest, "det", options)
        .unwrap_or_else(|e| panic!("converting into {}: {e}", dest.display()));
    read_tree(dest)
}

fn assert_same_layout(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>, what: &str) {
    let names_a: Vec<_> = a.keys().collect();
    let names_b: Vec<_> = b.keys().collect();
    assert_eq!(names_a, names_b, "{what}: the layouts hold different files");
    for (name, bytes) in a {
        assert!(
            bytes == &b[name],
            "{what}: {name} differs ({} vs {} bytes)",
            bytes.len(),
            b[name].len()
        );
    }
    // A layout has oci-layout, index.json, a manifest, a config, a
    // bootstrap layer and data blobs.
    assert!(a.contains_key("index.json") && a.contains_key("oci-layout"));
    assert!(a.len() >= 6, "{what}: only {:?}", names_a);
}

#[test]
fn converting_twice_gives_identical_layouts() {
    let work = scratch("determinism");
    let input = layers([Comp::Gzip, Comp::Tar, Comp::Zstd]);
    let files = write_layer_files(&work.path().join("layers"), &input);

    let a = convert_fresh(&files, &work.path().join("a"), options());
    let b = convert_fresh(&files, &work.path().join("b"), options());
    assert_same_layout(&a, &b, "two runs");

    let one = ConvertOptions {
        threads: 1,
        ..options()
    };
    let three = ConvertOptions {
        threads: 3,
        ..options()
    };
    let c = convert_fresh(&files, &work.path().join("c"), one);
    let d = convert_fresh(&files, &work.path().join("d"), three);
    assert_same_layout(&a, &c, "1 thread vs 2");
    assert_same_layout(&a, &d, "3 threads vs 2");

    // The same tars, compressed otherwise.
    for comps in [[Comp::Tar; 3], [Comp::Zstd; 3], [Comp::Gzip; 3]] {
        let other = layers(comps);
        let dir = work.path().join(format!("layers-{comps:?}"));
        let files = write_layer_files(&dir, &other);
        let out = work.path().join(format!("out-{comps:?}"));
        let e = convert_fresh(&files, &out, options());
        assert_same_layout(&a, &e, &format!("{comps:?} layers"));
    }

    // Different options give a different image (the test can fail).
    let fixed = ConvertOptions {
        chunking: skiff_converter::Chunking::Fixed { size: 64 << 10 },
        ..options()
    };
    let f = convert_fresh(&files, &work.path().join("f"), fixed);
    assert_ne!(a["index.json"], f["index.json"]);
}

#[test]
fn an_oci_source_converts_identically_twice() {
    let work = scratch("determinism-oci");
    let input = layers([Comp::Gzip, Comp::Gzip, Comp::Zstd]);
    let src = work.path().join("src");
    fs::create_dir_all(src.join("blobs/sha256")).unwrap();
    fs::write(src.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        fs::write(src.join("blobs/sha256").join(d.to_hex()), bytes).unwrap();
        (d, bytes.len() as u64)
    };
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for (ops, comp) in &input {
        let tar = write_layer(ops);
        diff_ids.push(Digest::of(&tar).oci());
        let (d, s) = put(&compress(&tar, *comp));
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d.oci(), "size": s,
        }));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": skiff_converter::publish::host_arch(),
        "os": "linux",
        "config": {"Env": ["A=1"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "x"}, {"created_by": "y"}, {"created_by": "z"}],
    }))
    .unwrap();
    let (cd, cs) = put(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.oci(), "size": cs},
        "layers": descs,
    }))
    .unwrap();
    let (md, ms) = put(&manifest);
    fs::write(
        src.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md.oci(), "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": "img"},
        }]}))
        .unwrap(),
    )
    .unwrap();

    let mut outs = Vec::new();
    for name in ["a", "b"] {
        let dest = work.path().join(name);
        convert_ref(oci(&src, "img"), &dest, "det", Vec::new(), options())
            .unwrap_or_else(|e| panic!("{e}"));
        outs.push(read_tree(&dest));
    }
    assert_same_layout(&outs[0], &outs[1], "OCI source, two runs");

    // The runtime settings of the source config are kept, the source
    // manifest is named.
    let image = skiff_registry::skiff::open_image(&oci(&work.path().join("a"), "det")).unwrap();
    assert_eq!(
        image.manifest["annotations"]["dev.skiff.source.manifest"],
        json!(md.oci())
    );
    let config_digest: Digest = image.manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&outs[0][&format!("blobs/sha256/{}", config_digest.to_hex())])
            .unwrap();
    assert_eq!(config["config"]["Cmd"], json!(["/bin/true"]));
    assert_eq!(config["config"]["Env"], json!(["A=1"]));
}
