//! Reading one layer's tar stream into the merged tree.
//!
//! The `tar` crate handles the header dialects (ustar, GNU long names and
//! links, PAX local headers). This module adds what it leaves to the caller:
//! PAX global headers (their keys apply to every later entry that does not set
//! them itself), PAX `mtime` with nanoseconds, `uid`/`gid` beyond the header
//! fields, and xattrs from `SCHILY.xattr.*` records.

use std::collections::BTreeMap;
use std::io::Read;

use skiff_format::{Attrs, FileChunk, Node, NodeData};
use tar::EntryType;

use crate::convert::Converter;
use crate::error::ConvertError;
use crate::tree::{is_whiteout, split_path};

/// PAX records that apply to an entry: its own, over the global ones.
#[derive(Default, Clone)]
struct Pax {
    records: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Pax {
    fn read(ext: Option<tar::PaxExtensions<'_>>) -> Result<Self, String> {
        let mut records = BTreeMap::new();
        if let Some(ext) = ext {
            for e in ext {
                let e = e.map_err(|err| format!("malformed PAX header: {err}"))?;
                records.insert(e.key_bytes().to_vec(), e.value_bytes().to_vec());
            }
        }
        Ok(Pax { records })
    }

    fn over(mut self, global: &Pax) -> Pax {
        for (k, v) in &global.records {
            self.records.entry(k.clone()).or_insert_with(|| v.clone());
        }
        self
    }

    fn get(&self, key: &str) -> Option<&[u8]> {
        self.records.get(key.as_bytes()).map(Vec::as_slice)
    }

    fn number(&self, key: &str) -> Result<Option<u64>, String> {
        self.get(key)
            .map(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        format!("PAX {key} '{}' is not a number", String::from_utf8_lossy(v))
                    })
            })
            .transpose()
    }

    /// PAX `mtime`: decimal seconds with an optional fraction, maybe negative.
    fn mtime(&self) -> Result<Option<(i64, u32)>, String> {
        let Some(v) = self.get("mtime") else {
            return Ok(None);
        };
        let s = std::str::from_utf8(v).map_err(|_| "PAX mtime is not UTF-8".to_string())?;
        let bad = || format!("PAX mtime '{s}' is not a time");
        let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
        let negative = int.starts_with('-');
        let secs: i64 = int.parse().map_err(|_| bad())?;
        let mut nanos: u32 = 0;
        for (i, c) in frac.chars().take(9).enumerate() {
            let d = c.to_digit(10).ok_or_else(bad)?;
            nanos += d * 10u32.pow(8 - i as u32);
        }
        if negative && nanos > 0 {
            // -1.25 is 1.25 s before the epoch: seconds -2, nanoseconds 0.75e9.
            Ok(Some((secs - 1, 1_000_000_000 - nanos)))
        } else {
            Ok(Some((secs, nanos)))
        }
    }

    fn xattrs(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        const PREFIX: &[u8] = b"SCHILY.xattr.";
        self.records
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(PREFIX)?;
                (!name.is_empty()).then(|| (name.to_vec(), v.clone()))
            })
            .collect()
    }
}

