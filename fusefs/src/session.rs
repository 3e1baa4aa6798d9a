//! The FUSE connection: how a [`SkiffFs`] gets its `/dev/fuse` session.
//!
//! Three ways, one per [`Connection`]:
//!
//! - [`Connection::Mount`]: fuser mounts and owns the connection (as root
//!   with `mount(2)`, otherwise through `fusermount3`). When this process
//!   dies, the mount is gone: reads fail with `ENOTCONN`.
//! - [`Connection::Fresh`]: a `/dev/fuse` descriptor opened by a *keeper*
//!   process (see [`crate::keeper`]) and inherited; this process mounts it
//!   with `mount(2)` and answers the kernel's `FUSE_INIT`. The keeper holds
//!   the same open file, so the connection outlives this process.
//! - [`Connection::Takeover`]: the descriptor of a connection that is
//!   mounted and initialised already, whose previous server died or handed
//!   over. The kernel sends `FUSE_INIT` once per connection, but fuser's only
//!   way to build a session on a descriptor is a handshake; so the
//!   handshake is made on one end of a socket pair that carries a
//!   `FUSE_INIT` written here (its reply is discarded), and then the
//!   session's descriptor is replaced by the `/dev/fuse` one with `dup2`
//!   before any thread reads from it. Last, a `FUSE_NOTIFY_RESEND`
//!   (Linux >= 6.9) puts the requests that the dead server had read but not
//!   answered back in the queue: they are answered again, never failed.
//!
//! Kept connections use one descriptor for every thread (no
//! `FUSE_DEV_IOC_CLONE`): requests read through a cloned descriptor are
//! failed with `ECONNABORTED` when the clone is closed, which is exactly
//! what a dying server does; requests read through the shared descriptor
//! stay in its processing queue, where `FUSE_NOTIFY_RESEND` finds them.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use fuser::{BackgroundSession, Config, Filesystem, MountOption, Session, SessionACL};

use crate::error::DaemonError;

/// Where the session of a mount comes from.
#[derive(Debug)]
pub enum Connection {
    /// fuser mounts in this process: no failover.
    Mount,
    /// Mount this `/dev/fuse` descriptor (held by a keeper too) and
    /// initialise the connection.
    Fresh(OwnedFd),
    /// Serve this descriptor of a connection that is mounted and
    /// initialised already (a keeper's, after its server died).
    Takeover(OwnedFd),
}

/// Takes ownership of `/dev/fuse` descriptor number `fd`, inherited across
/// `exec`, after checking that it is one (character device 10:229).
///
/// An [`OwnedFd`] cannot be made from a number without `unsafe`; instead a
/// fresh socket's descriptor is pointed at the same open file with `dup2`
/// and the inherited number closed. The result may have another number.
pub fn adopt_inherited(fd: RawFd) -> Result<OwnedFd, DaemonError> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| DaemonError::Io {
        context: format!("inherited FUSE descriptor {fd}"),
        source: e.into(),
    })?;
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if fd <= 2 || !is_char || libc::major(st.st_rdev) != 10 || libc::minor(st.st_rdev) != 229 {
        return Err(DaemonError::Io {
            context: format!("inherited FUSE descriptor {fd}"),
            source: std::io::Error::other(format!("descriptor {fd} is not {DEV_FUSE}")),
        });
    }
    let (slot, _) = UnixStream::pair().map_err(|e| DaemonError::Io {
        context: "creating a socket pair".into(),
        source: e,
    })?;
    let slot = OwnedFd::from(slot);
    nix::unistd::dup2(fd, slot.as_raw_fd()).map_err(|e| DaemonError::Io {
        context: format!("adopting descriptor {fd}"),
        source: e.into(),
    })?;
    let _ = nix::unistd::close(fd);
    Ok(slot)
}

impl Connection {
    /// Whether the connection is kept by another process (failover works).
    pub fn is_kept(&self) -> bool {
        !matches!(self, Connection::Mount)
    }

    /// Whether the mount exists already (nothing may touch the mountpoint
    /// before this process serves it: that would wait for itself).
    pub fn is_takeover(&self) -> bool {
        matches!(self, Connection::Takeover(_))
    }
}

/// The FUSE device.
pub const DEV_FUSE: &str = "/dev/fuse";

/// `FUSE_INIT`'s opcode.
const FUSE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND`'s notification code (protocol 7.40, Linux 6.9).
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_init_in)` with `flags2` and its padding.
const INIT_IN_LEN: usize = 64;

