//! Hostile bootstraps served by the real FUSE daemon.
//!
//! `format/tests/robustness.rs` feeds lying bootstraps to the parser; this
//! test serves them: a small real image (directories, a file of several
//! chunks, a symlink, a hard link, xattrs) is converted with `skiff
//! convert`, and then, case by case, its bootstrap layer is replaced by a
//! mutated one. The new layer is a proper zstd layer with its digest, size
//! and uncompressed-digest annotation fixed in the manifest, and the index
//! points at the new manifest, so the daemon really reads the lie.
//!
//! - **Unsealed** cases flip bits and leave the CRCs as they were: `skiff
//!   mount` must refuse, exit non-zero with a message naming the bootstrap
//!   and what check failed, and leave no mount behind.
//! - **Resealed** cases edit one record (a directory entry naming an
//!   ancestor, offsets past the end of a section, a chunk map out of order,
//!   ...) and recompute every CRC with [`skiff_format::reseal`], so only the
//!   structural checks stand between the lie and the reader. Then either
//!   mount refuses, or it mounts and a full walk (`find`; stat, readlink,
//!   listxattr and getxattr of every path; every file read to its end)
//!   finishes within a deadline, gets only errors or the original data for
//!   everything the edit did not touch, and the daemon is still alive
//!   afterwards, still serves an intact file, logs no panic and unmounts
//!   cleanly on SIGTERM.
//!
//! Every case states its expected outcome; the table printed at the end
//! (refused / served with N errors) is what docs/hostile-input.md records.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use skiff_format::layout::{
    ChunkRecord, DirentRecord, FileChunkRecord, InodeRecord, PrefetchRangeRecord, SectionEntry,
    XattrRecord, CHUNK_FLAG_ZSTD, SECTION_CHUNKS, SECTION_DIRENTS, SECTION_ENTRY_SIZE,
    SECTION_FILE_CHUNKS, SECTION_INODES, SECTION_PREFETCH, SECTION_PREFETCH_RANGES,
    SECTION_STRINGS, SECTION_XATTRS, SUPERBLOCK_SIZE,
};
use skiff_format::{reseal, Bootstrap, InodeId};
use skiff_registry::media::{ANNOTATION_BOOTSTRAP_DIGEST, SKIFF_BOOTSTRAP};
use skiff_tests::harness::{catch_case, noise, remove_all, run, scratch_root, skiff_cmd};
use skiff_tests::services::{stop_child, SkiffMount};
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// How long a walk of one mount may take: it reads well under 100 MiB, so
/// anything near this is a hang.
const WALK_DEADLINE: Duration = Duration::from_secs(90);
/// Bytes read from the start of a file before the walk skips to its end (a
/// lying size makes a file as large as the liar wants).
const READ_CAP: u64 = 64 << 20;
/// The file no case touches: the daemon must still serve it after the walk.
const INTACT: &str = "ctl/intact";

// ---------------------------------------------------------------------------
// The image

/// What the walk expects at a path of the original tree.
#[derive(Clone, Debug)]
enum Want {
    Dir,
    File(Vec<u8>),
    Link(Vec<u8>),
}

/// The original tree: path -> what is there, and path -> xattrs.
struct Original {
    paths: BTreeMap<String, Want>,
    xattrs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

/// Extended attributes of a file of the layer: (name, value).
type Xattrs = Vec<(&'static str, Vec<u8>)>;

/// Writes the layer tar and returns what it holds.
fn write_layer(path: &Path) -> Original {
    let mut paths = BTreeMap::new();
    let mut xattrs: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut t = tar::Builder::new(fs::File::create(path).unwrap());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for d in [
        "ctl",
        "data",
        "deep",
        "deep/a",
        "deep/a/b",
        "deep/a/b/c",
        "etc",
    ] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        t.append_data(&mut h, format!("{d}/"), std::io::empty())
            .unwrap();
        paths.insert(d.to_string(), Want::Dir);
    }
    let files: Vec<(&str, Vec<u8>, Xattrs)> = vec![
        (INTACT, noise(150_000, 1), vec![]),
        // Five 64 KiB chunks and a tail.
        (
            "data/big.bin",
            noise(5 * 65536 + 1234, 2),
            vec![("user.big", noise(1000, 3))],
        ),
        (
            "data/small.txt",
            b"small and plain\n".to_vec(),
            vec![("user.one", b"1".to_vec()), ("user.two", b"22".to_vec())],
        ),
        ("deep/a/b/c/file", b"at the bottom\n".to_vec(), vec![]),
        (
            "etc/hosts",
            b"127.0.0.1 localhost\n".to_vec(),
            vec![("user.note", b"hello".to_vec())],
        ),
    ];
    for (name, data, xs) in &files {
        if !xs.is_empty() {
            let records: Vec<(String, &[u8])> = xs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            t.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
            xattrs.insert(
                name.to_string(),
                xs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            );
        }
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        t.append_data(&mut h, name, data.as_slice()).unwrap();
        paths.insert(name.to_string(), Want::File(data.clone()));
    }
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    t.append_link(&mut h, "data/link", "small.txt").unwrap();
    paths.insert("data/link".into(), Want::Link(b"small.txt".to_vec()));
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    t.append_link(&mut h, "data/hard", "data/small.txt")
        .unwrap();
    paths.insert(
        "data/hard".into(),
        Want::File(b"small and plain\n".to_vec()),
    );
    xattrs.insert("data/hard".into(), xattrs["data/small.txt"].clone());
    t.into_inner().unwrap();
    Original { paths, xattrs }
}

// ---------------------------------------------------------------------------
// Replacing the bootstrap of an OCI layout

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(data));
    fs::write(blob_path(layout, &digest), data).unwrap();
    digest
}

