//! Acceptance: hand-crafted layers exercising every case the converter
//! handles, converted with `convert_image` (plain layer files as the source),
//! unpacked, and compared with a reference extraction of the same layers.
//!
//! The layers hold: `./` and `/` root entries; missing parent directories;
//! duplicates (last wins) and kind changes in one layer; files replaced by
//! directories and back across layers; whiteouts and opaque markers, also
//! after entries of the same layer and below directories the layer only
//! walks through; hard links in one layer and to files of earlier layers,
//! surviving a whiteout of the original name; relative, absolute, dangling
//! and long symlinks; character and block devices and a fifo;
//! setuid/setgid/sticky; uid/gid beyond the ustar fields (PAX and GNU
//! base-256); PAX mtime with nanoseconds and before the epoch; xattrs
//! (`user.*`, binary `security.capability`) from PAX records; a PAX global
//! header; GNU long names and link names, ustar prefixes and PAX paths;
//! non-UTF-8 names; empty, 5 MB, duplicate and mostly-zero files and a real
//! GNU sparse entry; layers as tar, tar+gzip and tar+zstd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// A v2 `security.capability` value: effective, cap_net_bind_service and
/// cap_net_raw permitted. Binary, with NUL bytes.
const CAP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic_etc: VFS_CAP_REVISION_2 | effective
    0x00, 0x24, 0x00, 0x00, // permitted[0]: bits 10 and 13
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

/// A user xattr value with NUL, `=`, space and non-ASCII bytes.
const BINARY: &[u8] = &[0x00, b'=', 0xff, 0x01, b' ', 0x80];

struct Inputs {
    layers: Vec<(Vec<Op>, Comp)>,
    big: Vec<u8>,
    sparse: Vec<u8>,
    disk_sparse: Vec<u8>,
    gnu_long: Vec<u8>,
    ustar_long: Vec<u8>,
    pax_long: Vec<u8>,
}

/// Writes the on-disk sparse file that layer 2 copies with the tar crate's
/// sparse support (ten islands of data: more than the four a GNU header
/// holds, so extended sparse headers follow it); returns its path and
/// content.
fn disk_sparse_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let path = dir.join("sparse-src");
    let mut content = vec![0u8; 4 << 20];
    let f = fs::File::create(&path).unwrap();
    f.set_len(content.len() as u64).unwrap();
    for i in 0..10u8 {
        let at = usize::from(i) * (400 << 10);
        content[at..at + 4096].fill(b'a' + i);
        f.write_all_at(&content[at..at + 4096], at as u64).unwrap();
    }
    drop(f);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
    let t = TimeSpec::new(1_600_000_777, 0);
    utimensat(None, &path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
    (path, content)
}

