//! Whole-image conversion: a source reference in, a published Skiff image out.
//!
//! The order of the steps is what makes a failed conversion harmless: data
//! blobs, the bootstrap layer and the config are written as content-addressed
//! blobs (each visible only once complete), and the tag, which is what makes
//! the image exist for its users, is written last.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use skiff_format::{Bootstrap, Digest};
use skiff_registry::{BlobStore, ImageRef, OciLayoutWriter, RegistryConfig, RegistryWriter};

use crate::convert::{BlobOrigin, ConvertOptions, Converter, Progress, Stats};
use crate::error::{ConvertError, IoContext};
use crate::pipeline::{BlobOut, BlobSink};
use crate::publish;

/// Where the layers come from.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// An image named by reference.
    Image {
        /// The image.
        reference: ImageRef,
        /// `os/arch[/variant]` to pick from a multi-platform image.
        platform: Option<String>,
    },
    /// Plain layer tars, lowest first.
    Layers {
        /// The tar files (tar, tar+gzip or tar+zstd).
        layers: Vec<PathBuf>,
        /// An image config whose runtime settings to keep.
        config: Option<PathBuf>,
    },
}

/// A conversion job.
pub struct ConvertRequest {
    /// The source.
    pub source: SourceSpec,
    /// Where to publish (`oci:DIR[:TAG]` or `docker://REF`).
    pub dest: ImageRef,
    /// Earlier Skiff images whose chunks are referenced, not stored again.
    pub chunk_dicts: Vec<ImageRef>,
    /// Conversion settings.
    pub options: ConvertOptions,
    /// Progress reports.
    pub progress: Option<Arc<dyn Progress>>,
}

/// What `skiff convert --json` prints.
#[derive(Debug, Serialize)]
pub struct ConvertResult {
    /// The destination as given.
    pub image: String,
    /// Digest of the published manifest.
    pub manifest_digest: Digest,
    /// Digest of the bootstrap layer.
    pub bootstrap_layer: Digest,
    /// The data blobs, in manifest order.
    pub blobs: Vec<Digest>,
    /// Chunking used.
    pub chunking: String,
    /// Figures.
    #[serde(flatten)]
    pub stats: Stats,
}

/// Where a converted image is published.
#[derive(Clone)]
enum Destination {
    /// An OCI image layout directory.
    Layout(Arc<OciLayoutWriter>),
    /// A repository of a registry.
    Registry(RegistryWriter),
}

