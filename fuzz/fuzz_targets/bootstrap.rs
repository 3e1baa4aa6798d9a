//! Feeds arbitrary bytes to the bootstrap reader, twice: as they are (which
//! mostly exercises the header and CRC checks) and resealed, with every CRC
//! recomputed (which lets the fuzzer reach the structural checks behind
//! them). Errors are fine; panics, hangs and huge allocations are bugs.
//! Run with `cargo fuzz run bootstrap` from this directory; seed the corpus
//! with bootstraps written by `skiff convert` or the format tests.

#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_format::{dump, reseal, write_bootstrap, Bootstrap, InodeId};

fuzz_target!(|data: &[u8]| {
    exercise(data);
    let mut sealed = data.to_vec();
    if reseal(&mut sealed).is_ok() {
        exercise(&sealed);
    }
});

fn exercise(data: &[u8]) {
    let Ok(b) = Bootstrap::parse(data) else {
        return;
    };
    let valid = b.validate().is_ok();
    let tree = b.to_tree();
    assert_eq!(valid, tree.is_ok(), "validate and to_tree disagree");
    if let Ok(tree) = tree {
        // A valid bootstrap must decode to a tree the writer accepts and
        // that survives another round trip unchanged.
        let again = write_bootstrap(&tree).expect("validated tree must be writable");
        let back = Bootstrap::parse(&again).and_then(|b| b.to_tree());
        assert_eq!(back.ok().as_ref(), Some(&tree));
    }
    let _ = dump(&b);
    let _ = b.prefetch();
    for i in 0..b.chunk_count().min(256) {
        let _ = b.chunk(i);
    }
    for i in 0..b.blob_count().min(256) {
        let _ = b.blob(i);
    }
    for i in 0..b.inode_count().min(256) {
        let id = InodeId(i);
        let Ok(inode) = b.inode(id) else { continue };
        // What the mount checks once per inode; a valid bootstrap passes it.
        let checked = b.check_inode(id);
        assert!(!valid || checked.is_ok(), "validate passes, check_inode fails");
        let _ = (inode.kind(), inode.nlink(), b.inode(inode.parent()));
        let _ = b.dir_len(id);
        let _ = b.dir_entry(id, 0);
        if let Ok(entries) = b.dir_entries(id) {
            for e in entries.take(64).flatten() {
                let _ = b.lookup(id, e.name);
            }
        }
        let _ = b.lookup(id, b"missing");
        let _ = b.symlink_target(id);
        if let Ok(xattrs) = b.xattrs(id) {
            for (name, _) in xattrs.take(64).flatten() {
                let _ = b.getxattr(id, name);
            }
        }
        let _ = b.file_chunks(id);
        for (offset, len) in [(0, 1), (0, u64::MAX), (4096, 65536), (u64::MAX, 1)] {
            let _ = b.chunks_in_range(id, offset, len);
        }
    }
    for path in [&b"/"[..], b"a/b", b"../x", b"//a/./b/"] {
        let _ = b.resolve_path(path);
    }
}