fn inputs(work: &Path) -> Inputs {
    let mut rng = Rng(0x5eed_cafe);
    let big = rng.bytes(5 << 20);
    let shared = rng.text(200_000);
    let mut sparse = rng.text(100);
    sparse.resize(4 << 20, 0);
    sparse.extend_from_slice(&rng.text(100));
    let (disk_path, disk_sparse) = disk_sparse_file(work);

    let gnu_long = format!("long/{}/{}", "d".repeat(60), "f".repeat(80)).into_bytes();
    let ustar_long = format!("ustar/{}/{}", "p".repeat(120), "n".repeat(90)).into_bytes();
    let pax_long = format!(
        "paxlong/{}/{}/{}",
        "a".repeat(200),
        "b".repeat(200),
        "c".repeat(100)
    )
    .into_bytes();

    let layer1: Vec<Op> = vec![
        Entry::dir("./", 0o750).mtime(1_500_000_000, 0).into(),
        Entry::dir("etc/", 0o755).into(),
        Entry::file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n").into(),
        Entry::dir("bin", 0o755).mtime(1_600_000_001, 0).into(),
        Entry::file("bin/sh", 0o755, rng.text(3000)).into(),
        Entry::file("bin/su", 0o4755, "su v1").into(),
        Entry::file("bin/wall", 0o2755, "wall").owner(0, 5).into(),
        Entry::dir("tmp", 0o1777).into(),
        // Parents usr/ and usr/lib/ are missing.
        Entry::file("usr/lib/libz.so.1", 0o644, rng.bytes(70_000)).into(),
        Entry::symlink("usr/lib/libz.so", "libz.so.1").into(),
        Entry::symlink("etc/localtime", "/usr/share/zoneinfo/UTC").into(),
        Entry::new("dev/null", Kind::Char(1, 3), Attr::mode(0o666)).into(),
        Entry::new("dev/sda", Kind::Block(8, 0), Attr::mode(0o660))
            .owner(0, 6)
            .into(),
        Entry::new("dev/odd", Kind::Char(254, 70_000), Attr::mode(0o600)).into(),
        Entry::new("run/fifo", Kind::Fifo, Attr::mode(0o644)).into(),
        Entry::file("data/empty", 0o644, Vec::new()).into(),
        Entry::file("data/big", 0o644, big.clone()).into(),
        Entry::file("data/sparse", 0o600, sparse.clone()).into(),
        Entry::file("data/dup1", 0o644, shared.clone()).into(),
        Entry::file("data/dup2", 0o640, shared.clone()).into(),
        Entry::file("hl/orig", 0o755, "hard-linked content\n")
            .mtime(1_600_000_123, 0)
            .owner(7, 8)
            .into(),
        Entry::hardlink("hl/link1", "hl/orig").into(),
        Entry::file("old/file", 0o644, "will become a directory").into(),
        Entry::file("old/dir/child", 0o644, "goes away with its directory").into(),
        Entry::file("wh/a", 0o644, "whited out").into(),
        Entry::file("wh/b", 0o644, "whited out, then a directory").into(),
        Entry::file("wh/keep", 0o644, "stays").into(),
        Entry::dir("wh/d", 0o755).into(),
        Entry::file("wh/d/inner", 0o644, "goes with wh/d").into(),
        Entry::file("opq/lower1", 0o644, "hidden by the opaque marker").into(),
        Entry::file("opq/sub/lower2", 0o644, "hidden too, one level down").into(),
        Entry::file(
            "opq2/keep_dir/lowerfile",
            0o644,
            "hidden below a redeclared dir",
        )
        .into(),
        Entry::file("opq3/x", 0o644, "lower x").into(),
        Entry::file(b"names/caf\xe9", 0o644, "latin-1 name").into(),
        Entry::symlink(b"names/link\xff", b"caf\xe9").into(),
        Entry::file(gnu_long.clone(), 0o644, "GNU long name")
            .gnu()
            .into(),
        Entry::file(ustar_long.clone(), 0o644, "ustar prefix").into(),
        Entry::file(pax_long.clone(), 0o644, "PAX path, 500+ bytes").into(),
        Entry::symlink("long/gnu-target", format!("/{}", "t".repeat(150)))
            .gnu()
            .into(),
        Entry::symlink("long/pax-target", "x/".repeat(70)).into(),
        Entry::file("pax/bigid", 0o644, "big ids via PAX")
            .owner(3_000_000, 4_000_000)
            .into(),
        Entry::file("gnu/bigid", 0o644, "big ids via base-256")
            .owner(5_000_000, 6_000_000)
            .gnu()
            .into(),
        Entry::file("pax/ids", 0o644, "PAX ids override the header")
            .owner(1000, 1001)
            .enc(|e| {
                e.pax_ids = true;
                e.header_ids = Some((1, 1));
            })
            .into(),
        Entry::file("pax/ns", 0o644, "nanoseconds")
            .mtime(1_700_000_000, 123_456_789)
            .enc(|e| e.header_mtime = Some(1))
            .into(),
        Entry::file("pax/neg", 0o644, "before the epoch: -1.25 s")
            .mtime(-2, 750_000_000)
            .into(),
        Entry::file("pax/xattr", 0o755, "capable")
            .xattr("user.foo", "bar")
            .xattr("user.bin", BINARY)
            .xattr("security.capability", CAP)
            .into(),
        Entry::dir("pax/xdir", 0o755)
            .xattr("user.dir", "yes")
            .into(),
        Entry::file("pax/path-record", 0o644, "named by a PAX path record")
            .enc(|e| e.pax_path = true)
            .into(),
        Entry::file("dupe", 0o644, "first").into(),
        Entry::file("dupe", 0o600, "second: the last one wins").into(),
        Entry::file("dupe_kind", 0o644, "a file first, then a directory").into(),
        Entry::dir("dupe_kind", 0o700).into(),
        Entry::dir("dupe_kind2", 0o700).into(),
        Entry::file("dupe_kind2/child", 0o644, "goes when the dir is replaced").into(),
        Entry::file("dupe_kind2", 0o644, "a directory first, then a file").into(),
        Entry::symlink("symdir", "bin").into(),
        // File type bits in the mode field (some writers put them there).
        Entry::file("typebits", 0o755, "mode 0100755 in the header")
            .enc(|e| e.header_mode = Some(0o100_755))
            .into(),
    ];

    let layer2: Vec<Op> = vec![
        // A hard link to a file of the layer below.
        Entry::hardlink("hl/link2", "hl/orig").into(),
        whiteout("wh/a"),
        whiteout("wh/b"),
        Entry::dir("wh/b", 0o700).into(),
        whiteout("wh/d"),
        // A file replaced by a directory, a directory by a file.
        Entry::dir("old/file", 0o755).into(),
        Entry::file("old/file/child", 0o644, "the file became a directory").into(),
        Entry::file("old/dir", 0o644, "the directory became a file").into(),
        // Entries of the same layer before an opaque marker survive it, also
        // below a directory the layer only walks through (opq/sub)...
        Entry::file("opq/new1", 0o644, "before the marker").into(),
        Entry::file("opq/sub/new2", 0o644, "before the marker, one level down").into(),
        opaque("opq"),
        Entry::file("opq/new3", 0o644, "after the marker").into(),
        // ... and below a directory the layer redeclares, whose lower
        // children are still hidden.
        Entry::dir("opq2/keep_dir", 0o711).into(),
        Entry::file("opq2/keep_dir/upper", 0o644, "upper").into(),
        opaque("opq2"),
        // An opaque marker first, then new content.
        opaque("opq3"),
        Entry::file("opq3/y", 0o644, "upper y").into(),
        // A whiteout hides lower entries only, not one of its own layer.
        Entry::file(
            "samewh/x",
            0o644,
            "the same layer's whiteout must not hide me",
        )
        .into(),
        whiteout("samewh/x"),
        whiteout("samewh/never-existed"),
        Entry::file(b"names/caf\xe9", 0o600, "replaced").into(),
        Entry::file("data/dup3", 0o644, shared.clone()).into(),
        Entry::file("symdir", 0o644, "a symlink replaced by a file").into(),
        // A directory over a directory keeps the children.
        Entry::dir("tmp", 0o1777).mtime(1_600_000_500, 0).into(),
        Entry::file("tmp/t1", 0o600, "in tmp").into(),
        Op::FromDisk(
            Entry::file("data/gnu-sparse", 0o640, disk_sparse.clone()).mtime(1_600_000_777, 0),
            disk_path,
        ),
    ];

    let layer3: Vec<Op> = vec![
        Entry::dir("/", 0o755)
            .mtime(1_234_567_890, 0)
            .xattr("user.root", "r")
            .into(),
        // A whiteout in a directory that does not exist hides nothing and
        // creates nothing.
        whiteout("nodir/x"),
        // A hard link to a hard link of the layer below; then the original
        // name goes, the other names stay.
        Entry::hardlink("hl/link3", "hl/link2").into(),
        whiteout("hl/orig"),
        whiteout("data/dup1"),
        Entry::file("bin/su", 0o4711, "su v2").into(),
        // A PAX global header: its records apply to every later entry of
        // this layer that does not set them itself.
        Op::GlobalPax(vec![
            (b"mtime".to_vec(), b"1650000000.5".to_vec()),
            (b"uid".to_vec(), b"4242".to_vec()),
            (b"SCHILY.xattr.user.global".to_vec(), b"g".to_vec()),
        ]),
        Entry::file("glob/a", 0o644, "global attributes")
            .owner(4242, 7)
            .mtime(1_650_000_000, 500_000_000)
            .xattr("user.global", "g")
            .enc(|e| {
                e.header_ids = Some((7, 7));
                e.header_mtime = Some(1);
                e.mtime_from_global = true;
                e.xattrs_from_global = vec![b"user.global".to_vec()];
            })
            .into(),
        Entry::file("glob/b", 0o644, "local PAX over global")
            .owner(4242, 7)
            .mtime(1_700_000_001, 1)
            .xattr("user.global", "g")
            .enc(|e| {
                e.header_ids = Some((7, 7));
                e.xattrs_from_global = vec![b"user.global".to_vec()];
            })
            .into(),
    ];

    Inputs {
        layers: vec![
            (layer1, Comp::Tar),
            (layer2, Comp::Gzip),
            (layer3, Comp::Zstd),
        ],
        big,
        sparse,
        disk_sparse,
        gnu_long,
        ustar_long,
        pax_long,
    }
}

