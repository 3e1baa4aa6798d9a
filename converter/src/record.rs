//! Layer records: what converting one source layer produced, kept so that a
//! layer seen before is never chunked or compressed again.
//!
//! A [`LayerRecord`] holds the layer's changeset as the tree builder applied
//! it (every insert, hard link and whiteout, in tar order, with each file's
//! chunk map given by chunk digest), the figures of the layer, and the data
//! blob the layer wrote (digest, size and where each chunk sits in it).
//! Replaying a record ([`Converter::replay_layer`](crate::Converter::replay_layer))
//! goes through the same tree and chunk-table code as reading the tar, so
//! the merged bootstrap is byte-identical to a fresh conversion; the source
//! layer is not even decompressed.
//!
//! A record is keyed by the layer's diff ID and a [`settings_key`]: the
//! digest of everything that decides the output bytes (chunker and sizes,
//! zstd level and library version, bootstrap and record format versions).
//!
//! # Encoding
//! `SKIFFLR1` (8 bytes), then one zstd frame holding, little-endian:
//! settings key (32), diff ID (32), figures (7 x u64: entries, files, hard
//! links, whiteouts, file bytes, hole bytes, tar bytes), blob flag (u8) and
//! if set the blob (digest 32, size u64, uncompressed size u64, chunk count
//! u32, then per chunk: digest 32, flags u8 (bit 0 zstd, bit 1 in a shared
//! frame), offset u64, stored size u32, size u32, and with bit 1 the frame
//! offset u32 and frame size u32), the referenced chunks (count u32, then digest 32 +
//! size u32 each, in first-reference order), and the operations (count u32,
//! each a tag byte: 1 whiteout PATH, 2 hard link PATH TARGET, 3 insert PATH
//! NODE). Byte strings are a u32 length and the bytes. A node is mode, uid,
//! gid (u32), mtime seconds (i64), nanoseconds (u32), xattrs (count u32,
//! name and value each), a kind byte (1 regular: size u64, chunk count u32,
//! then file offset u64 + reference index u32 each; 2 directory; 3 symlink:
//! target; 4/5 char/block device: major, minor u32; 6 fifo; 7 socket).
//! docs/format.md ("Layer records") describes where records are kept.

use std::collections::BTreeMap;
use std::io::Read;

use skiff_format::{Attrs, ChunkInfo, Digest, FileChunk, Node, NodeData, SharedFrame};

use crate::convert::ConvertOptions;
use crate::error::ConvertError;

/// First bytes of an encoded record.
pub const RECORD_MAGIC: &[u8; 8] = b"SKIFFLR1";
/// Version of the record encoding; part of the settings key.
pub const RECORD_VERSION: u32 = 2;
/// Largest decoded record accepted: far above any real layer's metadata.
pub const MAX_RECORD_SIZE: u64 = 1 << 30;

/// The text the settings key is the digest of: one `name value` per line.
pub fn settings_text(options: &ConvertOptions) -> String {
    format!(
        "skiff-layer-record {RECORD_VERSION}\nbootstrap {}.{}\nchunking {}\nchunk-hash {}\npack-size {}\nblob-order {}\nzstd-level {}\nzstd-library {}\n",
        skiff_format::layout::VERSION_MAJOR,
        skiff_format::layout::VERSION_MINOR,
        options.chunking_text(),
        options.chunk_hash,
        options.pack_size,
        if options.cold_last { "cold-last" } else { "tar" },
        options.level,
        zstd::zstd_safe::version_number(),
    )
}

/// The digest of the conversion settings that decide the output bytes
/// ([`settings_text`]); threads and progress do not count.
pub fn settings_key(options: &ConvertOptions) -> Digest {
    Digest::of(settings_text(options).as_bytes())
}

/// Figures of one layer, replayed into [`crate::Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerFigures {
    /// Tar entries applied (not hard links or whiteouts).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Hard links.
    pub hard_links: u64,
    /// Whiteouts.
    pub whiteouts: u64,
    /// Bytes of file content.
    pub file_bytes: u64,
    /// All-zero content kept as holes.
    pub hole_bytes: u64,
    /// Bytes of the uncompressed tar.
    pub tar_bytes: u64,
}

