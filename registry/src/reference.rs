//! Image references in skopeo's transport syntax.
//!
//! | syntax | meaning |
//! |---|---|
//! | `oci:DIR[:TAG]` | an OCI image layout directory, optionally a tag in it |
//! | `docker-archive:FILE[:REF]` | a `docker save` tar, optionally one image in it (`name:tag` or `@N`) |
//! | `docker://REF` | an image in a registry |
//!
//! In `oci:`, the text after the *last* `:` is a tag only if it looks like
//! one (`[A-Za-z0-9_.-]+`, in particular no `/`): `oci:/tmp/a:b/c` is the
//! directory `/tmp/a:b/c`. In `docker-archive:` the file name ends at the
//! *first* `:`, as in skopeo, since a reference may itself contain colons.
//!
//! `docker://` references follow the distribution reference grammar:
//! `[HOST[:PORT]/]PATH[:TAG][@sha256:HEX]`, where the first component is a
//! host if it has a `.` or a `:` or is `localhost`. Docker Hub names are
//! normalised (`busybox` is `docker.io/library/busybox`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use skiff_format::Digest;

use crate::RegistryError;

/// The registry name Docker Hub images are displayed with.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub is actually reached at.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// Where an image comes from or goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:DIR[:TAG]`: an OCI image layout directory.
    Oci {
        /// The layout directory.
        dir: PathBuf,
        /// The tag (`org.opencontainers.image.ref.name`), if given.
        tag: Option<String>,
    },
    /// `docker-archive:FILE[:REF]`: a `docker save` tar file.
    DockerArchive {
        /// The tar file.
        path: PathBuf,
        /// Which image of the archive (`name:tag` or `@N`), if given.
        reference: Option<String>,
    },
    /// `docker://REF`: an image in a registry.
    Docker(DockerRef),
}

/// A reference to an image in a registry, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerRef {
    /// The registry, e.g. `docker.io`, `ghcr.io`, `localhost:5000`.
    pub registry: String,
    /// The repository, e.g. `library/busybox` (Docker Hub's single-component
    /// names get the `library/` prefix).
    pub repository: String,
    /// The tag, if given.
    pub tag: Option<String>,
    /// The manifest digest, if given (`@sha256:...`).
    pub digest: Option<Digest>,
}

