//! Writing an image's merged tree back out as files (`skiff unpack`).
//!
//! The target directory must not exist or be empty, and every path is built
//! from names the bootstrap reader has validated (no `/`, no `.` or `..`)
//! under directories this code created itself, so nothing can be written
//! outside the target: a symlink in the image is created as a symlink and
//! never followed. Ownership is restored when running as root; modes are set
//! after ownership (chown clears setuid bits) and directory times last (adding
//! entries changes a directory's mtime). The tree is staged beside the
//! target and renamed into place when complete.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use serde::Serialize;
use skiff_format::{Bootstrap, FileKind, Inode, InodeId};
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
    fs::create_dir(&staging).ctx(|| format!("creating {}", staging.display()))?;
    match unpack_into(bootstrap, store, &staging) {
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

fn unpack_into(
    bootstrap: &Bootstrap<'_>,
    store: &dyn BlobStore,
    target: &Path,
) -> Result<UnpackStats, ConvertError> {
    let as_root = nix::unistd::geteuid().is_root();
    let mut stats = UnpackStats {
        ownership_restored: as_root,
        ..UnpackStats::default()
    };
    // inode -> first path, for hard links
    let mut first_path: HashMap<InodeId, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, InodeId)> = vec![(target.to_path_buf(), bootstrap.root())];
    let mut queue = VecDeque::from([(target.to_path_buf(), bootstrap.root())]);
    while let Some((dir_path, dir)) = queue.pop_front() {
        for entry in bootstrap.dir_entries(dir)? {
            let entry = entry?;
            if entry.name.is_empty()
                || entry.name.contains(&b'/')
                || entry.name == b"."
                || entry.name == b".."
            {
                return Err(ConvertError::Invalid(format!(
                    "refusing entry name {:?} in the bootstrap",
                    String::from_utf8_lossy(entry.name)
                )));
            }
            let path = dir_path.join(OsStr::from_bytes(entry.name));
            let inode = bootstrap.inode(entry.inode)?;
            stats.paths += 1;
            if inode.kind()? == FileKind::Directory {
                fs::create_dir(&path).ctx(|| format!("creating {}", path.display()))?;
                dirs.push((path.clone(), entry.inode));
                queue.push_back((path, entry.inode));
                continue;
            }
            if let Some(first) = first_path.get(&entry.inode) {
                fs::hard_link(first, &path)
                    .ctx(|| format!("linking {} to {}", path.display(), first.display()))?;
                continue;
            }
            create_node(bootstrap, store, &inode, &path, &mut stats)?;
            set_attrs(bootstrap, &inode, &path, as_root)?;
            if inode.nlink() > 1 {
                first_path.insert(entry.inode, path);
            }
        }
    }
    // Directories last, deepest first, so that creating entries does not
    // disturb times already set.
    for (path, id) in dirs.iter().rev() {
        let inode = bootstrap.inode(*id)?;
        set_attrs(bootstrap, &inode, path, as_root)?;
    }
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
    stats: &mut UnpackStats,
) -> Result<(), ConvertError> {
    let kind = inode.kind()?;
    match kind {
        FileKind::Regular => {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .ctx(|| format!("creating {}", path.display()))?;
            write_content(bootstrap, store, inode, &file, path, stats)?;
            stats.files += 1;
        }
        FileKind::Symlink => {
            let target = bootstrap.symlink_target(inode.id())?;
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path)
                .ctx(|| format!("creating symlink {}", path.display()))?;
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
                    context: format!("creating {} (device nodes need root)", path.display()),
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
    path: &Path,
    stats: &mut UnpackStats,
) -> Result<(), ConvertError> {
    let mut buf = Vec::new();
    for fc in bootstrap.file_chunks(inode.id())? {
        let info = bootstrap.chunk(fc.chunk_index())?;
        let blob = bootstrap.blob(info.blob_index)?;
        let stored = store.read_range(
            &blob.digest,
            info.compressed_offset,
            u64::from(info.compressed_size),
        )?;
        skiff_format::decode_chunk_into(&info, &stored, &mut buf).map_err(|e| {
            ConvertError::Chunk {
                path: path.display().to_string(),
                chunk: fc.chunk_index(),
                digest: info.digest,
                offset: fc.file_offset(),
                message: e.to_string(),
            }
        })?;
        file.write_all_at(&buf, fc.file_offset())
            .ctx(|| format!("writing {}", path.display()))?;
        stats.bytes += buf.len() as u64;
    }
    // Whatever no chunk covers is a hole: extending the length leaves it sparse.
    file.set_len(inode.size())
        .ctx(|| format!("sizing {}", path.display()))?;
    Ok(())
}

fn set_attrs(
    bootstrap: &Bootstrap<'_>,
    inode: &Inode<'_>,
    path: &Path,
    as_root: bool,
) -> Result<(), ConvertError> {
    let kind = inode.kind()?;
    if as_root {
        std::os::unix::fs::lchown(path, Some(inode.uid()), Some(inode.gid()))
            .ctx(|| format!("chown {}", path.display()))?;
    }
    if kind != FileKind::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(inode.perm()))
            .ctx(|| format!("chmod {}", path.display()))?;
    }
    // After chown, which clears security.capability.
    for x in bootstrap.xattrs(inode.id())? {
        let (name, value) = x?;
        xattr::set(path, OsStr::from_bytes(name), value).ctx(|| {
            format!(
                "setting xattr {} on {}",
                String::from_utf8_lossy(name),
                path.display()
            )
        })?;
    }
    let (sec, nsec) = inode.mtime();
    let t = TimeSpec::new(sec, i64::from(nsec));
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| {
        ConvertError::Io {
            context: format!("setting times of {}", path.display()),
            source: e.into(),
        }
    })?;
    Ok(())
}
