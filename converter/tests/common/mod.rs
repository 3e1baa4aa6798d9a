//! Shared helpers of the converter's acceptance tests.
//!
//! - [`Rng`]: a small deterministic generator (splitmix64), so that every
//!   "random" input is the same on every run.
//! - [`Entry`] and [`Op`]: one layer entry described once, by its *logical*
//!   attributes; [`write_layer`] encodes it as tar bytes (ustar or GNU
//!   headers, PAX records where a value does not fit a header field, GNU long
//!   names, ...) and [`RefTree`] applies it to a reference model with OCI
//!   semantics, written here independently of the converter.
//! - [`RefTree::materialize`] writes the reference tree to a directory, so the
//!   converter's `unpack` output can be compared with it by
//!   `skiff_tests::treedump`.
//! - Conversion, unpack and check through the library API.

#![allow(dead_code)]
// Helpers panic with a message on any unexpected failure: they are test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use skiff_converter::image::{convert_image, ConvertRequest, ConvertResult, SourceSpec};
use skiff_converter::{check, unpack, Chunking, ConvertError, ConvertOptions};
use skiff_format::Bootstrap;
use skiff_registry::{ImageRef, OciLayout};
use skiff_tests::treedump::{compare_named, dump, Dump, DumpOptions};
use tar::{EntryType, Header};

// ---------------------------------------------------------------------------
// Randomness

/// splitmix64: deterministic, tiny, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// `n` bytes of compressible text-like data.
    pub fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "skiff ",
            "layer ",
            "chunk ",
            "blob ",
            "inode ",
            "the ",
            "of ",
            "and ",
            "tar\n",
            "zstd ",
            "bootstrap ",
            "whiteout ",
            "opaque ",
            "hard link ",
            "symlink ",
        ];
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            out.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
        }
        out.truncate(n);
        out
    }
}

// ---------------------------------------------------------------------------
// Scratch space

/// A fresh temporary directory under the workspace's test scratch root (same
/// filesystem as the target directory: xattrs, devices and sparse files work
/// there when the suite runs as root).
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("conv-{name}-"))
        .tempdir_in(skiff_tests::harness::scratch_root())
        .unwrap_or_else(|e| panic!("cannot create a scratch directory for {name}: {e}"))
}

/// True when running as root (ownership, device nodes and
/// `security.capability` need it). The acceptance suite runs as root; tests
/// that need it assert it rather than skip.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails the test unless running as root.
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (device nodes, ownership, security.capability); \
         the acceptance suite runs as root (scripts/test)"
    );
}

// ---------------------------------------------------------------------------
// Layer entries, described logically

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with this content.
    File(Vec<u8>),
    /// A symlink to this target.
    Symlink(Vec<u8>),
    /// A hard link to this path (as written in the tar).
    HardLink(Vec<u8>),
    /// A character device.
    Char(u32, u32),
    /// A block device.
    Block(u32, u32),
    /// A fifo.
    Fifo,
}

/// Logical attributes of an entry: what the tree must hold afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Permission bits (07777).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Seconds and nanoseconds.
    pub mtime: (i64, u32),
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Attr {
    /// 0:0, mtime 1600000000, no xattrs.
    pub fn mode(mode: u32) -> Attr {
        Attr {
            mode,
            uid: 0,
            gid: 0,
            mtime: (1_600_000_000, 0),
            xattrs: BTreeMap::new(),
        }
    }

    /// What a directory that no layer describes gets (0755, 0:0, mtime 0).
    pub fn implicit_dir() -> Attr {
        Attr {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
        }
    }
}

