//! The HTTP side of the OCI distribution protocol: [`RegistryClient`], one
//! repository of one registry (plus its mirrors).
//!
//! Every request goes through one path that
//! - adds the endpoint's extra headers and its `Authorization` (Basic, or a
//!   Bearer token fetched on a `WWW-Authenticate` challenge and cached per
//!   scope, see [`auth`](crate::auth));
//! - retries once with fresh credentials after a 401;
//! - follows redirects of GET and HEAD (301/302/303/307/308) by hand, up to
//!   [`MAX_REDIRECTS`], sending neither `Authorization` nor the mirror's
//!   extra headers to any other origin (scheme, host, port);
//! - retries connect errors, timeouts, broken bodies, 408, 429 and 5xx
//!   (except 501/505) with jittered exponential backoff, honouring
//!   `Retry-After`, within [`RetryConfig::max_attempts`] and
//!   [`RetryConfig::deadline_ms`]; then returns the error.
//!
//! Where requests go: the registry's endpoints are Skiff's own `mirrors`
//! for it, then the `[host."..."]` entries of its containerd `hosts.toml`
//! (see [`hosts`](crate::hosts)), then the server (the `server` of that
//! file, else the registry itself). Pulls of content-addressed things
//! (blobs, manifests by digest) try every endpoint that may `pull` in that
//! order, each mirror with at most two attempts, the server last; tags are
//! resolved by the `hosts.toml` hosts that may `resolve`, then the server
//! (Skiff's own mirrors never resolve). Pushes go to the server only. A
//! mirror that fails on the network is skipped for [`MIRROR_COOLDOWN`], so
//! that a dead mirror costs one failed connection, not one per read; and a
//! read with a deadline gives the mirrors at most half of the time left, so
//! that the server always gets its share. Requests to an endpoint that is
//! not the registry itself carry `ns=<registry>` in their query, as
//! containerd sends them, so that one mirror (Spegel, Dragonfly, a
//! pull-through cache) can serve many registries.
//!
//! The client is blocking (reqwest's blocking client, HTTP/1.1, keep-alive
//! pool) and `Send + Sync`: share it between threads freely. Do not call it
//! from inside a tokio runtime (use `spawn_blocking`).

use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng as _;
use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, LOCATION};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use crate::auth::{url_no_query, AuthHeader, AuthState};
use crate::config::{is_loopback, Credentials, Mirror, RegistryConfig, RetryConfig};
use crate::hosts::{self, Capabilities, HostEntry};
use crate::stats::{Counters, FetchStats};
use crate::{credentials, DockerRef, RegistryError};

/// Redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;
/// Attempts per mirror before falling back to the next one.
const MIRROR_ATTEMPTS: u32 = 2;
/// How long a mirror that failed on the network is skipped.
pub const MIRROR_COOLDOWN: Duration = Duration::from_secs(10);
/// Largest error body read to explain a failure.
const MAX_ERROR_BODY: u64 = 8 << 10;

/// One place requests can go: the registry or one of its mirrors.
pub(crate) struct Endpoint {
    /// For messages: `host[:port]` of the registry, or the mirror's URL.
    pub(crate) name: String,
    /// The API root, `scheme://host[:port]/[prefix/]v2/` (or the path of an
    /// `override_path` host), always ending in `/`.
    base: Url,
    /// The plain-HTTP base to fall back to when the endpoint may be reached
    /// insecurely and does not speak TLS.
    http_base: Option<Url>,
    use_http: AtomicBool,
    headers: HeaderMap,
    pub(crate) auth: AuthState,
    pub(crate) is_mirror: bool,
    /// The HTTP client (its own when the host has TLS settings of its own).
    http: Client,
    /// `ns=` sent with every request: the registry, when this endpoint is
    /// not the registry itself.
    ns: Option<String>,
    /// What the endpoint may be used for.
    caps: Capabilities,
    /// Until when a mirror that failed on the network is skipped.
    down_until: Mutex<Option<Instant>>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("base", &self.base().as_str())
            .field("is_mirror", &self.is_mirror)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The base URL in use (HTTPS, or plain HTTP after a fallback).
    fn base(&self) -> &Url {
        match &self.http_base {
            Some(h) if self.use_http.load(Ordering::Relaxed) => h,
            _ => &self.base,
        }
    }

    /// Whether a mirror is being skipped after a network failure.
    fn is_down(&self) -> bool {
        let mut d = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match *d {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *d = None;
                false
            }
            None => false,
        }
    }

    fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + MIRROR_COOLDOWN);
    }
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A failed attempt: whether to retry, and after how long at least.
pub(crate) struct Failure {
    pub(crate) err: Box<RegistryError>,
    pub(crate) retryable: bool,
    pub(crate) retry_after: Option<Duration>,
}

