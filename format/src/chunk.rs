//! Encoding and decoding one chunk: pure functions over byte slices.
//!
//! A chunk is stored as one zstd frame, or raw when zstd does not save at
//! least 1/32 of its size (decompressing costs more than the few bytes it
//! would save on the wire). Decoding is where untrusted registry bytes meet
//! the filesystem, so it checks every length, never lets zstd write more
//! than `uncompressed_size` bytes, and verifies the chunk's digest before handing
//! out a single byte.

use zstd::zstd_safe;

use crate::{ChunkInfo, FormatError};

pub use crate::layout::MAX_CHUNK_SIZE;

fn zstd_error(e: impl std::fmt::Display) -> FormatError {
    FormatError::Decompress(e.to_string())
}

/// Encodes `data` (1..=16 MiB) at zstd `level`. Returns the stored bytes and
/// whether they are a zstd frame (`true`) or `data` itself (`false`).
///
/// Deterministic for a given zstd version and level: single-threaded, with
/// the content size in the frame header and no checksum (the chunk digest in the
/// CHUNKS record is the check).
pub fn encode_chunk(data: &[u8], level: i32) -> Result<(Vec<u8>, bool), FormatError> {
    if data.is_empty() || data.len() > MAX_CHUNK_SIZE as usize {
        return Err(FormatError::InvalidTree(format!(
            "chunk of {} bytes: chunks are 1..={MAX_CHUNK_SIZE} bytes",
            data.len()
        )));
    }
    let frame = ENCODER
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                let mut c = zstd::bulk::Compressor::new(level)?;
                c.set_parameter(zstd_safe::CParameter::ContentSizeFlag(true))?;
                c.set_parameter(zstd_safe::CParameter::ChecksumFlag(false))?;
                *slot = Some((level, c));
            }
            match slot.as_mut() {
                Some((_, c)) => c.compress(data),
                None => Err(std::io::Error::other("no zstd encoder")),
            }
        })
        .map_err(zstd_error)?;
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

/// [`decode_chunk`] of stored bytes the caller owns: a chunk stored raw is
/// verified and returned as it is, without a copy (for a chunk read from a
/// file, the read's buffer is the chunk's data).
pub fn decode_chunk_owned(info: &ChunkInfo, stored: Vec<u8>) -> Result<Vec<u8>, FormatError> {
    if info.compressed || info.frame.is_some() {
        return decode_chunk(info, &stored);
    }
    check_sizes(info, &stored)?;
    slice_of_frame(info, &stored)?;
    Ok(stored)
}

/// Decodes the stored bytes of chunk `info` into `out` (replacing its
/// contents, reusing its allocation).
///
/// Checks that `stored` is `compressed_size` bytes; that a compressed chunk
/// is exactly one zstd frame whose declared content size (if any) is
/// `uncompressed_size` and which decodes to exactly that many bytes, with at
/// most `uncompressed_size` bytes ever allocated for the output; and that the
/// digest of the result is `digest`. On error `out` is left empty.
pub fn decode_chunk_into(
    info: &ChunkInfo,
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    decode_unverified(info, stored, out)?;
    let checked = match info.frame {
        Some(_) => slice_of_frame(info, out).map(<[u8]>::to_vec).map(Some),
        None => slice_of_frame(info, out).map(|_| None),
    };
    match checked {
        Ok(Some(data)) => *out = data,
        Ok(None) => {}
        Err(e) => {
            out.clear();
            return Err(e);
        }
    }
    Ok(())
}

/// Decodes the stored bytes of chunk `info` into the frame they hold,
/// **unverified**: for a chunk in a shared frame (format 1.1) all
/// `frame.size` bytes of the frame, else the chunk's data. Each chunk is
/// then checked by [`slice_of_frame`] before use, so one decode serves
/// every chunk of a shared frame. The length checks of
/// [`decode_chunk_into`] apply.
pub fn decode_frame(info: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    decode_frame_into(info, stored, &mut out)?;
    Ok(out)
}

/// [`decode_frame`] into `out` (replacing its contents, reusing its
/// allocation: a caller that recycles buffers spares the allocator). On
/// error `out` is left empty.
pub fn decode_frame_into(
    info: &ChunkInfo,
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    decode_unverified(info, stored, out)
}

fn decode_unverified(
    info: &ChunkInfo,
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    out.clear();
    check_sizes(info, stored)?;
    let expected = match info.frame {
        Some(f) if !info.compressed || f.size == 0 || f.size > MAX_CHUNK_SIZE => {
            return Err(FormatError::Corrupt(format!(
                "chunk {}: shared frame of {} bytes (zstd: {}) is not 1..={MAX_CHUNK_SIZE} bytes of zstd",
                info.hash.label(&info.digest), f.size, info.compressed
            )));
        }
        Some(f) => f.size as usize,
        None => info.uncompressed_size as usize,
    };
    if !info.compressed {
        if stored.len() != expected {
            return Err(FormatError::ChunkLength {
                field: "uncompressed_size",
                expected: expected as u64,
                actual: stored.len() as u64,
            });
        }
        out.extend_from_slice(stored);
        return Ok(());
    }
    decompress(stored, expected, out)
}

