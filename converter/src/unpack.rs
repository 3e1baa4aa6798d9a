//! Writing an image's merged tree back out as files (`skiff unpack`).
//!
//! The target directory must not exist or be empty, and the bootstrap is
//! validated first (names without `/`, `.` or `..`, each directory reached
//! once: no loop). Every file is then created relative to an open directory
//! that this code created itself (`/proc/self/fd/DIRFD/NAME`, the openat
//! discipline with std's calls; directories are opened with `O_NOFOLLOW`),
//! and every create refuses an existing name (`O_EXCL`, `mkdir`, `symlink`,
//! `link`, `mknod`), so nothing can be written outside the target: a symlink
//! in the image is created as a symlink and never followed, and any depth
//! works (paths never grow beyond one name). Ownership is restored when
//! running as root; modes are set after ownership (chown clears setuid
//! bits) and a directory's attributes when the depth-first walk leaves it
//! (adding entries changes a directory's mtime). The tree is staged in a
//! private (0700) sibling of the target and renamed into place when
//! complete.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use serde::Serialize;
use skiff_format::chunk::LastFrame;
use skiff_format::{check_name, Bootstrap, FileKind, Inode, InodeId};
use skiff_registry::BlobStore;

use crate::error::{ConvertError, IoContext};

/// Figures of an unpack.
#[derive(Debug, Default, Serialize)]
pub struct UnpackStats {
    /// Paths created (hard links included).
    pub paths: u64,
    /// Regular files written.
    pub files: u64,
    /// File content bytes written (holes excluded).
    pub bytes: u64,
    /// Whether ownership was restored (only as root).
    pub ownership_restored: bool,
}

/// Writes the tree of `bootstrap` into `target`, reading chunks from `store`.
///
/// The tree is written into a temporary sibling of `target` and renamed into
/// place only when complete, so a failure (a corrupt chunk, a full disk)
/// leaves no tree that looks finished; the partial one is removed.
pub fn unpack(
    bootstrap: &Bootstrap<'_>,
    store: &dyn BlobStore,
    target: &Path,
) -> Result<UnpackStats, ConvertError> {
    bootstrap.validate()?;
    check_target(target)?;
    let name = target.file_name().ok_or_else(|| {
        ConvertError::Invalid(format!("{}: not a directory name", target.display()))
    })?;
    let mut staging_name = std::ffi::OsString::from(".");
    staging_name.push(name);
    staging_name.push(format!(".skiff-unpack-{}", std::process::id()));
    let staging = target.with_file_name(staging_name);
    // Private until complete: nobody else can add or swap anything inside.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .ctx(|| format!("creating {}", staging.display()))?;
    match unpack_into(bootstrap, store, &staging, target) {
        Ok(stats) => {
            if target.exists() {
                fs::remove_dir(target)
                    .ctx(|| format!("replacing the empty {}", target.display()))?;
            }
            fs::rename(&staging, target)
                .ctx(|| format!("moving the unpacked tree to {}", target.display()))?;
            Ok(stats)
        }
        Err(e) => {
            if let Err(cleanup) = fs::remove_dir_all(&staging) {
                tracing::warn!(
                    "could not remove the partial tree {}: {cleanup}",
                    staging.display()
                );
            }
            Err(e)
        }
    }
}

/// Handles on the tree being written: every operation names a file as
/// `/proc/self/fd/DIRFD/NAME`, relative to an open directory, so that paths
/// stay short at any depth and resolution starts at a directory this code
/// created and holds open (the openat discipline, with std's calls).
struct Walk<'t> {
    /// The final target, for messages.
    target: &'t Path,
    /// The staging root, held open.
    root: File,
}

/// Opens a directory without following a symlink at its last component.
fn open_dir(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(path)
}

/// The path of `name` in the open directory `dir`.
fn in_dir(dir: &File, name: &[u8]) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if !name.is_empty() {
        p.push(OsStr::from_bytes(name));
    }
    p
}

impl Walk<'_> {
    /// `rel` (relative to the target) for messages.
    fn show(&self, rel: &[u8]) -> String {
        let rel = String::from_utf8_lossy(rel);
        format!("{}/{}", self.target.display(), rel.escape_debug())
    }

    /// The open parent directory of `rel` and its last name, walked down
    /// from the root one directory at a time, never through a symlink.
    fn parent_of<'r>(&self, rel: &'r [u8]) -> Result<(File, &'r [u8]), ConvertError> {
        let (dirs, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&rel[..0], rel),
        };
        let mut dir = self
            .root
            .try_clone()
            .ctx(|| format!("opening {}", self.target.display()))?;
        for part in dirs.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            dir = open_dir(&in_dir(&dir, part)).ctx(|| format!("opening {}", self.show(dirs)))?;
        }
        Ok((dir, name))
    }
}