/// The index entry of the layout's only manifest.
fn manifest_entry(index: &mut Value) -> &mut Value {
    let manifests = index["manifests"].as_array_mut().expect("index.manifests");
    assert_eq!(manifests.len(), 1, "one image in the layout");
    &mut manifests[0]
}

/// The uncompressed bootstrap of the image in `layout`.
fn read_bootstrap(layout: &Path) -> Vec<u8> {
    let mut index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = manifest_entry(&mut index)["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: Value = serde_json::from_slice(&fs::read(blob_path(layout, &digest)).unwrap())
        .expect("manifest JSON");
    let layer = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == SKIFF_BOOTSTRAP)
        .expect("a bootstrap layer");
    let compressed = fs::read(blob_path(layout, layer["digest"].as_str().unwrap())).unwrap();
    zstd::decode_all(compressed.as_slice()).expect("the bootstrap layer is zstd")
}

/// Makes `bootstrap` the image's bootstrap: a new zstd layer blob, the
/// manifest's layer descriptor (digest, size, uncompressed-digest
/// annotation) fixed, a new manifest blob, and index.json pointing at it.
fn replace_bootstrap(layout: &Path, bootstrap: &[u8]) {
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let entry = manifest_entry(&mut index);
    let old = entry["digest"].as_str().unwrap().to_string();
    let mut manifest: Value =
        serde_json::from_slice(&fs::read(blob_path(layout, &old)).unwrap()).unwrap();
    let compressed = zstd::encode_all(bootstrap, 3).unwrap();
    let layer_digest = write_blob(layout, &compressed);
    let layer = manifest["layers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|l| l["mediaType"] == SKIFF_BOOTSTRAP)
        .expect("a bootstrap layer");
    layer["digest"] = Value::from(layer_digest);
    layer["size"] = Value::from(compressed.len());
    layer["annotations"][ANNOTATION_BOOTSTRAP_DIGEST] =
        Value::from(format!("sha256:{}", sha256_hex(bootstrap)));
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = write_blob(layout, &manifest_bytes);
    entry["digest"] = Value::from(manifest_digest);
    entry["size"] = Value::from(manifest_bytes.len());
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------
// Patching records

/// The section table entry of `kind`.
fn section(buf: &[u8], kind: u32) -> SectionEntry {
    let count = u32::from_le_bytes(buf[24..28].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| {
            let off = SUPERBLOCK_SIZE + i * SECTION_ENTRY_SIZE;
            SectionEntry::read_from_bytes(&buf[off..off + SECTION_ENTRY_SIZE]).unwrap()
        })
        .find(|e| e.kind.get() == kind)
        .unwrap_or_else(|| panic!("no section of kind {kind}"))
}

/// Edits record `index` of section `kind` in place (no reseal).
fn patch<T>(buf: &mut [u8], kind: u32, index: u32, edit: impl FnOnce(&mut T))
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable,
{
    let e = section(buf, kind);
    let size = size_of::<T>();
    assert_eq!(
        e.record_size.get() as usize,
        size,
        "record size of kind {kind}"
    );
    let off = e.offset.get() as usize + index as usize * size;
    let mut rec = T::read_from_bytes(&buf[off..off + size]).unwrap();
    edit(&mut rec);
    buf[off..off + size].copy_from_slice(rec.as_bytes());
}

/// Finds records of the original bootstrap by path.
struct Map<'a> {
    b: Bootstrap<'a>,
}

impl Map<'_> {
    fn id(&self, path: &str) -> u32 {
        self.b
            .resolve_path(path.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{path} is not in the image"))
            .0
    }

    fn inode(&self, path: &str) -> InodeRecord {
        *self.b.inode(InodeId(self.id(path))).unwrap().record()
    }

    /// The DIRENTS index of entry `name` of directory `dir`.
    fn dirent(&self, dir: &str, name: &str) -> u32 {
        let d = InodeId(self.id(dir));
        let pos = (0..self.b.dir_len(d).unwrap())
            .find(|&i| self.b.dir_entry(d, i).unwrap().name == name.as_bytes())
            .unwrap_or_else(|| panic!("{dir}/{name} is not in the image"));
        self.inode(dir).data_start.get() + pos
    }

    /// The FILE_CHUNKS index of the `n`-th chunk of file `path`.
    fn file_chunk(&self, path: &str, n: u32) -> u32 {
        let i = self.inode(path);
        assert!(n < i.data_count.get(), "{path} has no chunk {n}");
        i.data_start.get() + n
    }

    /// The CHUNKS index of the `n`-th chunk of file `path`.
    fn chunk(&self, path: &str, n: u32) -> u32 {
        self.b.file_chunks(InodeId(self.id(path))).unwrap()[n as usize].chunk_index()
    }

    /// The XATTRS index of the `n`-th xattr of `path`.
    fn xattr(&self, path: &str, n: u32) -> u32 {
        let i = self.inode(path);
        assert!(n < i.xattr_count.get(), "{path} has no xattr {n}");
        i.xattr_start.get() + n
    }

    fn strings_len(&self) -> u32 {
        self.b.section_bytes(SECTION_STRINGS).unwrap().len() as u32
    }
}

/// Applies `edit` to a copy of `good`, located through the original's map.
fn edited(good: &[u8], edit: impl FnOnce(&Map<'_>, &mut Vec<u8>)) -> Vec<u8> {
    let map = Map {
        b: Bootstrap::parse(good).unwrap(),
    };
    let mut buf = good.to_vec();
    edit(&map, &mut buf);
    buf
}

// ---------------------------------------------------------------------------
// The cases

/// What a case must do.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// `skiff mount` exits non-zero; its message holds each of these.
    Refused(&'static [&'static str]),
    /// It mounts; the walk meets at least one error (the lie is noticed).
    Errors,
    /// It mounts; the walk may meet no error (what the lie claims is
    /// possible, e.g. a sparse file), and what it reads is checked.
    Served,
    /// It mounts and the walk meets no error at all (the control).
    Clean,
}