/// How the header of an entry is written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoding {
    /// A GNU header (long names as `L`/`K` entries, big numbers in base-256)
    /// instead of ustar.
    pub gnu: bool,
    /// uid and gid as PAX records even when they fit the header.
    pub pax_ids: bool,
    /// The path as a PAX `path` record (the header holds a decoy name).
    pub pax_path: bool,
    /// The header's mtime field, when a PAX record (local or global) is
    /// meant to override it; by default the logical mtime's seconds.
    pub header_mtime: Option<u64>,
    /// The header's uid/gid fields, when a PAX record (local or global) is
    /// meant to override them.
    pub header_ids: Option<(u64, u64)>,
    /// Leave the logical mtime out of the entry's own PAX records even when
    /// it has nanoseconds (a global header supplies it).
    pub mtime_from_global: bool,
    /// Xattrs of the logical attributes that are not written as the
    /// entry's own PAX records (a global header supplies them).
    pub xattrs_from_global: Vec<Vec<u8>>,
    /// More PAX records to write (after the generated ones).
    pub extra_pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// The header's mode field, when it holds more than the permission bits
    /// (some writers put the file type bits there too).
    pub header_mode: Option<u32>,
}

/// One tar entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The path as written in the tar.
    pub path: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Its logical attributes.
    pub attr: Attr,
    /// How to write it.
    pub enc: Encoding,
}

impl Entry {
    /// A directory.
    pub fn dir(path: impl AsRef<[u8]>, mode: u32) -> Entry {
        Entry::new(path, Kind::Dir, Attr::mode(mode))
    }

    /// A regular file.
    pub fn file(path: impl AsRef<[u8]>, mode: u32, content: impl Into<Vec<u8>>) -> Entry {
        Entry::new(path, Kind::File(content.into()), Attr::mode(mode))
    }

    /// A symlink.
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(
            path,
            Kind::Symlink(target.as_ref().to_vec()),
            Attr::mode(0o777),
        )
    }

    /// A hard link to `target`.
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(
            path,
            Kind::HardLink(target.as_ref().to_vec()),
            Attr::mode(0o644),
        )
    }

    /// Any entry.
    pub fn new(path: impl AsRef<[u8]>, kind: Kind, attr: Attr) -> Entry {
        Entry {
            path: path.as_ref().to_vec(),
            kind,
            attr,
            enc: Encoding::default(),
        }
    }

    /// With these owner ids.
    pub fn owner(mut self, uid: u32, gid: u32) -> Entry {
        self.attr.uid = uid;
        self.attr.gid = gid;
        self
    }

    /// With this mtime.
    pub fn mtime(mut self, sec: i64, nsec: u32) -> Entry {
        self.attr.mtime = (sec, nsec);
        self
    }

    /// With this xattr.
    pub fn xattr(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Entry {
        self.attr
            .xattrs
            .insert(name.as_ref().to_vec(), value.as_ref().to_vec());
        self
    }

    /// With a GNU header.
    pub fn gnu(mut self) -> Entry {
        self.enc.gnu = true;
        self
    }

    /// With this encoding tweak.
    pub fn enc(mut self, f: impl FnOnce(&mut Encoding)) -> Entry {
        f(&mut self.enc);
        self
    }
}

/// One step of a layer.
#[derive(Clone, Debug)]
pub enum Op {
    /// An entry.
    Entry(Entry),
    /// `.wh.NAME` hiding this path (`dir/NAME`).
    Whiteout(Vec<u8>),
    /// `.wh..wh..opq` in this directory (empty: the root).
    Opaque(Vec<u8>),
    /// A PAX global header with these records. The reference ignores it:
    /// the entries after it carry the logical attributes it implies.
    GlobalPax(Vec<(Vec<u8>, Vec<u8>)>),
    /// A file copied from disk by `tar::Builder::append_path_with_name`
    /// (which writes a GNU sparse entry for a file with holes); the
    /// reference applies the entry, which must describe the same file.
    FromDisk(Entry, PathBuf),
}

impl From<Entry> for Op {
    fn from(e: Entry) -> Op {
        Op::Entry(e)
    }
}

/// A whiteout op.
pub fn whiteout(path: impl AsRef<[u8]>) -> Op {
    Op::Whiteout(path.as_ref().to_vec())
}

/// An opaque-directory op.
pub fn opaque(dir: impl AsRef<[u8]>) -> Op {
    Op::Opaque(dir.as_ref().to_vec())
}

// ---------------------------------------------------------------------------
// Writing tar bytes

