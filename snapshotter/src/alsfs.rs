//! `skiff store`: the Additional Layer Store of containers/storage (podman,
//! CRI-O, buildah) served as a FUSE filesystem.
//!
//! The filesystem holds names only; no image data passes through it. For
//! `ROOT_MNT/BASE64(REF)/DIGEST/` (see [`crate::als`]) it resolves `REF` in
//! its registry (the manifest and the config, nothing else); a Skiff image
//! with a layer `DIGEST` answers with the layer's directory, any other
//! image or layer with `ENOENT`, and containers/storage then downloads it
//! as usual. The directory holds:
//! - `diff`: a symbolic link. The top layer's (the bootstrap's) points at
//!   the image's mount, a `skiff mount` daemon per image started when the
//!   link is first looked up, with the snapshotter's [`Daemons`] (its own
//!   session, a keeper holding the FUSE connection, state in
//!   `ROOT/mounts/ID/`). The data-blob layers' point at empty directories
//!   on disk, `ROOT/empty/ID-INDEX` (one per layer: overlayfs refuses a
//!   directory twice in one stack). containers/storage links its layer's `diff`
//!   to this path and the kernel follows both links when it mounts the
//!   overlay, so a running container depends on the image's daemon and on
//!   `ROOT/empty/`, never on this filesystem: restarting `skiff store`
//!   leaves containers running.
//! - `info`: the layer record as JSON ([`crate::als::StoreImage::info`]).
//! - `blob`: the layer's blob, downloaded (and verified against its digest)
//!   into `ROOT/blobs/` when first read; only `podman push`/`save` read it.
//! - `use`: creating it counts a use of the image and fails with `ENOENT`;
//!   removing the layer directory (`rmdir`) counts a release and fails with
//!   `ENOENT`, which is what containers/storage expects of a store that
//!   counts. When the count of an image falls to zero (`podman rmi`), its
//!   daemon is stopped and the image forgotten.
//!
//! Images, the references that led to them, their counts and daemons are
//! kept in `ROOT/store.json` (replaced atomically), so a restarted store
//! finds its images again, also under a tag that has moved since.
//!
//! Credentials: Skiff's registry configuration and Docker config, and
//! before them podman's containers-auth.json files
//! ([`skiff_registry::credentials::lookup_containers_auth`]); the ones
//! found there reach an image's daemon on a sealed memory file.
//!
//! FUSE threads block here on the registry (a lookup of a reference not
//! seen yet) and on starting a daemon: containers/storage waits for these
//! answers anyway, and other threads keep answering meanwhile.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyXattr, Request, SessionACL,
};

use crate::als::{LayerKey, RefPath, StoreState};
use crate::alsstore::{lock, Store};
use crate::daemon::{detach_if_mounted, Daemons};
use crate::{Config, Error};

/// How long names and attributes are cached by the kernel. Short: a layer
/// directory exists only while its image is known.
const TTL: Duration = Duration::from_secs(1);

/// What a node of the filesystem is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Node {
    Root,
    /// A reference directory (maybe only part of its base64 path).
    Ref(RefPath),
    /// Layer `index` of image `image`.
    Layer {
        image: String,
        index: usize,
    },
    Diff {
        image: String,
        index: usize,
    },
    Info {
        image: String,
        index: usize,
    },
    Blob {
        image: String,
        index: usize,
    },
}

/// Inode numbers: node `n` of the list is inode `n + 1`.
#[derive(Debug, Default)]
struct Nodes {
    list: Vec<Node>,
    index: HashMap<Node, u64>,
}

impl Nodes {
    fn ino(&mut self, node: Node) -> u64 {
        if let Some(ino) = self.index.get(&node) {
            return *ino;
        }
        self.list.push(node.clone());
        let ino = self.list.len() as u64;
        self.index.insert(node, ino);
        ino
    }
}

/// A failure answered to the kernel as `errno`, logged with its cause.
struct Fail(Errno);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        tracing::warn!("{e}");
        Fail(Errno::EIO)
    }
}

type Answer<T> = Result<T, Fail>;

/// The FUSE filesystem of the store.
pub struct StoreFs {
    store: Arc<Store>,
    nodes: Mutex<Nodes>,
    started: SystemTime,
}

