//! Acceptance on the fixture image (needs `SKIFF_FIXTURES` or
//! `../shared/fixtures`, and skopeo; fails, never skips, without them):
//! the fixture copied to a `docker save`-style archive by skopeo converts to
//! the same Skiff image content as the OCI layout it came from.
//!
//! skopeo writes the layers of a docker-archive uncompressed, so the two
//! sources differ in every layer's bytes and digest, and in their manifests
//! (a docker-archive has none: the registry crate synthesises one); the
//! uncompressed tars, and so the diff IDs, are the same. The bootstrap
//! depends only on the tars and the options, so it must be byte-identical,
//! and so must the data blobs and the config (skopeo keeps the source
//! config byte for byte). The manifests differ only in the
//! `dev.skiff.source.manifest` annotation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Instant;

use common::*;
use skiff_converter::ConvertOptions;
use skiff_registry::skiff::open_image;
use skiff_registry::ImageRef;
use skiff_tests::harness::{fixture_image, on_path, run};

#[test]
fn docker_archive_of_the_fixture_converts_like_the_oci_layout() {
    let source: ImageRef = fixture_image().parse().unwrap(); // panics if the fixtures are missing
    assert!(
        on_path("skopeo"),
        "skopeo is missing: install it (scripts/setup does: apt-get install skopeo)"
    );
    let work = scratch("docker-archive");
    let archive = work.path().join("python.tar");
    let start = Instant::now();
    run(Command::new("skopeo")
        .arg("copy")
        .arg("--quiet")
        .arg(fixture_image())
        .arg(format!(
            "docker-archive:{}:python:latest",
            archive.display()
        )));
    eprintln!("skopeo copy: {:.1} s", start.elapsed().as_secs_f64());

    let options = ConvertOptions::default();
    let oci_dir = work.path().join("from-oci");
    let start = Instant::now();
    let from_oci = convert_ref(source, &oci_dir, "python", Vec::new(), options.clone())
        .unwrap_or_else(|e| panic!("converting the OCI layout: {e}"));
    eprintln!("convert oci: {:.1} s", start.elapsed().as_secs_f64());

    let da_dir = work.path().join("from-docker-archive");
    let da_ref: ImageRef = format!("docker-archive:{}", archive.display())
        .parse()
        .unwrap();
    let start = Instant::now();
    let from_da = convert_ref(da_ref, &da_dir, "python", Vec::new(), options)
        .unwrap_or_else(|e| panic!("converting the docker-archive: {e}"));
    eprintln!(
        "convert docker-archive: {:.1} s",
        start.elapsed().as_secs_f64()
    );

    eprintln!("{:?}", from_oci.stats);
    // The fixture: two layers, 17,280 entries, 364 MB of tar.
    assert_eq!(from_oci.stats.layers, 2);
    assert!(from_oci.stats.entries > 15_000, "{:?}", from_oci.stats);
    assert!(
        from_oci.stats.bytes_in > 300_000_000,
        "{:?}",
        from_oci.stats
    );

    // The same tree, chunks and blobs: the same bootstrap, byte for byte.
    let a = open_image(&oci(&oci_dir, "python")).unwrap();
    let b = open_image(&oci(&da_dir, "python")).unwrap();
    assert_eq!(a.bootstrap_layer, b.bootstrap_layer);
    assert!(a.bootstrap[..] == b.bootstrap[..]);
    assert_eq!(from_oci.blobs, from_da.blobs);
    assert_eq!(from_oci.bootstrap_layer, from_da.bootstrap_layer);
    assert_eq!(from_oci.stats.entries, from_da.stats.entries);
    assert_eq!(from_oci.stats.bytes_in, from_da.stats.bytes_in);
    assert!(from_oci.stats.bytes_in_compressed < from_da.stats.bytes_in_compressed);

    // The manifests: the same layers; only the source manifest differs.
    assert_eq!(a.manifest["layers"], b.manifest["layers"]);
    let mut ma = a.manifest.clone();
    let mut mb = b.manifest.clone();
    let sa = ma["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("dev.skiff.source.manifest");
    let sb = mb["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("dev.skiff.source.manifest");
    assert!(sa.is_some() && sb.is_some());
    assert_ne!(sa, sb, "the two sources have different manifests");
    // Everything else is the same, the config (runtime settings, rootfs,
    // history) included: skopeo copies the config byte for byte.
    assert_eq!(ma, mb, "the manifests differ beyond the source manifest");

    // Both check clean; the docker-archive conversion unpacks to the same
    // tree as the OCI one.
    let start = Instant::now();
    let da_tree = work.path().join("unpacked-da");
    check_and_unpack(&da_dir, "python", &da_tree);
    let oci_tree = work.path().join("unpacked-oci");
    check_and_unpack(&oci_dir, "python", &oci_tree);
    assert_same_tree(&oci_tree, &da_tree);
    let paths = dump_all(&da_tree).len();
    assert!(paths > 15_000, "only {paths} paths unpacked");
    eprintln!(
        "check, unpack and compare: {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