/// Opens `/dev/fuse` for a keeper (close-on-exec, as every descriptor of
/// this process; the keeper clears it for the descriptor it hands down).
pub fn open_device() -> Result<OwnedFd, DaemonError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
        .map(OwnedFd::from)
        .map_err(|e| DaemonError::Io {
            context: format!("opening {DEV_FUSE}"),
            source: e,
        })
}

/// Whether the FUSE connection of `fd` is still up: a connection is
/// aborted when its filesystem is unmounted (or through
/// `/sys/fs/fuse/connections/N/abort`), and then `poll` says `POLLERR`.
pub fn connection_alive(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL)),
        Err(_) => false,
    }
}

/// Starts serving `fs` on `conn` with `threads` threads; returns once the
/// kernel's requests are being read.
pub(crate) fn start<FS: Filesystem + Send + Sync + 'static>(
    fs: FS,
    conn: Connection,
    mountpoint: &Path,
    options: Vec<MountOption>,
    acl: SessionACL,
    threads: usize,
) -> Result<BackgroundSession, DaemonError> {
    let io = |context: String| move |e: std::io::Error| DaemonError::Io { context, source: e };
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(threads.max(1));
    match conn {
        Connection::Mount => {
            config.mount_options = options;
            // Each thread reads through its own clone of the descriptor:
            // less contention, and nothing needs to survive this process.
            config.clone_fd = true;
            fuser::spawn_mount2(fs, mountpoint, &config)
                .map_err(io(format!("mounting at {}", mountpoint.display())))
        }
        Connection::Fresh(fd) => {
            mount_device(fd.as_raw_fd(), mountpoint, &options, acl)?;
            // The kernel's `FUSE_INIT` is waiting on the descriptor now: it
            // is relayed through the socket pair to fuser's handshake, and
            // fuser's answer back to the kernel.
            // The kernel refuses reads into buffers smaller than its
            // largest request (`EINVAL`); this is fuser's own size.
            let mut init = vec![0u8; (16 << 20) + 4096];
            let n = nix::unistd::read(fd.as_raw_fd(), &mut init).map_err(|e| DaemonError::Io {
                context: "reading FUSE_INIT".into(),
                source: e.into(),
            })?;
            init.truncate(n);
            let (session, reply) = handshake(fs, &init, acl, config)?;
            let session = adopt(session, fd)?;
            nix::unistd::write(session.as_fd(), &reply).map_err(|e| DaemonError::Io {
                context: "answering FUSE_INIT".into(),
                source: e.into(),
            })?;
            session
                .spawn()
                .map_err(io("starting the FUSE threads".into()))
        }
        Connection::Takeover(fd) => {
            // The kernel initialised this connection with the first server;
            // the stand-in answer goes nowhere.
            let (session, _) = handshake(fs, &init_request(), acl, config)?;
            let session = adopt(session, fd)?;
            notify_resend(session.as_fd())?;
            session
                .spawn()
                .map_err(io("starting the FUSE threads".into()))
        }
    }
}

/// Makes a fuser session by handing it `init` on one end of a socket pair;
/// returns the session (reading from the other end) and its answer.
fn handshake<FS: Filesystem>(
    fs: FS,
    init: &[u8],
    acl: SessionACL,
    config: Config,
) -> Result<(Session<FS>, Vec<u8>), DaemonError> {
    let io = |context: &str| {
        let context = context.to_owned();
        move |e: std::io::Error| DaemonError::Io { context, source: e }
    };
    let (mut ours, theirs) = UnixStream::pair().map_err(io("creating a socket pair"))?;
    ours.write_all(init)
        .map_err(io("handing FUSE_INIT to the session"))?;
    let session = Session::from_fd(fs, OwnedFd::from(theirs), acl, config)
        .map_err(io("the FUSE handshake"))?;
    ours.set_nonblocking(true)
        .map_err(io("reading the FUSE_INIT answer"))?;
    let mut reply = vec![0u8; 4096];
    let n = ours
        .read(&mut reply)
        .map_err(io("reading the FUSE_INIT answer"))?;
    reply.truncate(n);
    Ok((session, reply))
}