fn p(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

fn meta(root: &Path, rel: &[u8]) -> fs::Metadata {
    let path = p(root, rel);
    fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn names(root: &Path, rel: &str) -> BTreeSet<String> {
    fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn xattr_of(root: &Path, rel: &str, name: &str) -> Option<Vec<u8>> {
    xattr::get(root.join(rel), name).unwrap()
}

#[test]
fn crafted_layers_convert_and_unpack_like_the_reference() {
    require_root("the crafted-layer test");
    let work = scratch("crafted");
    let input = inputs(work.path());
    let files = write_layer_files(&work.path().join("layers"), &input.layers);

    // The on-disk sparse file really went in as a GNU sparse entry.
    let layer2 = flate2::read::GzDecoder::new(fs::File::open(&files[1]).unwrap());
    let mut archive = tar::Archive::new(layer2);
    let kinds: Vec<_> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path_bytes().into_owned(), e.header().entry_type())
        })
        .filter(|(p, _)| p == b"data/gnu-sparse")
        .collect();
    assert_eq!(kinds.len(), 1);
    assert!(
        kinds[0].1.is_gnu_sparse(),
        "the tar crate did not write a sparse entry: {:?}",
        kinds[0].1
    );

    let layout = work.path().join("layout");
    let result = convert_layers(&files, &layout, "crafted", options())
        .unwrap_or_else(|e| panic!("conversion failed: {e}"));
    let stats = &result.stats;
    assert_eq!(stats.layers, 3);
    assert_eq!(stats.hard_links, 3, "{stats:?}");
    assert_eq!(stats.whiteouts, 11, "{stats:?}");
    assert!(
        stats.unique_chunks < stats.chunks,
        "duplicate files must share chunks: {stats:?}"
    );
    assert!(stats.hole_bytes >= 3 << 20, "{stats:?}");
    assert_eq!(tags(&layout), vec!["crafted".to_string()]);

    let actual = work.path().join("unpacked");
    let unpacked = check_and_unpack(&layout, "crafted", &actual);
    assert!(unpacked.ownership_restored);

    let expected = work.path().join("expected");
    reference(&input.layers).materialize(&expected);
    assert_same_tree(&expected, &actual);

    // The reference could share a mistake with the converter: state the
    // important outcomes path by path as well.
    let r = actual.as_path();
    let root = meta(r, b"");
    assert_eq!(root.mode() & 0o7777, 0o755);
    assert_eq!((root.mtime(), root.mtime_nsec()), (1_234_567_890, 0));
    assert_eq!(xattr_of(r, ".", "user.root").as_deref(), Some(&b"r"[..]));

    // Implicit parents: 0755, 0:0, mtime 0.
    for d in ["usr", "usr/lib", "dev", "data", "opq", "glob"] {
        let m = meta(r, d.as_bytes());
        assert!(m.is_dir(), "{d}");
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime()),
            (0o755, 0, 0, 0),
            "{d}"
        );
    }
    assert_eq!(meta(r, b"bin").mtime(), 1_600_000_001);

    // Special modes.
    assert_eq!(meta(r, b"bin/su").mode() & 0o7777, 0o4711);
    assert_eq!(fs::read(r.join("bin/su")).unwrap(), b"su v2");
    assert_eq!(meta(r, b"bin/wall").mode() & 0o7777, 0o2755);
    assert_eq!(meta(r, b"bin/wall").gid(), 5);
    let tmp = meta(r, b"tmp");
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    assert_eq!(tmp.mtime(), 1_600_000_500);
    assert_eq!(names(r, "tmp"), set(&["t1"]));

    // Symlinks: relative, absolute (dangling), non-UTF-8, long.
    assert_eq!(
        fs::read_link(r.join("usr/lib/libz.so")).unwrap(),
        Path::new("libz.so.1")
    );
    assert_eq!(
        fs::read_link(r.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    assert_eq!(
        fs::read_link(p(r, b"names/link\xff"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        b"caf\xe9"
    );
    assert_eq!(
        fs::read_link(r.join("long/gnu-target"))
            .unwrap()
            .as_os_str()
            .len(),
        151
    );
    assert_eq!(
        fs::read_link(r.join("long/pax-target"))
            .unwrap()
            .as_os_str()
            .len(),
        140
    );
    assert_eq!(fs::read(p(r, b"names/caf\xe9")).unwrap(), b"replaced");

    // Devices and fifo.
    let null = meta(r, b"dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let sda = meta(r, b"dev/sda");
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), nix::sys::stat::makedev(8, 0));
    assert_eq!(
        meta(r, b"dev/odd").rdev(),
        nix::sys::stat::makedev(254, 70_000)
    );
    assert!(meta(r, b"run/fifo").file_type().is_fifo());

    // Owners beyond the header fields, PAX over header, times.
    let m = meta(r, b"pax/bigid");
    assert_eq!((m.uid(), m.gid()), (3_000_000, 4_000_000));
    let m = meta(r, b"gnu/bigid");
    assert_eq!((m.uid(), m.gid()), (5_000_000, 6_000_000));
    let m = meta(r, b"pax/ids");
    assert_eq!((m.uid(), m.gid()), (1000, 1001));
    let m = meta(r, b"pax/ns");
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 123_456_789));
    let m = meta(r, b"pax/neg");
    assert_eq!((m.mtime(), m.mtime_nsec()), (-2, 750_000_000));

    // Xattrs, binary values included.
    assert_eq!(
        xattr_of(r, "pax/xattr", "user.foo").as_deref(),
        Some(&b"bar"[..])
    );
    assert_eq!(
        xattr_of(r, "pax/xattr", "user.bin").as_deref(),
        Some(BINARY)
    );
    assert_eq!(
        xattr_of(r, "pax/xattr", "security.capability").as_deref(),
        Some(&CAP[..])
    );
    assert_eq!(meta(r, b"pax/xattr").mode() & 0o7777, 0o755);
    assert_eq!(
        xattr_of(r, "pax/xdir", "user.dir").as_deref(),
        Some(&b"yes"[..])
    );

    // The PAX global header, and local records over it.
    let a = meta(r, b"glob/a");
    assert_eq!(
        (a.uid(), a.gid(), a.mtime(), a.mtime_nsec()),
        (4242, 7, 1_650_000_000, 500_000_000)
    );
    assert_eq!(
        xattr_of(r, "glob/a", "user.global").as_deref(),
        Some(&b"g"[..])
    );
    let b = meta(r, b"glob/b");
    assert_eq!(
        (b.uid(), b.mtime(), b.mtime_nsec()),
        (4242, 1_700_000_001, 1)
    );

    // Long names in all three encodings, and a name from a PAX record.
    for long in [&input.gnu_long, &input.ustar_long, &input.pax_long] {
        assert!(meta(r, long).is_file(), "{}", String::from_utf8_lossy(long));
    }
    assert!(meta(r, b"pax/path-record").is_file());
    assert!(!r.join("decoy-name-overridden-by-pax").exists());

    // Hard links: one inode, three names, the whited-out original gone.
    assert!(!r.join("hl/orig").exists());
    let l1 = meta(r, b"hl/link1");
    for l in [&b"hl/link2"[..], b"hl/link3"] {
        assert_eq!(meta(r, l).ino(), l1.ino());
    }
    assert_eq!(l1.nlink(), 3);
    assert_eq!(
        (l1.mode() & 0o7777, l1.uid(), l1.gid(), l1.mtime()),
        (0o755, 7, 8, 1_600_000_123)
    );
    assert_eq!(
        fs::read(r.join("hl/link3")).unwrap(),
        b"hard-linked content\n"
    );

    // Whiteouts and opaque directories.
    assert_eq!(names(r, "wh"), set(&["b", "keep"]));
    assert!(meta(r, b"wh/b").is_dir());
    assert_eq!(names(r, "opq"), set(&["new1", "new3", "sub"]));
    assert_eq!(names(r, "opq/sub"), set(&["new2"]));
    assert_eq!(names(r, "opq2"), set(&["keep_dir"]));
    assert_eq!(names(r, "opq2/keep_dir"), set(&["upper"]));
    assert_eq!(meta(r, b"opq2/keep_dir").mode() & 0o7777, 0o711);
    assert_eq!(names(r, "opq3"), set(&["y"]));
    assert_eq!(names(r, "samewh"), set(&["x"]));
    assert!(!r.join("nodir").exists());
    assert!(!r.join("data/dup1").exists());
    let all = dump_all(r);
    for path in all.paths() {
        assert!(!path.contains("/.wh."), "a whiteout leaked: {path}");
    }

    // Replacements.
    assert!(meta(r, b"old/file").is_dir());
    assert_eq!(names(r, "old/file"), set(&["child"]));
    assert!(meta(r, b"old/dir").is_file());
    assert_eq!(meta(r, b"dupe").mode() & 0o7777, 0o600);
    assert_eq!(
        fs::read(r.join("dupe")).unwrap(),
        b"second: the last one wins"
    );
    assert!(meta(r, b"dupe_kind").is_dir());
    assert!(meta(r, b"dupe_kind2").is_file());
    assert!(meta(r, b"symdir").is_file());
    assert_eq!(meta(r, b"typebits").mode() & 0o7777, 0o755);

    // Contents: empty, 5 MB, duplicates, mostly zeros (written back sparse).
    assert_eq!(meta(r, b"data/empty").len(), 0);
    assert!(fs::read(r.join("data/big")).unwrap() == input.big);
    assert_eq!(
        fs::read(r.join("data/dup2")).unwrap(),
        fs::read(r.join("data/dup3")).unwrap()
    );
    assert!(fs::read(r.join("data/sparse")).unwrap() == input.sparse);
    let sp = meta(r, b"data/sparse");
    assert!(
        sp.blocks() * 512 < 1 << 20,
        "the runs of zeros were not written back as holes: {} blocks for {} bytes",
        sp.blocks(),
        sp.len()
    );
    assert!(fs::read(r.join("data/gnu-sparse")).unwrap() == input.disk_sparse);
    let gs = meta(r, b"data/gnu-sparse");
    assert_eq!(
        (gs.mode() & 0o7777, gs.mtime(), gs.len()),
        (0o640, 1_600_000_777, 4 << 20)
    );
}

