//! Reading from a registry: manifests (tags, digests, indexes and platform
//! choice), verified small blobs, byte ranges and resumable blob streams,
//! and `docker://` as a source for the converter.
//!
//! What is verified where:
//! - manifests: against the digest of the reference, or of the index entry
//!   that led to them; by tag, against `Docker-Content-Digest` when the
//!   registry sends it (a mismatch is an error);
//! - configs and bootstraps: digest and size, before use;
//! - layer streams: digest and size at end of file ([`VerifyingReader`]);
//! - ranges: length and position only (`Content-Range`). A range cannot be
//!   checked against the blob digest: its consumer checks the digest of the
//!   chunk it holds (the FUSE layer does, before serving or caching).

use std::io::{self, Read};
use std::time::{Duration, Instant};

use oci_spec::image::{Descriptor, ImageIndex};
use reqwest::blocking::Response;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use skiff_format::Digest;

use crate::client::{chain, error_detail, Call, Endpoint, Failure, RegistryClient};
use crate::config::RegistryConfig;
use crate::layout::{choose, looks_like_index, to_digest, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE};
use crate::media;
use crate::platform::Platform;
use crate::source::{source_from_manifest, LayerOpener, SourceImage};
use crate::verify::VerifyingReader;
use crate::{DockerRef, RegistryError};

/// What a manifest GET accepts.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// How deep indexes may nest.
const MAX_INDEX_DEPTH: usize = 8;

/// A manifest as fetched: digest (verified), bytes and media type.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Its digest.
    pub digest: Digest,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its media type (from the body's `mediaType`, else `Content-Type`).
    pub media_type: String,
}

fn read_failure(client: &RegistryClient, ep: &Endpoint, what: &str, e: &io::Error) -> Failure {
    Failure::retry(RegistryError::Network {
        registry: ep.name.clone(),
        what: what.to_owned(),
        attempts: 1,
        detail: format!(
            "reading the body of {} failed: {}",
            client.repository(),
            chain(e)
        ),
    })
}

/// Reads a whole body, at most `max` bytes; errors while reading are
/// retryable.
fn read_body(
    client: &RegistryClient,
    ep: &Endpoint,
    resp: Response,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    if let Some(len) = content_length(&resp) {
        if len > max {
            return Err(Failure::fatal(RegistryError::Invalid(format!(
                "registry {}: {what}: {len} bytes is above the {max}-byte limit",
                client.registry()
            ))));
        }
    }
    let mut out = Vec::new();
    let r = resp.take(max + 1).read_to_end(&mut out);
    client.counters().bytes(out.len() as u64);
    r.map_err(|e| read_failure(client, ep, what, &e))?;
    if out.len() as u64 > max {
        return Err(Failure::fatal(RegistryError::Invalid(format!(
            "registry {}: {what}: larger than the {max}-byte limit",
            client.registry()
        ))));
    }
    Ok(out)
}

