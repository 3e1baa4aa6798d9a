//! Which files a container's start rarely reads: they are stored after the
//! rest of their layer's blob.
//!
//! A lazy mount fetches what a workload reads and guesses the rest from
//! the blob: a read that misses brings along the chunks stored beside it,
//! and a reader that walks forward through the blob has the next stretch
//! read ahead (fusefs `window.rs`, `readahead.rs`). Stored in tar order,
//! the files a workload reads sit among files it never opens: the test
//! suites of its packages, their documentation, the Python sources whose
//! compiled bytecode the interpreter loads instead. Every byte of those
//! that a guess brings along is link time taken from the reads that wait.
//! So the converter stores such files after everything else of the layer
//! ([`crate::pipeline::Lane::Cold`]); the tree, the chunk table and every
//! byte served are the same, only blob offsets differ.
//!
//! A file is cold when:
//! - a directory on its path is named `test`, `tests` or `testdata`;
//! - it is under `usr/share/doc`, `usr/share/man`, `usr/share/info`,
//!   `usr/share/locale` or `usr/include`;
//! - its name ends in `.h`, `.hpp`, `.a` (static libraries) or `.pyi`
//!   (type stubs);
//! - it is a Python source `DIR/NAME.py` and a compiled `DIR/__pycache__/
//!   NAME.*.pyc` came before it in the image (tar order puts `__pycache__`
//!   ahead of lowercase names): the interpreter stats the source and reads
//!   the bytecode.
//!
//! A cold file that is read anyway costs a miss of its own, never a wrong
//! byte. Measured on the bench's `python` image (about 40% of its file
//! bytes cold), alternated runs, one mount each, caches dropped, against
//! the same converter with `--tar-order`, over 100 Mbit/s with 20 ms RTT:
//! `import numpy, pandas` without a prefetch list 5.19-5.52 s against
//! 5.70-5.90 s (3 runs each), 44.7-46.4 MB over the link against
//! 49.5-51.6 MB; reading every file 11.31-11.52 s against 11.34-11.38 s (2);
//! random reads across 1,500 files 10.2-11.4 s against 11.0-11.7 s (2);
//! `python3 -c pass` 1.58 s against 1.58 s (medians of 7). Over 1 Gbit/s
//! with 1 ms the import took 1.77-2.10 s against 1.80-1.97 s (3), with
//! 41-44 MB against 53-55 MB. The conversion itself is as fast (2.55 s
//! either way: cold chunks wait in a temporary file, compressed).
//! `skiff convert --tar-order` keeps tar order.

use std::collections::HashSet;

/// Directory names whose contents are test suites.
const TEST_DIRS: [&[u8]; 3] = [b"test", b"tests", b"testdata"];
/// Trees of documentation and build inputs, relative to the root.
const COLD_TREES: [&[u8]; 5] = [
    b"usr/share/doc/",
    b"usr/share/man/",
    b"usr/share/info/",
    b"usr/share/locale/",
    b"usr/include/",
];
/// File name endings of headers, static libraries and type stubs.
const COLD_SUFFIXES: [&[u8]; 4] = [b".h", b".hpp", b".a", b".pyi"];

/// Tells cold files from the rest, remembering the compiled Python modules
/// met so far in the image.
#[derive(Debug, Default)]
pub struct ColdFiles {
    /// `DIR/NAME` of every `DIR/__pycache__/NAME.*.pyc` met.
    compiled: HashSet<Vec<u8>>,
}

impl ColdFiles {
    /// Whether the regular file at `path` (as the tar names it: relative,
    /// `/`-separated, maybe with a leading `./` or `/`) is cold. Call it for
    /// every regular file in tar order: it notes compiled modules.
    pub fn is_cold(&mut self, path: &[u8]) -> bool {
        let path = trim_root(path);
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        if name.ends_with(b".pyc") {
            if let Some(source) = compiled_source(dir, name) {
                self.compiled.insert(source);
            }
        }
        if dir.split(|&b| b == b'/').any(|d| TEST_DIRS.contains(&d)) {
            return true;
        }
        if COLD_TREES.iter().any(|t| path.starts_with(t)) {
            return true;
        }
        if COLD_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            return true;
        }
        if let Some(stem) = name.strip_suffix(b".py") {
            let mut key = dir.to_vec();
            key.push(b'/');
            key.extend_from_slice(stem);
            return self.compiled.contains(&key);
        }
        false
    }
}

/// `a/b/__pycache__/mod.cpython-311.pyc` (as `dir` = `a/b/__pycache__`,
/// `name` = `mod.cpython-311.pyc`) -> `a/b/mod`.
fn compiled_source(dir: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let parent = dir.strip_suffix(b"/__pycache__")?;
    let stem = &name[..name.iter().position(|&b| b == b'.')?];
    if stem.is_empty() {
        return None;
    }
    let mut key = parent.to_vec();
    key.push(b'/');
    key.extend_from_slice(stem);
    Some(key)
}

/// `./usr/x`, `/usr/x` and `usr/x` alike.
fn trim_root(mut path: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = path.strip_prefix(b"./") {
            path = rest;
        } else if let Some(rest) = path.strip_prefix(b"/") {
            path = rest;
        } else {
            return path;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_docs_headers_and_compiled_sources_are_cold() {
        let mut c = ColdFiles::default();
        for p in [
            "usr/lib/python3/dist-packages/pandas/tests/frame/test_api.py",
            "./usr/lib/go/src/net/testdata/a.txt",
            "/usr/share/doc/bash/README",
            "usr/share/man/man1/ls.1.gz",
            "usr/include/stdio.h",
            "opt/app/include/x.hpp",
            "usr/lib/x86_64-linux-gnu/libc_nonshared.a",
            "usr/lib/python3/dist-packages/numpy/__init__.pyi",
        ] {
            assert!(c.is_cold(p.as_bytes()), "{p} should be cold");
        }
        for p in [
            "usr/bin/python3.11",
            "usr/lib/x86_64-linux-gnu/libc.so.6",
            "usr/share/zoneinfo/UTC",
            "app/contest/main.py",
            "app/testing.py",
            "usr/lib/python3.11/os.py",
        ] {
            assert!(!c.is_cold(p.as_bytes()), "{p} should not be cold");
        }
    }

    #[test]
    fn a_python_source_is_cold_once_its_bytecode_came_before_it() {
        let mut c = ColdFiles::default();
        assert!(
            !c.is_cold(b"usr/lib/python3.11/os.py"),
            "no bytecode met yet"
        );
        assert!(!c.is_cold(b"usr/lib/python3.11/__pycache__/os.cpython-311.pyc"));
        assert!(!c.is_cold(b"usr/lib/python3.11/__pycache__/re.cpython-311.opt-1.pyc"));
        assert!(c.is_cold(b"usr/lib/python3.11/os.py"));
        assert!(c.is_cold(b"./usr/lib/python3.11/re.py"));
        assert!(!c.is_cold(b"usr/lib/python3.11/sys.py"), "other module");
        assert!(!c.is_cold(b"usr/lib/python3.12/os.py"), "other directory");
        // A `__pycache__` with nothing before its first dot names no module.
        assert!(!c.is_cold(b"a/__pycache__/.pyc"));
        assert!(!c.is_cold(b"a/.py"));
    }
}
