//! How Skiff talks to registries: [`RegistryConfig`].
//!
//! Every field has a default, so an empty file (or no file) is a valid
//! configuration: TLS verified against the system and webpki roots, plain
//! HTTP only for loopback registries, proxies from `HTTPS_PROXY` /
//! `HTTP_PROXY` / `NO_PROXY`, credentials from the Docker config file.
//!
//! A configuration file is TOML (`*.toml`) or JSON (`*.json`; any other name
//! is tried as TOML, then JSON). Example (TOML):
//!
//! ```toml
//! insecure_registries = ["registry.lan:5000"]
//! ca_file = "/etc/skiff/corp-ca.pem"
//! proxy = "http://proxy.corp:3128"
//! connect_timeout_ms = 10000
//! read_timeout_ms = 30000
//! hosts_dir = "/etc/containerd/certs.d"   # containerd's hosts.toml files
//!
//! [retry]
//! max_attempts = 5
//! initial_backoff_ms = 200
//! max_backoff_ms = 10000
//! deadline_ms = 120000
//!
//! [auths."registry.lan:5000"]
//! username = "ci"
//! password = "secret"
//!
//! [[mirrors."docker.io"]]
//! url = "https://mirror.corp"
//! headers = { "X-Mirror-Token" = "abc" }
//!
//! [[mirrors."docker.io"]]
//! url = "cache.lan:5000"
//! insecure = true
//! ```
//!
//! [`RegistryConfig::from_env`] is what the library uses when the caller
//! passes no configuration: the file named by `SKIFF_REGISTRY_CONFIG`, if
//! set, with `hosts_dir` from `SKIFF_REGISTRY_HOSTS_DIR` when that is set,
//! plus credentials from `SKIFF_REGISTRY_USERNAME` /
//! `SKIFF_REGISTRY_PASSWORD` (for every registry, or only for the one named
//! by `SKIFF_REGISTRY_HOST` when that is set).
//!
//! Secrets (passwords, mirror header values, proxy credentials) never appear
//! in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RegistryError;

/// Environment variable naming a configuration file.
pub const ENV_CONFIG: &str = "SKIFF_REGISTRY_CONFIG";
/// Environment variable with a registry user name.
pub const ENV_USERNAME: &str = "SKIFF_REGISTRY_USERNAME";
/// Environment variable with a registry password (or token).
pub const ENV_PASSWORD: &str = "SKIFF_REGISTRY_PASSWORD";
/// Environment variable restricting the env credentials to one registry.
pub const ENV_HOST: &str = "SKIFF_REGISTRY_HOST";
/// Environment variable naming containerd's registry host directory (its
/// `config_path`); overrides `hosts_dir` of the file, empty for none.
pub const ENV_HOSTS_DIR: &str = "SKIFF_REGISTRY_HOSTS_DIR";

/// A user name and password (or, with user name `<token>`, an identity token
/// used as an OAuth2 refresh token). `Debug` shows the user name only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl Credentials {
    /// Credentials from a user name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// Whether the password is an identity token (Docker's `<token>` user).
    pub fn is_identity_token(&self) -> bool {
        self.username == "<token>" || self.username.is_empty()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A pull-through mirror of a registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// `host[:port]`, or a URL `http(s)://host[:port][/prefix]`. Without a
    /// scheme, HTTPS is used unless `insecure` is set or the host is a
    /// loopback address.
    pub url: String,
    /// Whether plain HTTP may be used (when `url` has no scheme).
    #[serde(default)]
    pub insecure: bool,
    /// Extra headers sent with every request to this mirror (values are
    /// treated as secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

impl Mirror {
    /// A mirror at `url` with no extra headers.
    pub fn new(url: impl Into<String>) -> Mirror {
        Mirror {
            url: url.into(),
            insecure: false,
            headers: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<&String> = self.headers.keys().collect();
        f.debug_struct("Mirror")
            .field("url", &self.url)
            .field("insecure", &self.insecure)
            .field("headers (values redacted)", &headers)
            .finish()
    }
}

/// How failed requests are retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubled each time, with jitter.
    pub initial_backoff_ms: u64,
    /// Largest backoff between two attempts.
    pub max_backoff_ms: u64,
    /// Overall time budget of one operation, retries included.
    pub deadline_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
            deadline_ms: 120_000,
        }
    }
}

