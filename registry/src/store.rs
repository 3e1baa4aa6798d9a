//! [`RegistryBlobStore`]: the [`BlobStore`] of a repository in a registry,
//! read with HTTP Range requests.
//!
//! Each [`read_range`](BlobStore::read_range) is one `GET` with
//! `Range: bytes=A-B` (mirrors first), expecting `206` with a matching
//! `Content-Range` and exactly the bytes asked for; a `200` (a server that
//! ignores ranges) is skipped forward to the offset. A body that ends early
//! is retried, a range past the end of the blob is an error: the store never
//! returns short data. It cannot tell whether the bytes of a range are the
//! right ones (only whole blobs have a digest): its callers verify what they
//! read (the FUSE layer checks every chunk's digest before serving it).
//!
//! The store is `Send + Sync` and blocking: call it from plain threads
//! (FUSE workers), never from inside a tokio runtime. Connections are kept
//! alive and shared; tokens are cached and refreshed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use skiff_format::Digest;

use crate::blobstore::MAX_READ_RANGE;
use crate::client::RegistryClient;
use crate::config::RegistryConfig;
use crate::stats::FetchStats;
use crate::{BlobStore, DockerRef, RegistryError};

/// Ranges closer than this are fetched with one request by
/// [`RegistryBlobStore::read_ranges`].
pub const MERGE_GAP: u64 = 0;

/// A [`BlobStore`] over one repository of a registry.
#[derive(Debug)]
pub struct RegistryBlobStore {
    client: RegistryClient,
    sizes: Mutex<HashMap<Digest, u64>>,
}

impl RegistryBlobStore {
    /// A store for the repository of `r` (its tag and digest are ignored).
    pub fn new(r: &DockerRef, config: &RegistryConfig) -> Result<RegistryBlobStore, RegistryError> {
        Ok(RegistryBlobStore::from_client(RegistryClient::new(
            r, config,
        )?))
    }

    /// A store using an existing client (sharing its connections, tokens
    /// and counters).
    pub fn from_client(client: RegistryClient) -> RegistryBlobStore {
        RegistryBlobStore {
            client,
            sizes: Mutex::new(HashMap::new()),
        }
    }

    /// Records blob sizes known from a manifest, so that
    /// [`blob_size`](BlobStore::blob_size) and range checks need no request.
    pub fn add_known_sizes(&self, sizes: impl IntoIterator<Item = (Digest, u64)>) {
        self.lock().extend(sizes);
    }

    /// The client underneath.
    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    /// A snapshot of the fetch counters (requests, bytes, retries, errors,
    /// in flight, ...).
    pub fn stats(&self) -> FetchStats {
        self.client.stats()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Digest, u64>> {
        // Inserts only: a panic cannot leave the map inconsistent.
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, digest: &Digest, offset: u64, len: u64) -> Result<(), RegistryError> {
        if len > MAX_READ_RANGE {
            return Err(RegistryError::Invalid(format!(
                "blob {digest}: refusing to read {len} bytes at once (limit {MAX_READ_RANGE})"
            )));
        }
        let known = self.lock().get(digest).copied();
        if let Some(size) = known {
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(RegistryError::Invalid(format!(
                    "registry {}, repository {}: blob {digest} is {size} bytes, too short for {len} bytes at offset {offset}",
                    self.client.registry(),
                    self.client.repository()
                )));
            }
        } else if offset.checked_add(len).is_none() {
            return Err(RegistryError::Invalid(format!(
                "blob {digest}: range {offset}+{len} overflows"
            )));
        }
        Ok(())
    }

    /// Reads several ranges of one blob. Ranges that overlap or touch
    /// (gap at most [`MERGE_GAP`]) are fetched with one request; the others
    /// one request each, in order. Returns one buffer per range, in the
    /// order given. Callers that want fewer requests for nearby ranges can
    /// also merge them themselves and call [`BlobStore::read_range`].
    pub fn read_ranges(
        &self,
        digest: &Digest,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, RegistryError> {
        for &(o, l) in ranges {
            self.check(digest, o, l)?;
        }
        let mut order: Vec<usize> = (0..ranges.len()).filter(|&i| ranges[i].1 > 0).collect();
        order.sort_by_key(|&i| ranges[i].0);
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); ranges.len()];
        let mut i = 0;
        while i < order.len() {
            let start = ranges[order[i]].0;
            let mut end = start + ranges[order[i]].1;
            let mut j = i + 1;
            while j < order.len() && ranges[order[j]].0 <= end.saturating_add(MERGE_GAP) {
                let new_end = end.max(ranges[order[j]].0 + ranges[order[j]].1);
                if new_end - start > MAX_READ_RANGE {
                    break;
                }
                end = new_end;
                j += 1;
            }
            let data = self.client.read_blob_range(digest, start, end - start)?;
            for &k in &order[i..j] {
                let (o, l) = ranges[k];
                let a = usize::try_from(o - start).unwrap_or(usize::MAX);
                let b = usize::try_from(o - start + l).unwrap_or(usize::MAX);
                out[k] = data
                    .get(a..b)
                    .ok_or_else(|| {
                        RegistryError::Invalid(format!(
                            "blob {digest}: merged range {start}..{end} is shorter than expected"
                        ))
                    })?
                    .to_vec();
            }
            i = j;
        }
        Ok(out)
    }
}

impl BlobStore for RegistryBlobStore {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, RegistryError> {
        self.check(digest, offset, len)?;
        self.client.read_blob_range(digest, offset, len)
    }

    fn read_range_until(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, RegistryError> {
        self.check(digest, offset, len)?;
        self.client
            .read_blob_range_until(digest, offset, len, Some(deadline))
    }

    /// One Range GET for all the pieces, each handed over as it arrives;
    /// a broken transfer resumes at the first piece not handed over.
    fn read_range_pieces(
        &self,
        digest: &Digest,
        offset: u64,
        pieces: &[u64],
        deadline: Option<Instant>,
        sink: &mut dyn FnMut(usize, Vec<u8>),
    ) -> Result<(), RegistryError> {
        let total = crate::blobstore::pieces_total(digest, pieces)?;
        self.check(digest, offset, total)?;
        self.client
            .read_blob_pieces_until(digest, offset, pieces, deadline, sink)
    }

    fn blob_size(&self, digest: &Digest) -> Result<u64, RegistryError> {
        if let Some(s) = self.lock().get(digest) {
            return Ok(*s);
        }
        match self.client.head_blob(digest, true)? {
            Some(size) => {
                self.lock().insert(*digest, size);
                Ok(size)
            }
            None => Err(RegistryError::NotFound(format!(
                "registry {}, repository {}: blob {digest} not found",
                self.client.registry(),
                self.client.repository()
            ))),
        }
    }
}
