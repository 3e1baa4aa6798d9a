//! Opening a converted Skiff image by reference: its manifest, its bootstrap
//! and a [`BlobStore`] for its data blobs.
//!
//! Opening reads the manifest and the bootstrap layer and nothing else: data
//! blobs are read later, a chunk at a time, through the store. The bootstrap
//! layer is verified against its manifest digest, decompressed (bounded), and
//! verified again against the uncompressed digest the manifest annotates; its
//! blob table is cross-checked against the manifest so that an image that
//! needs a blob its manifest does not list is refused here, not at the first
//! read of a file.
//!
//! A `docker://` reference may also name an ordinary image: when its
//! manifest (for the platform chosen) is not a Skiff image, its referrers
//! are searched for a Skiff image attached to it (`subject` = that
//! manifest, `artifactType` [`SKIFF_ARTIFACT_TYPE`]), by the referrers API
//! or the fallback tag. Such a referrer is trusted as far as the original:
//! it is fetched by the digest the list gives, and must name as its
//! `subject` the very manifest the reference resolved to.
//!
//! With a [`BootstrapCache`] (what `skiff mount` passes), a bootstrap
//! verified once is kept uncompressed on local disk and mapped on the next
//! open of the same image: no fetch, no decompression, only the checksums
//! the parser verifies.

use std::io::Read;
use std::sync::Arc;

use serde_json::Value;
use skiff_format::blocks::has_block_crcs;
use skiff_format::{BlockMarks, Bootstrap, Digest};

use crate::bootcache::{BootstrapBytes, BootstrapCache};
use crate::client::RegistryClient;
use crate::config::RegistryConfig;
use crate::media::{
    ANNOTATION_BOOTSTRAP_DIGEST, SKIFF_ARTIFACT_TYPE, SKIFF_BOOTSTRAP as MEDIA_BOOTSTRAP,
};
use crate::platform::Platform;
use crate::referrers::{Referrer, ReferrersVia};
use crate::remote::FetchedManifest;
use crate::store::RegistryBlobStore;
use crate::{BlobStore, ImageRef, LocalBlobStore, OciLayout, RegistryError};

/// Largest bootstrap accepted (uncompressed): far above any real image, low
/// enough that a hostile layer cannot exhaust memory.
pub const MAX_BOOTSTRAP_SIZE: u64 = 4 << 30;

/// An opened Skiff image.
pub struct SkiffImage {
    /// The reference it was opened by.
    pub reference: String,
    /// Digest of its manifest.
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: Value,
    /// The manifest as its digest covers it (for [`open_image_pinned`]).
    pub manifest_bytes: Vec<u8>,
    /// The bootstrap, uncompressed and verified: in memory, or mapped from
    /// the bootstrap cache.
    pub bootstrap: BootstrapBytes,
    /// Digest of the bootstrap layer (compressed, as the manifest lists it).
    pub bootstrap_layer: Digest,
    /// Where the data blobs are read from.
    pub store: Arc<dyn BlobStore>,
    /// The same store when it is a registry (`docker://`), for its
    /// [`stats`](RegistryBlobStore::stats); `None` for local images.
    pub registry_store: Option<Arc<RegistryBlobStore>>,
    /// When the reference named an ordinary image and this Skiff image was
    /// found among its referrers: the original manifest's digest.
    pub subject: Option<Digest>,
}

fn invalid(reference: &str, message: impl std::fmt::Display) -> RegistryError {
    RegistryError::Invalid(format!("{reference}: {message}"))
}

/// Opens a Skiff image (`oci:DIR[:TAG]` or `docker://REF`). Registries are
/// reached with the configuration of [`RegistryConfig::from_env`].
pub fn open_image(reference: &ImageRef) -> Result<SkiffImage, RegistryError> {
    match reference {
        ImageRef::Docker(_) => open_image_with(reference, &RegistryConfig::from_env()?),
        _ => open_image_with(reference, &RegistryConfig::default()),
    }
}

/// [`open_image`] with an explicit registry configuration.
///
/// For `docker://`, only the manifest (through an index for the host
/// platform, if the reference names one) and the bootstrap layer are
/// fetched; data blobs are read later through
/// [`SkiffImage::store`], a [`RegistryBlobStore`] that knows their sizes
/// from the manifest.
pub fn open_image_with(
    reference: &ImageRef,
    config: &RegistryConfig,
) -> Result<SkiffImage, RegistryError> {
    open_image_cached(reference, config, None)
}

/// [`open_image_with`], taking the bootstrap from `cache` when it holds it
/// and storing it there otherwise (a failure to store is logged, not fatal).
pub fn open_image_cached(
    reference: &ImageRef,
    config: &RegistryConfig,
    cache: Option<&BootstrapCache>,
) -> Result<SkiffImage, RegistryError> {
    open(reference, config, None, cache, &Platform::host())
}

