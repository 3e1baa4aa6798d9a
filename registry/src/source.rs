//! Source images for the converter: the manifest, the raw config and the
//! layers of an image, wherever it is stored.
//!
//! [`open_source`] resolves an [`ImageRef`] to a [`SourceImage`] and a
//! [`LayerOpener`]. Everything read through a descriptor is verified: the
//! manifest and config at once, layers as they stream (the reader fails with
//! `InvalidData` at end of file if the bytes are not what the manifest says).
//!
//! The config is kept as raw bytes, so that a converter can carry every
//! field of it, known or not, into its output.

use std::collections::BTreeMap;
use std::io::Read;

use oci_spec::image::ImageManifest;
use serde_json::Value;
use skiff_format::Digest;

use crate::config::RegistryConfig;
use crate::layout::{to_digest, OciLayout, MAX_CONFIG_SIZE};
use crate::media::LayerCompression;
use crate::platform::Platform;
use crate::verify::VerifyingReader;
use crate::{docker_archive, ImageRef, RegistryError};

/// An image to convert: what its manifest and config say.
#[derive(Debug, Clone)]
pub struct SourceImage {
    /// The reference it was opened by, for messages (e.g. `oci:/img:tag`).
    pub reference: String,
    /// Digest of the manifest. For a `docker save` archive, which has no
    /// registry manifest, the digest of the Docker schema 2 manifest this
    /// crate synthesises for it (see [`SourceImage::manifest`]).
    pub manifest_digest: Digest,
    /// Size of the manifest in bytes (what a descriptor of it says).
    pub manifest_size: u64,
    /// The manifest as JSON (for a `docker save` archive, synthesised: its
    /// layer digests are those of the uncompressed layer tars).
    pub manifest: Value,
    /// Digest of the config.
    pub config_digest: Digest,
    /// The config, byte for byte as stored.
    pub config: Vec<u8>,
    /// The layers, bottom first.
    pub layers: Vec<LayerInfo>,
}

impl SourceImage {
    /// The config parsed as JSON (all fields kept).
    pub fn config_json(&self) -> Result<Value, RegistryError> {
        serde_json::from_slice(&self.config).map_err(|e| {
            RegistryError::Invalid(format!(
                "config {} of {}: not JSON: {e}",
                self.config_digest, self.reference
            ))
        })
    }
}

/// One layer of a source image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Its media type (for `docker save` archives always
    /// `application/vnd.docker.image.rootfs.diff.tar`: sniff the bytes).
    pub media_type: String,
    /// Digest of the layer as stored, when known (always for OCI layouts).
    pub digest: Option<Digest>,
    /// Size of the layer as stored, when known.
    pub size: Option<u64>,
    /// Digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: Option<Digest>,
    /// The descriptor's annotations.
    pub annotations: BTreeMap<String, String>,
}

impl LayerInfo {
    /// The compression its media type announces.
    pub fn compression(&self) -> LayerCompression {
        LayerCompression::from_media_type(&self.media_type)
    }
}

/// Opens the layers of a source image.
pub trait LayerOpener: Send + Sync {
    /// Streams layer `index` (bottom first) as stored, still compressed.
    ///
    /// The reader verifies the layer's digest and size, where known, as it
    /// streams: at end of file a mismatch makes `read` fail with
    /// `io::ErrorKind::InvalidData` and a message naming the layer, the
    /// image and both digests. Read to the end before trusting the data.
    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, RegistryError>;
}

/// Opens the image `r` for conversion. `platform` chooses a manifest from a
/// multi-platform index (default: linux and the host architecture).
///
/// `docker://` references are read from the registry with the configuration
/// of [`RegistryConfig::from_env`]; [`open_source_with`] takes one.
pub fn open_source(
    r: &ImageRef,
    platform: Option<&Platform>,
) -> Result<(SourceImage, Box<dyn LayerOpener>), RegistryError> {
    match r {
        ImageRef::Docker(_) => open_source_with(r, platform, &RegistryConfig::from_env()?),
        _ => open_source_with(r, platform, &RegistryConfig::default()),
    }
}

