//! Writing to a registry: [`RegistryWriter`] (blobs, cross-repository
//! mounts, manifests) and [`RegistryBlobWriter`] (one streamed blob).
//!
//! A blob is streamed into memory up to the upload chunk size (16 MiB by
//! default), then uploaded chunk by chunk: `POST /v2/NAME/blobs/uploads/`,
//! `PATCH` per chunk with `Content-Range`, `PUT ?digest=` at the end. A blob
//! that ends before the first chunk is full is checked with `HEAD` first
//! (present: nothing is sent), then mounted from the configured source
//! repository if there is one, else uploaded with `POST` + one `PUT`
//! (or `POST` + `PATCH` + `PUT` above the monolithic limit). A failed
//! `PATCH` asks the registry how much it has (`GET` on the upload) and
//! resumes from there.
//!
//! Nothing is visible before [`RegistryBlobWriter::commit`]; dropping a
//! writer cancels its upload. Push the manifest last
//! ([`RegistryWriter::put_manifest`]): it is the commit point of an image.

use std::io::{self, Write};
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use skiff_format::Digest;

use crate::client::{error_detail, Call, Failure, RegistryClient};
use crate::config::RegistryConfig;
use crate::stats::FetchStats;
use crate::{DockerRef, RegistryError};

/// Upload bandwidth assumed when sizing request timeouts (256 KiB/s).
const MIN_UPLOAD_RATE: u64 = 256 << 10;

/// Pushes blobs and manifests to one repository.
#[derive(Debug, Clone)]
pub struct RegistryWriter {
    client: RegistryClient,
    mount_from: Option<String>,
}

impl RegistryWriter {
    /// A writer for the repository of `r` (its tag and digest are ignored:
    /// name the tag in [`put_manifest`](Self::put_manifest)).
    pub fn new(r: &DockerRef, config: &RegistryConfig) -> Result<RegistryWriter, RegistryError> {
        Ok(RegistryWriter::from_client(RegistryClient::new(r, config)?))
    }

    /// A writer using an existing client.
    pub fn from_client(client: RegistryClient) -> RegistryWriter {
        RegistryWriter {
            client,
            mount_from: None,
        }
    }

    /// Blobs missing here are first mounted from `repository` of the same
    /// registry (e.g. the source image's), when small enough to be known
    /// before their first chunk is sent.
    pub fn with_mount_source(mut self, repository: impl Into<String>) -> RegistryWriter {
        self.mount_from = Some(repository.into());
        self
    }

    /// The client underneath.
    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    /// A snapshot of the counters (bytes uploaded, blobs skipped or mounted,
    /// retries, ...).
    pub fn stats(&self) -> FetchStats {
        self.client.stats()
    }

