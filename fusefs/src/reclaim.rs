//! What one image holds in the node's cache directory, and giving it back
//! when the image is removed.
//!
//! The disk cache is keyed by chunk digest and shared by every image of
//! the node, so "an image's entries" are the chunk files its bootstrap
//! names, plus its verified bootstrap in the bootstrap cache
//! (`DIR/bootstraps/<hex>`). [`image_usage`] counts those that are on disk
//! now (what containerd's `Usage` of the image's snapshot reports), and
//! [`release_image`] deletes those that no image still mounted names, when
//! the snapshotter removes the last snapshot of an image (kubelet's image
//! garbage collection deleting it, `ctr image rm`), so that the space comes
//! back at once instead of whenever the watermark evicts it. Deleting is
//! safe while other daemons run on the directory: to them a missing file is
//! a miss, fetched again; a bootstrap another mount has mapped stays valid
//! (the inode lives until the last map goes).
//!
//! The bootstrap is read from the bootstrap cache and parsed (its section
//! checksums verified); an image whose bootstrap is not cached there has
//! no known chunks, and nothing of it is counted or deleted.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use skiff_format::{Bootstrap, Digest};
use skiff_registry::BootstrapCache;

use crate::disk::{chunk_path, Usage, CHUNKS_DIR};

/// What an image holds in the cache directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageUsage {
    /// Bytes of its cached bootstrap.
    pub bootstrap_bytes: u64,
    /// Its chunk files on disk.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
}

impl ImageUsage {
    /// Bytes in all.
    pub fn bytes(&self) -> u64 {
        self.bootstrap_bytes + self.chunk_bytes
    }

    /// Files in all.
    pub fn inodes(&self) -> u64 {
        self.chunks + u64::from(self.bootstrap_bytes > 0)
    }
}

/// The cached bootstrap file of bootstrap layer `layer` under `cache_dir`.
pub fn bootstrap_path(cache_dir: &Path, layer: &Digest) -> PathBuf {
    BootstrapCache::new(cache_dir).dir().join(layer.to_hex())
}

/// The chunk digests the bootstrap of layer `layer` names; `None` when the
/// bootstrap is not in the cache. A cached bootstrap that fails its
/// checksums is an error.
pub fn image_chunks(cache_dir: &Path, layer: &Digest) -> io::Result<Option<HashSet<Digest>>> {
    let path = bootstrap_path(cache_dir, layer);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |e: skiff_format::FormatError| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bootstrap {}: {e}", path.display()),
        )
    };
    let boot = Bootstrap::parse(&bytes).map_err(bad)?;
    let mut out = HashSet::with_capacity(boot.chunk_count() as usize);
    for i in 0..boot.chunk_count() {
        out.insert(boot.chunk(i).map_err(bad)?.digest);
    }
    Ok(Some(out))
}

/// What the image of bootstrap layer `layer` holds under `cache_dir` now:
/// its bootstrap file and the chunk files it names that are on disk (each
/// chunk once, however many files use it). `None` when its bootstrap is not
/// cached.
pub fn image_usage(cache_dir: &Path, layer: &Digest) -> io::Result<Option<ImageUsage>> {
    let Some(chunks) = image_chunks(cache_dir, layer)? else {
        return Ok(None);
    };
    let mut u = ImageUsage {
        bootstrap_bytes: fs::metadata(bootstrap_path(cache_dir, layer)).map_or(0, |m| m.len()),
        ..ImageUsage::default()
    };
    let dir = cache_dir.join(CHUNKS_DIR);
    for d in &chunks {
        if let Ok(m) = fs::metadata(chunk_path(&dir, d)) {
            u.chunks += 1;
            u.chunk_bytes += m.len();
        }
    }
    Ok(Some(u))
}

/// Deletes what the image of bootstrap layer `removed` holds under
/// `cache_dir` and none of the images of bootstrap layers `kept` (those
/// still mounted) needs: its chunk files and its cached bootstrap. Returns
/// what was deleted (the bootstrap counted as an entry).
pub fn release_image(cache_dir: &Path, removed: &Digest, kept: &[Digest]) -> io::Result<Usage> {
    let mut freed = Usage::default();
    let Some(mut chunks) = image_chunks(cache_dir, removed)? else {
        return Ok(freed);
    };
    for k in kept.iter().filter(|k| *k != removed) {
        match image_chunks(cache_dir, k) {
            Ok(Some(theirs)) => chunks.retain(|d| !theirs.contains(d)),
            // Unknown chunks of a kept image: deleting one of them costs
            // that image a fetch, never a wrong byte.
            Ok(None) => {}
            Err(e) => tracing::debug!("release: kept image {k}: {e}"),
        }
    }
    let dir = cache_dir.join(CHUNKS_DIR);
    let mut files: Vec<PathBuf> = chunks.iter().map(|d| chunk_path(&dir, d)).collect();
    if !kept.contains(removed) {
        files.push(bootstrap_path(cache_dir, removed));
    }
    for path in files {
        let Ok(m) = fs::metadata(&path) else { continue };
        match fs::remove_file(&path) {
            Ok(()) => {
                freed.entries += 1;
                freed.bytes += m.len();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(freed)
}
