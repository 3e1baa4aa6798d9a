//! Which image a layer belongs to, and whether that image is a Skiff image.
//!
//! A [`Resolve`] turns the image reference of a layer's labels into the
//! image's manifest, reading the manifest and nothing else. An image is a
//! Skiff image when one of its layers is a Skiff bootstrap (media type
//! `application/vnd.oci.image.layer.skiff.bootstrap.v1+zstd`, or the annotation
//! `dev.skiff.bootstrap` = `true`); every other layer of it is a data blob.
//!
//! An ordinary image (a `docker://` reference whose manifest for the host
//! platform is not a Skiff image) is served lazily too when a Skiff image
//! is attached to that manifest as an OCI referrer (`skiff convert` does so;
//! found through the referrers API or the fallback tag, and checked to
//! name that very manifest as its `subject`): its layers are the
//! original's, the top one stands for the mounted Skiff image and the
//! lower ones are empty. Without such a referrer it is
//! [`Resolved::NotSkiff`] and containerd pulls it as usual.
//!
//! Resolving blocks (it may go to a registry): call it from
//! `spawn_blocking`, never from a runtime thread.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;
use skiff_registry::media::{ANNOTATION_BOOTSTRAP, SKIFF_BOOTSTRAP};
use skiff_registry::skiff::{find_skiff_referrer, is_skiff_manifest};
use skiff_registry::{Digest, ImageRef, OciLayout, Platform, RegistryClient, RegistryConfig};

use crate::keychain::Keychain;
use crate::Error;

/// A Skiff image, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkiffImageInfo {
    /// The image's ID: its manifest digest as a file name (`sha256-HEX`).
    pub id: String,
    /// The manifest digest (`sha256:HEX`).
    pub manifest_digest: String,
    /// What `skiff mount` mounts: the reference pinned to the manifest
    /// digest where the transport allows (`docker://HOST/REPO@sha256:...`).
    pub source: String,
    /// Digests of the data-blob layers.
    pub blobs: BTreeSet<String>,
    /// Digest of the bootstrap layer.
    pub bootstrap: String,
    /// The manifest digest the reference resolved to: this image's own, or
    /// the original's when the image was found as its referrer.
    pub resolved: String,
    /// When the image was found as a referrer of an ordinary image: the
    /// original's layer digests, bottom first. Containerd prepares those;
    /// the top one stands for the whole Skiff image.
    pub original_layers: Option<Vec<String>>,
}

/// The role of a layer in a Skiff image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRole {
    /// A data blob.
    Blob,
    /// The bootstrap.
    Bootstrap,
}

impl SkiffImageInfo {
    /// The role of the layer with digest `digest`, if it is one of this image's.
    pub fn role(&self, digest: &str) -> Option<LayerRole> {
        if let Some(layers) = &self.original_layers {
            return if layers.last().is_some_and(|top| top == digest) {
                Some(LayerRole::Bootstrap)
            } else if layers.iter().any(|l| l == digest) {
                Some(LayerRole::Blob)
            } else {
                None
            };
        }
        if digest == self.bootstrap {
            Some(LayerRole::Bootstrap)
        } else if self.blobs.contains(digest) {
            Some(LayerRole::Blob)
        } else {
            None
        }
    }
}

/// What an image reference resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A Skiff image.
    Skiff(Arc<SkiffImageInfo>),
    /// Any other image: its layers are unpacked by containerd.
    NotSkiff,
}

/// Resolves image references (blocking).
pub trait Resolve: Send + Sync + 'static {
    /// Resolves `image_ref` (as sent in labels: `HOST/REPO:TAG`, or with a
    /// transport: `docker://...`, `oci:DIR:TAG`).
    fn resolve(&self, image_ref: &str) -> Result<Resolved, Error>;
}

/// The reference `skiff mount` understands for a label's image reference:
/// references with a transport (`docker://`, `oci:`) as they are, the
/// others as `docker://` references.
pub fn image_source(image_ref: &str) -> Result<ImageRef, Error> {
    let text = if image_ref.starts_with("docker://") || image_ref.starts_with("oci:") {
        image_ref.to_owned()
    } else {
        format!("docker://{image_ref}")
    };
    text.parse().map_err(|e| Error::Image {
        reference: image_ref.to_owned(),
        message: format!("not an image reference: {e}"),
    })
}

