//! The manifest target: arbitrary bytes as image manifests, configs,
//! indexes and `docker save` archives.
//!
//! The input is split at its first three NUL bytes (JSON documents hold
//! none) into up to four parts, `p0\0p1\0p2\0p3`; missing parts are empty.
//! Every parser gets a turn:
//! - `manifest`: `p0` as an image manifest with `p1` as its config,
//!   through [`source_from_manifest`] (what every source goes through);
//! - `config`: `p0` as the config of a fixed, valid manifest with one layer
//!   (its `rootfs.diff_ids`), and as the source config the converter
//!   carries into its output ([`build_config`]);
//! - `index`: `p0` as a layout's `index.json`, resolved with and without a
//!   tag through [`resolve_index`], nested documents read from `p1`, `p2`,
//!   `p3` in turn;
//! - `archive`: a `docker save` tar holding `manifest.json` = `p0`,
//!   `config.json` = `p1` and `layer.tar` = `p2`, opened with
//!   [`open_source`] and its layer read to the end; and, for inputs of at
//!   least one tar block, the whole input as the archive file.
//!
//! Descriptors' digests are not checked against the parts (a fuzzer cannot
//! forge SHA-256): verification is the caller's job and tested elsewhere.

use std::io::{Read, Write};

use skiff_converter::publish::build_config;
use skiff_converter::{Converted, Stats};
use skiff_format::Digest;
use skiff_registry::{
    open_source, resolve_index, source_from_manifest, ImageRef, Platform, RegistryError,
};

use crate::Outcome;

/// The manifest used with `p0` as its config: one gzip layer.
pub const FIXED_MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}]}"#;

/// Runs every parser on `data`; see the module documentation.
pub fn manifest(data: &[u8]) -> Outcome {
    let mut parts = data.splitn(4, |&b| b == 0);
    let mut next = || parts.next().unwrap_or(&[]);
    let (p0, p1, p2, p3) = (next(), next(), next(), next());
    let mut out = Outcome::default();
    out.push("manifest", &image_manifest(p0, p1));
    out.push("config", &image_manifest(FIXED_MANIFEST.as_bytes(), p0));
    out.push("build_config", &converter_config(p0));
    for (step, tag) in [("index", None), ("index-tag", Some("latest"))] {
        out.push(step, &index(p0, tag, &[p1, p2, p3]));
    }
    out.push("archive", &docker_archive(&archive_of(p0, p1, p2)));
    if data.len() >= 512 {
        out.push("archive-raw", &docker_archive(data));
    }
    out
}

fn image_manifest(manifest: &[u8], config: &[u8]) -> Result<(), RegistryError> {
    let (source, blobs) =
        source_from_manifest("fuzz".into(), Digest::of(manifest), manifest, |_, _| {
            Ok(config.to_vec())
        })?;
    if source.layers.len() != blobs.len() {
        panic!(
            "{} layers but {} blobs from one manifest",
            source.layers.len(),
            blobs.len()
        );
    }
    if source.config != config {
        panic!("the source config is not the config bytes as fetched");
    }
    source.config_json()?;
    Ok(())
}

fn converter_config(config: &[u8]) -> Result<(), String> {
    let converted = Converted {
        bootstrap: Vec::new(),
        blobs: Vec::new(),
        layers: Vec::new(),
        stats: Stats::default(),
    };
    let out = build_config(Some(config), &converted, Digest::of(b"bootstrap"))
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => panic!("build_config wrote a config that is not JSON: {e}"),
    };
    if v.pointer("/rootfs/diff_ids/0").is_none() {
        panic!("build_config wrote a config without rootfs.diff_ids: {v}");
    }
    Ok(())
}

fn index(index: &[u8], tag: Option<&str>, nested: &[&[u8]]) -> Result<(), RegistryError> {
    let platform = Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: None,
    };
    let mut reads = nested.iter();
    let (_, bytes) = resolve_index("fuzz", "index.json", index, tag, &platform, |_, what| {
        reads
            .next()
            .map(|b| b.to_vec())
            .ok_or_else(|| RegistryError::NotFound(format!("{what}: no more parts")))
    })?;
    if !nested.contains(&bytes.as_slice()) {
        panic!("resolve_index returned bytes it was not given");
    }
    Ok(())
}

/// A `docker save` archive: `manifest.json`, `config.json`, `layer.tar`.
pub fn archive_of(manifest: &[u8], config: &[u8], layer: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        ("manifest.json", manifest),
        ("config.json", config),
        ("layer.tar", layer),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Writing to a Vec fails only on a name the header cannot hold.
        if b.append_data(&mut h, name, bytes).is_err() {
            return Vec::new();
        }
    }
    b.into_inner().unwrap_or_default()
}

fn docker_archive(archive: &[u8]) -> Result<(), String> {
    let mut file = tempfile::NamedTempFile::new().map_err(|e| format!("temp file: {e}"))?;
    file.write_all(archive)
        .map_err(|e| format!("temp file: {e}"))?;
    let r = ImageRef::DockerArchive {
        path: file.path().to_path_buf(),
        reference: None,
    };
    let (source, opener) = open_source(&r, None).map_err(|e| e.to_string())?;
    for i in 0..source.layers.len().min(4) {
        let mut layer = opener.open_layer(i).map_err(|e| e.to_string())?;
        let mut sink = Vec::new();
        layer
            .read_to_end(&mut sink)
            .map_err(|e| format!("layer {i}: {e}"))?;
    }
    Ok(())
}
