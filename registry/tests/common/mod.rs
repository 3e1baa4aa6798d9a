//! Builders for test images: OCI layouts and `docker save` archives,
//! written by hand so the tests do not depend on the code under test.

#![allow(dead_code)]

use std::fs;
use std::path::Path;

use serde_json::{json, Value};
use skiff_registry::Digest;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Creates `oci-layout` and `blobs/sha256`.
pub fn init_layout(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
}

/// Writes a blob; returns its digest and size.
pub fn blob(dir: &Path, bytes: &[u8]) -> std::io::Result<(Digest, u64)> {
    let d = Digest::of(bytes);
    fs::write(dir.join("blobs/sha256").join(d.to_hex()), bytes)?;
    Ok((d, bytes.len() as u64))
}

pub fn descriptor(media_type: &str, d: Digest, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": d.oci(), "size": size})
}

/// A config whose diff_ids are the digests of `layers`.
pub fn config_for(layers: &[&[u8]], arch: &str) -> Vec<u8> {
    let ids: Vec<String> = layers.iter().map(|l| Digest::of(l).oci()).collect();
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ids},
        "x-unknown-field": {"kept": true},
    }))
    .unwrap_or_default()
}

/// Writes an image (config + plain-tar layers + manifest); returns the
/// manifest's descriptor.
pub fn image(dir: &Path, layers: &[&[u8]], arch: &str) -> std::io::Result<Value> {
    let config = config_for(layers, arch);
    let (cd, cs) = blob(dir, &config)?;
    let mut ls = Vec::new();
    for l in layers {
        let (d, s) = blob(dir, l)?;
        ls.push(descriptor(LAYER_TAR, d, s));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", cd, cs),
        "layers": ls,
    });
    let bytes = serde_json::to_vec(&manifest).unwrap_or_default();
    let (md, ms) = blob(dir, &bytes)?;
    Ok(descriptor(MANIFEST, md, ms))
}

/// Adds a ref name annotation to a descriptor.
pub fn tagged(mut desc: Value, tag: &str) -> Value {
    desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    desc
}

/// Adds a platform to a descriptor.
pub fn with_platform(mut desc: Value, os: &str, arch: &str) -> Value {
    desc["platform"] = json!({"os": os, "architecture": arch});
    desc
}

/// Writes an index blob; returns its descriptor.
pub fn index_blob(dir: &Path, manifests: Vec<Value>) -> std::io::Result<Value> {
    let bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": INDEX, "manifests": manifests
    }))
    .unwrap_or_default();
    let (d, s) = blob(dir, &bytes)?;
    Ok(descriptor(INDEX, d, s))
}

/// Writes the top-level `index.json`.
pub fn write_index(dir: &Path, manifests: Vec<Value>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))
        .unwrap_or_default();
    fs::write(dir.join("index.json"), bytes)
}

/// The digest string of a descriptor.
pub fn digest_of(desc: &Value) -> Result<Digest, Box<dyn std::error::Error>> {
    Ok(desc["digest"].as_str().unwrap_or_default().parse()?)
}

/// A small tar holding one file, as layer content.
pub fn layer_tar(name: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    let _ = b.append_data(&mut h, name, content);
    b.into_inner().unwrap_or_default()
}
