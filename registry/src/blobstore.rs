//! The read side used by mount, check and unpack: ranges of blobs by digest.
//!
//! [`BlobStore`] is the seam: [`LocalBlobStore`] reads an OCI layout on
//! disk; [`RegistryBlobStore`](crate::RegistryBlobStore) (HTTP range requests) implements the
//! same trait. A store never returns short data: a blob too short for the
//! range asked is an error naming the blob.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use skiff_format::Digest;

use crate::RegistryError;

/// Largest single range read: far above any chunk, low enough that a
/// corrupt length cannot exhaust memory.
pub const MAX_READ_RANGE: u64 = 1 << 30;

/// How many blob files a [`LocalBlobStore`] keeps open.
pub const MAX_OPEN_BLOBS: usize = 256;

/// Random access to blobs by digest.
pub trait BlobStore: Send + Sync {
    /// Reads exactly `len` bytes at `offset` of blob `digest`.
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, RegistryError>;

    /// [`read_range`](Self::read_range) for a caller that must have an
    /// answer by `deadline` (a FUSE read: its reader would rather get an
    /// error than wait): a store that waits on the network gives up by
    /// then, retries and per-attempt timeouts included. The default is
    /// `read_range`, for stores that never wait long (local files).
    fn read_range_until(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, RegistryError> {
        let _ = deadline;
        self.read_range(digest, offset, len)
    }

    /// [`read_range`](Self::read_range) into `buf`, which is cleared
    /// first: a caller that recycles its buffers spares an allocation, and
    /// the page faults of fresh memory, per read. The default reads a new
    /// buffer and puts it in `buf`'s place; [`LocalBlobStore`] reads into
    /// `buf` itself.
    fn read_range_into(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), RegistryError> {
        *buf = self.read_range(digest, offset, len)?;
        Ok(())
    }

    /// Reads the consecutive `pieces` (their lengths, in order) of blob
    /// `digest` from `offset` and hands each to `sink` with its index as
    /// soon as its bytes are in, never short, in order. A store that streams
    /// (a registry: one Range GET for them all) gives the first pieces
    /// while the rest are still on the way, so that a request can be large
    /// (few round trips, little per-request cost at the registry) without
    /// making whoever waits for its first bytes wait for its last. On an
    /// error, the pieces already handed over stay valid; the rest are not
    /// given. `deadline` as for [`read_range_until`](Self::read_range_until).
    /// The default reads the whole range at once and then cuts it.
    fn read_range_pieces(
        &self,
        digest: &Digest,
        offset: u64,
        pieces: &[u64],
        deadline: Option<Instant>,
        sink: &mut dyn FnMut(usize, Vec<u8>),
    ) -> Result<(), RegistryError> {
        let total = pieces_total(digest, pieces)?;
        let buf = match deadline {
            Some(d) => self.read_range_until(digest, offset, total, d)?,
            None => self.read_range(digest, offset, total)?,
        };
        let mut at = 0usize;
        for (i, &len) in pieces.iter().enumerate() {
            let piece = usize::try_from(len)
                .ok()
                .and_then(|len| buf.get(at..at.checked_add(len)?))
                .ok_or_else(|| {
                    RegistryError::Invalid(format!(
                        "blob {digest}: range at offset {offset} came back shorter than its pieces"
                    ))
                })?;
            at += piece.len();
            sink(i, piece.to_vec());
        }
        Ok(())
    }

    /// The size of blob `digest`.
    fn blob_size(&self, digest: &Digest) -> Result<u64, RegistryError>;

    /// A read costs a system call, not a round trip (files on this node).
    /// Readers use it to size what they read ahead: bringing neighbours
    /// along saves round trips, so it pays over a network whatever the
    /// access pattern, and from a local file only for a sequential reader.
    /// The default is `false`.
    fn is_local(&self) -> bool {
        false
    }
}

impl<T: BlobStore + ?Sized> BlobStore for Arc<T> {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, RegistryError> {
        (**self).read_range(digest, offset, len)
    }

