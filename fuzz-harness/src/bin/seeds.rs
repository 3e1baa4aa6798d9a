//! Writes the seed inputs of every fuzz target: `DIR/<target>/<name>` for
//! each seed of [`skiff_fuzz::seeds::seeds`].
//!
//! Usage: `skiff-fuzz-seeds DIR [FIXTURES]`. FIXTURES, the fixture
//! directory, lends the real fixture image's documents to the manifest
//! target when given.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: skiff-fuzz-seeds DIR [FIXTURES]");
        return ExitCode::from(2);
    };
    let fixtures = args.next().map(PathBuf::from);
    let mut written = 0;
    for target in skiff_fuzz::TARGETS {
        let out = dir.join(target);
        if let Err(e) = std::fs::create_dir_all(&out) {
            eprintln!("skiff-fuzz-seeds: {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
        for (name, bytes) in skiff_fuzz::seeds::seeds(target, fixtures.as_deref().map(Path::new)) {
            let path = out.join(format!("seed-{name}"));
            if let Err(e) = std::fs::write(&path, bytes) {
                eprintln!("skiff-fuzz-seeds: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            written += 1;
        }
    }
    eprintln!("skiff-fuzz-seeds: {written} seeds in {}", dir.display());
    ExitCode::SUCCESS
}
