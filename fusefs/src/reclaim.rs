//! What one image holds in the node's cache directory, and giving it back
//! when the image is removed.
//!
//! The disk cache is keyed by chunk digest and shared by every image of
//! the node, so "an image's entries" are the chunk files its bootstrap
//! names (chunks by digest, shared frames by their key), plus its verified bootstrap in the bootstrap cache
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

use crate::chunk::ChunkRequest;
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

/// The cache keys the bootstrap of layer `layer` names (its chunks'
/// digests, and the keys of its shared frames); `None` when the
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
        let info = boot.chunk(i).map_err(bad)?;
        out.insert(info.digest);
        if info.frame.is_some() {
            let req = ChunkRequest {
                index: i,
                info,
                blob: boot.blob(info.blob_index).map_err(bad)?.digest,
            };
            out.extend(req.frame_key());
        }
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

#[cfg(test)]
mod tests {
    use skiff_format::ChunkInfo;

    use super::*;

    const CHUNK: u32 = 1000;

    fn chunk_digest(i: u32) -> Digest {
        Digest::of(&i.to_le_bytes())
    }

    /// A bootstrap of one file made of chunks `ids` (stored raw, one blob).
    fn bootstrap(ids: &[u32]) -> Vec<u8> {
        let chunks: Vec<ChunkInfo> = ids
            .iter()
            .enumerate()
            .map(|(n, &i)| ChunkInfo {
                digest: chunk_digest(i),
                hash: skiff_format::ChunkHash::Sha256,
                blob_index: 0,
                compressed: false,
                compressed_offset: u64::from(CHUNK) * n as u64,
                compressed_size: CHUNK,
                uncompressed_size: CHUNK,
                frame: None,
            })
            .collect();
        crate::testutil::one_file_bootstrap(chunks)
    }

    fn put_bootstrap(cache: &Path, layer: &Digest, ids: &[u32]) {
        let p = bootstrap_path(cache, layer);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bootstrap(ids)).unwrap();
    }

    fn put_chunk(cache: &Path, i: u32) {
        let p = chunk_path(&cache.join(CHUNKS_DIR), &chunk_digest(i));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, vec![0u8; 100]).unwrap();
    }

    fn has_chunk(cache: &Path, i: u32) -> bool {
        chunk_path(&cache.join(CHUNKS_DIR), &chunk_digest(i)).is_file()
    }

    #[test]
    fn usage_counts_what_is_on_disk_and_release_keeps_shared_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let (a, b) = (Digest::of(b"layer a"), Digest::of(b"layer b"));
        // A names chunks 1-6 (chunk 2 twice), B names 4-9; 1-9 are on disk
        // but 6.
        put_bootstrap(cache, &a, &[1, 2, 2, 3, 4, 5, 6]);
        put_bootstrap(cache, &b, &[4, 5, 6, 7, 8, 9]);
        for i in (1..=9).filter(|&i| i != 6) {
            put_chunk(cache, i);
        }
        let boot_a = fs::metadata(bootstrap_path(cache, &a)).unwrap().len();
        let u = image_usage(cache, &a).unwrap().unwrap();
        assert_eq!(
            u,
            ImageUsage {
                bootstrap_bytes: boot_a,
                chunks: 5,
                chunk_bytes: 500
            }
        );
        assert_eq!((u.bytes(), u.inodes()), (boot_a + 500, 6));
        // Not cached: nothing known, nothing deleted.
        let c = Digest::of(b"layer c");
        assert_eq!(image_usage(cache, &c).unwrap(), None);
        assert_eq!(release_image(cache, &c, &[a, b]).unwrap(), Usage::default());

        // A goes while B stays mounted: A's own chunks and bootstrap go.
        let freed = release_image(cache, &a, &[b]).unwrap();
        assert_eq!(
            freed,
            Usage {
                entries: 4,
                bytes: 300 + boot_a
            }
        );
        for i in 1..=3 {
            assert!(!has_chunk(cache, i), "chunk {i} kept");
        }
        for i in [4, 5, 7, 8, 9] {
            assert!(
                has_chunk(cache, i),
                "chunk {i} of the mounted image deleted"
            );
        }
        assert!(!bootstrap_path(cache, &a).exists());
        assert!(bootstrap_path(cache, &b).exists());

        // A damaged bootstrap is an error, not a guess.
        fs::write(bootstrap_path(cache, &b), b"not a bootstrap").unwrap();
        assert!(image_usage(cache, &b).is_err());
    }
}