/// Reads a manifest: a Skiff image, or not.
pub fn classify(manifest: &Value, manifest_digest: &Digest, source: String) -> Resolved {
    let Some(layers) = manifest.get("layers").and_then(Value::as_array) else {
        return Resolved::NotSkiff;
    };
    let mut blobs = BTreeSet::new();
    let mut bootstrap = None;
    for layer in layers {
        let Some(digest) = layer.get("digest").and_then(Value::as_str) else {
            return Resolved::NotSkiff;
        };
        let media = layer.get("mediaType").and_then(Value::as_str).unwrap_or("");
        let annotated = layer
            .get("annotations")
            .and_then(|a| a.get(ANNOTATION_BOOTSTRAP))
            .and_then(Value::as_str)
            == Some("true");
        if media == SKIFF_BOOTSTRAP || annotated {
            if bootstrap.is_some() {
                return Resolved::NotSkiff;
            }
            bootstrap = Some(digest.to_owned());
        } else {
            blobs.insert(digest.to_owned());
        }
    }
    let Some(bootstrap) = bootstrap else {
        return Resolved::NotSkiff;
    };
    let text = manifest_digest.to_string();
    Resolved::Skiff(Arc::new(SkiffImageInfo {
        id: text.replace(':', "-"),
        resolved: text.clone(),
        manifest_digest: text,
        source,
        blobs,
        bootstrap,
        original_layers: None,
    }))
}

/// A Skiff image found as a referrer of an ordinary image: `skiff` is the
/// Skiff manifest (already checked against the original), `source` the
/// reference that mounts it; `original` and `original_digest` the manifest
/// the image reference resolved to. `NotSkiff` when either is malformed.
pub fn classify_referrer(
    skiff: &Value,
    skiff_digest: &Digest,
    source: String,
    original: &Value,
    original_digest: &Digest,
) -> Resolved {
    let Resolved::Skiff(info) = classify(skiff, skiff_digest, source) else {
        return Resolved::NotSkiff;
    };
    let Some(layers) = original
        .get("layers")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|d| d.get("digest").and_then(Value::as_str).map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
    else {
        return Resolved::NotSkiff;
    };
    let mut info = (*info).clone();
    info.resolved = original_digest.to_string();
    info.original_layers = Some(layers);
    Resolved::Skiff(Arc::new(info))
}

/// The [`Resolve`] of the snapshotter: `oci:` layouts on disk, `docker://`
/// registries through Skiff's registry client (manifest only).
#[derive(Debug, Clone)]
pub struct RegistryResolver {
    config: RegistryConfig,
    keychain: Option<Arc<Keychain>>,
}

impl RegistryResolver {
    /// A resolver reaching registries with `config`.
    pub fn new(config: RegistryConfig) -> RegistryResolver {
        RegistryResolver {
            config,
            keychain: None,
        }
    }

    /// Uses the credentials `keychain` holds for an image's repository
    /// before those of the configuration.
    pub fn with_keychain(mut self, keychain: Arc<Keychain>) -> RegistryResolver {
        self.keychain = Some(keychain);
        self
    }
}

impl Resolve for RegistryResolver {
    fn resolve(&self, image_ref: &str) -> Result<Resolved, Error> {
        let reference = image_source(image_ref)?;
        let bad = |e: skiff_registry::RegistryError| Error::Image {
            reference: image_ref.to_owned(),
            message: e.to_string(),
        };
        let (digest, bytes, source) = match &reference {
            ImageRef::Oci { dir, tag } => {
                let layout = OciLayout::open(dir).map_err(bad)?;
                let (digest, bytes) = layout.resolve(tag.as_deref()).map_err(bad)?;
                (digest, bytes, reference.to_string())
            }
            ImageRef::Docker(d) => {
                let kept = self
                    .keychain
                    .as_ref()
                    .and_then(|k| k.get(&d.registry, &d.repository));
                let client = match kept {
                    Some(creds) => {
                        let mut config = self.config.clone();
                        config.auths.insert(d.registry.clone(), creds);
                        RegistryClient::new(d, &config)
                    }
                    None => RegistryClient::new(d, &self.config),
                }
                .map_err(bad)?;
                let m = client.resolve_manifest(d, &Platform::host()).map_err(bad)?;
                let mut pinned = d.clone();
                pinned.tag = None;
                if !is_skiff_manifest(&m.bytes) {
                    return resolve_referrer(&client, &pinned, image_ref, &m.digest, &m.bytes);
                }
                pinned.digest = Some(m.digest);
                (m.digest, m.bytes, format!("docker://{pinned}"))
            }
            ImageRef::DockerArchive { .. } => {
                return Err(Error::Image {
                    reference: image_ref.to_owned(),
                    message: "docker-archive: images cannot be mounted".into(),
                })
            }
        };
        let manifest: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Image {
            reference: image_ref.to_owned(),
            message: format!("manifest {digest} is not JSON: {e}"),
        })?;
        Ok(classify(&manifest, &digest, source))
    }
}