impl Converter {
    /// Applies every entry of one decompressed layer stream.
    pub(crate) fn read_tar<R: Read>(&mut self, layer: &str, reader: R) -> Result<(), ConvertError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| ConvertError::Layer {
            layer: layer.to_string(),
            message: format!("not a tar stream: {e}"),
        })?;
        let mut global = Pax::default();
        for entry in entries {
            let mut entry = entry.map_err(|e| ConvertError::Layer {
                layer: layer.to_string(),
                message: format!("unreadable tar entry (truncated or corrupt layer?): {e}"),
            })?;
            let path = entry.path_bytes().into_owned();
            let fail = |message: String| ConvertError::Entry {
                layer: layer.to_string(),
                entry: String::from_utf8_lossy(&path).into_owned(),
                message,
            };
            let kind = entry.header().entry_type();
            if kind == EntryType::XGlobalHeader {
                let mut body = Vec::new();
                entry
                    .read_to_end(&mut body)
                    .map_err(|e| fail(format!("reading a PAX global header: {e}")))?;
                let g = Pax::read(Some(tar::PaxExtensions::new(&body))).map_err(fail)?;
                global = g.over(&global);
                continue;
            }
            let pax = Pax::read(entry.pax_extensions().map_err(|e| fail(e.to_string()))?)
                .map_err(fail)?
                .over(&global);
            self.apply_entry(&mut entry, kind, &path, &pax)
                .map_err(|e| match e {
                    ConvertError::Invalid(message) => fail(message),
                    other => other,
                })?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        path: &[u8],
        pax: &Pax,
    ) -> Result<(), ConvertError> {
        let parts = split_path(path)?;
        if let Some(name) = parts.last() {
            if is_whiteout(name) {
                self.stats.whiteouts += 1;
                return Ok(self.tree.whiteout(&parts)?);
            }
        }
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| ConvertError::Invalid(format!("bad mode field: {e}")))?
            & 0o7777;
        let uid = match pax.number("uid")? {
            Some(v) => v,
            None => header
                .uid()
                .map_err(|e| ConvertError::Invalid(format!("bad uid field: {e}")))?,
        };
        let gid = match pax.number("gid")? {
            Some(v) => v,
            None => header
                .gid()
                .map_err(|e| ConvertError::Invalid(format!("bad gid field: {e}")))?,
        };
        let (mtime_sec, mtime_nsec) = match pax.mtime()? {
            Some(t) => t,
            None => {
                let m = header
                    .mtime()
                    .map_err(|e| ConvertError::Invalid(format!("bad mtime field: {e}")))?;
                (i64::try_from(m).unwrap_or(i64::MAX), 0)
            }
        };
        let attrs = Attrs {
            mode,
            uid: u32::try_from(uid)
                .map_err(|_| ConvertError::Invalid(format!("uid {uid} does not fit 32 bits")))?,
            gid: u32::try_from(gid)
                .map_err(|_| ConvertError::Invalid(format!("gid {gid} does not fit 32 bits")))?,
            mtime_sec,
            mtime_nsec,
        };
        let xattrs = pax.xattrs();
        let device = |what: &str| -> Result<(u32, u32), ConvertError> {
            let major = header
                .device_major()
                .map_err(|e| ConvertError::Invalid(format!("bad {what} major: {e}")))?
                .unwrap_or(0);
            let minor = header
                .device_minor()
                .map_err(|e| ConvertError::Invalid(format!("bad {what} minor: {e}")))?
                .unwrap_or(0);
            Ok((major, minor))
        };
        let data = match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                let chunks = self.chunk_file(entry)?;
                NodeData::Regular { size, chunks }
            }
            EntryType::Directory => NodeData::Directory {
                entries: BTreeMap::new(),
            },
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ConvertError::Invalid("symlink without a target".into()))?
                    .into_owned();
                if target.is_empty() || target.contains(&0) {
                    return Err(ConvertError::Invalid(
                        "symlink target is empty or has a NUL byte".into(),
                    ));
                }
                NodeData::Symlink { target }
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ConvertError::Invalid("hard link without a target".into()))?
                    .into_owned();
                let target_parts = split_path(&target)?;
                self.stats.hard_links += 1;
                self.tree.hard_link(&parts, &target_parts).map_err(|m| {
                    ConvertError::Invalid(format!("{m} '{}'", String::from_utf8_lossy(&target)))
                })?;
                return Ok(());
            }
            EntryType::Char => {
                let (major, minor) = device("character device")?;
                NodeData::CharDevice { major, minor }
            }
            EntryType::Block => {
                let (major, minor) = device("block device")?;
                NodeData::BlockDevice { major, minor }
            }
            EntryType::Fifo => NodeData::Fifo,
            other => {
                return Err(ConvertError::Invalid(format!(
                    "unsupported tar entry type {:?} (byte {})",
                    other,
                    other.as_byte()
                )))
            }
        };
        self.stats.entries += 1;
        if matches!(data, NodeData::Regular { .. }) {
            self.stats.files += 1;
        }
        self.tree.insert(
            &parts,
            Node {
                attrs,
                data,
                xattrs,
            },
        )?;
        Ok(())
    }

    /// Cuts a file's content into chunks and registers them; all-zero chunks
    /// become holes.
    fn chunk_file<R: Read>(&mut self, entry: &mut R) -> Result<Vec<FileChunk>, ConvertError> {
        let mut chunks = Vec::new();
        // The chunker's buffer is reused across files; take it out of `self`
        // so the callback may borrow `self` mutably.
        let mut chunker = self
            .chunker
            .take()
            .unwrap_or_else(|| crate::chunker::Chunker::new(self.options.chunking));
        let result =
            chunker.for_each_chunk(entry, |offset, data: &[u8]| -> Result<(), ConvertError> {
                self.stats.file_bytes += data.len() as u64;
                if is_zero(data) {
                    self.stats.hole_bytes += data.len() as u64;
                    return Ok(());
                }
                let chunk_index = self.add_chunk(data)?;
                chunks.push(FileChunk {
                    file_offset: offset,
                    chunk_index,
                });
                Ok(())
            });
        self.chunker = Some(chunker);
        result.map_err(|e| match e {
            ConvertError::Io { source, .. } => ConvertError::Invalid(format!(
                "reading file content (truncated or corrupt layer?): {source}"
            )),
            other => other,
        })?;
        Ok(chunks)
    }
}

fn is_zero(data: &[u8]) -> bool {
    // Compare 16-byte words: the compiler vectorises this well.
    let (words, rest) = data.split_at(data.len() - data.len() % 16);
    words
        .chunks_exact(16)
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&b| b == 0)
}