/// [`open_image_cached`] for `platform` (default: the host's) when the
/// reference names a multi-platform index.
pub fn open_image_for(
    reference: &ImageRef,
    config: &RegistryConfig,
    platform: Option<&Platform>,
    cache: Option<&BootstrapCache>,
) -> Result<SkiffImage, RegistryError> {
    let host = Platform::host();
    open(reference, config, None, cache, platform.unwrap_or(&host))
}

/// Opens a `docker://` or `oci:` image from a manifest fetched before
/// (`manifest_bytes`, whose SHA-256 must be `manifest_digest`), without
/// resolving the reference again: what a FUSE worker taking over a live
/// mount uses, so that a registry that is down at that moment does not stop
/// it. The bootstrap comes from `cache` when it holds it, as in
/// [`open_image_cached`].
pub fn open_image_pinned(
    reference: &ImageRef,
    config: &RegistryConfig,
    manifest_digest: Digest,
    manifest_bytes: &[u8],
    cache: Option<&BootstrapCache>,
) -> Result<SkiffImage, RegistryError> {
    if Digest::of(manifest_bytes) != manifest_digest {
        return Err(invalid(
            &reference.to_string(),
            format!("the saved manifest does not match its digest {manifest_digest}"),
        ));
    }
    open(
        reference,
        config,
        Some((manifest_digest, manifest_bytes)),
        cache,
        &Platform::host(),
    )
}

/// Opens `reference` with its manifest: `pinned`, or resolved now (a tag of
/// a layout, or a registry reference through an index for the host).
fn open(
    reference: &ImageRef,
    config: &RegistryConfig,
    pinned: Option<(Digest, &[u8])>,
    cache: Option<&BootstrapCache>,
    platform: &Platform,
) -> Result<SkiffImage, RegistryError> {
    let name = reference.to_string();
    match reference {
        ImageRef::Oci { dir, tag } => {
            let layout = OciLayout::open(dir)?;
            let (manifest_digest, manifest_bytes) = match pinned {
                Some((d, b)) => (d, b.to_vec()),
                None => layout.resolve_for(tag.as_deref(), platform)?,
            };
            let store: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::new(dir)?);
            finish_open(
                name,
                manifest_digest,
                &manifest_bytes,
                |digest, _size| layout.read_blob(digest),
                store,
                None,
                cache,
            )
        }
        ImageRef::Docker(d) => {
            let client = RegistryClient::new(d, config)?;
            let mut subject = None;
            let (manifest_digest, manifest_bytes) = match pinned {
                Some((d, b)) => (d, b.to_vec()),
                None => {
                    let m = client.resolve_manifest(d, platform)?;
                    if is_skiff_manifest(&m.bytes) {
                        (m.digest, m.bytes)
                    } else {
                        let (referrers, via) = client.referrers(&m.digest)?;
                        let Some(found) = find_skiff_referrer(&client, &m.digest, &referrers)?
                        else {
                            return Err(RegistryError::NotFound(format!(
                                "{name}: manifest {} is not a Skiff image and has no Skiff \
                                 referrer (looked up through {via}; {} other referrers); \
                                 convert it with `skiff convert {name} docker://...`",
                                m.digest,
                                referrers.len()
                            )));
                        };
                        tracing::info!(
                            "{name}: mounting Skiff image {}, a referrer of {} (found through {via})",
                            found.digest,
                            m.digest
                        );
                        subject = Some(m.digest);
                        (found.digest, found.bytes)
                    }
                }
            };
            let remote = Arc::new(RegistryBlobStore::from_client(client.clone()));
            let store: Arc<dyn BlobStore> = remote.clone();
            let mut image = finish_open(
                name,
                manifest_digest,
                &manifest_bytes,
                |digest, size| client.fetch_blob(digest, size, MAX_BOOTSTRAP_SIZE),
                store,
                Some(remote),
                cache,
            )?;
            image.subject = subject;
            Ok(image)
        }
        ImageRef::DockerArchive { .. } => Err(invalid(
            &name,
            "Skiff images are opened from oci:DIR[:TAG] or docker://REF, not from docker-archive:",
        )),
    }
}

