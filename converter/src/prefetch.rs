//! The prefetch list: what `skiff convert --prefetch-list` reads and how it
//! becomes the bootstrap's PREFETCH and PREFETCH_RANGES tables.
//!
//! A list is text, one entry per line, in the order to fetch: `PATH` (the
//! whole file) or `PATH<TAB>OFFSET<TAB>LENGTH` (that stretch of the file's
//! bytes), as `skiff mount --record-access` writes it. Paths are absolute
//! in the merged tree and resolved without following symlinks; blank lines
//! and lines starting with `#` are skipped. A path that names nothing is
//! skipped with a warning; so is a stretch of something that is not a
//! regular file, or past its end.
//!
//! Stretches are mapped to the entries of the file's chunk map that hold
//! their bytes (the chunking of this conversion, which need not be the one
//! of the image the list was recorded on). When the list has any stretch,
//! every entry becomes a range (a whole file: its whole map), so that a
//! reader of PREFETCH_RANGES fetches what the list says in its order;
//! PREFETCH still names each file once, for readers of format 1.2.

use std::collections::HashSet;

use skiff_format::{ImageTree, NodeData, NodeId, PrefetchRange};

use crate::tree::TreeBuilder;

/// One line of a prefetch list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchEntry {
    /// Absolute path in the merged tree.
    pub path: String,
    /// `(offset, length)` in the file's bytes; `None`: the whole file.
    pub range: Option<(u64, u64)>,
}

/// Parses a prefetch list (see the module documentation). A line whose
/// last two tab-separated fields are numbers is a stretch; any other line
/// is a path (which may itself hold tabs).
pub fn parse_prefetch_list(text: &str) -> Vec<PrefetchEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let mut fields = line.rsplitn(3, '\t');
            let (len, off, path) = (fields.next(), fields.next(), fields.next());
            match (path, off.and_then(num), len.and_then(num)) {
                (Some(path), Some(off), Some(len)) => PrefetchEntry {
                    path: path.to_string(),
                    range: Some((off, len)),
                },
                _ => PrefetchEntry {
                    path: line.trim().to_string(),
                    range: None,
                },
            }
        })
        .collect()
}

fn num(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// The PREFETCH and PREFETCH_RANGES tables for `entries` in `tree`.
pub(crate) fn resolve(
    tree: &TreeBuilder,
    entries: &[PrefetchEntry],
) -> (Vec<NodeId>, Vec<PrefetchRange>) {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    let mut ranges = Vec::new();
    let any_range = entries.iter().any(|e| e.range.is_some());
    for entry in entries {
        let parts: Vec<&[u8]> = entry
            .path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .map(str::as_bytes)
            .collect();
        let Some(id) = tree.resolve(&parts) else {
            tracing::warn!("prefetch list: {}: not in the image; skipped", entry.path);
            continue;
        };
        if any_range {
            match map_range(tree.tree(), id, entry.range) {
                Ok(Some(r)) => ranges.push(r),
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!("prefetch list: {}: {why}; skipped", entry.path);
                    continue;
                }
            }
        }
        if seen.insert(id) {
            files.push(id);
        }
    }
    (files, ranges)
}

/// The chunk-map entries of `node` that hold bytes `range` (all of them for
/// `None`); `Ok(None)` when that is no entry (an empty file, or a stretch
/// that only covers holes).
fn map_range(
    tree: &ImageTree,
    node: NodeId,
    range: Option<(u64, u64)>,
) -> Result<Option<PrefetchRange>, String> {
    let (size, chunks) = match tree.nodes.get(node).map(|n| &n.data) {
        Some(NodeData::Regular { size, chunks }) => (*size, chunks),
        Some(NodeData::Directory { .. }) if range.is_none() => return Ok(None),
        _ => return Err("not a regular file".into()),
    };
    let (from, to) = match range {
        None => (0, u64::MAX),
        Some((off, len)) if off < size => (off, off.saturating_add(len)),
        Some((off, _)) => return Err(format!("offset {off} is past the file's end ({size})")),
    };
    let len_of = |i: usize| {
        chunks
            .get(i)
            .and_then(|c| tree.chunks.get(c.chunk_index as usize))
            .map_or(0, |c| u64::from(c.uncompressed_size))
    };
    // The map is sorted by offset and non-overlapping.
    let first = chunks
        .partition_point(|c| c.file_offset < from)
        .saturating_sub(1);
    let mut lo = None;
    let mut hi = 0;
    for (i, c) in chunks.iter().enumerate().skip(first) {
        if c.file_offset >= to {
            break;
        }
        if c.file_offset + len_of(i) > from {
            lo.get_or_insert(i);
            hi = i + 1;
        }
    }
    let Some(lo) = lo else { return Ok(None) };
    let as_u32 = |v: usize| u32::try_from(v).map_err(|_| format!("chunk map entry {v} beyond u32"));
    Ok(Some(PrefetchRange {
        node,
        first: as_u32(lo)?,
        count: as_u32(hi - lo)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_paths_or_stretches() {
        let list = "# comment\n/usr/bin/python3\n\n/usr/lib/libx.so\t4096\t8192\n/odd\tname\n/t\tab\t1\t2\r\n";
        assert_eq!(
            parse_prefetch_list(list),
            vec![
                PrefetchEntry {
                    path: "/usr/bin/python3".into(),
                    range: None
                },
                PrefetchEntry {
                    path: "/usr/lib/libx.so".into(),
                    range: Some((4096, 8192))
                },
                PrefetchEntry {
                    path: "/odd\tname".into(),
                    range: None
                },
                PrefetchEntry {
                    path: "/t\tab".into(),
                    range: Some((1, 2))
                },
            ]
        );
    }
}
