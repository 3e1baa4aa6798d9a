//! Where layer records are found and kept: a local cache directory, earlier
//! Skiff images, and the target registry.
//!
//! - [`LayerCache`] (`skiff convert --cache-dir DIR`): records and the data
//!   blobs they name, on local disk. Layout:
//!   `DIR/records/<settings key hex>/<diff ID hex>/<record SHA-256>` (a
//!   layer's records, one per context it was converted in, each behind a
//!   `SKIFFLRC` magic and the SHA-256 of the record bytes),
//!   `DIR/blobs/sha256/<hex>` (data blobs), `DIR/blobs/where/<hex>` (the
//!   registry repositories a blob was published to, so that another
//!   repository of the same registry can mount it instead of receiving it)
//!   and `DIR/tmp/` (files being written). Every file is written under a unique temporary name, synced
//!   and renamed into place, so concurrent conversions sharing a directory
//!   never see half a file; every read is verified (record checksum, blob
//!   digest) and a bad entry is dropped and treated as a miss.
//! - Earlier images (`--chunk-dict`): a converted image's manifest carries
//!   [`ANNOTATION_LAYER_RECORDS`], naming for each source diff ID the blob
//!   that holds its record in the image's repository or layout.
//! - The target registry: every conversion to a registry tags a small
//!   artifact per source layer in the target repository, under
//!   [`record_tag`] (derived from the diff ID and the settings key), whose
//!   manifest lists the record blob and the layer's data blob. A later
//!   conversion into the same repository finds it with one manifest GET,
//!   with no local state. Tags and plain image manifests are all that
//!   distribution 2.8 needs (no referrers API).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use skiff_format::Digest;
use skiff_registry::media::{OCI_MANIFEST, SKIFF_BLOB};

use crate::error::{ConvertError, IoContext};
use crate::pipeline::BlobOut;
use crate::record::{LayerRecord, MAX_RECORD_SIZE};

/// Media type of a layer record blob.
pub const MEDIA_LAYER_RECORD: &str = "application/vnd.dev.skiff.layer-record.v1";
/// Media type of the config of a layer record artifact.
pub const MEDIA_LAYER_RECORD_CONFIG: &str = "application/vnd.dev.skiff.layer-record.config.v1+json";
/// Manifest annotation of a converted image: its layers' records, as
/// space-separated `DIFF_ID=RECORD_DIGEST@SIZE` items in layer order.
pub const ANNOTATION_LAYER_RECORDS: &str = "dev.skiff.layer-records";
/// One item of [`ANNOTATION_LAYER_RECORDS`]: (diff ID, record blob digest,
/// record blob size).
pub type RecordRef = (Digest, Digest, u64);

/// Manifest annotation: the settings key (hex) its layer records carry.
pub const ANNOTATION_LAYER_SETTINGS: &str = "dev.skiff.layer-records.settings";

/// The tag of the record artifact of layer `diff_id` converted with
/// settings key `settings`: `skiff-layer-<diff ID hex>-<first 16 hex
/// digits of the settings key>` (93 characters, a valid tag).
pub fn record_tag(diff_id: &Digest, settings: &Digest) -> String {
    let s = settings.to_hex();
    format!("skiff-layer-{}-{}", diff_id.to_hex(), &s[..16])
}

/// The config and manifest of a record artifact: the record blob, then the
/// data blob (if the record has one), so that the registry keeps both.
/// `record` is the blob's (digest, size); `settings_text` goes in the config.
pub fn record_artifact(
    record: &LayerRecord,
    record_blob: (Digest, u64),
    settings_text: &str,
) -> Result<(Vec<u8>, Vec<u8>), ConvertError> {
    let config = serde_json::to_vec(&json!({
        "diff_id": record.diff_id.to_string(),
        "settings": record.settings.to_string(),
        "settings_text": settings_text,
    }))
    .map_err(|e| ConvertError::Invalid(format!("serialising a record config: {e}")))?;
    let config_digest = Digest::of(&config);
    let mut layers = vec![json!({
        "mediaType": MEDIA_LAYER_RECORD,
        "digest": record_blob.0.to_string(),
        "size": record_blob.1,
    })];
    if let Some(b) = &record.blob {
        layers.push(json!({
            "mediaType": SKIFF_BLOB,
            "digest": b.digest.to_string(),
            "size": b.size,
        }));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_LAYER_RECORD_CONFIG,
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": layers,
        "annotations": {
            skiff_registry::media::ANNOTATION_SOURCE_DIFF_ID: record.diff_id.to_string(),
            ANNOTATION_LAYER_SETTINGS: record.settings.to_hex(),
        },
    }))
    .map_err(|e| ConvertError::Invalid(format!("serialising a record manifest: {e}")))?;
    Ok((config, manifest))
}

