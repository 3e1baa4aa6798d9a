//! Whole-image conversion: a source reference in, a published Skiff image out.
//!
//! The order of the steps is what makes a failed conversion harmless: data
//! blobs, the bootstrap layer and the config are written as content-addressed
//! blobs (each visible only once complete), and the tag, which is what makes
//! the image exist for its users, is written last.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Map, Value};
use skiff_format::{Bootstrap, Digest};
use skiff_registry::media::{self, OCI_INDEX, OCI_MANIFEST};
use skiff_registry::{
    BlobStore, BootstrapBytes, ImageRef, OciLayoutWriter, ReferrersVia, RegistryConfig,
    RegistryError, RegistryWriter,
};

use crate::convert::{
    check_dictionary_hash, BlobOrigin, ConvertOptions, Converter, Progress, Stats,
};
use crate::error::{ConvertError, IoContext};
use crate::pipeline::{BlobOut, BlobSink};
use crate::prefetch::PrefetchEntry;
use crate::publish;
use crate::record::{self, LayerRecord, MAX_RECORD_SIZE};
use crate::reuse::{self, LayerCache};

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
    /// Layer-level reuse.
    pub reuse: ReuseOptions,
    /// From a registry to a registry: attach each Skiff manifest to its
    /// source manifest as an OCI referrer (`--no-referrer` clears it).
    pub referrer: bool,
}

/// Where a conversion looks for earlier results of its layers.
#[derive(Clone, Debug)]
pub struct ReuseOptions {
    /// A local layer cache directory (`--cache-dir`): looked up first, and
    /// every converted layer's record and blob are kept there.
    pub cache_dir: Option<PathBuf>,
    /// Look layers up at all (cache, chunk dictionaries' records, the
    /// target repository's record tags). Records are written either way.
    pub lookup: bool,
}

impl Default for ReuseOptions {
    fn default() -> Self {
        ReuseOptions {
            cache_dir: None,
            lookup: true,
        }
    }
}

/// What the reuse report says about one source layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// The source layer's diff ID.
    pub diff_id: Digest,
    /// Where its record came from (`cache`, `chunk-dict REF`,
    /// `registry TAG`), or `null` when it was read, chunked and compressed.
    pub reused_from: Option<String>,
    /// The data blob it owns in this image, if any.
    pub blob: Option<Digest>,
    /// Chunks stored in that blob.
    pub stored_chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub stored_bytes: u64,
    /// The blob holding its record in the destination.
    pub record: Digest,
}

/// What was reused, computed and sent (`skiff convert` prints it; `--json`
/// has it under `reuse`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReuseReport {
    /// One entry per source layer.
    pub layers: Vec<LayerReport>,
    /// Layers rebuilt from a record: not read, chunked or compressed.
    pub layers_reused: u32,
    /// Layers read, chunked and compressed.
    pub layers_converted: u32,
    /// Chunks found in chunk dictionaries and referenced from there.
    pub dict_chunks: u64,
    /// Chunks compressed by this conversion.
    pub chunks_compressed: u64,
    /// Uncompressed bytes compressed by this conversion.
    pub bytes_compressed: u64,
    /// Bytes sent to the destination (blob and manifest uploads; for a
    /// layout, bytes of blobs written).
    pub bytes_pushed: u64,
    /// Blobs the destination already had, so nothing was sent.
    pub blobs_skipped: u64,
    /// Blobs cross-mounted from another repository of the registry.
    pub blobs_mounted: u64,
    /// Layer record blobs in the destination (new or already there).
    pub records: u64,
    /// Record artifacts tagged in the target repository by this run.
    pub record_tags_pushed: u64,
}

/// One platform of a multi-platform conversion.
#[derive(Clone, Debug, Serialize)]
pub struct PlatformResult {
    /// `os/arch[/variant]` of the source's index entry.
    pub platform: String,
    /// Digest of the source manifest.
    pub source_manifest: Digest,
    /// Digest of its Skiff manifest.
    pub manifest_digest: Digest,
    /// Digest of its bootstrap layer.
    pub bootstrap_layer: Digest,
    /// Its data blobs, in manifest order.
    pub blobs: Vec<Digest>,
    /// Figures.
    pub stats: Stats,
    /// What was reused, computed and sent.
    pub reuse: ReuseReport,
}

/// A Skiff manifest attached to its source manifest as a referrer.
#[derive(Clone, Debug, Serialize)]
pub struct ReferrerResult {
    /// The platform (empty for a single-image source).
    pub platform: String,
    /// The source manifest (the referrer's `subject`).
    pub subject: Digest,
    /// The Skiff manifest.
    pub manifest_digest: Digest,
    /// `registry/repository` it was attached in (the source's).
    pub repository: String,
    /// How it is listed: the referrers API or the fallback tag.
    pub via: ReferrersVia,
}

