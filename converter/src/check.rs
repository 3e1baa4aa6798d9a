//! Verifying an image end to end (`skiff check`).
//!
//! Three layers of proof, each catching what the one before cannot:
//! the bootstrap's section CRCs and structural validation (every index in
//! range, directories sorted, no loops); every data blob's SHA-256 against
//! its OCI digest (a flipped byte anywhere in a blob, even in bytes no chunk
//! uses); and every chunk decoded and checked against its own digest, so a
//! fault is named by the file and chunk that hold it.

use std::collections::HashMap;

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use skiff_format::{Bootstrap, Digest, FileKind, InodeId};
use skiff_registry::BlobStore;

use crate::error::ConvertError;

/// Stop listing problems after this many; the count goes on.
const MAX_REPORTED: usize = 100;

/// The outcome of a check.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    /// Blobs whose digest was verified.
    pub blobs_checked: u64,
    /// Bytes of blobs read.
    pub blob_bytes: u64,
    /// Chunks decoded and verified.
    pub chunks_checked: u64,
    /// Problems found (at most 100 listed).
    pub problems: Vec<String>,
    /// Total number of problems.
    pub problem_count: u64,
}

impl CheckReport {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_REPORTED {
            self.problems.push(p);
        }
    }

    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problem_count == 0
    }
}

/// Checks a parsed bootstrap and every blob and chunk it references.
pub fn check(
    bootstrap: &Bootstrap<'_>,
    store: &dyn BlobStore,
) -> Result<CheckReport, ConvertError> {
    let mut report = CheckReport::default();
    if let Err(e) = bootstrap.validate() {
        report.problem(format!("bootstrap: {e}"));
        // Without a sound structure, chunk owners cannot be named; blobs can
        // still be checked.
    }
    const WINDOW: u64 = 8 << 20;
    for b in 0..bootstrap.blob_count() {
        let blob = bootstrap.blob(b)?;
        let mut hasher = Sha256::new();
        let mut offset = 0;
        let mut failed = false;
        while offset < blob.size {
            let len = WINDOW.min(blob.size - offset);
            match store.read_range(&blob.digest, offset, len) {
                Ok(bytes) => hasher.update(&bytes),
                Err(e) => {
                    report.problem(format!("blob {b} ({}): {e}", blob.digest));
                    failed = true;
                    break;
                }
            }
            offset += len;
        }
        report.blob_bytes += offset;
        if !failed {
            let actual = Digest(hasher.finalize().into());
            if actual != blob.digest {
                report.problem(format!(
                    "blob {b}: content is {actual}, but the bootstrap names it {}",
                    blob.digest
                ));
            }
            report.blobs_checked += 1;
        }
    }
    let mut owners: Option<HashMap<u32, (String, u64)>> = None;
    // Chunks are in blob order: the members of a shared frame follow one
    // another and are fetched and decoded once.
    let mut last = skiff_format::chunk::LastFrame::new();
    for i in 0..bootstrap.chunk_count() {
        let info = bootstrap.chunk(i)?;
        let blob = bootstrap.blob(info.blob_index)?;
        let result = if last.holds(&info) {
            last.chunk(&info).map(|_| ()).map_err(|e| e.to_string())
        } else {
            store
                .read_range(
                    &blob.digest,
                    info.compressed_offset,
                    u64::from(info.compressed_size),
                )
                .map_err(|e| e.to_string())
                .and_then(|stored| {
                    last.decode(&info, &stored)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
        };
        report.chunks_checked += 1;
        if let Err(e) = result {
            let owners = owners.get_or_insert_with(|| chunk_owners(bootstrap));
            let place = match owners.get(&i) {
                Some((path, off)) => format!("{path} at offset {off}"),
                None => "no file".to_string(),
            };
            report.problem(format!(
                "chunk {i} ({}) of blob {} used by {place}: {e}",
                info.digest, info.blob_index
            ));
        }
    }
    Ok(report)
}

/// Maps each chunk index to the first file (path, offset) that uses it.
/// Used only to name the culprit once something failed.
pub fn chunk_owners(bootstrap: &Bootstrap<'_>) -> HashMap<u32, (String, u64)> {
    let mut owners = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<(String, InodeId)> = vec![(String::new(), bootstrap.root())];
    while let Some((path, dir)) = stack.pop() {
        if !seen.insert(dir) {
            continue;
        }
        let Ok(entries) = bootstrap.dir_entries(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let child = format!("{path}/{}", String::from_utf8_lossy(entry.name));
            match entry.kind {
                FileKind::Directory => stack.push((child, entry.inode)),
                FileKind::Regular => {
                    if let Ok(chunks) = bootstrap.file_chunks(entry.inode) {
                        for c in chunks {
                            owners
                                .entry(c.chunk_index())
                                .or_insert_with(|| (child.clone(), c.file_offset()));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    owners
}
