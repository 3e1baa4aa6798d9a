//! Verified bootstraps kept uncompressed on local disk and mapped, so that
//! mounting an image the node has mounted before costs a file open, a
//! memory map and the checksums of the blocks it reads: no fetch, no
//! decompression, no SHA-256 of the whole bootstrap.
//!
//! # Layout and trust
//!
//! `DIR/bootstraps/<hex>` holds the uncompressed bootstrap of the bootstrap
//! layer whose (compressed) digest is `sha256:<hex>`: the key is what the
//! manifest names, so a lookup needs nothing but the manifest. A file is
//! written only after the layer was verified against that digest,
//! decompressed and checked against the manifest's uncompressed digest; it
//! goes to a temporary name and is renamed into place, so a visible file is
//! complete (barring a power cut: there is no fsync). Reading one back, the
//! caller opens it lazily, which checks the header and section table at
//! once and every 64 KiB block's CRC-32 the first time it is read (format
//! 1.2; older bootstraps are checked whole): accidental damage (a torn
//! write, a flipped bit) found at open removes the file and fetches the
//! layer again; found later, it fails the reads of that block (EIO), never
//! serves the damaged bytes. The directory is the node's cache directory (root's
//! `/var/cache/skiff`, mode 0700 like the chunk cache beside it): whoever can
//! write there already controls what every mount serves.
//!
//! # Memory maps
//!
//! Files are never written in place (only created by rename and removed),
//! so a map stays valid for the life of the mount, even when the file is
//! evicted: unlinking keeps the inode until the last map goes. The mapped
//! pages are page cache, shared by every mount of the same image on the
//! node and reclaimable under memory pressure.
//!
//! # Bound
//!
//! At most [`KEEP`] bootstraps are kept; each write removes the least
//! recently used beyond that (use is recorded in the file's mtime).

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::ops::Deref;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use skiff_format::Digest;

/// Bootstraps kept in a cache directory; older ones are removed.
pub const KEEP: usize = 256;

/// The bytes of an uncompressed bootstrap: decompressed into memory, or a
/// read-only map of a cached file.
pub enum BootstrapBytes {
    /// Decompressed in this process.
    Owned(Vec<u8>),
    /// A map of a file in the bootstrap cache.
    Mapped(memmap2::Mmap),
}

impl Deref for BootstrapBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            BootstrapBytes::Owned(v) => v,
            BootstrapBytes::Mapped(m) => m,
        }
    }
}

impl BootstrapBytes {
    /// Starts reading a mapped bootstrap into the page cache, in the
    /// background, and lets later faults read ahead again (the map comes
    /// advised for random access, see [`BootstrapCache::get`]): for a mount
    /// that serves, after its lazy open read a few pages, so that the tree
    /// walks to come find the pages in memory. Nothing for owned bytes.
    pub fn read_ahead(&self) {
        if let BootstrapBytes::Mapped(m) = self {
            let _ = m.advise(memmap2::Advice::Normal);
            let _ = m.advise(memmap2::Advice::WillNeed);
        }
    }
}

impl AsRef<[u8]> for BootstrapBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for BootstrapBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            BootstrapBytes::Owned(_) => "owned",
            BootstrapBytes::Mapped(_) => "mapped",
        };
        write!(f, "BootstrapBytes({kind}, {} bytes)", self.len())
    }
}

/// A directory of verified, uncompressed bootstraps.
#[derive(Debug, Clone)]
pub struct BootstrapCache {
    dir: PathBuf,
}

