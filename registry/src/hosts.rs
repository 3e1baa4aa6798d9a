//! containerd's registry host configuration: a directory (containerd's
//! `config_path`, `ctr --hosts-dir`, by default `/etc/containerd/certs.d`)
//! with a `hosts.toml` per registry host namespace, read so that an
//! operator configures mirrors, CAs and plain-HTTP registries once for
//! containerd and for Skiff.
//!
//! # Finding the file
//!
//! For a registry `host:port` the directories `host_port_`, `host:port`
//! and `_default` are tried in that order ([`host_dir`]); the first that
//! exists is used. In it, `hosts.toml` if present and not empty, otherwise
//! Docker's certificate layout (`*.crt` are CA files, `*.cert` with the
//! `*.key` of the same name are client pairs), as containerd does.
//!
//! # What a file says
//!
//! ```toml
//! server = "https://registry.example.com"    # default: the registry itself
//! [host."https://mirror.example.com"]
//!   capabilities = ["pull", "resolve"]        # default: pull, resolve, push
//!   ca = "mirror-ca.pem"                      # or a list; relative to the file
//!   client = [["client.cert", "client.key"]]  # a path, a list of paths, or pairs
//!   skip_verify = false
//!   override_path = false                     # true: the URL path is the API root
//!   dial_timeout = "1s"
//!   [host."https://mirror.example.com".header]
//!     x-custom = ["a", "b"]
//! ```
//!
//! The `[host."..."]` entries are tried in the order the file lists them,
//! then the `server` (root-level keys other than `server` and `host`
//! configure the server). A host without a scheme is HTTPS; its path gets
//! `/v2` appended unless it already ends in `/v2` or `override_path` is set.
//! Keys containerd knows but Skiff does not use (`proxy`) and keys neither
//! knows are logged and ignored, as containerd ignores unknown keys; a key
//! of the wrong type, an unknown capability, a bad URL or a missing
//! certificate file is an error naming the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::RegistryError;

/// containerd's default `config_path`.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";
/// The file in a host namespace directory.
pub const HOSTS_FILE: &str = "hosts.toml";
/// The namespace directory used when no other matches.
pub const DEFAULT_NAMESPACE: &str = "_default";

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetching content by digest (blobs, manifests by digest).
    pub pull: bool,
    /// Resolving a tag to a digest.
    pub resolve: bool,
    /// Pushing.
    pub push: bool,
}

impl Capabilities {
    /// Everything (the default of a host that names none).
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One place a host namespace's requests can go: a `[host."..."]` entry or
/// the `server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// The API root (`scheme://host[:port]/path/`, `/v2/` included unless
    /// `override_path`); `None` for the registry of the namespace itself
    /// (no `server` in the file).
    pub api_root: Option<Url>,
    /// What the host may be used for.
    pub capabilities: Capabilities,
    /// CA certificate files (PEM), trusted besides the system roots.
    pub ca: Vec<PathBuf>,
    /// Client certificates: (certificate, key); without a key file the
    /// certificate file holds the key too.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Whether the server's certificate goes unchecked (`None`: not set).
    pub skip_verify: Option<bool>,
    /// Extra headers (a name may appear several times).
    pub headers: Vec<(String, String)>,
    /// How long connecting may take.
    pub dial_timeout: Option<Duration>,
}

impl HostEntry {
    fn new(api_root: Option<Url>) -> HostEntry {
        HostEntry {
            api_root,
            capabilities: Capabilities::ALL,
            ca: Vec::new(),
            client: Vec::new(),
            skip_verify: None,
            headers: Vec::new(),
            dial_timeout: None,
        }
    }

    /// Whether connections to this host need TLS settings of their own.
    pub fn has_tls_settings(&self) -> bool {
        !self.ca.is_empty() || !self.client.is_empty() || self.skip_verify.is_some()
    }
}

/// The configuration of one host namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsConfig {
    /// Where it was read from (a `hosts.toml`, or a directory of
    /// certificate files).
    pub source: PathBuf,
    /// The hosts in the order they are tried; the last is the server.
    pub hosts: Vec<HostEntry>,
}

