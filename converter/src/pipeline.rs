//! The compression pipeline that turns new chunks into a data blob.
//!
//! The layer reader (decompression, tar parsing, chunking, hashing) runs on the
//! caller's thread and is the natural bottleneck: it is sequential by nature.
//! Everything after it runs beside it: new chunks are gathered in batches of a
//! few MiB, worker threads compress whole batches (one zstd frame per chunk,
//! or per *pack* of small chunks: see [`BlobPipeline::push_pack`]),
//! and one writer thread puts the batches into the blob in their original
//! order, so the output does not depend on thread timing. Channels are bounded,
//! so memory stays at a few batches per worker whatever the layer size.
//!
//! Chunks come in two lanes ([`Lane`]): the writer puts hot batches into the
//! blob as they come and cold ones (files a container's start rarely reads:
//! [`crate::cold`]) into a temporary file, appended to the blob once the
//! hot lane is done. Each lane has its own batch, so a pack or a batch
//! never mixes the two.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use skiff_format::{Digest, SharedFrame};

use crate::error::ConvertError;

/// Where finished data blobs go (an OCI layout directory, a registry upload).
pub trait BlobSink: Send + Sync {
    /// Starts a new blob.
    fn create(&self) -> Result<Box<dyn BlobOut>, ConvertError>;
}

/// A blob being written. Dropping it without [`BlobOut::commit`] discards it.
pub trait BlobOut: Write + Send {
    /// Finishes the blob and makes it visible; returns its digest and size.
    fn commit(self: Box<Self>) -> Result<(Digest, u64), ConvertError>;
}

/// Where one chunk ended up in the blob.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// Index of the chunk in the image's chunk table.
    pub chunk: u32,
    /// Offset of its stored bytes in the blob.
    pub offset: u64,
    /// Length of its stored bytes.
    pub size: u32,
    /// Stored as a zstd frame (else raw).
    pub compressed: bool,
    /// Set when the chunk is a slice of a shared frame (a pack).
    pub frame: Option<SharedFrame>,
}

/// A finished blob.
#[derive(Debug)]
pub struct BlobResult {
    /// Chunk placements in blob order.
    pub placements: Vec<Placement>,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
}

/// Where in the blob a chunk goes: with the layer's other hot chunks in the
/// order they come, or after all of them ([`crate::cold`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// In the order the chunks come.
    Hot,
    /// After every hot chunk of the blob, in the order they come.
    Cold,
}

/// One frame to encode: its members (chunk index, offset in the frame,
/// length), one for an ordinary chunk.
struct Item {
    start: usize,
    len: usize,
    members: Vec<(u32, u32, u32)>,
}

struct Batch {
    seq: u64,
    lane: Lane,
    data: Vec<u8>,
    items: Vec<Item>,
}

impl Batch {
    fn new(lane: Lane) -> Batch {
        Batch {
            seq: 0,
            lane,
            data: Vec::with_capacity(BATCH_BYTES + (1 << 20)),
            items: Vec::new(),
        }
    }
}

/// A compressed batch: the stored bytes and, per chunk, its placement with
/// the offset relative to the batch's first stored byte.
type Compressed = (Vec<u8>, Vec<Placement>);

struct Done {
    seq: u64,
    lane: Lane,
    result: Result<Compressed, ConvertError>,
}

const BATCH_BYTES: usize = 4 << 20;

/// Compresses and writes the new chunks of one layer.
pub struct BlobPipeline {
    /// The batch being filled, per lane (hot, cold).
    batches: [Batch; 2],
    /// Sequence number of the next batch sent, whatever its lane.
    next_seq: u64,
    tx: Option<Sender<Batch>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<Result<BlobResult, ConvertError>>>,
}

