//! Acceptance: bad input gives a clear error and leaves no output that
//! looks complete.
//!
//! Each case converts into a fresh OCI layout (and, in one case, into a
//! layout that already holds a good image) and asserts that the conversion
//! fails, that the message names the layer (and the entry where there is
//! one), that the destination has no tag for the image (the tag is the
//! commit point), and that no temporary files are left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;
use skiff_format::Digest;
use tar::EntryType;

/// Converts `layers` into a fresh layout; the conversion must fail. Returns
/// the message after checking the layout holds no tag and no temp files.
fn must_fail(work: &Path, name: &str, layers: &[PathBuf]) -> String {
    let layout = work.join(format!("out-{name}"));
    let err = match convert_layers(layers, &layout, "img", options()) {
        Ok(r) => panic!("{name}: the conversion succeeded: {r:?}"),
        Err(e) => e.to_string(),
    };
    eprintln!("{name}: {err}");
    assert_nothing_published(&layout, name);
    err
}

fn assert_nothing_published(layout: &Path, name: &str) {
    if layout.join("index.json").exists() {
        assert!(
            tags(layout).is_empty(),
            "{name}: a failed conversion left a tag: {:?}",
            tags(layout)
        );
    }
    if layout.exists() {
        let temps = temp_files(layout);
        assert!(temps.is_empty(), "{name}: temp files left: {temps:?}");
    }
}

fn contains_all(name: &str, message: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            message.contains(p),
            "{name}: the error does not mention {p:?}:\n{message}"
        );
    }
}

/// A tar with two files: `first` (100 kB) and `second` (1 MB of random,
/// incompressible bytes), and where `second`'s data starts.
fn two_files() -> (Vec<u8>, usize) {
    let mut rng = Rng(3);
    let ops: Vec<Op> = vec![
        Entry::file("first", 0o644, rng.text(100_000)).into(),
        Entry::file("second", 0o644, rng.bytes(1 << 20)).into(),
    ];
    let tar = write_layer(&ops);
    // first: header + 100000 bytes padded to 512; then second's header.
    let second_data = 512 + 100_352 + 512;
    (tar, second_data)
}

