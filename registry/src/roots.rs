//! The system's CA certificates, the roots Skiff trusts for TLS to
//! registries (besides a `hosts.toml` entry's `ca` and `--ca-file`): read
//! once per process and shared by every HTTP client it builds.
//!
//! Where from, as OpenSSL-based tools look:
//! - `SSL_CERT_FILE` and `SSL_CERT_DIR` (colon-separated), when set: each
//!   file, and every file in each directory;
//! - otherwise the first system bundle that exists
//!   ([`BUNDLES`]: Debian's `/etc/ssl/certs/ca-certificates.crt`, Red Hat's,
//!   SUSE's, Alpine's), and a certificate directory ([`DIRS`]) only when
//!   there is no bundle.
//!
//! The directory is skipped when a bundle exists because on every
//! distribution the bundle is what the directory holds (both are written
//! by `update-ca-certificates` / `update-ca-trust`), and reading it costs
//! a cold mount one file per certificate: on Debian 146 files, read from
//! a cold page cache. Measured on the bench machine (a `skiff mount` of the
//! fixture from a registry on loopback, page cache dropped, without
//! `SSL_CERT_*` in the environment, 8 runs each): 83-96 ms to mounted when
//! both were read (what rustls-native-certs does), 64-80 ms with the
//! bundle alone. A certificate copied
//! into the directory without running those tools is not trusted: give it
//! to `SSL_CERT_FILE`/`SSL_CERT_DIR`, or to the registry's `hosts.toml`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// System CA bundles, in the order looked for.
pub const BUNDLES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/usr/local/share/certs/ca-root-nss.crt",
];

/// Certificate directories, read when no bundle exists.
pub const DIRS: [&str; 2] = ["/etc/ssl/certs", "/etc/pki/tls/certs"];

/// The files and directories certificates are read from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sources {
    /// PEM files, each read whole.
    pub files: Vec<PathBuf>,
    /// Directories whose every file is read.
    pub dirs: Vec<PathBuf>,
}

/// Where certificates come from, given `SSL_CERT_FILE` and `SSL_CERT_DIR`
/// (`None` when unset or empty) and a test of which paths exist.
pub fn locate(
    env_file: Option<&str>,
    env_dirs: Option<&str>,
    exists: impl Fn(&Path) -> bool,
) -> Sources {
    if env_file.is_some() || env_dirs.is_some() {
        return Sources {
            files: env_file.map(PathBuf::from).into_iter().collect(),
            dirs: env_dirs
                .map(|d| {
                    d.split(':')
                        .filter(|p| !p.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
        };
    }
    if let Some(bundle) = BUNDLES.iter().map(Path::new).find(|p| exists(p)) {
        return Sources {
            files: vec![bundle.to_path_buf()],
            dirs: Vec::new(),
        };
    }
    Sources {
        files: Vec::new(),
        dirs: DIRS
            .iter()
            .map(Path::new)
            .filter(|p| exists(p))
            .map(Path::to_path_buf)
            .collect(),
    }
}

/// Reads every certificate of `sources`, each once (a bundle and a
/// directory of the same certificates, as `SSL_CERT_FILE` and
/// `SSL_CERT_DIR` often name, give each certificate once: PEM bodies are
/// compared before anything is decoded). Unreadable
/// files, text that is not a certificate and certificates that cannot be
/// trust anchors are skipped (a directory holds other files too; one bad
/// file must not make every HTTP client fail to build); what was skipped
/// is logged at debug level.
pub fn load(sources: &Sources) -> Vec<reqwest::Certificate> {
    let mut certs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut read = |path: &Path| {
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(e) => {
                tracing::debug!("CA certificates: {}: {e}", path.display());
                return;
            }
        };
        let text = String::from_utf8_lossy(&pem);
        for body in pem_bodies(&text) {
            // A certificate met before (the bundle's copy of a directory
            // file) is not decoded and checked again.
            if seen.contains(&body) {
                continue;
            }
            match anchor(&body)
                .and_then(|der| reqwest::Certificate::from_der(&der).map_err(|e| e.to_string()))
            {
                Ok(c) => certs.push(c),
                Err(e) => tracing::debug!("CA certificates: {}: {e}", path.display()),
            }
            seen.insert(body);
        }
    };
    for f in &sources.files {
        read(f);
    }
    for d in &sources.dirs {
        let entries = match std::fs::read_dir(d) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::debug!("CA certificates: {}: {e}", d.display());
                continue;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in &paths {
            read(p);
        }
    }
    certs
}

/// The base64 bodies of the `CERTIFICATE` blocks of a PEM text, in order,
/// whitespace removed (other blocks, such as keys or OpenSSL's `TRUSTED
/// CERTIFICATE`, and text between blocks are skipped).
fn pem_bodies(text: &str) -> impl Iterator<Item = String> + '_ {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut rest = text;
    std::iter::from_fn(move || {
        let start = rest.find(BEGIN)? + BEGIN.len();
        let end = start + rest[start..].find(END)?;
        let body = rest[start..end].split_whitespace().collect();
        rest = &rest[end + END.len()..];
        Some(body)
    })
}

/// The DER of a certificate's base64 `body`, if it decodes and is a
/// certificate rustls takes as a trust anchor (as reqwest will when the
/// client is built: one it refuses would fail every build).
fn anchor(body: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("not base64: {e}"))?;
    rustls::RootCertStore::empty()
        .add(rustls::pki_types::CertificateDer::from(der.as_slice()))
        .map_err(|e| format!("not a trust anchor: {e}"))?;
    Ok(der)
}

