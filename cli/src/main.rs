//! `skiff`: the one binary of Skiff, a lazy-loading container image filesystem.
//!
//! Thin glue over the library crates: argument parsing (clap), logging
//! (tracing, `RUST_LOG`), progress bars (indicatif) and exit codes. Every
//! subcommand lives in its own module and returns `anyhow::Result`; `main`
//! prints the error chain and exits non-zero.
//!
//! # Layout
//! - `convert`: `skiff convert`, OCI image or layer tars to a Skiff image.
//! - `mount`: `skiff mount`, the FUSE daemon in the foreground.
//! - `malloc`: the glibc malloc settings of the mount daemon.
//! - `cache`: `skiff cache`, the disk cache of fetched chunks.
//! - `snapshotter`: `skiff snapshotter`, the containerd remote snapshotter.
//! - `store`: `skiff store`, the Additional Layer Store for podman and CRI-O.
//! - `upgrade`: `skiff upgrade`, hot upgrade of running mounts to a new binary.
//! - `tools`: `skiff inspect`, `skiff check` and `skiff unpack`.
//! - `progress`: the terminal progress bar for conversions.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cache;
mod convert;
mod malloc;
mod mount;
mod progress;
mod snapshotter;
mod store;
mod tools;
mod upgrade;

/// Skiff: lazy-loading container images.
#[derive(Debug, Parser)]
#[command(name = "skiff", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert an OCI image (or plain layer tars) into a Skiff image.
    Convert(convert::ConvertArgs),
    /// Show an image's summary, a path's attributes, or a file's chunk map.
    Inspect(tools::InspectArgs),
    /// Verify every checksum, blob and chunk of an image.
    Check(tools::CheckArgs),
    /// Write an image's merged file tree into a directory.
    Unpack(tools::UnpackArgs),
    /// Mount an image read-only with FUSE (foreground; Ctrl-C unmounts).
    Mount(mount::MountArgs),
    /// Show, trim or clear the disk cache of fetched chunks.
    Cache(cache::CacheArgs),
    /// Serve containerd's snapshots API (a remote snapshotter for Skiff images).
    Snapshotter(snapshotter::SnapshotterArgs),
    /// Serve containers/storage's Additional Layer Store (podman, CRI-O).
    Store(store::StoreArgs),
    /// Hand running mounts over to a new binary, without unmounting.
    Upgrade(upgrade::UpgradeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Convert(args) => convert::run(args),
        Command::Inspect(args) => tools::inspect(args),
        Command::Check(args) => tools::check(args),
        Command::Unpack(args) => tools::unpack(args),
        Command::Mount(args) => mount::run(args),
        Command::Snapshotter(args) => snapshotter::run(args),
        Command::Store(args) => store::run(args),
        Command::Cache(args) => cache::run(args),
        Command::Upgrade(args) => upgrade::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skiff: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
