//! Finding credentials for a registry: the [`RegistryConfig`], the Docker
//! config file and Docker credential helpers.
//!
//! Order, first match wins:
//! 1. `RegistryConfig::auths[registry]`;
//! 2. the Docker config file (`docker_config`, else `$DOCKER_CONFIG/config.json`,
//!    else `~/.docker/config.json`): `credHelpers[registry]` (runs
//!    `docker-credential-NAME get`), then `auths[registry]` (`auth` =
//!    base64 `user:password`, or `username`/`password`, or `identitytoken`),
//!    then `credsStore`;
//! 3. `RegistryConfig::default_credentials`.
//!
//! Docker Hub is looked up under `https://index.docker.io/v1/` (Docker's own
//! key) as well as `docker.io`, `index.docker.io` and `registry-1.docker.io`.
//! A missing file or helper means "no credentials" (anonymous), not an
//! error; a malformed file is an error naming it.
//!
//! [`lookup_containers_auth`] reads podman's and CRI-O's files
//! (containers-auth.json(5)) for `skiff store`: `REGISTRY_AUTH_FILE`, else
//! `$XDG_RUNTIME_DIR/containers/auth.json` (as root without it,
//! `/run/containers/0/auth.json`), then `$XDG_CONFIG_HOME/containers/auth.json`
//! (`~/.config/containers/auth.json`). Their keys may name a repository or
//! a namespace (`quay.io/team/app`, `quay.io/team`) as well as a registry;
//! the most specific key wins, as in containers/image.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::Value;

use crate::config::{Credentials, RegistryConfig};
use crate::reference::DOCKER_HUB;
use crate::RegistryError;

/// Docker's key for Docker Hub in config files and credential helpers.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// Credentials for `registry` (`host[:port]` as in a reference), or `None`
/// for anonymous access.
pub fn lookup(
    config: &RegistryConfig,
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    if let Some(c) = config.auths.get(registry) {
        return Ok(Some(c.clone()));
    }
    if config.use_docker_config {
        if let Some(c) = from_docker_config(config, registry)? {
            return Ok(Some(c));
        }
    }
    Ok(config.default_credentials.clone())
}

fn docker_config_path(config: &RegistryConfig) -> Option<PathBuf> {
    if let Some(p) = &config.docker_config {
        return Some(p.clone());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// The containers-auth.json files podman reads, in its order.
pub fn containers_auth_files() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let mut files = Vec::new();
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    } else if let Some(dir) = env("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(dir).join("containers/auth.json"));
    } else {
        files.push(PathBuf::from(format!(
            "/run/containers/{}/auth.json",
            nix_uid()
        )));
    }
    if let Some(dir) = env("XDG_CONFIG_HOME") {
        files.push(PathBuf::from(dir).join("containers/auth.json"));
    } else if let Some(home) = env("HOME") {
        files.push(PathBuf::from(home).join(".config/containers/auth.json"));
    }
    files
}

/// The real user ID (for podman's per-user default auth file).
fn nix_uid() -> u32 {
    // /proc/self/status: "Uid:\treal\teffective...". Root when unreadable
    // is only a default path that will not exist for others.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().and_then(|u| u.parse().ok()))
        })
        .unwrap_or(0)
}

/// Credentials for `repository` on `registry` from containers-auth.json
/// files (see the module docs), or `None`.
pub fn lookup_containers_auth(
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>, RegistryError> {
    lookup_containers_auth_in(&containers_auth_files(), registry, repository)
}

/// [`lookup_containers_auth`] over the files `files`, in order.
pub fn lookup_containers_auth_in(
    files: &[PathBuf],
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>, RegistryError> {
    // Most specific first: registry/a/b/c, registry/a/b, registry/a, registry.
    let mut scopes = vec![format!("{registry}/{repository}")];
    let mut parts: Vec<&str> = repository.split('/').collect();
    while parts.len() > 1 {
        parts.pop();
        scopes.push(format!("{registry}/{}", parts.join("/")));
    }
    for file in files {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RegistryError::io(file, e)),
        };
        let v: Value = serde_json::from_slice(&text).map_err(|e| {
            RegistryError::Config(format!(
                "{}: not a valid containers-auth.json: {e}",
                file.display()
            ))
        })?;
        let auths = v.get("auths").and_then(Value::as_object);
        for scope in &scopes {
            if let Some(entry) = auths.and_then(|a| a.get(scope.as_str())) {
                if let Some(c) = parse_auth_entry(entry, file, scope)? {
                    return Ok(Some(c));
                }
            }
        }
        let helpers = v.get("credHelpers").and_then(Value::as_object);
        if let Some(name) = helpers
            .and_then(|h| h.get(registry))
            .and_then(Value::as_str)
        {
            return run_helper(name, registry);
        }
        // A registry-only key, possibly written as a URL.
        for key in keys_for(registry) {
            if let Some((k, entry)) = auths.and_then(|a| {
                // A key with a path names a namespace: only URLs (Docker's
                // `https://host/v1/`) are cut down to their host.
                a.iter()
                    .find(|(k, _)| **k == key || (k.contains("://") && normalise_key(k) == key))
            }) {
                if let Some(c) = parse_auth_entry(entry, file, k)? {
                    return Ok(Some(c));
                }
            }
        }
    }
    Ok(None)
}