/// Chunk `info`'s bytes in its decoded shared frame `frame` (from
/// [`decode_frame`]), after checking their bounds and digest. For a chunk
/// not in a shared frame, `frame` is the chunk's data and is checked whole.
pub fn slice_of_frame<'f>(info: &ChunkInfo, frame: &'f [u8]) -> Result<&'f [u8], FormatError> {
    let (offset, size) = match info.frame {
        Some(f) => (f.offset as usize, f.size as usize),
        None => (0, info.uncompressed_size as usize),
    };
    if frame.len() != size {
        return Err(FormatError::ChunkLength {
            field: "frame_size",
            expected: size as u64,
            actual: frame.len() as u64,
        });
    }
    let data = offset
        .checked_add(info.uncompressed_size as usize)
        .and_then(|end| frame.get(offset..end))
        .ok_or_else(|| {
            FormatError::Corrupt(format!(
                "chunk {}: {} bytes at offset {offset} lie outside its {size}-byte frame",
                info.hash.label(&info.digest),
                info.uncompressed_size
            ))
        })?;
    let actual = info.hash.digest(data);
    if actual != info.digest {
        return Err(FormatError::ChunkDigestMismatch {
            hash: info.hash,
            expected: info.digest,
            actual,
        });
    }
    Ok(data)
}

/// The last frame decoded, for readers that walk chunks in blob order
/// (`check`, `unpack`): the members of a shared frame then cost one fetch
/// and one decode together, and each is still verified on its own.
#[derive(Debug, Default)]
pub struct LastFrame {
    /// (blob, offset, stored size) of the shared frame in `buf`.
    key: Option<(u32, u64, u32)>,
    buf: Vec<u8>,
}

impl LastFrame {
    /// An empty memo.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `info` is a member of the shared frame decoded last.
    pub fn holds(&self, info: &ChunkInfo) -> bool {
        info.frame.is_some()
            && self.key
                == Some((
                    info.blob_index,
                    info.compressed_offset,
                    info.compressed_size,
                ))
    }

    /// Chunk `info`'s verified data from the frame decoded last; call when
    /// [`holds`](Self::holds) says so.
    pub fn chunk(&self, info: &ChunkInfo) -> Result<&[u8], FormatError> {
        if !self.holds(info) {
            return Err(FormatError::Corrupt(format!(
                "chunk {}: not in the frame decoded last",
                info.hash.label(&info.digest)
            )));
        }
        slice_of_frame(info, &self.buf)
    }

    /// Decodes `stored` (chunk `info`'s stored bytes), keeps the frame if it
    /// is shared, and returns the chunk's verified data.
    pub fn decode(&mut self, info: &ChunkInfo, stored: &[u8]) -> Result<&[u8], FormatError> {
        self.key = None;
        decode_unverified(info, stored, &mut self.buf)?;
        if info.frame.is_some() {
            self.key = Some((
                info.blob_index,
                info.compressed_offset,
                info.compressed_size,
            ));
        }
        slice_of_frame(info, &self.buf)
    }
}

/// The checks of a chunk's sizes common to every stored form.
fn check_sizes(info: &ChunkInfo, stored: &[u8]) -> Result<(), FormatError> {
    if info.uncompressed_size == 0 || info.uncompressed_size > MAX_CHUNK_SIZE {
        return Err(FormatError::Corrupt(format!(
            "chunk {}: uncompressed_size {} not in 1..={MAX_CHUNK_SIZE}",
            info.hash.label(&info.digest),
            info.uncompressed_size
        )));
    }
    if stored.len() as u64 != u64::from(info.compressed_size) {
        return Err(FormatError::ChunkLength {
            field: "compressed_size",
            expected: info.compressed_size.into(),
            actual: stored.len() as u64,
        });
    }
    Ok(())
}

thread_local! {
    /// One zstd encoding context per thread and level, made on first use and
    /// reused for every chunk, as the decoder below: making one costs its
    /// tables' allocation and initialisation per chunk otherwise (thousands
    /// of packed frames and small chunks in a tree of small files). Its
    /// parameters are sticky and each `compress` is a new frame, so the
    /// output is what a fresh context gives.
    static ENCODER: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };

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
    // zstd writes into the Vec's spare capacity (at least `expected`
    // bytes, no more than is already allocated), so the buffer is not
    // zeroed first (that was a memset of every byte served); a frame that
    // decodes to more than `expected` fails below or for want of room.
    out.clear();
    out.reserve_exact(expected);
    let result = DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress_to_buffer(stored, out),
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
