//! Cold files last: test suites, documentation and Python sources beside
//! their bytecode are stored after the rest of their layer's blob (packs
//! never mixing the two), and the image unpacks like the reference either
//! way. (What the order saves a lazy mount is measured by
//! scripts/bench-coldstart, not asserted here.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::*;
use skiff_converter::ConvertOptions;
use skiff_format::Bootstrap;

/// Content of `len` bytes, different for each `seed`, compressible.
fn content(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"abcdefgh"[(i / 7 + seed) % 8] ^ (((i * seed) % 251) as u8 & 3))
        .collect()
}

/// (path, cold?) of every file of the layer, in tar order: cold and hot
/// files interleaved, small ones (packed) and large ones.
fn files() -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for pkg in ["app", "lib/python3/site/pkg"] {
        out.push((format!("{pkg}/__pycache__/mod.cpython-311.pyc"), false));
        out.push((format!("{pkg}/big.so"), false));
        out.push((format!("{pkg}/docs.txt"), false));
        out.push((format!("{pkg}/mod.py"), true));
        out.push((format!("{pkg}/other.py"), false));
        out.push((format!("{pkg}/tests/test_mod.py"), true));
        out.push((format!("{pkg}/tests/data/big.bin"), true));
        out.push((format!("{pkg}/zz.py"), false));
    }
    out.push(("usr/include/x.h".into(), true));
    out.push(("usr/share/doc/app/README".into(), true));
    out.push(("usr/share/zoneinfo/UTC".into(), false));
    out
}

fn layer() -> Vec<(Vec<Op>, Comp)> {
    let mut ops: Vec<Op> = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (i, (path, _)) in files().iter().enumerate() {
        let mut at = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            at = if at.is_empty() {
                part.to_string()
            } else {
                format!("{at}/{part}")
            };
            if dirs.insert(at.clone()) {
                ops.push(Entry::dir(&at, 0o755).into());
            }
        }
        // Large files are chunked on their own; the rest are packed.
        let len = if path.contains("big") {
            300 << 10
        } else {
            3000 + i * 11
        };
        ops.push(Entry::file(path, 0o644, content(len, i + 1)).into());
    }
    vec![(ops, Comp::Gzip)]
}

#[test]
fn cold_files_go_after_the_rest_of_the_blob_and_unpack_alike() {
    let work = scratch("cold-last");
    let input = layer();
    let layer_files = write_layer_files(&work.path().join("layers"), &input);
    let expected = work.path().join("expected");
    reference(&input).materialize(&expected);

    for (tag, cold_last) in [("cold-last", true), ("tar-order", false)] {
        let layout = work.path().join(tag);
        let options = ConvertOptions {
            cold_last,
            ..options()
        };
        convert_layers(&layer_files, &layout, tag, options).unwrap();
        let actual = work.path().join(format!("unpacked-{tag}"));
        check_and_unpack(&layout, tag, &actual);
        assert_same_tree(&expected, &actual);

        let image = skiff_registry::skiff::open_image(&oci(&layout, tag)).unwrap();
        let b = Bootstrap::parse(&image.bootstrap).unwrap();
        // Every stored range (a chunk, or the shared frame holding it) and
        // whether a cold file uses it.
        let mut ranges: HashMap<u64, bool> = HashMap::new();
        for (path, cold) in files() {
            let id = b.resolve_path(path.as_bytes()).unwrap().unwrap();
            for rec in b.file_chunks(id).unwrap() {
                let c = b.chunk(rec.chunk_index()).unwrap();
                assert_eq!(c.blob_index, 0);
                if let Some(was) = ranges.insert(c.compressed_offset, cold) {
                    if cold_last {
                        assert_eq!(was, cold, "{path} shares a frame across lanes");
                    }
                }
            }
        }
        let last_hot = ranges.iter().filter(|r| !r.1).map(|r| *r.0).max().unwrap();
        let first_cold = ranges.iter().filter(|r| *r.1).map(|r| *r.0).min().unwrap();
        if cold_last {
            assert!(
                last_hot < first_cold,
                "hot data up to {last_hot}, cold from {first_cold}"
            );
        } else {
            assert!(first_cold < last_hot, "tar order interleaves them");
        }
    }
}