/// [`open_source`] with an explicit registry configuration (used for
/// `docker://` references only).
///
/// For `docker://`, the manifest (and the index, if the reference names one,
/// choosing `platform`) and the config are fetched and verified now; layers
/// stream from the registry when opened, verified as they stream, and a
/// broken connection resumes with a Range request where it stopped. Nothing
/// is stored locally.
pub fn open_source_with(
    r: &ImageRef,
    platform: Option<&Platform>,
    config: &RegistryConfig,
) -> Result<(SourceImage, Box<dyn LayerOpener>), RegistryError> {
    let host = Platform::host();
    let platform = platform.unwrap_or(&host);
    match r {
        ImageRef::Oci { dir, tag } => {
            let layout = OciLayout::open(dir)?;
            open_oci(layout, r.to_string(), tag.as_deref(), platform)
        }
        ImageRef::DockerArchive { path, reference } => {
            docker_archive::open(path, reference.as_deref(), r.to_string())
        }
        ImageRef::Docker(d) => crate::remote::open_docker_source(d, platform, config),
    }
}

/// One image of a multi-platform source: an entry of its index.
#[derive(Debug, Clone)]
pub struct PlatformEntry {
    /// Digest of the image manifest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type, as the index gives it.
    pub media_type: String,
    /// The entry's `platform` object as it stands (os, architecture,
    /// variant, os.version, os.features, and any other field).
    pub platform: Option<Value>,
    /// The entry's annotations as they stand.
    pub annotations: Option<Value>,
}

impl PlatformEntry {
    /// `os/arch[/variant]`, or `(no platform)`.
    pub fn platform_string(&self) -> String {
        let field = |k: &str| {
            self.platform
                .as_ref()
                .and_then(|p| p.get(k))
                .and_then(Value::as_str)
        };
        match (field("os"), field("architecture")) {
            (Some(os), Some(arch)) => match field("variant") {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            },
            _ => "(no platform)".to_owned(),
        }
    }

    /// Whether the entry is for `wanted`.
    pub fn matches(&self, wanted: &Platform) -> bool {
        let Some(p) = &self.platform else {
            return false;
        };
        let field = |k: &str| p.get(k).and_then(Value::as_str);
        match (field("os"), field("architecture")) {
            (Some(os), Some(arch)) => wanted.matches(os, arch, field("variant")),
            _ => false,
        }
    }

    /// Whether the entry is an image for a real platform: not an
    /// attestation or other artifact listed with `unknown/unknown`.
    pub fn is_image(&self) -> bool {
        crate::media::is_manifest(&self.media_type)
            && !self.platform.as_ref().is_some_and(|p| {
                p.get("os").and_then(Value::as_str) == Some("unknown")
                    || p.get("architecture").and_then(Value::as_str) == Some("unknown")
            })
    }
}

/// A multi-platform source: its index and the entries it lists.
#[derive(Debug, Clone)]
pub struct SourceIndex {
    /// Digest of the index (`None` when the entries are the tagged entries
    /// of a layout's `index.json` itself).
    pub digest: Option<Digest>,
    /// The index's own annotations.
    pub annotations: Option<Value>,
    /// Its entries, in order.
    pub entries: Vec<PlatformEntry>,
}

fn parse_entries(v: &Value, what: &str) -> Result<Vec<PlatformEntry>, RegistryError> {
    let Some(list) = v.get("manifests").and_then(Value::as_array) else {
        return Err(RegistryError::Invalid(format!(
            "{what}: not an image index (no manifests array)"
        )));
    };
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            let bad = |m: &str| RegistryError::Invalid(format!("{what}: manifests[{i}]: {m}"));
            let digest: Digest = d
                .get("digest")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("no sha256 digest"))?;
            Ok(PlatformEntry {
                digest,
                size: d
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("no size"))?,
                media_type: d
                    .get("mediaType")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                platform: d.get("platform").cloned().filter(Value::is_object),
                annotations: d.get("annotations").cloned().filter(Value::is_object),
            })
        })
        .collect()
}

