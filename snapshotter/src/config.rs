//! [`Config`]: the snapshotter's configuration file (TOML).
//!
//! Every field has a default, so an empty file (or none) works:
//!
//! ```toml
//! root = "/var/lib/skiff-snapshotter"     # metadata, snapshots, image mounts
//! address = "/run/skiff/snapshotter.sock" # the gRPC socket (created 0600)
//! # skiff_bin = "/usr/local/bin/skiff"    # binary for `skiff mount` (default: this one)
//! # containerd's registry config_path: hosts.toml files (mirrors, CAs, plain HTTP)
//! registry_config_path = "/etc/containerd/certs.d"
//!
//! [mount]                                 # the per-image FUSE daemons
//! threads = 8
//! cache_mb = 4                            # memory cache of decompressed chunks
//! read_budget_secs = 30                   # a read waits this long for the network, then EIO
//! readahead_kb = 1024
//! fetch_window_kb = 256                   # a miss also fetches what follows in the blob, at first
//! fetch_window_max_kb = 4096              # ... growing up to this while the round trips it saves pay for it
//! ready_timeout_secs = 120                # how long a mount may take (bootstrap download)
//! # cache_dir = "/var/cache/skiff"        # disk cache of chunks, shared by all images
//! cache_size = "10g"                      # its high watermark: bytes or "20%" of its filesystem
//! # cache_low = "9g"                      # evict down to this (default: 90% of cache_size)
//! background_fetch = "off"                # the rest of each image after its prefetch list: off, on, or bytes/s ("12m")
//! metrics = true                          # ROOT/metrics/DIGEST16.sock (Prometheus text)
//!
//! # CRI's image service on the snapshotter's socket (kubelet's
//! # --image-service-endpoint): calls are forwarded to containerd's CRI and
//! # the credentials of each PullImage are kept in memory for the mounts of
//! # that image (see docs/kubernetes.md).
//! [cri]
//! image_service = true
//! containerd_address = "/run/containerd/containerd.sock"
//!
//! # How the snapshotter and its daemons talk to registries: the registry
//! # configuration of Skiff (insecure registries, mirrors, credentials, CA,
//! # proxy, timeouts; see the registry crate). Written to ROOT/registry.toml
//! # and passed on through SKIFF_REGISTRY_CONFIG. Credentials also come from
//! # the Docker config file (~/.docker/config.json, $DOCKER_CONFIG).
//! [registry]
//! insecure_registries = ["registry.lan:5000"]
//! [[registry.mirrors."docker.io"]]
//! url = "https://mirror.corp"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The default root directory.
pub const DEFAULT_ROOT: &str = "/var/lib/skiff-snapshotter";
/// The default socket address.
pub const DEFAULT_ADDRESS: &str = "/run/skiff/snapshotter.sock";

/// The snapshotter's configuration. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where metadata, snapshots and image mounts live.
    pub root: PathBuf,
    /// The unix socket to serve on.
    pub address: PathBuf,
    /// The `skiff` binary that runs the FUSE daemons (`skiff mount`); by
    /// default the running executable.
    pub skiff_bin: Option<PathBuf>,
    /// containerd's registry host directory (`config_path` of its CRI
    /// registry configuration): the `hosts.toml` of each registry is read
    /// by the snapshotter and its mount daemons too, so mirrors, CAs and
    /// plain-HTTP registries are configured once. Empty for none.
    pub registry_config_path: PathBuf,
    /// Settings of the per-image FUSE daemons.
    pub mount: MountConfig,
    /// CRI's image service on the snapshotter's socket.
    pub cri: CriConfig,
    /// Skiff's registry configuration, passed on as a file through
    /// `SKIFF_REGISTRY_CONFIG` (see the registry crate for its fields).
    pub registry: Option<toml::Table>,
}

/// CRI's `ImageService` on the snapshotter's socket, for kubelet's
/// `--image-service-endpoint`: every call is forwarded to containerd's CRI,
/// and the `AuthConfig` of each `PullImage` is kept in memory (never on
/// disk, in logs or in metrics) for the mounts of that image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriConfig {
    /// Serve the image service (on by default; harmless when kubelet talks
    /// to containerd directly, but then private images get only the
    /// credentials of the `[registry]` configuration).
    pub image_service: bool,
    /// containerd's gRPC socket, where its CRI plugin answers.
    pub containerd_address: PathBuf,
}

/// containerd's default socket.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";

impl Default for CriConfig {
    fn default() -> Self {
        CriConfig {
            image_service: true,
            containerd_address: PathBuf::from(DEFAULT_CONTAINERD_ADDRESS),
        }
    }
}