/// What `skiff convert --json` prints.
#[derive(Debug, Serialize)]
pub struct ConvertResult {
    /// The destination as given.
    pub image: String,
    /// What was published under the tag: an image manifest, or an index of
    /// one per platform for a multi-platform source.
    pub media_type: String,
    /// Digest of the published manifest (or index).
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
    /// What was reused, computed and sent.
    pub reuse: ReuseReport,
    /// For an index: every platform (the fields above are the first one's).
    pub platforms: Vec<PlatformResult>,
    /// The referrers attached to the source manifests.
    pub referrers: Vec<ReferrerResult>,
}

/// What was written to a layout destination.
#[derive(Default)]
struct LayoutCounters {
    bytes: AtomicU64,
    skipped: AtomicU64,
}

/// Where a converted image is published.
#[derive(Clone)]
enum Destination {
    /// An OCI image layout directory.
    Layout(Arc<OciLayoutWriter>, Arc<LayoutCounters>),
    /// A repository of a registry.
    Registry(RegistryWriter),
}

impl Destination {
    fn open(dest: &ImageRef, config: &RegistryConfig) -> Result<(Self, String), ConvertError> {
        match dest {
            ImageRef::Oci { dir, tag } => Ok((
                Destination::Layout(
                    Arc::new(OciLayoutWriter::open_or_create(dir)?),
                    Arc::default(),
                ),
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
            Destination::Layout(w, _) => w.has_blob(digest),
            Destination::Registry(w) => w.has_blob(digest)?,
        })
    }

    fn blob_out(&self) -> Result<Box<dyn BlobOut>, ConvertError> {
        Ok(match self {
            Destination::Layout(w, c) => Box::new(LayoutBlob(w.blob_writer()?, c.clone())),
            Destination::Registry(w) => Box::new(RegistryBlob(w.blob_writer()?)),
        })
    }

    fn put_blob_bytes(&self, bytes: &[u8]) -> Result<(Digest, u64), ConvertError> {
        Ok(match self {
            Destination::Layout(w, c) => {
                if w.has_blob(&Digest::of(bytes)) {
                    c.skipped.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                w.put_blob_bytes(bytes)?
            }
            Destination::Registry(w) => w.put_blob_bytes(bytes)?,
        })
    }

    /// Publishes the manifest under `tag`: the commit point of a conversion.
    fn put_manifest(
        &self,
        tag: &str,
        manifest: &[u8],
        media: &str,
    ) -> Result<Digest, ConvertError> {
        Ok(match self {
            Destination::Layout(w, c) => {
                c.bytes.fetch_add(manifest.len() as u64, Ordering::Relaxed);
                w.set_tag(tag, manifest, media)?
            }
            Destination::Registry(w) => w.put_manifest(tag, manifest, media)?,
        })
    }

    /// Stores a manifest without a tag (one platform of an index).
    fn put_manifest_by_digest(&self, manifest: &[u8], media: &str) -> Result<(), ConvertError> {
        match self {
            Destination::Layout(..) => {
                self.put_blob_bytes(manifest)?;
            }
            Destination::Registry(w) => {
                w.put_manifest(&Digest::of(manifest).oci(), manifest, media)?;
            }
        }
        Ok(())
    }

    /// (bytes sent, blobs skipped, blobs mounted) so far.
    fn pushed(&self) -> (u64, u64, u64) {
        match self {
            Destination::Layout(_, c) => (
                c.bytes.load(Ordering::Relaxed),
                c.skipped.load(Ordering::Relaxed),
                0,
            ),
            Destination::Registry(w) => {
                let s = w.stats();
                (s.bytes_uploaded, s.blobs_skipped, s.blobs_mounted)
            }
        }
    }

    /// Counts a blob found present before it was written.
    fn count_skipped(&self) {
        if let Destination::Layout(_, c) = self {
            c.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl BlobSink for Destination {
    fn create(&self) -> Result<Box<dyn BlobOut>, ConvertError> {
        self.blob_out()
    }
}

/// The destination, with a copy of every data blob kept in the layer cache.
struct CachingSink {
    dest: Destination,
    cache: Arc<LayerCache>,
}

impl BlobSink for CachingSink {
    fn create(&self) -> Result<Box<dyn BlobOut>, ConvertError> {
        Ok(self.cache.tee(self.dest.blob_out()?))
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

struct LayoutBlob(skiff_registry::BlobWriter, Arc<LayoutCounters>);

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
        let (digest, size) = self.0.commit()?;
        self.1.bytes.fetch_add(size, Ordering::Relaxed);
        Ok((digest, size))
    }
}

/// Converts and publishes an image.
pub fn convert_image(req: ConvertRequest) -> Result<ConvertResult, ConvertError> {
    convert_image_with_prefetch(req, Vec::new())
}

/// What one conversion run shares between the platforms it converts.
struct Run {
    options: ConvertOptions,
    progress: Option<Arc<dyn Progress>>,
    reuse: ReuseOptions,
    dest: Destination,
    dest_ref: ImageRef,
    cache: Option<Arc<LayerCache>>,
    sink: Arc<dyn BlobSink>,
    dicts: Vec<DictImage>,
    chunking: String,
    settings_text: String,
    /// Records of the layers converted by this run so far (by diff ID):
    /// a layer shared by two platforms is converted once, the second
    /// platform replays its record (the blob is in the destination).
    run_records: HashMap<Digest, LayerRecord>,
    /// Record tags found in or pushed to the target repository (diff ID ->
    /// self-contained).
    tagged: HashMap<Digest, bool>,
}

/// One converted image, not yet tagged.
struct Platformed {
    manifest: Vec<u8>,
    manifest_digest: Digest,
    layer_digest: Digest,
    blobs: Vec<Digest>,
    stats: Stats,
    reuse: ReuseReport,
}

/// The source of one image of the run.
enum OneSource {
    Image(
        skiff_registry::SourceImage,
        Box<dyn skiff_registry::LayerOpener>,
    ),
    Layers(Vec<PathBuf>, Option<PathBuf>),
}

/// Converts and publishes an image whose prefetch tables hold `prefetch`
/// (files or stretches of files by absolute path, in order; see
/// [`crate::prefetch`]).
///
/// A multi-platform source (an index or a manifest list) gives an OCI
/// index of Skiff images, one per platform (all of them, or those that
/// match [`SourceSpec::Image::platform`]), each entry keeping the source
/// entry's `platform` and annotations. A source layer shared by several
/// platforms is converted once. When the source and the destination are
/// registries and [`ConvertRequest::referrer`] is set, each Skiff manifest
/// names its source manifest as `subject` and is attached to it as a
/// referrer in the source's repository (see `skiff_registry::referrers`).
pub fn convert_image_with_prefetch(
    req: ConvertRequest,
    prefetch: Vec<PrefetchEntry>,
) -> Result<ConvertResult, ConvertError> {
    let registry_config = RegistryConfig::from_env()?;
    let (dest, tag) = Destination::open(&req.dest, &registry_config)?;
    let cache = match &req.reuse.cache_dir {
        Some(dir) => Some(Arc::new(LayerCache::open(dir)?)),
        None => None,
    };
    let sink: Arc<dyn BlobSink> = match &cache {
        Some(c) => Arc::new(CachingSink {
            dest: dest.clone(),
            cache: c.clone(),
        }),
        None => Arc::new(dest.clone()),
    };
    let mut dicts: Vec<DictImage> = Vec::new();
    for d in &req.chunk_dicts {
        let image = skiff_registry::skiff::open_image_with(d, &registry_config)
            .map_err(|e| ConvertError::Invalid(format!("chunk dictionary {d}: {e}")))?;
        Bootstrap::parse(&image.bootstrap)
            .map_err(ConvertError::from)
            .and_then(|b| check_dictionary_hash(&b, req.options.chunk_hash))
            .map_err(|e| ConvertError::Invalid(format!("chunk dictionary {d}: {e}")))?;
        dicts.push(DictImage {
            reference: d.clone(),
            store: image.store.clone(),
            records: reuse::records_of_manifest(&image.manifest),
            bootstrap: image.bootstrap,
        });
    }
    let mut run = Run {
        chunking: req.options.chunking_text(),
        settings_text: record::settings_text(&req.options),
        options: req.options,
        progress: req.progress,
        reuse: req.reuse,
        dest,
        dest_ref: req.dest.clone(),
        cache,
        sink,
        dicts,
        run_records: HashMap::new(),
        tagged: HashMap::new(),
    };
    // Referrers need both ends in a registry.
    let referrer_source = match (&req.source, &req.dest) {
        (
            SourceSpec::Image {
                reference: ImageRef::Docker(s),
                ..
            },
            ImageRef::Docker(_),
        ) if req.referrer => Some(s.clone()),
        _ => None,
    };

    let (reference, platform) = match &req.source {
        SourceSpec::Image {
            reference,
            platform,
        } => (Some(reference), platform.as_deref()),
        SourceSpec::Layers { .. } => (None, None),
    };
    let platform = platform
        .map(str::parse::<skiff_registry::Platform>)
        .transpose()?;
    let index = match reference {
        Some(r) => skiff_registry::source_index(r, &registry_config)?,
        None => None,
    };

    let Some(index) = index else {
        // One image.
        let source = match &req.source {
            SourceSpec::Image { reference, .. } => {
                let (image, opener) = skiff_registry::open_source_with(
                    reference,
                    platform.as_ref(),
                    &registry_config,
                )?;
                OneSource::Image(image, opener)
            }
            SourceSpec::Layers { layers, config } => {
                OneSource::Layers(layers.clone(), config.clone())
            }
        };
        let subject = match (&referrer_source, &source) {
            (Some(_), OneSource::Image(image, _)) => Some(subject_of(image)?),
            _ => None,
        };
        let pushed_before = run.dest.pushed();
        let mut one = convert_one(&mut run, source, &prefetch, subject.as_ref(), None)?;
        let manifest_digest = run.dest.put_manifest(&tag, &one.manifest, OCI_MANIFEST)?;
        fill_pushed(&mut one.reuse, pushed_before, run.dest.pushed());
        let mut referrers = Vec::new();
        if let (Some(s), Some(subject)) = (&referrer_source, &subject) {
            referrers.push(attach(&run, &registry_config, s, subject, &one, "")?);
        }
        return Ok(ConvertResult {
            image: req.dest.to_string(),
            media_type: OCI_MANIFEST.to_owned(),
            manifest_digest,
            bootstrap_layer: one.layer_digest,
            blobs: one.blobs,
            chunking: run.chunking.clone(),
            stats: one.stats,
            reuse: one.reuse,
            platforms: Vec::new(),
            referrers,
        });
    };

    // Every platform of an index (or those matching --platform).
    let source_ref = reference.ok_or_else(|| {
        ConvertError::Invalid("internal error: an index without a reference".into())
    })?;
    let chosen: Vec<&skiff_registry::PlatformEntry> = index
        .entries
        .iter()
        .filter(|e| {
            if !e.is_image() {
                tracing::info!(
                    "{source_ref}: skipping index entry {} ({}, {})",
                    e.digest,
                    e.media_type,
                    e.platform_string()
                );
                return false;
            }
            platform.as_ref().is_none_or(|p| e.matches(p))
        })
        .collect();
    if chosen.is_empty() {
        let available: Vec<String> = index.entries.iter().map(|e| e.platform_string()).collect();
        return Err(ConvertError::Invalid(format!(
            "{source_ref}: no image in the index for {}; it lists: {}",
            platform.map_or("any platform".to_owned(), |p| p.to_string()),
            available.join(", ")
        )));
    }
    let mut platforms = Vec::new();
    let mut entries = Vec::new();
    let mut outputs = Vec::new();
    for entry in chosen {
        let name = entry.platform_string();
        let (image, opener) =
            skiff_registry::open_source_entry(source_ref, entry, &registry_config)?;
        let subject = match &referrer_source {
            Some(_) => Some(subject_of(&image)?),
            None => None,
        };
        let pushed_before = run.dest.pushed();
        let mut one = convert_one(
            &mut run,
            OneSource::Image(image, opener),
            &prefetch,
            subject.as_ref(),
            Some(&name),
        )?;
        run.dest
            .put_manifest_by_digest(&one.manifest, OCI_MANIFEST)?;
        fill_pushed(&mut one.reuse, pushed_before, run.dest.pushed());
        let mut e = Map::new();
        e.insert("mediaType".into(), json!(OCI_MANIFEST));
        e.insert("digest".into(), json!(one.manifest_digest.oci()));
        e.insert("size".into(), json!(one.manifest.len()));
        if let Some(p) = &entry.platform {
            e.insert("platform".into(), p.clone());
        }
        if let Some(a) = &entry.annotations {
            e.insert("annotations".into(), a.clone());
        }
        entries.push(Value::Object(e));
        platforms.push(PlatformResult {
            platform: name,
            source_manifest: entry.digest,
            manifest_digest: one.manifest_digest,
            bootstrap_layer: one.layer_digest,
            blobs: one.blobs.clone(),
            stats: one.stats.clone(),
            reuse: one.reuse.clone(),
        });
        outputs.push((one, subject));
    }
    let mut annotations = index
        .annotations
        .as_ref()
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    annotations.insert(
        media::ANNOTATION_VERSION.into(),
        json!(env!("CARGO_PKG_VERSION")),
    );
    if let Some(d) = index.digest {
        annotations.insert(media::ANNOTATION_SOURCE_MANIFEST.into(), json!(d.oci()));
    }
    let index_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
        "annotations": annotations,
    }))
    .map_err(|e| ConvertError::Invalid(format!("serialising the index: {e}")))?;
    let index_digest = run.dest.put_manifest(&tag, &index_bytes, OCI_INDEX)?;
    let mut referrers = Vec::new();
    if let Some(s) = &referrer_source {
        for (one, subject) in &outputs {
            if let Some(subject) = subject {
                let name = platforms
                    .iter()
                    .find(|p| p.manifest_digest == one.manifest_digest)
                    .map(|p| p.platform.as_str())
                    .unwrap_or_default();
                referrers.push(attach(&run, &registry_config, s, subject, one, name)?);
            }
        }
    }
    let Some((first, _)) = outputs.into_iter().next() else {
        return Err(ConvertError::Invalid(
            "internal error: an index of no platforms".into(),
        ));
    };
    Ok(ConvertResult {
        image: req.dest.to_string(),
        media_type: OCI_INDEX.to_owned(),
        manifest_digest: index_digest,
        bootstrap_layer: first.layer_digest,
        blobs: first.blobs,
        chunking: run.chunking.clone(),
        stats: first.stats,
        reuse: first.reuse,
        platforms,
        referrers,
    })
}

/// The descriptor of a source manifest, as a referrer's `subject`.
fn subject_of(image: &skiff_registry::SourceImage) -> Result<Value, ConvertError> {
    let media_type = image
        .manifest
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or(OCI_MANIFEST);
    Ok(json!({
        "mediaType": media_type,
        "digest": image.manifest_digest.oci(),
        "size": image.manifest_size,
    }))
}

/// Fills the bytes-sent figures of a report from two `pushed()` samples.
fn fill_pushed(r: &mut ReuseReport, before: (u64, u64, u64), after: (u64, u64, u64)) {
    r.bytes_pushed = after.0.saturating_sub(before.0);
    r.blobs_skipped = after.1.saturating_sub(before.1);
    r.blobs_mounted = after.2.saturating_sub(before.2);
}

/// Attaches Skiff manifest `one` to `subject` in the source repository
/// `source`: its blobs are cross-mounted there from the destination
/// repository (same registry) or copied, then the manifest is pushed by
/// digest and listed as a referrer.
fn attach(
    run: &Run,
    config: &RegistryConfig,
    source: &skiff_registry::DockerRef,
    subject: &Value,
    one: &Platformed,
    platform: &str,
) -> Result<ReferrerResult, ConvertError> {
    let (Destination::Registry(dest_writer), ImageRef::Docker(to)) = (&run.dest, &run.dest_ref)
    else {
        return Err(ConvertError::Invalid(
            "internal error: referrers need a registry destination".into(),
        ));
    };
    let subject_digest: Digest = subject
        .get("digest")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ConvertError::Invalid("internal error: a subject without digest".into()))?;
    let same_repo = source.registry == to.registry && source.repository == to.repository;
    let writer = if same_repo {
        dest_writer.clone()
    } else {
        let w = RegistryWriter::new(source, config)?;
        let m: Value = serde_json::from_slice(&one.manifest)
            .map_err(|e| ConvertError::Invalid(format!("the manifest just built: {e}")))?;
        let mut blobs = Vec::new();
        if let Some(c) = m.get("config") {
            blobs.push(c.clone());
        }
        if let Some(l) = m.get("layers").and_then(Value::as_array) {
            blobs.extend(l.iter().cloned());
        }
        for b in blobs {
            let digest: Digest = b
                .get("digest")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ConvertError::Invalid("a descriptor without digest".into()))?;
            let size = b.get("size").and_then(Value::as_u64).unwrap_or(0);
            if w.has_blob(&digest)? {
                continue;
            }
            if source.registry == to.registry && w.mount_blob(&digest, &to.repository)? {
                continue;
            }
            // Another registry: copy the blob through, verified.
            let mut reader = dest_writer.client().blob_reader(
                digest,
                size,
                format!("blob {digest} of {}", run.dest_ref),
            );
            let mut out = w.blob_writer()?;
            std::io::copy(&mut reader, &mut out).ctx(|| format!("copying blob {digest}"))?;
            let (got, _) = out.commit()?;
            if got != digest {
                return Err(ConvertError::Invalid(format!(
                    "blob {digest} copied as {got}"
                )));
            }
        }
        w
    };
    let via = writer.attach_referrer(
        &subject_digest,
        &one.manifest,
        OCI_MANIFEST,
        media::SKIFF_ARTIFACT_TYPE,
    )?;
    Ok(ReferrerResult {
        platform: platform.to_owned(),
        subject: subject_digest,
        manifest_digest: one.manifest_digest,
        repository: format!("{}/{}", source.registry, source.repository),
        via,
    })
}