impl DockerRef {
    /// The host to connect to: `registry-1.docker.io` for Docker Hub, the
    /// registry itself otherwise.
    pub fn connect_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_HOST
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest if given, else the tag, else
    /// `latest`.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.oci(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

fn is_tag(s: &str) -> bool {
    // The distribution grammar: [\w][\w.-]{0,127}.
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Whether `s` can be a tag of an `oci:` layout (`[A-Za-z0-9_.-]+`).
pub fn is_oci_tag(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        let sep_start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[sep_start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok || i == b.len() {
            return false;
        }
    }
}

fn is_host(s: &str) -> bool {
    let (name, port) = match s.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(']') || n.starts_with('[') => (n, Some(p)),
        _ => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
    }
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl FromStr for DockerRef {
    type Err = RegistryError;

    /// Parses `[HOST[:PORT]/]PATH[:TAG][@sha256:HEX]` (without `docker://`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| RegistryError::InvalidReference {
            reference: format!("docker://{s}"),
            reason: reason.to_owned(),
        };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                if !d.starts_with("sha256:") {
                    return Err(bad("only sha256 digests are supported after '@'"));
                }
                let digest = d
                    .parse::<Digest>()
                    .map_err(|_| bad("the digest after '@' is not sha256:<64 lowercase hex>"))?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|sl| colon > sl) => {
                let tag = &rest[colon + 1..];
                if !is_tag(tag) {
                    return Err(bad(&format!("'{tag}' is not a valid tag")));
                }
                (&rest[..colon], Some(tag.to_owned()))
            }
            _ => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("empty repository name"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !is_host(first) {
                    return Err(bad(&format!("'{first}' is not a valid registry host")));
                }
                (first.to_owned(), path)
            }
            _ => (DOCKER_HUB.to_owned(), name),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        if let Some(c) = path.split('/').find(|c| !is_path_component(c)) {
            return Err(bad(&format!(
                "'{c}' is not a valid repository component (lowercase letters, digits and . _ - separators)"
            )));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(bad("the name is longer than 255 characters"));
        }
        Ok(DockerRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for DockerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| RegistryError::InvalidReference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !dir.is_empty() && is_oci_tag(tag) => {
                    (dir, Some(tag.to_owned()))
                }
                Some(("", _)) => return Err(bad("no directory after 'oci:'")),
                Some((_, "")) => return Err(bad("empty tag after ':'")),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad("no directory after 'oci:'"));
            }
            return Ok(ImageRef::Oci {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, reference) = match rest.split_once(':') {
                Some((_, "")) => return Err(bad("empty image reference after ':'")),
                Some((p, r)) => (p, Some(r.to_owned())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad("no file after 'docker-archive:'"));
            }
            return Ok(ImageRef::DockerArchive {
                path: PathBuf::from(path),
                reference,
            });
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return Ok(ImageRef::Docker(rest.parse()?));
        }
        let transport = match s.split_once(':') {
            Some((t, _)) => format!("{t}:"),
            None => String::new(),
        };
        Err(RegistryError::UnknownTransport {
            transport,
            reference: s.to_owned(),
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Oci { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                Ok(())
            }
            ImageRef::DockerArchive { path, reference } => {
                write!(f, "docker-archive:{}", path.display())?;
                if let Some(r) = reference {
                    write!(f, ":{r}")?;
                }
                Ok(())
            }
            ImageRef::Docker(r) => write!(f, "docker://{r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oci(dir: &str, tag: Option<&str>) -> ImageRef {
        ImageRef::Oci {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_owned),
        }
    }

    #[test]
    fn oci_refs() -> Result<(), RegistryError> {
        assert_eq!("oci:/tmp/a".parse::<ImageRef>()?, oci("/tmp/a", None));
        assert_eq!(
            "oci:/tmp/a:v1.0".parse::<ImageRef>()?,
            oci("/tmp/a", Some("v1.0"))
        );
        assert_eq!(
            "oci:/tmp/a:b/c".parse::<ImageRef>()?,
            oci("/tmp/a:b/c", None)
        );
        assert_eq!("oci:dir:x:y".parse::<ImageRef>()?, oci("dir:x", Some("y")));
        assert!("oci:".parse::<ImageRef>().is_err());
        assert!("oci::tag".parse::<ImageRef>().is_err());
        assert!("oci:/tmp/a:".parse::<ImageRef>().is_err());
        for s in ["oci:/tmp/a", "oci:/tmp/a:latest", "oci:rel/dir:t_1"] {
            assert_eq!(s.parse::<ImageRef>()?.to_string(), s);
        }
        Ok(())
    }

    #[test]
    fn docker_archive_refs() -> Result<(), RegistryError> {
        assert_eq!(
            "docker-archive:/x/img.tar".parse::<ImageRef>()?,
            ImageRef::DockerArchive {
                path: PathBuf::from("/x/img.tar"),
                reference: None
            }
        );
        let r: ImageRef = "docker-archive:/x/img.tar:docker.io/library/busybox:latest".parse()?;
        assert_eq!(
            r,
            ImageRef::DockerArchive {
                path: PathBuf::from("/x/img.tar"),
                reference: Some("docker.io/library/busybox:latest".to_owned())
            }
        );
        assert_eq!(
            r.to_string(),
            "docker-archive:/x/img.tar:docker.io/library/busybox:latest"
        );
        assert!("docker-archive:".parse::<ImageRef>().is_err());
        Ok(())
    }

    #[test]
    fn docker_refs() -> Result<(), RegistryError> {
        let r: DockerRef = "busybox".parse()?;
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag, None);
        assert_eq!(r.connect_host(), "registry-1.docker.io");
        assert_eq!(r.manifest_reference(), "latest");
        assert_eq!(r.to_string(), "docker.io/library/busybox");

        let r: DockerRef = "localhost:5000/a/b:v1".parse()?;
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("v1"));

        let r: DockerRef = "localhost/x".parse()?;
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "x")
        );

        let r: DockerRef = "user/app:1.2".parse()?;
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "user/app")
        );

        let d = Digest::of(b"m");
        let s = format!("ghcr.io/o/r:t@{d}");
        let r: DockerRef = s.parse()?;
        assert_eq!(r.digest, Some(d));
        assert_eq!(r.manifest_reference(), d.oci());
        assert_eq!(r.to_string(), s);

        let r: DockerRef = "index.docker.io/library/alpine".parse()?;
        assert_eq!(r.registry, "docker.io");

        for s in [
            "docker://busybox",
            "docker://quay.io/a/b:c",
            "docker://localhost:5000/x@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let once = s.parse::<ImageRef>()?.to_string();
            assert_eq!(once.parse::<ImageRef>()?.to_string(), once);
        }
        for bad in [
            "Busybox",
            "a//b",
            "a:",
            "a:-x",
            "a@sha256:12",
            "a@md5:00",
            "",
            "bad_host.com:x/y",
            "a--/b",
        ] {
            assert!(bad.parse::<DockerRef>().is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn unknown_transport() {
        let err = "foo:bar".parse::<ImageRef>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown transport 'foo:' in 'foo:bar' — expected oci:DIR[:TAG], docker-archive:FILE or docker://REF")
        );
        assert!("busybox".parse::<ImageRef>().is_err());
        assert!("docker:busybox".parse::<ImageRef>().is_err());
    }
}