/// Settings of the per-image FUSE daemons (`skiff mount` options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MountConfig {
    /// FUSE worker threads per daemon.
    pub threads: usize,
    /// Memory cache of decompressed chunks per daemon, in MiB: small, since
    /// the page cache and the disk cache hold the data (`skiff mount
    /// --cache-mb`).
    pub cache_mb: u64,
    /// How long a container's read may wait for chunks that are not on the
    /// node, retries included, before it fails with `EIO` (`skiff mount
    /// --read-budget-secs`). A container would rather see an error in
    /// seconds than hang in the kernel for minutes.
    pub read_budget_secs: u64,
    /// Readahead of each mount in KiB.
    pub readahead_kb: u32,
    /// On a miss, also fetch this many KiB of what follows in the blob
    /// (`skiff mount --fetch-window-kb`): larger trades bytes for round
    /// trips (docs/operations.md has the figures).
    pub fetch_window_kb: u64,
    /// The fetch window grows up to this many KiB while the round trips
    /// it saves are worth its bytes (`skiff mount --fetch-window-max-kb`).
    pub fetch_window_max_kb: u64,
    /// How long a daemon may take to have its mount ready, in seconds.
    pub ready_timeout_secs: u64,
    /// The disk cache of fetched chunks, shared by every image (and by
    /// plain `skiff mount`s on the node); `skiff mount`'s default when unset
    /// (/var/cache/skiff for root).
    pub cache_dir: Option<PathBuf>,
    /// Bound of the disk cache, its high watermark (`skiff mount
    /// --cache-size`: 10g, 512m, or a percentage of its filesystem, 20%).
    pub cache_size: String,
    /// Low watermark of the disk cache: eviction frees down to it (`skiff
    /// mount --cache-low`; default 90% of `cache_size`).
    pub cache_low: Option<String>,
    /// Fetch the rest of each image in the background after its prefetch
    /// list (`skiff mount --background-fetch`): `off`, `on`, or a cap in
    /// bytes per second (`12m`). Beside other fetches it keeps one request
    /// in flight, and it stops at the disk cache's low watermark.
    pub background_fetch: String,
    /// Serve each daemon's metrics on `ROOT/metrics/DIGEST16.sock` (the
    /// first 16 hex digits of the image's digest).
    pub metrics: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            skiff_bin: None,
            registry_config_path: PathBuf::from(skiff_registry::hosts::DEFAULT_HOSTS_DIR),
            mount: MountConfig::default(),
            cri: CriConfig::default(),
            registry: None,
        }
    }
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            threads: 8,
            cache_mb: 4,
            read_budget_secs: 30,
            readahead_kb: 1024,
            fetch_window_kb: skiff_fusefs::daemon::DEFAULT_FETCH_WINDOW / 1024,
            fetch_window_max_kb: skiff_fusefs::daemon::DEFAULT_FETCH_WINDOW_MAX / 1024,
            ready_timeout_secs: 120,
            cache_dir: None,
            cache_size: "10g".into(),
            cache_low: None,
            background_fetch: "off".into(),
            metrics: true,
        }
    }
}

impl Config {
    /// The registry host directory, `None` when `registry_config_path` is
    /// empty.
    pub fn hosts_dir(&self) -> Option<PathBuf> {
        (!self.registry_config_path.as_os_str().is_empty())
            .then(|| self.registry_config_path.clone())
    }

    /// Reads a TOML configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks the values that would only fail later.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.root.is_absolute() {
            return Err(Error::Config(format!(
                "root must be an absolute path, not {}",
                self.root.display()
            )));
        }
        if self.address.as_os_str().is_empty() {
            return Err(Error::Config("address is empty".into()));
        }
        if let Some(dir) = &self.mount.cache_dir {
            if !dir.is_absolute() {
                return Err(Error::Config(format!(
                    "mount.cache_dir must be an absolute path, not {}",
                    dir.display()
                )));
            }
        }
        if self.mount.read_budget_secs == 0 {
            return Err(Error::Config(
                "mount.read_budget_secs must be at least 1".into(),
            ));
        }
        if self
            .registry
            .as_ref()
            .is_some_and(|t| t.contains_key("hosts_dir"))
        {
            return Err(Error::Config(
                "[registry] hosts_dir: set registry_config_path (at the top level) instead".into(),
            ));
        }
        if self.cri.image_service && self.cri.containerd_address.as_os_str().is_empty() {
            return Err(Error::Config("cri.containerd_address is empty".into()));
        }
        if let Err(e) = skiff_fusefs::BackgroundFetch::parse(&self.mount.background_fetch) {
            return Err(Error::Config(format!("mount.background_fetch: {e}")));
        }
        if self.mount.threads == 0 {
            return Err(Error::Config("mount.threads must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_default() {
        assert_eq!(Config::from_toml(""), Ok(Config::default()));
    }

    #[test]
    fn full_file() {
        let c = Config::from_toml(
            r#"
root = "/tmp/r"
address = "/tmp/s.sock"
[mount]
threads = 2
cache_mb = 16
[registry]
insecure_registries = ["a:5000"]
"#,
        )
        .unwrap_or_default();
        assert_eq!(c.root, PathBuf::from("/tmp/r"));
        assert_eq!(c.mount.threads, 2);
        assert_eq!(c.mount.cache_mb, 16);
        assert_eq!(c.mount.readahead_kb, 1024);
        assert!(c.registry.is_some());
    }

    #[test]
    fn shipped_example_parses() {
        let c = Config::from_toml(include_str!("../../contrib/snapshotter.toml"));
        assert_eq!(c, Ok(Config::default()));
    }

    #[test]
    fn registry_config_path_and_cache_low() {
        let c = Config::default();
        assert_eq!(
            c.hosts_dir(),
            Some(PathBuf::from("/etc/containerd/certs.d"))
        );
        let c = Config::from_toml("registry_config_path = \"\"\n[mount]\ncache_low = \"15%\"\n")
            .unwrap_or_default();
        assert_eq!(c.hosts_dir(), None);
        assert_eq!(c.mount.cache_low.as_deref(), Some("15%"));
        // The background fetch setting is checked when the file is read.
        let c = Config::from_toml("[mount]\nbackground_fetch = \"12m\"\n").unwrap_or_default();
        assert!(c.validate().is_ok());
        let c = Config::from_toml("[mount]\nbackground_fetch = \"fast\"\n").unwrap_or_default();
        let e = c.validate().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("background_fetch"), "{e}");
        // One setting for resolver and daemons: not [registry] hosts_dir.
        let c = Config::from_toml("[registry]\nhosts_dir = \"/x\"\n").unwrap_or_default();
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("registry_config_path"), "{e}");
    }

    #[test]
    fn unknown_field_is_an_error() {
        assert!(Config::from_toml("rot = \"/x\"").is_err());
    }
}
