//! [`Keychain`]: the registry credentials that kubelet gave with its CRI
//! pulls, kept in memory for the mounts of those images.
//!
//! kubelet sends an image's pull secret only in `PullImage`'s `AuthConfig`;
//! containerd uses it for its own pull and forgets it, so a remote
//! snapshotter never sees it (containerd issue 5105). When the snapshotter
//! serves CRI's image service itself (see [`crate::cri`]), every
//! `PullImage` leaves its credentials here, keyed by registry and
//! repository, and the resolver and the mount daemons of that image use
//! them.
//!
//! The credentials live in this process's memory only: never written to
//! disk, logged (their `Debug` shows the user name only) or counted in a
//! metric. A mount daemon gets them on a sealed memory file descriptor
//! (see [`crate::daemon`]). Restarting the snapshotter forgets them: the
//! running mounts keep theirs, and kubelet's next pull of the image brings
//! them back.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use skiff_registry::{Credentials, ImageRef};

use crate::proto::cri::AuthConfig;

/// A registry and a repository: `("registry.lan:5000", "team/app")`.
pub type RepoKey = (String, String);

/// Credentials per registry and repository, in memory only.
#[derive(Default)]
pub struct Keychain {
    entries: Mutex<HashMap<RepoKey, Credentials>>,
}

impl std::fmt::Debug for Keychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("Keychain").field("entries", &n).finish()
    }
}

/// The registry and repository of an image reference as CRI and the
/// snapshot labels write it (`HOST/REPO:TAG`, `name` for Docker Hub, or
/// with a `docker://` transport); `None` for other transports and
/// references that do not parse.
pub fn repo_key(image: &str) -> Option<RepoKey> {
    let text = if image.starts_with("docker://") {
        image.to_owned()
    } else {
        format!("docker://{image}")
    };
    match text.parse::<ImageRef>().ok()? {
        ImageRef::Docker(d) => Some((d.registry, d.repository)),
        _ => None,
    }
}

/// The credentials an `AuthConfig` holds: user name and password (or their
/// base64 `auth` form), or an identity token. `None` when it holds none
/// (anonymous pulls), or only a registry token, which Skiff cannot renew.
pub fn credentials_of(auth: &AuthConfig) -> Option<Credentials> {
    if !auth.username.is_empty() && !auth.password.is_empty() {
        return Some(Credentials::new(&auth.username, &auth.password));
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        return Some(Credentials::new(user, password));
    }
    if !auth.identity_token.is_empty() {
        return Some(Credentials::new("<token>", &auth.identity_token));
    }
    None
}

impl Keychain {
    /// An empty keychain.
    pub fn new() -> Keychain {
        Keychain::default()
    }

    /// Keeps the credentials of a pull of `image`; an `AuthConfig` without
    /// credentials leaves what was there (kubelet pulls public images
    /// without one). Returns whether something was kept.
    pub fn remember(&self, image: &str, auth: Option<&AuthConfig>) -> bool {
        let (Some(key), Some(creds)) = (repo_key(image), auth.and_then(credentials_of)) else {
            return false;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(key, creds);
        true
    }

    /// The credentials kept for `registry` and `repository`.
    pub fn get(&self, registry: &str, repository: &str) -> Option<Credentials> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(registry.to_owned(), repository.to_owned()))
            .cloned()
    }

    /// The credentials kept for the repository of `image` (a reference as
    /// in [`repo_key`]), with its registry.
    pub fn for_image(&self, image: &str) -> Option<(String, Credentials)> {
        let (registry, repository) = repo_key(image)?;
        let creds = self.get(&registry, &repository)?;
        Some((registry, creds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(user: &str, password: &str) -> AuthConfig {
        AuthConfig {
            username: user.into(),
            password: password.into(),
            ..Default::default()
        }
    }

    #[test]
    fn keyed_by_registry_and_repository() {
        let k = Keychain::new();
        assert!(k.remember("r.lan:5000/team/app:1", Some(&auth("u", "p"))));
        assert_eq!(
            k.get("r.lan:5000", "team/app"),
            Some(Credentials::new("u", "p"))
        );
        assert_eq!(k.get("r.lan:5000", "team/other"), None);
        let (registry, c) = k.for_image("docker://r.lan:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000").unwrap_or_else(|| panic!("no entry"));
        assert_eq!(
            (registry.as_str(), c),
            ("r.lan:5000", Credentials::new("u", "p"))
        );
        // Docker Hub's short names are normalised.
        assert!(k.remember("python:3", Some(&auth("h", "q"))));
        assert!(k.get("docker.io", "library/python").is_some());
        // No credentials: nothing kept, nothing forgotten.
        assert!(!k.remember("r.lan:5000/team/app:2", None));
        assert!(!k.remember("r.lan:5000/team/app:2", Some(&AuthConfig::default())));
        assert!(k.get("r.lan:5000", "team/app").is_some());
    }

    #[test]
    fn auth_forms() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("al:pw:x");
        let a = AuthConfig {
            auth: b64,
            ..Default::default()
        };
        assert_eq!(credentials_of(&a), Some(Credentials::new("al", "pw:x")));
        let t = AuthConfig {
            identity_token: "idt".into(),
            ..Default::default()
        };
        assert!(credentials_of(&t).is_some_and(|c| c.is_identity_token()));
        let r = AuthConfig {
            registry_token: "bearer".into(),
            ..Default::default()
        };
        assert_eq!(credentials_of(&r), None);
    }

    #[test]
    fn debug_shows_no_secret() {
        let k = Keychain::new();
        k.remember("r/a:1", Some(&auth("u", "hunter2")));
        assert!(!format!("{k:?}").contains("hunter2"));
    }
}