/// If `r` names a multi-platform image (an OCI index or a Docker manifest
/// list, in a registry or an OCI layout): its index. `None` when it names
/// a single image (or a `docker save` archive).
pub fn source_index(
    r: &ImageRef,
    config: &RegistryConfig,
) -> Result<Option<SourceIndex>, RegistryError> {
    match r {
        ImageRef::DockerArchive { .. } => Ok(None),
        ImageRef::Docker(d) => {
            let client = crate::RegistryClient::new(d, config)?;
            let m = client.fetch_manifest(&d.manifest_reference(), None)?;
            let is_index = crate::media::is_index(&m.media_type)
                || (!crate::media::is_manifest(&m.media_type)
                    && crate::layout::looks_like_index(&m.bytes));
            if !is_index {
                return Ok(None);
            }
            let what = format!("index {} of docker://{d}", m.digest);
            let v: Value = serde_json::from_slice(&m.bytes)
                .map_err(|e| RegistryError::Invalid(format!("{what}: not JSON: {e}")))?;
            Ok(Some(SourceIndex {
                digest: Some(m.digest),
                annotations: v.get("annotations").cloned().filter(Value::is_object),
                entries: parse_entries(&v, &what)?,
            }))
        }
        ImageRef::Oci { dir, tag } => {
            let layout = OciLayout::open(dir)?;
            let index_path = dir.join("index.json");
            let top: Value = serde_json::to_value(layout.index()?)
                .map_err(|e| RegistryError::Invalid(format!("{}: {e}", index_path.display())))?;
            let all = parse_entries(&top, &index_path.display().to_string())?;
            let tagged: Vec<PlatformEntry> = all
                .into_iter()
                .filter(|e| match tag {
                    Some(t) => {
                        e.annotations
                            .as_ref()
                            .and_then(|a| a.get(crate::media::ANNOTATION_REF_NAME))
                            .and_then(Value::as_str)
                            == Some(t.as_str())
                    }
                    None => true,
                })
                .collect();
            match tagged.as_slice() {
                [one] if crate::media::is_index(&one.media_type) => {
                    let what = format!("index {} of {r}", one.digest);
                    let bytes = layout.read_blob(&one.digest)?;
                    if bytes.len() as u64 != one.size {
                        return Err(RegistryError::Invalid(format!(
                            "{what}: {} bytes, the descriptor says {}",
                            bytes.len(),
                            one.size
                        )));
                    }
                    let v: Value = serde_json::from_slice(&bytes)
                        .map_err(|e| RegistryError::Invalid(format!("{what}: not JSON: {e}")))?;
                    Ok(Some(SourceIndex {
                        digest: Some(one.digest),
                        annotations: v.get("annotations").cloned().filter(Value::is_object),
                        entries: parse_entries(&v, &what)?,
                    }))
                }
                several if several.len() > 1 && several.iter().all(|e| e.platform.is_some()) => {
                    Ok(Some(SourceIndex {
                        digest: None,
                        annotations: None,
                        entries: several.to_vec(),
                    }))
                }
                _ => Ok(None),
            }
        }
    }
}

/// Opens image manifest `entry` of `r`'s repository or layout as a source
/// (one platform of [`source_index`]).
pub fn open_source_entry(
    r: &ImageRef,
    entry: &PlatformEntry,
    config: &RegistryConfig,
) -> Result<(SourceImage, Box<dyn LayerOpener>), RegistryError> {
    match r {
        ImageRef::Docker(d) => {
            let client = crate::RegistryClient::new(d, config)?;
            let m = client.fetch_manifest(&entry.digest.oci(), Some(entry.size))?;
            crate::remote::open_docker_manifest(d, client, m)
        }
        ImageRef::Oci { dir, .. } => {
            let layout = OciLayout::open(dir)?;
            let bytes = layout.read_blob(&entry.digest)?;
            if bytes.len() as u64 != entry.size {
                return Err(RegistryError::Invalid(format!(
                    "manifest {} of {r}: {} bytes, the index says {}",
                    entry.digest,
                    bytes.len(),
                    entry.size
                )));
            }
            let image = r.to_string();
            let (source, blobs) =
                source_from_manifest(image.clone(), entry.digest, &bytes, |desc, what| {
                    layout.read_descriptor(desc, what, MAX_CONFIG_SIZE)
                })?;
            Ok((
                source,
                Box::new(OciLayerOpener {
                    layout,
                    image,
                    blobs,
                }),
            ))
        }
        ImageRef::DockerArchive { .. } => Err(RegistryError::Invalid(format!(
            "{r}: a docker-archive holds one image, not an index"
        ))),
    }
}