/// An edit of a bootstrap, given the map of the original.
type Edit = dyn Fn(&Map<'_>, &mut Vec<u8>);

struct Case {
    name: &'static str,
    /// Edits the bootstrap; the CRCs are recomputed afterwards if `seal`.
    edit: Box<Edit>,
    seal: bool,
    /// Paths whose content, type or xattrs the edit changes (and everything
    /// below them): the walk does not compare them with the original.
    touched: &'static [&'static str],
    /// Extra `skiff mount` flags (default: `--prefetch-all`, so that the
    /// background prefetch walks every inode of the lie too).
    mount_args: &'static [&'static str],
    expect: Expect,
}

/// The needles every refused flip must show: the bootstrap is named, and
/// one of the parser's checks.
const FLIP_NEEDLES: &[&str] = &["bootstrap"];
const FLIP_CHECKS: &[&str] = &[
    "checksum mismatch",
    "bad magic",
    "unsupported bootstrap version",
    "superblock flags",
    "truncated",
    "out of bounds",
    "corrupt bootstrap",
];

fn flips(name: &'static str, seed: u64, count: usize, region: fn(&[u8]) -> (usize, usize)) -> Case {
    Case {
        name,
        edit: Box::new(move |_, buf| {
            let (from, to) = region(buf);
            let r = noise(count * 9, seed);
            for k in 0..count {
                let pick = u64::from_le_bytes(r[k * 9..k * 9 + 8].try_into().unwrap());
                let at = from + (pick as usize) % (to - from);
                buf[at] ^= 1 << (r[k * 9 + 8] % 8);
            }
        }),
        seal: false,
        touched: &[],
        mount_args: &[],
        expect: Expect::Refused(FLIP_NEEDLES),
    }
}

fn section_range(buf: &[u8], kind: u32) -> (usize, usize) {
    let e = section(buf, kind);
    let from = e.offset.get() as usize;
    (from, from + e.length.get() as usize)
}

fn resealed(
    name: &'static str,
    touched: &'static [&'static str],
    expect: Expect,
    edit: impl Fn(&Map<'_>, &mut Vec<u8>) + 'static,
) -> Case {
    Case {
        name,
        edit: Box::new(edit),
        seal: true,
        touched,
        mount_args: &["--prefetch-all"],
        expect,
    }
}

fn dirent(buf: &mut [u8], index: u32, edit: impl FnOnce(&mut DirentRecord)) {
    patch::<DirentRecord>(buf, SECTION_DIRENTS, index, edit);
}

fn inode(buf: &mut [u8], id: u32, edit: impl FnOnce(&mut InodeRecord)) {
    patch::<InodeRecord>(buf, SECTION_INODES, id, edit);
}