impl BlobPipeline {
    /// Starts `threads` compression workers at zstd `level` and a writer into `out`.
    pub fn start(out: Box<dyn BlobOut>, level: i32, threads: usize) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = bounded::<Batch>(threads * 2);
        let (done_tx, done_rx) = bounded::<Done>(threads * 2);
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                let done_tx = done_tx.clone();
                std::thread::spawn(move || compress_worker(rx, done_tx, level))
            })
            .collect();
        drop(done_tx);
        let writer = std::thread::spawn(move || write_blob(out, done_rx));
        BlobPipeline {
            batches: [Batch::new(Lane::Hot), Batch::new(Lane::Cold)],
            next_seq: 0,
            tx: Some(tx),
            workers,
            writer: Some(writer),
        }
    }

    /// Queues a new chunk for the blob, in `lane`.
    pub fn push(&mut self, chunk: u32, data: &[u8], lane: Lane) -> Result<(), ConvertError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ConvertError::Invalid("chunk larger than 4 GiB".into()))?;
        self.push_frame(vec![(chunk, 0, len)], data, lane)
    }

    /// Queues a pack: `data` is the concatenation of several small chunks,
    /// `members` gives each one's (chunk index, offset in `data`, length).
    /// The pack is compressed as one zstd frame that every member points
    /// into ([`SharedFrame`]); if zstd does not pay, the members are stored
    /// raw one after the other, as ordinary chunks.
    pub fn push_pack(
        &mut self,
        members: Vec<(u32, u32, u32)>,
        data: &[u8],
        lane: Lane,
    ) -> Result<(), ConvertError> {
        self.push_frame(members, data, lane)
    }

    fn push_frame(
        &mut self,
        members: Vec<(u32, u32, u32)>,
        data: &[u8],
        lane: Lane,
    ) -> Result<(), ConvertError> {
        let i = lane as usize;
        let batch = &mut self.batches[i];
        let start = batch.data.len();
        batch.data.extend_from_slice(data);
        batch.items.push(Item {
            start,
            len: data.len(),
            members,
        });
        if batch.data.len() >= BATCH_BYTES {
            self.flush(i)?;
        }
        Ok(())
    }

    /// Sends lane `i`'s batch to the workers.
    fn flush(&mut self, i: usize) -> Result<(), ConvertError> {
        if self.batches[i].items.is_empty() {
            return Ok(());
        }
        let next = Batch::new(self.batches[i].lane);
        let mut batch = std::mem::replace(&mut self.batches[i], next);
        batch.seq = self.next_seq;
        self.next_seq += 1;
        let sent = self.tx.as_ref().map(|tx| tx.send(batch).is_ok());
        if sent != Some(true) {
            // The writer stopped early: its error says why.
            return Err(self
                .join_writer()
                .err()
                .unwrap_or_else(|| ConvertError::Invalid("compression pipeline stopped".into())));
        }
        Ok(())
    }

    fn join_writer(&mut self) -> Result<BlobResult, ConvertError> {
        self.tx = None;
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                return Err(ConvertError::Invalid(
                    "a compression thread panicked".into(),
                ));
            }
        }
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(ConvertError::Invalid(
                "the blob writer thread panicked".into(),
            )),
            None => Err(ConvertError::Invalid(
                "the blob writer already finished".into(),
            )),
        }
    }

    /// Flushes the last batches, waits for the threads and commits the blob.
    pub fn finish(mut self) -> Result<BlobResult, ConvertError> {
        self.flush(Lane::Hot as usize)?;
        self.flush(Lane::Cold as usize)?;
        self.join_writer()
    }
}

