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
use skiff_format::{BlobInfo, Bootstrap, ChunkHash, ChunkInfo, Digest, Node, NodeData};

use crate::chunker::{Chunker, Chunking, LargeFiles};
use crate::cold::ColdFiles;
use crate::decompress::DecodedLayer;
use crate::error::ConvertError;
use crate::pipeline::{BlobPipeline, BlobSink, Lane};
use crate::prefetch::PrefetchEntry;
use crate::record::{LayerFigures, LayerRecord, Op, RecordBlob, Recorder, StoredChunk};
use crate::tree::{split_path, TreeBuilder};

/// Settings of a conversion. They decide the output bytes, so they are part
/// of the image (recorded in its annotations).
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// How files are cut into chunks.
    pub chunking: Chunking,
    /// Finer chunks for files of at least a size (`None`: `chunking` for
    /// every file).
    pub large_files: Option<LargeFiles>,
    /// zstd level for chunks.
    pub level: i32,
    /// Target size of a pack: chunks smaller than half of it and than the
    /// chunker's smallest cut (so: small files and the tails of larger
    /// ones) are gathered, in the order they come, into
    /// one zstd frame of about this many bytes (format 1.1, shared frames).
    /// 0 stores every chunk in a frame of its own (a 1.0-compatible image).
    pub pack_size: u32,
    /// Compression threads.
    pub threads: usize,
    /// The hash function of the chunk digests (format 1.4: BLAKE3; SHA-256
    /// makes digests an image converted before 1.4 shares, for a chunk
    /// dictionary of such an image).
    pub chunk_hash: ChunkHash,
    /// Store the files a container's start rarely reads (tests, docs,
    /// Python sources beside their bytecode: [`crate::cold`]) after the
    /// rest of each layer's blob; `false` keeps tar order.
    pub cold_last: bool,
}

/// Default [`ConvertOptions::pack_size`]. Chosen by measurement on a tree of
/// small files (bench/report.md): 64 KiB packs of chunks under 32 KiB store
/// 10% less than a frame per file at zstd 4, and a cold read of one small
/// file decodes at most 96 KiB.
pub const DEFAULT_PACK_SIZE: u32 = 64 << 10;

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunking: Chunking::default(),
            large_files: Some(LargeFiles::default()),
            level: 4,
            pack_size: DEFAULT_PACK_SIZE,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            chunk_hash: ChunkHash::Blake3,
            cold_last: true,
        }
    }
}