fn cases() -> Vec<Case> {
    use Expect::{Errors, Served};
    vec![
        // The control: a reserved superblock byte (readers ignore it), resealed.
        resealed(
            "control: reserved byte set",
            &[],
            Expect::Clean,
            |_, buf| {
                buf[60] ^= 1;
            },
        ),
        // --- (a) flipped bits, checksums left as they were ---
        flips("flip: one bit in the superblock", 11, 1, |_| {
            (0, SUPERBLOCK_SIZE)
        }),
        flips("flip: one bit in the section table", 12, 1, |buf| {
            let n = u32::from_le_bytes(buf[24..28].try_into().unwrap()) as usize;
            (SUPERBLOCK_SIZE, SUPERBLOCK_SIZE + n * SECTION_ENTRY_SIZE)
        }),
        flips("flip: one bit in INODES", 13, 1, |buf| {
            section_range(buf, SECTION_INODES)
        }),
        flips("flip: one bit in DIRENTS", 14, 1, |buf| {
            section_range(buf, SECTION_DIRENTS)
        }),
        flips("flip: one bit in CHUNKS", 15, 1, |buf| {
            section_range(buf, SECTION_CHUNKS)
        }),
        flips("flip: one bit in STRINGS", 16, 1, |buf| {
            section_range(buf, SECTION_STRINGS)
        }),
        flips("flip: 16 bits anywhere", 17, 16, |buf| (0, buf.len())),
        flips("flip: 1 bit anywhere (seed 18)", 18, 1, |buf| {
            (0, buf.len())
        }),
        flips("flip: 1 bit anywhere (seed 19)", 19, 1, |buf| {
            (0, buf.len())
        }),
        // --- (b) resealed lies ---
        resealed(
            "loop: entry names the root",
            &["deep/a/b/c"],
            Errors,
            |m, buf| {
                let i = m.dirent("deep/a/b", "c");
                dirent(buf, i, |d| d.inode = U32::new(0));
            },
        ),
        resealed(
            "loop: entry names its grandparent",
            &["deep/a/b/c"],
            Errors,
            |m, buf| {
                let (i, a) = (m.dirent("deep/a/b", "c"), m.id("deep/a"));
                dirent(buf, i, |d| d.inode = U32::new(a));
            },
        ),
        resealed(
            "loop: entry names its own directory",
            &["deep/a/b/c"],
            Errors,
            |m, buf| {
                let (i, b) = (m.dirent("deep/a/b", "c"), m.id("deep/a/b"));
                dirent(buf, i, |d| d.inode = U32::new(b));
            },
        ),
        resealed(
            "two directories share entries",
            &["etc", "deep"],
            Served,
            |m, buf| {
                // etc lists deep/a's entries: deep/a/b gets a second parent.
                let a = m.inode("deep/a");
                let etc = m.id("etc");
                inode(buf, etc, |i| {
                    i.data_start = a.data_start;
                    i.data_count = a.data_count;
                });
            },
        ),
        resealed(
            "entry name offset beyond STRINGS",
            &["data"],
            Errors,
            |m, buf| {
                let (i, end) = (m.dirent("data", "small.txt"), m.strings_len());
                dirent(buf, i, |d| d.name_offset = U32::new(end + 1000));
            },
        ),
        resealed("entry name offset u32::MAX", &["data"], Errors, |m, buf| {
            let i = m.dirent("data", "link");
            dirent(buf, i, |d| d.name_offset = U32::new(u32::MAX));
        }),
        resealed("entry name length 65535", &["data"], Errors, |m, buf| {
            let i = m.dirent("data", "hard");
            dirent(buf, i, |d| d.name_len = U16::new(u16::MAX));
        }),
        resealed("entry inode beyond INODES", &["data"], Errors, |m, buf| {
            let i = m.dirent("data", "big.bin");
            dirent(buf, i, |d| d.inode = U32::new(u32::MAX));
        }),
        resealed("entry names out of order", &["data"], Errors, |m, buf| {
            // The first entry takes the last one's name: lookups by binary
            // search then miss names that readdir lists.
            let (first, last) = (m.dirent("data", "big.bin"), m.dirent("data", "small.txt"));
            let mut name = (0, 0);
            patch::<DirentRecord>(buf, SECTION_DIRENTS, last, |d| {
                name = (d.name_offset.get(), d.name_len.get());
            });
            dirent(buf, first, |d| {
                d.name_offset = U32::new(name.0);
                d.name_len = U16::new(name.1);
            });
        }),
        resealed(
            "entry type says file, inode is a directory",
            &["deep"],
            Errors,
            |m, buf| {
                let i = m.dirent("deep", "a");
                dirent(buf, i, |d| d.file_type = 1);
            },
        ),
        resealed(
            "directory data_start u32::MAX",
            &["data"],
            Errors,
            |m, buf| {
                inode(buf, m.id("data"), |i| i.data_start = U32::new(u32::MAX));
            },
        ),
        resealed(
            "directory data_count u32::MAX",
            &["data"],
            Errors,
            |m, buf| {
                inode(buf, m.id("data"), |i| i.data_count = U32::new(u32::MAX));
            },
        ),
        resealed(
            "file data_start beyond FILE_CHUNKS",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                inode(buf, m.id("data/big.bin"), |i| {
                    i.data_start = U32::new(1 << 30)
                });
            },
        ),
        resealed(
            "file data_count u32::MAX",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                inode(buf, m.id("data/big.bin"), |i| {
                    i.data_count = U32::new(u32::MAX)
                });
            },
        ),
        resealed(
            "directory parent beyond INODES",
            &["deep/a"],
            Errors,
            |m, buf| {
                inode(buf, m.id("deep/a"), |i| i.parent = U32::new(u32::MAX));
            },
        ),
        resealed("file mode without a type", &["data"], Errors, |m, buf| {
            inode(buf, m.id("data/small.txt"), |i| i.mode = U32::new(0o644));
        }),
        resealed(
            "chunk index beyond CHUNKS",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                let i = m.file_chunk("data/big.bin", 2);
                patch::<FileChunkRecord>(buf, SECTION_FILE_CHUNKS, i, |c| {
                    c.chunk_index = U32::new(u32::MAX)
                });
            },
        ),
        resealed(
            "file chunks overlap",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                let i = m.file_chunk("data/big.bin", 1);
                patch::<FileChunkRecord>(buf, SECTION_FILE_CHUNKS, i, |c| {
                    c.file_offset = U64::new(c.file_offset.get() - 100)
                });
            },
        ),
        resealed(
            "file chunks out of order",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                let (a, b) = (
                    m.file_chunk("data/big.bin", 0),
                    m.file_chunk("data/big.bin", 3),
                );
                let mut offs = (0, 0);
                patch::<FileChunkRecord>(buf, SECTION_FILE_CHUNKS, a, |c| {
                    offs.0 = c.file_offset.get()
                });
                patch::<FileChunkRecord>(buf, SECTION_FILE_CHUNKS, b, |c| {
                    offs.1 = c.file_offset.get()
                });
                patch::<FileChunkRecord>(buf, SECTION_FILE_CHUNKS, a, |c| {
                    c.file_offset = U64::new(offs.1)
                });
                patch::<FileChunkRecord>(buf, SECTION_FILE_CHUNKS, b, |c| {
                    c.file_offset = U64::new(offs.0)
                });
            },
        ),
        resealed(
            "file chunk beyond the file size",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                inode(buf, m.id("data/big.bin"), |i| i.size = U64::new(65536 + 10));
            },
        ),
        resealed(
            "huge file size, no chunks (1 TiB)",
            &["data/small.txt", "data/hard"],
            Served,
            |m, buf| {
                inode(buf, m.id("data/small.txt"), |i| {
                    i.size = U64::new(1 << 40);
                    i.data_count = U32::new(0);
                });
            },
        ),
        resealed(
            "file size u64::MAX, no chunks",
            &["data/small.txt", "data/hard"],
            Errors,
            |m, buf| {
                inode(buf, m.id("data/small.txt"), |i| {
                    i.size = U64::new(u64::MAX);
                    i.data_count = U32::new(0);
                });
            },
        ),
        resealed(
            "xattr value_len u32::MAX",
            &["data/small.txt", "data/hard"],
            Errors,
            |m, buf| {
                let i = m.xattr("data/small.txt", 0);
                patch::<XattrRecord>(buf, SECTION_XATTRS, i, |x| x.value_len = U32::new(u32::MAX));
            },
        ),
        resealed(
            "xattr value offset beyond STRINGS",
            &["etc/hosts"],
            Errors,
            |m, buf| {
                let (i, end) = (m.xattr("etc/hosts", 0), m.strings_len());
                patch::<XattrRecord>(buf, SECTION_XATTRS, i, |x| x.value_offset = U32::new(end));
            },
        ),
        resealed(
            "xattr name offset beyond STRINGS",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                let i = m.xattr("data/big.bin", 0);
                patch::<XattrRecord>(buf, SECTION_XATTRS, i, |x| {
                    x.name_offset = U32::new(u32::MAX - 3)
                });
            },
        ),
        resealed("xattr_count u32::MAX", &["etc/hosts"], Errors, |m, buf| {
            inode(buf, m.id("etc/hosts"), |i| {
                i.xattr_count = U32::new(u32::MAX)
            });
        }),
        resealed(
            "symlink target offset beyond STRINGS",
            &["data/link"],
            Errors,
            |m, buf| {
                let end = m.strings_len();
                inode(buf, m.id("data/link"), |i| i.data_start = U32::new(end + 5));
            },
        ),
        resealed(
            "symlink target length u32::MAX",
            &["data/link"],
            Errors,
            |m, buf| {
                inode(buf, m.id("data/link"), |i| {
                    i.data_count = U32::new(u32::MAX)
                });
            },
        ),
        resealed(
            "chunk blob_index beyond BLOBS",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                let c = m.chunk("data/big.bin", 1);
                patch::<ChunkRecord>(buf, SECTION_CHUNKS, c, |r| r.blob_index = U32::new(7));
            },
        ),
        resealed(
            "chunk offset beyond its blob",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                let c = m.chunk("data/big.bin", 2);
                patch::<ChunkRecord>(buf, SECTION_CHUNKS, c, |r| {
                    r.compressed_offset = U64::new(1 << 40)
                });
            },
        ),
        resealed("chunk digest wrong", &["data/big.bin"], Errors, |m, buf| {
            let c = m.chunk("data/big.bin", 3);
            patch::<ChunkRecord>(buf, SECTION_CHUNKS, c, |r| r.digest[0] ^= 1);
        }),
        resealed("chunk sizes lie", &["data/big.bin"], Errors, |m, buf| {
            let c = m.chunk("data/big.bin", 4);
            patch::<ChunkRecord>(buf, SECTION_CHUNKS, c, |r| {
                r.uncompressed_size = U32::new(r.uncompressed_size.get() / 2)
            });
        }),
        resealed(
            "chunk shares another's digest, lies about its size",
            &["data/big.bin"],
            Errors,
            |m, buf| {
                // Chunk 4 becomes chunk 3 (same digest and stored bytes) but
                // half as long: the cache, keyed by digest, holds chunk 3's
                // full data, which must not be copied over the hole after it.
                let (c3, c4) = (m.chunk("data/big.bin", 3), m.chunk("data/big.bin", 4));
                let mut three = None;
                patch::<ChunkRecord>(buf, SECTION_CHUNKS, c3, |r| three = Some(*r));
                let three = three.unwrap();
                patch::<ChunkRecord>(buf, SECTION_CHUNKS, c4, |r| {
                    *r = three;
                    let half = U32::new(three.uncompressed_size.get() / 2);
                    r.uncompressed_size = half;
                    // A stored (raw) chunk's sizes are equal: keep the record
                    // consistent, so that only the digest's data can tell.
                    if three.flags.get() & CHUNK_FLAG_ZSTD == 0 {
                        r.compressed_size = half;
                    }
                });
            },
        ),
        resealed(
            "mtime far before the epoch",
            &["etc/hosts"],
            Served,
            |m, buf| {
                inode(buf, m.id("etc/hosts"), |i| {
                    i.mtime_sec = I64::new(i64::MIN);
                });
            },
        ),
        Case {
            mount_args: &[],
            ..resealed("prefetch entry beyond INODES", &[], Served, |_, buf| {
                patch::<U32>(buf, SECTION_PREFETCH, 0, |p| *p = U32::new(u32::MAX));
            })
        },
        Case {
            mount_args: &[],
            ..resealed(
                "prefetch range beyond its file's chunk map",
                &[],
                Served,
                |_, buf| {
                    patch::<PrefetchRangeRecord>(buf, SECTION_PREFETCH_RANGES, 0, |r| {
                        r.count = U32::new(u32::MAX)
                    });
                },
            )
        },
    ]
}

