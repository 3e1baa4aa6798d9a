//! Recording which files a workload reads, to make a prefetch list
//! (prefetch itself is in [`crate::prefetch`]).
//!
//! [`AccessLog`] notes each file the first time it is read (a flag per
//! inode, so later reads cost one atomic load) and writes the paths, one per
//! line in first-read order, atomically (temporary file + rename), when
//! asked: periodically and at unmount. `skiff convert --prefetch-list`
//! turns that file into the PREFETCH table.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use skiff_format::InodeId;

use crate::image::Image;
use crate::workers::lock;

/// The files read so far, in first-read order; see the module documentation.
pub(crate) struct AccessLog {
    path: PathBuf,
    seen: Vec<AtomicBool>,
    order: Mutex<Vec<InodeId>>,
    dirty: AtomicBool,
}

impl AccessLog {
    /// A log for an image of `inodes` inodes, written to `path`.
    pub(crate) fn new(path: &Path, inodes: u32) -> AccessLog {
        AccessLog {
            path: path.to_path_buf(),
            seen: (0..inodes).map(|_| AtomicBool::new(false)).collect(),
            order: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
        }
    }

    /// Notes a read of `id`.
    pub(crate) fn record(&self, id: InodeId) {
        let Some(flag) = self.seen.get(id.index()) else {
            return;
        };
        if flag.load(Ordering::Relaxed) || flag.swap(true, Ordering::Relaxed) {
            return;
        }
        lock(&self.order).push(id);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the list if it changed since the last write.
    pub(crate) fn write(&self, image: &Image) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let ids = lock(&self.order).clone();
        let mut text = String::new();
        for id in ids {
            let p = image.path_of(id);
            // A name with a newline cannot be written one per line.
            if !p.contains('\n') {
                text.push_str(&p);
                text.push('\n');
            }
        }
        let tmp = self.path.with_file_name(format!(
            ".{}.{}.tmp",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            self.dirty.store(true, Ordering::Relaxed);
        }
        result
    }
}
