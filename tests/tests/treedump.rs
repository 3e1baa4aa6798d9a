//! Tests of the tree dump and comparison on small trees made here.

// Tests state what they expect of each step.
#![allow(clippy::expect_used)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{geteuid, mkfifo};
use sha2::{Digest, Sha256};
use skiff_tests::harness::scratch_root;
use skiff_tests::treedump::{
    compare, compare_named, dev_major, dev_minor, dump, escape, DumpOptions, MtimeMode,
};

const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("treedump-")
        .tempdir_in(scratch_root())
        .expect("create a temporary directory")
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = TimeSpec::new(sec, nsec);
    utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).expect("utimensat");
}

fn is_root() -> bool {
    geteuid().is_root()
}

/// A tree with one of everything; every mtime is fixed.
fn make_tree(root: &Path) {
    fs::create_dir(root.join("a")).expect("mkdir a");
    fs::write(root.join("a/f"), b"hello").expect("write a/f");
    chmod(&root.join("a/f"), 0o644);
    fs::create_dir(root.join("b")).expect("mkdir b");
    fs::hard_link(root.join("a/f"), root.join("b/g")).expect("hard link b/g");
    symlink("a/f", root.join("l")).expect("symlink l");
    symlink("nowhere/x y", root.join("dangling")).expect("symlink dangling");
    mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).expect("mkfifo");
    drop(UnixListener::bind(root.join("sock")).expect("bind a unix socket"));
    fs::write(root.join("suid"), b"#!/bin/sh\n").expect("write suid");
    chmod(&root.join("suid"), 0o4755);
    fs::create_dir(root.join("sgid")).expect("mkdir sgid");
    chmod(&root.join("sgid"), 0o2775);
    fs::create_dir(root.join("tmp")).expect("mkdir tmp");
    chmod(&root.join("tmp"), 0o1777);
    fs::write(root.join(OsStr::from_bytes(b"bad\xffname")), b"").expect("write non-UTF-8 name");
    fs::write(root.join("xa"), b"x").expect("write xa");
    xattr::set(root.join("xa"), "user.skiff.test", b"\x00\x01ab").expect(
        "set a user.* xattr (the scratch filesystem must support user xattrs, as ext4 does)",
    );
    xattr::set(root.join("xa"), "user.other", b"v").expect("set user.other");
    if is_root() {
        let dev = root.join("null");
        mknod(
            &dev,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .expect("mknod char");
        mknod(
            &root.join("loop"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            makedev(7, 300),
        )
        .expect("mknod block");
        // mknod applies the umask.
        chmod(&dev, 0o666);
        chmod(&root.join("loop"), 0o660);
        std::os::unix::fs::lchown(root.join("a/f"), Some(1234), Some(5678)).expect("chown");
        std::os::unix::fs::lchown(root.join("l"), Some(42), Some(43)).expect("lchown");
    }
    // Fix every mtime, children before parents.
    let mut paths = Vec::new();
    collect(root, &mut paths);
    paths.reverse();
    for (i, p) in paths.iter().enumerate() {
        set_mtime(p, 1_600_000_000 + i as i64, 123_456_789);
    }
}

fn collect(p: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(p.to_path_buf());
    let meta = fs::symlink_metadata(p).expect("lstat");
    if meta.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(p)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out);
        }
    }
}