fn content_length(resp: &Response) -> Option<u64> {
    resp.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `bytes a-b/total` into `(a, b, total)`.
fn parse_content_range(resp: &Response) -> Option<(u64, u64, Option<u64>)> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

impl RegistryClient {
    /// Fetches a manifest by tag or digest. By digest it may come from a
    /// mirror and is checked against the digest (and `expected_size`);
    /// by tag it comes from a host trusted to resolve (a `hosts.toml` host
    /// with the `resolve` capability, else the registry) and is checked
    /// against `Docker-Content-Digest` when present.
    pub fn fetch_manifest(
        &self,
        reference: &str,
        expected_size: Option<u64>,
    ) -> Result<FetchedManifest, RegistryError> {
        let by_digest: Option<Digest> = reference
            .strip_prefix("sha256:")
            .map(|_| {
                reference.parse().map_err(|_| {
                    RegistryError::Invalid(format!("'{reference}' is not a sha256 digest"))
                })
            })
            .transpose()?;
        let what = format!("GET manifest {reference}");
        let op = |ep: &Endpoint| -> Result<FetchedManifest, Failure> {
            let url = self
                .url(ep, &format!("manifests/{reference}"))
                .map_err(Failure::fatal)?;
            let call = Call::new(Method::GET, url, self.pull_scope(), &what)
                .header(ACCEPT, MANIFEST_ACCEPT);
            let resp = self.send_once(ep, &call)?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND {
                return Err(Failure::fatal(
                    self.not_found(&format!("manifest {reference}"), ep),
                ));
            }
            if status != StatusCode::OK {
                let detail = error_detail(resp);
                return Err(Failure::fatal(self.http_error(&what, status, detail)));
            }
            let header_digest = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let content_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
            let bytes = read_body(self, ep, resp, MAX_MANIFEST_SIZE, &what)?;
            let digest = Digest::of(&bytes);
            let what_m = format!(
                "registry {}, repository {}: manifest {reference}{}",
                self.registry(),
                self.repository(),
                if ep.is_mirror {
                    format!(" (from {})", ep.name)
                } else {
                    String::new()
                }
            );
            let expected = by_digest.or_else(|| {
                header_digest
                    .as_deref()
                    .filter(|h| h.starts_with("sha256:"))
                    .and_then(|h| h.parse().ok())
            });
            if let Some(expected) = expected {
                if expected != digest {
                    return Err(Failure::fatal(RegistryError::DigestMismatch {
                        what: what_m,
                        expected,
                        actual: digest,
                    }));
                }
            }
            if let Some(size) = expected_size {
                if bytes.len() as u64 != size {
                    return Err(Failure::fatal(RegistryError::SizeMismatch {
                        what: what_m,
                        expected: size,
                        actual: bytes.len() as u64,
                    }));
                }
            }
            let body_type = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
                v.get("mediaType")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
            let media_type = body_type.or(content_type).unwrap_or_default();
            Ok(FetchedManifest {
                digest,
                bytes,
                media_type,
            })
        };
        let r = if by_digest.is_some() {
            self.pull(&what, op)
        } else {
            self.resolve_tag(&what, op)
        };
        self.count(r)
    }

    /// Resolves `r` (tag or digest; `latest` if neither) to an image
    /// manifest for `platform`, following indexes. The result is verified
    /// against `r`'s digest when it has one.
    pub fn resolve_manifest(
        &self,
        r: &DockerRef,
        platform: &Platform,
    ) -> Result<FetchedManifest, RegistryError> {
        let image = format!("docker://{r}");
        let mut m = self.fetch_manifest(&r.manifest_reference(), None)?;
        for _ in 0..MAX_INDEX_DEPTH {
            let is_index = media::is_index(&m.media_type)
                || (!media::is_manifest(&m.media_type) && looks_like_index(&m.bytes));
            if !is_index {
                return Ok(m);
            }
            let index: ImageIndex = serde_json::from_slice(&m.bytes).map_err(|e| {
                RegistryError::Invalid(format!(
                    "index {} of {image}: not a valid index: {e}",
                    m.digest
                ))
            })?;
            let entries: Vec<&Descriptor> = index.manifests().iter().collect();
            let desc = choose(&image, &entries, platform, false)?;
            let digest = to_digest(desc.digest(), &image)?;
            m = self.fetch_manifest(&digest.oci(), Some(desc.size()))?;
        }
        Err(RegistryError::Invalid(format!(
            "{image}: indexes nest more than {MAX_INDEX_DEPTH} deep"
        )))
    }

    /// Fetches a whole blob into memory (at most `max` bytes), verified
    /// against `digest` and `size` (when given).
    pub fn fetch_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
        max: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let what = format!("GET blob {digest}");
        if let Some(s) = size.filter(|&s| s > max) {
            return Err(RegistryError::Invalid(format!(
                "registry {}, repository {}: blob {digest} is {s} bytes, above the {max}-byte limit",
                self.registry(),
                self.repository()
            )));
        }
        let r = self.pull(&what, |ep| {
            let resp = self.blob_get(ep, digest, 0, None, &what)?;
            let bytes = read_body(self, ep, resp.response, max, &what)?;
            let whatb = format!(
                "registry {}, repository {}: blob {digest}",
                self.registry(),
                self.repository()
            );
            if let Some(s) = size {
                if bytes.len() as u64 != s {
                    // A short body is a broken transfer: retry it.
                    let e = RegistryError::SizeMismatch {
                        what: whatb,
                        expected: s,
                        actual: bytes.len() as u64,
                    };
                    return Err(if (bytes.len() as u64) < s {
                        Failure::retry(e)
                    } else {
                        Failure::fatal(e)
                    });
                }
            }
            let actual = Digest::of(&bytes);
            if actual != *digest {
                // Corruption in transit or a lying mirror: try again.
                return Err(Failure::retry(RegistryError::DigestMismatch {
                    what: whatb,
                    expected: *digest,
                    actual,
                }));
            }
            Ok(bytes)
        });
        self.count(r)
    }

    /// The size of blob `digest` (HEAD), or `None` if the repository does
    /// not have it. Asks mirrors first when `use_mirrors`.
    pub fn head_blob(
        &self,
        digest: &Digest,
        use_mirrors: bool,
    ) -> Result<Option<u64>, RegistryError> {
        let what = format!("HEAD blob {digest}");
        let op = |ep: &Endpoint| -> Result<Option<u64>, Failure> {
            let url = self
                .url(ep, &format!("blobs/{digest}"))
                .map_err(Failure::fatal)?;
            let scope = if use_mirrors {
                self.pull_scope()
            } else {
                self.push_scope()
            };
            let resp = self.send_once(ep, &Call::new(Method::HEAD, url, scope, &what))?;
            match resp.status() {
                s if s.is_success() => Ok(Some(content_length(&resp).ok_or_else(|| {
                    Failure::fatal(self.http_error(&what, s, ": no Content-Length".to_owned()))
                })?)),
                StatusCode::NOT_FOUND if ep.is_mirror => Err(Failure::fatal(
                    self.not_found(&format!("blob {digest}"), ep),
                )),
                StatusCode::NOT_FOUND => Ok(None),
                s => Err(Failure::fatal(self.http_error(&what, s, String::new()))),
            }
        };
        let r = if use_mirrors {
            self.pull(&what, op)
        } else {
            let origin = self.origin();
            self.retrying(origin, &what, u32::MAX, || op(origin))
        };
        self.count(r)
    }

    /// One GET of a blob from `offset` (`len` bytes, or to the end), with
    /// the response checked to start at `offset`. A 200 (the server ignored
    /// the Range) is skipped forward to `offset`.
    fn blob_get(
        &self,
        ep: &Endpoint,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
        what: &str,
    ) -> Result<BlobResponse, Failure> {
        self.blob_get_timeout(ep, digest, offset, len, what, None)
    }

    /// [`blob_get`](Self::blob_get) with a timeout of its own for the
    /// whole request (`None`: the client's).
    fn blob_get_timeout(
        &self,
        ep: &Endpoint,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
        what: &str,
        timeout: Option<Duration>,
    ) -> Result<BlobResponse, Failure> {
        let url = self
            .url(ep, &format!("blobs/{digest}"))
            .map_err(Failure::fatal)?;
        let mut call = Call::new(Method::GET, url, self.pull_scope(), what);
        call.timeout = timeout;
        let wants_range = offset > 0 || len.is_some();
        if wants_range {
            let range = match len {
                Some(l) => format!("bytes={offset}-{}", offset + l - 1),
                None => format!("bytes={offset}-"),
            };
            call = call.header(RANGE, range);
        }
        let resp = self.send_once(ep, &call)?;
        let status = resp.status();
        let blob = || format!("blob {digest}");
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let Some((a, b, total)) = parse_content_range(&resp) else {
                    return Err(Failure::fatal(self.http_error(
                        what,
                        status,
                        ": 206 without a valid Content-Range".to_owned(),
                    )));
                };
                if a != offset || b < a {
                    return Err(Failure::fatal(self.http_error(
                        what,
                        status,
                        format!(": asked for bytes from {offset}, got {a}-{b}"),
                    )));
                }
                if let Some(l) = len {
                    if b != offset + l - 1 {
                        return Err(Failure::fatal(RegistryError::Invalid(format!(
                            "registry {}, repository {}: {}: too short for {l} bytes at offset {offset} (the registry has bytes {a}-{b} of {})",
                            self.registry(),
                            self.repository(),
                            blob(),
                            total.map_or("?".to_owned(), |t| t.to_string()),
                        ))));
                    }
                }
                Ok(BlobResponse {
                    response: resp,
                    total,
                })
            }
            StatusCode::OK => {
                let total = content_length(&resp);
                let mut response = resp;
                if wants_range {
                    if let (Some(t), Some(l)) = (total, len) {
                        if offset.saturating_add(l) > t {
                            return Err(Failure::fatal(RegistryError::Invalid(format!(
                                "registry {}, repository {}: {} is {t} bytes, too short for {l} bytes at offset {offset}",
                                self.registry(),
                                self.repository(),
                                blob()
                            ))));
                        }
                    }
                    tracing::debug!("{}: {what}: the server ignored the Range header; skipping {offset} bytes", ep.name);
                    let skipped = io::copy(&mut (&mut response).take(offset), &mut io::sink())
                        .map_err(|e| read_failure(self, ep, what, &e))?;
                    self.counters().bytes(skipped);
                    if skipped != offset {
                        return Err(Failure::retry(RegistryError::Network {
                            registry: ep.name.clone(),
                            what: what.to_owned(),
                            attempts: 1,
                            detail: format!("the body ended after {skipped} bytes, before offset {offset}"),
                        }));
                    }
                }
                Ok(BlobResponse { response, total })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => Err(Failure::fatal(RegistryError::Invalid(format!(
                "registry {}, repository {}: {}: range at offset {offset} is past its end (HTTP 416)",
                self.registry(),
                self.repository(),
                blob()
            )))),
            StatusCode::NOT_FOUND => Err(Failure::fatal(self.not_found(&blob(), ep))),
            s => {
                let detail = error_detail(resp);
                Err(Failure::fatal(self.http_error(what, s, detail)))
            }
        }
    }

    /// The timeout of one attempt that must end by `until` (see
    /// `attempt_timeout`); a fatal failure when the caller's deadline has
    /// already passed (no attempt is made, so none is counted).
    fn attempt_timeout_for(
        &self,
        ep: &Endpoint,
        what: &str,
        until: Option<Instant>,
    ) -> Result<Duration, Failure> {
        self.attempt_timeout(until).ok_or_else(|| {
            Failure::fatal(RegistryError::Network {
                registry: ep.name.clone(),
                what: what.to_owned(),
                attempts: 0,
                detail: "the caller's deadline has passed".to_owned(),
            })
        })
    }

    /// The next `want` bytes of a response body, counted; a retryable
    /// failure if the body breaks or ends before (`short` says how, from
    /// the bytes that came).
    fn read_body(
        &self,
        ep: &Endpoint,
        what: &str,
        body: &mut impl Read,
        want: usize,
        short: impl FnOnce(usize) -> String,
    ) -> Result<Vec<u8>, Failure> {
        let mut out = Vec::with_capacity(want);
        let res = body.take(want as u64).read_to_end(&mut out);
        self.counters().bytes(out.len() as u64);
        res.map_err(|e| read_failure(self, ep, what, &e))?;
        if out.len() != want {
            return Err(Failure::retry(RegistryError::Network {
                registry: ep.name.clone(),
                what: what.to_owned(),
                attempts: 1,
                detail: short(out.len()),
            }));
        }
        Ok(out)
    }

    /// Reads exactly `len` bytes at `offset` of blob `digest` (one Range
    /// GET, retried; mirrors first). Never returns short data.
    pub fn read_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        self.read_blob_range_until(digest, offset, len, None)
    }

    /// [`read_blob_range`](Self::read_blob_range), giving up at `until`:
    /// no attempt starts after it, each attempt's timeout ends by it, and
    /// no backoff waits past it.
    pub fn read_blob_range_until(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        until: Option<Instant>,
    ) -> Result<Vec<u8>, RegistryError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let _busy = self.counters().start();
        let what = format!("GET blob {digest} bytes {offset}+{len}");
        let want = usize::try_from(len).map_err(|_| {
            RegistryError::Invalid(format!("blob {digest}: range length {len} too large"))
        })?;
        let r = self.pull_until(&what, until, |ep, until| {
            let timeout = self.attempt_timeout_for(ep, &what, until)?;
            let resp =
                self.blob_get_timeout(ep, digest, offset, Some(len), &what, Some(timeout))?;
            let mut body = resp.response;
            self.read_body(ep, &what, &mut body, want, |got| {
                format!("the body ended after {got} of {len} bytes")
            })
        });
        self.count(r)
    }

    /// Reads the consecutive `pieces` (lengths) of blob `digest` from
    /// `offset` in one Range GET, handing each to `sink` (with its index)
    /// as soon as its bytes have arrived. Retried like
    /// [`read_blob_range_until`](Self::read_blob_range_until); a retry asks
    /// only for the pieces not yet handed over. Never hands over short data.
    pub fn read_blob_pieces_until(
        &self,
        digest: &Digest,
        offset: u64,
        pieces: &[u64],
        until: Option<Instant>,
        sink: &mut dyn FnMut(usize, Vec<u8>),
    ) -> Result<(), RegistryError> {
        let total: u64 = pieces.iter().fold(0u64, |a, &b| a.saturating_add(b));
        if total == 0 {
            for i in 0..pieces.len() {
                sink(i, Vec::new());
            }
            return Ok(());
        }
        let _busy = self.counters().start();
        let what = format!("GET blob {digest} bytes {offset}+{total}");
        // The first piece not handed over yet, and where it starts.
        let (mut next, mut at) = (0usize, offset);
        let r = self.pull_until(&what, until, |ep, until| {
            let timeout = self.attempt_timeout_for(ep, &what, until)?;
            let rest = total - (at - offset);
            let resp = self.blob_get_timeout(ep, digest, at, Some(rest), &what, Some(timeout))?;
            let mut body = resp.response.take(rest);
            while let Some(&len) = pieces.get(next) {
                let want = usize::try_from(len).map_err(|_| {
                    Failure::fatal(RegistryError::Invalid(format!(
                        "blob {digest}: piece of {len} bytes too large"
                    )))
                })?;
                let out = self.read_body(ep, &what, &mut body, want, |got| {
                    format!(
                        "the body ended {got} bytes into the piece of {len} bytes at offset {at}"
                    )
                })?;
                sink(next, out);
                next += 1;
                at += len;
            }
            Ok(())
        });
        self.count(r)
    }

    /// Opens blob `digest` for streaming from `offset` (mirrors first,
    /// retried). The reader is NOT verified: wrap it (see
    /// [`RegistryClient::blob_reader`]).
    fn open_stream_at(&self, digest: &Digest, offset: u64) -> Result<Response, RegistryError> {
        let what = format!("GET blob {digest} from offset {offset}");
        let r = self.pull(&what, |ep| {
            self.blob_get(ep, digest, offset, None, &what)
                .map(|b| b.response)
        });
        self.count(r)
    }

    /// Streams blob `digest` (`size` bytes), verified against both at end
    /// of file, resuming with a Range request after a broken connection.
    /// `what` names it in errors.
    pub fn blob_reader(
        &self,
        digest: Digest,
        size: u64,
        what: String,
    ) -> VerifyingReader<BlobStream> {
        let stream = BlobStream {
            client: self.clone(),
            digest,
            size,
            pos: 0,
            resp: None,
            resumes: 0,
        };
        VerifyingReader::new(stream, Some(digest), Some(size), what)
    }
}

