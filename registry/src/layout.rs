//! OCI image layout directories: [`OciLayout`] reads them, [`OciLayoutWriter`]
//! writes them.
//!
//! A layout is `oci-layout` (`{"imageLayoutVersion":"1.0.0"}`), `index.json`
//! (the top-level index, whose entries are named by the annotation
//! `org.opencontainers.image.ref.name`) and content-addressed blobs at
//! `blobs/sha256/<hex>`.
//!
//! Writing is crash-safe and deterministic. Blobs are streamed into a
//! `.tmp-*` file beside their final place, fsynced and renamed, so a blob
//! path never holds partial content. `index.json` is rewritten the same way,
//! and it is written last: an interrupted conversion leaves blobs nobody
//! points at, never a tag pointing at partial output. The same input gives
//! byte-identical `index.json` (compact JSON, keys in sorted order).
//!
//! One writer at a time per layout: two processes setting tags concurrently
//! may lose one of the updates (never corrupt the file).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{Descriptor, ImageIndex};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use skiff_format::Digest;

use crate::media;
use crate::platform::Platform;
use crate::reference::is_oci_tag;
use crate::RegistryError;

/// Largest manifest or index read into memory.
pub const MAX_MANIFEST_SIZE: u64 = 16 << 20;
/// Largest image config read into memory.
pub const MAX_CONFIG_SIZE: u64 = 64 << 20;
/// How deep indexes may nest before the layout is refused.
const MAX_INDEX_DEPTH: usize = 8;

const OCI_LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
const OCI_LAYOUT_CONTENT: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";

/// Converts an oci-spec digest into Skiff's (sha256 only).
pub(crate) fn to_digest(d: &oci_spec::image::Digest, what: &str) -> Result<Digest, RegistryError> {
    let s = d.to_string();
    if !s.starts_with("sha256:") {
        return Err(RegistryError::Invalid(format!(
            "{what}: digest {s} uses an unsupported algorithm (only sha256 is supported)"
        )));
    }
    s.parse()
        .map_err(|_| RegistryError::Invalid(format!("{what}: invalid digest {s}")))
}

/// Reads all of `r`, up to `max` bytes, failing past that.
pub(crate) fn read_bounded(r: impl Read, max: u64, path: &Path) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    r.take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| RegistryError::io(path, e))?;
    if out.len() as u64 > max {
        return Err(RegistryError::Invalid(format!(
            "{}: larger than the {max}-byte limit",
            path.display()
        )));
    }
    Ok(out)
}

/// Checks `bytes` against a descriptor's size and digest.
pub(crate) fn verify_bytes(
    bytes: &[u8],
    expected: &Digest,
    size: Option<u64>,
    what: &str,
) -> Result<(), RegistryError> {
    if let Some(size) = size {
        if bytes.len() as u64 != size {
            return Err(RegistryError::SizeMismatch {
                what: what.to_owned(),
                expected: size,
                actual: bytes.len() as u64,
            });
        }
    }
    let actual = Digest::of(bytes);
    if actual != *expected {
        return Err(RegistryError::DigestMismatch {
            what: what.to_owned(),
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(media::ANNOTATION_REF_NAME))
        .map(String::as_str)
}

fn platform_string(d: &Descriptor) -> String {
    match d.platform() {
        Some(p) => {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s.push('/');
                s.push_str(v);
            }
            s
        }
        None => "(no platform)".to_owned(),
    }
}

fn platform_matches(d: &Descriptor, wanted: &Platform) -> bool {
    d.platform().as_ref().is_some_and(|p| {
        wanted.matches(
            &p.os().to_string(),
            &p.architecture().to_string(),
            p.variant().as_deref(),
        )
    })
}

/// Chooses among index entries: a lone entry is taken if it has no
/// platform or a matching one; among several, the first matching one.
pub(crate) fn choose<'a>(
    image: &str,
    entries: &[&'a Descriptor],
    wanted: &Platform,
    lone_any: bool,
) -> Result<&'a Descriptor, RegistryError> {
    if let [only] = entries {
        if lone_any || only.platform().is_none() || platform_matches(only, wanted) {
            return Ok(only);
        }
    }
    if let Some(d) = entries.iter().find(|d| platform_matches(d, wanted)) {
        return Ok(d);
    }
    if entries.is_empty() {
        return Err(RegistryError::Invalid(format!(
            "{image}: the index lists no manifests"
        )));
    }
    let available: Vec<String> = entries.iter().map(|d| platform_string(d)).collect();
    Err(RegistryError::NoMatchingPlatform {
        image: image.to_owned(),
        wanted: wanted.to_string(),
        available: available.join(", "),
    })
}

