//! The layer target: arbitrary bytes as a layer, converted on top of a base.
//!
//! The input is one layer as a registry would serve it: a tar, gzip or zstd
//! stream, told apart by its first bytes as for any real layer. A
//! [`Converter`] applies a fixed base layer ([`crate::seeds::base_layer`]:
//! directories, files, links) and then the input, so that whiteouts, opaque
//! directories, hard links and replacements in the input meet real entries.
//! Small content-defined chunks make even a short input span several chunks.
//!
//! A plain tar input runs a second time with every header checksum it
//! reaches recomputed ([`reseal_tar`]), so that mutated headers get past
//! the checksum test to the code that interprets them (as the bootstrap
//! target does with its CRCs).
//!
//! When the conversion succeeds, what it wrote must be sound: the bootstrap
//! parses and validates and decodes to a tree, and every chunk it lists
//! decodes, with its digest, from the data blob the converter wrote.

use std::collections::HashMap;
use std::io::{self, Cursor, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use skiff_converter::{BlobOut, BlobSink, Chunking, ConvertError, ConvertOptions, Converter};
use skiff_format::{decode_chunk, Bootstrap, Digest};

use crate::Outcome;

/// Converts the base layer and then `data`; see the module documentation.
pub fn layer(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    convert_and_check(data, &mut out, false);
    if let Some(sealed) = reseal_tar(data) {
        convert_and_check(&sealed, &mut out, true);
    }
    out
}

fn convert_and_check(data: &[u8], out: &mut Outcome, resealed: bool) {
    let sink = Arc::new(MemorySink::default());
    if let Some(converted) = convert(&sink, data, out, resealed) {
        check_output(&converted.bootstrap, &sink);
    }
}

/// `data` with the checksum of every tar header recomputed, following the
/// headers' size fields from the start; `None` when `data` is compressed or
/// nothing changed.
pub fn reseal_tar(data: &[u8]) -> Option<Vec<u8>> {
    if data.starts_with(&[0x1f, 0x8b]) || data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return None;
    }
    let mut out = data.to_vec();
    let mut pos = 0usize;
    while let Some(block) = out.get_mut(pos..pos.checked_add(512)?) {
        if block.iter().all(|&b| b == 0) {
            break;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = octal_or_binary(&block[124..136])?;
        let padded = size.checked_next_multiple_of(512)?;
        pos = pos
            .checked_add(512)?
            .checked_add(usize::try_from(padded).ok()?)?;
    }
    (out != data).then_some(out)
}

/// A tar size field: octal text, or base-256 when the top bit is set.
fn octal_or_binary(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        return field[1..]
            .iter()
            .try_fold(u64::from(field[0] & 0x7f), |v, &b| {
                v.checked_mul(256)?.checked_add(u64::from(b))
            });
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The conversion settings: small chunks (256 B..4 KiB; 64 B..4 KiB, 256 B on average, in
/// files of 16 KiB or more), fast zstd, one compression thread.
pub fn options() -> ConvertOptions {
    ConvertOptions {
        chunking: Chunking::FastCdc {
            min: 256,
            avg: 1024,
            max: 4096,
        },
        large_files: Some(skiff_converter::LargeFiles {
            from: 16 << 10,
            chunking: Chunking::FastCdc {
                min: 64,
                avg: 256,
                max: 4096,
            },
        }),
        level: 1,
        pack_size: 4096,
        threads: 1,
        chunk_hash: skiff_format::ChunkHash::Blake3,
        cold_last: true,
    }
}

fn convert(
    sink: &Arc<MemorySink>,
    data: &[u8],
    out: &mut Outcome,
    resealed: bool,
) -> Option<skiff_converter::Converted> {
    let base = crate::seeds::base_layer();
    let sink_dyn: Arc<dyn BlobSink> = sink.clone();
    let mut c = match Converter::new(options(), sink_dyn, None) {
        Ok(c) => c,
        Err(e) => panic!("the fuzz conversion settings are refused: {e}"),
    };
    if let Err(e) = c.add_layer("base", Box::new(Cursor::new(base)), None, None, 0, 2) {
        panic!("the fixed base layer does not convert: {e}");
    }
    let r = c.add_layer(
        "input",
        Box::new(Cursor::new(data.to_vec())),
        Some(data.len() as u64),
        None,
        1,
        2,
    );
    out.push(
        if resealed {
            "add_layer-resealed"
        } else {
            "add_layer"
        },
        &r,
    );
    r.ok()?;
    let r = c.finish();
    out.push(
        if resealed {
            "finish-resealed"
        } else {
            "finish"
        },
        &r,
    );
    r.ok()
}

/// Panics unless `bootstrap` is sound and every chunk it lists decodes from
/// the blobs in `sink`.
fn check_output(bootstrap: &[u8], sink: &MemorySink) {
    let b = match Bootstrap::parse(bootstrap) {
        Ok(b) => b,
        Err(e) => panic!("the converter wrote a bootstrap its reader refuses: {e}"),
    };
    if let Err(e) = b.validate() {
        panic!("the converter wrote a bootstrap that does not validate: {e}");
    }
    if let Err(e) = b.to_tree() {
        panic!("the converter wrote a bootstrap that does not decode to a tree: {e}");
    }
    let blobs = sink.blobs();
    for i in 0..b.chunk_count() {
        let chunk = match b.chunk(i) {
            Ok(c) => c,
            Err(e) => panic!("chunk {i} of a validated bootstrap: {e}"),
        };
        let blob = match b.blob(chunk.blob_index) {
            Ok(blob) => blob,
            Err(e) => panic!("blob {} of chunk {i}: {e}", chunk.blob_index),
        };
        let Some(bytes) = blobs.get(&blob.digest) else {
            panic!(
                "chunk {i} is in blob {}, which was never committed",
                blob.digest
            );
        };
        if bytes.len() as u64 != blob.size {
            panic!(
                "blob {} is {} bytes, the bootstrap says {}",
                blob.digest,
                bytes.len(),
                blob.size
            );
        }
        let stored = usize::try_from(chunk.compressed_offset)
            .ok()
            .and_then(|start| bytes.get(start..start + chunk.compressed_size as usize));
        let Some(stored) = stored else {
            panic!("chunk {i} lies outside its blob {}", blob.digest);
        };
        if let Err(e) = decode_chunk(&chunk, stored) {
            panic!("chunk {i} as the converter stored it does not decode: {e}");
        }
    }
}

/// Keeps committed data blobs in memory, by digest. The output side of the
/// conversion, which is not under test here: the checks read it back.
#[derive(Default)]
pub struct MemorySink {
    blobs: Arc<Mutex<HashMap<Digest, Vec<u8>>>>,
}

impl MemorySink {
    fn blobs(&self) -> MutexGuard<'_, HashMap<Digest, Vec<u8>>> {
        lock(&self.blobs)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlobSink for MemorySink {
    fn create(&self) -> Result<Box<dyn BlobOut>, ConvertError> {
        Ok(Box::new(MemoryBlob {
            bytes: Vec::new(),
            blobs: self.blobs.clone(),
        }))
    }
}

struct MemoryBlob {
    bytes: Vec<u8>,
    blobs: Arc<Mutex<HashMap<Digest, Vec<u8>>>>,
}

impl Write for MemoryBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobOut for MemoryBlob {
    fn commit(self: Box<Self>) -> Result<(Digest, u64), ConvertError> {
        let digest = Digest::of(&self.bytes);
        let size = self.bytes.len() as u64;
        lock(&self.blobs).insert(digest, self.bytes);
        Ok((digest, size))
    }
}
