//! The Additional Layer Store's model: what containers/storage asks for,
//! what a Skiff image answers, and what `skiff store` keeps across restarts.
//!
//! containers/storage (overlay driver, `additionallayerstore=PATH:ref`)
//! looks a layer up at `PATH/BASE64(REF)/KEY/` and wants three names there:
//! `diff` (the layer's tree, used as an overlay lower directory), `info`
//! (JSON decoded into its `Layer` record) and `blob` (the layer blob, read
//! when the layer is pushed or saved). `REF` is the image reference as
//! containers/image names it (`host/repo:tag`), `BASE64` the standard
//! alphabet with padding, so a `/` of the encoding splits it into several
//! path components ([`RefPath`] joins them again). `KEY` is a
//! [`LayerKey`]: with containers/storage 1.43 (podman 4.3) the manifest
//! layer's digest; newer versions (podman >= 5.1) look layers up by a TOC
//! digest from the layer's annotations instead (docs/podman.md).
//!
//! A Skiff image has one merged tree, so its layers map onto what the
//! overlay driver stacks as: the top layer (the bootstrap) has the whole
//! merged tree as `diff`, every data-blob layer an empty `diff`. The stack
//! shows exactly the merged tree: the lower layers add nothing, and since
//! they hold nothing, no whiteout or opaque directory of the top layer
//! could hide anything (the merged tree has none anyway: the converter
//! applied them). Each layer's `diff-digest` is the image config's
//! `rootfs.diff_ids` entry, so containers/storage names its layers (chain
//! IDs) as it would for a download.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// Longest base64 reference accepted (a reference is at most 4096 bytes
/// by the distribution spec's limits on names and tags).
const MAX_REF_B64: usize = 8192;

/// The key of a layer directory below a reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerKey {
    /// The manifest layer's digest (`sha256:HEX`): containers/storage up to
    /// 1.53 (podman 4.x, 5.0).
    Digest(String),
}

impl LayerKey {
    /// The key a directory name spells, if any.
    pub fn parse(name: &str) -> Option<LayerKey> {
        let hex = name.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| LayerKey::Digest(name.to_owned()))
    }

    /// The directory name.
    pub fn name(&self) -> &str {
        match self {
            LayerKey::Digest(d) => d,
        }
    }
}

/// A reference directory's accumulated base64 text (one or more path
/// components joined with `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefPath(pub String);

impl RefPath {
    /// Whether `name` may be (part of) a base64 reference component.
    pub fn is_component(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_REF_B64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'=')
    }

    /// The path one component further down.
    pub fn join(&self, name: &str) -> Option<RefPath> {
        let joined = format!("{}/{name}", self.0);
        (joined.len() <= MAX_REF_B64).then_some(RefPath(joined))
    }

    /// The reference it encodes, when it is complete and valid text.
    pub fn reference(&self) -> Option<String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        // A reference has no spaces or control characters; refuse anything
        // else before it reaches a parser or a log line.
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic())).then_some(text)
    }

    /// The base64 path of `reference`.
    pub fn of(reference: &str) -> RefPath {
        RefPath(base64::engine::general_purpose::STANDARD.encode(reference))
    }
}

/// One layer of a Skiff image as the store serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreLayer {
    /// The manifest layer's digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// The config's `rootfs.diff_ids` entry for it.
    pub diff_id: String,
}

/// A Skiff image known to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreImage {
    /// What `skiff mount` mounts (`docker://HOST/REPO@sha256:...`).
    pub source: String,
    /// The manifest layers in order; the last one is the bootstrap.
    pub layers: Vec<StoreLayer>,
    /// Uses announced by containers/storage (`use` created) minus releases
    /// (the layer directory removed); the image is unmounted at zero.
    pub uses: i64,
    /// The PID of its `skiff mount` keeper, when mounted.
    pub pid: Option<i32>,
}

impl StoreImage {
    /// The index of the layer with key `key`.
    pub fn layer(&self, key: &LayerKey) -> Option<usize> {
        match key {
            LayerKey::Digest(d) => self.layers.iter().position(|l| &l.digest == d),
        }
    }

    /// Whether layer `index` is the top one (the bootstrap: the merged tree).
    pub fn is_top(&self, index: usize) -> bool {
        index + 1 == self.layers.len()
    }

    /// The `info` file of layer `index`: the fields of containers/storage's
    /// `Layer` record that describe the blob (`compressed-diff-digest`,
    /// `compressed-size`) and its content (`diff-digest`, the config's
    /// diff ID). `compression` is left out (0, uncompressed): containers/
    /// storage then hands the blob out as it is.
    pub fn info(&self, index: usize) -> Option<Vec<u8>> {
        let l = self.layers.get(index)?;
        serde_json::to_vec(&serde_json::json!({
            "compressed-diff-digest": l.digest,
            "compressed-size": l.size,
            "diff-digest": l.diff_id,
        }))
        .ok()
    }
}

