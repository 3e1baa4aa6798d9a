//! Reading one layer's tar stream into the merged tree.
//!
//! The `tar` crate handles the header dialects (ustar, GNU long names and
//! links, PAX local headers). This module adds what it leaves to the caller:
//! PAX global headers (their keys apply to every later entry that does not set
//! them itself), PAX `mtime` with nanoseconds, `uid`/`gid` beyond the header
//! fields, and xattrs from `SCHILY.xattr.*` records.
//!
//! PAX records are read here, by their length prefix, from the raw bytes of
//! the extended header (see [`Tap`]): the `tar` crate (0.4.46) splits a PAX
//! body on newlines, which breaks values that hold one (binary xattrs such
//! as a `security.capability` with byte 0x0a, a path with a newline) and can
//! frame the tail of such a value as a record of its own.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::rc::Rc;

use skiff_format::{Attrs, FileChunk, Node, NodeData};
use tar::EntryType;

use crate::convert::Converter;
use crate::error::ConvertError;
use crate::pipeline::Lane;
use crate::tree::{is_whiteout, split_path};

/// PAX records that apply to an entry: its own, over the global ones.
#[derive(Default, Clone)]
struct Pax {
    records: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Pax {
    /// Parses a PAX extended header body: `LEN KEY=VALUE\n` records, each
    /// framed by its length (so values may hold any byte, `\n` included).
    fn parse(mut body: &[u8]) -> Result<Self, String> {
        let mut records = BTreeMap::new();
        while !body.iter().all(|&b| b == 0) {
            let bad = |what: &str| format!("malformed PAX header: {what}");
            let space = body
                .iter()
                .position(|&b| b == b' ')
                .ok_or_else(|| bad("a record has no length"))?;
            let len: usize = std::str::from_utf8(&body[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("a record length is not a number"))?;
            if len <= space + 1 || len > body.len() {
                return Err(bad("a record length is out of range"));
            }
            let record = body[space + 1..len]
                .strip_suffix(b"\n")
                .ok_or_else(|| bad("a record does not end in a newline"))?;
            let eq = record
                .iter()
                .position(|&b| b == b'=')
                .ok_or_else(|| bad("a record has no '='"))?;
            records.insert(record[..eq].to_vec(), record[eq + 1..].to_vec());
            body = &body[len..];
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

/// What the tar reader read while it looked for the next entry.
#[derive(Default)]
struct TapState {
    /// Record what is read (only around `Entries::next`).
    recording: bool,
    /// Bytes read so far: the stream position.
    pos: u64,
    /// Stream position of `bytes[0]`.
    start: u64,
    /// The bytes read while recording.
    bytes: Vec<u8>,
}

/// A reader that lets [`Converter::read_tar`] see the raw extension headers
/// (PAX `x`, GNU `L`/`K`) the `tar` crate consumed before an entry, so that
/// PAX records are framed by their length, not split on newlines.
struct Tap<R> {
    inner: R,
    state: Rc<RefCell<TapState>>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.borrow_mut();
        if state.recording {
            state.bytes.extend_from_slice(&buf[..n]);
        }
        state.pos += n as u64;
        Ok(n)
    }
}

/// A tar header's size field: octal, or base-256 when the top bit is set.
fn header_size(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The extension headers before the entry whose header is at stream
/// position `header_pos`: the raw body of its PAX `x` header (if any), and
/// whether a GNU long name (`L`) and long link (`K`) came with it.
///
/// The previous entry's data was read to its end, so the extension headers
/// start at the first 512-byte boundary of what was recorded; they must
/// lead exactly to `header_pos`, where the `tar` crate found the entry.
fn extension_headers(
    t: &TapState,
    header_pos: u64,
) -> Result<(Option<Vec<u8>>, bool, bool), String> {
    let lost = || "cannot find the entry's extension headers in the tar stream".to_string();
    let mut at = t.start.div_ceil(512) * 512;
    let (mut pax, mut long_name, mut long_link) = (None, false, false);
    while at < header_pos {
        let i = usize::try_from(at - t.start).map_err(|_| lost())?;
        let block = t.bytes.get(i..i + 512).ok_or_else(lost)?;
        let size = header_size(&block[124..136]).ok_or_else(lost)?;
        let len = usize::try_from(size).map_err(|_| lost())?;
        match block[156] {
            b'x' => {
                let body = t.bytes.get(i + 512..i + 512 + len).ok_or_else(lost)?;
                pax = Some(body.to_vec());
            }
            b'L' => long_name = true,
            b'K' => long_link = true,
            _ => return Err(lost()),
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    if at != header_pos {
        return Err(lost());
    }
    Ok((pax, long_name, long_link))
}

impl Converter {
    /// Applies every entry of one decompressed layer stream.
    pub(crate) fn read_tar<R: Read>(&mut self, layer: &str, reader: R) -> Result<(), ConvertError> {
        let tap = Rc::new(RefCell::new(TapState::default()));
        let mut archive = tar::Archive::new(Tap {
            inner: reader,
            state: tap.clone(),
        });
        let mut entries = archive.entries().map_err(|e| ConvertError::Layer {
            layer: layer.to_string(),
            message: format!("not a tar stream: {e}"),
        })?;
        let mut global = Pax::default();
        loop {
            {
                let mut t = tap.borrow_mut();
                t.recording = true;
                t.start = t.pos;
                t.bytes.clear();
            }
            let next = entries.next();
            tap.borrow_mut().recording = false;
            let Some(entry) = next else {
                break;
            };
            let mut entry = entry.map_err(|e| ConvertError::Layer {
                layer: layer.to_string(),
                message: format!("unreadable tar entry (truncated or corrupt layer?): {e}"),
            })?;
            let tar_path = entry.path_bytes().into_owned();
            let fail_at = |path: &[u8], message: String| ConvertError::Entry {
                layer: layer.to_string(),
                entry: String::from_utf8_lossy(path).into_owned(),
                message,
            };
            let (local, long_name, long_link) =
                extension_headers(&tap.borrow(), entry.raw_header_position())
                    .map_err(|m| fail_at(&tar_path, m))?;
            let local = match local {
                Some(body) => Pax::parse(&body).map_err(|m| fail_at(&tar_path, m))?,
                None => Pax::default(),
            };
            // Names: a GNU long name wins, as in the `tar` crate and Go's
            // archive/tar; then a PAX record as framed here; then the header.
            // Never the `tar` crate's own PAX lookup, which can take the
            // tail of a value holding a newline for a record.
            let path = match local.get("path") {
                _ if long_name => tar_path.clone(),
                Some(p) => p.to_vec(),
                None => entry.header().path_bytes().into_owned(),
            };
            let link = match local.get("linkpath") {
                _ if long_link => entry.link_name_bytes().map(|l| l.into_owned()),
                Some(l) => Some(l.to_vec()),
                None => entry.header().link_name_bytes().map(|l| l.into_owned()),
            };
            let fail = |message: String| fail_at(&path, message);
            let kind = entry.header().entry_type();
            if local.records.keys().any(|k| k.starts_with(b"GNU.sparse.")) {
                return Err(fail(
                    "PAX sparse files (GNU.sparse.* records) are not supported".into(),
                ));
            }
            if let Some(size) = local.number("size").map_err(fail)? {
                if size != entry.size() && kind != EntryType::GNUSparse {
                    return Err(fail(format!(
                        "the PAX size record says {size} bytes, the tar reader framed {}",
                        entry.size()
                    )));
                }
            }
            if kind == EntryType::XGlobalHeader {
                let mut body = Vec::new();
                entry
                    .read_to_end(&mut body)
                    .map_err(|e| fail(format!("reading a PAX global header: {e}")))?;
                let g = Pax::parse(&body).map_err(fail)?;
                global = g.over(&global);
                continue;
            }
            let pax = local.over(&global);
            self.apply_entry(&mut entry, kind, &path, link, &pax)
                .map_err(|e| match e {
                    ConvertError::Invalid(message) => fail(message),
                    other => other,
                })?;
            // Read what the entry left (a whiteout's or a link's content), so
            // that the next entry's headers start at the next block boundary.
            io::copy(&mut entry, &mut io::sink()).map_err(|e| ConvertError::Layer {
                layer: layer.to_string(),
                message: format!("unreadable tar entry (truncated or corrupt layer?): {e}"),
            })?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        path: &[u8],
        link: Option<Vec<u8>>,
        pax: &Pax,
    ) -> Result<(), ConvertError> {
        let parts = split_path(path)?;
        if let Some(name) = parts.last() {
            if is_whiteout(name) {
                self.stats.whiteouts += 1;
                return self.tree_whiteout(path, &parts);
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
                let before = self.stats.file_bytes;
                let lane = if self.options.cold_last && self.cold.is_cold(path) {
                    Lane::Cold
                } else {
                    Lane::Hot
                };
                let chunks = self.chunk_file(entry, size, lane)?;
                let read = self.stats.file_bytes - before;
                if read != size {
                    return Err(ConvertError::Invalid(format!(
                        "the layer ends inside this file: {read} of its {size} bytes are there \
                         (truncated layer?)"
                    )));
                }
                NodeData::Regular { size, chunks }
            }
            EntryType::Directory => NodeData::Directory {
                entries: BTreeMap::new(),
            },
            EntryType::Symlink => {
                let target =
                    link.ok_or_else(|| ConvertError::Invalid("symlink without a target".into()))?;
                if target.is_empty() || target.contains(&0) {
                    return Err(ConvertError::Invalid(
                        "symlink target is empty or has a NUL byte".into(),
                    ));
                }
                NodeData::Symlink { target }
            }
            EntryType::Link => {
                let target =
                    link.ok_or_else(|| ConvertError::Invalid("hard link without a target".into()))?;
                let target_parts = split_path(&target)?;
                self.stats.hard_links += 1;
                self.tree_hard_link(path, &target, &parts, &target_parts)
                    .map_err(|m| {
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
        self.tree_insert(
            path,
            &parts,
            Node {
                attrs,
                data,
                xattrs,
            },
        )
    }

    /// Cuts a file's content (`size` bytes by its header) into chunks and
    /// registers them, new ones to be stored in `lane`; all-zero chunks
    /// become holes.
    fn chunk_file<R: Read>(
        &mut self,
        entry: &mut R,
        size: u64,
        lane: Lane,
    ) -> Result<Vec<FileChunk>, ConvertError> {
        let policy = crate::chunker::LargeFiles::policy_for(
            self.options.large_files.as_ref(),
            self.options.chunking,
            size,
        );
        let mut chunks = Vec::new();
        // The chunker's buffer is reused across files; take it out of `self`
        // so the callback may borrow `self` mutably.
        let mut chunker = self
            .chunker
            .take()
            .unwrap_or_else(|| crate::chunker::Chunker::new(self.options.chunking));
        let result = chunker.for_each_chunk_as(
            policy,
            entry,
            |offset, data: &[u8]| -> Result<(), ConvertError> {
                self.stats.file_bytes += data.len() as u64;
                if is_zero(data) {
                    self.stats.hole_bytes += data.len() as u64;
                    return Ok(());
                }
                let chunk_index = self.add_chunk(data, lane)?;
                chunks.push(FileChunk {
                    file_offset: offset,
                    chunk_index,
                });
                Ok(())
            },
        );
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