impl Failure {
    pub(crate) fn fatal(err: RegistryError) -> Failure {
        Failure {
            err: Box::new(err),
            retryable: false,
            retry_after: None,
        }
    }
    pub(crate) fn retry(err: RegistryError) -> Failure {
        Failure {
            err: Box::new(err),
            retryable: true,
            retry_after: None,
        }
    }
}

/// Formats an error with its chain of causes.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// One request, as the retry loop re-sends it.
pub(crate) struct Call<'a> {
    pub(crate) method: Method,
    pub(crate) url: Url,
    pub(crate) headers: Vec<(HeaderName, String)>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) scope: &'a [String],
    pub(crate) what: &'a str,
    pub(crate) timeout: Option<Duration>,
}

impl<'a> Call<'a> {
    pub(crate) fn new(method: Method, url: Url, scope: &'a [String], what: &'a str) -> Self {
        Call {
            method,
            url,
            headers: Vec::new(),
            body: None,
            scope,
            what,
            timeout: None,
        }
    }

    pub(crate) fn header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

struct Inner {
    registry: String,
    repository: String,
    origin: Endpoint,
    mirrors: Vec<Endpoint>,
    retry: RetryConfig,
    read_timeout: Duration,
    upload_chunk_size: u64,
    monolithic_upload_limit: u64,
    counters: Counters,
    pull_scope: Vec<String>,
    push_scope: Vec<String>,
}

/// A client for one repository of one registry. Cheap to clone (shared
/// connection pool, token cache and counters).
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("registry", &self.inner.registry)
            .field("repository", &self.inner.repository)
            .field("origin", &self.inner.origin)
            .field("mirrors", &self.inner.mirrors)
            .finish_non_exhaustive()
    }
}

/// The API root for `spec` (`host[:port]` or a URL): HTTPS unless the
/// URL names a scheme, `/v2/` appended. Returns also the plain-HTTP
/// fallback when `insecure` and no scheme was named (Docker's rule: try
/// HTTPS, then HTTP).
fn base_url(spec: &str, insecure: bool, what: &str) -> Result<(Url, Option<Url>), RegistryError> {
    let bad = |e: String| RegistryError::Config(format!("{what} {e}"));
    if spec.contains("://") {
        return Ok((hosts::api_root(spec, false).map_err(bad)?, None));
    }
    let https = hosts::api_root(&format!("https://{spec}"), false).map_err(bad)?;
    let http = insecure
        .then(|| hosts::api_root(&format!("http://{spec}"), false))
        .transpose()
        .map_err(bad)?;
    Ok((https, http))
}