/// One PAX record: `LEN KEY=VALUE\n`, LEN counting itself.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    let mut out = format!("{len} ").into_bytes();
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
    assert_eq!(out.len(), len);
    out
}

/// A tar stream under construction.
pub struct TarWriter {
    b: tar::Builder<Vec<u8>>,
}

impl Default for TarWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn set_field(field: &mut [u8], value: &[u8]) {
    assert!(
        value.len() <= field.len(),
        "{} bytes do not fit a {}-byte field",
        value.len(),
        field.len()
    );
    field.fill(0);
    field[..value.len()].copy_from_slice(value);
}

impl TarWriter {
    /// An empty stream.
    pub fn new() -> TarWriter {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Complete);
        TarWriter { b }
    }

    /// Appends a header (its checksum is computed here) and data, as is.
    pub fn raw(&mut self, header: &mut Header, data: &[u8]) {
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.b.append(header, data).unwrap();
    }

    /// A header of `kind` whose name field holds `name` byte for byte
    /// (no validation: `/`, `..`, non-UTF-8 all go in).
    pub fn header(kind: EntryType, name: &[u8], gnu: bool) -> Header {
        let mut h = if gnu {
            Header::new_gnu()
        } else {
            Header::new_ustar()
        };
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        set_field(&mut h.as_old_mut().name, name);
        h
    }

    /// A PAX extended header (`x` local, `g` global) with these records.
    pub fn pax(&mut self, global: bool, records: &[(Vec<u8>, Vec<u8>)]) {
        let body: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        let (kind, name): (EntryType, &[u8]) = if global {
            (EntryType::XGlobalHeader, b"pax_global_header")
        } else {
            (EntryType::XHeader, b"PaxHeader/entry")
        };
        let mut h = Self::header(kind, name, false);
        self.raw(&mut h, &body);
    }

    /// A GNU `././@LongLink` entry (`L` for a name, `K` for a link target).
    fn gnu_long(&mut self, kind: EntryType, value: &[u8]) {
        let mut h = Self::header(kind, b"././@LongLink", true);
        let mut data = value.to_vec();
        data.push(0);
        self.raw(&mut h, &data);
    }

    /// Appends one logical entry, choosing encodings as needed.
    pub fn entry(&mut self, e: &Entry) {
        let (kind, data, link): (EntryType, &[u8], Option<&[u8]>) = match &e.kind {
            Kind::Dir => (EntryType::Directory, &[], None),
            Kind::File(c) => (EntryType::Regular, c, None),
            Kind::Symlink(t) => (EntryType::Symlink, &[], Some(t)),
            Kind::HardLink(t) => (EntryType::Link, &[], Some(t)),
            Kind::Char(..) => (EntryType::Char, &[], None),
            Kind::Block(..) => (EntryType::Block, &[], None),
            Kind::Fifo => (EntryType::Fifo, &[], None),
        };
        let a = &e.attr;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut h = if e.enc.gnu {
            Header::new_gnu()
        } else {
            Header::new_ustar()
        };
        h.set_entry_type(kind);
        h.set_mode(e.enc.header_mode.unwrap_or(a.mode));

        // Owner: header fields hold at most 7 octal digits (ustar); GNU
        // headers switch to base-256 by themselves.
        const OCTAL_MAX: u32 = 0o7777777;
        let big_ids = a.uid > OCTAL_MAX || a.gid > OCTAL_MAX;
        if e.enc.pax_ids || (big_ids && !e.enc.gnu) {
            pax.push((b"uid".to_vec(), a.uid.to_string().into_bytes()));
            pax.push((b"gid".to_vec(), a.gid.to_string().into_bytes()));
            let (hu, hg) = e.enc.header_ids.unwrap_or((0, 0));
            h.set_uid(hu);
            h.set_gid(hg);
        } else {
            let (hu, hg) = e
                .enc
                .header_ids
                .unwrap_or((u64::from(a.uid), u64::from(a.gid)));
            h.set_uid(hu);
            h.set_gid(hg);
        }

        // Time: nanoseconds and negative times need PAX.
        let (sec, nsec) = a.mtime;
        if (nsec != 0 || sec < 0) && !e.enc.mtime_from_global {
            pax.push((b"mtime".to_vec(), pax_time(sec, nsec).into_bytes()));
        }
        let header_mtime = e
            .enc
            .header_mtime
            .unwrap_or_else(|| u64::try_from(sec).unwrap_or(0));
        h.set_mtime(header_mtime);

        for (k, v) in &a.xattrs {
            if e.enc.xattrs_from_global.contains(k) {
                continue;
            }
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax.push((key, v.clone()));
        }

        if let Kind::Char(major, minor) | Kind::Block(major, minor) = e.kind {
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
        }

        // Path.
        let path = &e.path;
        if e.enc.pax_path {
            pax.push((b"path".to_vec(), path.clone()));
            set_field(&mut h.as_old_mut().name, b"decoy-name-overridden-by-pax");
        } else if path.len() <= 100 {
            set_field(&mut h.as_old_mut().name, path);
        } else if e.enc.gnu {
            self.gnu_long(EntryType::GNULongName, path);
            set_field(&mut h.as_old_mut().name, &path[..100]);
        } else if let Some(split) = ustar_split(path) {
            let (prefix, name) = (&path[..split], &path[split + 1..]);
            set_field(&mut h.as_ustar_mut().unwrap().prefix, prefix);
            set_field(&mut h.as_old_mut().name, name);
        } else {
            pax.push((b"path".to_vec(), path.clone()));
            set_field(&mut h.as_old_mut().name, &path[..100]);
        }

        // Link target.
        if let Some(t) = link {
            if t.len() <= 100 {
                set_field(&mut h.as_old_mut().linkname, t);
            } else if e.enc.gnu {
                self.gnu_long(EntryType::GNULongLink, t);
                set_field(&mut h.as_old_mut().linkname, &t[..100]);
            } else {
                pax.push((b"linkpath".to_vec(), t.to_vec()));
                set_field(&mut h.as_old_mut().linkname, &t[..100]);
            }
        }

        pax.extend(e.enc.extra_pax.iter().cloned());
        if !pax.is_empty() {
            self.pax(false, &pax);
        }
        self.raw(&mut h, data);
    }

    /// Appends a layer step.
    pub fn op(&mut self, op: &Op) {
        match op {
            Op::Entry(e) => self.entry(e),
            Op::Whiteout(p) => {
                let (dir, name) = split_last(p);
                let mut path = dir.to_vec();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(b".wh.");
                path.extend_from_slice(name);
                self.entry(&Entry::file(path, 0o644, Vec::new()));
            }
            Op::Opaque(dir) => {
                let mut path = dir.clone();
                if !path.is_empty() && !path.ends_with(b"/") {
                    path.push(b'/');
                }
                path.extend_from_slice(b".wh..wh..opq");
                self.entry(&Entry::file(path, 0o644, Vec::new()));
            }
            Op::GlobalPax(records) => self.pax(true, records),
            Op::FromDisk(e, src) => {
                let name = Path::new(OsStr::from_bytes(&e.path));
                self.b.append_path_with_name(src, name).unwrap();
            }
        }
    }

    /// The finished stream (with the two zero blocks at the end).
    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// PAX time text: `SEC[.NNNNNNNNN]`, negative times as `-S.F` meaning