// ---------------------------------------------------------------------------
// The walk

/// What a walk of a mount met.
#[derive(Default, Debug)]
struct Walk {
    /// Paths visited.
    paths: usize,
    /// Bytes read from files.
    bytes: u64,
    /// Errors by errno name, and a few examples.
    errors: BTreeMap<String, usize>,
    examples: Vec<String>,
    /// Untouched paths whose type, content, target or xattrs differ from
    /// the original's (must stay empty).
    wrong: Vec<String>,
}

impl Walk {
    fn error(&mut self, rel: &str, what: &str, e: &std::io::Error) {
        let name = match e.raw_os_error() {
            Some(n) => nix::errno::Errno::from_raw(n).to_string(),
            None => e.kind().to_string(),
        };
        let name = name.split(':').next().unwrap_or_default().to_string();
        *self.errors.entry(name).or_default() += 1;
        if self.examples.len() < 6 {
            self.examples.push(format!("{what} /{rel}: {e}"));
        }
    }

    fn error_count(&self) -> usize {
        self.errors.values().sum()
    }
}

/// Whether `rel` is at or below one of `touched`.
fn is_touched(rel: &str, touched: &[&str]) -> bool {
    touched
        .iter()
        .any(|t| rel == *t || rel.starts_with(&format!("{t}/")))
}