/// The system's CA certificates, read on first use (see the module
/// documentation) and kept for the life of the process.
pub fn system() -> &'static [reqwest::Certificate] {
    static ROOTS: OnceLock<Vec<reqwest::Certificate>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let sources = locate(
            env("SSL_CERT_FILE").as_deref(),
            env("SSL_CERT_DIR").as_deref(),
            Path::exists,
        );
        let certs = load(&sources);
        if certs.is_empty() {
            tracing::warn!(
                "no system CA certificates found (looked at {:?}): TLS registries are trusted through the built-in Mozilla roots, `ca_file` and hosts.toml `ca` only",
                if sources.files.is_empty() && sources.dirs.is_empty() {
                    BUNDLES.iter().chain(DIRS.iter()).map(PathBuf::from).collect()
                } else {
                    sources.files.iter().chain(sources.dirs.iter()).cloned().collect::<Vec<_>>()
                }
            );
        }
        certs
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_wins_and_both_variables_count() {
        let s = locate(Some("/x/ca.pem"), Some("/d1::/d2"), |_| true);
        assert_eq!(s.files, vec![PathBuf::from("/x/ca.pem")]);
        assert_eq!(s.dirs, vec![PathBuf::from("/d1"), PathBuf::from("/d2")]);
        let s = locate(None, Some("/d1"), |_| true);
        assert!(s.files.is_empty());
        assert_eq!(s.dirs, vec![PathBuf::from("/d1")]);
        let s = locate(Some("/x/ca.pem"), None, |_| true);
        assert!(s.dirs.is_empty());
    }

    #[test]
    fn a_bundle_is_read_and_the_directory_only_without_one() {
        let s = locate(None, None, |p| {
            p == Path::new("/etc/pki/tls/certs/ca-bundle.crt")
        });
        assert_eq!(
            s.files,
            vec![PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt")]
        );
        assert!(s.dirs.is_empty());
        // Debian's bundle comes first when several exist.
        let s = locate(None, None, |_| true);
        assert_eq!(s.files, vec![PathBuf::from(BUNDLES[0])]);
        let s = locate(None, None, |p| p == Path::new("/etc/ssl/certs"));
        assert!(s.files.is_empty());
        assert_eq!(s.dirs, vec![PathBuf::from("/etc/ssl/certs")]);
        assert_eq!(locate(None, None, |_| false), Sources::default());
    }

    /// A self-signed certificate (P-256, valid until 2126; only parsed here).
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBjTCCATOgAwIBAgIUchOOJOjyvA0XBq9aFUfNLqkO1YkwCgYIKoZIzj0EAwIw\nGzEZMBcGA1UEAwwQc2tpZmYgcm9vdHMgdGVzdDAgFw0yNjEyMDcwNTU3NDlaGA8y\nMTI2MTExMzA1NTc0OVowGzEZMBcGA1UEAwwQc2tpZmYgcm9vdHMgdGVzdDBZMBMG\nByqGSM49AgEGCCqGSM49AwEHA0IABHZHldxLb8CO2YcDh4za8c8NPtq5EwaU+WSY\nGiXK6rIsJNTi3cC029mPoe8IU/mfo1jCH/3HZ5iDywUQoUYaZLGjUzBRMB0GA1Ud\nDgQWBBTtCV0upgkhZgeKS9zVi1uQaWR2ijAfBgNVHSMEGDAWgBTtCV0upgkhZgeK\nS9zVi1uQaWR2ijAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQDJ\nabQccQA4J3pbB8vwXwANAy9ZkdKc4OOFmub3R8r2ZAIgBX2+w2bleJ0g4+LODGV4\nKjLRjDQj0kMv6dVC7hxi7fA=\n-----END CERTIFICATE-----\n";

    /// Another one.
    const CERT2: &str = "-----BEGIN CERTIFICATE-----\nMIIBkTCCATegAwIBAgIUaRBO1TmMgrH5s0wApnEuJ4TXeJ0wCgYIKoZIzj0EAwIw\nHTEbMBkGA1UEAwwSc2tpZmYgcm9vdHMgdGVzdCAyMCAXDTI2MTIwNzA2MTMzN1oY\nDzIxMjYxMTEzMDYxMzM3WjAdMRswGQYDVQQDDBJza2lmZiByb290cyB0ZXN0IDIw\nWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS/WhcRwvJ0aVpBSY6S3LGr9/PAWR4H\nz5JAuw4+sN5/sFGHqqOvnKE+/XqiyQnk0tSxDl+uypWtPBHnntVVFbFZo1MwUTAd\nBgNVHQ4EFgQUAygBhMWJ2hg11Mgk++cUz+sRxRYwHwYDVR0jBBgwFoAUAygBhMWJ\n2hg11Mgk++cUz+sRxRYwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF\nAiEA9FoHbOASpGVlplgKtLSslQrlfs0JdqpGsSgM2MuMiUACIB4V1+NEGuYAULGo\nJfrdG1+UMJw4v1BKN82+Q6IBgl/I\n-----END CERTIFICATE-----\n";

    #[test]
    fn bundles_and_directories_load_every_certificate_once_and_skip_the_rest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("a.pem"), CERT).expect("write");
        std::fs::write(dir.join("b.pem"), CERT2).expect("write");
        std::fs::write(dir.join("README"), "not a certificate\n").expect("write");
        let bundle = tmp.path().join("bundle.pem");
        let text = format!("# a comment\n{CERT}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{CERT2}");
        std::fs::write(&bundle, text).expect("write");
        let from_bundle = load(&Sources {
            files: vec![bundle.clone()],
            dirs: Vec::new(),
        });
        assert_eq!(from_bundle.len(), 2);
        let from_dir = load(&Sources {
            files: vec![tmp.path().join("missing.pem")],
            dirs: vec![dir.clone(), tmp.path().join("missing")],
        });
        assert_eq!(from_dir.len(), 2);
        // The bundle and the directory of the same two: two.
        let both = load(&Sources {
            files: vec![bundle],
            dirs: vec![dir],
        });
        assert_eq!(both.len(), 2);
        // Blocks that are not base64, or not a certificate's DER, are
        // skipped (reqwest would refuse to build a client with them).
        let bad = tmp.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n\
             -----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(load(&Sources {
            files: vec![bad],
            dirs: Vec::new(),
        })
        .is_empty());
    }
}
