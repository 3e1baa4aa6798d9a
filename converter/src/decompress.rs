//! Layer decompression by content sniffing, and diff ID verification.
//!
//! Media types lie often enough (Docker archives say `tar` for gzip layers,
//! some registries serve `application/octet-stream`) that the magic bytes
//! decide: gzip `1f 8b`, zstd `28 b5 2f fd`, anything else is read as a plain
//! tar and the tar reader judges it.

use std::io::{self, BufRead, BufReader, Read};

use sha2::{Digest as _, Sha256};
use skiff_format::Digest;

/// The compression of a layer stream, as sniffed from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members, as pigz and some tools write).
    Gzip,
    /// zstd (possibly several frames).
    Zstd,
}

impl Compression {
    /// Name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "tar+gzip",
            Compression::Zstd => "tar+zstd",
        }
    }
}

/// Wraps a raw layer stream in the right decoder.
pub fn decompressed(raw: Box<dyn Read + Send>) -> io::Result<(Compression, Box<dyn Read + Send>)> {
    let mut buffered = BufReader::with_capacity(1 << 20, raw);
    let head = buffered.fill_buf()?;
    let kind = if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    };
    let reader: Box<dyn Read + Send> = match kind {
        Compression::Gzip => Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::bufread::MultiGzDecoder::new(buffered),
        )),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(buffered)?;
            // Layers written with --long need a larger window than the default limit.
            d.window_log_max(31)?;
            Box::new(BufReader::with_capacity(1 << 20, d))
        }
        Compression::None => Box::new(buffered),
    };
    Ok((kind, reader))
}

/// Hashes everything read through it; [`HashingReader::finish`] gives the digest.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads what is left (tar readers stop at the end-of-archive marker,
    /// but the diff ID covers the padding after it too) and returns the
    /// digest and length of the whole stream.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(
            &mut self.inner,
            &mut HashSink(&mut self.hasher, &mut self.count),
        )?;
        Ok((Digest(self.hasher.finalize().into()), self.count))
    }
}

struct HashSink<'a>(&'a mut Sha256, &'a mut u64);

impl io::Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        *self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}
