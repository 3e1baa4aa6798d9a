//! The chunk target: chunk records and stored bytes, through the decoder,
//! the range planner and a [`ChunkSource`] over a real blob store.
//!
//! Input layout (little-endian): one byte `n` (1 + `n % 8` records follow),
//! then per record 13 bytes: `flags` (u8), `offset`, `compressed_size`,
//! `uncompressed_size` (u32 each); the rest of the input is the data blob.
//! Flags: bit 0, the chunk is stored as a zstd frame; bit 1, its digest is
//! the SHA-256 of what a plain streaming zstd decoder makes of the stored
//! bytes (else a fixed digest no data has); bit 2, its `uncompressed_size`
//! is that decoder's output length; bit 3, the chunk is the second half of
//! a shared frame (format 1.1) whose size is the record's size (after bit
//! 2), and bits 1 and 2 then speak of that half. Bits 1 and 2 let the
//! fuzzer reach the paths behind the digest and size checks, where the
//! decoder must agree with the reference decoder.
//!
//! Checks: a chunk that decodes has its record's size and digest (and the
//! reference decoder's bytes); every chunk is in exactly one planned range
//! request, inside it; when every chunk decodes on its own, the source
//! (plan, range reads from the blob, cut, verify) serves all of them,
//! correctly.

use std::io::Read;
use std::sync::Arc;

use skiff_format::{decode_chunk, ChunkHash, ChunkInfo, Digest, SharedFrame, MAX_CHUNK_SIZE};
use skiff_fusefs::fetch::{
    DEFAULT_IN_FLIGHT, DEFAULT_MAX_REQUEST, PREFETCH_MAX_GAP, PREFETCH_MAX_REQUEST,
};
use skiff_fusefs::{plan_runs, Backend, ChunkRequest, ChunkSource, Metrics, SourceOptions};
use skiff_registry::LocalBlobStore;

use crate::Outcome;

/// Bytes of one record in the input.
pub const RECORD_LEN: usize = 13;

/// One record of the input, before the flags are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Bit 0: compressed; bit 1: honest digest; bit 2: honest size; bit 3:
    /// in a shared frame; bit 4: a BLAKE3 digest (format 1.4), else SHA-256.
    pub flags: u8,
    /// Offset of the stored bytes in the blob.
    pub offset: u32,
    /// Length of the stored bytes.
    pub compressed_size: u32,
    /// Length of the chunk's data.
    pub uncompressed_size: u32,
}

impl Record {
    /// The 13 bytes of this record in an input.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0] = self.flags;
        b[1..5].copy_from_slice(&self.offset.to_le_bytes());
        b[5..9].copy_from_slice(&self.compressed_size.to_le_bytes());
        b[9..13].copy_from_slice(&self.uncompressed_size.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let u32_at = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
        };
        Some(Record {
            flags: *b.first()?,
            offset: u32_at(1)?,
            compressed_size: u32_at(5)?,
            uncompressed_size: u32_at(9)?,
        })
    }
}

/// An input of the chunk target: `records` over `blob`.
pub fn encode_input(records: &[Record], blob: &[u8]) -> Vec<u8> {
    let mut out = vec![(records.len().max(1) - 1) as u8];
    for r in records {
        out.extend_from_slice(&r.encode());
    }
    out.extend_from_slice(blob);
    out
}

/// A digest no chunk data has (as far as anyone knows).
const LYING_DIGEST: Digest = Digest([0x5a; 32]);

/// What a plain streaming zstd decoder makes of `stored` (at most one byte
/// more than the largest chunk), or `stored` itself for a raw chunk.
fn reference_decode(stored: &[u8], compressed: bool) -> Option<Vec<u8>> {
    if !compressed {
        return Some(stored.to_vec());
    }
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(stored)
        .ok()?
        .take(u64::from(MAX_CHUNK_SIZE) + 1)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

fn stored_of<'a>(blob: &'a [u8], info: &ChunkInfo) -> Option<&'a [u8]> {
    let start = usize::try_from(info.compressed_offset).ok()?;
    blob.get(start..start.checked_add(info.compressed_size as usize)?)
}