/// Converts one image and writes everything but its manifest's tag: data
/// blobs, layer records (and their tags in a registry), the bootstrap
/// layer and the config. `subject` makes the manifest a referrer of its
/// source manifest; `platform` is annotated on it in an index.
fn convert_one(
    run: &mut Run,
    source: OneSource,
    prefetch: &[PrefetchEntry],
    subject: Option<&Value>,
    platform: Option<&str>,
) -> Result<Platformed, ConvertError> {
    let mut conv = Converter::new(run.options.clone(), run.sink.clone(), run.progress.clone())?;
    conv.set_prefetch_list(prefetch.to_vec());
    for d in &run.dicts {
        let bootstrap = Bootstrap::parse(&d.bootstrap)
            .map_err(|e| ConvertError::Invalid(format!("chunk dictionary {}: {e}", d.reference)))?;
        conv.add_dictionary(&bootstrap)?;
    }
    let settings = conv.settings_key();
    // Layers rebuilt from a record whose blob this image owns: where to get
    // the blob if the destination lacks it.
    let mut reused_blobs: HashMap<Digest, BlobSource> = HashMap::new();

    let (source_config, source_manifest) = match source {
        OneSource::Image(image, opener) => {
            let finder = RecordFinder {
                cache: run.cache.as_deref(),
                dicts: &run.dicts,
                dest: &run.dest,
                settings,
                run_records: &run.run_records,
            };
            let reference = &image.reference;
            let count = image.layers.len();
            for (i, layer) in image.layers.iter().enumerate() {
                let label = match &layer.digest {
                    Some(d) => format!("{}/{count} ({d})", i + 1),
                    None => format!("{}/{count} ({reference})", i + 1),
                };
                if let (true, Some(diff_id)) = (run.reuse.lookup, layer.diff_id) {
                    if let Some(found) = finder.find(&conv, &diff_id, &mut run.tagged)? {
                        conv.replay_layer(&label, &found.record, &found.source, i, count)?;
                        if let Some(b) = &found.record.blob {
                            reused_blobs.insert(b.digest, found.blob_source);
                        }
                        continue;
                    }
                }
                let raw = opener.open_layer(i)?;
                conv.add_layer(&label, raw, layer.size, layer.diff_id, i, count)?;
            }
            (Some(image.config.clone()), Some(image.manifest_digest))
        }
        OneSource::Layers(layers, config) => {
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
                    Some(std::fs::read(&p).ctx(|| format!("reading config {}", p.display()))?)
                }
                None => None,
            };
            (config, None)
        }
    };
    let mut converted = conv.finish()?;
    let dest = &run.dest;
    let cache = run.cache.as_deref();

    // Every blob the bootstrap names must be in the destination, so that
    // the image is complete on its own: blobs of reused layers and blobs
    // shared with a dictionary image are sent, mounted or found there.
    for (blob, origin) in &converted.blobs {
        let source = match origin {
            BlobOrigin::Dictionary { dict } => BlobSource::Dict(*dict),
            BlobOrigin::Layer { .. } => match reused_blobs.get(&blob.digest) {
                Some(s) => s.clone(),
                None => continue,
            },
        };
        ensure_blob(dest, &run.dest_ref, &run.dicts, cache, blob, &source)?;
    }

    // The cache remembers where its blobs now are, for later mounts.
    if let (Some(c), ImageRef::Docker(to)) = (cache, &run.dest_ref) {
        for (blob, origin) in &converted.blobs {
            if matches!(origin, BlobOrigin::Layer { .. }) && c.blob_path(&blob.digest).is_file() {
                c.note_location(&blob.digest, &to.registry, &to.repository);
            }
        }
    }

    // Layer records: next to the image in the destination (named by the
    // manifest), tagged in the target repository, kept in the cache.
    let mut record_items = Vec::new();
    let mut record_tags_pushed = 0u64;
    for outcome in &converted.layers {
        let rec = &outcome.record;
        let bytes = rec.encode()?;
        let (rd, rs) = dest.put_blob_bytes(&bytes)?;
        record_items.push((rec.diff_id, rd, rs));
        if let Destination::Registry(w) = dest {
            let better = match run.tagged.get(&rec.diff_id) {
                None => true,
                Some(&self_contained) => !self_contained && rec.self_contained(),
            };
            if better {
                let (config, manifest) = reuse::record_artifact(rec, (rd, rs), &run.settings_text)?;
                w.put_blob_bytes(&config)?;
                w.put_manifest(
                    &reuse::record_tag(&rec.diff_id, &rec.settings),
                    &manifest,
                    OCI_MANIFEST,
                )?;
                run.tagged.insert(rec.diff_id, rec.self_contained());
                record_tags_pushed += 1;
            }
        }
        if let Some(c) = cache {
            let blob_kept = rec
                .blob
                .as_ref()
                .is_none_or(|b| c.blob_path(&b.digest).is_file());
            if blob_kept {
                if let Err(e) = c.put(rec) {
                    tracing::warn!("layer cache: {e}");
                }
            }
        }
        run.run_records
            .entry(rec.diff_id)
            .or_insert_with(|| rec.clone());
    }

    let bootstrap_digest = Digest::of(&converted.bootstrap);
    let layer = publish::bootstrap_layer(&converted.bootstrap)?;
    let (layer_digest, layer_size) = dest.put_blob_bytes(&layer)?;
    let config = publish::build_config(source_config.as_deref(), &converted, bootstrap_digest)?;
    let (config_digest, config_size) = dest.put_blob_bytes(&config)?;
    let mut manifest = publish::build_manifest(
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
        &run.chunking,
        Some((&settings, &record_items)),
    )?;
    if subject.is_some() || platform.is_some() {
        manifest = publish::with_subject(&manifest, subject, platform)?;
    }

    let stats = &mut converted.stats;
    stats.bootstrap_layer_bytes = layer_size;
    stats.bytes_out = stats.blob_bytes + layer_size + config_size + manifest.len() as u64;
    let report = ReuseReport {
        layers: converted
            .layers
            .iter()
            .zip(&record_items)
            .map(|(o, (_, rd, _))| LayerReport {
                diff_id: o.record.diff_id,
                reused_from: o.reused_from.clone(),
                blob: o.record.blob.as_ref().map(|b| b.digest),
                stored_chunks: o.record.blob.as_ref().map_or(0, |b| b.chunks.len() as u64),
                stored_bytes: o.record.blob.as_ref().map_or(0, |b| b.uncompressed_size),
                record: *rd,
            })
            .collect(),
        layers_reused: stats.layers_reused,
        layers_converted: stats.layers - stats.layers_reused,
        dict_chunks: stats.dict_chunks,
        chunks_compressed: stats.chunks_compressed,
        bytes_compressed: stats.bytes_compressed,
        bytes_pushed: 0,
        blobs_skipped: 0,
        blobs_mounted: 0,
        records: record_items.len() as u64,
        record_tags_pushed,
    };
    Ok(Platformed {
        manifest_digest: Digest::of(&manifest),
        manifest,
        layer_digest,
        blobs: converted.blobs.iter().map(|(b, _)| b.digest).collect(),
        stats: converted.stats,
        reuse: report,
    })
}

