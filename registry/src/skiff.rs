//! Opening a converted Skiff image by reference: its manifest, its bootstrap
//! and a [`BlobStore`] for its data blobs.
//!
//! Opening reads the manifest and the bootstrap layer and nothing else: data
//! blobs are read later, a chunk at a time, through the store. The bootstrap
//! layer is verified against its manifest digest, decompressed (bounded), and
//! verified again against the uncompressed digest the manifest annotates; its
//! blob table is cross-checked against the manifest so that an image that
//! needs a blob its manifest does not list is refused here, not at the first
//! read of a file.

use std::io::Read;
use std::sync::Arc;

use serde_json::Value;
use skiff_format::{Bootstrap, Digest};

use crate::media::{ANNOTATION_BOOTSTRAP_DIGEST, SKIFF_BOOTSTRAP as MEDIA_BOOTSTRAP};
use crate::{BlobStore, ImageRef, LocalBlobStore, OciLayout, RegistryError};

/// Largest bootstrap accepted (uncompressed): far above any real image, low
/// enough that a hostile layer cannot exhaust memory.
pub const MAX_BOOTSTRAP_SIZE: u64 = 4 << 30;

/// An opened Skiff image.
pub struct SkiffImage {
    /// The reference it was opened by.
    pub reference: String,
    /// Digest of its manifest.
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: Value,
    /// The bootstrap, uncompressed and verified.
    pub bootstrap: Vec<u8>,
    /// Digest of the uncompressed bootstrap.
    pub bootstrap_digest: Digest,
    /// Where the data blobs are read from.
    pub store: Arc<dyn BlobStore>,
}

fn invalid(reference: &str, message: impl std::fmt::Display) -> RegistryError {
    RegistryError::Invalid(format!("{reference}: {message}"))
}

/// Opens a Skiff image (`oci:DIR[:TAG]`).
pub fn open_image(reference: &ImageRef) -> Result<SkiffImage, RegistryError> {
    let name = reference.to_string();
    let ImageRef::Oci { dir, tag } = reference else {
        return Err(invalid(
            &name,
            "only oci:DIR[:TAG] images can be opened for now (docker:// comes with registry support)",
        ));
    };
    let layout = OciLayout::open(dir)?;
    let (manifest_digest, manifest_bytes) = layout.resolve(tag.as_deref())?;
    let manifest: Value = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| invalid(&name, format!("manifest is not JSON: {e}")))?;
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(&name, "manifest has no layers array"))?;
    let mut data_blobs = Vec::new();
    let mut bootstrap_layer = None;
    for layer in layers {
        let media = layer.get("mediaType").and_then(Value::as_str).unwrap_or("");
        let digest: Digest = layer
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&name, "a layer has no digest"))?
            .parse()
            .map_err(|e| invalid(&name, format!("a layer digest: {e}")))?;
        if media == MEDIA_BOOTSTRAP {
            if bootstrap_layer.is_some() {
                return Err(invalid(&name, "manifest has two bootstrap layers"));
            }
            bootstrap_layer = Some((digest, layer));
        } else {
            data_blobs.push(digest);
        }
    }
    let Some((bootstrap_layer_digest, layer)) = bootstrap_layer else {
        return Err(invalid(
            &name,
            format!("not a Skiff image: no layer of media type {MEDIA_BOOTSTRAP} (convert it with `skiff convert` first)"),
        ));
    };
    let compressed = layout.read_blob(&bootstrap_layer_digest)?;
    let mut bootstrap = Vec::new();
    zstd::stream::read::Decoder::new(compressed.as_slice())
        .map_err(|e| invalid(&name, format!("bootstrap layer: {e}")))?
        .take(MAX_BOOTSTRAP_SIZE + 1)
        .read_to_end(&mut bootstrap)
        .map_err(|e| invalid(&name, format!("bootstrap layer is not valid zstd: {e}")))?;
    if bootstrap.len() as u64 > MAX_BOOTSTRAP_SIZE {
        return Err(invalid(&name, "bootstrap is larger than 4 GiB"));
    }
    let bootstrap_digest = Digest::of(&bootstrap);
    if let Some(expected) = layer
        .get("annotations")
        .and_then(|a| a.get(ANNOTATION_BOOTSTRAP_DIGEST))
        .and_then(Value::as_str)
    {
        if expected != bootstrap_digest.to_string() {
            return Err(invalid(
                &name,
                format!("bootstrap decompresses to {bootstrap_digest}, but the manifest says {expected}"),
            ));
        }
    }
    let parsed =
        Bootstrap::parse(&bootstrap).map_err(|e| invalid(&name, format!("bootstrap: {e}")))?;
    for i in 0..parsed.blob_count() {
        let blob = parsed
            .blob(i)
            .map_err(|e| invalid(&name, format!("bootstrap: {e}")))?;
        if !data_blobs.contains(&blob.digest) {
            return Err(invalid(
                &name,
                format!(
                    "the bootstrap needs blob {} that the manifest does not list",
                    blob.digest
                ),
            ));
        }
    }
    Ok(SkiffImage {
        reference: name,
        manifest_digest,
        manifest,
        bootstrap,
        bootstrap_digest,
        store: Arc::new(LocalBlobStore::new(dir)?),
    })
}
