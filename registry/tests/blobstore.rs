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

#[test]
fn reads_ranges_into_a_callers_buffer() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let w = OciLayoutWriter::open_or_create(tmp.path())?;
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let (d, n) = w.put_blob_bytes(&data)?;
    let store: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::new(tmp.path())?);
    // A used buffer, larger than the range: cleared, filled, its memory kept.
    let mut buf = vec![7u8; 4096];
    let ptr = buf.as_ptr();
    store.read_range_into(&d, 200, 300, &mut buf)?;
    assert_eq!(buf, data[200..500]);
    assert_eq!(
        buf.as_ptr(),
        ptr,
        "read into the buffer given, not a new one"
    );
    // A buffer smaller than the range grows.
    let mut small = vec![1u8; 10];
    store.read_range_into(&d, 0, n, &mut small)?;
    assert_eq!(small, data);
    // Past the end: an error, and no bytes that look like a range.
    let e = store.read_range_into(&d, n - 10, 11, &mut buf).err();
    assert!(e.is_some_and(|e| e.to_string().contains("too short")));
    Ok(())
}
