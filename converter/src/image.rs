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
use skiff_format::{Bootstrap, Digest};
use skiff_registry::{
    BlobStore, ImageRef, OciLayoutWriter, RegistryConfig, RegistryError, RegistryWriter,
};

use crate::convert::{BlobOrigin, ConvertOptions, Converter, Progress, Stats};
use crate::error::{ConvertError, IoContext};
use crate::pipeline::{BlobOut, BlobSink};
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
    /// What was reused, computed and sent.
    pub reuse: ReuseReport,
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
    fn put_manifest(&self, tag: &str, manifest: &[u8]) -> Result<Digest, ConvertError> {
        let media = skiff_registry::media::OCI_MANIFEST;
        Ok(match self {
            Destination::Layout(w, c) => {
                c.bytes.fetch_add(manifest.len() as u64, Ordering::Relaxed);
                w.set_tag(tag, manifest, media)?
            }
            Destination::Registry(w) => w.put_manifest(tag, manifest, media)?,
        })
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

/// Converts and publishes an image whose PREFETCH table lists `prefetch`
/// (absolute paths, in order; see [`Converter::set_prefetch_list`]).
pub fn convert_image_with_prefetch(
    req: ConvertRequest,
    prefetch: Vec<String>,
) -> Result<ConvertResult, ConvertError> {
    let registry_config = RegistryConfig::from_env()?;
    let (dest, tag) = Destination::open(&req.dest, &registry_config)?;
    let pushed_before = dest.pushed();
    let chunking = req.options.chunking.to_string();
    let settings_text = record::settings_text(&req.options);
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
    let mut conv = Converter::new(req.options, sink, req.progress)?;
    conv.set_prefetch_list(prefetch);
    let settings = conv.settings_key();

    let mut dicts: Vec<DictImage> = Vec::new();
    for d in &req.chunk_dicts {
        let image = skiff_registry::skiff::open_image_with(d, &registry_config)
            .map_err(|e| ConvertError::Invalid(format!("chunk dictionary {d}: {e}")))?;
        let bootstrap = Bootstrap::parse(&image.bootstrap)
            .map_err(|e| ConvertError::Invalid(format!("chunk dictionary {d}: {e}")))?;
        conv.add_dictionary(&bootstrap)?;
        dicts.push(DictImage {
            reference: d.clone(),
            store: image.store.clone(),
            records: reuse::records_of_manifest(&image.manifest),
        });
    }
    let finder = RecordFinder {
        cache: cache.as_deref(),
        dicts: &dicts,
        dest: &dest,
        settings,
    };
    // Layers rebuilt from a record whose blob this image owns: where to get
    // the blob if the destination lacks it.
    let mut reused_blobs: HashMap<Digest, BlobSource> = HashMap::new();
    // Record tags found in the target repository (diff ID -> self-contained).
    let mut tagged: HashMap<Digest, bool> = HashMap::new();

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
                    None => format!("{}/{count} ({reference})", i + 1),
                };
                if let (true, Some(diff_id)) = (req.reuse.lookup, layer.diff_id) {
                    if let Some(found) = finder.find(&conv, &diff_id, &mut tagged)? {
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
        ensure_blob(&dest, &req.dest, &dicts, cache.as_deref(), blob, &source)?;
    }

    // The cache remembers where its blobs now are, for later mounts.
    if let (Some(c), ImageRef::Docker(to)) = (&cache, &req.dest) {
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
        if let Destination::Registry(w) = &dest {
            let better = match tagged.get(&rec.diff_id) {
                None => true,
                Some(&self_contained) => !self_contained && rec.self_contained(),
            };
            if better {
                let (config, manifest) = reuse::record_artifact(rec, (rd, rs), &settings_text)?;
                w.put_blob_bytes(&config)?;
                w.put_manifest(
                    &reuse::record_tag(&rec.diff_id, &rec.settings),
                    &manifest,
                    skiff_registry::media::OCI_MANIFEST,
                )?;
                record_tags_pushed += 1;
            }
        }
        if let Some(c) = &cache {
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
        Some((&settings, &record_items)),
    )?;
    let manifest_digest = dest.put_manifest(&tag, &manifest)?;

    let stats = &mut converted.stats;
    stats.bootstrap_layer_bytes = layer_size;
    stats.bytes_out = stats.blob_bytes + layer_size + config_size + manifest.len() as u64;
    let pushed = dest.pushed();
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
        bytes_pushed: pushed.0 - pushed_before.0,
        blobs_skipped: pushed.1 - pushed_before.1,
        blobs_mounted: pushed.2 - pushed_before.2,
        records: record_items.len() as u64,
        record_tags_pushed,
    };
    Ok(ConvertResult {
        image: req.dest.to_string(),
        manifest_digest,
        bootstrap_layer: layer_digest,
        blobs: converted.blobs.iter().map(|(b, _)| b.digest).collect(),
        chunking,
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