/// Writes the tree depth first. Only the current directory is held open
/// (its parent is reopened through `..` on the way up), so any depth works
/// within a handful of file descriptors; a directory's attributes are set
/// when it is left, after everything below it is written.
fn unpack_into(
    bootstrap: &Bootstrap<'_>,
    store: &dyn BlobStore,
    staging: &Path,
    target: &Path,
) -> Result<UnpackStats, ConvertError> {
    let as_root = nix::unistd::geteuid().is_root();
    let mut stats = UnpackStats {
        ownership_restored: as_root,
        ..UnpackStats::default()
    };
    if !Path::new("/proc/self/fd").is_dir() {
        return Err(ConvertError::Invalid(
            "unpack needs /proc (it writes relative to open directories)".into(),
        ));
    }
    // Files are written in inode order, so small files of one directory,
    // packed together, come one after another: one fetch and decode each.
    let mut last = LastFrame::new();
    let walk = Walk {
        target,
        root: open_dir(staging).ctx(|| format!("opening {}", staging.display()))?,
    };
    let mut cur = walk
        .root
        .try_clone()
        .ctx(|| format!("opening {}", staging.display()))?;
    // The current directory's path relative to the target, and per level
    // (directory, next entry index, length of `rel` before its name).
    let mut rel: Vec<u8> = Vec::new();
    let mut stack: Vec<(InodeId, u32, usize)> = vec![(bootstrap.root(), 0, 0)];
    // inode -> first path, for hard links
    let mut first_path: HashMap<InodeId, Vec<u8>> = HashMap::new();
    while let Some(top) = stack.last_mut() {
        let (dir, index, before) = *top;
        if index >= bootstrap.dir_len(dir)? {
            // Every entry of `dir` is written: set its attributes from its
            // parent, last, so that writing entries does not disturb them.
            stack.pop();
            if stack.is_empty() {
                break;
            }
            let parent = open_dir(&in_dir(&cur, b".."))
                .ctx(|| format!("opening the parent of {}", walk.show(&rel)))?;
            // Below the root the name follows a '/'; at the top it starts `rel`.
            let start = if before == 0 { 0 } else { before + 1 };
            let name = rel.get(start..).unwrap_or_default().to_vec();
            let shown = walk.show(&rel);
            rel.truncate(before);
            cur = parent;
            let inode = bootstrap.inode(dir)?;
            set_attrs(bootstrap, &inode, &in_dir(&cur, &name), &shown, as_root)?;
            continue;
        }
        top.1 += 1;
        let entry = bootstrap.dir_entry(dir, index)?;
        // Validated above; checked again where it decides what is written.
        check_name(entry.name).map_err(|e| {
            ConvertError::Invalid(format!("refusing an entry of the bootstrap: {e}"))
        })?;
        let before = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(entry.name);
        let path = in_dir(&cur, entry.name);
        let shown = walk.show(&rel);
        let inode = bootstrap.inode(entry.inode)?;
        stats.paths += 1;
        if inode.kind()? == FileKind::Directory {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .ctx(|| format!("creating {shown}"))?;
            cur = open_dir(&path).ctx(|| format!("opening {shown}"))?;
            stack.push((entry.inode, 0, before));
            continue;
        }
        if let Some(first) = first_path.get(&entry.inode) {
            let (dir, name) = walk.parent_of(first)?;
            fs::hard_link(in_dir(&dir, name), &path)
                .ctx(|| format!("linking {shown} to {}", walk.show(first)))?;
        } else {
            create_node(
                bootstrap, store, &inode, &path, &shown, &mut stats, &mut last,
            )?;
            set_attrs(bootstrap, &inode, &path, &shown, as_root)?;
            if inode.nlink() > 1 {
                first_path.insert(entry.inode, rel.clone());
            }
        }
        rel.truncate(before);
    }
    let root = bootstrap.inode(bootstrap.root())?;
    set_attrs(
        bootstrap,
        &root,
        staging,
        &target.display().to_string(),
        as_root,
    )?;
    Ok(stats)
}