/// Reads a file to its end (or its first [`READ_CAP`] bytes and its last
/// 64 KiB); returns the bytes when it read them all.
fn read_file(path: &Path, size: u64, walk: &mut Walk, rel: &str) -> Option<Vec<u8>> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            walk.error(rel, "open", &e);
            return None;
        }
    };
    let mut data = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if data.len() as u64 >= READ_CAP {
            // Past the cap: the end of the file still has to answer.
            let tail = size.saturating_sub(65536).min(i64::MAX as u64);
            let mut end = vec![0u8; 65536];
            match f.seek(SeekFrom::Start(tail)) {
                Ok(_) => match f.read(&mut end) {
                    Ok(n) => walk.bytes += n as u64,
                    Err(e) => walk.error(rel, "read (end)", &e),
                },
                Err(e) => walk.error(rel, "seek", &e),
            }
            return None;
        }
        match f.read(&mut buf) {
            Ok(0) => return Some(data),
            Ok(n) => {
                walk.bytes += n as u64;
                data.extend_from_slice(&buf[..n]);
            }
            Err(e) => {
                walk.error(rel, "read", &e);
                // The rest of the file may still read: try past the bad part.
                let next = (data.len() as u64 + (1 << 20)).min(size);
                let mut probe = vec![0u8; 4096];
                if let Err(e) = f.read_at(&mut probe, next) {
                    walk.error(rel, "read (after an error)", &e);
                }
                return None;
            }
        }
    }
}