fn finish_open(
    name: String,
    manifest_digest: Digest,
    manifest_bytes: &[u8],
    read_blob: impl FnOnce(&Digest, Option<u64>) -> Result<Vec<u8>, RegistryError>,
    store: Arc<dyn BlobStore>,
    registry_store: Option<Arc<RegistryBlobStore>>,
    cache: Option<&BootstrapCache>,
) -> Result<SkiffImage, RegistryError> {
    let manifest: Value = serde_json::from_slice(manifest_bytes)
        .map_err(|e| invalid(&name, format!("manifest is not JSON: {e}")))?;
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(&name, "manifest has no layers array"))?;
    let mut data_blobs = Vec::new();
    let mut sizes = Vec::new();
    let mut bootstrap_layer = None;
    for layer in layers {
        let media = layer.get("mediaType").and_then(Value::as_str).unwrap_or("");
        let digest: Digest = layer
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&name, "a layer has no digest"))?
            .parse()
            .map_err(|e| invalid(&name, format!("a layer digest: {e}")))?;
        let size = layer.get("size").and_then(Value::as_u64);
        if let Some(s) = size {
            sizes.push((digest, s));
        }
        if media == MEDIA_BOOTSTRAP {
            if bootstrap_layer.is_some() {
                return Err(invalid(&name, "manifest has two bootstrap layers"));
            }
            bootstrap_layer = Some((digest, size, layer));
        } else {
            data_blobs.push(digest);
        }
    }
    let Some((bootstrap_layer_digest, bootstrap_size, layer)) = bootstrap_layer else {
        return Err(invalid(
            &name,
            format!("not a Skiff image: no layer of media type {MEDIA_BOOTSTRAP} (convert it with `skiff convert` first)"),
        ));
    };
    if let Some(remote) = &registry_store {
        remote.add_known_sizes(sizes);
    }
    let expected = layer
        .get("annotations")
        .and_then(|a| a.get(ANNOTATION_BOOTSTRAP_DIGEST))
        .and_then(Value::as_str);
    // Opened on either path to check the blobs it names against the
    // manifest. A cached copy is opened lazily (header, table and the
    // blocks read here; the mount checks the rest as it reads it): one that
    // fails is damaged, removed and fetched again.
    let cached = cache.and_then(|c| {
        let mapped = c.get(&bootstrap_layer_digest)?;
        // The map comes advised for random access (a lazy open reads a few
        // pages; the mount calls `read_ahead` once it serves); an older
        // bootstrap is checked whole, so read it in runs.
        if !has_block_crcs(&mapped) {
            let _ = mapped.advise(memmap2::Advice::Normal);
        }
        let marks = BlockMarks::for_len(mapped.len()).with_hint(crate::bootcache::will_need);
        let blobs = match Bootstrap::parse_lazy(&mapped, &marks) {
            Ok(parsed) => check_blobs(&name, &parsed, &data_blobs),
            Err(e) => {
                tracing::warn!("cached bootstrap of {bootstrap_layer_digest}: {e}");
                c.discard(&bootstrap_layer_digest);
                return None;
            }
        };
        tracing::debug!("bootstrap {bootstrap_layer_digest} mapped from the cache");
        Some(blobs.map(|()| BootstrapBytes::Mapped(mapped)))
    });
    let bootstrap = match cached {
        Some(b) => b?,
        None => {
            let bootstrap = fetch_bootstrap(
                &name,
                read_blob(&bootstrap_layer_digest, bootstrap_size)?,
                expected,
            )?;
            let parsed = Bootstrap::parse(&bootstrap)
                .map_err(|e| invalid(&name, format!("bootstrap: {e}")))?;
            check_blobs(&name, &parsed, &data_blobs)?;
            match cache.map(|c| c.put(&bootstrap_layer_digest, &bootstrap)) {
                Some(Ok(mapped)) => BootstrapBytes::Mapped(mapped),
                Some(Err(e)) => {
                    tracing::warn!("bootstrap cache: {e}; keeping the bootstrap in memory");
                    BootstrapBytes::Owned(bootstrap)
                }
                None => BootstrapBytes::Owned(bootstrap),
            }
        }
    };
    Ok(SkiffImage {
        reference: name,
        manifest_digest,
        manifest,
        manifest_bytes: manifest_bytes.to_vec(),
        bootstrap,
        bootstrap_layer: bootstrap_layer_digest,
        store,
        registry_store,
        subject: None,
    })
}

/// Whether a manifest is a Skiff image: it has a bootstrap layer.
pub fn is_skiff_manifest(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("layers").and_then(Value::as_array).cloned())
        .is_some_and(|layers| {
            layers
                .iter()
                .any(|l| l.get("mediaType").and_then(Value::as_str) == Some(MEDIA_BOOTSTRAP))
        })
}