/// The record blob a record artifact manifest names: (digest, size).
pub fn record_blob_of_artifact(manifest: &[u8]) -> Result<(Digest, u64), String> {
    let v: Value = serde_json::from_slice(manifest).map_err(|e| format!("not JSON: {e}"))?;
    let layer = v
        .get("layers")
        .and_then(Value::as_array)
        .and_then(|l| l.first())
        .ok_or("no layers")?;
    if layer.get("mediaType").and_then(Value::as_str) != Some(MEDIA_LAYER_RECORD) {
        return Err("its first layer is not a layer record".into());
    }
    let digest = layer
        .get("digest")
        .and_then(Value::as_str)
        .and_then(|d| d.parse().ok())
        .ok_or("bad record digest")?;
    let size = layer
        .get("size")
        .and_then(Value::as_u64)
        .ok_or("bad record size")?;
    Ok((digest, size))
}

/// The value of [`ANNOTATION_LAYER_RECORDS`] for these (diff ID, record
/// blob) pairs.
pub fn records_annotation(items: &[RecordRef]) -> String {
    items
        .iter()
        .map(|(diff, rec, size)| format!("{diff}={rec}@{size}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses [`ANNOTATION_LAYER_RECORDS`]: (diff ID, record digest, size);
/// malformed items are skipped.
pub fn parse_records_annotation(value: &str) -> Vec<RecordRef> {
    value
        .split_whitespace()
        .filter_map(|item| {
            let (diff, rest) = item.split_once('=')?;
            let (rec, size) = rest.split_once('@')?;
            Some((diff.parse().ok()?, rec.parse().ok()?, size.parse().ok()?))
        })
        .collect()
}

/// The records an image's manifest names (see [`ANNOTATION_LAYER_RECORDS`]).
pub fn records_of_manifest(manifest: &Value) -> Vec<RecordRef> {
    manifest
        .get("annotations")
        .and_then(|a| a.get(ANNOTATION_LAYER_RECORDS))
        .and_then(Value::as_str)
        .map(parse_records_annotation)
        .unwrap_or_default()
}

/// Magic of a record file in a [`LayerCache`].
const CACHE_MAGIC: &[u8; 8] = b"SKIFFLRC";

/// Records kept per layer and settings (one per context it was converted in).
pub const MAX_VARIANTS: usize = 8;

/// Temporary files older than this are left over from a crashed run.
const STALE_TEMP_SECS: u64 = 24 * 3600;

/// A local directory of layer records and data blobs (see the module docs).
#[derive(Debug)]
pub struct LayerCache {
    dir: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LayerCache {
    /// Opens (creating) the cache at `dir`, and removes temporary files a
    /// crashed run left behind more than a day ago.
    pub fn open(dir: &Path) -> Result<LayerCache, ConvertError> {
        for sub in ["records", "blobs/sha256", "tmp"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).ctx(|| format!("creating the layer cache {}", d.display()))?;
        }
        let cache = LayerCache {
            dir: dir.to_path_buf(),
        };
        if let Ok(entries) = fs::read_dir(dir.join("tmp")) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > STALE_TEMP_SECS);
                if old {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(cache)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_dir(&self, settings: &Digest, diff_id: &Digest) -> PathBuf {
        self.dir
            .join("records")
            .join(settings.to_hex())
            .join(diff_id.to_hex())
    }

    /// Where blob `digest` is kept (it may not be there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.to_hex())
    }

    /// The records of layer `diff_id` under `settings`, newest first, each
    /// verified; damaged ones are removed. A layer has one record per
    /// context it was converted in (what earlier layers and dictionaries
    /// already held), at most [`MAX_VARIANTS`].
    pub fn get(&self, settings: &Digest, diff_id: &Digest) -> Vec<LayerRecord> {
        let dir = self.record_dir(settings, diff_id);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let t = e.metadata().and_then(|m| m.modified()).ok()?;
                Some((t, e.path()))
            })
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        files
            .into_iter()
            .filter_map(|(_, path)| self.read_record(&path, settings, diff_id))
            .collect()
    }

    fn read_record(&self, path: &Path, settings: &Digest, diff_id: &Digest) -> Option<LayerRecord> {
        let mut bytes = Vec::new();
        if let Err(e) =
            File::open(path).and_then(|f| f.take(MAX_RECORD_SIZE).read_to_end(&mut bytes))
        {
            tracing::warn!("layer cache: {}: {e}", path.display());
            return None;
        }
        let checked = bytes
            .strip_prefix(CACHE_MAGIC)
            .and_then(|rest| rest.split_first_chunk::<32>())
            .filter(|(sum, body)| Digest::of(body).0 == **sum)
            .map(|(_, body)| body);
        match checked.map(LayerRecord::decode) {
            Some(Ok(r)) if r.settings == *settings && r.diff_id == *diff_id => Some(r),
            other => {
                let why = match other {
                    Some(Err(e)) => e,
                    None => "checksum mismatch".into(),
                    Some(Ok(_)) => "it is filed under the wrong key".into(),
                };
                tracing::warn!("layer cache: dropping {}: {why}", path.display());
                let _ = fs::remove_file(path);
                None
            }
        }
    }

    /// Stores `record` beside the other records of its layer (nothing to do
    /// if the same record is there), dropping the oldest beyond
    /// [`MAX_VARIANTS`].
    pub fn put(&self, record: &LayerRecord) -> Result<(), ConvertError> {
        let body = record.encode()?;
        let sum = Digest::of(&body);
        let dir = self.record_dir(&record.settings, &record.diff_id);
        let path = dir.join(sum.to_hex());
        if path.is_file() {
            return Ok(());
        }
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut bytes = CACHE_MAGIC.to_vec();
        bytes.extend_from_slice(&sum.0);
        bytes.extend_from_slice(&body);
        let (mut file, temp) = self.temp_file()?;
        let r = file
            .write_all(&bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&temp, &path));
        if r.is_err() {
            let _ = fs::remove_file(&temp);
        }
        r.ctx(|| format!("writing {}", path.display()))?;
        if let Ok(entries) = fs::read_dir(&dir) {
            let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
                .flatten()
                .filter_map(|e| Some((e.metadata().and_then(|m| m.modified()).ok()?, e.path())))
                .collect();
            if files.len() > MAX_VARIANTS {
                files.sort_by_key(|f| std::cmp::Reverse(f.0));
                for (_, old) in files.into_iter().skip(MAX_VARIANTS) {
                    let _ = fs::remove_file(old);
                }
            }
        }
        Ok(())
    }

    /// Whether blob `digest` is in the cache with size `size` and the right
    /// content (read and hashed now; a damaged blob is removed).
    pub fn verify_blob(&self, digest: &Digest, size: u64) -> bool {
        let path = self.blob_path(digest);
        let Ok(mut f) = File::open(&path) else {
            return false;
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    total += n as u64;
                }
                Err(e) => {
                    tracing::warn!("layer cache: reading {}: {e}", path.display());
                    return false;
                }
            }
        }
        if total == size && Digest(hasher.finalize().into()) == *digest {
            return true;
        }
        tracing::warn!(
            "layer cache: dropping {}: its content is not {digest}",
            path.display()
        );
        let _ = fs::remove_file(&path);
        false
    }

    fn where_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("where").join(digest.to_hex())
    }

    /// The registry repositories blob `digest` was last published to, as
    /// `(registry, repository)`, newest first: a conversion that needs the
    /// blob in another repository of the same registry mounts it from there.
    pub fn locations(&self, digest: &Digest) -> Vec<(String, String)> {
        fs::read_to_string(self.where_path(digest))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (reg, repo) = l.split_once(' ')?;
                Some((reg.to_string(), repo.to_string()))
            })
            .collect()
    }

    /// Notes that blob `digest` is in `repository` of `registry` (best
    /// effort; keeps the 8 newest places).
    pub fn note_location(&self, digest: &Digest, registry: &str, repository: &str) {
        let mut places = vec![(registry.to_string(), repository.to_string())];
        for p in self.locations(digest) {
            if !places.contains(&p) && places.len() < 8 {
                places.push(p);
            }
        }
        let text: String = places.iter().map(|(r, p)| format!("{r} {p}\n")).collect();
        let path = self.where_path(digest);
        let r = (|| -> Result<(), ConvertError> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
            }
            let (mut file, temp) = self.temp_file()?;
            let r = file
                .write_all(text.as_bytes())
                .and_then(|()| fs::rename(&temp, &path));
            if r.is_err() {
                let _ = fs::remove_file(&temp);
            }
            r.ctx(|| format!("writing {}", path.display()))
        })();
        if let Err(e) = r {
            tracing::warn!("layer cache: {e}");
        }
    }

    fn temp_file(&self) -> Result<(File, PathBuf), ConvertError> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = self
            .dir
            .join("tmp")
            .join(format!("{}-{nanos}-{n}", std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        Ok((file, path))
    }

    /// Wraps a blob being written so that a copy lands in the cache when
    /// it is committed (best effort: a cache failure is a warning).
    pub fn tee(&self, inner: Box<dyn BlobOut>) -> Box<dyn BlobOut> {
        let copy = match self.temp_file() {
            Ok((f, path)) => Some(TempCopy {
                file: std::io::BufWriter::with_capacity(1 << 20, f),
                path,
                renamed: false,
            }),
            Err(e) => {
                tracing::warn!("layer cache: {e}");
                None
            }
        };
        Box::new(TeeOut {
            inner,
            copy,
            blobs: self.dir.join("blobs").join("sha256"),
        })
    }
}