fn walk_tree(root: &Path, original: &Original, touched: &[&str]) -> Walk {
    let mut walk = Walk::default();
    let mut seen_dirs = BTreeSet::new();
    let mut stack = vec![(String::new(), 0usize)];
    while let Some((rel, depth)) = stack.pop() {
        let dir = root.join(&rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                walk.error(&rel, "readdir", &e);
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    walk.error(&rel, "readdir entry", &e);
                    break;
                }
            };
            let name = String::from_utf8_lossy(entry.file_name().as_bytes()).into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            walk.paths += 1;
            let path = root.join(&child);
            let check = !is_touched(&child, touched);
            let want = original.paths.get(&child).filter(|_| check);
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    walk.error(&child, "stat", &e);
                    if want.is_some() {
                        walk.wrong.push(format!("/{child}: stat failed: {e}"));
                    }
                    continue;
                }
            };
            // Extended attributes of everything (without following links).
            match xattr::list(&path) {
                Ok(names) => {
                    let mut got = BTreeMap::new();
                    for n in names {
                        match xattr::get(&path, &n) {
                            Ok(v) => {
                                got.insert(n.to_string_lossy().into_owned(), v.unwrap_or_default());
                            }
                            Err(e) => walk.error(&child, "getxattr", &e),
                        }
                    }
                    if want.is_some() {
                        let expected = original.xattrs.get(&child).cloned().unwrap_or_default();
                        if got != expected {
                            walk.wrong.push(format!("/{child}: xattrs {got:?}"));
                        }
                    }
                }
                Err(e) => walk.error(&child, "listxattr", &e),
            }
            let ft = meta.file_type();
            if ft.is_dir() {
                if want.is_some_and(|w| !matches!(w, Want::Dir)) {
                    walk.wrong.push(format!("/{child}: a directory"));
                }
                // The kernel keeps one dentry per directory inode, but a
                // lying tree may still show one directory at many paths.
                if depth < 32 && seen_dirs.insert(meta.ino()) {
                    stack.push((child, depth + 1));
                }
            } else if ft.is_symlink() {
                match fs::read_link(&path) {
                    Ok(t) => {
                        if let Some(w) = want {
                            if !matches!(w, Want::Link(x) if x.as_slice() == t.as_os_str().as_bytes())
                            {
                                walk.wrong
                                    .push(format!("/{child}: link to {}", t.display()));
                            }
                        }
                    }
                    Err(e) => walk.error(&child, "readlink", &e),
                }
                // Following it must not hang either.
                let _ = fs::metadata(&path);
            } else if ft.is_file() {
                if let Some(data) = read_file(&path, meta.len(), &mut walk, &child) {
                    if let Some(w) = want {
                        if !matches!(w, Want::File(x) if *x == data) {
                            walk.wrong
                                .push(format!("/{child}: {} bytes that differ", data.len()));
                        }
                    }
                } else if want.is_some() {
                    walk.wrong
                        .push(format!("/{child}: not readable to its end"));
                }
            } else if want.is_some() {
                walk.wrong.push(format!("/{child}: type {ft:?}"));
            }
        }
    }
    // Untouched paths must all have been found.
    for (p, _) in original.paths.iter() {
        if !is_touched(p, touched) && fs::symlink_metadata(root.join(p)).is_err() {
            walk.wrong.push(format!("/{p}: missing"));
        }
    }
    walk
}