/// A reader of an OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens the layout at `dir`, checking its `oci-layout` file.
    pub fn open(dir: impl AsRef<Path>) -> Result<OciLayout, RegistryError> {
        let dir = dir.as_ref().to_path_buf();
        check_oci_layout_file(&dir)?;
        Ok(OciLayout { dir })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.dir, digest)
    }

    /// Whether blob `digest` is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens blob `digest` for reading (unverified: the caller streams it).
    pub fn open_blob(&self, digest: &Digest) -> Result<File, RegistryError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                RegistryError::NotFound(format!(
                    "blob {digest} is missing from {} (expected at {})",
                    self.dir.display(),
                    path.display()
                ))
            } else {
                RegistryError::io(path, e)
            }
        })
    }

    /// Reads blob `digest` whole and checks its SHA-256.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let path = self.blob_path(digest);
        let mut bytes = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::io(&path, e))?;
        verify_bytes(&bytes, digest, None, &format!("blob {}", path.display()))?;
        Ok(bytes)
    }

    /// Reads the blob a descriptor points at, at most `max` bytes, checking
    /// its size and digest. `what` names it in errors.
    pub fn read_descriptor(
        &self,
        desc: &Descriptor,
        what: &str,
        max: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let digest = to_digest(desc.digest(), what)?;
        if desc.size() > max {
            return Err(RegistryError::Invalid(format!(
                "{what}: descriptor size {} is above the {max}-byte limit",
                desc.size()
            )));
        }
        let path = self.blob_path(&digest);
        let bytes = read_bounded(self.open_blob(&digest)?, max, &path)?;
        verify_bytes(&bytes, &digest, Some(desc.size()), what)?;
        Ok(bytes)
    }

    /// The parsed top-level `index.json`.
    pub fn index(&self) -> Result<ImageIndex, RegistryError> {
        let path = self.dir.join(INDEX_FILE);
        let file = File::open(&path).map_err(|e| RegistryError::io(&path, e))?;
        let bytes = read_bounded(file, MAX_MANIFEST_SIZE, &path)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            RegistryError::Invalid(format!("{}: not a valid image index: {e}", path.display()))
        })
    }

    /// The tags (`org.opencontainers.image.ref.name`) of `index.json`, in order.
    pub fn tags(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .index()?
            .manifests()
            .iter()
            .filter_map(|d| ref_name(d).map(str::to_owned))
            .collect())
    }

    fn name(&self, tag: Option<&str>) -> String {
        match tag {
            Some(t) => format!("oci:{}:{t}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }

    /// Resolves `tag` (or the only image, if `None`) to an image manifest
    /// for the host platform: its digest and bytes, verified.
    pub fn resolve(&self, tag: Option<&str>) -> Result<(Digest, Vec<u8>), RegistryError> {
        self.resolve_for(tag, &Platform::host())
    }

    /// Resolves `tag` (or the only image, if `None`) to an image manifest
    /// for `platform`, following nested indexes; returns its digest and
    /// bytes, verified against the descriptors that led to it.
    pub fn resolve_for(
        &self,
        tag: Option<&str>,
        platform: &Platform,
    ) -> Result<(Digest, Vec<u8>), RegistryError> {
        let path = self.dir.join(INDEX_FILE);
        let file = File::open(&path).map_err(|e| RegistryError::io(&path, e))?;
        let index_bytes = read_bounded(file, MAX_MANIFEST_SIZE, &path)?;
        resolve_index(
            &self.name(tag),
            &path.display().to_string(),
            &index_bytes,
            tag,
            platform,
            |desc, what| self.read_descriptor(desc, what, MAX_MANIFEST_SIZE),
        )
    }
}

/// Resolves an image through a layout's top-level index: chooses the entry
/// tagged `tag` (or the only image, if `None`) for `platform` in
/// `index_bytes` (the contents of `index.json`, named `index_name` in
/// messages), then follows nested indexes, at most 8 deep, to an image
/// manifest. `read(descriptor, what)` returns the verified bytes a
/// descriptor points at. Returns the manifest's digest and bytes.
///
/// This is [`OciLayout::resolve_for`] without the file system, public so
/// that fuzz targets and property tests can feed it arbitrary documents;
/// every malformed document is an error naming `image`, never a panic.
pub fn resolve_index(
    image: &str,
    index_name: &str,
    index_bytes: &[u8],
    tag: Option<&str>,
    platform: &Platform,
    mut read: impl FnMut(&Descriptor, &str) -> Result<Vec<u8>, RegistryError>,
) -> Result<(Digest, Vec<u8>), RegistryError> {
    let index: ImageIndex = serde_json::from_slice(index_bytes).map_err(|e| {
        RegistryError::Invalid(format!("{index_name}: not a valid image index: {e}"))
    })?;
    let all: Vec<&Descriptor> = index.manifests().iter().collect();
    let tags = || {
        let t: Vec<&str> = all.iter().filter_map(|d| ref_name(d)).collect();
        if t.is_empty() {
            "(none)".to_owned()
        } else {
            t.join(", ")
        }
    };
    let candidates: Vec<&Descriptor> = match tag {
        Some(t) => {
            let c: Vec<&Descriptor> = all
                .iter()
                .copied()
                .filter(|d| ref_name(d) == Some(t))
                .collect();
            if c.is_empty() {
                return Err(RegistryError::NotFound(format!(
                    "{image}: no tag '{t}' in {index_name}; tags: {}",
                    tags()
                )));
            }
            c
        }
        None if all.is_empty() => {
            return Err(RegistryError::NotFound(format!(
                "{image}: the layout holds no images"
            )))
        }
        None if all.len() == 1 || all.iter().all(|d| d.platform().is_some()) => all.clone(),
        None => {
            return Err(RegistryError::Invalid(format!(
                "{image}: the layout holds {} images; name one with oci:DIR:TAG (tags: {})",
                all.len(),
                tags()
            )))
        }
    };
    let mut desc = choose(image, &candidates, platform, true)?.clone();
    for _ in 0..MAX_INDEX_DEPTH {
        let digest = to_digest(desc.digest(), image)?;
        let what = format!("manifest {digest} of {image}");
        let bytes = read(&desc, &what)?;
        let declared = desc.media_type().to_string();
        let is_index = media::is_index(&declared)
            || (!media::is_manifest(&declared) && looks_like_index(&bytes));
        if !is_index {
            return Ok((digest, bytes));
        }
        let nested: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| {
            RegistryError::Invalid(format!("index {digest} of {image}: not a valid index: {e}"))
        })?;
        let entries: Vec<&Descriptor> = nested.manifests().iter().collect();
        desc = choose(image, &entries, platform, false)?.clone();
    }
    Err(RegistryError::Invalid(format!(
        "{image}: indexes nest more than {MAX_INDEX_DEPTH} deep"
    )))
}

pub(crate) fn looks_like_index(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .is_some_and(|v| v.get("manifests").is_some() && v.get("layers").is_none())
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.to_hex())
}

