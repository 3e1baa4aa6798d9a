//! `skiff cache`: show, trim or clear the disk cache of fetched chunks.
//!
//! Safe while mounts use the directory: to a daemon, a chunk file deleted
//! under it is a cache miss (it fetches the chunk again).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use skiff_fusefs::disk::{clear, parse_size, trim, usage};

/// Arguments of `skiff cache`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The cache directory [default: as for `skiff mount`].
    #[arg(long, value_name = "DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// What to do (default: show).
    #[command(subcommand)]
    pub action: Option<CacheAction>,
}

/// What `skiff cache` does.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Print the number of cached chunks and their bytes.
    Show,
    /// Delete least recently used chunks until the cache holds at most SIZE.
    Trim {
        /// The size to trim to (e.g. 5g, 512m).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete every cached chunk.
    Clear,
}

/// Runs `skiff cache`.
pub fn run(args: CacheArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .cache_dir
        .or_else(crate::mount::default_cache_dir)
        .context("no cache directory: pass --cache-dir")?;
    let shown = dir.display().to_string();
    match args.action.unwrap_or(CacheAction::Show) {
        CacheAction::Show => {
            let u = usage(&dir).with_context(|| format!("reading {shown}"))?;
            println!(
                "{shown}: {} chunks, {} bytes ({:.1} MB)",
                u.entries,
                u.bytes,
                u.bytes as f64 / 1e6
            );
        }
        CacheAction::Trim { size } => {
            let r = trim(&dir, size).with_context(|| format!("trimming {shown}"))?;
            let u = usage(&dir).with_context(|| format!("reading {shown}"))?;
            println!(
                "{shown}: removed {} chunks ({} bytes); {} chunks, {} bytes left",
                r.entries, r.bytes, u.entries, u.bytes
            );
        }
        CacheAction::Clear => {
            let r = clear(&dir).with_context(|| format!("clearing {shown}"))?;
            println!("{shown}: removed {} chunks ({} bytes)", r.entries, r.bytes);
        }
    }
    Ok(ExitCode::SUCCESS)
}
