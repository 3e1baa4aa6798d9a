//! Acceptance: chunk dictionaries.
//!
//! Image A is converted; image B, which shares a big file with A and adds
//! new content, is converted with A as its chunk dictionary into a
//! different layout. B must reference A's chunks (`dict_chunks > 0`), hold a
//! copy of A's data blob and list it in its manifest, unpack correctly (also
//! after A's layout is gone), and its own new blob must be smaller than
//! B's blob converted without the dictionary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;

use common::*;
use serde_json::Value;
use skiff_format::{Bootstrap, ChunkHash};
use skiff_registry::skiff::open_image;

#[test]
fn a_chunk_dictionary_is_referenced_copied_and_listed() {
    let work = scratch("dict");
    let mut rng = Rng(77);
    let shared = rng.bytes(3 << 20);
    let a_layers = vec![(
        vec![
            Entry::file("usr/lib/libbig.so", 0o755, shared.clone()).into(),
            Entry::file("etc/a.conf", 0o644, rng.text(10_000)).into(),
        ],
        Comp::Gzip,
    )];
    let b_layers = vec![(
        vec![
            Entry::file("opt/app/libbig.so", 0o755, shared.clone()).into(),
            Entry::file("opt/app/new.bin", 0o755, rng.bytes(400_000)).into(),
            Entry::file("etc/b.conf", 0o644, rng.text(10_000)).into(),
        ],
        Comp::Zstd,
    )];
    let a_files = write_layer_files(&work.path().join("a-layers"), &a_layers);
    let b_files = write_layer_files(&work.path().join("b-layers"), &b_layers);

    let a_dir = work.path().join("a");
    let a = convert_layers(&a_files, &a_dir, "a", options()).unwrap();
    assert_eq!(a.blobs.len(), 1);
    let a_blob = a.blobs[0];

    // B without a dictionary, for comparison.
    let plain_dir = work.path().join("b-plain");
    let plain = convert_layers(&b_files, &plain_dir, "b", options()).unwrap();
    assert_eq!(plain.stats.dict_chunks, 0);
    assert_eq!(plain.blobs.len(), 1);

    // B with A as its dictionary.
    let b_dir = work.path().join("b");
    let b = convert_image(b_files.clone(), &b_dir, vec![oci(&a_dir, "a")], options())
        .unwrap_or_else(|e| panic!("converting with a dictionary: {e}"));
    assert!(
        b.stats.dict_chunks > 0,
        "no chunk came from the dictionary: {:?}",
        b.stats
    );
    assert!(
        b.blobs.contains(&a_blob),
        "B's blobs {:?} do not include A's {a_blob}",
        b.blobs
    );
    assert_eq!(b.blobs.len(), 2, "{:?}", b.blobs);
    let own: Vec<_> = b.blobs.iter().filter(|d| **d != a_blob).collect();
    assert_eq!(own.len(), 1);
    let own = *own[0];

    // A's blob was copied into B's layout, byte for byte.
    let b_blob_path = b_dir.join("blobs/sha256").join(a_blob.to_hex());
    assert_eq!(
        fs::read(&b_blob_path).unwrap(),
        fs::read(a_dir.join("blobs/sha256").join(a_blob.to_hex())).unwrap()
    );

    // B's manifest lists it (as a data blob), and its bootstrap's blob table.
    let image = open_image(&oci(&b_dir, "b")).unwrap();
    let layers = image.manifest["layers"].as_array().unwrap();
    let listed: Vec<&Value> = layers
        .iter()
        .filter(|l| l["digest"] == Value::String(a_blob.oci()))
        .collect();
    assert_eq!(listed.len(), 1, "{layers:?}");
    assert_eq!(listed[0]["mediaType"], skiff_registry::media::SKIFF_BLOB);
    assert_eq!(
        listed[0]["size"].as_u64(),
        Some(fs::metadata(&b_blob_path).unwrap().len())
    );
    let bs = Bootstrap::parse(&image.bootstrap).unwrap();
    let table: Vec<_> = (0..bs.blob_count())
        .map(|i| bs.blob(i).unwrap().digest)
        .collect();
    assert!(table.contains(&a_blob) && table.contains(&own));

    // B's own blob holds only what A did not have.
    let own_size = fs::metadata(b_dir.join("blobs/sha256").join(own.to_hex()))
        .unwrap()
        .len();
    let plain_size = fs::metadata(plain_dir.join("blobs/sha256").join(plain.blobs[0].to_hex()))
        .unwrap()
        .len();
    assert!(
        own_size + (2 << 20) < plain_size,
        "B's own blob ({own_size} bytes) is not much smaller than without the dictionary ({plain_size})"
    );
    assert!(b.stats.blob_bytes < plain.stats.blob_bytes);
    assert!(b.stats.unique_bytes < plain.stats.unique_bytes);

    // B is complete on its own: it checks and unpacks like the reference
    // with A's layout gone.
    fs::remove_dir_all(&a_dir).unwrap();
    let unpacked = work.path().join("unpacked");
    check_and_unpack(&b_dir, "b", &unpacked);
    let expected = work.path().join("expected");
    reference(&b_layers).materialize(&expected);
    assert_same_tree(&expected, &unpacked);
}

