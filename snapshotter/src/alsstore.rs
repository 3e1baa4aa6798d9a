//! The logic of `skiff store` behind its filesystem ([`crate::alsfs`]):
//! resolving a reference to a Skiff image (manifest and config), finding a
//! layer by its key, starting and checking an image's `skiff mount`,
//! downloading a layer's blob, counting uses and forgetting unused images,
//! with the state kept in `ROOT/store.json` ([`StoreState`]).
//!
//! Everything here blocks (registry requests, starting a daemon): it runs
//! on FUSE threads, never on a runtime thread, and reaches the runtime
//! through its handle.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_registry::credentials::lookup_containers_auth;
use skiff_registry::{Digest, DockerRef, ImageRef, Platform, RegistryClient, RegistryConfig};

use crate::als::{store_image, LayerKey, StoreImage, StoreState};
use crate::daemon::{Daemons, Health, PassedCredentials};
use crate::resolver::{classify, image_source, Resolved};
use crate::Error;

/// How long a reference that resolved to no matching layer is not asked
/// again (the layers of one pull are looked up one after the other).
const RECENT: Duration = Duration::from_secs(10);
/// Largest image config read.
const MAX_CONFIG: u64 = 4 << 20;

/// The store: its directories, state and helpers.
pub(crate) struct Store {
    pub(crate) root: PathBuf,
    pub(crate) empty: PathBuf,
    pub(crate) blobs: PathBuf,
    pub(crate) registry: RegistryConfig,
    pub(crate) daemons: Daemons,
    pub(crate) rt: tokio::runtime::Handle,
    pub(crate) state: Mutex<StoreState>,
    pub(crate) resolving: Mutex<HashMap<String, Instant>>,
    pub(crate) mounting: Mutex<()>,
    pub(crate) downloading: Mutex<()>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves data that is still consistent
    // (every change is one assignment): go on with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    fn save(&self, state: &StoreState) {
        if let Err(e) = state.save(&self.root) {
            tracing::error!("saving the store's state: {e}");
        }
    }

    /// The registry configuration and the containers-auth.json credentials
    /// (if any) for `d`.
    fn access(&self, d: &DockerRef) -> Result<(RegistryConfig, Option<PassedCredentials>), Error> {
        let mut config = self.registry.clone();
        let found = lookup_containers_auth(&d.registry, &d.repository)
            .map_err(|e| Error::Config(format!("containers-auth.json: {e}")))?;
        let passed = found.map(|credentials| {
            config.auths.insert(d.registry.clone(), credentials.clone());
            PassedCredentials {
                registry: d.registry.clone(),
                credentials,
            }
        });
        Ok((config, passed))
    }

    fn docker_ref(reference: &str) -> Result<DockerRef, Error> {
        match image_source(reference)? {
            ImageRef::Docker(d) => Ok(d),
            _ => Err(Error::Image {
                reference: reference.to_owned(),
                message: "not a registry reference".into(),
            }),
        }
    }

    /// Resolves `reference` in its registry: a Skiff image (ID and what the
    /// store keeps of it), or `None`.
    pub(crate) fn resolve(&self, reference: &str) -> Result<Option<(String, StoreImage)>, Error> {
        let d = Store::docker_ref(reference)?;
        let bad = |e: skiff_registry::RegistryError| Error::Image {
            reference: reference.to_owned(),
            message: e.to_string(),
        };
        let (config, _) = self.access(&d)?;
        let client = RegistryClient::new(&d, &config).map_err(bad)?;
        let m = client
            .resolve_manifest(&d, &Platform::host())
            .map_err(bad)?;
        let manifest: Value = serde_json::from_slice(&m.bytes).map_err(|e| Error::Image {
            reference: reference.to_owned(),
            message: format!("manifest {} is not JSON: {e}", m.digest),
        })?;
        let mut pinned = d.clone();
        pinned.tag = None;
        pinned.digest = Some(m.digest);
        let Resolved::Skiff(info) = classify(&manifest, &m.digest, format!("docker://{pinned}"))
        else {
            tracing::info!(reference, manifest = %m.digest, "not a Skiff image: left to containers/storage");
            return Ok(None);
        };
        let desc = manifest.get("config");
        let digest: Option<Digest> = desc
            .and_then(|c| c.get("digest"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        let size = desc.and_then(|c| c.get("size")).and_then(Value::as_u64);
        let Some(digest) = digest else {
            return Err(Error::Image {
                reference: reference.to_owned(),
                message: "the manifest names no sha256 config".into(),
            });
        };
        let bytes = client.fetch_blob(&digest, size, MAX_CONFIG).map_err(bad)?;
        let cfg: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Image {
            reference: reference.to_owned(),
            message: format!("config {digest} is not JSON: {e}"),
        })?;
        let image = store_image(
            reference,
            info.source.clone(),
            &manifest,
            &cfg,
            &info.bootstrap,
        )?;
        tracing::info!(
            reference,
            image = info.id,
            layers = image.layers.len(),
            "Skiff image"
        );
        Ok(Some((info.id.clone(), image)))
    }

    /// The image and layer index for `key` under `reference`: from what is
    /// known, else by resolving the reference (at most once per [`RECENT`]).
    pub(crate) fn find_layer(
        &self,
        reference: &str,
        key: &LayerKey,
    ) -> Result<Option<(String, usize)>, Error> {
        if let Some(hit) = lock(&self.state).find(reference, key) {
            return Ok(Some(hit));
        }
        let mut recent = lock(&self.resolving);
        // Another thread may have resolved it while this one waited.
        if let Some(hit) = lock(&self.state).find(reference, key) {
            return Ok(Some(hit));
        }
        if recent.get(reference).is_some_and(|t| t.elapsed() < RECENT) {
            return Ok(None);
        }
        let resolved = self.resolve(reference)?;
        recent.retain(|_, t| t.elapsed() < RECENT);
        recent.insert(reference.to_owned(), Instant::now());
        let mut state = lock(&self.state);
        if let Some((id, image)) = resolved {
            state.images.entry(id.clone()).or_insert(image);
            state
                .refs
                .entry(reference.to_owned())
                .or_default()
                .insert(id);
            self.save(&state);
        }
        Ok(state.find(reference, key))
    }

    /// The empty directory serving as `diff` of layer `index` of `image`:
    /// one per layer, because overlayfs refuses the same directory twice in
    /// one stack ("conflicting lowerdir path", `ELOOP`).
    pub(crate) fn empty_dir(&self, image: &str, index: usize) -> Result<PathBuf, Error> {
        let dir = self.empty.join(format!("{image}-{index}"));
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io(&dir, e))?;
        }
        Ok(dir)
    }

    /// The mount point of `image`, its daemon started if it is not running.
    pub(crate) fn mounted(&self, image: &str) -> Result<PathBuf, Error> {
        let _one = lock(&self.mounting);
        let (source, pid) = {
            let state = lock(&self.state);
            let img = state
                .images
                .get(image)
                .ok_or_else(|| Error::NotFound(image.to_owned()))?;
            (img.source.clone(), img.pid)
        };
        if pid.is_some() && self.rt.block_on(self.daemons.check(image, pid)) == Health::Alive {
            return Ok(self.daemons.mount_dir(image));
        }
        let d = Store::docker_ref(&source)?;
        let (_, passed) = self.access(&d)?;
        let pid = self
            .rt
            .block_on(self.daemons.start_with_credentials(image, &source, passed))?;
        let mut state = lock(&self.state);
        if let Some(img) = state.images.get_mut(image) {
            img.pid = Some(pid);
        }
        self.save(&state);
        Ok(self.daemons.mount_dir(image))
    }

    /// Where layer `index` of `image`'s blob is kept, downloaded if needed.
    pub(crate) fn blob_file(&self, image: &str, index: usize) -> Result<PathBuf, Error> {
        let (source, layer) = {
            let state = lock(&self.state);
            let img = state
                .images
                .get(image)
                .ok_or_else(|| Error::NotFound(image.to_owned()))?;
            let layer = img
                .layers
                .get(index)
                .cloned()
                .ok_or_else(|| Error::NotFound(image.to_owned()))?;
            (img.source.clone(), layer)
        };
        let digest: Digest = layer
            .digest
            .parse()
            .map_err(|_| Error::NotFound(layer.digest.clone()))?;
        let path = self.blobs.join(digest.to_hex());
        if path.is_file() {
            return Ok(path);
        }
        let _one = lock(&self.downloading);
        if path.is_file() {
            return Ok(path);
        }
        let d = Store::docker_ref(&source)?;
        let (config, _) = self.access(&d)?;
        let client = RegistryClient::new(&d, &config).map_err(|e| Error::Image {
            reference: source.clone(),
            message: e.to_string(),
        })?;
        let tmp = self.blobs.join(format!("{}.tmp", digest.to_hex()));
        let mut out = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut reader =
            client.blob_reader(digest, layer.size, format!("blob {digest} of {source}"));
        std::io::copy(&mut reader, &mut out).map_err(|e| Error::Image {
            reference: source.clone(),
            message: format!("downloading blob {digest}: {e}"),
        })?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Counts a use (`delta` 1) or a release (-1) of `image`; an image no
    /// longer used is unmounted and forgotten (on another thread).
    pub(crate) fn count(self: &Arc<Store>, image: &str, delta: i64) {
        let mut state = lock(&self.state);
        let Some(img) = state.images.get_mut(image) else {
            return;
        };
        img.uses = (img.uses + delta).max(0);
        let unused = img.uses == 0 && delta < 0;
        tracing::info!(
            image,
            uses = img.uses,
            "layer {}",
            if delta > 0 { "used" } else { "released" }
        );
        self.save(&state);
        drop(state);
        if unused {
            let store = Arc::clone(self);
            let image = image.to_owned();
            std::thread::spawn(move || store.release(&image));
        }
    }

    /// Stops the daemon of an unused image and forgets it.
    pub(crate) fn release(&self, image: &str) {
        let _one = lock(&self.mounting);
        let (pid, blobs) = {
            let state = lock(&self.state);
            match state.images.get(image) {
                Some(img) if img.uses == 0 => (img.pid, img.layers.clone()),
                _ => return,
            }
        };
        if let Err(e) = self.rt.block_on(self.daemons.stop(image, pid)) {
            tracing::warn!(image, "stopping its mount: {e}");
        }
        let mut state = lock(&self.state);
        for index in 0..blobs.len() {
            let _ = fs::remove_dir(self.empty.join(format!("{image}-{index}")));
        }
        state.forget(image);
        let still: Vec<String> = state
            .images
            .values()
            .flat_map(|i| i.layers.iter().map(|l| l.digest.clone()))
            .collect();
        self.save(&state);
        for l in blobs.iter().filter(|l| !still.contains(&l.digest)) {
            if let Ok(d) = l.digest.parse::<Digest>() {
                let _ = fs::remove_file(self.blobs.join(d.to_hex()));
            }
        }
        tracing::info!(image, "image no longer used: unmounted and forgotten");
    }
}