/// `-(S.F)` seconds.
pub fn pax_time(sec: i64, nsec: u32) -> String {
    if nsec == 0 {
        return sec.to_string();
    }
    if sec >= 0 {
        format!("{sec}.{nsec:09}")
    } else {
        // (sec, nsec) is sec + nsec/1e9, e.g. (-2, 0.75e9) = -1.25.
        let total_ns = i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        let abs = -total_ns;
        format!("-{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
    }
}

/// Where a ustar path splits into prefix (≤155) and name (≤100), if it can.
fn ustar_split(path: &[u8]) -> Option<usize> {
    (0..path.len())
        .rev()
        .filter(|&i| path[i] == b'/')
        .find(|&i| i <= 155 && path.len() - i - 1 <= 100 && i > 0)
}

fn split_last(p: &[u8]) -> (&[u8], &[u8]) {
    let p = p.strip_suffix(b"/").unwrap_or(p);
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

/// The tar bytes of a layer.
pub fn write_layer(ops: &[Op]) -> Vec<u8> {
    let mut w = TarWriter::new();
    for op in ops {
        w.op(op);
    }
    w.finish()
}

/// How a layer file is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    /// Plain tar.
    Tar,
    /// tar+gzip.
    Gzip,
    /// tar+zstd.
    Zstd,
}

/// Compresses a tar stream.
pub fn compress(tar: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::Tar => tar.to_vec(),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Comp::Zstd => zstd::bulk::compress(tar, 3).unwrap(),
    }
}