/// A dictionary that is not a Skiff image is a clear error, before
/// anything is published.
#[test]
fn a_bad_dictionary_is_refused() {
    let work = scratch("dict-bad");
    let files = write_layer_files(
        &work.path().join("layers"),
        &[(vec![Entry::file("f", 0o644, "x").into()], Comp::Tar)],
    );
    let dest = work.path().join("dest");
    let missing = work.path().join("no-such-layout");
    let err = skiff_converter::image::convert_image(skiff_converter::image::ConvertRequest {
        source: skiff_converter::image::SourceSpec::Layers {
            layers: files,
            config: None,
        },
        dest: oci(&dest, "t"),
        chunk_dicts: vec![oci(&missing, "x")],
        options: options(),
        progress: None,
        reuse: Default::default(),
        referrer: true,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("chunk dictionary"), "{err}");
    assert!(err.contains("no-such-layout"), "{err}");
    if dest.join("index.json").exists() {
        assert!(tags(&dest).is_empty());
    }
}

/// A dictionary converted before format 1.4 has SHA-256 chunk digests: a
/// BLAKE3 conversion against it is refused with the flag that fixes it, and
/// a SHA-256 conversion shares its chunks.
#[test]
fn a_dictionary_of_another_chunk_hash_is_refused_with_the_fix() {
    let work = scratch("dict-hash");
    let mut rng = Rng(78);
    let shared = rng.bytes(1 << 20);
    let layer = |extra: &str| {
        vec![(
            vec![
                Entry::file("lib/shared.so", 0o755, shared.clone()).into(),
                Entry::file(extra, 0o644, rng_text(extra)).into(),
            ],
            Comp::Gzip,
        )]
    };
    let a_files = write_layer_files(&work.path().join("a-layers"), &layer("etc/a"));
    let b_files = write_layer_files(&work.path().join("b-layers"), &layer("etc/b"));
    let sha256 = skiff_converter::ConvertOptions {
        chunk_hash: ChunkHash::Sha256,
        ..options()
    };
    let a_dir = work.path().join("a");
    convert_layers(&a_files, &a_dir, "a", sha256.clone()).unwrap();

    let refused = work.path().join("refused");
    let err = convert_image(b_files.clone(), &refused, vec![oci(&a_dir, "a")], options())
        .unwrap_err()
        .to_string();
    assert!(err.contains("chunk dictionary"), "{err}");
    assert!(err.contains("--chunk-hash sha256"), "{err}");
    if refused.join("index.json").exists() {
        assert!(tags(&refused).is_empty());
    }

    let b_dir = work.path().join("b");
    let b = convert_image(b_files, &b_dir, vec![oci(&a_dir, "a")], sha256).unwrap();
    assert!(b.stats.dict_chunks > 0, "{:?}", b.stats);
    let image = open_image(&oci(&b_dir, "b")).unwrap();
    let boot = Bootstrap::parse(&image.bootstrap).unwrap();
    assert_eq!(boot.chunk_hash(), ChunkHash::Sha256);
}

fn rng_text(seed: &str) -> Vec<u8> {
    seed.repeat(1000).into_bytes()
}

fn convert_image(
    layers: Vec<std::path::PathBuf>,
    dest: &std::path::Path,
    dicts: Vec<skiff_registry::ImageRef>,
    options: skiff_converter::ConvertOptions,
) -> Result<skiff_converter::image::ConvertResult, skiff_converter::ConvertError> {
    skiff_converter::image::convert_image(skiff_converter::image::ConvertRequest {
        source: skiff_converter::image::SourceSpec::Layers {
            layers,
            config: None,
        },
        dest: oci(dest, "b"),
        chunk_dicts: dicts,
        options,
        progress: None,
        reuse: Default::default(),
        referrer: true,
    })
}
