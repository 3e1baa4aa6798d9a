//! Layer decompression by content sniffing, and diff ID verification.
//!
//! Media types lie often enough (Docker archives say `tar` for gzip layers,
//! some registries serve `application/octet-stream`) that the magic bytes
//! decide: gzip `1f 8b`, zstd `28 b5 2f fd`, anything else is read as a plain
//! tar and the tar reader judges it.
//!
//! [`DecodedLayer`] runs decompression and the diff ID hash on a thread of
//! their own.

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

/// The uncompressed stream of a layer, decoded and hashed on its own thread.
///
/// Decompression (gzip especially) is the slowest sequential step of a
/// conversion; running it beside the tar reader and chunker lets the two
/// overlap. Blocks travel through a bounded channel, so at most a few MiB
/// are in flight.
pub struct DecodedLayer {
    rx: Option<crossbeam_channel::Receiver<io::Result<Vec<u8>>>>,
    block: Vec<u8>,
    pos: usize,
    thread: Option<std::thread::JoinHandle<io::Result<(Digest, u64)>>>,
}

const DECODE_BLOCK: usize = 1 << 20;

impl DecodedLayer {
    /// Starts decoding `raw` (any supported compression).
    pub fn spawn(raw: Box<dyn Read + Send>) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<io::Result<Vec<u8>>>(4);
        let thread = std::thread::Builder::new()
            .name("skiff-decode".into())
            .spawn(move || -> io::Result<(Digest, u64)> {
                let result = (|| {
                    let (_, mut reader) = decompressed(raw)?;
                    let mut hasher = Sha256::new();
                    let mut total = 0u64;
                    loop {
                        let mut block = vec![0u8; DECODE_BLOCK];
                        let mut filled = 0;
                        while filled < block.len() {
                            match reader.read(&mut block[filled..]) {
                                Ok(0) => break,
                                Ok(n) => filled += n,
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                Err(e) => {
                                    // Hand over what was decoded before the error, so
                                    // that it is reported where it happened (in which
                                    // entry), not up to a block earlier.
                                    if filled > 0 {
                                        block.truncate(filled);
                                        let _ = tx.send(Ok(block));
                                    }
                                    return Err(e);
                                }
                            }
                        }
                        if filled == 0 {
                            return Ok((Digest(hasher.finalize().into()), total));
                        }
                        block.truncate(filled);
                        hasher.update(&block);
                        total += filled as u64;
                        if tx.send(Ok(block)).is_err() {
                            // The reader gave up (an error downstream): stop quietly.
                            return Err(io::Error::other("layer reader stopped"));
                        }
                    }
                })();
                if let Err(e) = &result {
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
                result
            })?;
        Ok(DecodedLayer {
            rx: Some(rx),
            block: Vec::new(),
            pos: 0,
            thread: Some(thread),
        })
    }

    /// Reads whatever the consumer left (the padding after a tar's end
    /// marker counts toward the diff ID) and returns the digest and length
    /// of the whole uncompressed stream.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        self.rx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            _ => Err(io::Error::other("the layer decoding thread panicked")),
        }
    }
}

impl Read for DecodedLayer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.block.len() {
            let Some(rx) = &self.rx else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(Ok(block)) => {
                    self.block = block;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.block.len() - self.pos);
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for DecodedLayer {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail, so it ends.
        self.rx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
