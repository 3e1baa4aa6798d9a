//! The registry path end to end, with real parts only: Debian's
//! docker-registry on 127.0.0.1, the fixture image pushed there by skopeo,
//! `skiff convert` from one repository of that registry to another, and a
//! lazy `skiff mount docker://...` compared with the rootfs `umoci unpack`
//! makes from the original image; then the python import workload in a
//! chroot of the mount.

use std::path::PathBuf;
use std::process::Command;

use skiff_tests::harness::{
    fixture_image, import_in_chroot, on_path, remove_all, run, scratch_root, skiff, umoci_rootfs,
};
use skiff_tests::services::{summary_value, Registry, SkiffMount};
use skiff_tests::treedump::{compare_named, dump, DumpOptions, MtimeMode};

fn work_dir() -> PathBuf {
    let dir = scratch_root().join("registry-mount");
    remove_all(&dir);
    dir
}

#[test]
fn convert_between_repositories_then_mount_lazily_from_the_registry() {
    assert!(on_path("skopeo"), "skopeo is missing: run scripts/setup");
    let dir = work_dir();
    let registry = Registry::start(&dir.join("registry"));
    let src = format!("docker://{}/src/python:oci", registry.host());
    let dst = format!("docker://{}/dst/python:skiff", registry.host());

    // The original OCI image, as users have it in their registry.
    run(Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(fixture_image())
        .arg(&src));

    // CI's one command: registry to registry, streaming.
    let out = skiff(["convert", "--no-progress", "--json", &src, &dst]);
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("convert --json prints JSON");
    let bytes_out = summary["bytes_out"].as_u64().expect("bytes_out");
    assert!(summary["files"].as_u64().unwrap_or(0) > 10_000, "{summary}");

    // The converted image is complete and sound as the registry serves it.
    skiff(["check", &dst]);

    let log_mark = std::fs::read_to_string(&registry.log)
        .unwrap_or_default()
        .len();
    // A cache that holds the whole image, so the assertion below can say
    // that no chunk crossed the network twice.
    let mut mount = SkiffMount::start(&dst, &dir.join("mount"), &["--cache-mb", "1024"]);
    // Mounting fetched the manifest and the bootstrap, no data blob yet.
    let access = std::fs::read_to_string(&registry.log).unwrap_or_default();
    let data_gets_before = access
        .get(log_mark..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"GET /v2/dst/python/blobs/") && l.contains(" 206 "))
        .count();
    assert_eq!(data_gets_before, 0, "range reads before any file was read");

    let python = import_in_chroot(&mount.mnt);
    assert_eq!(
        String::from_utf8_lossy(&python.stdout).trim(),
        "numpy pandas"
    );

    // Every path, type, mode, owner, size, content digest, symlink target,
    // xattr, hard-link group and device number equals umoci's extraction.
    let opts = DumpOptions::all().with_mtime(MtimeMode::Exact);
    let reference = dump(&umoci_rootfs(), &opts).expect("dump the reference");
    let got = dump(&mount.mnt, &opts).expect("dump the mount");
    if let Err(report) = compare_named(&reference, "umoci", &got, "skiff mount docker://") {
        panic!("the lazy mount differs from umoci unpack:\n{report}");
    }

    let (status, summary_line) = mount.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "skiff mount exit: {status:?}"
    );
    let fetched = summary_value(&summary_line, "bytes_fetched").expect("exit summary");
    let errors = summary_value(&summary_line, "read_errors").expect("exit summary");
    assert_eq!(errors, 0, "{summary_line}");
    // The full dump read every file: everything was fetched, and at most
    // 1% twice (a shared frame whose members two concurrent requests
    // asked for comes twice: CI once saw 128.04 MB for a 127.95 MB image).
    assert!(
        fetched > 0 && fetched * 100 <= bytes_out * 101,
        "{summary_line} (image {bytes_out} B)"
    );
}