fn authority(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

pub(crate) fn build_http(config: &RegistryConfig) -> Result<Client, RegistryError> {
    build_http_for(config, None)
}

/// The HTTP client for `config`, with the TLS settings and dial timeout of
/// a `hosts.toml` entry when given.
fn build_http_for(
    config: &RegistryConfig,
    host: Option<(&HostEntry, &str)>,
) -> Result<Client, RegistryError> {
    let connect_timeout = host
        .and_then(|(h, _)| h.dial_timeout)
        .unwrap_or_else(|| config.connect_timeout());
    let mut b = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(config.read_timeout())
        .pool_max_idle_per_host(config.max_idle_connections_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .http1_only()
        .tcp_nodelay(true)
        .use_rustls_tls()
        .user_agent(concat!("skiff/", env!("CARGO_PKG_VERSION")));
    // The system's CAs (read once per process: `roots`), beside the
    // Mozilla roots built into reqwest.
    for c in crate::roots::system() {
        b = b.add_root_certificate(c.clone());
    }
    if let Some(p) = &config.proxy {
        let proxy = reqwest::Proxy::all(p)
            .map_err(|e| {
                RegistryError::Config(format!(
                    "proxy '{}': {}",
                    crate::config::redact_url(p),
                    e.without_url()
                ))
            })?
            .no_proxy(reqwest::NoProxy::from_env());
        b = b.proxy(proxy);
    } else if !config.use_env_proxy {
        b = b.no_proxy();
    }
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca).map_err(|e| RegistryError::io(ca, e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::Config(format!("ca_file {}: {}", ca.display(), chain(&e)))
        })?;
        if certs.is_empty() {
            return Err(RegistryError::Config(format!(
                "ca_file {}: no PEM certificate in it",
                ca.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some((h, name)) = host {
        b = host_tls(b, h, name)?;
    }
    b.build()
        .map_err(|e| RegistryError::Config(format!("HTTP client: {}", chain(&e))))
}

/// The TLS settings of a `hosts.toml` entry (`ca`, `client`,
/// `skip_verify`) on a client builder; `name` names the host in errors.
fn host_tls(
    mut b: reqwest::blocking::ClientBuilder,
    h: &HostEntry,
    name: &str,
) -> Result<reqwest::blocking::ClientBuilder, RegistryError> {
    for ca in &h.ca {
        let pem = std::fs::read(ca).map_err(|e| RegistryError::io(ca, e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::Config(format!("{name}: ca {}: {}", ca.display(), chain(&e)))
        })?;
        if certs.is_empty() {
            return Err(RegistryError::Config(format!(
                "{name}: ca {}: no PEM certificate in it",
                ca.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some((cert, key)) = h.client.first() {
        if h.client.len() > 1 {
            tracing::warn!(
                "{name}: {} client certificates configured; Skiff presents the first, {}",
                h.client.len(),
                cert.display()
            );
        }
        let mut pem = std::fs::read(cert).map_err(|e| RegistryError::io(cert, e))?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(std::fs::read(key).map_err(|e| RegistryError::io(key, e))?);
        }
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "{name}: client {}: not a PEM certificate and key: {}",
                cert.display(),
                chain(&e)
            ))
        })?;
        b = b.identity(id);
    }
    if h.skip_verify == Some(true) {
        b = b.danger_accept_invalid_certs(true);
    }
    Ok(b)
}

/// `Retry-After`: delta seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The registry's error message from a JSON error body (`: CODE: message`),
/// or the start of a text body.
pub(crate) fn error_detail(resp: Response) -> String {
    let mut body = Vec::new();
    let _ = resp.take(MAX_ERROR_BODY).read_to_end(&mut body);
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        if let Some(errs) = v.get("errors").and_then(Value::as_array) {
            let parts: Vec<String> = errs
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(Value::as_str).unwrap_or("");
                    let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
                    format!("{code}: {msg}")
                })
                .collect();
            if !parts.is_empty() {
                return format!(": {}", parts.join("; "));
            }
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text: String = text.trim().chars().take(200).collect();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Whether a failed request failed on the server's TLS certificate.
fn is_certificate_error(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    d.contains("certificate") && !d.contains("timed out")
}

/// Whether a status is worth retrying.
fn retryable_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS
        || s == StatusCode::REQUEST_TIMEOUT
        || (s.is_server_error()
            && s != StatusCode::NOT_IMPLEMENTED
            && s != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
}

impl RegistryClient {
    /// A client for the repository of `r`, configured by `config`
    /// (credentials looked up for the registry and each mirror).
    pub fn new(r: &DockerRef, config: &RegistryConfig) -> Result<RegistryClient, RegistryError> {
        let http = build_http(config)?;
        let registry = r.registry.clone();
        let hosts_config = match &config.hosts_dir {
            Some(dir) => hosts::load(dir, &registry)?,
            None => None,
        };
        let mut mirrors: Vec<Endpoint> = config
            .mirrors
            .get(&registry)
            .map(|ms| {
                ms.iter()
                    .map(|m| mirror_endpoint(m, config, &http, &registry))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let server = match &hosts_config {
            Some(hc) => {
                tracing::debug!("registry {registry}: hosts from {}", hc.source.display());
                let (server, others) = hc.hosts.split_last().ok_or_else(|| {
                    RegistryError::Config(format!("{}: no hosts", hc.source.display()))
                })?;
                for h in others {
                    mirrors.push(host_endpoint(h, config, &http, &registry, &hc.source)?);
                }
                Some((server, hc.source.as_path()))
            }
            None => None,
        };
        let origin = match server {
            Some((h, source)) if h.api_root.is_some() => {
                let mut ep = host_endpoint(h, config, &http, &registry, source)?;
                ep.is_mirror = false;
                ep
            }
            _ => {
                let connect = r.connect_host().to_owned();
                let origin_creds = credentials::lookup(config, &registry)?;
                let (base, http_base) = base_url(
                    &connect,
                    config.is_insecure(&registry) || config.is_insecure(&connect),
                    "registry",
                )?;
                let (ep_http, headers) = match server {
                    Some((h, source)) => (
                        host_http(h, config, &http, &registry, source)?,
                        host_headers(h, &registry)?,
                    ),
                    None => (http.clone(), HeaderMap::new()),
                };
                let ns = ns_for(&base, &registry);
                Endpoint {
                    name: registry.clone(),
                    base,
                    http_base,
                    use_http: AtomicBool::new(false),
                    headers,
                    auth: AuthState::new(registry.clone(), origin_creds),
                    is_mirror: false,
                    http: ep_http,
                    ns,
                    caps: Capabilities::ALL,
                    down_until: Mutex::new(None),
                }
            }
        };
        let repo = &r.repository;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                registry,
                repository: repo.clone(),
                origin,
                mirrors,
                retry: config.retry.clone(),
                read_timeout: config.read_timeout(),
                upload_chunk_size: config.upload_chunk_size.clamp(1 << 20, 1 << 30),
                monolithic_upload_limit: config.monolithic_upload_limit,
                counters: Counters::default(),
                pull_scope: vec![format!("repository:{repo}:pull")],
                push_scope: vec![format!("repository:{repo}:pull,push")],
            }),
        })
    }

    /// Where pulls of this repository go, in order: each endpoint's API
    /// root and whether it may pull and resolve (for `skiff inspect`-style
    /// diagnostics and tests).
    pub fn endpoints(&self) -> Vec<(String, bool, bool)> {
        self.inner
            .mirrors
            .iter()
            .chain(std::iter::once(&self.inner.origin))
            .map(|e| {
                let mut u = e.base().clone();
                if let Some(ns) = &e.ns {
                    u.query_pairs_mut().append_pair("ns", ns);
                }
                (u.to_string(), e.caps.pull, e.caps.resolve)
            })
            .collect()
    }

    /// The registry (`host[:port]`, as in the reference).
    pub fn registry(&self) -> &str {
        &self.inner.registry
    }

    /// The repository.
    pub fn repository(&self) -> &str {
        &self.inner.repository
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FetchStats {
        self.inner.counters.snapshot()
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub(crate) fn pull_scope(&self) -> &[String] {
        &self.inner.pull_scope
    }

    pub(crate) fn push_scope(&self) -> &[String] {
        &self.inner.push_scope
    }

    pub(crate) fn upload_chunk_size(&self) -> u64 {
        self.inner.upload_chunk_size
    }

    pub(crate) fn monolithic_upload_limit(&self) -> u64 {
        self.inner.monolithic_upload_limit
    }

    pub(crate) fn read_timeout(&self) -> Duration {
        self.inner.read_timeout
    }

    pub(crate) fn max_attempts(&self) -> u32 {
        self.inner.retry.max_attempts.max(1)
    }

    pub(crate) fn origin(&self) -> &Endpoint {
        &self.inner.origin
    }

    /// `…/v2/REPO/SUFFIX` on `ep`, with `?ns=REGISTRY` when `ep` is not the
    /// registry itself.
    pub(crate) fn url(&self, ep: &Endpoint, suffix: &str) -> Result<Url, RegistryError> {
        let rel = format!("{}/{suffix}", self.inner.repository);
        let mut url = ep
            .base()
            .join(&rel)
            .map_err(|e| RegistryError::Invalid(format!("{}: bad URL for {rel}: {e}", ep.name)))?;
        if let Some(ns) = &ep.ns {
            url.query_pairs_mut().append_pair("ns", ns);
        }
        Ok(url)
    }

    /// Resolves an upload `Location` (relative or absolute) against `ep`.
    pub(crate) fn resolve(&self, ep: &Endpoint, location: &str) -> Result<Url, RegistryError> {
        ep.base().join(location).map_err(|e| RegistryError::Http {
            registry: self.inner.registry.clone(),
            repository: self.inner.repository.clone(),
            what: format!("bad Location '{location}'"),
            status: 0,
            detail: format!(": {e}"),
        })
    }

    /// An HTTP error for this repository.
    pub(crate) fn http_error(
        &self,
        what: &str,
        status: StatusCode,
        detail: String,
    ) -> RegistryError {
        RegistryError::Http {
            registry: self.inner.registry.clone(),
            repository: self.inner.repository.clone(),
            what: what.to_owned(),
            status: status.as_u16(),
            detail,
        }
    }

    /// One attempt: auth, one re-send after a 401, redirects. Retryable
    /// statuses come back as a retryable failure; every other response is
    /// returned for the caller to judge.
    pub(crate) fn send_once(&self, ep: &Endpoint, call: &Call<'_>) -> Result<Response, Failure> {
        let inner = &self.inner;
        let follow = call.method == Method::GET || call.method == Method::HEAD;
        let mut url = call.url.clone();
        let mut trusted = true;
        // One re-send after a 401 to an anonymous request (to learn the
        // challenge) and one after a 401 to an authenticated one (stale token).
        let mut anon_retried = false;
        let mut authed_retried = false;
        let mut redirects = 0;
        loop {
            let mut rb = ep.http.request(call.method.clone(), url.clone());
            if let Some(t) = call.timeout {
                rb = rb.timeout(t);
            }
            for (k, v) in &call.headers {
                rb = rb.header(k.clone(), v.as_str());
            }
            let mut sent_auth = false;
            if trusted {
                for (k, v) in &ep.headers {
                    rb = rb.header(k.clone(), v.clone());
                }
                if let AuthHeader::Value(v) = ep
                    .auth
                    .header(&ep.http, call.scope, &inner.counters)
                    .map_err(Failure::fatal)?
                {
                    let mut hv = HeaderValue::from_str(&v).map_err(|_| {
                        Failure::fatal(RegistryError::Auth {
                            registry: ep.name.clone(),
                            detail: "the credentials or token contain characters not allowed in an HTTP header".to_owned(),
                        })
                    })?;
                    hv.set_sensitive(true);
                    rb = rb.header(AUTHORIZATION, hv);
                    sent_auth = true;
                }
            }
            if let Some(b) = &call.body {
                rb = rb.body(b.clone());
            }
            inner.counters.request();
            let resp = match rb.send() {
                Ok(r) => r,
                Err(e) => {
                    let detail = chain(&e);
                    if self.downgrade(ep, &url, &e, &detail) {
                        let _ = url.set_scheme("http");
                        continue;
                    }
                    let kind = if e.is_timeout() {
                        "timed out"
                    } else {
                        "failed"
                    };
                    // A certificate the client does not trust stays
                    // untrusted: retrying only delays the error.
                    let retry = if is_certificate_error(&detail) {
                        Failure::fatal
                    } else {
                        Failure::retry
                    };
                    return Err(retry(RegistryError::Network {
                        registry: ep.name.clone(),
                        what: call.what.to_owned(),
                        attempts: 1,
                        detail: format!(
                            "request to {} {kind}: {}",
                            url_no_query(&url),
                            chain(&e.without_url())
                        ),
                    }));
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && trusted {
                let retried = if sent_auth {
                    &mut authed_retried
                } else {
                    &mut anon_retried
                };
                if *retried {
                    return Err(Failure::fatal(ep.auth.refused(call.what)));
                }
                *retried = true;
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned);
                let again = ep
                    .auth
                    .on_unauthorized(challenge.as_deref(), call.scope, sent_auth)
                    .map_err(Failure::fatal)?;
                if !again {
                    return Err(Failure::fatal(ep.auth.refused(call.what)));
                }
                continue;
            }
            if follow && matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                redirects += 1;
                let bad = |m: String| {
                    Failure::fatal(self.http_error(call.what, status, format!(": {m}")))
                };
                if redirects > MAX_REDIRECTS {
                    return Err(bad(format!("more than {MAX_REDIRECTS} redirects")));
                }
                let loc = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| bad("redirect without a Location".to_owned()))?;
                let next = url
                    .join(loc)
                    .map_err(|e| bad(format!("bad redirect Location: {e}")))?;
                if next.scheme() != "http" && next.scheme() != "https" {
                    return Err(bad(format!("redirect to a {} URL", next.scheme())));
                }
                if url.scheme() == "https"
                    && next.scheme() == "http"
                    && !is_loopback(&authority(&next))
                {
                    return Err(bad(format!(
                        "refusing a redirect from HTTPS to plain HTTP ({})",
                        url_no_query(&next)
                    )));
                }
                // Credentials and extra headers go to the endpoint's own origin only.
                trusted = trusted && same_origin(&next, ep.base());
                tracing::debug!(
                    "{}: {} redirected to {} (credentials {})",
                    ep.name,
                    call.what,
                    url_no_query(&next),
                    if trusted { "kept" } else { "dropped" }
                );
                url = next;
                continue;
            }
            if retryable_status(status) {
                let after = retry_after(resp.headers());
                let detail = error_detail(resp);
                return Err(Failure {
                    err: Box::new(self.http_error(call.what, status, detail)),
                    retryable: true,
                    retry_after: after,
                });
            }
            return Ok(resp);
        }
    }

    /// After a failed HTTPS request to an endpoint that may use plain HTTP:
    /// whether it failed because the server does not speak TLS (then the
    /// endpoint switches to HTTP for good), as Docker does. Refused
    /// connections, DNS and certificate errors do not switch; a TLS handshake
    /// that times out (a server waiting for an HTTP request line) does.
    fn downgrade(&self, ep: &Endpoint, url: &Url, e: &reqwest::Error, detail: &str) -> bool {
        if ep.http_base.is_none()
            || url.scheme() != "https"
            || !e.is_connect()
            || !same_origin(url, &ep.base)
        {
            return false;
        }
        let d = detail.to_ascii_lowercase();
        let not_tls = !["refused", "dns", "certificate", "unreachable"]
            .iter()
            .any(|w| d.contains(w));
        if not_tls {
            ep.use_http.store(true, Ordering::Relaxed);
            tracing::info!(
                "{}: no TLS on {}; using plain HTTP (the registry is insecure or loopback)",
                ep.name,
                url_no_query(&ep.base)
            );
        }
        not_tls
    }

    /// Runs `op` until it succeeds, fails for good, or the retry budget of
    /// the client (at most `max_attempts`) is spent.
    pub(crate) fn retrying<T>(
        &self,
        ep: &Endpoint,
        what: &str,
        max_attempts: u32,
        op: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        self.retrying_until(ep, what, max_attempts, None, op)
    }

    /// [`retrying`](Self::retrying), also giving up at `until` when it
    /// comes before the client's own deadline: a caller that has promised
    /// an answer by then (a FUSE read) must not wait for the full budget.
    /// `op` bounds each attempt itself (see [`attempt_timeout`](Self::attempt_timeout)).
    pub(crate) fn retrying_until<T>(
        &self,
        ep: &Endpoint,
        what: &str,
        max_attempts: u32,
        until: Option<Instant>,
        mut op: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        let policy = &self.inner.retry;
        let max = max_attempts.clamp(1, policy.max_attempts.max(1));
        let own = Instant::now() + Duration::from_millis(policy.deadline_ms);
        let deadline = until.map_or(own, |u| u.min(own));
        let mut attempt = 1;
        loop {
            let f = match op() {
                Ok(v) => return Ok(v),
                Err(f) => f,
            };
            if !f.retryable {
                return Err(*f.err);
            }
            let give_up = |why: String| -> RegistryError {
                let detail = match &*f.err {
                    RegistryError::Network { detail, .. } => detail.clone(),
                    other => other.to_string(),
                };
                RegistryError::Network {
                    registry: ep.name.clone(),
                    what: what.to_owned(),
                    attempts: attempt,
                    detail: format!("{detail}{why}"),
                }
            };
            if attempt >= max {
                return Err(give_up(String::new()));
            }
            let exp = policy
                .initial_backoff_ms
                .saturating_mul(1u64 << (attempt - 1).min(20))
                .min(policy.max_backoff_ms);
            let jittered = rand::thread_rng().gen_range(exp / 2..=exp.max(1));
            let wait = match f.retry_after {
                Some(ra) => ra.max(Duration::from_millis(jittered / 4)),
                None => Duration::from_millis(jittered),
            };
            if Instant::now() + wait > deadline {
                return Err(give_up(format!(
                    " (the deadline, {} ms from now, does not allow waiting {} ms more)",
                    deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis(),
                    wait.as_millis()
                )));
            }
            tracing::debug!(
                "{}: {what}: attempt {attempt} failed, retrying in {} ms: {}",
                ep.name,
                wait.as_millis(),
                f.err
            );
            self.inner.counters.retry();
            std::thread::sleep(wait);
            attempt += 1;
        }
    }

    /// Runs `op` against each mirror that may pull, in order (two
    /// attempts each), then against the registry; the first success wins.
    /// Errors from mirrors are logged; the registry's error is returned.
    pub(crate) fn pull<T>(
        &self,
        what: &str,
        mut op: impl FnMut(&Endpoint) -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        self.pull_until(what, None, |ep, _| op(ep))
    }

    /// Runs `op` against each mirror that may resolve tags, then the
    /// registry (see [`pull`](Self::pull)).
    pub(crate) fn resolve_tag<T>(
        &self,
        what: &str,
        mut op: impl FnMut(&Endpoint) -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        self.sources(what, None, |c| c.resolve, |ep, _| op(ep))
    }

    /// [`pull`](Self::pull), every source within one deadline `until`:
    /// `op` gets the deadline of its attempt (mirrors get at most half of
    /// the time left, so that the registry keeps the other half).
    pub(crate) fn pull_until<T>(
        &self,
        what: &str,
        until: Option<Instant>,
        op: impl FnMut(&Endpoint, Option<Instant>) -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        self.sources(what, until, |c| c.pull, op)
    }

    fn sources<T>(
        &self,
        what: &str,
        until: Option<Instant>,
        may: impl Fn(&Capabilities) -> bool,
        mut op: impl FnMut(&Endpoint, Option<Instant>) -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        for m in self.inner.mirrors.iter().filter(|m| may(&m.caps)) {
            if m.is_down() {
                continue;
            }
            let share = until.map(|u| {
                let now = Instant::now();
                now + u.saturating_duration_since(now) / 2
            });
            match self.retrying_until(m, what, MIRROR_ATTEMPTS, share, || op(m, share)) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    // A network failure marks the mirror down; running out
                    // of the caller's time before an attempt (attempts 0)
                    // says nothing about the mirror.
                    if matches!(e, RegistryError::Network { attempts, .. } if attempts > 0) {
                        m.mark_down();
                        tracing::warn!(
                            "{e}; trying the next source (this one is skipped for {} s)",
                            MIRROR_COOLDOWN.as_secs()
                        );
                    } else {
                        tracing::warn!("{}: {e}; trying the next source", m.name);
                    }
                }
            }
        }
        let origin = &self.inner.origin;
        self.retrying_until(origin, what, u32::MAX, until, || op(origin, until))
    }

    /// The timeout of one attempt that must end by `until`: the client's
    /// read timeout, or less when the deadline is nearer. `None` when the
    /// deadline has passed (the attempt is not worth making).
    pub(crate) fn attempt_timeout(&self, until: Option<Instant>) -> Option<Duration> {
        let read = self.inner.read_timeout;
        match until {
            None => Some(read),
            Some(u) => {
                let left = u.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| left.min(read))
            }
        }
    }

    /// Counts a final error.
    pub(crate) fn count<T>(&self, r: Result<T, RegistryError>) -> Result<T, RegistryError> {
        if r.is_err() {
            self.inner.counters.error();
        }
        r
    }

    pub(crate) fn not_found(&self, what: &str, ep: &Endpoint) -> RegistryError {
        RegistryError::NotFound(format!(
            "registry {}, repository {}: {what}: not found (HTTP 404{})",
            self.inner.registry,
            self.inner.repository,
            if ep.is_mirror {
                format!(" from mirror {}", ep.name)
            } else {
                String::new()
            }
        ))
    }
}

/// `ns=REGISTRY` for an endpoint at `base` that is not the registry itself.
fn ns_for(base: &Url, registry: &str) -> Option<String> {
    hosts::is_proxy_for(&authority(base), registry).then(|| registry.to_owned())
}

fn mirror_endpoint(
    m: &Mirror,
    config: &RegistryConfig,
    http: &Client,
    registry: &str,
) -> Result<Endpoint, RegistryError> {
    let insecure_host = |spec: &str| m.insecure || config.is_insecure(spec);
    let (base, http_base) = base_url(&m.url, insecure_host(&m.url), "mirror")?;
    let host = authority(&base);
    let mut headers = HeaderMap::new();
    for (k, v) in &m.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
            RegistryError::Config(format!("mirror {}: invalid header name '{k}'", m.url))
        })?;
        let mut value = HeaderValue::from_str(v).map_err(|_| {
            RegistryError::Config(format!("mirror {}: invalid value for header '{k}'", m.url))
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let creds: Option<Credentials> = credentials::lookup(config, &host)?;
    let ns = ns_for(&base, registry);
    Ok(Endpoint {
        name: format!("mirror {}", url_no_query(&base)),
        base,
        http_base,
        use_http: AtomicBool::new(false),
        headers,
        auth: AuthState::new(host, creds),
        is_mirror: true,
        http: http.clone(),
        ns,
        // Skiff's own mirrors serve content by digest only.
        caps: Capabilities {
            pull: true,
            resolve: false,
            push: false,
        },
        down_until: Mutex::new(None),
    })
}

/// The HTTP client of a `hosts.toml` entry: the shared one, or its own
/// when it has TLS settings or a dial timeout.
fn host_http(
    h: &HostEntry,
    config: &RegistryConfig,
    shared: &Client,
    registry: &str,
    source: &std::path::Path,
) -> Result<Client, RegistryError> {
    if !h.has_tls_settings() && h.dial_timeout.is_none() {
        return Ok(shared.clone());
    }
    let name = match &h.api_root {
        Some(u) => format!("{} ({})", url_no_query(u), source.display()),
        None => format!("{registry} ({})", source.display()),
    };
    build_http_for(config, Some((h, &name)))
}

/// The extra headers of a `hosts.toml` entry (treated as secrets).
fn host_headers(h: &HostEntry, registry: &str) -> Result<HeaderMap, RegistryError> {
    let mut headers = HeaderMap::new();
    for (k, v) in &h.headers {
        let bad = |what: &str| {
            RegistryError::Config(format!(
                "hosts.toml of {registry}: {what} of header '{k}' is not valid in HTTP"
            ))
        };
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad("the name"))?;
        let mut value = HeaderValue::from_str(v).map_err(|_| bad("a value"))?;
        value.set_sensitive(true);
        headers.append(name, value);
    }
    Ok(headers)
}

