//! Writing OCI image layouts.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;

use common::*;
use skiff_registry::{Digest, OciLayout, OciLayoutWriter, RegistryError};

fn blob_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(dir.join("blobs/sha256"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    v.sort();
    Ok(v)
}

fn manifest(n: u32) -> Vec<u8> {
    format!(r#"{{"schemaVersion":2,"mediaType":"{MANIFEST}","n":{n}}}"#).into_bytes()
}

#[test]
fn creates_a_valid_layout() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("out");
    let w = OciLayoutWriter::open_or_create(&dir)?;
    assert_eq!(
        fs::read_to_string(dir.join("oci-layout"))?,
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    assert!(dir.join("blobs/sha256").is_dir());
    assert!(OciLayout::open(&dir)?.tags()?.is_empty());
    // Reopening an existing layout works and keeps it.
    let (d, n) = w.put_blob_bytes(b"data")?;
    assert_eq!((d, n), (Digest::of(b"data"), 4));
    let w2 = OciLayoutWriter::open_or_create(&dir)?;
    assert!(w2.has_blob(&d));
    assert_eq!(w2.reader().read_blob(&d)?, b"data");
    Ok(())
}

#[test]
fn refuses_a_foreign_layout_version() -> TestResult {
    let tmp = tempfile::tempdir()?;
    fs::write(
        tmp.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"2.0.0"}"#,
    )?;
    let m = OciLayoutWriter::open_or_create(tmp.path())
        .err()
        .map(|e| e.to_string());
    assert!(m.unwrap_or_default().contains("2.0.0"));
    Ok(())
}

#[test]
fn tag_update_keeps_other_tags() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let w = OciLayoutWriter::open_or_create(tmp.path())?;
    let d1 = w.set_tag("one", &manifest(1), MANIFEST)?;
    let d2 = w.set_tag("two", &manifest(2), MANIFEST)?;
    let d3 = w.set_tag("one", &manifest(3), MANIFEST)?;
    assert_ne!(d1, d3);
    let r = OciLayout::open(tmp.path())?;
    assert_eq!(r.tags()?, vec!["one", "two"]);
    assert_eq!(r.resolve(Some("one"))?, (d3, manifest(3)));
    assert_eq!(r.resolve(Some("two"))?, (d2, manifest(2)));
    // The old manifest blob stays (unreferenced) but is no longer tagged.
    assert!(r.has_blob(&d1));
    // No temp files left behind.
    assert!(!fs::read_dir(tmp.path())?.any(|e| e
        .map(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .unwrap_or(false)));
    assert!(matches!(
        w.set_tag("bad/tag", &manifest(4), MANIFEST),
        Err(RegistryError::InvalidReference { .. })
    ));
    assert!(w.set_tag("x", b"not json", MANIFEST).is_err());
    Ok(())
}

#[test]
fn unknown_index_fields_are_kept() -> TestResult {
    let tmp = tempfile::tempdir()?;
    init_layout(tmp.path())?;
    fs::write(
        tmp.path().join("index.json"),
        r#"{"schemaVersion":2,"annotations":{"k":"v"},"manifests":[]}"#,
    )?;
    let w = OciLayoutWriter::open_or_create(tmp.path())?;
    w.set_tag("t", &manifest(1), MANIFEST)?;
    let v: serde_json::Value = serde_json::from_slice(&fs::read(tmp.path().join("index.json"))?)?;
    assert_eq!(v["annotations"]["k"], "v");
    Ok(())
}

#[test]
fn dropped_blob_writer_leaves_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let w = OciLayoutWriter::open_or_create(tmp.path())?;
    {
        let mut b = w.blob_writer()?;
        b.write_all(&vec![7u8; 1 << 20])?;
        assert_eq!(b.size(), 1 << 20);
        assert_eq!(blob_names(tmp.path())?.len(), 1); // the temp file
    }
    assert!(blob_names(tmp.path())?.is_empty());

    let mut b = w.blob_writer()?;
    b.write_all(b"committed")?;
    let (d, n) = b.commit()?;
    assert_eq!((d, n), (Digest::of(b"committed"), 9));
    assert_eq!(blob_names(tmp.path())?, vec![d.to_hex()]);
    // Writing the same blob again is a no-op.
    let mut b = w.blob_writer()?;
    b.write_all(b"committed")?;
    assert_eq!(b.commit()?, (d, n));
    assert_eq!(blob_names(tmp.path())?, vec![d.to_hex()]);
    Ok(())
}

#[test]
fn copy_blob_verifies() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let w = OciLayoutWriter::open_or_create(tmp.path())?;
    let good = Digest::of(b"content");
    assert!(matches!(
        w.copy_blob_from(&b"contenT"[..], &good, 7),
        Err(RegistryError::DigestMismatch { .. })
    ));
    assert!(matches!(
        w.copy_blob_from(&b"content"[..], &good, 6),
        Err(RegistryError::SizeMismatch { .. })
    ));
    assert!(blob_names(tmp.path())?.is_empty());
    w.copy_blob_from(&b"content"[..], &good, 7)?;
    assert_eq!(blob_names(tmp.path())?, vec![good.to_hex()]);
    Ok(())
}

#[test]
fn same_input_same_bytes() -> TestResult {
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let tmp = tempfile::tempdir()?;
        let w = OciLayoutWriter::open_or_create(tmp.path())?;
        w.put_blob_bytes(b"layer")?;
        w.set_tag("b", &manifest(2), MANIFEST)?;
        w.set_tag("a", &manifest(1), MANIFEST)?;
        w.set_tag("b", &manifest(3), MANIFEST)?;
        let index = fs::read(tmp.path().join("index.json"))?;
        outputs.push((index, blob_names(tmp.path())?));
    }
    assert_eq!(outputs[0], outputs[1]);
    let expected = format!(
        concat!(
            r#"{{"manifests":[{{"annotations":{{"org.opencontainers.image.ref.name":"b"}},"#,
            r#""digest":"{}","mediaType":"{}","size":{}}},"#,
            r#"{{"annotations":{{"org.opencontainers.image.ref.name":"a"}},"#,
            r#""digest":"{}","mediaType":"{}","size":{}}}],"schemaVersion":2}}"#
        ),
        Digest::of(&manifest(3)),
        MANIFEST,
        manifest(3).len(),
        Digest::of(&manifest(1)),
        MANIFEST,
        manifest(1).len()
    );
    assert_eq!(String::from_utf8_lossy(&outputs[0].0), expected);
    Ok(())
}