/// An ordinary image's manifest (`digest`, `bytes`): the Skiff image
/// attached to it as a referrer, or `NotSkiff` when it has none (the
/// registry was asked, the answer is final). `repo` is the repository
/// without tag or digest.
fn resolve_referrer(
    client: &RegistryClient,
    repo: &skiff_registry::DockerRef,
    image_ref: &str,
    digest: &Digest,
    bytes: &[u8],
) -> Result<Resolved, Error> {
    let bad = |e: skiff_registry::RegistryError| Error::Image {
        reference: image_ref.to_owned(),
        message: e.to_string(),
    };
    let (referrers, via) = client.referrers(digest).map_err(bad)?;
    let Some(found) = find_skiff_referrer(client, digest, &referrers).map_err(bad)? else {
        tracing::debug!(
            image = %image_ref,
            "manifest {digest}: no Skiff referrer (through {via}); containerd pulls it"
        );
        return Ok(Resolved::NotSkiff);
    };
    let parse = |b: &[u8], what: &str| {
        serde_json::from_slice::<Value>(b).map_err(|e| Error::Image {
            reference: image_ref.to_owned(),
            message: format!("{what} is not JSON: {e}"),
        })
    };
    let original = parse(bytes, "the manifest")?;
    let skiff = parse(&found.bytes, "the Skiff referrer")?;
    let mut pinned = repo.clone();
    pinned.digest = Some(found.digest);
    tracing::info!(
        image = %image_ref,
        "manifest {digest}: Skiff referrer {} (through {via})",
        found.digest
    );
    Ok(classify_referrer(
        &skiff,
        &found.digest,
        format!("docker://{pinned}"),
        &original,
        digest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn sources() -> Result<(), Error> {
        assert_eq!(
            image_source("127.0.0.1:5000/a/b:c")?.to_string(),
            "docker://127.0.0.1:5000/a/b:c"
        );
        assert!(matches!(image_source("oci:/x:y")?, ImageRef::Oci { .. }));
        assert!(image_source("docker://UPPER CASE").is_err());
        Ok(())
    }

    #[test]
    fn skiff_manifest() {
        let m = serde_json::json!({
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.skiff.blob.v1", "digest": "sha256:b1"},
                {"mediaType": "application/vnd.oci.image.layer.skiff.blob.v1", "digest": "sha256:b2"},
                {"mediaType": SKIFF_BOOTSTRAP, "digest": "sha256:bs"},
            ]
        });
        let Resolved::Skiff(info) = classify(&m, &digest("m"), "oci:/x".into()) else {
            panic!("not classified as Skiff");
        };
        assert_eq!(info.role("sha256:b2"), Some(LayerRole::Blob));
        assert_eq!(info.role("sha256:bs"), Some(LayerRole::Bootstrap));
        assert_eq!(info.role("sha256:zz"), None);
        assert!(info.id.starts_with("sha256-"));
    }

    #[test]
    fn referrer_stands_for_the_original_layers() {
        let skiff = serde_json::json!({
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.skiff.blob.v1", "digest": "sha256:b1"},
                {"mediaType": SKIFF_BOOTSTRAP, "digest": "sha256:bs"},
            ]
        });
        let original = serde_json::json!({
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:l1"},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:l2"},
            ]
        });
        let Resolved::Skiff(info) = classify_referrer(
            &skiff,
            &digest("s"),
            "docker://r/x@sha256:s".into(),
            &original,
            &digest("o"),
        ) else {
            panic!("not classified as Skiff");
        };
        assert_eq!(info.role("sha256:l1"), Some(LayerRole::Blob));
        assert_eq!(info.role("sha256:l2"), Some(LayerRole::Bootstrap));
        assert_eq!(info.role("sha256:bs"), None);
        assert_eq!(info.resolved, digest("o").to_string());
        assert_eq!(info.manifest_digest, digest("s").to_string());
        assert_eq!(info.bootstrap, "sha256:bs");
        assert_eq!(
            classify_referrer(
                &skiff,
                &digest("s"),
                "x".into(),
                &serde_json::json!({"layers": []}),
                &digest("o")
            ),
            Resolved::NotSkiff
        );
    }

    #[test]
    fn plain_manifest() {
        let m = serde_json::json!({
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:l"}]
        });
        assert_eq!(classify(&m, &digest("m"), "x".into()), Resolved::NotSkiff);
        assert_eq!(
            classify(&serde_json::json!({}), &digest("m"), "x".into()),
            Resolved::NotSkiff
        );
    }
}
