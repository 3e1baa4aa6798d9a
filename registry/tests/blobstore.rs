//! Range reads through `LocalBlobStore`.

mod common;

use std::sync::Arc;

use common::*;
use skiff_registry::{BlobStore, Digest, LocalBlobStore, OciLayoutWriter, RegistryError};

#[test]
fn reads_ranges() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let w = OciLayoutWriter::open_or_create(tmp.path())?;
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let (d, n) = w.put_blob_bytes(&data)?;
    let store: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::new(tmp.path())?);
    assert_eq!(store.blob_size(&d)?, n);
    assert_eq!(store.read_range(&d, 100, 50)?, data[100..150]);
    assert_eq!(store.read_range(&d, 0, n)?, data);
    assert_eq!(store.read_range(&d, n, 0)?, Vec::<u8>::new());
    // Reads from several threads share the cached handle.
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let store = Arc::clone(&store);
            let data = &data;
            s.spawn(move || {
                let got = store.read_range(&d, i * 1000, 1000).ok();
                assert_eq!(
                    got.as_deref(),
                    data.get((i * 1000) as usize..((i + 1) * 1000) as usize)
                );
            });
        }
    });

    // Past the end: an error naming the blob, never short data.
    let m = store
        .read_range(&d, n - 10, 11)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(m.contains(&d.oci()) && m.contains("too short"), "{m}");
    assert!(store.read_range(&d, u64::MAX, 2).is_err());

    let missing = Digest::of(b"missing");
    assert!(matches!(
        store.read_range(&missing, 0, 1),
        Err(RegistryError::NotFound(_))
    ));
    assert!(LocalBlobStore::new(tmp.path().join("nope")).is_err());
    Ok(())
}