impl Drop for BlobPipeline {
    fn drop(&mut self) {
        // On an early error, stop the threads; the blob is dropped uncommitted.
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn compress_worker(rx: Receiver<Batch>, done: Sender<Done>, level: i32) {
    for batch in rx {
        let result = (|| {
            let mut stored = Vec::with_capacity(batch.data.len() / 2);
            let mut placements = Vec::with_capacity(batch.items.len());
            for item in &batch.items {
                let data = batch
                    .data
                    .get(item.start..item.start + item.len)
                    .ok_or_else(|| {
                        ConvertError::Invalid("internal error: batch item out of range".into())
                    })?;
                let (bytes, compressed) = skiff_format::encode_chunk(data, level)?;
                let size = u32::try_from(bytes.len()).map_err(|_| {
                    ConvertError::Invalid("a frame compresses to over 4 GiB".into())
                })?;
                let offset = stored.len() as u64;
                stored.extend_from_slice(&bytes);
                match item.members.as_slice() {
                    [(chunk, _, _)] => placements.push(Placement {
                        chunk: *chunk,
                        offset,
                        size,
                        compressed,
                        frame: None,
                    }),
                    members if compressed => {
                        let frame_size = u32::try_from(item.len).map_err(|_| {
                            ConvertError::Invalid("a pack larger than 4 GiB".into())
                        })?;
                        placements.extend(members.iter().map(|&(chunk, off, _)| Placement {
                            chunk,
                            offset,
                            size,
                            compressed,
                            frame: Some(SharedFrame {
                                offset: off,
                                size: frame_size,
                            }),
                        }));
                    }
                    // Stored raw: the members are ordinary raw chunks, back
                    // to back in the order they were packed.
                    members => {
                        placements.extend(members.iter().map(|&(chunk, off, len)| Placement {
                            chunk,
                            offset: offset + u64::from(off),
                            size: len,
                            compressed: false,
                            frame: None,
                        }))
                    }
                }
            }
            Ok((stored, placements))
        })();
        if done
            .send(Done {
                seq: batch.seq,
                lane: batch.lane,
                result,
            })
            .is_err()
        {
            return;
        }
    }
}

fn write_blob(mut out: Box<dyn BlobOut>, done: Receiver<Done>) -> Result<BlobResult, ConvertError> {
    let io_err = |context: &str| {
        let context = context.to_string();
        move |source| ConvertError::Io { context, source }
    };
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    let mut offset = 0u64;
    let mut placements = Vec::new();
    // The cold lane: its stored bytes in a temporary file, its placements
    // relative to that file's start.
    let mut spool: Option<File> = None;
    let mut spooled = 0u64;
    let mut cold = Vec::new();
    for d in done {
        pending.insert(d.seq, (d.lane, d.result));
        while let Some((lane, result)) = pending.remove(&next) {
            let (stored, items) = result?;
            let (sink, base, to): (&mut dyn Write, &mut u64, &mut Vec<Placement>) = if lane
                == Lane::Cold
            {
                let file = match &mut spool {
                    Some(f) => f,
                    None => spool
                        .insert(tempfile::tempfile().map_err(io_err("creating a temporary file"))?),
                };
                (file, &mut spooled, &mut cold)
            } else {
                (&mut *out, &mut offset, &mut placements)
            };
            sink.write_all(&stored)
                .map_err(io_err("writing a data blob"))?;
            let at = *base;
            to.extend(items.into_iter().map(|p| Placement {
                offset: at + p.offset,
                ..p
            }));
            *base += stored.len() as u64;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(ConvertError::Invalid(
            "internal error: compression batches missing".into(),
        ));
    }
    if let Some(mut file) = spool {
        file.rewind().map_err(io_err("reading a temporary file"))?;
        let copied = std::io::copy(&mut file, &mut out).map_err(io_err("writing a data blob"))?;
        if copied != spooled {
            return Err(ConvertError::Invalid(format!(
                "internal error: {copied} of {spooled} cold bytes copied into the blob"
            )));
        }
        placements.extend(cold.into_iter().map(|p| Placement {
            offset: offset + p.offset,
            ..p
        }));
        offset += spooled;
    }
    let (digest, size) = out.commit()?;
    if size != offset {
        return Err(ConvertError::Invalid(format!(
            "internal error: blob size {size} != written {offset}"
        )));
    }
    Ok(BlobResult {
        placements,
        digest,
        size,
    })
}