fn check_oci_layout_file(dir: &Path) -> Result<(), RegistryError> {
    let path = dir.join(OCI_LAYOUT_FILE);
    let file = File::open(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            RegistryError::NotFound(format!(
                "{} is not an OCI image layout: it has no oci-layout file",
                dir.display()
            ))
        } else {
            RegistryError::io(&path, e)
        }
    })?;
    let bytes = read_bounded(file, 64 << 10, &path)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| RegistryError::Invalid(format!("{}: not JSON: {e}", path.display())))?;
    match v.get("imageLayoutVersion").and_then(Value::as_str) {
        Some("1.0.0") => Ok(()),
        Some(other) => Err(RegistryError::Invalid(format!(
            "{}: unsupported imageLayoutVersion '{other}' (expected 1.0.0)",
            path.display()
        ))),
        None => Err(RegistryError::Invalid(format!(
            "{}: no imageLayoutVersion",
            path.display()
        ))),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh `.tmp-*` file in `dir`.
fn create_temp(dir: &Path, stem: &str) -> Result<(File, PathBuf), RegistryError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".tmp-{stem}{}-{n}-{nanos}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(RegistryError::io(path, e)),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RegistryError::io(dir, e))
}

/// Writes `dir/name` atomically: temp file, fsync, rename, fsync of `dir`.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), RegistryError> {
    let (mut file, temp) = create_temp(dir, &format!("{name}-"))?;
    let result = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temp, dir.join(name)));
    if let Err(e) = result {
        let _ = fs::remove_file(&temp);
        return Err(RegistryError::io(dir.join(name), e));
    }
    sync_dir(dir)
}

