//! Reading OCI image layouts as conversion sources.

mod common;

use std::fs;
use std::io::Read;

use common::*;
use serde_json::json;
use skiff_registry::{open_source, ImageRef, Platform, RegistryError};

fn oci(dir: &std::path::Path, tag: Option<&str>) -> ImageRef {
    ImageRef::Oci {
        dir: dir.to_path_buf(),
        tag: tag.map(str::to_owned),
    }
}

fn read_layer(
    opener: &dyn skiff_registry::LayerOpener,
    i: usize,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut v = Vec::new();
    opener.open_layer(i)?.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn tag_resolution_and_layers() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    init_layout(dir)?;
    let l0 = layer_tar("a", b"alpha");
    let l1 = layer_tar("b", b"beta");
    let a = image(dir, &[&l0, &l1], "amd64")?;
    let b = image(dir, &[&l1], "amd64")?;
    write_index(dir, vec![tagged(a.clone(), "a"), tagged(b.clone(), "b")])?;

    let (img, opener) = open_source(&oci(dir, Some("a")), None)?;
    assert_eq!(img.manifest_digest, digest_of(&a)?);
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.layers[0].digest, Some(skiff_registry::Digest::of(&l0)));
    assert_eq!(img.layers[0].diff_id, Some(skiff_registry::Digest::of(&l0)));
    assert_eq!(img.layers[1].size, Some(l1.len() as u64));
    assert_eq!(img.layers[0].media_type, LAYER_TAR);
    assert_eq!(img.config, config_for(&[&l0, &l1], "amd64"));
    assert_eq!(img.config_json()?["x-unknown-field"]["kept"], json!(true));
    assert_eq!(read_layer(opener.as_ref(), 0)?, l0);
    assert_eq!(read_layer(opener.as_ref(), 1)?, l1);
    assert!(opener.open_layer(2).is_err());

    let (img, _) = open_source(&oci(dir, Some("b")), None)?;
    assert_eq!(img.manifest_digest, digest_of(&b)?);

    // Several images and no tag: the error lists the tags.
    let err = open_source(&oci(dir, None), None)
        .err()
        .map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains("2 images") && err.contains("a, b"), "{err}");

    let err = open_source(&oci(dir, Some("zzz")), None).err();
    assert!(
        matches!(err, Some(RegistryError::NotFound(ref m)) if m.contains("no tag 'zzz'") && m.contains("a, b"))
    );
    Ok(())
}

#[test]
fn single_untagged_image_is_used() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    init_layout(dir)?;
    let a = image(dir, &[b"layer"], "amd64")?;
    write_index(dir, vec![a.clone()])?;
    let (img, _) = open_source(&oci(dir, None), None)?;
    assert_eq!(img.manifest_digest, digest_of(&a)?);
    Ok(())
}

#[test]
fn platform_selection() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    init_layout(dir)?;
    let amd = image(dir, &[b"amd"], "amd64")?;
    let arm = image(dir, &[b"arm"], "arm64")?;
    let idx = index_blob(
        dir,
        vec![
            with_platform(amd.clone(), "linux", "amd64"),
            with_platform(arm.clone(), "linux", "arm64"),
        ],
    )?;
    write_index(dir, vec![tagged(idx, "multi")])?;
    let r = oci(dir, Some("multi"));

    let p: Platform = "linux/arm64".parse()?;
    let (img, _) = open_source(&r, Some(&p))?;
    assert_eq!(img.manifest_digest, digest_of(&arm)?);
    let p: Platform = "linux/amd64".parse()?;
    let (img, _) = open_source(&r, Some(&p))?;
    assert_eq!(img.manifest_digest, digest_of(&amd)?);

    // The host default picks one of them on the usual hosts.
    let host = Platform::host();
    if host.architecture == "amd64" || host.architecture == "arm64" {
        assert!(open_source(&r, None).is_ok());
    }

    let p: Platform = "linux/s390x".parse()?;
    match open_source(&r, Some(&p)) {
        Err(RegistryError::NoMatchingPlatform {
            wanted, available, ..
        }) => {
            assert_eq!(wanted, "linux/s390x");
            assert_eq!(available, "linux/amd64, linux/arm64");
        }
        other => panic!(
            "expected NoMatchingPlatform, got {:?}",
            other.map(|(i, _)| i)
        ),
    }
    Ok(())
}

#[test]
fn nested_index() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    init_layout(dir)?;
    let amd = image(dir, &[b"amd"], "amd64")?;
    let arm = image(dir, &[b"arm"], "arm64")?;
    let inner = index_blob(
        dir,
        vec![
            with_platform(amd.clone(), "linux", "amd64"),
            with_platform(arm.clone(), "linux", "arm64"),
        ],
    )?;
    let outer = index_blob(dir, vec![inner])?;
    write_index(dir, vec![tagged(outer, "nested")])?;
    let p: Platform = "linux/arm64".parse()?;
    let (img, opener) = open_source(&oci(dir, Some("nested")), Some(&p))?;
    assert_eq!(img.manifest_digest, digest_of(&arm)?);
    assert_eq!(read_layer(opener.as_ref(), 0)?, b"arm");
    Ok(())
}

