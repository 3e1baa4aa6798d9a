//! The persistent metadata: every snapshot and every image mount, in one
//! JSON file (`ROOT/metadata.json`) replaced atomically (write a temporary
//! file, fsync, rename, fsync the directory) after every change. A crash
//! leaves either the old or the new file, never a torn one.
//!
//! Snapshot directories (`ROOT/snapshots/ID/{fs,work}`) are created before
//! the record that names them and removed after it, so a crash can leave an
//! orphan directory (removed by `Cleanup`), never a record without its
//! directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Version of the metadata file's format.
pub const FORMAT_VERSION: u32 = 1;

/// A snapshot's kind, as in containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only view of a committed snapshot.
    View,
    /// A writable snapshot (a container's root, or a layer being unpacked).
    Active,
    /// An immutable snapshot that others can have as parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What a remote snapshot stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Remote {
    /// A data-blob layer of a Skiff image: contributes nothing of its own
    /// (its contents are served by the image's mount).
    Blob {
        /// The image (a key of [`Metadata::images`]).
        image: String,
    },
    /// The bootstrap layer of a Skiff image, the top of its chain: its
    /// lower directory is the image's FUSE mount, which holds the whole
    /// merged tree.
    Image {
        /// The image (a key of [`Metadata::images`]).
        image: String,
    },
}

impl Remote {
    /// The image the snapshot belongs to.
    pub fn image(&self) -> &str {
        match self {
            Remote::Blob { image } | Remote::Image { image } => image,
        }
    }
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Numeric ID: names the directory `ROOT/snapshots/ID`.
    pub id: u64,
    /// Its kind.
    pub kind: Kind,
    /// The parent's key (a committed snapshot), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When it was created.
    pub created: SystemTime,
    /// When it was last changed.
    pub updated: SystemTime,
    /// Disk usage measured at commit: bytes and inodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<(u64, u64)>,
    /// For a remote (Skiff) snapshot: what it stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<Remote>,
}

/// One image mount: a `skiff mount` daemon serving a Skiff image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMount {
    /// The reference the daemon mounts (pinned by digest where possible).
    pub source: String,
    /// The reference the image was asked for by (for messages).
    pub reference: String,
    /// The daemon's process ID when last seen.
    pub pid: Option<i32>,
    /// When the image was first mounted.
    pub created: SystemTime,
    /// The digest of its bootstrap layer (`sha256:HEX`): where its entries
    /// in the node's cache are found (`Usage`, release on removal).
    /// Records written before it was kept have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<String>,
}

/// The whole metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The next snapshot ID.
    pub next_id: u64,
    /// Snapshots by key (containerd's name for them).
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Image mounts by image ID (the manifest digest, `sha256-HEX`).
    pub images: BTreeMap<String, ImageMount>,
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata {
            version: FORMAT_VERSION,
            next_id: 1,
            snapshots: BTreeMap::new(),
            images: BTreeMap::new(),
        }
    }
}

impl Metadata {
    /// Keys of the snapshots whose parent is `key`.
    pub fn children<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.snapshots
            .iter()
            .filter(move |(_, s)| s.parent.as_deref() == Some(key))
            .map(|(k, _)| k.as_str())
    }

    /// Whether any snapshot still needs image `image`'s mount.
    pub fn image_in_use(&self, image: &str) -> bool {
        self.snapshots
            .values()
            .any(|s| matches!(&s.remote, Some(Remote::Image { image: i }) if i == image))
    }
}

/// The metadata file and its contents in memory.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// The current metadata; call [`Store::save`] after changing it.
    pub data: Metadata,
}

impl Store {
    /// The metadata file under `root`.
    pub fn file(root: &Path) -> PathBuf {
        root.join("metadata.json")
    }

    /// Opens (or starts) the metadata under `root`.
    pub fn open(root: &Path) -> Result<Store, Error> {
        let path = Store::file(root);
        let data = match fs::read(&path) {
            Ok(bytes) => {
                let data: Metadata =
                    serde_json::from_slice(&bytes).map_err(|e| Error::Metadata {
                        path: path.clone(),
                        message: format!("not valid metadata: {e}"),
                    })?;
                if data.version != FORMAT_VERSION {
                    return Err(Error::Metadata {
                        path,
                        message: format!(
                            "format version {} (this snapshotter reads {FORMAT_VERSION})",
                            data.version
                        ),
                    });
                }
                data
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Metadata::default(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        Ok(Store { path, data })
    }

    /// Writes the metadata atomically.
    pub fn save(&self) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(&self.data).map_err(|e| Error::Metadata {
            path: self.path.clone(),
            message: format!("cannot serialise: {e}"),
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let mut store = Store::open(dir.path())?;
        assert!(store.data.snapshots.is_empty());
        store.data.snapshots.insert(
            "a".into(),
            Snapshot {
                id: 1,
                kind: Kind::Committed,
                parent: None,
                labels: BTreeMap::from([("k".into(), "v".into())]),
                created: SystemTime::UNIX_EPOCH,
                updated: SystemTime::now(),
                usage: Some((3, 4)),
                remote: Some(Remote::Image { image: "i".into() }),
            },
        );
        store.data.next_id = 2;
        store.save()?;
        let again = Store::open(dir.path())?;
        assert_eq!(again.data, store.data);
        assert!(again.data.image_in_use("i"));
        assert!(!again.data.image_in_use("j"));
        Ok(())
    }

    #[test]
    fn corrupt_file_is_an_error() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        fs::write(Store::file(dir.path()), b"{").map_err(|e| Error::io("f", e))?;
        assert!(matches!(
            Store::open(dir.path()),
            Err(Error::Metadata { .. })
        ));
        Ok(())
    }
}