/// Where one chunk of the layer's blob is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    /// SHA-256 of its data.
    pub digest: Digest,
    /// Stored as a zstd frame (else raw).
    pub compressed: bool,
    /// Offset in the blob.
    pub offset: u64,
    /// Stored length.
    pub size: u32,
    /// Data length.
    pub uncompressed_size: u32,
    /// Set when it is a slice of a shared frame (a pack of small chunks).
    pub frame: Option<SharedFrame>,
}

/// The data blob a layer wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBlob {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Sum of its chunks' sizes.
    pub uncompressed_size: u64,
    /// Its chunks, in blob order (the order they were first met).
    pub chunks: Vec<StoredChunk>,
}

/// One change the layer made to the tree, in tar order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A `.wh.` entry at this tar path.
    Whiteout(Vec<u8>),
    /// A hard link: path, target path.
    HardLink(Vec<u8>, Vec<u8>),
    /// An entry at this tar path. For regular files, each
    /// [`FileChunk::chunk_index`] indexes [`LayerRecord::refs`].
    Insert(Vec<u8>, Node),
}

/// The result of converting one source layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRecord {
    /// [`settings_key`] of the conversion.
    pub settings: Digest,
    /// The source layer's diff ID.
    pub diff_id: Digest,
    /// Figures of the layer.
    pub figures: LayerFigures,
    /// The blob it wrote, if any chunk was new in its conversion.
    pub blob: Option<RecordBlob>,
    /// Distinct chunks its files reference (digest, size), in the order
    /// they were first referenced.
    pub refs: Vec<(Digest, u32)>,
    /// The changes, in tar order.
    pub ops: Vec<Op>,
}

impl LayerRecord {
    /// True when the record's blob stores every chunk it references: it can
    /// then be replayed in any conversion where those chunks are new.
    pub fn self_contained(&self) -> bool {
        self.blob
            .as_ref()
            .map_or(self.refs.is_empty(), |b| b.chunks.len() == self.refs.len())
    }

    /// Encodes the record (see the module docs).
    pub fn encode(&self) -> Result<Vec<u8>, ConvertError> {
        let mut w = Vec::with_capacity(64 + self.refs.len() * 36 + self.ops.len() * 96);
        w.extend_from_slice(&self.settings.0);
        w.extend_from_slice(&self.diff_id.0);
        let f = &self.figures;
        for v in [
            f.entries,
            f.files,
            f.hard_links,
            f.whiteouts,
            f.file_bytes,
            f.hole_bytes,
            f.tar_bytes,
        ] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        match &self.blob {
            None => w.push(0),
            Some(b) => {
                w.push(1);
                w.extend_from_slice(&b.digest.0);
                w.extend_from_slice(&b.size.to_le_bytes());
                w.extend_from_slice(&b.uncompressed_size.to_le_bytes());
                put_len(&mut w, b.chunks.len())?;
                for c in &b.chunks {
                    w.extend_from_slice(&c.digest.0);
                    w.push(u8::from(c.compressed) | (u8::from(c.frame.is_some()) << 1));
                    w.extend_from_slice(&c.offset.to_le_bytes());
                    w.extend_from_slice(&c.size.to_le_bytes());
                    w.extend_from_slice(&c.uncompressed_size.to_le_bytes());
                    if let Some(f) = c.frame {
                        w.extend_from_slice(&f.offset.to_le_bytes());
                        w.extend_from_slice(&f.size.to_le_bytes());
                    }
                }
            }
        }
        put_len(&mut w, self.refs.len())?;
        for (d, size) in &self.refs {
            w.extend_from_slice(&d.0);
            w.extend_from_slice(&size.to_le_bytes());
        }
        put_len(&mut w, self.ops.len())?;
        for op in &self.ops {
            match op {
                Op::Whiteout(p) => {
                    w.push(1);
                    put_bytes(&mut w, p)?;
                }
                Op::HardLink(p, t) => {
                    w.push(2);
                    put_bytes(&mut w, p)?;
                    put_bytes(&mut w, t)?;
                }
                Op::Insert(p, node) => {
                    w.push(3);
                    put_bytes(&mut w, p)?;
                    put_node(&mut w, node)?;
                }
            }
        }
        let mut out = RECORD_MAGIC.to_vec();
        // Level 1: records are read by conversions, never pulled by nodes,
        // and on their repetitive encoding it is both the fastest level and
        // no larger (the record of 100,000 small files, 17.1 MB: level 1
        // 8.09 MB in 0.07 s, level 6 8.16 MB in 0.29 s).
        let frame = zstd::bulk::compress(&w, 1).map_err(|e| ConvertError::Io {
            context: "compressing a layer record".into(),
            source: e,
        })?;
        out.extend_from_slice(&frame);
        Ok(out)
    }

