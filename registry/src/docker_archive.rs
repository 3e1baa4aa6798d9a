//! `docker save` archives (`docker-archive:FILE[:REF]`).
//!
//! The archive is a tar with a `manifest.json` listing its images
//! (`[{"Config": ..., "RepoTags": [...], "Layers": [...]}]`). Layers are
//! `<id>/layer.tar` (uncompressed, legacy) or `blobs/sha256/<hex>` (Docker
//! 25 and later, which also write an OCI layout beside it; `manifest.json`
//! is used in both cases for uniformity). Legacy archives may store a layer
//! once and point at it with symlinks or hard links.
//!
//! The tar is indexed once (entry name to data offset and size); each layer
//! is then read as a bounded region of the file. A layer's digest is known,
//! and verified, only if its path is `blobs/sha256/<hex>`; the converter
//! checks every layer against its diff ID from the config.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::json;
use skiff_format::Digest;

use crate::layout::{read_bounded, verify_bytes, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE};
use crate::media;
use crate::reference::DockerRef;
use crate::source::{diff_ids, LayerInfo, LayerOpener, SourceImage};
use crate::verify::VerifyingReader;
use crate::RegistryError;

/// How many links are followed to reach a file.
const MAX_LINK_HOPS: usize = 16;

#[derive(Debug, Clone)]
enum Entry {
    File { offset: u64, size: u64 },
    Link(String),
}