/// A writer of an OCI image layout directory. See the module docs for the
/// guarantees.
#[derive(Debug, Clone)]
pub struct OciLayoutWriter {
    dir: PathBuf,
    blobs: PathBuf,
}

impl OciLayoutWriter {
    /// Opens the layout at `dir`, creating the directory, `oci-layout`,
    /// `blobs/sha256/` and an empty `index.json` if absent; an existing
    /// layout is checked.
    pub fn open_or_create(dir: impl AsRef<Path>) -> Result<OciLayoutWriter, RegistryError> {
        let dir = dir.as_ref().to_path_buf();
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|e| RegistryError::io(&blobs, e))?;
        if dir.join(OCI_LAYOUT_FILE).exists() {
            check_oci_layout_file(&dir)?;
        } else {
            write_atomic(&dir, OCI_LAYOUT_FILE, OCI_LAYOUT_CONTENT.as_bytes())?;
        }
        let writer = OciLayoutWriter { dir, blobs };
        if writer.dir.join(INDEX_FILE).exists() {
            writer.read_index_value()?;
        } else {
            let empty = json!({"schemaVersion": 2, "manifests": []});
            writer.write_index_value(&empty)?;
        }
        Ok(writer)
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A reader of the same layout.
    pub fn reader(&self) -> OciLayout {
        OciLayout {
            dir: self.dir.clone(),
        }
    }