    /// Decodes and checks a record. Never panics; any inconsistency is an
    /// error naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<LayerRecord, String> {
        let body = bytes
            .strip_prefix(RECORD_MAGIC)
            .ok_or("not a Skiff layer record (bad magic)")?;
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(body)
            .map_err(|e| format!("layer record: {e}"))?
            .take(MAX_RECORD_SIZE + 1)
            .read_to_end(&mut raw)
            .map_err(|e| format!("layer record is not valid zstd: {e}"))?;
        if raw.len() as u64 > MAX_RECORD_SIZE {
            return Err("layer record is larger than 1 GiB".into());
        }
        let mut r = Reader { b: &raw };
        let settings = r.digest()?;
        let diff_id = r.digest()?;
        let figures = LayerFigures {
            entries: r.u64()?,
            files: r.u64()?,
            hard_links: r.u64()?,
            whiteouts: r.u64()?,
            file_bytes: r.u64()?,
            hole_bytes: r.u64()?,
            tar_bytes: r.u64()?,
        };
        let blob = match r.u8()? {
            0 => None,
            1 => {
                let digest = r.digest()?;
                let size = r.u64()?;
                let uncompressed_size = r.u64()?;
                let n = r.count(53)?;
                let mut chunks = Vec::with_capacity(n);
                let (mut end, mut total) = (0u64, 0u64);
                // The shared frame the previous chunk was in: its members
                // follow one another and share its stored bytes.
                let mut last_frame: Option<(u64, u32, u32)> = None;
                for _ in 0..n {
                    let digest = r.digest()?;
                    let flags = r.u8()?;
                    if flags > 3 || flags == 2 {
                        return Err(format!("stored chunk flags {flags} unknown"));
                    }
                    let (offset, size, uncompressed_size) = (r.u64()?, r.u32()?, r.u32()?);
                    let frame = if flags & 2 != 0 {
                        Some(SharedFrame {
                            offset: r.u32()?,
                            size: r.u32()?,
                        })
                    } else {
                        None
                    };
                    let c = StoredChunk {
                        digest,
                        compressed: flags & 1 != 0,
                        offset,
                        size,
                        uncompressed_size,
                        frame,
                    };
                    if c.size == 0 || c.uncompressed_size == 0 {
                        return Err("a stored chunk has size 0".into());
                    }
                    if let Some(f) = c.frame {
                        if u64::from(f.offset) + u64::from(c.uncompressed_size) > u64::from(f.size)
                        {
                            return Err("a stored chunk lies outside its frame".into());
                        }
                    }
                    let same_frame = matches!((c.frame, last_frame), (Some(f), Some(l)) if l == (c.offset, c.size, f.size));
                    if !same_frame {
                        if c.offset != end {
                            return Err("stored chunks do not tile the blob".into());
                        }
                        end = end.saturating_add(u64::from(c.size));
                    }
                    last_frame = c.frame.map(|f| (c.offset, c.size, f.size));
                    total = total.saturating_add(u64::from(c.uncompressed_size));
                    chunks.push(c);
                }
                if end != size || total != uncompressed_size {
                    return Err("blob size does not match its chunks".into());
                }
                Some(RecordBlob {
                    digest,
                    size,
                    uncompressed_size,
                    chunks,
                })
            }
            f => return Err(format!("blob flag {f} unknown")),
        };
        let n = r.count(36)?;
        let mut refs = Vec::with_capacity(n);
        for _ in 0..n {
            let d = r.digest()?;
            let size = r.u32()?;
            if size == 0 {
                return Err("a referenced chunk has size 0".into());
            }
            refs.push((d, size));
        }
        let n = r.count(5)?;
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            ops.push(match r.u8()? {
                1 => Op::Whiteout(r.bytes()?),
                2 => Op::HardLink(r.bytes()?, r.bytes()?),
                3 => {
                    let path = r.bytes()?;
                    let node = r.node(refs.len())?;
                    Op::Insert(path, node)
                }
                t => return Err(format!("operation tag {t} unknown")),
            });
        }
        if !r.b.is_empty() {
            return Err(format!("{} bytes after the last operation", r.b.len()));
        }
        if let Some(b) = &blob {
            // Every stored chunk must be one the layer references.
            let known: std::collections::HashMap<Digest, u32> = refs.iter().copied().collect();
            for c in &b.chunks {
                if known.get(&c.digest) != Some(&c.uncompressed_size) {
                    return Err(format!(
                        "stored chunk {} is not referenced by the layer",
                        c.digest
                    ));
                }
            }
        }
        Ok(LayerRecord {
            settings,
            diff_id,
            figures,
            blob,
            refs,
            ops,
        })
    }
}