/// The keys a registry may be stored under.
fn keys_for(registry: &str) -> Vec<String> {
    if registry == DOCKER_HUB {
        vec![
            DOCKER_HUB_AUTH_KEY.to_owned(),
            "docker.io".to_owned(),
            "index.docker.io".to_owned(),
            "registry-1.docker.io".to_owned(),
        ]
    } else {
        vec![registry.to_owned()]
    }
}

/// `https://host:port/v2/` becomes `host:port`.
fn normalise_key(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn from_docker_config(
    config: &RegistryConfig,
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    let Some(path) = docker_config_path(config) else {
        return Ok(None);
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RegistryError::io(&path, e)),
    };
    let v: Value = serde_json::from_slice(&text).map_err(|e| {
        RegistryError::Config(format!(
            "{}: not a valid Docker config: {e}",
            path.display()
        ))
    })?;
    let keys = keys_for(registry);
    let wanted = |k: &str| {
        keys.iter()
            .any(|w| w == k || normalise_key(w) == normalise_key(k))
    };
    if let Some(helpers) = v.get("credHelpers").and_then(Value::as_object) {
        if let Some(name) = helpers
            .iter()
            .find(|(k, _)| wanted(k))
            .and_then(|(_, n)| n.as_str())
        {
            return run_helper(name, &keys[0]);
        }
    }
    if let Some(auths) = v.get("auths").and_then(Value::as_object) {
        for (k, entry) in auths {
            if !wanted(k) {
                continue;
            }
            if let Some(c) = parse_auth_entry(entry, &path, k)? {
                return Ok(Some(c));
            }
        }
    }
    if let Some(store) = v.get("credsStore").and_then(Value::as_str) {
        if !store.is_empty() {
            return run_helper(store, &keys[0]);
        }
    }
    Ok(None)
}

fn parse_auth_entry(
    entry: &Value,
    path: &std::path::Path,
    key: &str,
) -> Result<Option<Credentials>, RegistryError> {
    let s = |f: &str| {
        entry
            .get(f)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if let Some(token) = s("identitytoken") {
        return Ok(Some(Credentials::new("<token>", token)));
    }
    if let Some(auth) = s("auth") {
        let bad = || {
            RegistryError::Config(format!(
                "{}: auths.\"{key}\".auth is not base64 of user:password",
                path.display()
            ))
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials::new(user, password)));
    }
    if let (Some(u), Some(p)) = (s("username"), s("password")) {
        return Ok(Some(Credentials::new(u, p)));
    }
    Ok(None)
}

