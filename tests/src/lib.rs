//! End-to-end test support for Skiff.
//!
//! The tests in `tests/tests/` drive the real `skiff` binary against real
//! inputs (the fixture image, `umoci unpack` as the reference extractor) and
//! compare whole file trees. This library holds what they share:
//!
//! - [`treedump`]: a canonical, sorted, one-line-per-path dump of a directory
//!   tree (type, mode, owner, size, mtime, device numbers, symlink target,
//!   xattrs, content digest, hard-link groups) and [`treedump::compare`], a
//!   readable diff of two dumps.
//! - [`harness`]: locating the `skiff` binary ([`harness::skiff_bin`]) and the
//!   fixtures ([`harness::fixtures_dir`]), running commands with useful
//!   failure messages ([`harness::run`]), and the reference root filesystem of
//!   the fixture image ([`harness::umoci_rootfs`]).
//! - [`services`]: a registry on loopback and a `skiff mount` daemon, stopped
//!   and unmounted on drop.
//! - [`faultproxy`]: the fault-injecting proxy (`scripts/fault-proxy.py`)
//!   in front of a real registry serving the converted fixture.
//!
//! Missing parts (the binary, the fixtures, `umoci`) make the helpers panic
//! with a message that says what to do: an end-to-end test fails, it never
//! skips silently.

pub mod faultproxy;
pub mod harness;
pub mod services;
pub mod treedump;
