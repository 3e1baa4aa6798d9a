//! Acceptance: `skiff check` catches a single flipped byte anywhere.
//!
//! A small two-layer image is converted once and copied; then, one at a
//! time, a byte is flipped at random positions (and the first and last
//! byte) of every data blob and of the bootstrap layer blob of the copy, and
//! opening + checking the image must fail: `open_image` refuses it, or
//! `check::check` reports problems. A flip in a data blob must be named by
//! the chunk that holds the byte and a file that uses it. Every byte of the
//! uncompressed bootstrap is also flipped in memory: the reader must refuse
//! each one at parse time (CRCs and zero padding cover every byte).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;

use common::*;
use skiff_converter::check;
use skiff_format::{Bootstrap, Digest};
use skiff_registry::skiff::open_image;

fn layers() -> Vec<(Vec<Op>, Comp)> {
    let mut rng = Rng(7);
    let l1 = vec![
        Entry::file("bin/tool", 0o755, rng.bytes(300_000)).into(),
        Entry::file("share/doc.txt", 0o644, rng.text(200_000)).into(),
        Entry::file("etc/small", 0o644, "small\n").into(),
        Entry::symlink("etc/link", "small").into(),
    ];
    let l2 = vec![
        Entry::file("lib/libx.so", 0o644, rng.bytes(120_000)).into(),
        Entry::file("share/more.txt", 0o644, rng.text(90_000)).into(),
        Entry::file("etc/small", 0o600, "changed\n").into(),
    ];
    vec![(l1, Comp::Gzip), (l2, Comp::Zstd)]
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

fn flip(path: &Path, pos: u64, mask: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[pos as usize] ^= mask;
    fs::write(path, bytes).unwrap();
}

/// Positions to corrupt in a blob of `size` bytes: the ends and a few
/// random ones.
fn positions(rng: &mut Rng, size: u64, random: usize) -> Vec<u64> {
    let mut v = vec![0, size - 1];
    v.extend((0..random).map(|_| rng.below(size)));
    v
}

/// Opens and checks the image: `Err(message)` for every failure, `Ok` with
/// the problems otherwise.
fn open_and_check(layout: &Path) -> Result<Vec<String>, String> {
    let image = open_image(&oci(layout, "t")).map_err(|e| e.to_string())?;
    let b = Bootstrap::parse(&image.bootstrap).map_err(|e| e.to_string())?;
    let report = check::check(&b, image.store.as_ref()).map_err(|e| e.to_string())?;
    assert_eq!(report.problem_count as usize, report.problems.len());
    Ok(report.problems)
}

#[test]
fn a_flipped_byte_anywhere_is_caught() {
    let work = scratch("flips");
    let files = write_layer_files(&work.path().join("layers"), &layers());
    let pristine = work.path().join("pristine");
    convert_layers(&files, &pristine, "t", options()).unwrap();
    let layout = work.path().join("copy");
    copy_dir(&pristine, &layout);
    assert_eq!(open_and_check(&layout), Ok(Vec::new()));

    let image = open_image(&oci(&layout, "t")).unwrap();
    let bootstrap_bytes = image.bootstrap.to_vec();
    let b = Bootstrap::parse(&bootstrap_bytes).unwrap();
    let owners = check::chunk_owners(&b);
    let blobs_dir = layout.join("blobs/sha256");
    let mut rng = Rng(99);
    let mut flips = 0;

    assert!(b.blob_count() >= 2, "expected a data blob per layer");
    for bi in 0..b.blob_count() {
        let blob = b.blob(bi).unwrap();
        let path = blobs_dir.join(blob.digest.to_hex());
        for pos in positions(&mut rng, blob.size, 24) {
            let mask = 1u8 << rng.below(8);
            // The chunk whose stored bytes hold `pos`.
            let chunk = (0..b.chunk_count())
                .find(|&i| {
                    let c = b.chunk(i).unwrap();
                    c.blob_index == bi
                        && c.compressed_offset <= pos
                        && pos < c.compressed_offset + u64::from(c.compressed_size)
                })
                .unwrap_or_else(|| panic!("no chunk holds byte {pos} of blob {bi}"));
            // A chunk of a file that a later layer replaced is stored but
            // used by no file; check says so.
            let owner = owners
                .get(&chunk)
                .map_or("no file", |(path, _)| path.as_str());
            flip(&path, pos, mask);
            let problems = open_and_check(&layout).unwrap_or_else(|e| {
                panic!("a data blob flip must leave the image openable for check: {e}")
            });
            assert!(
                !problems.is_empty(),
                "flipping bit {mask:#04x} of byte {pos} of blob {bi} went unnoticed"
            );
            assert!(
                problems.iter().any(|p| p.contains(&format!("blob {bi}"))),
                "blob {bi}, byte {pos}: no problem names the blob: {problems:?}"
            );
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains(&format!("chunk {chunk} (")) && p.contains(owner)),
                "blob {bi}, byte {pos} (bit {mask:#04x}): no problem names chunk {chunk} and its file {owner}: {problems:?}"
            );
            flip(&path, pos, mask);
            flips += 1;
        }
    }

    // The bootstrap layer blob: opening fails (its digest, then the
    // decompressed digest, then the CRCs).
    let manifest = image.manifest.clone();
    let layer = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == skiff_registry::media::SKIFF_BOOTSTRAP)
        .unwrap();
    let digest: Digest = layer["digest"].as_str().unwrap().parse().unwrap();
    let size = layer["size"].as_u64().unwrap();
    let path = blobs_dir.join(digest.to_hex());
    for pos in positions(&mut rng, size, 16) {
        let mask = 1u8 << rng.below(8);
        flip(&path, pos, mask);
        match open_and_check(&layout) {
            Err(e) => assert!(
                e.contains(&digest.to_hex()) || e.contains("bootstrap"),
                "the error does not say what is wrong: {e}"
            ),
            Ok(problems) => assert!(
                !problems.is_empty(),
                "flipping byte {pos} of the bootstrap layer went unnoticed"
            ),
        }
        flip(&path, pos, mask);
        flips += 1;
    }
    assert_eq!(open_and_check(&layout), Ok(Vec::new()), "restoring failed");
    assert!(flips >= 3 * 14);

    // Every byte of the uncompressed bootstrap is covered at parse time.
    let mut buf = bootstrap_bytes.clone();
    for pos in 0..buf.len() {
        for mask in [0x01u8, 0x80] {
            buf[pos] ^= mask;
            let refused = match Bootstrap::parse(&buf) {
                Err(_) => true,
                Ok(parsed) => parsed.validate().is_err(),
            };
            assert!(
                refused,
                "flipping bit {mask:#04x} of bootstrap byte {pos} (of {}) went unnoticed",
                buf.len()
            );
            buf[pos] ^= mask;
        }
    }
}
