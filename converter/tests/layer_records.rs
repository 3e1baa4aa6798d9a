//! Acceptance: a layer rebuilt from its layer record gives the bytes of a
//! fresh conversion, whatever the context it is reused in.
//!
//! Layers with a bit of everything (shared contents across layers, hard
//! links to lower layers, whiteouts, an opaque directory, xattrs,
//! nanosecond times, holes) are stored as OCI images in several orders and
//! combinations. Each is converted with a layer cache filled by the others
//! and compared, byte for byte (the whole output layout), with a conversion
//! that reuses nothing. Records that do not fit (their blob holds chunks an
//! earlier layer of this image already stores) must be passed over.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;
use skiff_converter::image::{
    convert_image, ConvertRequest, ConvertResult, ReuseOptions, SourceSpec,
};
use skiff_format::Digest;

/// Four layers: l0 shares content with l2, l3 hard-links and whites out
/// files of lower layers.
fn layer_set() -> Vec<(Vec<Op>, Comp)> {
    let mut rng = Rng(77);
    let shared = rng.bytes(400_000);
    let other = rng.bytes(200_000);
    let mut holes = rng.text(3000);
    holes.resize(500_000, 0);
    holes.extend_from_slice(&rng.text(3000));
    let l0: Vec<Op> = vec![
        Entry::dir("etc", 0o755).into(),
        Entry::file("etc/shared", 0o644, shared.clone())
            .mtime(1_600_000_000, 123_456_789)
            .into(),
        Entry::file("etc/holes", 0o600, holes).into(),
        Entry::dir("opt", 0o755).into(),
        Entry::file("opt/a", 0o644, "a").into(),
    ];
    let l1: Vec<Op> = vec![
        Entry::file("bin/tool", 0o755, other.clone())
            .xattr("user.binary", b"\x01\x00\x00\x02\n\x00")
            .owner(1000, 1000)
            .into(),
        Entry::symlink("bin/t", "tool").into(),
    ];
    let mut changed = shared.clone();
    changed[200_000] ^= 1;
    let l2: Vec<Op> = vec![
        Entry::file("usr/shared-copy", 0o644, shared).into(),
        Entry::file("usr/changed", 0o644, changed).into(),
        Entry::file("usr/other", 0o644, other).into(),
    ];
    let l3: Vec<Op> = vec![
        whiteout("etc/holes"),
        opaque("opt"),
        Entry::file("opt/b", 0o640, "b").into(),
        Entry::hardlink("etc/link", "etc/shared").into(),
    ];
    vec![
        (l0, Comp::Gzip),
        (l1, Comp::Zstd),
        (l2, Comp::Tar),
        (l3, Comp::Gzip),
    ]
}

/// Writes an OCI layout at `src` with image `img` made of `layers`.
fn write_source(src: &Path, layers: &[(Vec<Op>, Comp)]) {
    fs::create_dir_all(src.join("blobs/sha256")).unwrap();
    fs::write(src.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        fs::write(src.join("blobs/sha256").join(d.to_hex()), bytes).unwrap();
        (d, bytes.len() as u64)
    };
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for (ops, comp) in layers {
        let tar = write_layer(ops);
        diff_ids.push(Digest::of(&tar).oci());
        let (d, s) = put(&compress(&tar, *comp));
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d.oci(), "size": s,
        }));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": skiff_converter::publish::host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
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
}

fn convert(src: &Path, dest: &Path, reuse: ReuseOptions, dicts: Vec<PathBuf>) -> ConvertResult {
    convert_image(ConvertRequest {
        source: SourceSpec::Image {
            reference: oci(src, "img"),
            platform: None,
        },
        dest: oci(dest, "out"),
        chunk_dicts: dicts.iter().map(|d| oci(d, "out")).collect(),
        options: options(),
        progress: None,
        reuse,
        referrer: true,
    })
    .unwrap_or_else(|e| panic!("converting {}: {e}", src.display()))
}

fn with_cache(cache: &Path) -> ReuseOptions {
    ReuseOptions {
        cache_dir: Some(cache.to_path_buf()),
        lookup: true,
    }
}

fn fresh() -> ReuseOptions {
    ReuseOptions {
        cache_dir: None,
        lookup: false,
    }
}

