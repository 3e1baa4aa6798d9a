//! Recording what a workload reads, to make a prefetch list (prefetch
//! itself is in [`crate::prefetch`]).
//!
//! [`AccessLog`] notes each stretch of a file the first time it is read, in
//! first-read order, and writes them atomically (temporary file + rename)
//! when asked: periodically and at unmount. One line per stretch:
//! `PATH<TAB>OFFSET<TAB>LENGTH` (bytes of the file), or `PATH` alone when
//! the stretch is the whole file. A stretch that continues the one before
//! it in the same file extends it, so a file read front to back is one
//! line. `skiff convert --prefetch-list` turns the file into the PREFETCH
//! and PREFETCH_RANGES tables (see docs/format.md), so that prefetch brings
//! the pages a workload mapped of a large library and not all of it.
//!
//! Recording is for a recording run (`skiff mount --record-access`), so a
//! read takes a lock here; without it nothing is recorded.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use skiff_format::InodeId;

use crate::image::Image;
use crate::workers::lock;

/// The stretches read so far, in first-read order; see the module
/// documentation.
pub(crate) struct AccessLog {
    path: PathBuf,
    state: Mutex<Recorded>,
    dirty: AtomicBool,
}

/// A stretch `[start, end)` of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    id: InodeId,
    start: u64,
    end: u64,
}

#[derive(Default)]
struct Recorded {
    /// In first-read order.
    extents: Vec<Extent>,
    /// Per file, what was read: sorted, disjoint, not touching.
    covered: HashMap<InodeId, Vec<(u64, u64)>>,
}

impl Recorded {
    /// Notes a read of `[start, end)` of `id`; returns whether anything was
    /// new.
    fn record(&mut self, id: InodeId, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        let covered = self.covered.entry(id).or_default();
        let new = gaps(covered, start, end);
        if new.is_empty() {
            return false;
        }
        merge(covered, start, end);
        for (s, e) in new {
            match self.extents.last_mut() {
                Some(last) if last.id == id && last.end == s => last.end = e,
                _ => self.extents.push(Extent {
                    id,
                    start: s,
                    end: e,
                }),
            }
        }
        true
    }
}

/// The parts of `[start, end)` that `covered` does not hold, in order.
fn gaps(covered: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    for &(s, e) in covered {
        if e <= at {
            continue;
        }
        if s >= end {
            break;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
        if at >= end {
            break;
        }
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// Adds `[start, end)` to `covered`, keeping it sorted and merged.
fn merge(covered: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let (mut s, mut e) = (start, end);
    // Everything that overlaps or touches [s, e) is folded into it.
    let first = covered.partition_point(|&(_, ce)| ce < s);
    let mut last = first;
    while let Some(&(cs, ce)) = covered.get(last) {
        if cs > e {
            break;
        }
        s = s.min(cs);
        e = e.max(ce);
        last += 1;
    }
    covered.splice(first..last, std::iter::once((s, e)));
}

impl AccessLog {
    /// A log written to `path`.
    pub(crate) fn new(path: &Path) -> AccessLog {
        AccessLog {
            path: path.to_path_buf(),
            state: Mutex::new(Recorded::default()),
            dirty: AtomicBool::new(false),
        }
    }

    /// Notes a read of bytes `[offset, offset + len)` of `id`.
    pub(crate) fn record(&self, id: InodeId, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if lock(&self.state).record(id, offset, end) {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// The list's text: one line per stretch (see the module documentation).
    fn text(&self, image: &Image) -> String {
        let extents = lock(&self.state).extents.clone();
        let b = image.bootstrap();
        let mut text = String::new();
        for x in extents {
            let p = image.path_of(x.id);
            // A name with a newline cannot be written one per line.
            if p.contains('\n') {
                continue;
            }
            text.push_str(&p);
            let size = b.inode(x.id).map(|i| i.size()).unwrap_or(u64::MAX);
            if x.start != 0 || x.end < size {
                text.push_str(&format!("\t{}\t{}", x.start, x.end - x.start));
            }
            text.push('\n');
        }
        text
    }

    /// Writes the list if it changed since the last write.
    pub(crate) fn write(&self, image: &Image) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let text = self.text(image);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn extents(r: &Recorded) -> Vec<(u32, u64, u64)> {
        r.extents.iter().map(|x| (x.id.0, x.start, x.end)).collect()
    }

    #[test]
    fn stretches_in_first_read_order_extended_when_continued() {
        let mut r = Recorded::default();
        let (a, b) = (InodeId(1), InodeId(2));
        assert!(r.record(a, 0, 4096));
        assert!(r.record(a, 4096, 8192)); // continues: extends
        assert!(r.record(b, 100, 200));
        assert!(r.record(a, 16384, 20480)); // a again, after b
        assert!(!r.record(a, 0, 8192)); // nothing new
        assert!(r.record(a, 4096, 12288)); // only 8192..12288 is new
        assert!(!r.record(b, 150, 150)); // empty
        assert_eq!(
            extents(&r),
            vec![
                (1, 0, 8192),
                (2, 100, 200),
                (1, 16384, 20480),
                (1, 8192, 12288)
            ]
        );
        assert_eq!(r.covered[&a], vec![(0, 12288), (16384, 20480)]);
    }

    #[test]
    fn a_read_across_holes_records_only_the_holes() {
        let mut r = Recorded::default();
        let a = InodeId(3);
        r.record(a, 10, 20);
        r.record(a, 30, 40);
        r.record(a, 0, 50);
        assert_eq!(
            extents(&r),
            vec![
                (3, 10, 20),
                (3, 30, 40),
                (3, 0, 10),
                (3, 20, 30),
                (3, 40, 50)
            ]
        );
        assert_eq!(r.covered[&a], vec![(0, 50)]);
    }
}