/// Builds a [`StoreImage`] from a Skiff image's manifest and config: every
/// manifest layer with the config's diff ID at the same position, the
/// bootstrap last.
pub fn store_image(
    reference: &str,
    source: String,
    manifest: &Value,
    config: &Value,
    bootstrap: &str,
) -> Result<StoreImage, Error> {
    let bad = |message: String| Error::Image {
        reference: reference.to_owned(),
        message,
    };
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the manifest has no layers".into()))?;
    let diff_ids = config
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the config has no rootfs.diff_ids".into()))?;
    if diff_ids.len() != layers.len() {
        return Err(bad(format!(
            "{} layers but {} diff IDs in the config",
            layers.len(),
            diff_ids.len()
        )));
    }
    let mut out = Vec::with_capacity(layers.len());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let digest = layer.get("digest").and_then(Value::as_str);
        let size = layer.get("size").and_then(Value::as_u64);
        let diff_id = diff_id.as_str();
        let (Some(digest), Some(size), Some(diff_id)) = (digest, size, diff_id) else {
            return Err(bad(
                "a layer without digest or size, or a diff ID that is not text".into(),
            ));
        };
        if LayerKey::parse(digest).is_none() || LayerKey::parse(diff_id).is_none() {
            return Err(bad(format!(
                "layer {digest} or diff ID {diff_id} is not a sha256 digest"
            )));
        }
        out.push(StoreLayer {
            digest: digest.to_owned(),
            size,
            diff_id: diff_id.to_owned(),
        });
    }
    if out.last().map(|l| l.digest.as_str()) != Some(bootstrap) {
        return Err(bad("the bootstrap is not the last layer".into()));
    }
    Ok(StoreImage {
        source,
        layers: out,
        uses: 0,
        pid: None,
    })
}

/// What `skiff store` keeps in `ROOT/store.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    /// Images by ID (`sha256-HEX` of the manifest).
    pub images: BTreeMap<String, StoreImage>,
    /// Image IDs each reference resolved to (a tag may move: every image
    /// still known under it stays reachable through it).
    pub refs: BTreeMap<String, BTreeSet<String>>,
}

/// Name of the state file in the root directory.
pub const STATE_FILE: &str = "store.json";

impl StoreState {
    /// Reads the state of `root` (empty when there is none).
    pub fn load(root: &Path) -> Result<StoreState, Error> {
        let path = root.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Metadata {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreState::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Writes the state of `root` atomically (temporary file, rename).
    pub fn save(&self, root: &Path) -> Result<(), Error> {
        let path = root.join(STATE_FILE);
        let tmp = root.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Metadata {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    /// The image known under `reference` that has a layer keyed `key`, and
    /// the layer's index.
    pub fn find(&self, reference: &str, key: &LayerKey) -> Option<(String, usize)> {
        self.refs.get(reference)?.iter().find_map(|id| {
            let index = self.images.get(id)?.layer(key)?;
            Some((id.clone(), index))
        })
    }

    /// Forgets image `id` (and the references that led only to it).
    pub fn forget(&mut self, id: &str) {
        self.images.remove(id);
        for ids in self.refs.values_mut() {
            ids.remove(id);
        }
        self.refs.retain(|_, ids| !ids.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn reference_paths() {
        let r = "127.0.0.1:5077/fixture:skiff";
        let p = RefPath::of(r);
        assert_eq!(p.0, "MTI3LjAuMC4xOjUwNzcvZml4dHVyZTpza2lmZg==");
        assert_eq!(p.reference().as_deref(), Some(r));
        // An encoding with a `/` arrives as two components.
        let r2 = "quay.io/a/b?:x";
        let whole = RefPath::of(r2).0;
        let (a, b) = whole.split_once('/').unwrap_or((&whole, ""));
        if !b.is_empty() {
            assert!(RefPath::is_component(a) && RefPath::is_component(b));
            let joined = RefPath(a.to_owned()).join(b);
            assert_eq!(joined.and_then(|j| j.reference()).as_deref(), Some(r2));
        }
        assert!(!RefPath::is_component("sha256:x"));
        assert_eq!(RefPath("not base64!".into()).reference(), None);
        assert_eq!(RefPath(RefPath::of("a b").0).reference(), None);
    }

    #[test]
    fn layer_keys() {
        assert_eq!(
            LayerKey::parse(D1).map(|k| k.name().to_owned()).as_deref(),
            Some(D1)
        );
        assert_eq!(LayerKey::parse("sha256:11"), None);
        assert_eq!(LayerKey::parse("diff"), None);
        assert_eq!(LayerKey::parse(&D1.to_uppercase()), None);
    }

    fn manifest() -> (Value, Value) {
        let m = serde_json::json!({"layers": [
            {"digest": D1, "size": 10},
            {"digest": D2, "size": 20},
        ]});
        let c = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [D1, D3]}});
        (m, c)
    }

    #[test]
    fn images_and_info() -> Result<(), Error> {
        let (m, c) = manifest();
        let img = store_image("r", "docker://r@x".into(), &m, &c, D2)?;
        assert_eq!(img.layer(&LayerKey::Digest(D2.into())), Some(1));
        assert!(img.is_top(1) && !img.is_top(0));
        let info: Value = serde_json::from_slice(&img.info(1).unwrap_or_default())
            .map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(info["compressed-diff-digest"], D2);
        assert_eq!(info["compressed-size"], 20);
        assert_eq!(info["diff-digest"], D3);
        // The bootstrap must be on top; counts must agree.
        assert!(store_image("r", "s".into(), &m, &c, D1).is_err());
        let short = serde_json::json!({"rootfs": {"diff_ids": [D1]}});
        assert!(store_image("r", "s".into(), &m, &short, D2).is_err());
        Ok(())
    }

    #[test]
    fn state_round_trip_and_forget() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Internal(e.to_string()))?;
        let (m, c) = manifest();
        let mut st = StoreState::default();
        st.images
            .insert("sha256-a".into(), store_image("r", "s".into(), &m, &c, D2)?);
        st.refs
            .entry("r:1".into())
            .or_default()
            .insert("sha256-a".into());
        st.save(dir.path())?;
        let back = StoreState::load(dir.path())?;
        assert_eq!(back, st);
        assert_eq!(
            back.find("r:1", &LayerKey::Digest(D1.into())),
            Some(("sha256-a".into(), 0))
        );
        assert_eq!(back.find("r:2", &LayerKey::Digest(D1.into())), None);
        st.forget("sha256-a");
        assert!(st.images.is_empty() && st.refs.is_empty());
        Ok(())
    }
}