/// Everything about talking to registries. See the [module docs](self).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) that may be reached over plain HTTP.
    /// Loopback registries (`localhost`, 127.0.0.0/8, `::1`) always may.
    pub insecure_registries: Vec<String>,
    /// Pull-through mirrors per registry (`docker.io`, `host[:port]`), tried
    /// in order before the registry itself for manifests by digest and
    /// blobs (and before the hosts of `hosts_dir`).
    pub mirrors: BTreeMap<String, Vec<Mirror>>,
    /// containerd's registry host directory (its `config_path`, e.g.
    /// `/etc/containerd/certs.d`): a `hosts.toml` per registry with mirrors,
    /// capabilities, CAs, client certificates and headers, read for each
    /// client (see [`hosts`](crate::hosts)).
    pub hosts_dir: Option<PathBuf>,
    /// An HTTP(S) proxy URL for all requests (`NO_PROXY` still applies).
    /// Without it, `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` / `NO_PROXY`
    /// are honoured unless `use_env_proxy` is false.
    pub proxy: Option<String>,
    /// Whether the proxy environment variables are honoured.
    pub use_env_proxy: bool,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Credentials per registry (`host[:port]`, `docker.io`); they take
    /// precedence over the Docker config file.
    pub auths: BTreeMap<String, Credentials>,
    /// Credentials for every registry that has none of its own (what
    /// `SKIFF_REGISTRY_USERNAME` / `SKIFF_REGISTRY_PASSWORD` set).
    pub default_credentials: Option<Credentials>,
    /// Whether to read the Docker config file (`$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`) and its credential helpers.
    pub use_docker_config: bool,
    /// A Docker config file to read instead of the default one.
    pub docker_config: Option<PathBuf>,
    /// Timeout for establishing a connection.
    pub connect_timeout_ms: u64,
    /// Timeout for a response to start and for each read of its body.
    pub read_timeout_ms: u64,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Size of the PATCH chunks of an upload.
    pub upload_chunk_size: u64,
    /// Blobs smaller than this are uploaded with one PUT.
    pub monolithic_upload_limit: u64,
    /// Idle keep-alive connections kept per host.
    pub max_idle_connections_per_host: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure_registries: Vec::new(),
            mirrors: BTreeMap::new(),
            hosts_dir: None,
            proxy: None,
            use_env_proxy: true,
            ca_file: None,
            auths: BTreeMap::new(),
            default_credentials: None,
            use_docker_config: true,
            docker_config: None,
            connect_timeout_ms: 10_000,
            read_timeout_ms: 30_000,
            retry: RetryConfig::default(),
            upload_chunk_size: 16 << 20,
            monolithic_upload_limit: 4 << 20,
            max_idle_connections_per_host: 32,
        }
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("insecure_registries", &self.insecure_registries)
            .field("mirrors", &self.mirrors)
            .field("hosts_dir", &self.hosts_dir)
            .field("proxy", &self.proxy.as_deref().map(redact_url))
            .field("use_env_proxy", &self.use_env_proxy)
            .field("ca_file", &self.ca_file)
            .field("auths", &self.auths)
            .field("default_credentials", &self.default_credentials)
            .field("use_docker_config", &self.use_docker_config)
            .field("docker_config", &self.docker_config)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("read_timeout_ms", &self.read_timeout_ms)
            .field("retry", &self.retry)
            .field("upload_chunk_size", &self.upload_chunk_size)
            .field("monolithic_upload_limit", &self.monolithic_upload_limit)
            .field(
                "max_idle_connections_per_host",
                &self.max_idle_connections_per_host,
            )
            .finish()
    }
}

/// `scheme://user:pass@host` becomes `scheme://<redacted>@host`.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

