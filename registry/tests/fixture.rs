//! The shared fixture image (`python`, an OCI layout made with skopeo):
//! resolve it and stream a real gzip layer with verification.
//!
//! The fixture is required, not optional: a missing fixture fails the test
//! with a message saying where it was looked for.

use std::io::Read;
use std::path::PathBuf;

use skiff_registry::{
    open_source, BlobStore, ImageRef, LayerCompression, LocalBlobStore, OciLayout,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("SKIFF_FIXTURE_IMAGES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/images"),
    };
    if dir.join("index.json").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "fixture OCI layout not found at {} (set SKIFF_FIXTURE_IMAGES to its directory)",
            dir.display()
        ))
    }
}

#[test]
fn python_fixture_resolves_and_streams() -> TestResult {
    let dir = fixture_dir()?;
    let layout = OciLayout::open(&dir)?;
    assert!(layout.tags()?.iter().any(|t| t == "python"));
    let (digest, bytes) = layout.resolve(Some("python"))?;

    let r = ImageRef::Oci {
        dir: dir.clone(),
        tag: Some("python".to_owned()),
    };
    let (img, opener) = open_source(&r, None)?;
    assert_eq!(img.manifest_digest, digest);
    assert_eq!(
        img.manifest,
        serde_json::from_slice::<serde_json::Value>(&bytes)?
    );
    assert!(!img.layers.is_empty());
    assert!(img.layers.iter().all(|l| l.diff_id.is_some()));
    assert_eq!(img.layers[0].compression(), LayerCompression::Gzip);

    let mut reader = opener.open_layer(0)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(Some(total), img.layers[0].size);

    // And through the blob store, a range of the same layer.
    let layer = img.layers[0].digest.ok_or("layer 0 has no digest")?;
    let store = LocalBlobStore::new(&dir)?;
    assert_eq!(Some(store.blob_size(&layer)?), img.layers[0].size);
    assert_eq!(store.read_range(&layer, 0, 2)?, vec![0x1f, 0x8b]);
    Ok(())
}
