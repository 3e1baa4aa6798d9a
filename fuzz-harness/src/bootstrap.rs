//! The bootstrap target: arbitrary bytes as a bootstrap.
//!
//! The bytes go to the reader twice: as they are (which mostly exercises
//! the header and CRC checks) and resealed, with every CRC recomputed (which
//! lets the fuzzer reach the structural checks behind them). A bootstrap
//! that validates must decode to a tree the writer accepts and that survives
//! another round trip unchanged; every accessor must answer or fail cleanly.
//! Each is read twice more, opened lazily (blocks checked on first read, as
//! the mount opens it): what opens eagerly opens lazily, and validates
//! alike.

use skiff_format::{dump, reseal, write_bootstrap, BlockMarks, Bootstrap, InodeId};

use crate::Outcome;

/// Feeds `data` to the bootstrap reader; see the module documentation.
pub fn bootstrap(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    out.push("parse", &exercise(data));
    out.push("parse-lazy", &exercise_lazy(data));
    let mut sealed = data.to_vec();
    if reseal(&mut sealed).is_ok() {
        out.push("parse-resealed", &exercise(&sealed));
        out.push("parse-lazy-resealed", &exercise_lazy(&sealed));
    }
    out
}

/// Opens `data` lazily and calls every accessor; Ok when it validates.
fn exercise_lazy(data: &[u8]) -> Result<(), String> {
    let marks = BlockMarks::for_len(data.len());
    let b = Bootstrap::parse_lazy(data, &marks).map_err(|e| e.to_string())?;
    let valid = b.validate();
    walk(&b, valid.is_ok());
    valid.map_err(|e| e.to_string())
}

/// Parses and validates `data`, then calls every accessor on what parsed.
/// Ok when the bootstrap parses and validates.
fn exercise(data: &[u8]) -> Result<(), String> {
    let b = Bootstrap::parse(data).map_err(|e| e.to_string())?;
    let valid = b.validate();
    let tree = b.to_tree();
    if valid.is_ok() != tree.is_ok() {
        panic!(
            "validate and to_tree disagree: validate {:?}, to_tree {:?}",
            valid.as_ref().err(),
            tree.as_ref().err()
        );
    }
    if let Ok(tree) = &tree {
        let again = match write_bootstrap(tree) {
            Ok(bytes) => bytes,
            Err(e) => panic!("a validated bootstrap's tree is not writable: {e}"),
        };
        let back = Bootstrap::parse(&again).and_then(|b| b.to_tree());
        if back.as_ref().ok() != Some(tree) {
            panic!("a validated tree does not survive a round trip: {back:?}");
        }
    }
    let _ = dump(&b);
    walk(&b, valid.is_ok());
    let marks = BlockMarks::for_len(data.len());
    match Bootstrap::parse_lazy(data, &marks) {
        Ok(lazy) => {
            let lazy_valid = lazy.validate();
            if lazy_valid.is_ok() != valid.is_ok() {
                panic!("eager and lazy opens disagree: {valid:?} against {lazy_valid:?}");
            }
            walk(&lazy, valid.is_ok());
        }
        Err(e) => panic!("parses eagerly, not lazily: {e}"),
    }
    valid.map_err(|e| e.to_string())
}

/// Every accessor of `b`; `valid` is whether it validated.
fn walk(b: &Bootstrap<'_>, valid: bool) {
    let _ = b.prefetch();
    let _ = b.prefetch_ranges();
    for i in 0..b.chunk_count().min(256) {
        let _ = b.chunk(i);
    }
    for i in 0..b.blob_count().min(256) {
        let _ = b.blob(i);
    }
    for i in 0..b.inode_count().min(256) {
        let id = InodeId(i);
        let Ok(inode) = b.inode(id) else { continue };
        // What the mount checks once per inode before serving it: a valid
        // bootstrap passes it for every inode.
        let checked = b.check_inode(id);
        if valid {
            if let Err(e) = checked {
                panic!("validate passes, check_inode of inode {i} fails: {e}");
            }
        }
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