#[test]
fn replayed_layers_give_the_bytes_of_a_fresh_conversion() {
    let work = scratch("layer-records");
    let all = layer_set();
    let src = work.path().join("src");
    write_source(&src, &all);
    let cache = work.path().join("cache");

    let fresh_out = work.path().join("fresh");
    let r0 = convert(&src, &fresh_out, fresh(), vec![]);
    assert_eq!(r0.reuse.layers_reused, 0);

    let filled = work.path().join("filled");
    let r1 = convert(&src, &filled, with_cache(&cache), vec![]);
    assert_eq!(r1.reuse.layers_reused, 0);
    let replayed = work.path().join("replayed");
    let r2 = convert(&src, &replayed, with_cache(&cache), vec![]);
    assert_eq!(r2.reuse.layers_reused, 4, "{:?}", r2.reuse);
    assert_eq!(r2.stats.chunks_compressed, 0);
    assert_eq!(r2.stats.bytes_in_compressed, 0, "no layer was read");
    assert_eq!(r2.stats.entries, r0.stats.entries);
    assert_eq!(r2.stats.chunks, r0.stats.chunks);
    assert_eq!(r2.manifest_digest, r0.manifest_digest);
    assert_eq!(read_tree(&replayed), read_tree(&fresh_out));
    assert_eq!(read_tree(&filled), read_tree(&fresh_out));

    // The replayed image is sound and unpacks like the layers.
    let unpacked = work.path().join("unpacked");
    check_and_unpack(&replayed, "out", &unpacked);
    let expected = work.path().join("expected");
    reference(&all).materialize(&expected);
    assert_same_tree(&expected, &unpacked);

    // Through a chunk dictionary's records, without a cache.
    let dict_fresh = work.path().join("dict-fresh");
    let d0 = ReuseOptions {
        lookup: false,
        ..fresh()
    };
    let rd0 = convert(&src, &dict_fresh, d0, vec![fresh_out.clone()]);
    let dict_reused = work.path().join("dict-reused");
    let rd1 = convert(&src, &dict_reused, fresh_lookup(), vec![fresh_out.clone()]);
    assert_eq!(rd1.reuse.layers_reused, 4, "{:?}", rd1.reuse);
    assert_eq!(rd1.manifest_digest, rd0.manifest_digest);
    assert_eq!(read_tree(&dict_reused), read_tree(&dict_fresh));
}

fn fresh_lookup() -> ReuseOptions {
    ReuseOptions {
        cache_dir: None,
        lookup: true,
    }
}

#[test]
fn records_made_in_another_context_are_used_only_when_they_fit() {
    let work = scratch("layer-records-context");
    let all = layer_set();
    let cache = work.path().join("cache");
    // Fill the cache with every layer converted in the full image: l2's
    // blob there lacks the chunks l0 already stored.
    let full = work.path().join("src-full");
    write_source(&full, &all);
    convert(&full, &work.path().join("full"), with_cache(&cache), vec![]);

    let pick =
        |ix: &[usize]| -> Vec<(Vec<Op>, Comp)> { ix.iter().map(|&i| all[i].clone()).collect() };
    for (name, ix, reusable) in [
        // l2 first: its cached record's blob misses the chunks l0 and l1
        // stored before it in the full image: l2 is read again.
        ("l2-l1", vec![2usize, 1], 1u32),
        // After l1 alone, no record of l2 fits (each blob holds chunks
        // this image stores elsewhere or lacks ones it needs).
        ("l1-l2", vec![1, 2], 1),
        ("l0-l2", vec![0, 2], 1),
        // The full image again: its own records (one per context) fit.
        ("l0-l1-l2-l3", vec![0, 1, 2, 3], 4),
        // And so do those made by the images above.
        ("l1-l2 again", vec![1, 2], 2),
        ("l2-l1 again", vec![2, 1], 2),
    ] {
        let name = name.replace(' ', "-");
        let src = work.path().join(format!("src-{name}"));
        write_source(&src, &pick(&ix));
        let want = work.path().join(format!("fresh-{name}"));
        let r0 = convert(&src, &want, fresh(), vec![]);
        let got = work.path().join(format!("cached-{name}"));
        let r1 = convert(&src, &got, with_cache(&cache), vec![]);
        assert_eq!(r1.reuse.layers_reused, reusable, "{name}: {:?}", r1.reuse);
        assert_eq!(r1.manifest_digest, r0.manifest_digest, "{name}");
        assert_eq!(read_tree(&got), read_tree(&want), "{name}");
    }
}