#[derive(Deserialize)]
struct ArchiveImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Normalises a path inside the archive: no `./`, no trailing `/`, `..`
/// resolved. `None` if it climbs out of the archive.
fn normalise(p: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?.to_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

struct TarIndex {
    path: PathBuf,
    entries: HashMap<String, Entry>,
}

impl TarIndex {
    fn build(path: &Path) -> Result<TarIndex, RegistryError> {
        let io_err = |e| RegistryError::io(path, e);
        let file = File::open(path).map_err(io_err)?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut entries = HashMap::new();
        for entry in archive.entries_with_seek().map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let Some(name) = entry.path().ok().and_then(|p| normalise(&p)) else {
                continue;
            };
            let kind = entry.header().entry_type();
            let value = if kind.is_file() {
                Entry::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                }
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Some(target) = entry.link_name().ok().flatten() else {
                    continue;
                };
                let resolved = if kind.is_symlink() && !target.is_absolute() {
                    Path::new(&name)
                        .parent()
                        .unwrap_or(Path::new(""))
                        .join(&target)
                } else {
                    target.to_path_buf()
                };
                match normalise(&resolved) {
                    Some(t) => Entry::Link(t),
                    None => continue,
                }
            } else {
                continue;
            };
            entries.insert(name, value);
        }
        Ok(TarIndex {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The (offset, size) of file `name`, following links.
    fn lookup(&self, name: &str) -> Result<(u64, u64), RegistryError> {
        let Some(mut current) = normalise(Path::new(name)) else {
            return Err(self.missing(name));
        };
        for _ in 0..MAX_LINK_HOPS {
            match self.entries.get(&current) {
                Some(Entry::File { offset, size }) => return Ok((*offset, *size)),
                Some(Entry::Link(target)) => current = target.clone(),
                None => return Err(self.missing(name)),
            }
        }
        Err(RegistryError::Invalid(format!(
            "{}: too many links to reach {name}",
            self.path.display()
        )))
    }

    fn missing(&self, name: &str) -> RegistryError {
        RegistryError::NotFound(format!(
            "{}: no file '{name}' in the archive",
            self.path.display()
        ))
    }

    fn read(&self, name: &str, max: u64) -> Result<Vec<u8>, RegistryError> {
        let (offset, size) = self.lookup(name)?;
        if size > max {
            return Err(RegistryError::Invalid(format!(
                "{}: '{name}' is {size} bytes, above the {max}-byte limit",
                self.path.display()
            )));
        }
        let bytes = read_bounded(region(&self.path, offset, size)?, max, &self.path)?;
        if bytes.len() as u64 != size {
            return Err(RegistryError::Invalid(format!(
                "{}: '{name}' is truncated ({} of {size} bytes)",
                self.path.display(),
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

fn region(path: &Path, offset: u64, size: u64) -> Result<impl Read + Send, RegistryError> {
    let mut file = File::open(path).map_err(|e| RegistryError::io(path, e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| RegistryError::io(path, e))?;
    Ok(file.take(size))
}

/// The digest a file name announces: `blobs/sha256/<hex>` or `<hex>.json`.
fn digest_in_name(name: &str) -> Option<Digest> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    if hex.contains('/') {
        return None;
    }
    hex.parse().ok()
}

fn layer_digest_in_name(name: &str) -> Option<Digest> {
    name.strip_prefix("blobs/sha256/")?.parse().ok()
}

/// Whether `wanted` names `repo_tag` (exactly, or once both are normalised
/// as registry references, with `latest` as the default tag).
fn same_image(wanted: &str, repo_tag: &str) -> bool {
    if wanted == repo_tag {
        return true;
    }
    let norm = |s: &str| {
        s.parse::<DockerRef>().ok().map(|mut r| {
            if r.tag.is_none() && r.digest.is_none() {
                r.tag = Some("latest".to_owned());
            }
            r.to_string()
        })
    };
    matches!((norm(wanted), norm(repo_tag)), (Some(a), Some(b)) if a == b)
}

fn select<'a>(
    images: &'a [ArchiveImage],
    reference: Option<&str>,
    image: &str,
) -> Result<&'a ArchiveImage, RegistryError> {
    let all_tags = || {
        let tags: Vec<&str> = images
            .iter()
            .flat_map(|i| i.repo_tags.iter().flatten().map(String::as_str))
            .collect();
        if tags.is_empty() {
            "(none)".to_owned()
        } else {
            tags.join(", ")
        }
    };
    match reference {
        None => match images {
            [] => Err(RegistryError::NotFound(format!(
                "{image}: manifest.json lists no images"
            ))),
            [only] => Ok(only),
            _ => Err(RegistryError::Invalid(format!(
                "{image}: the archive holds {} images; name one with docker-archive:FILE:REF or :@N (tags: {})",
                images.len(),
                all_tags()
            ))),
        },
        Some(r) => {
            if let Some(n) = r.strip_prefix('@') {
                let i: usize = n.parse().map_err(|_| RegistryError::InvalidReference {
                    reference: image.to_owned(),
                    reason: format!("'@{n}' is not an image number"),
                })?;
                return images.get(i).ok_or_else(|| {
                    RegistryError::NotFound(format!(
                        "{image}: no image @{i} (the archive holds {})",
                        images.len()
                    ))
                });
            }
            images
                .iter()
                .find(|i| i.repo_tags.iter().flatten().any(|t| same_image(r, t)))
                .ok_or_else(|| {
                    RegistryError::NotFound(format!(
                        "{image}: no image tagged '{r}' in the archive; tags: {}",
                        all_tags()
                    ))
                })
        }
    }
}

/// Opens a `docker save` archive; `image` is the reference for messages.
pub(crate) fn open(
    path: &Path,
    reference: Option<&str>,
    image: String,
) -> Result<(SourceImage, Box<dyn LayerOpener>), RegistryError> {
    let index = TarIndex::build(path)?;
    let manifest_bytes = index.read("manifest.json", MAX_MANIFEST_SIZE)?;
    let images: Vec<ArchiveImage> = serde_json::from_slice(&manifest_bytes).map_err(|e| {
        RegistryError::Invalid(format!(
            "{}: manifest.json is not a docker save manifest: {e}",
            path.display()
        ))
    })?;
    let chosen = select(&images, reference, &image)?;

    let config = index.read(&chosen.config, MAX_CONFIG_SIZE)?;
    let config_digest = Digest::of(&config);
    let config_what = format!("config {} of {image}", chosen.config);
    if let Some(expected) = digest_in_name(&chosen.config) {
        verify_bytes(&config, &expected, None, &config_what)?;
    }
    let ids = diff_ids(&config, &config_what)?;
    if ids.len() != chosen.layers.len() {
        return Err(RegistryError::Invalid(format!(
            "{image}: config lists {} diff_ids but manifest.json has {} layers",
            ids.len(),
            chosen.layers.len()
        )));
    }

    let mut layers = Vec::with_capacity(chosen.layers.len());
    let mut regions = Vec::with_capacity(chosen.layers.len());
    let mut manifest_layers = Vec::with_capacity(chosen.layers.len());
    for (i, name) in chosen.layers.iter().enumerate() {
        let (offset, size) = index.lookup(name)?;
        let digest = layer_digest_in_name(name);
        let diff_id = ids.get(i).copied();
        regions.push(Region {
            name: name.clone(),
            offset,
            size,
            digest,
        });
        // Uncompressed layer tars: their digest is their diff ID.
        let shown = digest.or(diff_id).map(|d| d.oci());
        manifest_layers.push(json!({
            "mediaType": media::DOCKER_LAYER_TAR,
            "size": size,
            "digest": shown,
        }));
        layers.push(LayerInfo {
            media_type: media::DOCKER_LAYER_TAR.to_owned(),
            digest,
            size: Some(size),
            diff_id,
            annotations: Default::default(),
        });
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::DOCKER_MANIFEST,
        "config": {
            "mediaType": media::DOCKER_CONFIG,
            "size": config.len(),
            "digest": config_digest.oci(),
        },
        "layers": manifest_layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest)
        .map_err(|e| RegistryError::Invalid(format!("{image}: {e}")))?;
    let manifest_digest = Digest::of(&manifest_bytes);
    let source = SourceImage {
        reference: image.clone(),
        manifest_digest,
        manifest_size: manifest_bytes.len() as u64,
        manifest,
        config_digest,
        config,
        layers,
    };
    Ok((
        source,
        Box::new(ArchiveLayerOpener {
            path: path.to_path_buf(),
            image,
            regions,
        }),
    ))
}

struct Region {
    name: String,
    offset: u64,
    size: u64,
    digest: Option<Digest>,
}

struct ArchiveLayerOpener {
    path: PathBuf,
    image: String,
    regions: Vec<Region>,
}

impl LayerOpener for ArchiveLayerOpener {
    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, RegistryError> {
        let Some(r) = self.regions.get(index) else {
            return Err(RegistryError::NotFound(format!(
                "{} has no layer {index} (it has {})",
                self.image,
                self.regions.len()
            )));
        };
        let what = match r.digest {
            Some(d) => format!("layer {index} ({d}) of {}", self.image),
            None => format!("layer {index} ({}) of {}", r.name, self.image),
        };
        // The size check also catches an archive truncated mid-layer.
        Ok(Box::new(VerifyingReader::new(
            region(&self.path, r.offset, r.size)?,
            r.digest,
            Some(r.size),
            what,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(normalise(Path::new("./a/b/../c/")).as_deref(), Some("a/c"));
        assert_eq!(normalise(Path::new("../x")), None);
        let d = Digest::of(b"c");
        assert_eq!(digest_in_name(&format!("{}.json", d.to_hex())), Some(d));
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{}", d.to_hex())),
            Some(d)
        );
        assert_eq!(layer_digest_in_name(&format!("{}.json", d.to_hex())), None);
        assert!(same_image("busybox", "docker.io/library/busybox:latest"));
        assert!(same_image("busybox:latest", "busybox:latest"));
        assert!(!same_image("busybox:1", "busybox:latest"));
    }
}