    /// Whether the repository has blob `digest` (`HEAD`).
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        Ok(self.client.head_blob(digest, false)?.is_some())
    }

    /// Mounts blob `digest` from repository `from` of the same registry.
    /// Returns false if the registry could not (it then has not got the
    /// blob: upload it).
    pub fn mount_blob(&self, digest: &Digest, from: &str) -> Result<bool, RegistryError> {
        let c = &self.client;
        let what = format!("mount blob {digest} from {from}");
        let mut scope = c.push_scope().to_vec();
        scope.push(format!("repository:{from}:pull"));
        let origin = c.origin();
        let r = c.retrying(origin, &what, u32::MAX, || {
            let mut url = c.url(origin, "blobs/uploads/").map_err(Failure::fatal)?;
            url.query_pairs_mut()
                .append_pair("mount", &digest.oci())
                .append_pair("from", from);
            let resp = c.send_once(origin, &Call::new(Method::POST, url, &scope, &what))?;
            match resp.status() {
                StatusCode::CREATED => Ok(None),
                StatusCode::ACCEPTED => Ok(Some(location(c, origin, &resp, &what)?)),
                s => {
                    let detail = error_detail(resp);
                    Err(Failure::fatal(c.http_error(&what, s, detail)))
                }
            }
        });
        match c.count(r)? {
            None => {
                c.counters().mounted();
                Ok(true)
            }
            Some(upload) => {
                // The registry started an ordinary upload instead.
                cancel(c, &upload);
                Ok(false)
            }
        }
    }

    /// Starts a blob upload. Write the blob, then
    /// [`commit`](RegistryBlobWriter::commit) it.
    pub fn blob_writer(&self) -> Result<RegistryBlobWriter, RegistryError> {
        Ok(RegistryBlobWriter {
            client: self.client.clone(),
            mount_from: self.mount_from.clone(),
            hasher: Sha256::new(),
            size: 0,
            buf: Vec::new(),
            upload: None,
            failed: None,
        })
    }

    /// Uploads `bytes` as a blob (skipped if present); returns its digest
    /// and size.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<(Digest, u64), RegistryError> {
        let mut w = self.blob_writer()?;
        w.buf = bytes.to_vec();
        w.hasher.update(bytes);
        w.size = bytes.len() as u64;
        w.commit()
    }

    /// Pushes a manifest (or index) under `reference` (a tag, or its
    /// digest); returns its digest. The blobs it names must be pushed
    /// first: this is the commit point of an image.
    pub fn put_manifest(
        &self,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        self.put_manifest_subject(reference, bytes, media_type)
            .map(|(digest, _)| digest)
    }

    /// [`put_manifest`](Self::put_manifest), also returning the
    /// `OCI-Subject` header of the answer: a registry with the referrers
    /// API sends it when the manifest has a `subject` it indexed.
    pub fn put_manifest_subject(
        &self,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(Digest, Option<String>), RegistryError> {
        let c = &self.client;
        let digest = Digest::of(bytes);
        let what = format!("PUT manifest {reference}");
        let origin = c.origin();
        let r = c.retrying(origin, &what, u32::MAX, || {
            let url = c
                .url(origin, &format!("manifests/{reference}"))
                .map_err(Failure::fatal)?;
            let mut call =
                Call::new(Method::PUT, url, c.push_scope(), &what).header(CONTENT_TYPE, media_type);
            call.body = Some(bytes.to_vec());
            let resp = c.send_once(origin, &call)?;
            match resp.status() {
                StatusCode::CREATED | StatusCode::OK | StatusCode::ACCEPTED => {
                    let header = resp
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    if let Some(h) = header {
                        if h.starts_with("sha256:") && h != digest.oci() {
                            return Err(Failure::fatal(c.http_error(
                                &what,
                                resp.status(),
                                format!(
                                    ": the registry reports digest {h}, the manifest is {digest}"
                                ),
                            )));
                        }
                    }
                    Ok(resp
                        .headers()
                        .get("oci-subject")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned))
                }
                s => {
                    let detail = error_detail(resp);
                    Err(Failure::fatal(c.http_error(&what, s, detail)))
                }
            }
        });
        let subject = c.count(r)?;
        c.counters().uploaded(bytes.len() as u64);
        Ok((digest, subject))
    }
}

fn location(
    c: &RegistryClient,
    ep: &crate::client::Endpoint,
    resp: &reqwest::blocking::Response,
    what: &str,
) -> Result<Url, Failure> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Failure::fatal(c.http_error(what, resp.status(), ": no Location header".to_owned()))
        })?;
    c.resolve(ep, loc).map_err(Failure::fatal)
}

/// Best-effort `DELETE` of an unfinished upload.
fn cancel(c: &RegistryClient, upload: &Url) {
    let what = "cancel upload";
    let call = Call::new(Method::DELETE, upload.clone(), c.push_scope(), what);
    if let Err(f) = c.send_once(c.origin(), &call) {
        tracing::debug!("{}: {what}: {}", c.registry(), f.err);
    }
}

fn upload_timeout(c: &RegistryClient, len: u64) -> Option<Duration> {
    Some(c.read_timeout() + Duration::from_secs(len / MIN_UPLOAD_RATE))
}

/// `POST` a new upload; returns its location.
fn start_upload(c: &RegistryClient, what: &str) -> Result<Url, RegistryError> {
    let origin = c.origin();
    let r = c.retrying(origin, what, u32::MAX, || {
        let url = c.url(origin, "blobs/uploads/").map_err(Failure::fatal)?;
        let resp = c.send_once(origin, &Call::new(Method::POST, url, c.push_scope(), what))?;
        match resp.status() {
            StatusCode::ACCEPTED => location(c, origin, &resp, what),
            s => {
                let detail = error_detail(resp);
                Err(Failure::fatal(c.http_error(what, s, detail)))
            }
        }
    });
    c.count(r)
}

