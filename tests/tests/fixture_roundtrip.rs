//! Acceptance tests on the fixture image (`FIXTURES/images:python`, a real
//! two-layer Debian + Python image):
//!
//! - convert, check, unpack: the unpacked tree equals `umoci unpack`'s in
//!   every attribute (type, mode, owner, size, content, symlink target,
//!   xattrs, device numbers, hard-link groups, mtime at least to the second);
//! - determinism: two conversions give byte-identical layouts.
//!
//! Both need the release `skiff` binary (`SKIFF_BIN`), the fixtures
//! (`SKIFF_FIXTURES`) and umoci; without them they fail, they do not skip.

// Tests state what they expect of each step.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use skiff_tests::harness::{fixture_image, remove_all, scratch_root, skiff, umoci_rootfs};
use skiff_tests::treedump::{compare_named, dump, Dump, DumpOptions, MtimeMode};

/// Where this test binary keeps its conversions (left in place after a run
/// for inspection; removed at the start of the next one).
fn work_dir() -> PathBuf {
    scratch_root().join("fixture-roundtrip")
}

/// Converts the fixture into `dir` (an OCI layout, tag `python`) and returns
/// the `--json` summary.
fn convert_fixture(dir: &Path) -> serde_json::Value {
    remove_all(dir);
    let dest = format!("oci:{}:python", dir.display());
    let start = Instant::now();
    let out = skiff([
        "convert",
        "--json",
        "--no-progress",
        &fixture_image(),
        &dest,
    ]);
    let summary: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => panic!(
            "skiff convert --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
    };
    eprintln!(
        "converted the fixture into {} in {:.1} s: manifest {}, {} bytes out",
        dir.display(),
        start.elapsed().as_secs_f64(),
        summary["manifest_digest"],
        summary["bytes_out"]
    );
    summary
}

/// The fixture converted once per test binary: (layout dir, summary).
fn converted() -> &'static (PathBuf, serde_json::Value) {
    static CONVERTED: OnceLock<(PathBuf, serde_json::Value)> = OnceLock::new();
    CONVERTED.get_or_init(|| {
        let dir = work_dir().join("out-a");
        let summary = convert_fixture(&dir);
        (dir, summary)
    })
}

fn timed_dump(root: &Path, opts: &DumpOptions) -> Dump {
    let start = Instant::now();
    let d = match dump(root, opts) {
        Ok(d) => d,
        Err(e) => panic!("dumping {}: {e}", root.display()),
    };
    eprintln!(
        "dumped {} ({} paths) in {:.1} s",
        root.display(),
        d.len(),
        start.elapsed().as_secs_f64()
    );
    d
}

#[test]
fn fixture_converts_checks_and_unpacks_like_umoci() {
    let reference_root = umoci_rootfs();
    let (layout, _) = converted();
    let image = format!("oci:{}:python", layout.display());

    let start = Instant::now();
    let check = skiff(["check", &image]);
    eprintln!(
        "skiff check in {:.1} s: {}",
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&check.stdout).trim()
    );

    let unpacked = work_dir().join("unpacked");
    remove_all(&unpacked);
    let start = Instant::now();
    let out = skiff(["unpack", image.as_str(), &unpacked.to_string_lossy()]);
    eprintln!(
        "skiff unpack in {:.1} s: {}",
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).trim()
    );

    // Every field, mtimes to the nanosecond; precision is relaxed below
    // only for the report.
    let opts = DumpOptions::all().with_mtime(MtimeMode::Exact);
    let reference = timed_dump(&reference_root, &opts);
    let got = timed_dump(&unpacked, &opts);
    assert!(
        reference.len() > 10_000,
        "the reference tree is suspiciously small ({} paths): is {} a complete umoci unpack?",
        reference.len(),
        reference_root.display()
    );

    let outcome = match compare_named(&reference, "umoci", &got, "skiff") {
        Ok(()) => format!(
            "unpacked tree equals umoci's in every field, mtimes to the nanosecond ({} paths)",
            got.len()
        ),
        Err(exact_report) => {
            let secs = compare_named(
                &reference.with_mtime_seconds(),
                "umoci",
                &got.with_mtime_seconds(),
                "skiff",
            );
            match secs {
                Ok(()) => format!(
                    "unpacked tree equals umoci's in every field; mtimes match to the second \
                     only; at nanosecond precision:\n{exact_report}"
                ),
                Err(report) => panic!(
                    "skiff unpack differs from umoci unpack (mtimes compared to the second)\n\
                     reference {}\nunpacked  {}\n{report}",
                    reference_root.display(),
                    unpacked.display()
                ),
            }
        }
    };
    eprintln!("{outcome}");
    // Kept for the record: which mtime precision matched.
    let record = work_dir().join("roundtrip-result.txt");
    std::fs::write(&record, format!("{outcome}\n")).expect("write the result record");
    remove_all(&unpacked);
}

#[test]
fn converting_twice_gives_identical_layouts() {
    let (first, first_summary) = converted();
    let second = work_dir().join("out-b");
    let second_summary = convert_fixture(&second);
    assert_eq!(
        first_summary["manifest_digest"], second_summary["manifest_digest"],
        "manifest digests differ between two conversions"
    );
    // Names, sizes and contents of every file of the layouts (index.json,
    // oci-layout, blobs/sha256/*); times and owners do not matter here.
    let opts = DumpOptions {
        mtime: MtimeMode::Ignore,
        owner: false,
        mode: false,
        xattrs: false,
        ..DumpOptions::default()
    };
    let a = timed_dump(first, &opts);
    let b = timed_dump(&second, &opts);
    assert!(
        a.contains("/index.json"),
        "no index.json in {}",
        first.display()
    );
    assert!(
        a.paths()
            .filter(|p| p.starts_with("/blobs/sha256/"))
            .count()
            >= 3,
        "too few blobs in {}:\n{a}",
        first.display()
    );
    if let Err(report) = compare_named(&a, "first", &b, "second") {
        panic!(
            "two conversions of the fixture differ ({} and {}):\n{report}",
            first.display(),
            second.display()
        );
    }
    remove_all(&second);
}
