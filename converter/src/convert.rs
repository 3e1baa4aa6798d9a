//! The conversion driver: layers in, merged tree + chunk tables + blobs out.
//!
//! A [`Converter`] takes layers one at a time, in order. For each it sniffs
//! the compression, verifies the diff ID while reading, applies the tar
//! entries to the merged tree, and sends every chunk it has not seen before
//! (in this image or in a chunk dictionary) to a [`BlobPipeline`] that writes
//! the layer's data blob. [`Converter::finish`] writes the bootstrap.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use skiff_format::{BlobInfo, Bootstrap, ChunkInfo, Digest};

use crate::chunker::{Chunker, Chunking};
use crate::decompress::DecodedLayer;
use crate::error::ConvertError;
use crate::pipeline::{BlobPipeline, BlobSink};
use crate::tree::TreeBuilder;

/// Settings of a conversion. They decide the output bytes, so they are part
/// of the image (recorded in its annotations).
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// How files are cut into chunks.
    pub chunking: Chunking,
    /// zstd level for chunks.
    pub level: i32,
    /// Compression threads.
    pub threads: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunking: Chunking::default(),
            level: 4,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// Figures of a conversion, printed by `skiff convert --json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Layers read.
    pub layers: u32,
    /// Tar entries applied (not counting hard links and whiteouts).
    pub entries: u64,
    /// Regular file entries.
    pub files: u64,
    /// Hard link entries.
    pub hard_links: u64,
    /// Whiteout entries.
    pub whiteouts: u64,
    /// Compressed layer bytes read.
    pub bytes_in_compressed: u64,
    /// Uncompressed layer (tar) bytes read.
    pub bytes_in: u64,
    /// Bytes of file content read.
    pub file_bytes: u64,
    /// File content that was all zeros, kept as holes.
    pub hole_bytes: u64,
    /// Chunk references from files (before deduplication).
    pub chunks: u64,
    /// Distinct chunks stored in this image's blobs.
    pub unique_chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub unique_bytes: u64,
    /// Chunks found in a chunk dictionary and referenced from there.
    pub dict_chunks: u64,
    /// Bytes of the data blobs written.
    pub blob_bytes: u64,
    /// Bytes of the bootstrap (uncompressed).
    pub bootstrap_bytes: u64,
    /// Bytes of the bootstrap layer (zstd).
    pub bootstrap_layer_bytes: u64,
    /// Everything written: data blobs, bootstrap layer, config, manifest.
    pub bytes_out: u64,
    /// File bytes divided by the bytes of distinct chunks (1.0 = no duplicates).
    pub dedup_ratio: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Progress reports for a terminal (the library draws nothing itself).
pub trait Progress: Send + Sync {
    /// A layer starts; `size` is its compressed size when known.
    fn layer_started(&self, index: usize, count: usize, size: Option<u64>);
    /// `n` more compressed bytes of the current layer were read.
    fn advance(&self, n: u64);
    /// The current layer is done.
    fn layer_finished(&self, index: usize);
}

/// What a data blob of the output is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobOrigin {
    /// Written by this conversion from a source layer.
    Layer {
        /// The source layer's diff ID.
        source_diff_id: Digest,
    },
    /// Referenced from chunk dictionary number `dict`.
    Dictionary {
        /// Index into the dictionaries given to [`Converter::add_dictionary`].
        dict: usize,
    },
}

/// A finished conversion, before it is published.
#[derive(Debug)]
pub struct Converted {
    /// The bootstrap bytes.
    pub bootstrap: Vec<u8>,
    /// The data blobs, in bootstrap BLOBS order, with where they come from.
    pub blobs: Vec<(BlobInfo, BlobOrigin)>,
    /// Figures.
    pub stats: Stats,
}

struct CurrentBlob {
    blob_index: u32,
    pipeline: BlobPipeline,
}

/// Converts layers, one at a time and in order, into a Skiff image.
pub struct Converter {
    pub(crate) options: ConvertOptions,
    pub(crate) tree: TreeBuilder,
    pub(crate) chunker: Option<Chunker>,
    pub(crate) stats: Stats,
    sink: Arc<dyn BlobSink>,
    progress: Option<Arc<dyn Progress>>,
    started: Instant,
    /// Digest -> index in the image's chunk table.
    index: HashMap<Digest, u32>,
    /// Chunks of the dictionaries: digest -> (chunk, its blob, dictionary).
    dict: HashMap<Digest, (ChunkInfo, BlobInfo, usize)>,
    /// Dictionary blob digest -> index in the image's blob table.
    dict_blobs: HashMap<Digest, u32>,
    /// Dictionaries added so far.
    dict_count: usize,
    origins: Vec<BlobOrigin>,
    current: Option<CurrentBlob>,
    /// Paths for the PREFETCH table, resolved at [`Converter::finish`].
    prefetch_paths: Vec<String>,
}