/// Runs `docker-credential-NAME get` with `server` on stdin. A helper that
/// is missing or has nothing for the server means no credentials.
fn run_helper(name: &str, server: &str) -> Result<Option<Credentials>, RegistryError> {
    if name.is_empty() || name.contains('/') {
        return Err(RegistryError::Config(format!(
            "invalid credential helper name '{name}'"
        )));
    }
    let program = format!("docker-credential-{name}");
    let child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "credential helper {program} could not be run: {e}; continuing without credentials"
            );
            return Ok(None);
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits early closes its stdin: its exit status tells.
        let _ = stdin.write_all(server.as_bytes());
        let _ = stdin.write_all(b"\n");
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RegistryError::Config(format!("credential helper {program}: {e}")))?;
    if !out.status.success() {
        // The helper's stdout says e.g. "credentials not found in native keychain";
        // it never holds the secret when the lookup failed.
        let msg = String::from_utf8_lossy(&out.stdout);
        tracing::debug!(
            "credential helper {program} has nothing for {server}: {}",
            msg.trim()
        );
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        RegistryError::Config(format!(
            "credential helper {program}: its answer for {server} is not JSON"
        ))
    })?;
    let user = v.get("Username").and_then(Value::as_str).unwrap_or("");
    let secret = v.get("Secret").and_then(Value::as_str).unwrap_or("");
    if secret.is_empty() {
        return Ok(None);
    }
    let user = if user.is_empty() { "<token>" } else { user };
    Ok(Some(Credentials::new(user, secret)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config_with(dir: &std::path::Path, json: &str) -> RegistryConfig {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        RegistryConfig {
            docker_config: Some(path),
            ..RegistryConfig::default()
        }
    }

    #[test]
    fn docker_config_auths() -> Result<(), RegistryError> {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        let c = config_with(
            dir.path(),
            &format!(
                r#"{{"auths": {{
                "r.example:5000": {{"auth": "{auth}"}},
                "https://index.docker.io/v1/": {{"username": "hub", "password": "pw"}},
                "https://tok.example/v2/": {{"identitytoken": "idt"}}
            }}}}"#
            ),
        );
        assert_eq!(
            lookup(&c, "r.example:5000")?,
            Some(Credentials::new("alice", "s3cret:x"))
        );
        assert_eq!(
            lookup(&c, "docker.io")?,
            Some(Credentials::new("hub", "pw"))
        );
        let t = lookup(&c, "tok.example")?;
        assert!(t.as_ref().is_some_and(Credentials::is_identity_token));
        assert_eq!(lookup(&c, "other.example")?, None);
        Ok(())
    }

    #[test]
    fn containers_auth_most_specific_key_wins() -> Result<(), RegistryError> {
        let dir = tempfile::tempdir().unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let first = dir.path().join("auth.json");
        std::fs::write(
            &first,
            format!(
                r#"{{"auths": {{
                "r.example:5000": {{"auth": "{}"}},
                "r.example:5000/team": {{"auth": "{}"}},
                "r.example:5000/team/app": {{"auth": "{}"}}
            }}}}"#,
                b64("reg:1"),
                b64("team:2"),
                b64("app:3")
            ),
        )
        .unwrap();
        let second = dir.path().join("second.json");
        std::fs::write(
            &second,
            format!(
                r#"{{"auths": {{"https://other.example": {{"auth": "{}"}}}}}}"#,
                b64("o:4")
            ),
        )
        .unwrap();
        let files = [dir.path().join("missing.json"), first, second];
        let get = |r: &str, repo: &str| lookup_containers_auth_in(&files, r, repo);
        assert_eq!(
            get("r.example:5000", "team/app")?,
            Some(Credentials::new("app", "3"))
        );
        assert_eq!(
            get("r.example:5000", "team/other")?,
            Some(Credentials::new("team", "2"))
        );
        assert_eq!(
            get("r.example:5000", "solo")?,
            Some(Credentials::new("reg", "1"))
        );
        assert_eq!(get("other.example", "x")?, Some(Credentials::new("o", "4")));
        assert_eq!(get("none.example", "x")?, None);
        Ok(())
    }

    #[test]
    fn explicit_and_default_credentials() -> Result<(), RegistryError> {
        let mut c = RegistryConfig {
            use_docker_config: false,
            ..RegistryConfig::default()
        };
        c.auths.insert("a.io".into(), Credentials::new("a", "1"));
        c.default_credentials = Some(Credentials::new("d", "2"));
        assert_eq!(lookup(&c, "a.io")?, Some(Credentials::new("a", "1")));
        assert_eq!(lookup(&c, "b.io")?, Some(Credentials::new("d", "2")));
        Ok(())
    }

    #[test]
    fn credential_helper() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let helper = dir.path().join("docker-credential-skifftest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\nif [ \"$host\" = \"h.example\" ]; then\n  echo '{\"ServerURL\":\"h.example\",\"Username\":\"hu\",\"Secret\":\"hs\"}'\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
        )?;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))?;
        let c = config_with(
            dir.path(),
            r#"{"credHelpers": {"h.example": "skifftest"}, "credsStore": "skifftest"}"#,
        );
        // Helpers are found on PATH; run them by absolute path through PATH.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir.path().to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        let joined = std::env::join_paths(paths)?;
        // Only this test changes PATH, and only by prepending a directory.
        std::env::set_var("PATH", &joined);
        assert_eq!(lookup(&c, "h.example")?, Some(Credentials::new("hu", "hs")));
        // credsStore answers "not found" for other hosts: anonymous.
        assert_eq!(lookup(&c, "x.example")?, None);
        Ok(())
    }
}