/// Writes layers (ops, compression) as files `layer-N.tar*` in `dir`.
pub fn write_layer_files(dir: &Path, layers: &[(Vec<Op>, Comp)]) -> Vec<PathBuf> {
    fs::create_dir_all(dir).unwrap();
    layers
        .iter()
        .enumerate()
        .map(|(i, (ops, comp))| {
            let ext = match comp {
                Comp::Tar => "tar",
                Comp::Gzip => "tar.gz",
                Comp::Zstd => "tar.zst",
            };
            let path = dir.join(format!("layer-{}.{ext}", i + 1));
            fs::write(&path, compress(&write_layer(ops), *comp)).unwrap();
            path
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The reference model

/// Normal components of a tar path (`.`, empty components and leading `/`
/// dropped). Panics on `..`: the reference only sees valid layers.
pub fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| {
            assert!(c != b"..", "reference model given a '..' path");
            c.to_vec()
        })
        .collect()
}

type P = Vec<Vec<u8>>;

/// A node of the reference tree (hard links share one).
#[derive(Clone, Debug)]
pub struct RefNode {
    /// Kind (never `HardLink`).
    pub kind: Kind,
    /// Attributes.
    pub attr: Attr,
}

/// The expected merged tree: OCI layer semantics, applied naively by path.
///
/// - An entry replaces whatever is at its path; a directory over a directory
///   keeps the children and takes the new attributes.
/// - Missing parents (and non-directories standing where a parent must be)
///   become directories with [`Attr::implicit_dir`].
/// - Whiteouts (`.wh.NAME`, `.wh..wh..opq`) hide what *lower* layers put
///   there; whatever the same layer wrote (an entry, or a directory it had
///   to walk through to write one) stays, in any order of the tar: the OCI
///   image spec says a whiteout applies only to lower layers.
/// - A hard link names the node its target names when the link is read.
#[derive(Clone, Debug)]
pub struct RefTree {
    nodes: Vec<RefNode>,
    paths: BTreeMap<P, usize>,
    touched: HashSet<P>,
}

impl Default for RefTree {
    fn default() -> Self {
        Self::new()
    }
}

impl RefTree {
    /// An empty root (0755, 0:0, mtime 0).
    pub fn new() -> RefTree {
        let mut t = RefTree {
            nodes: Vec::new(),
            paths: BTreeMap::new(),
            touched: HashSet::new(),
        };
        t.nodes.push(RefNode {
            kind: Kind::Dir,
            attr: Attr::implicit_dir(),
        });
        t.paths.insert(Vec::new(), 0);
        t
    }

    /// The node at a path.
    pub fn get(&self, path: &[u8]) -> Option<&RefNode> {
        self.paths.get(&components(path)).map(|&i| &self.nodes[i])
    }

    /// All paths (root first), with their node ids.
    pub fn paths(&self) -> impl Iterator<Item = (&P, usize)> {
        self.paths.iter().map(|(p, &i)| (p, i))
    }

    /// The paths of regular files (for picking hard-link targets).
    pub fn files(&self) -> Vec<P> {
        self.paths
            .iter()
            .filter(|(_, &i)| matches!(self.nodes[i].kind, Kind::File(_)))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// All non-root paths.
    pub fn all_paths(&self) -> Vec<P> {
        self.paths
            .keys()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect()
    }

    /// The directories, the root included.
    pub fn dirs(&self) -> Vec<P> {
        self.paths
            .iter()
            .filter(|(_, &i)| self.nodes[i].kind == Kind::Dir)
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn is_dir(&self, p: &P) -> bool {
        self.paths
            .get(p)
            .is_some_and(|&i| self.nodes[i].kind == Kind::Dir)
    }

    fn remove_subtree(&mut self, p: &P) {
        self.paths.retain(|k, _| !k.starts_with(p));
    }

    fn children(&self, p: &P) -> Vec<P> {
        self.paths
            .keys()
            .filter(|k| k.len() == p.len() + 1 && k.starts_with(p))
            .cloned()
            .collect()
    }

    fn ensure_parents(&mut self, p: &P) {
        for n in 1..p.len() {
            let prefix: P = p[..n].to_vec();
            if !self.is_dir(&prefix) {
                self.remove_subtree(&prefix);
                self.nodes.push(RefNode {
                    kind: Kind::Dir,
                    attr: Attr::implicit_dir(),
                });
                self.paths.insert(prefix.clone(), self.nodes.len() - 1);
            }
            self.touched.insert(prefix);
        }
    }

    /// Hides what lower layers put at `p`, keeping what this layer wrote.
    fn hide_lower(&mut self, p: &P) {
        if !self.paths.contains_key(p) {
            return;
        }
        if !self.touched.contains(p) {
            self.remove_subtree(p);
            return;
        }
        if self.is_dir(p) {
            for c in self.children(p) {
                self.hide_lower(&c);
            }
        }
    }

    /// Starts a new layer.
    pub fn begin_layer(&mut self) {
        self.touched.clear();
    }

    /// Applies one step.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Entry(e) => self.apply_entry(e),
            Op::Whiteout(path) => {
                let p = components(path);
                let parent: P = p[..p.len() - 1].to_vec();
                if self.is_dir(&parent) {
                    self.hide_lower(&p);
                }
            }
            Op::Opaque(dir) => {
                let d = components(dir);
                if self.is_dir(&d) {
                    for c in self.children(&d) {
                        self.hide_lower(&c);
                    }
                }
            }
            Op::GlobalPax(_) => {}
            Op::FromDisk(e, _) => self.apply_entry(e),
        }
    }

    /// Applies a whole layer.
    pub fn apply_layer(&mut self, ops: &[Op]) {
        self.begin_layer();
        for op in ops {
            self.apply(op);
        }
    }

    fn apply_entry(&mut self, e: &Entry) {
        let p = components(&e.path);
        if p.is_empty() {
            assert_eq!(e.kind, Kind::Dir, "root entry must be a directory");
            self.nodes[self.paths[&p]].attr = e.attr.clone();
            return;
        }
        if let Kind::HardLink(target) = &e.kind {
            let t = components(target);
            let id = *self
                .paths
                .get(&t)
                .unwrap_or_else(|| panic!("reference: hard link to missing {t:?}"));
            assert!(self.nodes[id].kind != Kind::Dir, "hard link to a directory");
            self.ensure_parents(&p);
            self.remove_subtree(&p);
            self.paths.insert(p.clone(), id);
            self.touched.insert(p);
            return;
        }
        self.ensure_parents(&p);
        if e.kind == Kind::Dir && self.is_dir(&p) {
            let id = self.paths[&p];
            self.nodes[id].attr = e.attr.clone();
        } else {
            self.remove_subtree(&p);
            self.nodes.push(RefNode {
                kind: e.kind.clone(),
                attr: e.attr.clone(),
            });
            self.paths.insert(p.clone(), self.nodes.len() - 1);
        }
        self.touched.insert(p);
    }

    /// Writes the tree into `root` (created; must not exist): contents,
    /// hard links, devices, then ownership, modes, xattrs and times, with
    /// directory times last and deepest first.
    pub fn materialize(&self, root: &Path) {
        fs::create_dir(root).unwrap();
        let as_root = is_root();
        let mut first: HashMap<usize, PathBuf> = HashMap::new();
        let mut dirs: Vec<(PathBuf, usize)> = Vec::new();
        for (p, &id) in &self.paths {
            let mut path = root.to_path_buf();
            for c in p {
                path.push(OsStr::from_bytes(c));
            }
            let node = &self.nodes[id];
            if node.kind == Kind::Dir {
                if !p.is_empty() {
                    fs::create_dir(&path).unwrap();
                }
                dirs.push((path, id));
                continue;
            }
            if let Some(f) = first.get(&id) {
                fs::hard_link(f, &path)
                    .unwrap_or_else(|e| panic!("link {} {}: {e}", f.display(), path.display()));
                continue;
            }
            match &node.kind {
                Kind::File(c) => fs::write(&path, c).unwrap(),
                Kind::Symlink(t) => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(t), &path).unwrap()
                }
                Kind::Char(ma, mi) => mknod(
                    &path,
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o600),
                    makedev(u64::from(*ma), u64::from(*mi)),
                )
                .unwrap(),
                Kind::Block(ma, mi) => mknod(
                    &path,
                    SFlag::S_IFBLK,
                    Mode::from_bits_truncate(0o600),
                    makedev(u64::from(*ma), u64::from(*mi)),
                )
                .unwrap(),
                Kind::Fifo => {
                    mknod(&path, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0).unwrap()
                }
                Kind::Dir | Kind::HardLink(_) => unreachable!(),
            }
            set_attrs(&path, node, as_root);
            first.insert(id, path);
        }
        for (path, id) in dirs.iter().rev() {
            set_attrs(path, &self.nodes[*id], as_root);
        }
    }
}

