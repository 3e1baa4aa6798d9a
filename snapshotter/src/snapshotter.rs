//! [`Snapshotter`]: containerd's snapshot semantics over the metadata
//! [`Store`], overlay and bind mounts, and the remote Skiff snapshots.
//!
//! Directories: `ROOT/snapshots/ID/fs` holds a snapshot's files (the upper
//! directory of an active one), `ROOT/snapshots/ID/work` overlay's work
//! directory. A remote snapshot has an empty `fs`: a data-blob layer adds
//! nothing of its own, and a bootstrap layer stands for the image's FUSE
//! mount, which holds the whole merged tree. So the lower directories of a
//! snapshot are its ancestors' `fs` directories, top-most first, up to the
//! first Skiff image in the chain, whose mount directory ends the list.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex;

use crate::daemon::{Daemons, Health};
use crate::filter::{Fields, Filters};
use crate::labels::LayerLabels;
use crate::resolver::{LayerRole, Resolve, Resolved, SkiffImageInfo};
use crate::store::{ImageMount, Kind, Remote, Snapshot, Store};
use crate::Error;

/// How long the answer "not a Skiff image" is remembered.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// How long a resolved Skiff image is remembered.
const POSITIVE_TTL: Duration = Duration::from_secs(600);

/// A snapshot as containerd sees it (`Stat`, `Walk`, `Update`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Its key.
    pub name: String,
    /// Its parent's key, if any.
    pub parent: Option<String>,
    /// Its kind.
    pub kind: Kind,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it was created.
    pub created: SystemTime,
    /// When it was last changed.
    pub updated: SystemTime,
}

/// A mount for containerd (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `overlay` or `bind`.
    pub kind: String,
    /// The source.
    pub source: String,
    /// fstab-style options.
    pub options: Vec<String>,
}

/// The snapshotter: metadata, directories, image mounts.
pub struct Snapshotter {
    root: PathBuf,
    store: Mutex<Store>,
    resolver: Arc<dyn Resolve>,
    resolved: StdMutex<HashMap<String, (Instant, Resolved)>>,
    image_locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    daemons: Daemons,
    overlay_index_off: bool,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn info_of(name: &str, s: &Snapshot) -> Info {
    Info {
        name: name.to_owned(),
        parent: s.parent.clone(),
        kind: s.kind,
        labels: s.labels.clone(),
        created: s.created,
        updated: s.updated,
    }
}

fn create_dir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

impl Snapshotter {
    /// Opens the snapshotter under `root`: loads the metadata and brings
    /// every recorded image mount back (re-attaching to a live daemon,
    /// re-mounting after a dead one).
    pub async fn open(
        root: &Path,
        daemons: Daemons,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Snapshotter>, Error> {
        let root = root.to_path_buf();
        {
            let root = root.clone();
            tokio::task::spawn_blocking(move || -> Result<(), Error> {
                for d in [root.clone(), root.join("snapshots"), root.join("mounts")] {
                    create_dir(&d)?;
                }
                Ok(())
            })
            .await??;
        }
        let store = Store::open(&root)?;
        let overlay_index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        let sn = Arc::new(Snapshotter {
            root,
            store: Mutex::new(store),
            resolver,
            resolved: StdMutex::new(HashMap::new()),
            image_locks: StdMutex::new(HashMap::new()),
            daemons,
            overlay_index_off,
        });
        sn.recover().await?;
        Ok(sn)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string()).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.root
            .join("snapshots")
            .join(id.to_string())
            .join("work")
    }

