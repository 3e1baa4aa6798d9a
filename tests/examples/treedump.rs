//! Prints the canonical dump of a tree, or compares two trees.
//!
//! ```text
//! cargo run --release -p skiff-tests --example treedump -- [OPTIONS] DIR [OTHER_DIR]
//!   --seconds        mtimes to the second
//!   --no-mtime       no mtimes
//!   --no-dir-mtime   no directory mtimes
//!   --no-root        not the root directory's own attributes
//!   --no-content     no sha256 of file contents
//! ```
//!
//! With one directory it prints the dump; with two it prints the comparison
//! and exits 1 when they differ.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use skiff_tests::treedump::{compare_named, dump, DumpOptions, MtimeMode};

fn main() -> ExitCode {
    let mut opts = DumpOptions::default();
    let mut dirs = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--seconds" => opts.mtime = MtimeMode::Seconds,
            "--no-mtime" => opts.mtime = MtimeMode::Ignore,
            "--no-dir-mtime" => opts.dir_mtime = false,
            "--no-root" => opts.root_attrs = false,
            "--no-content" => opts.content = false,
            "-h" | "--help" => {
                eprintln!("usage: treedump [--seconds|--no-mtime] [--no-dir-mtime] [--no-root] [--no-content] DIR [OTHER_DIR]");
                return ExitCode::SUCCESS;
            }
            s if s.starts_with('-') => {
                eprintln!("treedump: unknown option {s}");
                return ExitCode::from(2);
            }
            _ => dirs.push(PathBuf::from(arg)),
        }
    }
    let mut dumps = Vec::new();
    for d in &dirs {
        let start = Instant::now();
        match dump(d, &opts) {
            Ok(x) => {
                eprintln!(
                    "treedump: {}: {} paths in {:.2} s",
                    d.display(),
                    x.len(),
                    start.elapsed().as_secs_f64()
                );
                dumps.push(x);
            }
            Err(e) => {
                eprintln!("treedump: {e}");
                return ExitCode::from(2);
            }
        }
    }
    match dumps.as_slice() {
        [one] => {
            print!("{one}");
            ExitCode::SUCCESS
        }
        [a, b] => {
            let (na, nb) = (dirs[0].to_string_lossy(), dirs[1].to_string_lossy());
            match compare_named(a, &na, b, &nb) {
                Ok(()) => {
                    println!("equal ({} paths)", a.len());
                    ExitCode::SUCCESS
                }
                Err(report) => {
                    print!("{report}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("treedump: give one or two directories (--help)");
            ExitCode::from(2)
        }
    }
}