fn check_target(target: &Path) -> Result<(), ConvertError> {
    match fs::read_dir(target) {
        Ok(mut entries) => match entries.next() {
            Some(_) => Err(ConvertError::Invalid(format!(
                "{} is not empty: unpack writes only into a new or empty directory",
                target.display()
            ))),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ConvertError::Io {
            context: format!("opening {}", target.display()),
            source: e,
        }),
    }
}

fn create_node(
    bootstrap: &Bootstrap<'_>,
    store: &dyn BlobStore,
    inode: &Inode<'_>,
    path: &Path,
    shown: &str,
    stats: &mut UnpackStats,
    last: &mut LastFrame,
) -> Result<(), ConvertError> {
    let kind = inode.kind()?;
    match kind {
        FileKind::Regular => {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .ctx(|| format!("creating {shown}"))?;
            write_content(bootstrap, store, inode, &file, shown, stats, last)?;
            stats.files += 1;
        }
        FileKind::Symlink => {
            let target = bootstrap.symlink_target(inode.id())?;
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path)
                .ctx(|| format!("creating symlink {shown}"))?;
        }
        FileKind::CharDevice | FileKind::BlockDevice | FileKind::Fifo | FileKind::Socket => {
            let sflag = match kind {
                FileKind::CharDevice => SFlag::S_IFCHR,
                FileKind::BlockDevice => SFlag::S_IFBLK,
                FileKind::Fifo => SFlag::S_IFIFO,
                _ => SFlag::S_IFSOCK,
            };
            let (major, minor) = inode.rdev();
            let dev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
            mknod(path, sflag, Mode::from_bits_truncate(0o600), dev).map_err(|e| {
                ConvertError::Io {
                    context: format!("creating {shown} (device nodes need root)"),
                    source: e.into(),
                }
            })?;
        }
        FileKind::Directory => {}
    }
    Ok(())
}

fn write_content(
    bootstrap: &Bootstrap<'_>,
    store: &dyn BlobStore,
    inode: &Inode<'_>,
    file: &File,
    shown: &str,
    stats: &mut UnpackStats,
    last: &mut LastFrame,
) -> Result<(), ConvertError> {
    for fc in bootstrap.file_chunks(inode.id())? {
        let info = bootstrap.chunk(fc.chunk_index())?;
        let blob = bootstrap.blob(info.blob_index)?;
        let data = if last.holds(&info) {
            last.chunk(&info)
        } else {
            let stored = store.read_range(
                &blob.digest,
                info.compressed_offset,
                u64::from(info.compressed_size),
            )?;
            last.decode(&info, &stored)
        };
        let data = data.map_err(|e| ConvertError::Chunk {
            path: shown.to_string(),
            chunk: fc.chunk_index(),
            digest: info.digest,
            offset: fc.file_offset(),
            message: e.to_string(),
        })?;
        file.write_all_at(data, fc.file_offset())
            .ctx(|| format!("writing {shown}"))?;
        stats.bytes += data.len() as u64;
    }
    // Whatever no chunk covers is a hole: extending the length leaves it sparse.
    file.set_len(inode.size())
        .ctx(|| format!("sizing {shown}"))?;
    Ok(())
}

fn set_attrs(
    bootstrap: &Bootstrap<'_>,
    inode: &Inode<'_>,
    path: &Path,
    shown: &str,
    as_root: bool,
) -> Result<(), ConvertError> {
    let kind = inode.kind()?;
    if as_root {
        std::os::unix::fs::lchown(path, Some(inode.uid()), Some(inode.gid()))
            .ctx(|| format!("chown {shown}"))?;
    }
    if kind != FileKind::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(inode.perm()))
            .ctx(|| format!("chmod {shown}"))?;
    }
    // After chown, which clears security.capability.
    for x in bootstrap.xattrs(inode.id())? {
        let (name, value) = x?;
        xattr::set(path, OsStr::from_bytes(name), value)
            .ctx(|| format!("setting xattr {} on {shown}", String::from_utf8_lossy(name)))?;
    }
    let (sec, nsec) = inode.mtime();
    let t = TimeSpec::new(sec, i64::from(nsec));
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| {
        ConvertError::Io {
            context: format!("setting times of {shown}"),
            source: e.into(),
        }
    })?;
    Ok(())
}