impl RegistryConfig {
    /// Reads a configuration file: TOML for `*.toml`, JSON for `*.json`,
    /// else TOML then JSON.
    pub fn load(path: impl AsRef<Path>) -> Result<RegistryConfig, RegistryError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| RegistryError::io(path, e))?;
        let bad = |e: String| RegistryError::Config(format!("{}: {e}", path.display()));
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json(&text).map_err(bad),
            Some("toml") => Self::from_toml(&text).map_err(bad),
            _ => Self::from_toml(&text)
                .or_else(|t| Self::from_json(&text).map_err(|j| format!("{t}; as JSON: {j}")))
                .map_err(bad),
        }
    }

    fn from_toml(text: &str) -> Result<RegistryConfig, String> {
        toml::from_str(text).map_err(|e| format!("not a valid TOML configuration: {e}"))
    }

    fn from_json(text: &str) -> Result<RegistryConfig, String> {
        serde_json::from_str(text).map_err(|e| format!("not a valid JSON configuration: {e}"))
    }

    /// The configuration the library uses by default: the file named by
    /// `SKIFF_REGISTRY_CONFIG` (or the defaults), plus credentials from
    /// `SKIFF_REGISTRY_USERNAME` / `SKIFF_REGISTRY_PASSWORD`, which apply to
    /// the registry named by `SKIFF_REGISTRY_HOST` or, if that is unset, to
    /// every registry without credentials of its own.
    pub fn from_env() -> Result<RegistryConfig, RegistryError> {
        let mut config = match std::env::var_os(ENV_CONFIG) {
            Some(p) if !p.is_empty() => RegistryConfig::load(PathBuf::from(p))?,
            _ => RegistryConfig::default(),
        };
        if let Some(dir) = std::env::var_os(ENV_HOSTS_DIR) {
            config.hosts_dir = (!dir.is_empty()).then(|| PathBuf::from(dir));
        }
        let user = std::env::var(ENV_USERNAME).ok().filter(|s| !s.is_empty());
        let password = std::env::var(ENV_PASSWORD).ok();
        if let (Some(username), Some(password)) = (user, password) {
            let creds = Credentials { username, password };
            match std::env::var(ENV_HOST).ok().filter(|s| !s.is_empty()) {
                Some(host) => {
                    config.auths.insert(host, creds);
                }
                None => config.default_credentials = Some(creds),
            }
        }
        Ok(config)
    }

    /// Whether `registry` (`host[:port]`) may be reached over plain HTTP:
    /// listed in `insecure_registries`, or a loopback address.
    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure_registries
            .iter()
            .any(|r| r.eq_ignore_ascii_case(registry))
            || is_loopback(registry)
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms.max(1))
    }
}

/// Whether `host[:port]` names a loopback host: `localhost`, 127.0.0.0/8 or
/// `::1` (bracketed or not).
pub fn is_loopback(host_port: &str) -> bool {
    let host = split_host(host_port);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host[:port]` (brackets of an IPv6 literal removed).
pub(crate) fn split_host(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host_port.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((h, _)) if !h.contains(':') => h,
        _ => host_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "example.com",
            "10.0.0.1:5000",
            "[::2]:1",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut c = RegistryConfig::default();
        c.auths
            .insert("r.io".into(), Credentials::new("bob", "hunter2"));
        c.proxy = Some("http://user:pw123@proxy:3128".into());
        let mut m = Mirror::new("https://m");
        m.headers.insert("X-Token".into(), "tok-secret".into());
        c.mirrors.insert("docker.io".into(), vec![m]);
        let s = format!("{c:?}");
        assert!(s.contains("bob"));
        for secret in ["hunter2", "pw123", "tok-secret"] {
            assert!(!s.contains(secret), "{secret} in {s}");
        }
    }

    #[test]
    fn toml_and_json() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let t = dir.path().join("c.toml");
        std::fs::write(
            &t,
            r#"
insecure_registries = ["r.lan:5000"]
[retry]
max_attempts = 2
[auths."r.lan:5000"]
username = "u"
password = "p"
[[mirrors."docker.io"]]
url = "http://m:5000"
headers = { "X-A" = "b" }
"#,
        )?;
        let c = RegistryConfig::load(&t)?;
        assert_eq!(c.retry.max_attempts, 2);
        assert_eq!(c.retry.max_backoff_ms, 10_000);
        assert!(c.is_insecure("r.lan:5000"));
        assert_eq!(c.mirrors["docker.io"][0].headers["X-A"], "b");
        let j = dir.path().join("c.json");
        std::fs::write(&j, serde_json::to_vec(&c)?)?;
        assert_eq!(RegistryConfig::load(&j)?, c);
        std::fs::write(&t, "bogus_field = 1")?;
        assert!(RegistryConfig::load(&t).is_err());
        Ok(())
    }
}