/// Collects a [`LayerRecord`] while a layer is read or replayed.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    pub(crate) ops: Vec<Op>,
    pub(crate) refs: Vec<(Digest, u32)>,
    /// Image chunk index -> index in `refs`.
    ref_of: std::collections::HashMap<u32, u32>,
}

impl Recorder {
    /// Records an insert; `node`'s chunk indices are the image's.
    pub(crate) fn insert(
        &mut self,
        path: &[u8],
        node: &Node,
        chunks: &[ChunkInfo],
    ) -> Result<(), ConvertError> {
        let mut node = node.clone();
        if let NodeData::Regular { chunks: map, .. } = &mut node.data {
            for fc in map.iter_mut() {
                let r = match self.ref_of.get(&fc.chunk_index) {
                    Some(&r) => r,
                    None => {
                        let info = chunks.get(fc.chunk_index as usize).ok_or_else(|| {
                            ConvertError::Invalid("internal error: unknown chunk recorded".into())
                        })?;
                        let r = u32::try_from(self.refs.len())
                            .map_err(|_| ConvertError::Invalid("too many chunks".into()))?;
                        self.refs.push((info.digest, info.uncompressed_size));
                        self.ref_of.insert(fc.chunk_index, r);
                        r
                    }
                };
                *fc = FileChunk {
                    file_offset: fc.file_offset,
                    chunk_index: r,
                };
            }
        }
        self.ops.push(Op::Insert(path.to_vec(), node));
        Ok(())
    }
}

fn put_len(w: &mut Vec<u8>, n: usize) -> Result<(), ConvertError> {
    let n = u32::try_from(n)
        .map_err(|_| ConvertError::Invalid("layer record: a list is too long".into()))?;
    w.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) -> Result<(), ConvertError> {
    put_len(w, b.len())?;
    w.extend_from_slice(b);
    Ok(())
}

