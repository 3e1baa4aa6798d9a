//! `skiff store`: containers/storage's Additional Layer Store for podman,
//! CRI-O and buildah, in the foreground. Skiff images in a registry become
//! layers that containers/storage takes without downloading them; every
//! other image is left to it. Logs go to stderr (`RUST_LOG`, e.g. `info`);
//! SIGINT or SIGTERM unmounts the store and leaves the image mounts
//! running for the containers that use them. See docs/podman.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use skiff_snapshotter::Config;

/// The default root directory of `skiff store`.
const DEFAULT_ROOT: &str = "/var/lib/skiff-store";

/// Arguments of `skiff store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Where to serve the layer store: the path named in storage.conf's
    /// `additionallayerstores = ["PATH:ref"]` (default ROOT/store).
    pub mountpoint: Option<PathBuf>,
    /// Configuration file in the snapshotter's format: its `[mount]` (the
    /// image daemons) and `[registry]` tables apply, as do `skiff_bin` and
    /// `registry_config_path`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory for the store's state, image mounts and blobs
    /// (default /var/lib/skiff-store; overrides the file).
    #[arg(long)]
    pub root: Option<PathBuf>,
}

/// Runs `skiff store` until SIGINT or SIGTERM.
pub fn run(args: StoreArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).context("reading the configuration")?,
        None => Config {
            root: PathBuf::from(DEFAULT_ROOT),
            ..Config::default()
        },
    };
    if args.config.is_some() && config.root == Config::default().root {
        // The snapshotter's default root belongs to the snapshotter.
        config.root = PathBuf::from(DEFAULT_ROOT);
    }
    if let Some(root) = args.root {
        config.root =
            std::path::absolute(&root).with_context(|| format!("root {}", root.display()))?;
    }
    let mountpoint = match args.mountpoint {
        Some(m) => {
            std::path::absolute(&m).with_context(|| format!("mount point {}", m.display()))?
        }
        None => config.root.join("store"),
    };
    skiff_fusefs::disk::CacheLimit::parse(&config.mount.cache_size)
        .map_err(|e| anyhow::anyhow!("mount.cache_size: {e}"))?;
    if let Some(low) = &config.mount.cache_low {
        skiff_fusefs::disk::CacheLimit::parse(low)
            .map_err(|e| anyhow::anyhow!("mount.cache_low: {e}"))?;
    }
    skiff_snapshotter::alsfs::run(config, &mountpoint).context("skiff store")?;
    Ok(ExitCode::SUCCESS)
}
