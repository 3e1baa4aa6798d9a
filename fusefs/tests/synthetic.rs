//! FUSE end-to-end tests on a small image built in the test: every kind of
//! inode, xattrs, hard links, holes, a multi-chunk file and a damaged chunk,
//! mounted in-process with [`Daemon`] and checked through the kernel with
//! ordinary system calls.
//!
//! These need root, `/dev/fuse` and `fusermount3` (package fuse3): without
//! them they fail, they do not skip.

// In a test a failed expectation is the failure we want reported.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use skiff_format::chunk::encode_chunk;
use skiff_format::{
    write_bootstrap, Attrs, BlobInfo, ChunkHash, ChunkInfo, Digest, FileChunk, ImageTree, Node,
    NodeData,
};
use skiff_fusefs::{Backend, Daemon, MountOptions};
use skiff_registry::LocalBlobStore;
use skiff_tests::harness::noise;

const CHUNK: usize = 64 << 10;
const SPARSE_SIZE: u64 = 10 << 20;

/// Log lines of every mount in this test binary.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("skiff_fusefs=info")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        buf
    })
}

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(b)?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need FUSE"
    );
    assert!(
        skiff_tests::harness::on_path("fusermount3"),
        "fusermount3 is missing: apt-get install fuse3"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount filesystems: run them as root"
    );
}

/// Expected contents of the regular files, by path.
struct Built {
    layout: tempfile::TempDir,
    bootstrap: Vec<u8>,
    contents: BTreeMap<&'static str, Vec<u8>>,
    /// The chunk damaged in the blob: (index, digest).
    damaged: (u32, Digest),
}

fn attrs(mode: u32) -> Attrs {
    Attrs {
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 123_456_789,
    }
}

fn node(mode: u32, data: NodeData) -> Node {
    Node {
        attrs: attrs(mode),
        data,
        xattrs: BTreeMap::new(),
    }
}

