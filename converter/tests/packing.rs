//! Small files packed into shared zstd frames (format 1.1): a tree of many
//! small files, duplicates, hard links, empty and sparse files, deep paths
//! and file tails converts with and without packing and unpacks like the
//! reference both ways. (What packing saves is measured by scripts/bench on
//! realistic trees, not asserted here.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use skiff_converter::ConvertOptions;
use skiff_format::layout::FEATURE_SHARED_FRAMES;
use skiff_format::Bootstrap;

/// Text-like content of `len` bytes, different for each `seed`.
fn text(len: usize, seed: usize) -> Vec<u8> {
    let words = [
        "import", "def", "return", "self", "value", "numpy", "class", "if",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(words[i % words.len()].as_bytes());
        out.push(if i % 7 == 0 { b'\n' } else { b' ' });
        i = i.wrapping_mul(31).wrapping_add(seed % 13 + 1);
    }
    out.truncate(len);
    out
}

fn layers() -> Vec<(Vec<Op>, Comp)> {
    let mut ops: Vec<Op> = vec![Entry::dir("pkg", 0o755).into()];
    for i in 0..600 {
        let dir = format!("pkg/m{:02}", i / 40);
        if i % 40 == 0 {
            ops.push(Entry::dir(&dir, 0o755).into());
        }
        // Sizes from 1 byte to 20 KiB: all below the pack threshold.
        let size = 1 + (i * 7919) % (20 << 10);
        ops.push(Entry::file(format!("{dir}/f{i:04}.py"), 0o644, text(size, i)).into());
    }
    // Duplicates of packed files, and hard links to them.
    // The same bytes as pkg/m00/f0001.py (size 1 + 7919).
    ops.push(Entry::file("pkg/dup-a.py", 0o644, text(7920, 1)).into());
    ops.push(Entry::hardlink("pkg/link-to-f0003", "pkg/m00/f0003.py").into());
    ops.push(Entry::file("pkg/empty", 0o644, Vec::new()).into());
    // A deep path, and a large file whose tail is packed.
    let mut deep = String::from("deep");
    ops.push(Entry::dir(&deep, 0o755).into());
    for level in 0..40 {
        deep = format!("{deep}/d{level}");
        ops.push(Entry::dir(&deep, 0o755).into());
    }
    ops.push(Entry::file(format!("{deep}/leaf.txt"), 0o600, text(300, 99)).into());
    ops.push(Entry::file("big.bin", 0o644, text((600 << 10) + 123, 7)).into());
    // Mostly zeros: holes around a small packed piece.
    let mut sparse = vec![0u8; 1 << 20];
    sparse[500_000..500_100].copy_from_slice(&text(100, 5));
    ops.push(Entry::file("sparse.bin", 0o644, sparse).into());
    // A second layer replaces and removes packed files.
    let upper: Vec<Op> = vec![
        Entry::file("pkg/m00/f0001.py", 0o644, text(333, 1234)).into(),
        whiteout("pkg/m01/f0041.py"),
    ];
    vec![(ops, Comp::Gzip), (upper, Comp::Zstd)]
}

#[test]
fn packed_and_unpacked_images_unpack_like_the_reference() {
    let work = scratch("packing");
    let input = layers();
    let files = write_layer_files(&work.path().join("layers"), &input);
    let expected = work.path().join("expected");
    reference(&input).materialize(&expected);

    for (tag, pack_size) in [("packed", 64 << 10), ("plain", 0)] {
        let layout = work.path().join(tag);
        let options = ConvertOptions {
            pack_size,
            ..ConvertOptions::default()
        };
        let result = convert_layers(&files, &layout, tag, options)
            .unwrap_or_else(|e| panic!("converting with pack size {pack_size}: {e}"));
        let actual = work.path().join(format!("unpacked-{tag}"));
        check_and_unpack(&layout, tag, &actual);
        assert_same_tree(&expected, &actual);

        let image = skiff_registry::skiff::open_image(&oci(&layout, tag)).unwrap();
        let b = Bootstrap::parse(&image.bootstrap).unwrap();
        let chunks: Vec<_> = (0..b.chunk_count()).map(|i| b.chunk(i).unwrap()).collect();
        let shared = chunks.iter().filter(|c| c.frame.is_some()).count();
        let flagged = image.bootstrap[12] as u32 & FEATURE_SHARED_FRAMES != 0;
        if pack_size == 0 {
            assert_eq!(shared, 0, "no packing asked for");
            assert!(!flagged, "a 1.0 reader must be able to read it");
        } else {
            // Most of the 600 small files share frames with others.
            assert!(shared > 500, "{shared} chunks in shared frames");
            assert!(flagged);
            let frames: std::collections::HashSet<_> = chunks
                .iter()
                .filter(|c| c.frame.is_some())
                .map(|c| (c.blob_index, c.compressed_offset))
                .collect();
            assert!(frames.len() * 4 < shared, "{} frames", frames.len());
        }
        // The chunk table is in blob order.
        assert!(chunks
            .windows(2)
            .all(|w| (w[0].blob_index, w[0].compressed_offset)
                <= (w[1].blob_index, w[1].compressed_offset)));
        assert!(result.stats.blob_bytes > 0);
    }
}