/// The host namespace directory for `registry` (`host[:port]`) under
/// `root`: `host_port_`, `host:port`, then `_default`; `None` if none exists.
pub fn host_dir(root: &Path, registry: &str) -> Result<Option<PathBuf>, RegistryError> {
    let mut names = Vec::new();
    if let Some((host, port)) = registry.rsplit_once(':').filter(|(h, _)| !h.is_empty()) {
        names.push(format!("{host}_{port}_"));
    }
    names.push(registry.to_owned());
    names.push(DEFAULT_NAMESPACE.to_owned());
    for name in names {
        // A registry name never holds a path separator; be safe anyway.
        if name.contains('/') || name == "." || name == ".." {
            continue;
        }
        let dir = root.join(&name);
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => return Ok(Some(dir)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RegistryError::io(dir, e)),
        }
    }
    Ok(None)
}

/// The configuration of `registry` under the hosts directory `root`, or
/// `None` when no namespace directory applies (nor `_default`).
pub fn load(root: &Path, registry: &str) -> Result<Option<HostsConfig>, RegistryError> {
    let Some(dir) = host_dir(root, registry)? else {
        return Ok(None);
    };
    let file = dir.join(HOSTS_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(RegistryError::io(file, e)),
    };
    if text.trim().is_empty() {
        let hosts = vec![cert_files(&dir)?];
        return Ok(Some(HostsConfig { source: dir, hosts }));
    }
    let hosts = parse(&text, &dir)
        .map_err(|e| RegistryError::Config(format!("{}: {e}", file.display())))?;
    for h in &hosts {
        check_files(h).map_err(|e| RegistryError::Config(format!("{}: {e}", file.display())))?;
    }
    Ok(Some(HostsConfig {
        source: file,
        hosts,
    }))
}

/// Docker's certificate layout in `dir`: one server entry (the registry
/// itself) with its `*.crt` CA files and `*.cert`/`*.key` client pairs.
fn cert_files(dir: &Path) -> Result<HostEntry, RegistryError> {
    let mut entry = HostEntry::new(None);
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| RegistryError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => entry.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                if !key.is_file() {
                    return Err(RegistryError::Config(format!(
                        "{}: client certificate without its key {}",
                        p.display(),
                        key.display()
                    )));
                }
                entry.client.push((p, Some(key)));
            }
            _ => {}
        }
    }
    Ok(entry)
}

/// Every certificate file a host names must exist.
fn check_files(h: &HostEntry) -> Result<(), String> {
    let files =
        h.ca.iter()
            .map(|p| ("ca", p))
            .chain(h.client.iter().flat_map(|(c, k)| {
                std::iter::once(("client", c)).chain(k.iter().map(|k| ("client", k)))
            }));
    for (key, p) in files {
        if !p.is_file() {
            return Err(format!("{key}: {} does not exist", p.display()));
        }
    }
    Ok(())
}