fn write(work: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = work.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn truncated_tar_names_the_layer_and_entry() {
    let work = scratch("bad-trunc-tar");
    let (tar, second) = two_files();
    // Cut inside the second file's data.
    let path = write(work.path(), "cut.tar", &tar[..second + 300_000]);
    let err = must_fail(work.path(), "truncated tar", &[path]);
    contains_all(
        "truncated tar",
        &err,
        &["layer 1/1", "cut.tar", "'second'", "truncated"],
    );

    // Cut inside a header: no entry to name, but the layer is named.
    let path = write(work.path(), "cut-header.tar", &tar[..512 + 100_352 + 200]);
    let err = must_fail(work.path(), "truncated header", &[path]);
    contains_all("truncated header", &err, &["layer 1/1", "cut-header.tar"]);
}

#[test]
fn truncated_gzip_names_the_layer_and_entry() {
    let work = scratch("bad-trunc-gz");
    let (tar, _) = two_files();
    let gz = compress(&tar, Comp::Gzip);
    // Random data does not compress: 70% of the stream is inside `second`.
    let path = write(work.path(), "cut.tar.gz", &gz[..gz.len() * 7 / 10]);
    let err = must_fail(work.path(), "truncated gzip", &[path]);
    contains_all(
        "truncated gzip",
        &err,
        &["layer 1/1", "cut.tar.gz", "'second'"],
    );

    // A gzip stream that ends before its trailer (CRC and length).
    let path = write(work.path(), "no-trailer.tar.gz", &gz[..gz.len() - 4]);
    let err = must_fail(work.path(), "gzip without its trailer", &[path]);
    contains_all(
        "gzip without its trailer",
        &err,
        &["layer 1/1", "no-trailer.tar.gz"],
    );
}

#[test]
fn corrupt_zstd_names_the_layer() {
    let work = scratch("bad-zstd");
    let (tar, _) = two_files();
    // As the zstd tool writes it: with a content checksum.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    std::io::Write::write_all(&mut enc, &tar).unwrap();
    let zst = enc.finish().unwrap();

    let mut flipped = zst.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    let path = write(work.path(), "flipped.tar.zst", &flipped);
    let err = must_fail(work.path(), "flipped zstd byte", &[path]);
    contains_all("flipped zstd byte", &err, &["layer 1/1", "flipped.tar.zst"]);

    // The zstd magic followed by garbage.
    let mut garbage = zst[..4].to_vec();
    garbage.extend_from_slice(&Rng(5).bytes(4096));
    let path = write(work.path(), "garbage.tar.zst", &garbage);
    let err = must_fail(work.path(), "zstd garbage", &[path]);
    contains_all("zstd garbage", &err, &["layer 1/1", "garbage.tar.zst"]);

    // A truncated zstd stream.
    let path = write(work.path(), "cut.tar.zst", &zst[..zst.len() / 2]);
    let err = must_fail(work.path(), "truncated zstd", &[path]);
    contains_all("truncated zstd", &err, &["layer 1/1", "cut.tar.zst"]);
}

/// A tar holding one entry with a raw (unvalidated) name.
fn raw_entry(kind: EntryType, name: &[u8], link: Option<&[u8]>) -> Vec<u8> {
    let mut w = TarWriter::new();
    w.entry(&Entry::file("ok", 0o644, "fine"));
    let mut h = TarWriter::header(kind, name, false);
    if let Some(l) = link {
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
    }
    w.raw(
        &mut h,
        if kind == EntryType::Regular {
            b"evil"
        } else {
            b""
        },
    );
    w.finish()
}

#[test]
fn paths_that_escape_are_refused() {
    let work = scratch("bad-dotdot");
    let cases: &[(&str, Vec<u8>, &str)] = &[
        (
            "dotdot",
            raw_entry(EntryType::Regular, b"../evil", None),
            "../evil",
        ),
        (
            "inner-dotdot",
            raw_entry(EntryType::Regular, b"a/../../etc/passwd", None),
            "a/../../etc/passwd",
        ),
        (
            "link-dotdot",
            raw_entry(EntryType::Link, b"innocent", Some(b"../../etc/shadow")),
            "innocent",
        ),
        (
            "whiteout-dotdot",
            raw_entry(EntryType::Regular, b"../.wh.x", None),
            "../.wh.x",
        ),
    ];
    // Two layers: the bad entry is in the second one.
    let good = write(
        work.path(),
        "good.tar",
        &write_layer(&[Entry::file("x", 0o644, "x").into()]),
    );
    for (name, tar, entry) in cases {
        let path = write(work.path(), &format!("{name}.tar"), tar);
        let err = must_fail(work.path(), name, &[good.clone(), path]);
        contains_all(
            name,
            &err,
            &[
                "layer 2/2",
                &format!("{name}.tar"),
                &format!("'{entry}'"),
                "..",
            ],
        );
    }
}

#[test]
fn bad_hard_links_are_refused() {
    let work = scratch("bad-links");
    let missing: Vec<Op> = vec![
        Entry::file("present", 0o644, "x").into(),
        Entry::hardlink("link", "absent").into(),
    ];
    let path = write(work.path(), "missing.tar", &write_layer(&missing));
    let err = must_fail(work.path(), "link to a missing target", &[path]);
    contains_all(
        "link to a missing target",
        &err,
        &[
            "layer 1/1",
            "missing.tar",
            "'link'",
            "missing target",
            "absent",
        ],
    );

    let to_dir: Vec<Op> = vec![
        Entry::dir("d", 0o755).into(),
        Entry::file("d/f", 0o644, "x").into(),
        Entry::hardlink("link", "d").into(),
    ];
    let path = write(work.path(), "to-dir.tar", &write_layer(&to_dir));
    let err = must_fail(work.path(), "link to a directory", &[path]);
    contains_all(
        "link to a directory",
        &err,
        &["layer 1/1", "to-dir.tar", "'link'", "directory"],
    );

    // A target whited out in an earlier layer is missing too.
    let l1 = write(
        work.path(),
        "l1.tar",
        &write_layer(&[Entry::file("gone", 0o644, "x").into()]),
    );
    let l2 = write(work.path(), "l2.tar", &write_layer(&[whiteout("gone")]));
    let l3 = write(
        work.path(),
        "l3.tar",
        &write_layer(&[Entry::hardlink("link", "gone").into()]),
    );
    let err = must_fail(work.path(), "link to a whited-out file", &[l1, l2, l3]);
    contains_all(
        "link to a whited-out file",
        &err,
        &["layer 3/3", "l3.tar", "'link'", "missing target"],
    );
}

#[test]
fn ids_beyond_32_bits_are_refused() {
    let work = scratch("bad-ids");
    let e = Entry::file("huge-uid", 0o644, "x").enc(|e| {
        e.extra_pax = vec![(b"uid".to_vec(), b"5000000000".to_vec())];
    });
    let path = write(work.path(), "uid.tar", &write_layer(&[e.into()]));
    let err = must_fail(work.path(), "uid beyond 32 bits", &[path]);
    contains_all(
        "uid beyond 32 bits",
        &err,
        &["layer 1/1", "'huge-uid'", "5000000000"],
    );
}

// ---------------------------------------------------------------------------
// OCI layout sources built by hand

fn blob(dir: &Path, bytes: &[u8]) -> (Digest, u64) {
    let d = Digest::of(bytes);
    fs::write(dir.join("blobs/sha256").join(d.to_hex()), bytes).unwrap();
    (d, bytes.len() as u64)
}

/// Writes an OCI layout at `dir` with one image, tag `img`: `layers` as
/// stored (gzip), with `diff_ids` in the config and `descriptors` (digest,
/// size) in the manifest.
fn layout_source(dir: &Path, diff_ids: &[Digest], descriptors: &[(Digest, u64)]) {
    let config = serde_json::to_vec(&json!({
        "architecture": skiff_converter::publish::host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(Digest::oci).collect::<Vec<_>>()},
    }))
    .unwrap();
    let (cd, cs) = blob(dir, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.oci(), "size": cs},
        "layers": descriptors.iter().map(|(d, s)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d.oci(),
            "size": s,
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let (md, ms) = blob(dir, &manifest);
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md.oci(), "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": "img"},
    }]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn new_layout(dir: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Converts `oci:src:img` into `oci:dest:tag`.
fn convert_source(src: &Path, dest: &Path, tag: &str) -> Result<String, String> {
    convert_ref(oci(src, "img"), dest, tag, Vec::new(), options())
        .map(|r| r.manifest_digest.to_string())
        .map_err(|e| e.to_string())
}

#[test]
fn lying_digests_in_an_oci_source_are_refused() {
    let work = scratch("bad-digests");
    let mut rng = Rng(11);
    let tar1 = write_layer(&[Entry::file("one", 0o644, rng.text(50_000)).into()]);
    let tar2 = write_layer(&[Entry::file("two", 0o644, rng.bytes(80_000)).into()]);
    let gz1 = compress(&tar1, Comp::Gzip);
    let gz2 = compress(&tar2, Comp::Gzip);

    // A good source first: it converts, and its image stays published in
    // the destination while the bad conversions below fail.
    let good = work.path().join("good");
    new_layout(&good);
    let d1 = blob(&good, &gz1);
    let d2 = blob(&good, &gz2);
    layout_source(&good, &[Digest::of(&tar1), Digest::of(&tar2)], &[d1, d2]);
    let dest = work.path().join("dest");
    let good_manifest = convert_source(&good, &dest, "good").unwrap();
    let good_index = fs::read(dest.join("index.json")).unwrap();

    let check_dest = |name: &str| {
        assert_eq!(tags(&dest), vec!["good".to_string()], "{name}");
        assert_eq!(
            fs::read(dest.join("index.json")).unwrap(),
            good_index,
            "{name}: index.json changed"
        );
        assert!(temp_files(&dest).is_empty(), "{name}: temp files left");
        let image = skiff_registry::skiff::open_image(&oci(&dest, "good")).unwrap();
        assert_eq!(image.manifest_digest.to_string(), good_manifest);
    };

    // The config's diff_id of layer 2 lies.
    let src = work.path().join("lying-diff-id");
    new_layout(&src);
    let d1 = blob(&src, &gz1);
    let d2 = blob(&src, &gz2);
    let wrong = Digest::of(b"not the layer");
    layout_source(&src, &[Digest::of(&tar1), wrong], &[d1, d2]);
    let err = convert_source(&src, &dest, "bad").unwrap_err();
    contains_all(
        "lying diff_id",
        &err,
        &[
            "layer 2/2",
            &d2.0.oci(),
            &wrong.oci(),
            &Digest::of(&tar2).oci(),
            "diff ID",
        ],
    );
    check_dest("lying diff_id");

    // The manifest's digest of layer 1 lies: the blob stored under that
    // name holds other bytes.
    let src = work.path().join("lying-layer-digest");
    new_layout(&src);
    let fake = Digest::of(b"what the manifest claims");
    fs::write(src.join("blobs/sha256").join(fake.to_hex()), &gz1).unwrap();
    let d2 = blob(&src, &gz2);
    layout_source(
        &src,
        &[Digest::of(&tar1), Digest::of(&tar2)],
        &[(fake, gz1.len() as u64), d2],
    );
    let err = convert_source(&src, &dest, "bad").unwrap_err();
    contains_all(
        "lying layer digest",
        &err,
        &["layer 1/2", &fake.oci(), &Digest::of(&gz1).oci()],
    );
    check_dest("lying layer digest");

    // The manifest's size of layer 2 lies (one byte short).
    let src = work.path().join("lying-layer-size");
    new_layout(&src);
    let d1 = blob(&src, &gz1);
    let (d2, s2) = blob(&src, &gz2);
    layout_source(
        &src,
        &[Digest::of(&tar1), Digest::of(&tar2)],
        &[d1, (d2, s2 - 1)],
    );
    let err = convert_source(&src, &dest, "bad").unwrap_err();
    contains_all("lying layer size", &err, &["layer 2/2", &d2.oci()]);
    check_dest("lying layer size");
}

#[test]
fn a_failed_conversion_keeps_the_other_tags() {
    let work = scratch("bad-keep");
    let good = write(
        work.path(),
        "good.tar",
        &write_layer(&[Entry::file("f", 0o644, "good").into()]),
    );
    let layout = work.path().join("layout");
    convert_layers(std::slice::from_ref(&good), &layout, "keep", options()).unwrap();
    let before = read_tree(&layout);

    let bad = write(
        work.path(),
        "bad.tar",
        &write_layer(&[Entry::hardlink("l", "nothing").into()]),
    );
    let err = convert_layers(&[good, bad], &layout, "new", options()).unwrap_err();
    contains_all("bad second layer", &err.to_string(), &["layer 2/2", "'l'"]);
    assert_eq!(tags(&layout), vec!["keep".to_string()]);
    assert!(temp_files(&layout).is_empty());
    let after = read_tree(&layout);
    // Every file of the good image is still there, byte for byte (a failed
    // conversion may leave unreferenced data blobs, nothing else).
    for (path, bytes) in &before {
        assert_eq!(after.get(path), Some(bytes), "{path} changed");
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        assert!(
            path.starts_with("blobs/sha256/"),
            "a failed conversion wrote {path}"
        );
    }
}

#[test]
fn pax_records_the_converter_cannot_honour_are_refused() {
    let work = scratch("bad-pax");
    // PAX sparse files (GNU tar --sparse --format=posix): the data holds a
    // sparse map and the real name is in a record. Converting them as plain
    // files would store the wrong name and content.
    let e = Entry::file("GNUSparseFile.0/big", 0o644, "1\n0\n5\nhello").enc(|e| {
        e.extra_pax = vec![
            (b"GNU.sparse.major".to_vec(), b"1".to_vec()),
            (b"GNU.sparse.minor".to_vec(), b"0".to_vec()),
            (b"GNU.sparse.name".to_vec(), b"big".to_vec()),
            (b"GNU.sparse.realsize".to_vec(), b"1048576".to_vec()),
        ];
    });
    let path = write(work.path(), "pax-sparse.tar", &write_layer(&[e.into()]));
    let err = must_fail(work.path(), "PAX sparse file", &[path]);
    contains_all(
        "PAX sparse file",
        &err,
        &["layer 1/1", "'GNUSparseFile.0/big'", "sparse"],
    );

    // A size record the tar reader does not honour (it gives up on the
    // records after one whose value holds a newline), while a reader that
    // frames records by length, as Go's does, reads 20 bytes: refused, not
    // converted one way when `docker pull` reads it another.
    let e = Entry::file("sized", 0o644, "0123456789").enc(|e| {
        e.extra_pax = vec![
            (b"SCHILY.xattr.user.a".to_vec(), b"x\ny".to_vec()),
            (b"size".to_vec(), b"20".to_vec()),
        ];
    });
    let path = write(work.path(), "size.tar", &write_layer(&[e.into()]));
    let err = must_fail(work.path(), "PAX size differential", &[path]);
    contains_all(
        "PAX size differential",
        &err,
        &["layer 1/1", "'sized'", "PAX size"],
    );

    // A malformed record.
    let e = Entry::file("broken", 0o644, "x").enc(|e| {
        e.extra_pax = vec![(b"mtime".to_vec(), b"yesterday".to_vec())];
    });
    let path = write(work.path(), "mtime.tar", &write_layer(&[e.into()]));
    let err = must_fail(work.path(), "PAX mtime not a time", &[path]);
    contains_all(
        "PAX mtime not a time",
        &err,
        &["layer 1/1", "'broken'", "yesterday"],
    );
}