/// `find MNT` with a deadline: (lines printed, exit success).
fn find(root: &Path, deadline: Instant) -> Result<(usize, bool), String> {
    let out = root.with_extension("find.txt");
    let mut child = Command::new("find")
        .arg(root)
        .stdout(fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("find");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let lines = fs::read_to_string(&out).unwrap_or_default().lines().count();
            let _ = fs::remove_file(&out);
            return Ok((lines, status.success()));
        }
        if Instant::now() > deadline {
            stop_child(&mut child, "find");
            return Err("find HUNG".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Running a case

/// What happened to a case, for the table.
enum Outcome {
    Refused(String),
    Served { walk: Walk, find_lines: usize },
}

fn mounted_paths() -> String {
    fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

fn run_case(case: &Case, good: &[u8], base: &Path, work: &Path, original: &Original) -> Outcome {
    let dir = work.join(case.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
    remove_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let layout = dir.join("layout");
    run(Command::new("cp").arg("-a").arg(base).arg(&layout));
    let mut bad = edited(good, |m, buf| (case.edit)(m, buf));
    assert_ne!(bad, good, "the edit changed nothing");
    if case.seal {
        reseal(&mut bad).unwrap();
    }
    replace_bootstrap(&layout, &bad);
    assert_eq!(read_bootstrap(&layout), bad);
    let image = format!("oci:{}:img", layout.display());
    let outcome = match SkiffMount::try_start_env(&image, &dir, case.mount_args, &[]) {
        Err(f) => {
            assert!(
                f.status.is_some_and(|s| !s.success()),
                "refused, but the exit status is {:?}",
                f.status
            );
            let mnt = dir.join("mnt");
            assert!(
                !mounted_paths().contains(&mnt.display().to_string()),
                "a refused mount left {} mounted",
                mnt.display()
            );
            assert!(
                !f.log.contains("panicked"),
                "the daemon panicked:\n{}",
                f.log
            );
            let message = f
                .log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .to_string();
            Outcome::Refused(message)
        }
        Ok(mut m) => {
            let deadline = Instant::now() + WALK_DEADLINE;
            let find_result = find(&m.mnt, deadline);
            let (tx, rx) = mpsc::channel();
            let (root, touched) = (m.mnt.clone(), case.touched);
            let paths = original.paths.clone();
            let xattrs = original.xattrs.clone();
            std::thread::spawn(move || {
                let original = Original { paths, xattrs };
                let _ = tx.send(walk_tree(&root, &original, touched));
            });
            let left = deadline.saturating_duration_since(Instant::now());
            let walk = match rx.recv_timeout(left) {
                Ok(w) => w,
                Err(_) => panic!(
                    "the walk HUNG (no answer within {WALK_DEADLINE:?}); daemon log:\n{}",
                    m.logs()
                ),
            };
            let (find_lines, _) = find_result.unwrap_or_else(|e| panic!("{e}"));
            assert!(
                m.try_wait().is_none(),
                "the daemon died during the walk:\n{}",
                m.logs()
            );
            let intact = fs::read(m.p(INTACT)).expect("the intact file still reads");
            assert!(
                matches!(&original.paths[INTACT], Want::File(x) if *x == intact),
                "the intact file reads wrong after the walk"
            );
            let (status, _) = m.terminate();
            let logs = m.logs();
            assert!(!logs.contains("panicked"), "the daemon panicked:\n{logs}");
            assert!(
                status.is_some_and(|s| s.success()),
                "the daemon did not exit cleanly on SIGTERM ({status:?}):\n{logs}"
            );
            assert!(
                !mounted_paths().contains(&m.mnt.display().to_string()),
                "still mounted after SIGTERM"
            );
            Outcome::Served { walk, find_lines }
        }
    };
    remove_all(&dir);
    outcome
}

fn check_outcome(case: &Case, outcome: &Outcome) {
    match (case.expect, outcome) {
        (Expect::Refused(needles), Outcome::Refused(message)) => {
            for n in needles {
                assert!(message.contains(n), "the message lacks {n:?}: {message}");
            }
            if !case.seal {
                assert!(
                    FLIP_CHECKS.iter().any(|c| message.contains(c)),
                    "the message names no check: {message}"
                );
            }
        }
        (Expect::Refused(_), Outcome::Served { walk, .. }) => {
            panic!(
                "mounted, expected a refusal ({} errors in the walk)",
                walk.error_count()
            )
        }
        (_, Outcome::Refused(message)) => {
            panic!("refused, expected to mount: {message}")
        }
        (expect, Outcome::Served { walk, .. }) => {
            assert!(
                walk.wrong.is_empty(),
                "wrong answers for untouched paths: {:#?}\nerrors: {:?}",
                walk.wrong,
                walk.examples
            );
            if matches!(expect, Expect::Clean) {
                assert_eq!(walk.error_count(), 0, "errors: {:?}", walk.examples);
            }
            if matches!(expect, Expect::Errors) {
                assert!(
                    walk.error_count() > 0,
                    "the lie went unnoticed: no error in a walk of {} paths",
                    walk.paths
                );
            }
        }
    }
}

#[test]
fn hostile_bootstraps_are_refused_or_served_safely() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts FUSE file systems: run it as root"
    );
    let work = scratch_root().join("hostile-bootstrap");
    remove_all(&work);
    fs::create_dir_all(&work).unwrap();
    let layer = work.join("layer.tar");
    let original = write_layer(&layer);
    let prefetch = work.join("prefetch.txt");
    // A stretch of one file, and another whole (format 1.3 ranges).
    fs::write(&prefetch, "/data/big.bin\t65536\t65536\n/ctl/intact\n").unwrap();
    let base = work.join("base");
    let dest = format!("oci:{}:img", base.display());
    run(&mut skiff_cmd([
        "convert",
        "--no-progress",
        "--chunking",
        "fixed:64k",
        "--prefetch-list",
        prefetch.to_str().unwrap(),
        "--layer",
        layer.to_str().unwrap(),
        dest.as_str(),
    ]));
    let good = read_bootstrap(&base);
    {
        let b = Bootstrap::parse(&good).unwrap();
        b.validate().unwrap();
        let big = b.resolve_path(b"data/big.bin").unwrap().unwrap();
        assert!(
            b.file_chunks(big).unwrap().len() >= 5,
            "big.bin spans several chunks"
        );
    }
    let cases = cases();
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let result = catch_case(case.name, || {
            let outcome = run_case(case, &good, &base, &work, &original);
            check_outcome(case, &outcome);
            outcome
        });
        match result {
            Ok(outcome) => table.push((case, outcome)),
            Err(failure) => failures.push(failure),
        }
    }
    eprintln!("\n{} hostile bootstrap cases:", table.len());
    eprintln!("  {:46} {:8} outcome", "case", "expected");
    for (case, outcome) in &table {
        let expected = match case.expect {
            Expect::Refused(_) => "refused",
            Expect::Errors => "errors",
            Expect::Served => "served",
            Expect::Clean => "clean",
        };
        match outcome {
            Outcome::Refused(m) => {
                let short = m.split(": ").skip(1).collect::<Vec<_>>().join(": ");
                eprintln!("  {:46} {expected:8} refused: {short}", case.name)
            }
            Outcome::Served { walk, find_lines } => eprintln!(
                "  {:46} {expected:8} served: {} paths ({find_lines} by find), {} bytes read, {} errors {:?}{}",
                case.name,
                walk.paths,
                walk.bytes,
                walk.error_count(),
                walk.errors,
                walk.examples
                    .first()
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default()
            ),
        }
    }
    remove_all(&work);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