#[test]
fn missing_blobs() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    init_layout(dir)?;
    let a = image(dir, &[b"gone"], "amd64")?;
    write_index(dir, vec![tagged(a, "t")])?;
    let gone = skiff_registry::Digest::of(b"gone");
    fs::remove_file(dir.join("blobs/sha256").join(gone.to_hex()))?;
    let (_, opener) = open_source(&oci(dir, Some("t")), None)?;
    let err = opener
        .open_layer(0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains(&gone.oci()) && err.contains("missing"),
        "{err}"
    );

    // A missing config fails the open.
    let config = config_for(&[b"gone"], "amd64");
    fs::remove_file(
        dir.join("blobs/sha256")
            .join(skiff_registry::Digest::of(&config).to_hex()),
    )?;
    let err = open_source(&oci(dir, Some("t")), None)
        .err()
        .map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("missing"));

    // Not a layout at all.
    let err = open_source(&oci(&dir.join("nope"), None), None)
        .err()
        .map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("no oci-layout file"));
    Ok(())
}

#[test]
fn manifest_digest_lie_is_caught() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    init_layout(dir)?;
    let a = image(dir, &[b"x"], "amd64")?;
    let d = digest_of(&a)?;
    // Replace the manifest's content by another manifest of the same size.
    let path = dir.join("blobs/sha256").join(d.to_hex());
    let mut bytes = fs::read(&path)?;
    let pos = bytes.iter().position(|&b| b == b'2').unwrap_or(0);
    bytes[pos] = b'3';
    fs::write(&path, &bytes)?;
    write_index(dir, vec![tagged(a, "t")])?;
    match open_source(&oci(dir, Some("t")), None) {
        Err(e @ RegistryError::DigestMismatch { .. }) => {
            let m = e.to_string();
            assert!(m.contains(&format!("manifest says {d}")), "{m}");
            assert!(m.contains("oci:"), "{m}");
        }
        other => panic!("expected DigestMismatch, got {:?}", other.map(|(i, _)| i)),
    }
    Ok(())
}

/// Writes an image whose manifest describes `described` but whose layer blob
/// holds `actual` (written under the described digest).
fn lying_layer(dir: &std::path::Path, size: u64, actual: &[u8]) -> TestResult {
    init_layout(dir)?;
    let described: &[u8] = b"the real layer";
    let config = config_for(&[described], "amd64");
    let (cd, cs) = blob(dir, &config)?;
    let ld = skiff_registry::Digest::of(described);
    fs::write(dir.join("blobs/sha256").join(ld.to_hex()), actual)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", cd, cs),
        "layers": [descriptor(LAYER_TAR, ld, size)],
    });
    let (md, ms) = blob(dir, &serde_json::to_vec(&manifest)?)?;
    write_index(dir, vec![tagged(descriptor(MANIFEST, md, ms), "t")])?;
    Ok(())
}

#[test]
fn layer_digest_lie_is_caught_at_eof() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    lying_layer(dir, 14, b"the fake layer")?;
    let (img, opener) = open_source(&oci(dir, Some("t")), None)?;
    let mut r = opener.open_layer(0)?;
    let mut buf = Vec::new();
    let err = r.read_to_end(&mut buf).err();
    assert_eq!(
        err.as_ref().map(|e| e.kind()),
        Some(std::io::ErrorKind::InvalidData)
    );
    let m = err.map(|e| e.to_string()).unwrap_or_default();
    let ld = skiff_registry::Digest::of(b"the real layer");
    let actual = skiff_registry::Digest::of(b"the fake layer");
    assert_eq!(
        m,
        format!(
            "layer 0 ({ld}) of {}: digest mismatch: manifest says {ld}, content is {actual}",
            img.reference
        )
    );
    Ok(())
}

#[test]
fn layer_size_lie_is_caught() -> TestResult {
    for (size, content) in [(20u64, &b"the real layer"[..]), (5, &b"the real layer"[..])] {
        let tmp = tempfile::tempdir()?;
        lying_layer(tmp.path(), size, content)?;
        let (_, opener) = open_source(&oci(tmp.path(), Some("t")), None)?;
        let mut buf = Vec::new();
        let err = opener.open_layer(0)?.read_to_end(&mut buf).err();
        let m = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(m.contains("size mismatch"), "{m}");
        assert!(m.contains(&format!("manifest says {size} bytes")), "{m}");
    }
    Ok(())
}

#[test]
fn docker_transport_reports_an_unreachable_registry() -> TestResult {
    // A closed port on loopback: plain HTTP, connection refused, retried,
    // then an error naming the registry and the operation.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let r: ImageRef = format!("docker://127.0.0.1:{port}/library/busybox:latest").parse()?;
    let config = skiff_registry::RegistryConfig {
        use_docker_config: false,
        use_env_proxy: false,
        retry: skiff_registry::RetryConfig {
            max_attempts: 2,
            initial_backoff_ms: 1,
            max_backoff_ms: 1,
            deadline_ms: 5_000,
        },
        ..Default::default()
    };
    match skiff_registry::open_source_with(&r, None, &config) {
        Err(RegistryError::Network {
            registry, attempts, ..
        }) => {
            assert_eq!(registry, format!("127.0.0.1:{port}"));
            assert_eq!(attempts, 2);
        }
        other => panic!("expected a network error, got {:?}", other.map(|(i, _)| i)),
    }
    Ok(())
}
