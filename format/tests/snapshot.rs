//! Pins the annotated dump of a small fixed tree to a checked-in file, and so
//! the byte layout of `docs/format.md` to the code. After an intended format
//! change, regenerate with `UPDATE_SNAPSHOTS=1 cargo test -p skiff-format
//! --test snapshot` and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::Builder;
use skiff_format::{dump, Bootstrap, NodeData, PrefetchRange, SharedFrame};

fn small() -> Vec<u8> {
    let mut b = Builder::new();
    let bin = b.dir(0, b"bin");
    let sh = b.file(bin, b"sh", &[4096, 100]);
    b.add(
        bin,
        b"ash",
        NodeData::Symlink {
            target: b"sh".to_vec(),
        },
    );
    let dev = b.dir(0, b"dev");
    b.add(dev, b"null", NodeData::CharDevice { major: 1, minor: 3 });
    b.add(dev, b"initctl", NodeData::Fifo);
    b.link(0, b"sh-hardlink", sh);
    let n = &mut b.tree.nodes[sh];
    n.attrs.mode = 0o4755;
    n.attrs.mtime_nsec = 500_000_000;
    n.xattrs.insert(
        b"security.capability".to_vec(),
        vec![1, 0, 0, 2, 0x20, 0, 0, 0],
    );
    n.xattrs.insert(b"user.note".to_vec(), b"sh".to_vec());
    b.tree.nodes[dev].attrs.mtime_sec = -1;
    b.tree.prefetch = vec![sh];
    // Only the tail of `sh` first (format 1.3).
    b.tree.prefetch_ranges = vec![PrefetchRange {
        node: sh,
        first: 1,
        count: 1,
    }];
    // The 100-byte tail of `sh` lies in a shared frame (format 1.1).
    let tail = &mut b.tree.chunks[1];
    tail.compressed = true;
    tail.frame = Some(SharedFrame {
        offset: 16,
        size: 4096,
    });
    b.write()
}

#[test]
fn small_dump_matches_snapshot() {
    let bytes = small();
    let text = dump(&Bootstrap::parse(&bytes).unwrap()).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/small.dump");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    if text != expected {
        for (i, (got, want)) in text.lines().zip(expected.lines()).enumerate() {
            if got != want {
                panic!(
                    "dump differs from {} at line {}:\n got: {got}\nwant: {want}",
                    path.display(),
                    i + 1
                );
            }
        }
        panic!("dump differs from {} in length", path.display());
    }
}