impl ConvertOptions {
    /// The chunking policy as the image's annotation and the layer records'
    /// settings write it: `fastcdc:32k/128k/512k`, with
    /// ` large-files 4m:fastcdc:8k/32k/128k` when large files are cut finer.
    pub fn chunking_text(&self) -> String {
        match &self.large_files {
            Some(large) => format!("{} large-files {large}", self.chunking),
            None => self.chunking.to_string(),
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
    /// Source layers rebuilt from a layer record (not read, chunked or
    /// compressed).
    pub layers_reused: u32,
    /// Uncompressed bytes of chunk data compressed by this conversion.
    pub bytes_compressed: u64,
    /// Chunks compressed by this conversion.
    pub chunks_compressed: u64,
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
    /// One outcome per source layer, in order.
    pub layers: Vec<LayerOutcome>,
    /// Figures.
    pub stats: Stats,
}

/// How one source layer was converted.
#[derive(Clone, Debug)]
pub struct LayerOutcome {
    /// Its record: what a fresh conversion of the layer in this image gives
    /// (also when it was replayed).
    pub record: LayerRecord,
    /// Where the record it was rebuilt from came from (`None`: the layer
    /// was read, chunked and compressed).
    pub reused_from: Option<String>,
}

struct CurrentBlob {
    blob_index: u32,
    pipeline: BlobPipeline,
    /// The pack being filled per lane (hot, cold).
    packs: [Pack; 2],
}

/// Small chunks' data back to back, and its members: (chunk index, offset
/// in `data`, length).
#[derive(Default)]
struct Pack {
    data: Vec<u8>,
    members: Vec<(u32, u32, u32)>,
}

impl CurrentBlob {
    /// Sends `lane`'s pack being filled to the compressor.
    fn seal_pack(&mut self, lane: Lane) -> Result<(), ConvertError> {
        let pack = &mut self.packs[lane as usize];
        if pack.members.is_empty() {
            return Ok(());
        }
        let members = std::mem::take(&mut pack.members);
        self.pipeline.push_pack(members, &pack.data, lane)?;
        pack.data.clear();
        Ok(())
    }
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
    prefetch_list: Vec<PrefetchEntry>,
    /// Digest of the output-deciding settings ([`crate::record::settings_key`]).
    settings: Digest,
    /// The current layer's changes, for its record.
    recorder: Recorder,
    /// Which files go to the cold lane (with [`ConvertOptions::cold_last`]).
    pub(crate) cold: ColdFiles,
    /// The layers done so far.
    layers: Vec<LayerOutcome>,
}

/// Refuses a chunk dictionary whose chunk digests are made with another
/// function than `hash`, saying how to convert so that they match.
pub fn check_dictionary_hash(
    bootstrap: &Bootstrap<'_>,
    hash: ChunkHash,
) -> Result<(), ConvertError> {
    let theirs = bootstrap.chunk_hash();
    if theirs != hash {
        return Err(ConvertError::Invalid(format!(
            "its chunk digests are {theirs} and this conversion makes {hash} ones, so no chunk \
             could be shared; convert with --chunk-hash {theirs} to share its chunks"
        )));
    }
    Ok(())
}

impl Converter {
    /// A converter writing data blobs to `sink`.
    pub fn new(
        options: ConvertOptions,
        sink: Arc<dyn BlobSink>,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<Self, ConvertError> {
        options.chunking.validate().map_err(ConvertError::Invalid)?;
        if let Some(large) = &options.large_files {
            large.chunking.validate().map_err(ConvertError::Invalid)?;
        }
        if !(1..=22).contains(&options.level) {
            return Err(ConvertError::Invalid(format!(
                "zstd level {} is out of range 1..=22",
                options.level
            )));
        }
        let mut tree = TreeBuilder::new();
        tree.tree_mut().chunk_size_hint = options.chunking.size_hint();
        tree.tree_mut().chunk_hash = options.chunk_hash;
        let settings = crate::record::settings_key(&options);
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
            prefetch_list: Vec::new(),
            settings,
            recorder: Recorder::default(),
            cold: ColdFiles::default(),
            layers: Vec::new(),
        })
    }

    /// Makes the chunks of an earlier Skiff image available for deduplication:
    /// a chunk found there is referenced, not stored again. Returns the
    /// dictionary's number (see [`BlobOrigin::Dictionary`]).
    /// The dictionary's chunk digests must be made with this conversion's
    /// [`ConvertOptions::chunk_hash`]: no chunk could match otherwise.
    pub fn add_dictionary(&mut self, bootstrap: &Bootstrap<'_>) -> Result<usize, ConvertError> {
        check_dictionary_hash(bootstrap, self.options.chunk_hash)?;
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
        let before = self.stats.clone();
        self.recorder = Recorder::default();
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
        let blob = self.finish_layer_blob(actual)?;
        self.finish_record(actual, &before, len, blob, None);
        if let Some(p) = &self.progress {
            p.layer_finished(index);
        }
        Ok(())
    }

    /// Registers a chunk's data, to be stored in `lane` if it is new;
    /// returns its index in the chunk table.
    pub(crate) fn add_chunk(&mut self, data: &[u8], lane: Lane) -> Result<u32, ConvertError> {
        self.stats.chunks += 1;
        let digest = self.options.chunk_hash.digest(data);
        if let Some(&i) = self.index.get(&digest) {
            return Ok(i);
        }
        let pack_size = self.options.pack_size;
        let pack_below = (pack_size / 2).min(self.options.chunking.min_size());
        let chunks = &mut self.tree.tree_mut().chunks;
        let next = u32::try_from(chunks.len())
            .map_err(|_| ConvertError::Invalid("more than 2^32 chunks".into()))?;
        let uncompressed_size = u32::try_from(data.len())
            .map_err(|_| ConvertError::Invalid("chunk larger than 4 GiB".into()))?;
        if self.reference_dict_chunk(&digest, next)? {
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
                packs: Default::default(),
            });
        }
        let Some(current) = self.current.as_mut() else {
            return Err(ConvertError::Invalid(
                "internal error: no current blob".into(),
            ));
        };
        self.tree.tree_mut().chunks.push(ChunkInfo {
            digest,
            hash: self.options.chunk_hash,
            blob_index: current.blob_index,
            compressed: false,
            compressed_offset: 0,
            compressed_size: 0,
            uncompressed_size,
            frame: None,
        });
        if uncompressed_size < pack_below {
            let pack = &mut current.packs[lane as usize];
            let offset = u32::try_from(pack.data.len())
                .map_err(|_| ConvertError::Invalid("internal error: pack overflow".into()))?;
            pack.data.extend_from_slice(data);
            pack.members.push((next, offset, uncompressed_size));
            if pack.data.len() >= pack_size as usize {
                current.seal_pack(lane)?;
            }
        } else {
            current.pipeline.push(next, data, lane)?;
        }
        self.index.insert(digest, next);
        self.stats.unique_chunks += 1;
        self.stats.unique_bytes += data.len() as u64;
        self.stats.chunks_compressed += 1;
        self.stats.bytes_compressed += data.len() as u64;
        Ok(next)
    }

    /// If chunk `digest` is in a dictionary, adds it to the chunk table as
    /// entry `next`, stored in the dictionary's blob, and returns true.
    fn reference_dict_chunk(&mut self, digest: &Digest, next: u32) -> Result<bool, ConvertError> {
        let Some((info, blob, dict)) = self.dict.get(digest).copied() else {
            return Ok(false);
        };
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
        self.index.insert(*digest, next);
        self.stats.dict_chunks += 1;
        Ok(true)
    }

    /// Applies a whiteout entry at tar path `path` and records it.
    pub(crate) fn tree_whiteout(
        &mut self,
        path: &[u8],
        parts: &[&[u8]],
    ) -> Result<(), ConvertError> {
        self.tree.whiteout(parts)?;
        self.recorder.ops.push(Op::Whiteout(path.to_vec()));
        Ok(())
    }

    /// Applies a hard link entry and records it.
    pub(crate) fn tree_hard_link(
        &mut self,
        path: &[u8],
        target: &[u8],
        parts: &[&[u8]],
        target_parts: &[&[u8]],
    ) -> Result<(), String> {
        self.tree.hard_link(parts, target_parts)?;
        self.recorder
            .ops
            .push(Op::HardLink(path.to_vec(), target.to_vec()));
        Ok(())
    }

    /// Applies an entry (its chunks already in the chunk table) and records it.
    pub(crate) fn tree_insert(
        &mut self,
        path: &[u8],
        parts: &[&[u8]],
        node: Node,
    ) -> Result<(), ConvertError> {
        self.recorder
            .insert(path, &node, &self.tree.tree().chunks)?;
        self.tree.insert(parts, node)?;
        Ok(())
    }

    /// Closes the current layer's record.
    fn finish_record(
        &mut self,
        diff_id: Digest,
        before: &Stats,
        tar_bytes: u64,
        blob: Option<RecordBlob>,
        reused_from: Option<String>,
    ) {
        let s = &self.stats;
        let recorder = std::mem::take(&mut self.recorder);
        let record = LayerRecord {
            settings: self.settings,
            diff_id,
            figures: LayerFigures {
                entries: s.entries - before.entries,
                files: s.files - before.files,
                hard_links: s.hard_links - before.hard_links,
                whiteouts: s.whiteouts - before.whiteouts,
                file_bytes: s.file_bytes - before.file_bytes,
                hole_bytes: s.hole_bytes - before.hole_bytes,
                tar_bytes,
            },
            blob,
            refs: recorder.refs,
            ops: recorder.ops,
        };
        self.layers.push(LayerOutcome {
            record,
            reused_from,
        });
    }

    /// The settings key records of this conversion carry.
    pub fn settings_key(&self) -> Digest {
        self.settings
    }

    /// Whether `record` can stand in for reading its layer here: its
    /// settings match and the chunks this image would store for the layer
    /// (those not in earlier layers or dictionaries) are exactly the ones
    /// its blob holds, in the same order, so replaying it gives the bytes
    /// a fresh conversion gives. `Err` says why not.
    pub fn check_replay(&self, record: &LayerRecord) -> Result<(), String> {
        if record.settings != self.settings {
            return Err("it was made with other conversion settings".into());
        }
        let new: Vec<&Digest> = record
            .refs
            .iter()
            .map(|(d, _)| d)
            .filter(|d| !self.index.contains_key(*d) && !self.dict.contains_key(*d))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let Some(blob) = &record.blob else {
            return Err(format!(
                "{} of its chunks are new here and it has no blob",
                new.len()
            ));
        };
        // The same chunks, whatever their order: a blob holds packs in the
        // order they were sealed, not the order their members were met
        // (the chunk table is put in blob order at the end either way).
        let mut stored: Vec<&Digest> = blob.chunks.iter().map(|c| &c.digest).collect();
        let mut wanted = new.clone();
        stored.sort_unstable();
        wanted.sort_unstable();
        if stored != wanted {
            return Err(format!(
                "its blob holds {} chunks, this image would store {} of them",
                blob.chunks.len(),
                new.len()
            ));
        }
        Ok(())
    }

    /// Whether replaying `record` here would use its blob (some chunk it
    /// references is neither in earlier layers nor in a dictionary).
    pub fn replay_needs_blob(&self, record: &LayerRecord) -> bool {
        record
            .refs
            .iter()
            .any(|(d, _)| !self.index.contains_key(d) && !self.dict.contains_key(d))
    }

    /// Rebuilds layer `index` of `count` from its record instead of reading
    /// it: the same tree changes and chunk-table entries as reading the tar,
    /// without decompressing, chunking or compressing anything. Call
    /// [`check_replay`](Self::check_replay) first; a record that fails it
    /// is refused here too. `source` names where the record came from.
    pub fn replay_layer(
        &mut self,
        label: &str,
        record: &LayerRecord,
        source: &str,
        index: usize,
        count: usize,
    ) -> Result<(), ConvertError> {
        self.check_replay(record).map_err(|m| ConvertError::Layer {
            layer: label.to_string(),
            message: format!("cannot reuse the layer record from {source}: {m}"),
        })?;
        if let Some(p) = &self.progress {
            p.layer_started(index, count, Some(0));
        }
        let fail = |message: String| ConvertError::Layer {
            layer: label.to_string(),
            message: format!("layer record from {source}: {message}"),
        };
        let before = self.stats.clone();
        self.recorder = Recorder::default();
        self.tree.begin_layer();
        let placements: HashMap<Digest, StoredChunk> = record
            .blob
            .iter()
            .flat_map(|b| b.chunks.iter().map(|c| (c.digest, *c)))
            .collect();
        let mut blob_index: Option<u32> = None;
        for op in &record.ops {
            match op {
                Op::Whiteout(path) => {
                    let parts = split_path(path).map_err(fail)?;
                    self.stats.whiteouts += 1;
                    self.tree_whiteout(path, &parts)?;
                }
                Op::HardLink(path, target) => {
                    let parts = split_path(path).map_err(fail)?;
                    let target_parts = split_path(target).map_err(fail)?;
                    self.stats.hard_links += 1;
                    self.tree_hard_link(path, target, &parts, &target_parts)
                        .map_err(fail)?;
                }
                Op::Insert(path, node) => {
                    let parts = split_path(path).map_err(fail)?;
                    let mut node = node.clone();
                    if let NodeData::Regular { chunks, .. } = &mut node.data {
                        for fc in chunks.iter_mut() {
                            let &(digest, size) =
                                record.refs.get(fc.chunk_index as usize).ok_or_else(|| {
                                    fail("a file names a chunk it does not list".into())
                                })?;
                            fc.chunk_index = self.replay_chunk(
                                digest,
                                size,
                                &placements,
                                record,
                                &mut blob_index,
                            )?;
                        }
                    }
                    self.stats.entries += 1;
                    if matches!(node.data, NodeData::Regular { .. }) {
                        self.stats.files += 1;
                    }
                    self.tree_insert(path, &parts, node).map_err(|e| match e {
                        ConvertError::Invalid(m) => fail(m),
                        other => other,
                    })?;
                }
            }
        }
        let f = &record.figures;
        self.stats.file_bytes += f.file_bytes;
        self.stats.hole_bytes += f.hole_bytes;
        self.stats.bytes_in += f.tar_bytes;
        self.stats.layers += 1;
        self.stats.layers_reused += 1;
        let blob = match (blob_index, &record.blob) {
            (Some(_), Some(b)) => {
                self.stats.blob_bytes += b.size;
                Some(b.clone())
            }
            _ => None,
        };
        self.finish_record(
            record.diff_id,
            &before,
            f.tar_bytes,
            blob,
            Some(source.to_string()),
        );
        if let Some(p) = &self.progress {
            p.layer_finished(index);
        }
        Ok(())
    }

    /// The replay counterpart of [`add_chunk`](Self::add_chunk): the chunk's
    /// placement comes from the record's blob instead of the compressor.
    fn replay_chunk(
        &mut self,
        digest: Digest,
        size: u32,
        placements: &HashMap<Digest, StoredChunk>,
        record: &LayerRecord,
        blob_index: &mut Option<u32>,
    ) -> Result<u32, ConvertError> {
        self.stats.chunks += 1;
        if let Some(&i) = self.index.get(&digest) {
            return Ok(i);
        }
        let next = u32::try_from(self.tree.tree().chunks.len())
            .map_err(|_| ConvertError::Invalid("more than 2^32 chunks".into()))?;
        if self.reference_dict_chunk(&digest, next)? {
            return Ok(next);
        }
        let (Some(placed), Some(blob)) = (placements.get(&digest), &record.blob) else {
            return Err(ConvertError::Invalid(format!(
                "layer record of {}: chunk {digest} is new here but not in its blob",
                record.diff_id
            )));
        };
        let b = match *blob_index {
            Some(b) => b,
            None => {
                let info = BlobInfo {
                    digest: blob.digest,
                    size: blob.size,
                    uncompressed_size: blob.uncompressed_size,
                    chunk_count: u32::try_from(blob.chunks.len())
                        .map_err(|_| ConvertError::Invalid("too many chunks in one blob".into()))?,
                };
                let b = self.push_blob(
                    info,
                    BlobOrigin::Layer {
                        source_diff_id: record.diff_id,
                    },
                )?;
                *blob_index = Some(b);
                b
            }
        };
        self.tree.tree_mut().chunks.push(ChunkInfo {
            digest,
            hash: self.options.chunk_hash,
            blob_index: b,
            compressed: placed.compressed,
            compressed_offset: placed.offset,
            compressed_size: placed.size,
            uncompressed_size: size,
            frame: placed.frame,
        });
        self.index.insert(digest, next);
        self.stats.unique_chunks += 1;
        self.stats.unique_bytes += u64::from(size);
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

    fn finish_layer_blob(&mut self, diff_id: Digest) -> Result<Option<RecordBlob>, ConvertError> {
        let Some(mut current) = self.current.take() else {
            return Ok(None);
        };
        current.seal_pack(Lane::Hot)?;
        current.seal_pack(Lane::Cold)?;
        let result = current.pipeline.finish()?;
        let tree = self.tree.tree_mut();
        let mut uncompressed = 0u64;
        let mut stored = Vec::with_capacity(result.placements.len());
        for p in &result.placements {
            let chunk = tree.chunks.get_mut(p.chunk as usize).ok_or_else(|| {
                ConvertError::Invalid("internal error: placement of an unknown chunk".into())
            })?;
            chunk.compressed = p.compressed;
            chunk.compressed_offset = p.offset;
            chunk.compressed_size = p.size;
            chunk.frame = p.frame;
            uncompressed += u64::from(chunk.uncompressed_size);
            stored.push(StoredChunk {
                digest: chunk.digest,
                compressed: p.compressed,
                offset: p.offset,
                size: p.size,
                uncompressed_size: chunk.uncompressed_size,
                frame: p.frame,
            });
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
        Ok(Some(RecordBlob {
            digest: result.digest,
            size: result.size,
            uncompressed_size: uncompressed,
            chunks: stored,
        }))
    }

    /// Sets what to fetch first after mounting, in order: files or stretches
    /// of files by absolute path in the merged tree (as `skiff mount
    /// --record-access` writes them; see [`crate::prefetch`]). They are
    /// resolved by [`finish`](Self::finish); what names nothing is skipped
    /// with a warning.
    pub fn set_prefetch_list(&mut self, entries: Vec<PrefetchEntry>) {
        self.prefetch_list = entries;
    }

    /// Writes the bootstrap. Unreachable nodes (whited out, replaced) are dropped.
    pub fn finish(mut self) -> Result<Converted, ConvertError> {
        if self.current.is_some() {
            return Err(ConvertError::Invalid(
                "internal error: a layer blob is unfinished".into(),
            ));
        }
        let (prefetch, prefetch_ranges) = crate::prefetch::resolve(&self.tree, &self.prefetch_list);
        let mut tree = self.tree.into_tree();
        tree.prefetch = prefetch;
        tree.prefetch_ranges = prefetch_ranges;
        in_blob_order(&mut tree);
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
            layers: self.layers,
            stats: self.stats,
        })
    }
}