/// Parses the text of a `hosts.toml` whose relative paths are relative to
/// `base`: the hosts in the order they are tried, the server last.
pub fn parse(text: &str, base: &Path) -> Result<Vec<HostEntry>, String> {
    let doc = DeTable::parse(text).map_err(|e| format!("not valid TOML: {e}"))?;
    let root = doc.get_ref();
    let mut hosts = Vec::new();
    let mut server = None;
    for (k, v) in root.iter() {
        match k.get_ref().as_ref() {
            "server" => {
                let s = v.get_ref().as_str().ok_or_else(|| {
                    format!("server must be a string, not {}", v.get_ref().type_str())
                })?;
                server = Some(s.to_owned());
            }
            "host" => {
                let table = v.get_ref().as_table().ok_or_else(|| {
                    format!("host must be a table, not {}", v.get_ref().type_str())
                })?;
                // The map is sorted by name: put the hosts back in file order.
                let mut entries: Vec<(&Spanned<_>, &Spanned<DeValue<'_>>)> = table.iter().collect();
                entries.sort_by_key(|(k, _)| k.span().start);
                for (name, value) in entries {
                    let name: &str = name.get_ref().as_ref();
                    let what = format!("[host.\"{name}\"]");
                    let fields = value.get_ref().as_table().ok_or_else(|| {
                        format!("{what} must be a table, not {}", value.get_ref().type_str())
                    })?;
                    let override_path =
                        bool_field(fields, "override_path", &what)?.unwrap_or(false);
                    let url = api_root(name, override_path).map_err(|e| format!("{what}: {e}"))?;
                    hosts.push(host_fields(
                        HostEntry::new(Some(url)),
                        fields,
                        base,
                        &what,
                        true,
                    )?);
                }
            }
            _ => {}
        }
    }
    let override_path = bool_field(root, "override_path", "the root table")?.unwrap_or(false);
    let server_url = server
        .filter(|s| !s.is_empty())
        .map(|s| api_root(&s, override_path).map_err(|e| format!("server: {e}")))
        .transpose()?;
    hosts.push(host_fields(
        HostEntry::new(server_url),
        root,
        base,
        "the root table",
        false,
    )?);
    Ok(hosts)
}

/// `scheme://host[:port][/path]` (HTTPS without a scheme) as an API root:
/// its path ends in `/v2/` unless `override_path`.
pub fn api_root(spec: &str, override_path: bool) -> Result<Url, String> {
    let with_scheme = if spec.starts_with("http://") || spec.starts_with("https://") {
        spec.to_owned()
    } else if spec.contains("://") {
        return Err(format!("'{spec}': only http and https are supported"));
    } else {
        format!("https://{spec}")
    };
    let mut url =
        Url::parse(&with_scheme).map_err(|e| format!("'{spec}' is not a valid URL: {e}"))?;
    if url.host_str().is_none() || !url.username().is_empty() || url.query().is_some() {
        return Err(format!(
            "'{spec}' must be scheme://host[:port][/path] (no user, no query)"
        ));
    }
    let clean: Vec<&str> = url
        .path()
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    let mut path = String::from("/");
    for seg in &clean {
        path.push_str(seg);
        path.push('/');
    }
    if !override_path && clean.last() != Some(&"v2") {
        path.push_str("v2/");
    }
    url.set_path(&path);
    Ok(url)
}

fn bool_field(t: &DeTable<'_>, key: &str, what: &str) -> Result<Option<bool>, String> {
    match t.get(key).map(Spanned::get_ref) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| format!("{what}: {key} must be true or false, not {}", v.type_str())),
    }
}