/// The `rootfs.diff_ids` of a config (empty if it has none).
pub(crate) fn diff_ids(config: &[u8], what: &str) -> Result<Vec<Digest>, RegistryError> {
    let v: Value = serde_json::from_slice(config)
        .map_err(|e| RegistryError::Invalid(format!("{what}: not JSON: {e}")))?;
    let Some(ids) = v.get("rootfs").and_then(|r| r.get("diff_ids")) else {
        return Ok(Vec::new());
    };
    let Some(ids) = ids.as_array() else {
        return Err(RegistryError::Invalid(format!(
            "{what}: rootfs.diff_ids is not an array"
        )));
    };
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            id.as_str()
                .and_then(|s| s.strip_prefix("sha256:"))
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| {
                    RegistryError::Invalid(format!(
                        "{what}: rootfs.diff_ids[{i}] is not a sha256 digest: {id}"
                    ))
                })
        })
        .collect()
}

fn open_oci(
    layout: OciLayout,
    image: String,
    tag: Option<&str>,
    platform: &Platform,
) -> Result<(SourceImage, Box<dyn LayerOpener>), RegistryError> {
    let (manifest_digest, manifest_bytes) = layout.resolve_for(tag, platform)?;
    let (source, blobs) = source_from_manifest(
        image.clone(),
        manifest_digest,
        &manifest_bytes,
        |desc, what| layout.read_descriptor(desc, what, MAX_CONFIG_SIZE),
    )?;
    Ok((
        source,
        Box::new(OciLayerOpener {
            layout,
            image,
            blobs,
        }),
    ))
}

/// Builds a [`SourceImage`] from a verified image manifest, fetching its
/// config (verified) with `fetch_config(descriptor, what)`. Returns the
/// layers' digests and sizes too.
///
/// Pure apart from `fetch_config`: this is where every source's manifest
/// and config (their `rootfs.diff_ids`) are parsed, so fuzz targets and
/// property tests feed it arbitrary documents. Anything malformed is an
/// error naming `image`, never a panic.
pub fn source_from_manifest(
    image: String,
    manifest_digest: Digest,
    manifest_bytes: &[u8],
    fetch_config: impl FnOnce(&oci_spec::image::Descriptor, &str) -> Result<Vec<u8>, RegistryError>,
) -> Result<(SourceImage, Vec<(Digest, u64)>), RegistryError> {
    let what = format!("manifest {manifest_digest} of {image}");
    let manifest: ImageManifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| RegistryError::Invalid(format!("{what}: not an image manifest: {e}")))?;
    let manifest_json: Value = serde_json::from_slice(manifest_bytes)
        .map_err(|e| RegistryError::Invalid(format!("{what}: not JSON: {e}")))?;
    let config_digest = to_digest(manifest.config().digest(), &what)?;
    let config_what = format!("config {config_digest} of {image}");
    let config = fetch_config(manifest.config(), &config_what)?;
    let ids = diff_ids(&config, &config_what)?;
    if !ids.is_empty() && ids.len() != manifest.layers().len() {
        return Err(RegistryError::Invalid(format!(
            "{image}: config lists {} diff_ids but the manifest has {} layers",
            ids.len(),
            manifest.layers().len()
        )));
    }
    let mut layers = Vec::with_capacity(manifest.layers().len());
    let mut blobs = Vec::with_capacity(manifest.layers().len());
    for (i, d) in manifest.layers().iter().enumerate() {
        let digest = to_digest(d.digest(), &format!("layer {i} of {image}"))?;
        blobs.push((digest, d.size()));
        layers.push(LayerInfo {
            media_type: d.media_type().to_string(),
            digest: Some(digest),
            size: Some(d.size()),
            diff_id: ids.get(i).copied(),
            annotations: d
                .annotations()
                .as_ref()
                .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
        });
    }
    let source = SourceImage {
        reference: image,
        manifest_digest,
        manifest_size: manifest_bytes.len() as u64,
        manifest: manifest_json,
        config_digest,
        config,
        layers,
    };
    Ok((source, blobs))
}

struct OciLayerOpener {
    layout: OciLayout,
    image: String,
    blobs: Vec<(Digest, u64)>,
}

impl LayerOpener for OciLayerOpener {
    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, RegistryError> {
        let Some(&(digest, size)) = self.blobs.get(index) else {
            return Err(RegistryError::NotFound(format!(
                "{} has no layer {index} (it has {})",
                self.image,
                self.blobs.len()
            )));
        };
        let file = self.layout.open_blob(&digest)?;
        Ok(Box::new(VerifyingReader::new(
            file,
            Some(digest),
            Some(size),
            format!("layer {index} ({digest}) of {}", self.image),
        )))
    }
}