/// A chunk dictionary image.
struct DictImage {
    reference: ImageRef,
    store: Arc<dyn BlobStore>,
    /// Its layer records.
    records: Vec<reuse::RecordRef>,
    /// Its bootstrap (verified when opened).
    bootstrap: BootstrapBytes,
}

/// Where the blob of a reused layer can be had if the destination lacks it.
#[derive(Clone, Debug)]
enum BlobSource {
    /// The layer cache.
    Cache,
    /// Chunk dictionary number N (its store, or a mount from its repository).
    Dict(usize),
    /// The destination has it (the record came from there).
    Destination,
}

/// A record that can stand in for a layer.
struct Found {
    record: LayerRecord,
    source: String,
    blob_source: BlobSource,
}

/// Looks for a layer's record: in the cache, in the chunk dictionaries'
/// records, then under its tag in the target repository. The first one that
/// replays to the bytes of a fresh conversion, with its blob at hand, wins.
struct RecordFinder<'a> {
    cache: Option<&'a LayerCache>,
    dicts: &'a [DictImage],
    dest: &'a Destination,
    settings: Digest,
    run_records: &'a HashMap<Digest, LayerRecord>,
}

impl RecordFinder<'_> {
    fn find(
        &self,
        conv: &Converter,
        diff_id: &Digest,
        tagged: &mut HashMap<Digest, bool>,
    ) -> Result<Option<Found>, ConvertError> {
        let usable = |record: &LayerRecord, what: &str| -> bool {
            if record.diff_id != *diff_id {
                tracing::warn!(
                    "layer record from {what} is for {}, not {diff_id}",
                    record.diff_id
                );
                return false;
            }
            match conv.check_replay(record) {
                Ok(()) => true,
                Err(why) => {
                    tracing::info!("layer {diff_id}: not reusing the record from {what}: {why}");
                    false
                }
            }
        };
        if let Some(record) = self.run_records.get(diff_id) {
            if record.settings == self.settings && usable(record, "this run") {
                return Ok(Some(Found {
                    record: record.clone(),
                    source: "this run".into(),
                    blob_source: BlobSource::Destination,
                }));
            }
        }
        if let Some(cache) = self.cache {
            for record in cache.get(&self.settings, diff_id) {
                let blob_ok = match (&record.blob, conv.replay_needs_blob(&record)) {
                    (Some(b), true) => {
                        self.dest.has_blob(&b.digest)? || cache.verify_blob(&b.digest, b.size)
                    }
                    _ => true,
                };
                if blob_ok && usable(&record, "the layer cache") {
                    return Ok(Some(Found {
                        record,
                        source: "cache".into(),
                        blob_source: BlobSource::Cache,
                    }));
                }
            }
        }
        for (k, dict) in self.dicts.iter().enumerate() {
            for (d, rd, rs) in &dict.records {
                if d != diff_id {
                    continue;
                }
                let what = format!("chunk-dict {}", dict.reference);
                let record = match read_record(dict.store.as_ref(), rd, *rs) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!("layer {diff_id}: the record in {what}: {e}");
                        continue;
                    }
                };
                if usable(&record, &what) {
                    return Ok(Some(Found {
                        record,
                        source: what,
                        blob_source: BlobSource::Dict(k),
                    }));
                }
            }
        }
        if let Destination::Registry(w) = self.dest {
            let tag = reuse::record_tag(diff_id, &self.settings);
            let record = match w.client().fetch_manifest(&tag, None) {
                Err(RegistryError::NotFound(_)) => None,
                Err(e) => {
                    tracing::warn!("layer {diff_id}: looking up {tag}: {e}");
                    None
                }
                Ok(m) => match reuse::record_blob_of_artifact(&m.bytes)
                    .map_err(|e| format!("record artifact {tag}: {e}"))
                    .and_then(|(rd, rs)| {
                        let bytes = w
                            .client()
                            .fetch_blob(&rd, Some(rs), MAX_RECORD_SIZE)
                            .map_err(|e| e.to_string())?;
                        LayerRecord::decode(&bytes)
                    }) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!("layer {diff_id}: {e}");
                        None
                    }
                },
            };
            if let Some(record) = record {
                tagged.insert(*diff_id, record.self_contained());
                let what = format!("registry tag {tag}");
                if usable(&record, &what) {
                    return Ok(Some(Found {
                        record,
                        source: what,
                        blob_source: BlobSource::Destination,
                    }));
                }
            }
        }
        Ok(None)
    }
}