/// Renumbers the chunk table in blob order (blob, offset, offset in a
/// shared frame), so that chunks next to each other in a blob are next to
/// each other in the table: a pack's members are entered when their files
/// are met but stored when the pack is sealed, after larger chunks met
/// later. Readers walk the table to find what a fetch can bring along.
fn in_blob_order(tree: &mut skiff_format::ImageTree) {
    let mut order: Vec<u32> = (0..tree.chunks.len() as u32).collect();
    order.sort_by_key(|&i| {
        let c = &tree.chunks[i as usize];
        (
            c.blob_index,
            c.compressed_offset,
            c.frame.map_or(0, |f| f.offset),
        )
    });
    if order
        .iter()
        .enumerate()
        .all(|(new, &old)| new as u32 == old)
    {
        return;
    }
    let mut new_of = vec![0u32; order.len()];
    for (new, &old) in order.iter().enumerate() {
        new_of[old as usize] = new as u32;
    }
    tree.chunks = order
        .iter()
        .filter_map(|&old| tree.chunks.get(old as usize).copied())
        .collect();
    for node in &mut tree.nodes {
        if let NodeData::Regular { chunks, .. } = &mut node.data {
            for fc in chunks.iter_mut() {
                if let Some(&n) = new_of.get(fc.chunk_index as usize) {
                    fc.chunk_index = n;
                }
            }
        }
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