struct BlobResponse {
    response: Response,
    #[allow(dead_code)]
    total: Option<u64>,
}

/// A blob streamed from a registry, resumed where it broke off. Not
/// verified by itself: [`RegistryClient::blob_reader`] wraps it in a
/// [`VerifyingReader`].
pub struct BlobStream {
    client: RegistryClient,
    digest: Digest,
    size: u64,
    pos: u64,
    resp: Option<Response>,
    resumes: u32,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos >= self.size {
                // Never read past the size: VerifyingReader checks the digest.
                return Ok(0);
            }
            let resp = match &mut self.resp {
                Some(r) => r,
                None => {
                    let r = self
                        .client
                        .open_stream_at(&self.digest, self.pos)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    self.resp.insert(r)
                }
            };
            let err = match resp.read(buf) {
                Ok(0) => format!(
                    "the connection closed at byte {} of {}",
                    self.pos, self.size
                ),
                Ok(n) => {
                    self.pos += n as u64;
                    self.client.counters().bytes(n as u64);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(e) => chain(&e),
            };
            self.resp = None;
            self.resumes += 1;
            if self.resumes >= self.client.max_attempts() {
                self.client.counters().error();
                return Err(io::Error::other(format!(
                    "registry {}, repository {}: blob {}: gave up after {} broken transfers: {err}",
                    self.client.registry(),
                    self.client.repository(),
                    self.digest,
                    self.resumes
                )));
            }
            tracing::debug!("blob {}: {err}; resuming at {}", self.digest, self.pos);
            self.client.counters().retry();
            std::thread::sleep(Duration::from_millis(100 * u64::from(self.resumes)));
        }
    }
}