    /// Whether blob `digest` is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        blob_path(&self.dir, digest).is_file()
    }

    /// Starts streaming a new blob; see [`BlobWriter`].
    pub fn blob_writer(&self) -> Result<BlobWriter, RegistryError> {
        let (file, temp) = create_temp(&self.blobs, "")?;
        Ok(BlobWriter {
            file: Some(BufWriter::with_capacity(256 << 10, file)),
            temp,
            dir: self.blobs.clone(),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Stores `bytes` as a blob; returns its digest and size.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<(Digest, u64), RegistryError> {
        let digest = Digest::of(bytes);
        if self.has_blob(&digest) {
            return Ok((digest, bytes.len() as u64));
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes)
            .map_err(|e| RegistryError::io(&w.temp, e))?;
        w.commit()
    }

    /// Copies a blob of known digest and size from `src`, verifying both
    /// before it becomes visible. If the blob is already present, `src` is
    /// not read at all.
    pub fn copy_blob_from(
        &self,
        src: impl Read,
        expected: &Digest,
        size: u64,
    ) -> Result<(), RegistryError> {
        if self.has_blob(expected) {
            return Ok(());
        }
        let mut w = self.blob_writer()?;
        let copied = io::copy(&mut src.take(size.saturating_add(1)), &mut w)
            .map_err(|e| RegistryError::io(&w.temp, e))?;
        let what = format!("blob {expected} copied into {}", self.dir.display());
        if copied != size {
            return Err(RegistryError::SizeMismatch {
                what,
                expected: size,
                actual: copied,
            });
        }
        let actual = w.digest_so_far();
        if actual != *expected {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: *expected,
                actual,
            });
        }
        w.commit().map(|_| ())
    }

    /// Stores `manifest_bytes` as a blob and points `tag` at it in
    /// `index.json`, replacing any entry of the same name and keeping the
    /// others. This is the commit point of a conversion.
    pub fn set_tag(
        &self,
        tag: &str,
        manifest_bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        if !is_oci_tag(tag) {
            return Err(RegistryError::InvalidReference {
                reference: format!("oci:{}:{tag}", self.dir.display()),
                reason: format!("'{tag}' is not a valid tag ([A-Za-z0-9_.-]+)"),
            });
        }
        if serde_json::from_slice::<Value>(manifest_bytes)
            .ok()
            .is_none_or(|v| !v.is_object())
        {
            return Err(RegistryError::Invalid(format!(
                "refusing to tag {tag} in {}: the manifest is not a JSON object",
                self.dir.display()
            )));
        }
        let (digest, size) = self.put_blob_bytes(manifest_bytes)?;
        let entry = json!({
            "mediaType": media_type,
            "digest": digest.oci(),
            "size": size,
            "annotations": { media::ANNOTATION_REF_NAME: tag },
        });
        let mut index = self.read_index_value()?;
        let index_path = self.dir.join(INDEX_FILE);
        let Some(obj) = index.as_object_mut() else {
            return Err(RegistryError::Invalid(format!(
                "{}: not a JSON object",
                index_path.display()
            )));
        };
        obj.insert("schemaVersion".to_owned(), json!(2));
        let manifests = obj
            .entry("manifests")
            .or_insert_with(|| Value::Array(Vec::new()));
        let Some(list) = manifests.as_array_mut() else {
            return Err(RegistryError::Invalid(format!(
                "{}: 'manifests' is not an array",
                index_path.display()
            )));
        };
        let same_tag = |v: &Value| {
            v.get("annotations")
                .and_then(|a| a.get(media::ANNOTATION_REF_NAME))
                .and_then(Value::as_str)
                == Some(tag)
        };
        match list.iter().position(same_tag) {
            Some(pos) => {
                list.retain(|v| !same_tag(v));
                list.insert(pos.min(list.len()), entry);
            }
            None => list.push(entry),
        }
        self.write_index_value(&index)?;
        Ok(digest)
    }

    fn read_index_value(&self) -> Result<Value, RegistryError> {
        let path = self.dir.join(INDEX_FILE);
        let file = File::open(&path).map_err(|e| RegistryError::io(&path, e))?;
        let bytes = read_bounded(file, MAX_MANIFEST_SIZE, &path)?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Invalid(format!("{}: not JSON: {e}", path.display())))?;
        if !v.get("manifests").is_none_or(Value::is_array) || !v.is_object() {
            return Err(RegistryError::Invalid(format!(
                "{}: not an image index",
                path.display()
            )));
        }
        Ok(v)
    }

    fn write_index_value(&self, v: &Value) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(v).map_err(|e| {
            RegistryError::Invalid(format!("{}: {e}", self.dir.join(INDEX_FILE).display()))
        })?;
        write_atomic(&self.dir, INDEX_FILE, &bytes)
    }
}

/// A blob being written: a `Write` into a temp file that hashes as it goes.
///
/// [`commit`](BlobWriter::commit) makes it visible under its digest;
/// dropping it without committing deletes the temp file.
pub struct BlobWriter {
    file: Option<BufWriter<File>>,
    temp: PathBuf,
    dir: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    /// The number of bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn digest_so_far(&self) -> Digest {
        Digest(self.hasher.clone().finalize().into())
    }

    /// Flushes and fsyncs the blob and renames it to `blobs/sha256/<hex>`
    /// (if that blob already exists, the temp file is just removed).
    /// Returns the digest and size.
    pub fn commit(mut self) -> Result<(Digest, u64), RegistryError> {
        let digest = self.digest_so_far();
        let Some(buf) = self.file.take() else {
            return Err(RegistryError::Invalid(format!(
                "{}: blob writer already finished",
                self.temp.display()
            )));
        };
        let file = buf
            .into_inner()
            .map_err(|e| RegistryError::io(&self.temp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| RegistryError::io(&self.temp, e))?;
        drop(file);
        let dest = self.dir.join(digest.to_hex());
        if dest.is_file() {
            fs::remove_file(&self.temp).map_err(|e| RegistryError::io(&self.temp, e))?;
        } else {
            fs::rename(&self.temp, &dest).map_err(|e| RegistryError::io(&dest, e))?;
            sync_dir(&self.dir)?;
        }
        // Committed: nothing left for Drop to clean.
        self.temp = PathBuf::new();
        Ok((digest, self.size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("blob writer already finished"));
        };
        let n = file.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.hasher.update(written);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            // Drop the handle first, then the name.
            self.file = None;
            let _ = fs::remove_file(&self.temp);
        }
    }
}