    fn read_range_until(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, RegistryError> {
        (**self).read_range_until(digest, offset, len, deadline)
    }

    fn read_range_into(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), RegistryError> {
        (**self).read_range_into(digest, offset, len, buf)
    }

    fn read_range_pieces(
        &self,
        digest: &Digest,
        offset: u64,
        pieces: &[u64],
        deadline: Option<Instant>,
        sink: &mut dyn FnMut(usize, Vec<u8>),
    ) -> Result<(), RegistryError> {
        (**self).read_range_pieces(digest, offset, pieces, deadline, sink)
    }

    fn blob_size(&self, digest: &Digest) -> Result<u64, RegistryError> {
        (**self).blob_size(digest)
    }

    fn is_local(&self) -> bool {
        (**self).is_local()
    }
}

/// The sum of `pieces` (see [`BlobStore::read_range_pieces`]), refused
/// above [`MAX_READ_RANGE`].
pub fn pieces_total(digest: &Digest, pieces: &[u64]) -> Result<u64, RegistryError> {
    pieces
        .iter()
        .try_fold(0u64, |a, &b| a.checked_add(b))
        .filter(|&t| t <= MAX_READ_RANGE)
        .ok_or_else(|| {
            RegistryError::Invalid(format!(
                "blob {digest}: refusing to read more than {MAX_READ_RANGE} bytes at once"
            ))
        })
}

/// A [`BlobStore`] over the `blobs/sha256/` of an OCI layout directory,
/// reading with `pread` and keeping up to [`MAX_OPEN_BLOBS`] files open.
#[derive(Debug)]
pub struct LocalBlobStore {
    dir: PathBuf,
    open: Mutex<HashMap<Digest, Arc<OpenBlob>>>,
}

#[derive(Debug)]
struct OpenBlob {
    file: File,
    size: u64,
}

impl LocalBlobStore {
    /// A store over the layout at `dir` (which must have `blobs/sha256/`).
    pub fn new(dir: impl AsRef<Path>) -> Result<LocalBlobStore, RegistryError> {
        let dir = dir.as_ref().to_path_buf();
        let blobs = dir.join("blobs").join("sha256");
        if !blobs.is_dir() {
            return Err(RegistryError::NotFound(format!(
                "{} is not an OCI image layout: it has no blobs/sha256 directory",
                dir.display()
            )));
        }
        Ok(LocalBlobStore {
            dir: blobs,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn get(&self, digest: &Digest) -> Result<Arc<OpenBlob>, RegistryError> {
        if let Some(b) = self.lock().get(digest) {
            return Ok(Arc::clone(b));
        }
        // Open outside the lock; a racing opener just wins or loses the insert.
        let path = self.dir.join(digest.to_hex());
        let file = File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                RegistryError::NotFound(format!(
                    "blob {digest} is missing (expected at {})",
                    path.display()
                ))
            } else {
                RegistryError::io(&path, e)
            }
        })?;
        let size = file
            .metadata()
            .map_err(|e| RegistryError::io(&path, e))?
            .len();
        let blob = Arc::new(OpenBlob { file, size });
        let mut open = self.lock();
        if open.len() >= MAX_OPEN_BLOBS {
            // Evict an arbitrary entry: readers holding it keep their Arc.
            if let Some(k) = open.keys().next().copied() {
                open.remove(&k);
            }
        }
        Ok(Arc::clone(open.entry(*digest).or_insert(blob)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<OpenBlob>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlobStore for LocalBlobStore {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, RegistryError> {
        let mut buf = Vec::new();
        self.read_range_into(digest, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn read_range_into(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), RegistryError> {
        let path = || self.dir.join(digest.to_hex());
        if len > MAX_READ_RANGE {
            return Err(RegistryError::Invalid(format!(
                "blob {digest}: refusing to read {len} bytes at once (limit {MAX_READ_RANGE})"
            )));
        }
        let blob = self.get(digest)?;
        let end = offset.checked_add(len).filter(|&end| end <= blob.size);
        if end.is_none() {
            return Err(RegistryError::Invalid(format!(
                "blob {digest} ({}) is {} bytes, too short for {len} bytes at offset {offset}",
                path().display(),
                blob.size
            )));
        }
        let len = usize::try_from(len).map_err(|_| {
            RegistryError::Invalid(format!("blob {digest}: range length {len} too large"))
        })?;
        buf.clear();
        buf.resize(len, 0);
        blob.file.read_exact_at(buf, offset).map_err(|e| {
            buf.clear();
            if e.kind() == io::ErrorKind::UnexpectedEof {
                RegistryError::Invalid(format!(
                    "blob {digest} ({}) ended before {len} bytes at offset {offset} could be read",
                    path().display()
                ))
            } else {
                RegistryError::io(path(), e)
            }
        })
    }

    fn is_local(&self) -> bool {
        true
    }

    fn blob_size(&self, digest: &Digest) -> Result<u64, RegistryError> {
        Ok(self.get(digest)?.size)
    }
}
