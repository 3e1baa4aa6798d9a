//! Replays, on stable Rust, every input that ever crashed a fuzz target
//! (`fuzz/regressions/<target>/*`, see docs/fuzzing.md), and checks that
//! every generated seed is accepted by the entry point it was made for, so
//! that the fuzz targets demonstrably reach past the first checks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use skiff_fuzz::seeds::seeds;
use skiff_fuzz::{run, TARGETS};

fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions")
}

#[test]
fn committed_crashes_do_not_crash_any_more() {
    let dir = regressions_dir();
    let mut replayed = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fuzz/regressions/ is committed") {
        let entry = entry.unwrap();
        if !entry.file_type().unwrap().is_dir() {
            continue;
        }
        let target = entry.file_name().into_string().unwrap();
        assert!(
            TARGETS.contains(&target.as_str()),
            "fuzz/regressions/{target}/ is not named after a fuzz target ({TARGETS:?})"
        );
        for file in std::fs::read_dir(entry.path()).unwrap() {
            let path = file.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            replayed += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&target, &data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    eprintln!("replayed {replayed} committed fuzz regressions");
    assert!(
        failures.is_empty(),
        "these inputs still panic: {failures:#?}"
    );
}

/// The steps that must accept a seed, by target and seed name.
fn must_accept(target: &str, seed: &str) -> &'static [&'static str] {
    match (target, seed) {
        ("bootstrap", _) => &["parse"],
        ("layer", _) => &["finish"],
        ("manifest", "oci-manifest" | "docker-manifest") => &["manifest"],
        ("manifest", "config") => &["config", "build_config"],
        ("manifest", "index") => &["index", "index-tag"],
        ("manifest", "docker-archive") => &["archive"],
        ("manifest", "docker-archive-raw.tar") => &["archive-raw"],
        ("chunk", _) => &["decode", "source"],
        _ => panic!("no expectation for seed {seed} of {target}"),
    }
}

#[test]
fn every_seed_is_accepted() {
    for target in TARGETS {
        let all = seeds(target, None);
        assert!(all.len() >= 3, "{target}: only {} seeds", all.len());
        for (name, data) in all {
            let outcome = run(target, &data).unwrap();
            for step in must_accept(target, &name) {
                assert!(
                    outcome.accepted(step),
                    "{target} seed {name}: step {step} did not accept it: {:?}",
                    outcome.steps
                );
            }
            if target == "chunk" {
                let rejected: Vec<_> = outcome.steps.iter().filter(|(_, r)| r.is_err()).collect();
                assert!(rejected.is_empty(), "chunk seed {name}: {rejected:?}");
            }
        }
    }
}

#[test]
fn a_resealed_tar_reaches_the_converter() {
    // A flipped mode digit breaks the header checksum; resealing repairs
    // it, so the converter sees (and accepts) the changed header.
    let mut tar = skiff_fuzz::seeds::sample_layer();
    let first_mode = tar[100..108].iter().position(|&b| b == b'6').unwrap() + 100;
    tar[first_mode] = b'4';
    let outcome = run("layer", &tar).unwrap();
    assert!(!outcome.accepted("add_layer"), "{:?}", outcome.steps);
    assert!(outcome.accepted("finish-resealed"), "{:?}", outcome.steps);
}