    fn image_lock(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.image_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    /// Brings the recorded image mounts back after a start.
    async fn recover(&self) -> Result<(), Error> {
        let images: Vec<(String, ImageMount, bool)> = {
            let st = self.store.lock().await;
            st.data
                .images
                .iter()
                .map(|(id, m)| (id.clone(), m.clone(), st.data.image_in_use(id)))
                .collect()
        };
        for (id, record, in_use) in images {
            if !in_use {
                tracing::info!(image = %id, "releasing an image mount no snapshot uses");
                self.daemons.stop(&id, record.pid).await?;
                let mut st = self.store.lock().await;
                st.data.images.remove(&id);
                st.save()?;
                continue;
            }
            match self.daemons.check(&id, record.pid).await {
                Health::Alive => {
                    tracing::info!(image = %id, pid = ?record.pid, "re-attached to a running image mount");
                }
                Health::Dead => {
                    tracing::warn!(image = %id, "the daemon of an image mount is gone: mounting again");
                    if let Err(e) = self.ensure_mounted(&id, None).await {
                        tracing::error!(image = %id, "cannot mount again (retried on next use): {e}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes sure image `id` is mounted: re-uses a live daemon, else starts
    /// one. `image` gives the source for a first mount.
    async fn ensure_mounted(
        &self,
        id: &str,
        image: Option<(&SkiffImageInfo, &str)>,
    ) -> Result<(), Error> {
        let lock = self.image_lock(id);
        let _guard = lock.lock().await;
        let record = self.store.lock().await.data.images.get(id).cloned();
        if let Some(r) = &record {
            if self.daemons.check(id, r.pid).await == Health::Alive {
                return Ok(());
            }
        }
        let (source, reference, created, bootstrap) = match (&record, image) {
            (Some(r), info) => (
                r.source.clone(),
                r.reference.clone(),
                r.created,
                r.bootstrap
                    .clone()
                    .or_else(|| info.map(|(i, _)| i.bootstrap.clone())),
            ),
            (None, Some((info, reference))) => (
                info.source.clone(),
                reference.to_owned(),
                now(),
                Some(info.bootstrap.clone()),
            ),
            (None, None) => return Err(Error::Internal(format!("image {id} has no mount record"))),
        };
        let pid = self.daemons.start(id, &source).await?;
        let mut st = self.store.lock().await;
        st.data.images.insert(
            id.to_owned(),
            ImageMount {
                source,
                reference,
                pid: Some(pid),
                created,
                bootstrap,
            },
        );
        st.save()
    }

    /// Resolves a layer's image (cached; blocking work off the runtime).
    async fn resolve(&self, labels: &LayerLabels) -> Result<Resolved, Error> {
        let key = labels.image_ref.clone();
        {
            let cache = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, r)) = cache.get(&key) {
                let fresh = match r {
                    Resolved::NotSkiff => at.elapsed() < NEGATIVE_TTL,
                    // A layer the cached manifest lacks: the tag moved.
                    Resolved::Skiff(info) => {
                        at.elapsed() < POSITIVE_TTL && info.role(&labels.layer_digest).is_some()
                    }
                };
                if fresh {
                    return Ok(r.clone());
                }
            }
        }
        let resolver = self.resolver.clone();
        let image_ref = key.clone();
        let r = tokio::task::spawn_blocking(move || resolver.resolve(&image_ref)).await??;
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (Instant::now(), r.clone()));
        Ok(r)
    }

    /// The remote path of `Prepare`: `Ok(None)` when the layer is not a
    /// Skiff layer (an ordinary snapshot follows), else the error to answer
    /// (`AlreadyExists` when the layer's snapshot is in place).
    async fn prepare_remote(
        &self,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<Error>, Error> {
        let Some(layer) = LayerLabels::parse(labels) else {
            return Ok(None);
        };
        let exists = |target: &str| Error::AlreadyExists(format!("target snapshot {target:?}"));
        {
            let st = self.store.lock().await;
            if let Some(s) = st.data.snapshots.get(&layer.target) {
                if s.kind == Kind::Committed && s.remote.is_some() {
                    return Ok(Some(exists(&layer.target)));
                }
            }
        }
        let info = match self.resolve(&layer).await {
            Ok(Resolved::Skiff(info)) => info,
            Ok(Resolved::NotSkiff) => return Ok(None),
            Err(e) if layer.hint.is_some() => return Err(e),
            Err(e) => {
                tracing::warn!(
                    image = %layer.image_ref,
                    "cannot resolve the image; containerd unpacks the layer: {e}"
                );
                return Ok(None);
            }
        };
        // A Skiff image found as a referrer stands only for the manifest
        // it names: when the client says which manifest it pulled (CRI),
        // that must be the one the reference resolved to here.
        if let (Some(pulled), Some(_)) = (&layer.manifest_digest, &info.original_layers) {
            if *pulled != info.resolved {
                tracing::warn!(
                    image = %layer.image_ref,
                    "containerd pulled manifest {pulled}, the reference resolves to {}; \
                     containerd unpacks the layer",
                    info.resolved
                );
                return Ok(None);
            }
        }
        let Some(role) = info.role(&layer.layer_digest) else {
            tracing::warn!(
                image = %layer.image_ref,
                layer = %layer.layer_digest,
                "the layer is not in the image's manifest; containerd unpacks it"
            );
            return Ok(None);
        };
        if role == LayerRole::Bootstrap {
            self.ensure_mounted(&info.id, Some((&info, &layer.image_ref)))
                .await?;
        }
        let remote = match role {
            LayerRole::Blob => Remote::Blob {
                image: info.id.clone(),
            },
            LayerRole::Bootstrap => Remote::Image {
                image: info.id.clone(),
            },
        };
        let mut st = self.store.lock().await;
        if st.data.snapshots.contains_key(&layer.target) {
            return Ok(Some(exists(&layer.target)));
        }
        check_parent(&st, parent)?;
        let id = st.data.next_id;
        create_dir(&self.fs_dir(id))?;
        st.data.next_id += 1;
        let t = now();
        st.data.snapshots.insert(
            layer.target.clone(),
            Snapshot {
                id,
                kind: Kind::Committed,
                parent: parent.map(str::to_owned),
                labels: labels.clone(),
                created: t,
                updated: t,
                usage: Some((0, 0)),
                remote: Some(remote),
            },
        );
        st.save()?;
        tracing::info!(
            target = %layer.target,
            image = %layer.image_ref,
            role = ?role,
            "remote snapshot committed"
        );
        Ok(Some(exists(&layer.target)))
    }

    /// `Prepare` (writable) or `View` (read-only): a new snapshot on top of
    /// the committed `parent`.
    pub async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("the snapshot key is empty".into()));
        }
        let parent = Some(parent).filter(|p| !p.is_empty());
        if kind == Kind::Active {
            if let Some(answer) = self.prepare_remote(parent, &labels).await? {
                return Err(answer);
            }
        }
        let (id, image) = {
            let mut st = self.store.lock().await;
            if st.data.snapshots.contains_key(key) {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            check_parent(&st, parent)?;
            let id = st.data.next_id;
            create_dir(&self.fs_dir(id))?;
            if kind == Kind::Active {
                create_dir(&self.work_dir(id))?;
            }
            st.data.next_id += 1;
            let t = now();
            st.data.snapshots.insert(
                key.to_owned(),
                Snapshot {
                    id,
                    kind,
                    parent: parent.map(str::to_owned),
                    labels,
                    created: t,
                    updated: t,
                    usage: None,
                    remote: None,
                },
            );
            st.save()?;
            let (_, image) = self.lowers(&st, parent)?;
            (id, image)
        };
        if let Some(image) = image {
            // A container on a Skiff image: its mount must serve.
            if let Err(e) = self.ensure_mounted(&image, None).await {
                let _ = self.remove(key).await;
                return Err(e);
            }
        }
        tracing::debug!(key, id, ?kind, "snapshot created");
        self.mounts(key).await
    }

    /// The lower directories above `parent` (top-most first) and the Skiff
    /// image that ends them, if any.
    fn lowers(
        &self,
        st: &Store,
        parent: Option<&str>,
    ) -> Result<(Vec<PathBuf>, Option<String>), Error> {
        let mut dirs = Vec::new();
        let mut cur = parent;
        let mut seen = BTreeSet::new();
        while let Some(key) = cur {
            if !seen.insert(key) {
                return Err(Error::Internal(format!(
                    "the parents of {key:?} form a cycle"
                )));
            }
            let s = st
                .data
                .snapshots
                .get(key)
                .ok_or_else(|| Error::NotFound(format!("parent snapshot {key:?}")))?;
            match &s.remote {
                Some(Remote::Image { image }) => {
                    dirs.push(self.daemons.mount_dir(image));
                    return Ok((dirs, Some(image.clone())));
                }
                Some(Remote::Blob { .. }) => {}
                None => dirs.push(self.fs_dir(s.id)),
            }
            cur = s.parent.as_deref();
        }
        Ok((dirs, None))
    }

    /// `Mounts`: how to mount an active snapshot or a view.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let st = self.store.lock().await;
        let s = st
            .data
            .snapshots
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        let (lowers, _) = self.lowers(&st, s.parent.as_deref())?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let lowerdir = || {
            let l: Vec<String> = lowers.iter().map(|p| path(p)).collect();
            format!("lowerdir={}", l.join(":"))
        };
        let bind = |dir: &Path, mode: &str| Mount {
            kind: "bind".into(),
            source: path(dir),
            options: vec![mode.into(), "rbind".into()],
        };
        let mut overlay_options = Vec::new();
        if self.overlay_index_off {
            overlay_options.push("index=off".to_owned());
        }
        let mounts = match s.kind {
            Kind::Committed => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: only active snapshots and views have mounts"
                )))
            }
            Kind::Active if lowers.is_empty() => bind(&self.fs_dir(s.id), "rw"),
            Kind::Active => {
                overlay_options.push(format!("workdir={}", path(&self.work_dir(s.id))));
                overlay_options.push(format!("upperdir={}", path(&self.fs_dir(s.id))));
                overlay_options.push(lowerdir());
                Mount {
                    kind: "overlay".into(),
                    source: "overlay".into(),
                    options: overlay_options,
                }
            }
            Kind::View => match lowers.as_slice() {
                [] => bind(&self.fs_dir(s.id), "ro"),
                [one] => bind(one, "ro"),
                _ => {
                    overlay_options.push(lowerdir());
                    Mount {
                        kind: "overlay".into(),
                        source: "overlay".into(),
                        options: overlay_options,
                    }
                }
            },
        };
        Ok(vec![mounts])
    }

    /// `Commit`: the active snapshot `key` becomes the committed `name`.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("the snapshot name is empty".into()));
        }
        let mut st = self.store.lock().await;
        let s = st
            .data
            .snapshots
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        if s.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is {}, not active",
                s.kind.as_str()
            )));
        }
        if st.data.snapshots.contains_key(name) {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let dir = self.fs_dir(s.id);
        let usage = tokio::task::spawn_blocking(move || disk_usage(&dir)).await??;
        let Some(mut s) = st.data.snapshots.remove(key) else {
            return Err(Error::NotFound(format!("snapshot {key:?}")));
        };
        s.kind = Kind::Committed;
        s.labels = labels;
        s.updated = now();
        s.usage = Some(usage);
        let id = s.id;
        st.data.snapshots.insert(name.to_owned(), s);
        st.save()?;
        drop(st);
        // The work directory is of no use any more.
        let work = self.work_dir(id);
        let _ = tokio::task::spawn_blocking(move || fs::remove_dir_all(work)).await;
        tracing::debug!(key, name, "snapshot committed");
        Ok(())
    }

    /// `Remove`: a snapshot without children. Removing the last snapshot of
    /// a Skiff image releases the image's mount.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        let (s, release) = {
            let mut st = self.store.lock().await;
            if !st.data.snapshots.contains_key(key) {
                return Err(Error::NotFound(format!("snapshot {key:?}")));
            }
            if let Some(child) = st.data.children(key).next() {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has a child ({child:?}): remove it first"
                )));
            }
            let Some(s) = st.data.snapshots.remove(key) else {
                return Err(Error::NotFound(format!("snapshot {key:?}")));
            };
            let release = match &s.remote {
                Some(Remote::Image { image }) if !st.data.image_in_use(image) => {
                    st.data.images.remove(image).map(|m| {
                        // The bootstraps of the images still mounted: their
                        // chunks stay in the node's cache.
                        let kept: Vec<String> = st
                            .data
                            .images
                            .values()
                            .filter_map(|m| m.bootstrap.clone())
                            .collect();
                        (image.clone(), m.pid, m.bootstrap, kept)
                    })
                }
                _ => None,
            };
            st.save()?;
            (s, release)
        };
        let dir = self.root.join("snapshots").join(s.id.to_string());
        tokio::task::spawn_blocking(move || match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&dir, e)),
            _ => Ok(()),
        })
        .await??;
        if let Some((image, pid, bootstrap, kept)) = release {
            let lock = self.image_lock(&image);
            let _guard = lock.lock().await;
            tracing::info!(image = %image, "last snapshot of the image removed: unmounting");
            self.daemons.stop(&image, pid).await?;
            if let Some(bootstrap) = bootstrap {
                self.release_cache(&image, &bootstrap, &kept).await;
            }
        }
        tracing::debug!(key, "snapshot removed");
        Ok(())
    }

    /// Deletes what a removed image holds in the node's cache (its chunks
    /// that no image still mounted names, its bootstrap), so the space comes
    /// back when containerd (kubelet's image GC) removes it. A failure is
    /// logged: the watermark evicts those files later anyway.
    async fn release_cache(&self, image: &str, bootstrap: &str, kept: &[String]) {
        let dir = self.daemons.cache_dir();
        let parse = |d: &str| d.parse::<skiff_registry::Digest>().ok();
        let Some(removed) = parse(bootstrap) else {
            return;
        };
        let kept: Vec<_> = kept.iter().filter_map(|k| parse(k)).collect();
        let result = tokio::task::spawn_blocking(move || {
            skiff_fusefs::reclaim::release_image(&dir, &removed, &kept)
        })
        .await;
        match result {
            Ok(Ok(freed)) => tracing::info!(
                image,
                files = freed.entries,
                bytes = freed.bytes,
                "released the image's entries in the node cache"
            ),
            Ok(Err(e)) => tracing::warn!(image, "releasing the image's cache entries: {e}"),
            Err(e) => tracing::warn!(image, "releasing the image's cache entries: {e}"),
        }
    }

    /// `Stat`.
    pub async fn stat(&self, key: &str) -> Result<Info, Error> {
        let st = self.store.lock().await;
        st.data
            .snapshots
            .get(key)
            .map(|s| info_of(key, s))
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))
    }

    /// `Update`: only labels change. `paths` (the field mask) are `labels`
    /// or `labels.KEY`; none replaces all labels.
    pub async fn update(&self, info: Info, paths: &[String]) -> Result<Info, Error> {
        let mut st = self.store.lock().await;
        let s = st
            .data
            .snapshots
            .get_mut(&info.name)
            .ok_or_else(|| Error::NotFound(format!("snapshot {:?}", info.name)))?;
        if paths.is_empty() {
            s.labels = info.labels;
        } else {
            let mut labels = s.labels.clone();
            for p in paths {
                if p == "labels" {
                    labels = info.labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => labels.insert(k.to_owned(), v.clone()),
                        None => labels.remove(k),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {:?}: only labels can change",
                        info.name
                    )));
                }
            }
            s.labels = labels;
        }
        s.updated = now();
        let out = info_of(&info.name, s);
        st.save()?;
        Ok(out)
    }

    /// `Usage`: bytes and inodes a snapshot takes on disk. The snapshot
    /// that stands for a Skiff image's mount reports what the image holds
    /// in the node's cache now (its bootstrap and the chunk files it names,
    /// see `skiff_fusefs::reclaim`); its data-blob layers hold nothing.
    pub async fn usage(&self, key: &str) -> Result<(u64, u64), Error> {
        let (kind, id, usage, bootstrap) = {
            let st = self.store.lock().await;
            let s = st
                .data
                .snapshots
                .get(key)
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
            let bootstrap = match &s.remote {
                Some(Remote::Image { image }) => {
                    st.data.images.get(image).and_then(|m| m.bootstrap.clone())
                }
                _ => None,
            };
            (s.kind, s.id, s.usage, bootstrap)
        };
        let own = match (kind, usage) {
            (Kind::Committed, Some(u)) => u,
            _ => {
                let dir = self.fs_dir(id);
                tokio::task::spawn_blocking(move || disk_usage(&dir)).await??
            }
        };
        let Some(layer) = bootstrap.and_then(|b| b.parse::<skiff_registry::Digest>().ok()) else {
            return Ok(own);
        };
        let dir = self.daemons.cache_dir();
        let cached =
            tokio::task::spawn_blocking(move || skiff_fusefs::reclaim::image_usage(&dir, &layer))
                .await?;
        match cached {
            Ok(Some(u)) => Ok((own.0 + u.bytes(), own.1 + u.inodes())),
            Ok(None) => Ok(own),
            Err(e) => {
                tracing::warn!(key, "usage of the image in the node cache: {e}");
                Ok(own)
            }
        }
    }

    /// `Walk` (the `List` RPC): the snapshots matching any of `filters`.
    pub async fn walk(&self, filters: &[String]) -> Result<Vec<Info>, Error> {
        let filters = Filters::parse(filters)?;
        let st = self.store.lock().await;
        Ok(st
            .data
            .snapshots
            .iter()
            .filter(|(name, s)| {
                filters.matches(&Fields {
                    name,
                    parent: s.parent.as_deref().unwrap_or(""),
                    kind: s.kind.as_str(),
                    labels: &s.labels,
                })
            })
            .map(|(name, s)| info_of(name, s))
            .collect())
    }

    /// `Cleanup`: removes snapshot directories and image mount directories
    /// that no record names (left by a crash).
    pub async fn cleanup(&self) -> Result<(), Error> {
        let st = self.store.lock().await;
        let ids: BTreeSet<String> = st
            .data
            .snapshots
            .values()
            .map(|s| s.id.to_string())
            .collect();
        let images: BTreeSet<String> = st.data.images.keys().cloned().collect();
        let root = self.root.clone();
        let daemons = self.daemons.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let snapshots = root.join("snapshots");
            for entry in fs::read_dir(&snapshots).map_err(|e| Error::io(&snapshots, e))? {
                let entry = entry.map_err(|e| Error::io(&snapshots, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !ids.contains(&name) {
                    tracing::info!(dir = %entry.path().display(), "cleanup: removing an orphan snapshot directory");
                    fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                }
            }
            let mounts = root.join("mounts");
            for entry in fs::read_dir(&mounts).map_err(|e| Error::io(&mounts, e))? {
                let entry = entry.map_err(|e| Error::io(&mounts, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !images.contains(&name) {
                    let mnt = daemons.mount_dir(&name);
                    crate::daemon::detach_if_mounted(&mnt);
                    let _ = fs::remove_dir(&mnt);
                    let _ = fs::remove_file(daemons.log_file(&name));
                    let _ = fs::remove_file(entry.path().join("pid"));
                    let _ = fs::remove_dir(entry.path());
                }
            }
            Ok(())
        })
        .await??;
        drop(st);
        Ok(())
    }
}

fn check_parent(st: &Store, parent: Option<&str>) -> Result<(), Error> {
    if let Some(p) = parent {
        match st.data.snapshots.get(p) {
            None => return Err(Error::NotFound(format!("parent snapshot {p:?}"))),
            Some(s) if s.kind != Kind::Committed => {
                return Err(Error::InvalidArgument(format!(
                    "parent {p:?} is {}, not a committed snapshot",
                    s.kind.as_str()
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Bytes (allocated blocks) and inodes under `dir`, hard links counted once;
/// blocking.
pub fn disk_usage(dir: &Path) -> Result<(u64, u64), Error> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = BTreeSet::new();
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let root_dev = fs::symlink_metadata(dir)
        .map_err(|e| Error::io(dir, e))?
        .dev();
    while let Some(p) = stack.pop() {
        let m = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&p, e)),
        };
        if m.dev() != root_dev || !seen.insert(m.ino()) {
            continue;
        }
        inodes += 1;
        bytes += m.blocks() * 512;
        if m.is_dir() {
            for e in fs::read_dir(&p).map_err(|e| Error::io(&p, e))? {
                stack.push(e.map_err(|e| Error::io(&p, e))?.path());
            }
        }
    }
    Ok((bytes, inodes))
}