struct TeeOut {
    inner: Box<dyn BlobOut>,
    copy: Option<TempCopy>,
    blobs: PathBuf,
}

/// A cache copy being written; its temporary file goes away unless renamed.
struct TempCopy {
    file: std::io::BufWriter<File>,
    path: PathBuf,
    renamed: bool,
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Write for TeeOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(c) = &mut self.copy {
            if let Err(e) = c.file.write_all(&buf[..n]) {
                tracing::warn!("layer cache: writing {}: {e}", c.path.display());
                self.copy = None;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl BlobOut for TeeOut {
    fn commit(self: Box<Self>) -> Result<(Digest, u64), ConvertError> {
        let TeeOut { inner, copy, blobs } = *self;
        let (digest, size) = inner.commit()?;
        if let Some(mut c) = copy {
            let dest = blobs.join(digest.to_hex());
            let r = c
                .file
                .flush()
                .and_then(|()| c.file.get_ref().sync_all())
                .and_then(|()| fs::rename(&c.path, &dest));
            match r {
                Ok(()) => c.renamed = true,
                Err(e) => tracing::warn!("layer cache: keeping blob {digest}: {e}"),
            }
        }
        Ok((digest, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{LayerFigures, RecordBlob};

    fn record() -> LayerRecord {
        LayerRecord {
            settings: Digest([1; 32]),
            diff_id: Digest([2; 32]),
            figures: LayerFigures::default(),
            blob: None::<RecordBlob>,
            refs: vec![],
            ops: vec![],
        }
    }

    #[test]
    fn cache_round_trip_and_damage_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(dir.path()).unwrap();
        let r = record();
        assert!(cache.get(&r.settings, &r.diff_id).is_empty());
        cache.put(&r).unwrap();
        cache.put(&r).unwrap();
        assert_eq!(cache.get(&r.settings, &r.diff_id), vec![r.clone()]);
        let dir = cache.record_dir(&r.settings, &r.diff_id);
        let path = fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(cache.get(&r.settings, &r.diff_id).is_empty());
        assert!(!path.exists(), "a damaged record is removed");
        let mut other = r.clone();
        for i in 0..(MAX_VARIANTS as u64 + 3) {
            other.figures.entries = i;
            cache.put(&other).unwrap();
        }
        assert_eq!(cache.get(&r.settings, &r.diff_id).len(), MAX_VARIANTS);
        assert!(!cache.verify_blob(&Digest([3; 32]), 1));
    }

    #[test]
    fn tags_and_annotations() {
        let t = record_tag(&Digest([0xab; 32]), &Digest([0xcd; 32]));
        assert_eq!(t.len(), 93);
        assert!(skiff_registry::reference::is_oci_tag(&t));
        let items = vec![(Digest([1; 32]), Digest([2; 32]), 77)];
        assert_eq!(parse_records_annotation(&records_annotation(&items)), items);
        assert!(parse_records_annotation("junk x=y@z").is_empty());
    }
}