/// An endpoint for a `hosts.toml` entry with an API root.
fn host_endpoint(
    h: &HostEntry,
    config: &RegistryConfig,
    shared: &Client,
    registry: &str,
    source: &std::path::Path,
) -> Result<Endpoint, RegistryError> {
    let base = h.api_root.clone().ok_or_else(|| {
        RegistryError::Config(format!("{}: a host without a URL", source.display()))
    })?;
    let host = authority(&base);
    // A host named without a scheme is HTTPS; a loopback or insecure one may
    // fall back to plain HTTP as the registry itself may.
    let http_base = (base.scheme() == "https" && config.is_insecure(&host))
        .then(|| {
            let mut u = base.clone();
            u.set_scheme("http").ok().map(|()| u)
        })
        .flatten();
    let creds: Option<Credentials> = credentials::lookup(config, &host)?;
    Ok(Endpoint {
        name: format!("host {}", url_no_query(&base)),
        ns: ns_for(&base, registry),
        http: host_http(h, config, shared, registry, source)?,
        headers: host_headers(h, registry)?,
        base,
        http_base,
        use_http: AtomicBool::new(false),
        auth: AuthState::new(host, creds),
        is_mirror: true,
        caps: h.capabilities,
        down_until: Mutex::new(None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() -> Result<(), RegistryError> {
        assert_eq!(
            base_url("r.io", false, "x")?,
            (
                Url::parse("https://r.io/v2/").map_err(|e| RegistryError::Config(e.to_string()))?,
                None
            )
        );
        let (https, http) = base_url("localhost:5000", true, "x")?;
        assert_eq!(https.as_str(), "https://localhost:5000/v2/");
        assert_eq!(
            http.map(String::from).as_deref(),
            Some("http://localhost:5000/v2/")
        );
        assert_eq!(
            base_url("https://m.io/prefix", false, "x")?.0.as_str(),
            "https://m.io/prefix/v2/"
        );
        assert!(base_url("http://m.io", true, "x")?.1.is_none());
        assert!(base_url("ftp://m.io", false, "x").is_err());
        assert!(base_url("https://u:p@m.io", false, "x").is_err());
        Ok(())
    }

    #[test]
    fn endpoints_in_order_with_ns_and_capabilities() -> Result<(), Box<dyn std::error::Error>> {
        let hosts = tempfile::tempdir()?;
        let dir = hosts.path().join("r.io_5000_");
        std::fs::create_dir(&dir)?;
        std::fs::write(
            dir.join("hosts.toml"),
            r#"server = "https://upstream.r.io"
[host."http://spegel:5000"]
  capabilities = ["pull", "resolve"]
[host."https://cache.lan/v2/r"]
  capabilities = ["pull"]
  override_path = true
  [host."https://cache.lan/v2/r".header]
    x-a = ["1", "2"]
"#,
        )?;
        let mut config = RegistryConfig {
            hosts_dir: Some(hosts.path().to_path_buf()),
            ..RegistryConfig::default()
        };
        config
            .mirrors
            .insert("r.io:5000".into(), vec![Mirror::new("https://own.mirror")]);
        let r: DockerRef = "r.io:5000/app:1".parse()?;
        let c = RegistryClient::new(&r, &config)?;
        assert_eq!(
            c.endpoints(),
            vec![
                // Skiff's own mirrors first (pull only), then hosts.toml's
                // hosts in file order, then its server; ns on each of them.
                (
                    "https://own.mirror/v2/?ns=r.io%3A5000".to_owned(),
                    true,
                    false
                ),
                (
                    "http://spegel:5000/v2/?ns=r.io%3A5000".to_owned(),
                    true,
                    true
                ),
                (
                    "https://cache.lan/v2/r/?ns=r.io%3A5000".to_owned(),
                    true,
                    false
                ),
                (
                    "https://upstream.r.io/v2/?ns=r.io%3A5000".to_owned(),
                    true,
                    true
                ),
            ]
        );
        assert_eq!(
            c.url(&c.inner.mirrors[2], "blobs/sha256:ab")?.as_str(),
            "https://cache.lan/v2/r/app/blobs/sha256:ab?ns=r.io%3A5000"
        );
        assert_eq!(c.inner.mirrors[2].headers.get_all("x-a").iter().count(), 2);

        // No hosts.toml for this registry (and no _default): the registry
        // itself, no ns. Docker Hub's host is docker.io's own.
        let other: DockerRef = "other.io/app:1".parse()?;
        let c = RegistryClient::new(&other, &config)?;
        assert_eq!(
            c.endpoints(),
            vec![("https://other.io/v2/".to_owned(), true, true)]
        );
        let hub: DockerRef = "busybox".parse()?;
        assert_eq!(
            RegistryClient::new(&hub, &config)?.endpoints(),
            vec![("https://registry-1.docker.io/v2/".to_owned(), true, true)]
        );
        // A broken hosts.toml fails the client with the file's name.
        std::fs::write(
            dir.join("hosts.toml"),
            "[host.\"m\"]\ncapabilities = [\"fly\"]\n",
        )?;
        let e = RegistryClient::new(&r, &config)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("hosts.toml") && e.contains("fly")),
            "{e:?}"
        );
        Ok(())
    }

    #[test]
    fn retry_after_header() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }
}
