//! Fetch metrics: lock-free counters shared by a registry client and the
//! stores and writers built on it, read as a [`FetchStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a registry client's counters (monotonic except
/// `in_flight`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// HTTP requests sent to registries and mirrors (retries and redirects
    /// included, token requests not).
    pub requests: u64,
    /// Body bytes received from blob and manifest reads.
    pub bytes: u64,
    /// Body bytes sent by uploads.
    pub bytes_uploaded: u64,
    /// Attempts that failed and were retried (or resumed).
    pub retries: u64,
    /// Operations that failed for good (returned an error).
    pub errors: u64,
    /// Operations in progress now.
    pub in_flight: u64,
    /// Requests to token servers.
    pub token_fetches: u64,
    /// Blob uploads skipped because the registry already had the blob.
    pub blobs_skipped: u64,
    /// Blobs mounted from another repository instead of uploaded.
    pub blobs_mounted: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    bytes_uploaded: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    token_fetches: AtomicU64,
    blobs_skipped: AtomicU64,
    blobs_mounted: AtomicU64,
}

impl Counters {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn uploaded(&self, n: u64) {
        self.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn token_fetch(&self) {
        self.token_fetches.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn skipped(&self) {
        self.blobs_skipped.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn mounted(&self) {
        self.blobs_mounted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an operation in flight until the guard drops.
    pub(crate) fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub(crate) fn snapshot(&self) -> FetchStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FetchStats {
            requests: g(&self.requests),
            bytes: g(&self.bytes),
            bytes_uploaded: g(&self.bytes_uploaded),
            retries: g(&self.retries),
            errors: g(&self.errors),
            in_flight: g(&self.in_flight),
            token_fetches: g(&self.token_fetches),
            blobs_skipped: g(&self.blobs_skipped),
            blobs_mounted: g(&self.blobs_mounted),
        }
    }
}

/// Decrements `in_flight` on drop.
pub(crate) struct InFlight<'a>(&'a Counters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
