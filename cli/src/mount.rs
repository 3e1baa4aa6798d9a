//! `skiff mount`: serve an image read-only with FUSE, in the foreground.
//!
//! Opening the image reads its manifest and bootstrap and nothing else; the
//! mount is served as soon as the bootstrap is checksummed. One line on
//! stdout says when the mount is ready (scripts wait for it, or for
//! `--pid-file`); logs go to stderr (`RUST_LOG`). SIGINT or SIGTERM
//! unmounts and exits 0.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use skiff_fusefs::{Daemon, MountOptions, StoreFetcher};
use skiff_registry::skiff::open_image;
use skiff_registry::ImageRef;

/// Arguments of `skiff mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The image: oci:DIR[:TAG].
    pub image: String,
    /// An existing directory to mount it on.
    pub mountpoint: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Memory cache of decompressed chunks, in MiB.
    #[arg(long, default_value_t = 64)]
    pub cache_mb: u64,
    /// Readahead of the mount in KiB (0: the kernel's default).
    #[arg(long, default_value_t = 1024)]
    pub readahead_kb: u32,
    /// Let users other than the one mounting access the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Honour device nodes in the image (default: nodev).
    #[arg(long)]
    pub dev: bool,
    /// Honour setuid/setgid bits in the image (default: nosuid).
    #[arg(long)]
    pub suid: bool,
    /// Lazily unmount a stale FUSE mount left at MOUNTPOINT by a dead daemon.
    #[arg(long)]
    pub force_unmount: bool,
    /// Write the daemon's PID to this file once the mount is ready.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
}

/// Runs `skiff mount`: returns once the mount is gone.
pub fn run(args: MountArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let reference: ImageRef = args
        .image
        .parse()
        .with_context(|| format!("image '{}'", args.image))?;
    let image = open_image(&reference).with_context(|| format!("opening {}", args.image))?;
    let mut opts = MountOptions::new(&args.mountpoint);
    opts.threads = args.threads.max(1);
    opts.cache_bytes = args.cache_mb.saturating_mul(1 << 20);
    opts.readahead_kb = args.readahead_kb;
    opts.allow_other = args.allow_other;
    opts.dev = args.dev;
    opts.suid = args.suid;
    opts.force_unmount = args.force_unmount;
    let fetcher = Arc::new(StoreFetcher::new(image.store.clone()));
    let daemon = Daemon::start(&opts, Box::new(image.bootstrap), fetcher)
        .with_context(|| format!("mounting {} at {}", args.image, args.mountpoint.display()))?;
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", pid_file.display()))?;
    }
    println!(
        "skiff: mounted {} at {} ({} inodes, bootstrap {} bytes, ready in {:.1} ms)",
        args.image,
        args.mountpoint.display(),
        daemon.inode_count(),
        daemon.bootstrap_len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let (_, metrics) = daemon.wait().context("serving the mount")?;
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    // The exit summary: what this mount read and fetched, for the operator.
    // Not println!: whoever started us may have closed our stdout by now.
    let _ = writeln!(
        std::io::stdout(),
        "skiff: unmounted {}: {metrics}",
        args.mountpoint.display()
    );
    Ok(ExitCode::SUCCESS)
}