#[test]
fn dump_records_every_kind_of_entry() {
    let dir = tempdir();
    let root = dir.path();
    make_tree(root);
    let d = dump(root, &DumpOptions::default()).expect("dump");
    let text = d.to_string();
    eprintln!("{text}");

    assert_eq!(d.field("/", "type"), Some("dir"));
    assert_eq!(d.field("/a", "type"), Some("dir"));
    assert_eq!(d.field("/a/f", "type"), Some("file"));
    assert_eq!(d.field("/a/f", "mode"), Some("0644"));
    assert_eq!(d.field("/a/f", "size"), Some("5"));
    assert_eq!(d.field("/a/f", "sha256"), Some(HELLO_SHA256));
    assert_eq!(d.field("/l", "type"), Some("symlink"));
    assert_eq!(d.field("/l", "target"), Some("a/f"));
    assert_eq!(d.field("/l", "size"), Some("3"));
    assert_eq!(d.field("/l", "sha256"), None, "symlinks are not followed");
    assert_eq!(d.field("/dangling", "target"), Some("nowhere/x\\x20y"));
    assert_eq!(d.field("/fifo", "type"), Some("fifo"));
    assert_eq!(d.field("/fifo", "mode"), Some("0600"));
    assert_eq!(d.field("/sock", "type"), Some("socket"));
    assert_eq!(d.field("/suid", "mode"), Some("4755"));
    assert_eq!(d.field("/sgid", "mode"), Some("2775"));
    assert_eq!(d.field("/tmp", "mode"), Some("1777"));
    assert!(
        d.contains("/bad\\xffname"),
        "non-UTF-8 name escaped:\n{text}"
    );
    assert_eq!(d.field("/xa", "xattr.user.other"), Some("76"));
    assert_eq!(d.field("/xa", "xattr.user.skiff.test"), Some("00016162"));
    // xattrs are sorted by name and come last.
    let line = d.line("/xa").expect("line of /xa");
    let other = line.find("xattr.user.other").expect("user.other in line");
    let test = line
        .find("xattr.user.skiff.test")
        .expect("user.skiff.test in line");
    assert!(other < test, "{line}");
    assert!(line.ends_with("xattr.user.skiff.test=00016162"), "{line}");

    // Hard links: both paths name the first one of the group.
    assert_eq!(d.field("/a/f", "link"), Some("/a/f"));
    assert_eq!(d.field("/b/g", "link"), Some("/a/f"));
    assert_eq!(d.field("/suid", "link"), None, "a single link has no group");

    // mtimes, exact.
    let mtime = d.field("/a/f", "mtime").expect("mtime");
    assert!(mtime.ends_with(".123456789"), "{mtime}");
    assert!(d.field("/a", "mtime").is_some());

    if is_root() {
        assert_eq!(d.field("/null", "type"), Some("char"));
        assert_eq!(d.field("/null", "rdev"), Some("1:3"));
        assert_eq!(d.field("/null", "mode"), Some("0666"));
        assert_eq!(d.field("/loop", "type"), Some("block"));
        assert_eq!(d.field("/loop", "rdev"), Some("7:300"));
        assert_eq!(d.field("/a/f", "uid"), Some("1234"));
        assert_eq!(d.field("/a/f", "gid"), Some("5678"));
        assert_eq!(d.field("/l", "uid"), Some("42"), "lchown, not chown");
    } else {
        eprintln!("not root: device nodes and ownership not tested");
    }

    // Sorted, one line per path, deterministic.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), d.len());
    assert_eq!(lines[0].split(' ').next(), Some("/"));
    let again = dump(root, &DumpOptions::default()).expect("dump again");
    assert_eq!(again.to_string(), text);
    compare(&d, &again).expect("a tree equals itself");
}

#[test]
fn hashing_handles_large_files_and_many_threads() {
    let dir = tempdir();
    let root = dir.path();
    let mut expected = Vec::new();
    for i in 0..40u32 {
        // Sizes around the 1 MiB read buffer, and an empty file.
        let len = match i {
            0 => 0,
            1 => (1 << 20) - 1,
            2 => 1 << 20,
            3 => (1 << 20) + 1,
            4 => 5 << 20,
            _ => (i as usize) * 1000,
        };
        let data: Vec<u8> = (0..len).map(|j| (j as u32 ^ i) as u8).collect();
        let name = format!("f{i:02}");
        fs::write(root.join(&name), &data).expect("write");
        expected.push((format!("/{name}"), hex::encode(Sha256::digest(&data))));
    }
    for threads in [1, 3, 0] {
        let opts = DumpOptions {
            threads,
            ..DumpOptions::default()
        };
        let d = dump(root, &opts).expect("dump");
        for (path, digest) in &expected {
            assert_eq!(d.field(path, "sha256"), Some(digest.as_str()), "{path}");
        }
    }
}