/// How many bytes the registry holds for an upload, and its new location.
fn upload_status(c: &RegistryClient, upload: &Url, what: &str) -> Result<(Url, u64), Failure> {
    let origin = c.origin();
    let call = Call::new(Method::GET, upload.clone(), c.push_scope(), what);
    let resp = c.send_once(origin, &call)?;
    let s = resp.status();
    if s != StatusCode::NO_CONTENT && s != StatusCode::OK {
        let detail = error_detail(resp);
        return Err(Failure::fatal(c.http_error(what, s, detail)));
    }
    let loc = if resp.headers().contains_key(LOCATION) {
        location(c, origin, &resp, what)?
    } else {
        upload.clone()
    };
    // `Range: 0-N`, N inclusive. Distribution says `0-0` for an empty
    // upload as well as for one byte: take it as empty (if the registry had
    // one byte, the digest check of the final PUT refuses the blob; it
    // never stores wrong content).
    let committed = resp
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().trim_start_matches("bytes=").split_once('-'))
        .and_then(|(_, end)| end.trim().parse::<i64>().ok())
        .map_or(0, |end| {
            if end <= 0 {
                0
            } else {
                u64::try_from(end + 1).unwrap_or(0)
            }
        });
    Ok((loc, committed))
}

/// `PATCH`es `data` (which starts at byte `start` of the blob) to the
/// upload; returns the upload's new location. Resumes from what the
/// registry has after a failure.
fn patch(c: &RegistryClient, upload: Url, start: u64, data: &[u8]) -> Result<Url, RegistryError> {
    let end = start + data.len() as u64;
    let what = format!("PATCH upload bytes {start}-{}", end.saturating_sub(1));
    let origin = c.origin();
    let mut loc = upload;
    let mut offset = start;
    let mut first = true;
    let r = c.retrying(origin, &what, u32::MAX, || {
        if !first {
            let (l, committed) = upload_status(c, &loc, "GET upload status")?;
            loc = l;
            if committed == end {
                return Ok(loc.clone());
            }
            if committed < start || committed > end {
                return Err(Failure::fatal(c.http_error(
                    &what,
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!(": the registry holds {committed} bytes, expected {start}..{end}"),
                )));
            }
            offset = committed;
        }
        first = false;
        let chunk = data
            .get(usize::try_from(offset - start).unwrap_or(usize::MAX)..)
            .unwrap_or_default();
        let mut call = Call::new(Method::PATCH, loc.clone(), c.push_scope(), &what)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_RANGE, format!("{offset}-{}", end - 1));
        call.body = Some(chunk.to_vec());
        call.timeout = upload_timeout(c, chunk.len() as u64);
        let resp = c.send_once(origin, &call)?;
        match resp.status() {
            StatusCode::ACCEPTED | StatusCode::NO_CONTENT => {
                c.counters().uploaded(chunk.len() as u64);
                location(c, origin, &resp, &what)
            }
            StatusCode::RANGE_NOT_SATISFIABLE => Err(Failure::retry(c.http_error(
                &what,
                StatusCode::RANGE_NOT_SATISFIABLE,
                String::new(),
            ))),
            s => {
                let detail = error_detail(resp);
                Err(Failure::fatal(c.http_error(&what, s, detail)))
            }
        }
    });
    c.count(r)
}

/// The final `PUT ?digest=` of an upload, with `body` as its last bytes.
fn finish(
    c: &RegistryClient,
    upload: &Url,
    digest: &Digest,
    size: u64,
    body: &[u8],
) -> Result<(), Failure> {
    let what = format!("PUT blob {digest}");
    let mut url = upload.clone();
    url.query_pairs_mut().append_pair("digest", &digest.oci());
    let mut call = Call::new(Method::PUT, url, c.push_scope(), &what)
        .header(CONTENT_TYPE, "application/octet-stream");
    call.body = Some(body.to_vec());
    call.timeout = upload_timeout(c, body.len() as u64);
    let resp = c.send_once(c.origin(), &call)?;
    match resp.status() {
        StatusCode::CREATED | StatusCode::NO_CONTENT | StatusCode::OK => {
            c.counters().uploaded(body.len() as u64);
            Ok(())
        }
        StatusCode::NOT_FOUND => {
            // A retried PUT whose first try went through: the upload is gone,
            // the blob is there.
            match c.head_blob(digest, false) {
                Ok(Some(s)) if s == size => Ok(()),
                _ => {
                    let detail = error_detail(resp);
                    Err(Failure::fatal(c.http_error(
                        &what,
                        StatusCode::NOT_FOUND,
                        detail,
                    )))
                }
            }
        }
        s => {
            let detail = error_detail(resp);
            Err(Failure::fatal(c.http_error(&what, s, detail)))
        }
    }
}