impl StoreFs {
    fn node(&self, ino: INodeNo) -> Answer<Node> {
        let nodes = lock(&self.nodes);
        usize::try_from(ino.0)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| nodes.list.get(i))
            .cloned()
            .ok_or(Fail(Errno::ENOENT))
    }

    fn attr(&self, ino: u64, node: &Node) -> Answer<FileAttr> {
        let (kind, perm, size) = match node {
            Node::Root | Node::Ref(_) | Node::Layer { .. } => (FileType::Directory, 0o555, 0),
            Node::Diff { image, index } => (
                FileType::Symlink,
                0o777,
                self.diff_target(image, *index, false)?.as_os_str().len() as u64,
            ),
            Node::Info { image, index } => (
                FileType::RegularFile,
                0o444,
                self.info(image, *index)?.len() as u64,
            ),
            Node::Blob { image, index } => {
                let state = lock(&self.store.state);
                let size = state
                    .images
                    .get(image)
                    .and_then(|i| i.layers.get(*index))
                    .map(|l| l.size)
                    .ok_or(Fail(Errno::ENOENT))?;
                (FileType::RegularFile, 0o444, size)
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn info(&self, image: &str, index: usize) -> Answer<Vec<u8>> {
        let state = lock(&self.store.state);
        state
            .images
            .get(image)
            .and_then(|i| i.info(index))
            .ok_or(Fail(Errno::ENOENT))
    }

    /// Where a layer's `diff` points: the image's mount for the top layer
    /// (mounted now if `mount`), the empty directory for the others.
    fn diff_target(&self, image: &str, index: usize, mount: bool) -> Answer<PathBuf> {
        let top = lock(&self.store.state)
            .images
            .get(image)
            .map(|i| i.is_top(index))
            .ok_or(Fail(Errno::ENOENT))?;
        if !top {
            return Ok(self.store.empty_dir(image, index)?);
        }
        if mount {
            Ok(self.store.mounted(image)?)
        } else {
            Ok(self.store.daemons.mount_dir(image))
        }
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Answer<FileAttr> {
        let name = name.to_str().ok_or(Fail(Errno::ENOENT))?;
        let child = match self.node(parent)? {
            Node::Root if RefPath::is_component(name) => Node::Ref(RefPath(name.to_owned())),
            Node::Ref(path) => match LayerKey::parse(name) {
                Some(key) => {
                    let reference = path.reference().ok_or(Fail(Errno::ENOENT))?;
                    let (image, index) = self
                        .store
                        .find_layer(&reference, &key)?
                        .ok_or(Fail(Errno::ENOENT))?;
                    Node::Layer { image, index }
                }
                None if RefPath::is_component(name) => {
                    Node::Ref(path.join(name).ok_or(Fail(Errno::ENOENT))?)
                }
                None => return Err(Fail(Errno::ENOENT)),
            },
            Node::Layer { image, index } => match name {
                "diff" => {
                    // Mount now: containers/storage stats `diff` before it
                    // takes the layer, and the kernel follows the link later.
                    self.diff_target(&image, index, true)?;
                    Node::Diff { image, index }
                }
                "info" => Node::Info { image, index },
                "blob" => Node::Blob { image, index },
                _ => return Err(Fail(Errno::ENOENT)),
            },
            Node::Root => return Err(Fail(Errno::ENOENT)),
            _ => return Err(Fail(Errno::ENOTDIR)),
        };
        let ino = lock(&self.nodes).ino(child.clone());
        self.attr(ino, &child)
    }

    fn entries(&self, node: &Node) -> Answer<Vec<(Node, FileType, String)>> {
        let state = lock(&self.store.state);
        let mut out = Vec::new();
        match node {
            Node::Root => {
                for reference in state.refs.keys() {
                    let path = RefPath::of(reference);
                    if !path.0.contains('/') {
                        out.push((Node::Ref(path.clone()), FileType::Directory, path.0));
                    }
                }
            }
            Node::Ref(path) => {
                let reference = path.reference().unwrap_or_default();
                for id in state.refs.get(&reference).into_iter().flatten() {
                    for (index, l) in state
                        .images
                        .get(id)
                        .into_iter()
                        .flat_map(|i| i.layers.iter().enumerate())
                    {
                        let node = Node::Layer {
                            image: id.clone(),
                            index,
                        };
                        out.push((node, FileType::Directory, l.digest.clone()));
                    }
                }
            }
            Node::Layer { image, index } => {
                let (image, index) = (image.clone(), *index);
                out.push((
                    Node::Diff {
                        image: image.clone(),
                        index,
                    },
                    FileType::Symlink,
                    "diff".into(),
                ));
                out.push((
                    Node::Info {
                        image: image.clone(),
                        index,
                    },
                    FileType::RegularFile,
                    "info".into(),
                ));
                out.push((
                    Node::Blob { image, index },
                    FileType::RegularFile,
                    "blob".into(),
                ));
            }
            _ => return Err(Fail(Errno::ENOTDIR)),
        }
        Ok(out)
    }

    fn do_readdir(&self, ino: INodeNo, offset: u64, reply: &mut ReplyDirectory) -> Answer<()> {
        let node = self.node(ino)?;
        let entries = self.entries(&node)?;
        let mut all = vec![
            (ino.0, FileType::Directory, ".".to_owned()),
            (ino.0, FileType::Directory, "..".to_owned()),
        ];
        {
            let mut nodes = lock(&self.nodes);
            for (n, kind, name) in entries {
                all.push((nodes.ino(n), kind, name));
            }
        }
        for (i, (child, kind, name)) in all.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), i as u64 + 1, *kind, OsStr::new(name)) {
                break;
            }
        }
        Ok(())
    }

    fn do_read(&self, ino: INodeNo, offset: u64, size: u32) -> Answer<Vec<u8>> {
        match self.node(ino)? {
            Node::Info { image, index } => {
                let info = self.info(&image, index)?;
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(info.len());
                let end = start.saturating_add(size as usize).min(info.len());
                Ok(info[start..end].to_vec())
            }
            Node::Blob { image, index } => {
                let path = self.store.blob_file(&image, index)?;
                let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                let mut buf = vec![0u8; size as usize];
                let mut got = 0;
                while got < buf.len() {
                    match file.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io(&path, e).into()),
                    }
                }
                buf.truncate(got);
                Ok(buf)
            }
            Node::Root | Node::Ref(_) | Node::Layer { .. } => Err(Fail(Errno::EISDIR)),
            Node::Diff { .. } => Err(Fail(Errno::EINVAL)),
        }
    }

    /// `rmdir` of a layer directory: containers/storage releasing it.
    fn do_rmdir(&self, parent: INodeNo, name: &OsStr) -> Errno {
        if let (Ok(Node::Ref(path)), Some(key)) =
            (self.node(parent), name.to_str().and_then(LayerKey::parse))
        {
            if let Some(reference) = path.reference() {
                let hit = lock(&self.store.state).find(&reference, &key);
                if let Some((image, _)) = hit {
                    self.store.count(&image, -1);
                }
            }
        }
        Errno::ENOENT
    }

    /// Creating `use` in a layer directory: containers/storage using it.
    fn do_create(&self, parent: INodeNo, name: &OsStr) -> Errno {
        match self.node(parent) {
            Ok(Node::Layer { image, .. }) if name == "use" => {
                self.store.count(&image, 1);
                Errno::ENOENT
            }
            _ => Errno::EROFS,
        }
    }
}

