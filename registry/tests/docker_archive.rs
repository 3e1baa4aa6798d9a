//! Reading `docker save` archives as conversion sources.

mod common;

use std::io::Read;
use std::path::Path;

use common::*;
use serde_json::json;
use skiff_registry::{open_source, Digest, ImageRef, RegistryError};

fn add_file(b: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, name, data)
}

fn add_symlink(
    b: &mut tar::Builder<std::fs::File>,
    name: &str,
    target: &str,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_mtime(0);
    b.append_link(&mut h, name, target)
}

struct Archive {
    l0: Vec<u8>,
    l1: Vec<u8>,
    config_a: Vec<u8>,
}

/// Two images, legacy layout: `a:latest` (l0, l1) and `b:1` (l0 again,
/// through a symlink, as docker save writes shared layers).
fn legacy_archive(path: &Path) -> Result<Archive, Box<dyn std::error::Error>> {
    let l0 = layer_tar("etc/hostname", b"box\n");
    let l1 = layer_tar("bin/app", b"#!/bin/sh\n");
    let config_a = config_for(&[&l0, &l1], "amd64");
    let config_b = config_for(&[&l0], "amd64");
    let ca = Digest::of(&config_a).to_hex();
    let cb = Digest::of(&config_b).to_hex();
    let manifest = json!([
        {"Config": format!("{ca}.json"), "RepoTags": ["docker.io/library/a:latest"],
         "Layers": ["id0/layer.tar", "id1/layer.tar"]},
        {"Config": format!("{cb}.json"), "RepoTags": ["b:1"], "Layers": ["id2/layer.tar"]},
    ]);
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    add_file(&mut b, "id0/VERSION", b"1.0")?;
    add_file(&mut b, "id0/layer.tar", &l0)?;
    add_file(&mut b, "id1/layer.tar", &l1)?;
    add_symlink(&mut b, "id2/layer.tar", "../id0/layer.tar")?;
    add_file(&mut b, &format!("{ca}.json"), &config_a)?;
    add_file(&mut b, &format!("{cb}.json"), &config_b)?;
    add_file(&mut b, "manifest.json", &serde_json::to_vec(&manifest)?)?;
    add_file(&mut b, "repositories", b"{}")?;
    b.into_inner()?.sync_all()?;
    Ok(Archive { l0, l1, config_a })
}

fn read_all(r: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn legacy_archive_reads_back() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("img.tar");
    let a = legacy_archive(&path)?;
    let r: ImageRef = format!("docker-archive:{}:a:latest", path.display()).parse()?;
    let (img, opener) = open_source(&r, None)?;
    assert_eq!(img.config, a.config_a);
    assert_eq!(img.config_digest, Digest::of(&a.config_a));
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.layers[0].diff_id, Some(Digest::of(&a.l0)));
    assert_eq!(img.layers[1].diff_id, Some(Digest::of(&a.l1)));
    assert_eq!(img.layers[0].digest, None);
    assert_eq!(img.layers[0].size, Some(a.l0.len() as u64));
    assert_eq!(
        img.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar"
    );
    assert_eq!(read_all(&mut opener.open_layer(0)?)?, a.l0);
    assert_eq!(read_all(&mut opener.open_layer(1)?)?, a.l1);
    assert!(opener.open_layer(2).is_err());

    // Same archive, same synthesised manifest digest.
    let (again, _) = open_source(&r, None)?;
    assert_eq!(again.manifest_digest, img.manifest_digest);

    // The second image, by tag and by number; its layer is a symlink.
    for sel in ["b:1", "@1"] {
        let r: ImageRef = format!("docker-archive:{}:{sel}", path.display()).parse()?;
        let (img, opener) = open_source(&r, None)?;
        assert_eq!(img.layers.len(), 1);
        assert_eq!(read_all(&mut opener.open_layer(0)?)?, a.l0);
    }

    // Several images and no reference: the error lists the tags.
    let r: ImageRef = format!("docker-archive:{}", path.display()).parse()?;
    let m = open_source(&r, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(m.contains("docker.io/library/a:latest, b:1"), "{m}");

    let r: ImageRef = format!("docker-archive:{}:c:2", path.display()).parse()?;
    assert!(matches!(
        open_source(&r, None),
        Err(RegistryError::NotFound(_))
    ));
    Ok(())
}

#[test]
fn oci_style_archive_layer_digest_is_verified() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("img.tar");
    let real = layer_tar("f", b"real");
    let fake = layer_tar("f", b"fake");
    let config = config_for(&[&real], "arm64");
    let cd = Digest::of(&config).to_hex();
    let ld = Digest::of(&real).to_hex();
    let manifest = json!([{"Config": format!("blobs/sha256/{cd}"), "RepoTags": ["x:y"],
                           "Layers": [format!("blobs/sha256/{ld}")]}]);
    let mut b = tar::Builder::new(std::fs::File::create(&path)?);
    add_file(&mut b, &format!("blobs/sha256/{cd}"), &config)?;
    add_file(&mut b, &format!("blobs/sha256/{ld}"), &fake)?;
    add_file(&mut b, "manifest.json", &serde_json::to_vec(&manifest)?)?;
    b.into_inner()?.sync_all()?;

    let r: ImageRef = format!("docker-archive:{}", path.display()).parse()?;
    let (img, opener) = open_source(&r, None)?;
    assert_eq!(img.layers[0].digest, Some(Digest::of(&real)));
    let err = read_all(&mut opener.open_layer(0)?).err();
    let m = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(m.contains("digest mismatch"), "{m}");
    assert!(m.contains(&format!("layer 0 (sha256:{ld})")), "{m}");
    Ok(())
}

#[test]
fn bad_archives() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("none.tar");
    let r: ImageRef = format!("docker-archive:{}", path.display()).parse()?;
    assert!(matches!(
        open_source(&r, None),
        Err(RegistryError::Io { .. })
    ));

    let mut b = tar::Builder::new(std::fs::File::create(&path)?);
    add_file(&mut b, "hello", b"world")?;
    b.into_inner()?.sync_all()?;
    let m = open_source(&r, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(m.contains("manifest.json"), "{m}");
    Ok(())
}