fn build() -> Built {
    let layout = tempfile::tempdir().expect("tempdir");
    let blobs_dir = layout.path().join("blobs/sha256");
    fs::create_dir_all(&blobs_dir).expect("blobs dir");
    let mut blob = Vec::new();
    let mut chunks: Vec<ChunkInfo> = Vec::new();
    // Appends `data` as chunks placed at `offset` in a file.
    let mut add = |data: &[u8], offset: u64| -> Vec<FileChunk> {
        let mut out = Vec::new();
        for (i, piece) in data.chunks(CHUNK).enumerate() {
            let (stored, compressed) = encode_chunk(piece, 3).expect("encode");
            let digest = ChunkHash::Blake3.digest(piece);
            let index = match chunks.iter().position(|c| c.digest == digest) {
                Some(i) => i,
                None => {
                    chunks.push(ChunkInfo {
                        digest,
                        hash: ChunkHash::Blake3,
                        blob_index: 0,
                        compressed,
                        compressed_offset: blob.len() as u64,
                        compressed_size: stored.len() as u32,
                        uncompressed_size: piece.len() as u32,
                        frame: None,
                    });
                    blob.extend_from_slice(&stored);
                    chunks.len() - 1
                }
            };
            out.push(FileChunk {
                file_offset: offset + (i * CHUNK) as u64,
                chunk_index: index as u32,
            });
        }
        out
    };
    let mut contents = BTreeMap::new();
    let hello = b"hello, world\n".to_vec();
    let hello_chunks = add(&hello, 0);
    let big: Vec<u8> = noise(16 * CHUNK + 12345, 1)
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            if (i / 4096) % 3 == 0 {
                (i % 251) as u8
            } else {
                b
            }
        })
        .collect();
    let big_chunks = add(&big, 0);
    let head = noise(4096, 2);
    let tail = noise(3000, 3);
    let mut sparse_chunks = add(&head, 0);
    sparse_chunks.extend(add(&tail, 5 << 20));
    let mut sparse = vec![0u8; SPARSE_SIZE as usize];
    sparse[..4096].copy_from_slice(&head);
    sparse[5 << 20..(5 << 20) + 3000].copy_from_slice(&tail);
    let bad = noise(100_000, 4);
    let bad_chunks = add(&bad, 0);
    let damaged_index = bad_chunks[1].chunk_index;
    contents.insert("hello.txt", hello.clone());
    contents.insert("big.bin", big.clone());
    contents.insert("sparse.bin", sparse);
    contents.insert("bad.bin", bad.clone());
    contents.insert("empty", Vec::new());

    let mut nodes = vec![node(
        0o755,
        NodeData::Directory {
            entries: BTreeMap::new(),
        },
    )];
    let mut push = |n: Node| {
        nodes.push(n);
        nodes.len() - 1
    };
    let mut hello_node = node(
        0o644,
        NodeData::Regular {
            size: hello.len() as u64,
            chunks: hello_chunks,
        },
    );
    hello_node
        .xattrs
        .insert(b"user.short".to_vec(), b"1".to_vec());
    hello_node
        .xattrs
        .insert(b"user.long".to_vec(), vec![b'x'; 300]);
    hello_node.xattrs.insert(
        b"security.capability".to_vec(),
        vec![
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    let hello_id = push(hello_node);
    let big_id = push(node(
        0o755,
        NodeData::Regular {
            size: big.len() as u64,
            chunks: big_chunks,
        },
    ));
    let sparse_id = push(node(
        0o600,
        NodeData::Regular {
            size: SPARSE_SIZE,
            chunks: sparse_chunks,
        },
    ));
    let bad_id = push(node(
        0o644,
        NodeData::Regular {
            size: bad.len() as u64,
            chunks: bad_chunks,
        },
    ));
    let empty_id = push(node(
        0o444,
        NodeData::Regular {
            size: 0,
            chunks: Vec::new(),
        },
    ));
    let sym_id = push(node(
        0o777,
        NodeData::Symlink {
            target: b"hello.txt".to_vec(),
        },
    ));
    let null_id = push(node(0o666, NodeData::CharDevice { major: 1, minor: 3 }));
    let sda_id = push(node(
        0o660,
        NodeData::BlockDevice {
            major: 8,
            minor: 0x12345,
        },
    ));
    let fifo_id = push(node(0o644, NodeData::Fifo));
    let sock_id = push(node(0o755, NodeData::Socket));
    let mut sub = node(
        0o2750,
        NodeData::Directory {
            entries: BTreeMap::new(),
        },
    );
    sub.attrs.uid = 1000;
    sub.attrs.gid = 100;
    let sub_entries = BTreeMap::from([
        (b"again.txt".to_vec(), hello_id),
        (b"fifo".to_vec(), fifo_id),
    ]);
    sub.data = NodeData::Directory {
        entries: sub_entries,
    };
    let sub_id = push(sub);
    let dev_id = push(node(
        0o755,
        NodeData::Directory {
            entries: BTreeMap::from([(b"null".to_vec(), null_id), (b"sda".to_vec(), sda_id)]),
        },
    ));
    let root_entries = BTreeMap::from([
        (b"hello.txt".to_vec(), hello_id),
        (b"big.bin".to_vec(), big_id),
        (b"sparse.bin".to_vec(), sparse_id),
        (b"bad.bin".to_vec(), bad_id),
        (b"empty".to_vec(), empty_id),
        (b"sym".to_vec(), sym_id),
        (b"sock".to_vec(), sock_id),
        (b"sub".to_vec(), sub_id),
        (b"dev".to_vec(), dev_id),
    ]);
    nodes[0].data = NodeData::Directory {
        entries: root_entries,
    };

    // Damage one byte in the middle of the second chunk of bad.bin.
    let damaged = chunks[damaged_index as usize];
    let blob_digest = Digest::of(&blob);
    let mut stored_blob = blob.clone();
    stored_blob[(damaged.compressed_offset + u64::from(damaged.compressed_size) / 2) as usize] ^=
        0x01;
    fs::write(blobs_dir.join(blob_digest.to_hex()), &stored_blob).expect("write blob");
    let uncompressed: u64 = chunks.iter().map(|c| u64::from(c.uncompressed_size)).sum();
    let tree = ImageTree {
        nodes,
        blobs: vec![BlobInfo {
            digest: blob_digest,
            size: blob.len() as u64,
            uncompressed_size: uncompressed,
            chunk_count: chunks.len() as u32,
        }],
        chunks,
        prefetch: Vec::new(),
        prefetch_ranges: Vec::new(),
        chunk_size_hint: CHUNK as u64,
        chunk_hash: ChunkHash::Blake3,
    };
    let bootstrap = write_bootstrap(&tree).expect("write bootstrap");
    Built {
        layout,
        bootstrap,
        contents,
        damaged: (damaged_index, damaged.digest),
    }
}

/// A mount of the built image; unmounted on drop, even when a test fails.
struct TestMount {
    built: Built,
    mnt: tempfile::TempDir,
    daemon: Option<Daemon>,
}

impl TestMount {
    fn new() -> TestMount {
        require_fuse();
        logs();
        let built = build();
        let mnt = tempfile::tempdir().expect("mountpoint");
        let store = Arc::new(LocalBlobStore::new(built.layout.path()).expect("store"));
        let mut opts = MountOptions::new(mnt.path());
        opts.threads = 4;
        opts.cache_bytes = 1 << 20;
        let daemon = Daemon::start(
            &opts,
            Box::new(built.bootstrap.clone()),
            Backend::new(store),
        )
        .expect("mount");
        TestMount {
            built,
            mnt,
            daemon: Some(daemon),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.unmount();
        }
        // Belt and braces: never leave a mount behind.
        if is_mounted(self.mnt.path()) {
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(self.mnt.path())
                .status();
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().unwrap_or(0),
    }
}

#[test]
fn attributes_and_contents() {
    let m = TestMount::new();
    for (path, data) in &m.built.contents {
        if *path == "bad.bin" {
            continue;
        }
        let got = fs::read(m.p(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        assert!(got == *data, "{path}: contents differ");
    }
    let hello = fs::symlink_metadata(m.p("hello.txt")).expect("stat");
    assert_eq!(hello.mode(), 0o100644);
    assert_eq!(hello.size(), 13);
    assert_eq!(hello.mtime(), 1_700_000_000);
    assert_eq!(hello.mtime_nsec(), 123_456_789);
    assert_eq!(hello.blksize(), 4096);
    assert_eq!(hello.blocks(), 1);
    // Hard links: one inode, two names, nlink 2.
    let again = fs::symlink_metadata(m.p("sub/again.txt")).expect("stat");
    assert_eq!(again.ino(), hello.ino());
    assert_eq!(hello.nlink(), 2);
    // Stable inode numbers: the root is 1.
    assert_eq!(fs::metadata(m.mnt.path()).expect("stat root").ino(), 1);
    // Holes: blocks count only stored bytes (4096 + 3000 -> 14 sectors).
    let sparse = fs::metadata(m.p("sparse.bin")).expect("stat");
    assert_eq!(sparse.size(), SPARSE_SIZE);
    assert_eq!(sparse.blocks(), (4096u64 + 3000).div_ceil(512));
    let sub = fs::metadata(m.p("sub")).expect("stat");
    assert_eq!(
        (sub.mode(), sub.uid(), sub.gid(), sub.nlink()),
        (0o42750, 1000, 100, 2)
    );
    assert_eq!(fs::metadata(m.mnt.path()).expect("root").nlink(), 4);
    let null = fs::symlink_metadata(m.p("dev/null")).expect("stat");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    let sda = fs::symlink_metadata(m.p("dev/sda")).expect("stat");
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), nix::sys::stat::makedev(8, 0x12345));
    assert!(fs::symlink_metadata(m.p("sub/fifo"))
        .expect("stat")
        .file_type()
        .is_fifo());
    assert!(fs::symlink_metadata(m.p("sock"))
        .expect("stat")
        .file_type()
        .is_socket());
    assert_eq!(
        fs::read_link(m.p("sym")).expect("readlink"),
        Path::new("hello.txt")
    );
    assert_eq!(
        fs::read(m.p("sym")).expect("read via symlink"),
        b"hello, world\n"
    );
    assert_eq!(fs::symlink_metadata(m.p("sym")).expect("lstat").size(), 9);
    let vfs = nix::sys::statvfs::statvfs(m.mnt.path()).expect("statvfs");
    assert!(vfs.files() >= 13);
    assert!(vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    assert!(vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV));
    assert!(vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOSUID));
}

#[test]
fn directory_listings() {
    let m = TestMount::new();
    let out = std::process::Command::new("ls")
        .arg("-a1f")
        .arg(m.mnt.path())
        .output()
        .expect("ls");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        names,
        [
            ".",
            "..",
            "bad.bin",
            "big.bin",
            "dev",
            "empty",
            "hello.txt",
            "sock",
            "sparse.bin",
            "sub",
            "sym"
        ]
    );
    let mut names: Vec<_> = fs::read_dir(m.p("sub"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["again.txt", "fifo"]);
    for e in fs::read_dir(m.p("dev")).expect("readdir") {
        let e = e.expect("entry");
        assert!(
            e.file_type().expect("type").is_char_device()
                || e.file_type().expect("type").is_block_device()
        );
    }
}

#[test]
fn errnos() {
    let m = TestMount::new();
    assert_eq!(errno_of(fs::metadata(m.p("nope"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(m.p("sub/nope/deeper"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(m.p("hello.txt/x"))), libc::ENOTDIR);
    assert_eq!(errno_of(fs::read_dir(m.p("hello.txt"))), libc::ENOTDIR);
    assert_eq!(
        errno_of(fs::metadata(m.p(&"n".repeat(300)))),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno_of(fs::read_link(m.p("hello.txt"))), libc::EINVAL);
    assert_eq!(errno_of(fs::read(m.p("sub"))), libc::EISDIR);
    // Every modification is EROFS.
    assert_eq!(errno_of(fs::File::create(m.p("new"))), libc::EROFS);
    assert_eq!(
        errno_of(fs::OpenOptions::new().write(true).open(m.p("hello.txt"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::OpenOptions::new().append(true).open(m.p("hello.txt"))),
        libc::EROFS
    );
    assert_eq!(errno_of(fs::create_dir(m.p("newdir"))), libc::EROFS);
    assert_eq!(errno_of(fs::remove_file(m.p("hello.txt"))), libc::EROFS);
    assert_eq!(errno_of(fs::remove_dir(m.p("sub"))), libc::EROFS);
    assert_eq!(
        errno_of(fs::rename(m.p("hello.txt"), m.p("x"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::hard_link(m.p("hello.txt"), m.p("x"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("a", m.p("x"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::set_permissions(
            m.p("hello.txt"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600)
        )),
        libc::EROFS
    );
    assert_eq!(
        errno_of(xattr::set(m.p("hello.txt"), "user.x", b"1")),
        libc::EROFS
    );
    assert_eq!(
        errno_of(xattr::remove(m.p("hello.txt"), "user.short")),
        libc::EROFS
    );
    assert_eq!(
        nix::unistd::access(&m.p("hello.txt"), nix::unistd::AccessFlags::W_OK)
            .map_err(|e| e as i32),
        Err(libc::EROFS)
    );
    assert!(nix::unistd::access(&m.p("hello.txt"), nix::unistd::AccessFlags::R_OK).is_ok());
}

#[test]
fn xattrs() {
    let m = TestMount::new();
    let p = m.p("hello.txt");
    assert_eq!(
        xattr::get(&p, "user.short").expect("get").as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        xattr::get(&p, "user.long").expect("get").map(|v| v.len()),
        Some(300)
    );
    let mut names: Vec<_> = xattr::list(&p)
        .expect("list")
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["security.capability", "user.long", "user.short"]);
    // Missing attribute: ENODATA.
    assert_eq!(
        rustix::fs::getxattr(&p, "user.nope", &mut [0u8; 16][..]).map_err(|e| e.raw_os_error()),
        Err(libc::ENODATA)
    );
    // Size query, then a buffer too small: ERANGE.
    assert_eq!(rustix::fs::getxattr_query(&p, "user.long").ok(), Some(300));
    assert_eq!(
        rustix::fs::getxattr(&p, "user.long", &mut [0u8; 10][..]).map_err(|e| e.raw_os_error()),
        Err(libc::ERANGE)
    );
    assert_eq!(
        rustix::fs::listxattr(&p, &mut [0u8; 4][..]).map_err(|e| e.raw_os_error()),
        Err(libc::ERANGE)
    );
    let total = "security.capability\0user.long\0user.short\0".len();
    assert_eq!(rustix::fs::listxattr_query(&p).ok(), Some(total));
    assert_eq!(xattr::list(m.p("sub")).expect("list").count(), 0);
}

#[test]
fn ranges_holes_and_eof() {
    let m = TestMount::new();
    let big = &m.built.contents["big.bin"];
    let mut f = fs::File::open(m.p("big.bin")).expect("open");
    for (off, len) in [
        (0usize, 1usize),
        (65535, 2),
        (65536 * 3 - 7, 200_000),
        (big.len() - 10, 100),
        (big.len() + 5, 10),
    ] {
        f.seek(SeekFrom::Start(off as u64)).expect("seek");
        let mut buf = vec![0u8; len];
        let n = read_full(&mut f, &mut buf);
        let want = &big[off.min(big.len())..(off + len).min(big.len())];
        assert_eq!(&buf[..n], want, "range {off}+{len}");
    }
    let mut f = fs::File::open(m.p("sparse.bin")).expect("open");
    f.seek(SeekFrom::Start(4000)).expect("seek");
    let mut buf = vec![1u8; 8192];
    assert_eq!(read_full(&mut f, &mut buf), 8192);
    assert_eq!(&buf[..96], &m.built.contents["sparse.bin"][4000..4096]);
    assert!(
        buf[96..].iter().all(|&b| b == 0),
        "a hole must read as zeros"
    );
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

#[test]
fn damaged_chunk_is_eio_and_logged() {
    let m = TestMount::new();
    let (index, digest) = m.built.damaged;
    // The first chunk of bad.bin is intact; the second is not.
    let mut f = fs::File::open(m.p("bad.bin")).expect("open");
    let mut first = vec![0u8; 1000];
    assert_eq!(read_full(&mut f, &mut first), 1000);
    assert_eq!(first, m.built.contents["bad.bin"][..1000]);
    for _ in 0..2 {
        assert_eq!(errno_of(fs::read(m.p("bad.bin"))), libc::EIO);
    }
    // Other files are still served.
    assert_eq!(
        fs::read(m.p("big.bin")).expect("read"),
        m.built.contents["big.bin"]
    );
    let logs =
        String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let line = logs
        .lines()
        .find(|l| l.contains(&digest.to_string()))
        .unwrap_or_else(|| panic!("no log line names the damaged chunk {digest}:\n{logs}"));
    assert!(line.contains(&format!("chunk {index}")), "{line}");
    assert!(line.contains("/bad.bin"), "{line}");
    let metrics = m.daemon.as_ref().expect("daemon").metrics().snapshot();
    assert!(
        metrics.chunk_errors >= 1 && metrics.read_errors >= 1,
        "{metrics}"
    );
}

#[test]
fn concurrent_readers_see_the_right_bytes() {
    let m = TestMount::new();
    let big = &m.built.contents["big.bin"];
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let path = m.p("big.bin");
            s.spawn(move || {
                let mut f = fs::File::open(&path).expect("open");
                let mut x = t + 1;
                for _ in 0..200 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 33) as usize % big.len();
                    let len = ((x >> 13) as usize % 300_000).max(1);
                    f.seek(SeekFrom::Start(off as u64)).expect("seek");
                    let mut buf = vec![0u8; len];
                    let n = read_full(&mut f, &mut buf);
                    assert_eq!(&buf[..n], &big[off..(off + len).min(big.len())]);
                }
            });
        }
    });
}

#[test]
fn stale_mount_is_detected() {
    require_fuse();
    // A mount whose daemon is gone: a FUSE fd opened and dropped.
    let mnt = tempfile::tempdir().expect("mountpoint");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/fuse && mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0,ro skiff-stale {} ; exec 3<&-",
            mnt.path().display()
        ))
        .status()
        .expect("sh");
    assert!(status.success(), "could not make a stale mount");
    let err =
        skiff_fusefs::check_mountpoint(mnt.path(), false).expect_err("a stale mount is an error");
    let msg = err.to_string();
    assert!(
        msg.contains("stale mount") && msg.contains("fusermount3 -u"),
        "{msg}"
    );
    skiff_fusefs::check_mountpoint(mnt.path(), true).expect("--force-unmount clears it");
    assert!(!is_mounted(mnt.path()));
}