impl Filesystem for StoreFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(Fail(e)) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.attr(ino.0, &n)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(Fail(e)) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = match self.node(ino) {
            Ok(Node::Diff { image, index }) => self.diff_target(&image, index, true),
            Ok(_) => Err(Fail(Errno::EINVAL)),
            Err(e) => Err(e),
        };
        match target {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(Fail(e)) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(ino, offset, size) {
            Ok(data) => reply.data(&data),
            Err(Fail(e)) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.do_readdir(ino, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(Fail(e)) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.do_rmdir(parent, name));
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    /// Nothing is ever dirty.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.do_create(parent, name));
    }
}

/// Runs `skiff store` until SIGINT or SIGTERM: serves the layer store at
/// `mountpoint` with its files under `config.root`. Image mounts are left
/// running on exit, for the containers that use them.
///
/// Call it before any other thread runs: it points the environment of the
/// mount daemons at the registry configuration, as [`crate::run`] does.
pub fn run(config: Config, mountpoint: &Path) -> Result<(), Error> {
    config.validate()?;
    let root = config.root.clone();
    for dir in [
        root.clone(),
        root.join("mounts"),
        root.join("blobs"),
        root.join("empty"),
    ] {
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o711))
        .map_err(|e| Error::io(&root, e))?;
    let empty = root.join("empty");
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(&empty, e))?;
    // Single-threaded still: the FUSE session starts below.
    let (registry, skiff_bin) = crate::server::daemon_environment(&config)?;
    let state = StoreState::load(&root)?;
    detach_if_mounted(mountpoint);
    fs::create_dir_all(mountpoint).map_err(|e| Error::io(mountpoint, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("skiff-store")
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the runtime: {e}")))?;
    let store = Arc::new(Store {
        empty,
        blobs: root.join("blobs"),
        registry,
        daemons: Daemons::new(root.join("mounts"), skiff_bin, config.mount.clone()),
        rt: runtime.handle().clone(),
        state: Mutex::new(state),
        resolving: Mutex::new(HashMap::new()),
        mounting: Mutex::new(()),
        downloading: Mutex::new(()),
        root: root.clone(),
    });
    let mut nodes = Nodes::default();
    nodes.ino(Node::Root);
    let fs = StoreFs {
        store,
        nodes: Mutex::new(nodes),
        started: SystemTime::now().max(UNIX_EPOCH),
    };
    let mut fuse = fuser::Config::default();
    fuse.mount_options = vec![
        MountOption::FSName("skiff-store".into()),
        MountOption::Subtype("skiff-store".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    fuse.acl = SessionACL::All;
    fuse.n_threads = Some(config.mount.threads.max(4));
    let session = fuser::spawn_mount2(fs, mountpoint, &fuse).map_err(|e| Error::Mount {
        dir: mountpoint.to_path_buf(),
        message: e.to_string(),
    })?;
    tracing::info!(mountpoint = %mountpoint.display(), root = %root.display(), "skiff store serving");
    eprintln!(
        "skiff: store serving at {} (root {}); storage.conf: additionallayerstores = [\"{}:ref\"]",
        mountpoint.display(),
        root.display(),
        mountpoint.display()
    );
    runtime.block_on(crate::server::signalled());
    drop(session);
    detach_if_mounted(mountpoint);
    tracing::info!("skiff store stopped (image mounts keep running)");
    Ok(())
}