/// PAX records are length-prefixed, so a value may hold any byte, a
/// newline included: binary xattrs (a `security.capability` with
/// cap_dac_override and cap_fowner has 0x0a in its first permitted byte),
/// names and symlink targets.
#[test]
fn pax_values_with_newlines_survive() {
    require_root("security.capability");
    let work = scratch("pax-newline");
    let mut cap = CAP;
    cap[4] = 0x0a; // permitted[0] bits 1 and 3: cap_dac_override, cap_fowner
    let layers = vec![(
        vec![
            Entry::file("f", 0o755, "x")
                .xattr("user.nl", "line one\nline two\n")
                .xattr("security.capability", cap)
                .into(),
            Entry::file("dir/line\nbreak", 0o644, "a newline in a name")
                .enc(|e| e.pax_path = true)
                .into(),
            Entry::symlink("link", format!("{}\n{}", "t".repeat(60), "u".repeat(60))).into(),
        ],
        Comp::Tar,
    )];
    let files = write_layer_files(&work.path().join("layers"), &layers);
    let layout = work.path().join("layout");
    convert_layers(&files, &layout, "nl", options())
        .unwrap_or_else(|e| panic!("conversion failed: {e}"));
    let actual = work.path().join("unpacked");
    check_and_unpack(&layout, "nl", &actual);
    let expected = work.path().join("expected");
    reference(&layers).materialize(&expected);
    assert_same_tree(&expected, &actual);
    assert_eq!(
        xattr_of(&actual, "f", "user.nl").as_deref(),
        Some(&b"line one\nline two\n"[..])
    );
    assert_eq!(
        xattr_of(&actual, "f", "security.capability").as_deref(),
        Some(&cap[..])
    );
    assert_eq!(names(&actual, "dir"), set(&["line\nbreak"]));
    assert_eq!(
        fs::read_link(actual.join("link"))
            .unwrap()
            .as_os_str()
            .len(),
        121
    );
}

