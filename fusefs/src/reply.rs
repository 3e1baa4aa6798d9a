//! The data of a read's reply, put together from the decoded chunks that
//! cover the read.
//!
//! A read inside one chunk is answered from that chunk as it is cached: no
//! buffer, no copy (most reads: the kernel reads at most 1 MiB, chunks
//! average 32 KiB to 1 MiB, and a small file is one chunk). A read over
//! several chunks gets a recycled buffer (see [`crate::buffers`]) filled in
//! file order: each chunk's part appended, holes (bytes no chunk covers)
//! as zeros, so no byte is written twice. The criterion bench `reply`
//! (benches/benches/reply.rs) measures both.

use std::ops::Range;

use fuser::ReplyData;

use crate::cache::ChunkData;
use crate::error::FsError;

/// The data of a read's reply.
pub enum ReplyBytes {
    /// Assembled from several chunks (and holes), in a pooled buffer.
    Owned(Vec<u8>),
    /// A part of one decoded chunk that covers the whole read, replied from
    /// the cached chunk as it is.
    Chunk(ChunkData, Range<usize>),
}

impl ReplyBytes {
    /// The reply's bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReplyBytes::Owned(v) => v,
            ReplyBytes::Chunk(data, range) => data.get(range.clone()).unwrap_or_default(),
        }
    }

    /// Gives an assembled buffer back to the pool, for the next reply or
    /// decode; a slice of a chunk holds nothing to give.
    pub fn recycle(self) {
        if let ReplyBytes::Owned(buf) = self {
            crate::buffers::give(buf);
        }
    }

    /// Replies with the data, then recycles the buffer.
    pub fn send(self, reply: ReplyData) {
        reply.data(self.as_slice());
        self.recycle();
    }
}

/// The reply to a read of file bytes `offset..end` from the chunks that
/// start at file offsets `starts` (in file order, as the chunk map lists
/// them) with data `datas`: the part of each chunk inside the read, zeros
/// where no chunk is. Overlapping chunks (a map the bootstrap checks
/// refuse) are [`FsError::Invalid`], never bytes written twice.
pub fn assemble(
    offset: u64,
    end: u64,
    starts: &[u64],
    datas: &[ChunkData],
) -> Result<ReplyBytes, FsError> {
    if end < offset {
        return Err(FsError::Invalid);
    }
    if let ([start], [data]) = (starts, datas) {
        let chunk_end = start.saturating_add(data.len() as u64);
        if *start <= offset && chunk_end >= end {
            let range = (offset - start) as usize..(end - start) as usize;
            // Checked here, so that `as_slice` can never come up short.
            if data.get(range.clone()).is_some() {
                return Ok(ReplyBytes::Chunk(data.clone(), range));
            }
            return Err(FsError::Invalid);
        }
    }
    let mut out = crate::buffers::take((end - offset) as usize);
    for (start, data) in starts.iter().copied().zip(datas) {
        let chunk_end = start.saturating_add(data.len() as u64);
        let from = start.max(offset);
        let to = chunk_end.min(end);
        if from >= to {
            continue;
        }
        let at = offset + out.len() as u64;
        if from < at {
            crate::buffers::give(out);
            return Err(FsError::Invalid);
        }
        out.resize((from - offset) as usize, 0);
        let Some(src) = data.get((from - start) as usize..(to - start) as usize) else {
            crate::buffers::give(out);
            return Err(FsError::Invalid);
        };
        out.extend_from_slice(src);
    }
    out.resize((end - offset) as usize, 0);
    Ok(ReplyBytes::Owned(out))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn replies_are_assembled_in_file_order_with_holes_as_zeros() {
        let a: ChunkData = Arc::new(b"abcd".to_vec());
        let b: ChunkData = Arc::new(b"efgh".to_vec());
        // A read from inside the first chunk, over a hole, through the
        // second chunk and past it (a hole at the end of the file).
        let got =
            assemble(2, 14, &[0, 8], &[a.clone(), b.clone()]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(got.as_slice(), b"cd\0\0\0\0efgh\0\0");
        // A read inside one chunk is served from it.
        let one = assemble(5, 7, &[4], std::slice::from_ref(&b));
        assert!(matches!(one, Ok(ReplyBytes::Chunk(_, _))));
        assert_eq!(
            one.map(|r| r.as_slice().to_vec()).ok(),
            Some(b"fg".to_vec())
        );
        // Overlapping chunks (a map the checks would refuse) are EIO, not
        // bytes written twice; so is a range that ends before it starts.
        assert!(assemble(0, 8, &[0, 2], &[a.clone(), b]).is_err());
        assert!(assemble(3, 2, &[0], &[a]).is_err());
    }
}