/// `docker://` for [`open_source`](crate::open_source).
pub(crate) fn open_docker_source(
    r: &DockerRef,
    platform: &Platform,
    config: &RegistryConfig,
) -> Result<(SourceImage, Box<dyn LayerOpener>), RegistryError> {
    let client = RegistryClient::new(r, config)?;
    let m = client.resolve_manifest(r, platform)?;
    open_docker_manifest(r, client, m)
}

/// The image manifest `m` of `r`'s repository as a converter source.
pub(crate) fn open_docker_manifest(
    r: &DockerRef,
    client: RegistryClient,
    m: FetchedManifest,
) -> Result<(SourceImage, Box<dyn LayerOpener>), RegistryError> {
    let image = format!("docker://{r}");
    let (source, blobs) = source_from_manifest(image.clone(), m.digest, &m.bytes, |desc, what| {
        let digest = to_digest(desc.digest(), what)?;
        client
            .fetch_blob(&digest, Some(desc.size()), MAX_CONFIG_SIZE)
            .map_err(|e| match e {
                RegistryError::NotFound(m) => RegistryError::NotFound(format!("{what}: {m}")),
                e => e,
            })
    })?;
    Ok((
        source,
        Box::new(RemoteLayerOpener {
            client,
            image,
            blobs,
        }),
    ))
}

struct RemoteLayerOpener {
    client: RegistryClient,
    image: String,
    blobs: Vec<(Digest, u64)>,
}

impl LayerOpener for RemoteLayerOpener {
    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, RegistryError> {
        let Some(&(digest, size)) = self.blobs.get(index) else {
            return Err(RegistryError::NotFound(format!(
                "{} has no layer {index} (it has {})",
                self.image,
                self.blobs.len()
            )));
        };
        Ok(Box::new(self.client.blob_reader(
            digest,
            size,
            format!("layer {index} ({digest}) of {}", self.image),
        )))
    }
}
