//! `skiff upgrade`: hot upgrade of running mounts to a new binary.
//!
//! Each mount's keeper (see `skiff_fusefs::keeper`) is asked to hand its
//! mount over to a worker of the new binary and to `execve` it itself; the
//! mount and the containers on it keep running, readers see a pause. The
//! snapshotter itself is restarted the usual way (its mounts outlive it);
//! docs/operations.md has the whole sequence.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use skiff_fusefs::keeper;

/// Arguments of `skiff upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Keeper state directories: one mount's (with a keeper.json), or a
    /// directory of them (the snapshotter's ROOT/mounts, or /run/skiff/mounts)
    /// [default: /run/skiff/mounts].
    pub dirs: Vec<PathBuf>,
    /// The new binary [default: this one].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// How long each mount may take to be served by the new binary, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Print one JSON object per mount instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// Runs `skiff upgrade`; fails if any mount could not be upgraded.
pub fn run(args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe().context("finding this binary")?,
    };
    let roots = if args.dirs.is_empty() {
        vec![PathBuf::from("/run/skiff/mounts")]
    } else {
        args.dirs
    };
    let dirs: Vec<PathBuf> = roots.iter().flat_map(|d| keeper::state_dirs(d)).collect();
    if dirs.is_empty() {
        anyhow::bail!(
            "no keeper state (keeper.json) under {}",
            roots
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut failed = 0;
    for dir in &dirs {
        match keeper::upgrade(dir, &binary, Duration::from_secs(args.timeout)) {
            Ok(r) if args.json => println!("{}", serde_json::to_string(&r)?),
            Ok(r) => println!(
                "skiff: upgraded {} (keeper {}, worker {} -> {}, pause {} ms)",
                r.mountpoint.display(),
                r.keeper_pid,
                r.old_worker.map_or("-".into(), |p| p.to_string()),
                r.new_worker.map_or("-".into(), |p| p.to_string()),
                r.pause_ms.map_or("?".into(), |p| p.to_string()),
            ),
            Err(e) => {
                failed += 1;
                // The whole chain: the context names the mount, the
                // source says what went wrong.
                eprintln!("skiff: error: {:#}", anyhow::Error::new(e));
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} mounts were not upgraded", dirs.len());
    }
    Ok(ExitCode::SUCCESS)
}
