//! The snapshot labels that containerd clients send with the `Prepare` of
//! an image layer, and what they tell about the layer.
//!
//! containerd's unpacker always sends [`SNAPSHOT_REF`] (the layer's chain
//! ID, the name to commit it under) plus every annotation of the layer's
//! descriptor whose key starts with [`INHERITED_PREFIX`]. Which image and
//! layer it is comes from the client: `ctr-remote image rpull` adds the
//! `remote/stargz.*` annotations, the CRI plugin and nerdctl the `cri.*`
//! ones. `ctr image pull` sends nothing but the chain ID: its layers are
//! always unpacked by containerd.

use std::collections::BTreeMap;

/// The chain ID of the layer being prepared: the name to commit it under.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Prefix of the descriptor annotations containerd passes on as labels.
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";
/// `ctr-remote`: the image reference.
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// `ctr-remote`: the layer's (compressed) digest.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// `ctr-remote`: this layer's digest and those above it, comma-separated.
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// CRI / nerdctl: the image reference.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI / nerdctl: the layer's (compressed) digest.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// CRI / nerdctl: the image's manifest digest.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// CRI / nerdctl: the image's layer digests, comma-separated.
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// What the labels of a layer's `Prepare` say about the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    /// The chain ID to commit the layer under ([`SNAPSHOT_REF`]).
    pub target: String,
    /// The image reference as the client gave it (e.g.
    /// `registry.lan:5000/app:1`, `docker.io/library/python:3`).
    pub image_ref: String,
    /// The layer's digest in the manifest.
    pub layer_digest: String,
    /// The manifest digest, when the client sends it.
    pub manifest_digest: Option<String>,
    /// What the layer's own annotations say, when the image carries
    /// Skiff annotations under the inherited prefix.
    pub hint: Option<SkiffHint>,
}

/// A layer's role, as its (inherited) annotations tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkiffHint {
    /// A Skiff data blob.
    Blob,
    /// A Skiff bootstrap.
    Bootstrap,
}

impl LayerLabels {
    /// Reads the labels of a `Prepare`; `None` unless they name a target,
    /// an image and a layer.
    pub fn parse(labels: &BTreeMap<String, String>) -> Option<LayerLabels> {
        let get = |k: &str| labels.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let target = get(SNAPSHOT_REF)?;
        let image_ref = get(STARGZ_REFERENCE).or_else(|| get(CRI_IMAGE_REF))?;
        let layer_digest = get(STARGZ_DIGEST).or_else(|| get(CRI_LAYER_DIGEST))?;
        let hint = labels.iter().find_map(|(k, v)| {
            let key = k.strip_prefix(INHERITED_PREFIX)?;
            let is_true = v.trim() == "true";
            match key {
                "dev.skiff.bootstrap" | "skiff.bootstrap" | "skiff-bootstrap" if is_true => {
                    Some(SkiffHint::Bootstrap)
                }
                "dev.skiff.blob" | "skiff.blob" | "skiff-blob" if is_true => Some(SkiffHint::Blob),
                _ => None,
            }
        });
        Some(LayerLabels {
            target: target.to_owned(),
            image_ref: image_ref.to_owned(),
            layer_digest: layer_digest.to_owned(),
            manifest_digest: get(CRI_MANIFEST_DIGEST).map(str::to_owned),
            hint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn ctr_remote() {
        let l = LayerLabels::parse(&map(&[
            (SNAPSHOT_REF, "sha256:c"),
            (STARGZ_REFERENCE, "127.0.0.1:5000/a:b"),
            (STARGZ_DIGEST, "sha256:l"),
            (STARGZ_LAYERS, "sha256:l,sha256:m"),
        ]));
        assert_eq!(
            l,
            Some(LayerLabels {
                target: "sha256:c".into(),
                image_ref: "127.0.0.1:5000/a:b".into(),
                layer_digest: "sha256:l".into(),
                manifest_digest: None,
                hint: None,
            })
        );
    }

    #[test]
    fn cri_with_hint() -> Result<(), String> {
        let l = LayerLabels::parse(&map(&[
            (SNAPSHOT_REF, "sha256:c"),
            (CRI_IMAGE_REF, "docker.io/library/x:1"),
            (CRI_LAYER_DIGEST, "sha256:l"),
            (CRI_MANIFEST_DIGEST, "sha256:m"),
            ("containerd.io/snapshot/dev.skiff.bootstrap", "true"),
        ]))
        .ok_or("no labels")?;
        assert_eq!(l.manifest_digest.as_deref(), Some("sha256:m"));
        assert_eq!(l.hint, Some(SkiffHint::Bootstrap));
        Ok(())
    }

    #[test]
    fn plain_pull_has_no_layer_labels() {
        assert_eq!(
            LayerLabels::parse(&map(&[(SNAPSHOT_REF, "sha256:c")])),
            None
        );
        assert_eq!(LayerLabels::parse(&map(&[])), None);
    }
}
