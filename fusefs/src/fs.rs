//! The `fuser::Filesystem` over an [`Image`] and a [`ChunkSource`].
//!
//! Every trait method is a short adapter: it calls a private `do_*` method
//! that returns `Result<_, FsError>` and turns the result into a reply;
//! [`FsError::errno`] is the one place errors become errno values. State is
//! immutable (the bootstrap) or internally synchronised (the chunk cache and
//! the counters), so any number of fuser threads serve requests at once.
//!
//! Inode numbers are bootstrap inode indices plus one (the root, index 0, is
//! FUSE inode 1), so they are stable across mounts and hard links share one.
//! The image never changes, so replies carry long TTLs, and OPEN, OPENDIR
//! and FLUSH answer `ENOSYS` so that the kernel stops sending them and opens
//! files keeping the page cache and directories cached (the "no open"
//! protocol). Lookup counts need no bookkeeping because nothing is ever
//! allocated per inode.
//!
//! Missing names are answered as negative entries (inode 0 with the same
//! TTL), so the kernel caches misses too: interpreters probe many paths that
//! do not exist. `SEEK_DATA`/`SEEK_HOLE` follow the chunk map; `ioctl` is
//! `ENOTTY`, as for any regular file.
//!
//! Reads never wait on the network on a FUSE thread. [`SkiffFs::read`]
//! plans the read from the bootstrap and answers it at once when every
//! chunk is in memory or on disk ([`ChunkSource::get_local`]); otherwise
//! it hands the plan and its `ReplyData` (fuser replies are `Send`) to the
//! read pool, with a deadline: the request's arrival plus the mount's read
//! budget. A pool thread fetches (within the deadline, see
//! [`crate::fetch`]) and replies; a job whose deadline passed while it was
//! queued fails with `EIO` at once. So a stalled registry holds pool
//! threads, never the threads that answer LOOKUP, GETATTR, READDIR and
//! reads of local data. The pool holds at most its threads' worth of reads
//! in progress and `READ_QUEUE` (see [`crate::daemon`]) waiting; a read
//! that finds the queue full is fetched on its FUSE thread, still within
//! its deadline. A mount of local blobs (an OCI layout on this node) has no
//! read pool: a read there is a pread, a decode and a hash, which the FUSE
//! thread does itself, as a kernel filesystem does in its reader's context
//! (the hand-off cost two thread wake-ups per read; see [`crate::daemon`]).
//!
//! Directory offsets are entry positions: 0 is `.`, 1 is `..`, and `i + 2` the
//! `i`-th stored entry, so resuming a `readdir` is an index, not a scan.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use skiff_format::{Bootstrap, FileKind, Inode, InodeId};

use crate::access::AccessLog;
use crate::cache::ChunkData;
use crate::chunk::{ChunkRequest, ListedChunks};
use crate::error::FsError;
use crate::image::Image;
use crate::metrics::Metrics;
use crate::readahead::Readahead;
use crate::reply::ReplyBytes;
use crate::source::ChunkSource;
use crate::whole_file::WholeFiles;
use crate::window::{split_window, FetchWindow, RestRange};
use crate::workers::Pool;

/// How long the kernel may cache entries and attributes: the image is
/// immutable, so only memory pressure should evict them.
pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// `st_blksize` of every inode.
const BLOCK_SIZE: u32 = 4096;
/// Longest name any entry can have.
const NAME_MAX: usize = 255;
/// Background requests (readahead, async reads) the kernel may queue.
const MAX_BACKGROUND: u16 = 64;
/// Default [`SkiffFs::with_read_pool`] budget: how long a reader may be
/// made to wait for chunks that are not local, counted from when its
/// request arrived. A container's reader would rather get `EIO` within
/// seconds than hang for minutes (what the registry client's own 120 s
/// deadline gives): 30 s rides out a registry restart, a pod network
/// hiccup or a few slow attempts (with the default backoff, 4 attempts fit),
/// and is still below the timeouts of health checks and of most clients
/// that would otherwise give up on their own, leaving a reader stuck in
/// the kernel (uninterruptible) meanwhile.
pub const DEFAULT_READ_BUDGET: Duration = Duration::from_secs(30);

type Result<T, E = FsError> = std::result::Result<T, E>;