impl BootstrapCache {
    /// The bootstrap cache inside the node's cache directory `cache_dir`
    /// (created on first write).
    pub fn new(cache_dir: &Path) -> BootstrapCache {
        BootstrapCache {
            dir: cache_dir.join("bootstraps"),
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(layer.to_hex())
    }

    /// A map of the cached bootstrap of the bootstrap layer `layer`, if
    /// there is one, advised for random access. The caller must parse it
    /// (checksums) and [`discard`](Self::discard) it when that fails.
    pub fn get(&self, layer: &Digest) -> Option<memmap2::Mmap> {
        let path = self.path(layer);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!("bootstrap cache {}: {e}", path.display());
                }
                return None;
            }
        };
        match map(&file) {
            Ok(m) if !m.is_empty() => {
                // A fault reads its page, not the device's readahead window
                // around it (8 MB on some disks): a lazy open touches a few
                // pages of a file that may be tens of MB. The caller advises
                // otherwise when it reads the whole file.
                let _ = m.advise(memmap2::Advice::Random);
                // Record the use for eviction; failing to is harmless.
                let _ = file.set_modified(SystemTime::now());
                Some(m)
            }
            Ok(_) => {
                self.discard(layer);
                None
            }
            Err(e) => {
                tracing::debug!("bootstrap cache: mapping {}: {e}", path.display());
                None
            }
        }
    }

    /// Stores the verified, uncompressed `bootstrap` of layer `layer` and
    /// returns a map of the stored file; removes the least recently used
    /// files beyond [`KEEP`].
    pub fn put(&self, layer: &Digest, bootstrap: &[u8]) -> io::Result<memmap2::Mmap> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            // Readable too: the map is taken from this handle.
            let mut f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            // No fsync: a file torn by a power cut fails its checksums
            // when read back, and is then fetched again.
            f.write_all(bootstrap)?;
            fs::rename(&tmp, self.path(layer))?;
            map(&f)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let mapped = written?;
        if let Err(e) = self.evict() {
            tracing::debug!("bootstrap cache {}: eviction: {e}", self.dir.display());
        }
        Ok(mapped)
    }

    /// Removes the cached bootstrap of `layer` (found damaged).
    pub fn discard(&self, layer: &Digest) {
        let path = self.path(layer);
        match fs::remove_file(&path) {
            Ok(()) => tracing::warn!("bootstrap cache: removed damaged {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("bootstrap cache: removing {}: {e}", path.display()),
        }
    }

    /// Keeps the [`KEEP`] most recently used files; removes temporary
    /// files older than an hour (their writer died).
    fn evict(&self) -> io::Result<()> {
        let now = SystemTime::now();
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(meta) = entry.metadata() else { continue };
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let age = now.duration_since(mtime).unwrap_or_default();
                if age.as_secs() > 3600 {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            files.push((mtime, entry.path()));
        }
        if files.len() > KEEP {
            files.sort();
            let excess = files.len() - KEEP;
            for (_, path) in files.into_iter().take(excess) {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }
}

/// Asks the kernel to read `bytes` (part of a mapped bootstrap) into the
/// page cache now, as one request: the hint a lazily checked bootstrap
/// gives before the first check of a block ([`BlockMarks::with_hint`]).
/// The map is advised for random access ([`BootstrapCache::get`]), so
/// without it the check of a 64 KiB block would fault its sixteen pages in
/// one disk read at a time. Harmless on memory that is not a file map.
///
/// [`BlockMarks::with_hint`]: skiff_format::BlockMarks::with_hint
#[allow(unsafe_code)]
pub fn will_need(bytes: &[u8]) {
    static PAGE: OnceLock<usize> = OnceLock::new();
    let page = *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    });
    if bytes.is_empty() {
        return;
    }
    let addr = bytes.as_ptr() as usize;
    let start = addr & !(page - 1);
    // SAFETY: [start, addr + len) lies in pages that hold `bytes`, which
    // this borrow keeps mapped for the call (a mapping covers whole pages).
    // MADV_WILLNEED only starts reads into the page cache: it changes no
    // byte of memory and no property of the mapping. A failure only means
    // no read ahead, so its result is ignored.
    unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            addr + bytes.len() - start,
            libc::MADV_WILLNEED,
        );
    }
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map(file: &File) -> io::Result<memmap2::Mmap> {
    // SAFETY: memmap2 requires that the file is not modified while mapped.
    // Files in the bootstrap cache are complete when they appear (written
    // under a temporary name, then renamed) and are never opened for
    // writing again: they are only removed, which leaves a mapped inode
    // intact. Every byte read through the map is bounds-checked by the
    // bootstrap parser, and its checksums are verified before use.
    unsafe { memmap2::Mmap::map(file) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn put_get_discard_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BootstrapCache::new(dir.path());
        let layer = Digest::of(b"layer");
        assert!(cache.get(&layer).is_none());
        let m = cache.put(&layer, b"bootstrap bytes").unwrap();
        assert_eq!(&m[..], b"bootstrap bytes");
        assert_eq!(&cache.get(&layer).unwrap()[..], b"bootstrap bytes");
        cache.discard(&layer);
        assert!(cache.get(&layer).is_none());
        // The map taken before the discard still reads the bytes.
        assert_eq!(&m[..], b"bootstrap bytes");
        for i in 0..KEEP + 5 {
            cache.put(&Digest::of(&i.to_le_bytes()), b"x").expect("put");
        }
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), KEEP);
    }
}