/// The tail of a PAX value that looks like a record (`\n22 linkpath=...`)
/// is part of the value, never a record of its own: the symlink keeps the
/// target of its header, as Go's archive/tar (and so `docker pull`) reads it.
#[test]
fn a_record_hidden_in_a_pax_value_is_not_honoured() {
    let work = scratch("pax-smuggle");
    let value = b"harmless\n22 linkpath=/etc/evil\n".to_vec();
    let path_value = b"v\n13 path=evil\n".to_vec();
    let layers = vec![(
        vec![
            Entry::symlink("link", "harmless")
                .enc(|e| e.extra_pax = vec![(b"SCHILY.xattr.user.x".to_vec(), value.clone())])
                .into(),
            Entry::file("file", 0o644, "x")
                .enc(|e| e.extra_pax = vec![(b"SCHILY.xattr.user.y".to_vec(), path_value.clone())])
                .into(),
        ],
        Comp::Tar,
    )];
    let files = write_layer_files(&work.path().join("layers"), &layers);
    let layout = work.path().join("layout");
    convert_layers(&files, &layout, "s", options())
        .unwrap_or_else(|e| panic!("conversion failed: {e}"));
    let image = skiff_registry::skiff::open_image(&oci(&layout, "s")).unwrap();
    let b = skiff_format::Bootstrap::parse(&image.bootstrap).unwrap();
    let id = b.resolve_path(b"/link").unwrap().expect("/link");
    assert_eq!(b.symlink_target(id).unwrap(), b"harmless");
    assert_eq!(
        b.getxattr(id, b"user.x").unwrap(),
        Some(value.as_slice()),
        "the xattr value must be the whole record value"
    );
    assert!(b.resolve_path(b"/evil").unwrap().is_none());
    let id = b.resolve_path(b"/file").unwrap().expect("/file");
    assert_eq!(
        b.getxattr(id, b"user.y").unwrap(),
        Some(path_value.as_slice())
    );
}