/// The read-only filesystem of one image.
pub struct SkiffFs {
    image: Arc<Image>,
    source: Arc<ChunkSource>,
    metrics: Arc<Metrics>,
    /// What a miss brings along from its blob.
    fetch_window: FetchWindow,
    /// Readahead in blob order.
    readahead: Option<Arc<Readahead>>,
    /// Files read from their start, fetched whole at their first miss
    /// (with readahead).
    whole_files: Option<WholeFiles>,
    /// Records the files read, for a prefetch list.
    access: Option<Arc<AccessLog>>,
    /// Takes reads that need the network off the FUSE threads.
    read_pool: Option<Arc<Pool>>,
    /// How long a read may wait for the network, from its arrival.
    read_budget: Duration,
    /// Dropped with the filesystem, which tells the daemon the FUSE session
    /// is over (the session drops the filesystem when its threads end).
    _alive: Option<std::sync::mpsc::Sender<()>>,
}

impl SkiffFs {
    /// A filesystem serving `image`, reading file data from `source`.
    pub fn new(image: Arc<Image>, source: Arc<ChunkSource>) -> SkiffFs {
        let metrics = source.metrics().clone();
        SkiffFs {
            image,
            source,
            metrics,
            fetch_window: FetchWindow::new(0, false),
            readahead: None,
            whole_files: None,
            access: None,
            read_pool: None,
            read_budget: DEFAULT_READ_BUDGET,
            _alive: None,
        }
    }

    /// Reads ahead of readers that walk through a blob, and fetches whole
    /// the files read from their start (up to the readahead's bound).
    pub(crate) fn with_readahead(mut self, readahead: Option<Arc<Readahead>>) -> SkiffFs {
        self.whole_files = readahead
            .as_ref()
            .and_then(|ra| WholeFiles::new(ra.options().whole_file));
        self.readahead = readahead;
        self
    }

    /// Hands reads that need the network to `pool` (without one, as for
    /// local blobs, the FUSE thread loads them itself), each failing with
    /// `EIO` once `budget` has passed since its request arrived.
    pub(crate) fn with_read_pool(mut self, pool: Option<Arc<Pool>>, budget: Duration) -> SkiffFs {
        self.read_pool = pool;
        self.read_budget = budget;
        self
    }

    /// Records the files read, in first-read order.
    pub(crate) fn with_access_log(mut self, log: Option<Arc<AccessLog>>) -> SkiffFs {
        self.access = log;
        self
    }

    /// On a miss, also fetch up to `bytes` of stored data that follows the
    /// needed chunks in their blob (0 turns it off); from a local store
    /// only for misses that continue their blob's last one; from a remote
    /// one growing up to `max` while that pays (see [`crate::window`]).
    pub fn with_fetch_window(mut self, bytes: u64, max: u64) -> SkiffFs {
        let local = self.source.backend().store.is_local();
        self.metrics
            .fetch_window_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        self.fetch_window = if local {
            FetchWindow::new(bytes, true)
        } else {
            FetchWindow::adaptive(
                bytes,
                max,
                self.source.brought().clone(),
                self.source.link().clone(),
                self.metrics.clone(),
            )
        };
        self
    }

    /// Makes dropping this filesystem disconnect `alive`'s receiver.
    pub(crate) fn with_drop_signal(mut self, alive: std::sync::mpsc::Sender<()>) -> SkiffFs {
        self._alive = Some(alive);
        self
    }