/// Reads and decodes a record blob from a store, verified by its digest.
fn read_record(store: &dyn BlobStore, digest: &Digest, size: u64) -> Result<LayerRecord, String> {
    if size > MAX_RECORD_SIZE {
        return Err(format!("record blob {digest} is {size} bytes"));
    }
    let bytes = store
        .read_range(digest, 0, size)
        .map_err(|e| e.to_string())?;
    if Digest::of(&bytes) != *digest {
        return Err(format!("record blob {digest} has other content"));
    }
    LayerRecord::decode(&bytes)
}

/// Makes sure the destination holds `blob`: skipped if there, else mounted
/// from a dictionary's repository of the same registry, else copied from
/// its source (verified).
fn ensure_blob(
    dest: &Destination,
    dest_ref: &ImageRef,
    dicts: &[DictImage],
    cache: Option<&LayerCache>,
    blob: &skiff_format::BlobInfo,
    source: &BlobSource,
) -> Result<(), ConvertError> {
    if dest.has_blob(&blob.digest)? {
        dest.count_skipped();
        return Ok(());
    }
    let mut out = match source {
        BlobSource::Destination => {
            return Err(ConvertError::Invalid(format!(
                "blob {} of a reused layer is gone from the destination",
                blob.digest
            )))
        }
        BlobSource::Cache => {
            let Some(cache) = cache else {
                return Err(ConvertError::Invalid(
                    "internal error: a cached layer without a cache".into(),
                ));
            };
            if let (Destination::Registry(w), ImageRef::Docker(to)) = (dest, dest_ref) {
                for (registry, repository) in cache.locations(&blob.digest) {
                    if registry == to.registry
                        && repository != to.repository
                        && w.mount_blob(&blob.digest, &repository)?
                    {
                        return Ok(());
                    }
                }
            }
            let path = cache.blob_path(&blob.digest);
            let mut file = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
            let mut out = dest.blob_out()?;
            std::io::copy(&mut file, &mut out).ctx(|| format!("copying {}", path.display()))?;
            out
        }
        BlobSource::Dict(k) => {
            let dict = dicts.get(*k).ok_or_else(|| {
                ConvertError::Invalid("internal error: unknown dictionary".into())
            })?;
            // Same registry: let the registry link the blob into our
            // repository instead of sending its bytes again.
            if let (Destination::Registry(w), ImageRef::Docker(from), ImageRef::Docker(to)) =
                (dest, &dict.reference, dest_ref)
            {
                if from.registry == to.registry && w.mount_blob(&blob.digest, &from.repository)? {
                    return Ok(());
                }
            }
            let mut out = dest.blob_out()?;
            copy_blob(dict.store.as_ref(), &blob.digest, blob.size, &mut out)?;
            out
        }
    };
    std::io::Write::flush(&mut out).ctx(|| format!("writing blob {}", blob.digest))?;
    let (digest, _) = out.commit()?;
    if digest != blob.digest {
        return Err(ConvertError::Invalid(format!(
            "blob {} reads back as {digest}",
            blob.digest
        )));
    }
    Ok(())
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
