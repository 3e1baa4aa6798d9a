//! Encoding and decoding one chunk: pure functions over byte slices.
//!
//! A chunk is stored as one zstd frame, or raw when zstd does not save at
//! least 1/32 of its size (decompressing costs more than the few bytes it
//! would save on the wire). Decoding is where untrusted registry bytes meet
//! the filesystem, so it checks every length, never lets zstd write more
//! than `uncompressed_size` bytes, and verifies the SHA-256 before handing
//! out a single byte.

use zstd::zstd_safe;

use crate::{ChunkInfo, Digest, FormatError};

pub use crate::layout::MAX_CHUNK_SIZE;

fn zstd_error(e: impl std::fmt::Display) -> FormatError {
    FormatError::Decompress(e.to_string())
}

/// Encodes `data` (1..=16 MiB) at zstd `level`. Returns the stored bytes and
/// whether they are a zstd frame (`true`) or `data` itself (`false`).
///
/// Deterministic for a given zstd version and level: single-threaded, with
/// the content size in the frame header and no checksum (the SHA-256 in the
/// CHUNKS record is the check).
pub fn encode_chunk(data: &[u8], level: i32) -> Result<(Vec<u8>, bool), FormatError> {
    if data.is_empty() || data.len() > MAX_CHUNK_SIZE as usize {
        return Err(FormatError::InvalidTree(format!(
            "chunk of {} bytes: chunks are 1..={MAX_CHUNK_SIZE} bytes",
            data.len()
        )));
    }
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(zstd_error)?;
    compressor
        .set_parameter(zstd_safe::CParameter::ContentSizeFlag(true))
        .map_err(zstd_error)?;
    compressor
        .set_parameter(zstd_safe::CParameter::ChecksumFlag(false))
        .map_err(zstd_error)?;
    let frame = compressor.compress(data).map_err(zstd_error)?;
    let saved = data.len().saturating_sub(frame.len());
    if saved.saturating_mul(32) >= data.len() {
        Ok((frame, true))
    } else {
        Ok((data.to_vec(), false))
    }
}

/// Decodes the stored bytes of chunk `info` and verifies them; see
/// [`decode_chunk_into`].
pub fn decode_chunk(info: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    decode_chunk_into(info, stored, &mut out)?;
    Ok(out)
}

/// Decodes the stored bytes of chunk `info` into `out` (replacing its
/// contents, reusing its allocation).
///
/// Checks that `stored` is `compressed_size` bytes; that a compressed chunk
/// is exactly one zstd frame whose declared content size (if any) is
/// `uncompressed_size` and which decodes to exactly that many bytes, with at
/// most `uncompressed_size` bytes ever allocated for the output; and that the
/// SHA-256 of the result is `digest`. On error `out` is left empty.
pub fn decode_chunk_into(
    info: &ChunkInfo,
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    out.clear();
    let expected = info.uncompressed_size as usize;
    if info.uncompressed_size == 0 || info.uncompressed_size > MAX_CHUNK_SIZE {
        return Err(FormatError::Corrupt(format!(
            "chunk {}: uncompressed_size {} not in 1..={MAX_CHUNK_SIZE}",
            info.digest, info.uncompressed_size
        )));
    }
    if stored.len() as u64 != u64::from(info.compressed_size) {
        return Err(FormatError::ChunkLength {
            field: "compressed_size",
            expected: info.compressed_size.into(),
            actual: stored.len() as u64,
        });
    }
    if !info.compressed {
        if stored.len() != expected {
            return Err(FormatError::ChunkLength {
                field: "uncompressed_size",
                expected: expected as u64,
                actual: stored.len() as u64,
            });
        }
        out.extend_from_slice(stored);
    } else {
        decompress(stored, expected, out)?;
    }
    let actual = Digest::of(out);
    if actual != info.digest {
        out.clear();
        return Err(FormatError::ChunkDigestMismatch {
            expected: info.digest,
            actual,
        });
    }
    Ok(())
}

thread_local! {
    /// One zstd decoding context per thread, made on first use and reused
    /// for every chunk: making one costs an allocation of about 100 KiB and
    /// its initialisation, per chunk otherwise. A context keeps no state
    /// from one frame to the next that could change a result (each
    /// `decompress_to_buffer` starts a new frame), so reuse is exact.
    static DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(stored: &[u8], expected: usize, out: &mut Vec<u8>) -> Result<(), FormatError> {
    // One frame and nothing after it: a second frame would be data the
    // chunk's sizes do not account for.
    let frame_len = zstd_safe::find_frame_compressed_size(stored)
        .map_err(|code| zstd_error(zstd_safe::get_error_name(code)))?;
    if frame_len != stored.len() {
        return Err(zstd_error(format!(
            "{} bytes after the zstd frame ({frame_len} of {} bytes)",
            stored.len() - frame_len.min(stored.len()),
            stored.len()
        )));
    }
    // Refuse a lying header before allocating anything.
    match zstd_safe::get_frame_content_size(stored) {
        Ok(Some(declared)) if declared != expected as u64 => {
            return Err(FormatError::ChunkLength {
                field: "uncompressed_size",
                expected: expected as u64,
                actual: declared,
            })
        }
        Ok(_) => {}
        Err(e) => return Err(zstd_error(format!("bad frame header: {e:?}"))),
    }
    // A slice of exactly `expected` bytes, not the Vec's capacity, bounds
    // what zstd may write: a frame that decodes to more fails instead.
    out.resize(expected, 0);
    let result = DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress_to_buffer(stored, out.as_mut_slice()),
            None => Err(std::io::Error::other("no zstd decoder")),
        }
    });
    match result {
        Ok(n) if n == expected => Ok(()),
        Ok(n) => {
            out.clear();
            Err(FormatError::ChunkLength {
                field: "uncompressed_size",
                expected: expected as u64,
                actual: n as u64,
            })
        }
        Err(e) => {
            out.clear();
            Err(zstd_error(e))
        }
    }
}