#[test]
fn hard_link_group_is_the_lexicographically_first_path() {
    let dir = tempdir();
    let root = dir.path();
    fs::create_dir(root.join("z")).expect("mkdir");
    fs::write(root.join("z/first-created"), b"x").expect("write");
    fs::hard_link(root.join("z/first-created"), root.join("m")).expect("link");
    fs::hard_link(root.join("z/first-created"), root.join("b")).expect("link");
    fs::write(root.join("c"), b"x").expect("write");
    fs::hard_link(root.join("c"), root.join("d")).expect("link");
    let d = dump(root, &DumpOptions::default()).expect("dump");
    for p in ["/b", "/m", "/z/first-created"] {
        assert_eq!(d.field(p, "link"), Some("/b"), "{p}");
    }
    assert_eq!(d.field("/c", "link"), Some("/c"));
    assert_eq!(d.field("/d", "link"), Some("/c"));

    // A link to a file outside the tree does not make a group.
    let outside = tempdir();
    fs::hard_link(root.join("c"), outside.path().join("c")).expect("link outside");
    fs::write(root.join("solo"), b"y").expect("write");
    fs::hard_link(root.join("solo"), outside.path().join("solo")).expect("link outside");
    let d = dump(root, &DumpOptions::default()).expect("dump");
    assert_eq!(d.field("/solo", "link"), None);

    let no_links = DumpOptions {
        hardlinks: false,
        ..DumpOptions::default()
    };
    let d = dump(root, &no_links).expect("dump");
    assert_eq!(d.field("/b", "link"), None);
}

#[test]
fn mtime_modes_and_field_options() {
    let dir = tempdir();
    let root = dir.path();
    fs::create_dir(root.join("d")).expect("mkdir");
    fs::write(root.join("d/f"), b"x").expect("write");
    set_mtime(&root.join("d/f"), 1_700_000_000, 5);
    set_mtime(&root.join("d"), 1_700_000_001, 999_999_999);

    let exact = dump(root, &DumpOptions::default()).expect("dump");
    assert_eq!(exact.field("/d/f", "mtime"), Some("1700000000.000000005"));
    assert_eq!(exact.field("/d", "mtime"), Some("1700000001.999999999"));

    let secs = dump(root, &DumpOptions::default().with_mtime(MtimeMode::Seconds)).expect("dump");
    assert_eq!(secs.field("/d/f", "mtime"), Some("1700000000"));
    assert_eq!(secs, exact.with_mtime_seconds());

    let none = dump(root, &DumpOptions::default().with_mtime(MtimeMode::Ignore)).expect("dump");
    assert_eq!(none.field("/d/f", "mtime"), None);
    assert_eq!(none, exact.without_field("mtime"));

    let no_dirs = dump(root, &DumpOptions::default().without_dir_mtime()).expect("dump");
    assert_eq!(no_dirs.field("/d", "mtime"), None);
    assert!(no_dirs.field("/d/f", "mtime").is_some());
    assert_eq!(no_dirs, exact.without_dir_mtime());

    let no_root = dump(root, &DumpOptions::default().without_root_attrs()).expect("dump");
    assert_eq!(no_root.line("/").as_deref(), Some("/ type=dir"));
    assert!(no_root.field("/d", "mode").is_some());

    let bare = DumpOptions {
        mode: false,
        owner: false,
        content: false,
        xattrs: false,
        ..DumpOptions::default()
    };
    let d = dump(root, &bare).expect("dump");
    assert_eq!(
        d.line("/d/f").as_deref(),
        Some("/d/f type=file size=1 mtime=1700000000.000000005")
    );
}

#[test]
fn ignored_xattrs_and_excluded_paths() {
    let dir = tempdir();
    let root = dir.path();
    fs::write(root.join("f"), b"x").expect("write");
    xattr::set(root.join("f"), "user.keep", b"1").expect("setxattr");
    xattr::set(root.join("f"), "user.drop.a", b"2").expect("setxattr");
    xattr::set(root.join("f"), "user.exact", b"3").expect("setxattr");
    fs::create_dir_all(root.join("skip/inner")).expect("mkdir");
    let opts = DumpOptions {
        exclude: vec!["/skip".to_string()],
        ..DumpOptions::default()
            .ignore_xattr("user.drop.*")
            .ignore_xattr("user.exact")
    };
    let d = dump(root, &opts).expect("dump");
    assert_eq!(d.field("/f", "xattr.user.keep"), Some("31"));
    assert_eq!(d.field("/f", "xattr.user.drop.a"), None);
    assert_eq!(d.field("/f", "xattr.user.exact"), None);
    assert!(!d.contains("/skip") && !d.contains("/skip/inner"));
    let full = dump(root, &DumpOptions::default()).expect("dump");
    assert_eq!(
        full.without_field("xattr.user.drop*")
            .without_field("xattr.user.exact")
            .field("/f", "xattr.user.keep"),
        Some("31")
    );
}