/// Runs `data` through the decoder, the planner and a chunk source; see the
/// module documentation.
pub fn chunk(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    let Some((&n, rest)) = data.split_first() else {
        return out;
    };
    let n = usize::from(n % 8) + 1;
    let Some(records) = rest.get(..n * RECORD_LEN) else {
        return out;
    };
    let blob = &rest[n * RECORD_LEN..];
    let blob_digest = Digest::of(blob);
    let mut reqs = Vec::with_capacity(n);
    let mut references = Vec::with_capacity(n);
    for (i, raw) in records.chunks_exact(RECORD_LEN).enumerate() {
        let Some(r) = Record::decode(raw) else {
            return out;
        };
        let mut info = ChunkInfo {
            digest: LYING_DIGEST,
            hash: if r.flags & 16 != 0 {
                ChunkHash::Blake3
            } else {
                ChunkHash::Sha256
            },
            blob_index: 0,
            compressed: r.flags & 1 != 0,
            compressed_offset: u64::from(r.offset),
            compressed_size: r.compressed_size,
            uncompressed_size: r.uncompressed_size,
            frame: None,
        };
        let mut reference =
            stored_of(blob, &info).and_then(|s| reference_decode(s, info.compressed));
        if let Some(data) = &reference {
            if r.flags & 4 != 0 {
                info.uncompressed_size = u32::try_from(data.len()).unwrap_or(u32::MAX);
            }
        }
        if r.flags & 8 != 0 {
            // A slice of a shared frame: the second half of what the size
            // field says the frame holds.
            let size = info.uncompressed_size;
            let offset = size / 2;
            info.frame = Some(SharedFrame { offset, size });
            info.uncompressed_size = size - offset;
            reference = reference.and_then(|d| {
                d.get(offset as usize..size as usize)
                    .filter(|_| d.len() == size as usize)
                    .map(<[u8]>::to_vec)
            });
        }
        if let Some(data) = &reference {
            if r.flags & 2 != 0 {
                info.digest = info.hash.digest(data);
            }
        }
        references.push(reference);
        reqs.push(ChunkRequest {
            index: i as u32,
            info,
            blob: blob_digest,
        });
    }

    let mut all_decode = true;
    for (req, reference) in reqs.iter().zip(&references) {
        let Some(stored) = stored_of(blob, &req.info) else {
            all_decode = false;
            out.steps
                .push(("decode", Err("outside the blob".to_string())));
            continue;
        };
        let r = decode_chunk(&req.info, stored);
        if let Ok(d) = &r {
            check_chunk(req, d);
            if let Some(reference) = reference {
                if d != reference {
                    panic!(
                        "chunk {}: the decoder and a plain zstd decoder disagree ({} and {} bytes)",
                        req.index,
                        d.len(),
                        reference.len()
                    );
                }
            }
        }
        all_decode &= r.is_ok();
        out.push("decode", &r);
    }

    for (max_bytes, max_gap) in [
        (DEFAULT_MAX_REQUEST, 0),
        (PREFETCH_MAX_REQUEST, PREFETCH_MAX_GAP),
        (0, 0),
        (1024, 64),
    ] {
        check_plan(&reqs, max_bytes, max_gap);
    }

    let r = serve(blob, &reqs);
    if all_decode {
        if let Err(e) = &r {
            panic!("every chunk decodes on its own, but the chunk source fails: {e}");
        }
    }
    out.push("source", &r);
    out
}

fn check_chunk(req: &ChunkRequest, data: &[u8]) {
    if data.len() != req.info.uncompressed_size as usize {
        panic!(
            "chunk {}: {} bytes served, the record says {}",
            req.index,
            data.len(),
            req.info.uncompressed_size
        );
    }
    if req.info.hash.digest(data) != req.info.digest {
        panic!(
            "chunk {}: data served that does not have its digest",
            req.index
        );
    }
}

fn check_plan(reqs: &[ChunkRequest], max_bytes: u64, max_gap: u64) {
    let runs = plan_runs(reqs, max_bytes, max_gap);
    let mut seen = vec![0u32; reqs.len()];
    for run in &runs {
        if run.members.len() > 1 && run.len > max_bytes {
            panic!(
                "a merged run of {} bytes is above its {max_bytes}-byte bound",
                run.len
            );
        }
        for &m in &run.members {
            let Some(req) = reqs.get(m) else {
                panic!("a run names chunk position {m} of {}", reqs.len());
            };
            seen[m] += 1;
            let end = run.offset.saturating_add(run.len);
            if req.blob != run.blob || req.start() < run.offset || req.end() > end {
                panic!(
                    "chunk {}..{} is not inside its run {}..{end}",
                    req.start(),
                    req.end(),
                    run.offset
                );
            }
        }
    }
    if seen.iter().any(|&s| s != 1) {
        panic!("chunks are not each in exactly one run: {seen:?}");
    }
}

/// Writes `blob` into a fresh OCI layout and asks a chunk source for every
/// chunk of `reqs`, checking what it serves.
fn serve(blob: &[u8], reqs: &[ChunkRequest]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let blobs = dir.path().join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
    std::fs::write(blobs.join(Digest::of(blob).to_hex()), blob)
        .map_err(|e| format!("writing the blob: {e}"))?;
    let store = LocalBlobStore::new(dir.path()).map_err(|e| e.to_string())?;
    let source = ChunkSource::new(
        Backend::new(Arc::new(store)),
        None,
        SourceOptions {
            memory_bytes: 1 << 20,
            max_request_bytes: DEFAULT_MAX_REQUEST,
            max_parallel: 1,
            decode_threads: 1,
            in_flight_bytes: DEFAULT_IN_FLIGHT,
        },
        Arc::new(Metrics::default()),
    );
    let served = source
        .get_many(reqs)
        .map_err(|(i, e)| format!("chunk position {i}: {e}"))?;
    if served.len() != reqs.len() {
        panic!("{} chunks asked for, {} served", reqs.len(), served.len());
    }
    for (req, data) in reqs.iter().zip(&served) {
        check_chunk(req, data);
    }
    Ok(())
}