/// Points the session's descriptor number at the kept `/dev/fuse`
/// descriptor (`dup2`), before any of its threads reads from it, and closes
/// the inherited number.
fn adopt<FS: Filesystem>(session: Session<FS>, fd: OwnedFd) -> Result<Session<FS>, DaemonError> {
    let slot = session.as_fd().as_raw_fd();
    nix::unistd::dup2(fd.as_raw_fd(), slot).map_err(|e| DaemonError::Io {
        context: "taking over the FUSE descriptor".into(),
        source: e.into(),
    })?;
    drop(fd);
    Ok(session)
}

/// `mount(2)` of a FUSE filesystem on the descriptor `fd`, read-only, with
/// the kernel options among `options`.
fn mount_device(
    fd: RawFd,
    mountpoint: &Path,
    options: &[MountOption],
    acl: SessionACL,
) -> Result<(), DaemonError> {
    use nix::mount::MsFlags;
    use std::os::unix::fs::MetadataExt as _;
    let mode = std::fs::metadata(mountpoint)
        .map(|m| m.mode() & libc::S_IFMT)
        .map_err(|e| DaemonError::Io {
            context: format!("mountpoint {}", mountpoint.display()),
            source: e,
        })?;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        fd,
        mode,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    let mut source = "skiff".to_owned();
    let mut fstype = "fuse".to_owned();
    for o in options {
        match o {
            MountOption::RO => flags |= MsFlags::MS_RDONLY,
            MountOption::NoAtime => flags |= MsFlags::MS_NOATIME,
            MountOption::Dev => flags.remove(MsFlags::MS_NODEV),
            MountOption::Suid => flags.remove(MsFlags::MS_NOSUID),
            MountOption::NoDev | MountOption::NoSuid => {}
            MountOption::DefaultPermissions => data.push_str(",default_permissions"),
            MountOption::FSName(name) => source = name.clone(),
            MountOption::Subtype(sub) => fstype = format!("fuse.{sub}"),
            MountOption::CUSTOM(c) => {
                data.push(',');
                data.push_str(c);
            }
            other => tracing::debug!("mount option {other:?} ignored on a kept connection"),
        }
    }
    if acl == SessionACL::All && !data.contains("allow_other") {
        data.push_str(",allow_other");
    }
    nix::mount::mount(
        Some(source.as_str()),
        mountpoint,
        Some(fstype.as_str()),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| DaemonError::Io {
        context: format!("mount(2) of a FUSE filesystem at {}", mountpoint.display()),
        source: e.into(),
    })
}

/// A `FUSE_INIT` request as the kernel writes it, offering every
/// capability, for the stand-in handshake of a takeover. Its answer goes
/// nowhere: the kernel keeps what the first server negotiated.
fn init_request() -> Vec<u8> {
    let len = (IN_HEADER_LEN + INIT_IN_LEN) as u32;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&len.to_le_bytes()); // len
    b.extend_from_slice(&FUSE_INIT.to_le_bytes()); // opcode
    b.extend_from_slice(&1u64.to_le_bytes()); // unique
    b.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    b.extend_from_slice(&[0u8; 12]); // uid, gid, pid
    b.extend_from_slice(&[0u8; 4]); // total_extlen, padding
    b.extend_from_slice(&7u32.to_le_bytes()); // major
    b.extend_from_slice(&40u32.to_le_bytes()); // minor
    b.extend_from_slice(&(1u32 << 20).to_le_bytes()); // max_readahead
    b.extend_from_slice(&u32::MAX.to_le_bytes()); // flags
    b.resize(len as usize, 0); // flags2 and the unused words
    b
}

/// Asks the kernel to queue again every request that was read from this
/// connection but not answered (`FUSE_NOTIFY_RESEND`): a notification is a
/// `fuse_out_header` with `unique` 0 and the code in `error`.
fn notify_resend(fd: BorrowedFd<'_>) -> Result<(), DaemonError> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    match nix::unistd::write(fd, &b) {
        Ok(_) => Ok(()),
        // Before Linux 6.9: nothing to resend with; requests the dead
        // server held stay unanswered (their readers wait).
        Err(nix::errno::Errno::EINVAL) => {
            tracing::warn!("this kernel has no FUSE_NOTIFY_RESEND: requests in flight at the takeover are lost");
            Ok(())
        }
        Err(e) => Err(DaemonError::Io {
            context: "FUSE_NOTIFY_RESEND".into(),
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stand_in_init_has_the_kernels_layout() {
        let b = init_request();
        assert_eq!(b.len(), 104);
        assert_eq!(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), 104);
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), FUSE_INIT);
        assert_eq!(u32::from_le_bytes([b[40], b[41], b[42], b[43]]), 7);
    }
}
