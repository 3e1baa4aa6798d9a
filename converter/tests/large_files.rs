//! Large files cut finer (`ConvertOptions::large_files`): a file at or
//! above the bound gets the finer policy's chunks, a smaller one the
//! image's, the image unpacks like the reference either way, and the policy
//! is recorded in the image so that a change of it is a different image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use skiff_converter::{Chunking, ConvertOptions, LargeFiles};
use skiff_format::Bootstrap;

/// Incompressible bytes: SHA-256 of a counter, different for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        let block = [seed.to_le_bytes(), i.to_le_bytes()].concat();
        out.extend_from_slice(&skiff_format::Digest::of(&block).0);
        i += 1;
    }
    out.truncate(len);
    out
}

/// Average chunk size of the file at `path` in the image.
fn average_chunk(b: &Bootstrap<'_>, path: &str) -> u64 {
    let id = b.resolve_path(path.as_bytes()).unwrap().unwrap();
    let inode = b.inode(id).unwrap();
    inode.size() / b.file_chunks(id).unwrap().len() as u64
}

#[test]
fn files_from_the_bound_up_are_cut_with_the_finer_policy() {
    let work = scratch("large-files");
    let input = vec![(
        vec![
            Entry::file("below.bin", 0o644, noise((1 << 20) - 1, 1)).into(),
            Entry::file("at.bin", 0o644, noise(1 << 20, 2)).into(),
            Entry::file("above.bin", 0o644, noise(3 << 20, 3)).into(),
        ],
        Comp::Gzip,
    )];
    let files = write_layer_files(&work.path().join("layers"), &input);
    let expected = work.path().join("expected");
    reference(&input).materialize(&expected);
    let finer = LargeFiles {
        from: 1 << 20,
        chunking: Chunking::fastcdc(8 << 10).unwrap(),
    };
    for (tag, large_files) in [("finer", Some(finer)), ("off", None)] {
        let layout = work.path().join(tag);
        let options = ConvertOptions {
            chunking: Chunking::fastcdc(64 << 10).unwrap(),
            large_files,
            ..options()
        };
        convert_layers(&files, &layout, tag, options).unwrap();
        let actual = work.path().join(format!("unpacked-{tag}"));
        check_and_unpack(&layout, tag, &actual);
        assert_same_tree(&expected, &actual);

        let image = skiff_registry::skiff::open_image(&oci(&layout, tag)).unwrap();
        let b = Bootstrap::parse(&image.bootstrap).unwrap();
        let (below, at, above) = (
            average_chunk(&b, "below.bin"),
            average_chunk(&b, "at.bin"),
            average_chunk(&b, "above.bin"),
        );
        assert!(below > 32 << 10, "{tag}: below the bound, {below} B chunks");
        if large_files.is_some() {
            assert!(at < 16 << 10 && above < 16 << 10, "{tag}: {at} {above}");
        } else {
            assert!(at > 32 << 10 && above > 32 << 10, "{tag}: {at} {above}");
        }
        let manifest = String::from_utf8_lossy(&image.manifest_bytes).into_owned();
        assert_eq!(
            manifest.contains("large-files 1m:fastcdc:2k/8k/32k"),
            large_files.is_some(),
            "{manifest}"
        );
    }
}