/// A layer that adds no new content writes no data blob; an empty layer
/// (just the end-of-archive blocks) and a zero-byte layer file are fine.
#[test]
fn layers_without_new_content_write_no_blob() {
    let work = scratch("no-blob");
    let content = Rng(8).bytes(100_000);
    let layers = vec![
        (
            vec![Entry::file("a", 0o644, content.clone()).into()],
            Comp::Gzip,
        ),
        (
            vec![
                Entry::file("copy-of-a", 0o600, content.clone()).into(),
                Entry::file("empty", 0o644, Vec::new()).into(),
                Entry::dir("d", 0o700).into(),
                whiteout("a"),
            ],
            Comp::Zstd,
        ),
        (Vec::new(), Comp::Tar),
    ];
    let mut files = write_layer_files(&work.path().join("layers"), &layers);
    let zero = work.path().join("layers/zero-bytes.tar");
    fs::write(&zero, b"").unwrap();
    files.push(zero);
    let layout = work.path().join("layout");
    let result = convert_layers(&files, &layout, "t", options())
        .unwrap_or_else(|e| panic!("conversion failed: {e}"));
    assert_eq!(result.stats.layers, 4);
    assert_eq!(result.blobs.len(), 1, "{:?}", result.blobs);
    let image = skiff_registry::skiff::open_image(&oci(&layout, "t")).unwrap();
    let layers_in_manifest = image.manifest["layers"].as_array().unwrap().len();
    assert_eq!(layers_in_manifest, 2, "one data blob and the bootstrap");
    let actual = work.path().join("unpacked");
    check_and_unpack(&layout, "t", &actual);
    let expected = work.path().join("expected");
    reference(&layers).materialize(&expected);
    assert_same_tree(&expected, &actual);
    assert!(!actual.join("a").exists());
}