impl Destination {
    fn open(dest: &ImageRef, config: &RegistryConfig) -> Result<(Self, String), ConvertError> {
        match dest {
            ImageRef::Oci { dir, tag } => Ok((
                Destination::Layout(Arc::new(OciLayoutWriter::open_or_create(dir)?)),
                tag.clone().unwrap_or_else(|| "latest".into()),
            )),
            ImageRef::Docker(r) => {
                if r.digest.is_some() {
                    return Err(ConvertError::Invalid(format!(
                        "cannot publish to {dest}: name a tag, not a digest"
                    )));
                }
                Ok((
                    Destination::Registry(RegistryWriter::new(r, config)?),
                    r.tag.clone().unwrap_or_else(|| "latest".into()),
                ))
            }
            other => Err(ConvertError::Invalid(format!(
                "cannot publish to {other}: destinations are oci:DIR[:TAG] or docker://REF"
            ))),
        }
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, ConvertError> {
        Ok(match self {
            Destination::Layout(w) => w.has_blob(digest),
            Destination::Registry(w) => w.has_blob(digest)?,
        })
    }

    fn blob_out(&self) -> Result<Box<dyn BlobOut>, ConvertError> {
        Ok(match self {
            Destination::Layout(w) => Box::new(LayoutBlob(w.blob_writer()?)),
            Destination::Registry(w) => Box::new(RegistryBlob(w.blob_writer()?)),
        })
    }

    fn put_blob_bytes(&self, bytes: &[u8]) -> Result<(Digest, u64), ConvertError> {
        Ok(match self {
            Destination::Layout(w) => w.put_blob_bytes(bytes)?,
            Destination::Registry(w) => w.put_blob_bytes(bytes)?,
        })
    }

    /// Publishes the manifest under `tag`: the commit point of a conversion.
    fn put_manifest(&self, tag: &str, manifest: &[u8]) -> Result<Digest, ConvertError> {
        let media = skiff_registry::media::OCI_MANIFEST;
        Ok(match self {
            Destination::Layout(w) => w.set_tag(tag, manifest, media)?,
            Destination::Registry(w) => w.put_manifest(tag, manifest, media)?,
        })
    }
}

impl BlobSink for Destination {
    fn create(&self) -> Result<Box<dyn BlobOut>, ConvertError> {
        self.blob_out()
    }
}

struct RegistryBlob(skiff_registry::RegistryBlobWriter);

impl std::io::Write for RegistryBlob {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl BlobOut for RegistryBlob {
    fn commit(self: Box<Self>) -> Result<(Digest, u64), ConvertError> {
        Ok(self.0.commit()?)
    }
}

struct LayoutBlob(skiff_registry::BlobWriter);

impl std::io::Write for LayoutBlob {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl BlobOut for LayoutBlob {
    fn commit(self: Box<Self>) -> Result<(Digest, u64), ConvertError> {
        Ok(self.0.commit()?)
    }
}

/// Converts and publishes an image.
pub fn convert_image(req: ConvertRequest) -> Result<ConvertResult, ConvertError> {
    convert_image_with_prefetch(req, Vec::new())
}

/// Converts and publishes an image whose PREFETCH table lists `prefetch`
/// (absolute paths, in order; see [`Converter::set_prefetch_list`]).
pub fn convert_image_with_prefetch(
    req: ConvertRequest,
    prefetch: Vec<String>,
) -> Result<ConvertResult, ConvertError> {
    let registry_config = RegistryConfig::from_env()?;
    let (dest, tag) = Destination::open(&req.dest, &registry_config)?;
    let chunking = req.options.chunking.to_string();
    let mut conv = Converter::new(req.options, Arc::new(dest.clone()), req.progress)?;
    conv.set_prefetch_list(prefetch);

    let mut dict_stores: Vec<(ImageRef, Arc<dyn BlobStore>)> = Vec::new();
    for d in &req.chunk_dicts {
        let image = skiff_registry::skiff::open_image_with(d, &registry_config)
            .map_err(|e| ConvertError::Invalid(format!("chunk dictionary {d}: {e}")))?;
        let bootstrap = Bootstrap::parse(&image.bootstrap)
            .map_err(|e| ConvertError::Invalid(format!("chunk dictionary {d}: {e}")))?;
        conv.add_dictionary(&bootstrap)?;
        dict_stores.push((d.clone(), image.store.clone()));
    }

    let (source_config, source_manifest) = match &req.source {
        SourceSpec::Image {
            reference,
            platform,
        } => {
            let platform = platform
                .as_deref()
                .map(str::parse::<skiff_registry::Platform>)
                .transpose()?;
            let (image, opener) =
                skiff_registry::open_source_with(reference, platform.as_ref(), &registry_config)?;
            let count = image.layers.len();
            for (i, layer) in image.layers.iter().enumerate() {
                let label = match &layer.digest {
                    Some(d) => format!("{}/{count} ({d})", i + 1),
                    None => format!("{}/{count}", i + 1),
                };
                let raw = opener.open_layer(i)?;
                conv.add_layer(&label, raw, layer.size, layer.diff_id, i, count)?;
            }
            (Some(image.config.clone()), Some(image.manifest_digest))
        }
        SourceSpec::Layers { layers, config } => {
            let count = layers.len();
            for (i, path) in layers.iter().enumerate() {
                let file = File::open(path).ctx(|| format!("opening layer {}", path.display()))?;
                let size = file.metadata().ok().map(|m| m.len());
                let label = format!("{}/{count} ({})", i + 1, path.display());
                conv.add_layer(
                    &label,
                    Box::new(file) as Box<dyn Read + Send>,
                    size,
                    None,
                    i,
                    count,
                )?;
            }
            let config = match config {
                Some(p) => {
                    Some(std::fs::read(p).ctx(|| format!("reading config {}", p.display()))?)
                }
                None => None,
            };
            (config, None)
        }
    };
    let mut converted = conv.finish()?;

    // Blobs shared with a dictionary image must be in the destination too,
    // so that the image is complete on its own.
    for (blob, origin) in &converted.blobs {
        if let BlobOrigin::Dictionary { dict } = origin {
            if dest.has_blob(&blob.digest)? {
                continue;
            }
            let (dict_ref, store) = dict_stores.get(*dict).ok_or_else(|| {
                ConvertError::Invalid("internal error: unknown dictionary".into())
            })?;
            // Same registry: let the registry link the blob into our
            // repository instead of sending its bytes again.
            if let (Destination::Registry(w), ImageRef::Docker(from), ImageRef::Docker(to)) =
                (&dest, dict_ref, &req.dest)
            {
                if from.registry == to.registry && w.mount_blob(&blob.digest, &from.repository)? {
                    continue;
                }
            }
            let mut out = dest.blob_out()?;
            copy_blob(store.as_ref(), &blob.digest, blob.size, &mut out)?;
            let (digest, _) = out.commit()?;
            if digest != blob.digest {
                return Err(ConvertError::Invalid(format!(
                    "dictionary blob {} reads back as {digest}",
                    blob.digest
                )));
            }
        }
    }

    let bootstrap_digest = Digest::of(&converted.bootstrap);
    let layer = publish::bootstrap_layer(&converted.bootstrap)?;
    let (layer_digest, layer_size) = dest.put_blob_bytes(&layer)?;
    let config = publish::build_config(source_config.as_deref(), &converted, bootstrap_digest)?;
    let (config_digest, config_size) = dest.put_blob_bytes(&config)?;
    let manifest = publish::build_manifest(
        &converted,
        publish::Descriptor {
            digest: config_digest,
            size: config_size,
        },
        publish::Descriptor {
            digest: layer_digest,
            size: layer_size,
        },
        bootstrap_digest,
        source_manifest,
        &chunking,
    )?;
    let manifest_digest = dest.put_manifest(&tag, &manifest)?;

    let stats = &mut converted.stats;
    stats.bootstrap_layer_bytes = layer_size;
    stats.bytes_out = stats.blob_bytes + layer_size + config_size + manifest.len() as u64;
    Ok(ConvertResult {
        image: req.dest.to_string(),
        manifest_digest,
        bootstrap_layer: layer_digest,
        blobs: converted.blobs.iter().map(|(b, _)| b.digest).collect(),
        chunking,
        stats: converted.stats,
    })
}

fn copy_blob(
    store: &dyn BlobStore,
    digest: &Digest,
    size: u64,
    out: &mut dyn std::io::Write,
) -> Result<(), ConvertError> {
    const WINDOW: u64 = 8 << 20;
    let mut offset = 0;
    while offset < size {
        let len = WINDOW.min(size - offset);
        let bytes = store.read_range(digest, offset, len)?;
        out.write_all(&bytes)
            .ctx(|| format!("copying blob {digest}"))?;
        offset += len;
    }
    Ok(())
}
