//! `skiff snapshotter`: the containerd remote snapshotter (proxy plugin),
//! in the foreground; its socket also serves CRI's image service for
//! kubelet's `--image-service-endpoint` (`[cri]` in the configuration). Logs go to stderr (`RUST_LOG`, e.g. `info`); SIGINT
//! or SIGTERM stops serving and leaves the image mounts running for the
//! containers that use them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use skiff_snapshotter::Config;

/// Arguments of `skiff snapshotter`.
#[derive(Debug, Args)]
pub struct SnapshotterArgs {
    /// Configuration file (TOML: root, address, [mount], [cri], [registry]).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory for metadata, snapshots and image mounts
    /// (default /var/lib/skiff-snapshotter; overrides the file).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Unix socket to serve on (default /run/skiff/snapshotter.sock;
    /// overrides the file).
    #[arg(long)]
    pub address: Option<PathBuf>,
}

/// Runs `skiff snapshotter` until SIGINT or SIGTERM.
pub fn run(args: SnapshotterArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).context("reading the configuration")?,
        None => Config::default(),
    };
    if let Some(root) = args.root {
        config.root =
            std::path::absolute(&root).with_context(|| format!("root {}", root.display()))?;
    }
    if let Some(address) = args.address {
        config.address = address;
    }
    // The daemons parse the size; a bad one should stop us now, not fail
    // every image mount later.
    skiff_fusefs::disk::CacheLimit::parse(&config.mount.cache_size)
        .map_err(|e| anyhow::anyhow!("mount.cache_size: {e}"))?;
    if let Some(low) = &config.mount.cache_low {
        skiff_fusefs::disk::CacheLimit::parse(low)
            .map_err(|e| anyhow::anyhow!("mount.cache_low: {e}"))?;
    }
    skiff_snapshotter::run(config).context("skiff snapshotter")?;
    Ok(ExitCode::SUCCESS)
}