fn set_attrs(path: &Path, node: &RefNode, as_root: bool) {
    let a = &node.attr;
    if as_root {
        std::os::unix::fs::lchown(path, Some(a.uid), Some(a.gid)).unwrap();
    }
    if !matches!(node.kind, Kind::Symlink(_)) {
        fs::set_permissions(path, fs::Permissions::from_mode(a.mode)).unwrap();
    }
    for (k, v) in &a.xattrs {
        xattr::set(path, OsStr::from_bytes(k), v)
            .unwrap_or_else(|e| panic!("xattr on {}: {e}", path.display()));
    }
    let t = TimeSpec::new(a.mtime.0, i64::from(a.mtime.1));
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
}

/// The reference tree of a list of layers.
pub fn reference(layers: &[(Vec<Op>, Comp)]) -> RefTree {
    let mut t = RefTree::new();
    for (ops, _) in layers {
        t.apply_layer(ops);
    }
    t
}

// ---------------------------------------------------------------------------
// Converting, unpacking, checking

/// Conversion settings for tests: small FastCDC chunks (more chunks per
/// file), finer ones (4 KiB) for files of 256 KiB or more, zstd level 3,
/// two threads.
pub fn options() -> ConvertOptions {
    ConvertOptions {
        chunking: Chunking::fastcdc(16 << 10).unwrap(),
        large_files: Some(skiff_converter::LargeFiles {
            from: 256 << 10,
            chunking: Chunking::fastcdc(4 << 10).unwrap(),
        }),
        level: 3,
        pack_size: skiff_converter::DEFAULT_PACK_SIZE,
        threads: 2,
        chunk_hash: skiff_format::ChunkHash::Blake3,
        cold_last: true,
    }
}