    fn b(&self) -> &Bootstrap<'_> {
        self.image.bootstrap()
    }

    /// The bootstrap inode of a FUSE inode number.
    fn id(&self, ino: INodeNo) -> Result<InodeId> {
        match ino.0.checked_sub(1) {
            Some(i) if i < u64::from(self.b().inode_count()) => {
                Ok(InodeId(u32::try_from(i).map_err(|_| FsError::NotFound)?))
            }
            _ => Err(FsError::NotFound),
        }
    }

    /// [`id`](Self::id), checked with the records the inode owns
    /// ([`Image::checked`]) before its content is served: entries, chunk
    /// map, target, xattrs. Attributes alone need only the inode's own
    /// record, so that a lying directory does not make its parent's
    /// listing fail.
    fn checked_id(&self, ino: INodeNo) -> Result<InodeId> {
        Ok(self.image.checked(self.id(ino)?)?)
    }

    fn checked_inode(&self, ino: INodeNo) -> Result<(InodeId, Inode<'_>)> {
        let id = self.checked_id(ino)?;
        Ok((id, self.b().inode(id)?))
    }

    fn inode(&self, ino: INodeNo) -> Result<(InodeId, Inode<'_>)> {
        let id = self.id(ino)?;
        Ok((id, self.b().inode(id)?))
    }

    fn attr(&self, id: InodeId, inode: &Inode<'_>) -> Result<FileAttr> {
        let kind = inode.kind()?;
        let blocks = if kind == FileKind::Regular {
            // The bytes its chunks hold. A lying chunk map is not an error
            // here (reads of the file are EIO, see `checked_id`): one bad
            // file must not make its directory's listing fail.
            let stored = || -> Result<u64> {
                let mut stored = 0u64;
                for fc in self.b().file_chunks(id)? {
                    let len = self.b().chunk(fc.chunk_index())?.uncompressed_size;
                    stored = stored.saturating_add(u64::from(len));
                }
                Ok(stored)
            };
            stored().unwrap_or(0).div_ceil(512)
        } else {
            0
        };
        let mtime = system_time(inode.mtime());
        let (major, minor) = inode.rdev();
        Ok(FileAttr {
            ino: INodeNo(u64::from(id.0) + 1),
            size: inode.size(),
            blocks,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: file_type(kind),
            perm: (inode.mode() & 0o7777) as u16,
            nlink: inode.nlink(),
            uid: inode.uid(),
            gid: inode.gid(),
            rdev: encode_dev(major, minor),
            blksize: BLOCK_SIZE,
            flags: 0,
        })
    }

    fn attr_of(&self, id: InodeId) -> Result<FileAttr> {
        let inode = self.b().inode(id)?;
        self.attr(id, &inode)
    }

    /// A missing name is not an error but a negative entry (inode 0 with a
    /// TTL), so that the kernel caches the miss: interpreters probe many
    /// paths that do not exist, again and again.
    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr> {
        let dir = self.checked_id(parent)?;
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        match self.b().lookup(dir, name.as_bytes())? {
            Some(id) => self.attr_of(id),
            None => Ok(negative_entry()),
        }
    }

    fn do_getattr(&self, ino: INodeNo) -> Result<FileAttr> {
        let (id, inode) = self.inode(ino)?;
        self.attr(id, &inode)
    }

    fn do_readlink(&self, ino: INodeNo) -> Result<&[u8]> {
        let (id, inode) = self.checked_inode(ino)?;
        if inode.kind()? != FileKind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(self.b().symlink_target(id)?)
    }

    /// A read, on the FUSE thread: everything that needs only the
    /// bootstrap, then the data if every chunk is local (memory or disk);
    /// otherwise the plan, for the read pool to fetch.
    fn do_read(&self, ino: INodeNo, offset: u64, size: u32) -> Result<ReadStep> {
        Metrics::add(&self.metrics.reads, 1);
        let (id, inode) = self.checked_inode(ino)?;
        match inode.kind()? {
            FileKind::Regular => {}
            FileKind::Directory => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid),
        }
        let file_size = inode.size();
        if offset >= file_size || size == 0 {
            return Ok(ReadStep::Done(ReplyBytes::Owned(Vec::new())));
        }
        let end = file_size.min(offset.saturating_add(u64::from(size)));
        if let Some(whole) = &self.whole_files {
            whole.on_read(id, offset, end, file_size);
        }
        if let Some(log) = &self.access {
            log.record(id, offset, end - offset);
        }
        let records = self.b().chunks_in_range(id, offset, end - offset)?;
        let mut reqs = Vec::with_capacity(records.len());
        let mut starts = Vec::with_capacity(records.len());
        for fc in records {
            let info = self.b().chunk(fc.chunk_index())?;
            let blob = self.b().blob(info.blob_index)?;
            reqs.push(ChunkRequest {
                index: fc.chunk_index(),
                info,
                blob: blob.digest,
            });
            starts.push(fc.file_offset());
        }
        let plan = ReadPlan {
            id,
            offset,
            end,
            reqs,
            starts,
        };
        let local = self.source.get_local(&plan.reqs);
        if let Some(ra) = &self.readahead {
            ra.on_read(
                &self.image,
                &self.source,
                &plan.reqs,
                end - offset,
                local.is_none(),
            );
        }
        if let Some(datas) = local {
            let out = plan.assemble(&datas)?;
            Metrics::add(&self.metrics.bytes_read, out.as_slice().len() as u64);
            return Ok(ReadStep::Done(out));
        }
        Ok(ReadStep::Fetch(plan))
    }

    /// Answers a read whose chunks are not all local from the read pool
    /// (or here, when there is none, as for local blobs, or its queue is
    /// full), by `deadline`.
    fn fetch_later(&self, plan: ReadPlan, deadline: Instant, reply: ReplyData) {
        let mut ahead = self.fetch_window.ahead(self.b(), &plan.reqs);
        // A read the prefetch list foresaw brings along only what the list
        // names: the list says what the workload reads next.
        let listed = self.source.listed_for(&plan.reqs);
        if let Some(l) = &listed {
            ahead.retain(|r| l.contains(r.index));
        }
        // A read that hands its window off takes none of it; one that keeps
        // it takes at most the starting window on either side once the
        // window has grown (it waits for what it fetches: a grown window
        // would make each miss wait for MiBs); without a pool to leave the
        // rest to, all of it up to the first local chunk on each side.
        let (hand_off, grown) = (self.fetch_window.hands_off(), self.fetch_window.grown());
        let rest_to = self.readahead.clone().filter(|_| hand_off || grown);
        let share = match (&rest_to, hand_off) {
            (None, _) => u64::MAX,
            (Some(_), true) => 0,
            (Some(_), false) => self.fetch_window.base(),
        };
        // Not for a read the list foresaw, as for the window.
        let whole_file = self.readahead.clone().zip(
            self.whole_files
                .as_ref()
                .filter(|_| listed.is_none())
                .zip(plan.reqs.first())
                .and_then(|(w, first)| w.on_miss(self.b(), plan.id, first)),
        );
        let job = ReadJob {
            whole_file,
            image: self.image.clone(),
            source: self.source.clone(),
            max_request: self.fetch_window.bytes().max(1 << 20),
            plan,
            ahead,
            rest_to,
            share,
            grown,
            listed,
            deadline,
        };
        let run: Box<dyn FnOnce() + Send> = Box::new(move || job.run(reply));
        match &self.read_pool {
            Some(pool) => {
                if let Err(run) = pool.try_submit(run) {
                    // The queue is full (READ_QUEUE reads already wait):
                    // this FUSE thread waits instead, still bounded by the
                    // deadline, rather than failing a read that may well
                    // succeed.
                    tracing::debug!("read pool queue full: reading on the FUSE thread");
                    run();
                }
            }
            None => run(),
        }
    }

    /// The `index`-th entry of a directory listing: `.`, `..`, then the stored ones.
    fn dir_slot(
        &self,
        dir: InodeId,
        parent: InodeId,
        index: u64,
    ) -> Result<(InodeId, FileKind, &[u8])> {
        match index {
            0 => Ok((dir, FileKind::Directory, b".")),
            1 => Ok((parent, FileKind::Directory, b"..")),
            i => {
                let i = u32::try_from(i - 2).map_err(|_| FsError::Invalid)?;
                let e = self.b().dir_entry(dir, i)?;
                Ok((e.inode, e.kind, e.name))
            }
        }
    }

    /// The directory, its parent and the number of listing slots.
    fn dir_listing(&self, ino: INodeNo) -> Result<(InodeId, InodeId, u64)> {
        let (id, inode) = self.checked_inode(ino)?;
        if inode.kind()? != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        Ok((id, inode.parent(), u64::from(self.b().dir_len(id)?) + 2))
    }

    fn do_readdir(&self, ino: INodeNo, offset: u64, reply: &mut ReplyDirectory) -> Result<()> {
        let (dir, parent, slots) = self.dir_listing(ino)?;
        for index in offset..slots {
            let (id, kind, name) = self.dir_slot(dir, parent, index)?;
            let ino = INodeNo(u64::from(id.0) + 1);
            if reply.add(ino, index + 1, file_type(kind), OsStr::from_bytes(name)) {
                break;
            }
        }
        Ok(())
    }

    fn do_readdirplus(
        &self,
        ino: INodeNo,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> Result<()> {
        let (dir, parent, slots) = self.dir_listing(ino)?;
        for index in offset..slots {
            let (id, _, name) = self.dir_slot(dir, parent, index)?;
            let attr = self.attr_of(id)?;
            if reply.add(
                attr.ino,
                index + 1,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        Ok(())
    }

    fn do_getxattr(&self, ino: INodeNo, name: &OsStr, size: u32) -> Result<Xattr<'_>> {
        let id = self.checked_id(ino)?;
        let value = self
            .b()
            .getxattr(id, name.as_bytes())?
            .ok_or(FsError::NoAttr)?;
        sized_reply(value, size)
    }

    fn do_listxattr(&self, ino: INodeNo, size: u32) -> Result<XattrReply> {
        let id = self.checked_id(ino)?;
        let mut names = Vec::new();
        for x in self.b().xattrs(id)? {
            let (name, _) = x?;
            names.extend_from_slice(name);
            names.push(0);
        }
        Ok(match sized_reply(&names, size)? {
            Xattr::Size(n) => XattrReply::Size(n),
            Xattr::Data(_) => XattrReply::Data(names),
        })
    }

    /// `SEEK_DATA` / `SEEK_HOLE` from the chunk map (the kernel handles the
    /// other whences itself).
    fn do_lseek(&self, ino: INodeNo, offset: i64, whence: i32) -> Result<i64> {
        let (id, inode) = self.checked_inode(ino)?;
        if inode.kind()? != FileKind::Regular {
            return Err(FsError::Invalid);
        }
        let size = inode.size();
        let offset = u64::try_from(offset).map_err(|_| FsError::Invalid)?;
        if offset >= size {
            return Err(FsError::NoSuchOffset);
        }
        let mut hole_at = offset;
        for fc in self.b().file_chunks(id)? {
            let start = fc.file_offset();
            let end = start.saturating_add(u64::from(
                self.b().chunk(fc.chunk_index())?.uncompressed_size,
            ));
            if end <= offset {
                continue;
            }
            match whence {
                libc::SEEK_DATA => return Ok(start.max(offset) as i64),
                libc::SEEK_HOLE if start > hole_at => break,
                libc::SEEK_HOLE => hole_at = end,
                _ => return Err(FsError::Invalid),
            }
        }
        match whence {
            libc::SEEK_DATA => Err(FsError::NoSuchOffset),
            libc::SEEK_HOLE => Ok(hole_at.min(size) as i64),
            _ => Err(FsError::Invalid),
        }
    }

    fn do_access(&self, ino: INodeNo, mask: AccessFlags) -> Result<()> {
        self.id(ino)?;
        if mask.contains(AccessFlags::W_OK) {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    fn do_statfs(&self) -> Result<(u64, u64)> {
        let b = self.b();
        let mut bytes = 0u64;
        for i in 0..b.blob_count() {
            bytes = bytes.saturating_add(b.blob(i)?.uncompressed_size);
        }
        Ok((
            bytes.div_ceil(u64::from(BLOCK_SIZE)),
            u64::from(b.inode_count()),
        ))
    }
}

/// What [`SkiffFs::do_read`] did on the FUSE thread.
enum ReadStep {
    /// The reply's data.
    Done(ReplyBytes),
    /// Chunks to fetch first.
    Fetch(ReadPlan),
}

/// The chunks of one FUSE read and where they go in its reply.
struct ReadPlan {
    id: InodeId,
    offset: u64,
    end: u64,
    reqs: Vec<ChunkRequest>,
    /// File offset of each chunk of `reqs`.
    starts: Vec<u64>,
}

impl ReadPlan {
    /// The reply (see [`crate::reply::assemble`]).
    fn assemble(&self, datas: &[ChunkData]) -> Result<ReplyBytes> {
        crate::reply::assemble(self.offset, self.end, &self.starts, datas)
    }
}

/// A read handed to the read pool: fetches its chunks by its deadline and
/// replies. Owns what it needs (the reply is `Send`), so the FUSE thread
/// that made it is free at once.
struct ReadJob {
    image: Arc<Image>,
    source: Arc<ChunkSource>,
    max_request: u64,
    plan: ReadPlan,
    ahead: Vec<ChunkRequest>,
    /// Where the parts of the window that the read leaves are fetched, in
    /// the background, when the read hands its window off or the window
    /// has grown (and there is a readahead pool: a remote store and a disk
    /// cache).
    rest_to: Option<Arc<Readahead>>,
    /// Stored bytes of the window the read fetches itself on either side
    /// of its chunks (0: it hands the window off, see
    /// [`FetchWindow::hands_off`]).
    share: u64,
    /// The window has grown: the parts of it past a local chunk are worth
    /// fetching too.
    grown: bool,
    /// The prefetch list's chunks, when it foresaw this read: the rest of
    /// the window is limited to them too.
    listed: Option<Arc<ListedChunks>>,
    deadline: Instant,
    /// The whole file's stored range, for readahead to fetch after the
    /// rest of the window (see [`crate::whole_file`]).
    whole_file: Option<(Arc<Readahead>, RestRange)>,
}

impl ReadJob {
    fn run(self, reply: ReplyData) {
        let metrics = self.source.metrics().clone();
        match self.fetch() {
            Ok(data) => {
                Metrics::add(&metrics.bytes_read, data.as_slice().len() as u64);
                data.send(reply);
            }
            Err(e) => {
                Metrics::add(&metrics.read_errors, 1);
                reply.error(errno(&e));
            }
        }
    }

    /// The part of the window that this read fetches with its own chunks
    /// (see [`split_window`]: up to `share` on either side, what shares a
    /// frame with its chunks always). What it leaves up to the first local
    /// chunk on each side goes to `rest_to` at the same moment, so that a
    /// read that hands its window off waits for its own bytes and not for
    /// the block's; once the window has grown, what lies past a local
    /// chunk goes too, so that a window with holes (a reader jumping
    /// around a blob it has partly fetched) is fetched whole without the
    /// read waiting.
    fn split_ahead(&self) -> Vec<ChunkRequest> {
        let mut local = self.source.local_check();
        let split = split_window(&self.plan.reqs, &self.ahead, self.share, |r| {
            local.is_local(r)
        });
        if let Some(ra) = &self.rest_to {
            let far = if self.grown { split.far } else { Vec::new() };
            for range in split.near.into_iter().chain(far) {
                ra.fetch_window_rest(&self.image, &self.source, range, self.listed.clone());
            }
        }
        if let Some((ra, range)) = &self.whole_file {
            ra.fetch_whole_file(&self.image, &self.source, *range);
        }
        split.mine
    }

    fn fetch(&self) -> Result<ReplyBytes> {
        let plan = &self.plan;
        let ino = u64::from(plan.id.0) + 1;
        if Instant::now() >= self.deadline {
            // Waited in the queue for all of its budget.
            tracing::error!(
                ino,
                path = %self.image.path_of(plan.id),
                "read at offset {} failed: its budget was spent before a fetch could start",
                plan.offset
            );
            return Err(FsError::TimedOut);
        }
        let datas = self
            .source
            .get_with_read_ahead(
                &plan.reqs,
                &self.split_ahead(),
                self.max_request,
                Some(self.deadline),
            )
            .map_err(|(i, source)| {
                let req = &plan.reqs[i];
                tracing::error!(
                    chunk = req.index,
                    digest = %req.info.digest,
                    blob = %req.blob,
                    blob_offset = req.info.compressed_offset,
                    ino,
                    path = %self.image.path_of(plan.id),
                    file_offset = plan.starts[i],
                    "chunk {} ({}) of blob {} unusable: {source}",
                    req.index,
                    req.info.digest,
                    req.blob
                );
                FsError::Chunk {
                    index: req.index,
                    source,
                }
            })?;
        plan.assemble(&datas)
    }
}

/// The attributes of a negative entry: inode 0 means "no such name".
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// An xattr answer: the size the caller asked for, or the data.
enum Xattr<'a> {
    Size(u32),
    Data(&'a [u8]),
}

/// An owned xattr answer (the NUL-separated name list).
enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// The xattr protocol: size 0 asks for the length; a buffer too small is ERANGE.
fn sized_reply(value: &[u8], size: u32) -> Result<Xattr<'_>> {
    let len = u32::try_from(value.len()).map_err(|_| FsError::Range)?;
    if size == 0 {
        Ok(Xattr::Size(len))
    } else if len > size {
        Err(FsError::Range)
    } else {
        Ok(Xattr::Data(value))
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

/// The kernel's `new_encode_dev`: what `fuse_attr.rdev` carries.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn system_time((sec, nsec): (i64, u32)) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(nanos)).unwrap_or(UNIX_EPOCH)
}

fn errno(e: &FsError) -> Errno {
    // Chunk errors are logged where they happen, with the file's details.
    if let FsError::Format(_) = e {
        tracing::error!("corrupt bootstrap record, replying EIO: {e}");
    } else {
        tracing::trace!("replying errno {}: {e}", e.errno());
    }
    Errno::from_i32(e.errno())
}

const EROFS: Errno = Errno::EROFS;

impl Filesystem for SkiffFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_MAX_PAGES;
        // Ask only for what this kernel offers; the rest is an optimisation.
        let _ = config.add_capabilities(wanted & config.capabilities());
        // The kernel offers its largest readahead; take all of it (the
        // daemon raises the bdi's read_ahead_kb after mounting).
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        tracing::debug!(capabilities = ?config.capabilities(), "FUSE init");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.do_readlink(ino) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// `ENOSYS`: the kernel then stops sending OPEN (and RELEASE) for
    /// files and opens them itself with `FOPEN_KEEP_CACHE`. Nothing here
    /// needs a per-open state, the mount is read-only (the VFS refuses
    /// opens for writing with `EROFS` before they get here), and a warm
    /// read of many small files saves two round trips per file.
    ///
    /// It also rules out FUSE passthrough (a file opened with a backing
    /// file, read by the kernel without the daemon), which needs an OPEN
    /// reply; the kernel stops sending OPEN on the first `ENOSYS`, for
    /// every file, so it is all or nothing. Measured on this kernel (6.18)
    /// with a trial build, 2 GiB file read warm with `cat`, 6 reads each:
    /// ext4 254-275 ms, this page cache 305-412 ms, passthrough to a
    /// decompressed copy of the file on ext4 251-268 ms. The gap is the
    /// kernel's: FUSE keeps its page cache in 4 KiB pages (a mapped 16 MiB
    /// of the file: 0 of 4,096 pages in a large folio, ext4's copy 3,880),
    /// so every FUSE filesystem pays it (squashfuse_ll's warm read is as
    /// slow). What passthrough would cost: answering OPEN for every file,
    /// warm `import numpy, pandas` 354-355 ms at best against 324-337 ms
    /// (medians +30 ms); a decompressed copy on disk of every large file it
    /// serves, beside the stored chunks; and the per-read check, since the
    /// kernel would serve the copy's bytes unverified (this kernel has no
    /// fs-verity to seal the copy). Not adopted: a container start opens
    /// many files and re-reads few large ones from a warm cache.
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
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
        // The budget counts from here: time spent queued counts.
        let arrived = Instant::now();
        match self.do_read(ino, offset, size) {
            Ok(ReadStep::Done(data)) => data.send(reply),
            Ok(ReadStep::Fetch(plan)) => self.fetch_later(plan, arrived + self.read_budget, reply),
            Err(e) => {
                Metrics::add(&self.metrics.read_errors, 1);
                reply.error(errno(&e))
            }
        }
    }

    /// `ENOSYS`, as for [`open`](Self::open): the kernel then opens
    /// directories itself with `FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR`.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
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
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.do_readdirplus(ino, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.do_statfs() {
            Ok((blocks, files)) => reply.statfs(
                blocks,
                0,
                0,
                files,
                0,
                BLOCK_SIZE,
                NAME_MAX as u32,
                BLOCK_SIZE,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.do_getxattr(ino, name, size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(d)) => reply.data(d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.do_listxattr(ino, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.do_lseek(ino, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// No ioctls: this is what a regular file answers to `isatty` (`TCGETS`).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.do_access(ino, mask) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    // Every modification is EROFS: the image is immutable. The kernel already
    // refuses most of them on an `ro` mount; these answer the rest.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _t: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(EROFS);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _l: u64,
        _m: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(EROFS);
    }

    /// `ENOSYS`: nothing is ever dirty, so the kernel stops sending FLUSH
    /// on every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_encoding_matches_the_kernel() {
        assert_eq!(encode_dev(1, 3), 0x0103);
        assert_eq!(
            encode_dev(8, 0x1_0005),
            (0x05) | (8 << 8) | (0x1_0000 << 12)
        );
    }

    #[test]
    fn times_before_the_epoch() {
        assert_eq!(system_time((0, 0)), UNIX_EPOCH);
        assert!(system_time((-10, 0)) < UNIX_EPOCH);
        assert_eq!(system_time((1, 5)), UNIX_EPOCH + Duration::new(1, 5));
    }

    #[test]
    fn xattr_sizes() {
        assert!(matches!(sized_reply(b"abc", 0), Ok(Xattr::Size(3))));
        assert!(matches!(sized_reply(b"abc", 2), Err(FsError::Range)));
        assert!(matches!(sized_reply(b"abc", 3), Ok(Xattr::Data(b"abc"))));
    }
}