fn put_node(w: &mut Vec<u8>, node: &Node) -> Result<(), ConvertError> {
    let a = &node.attrs;
    w.extend_from_slice(&a.mode.to_le_bytes());
    w.extend_from_slice(&a.uid.to_le_bytes());
    w.extend_from_slice(&a.gid.to_le_bytes());
    w.extend_from_slice(&a.mtime_sec.to_le_bytes());
    w.extend_from_slice(&a.mtime_nsec.to_le_bytes());
    put_len(w, node.xattrs.len())?;
    for (k, v) in &node.xattrs {
        put_bytes(w, k)?;
        put_bytes(w, v)?;
    }
    match &node.data {
        NodeData::Regular { size, chunks } => {
            w.push(1);
            w.extend_from_slice(&size.to_le_bytes());
            put_len(w, chunks.len())?;
            for c in chunks {
                w.extend_from_slice(&c.file_offset.to_le_bytes());
                w.extend_from_slice(&c.chunk_index.to_le_bytes());
            }
        }
        NodeData::Directory { .. } => w.push(2),
        NodeData::Symlink { target } => {
            w.push(3);
            put_bytes(w, target)?;
        }
        NodeData::CharDevice { major, minor } | NodeData::BlockDevice { major, minor } => {
            w.push(if matches!(node.data, NodeData::CharDevice { .. }) {
                4
            } else {
                5
            });
            w.extend_from_slice(&major.to_le_bytes());
            w.extend_from_slice(&minor.to_le_bytes());
        }
        NodeData::Fifo => w.push(6),
        NodeData::Socket => w.push(7),
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.b.len() < n {
            return Err("layer record ends early".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn digest(&mut self) -> Result<Digest, String> {
        Ok(Digest(self.array()?))
    }
    /// A list length, checked against the bytes left (each item takes at
    /// least `min` bytes), so a hostile count cannot reserve huge memory.
    fn count(&mut self, min: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.b.len() {
            return Err(format!(
                "layer record: a count of {n} does not fit the bytes left"
            ));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn node(&mut self, refs: usize) -> Result<Node, String> {
        let attrs = Attrs {
            mode: self.u32()?,
            uid: self.u32()?,
            gid: self.u32()?,
            mtime_sec: i64::from_le_bytes(self.array()?),
            mtime_nsec: self.u32()?,
        };
        let n = self.count(8)?;
        let mut xattrs = BTreeMap::new();
        for _ in 0..n {
            let k = self.bytes()?;
            let v = self.bytes()?;
            xattrs.insert(k, v);
        }
        let data = match self.u8()? {
            1 => {
                let size = self.u64()?;
                let n = self.count(12)?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    let file_offset = self.u64()?;
                    let chunk_index = self.u32()?;
                    if chunk_index as usize >= refs {
                        return Err(format!("a file references chunk {chunk_index} of {refs}"));
                    }
                    chunks.push(FileChunk {
                        file_offset,
                        chunk_index,
                    });
                }
                NodeData::Regular { size, chunks }
            }
            2 => NodeData::Directory {
                entries: BTreeMap::new(),
            },
            3 => NodeData::Symlink {
                target: self.bytes()?,
            },
            4 => NodeData::CharDevice {
                major: self.u32()?,
                minor: self.u32()?,
            },
            5 => NodeData::BlockDevice {
                major: self.u32()?,
                minor: self.u32()?,
            },
            6 => NodeData::Fifo,
            7 => NodeData::Socket,
            k => return Err(format!("node kind {k} unknown")),
        };
        Ok(Node {
            attrs,
            data,
            xattrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerRecord {
        let d = |b: u8| Digest([b; 32]);
        LayerRecord {
            settings: d(1),
            diff_id: d(2),
            figures: LayerFigures {
                entries: 3,
                files: 1,
                hard_links: 1,
                whiteouts: 1,
                file_bytes: 10,
                hole_bytes: 0,
                tar_bytes: 4096,
            },
            blob: Some(RecordBlob {
                digest: d(3),
                size: 7,
                uncompressed_size: 10,
                chunks: vec![StoredChunk {
                    digest: d(4),
                    compressed: true,
                    offset: 0,
                    size: 7,
                    uncompressed_size: 10,
                    frame: None,
                }],
            }),
            refs: vec![(d(4), 10)],
            ops: vec![
                Op::Insert(
                    b"a/f".to_vec(),
                    Node {
                        attrs: Attrs {
                            mode: 0o644,
                            uid: 1,
                            gid: 2,
                            mtime_sec: -5,
                            mtime_nsec: 9,
                        },
                        data: NodeData::Regular {
                            size: 10,
                            chunks: vec![FileChunk {
                                file_offset: 0,
                                chunk_index: 0,
                            }],
                        },
                        xattrs: [(b"user.x".to_vec(), b"\n\0".to_vec())].into(),
                    },
                ),
                Op::HardLink(b"b".to_vec(), b"a/f".to_vec()),
                Op::Whiteout(b"c/.wh.d".to_vec()),
                Op::Insert(
                    b"dev".to_vec(),
                    Node {
                        attrs: Attrs::default(),
                        data: NodeData::BlockDevice { major: 8, minor: 1 },
                        xattrs: BTreeMap::new(),
                    },
                ),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let bytes = r.encode().unwrap();
        assert_eq!(LayerRecord::decode(&bytes).unwrap(), r);
        assert!(r.self_contained());
    }

    #[test]
    fn truncated_or_mangled_records_are_errors() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(LayerRecord::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut bad = sample();
        bad.refs.clear();
        let bytes = bad.encode().unwrap();
        assert!(LayerRecord::decode(&bytes).is_err());
    }
}