/// One blob being uploaded: `Write` it, then [`commit`](Self::commit).
/// Dropping it uncommitted cancels the upload.
pub struct RegistryBlobWriter {
    client: RegistryClient,
    mount_from: Option<String>,
    hasher: Sha256,
    size: u64,
    buf: Vec<u8>,
    /// The upload's location and how many bytes it holds.
    upload: Option<(Url, u64)>,
    failed: Option<String>,
}

impl std::fmt::Debug for RegistryBlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryBlobWriter")
            .field("registry", &self.client.registry())
            .field("repository", &self.client.repository())
            .field("size", &self.size)
            .field("uploading", &self.upload.is_some())
            .finish_non_exhaustive()
    }
}

impl RegistryBlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn flush_chunk(&mut self) -> Result<(), RegistryError> {
        let (loc, start) = match self.upload.take() {
            Some(u) => u,
            None => (start_upload(&self.client, "POST blob upload")?, 0),
        };
        let data = std::mem::take(&mut self.buf);
        let loc = patch(&self.client, loc, start, &data)?;
        self.upload = Some((loc, start + data.len() as u64));
        self.buf = data;
        self.buf.clear();
        Ok(())
    }

    /// Finishes the upload; returns the blob's digest and size. A blob the
    /// repository already has is not uploaded again.
    pub fn commit(mut self) -> Result<(Digest, u64), RegistryError> {
        if let Some(m) = &self.failed {
            return Err(RegistryError::Invalid(format!(
                "registry {}, repository {}: the upload failed earlier: {m}",
                self.client.registry(),
                self.client.repository()
            )));
        }
        let digest = Digest(std::mem::take(&mut self.hasher).finalize().into());
        let size = self.size;
        let c = self.client.clone();
        let what = format!("upload blob {digest}");
        match self.upload.take() {
            None => {
                if c.head_blob(&digest, false)? == Some(size) {
                    c.counters().skipped();
                    return Ok((digest, size));
                }
                if let Some(from) = self.mount_from.clone() {
                    if RegistryWriter::from_client(c.clone()).mount_blob(&digest, &from)? {
                        return Ok((digest, size));
                    }
                }
                if size > c.monolithic_upload_limit() {
                    self.flush_chunk()?;
                    return self.commit_upload(digest, size, &what);
                }
                let origin = c.origin();
                let body = std::mem::take(&mut self.buf);
                let r = c.retrying(origin, &what, u32::MAX, || {
                    let loc = start_upload(&c, "POST blob upload").map_err(Failure::fatal)?;
                    finish(&c, &loc, &digest, size, &body)
                });
                c.count(r)?;
                Ok((digest, size))
            }
            Some(u) => {
                self.upload = Some(u);
                if !self.buf.is_empty() {
                    self.flush_chunk()?;
                }
                self.commit_upload(digest, size, &what)
            }
        }
    }

    fn commit_upload(
        mut self,
        digest: Digest,
        size: u64,
        what: &str,
    ) -> Result<(Digest, u64), RegistryError> {
        let c = self.client.clone();
        let Some((loc, held)) = self.upload.take() else {
            return Err(RegistryError::Invalid(format!(
                "{what}: no upload in progress"
            )));
        };
        if held != size {
            cancel(&c, &loc);
            return Err(RegistryError::Invalid(format!(
                "{what}: the upload holds {held} bytes, the blob is {size}"
            )));
        }
        if c.head_blob(&digest, false)? == Some(size) {
            cancel(&c, &loc);
            c.counters().skipped();
            return Ok((digest, size));
        }
        let origin = c.origin();
        let r = c.retrying(origin, what, u32::MAX, || {
            finish(&c, &loc, &digest, size, &[])
        });
        if r.is_err() {
            cancel(&c, &loc);
        }
        c.count(r)?;
        Ok((digest, size))
    }
}

impl Write for RegistryBlobWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(m) = &self.failed {
            return Err(io::Error::other(m.clone()));
        }
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() as u64 >= self.client.upload_chunk_size() {
            if let Err(e) = self.flush_chunk() {
                let m = e.to_string();
                self.failed = Some(m.clone());
                return Err(io::Error::other(m));
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks are sent when full; commit sends the rest.
        Ok(())
    }
}

impl Drop for RegistryBlobWriter {
    fn drop(&mut self) {
        if let Some((loc, _)) = self.upload.take() {
            cancel(&self.client, &loc);
        }
    }
}