/// `oci:DIR:TAG`.
pub fn oci(dir: &Path, tag: &str) -> ImageRef {
    ImageRef::Oci {
        dir: dir.to_path_buf(),
        tag: Some(tag.to_string()),
    }
}

/// Converts layer files into `oci:dest:tag`.
pub fn convert_layers(
    layers: &[PathBuf],
    dest: &Path,
    tag: &str,
    options: ConvertOptions,
) -> Result<ConvertResult, ConvertError> {
    convert_image(ConvertRequest {
        source: SourceSpec::Layers {
            layers: layers.to_vec(),
            config: None,
        },
        dest: oci(dest, tag),
        chunk_dicts: Vec::new(),
        options,
        progress: None,
        reuse: Default::default(),
        referrer: true,
    })
}

/// Converts an image reference into `oci:dest:tag`.
pub fn convert_ref(
    source: ImageRef,
    dest: &Path,
    tag: &str,
    chunk_dicts: Vec<ImageRef>,
    options: ConvertOptions,
) -> Result<ConvertResult, ConvertError> {
    convert_image(ConvertRequest {
        source: SourceSpec::Image {
            reference: source,
            platform: None,
        },
        dest: oci(dest, tag),
        chunk_dicts,
        options,
        progress: None,
        reuse: Default::default(),
        referrer: true,
    })
}