impl Converter {
    /// A converter writing data blobs to `sink`.
    pub fn new(
        options: ConvertOptions,
        sink: Arc<dyn BlobSink>,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<Self, ConvertError> {
        options.chunking.validate().map_err(ConvertError::Invalid)?;
        if !(1..=22).contains(&options.level) {
            return Err(ConvertError::Invalid(format!(
                "zstd level {} is out of range 1..=22",
                options.level
            )));
        }
        let mut tree = TreeBuilder::new();
        tree.tree_mut().chunk_size_hint = options.chunking.size_hint();
        Ok(Converter {
            chunker: Some(Chunker::new(options.chunking)),
            options,
            tree,
            stats: Stats::default(),
            sink,
            progress,
            started: Instant::now(),
            index: HashMap::new(),
            dict: HashMap::new(),
            dict_blobs: HashMap::new(),
            dict_count: 0,
            origins: Vec::new(),
            current: None,
            prefetch_paths: Vec::new(),
        })
    }

    /// Makes the chunks of an earlier Skiff image available for deduplication:
    /// a chunk found there is referenced, not stored again. Returns the
    /// dictionary's number (see [`BlobOrigin::Dictionary`]).
    pub fn add_dictionary(&mut self, bootstrap: &Bootstrap<'_>) -> Result<usize, ConvertError> {
        let dict = self.dict_count;
        for i in 0..bootstrap.chunk_count() {
            let chunk = bootstrap.chunk(i)?;
            let blob = bootstrap.blob(chunk.blob_index)?;
            self.dict.entry(chunk.digest).or_insert((chunk, blob, dict));
        }
        self.dict_count += 1;
        Ok(dict)
    }

    /// Reads one layer: `raw` is the stream as stored (any compression),
    /// `diff_id` the digest of the uncompressed tar when the image says it.
    pub fn add_layer(
        &mut self,
        label: &str,
        raw: Box<dyn Read + Send>,
        size: Option<u64>,
        diff_id: Option<Digest>,
        index: usize,
        count: usize,
    ) -> Result<(), ConvertError> {
        if let Some(p) = &self.progress {
            p.layer_started(index, count, size);
        }
        let counter = Arc::new(AtomicU64::new(0));
        let counted = CountingReader {
            inner: raw,
            total: counter.clone(),
            progress: self.progress.clone(),
        };
        let mut decoded =
            DecodedLayer::spawn(Box::new(counted)).map_err(|e| ConvertError::Layer {
                layer: label.to_string(),
                message: format!("reading the layer: {e}"),
            })?;
        self.tree.begin_layer();
        self.read_tar(label, &mut decoded)?;
        let (actual, len) = decoded.finish().map_err(|e| ConvertError::Layer {
            layer: label.to_string(),
            message: format!("reading the end of the layer: {e}"),
        })?;
        if let Some(expected) = diff_id {
            if expected != actual {
                return Err(ConvertError::Layer {
                    layer: label.to_string(),
                    message: format!(
                        "uncompressed content is {actual}, but the image config says its diff ID is {expected}"
                    ),
                });
            }
        }
        self.stats.layers += 1;
        self.stats.bytes_in += len;
        self.stats.bytes_in_compressed += counter.load(Ordering::Relaxed);
        self.finish_layer_blob(actual)?;
        if let Some(p) = &self.progress {
            p.layer_finished(index);
        }
        Ok(())
    }

    /// Registers a chunk's data; returns its index in the chunk table.
    pub(crate) fn add_chunk(&mut self, data: &[u8]) -> Result<u32, ConvertError> {
        self.stats.chunks += 1;
        let digest = Digest::of(data);
        if let Some(&i) = self.index.get(&digest) {
            return Ok(i);
        }
        let chunks = &mut self.tree.tree_mut().chunks;
        let next = u32::try_from(chunks.len())
            .map_err(|_| ConvertError::Invalid("more than 2^32 chunks".into()))?;
        let uncompressed_size = u32::try_from(data.len())
            .map_err(|_| ConvertError::Invalid("chunk larger than 4 GiB".into()))?;
        if let Some((info, blob, dict)) = self.dict.get(&digest).copied() {
            let blob_index = match self.dict_blobs.get(&blob.digest) {
                Some(&b) => b,
                None => {
                    let b = self.push_blob(blob, BlobOrigin::Dictionary { dict })?;
                    self.dict_blobs.insert(blob.digest, b);
                    b
                }
            };
            self.tree
                .tree_mut()
                .chunks
                .push(ChunkInfo { blob_index, ..info });
            self.index.insert(digest, next);
            self.stats.dict_chunks += 1;
            return Ok(next);
        }
        if self.current.is_none() {
            let out = self.sink.create()?;
            let pipeline = BlobPipeline::start(out, self.options.level, self.options.threads);
            let placeholder = BlobInfo {
                digest: Digest([0; 32]),
                size: 0,
                uncompressed_size: 0,
                chunk_count: 0,
            };
            // The origin is fixed when the layer ends and its diff ID is known.
            let blob_index = self.push_blob(
                placeholder,
                BlobOrigin::Layer {
                    source_diff_id: Digest([0; 32]),
                },
            )?;
            self.current = Some(CurrentBlob {
                blob_index,
                pipeline,
            });
        }
        let Some(current) = self.current.as_mut() else {
            return Err(ConvertError::Invalid(
                "internal error: no current blob".into(),
            ));
        };
        self.tree.tree_mut().chunks.push(ChunkInfo {
            digest,
            blob_index: current.blob_index,
            compressed: false,
            compressed_offset: 0,
            compressed_size: 0,
            uncompressed_size,
        });
        current.pipeline.push(next, data)?;
        self.index.insert(digest, next);
        self.stats.unique_chunks += 1;
        self.stats.unique_bytes += data.len() as u64;
        Ok(next)
    }

    fn push_blob(&mut self, blob: BlobInfo, origin: BlobOrigin) -> Result<u32, ConvertError> {
        let blobs = &mut self.tree.tree_mut().blobs;
        let i = u32::try_from(blobs.len())
            .map_err(|_| ConvertError::Invalid("too many blobs".into()))?;
        blobs.push(blob);
        self.origins.push(origin);
        Ok(i)
    }

    fn finish_layer_blob(&mut self, diff_id: Digest) -> Result<(), ConvertError> {
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        let result = current.pipeline.finish()?;
        let tree = self.tree.tree_mut();
        let mut uncompressed = 0u64;
        for p in &result.placements {
            let chunk = tree.chunks.get_mut(p.chunk as usize).ok_or_else(|| {
                ConvertError::Invalid("internal error: placement of an unknown chunk".into())
            })?;
            chunk.compressed = p.compressed;
            chunk.compressed_offset = p.offset;
            chunk.compressed_size = p.size;
            uncompressed += u64::from(chunk.uncompressed_size);
        }
        let blob = tree
            .blobs
            .get_mut(current.blob_index as usize)
            .ok_or_else(|| ConvertError::Invalid("internal error: unknown blob".into()))?;
        *blob = BlobInfo {
            digest: result.digest,
            size: result.size,
            uncompressed_size: uncompressed,
            chunk_count: u32::try_from(result.placements.len())
                .map_err(|_| ConvertError::Invalid("too many chunks in one blob".into()))?,
        };
        if let Some(origin) = self.origins.get_mut(current.blob_index as usize) {
            *origin = BlobOrigin::Layer {
                source_diff_id: diff_id,
            };
        }
        self.stats.blob_bytes += result.size;
        Ok(())
    }

    /// Sets the files to fetch first after mounting, in order: absolute
    /// paths in the merged tree (as `skiff mount --record-access` writes
    /// them). They are resolved by [`finish`](Self::finish), without
    /// following symlinks; a path that names nothing is skipped with a
    /// warning, and repeats are dropped.
    pub fn set_prefetch_list(&mut self, paths: Vec<String>) {
        self.prefetch_paths = paths;
    }

    /// The PREFETCH table for the paths given to `set_prefetch_list`.
    fn resolve_prefetch(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for path in &self.prefetch_paths {
            let parts: Vec<&[u8]> = path
                .split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .map(str::as_bytes)
                .collect();
            match self.tree.resolve(&parts) {
                Some(id) if seen.insert(id) => out.push(id),
                Some(_) => {}
                None => tracing::warn!("prefetch list: {path}: not in the image; skipped"),
            }
        }
        out
    }

    /// Writes the bootstrap. Unreachable nodes (whited out, replaced) are dropped.
    pub fn finish(mut self) -> Result<Converted, ConvertError> {
        if self.current.is_some() {
            return Err(ConvertError::Invalid(
                "internal error: a layer blob is unfinished".into(),
            ));
        }
        let prefetch = self.resolve_prefetch();
        let mut tree = self.tree.into_tree();
        tree.prefetch = prefetch;
        let bootstrap = skiff_format::write_bootstrap(&tree)?;
        self.stats.bootstrap_bytes = bootstrap.len() as u64;
        let stored: u64 = self.stats.unique_bytes;
        self.stats.dedup_ratio = if stored == 0 {
            1.0
        } else {
            (self.stats.file_bytes - self.stats.hole_bytes) as f64 / stored as f64
        };
        self.stats.seconds = self.started.elapsed().as_secs_f64();
        let blobs = tree.blobs.iter().copied().zip(self.origins).collect();
        Ok(Converted {
            bootstrap,
            blobs,
            stats: self.stats,
        })
    }
}

/// Counts the raw bytes of a layer for the figures and the progress bar.
struct CountingReader {
    inner: Box<dyn Read + Send>,
    total: Arc<AtomicU64>,
    progress: Option<Arc<dyn Progress>>,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(p) = &self.progress {
            p.advance(n as u64);
        }
        Ok(n)
    }
}