/// A path relative to the file's directory made absolute.
fn abs(p: &str, base: &Path) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn strings(v: &DeValue<'_>) -> Option<Vec<String>> {
    match v {
        DeValue::String(s) => Some(vec![s.to_string()]),
        DeValue::Array(a) => a
            .iter()
            .map(|x| x.get_ref().as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// Reads the per-host keys of `t` into `entry`. `nested`: a `[host]` table
/// (where `server` and `host` are not keys).
fn host_fields(
    mut entry: HostEntry,
    t: &DeTable<'_>,
    base: &Path,
    what: &str,
    nested: bool,
) -> Result<HostEntry, String> {
    for (k, v) in t.iter() {
        let key: &str = k.get_ref().as_ref();
        let v = v.get_ref();
        let bad =
            |expected: &str| format!("{what}: {key} must be {expected}, not {}", v.type_str());
        match key {
            "capabilities" => {
                let caps = strings(v).ok_or_else(|| bad("a list of strings"))?;
                if !caps.is_empty() {
                    let mut c = Capabilities {
                        pull: false,
                        resolve: false,
                        push: false,
                    };
                    for cap in caps {
                        match cap.to_ascii_lowercase().as_str() {
                            "pull" => c.pull = true,
                            "resolve" => c.resolve = true,
                            "push" => c.push = true,
                            other => {
                                return Err(format!(
                                    "{what}: unknown capability '{other}' (pull, resolve, push)"
                                ))
                            }
                        }
                    }
                    entry.capabilities = c;
                }
            }
            "ca" => {
                let files = strings(v).ok_or_else(|| bad("a path or a list of paths"))?;
                entry.ca = files.iter().map(|f| abs(f, base)).collect();
            }
            "client" => {
                let expected = "a path, a list of paths or a list of [certificate, key] pairs";
                entry.client = match v {
                    DeValue::String(s) => vec![(abs(s, base), None)],
                    DeValue::Array(items) => items
                        .iter()
                        .map(|item| match item.get_ref() {
                            DeValue::String(s) => Ok((abs(s, base), None)),
                            DeValue::Array(pair) => {
                                let pair: Option<Vec<&str>> =
                                    pair.iter().map(|x| x.get_ref().as_str()).collect();
                                match pair.as_deref() {
                                    Some([cert, key]) => Ok((
                                        abs(cert, base),
                                        (!key.is_empty()).then(|| abs(key, base)),
                                    )),
                                    _ => Err(format!(
                                        "{what}: client: a pair must be [certificate, key] (two strings)"
                                    )),
                                }
                            }
                            _ => Err(bad(expected)),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(bad(expected)),
                };
            }
            "skip_verify" => {
                entry.skip_verify = Some(v.as_bool().ok_or_else(|| bad("true or false"))?)
            }
            "override_path" => {
                v.as_bool().ok_or_else(|| bad("true or false"))?;
            }
            "header" => {
                let headers = v.as_table().ok_or_else(|| bad("a table"))?;
                for (name, value) in headers.iter() {
                    let name: &str = name.get_ref().as_ref();
                    let values = strings(value.get_ref()).ok_or_else(|| {
                        format!(
                            "{what}: header {name} must be a string or a list of strings, not {}",
                            value.get_ref().type_str()
                        )
                    })?;
                    for value in values {
                        entry.headers.push((name.to_owned(), value));
                    }
                }
            }
            "dial_timeout" => {
                let s = v.as_str().ok_or_else(|| bad("a duration such as \"1s\""))?;
                entry.dial_timeout =
                    Some(parse_duration(s).map_err(|e| format!("{what}: dial_timeout: {e}"))?);
            }
            "server" | "host" if !nested => {}
            "proxy" => tracing::warn!(
                "{what}: proxy is not used by Skiff (set `proxy` in Skiff's registry configuration)"
            ),
            other => tracing::warn!("{what}: ignoring unknown key '{other}'"),
        }
    }
    Ok(entry)
}

/// A Go-style duration: `1s`, `500ms`, `1m30s`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration (examples: 500ms, 1s, 1m30s)");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(n * secs).map_err(|_| bad())?;
    }
    Ok(total)
}

/// Whether `authority` (`host[:port]` of an endpoint) is not the registry
/// `namespace` itself, so that requests to it carry `ns=<namespace>`
/// (containerd's rule; Docker Hub's `registry-1.docker.io` is `docker.io`).
pub fn is_proxy_for(authority: &str, namespace: &str) -> bool {
    authority != namespace
        && !(namespace == crate::reference::DOCKER_HUB
            && authority == crate::reference::DOCKER_HUB_HOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Vec<HostEntry> {
        match parse(text, Path::new("/etc/containerd/certs.d/r.io")) {
            Ok(h) => h,
            Err(e) => panic!("{e}\n{text}"),
        }
    }

    fn parse_err(text: &str) -> String {
        match parse(text, Path::new("/base")) {
            Ok(h) => panic!("accepted: {h:?}\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_field() {
        let hosts = parse_ok(
            r#"
server = "https://registry.example.com"
ca = "/etc/certs/server.pem"
capabilities = ["pull", "resolve", "push"]

[host."https://zzz-first.example.com"]
  capabilities = ["pull"]
  ca = "mirror.crt"
  skip_verify = false
  dial_timeout = "1.5s"
  [host."https://zzz-first.example.com".header]
    x-custom-2 = ["value1", "value2"]
    x-one = "v"

[host."http://aaa-second.example.com:5000/us"]
  capabilities = ["pull", "RESOLVE"]
  skip_verify = true
  client = [["/c/client.cert", "/c/client.key"], ["client.pem", ""]]

[host."mid.example.com/v2/upstream"]
  override_path = true
  client = "one.pem"

[host."https://list.example.com"]
  client = ["a.pem", "b.pem"]
  ca = ["x.pem", "/abs/y.pem"]
"#,
        );
        assert_eq!(hosts.len(), 5);
        let urls: Vec<String> = hosts
            .iter()
            .map(|h| h.api_root.as_ref().map(Url::to_string).unwrap_or_default())
            .collect();
        // File order, not name order; the server last.
        assert_eq!(
            urls,
            [
                "https://zzz-first.example.com/v2/",
                "http://aaa-second.example.com:5000/us/v2/",
                "https://mid.example.com/v2/upstream/",
                "https://list.example.com/v2/",
                "https://registry.example.com/v2/",
            ]
        );
        let base = Path::new("/etc/containerd/certs.d/r.io");
        let first = &hosts[0];
        assert_eq!(
            first.capabilities,
            Capabilities {
                pull: true,
                resolve: false,
                push: false
            }
        );
        assert_eq!(first.ca, vec![base.join("mirror.crt")]);
        assert_eq!(first.skip_verify, Some(false));
        assert_eq!(first.dial_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            first.headers,
            vec![
                ("x-custom-2".to_owned(), "value1".to_owned()),
                ("x-custom-2".to_owned(), "value2".to_owned()),
                ("x-one".to_owned(), "v".to_owned()),
            ]
        );
        let second = &hosts[1];
        assert!(second.capabilities.resolve && !second.capabilities.push);
        assert_eq!(second.skip_verify, Some(true));
        assert_eq!(
            second.client,
            vec![
                (
                    PathBuf::from("/c/client.cert"),
                    Some(PathBuf::from("/c/client.key"))
                ),
                (base.join("client.pem"), None),
            ]
        );
        assert_eq!(hosts[2].client, vec![(base.join("one.pem"), None)]);
        assert_eq!(hosts[2].capabilities, Capabilities::ALL);
        assert_eq!(
            hosts[3].client,
            vec![(base.join("a.pem"), None), (base.join("b.pem"), None)]
        );
        assert_eq!(
            hosts[3].ca,
            vec![base.join("x.pem"), PathBuf::from("/abs/y.pem")]
        );
        let server = &hosts[4];
        assert_eq!(server.ca, vec![PathBuf::from("/etc/certs/server.pem")]);
        assert!(server.has_tls_settings());
    }

    #[test]
    fn no_server_means_the_registry_itself() {
        let hosts = parse_ok("[host.\"http://m:5000\"]\ncapabilities = [\"pull\"]\n");
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[1].api_root, None);
        assert_eq!(hosts[1].capabilities, Capabilities::ALL);
        assert!(!hosts[1].has_tls_settings());
        let only = parse_ok("skip_verify = true\n");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].skip_verify, Some(true));
    }

    #[test]
    fn paths_of_api_roots() -> Result<(), String> {
        assert_eq!(api_root("r.io", false)?.as_str(), "https://r.io/v2/");
        assert_eq!(
            api_root("http://r.io/v2", false)?.as_str(),
            "http://r.io/v2/"
        );
        assert_eq!(
            api_root("https://r.io/a//b/", false)?.as_str(),
            "https://r.io/a/b/v2/"
        );
        assert_eq!(
            api_root("https://r.io/x", true)?.as_str(),
            "https://r.io/x/"
        );
        assert_eq!(api_root("https://r.io", true)?.as_str(), "https://r.io/");
        assert!(api_root("ftp://r.io", false).is_err());
        assert!(api_root("https://u:p@r.io", false).is_err());
        assert!(api_root("https://r.io/?q=1", false).is_err());
        Ok(())
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        for (text, expected) in [
            ("server = [", "not valid TOML"),
            ("server = 5", "server must be a string, not integer"),
            ("host = 1", "host must be a table"),
            (
                "[host.\"m\"]\ncapabilities = [\"pull\", \"fly\"]",
                "unknown capability 'fly'",
            ),
            (
                "[host.\"m\"]\ncapabilities = \"pull\"\nca = 3",
                "ca must be a path or a list of paths, not integer",
            ),
            (
                "[host.\"m\"]\nclient = [[\"a\"]]",
                "a pair must be [certificate, key]",
            ),
            ("[host.\"m\"]\nclient = 1", "client must be a path"),
            (
                "[host.\"m\"]\nskip_verify = \"yes\"",
                "skip_verify must be true or false",
            ),
            (
                "[host.\"m\"]\noverride_path = 1",
                "override_path must be true or false",
            ),
            (
                "[host.\"m\"]\nheader = { a = 1 }",
                "header a must be a string or a list of strings",
            ),
            (
                "[host.\"m\"]\ndial_timeout = \"soon\"",
                "'soon' is not a duration",
            ),
            ("[host.\"ftp://m\"]", "only http and https"),
            (
                "server = \"https://u:p@r\"",
                "server: 'https://u:p@r' must be",
            ),
        ] {
            let e = parse_err(text);
            assert!(e.contains(expected), "{text:?}: {e:?} lacks {expected:?}");
        }
        // Unknown keys are ignored (containerd ignores them too).
        assert_eq!(parse_ok("future_key = 1\n[host.\"m\"]\nother = 2").len(), 2);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn namespace_directories() -> Result<(), RegistryError> {
        let root = tempfile::tempdir().map_err(|e| RegistryError::io("tmp", e))?;
        let r = root.path();
        assert_eq!(host_dir(r, "r.io:5000")?, None);
        std::fs::create_dir(r.join("_default")).map_err(|e| RegistryError::io(r, e))?;
        assert_eq!(host_dir(r, "r.io:5000")?, Some(r.join("_default")));
        std::fs::create_dir(r.join("r.io:5000")).map_err(|e| RegistryError::io(r, e))?;
        assert_eq!(host_dir(r, "r.io:5000")?, Some(r.join("r.io:5000")));
        std::fs::create_dir(r.join("r.io_5000_")).map_err(|e| RegistryError::io(r, e))?;
        assert_eq!(host_dir(r, "r.io:5000")?, Some(r.join("r.io_5000_")));
        assert_eq!(host_dir(r, "other.io")?, Some(r.join("_default")));

        // No hosts.toml: Docker's certificate files.
        let d = r.join("r.io_5000_");
        for f in ["ca.crt", "client.cert", "client.key"] {
            std::fs::write(d.join(f), "x").map_err(|e| RegistryError::io(&d, e))?;
        }
        let c = load(r, "r.io:5000")?.ok_or_else(|| RegistryError::Config("none".into()))?;
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(c.hosts[0].ca, vec![d.join("ca.crt")]);
        assert_eq!(
            c.hosts[0].client,
            vec![(d.join("client.cert"), Some(d.join("client.key")))]
        );
        // A hosts.toml naming a missing file is an error naming both.
        std::fs::write(d.join(HOSTS_FILE), "[host.\"m\"]\nca = \"nope.pem\"\n")
            .map_err(|e| RegistryError::io(&d, e))?;
        let e = load(r, "r.io:5000")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("hosts.toml") && e.contains("nope.pem"), "{e}");
        Ok(())
    }

    #[test]
    fn ns_rule() {
        assert!(is_proxy_for("mirror:5000", "r.io:5000"));
        assert!(!is_proxy_for("r.io:5000", "r.io:5000"));
        assert!(!is_proxy_for("registry-1.docker.io", "docker.io"));
        assert!(is_proxy_for("mirror.gcr.io", "docker.io"));
    }
}