/// Whether `bytes` is a Skiff image manifest attached to `subject`: Skiff's
/// `artifactType`, `subject.digest` equal to `subject`, a bootstrap layer.
/// `Err` says why not.
pub fn check_skiff_referrer(bytes: &[u8], subject: &Digest) -> Result<(), String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let artifact = v.get("artifactType").and_then(Value::as_str);
    if artifact != Some(SKIFF_ARTIFACT_TYPE) {
        return Err(format!(
            "its artifactType is {artifact:?}, not {SKIFF_ARTIFACT_TYPE}"
        ));
    }
    let named = v
        .get("subject")
        .and_then(|s| s.get("digest"))
        .and_then(Value::as_str);
    if named != Some(subject.oci().as_str()) {
        return Err(format!(
            "its subject is {named:?}, not the manifest resolved ({subject})"
        ));
    }
    if !is_skiff_manifest(bytes) {
        return Err("it has no Skiff bootstrap layer".into());
    }
    Ok(())
}

/// The Skiff referrer to mount among `referrers` of `subject`: the first
/// one listed with Skiff's `artifactType` whose manifest (fetched by its
/// digest, so verified) passes [`check_skiff_referrer`]. Others are
/// skipped with a warning.
pub fn find_skiff_referrer(
    client: &RegistryClient,
    subject: &Digest,
    referrers: &[Referrer],
) -> Result<Option<FetchedManifest>, RegistryError> {
    for r in referrers
        .iter()
        .filter(|r| r.artifact_type.as_deref() == Some(SKIFF_ARTIFACT_TYPE))
    {
        let m = match client.fetch_manifest(&r.digest.oci(), Some(r.size)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("Skiff referrer {} of {subject}: {e}", r.digest);
                continue;
            }
        };
        match check_skiff_referrer(&m.bytes, subject) {
            Ok(()) => return Ok(Some(m)),
            Err(why) => tracing::warn!("Skiff referrer {} of {subject}: {why}", r.digest),
        }
    }
    Ok(None)
}

/// What a registry says about an image reference: the manifest it resolves
/// to for a platform, whether that is a Skiff image, and its referrers
/// (`skiff inspect` of an ordinary reference).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OriginalImage {
    /// The manifest the reference resolved to.
    pub manifest_digest: Digest,
    /// Whether that manifest is a Skiff image itself.
    pub is_skiff: bool,
    /// Its referrers.
    pub referrers: Vec<Referrer>,
    /// How they were listed.
    pub via: ReferrersVia,
    /// The Skiff referrer Skiff would mount, if any.
    pub skiff_referrer: Option<Digest>,
}

/// Resolves a `docker://` reference for `platform` and lists the
/// referrers of the manifest it names.
pub fn describe_original(
    reference: &crate::DockerRef,
    config: &RegistryConfig,
    platform: Option<&Platform>,
) -> Result<OriginalImage, RegistryError> {
    let host = Platform::host();
    let client = RegistryClient::new(reference, config)?;
    let m = client.resolve_manifest(reference, platform.unwrap_or(&host))?;
    let (referrers, via) = client.referrers(&m.digest)?;
    let chosen = find_skiff_referrer(&client, &m.digest, &referrers)?;
    Ok(OriginalImage {
        manifest_digest: m.digest,
        is_skiff: is_skiff_manifest(&m.bytes),
        referrers,
        via,
        skiff_referrer: chosen.map(|m| m.digest),
    })
}

/// Refuses a bootstrap that needs a data blob the manifest does not list.
fn check_blobs(
    name: &str,
    parsed: &Bootstrap<'_>,
    data_blobs: &[Digest],
) -> Result<(), RegistryError> {
    for i in 0..parsed.blob_count() {
        let blob = parsed
            .blob(i)
            .map_err(|e| invalid(name, format!("bootstrap: {e}")))?;
        if !data_blobs.contains(&blob.digest) {
            return Err(invalid(
                name,
                format!(
                    "the bootstrap needs blob {} that the manifest does not list",
                    blob.digest
                ),
            ));
        }
    }
    Ok(())
}

/// Decompresses a verified bootstrap layer (bounded) and checks it against
/// the uncompressed digest the manifest annotates, if it does.
fn fetch_bootstrap(
    name: &str,
    compressed: Vec<u8>,
    expected: Option<&str>,
) -> Result<Vec<u8>, RegistryError> {
    let mut bootstrap = Vec::new();
    zstd::stream::read::Decoder::new(compressed.as_slice())
        .map_err(|e| invalid(name, format!("bootstrap layer: {e}")))?
        .take(MAX_BOOTSTRAP_SIZE + 1)
        .read_to_end(&mut bootstrap)
        .map_err(|e| invalid(name, format!("bootstrap layer is not valid zstd: {e}")))?;
    if bootstrap.len() as u64 > MAX_BOOTSTRAP_SIZE {
        return Err(invalid(name, "bootstrap is larger than 4 GiB"));
    }
    if let Some(expected) = expected {
        let digest = Digest::of(&bootstrap);
        if expected != digest.to_string() {
            return Err(invalid(
                name,
                format!("bootstrap decompresses to {digest}, but the manifest says {expected}"),
            ));
        }
    }
    Ok(bootstrap)
}
