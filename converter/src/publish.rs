//! Building the OCI config and manifest of a converted image.
//!
//! Pure functions from the conversion's result to JSON bytes; writing them
//! (to an OCI layout or a registry) is the caller's business. Every map is
//! ordered (serde_json's default map is a `BTreeMap`), so the same input gives
//! the same bytes. docs/format.md ("The OCI image") describes the result.

use serde_json::{json, Map, Value};
use skiff_format::Digest;

use skiff_registry::media::{
    ANNOTATION_BLOB, ANNOTATION_BOOTSTRAP, ANNOTATION_BOOTSTRAP_DIGEST,
    ANNOTATION_BOOTSTRAP_VERSION, ANNOTATION_CHUNKING, ANNOTATION_SOURCE_DIFF_ID,
    ANNOTATION_SOURCE_MANIFEST, ANNOTATION_VERSION, OCI_CONFIG as MEDIA_CONFIG,
    OCI_MANIFEST as MEDIA_MANIFEST, SKIFF_BLOB as MEDIA_BLOB, SKIFF_BOOTSTRAP as MEDIA_BOOTSTRAP,
};

use crate::convert::{BlobOrigin, Converted};
use crate::error::ConvertError;

/// A blob as a manifest names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// The bootstrap layer: the bootstrap compressed as one zstd frame.
pub fn bootstrap_layer(bootstrap: &[u8]) -> Result<Vec<u8>, ConvertError> {
    // Level 9: a bootstrap is a few MB that every node fetches before it can
    // mount, so bytes count; but past 9 they barely move while the time
    // doubles, and this runs at the end of a conversion with nothing else
    // to overlap. The 17 MB bootstrap of 100,000 small files: level 9
    // 4.699 MB in 0.64 s, level 12 4.694 MB in 1.12 s, level 15 4.745 MB in
    // 3.05 s (zstd 1.5, this machine; two zstd workers gained nothing in a
    // whole conversion).
    zstd::bulk::compress(bootstrap, 9).map_err(|e| ConvertError::Io {
        context: "compressing the bootstrap".into(),
        source: e,
    })
}

/// The config of the converted image: the source config (runtime settings
/// and every field Skiff does not know kept), with `rootfs` and `history`
/// describing the Skiff layers.
pub fn build_config(
    source_config: Option<&[u8]>,
    converted: &Converted,
    bootstrap_digest: Digest,
) -> Result<Vec<u8>, ConvertError> {
    let mut config = match source_config {
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return Err(ConvertError::Invalid(
                    "the source image config is not a JSON object".into(),
                ))
            }
            Err(e) => {
                return Err(ConvertError::Invalid(format!(
                    "the source image config is not JSON: {e}"
                )))
            }
        },
        None => {
            let mut m = Map::new();
            m.insert("architecture".into(), json!(host_arch()));
            m.insert("os".into(), json!("linux"));
            m.insert("config".into(), json!({}));
            m
        }
    };
    let mut diff_ids: Vec<Value> = converted
        .blobs
        .iter()
        .map(|(b, _)| json!(b.digest.to_string()))
        .collect();
    diff_ids.push(json!(bootstrap_digest.to_string()));
    config.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut history: Vec<Value> = converted
        .blobs
        .iter()
        .map(|(_, origin)| match origin {
            BlobOrigin::Layer { source_diff_id } => json!({
                "created_by": format!("skiff convert: data blob of source layer {source_diff_id}"),
            }),
            BlobOrigin::Dictionary { .. } => json!({
                "created_by": "skiff convert: data blob shared with a chunk dictionary image",
            }),
        })
        .collect();
    history.push(json!({"created_by": "skiff convert: bootstrap"}));
    config.insert("history".into(), Value::Array(history));
    serde_json::to_vec(&Value::Object(config))
        .map_err(|e| ConvertError::Invalid(format!("serialising the config: {e}")))
}