#[test]
fn compare_reports_differences_readably() {
    let a_dir = tempdir();
    let b_dir = tempdir();
    for root in [a_dir.path(), b_dir.path()] {
        fs::write(root.join("same"), b"same").expect("write");
        fs::write(root.join("changed"), b"one").expect("write");
        chmod(&root.join("changed"), 0o644);
        set_mtime(&root.join("same"), 1_000, 0);
        set_mtime(&root.join("changed"), 1_000, 0);
    }
    fs::write(a_dir.path().join("only-a"), b"").expect("write");
    fs::write(b_dir.path().join("only-b"), b"").expect("write");
    fs::write(b_dir.path().join("changed"), b"two").expect("write");
    chmod(&b_dir.path().join("changed"), 0o600);
    set_mtime(&b_dir.path().join("changed"), 1_000, 0);
    for root in [a_dir.path(), b_dir.path()] {
        set_mtime(root, 2_000, 0);
    }

    let a = dump(a_dir.path(), &DumpOptions::default()).expect("dump a");
    let b = dump(b_dir.path(), &DumpOptions::default()).expect("dump b");
    let report = compare_named(&a, "reference", &b, "unpacked").expect_err("trees differ");
    eprintln!("{report}");
    assert!(report.starts_with(
        "trees differ: 1 paths only in reference (-), 1 only in unpacked (+), 1 changed (~)"
    ));
    assert!(
        report.contains("changed fields: mode 1, sha256 1\n"),
        "{report}"
    );
    assert!(report.contains("- /only-a type=file"), "{report}");
    assert!(report.contains("+ /only-b type=file"), "{report}");
    assert!(
        report.contains("~ /changed  mode: 0644 -> 0600; sha256: "),
        "{report}"
    );
    assert!(!report.contains("/same"), "{report}");

    // Only the first 50 differences are listed.
    let many_dir = tempdir();
    for i in 0..120 {
        fs::write(many_dir.path().join(format!("n{i:03}")), b"").expect("write");
    }
    let many = dump(
        many_dir.path(),
        &DumpOptions::default().without_root_attrs(),
    )
    .expect("dump");
    let empty_dir = tempdir();
    let empty = dump(
        empty_dir.path(),
        &DumpOptions::default().without_root_attrs(),
    )
    .expect("dump");
    let report = compare(&empty, &many).expect_err("trees differ");
    assert_eq!(report.lines().filter(|l| l.starts_with("+ ")).count(), 50);
    assert!(report.contains("... and 70 more differences"), "{report}");
    assert!(report.contains("120 only in b"), "{report}");
}

#[test]
fn escaping_and_device_numbers() {
    assert_eq!(escape(b"plain/path-1.2_x"), "plain/path-1.2_x");
    assert_eq!(escape(b"a b=c\\d"), "a\\x20b\\x3dc\\x5cd");
    assert_eq!(escape(b"\xff\x00\n\x7f"), "\\xff\\x00\\x0a\\x7f");
    assert_eq!(escape("é".as_bytes()), "\\xc3\\xa9");
    for (major, minor) in [
        (0, 0),
        (1, 3),
        (8, 1),
        (259, 7),
        (4095, 1_048_575),
        (4096, 256),
    ] {
        let dev = makedev(major, minor);
        assert_eq!((dev_major(dev), dev_minor(dev)), (major, minor));
    }
}

#[test]
fn dump_of_a_non_directory_or_missing_path_fails() {
    let dir = tempdir();
    let file = dir.path().join("f");
    fs::write(&file, b"x").expect("write");
    let err = dump(&file, &DumpOptions::default()).expect_err("a file is not a tree");
    assert!(err.to_string().contains("not a directory"), "{err}");
    let err = dump(&dir.path().join("missing"), &DumpOptions::default()).expect_err("missing");
    assert!(err.to_string().contains("missing"), "{err}");
}