/// Opens `oci:dir:tag`, checks it (must be clean) and unpacks it into
/// `target`.
pub fn check_and_unpack(dir: &Path, tag: &str, target: &Path) -> unpack::UnpackStats {
    let image = skiff_registry::skiff::open_image(&oci(dir, tag))
        .unwrap_or_else(|e| panic!("opening the converted image: {e}"));
    let b = Bootstrap::parse(&image.bootstrap).unwrap();
    let report = check::check(&b, image.store.as_ref()).unwrap();
    assert!(
        report.ok(),
        "check of a fresh conversion found problems: {:?}",
        report.problems
    );
    assert!(report.chunks_checked == u64::from(b.chunk_count()));
    unpack::unpack(&b, image.store.as_ref(), target)
        .unwrap_or_else(|e| panic!("unpacking into {}: {e}", target.display()))
}

/// Every field, exact times.
pub fn dump_all(root: &Path) -> Dump {
    dump(root, &DumpOptions::default())
        .unwrap_or_else(|e| panic!("dumping {}: {e}", root.display()))
}

/// Asserts that two trees are equal in every field of a tree dump.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = dump_all(expected);
    let b = dump_all(actual);
    if let Err(report) = compare_named(&a, "expected", &b, "unpacked") {
        panic!("the unpacked image differs from the reference:\n{report}");
    }
}

/// The tags of a layout (empty if it has no `index.json` entries).
pub fn tags(dir: &Path) -> Vec<String> {
    OciLayout::open(dir)
        .unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
        .tags()
        .unwrap_or_else(|e| panic!("reading the tags of {}: {e}", dir.display()))
}

/// Every file of a directory tree, by relative path, with its bytes.
pub fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Names of leftover temporary files (`.tmp-*`) anywhere in a layout.
pub fn temp_files(root: &Path) -> BTreeSet<String> {
    read_tree(root)
        .into_keys()
        .filter(|k| k.rsplit('/').next().is_some_and(|n| n.starts_with(".tmp-")))
        .collect()
}

/// A short description of layers for failure messages (contents by size
/// and digest, not bytes).
pub fn describe(layers: &[(Vec<Op>, Comp)]) -> String {
    let mut out = String::new();
    for (i, (ops, comp)) in layers.iter().enumerate() {
        out.push_str(&format!("layer {} ({comp:?}):\n", i + 1));
        for op in ops {
            let line = match op {
                Op::Entry(e) | Op::FromDisk(e, _) => {
                    let kind = match &e.kind {
                        Kind::File(c) => format!(
                            "file {} bytes {}",
                            c.len(),
                            &skiff_format::Digest::of(c).to_hex()[..12]
                        ),
                        Kind::Symlink(t) => format!("symlink -> {}", String::from_utf8_lossy(t)),
                        Kind::HardLink(t) => format!("hardlink -> {}", String::from_utf8_lossy(t)),
                        other => format!("{other:?}"),
                    };
                    format!(
                        "  {} {kind} mode {:o} {}:{} mtime {}.{:09}",
                        String::from_utf8_lossy(&e.path),
                        e.attr.mode,
                        e.attr.uid,
                        e.attr.gid,
                        e.attr.mtime.0,
                        e.attr.mtime.1
                    )
                }
                Op::Whiteout(p) => format!("  whiteout {}", String::from_utf8_lossy(p)),
                Op::Opaque(p) => format!("  opaque {}/", String::from_utf8_lossy(p)),
                Op::GlobalPax(r) => format!("  global PAX {} records", r.len()),
            };
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}