/// The manifest of the converted image. `layer_records` is the settings
/// key and, per source layer, (diff ID, record blob, size): see
/// [`crate::reuse::ANNOTATION_LAYER_RECORDS`].
#[allow(clippy::too_many_arguments)]
pub fn build_manifest(
    converted: &Converted,
    config: Descriptor,
    bootstrap_layer: Descriptor,
    bootstrap_digest: Digest,
    source_manifest: Option<Digest>,
    chunking: &str,
    layer_records: Option<(&Digest, &[crate::reuse::RecordRef])>,
) -> Result<Vec<u8>, ConvertError> {
    let mut layers: Vec<Value> = converted
        .blobs
        .iter()
        .map(|(b, origin)| {
            let mut annotations = Map::new();
            annotations.insert(ANNOTATION_BLOB.into(), json!("true"));
            if let BlobOrigin::Layer { source_diff_id } = origin {
                annotations.insert(
                    ANNOTATION_SOURCE_DIFF_ID.into(),
                    json!(source_diff_id.to_string()),
                );
            }
            json!({
                "mediaType": MEDIA_BLOB,
                "digest": b.digest.to_string(),
                "size": b.size,
                "annotations": annotations,
            })
        })
        .collect();
    layers.push(json!({
        "mediaType": MEDIA_BOOTSTRAP,
        "digest": bootstrap_layer.digest.to_string(),
        "size": bootstrap_layer.size,
        "annotations": {
            ANNOTATION_BOOTSTRAP: "true",
            ANNOTATION_BOOTSTRAP_VERSION: format!("{}.{}", skiff_format::layout::VERSION_MAJOR, skiff_format::layout::VERSION_MINOR),
            ANNOTATION_BOOTSTRAP_DIGEST: bootstrap_digest.to_string(),
        },
    }));
    let mut annotations = Map::new();
    annotations.insert(ANNOTATION_VERSION.into(), json!(env!("CARGO_PKG_VERSION")));
    annotations.insert(ANNOTATION_CHUNKING.into(), json!(chunking));
    if let Some(m) = source_manifest {
        annotations.insert(ANNOTATION_SOURCE_MANIFEST.into(), json!(m.to_string()));
    }
    if let Some((settings, items)) = layer_records {
        if !items.is_empty() {
            annotations.insert(
                crate::reuse::ANNOTATION_LAYER_RECORDS.into(),
                json!(crate::reuse::records_annotation(items)),
            );
            annotations.insert(
                crate::reuse::ANNOTATION_LAYER_SETTINGS.into(),
                json!(settings.to_hex()),
            );
        }
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": config.digest.to_string(),
            "size": config.size,
        },
        "layers": layers,
        "annotations": annotations,
    });
    serde_json::to_vec(&manifest)
        .map_err(|e| ConvertError::Invalid(format!("serialising the manifest: {e}")))
}

/// `manifest` with `subject` (a descriptor of the source manifest) and
/// Skiff's `artifactType`, making it an OCI referrer of its source, and
/// with the `dev.skiff.platform` annotation when `platform` is given.
pub fn with_subject(
    manifest: &[u8],
    subject: Option<&Value>,
    platform: Option<&str>,
) -> Result<Vec<u8>, ConvertError> {
    let mut v: Value = serde_json::from_slice(manifest)
        .map_err(|e| ConvertError::Invalid(format!("the manifest just built: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ConvertError::Invalid(
            "the manifest just built is not an object".into(),
        ));
    };
    if let Some(s) = subject {
        obj.insert(
            "artifactType".into(),
            json!(skiff_registry::media::SKIFF_ARTIFACT_TYPE),
        );
        obj.insert("subject".into(), s.clone());
    }
    if let Some(p) = platform {
        if let Some(a) = obj.get_mut("annotations").and_then(Value::as_object_mut) {
            a.insert(skiff_registry::media::ANNOTATION_PLATFORM.into(), json!(p));
        }
    }
    serde_json::to_vec(&v)
        .map_err(|e| ConvertError::Invalid(format!("serialising the manifest: {e}")))
}

/// The OCI architecture name of this machine.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}
