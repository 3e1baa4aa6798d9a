//! A canonical text dump of a directory tree, for comparing two trees.
//!
//! [`dump`] walks a tree without following symlinks and records one line per
//! path, sorted by path:
//!
//! ```text
//! / type=dir mode=0755 uid=0 gid=0 mtime=1700000000.000000000
//! /bin type=symlink mode=0777 uid=0 gid=0 size=7 mtime=1700000000.000000000 target=usr/bin
//! /dev/null type=char mode=0666 uid=0 gid=0 mtime=1700000000.000000000 rdev=1:3
//! /usr/bin/perl type=file mode=0755 uid=0 gid=0 size=3967608 mtime=1700000000.000000000 sha256=… link=/usr/bin/perl
//! /usr/bin/perl5.36.0 type=file mode=0755 uid=0 gid=0 size=3967608 mtime=1700000000.000000000 sha256=… link=/usr/bin/perl
//! ```
//!
//! Paths are relative to the walked root and written with a leading `/`;
//! the root itself is `/`. The fields, always in this order, are
//!
//! - `type`: `file`, `dir`, `symlink`, `char`, `block`, `fifo` or `socket`;
//! - `mode`: the permission bits including setuid, setgid and sticky, octal;
//! - `uid`, `gid`;
//! - `size`: regular files; for symlinks the length of the target;
//! - `mtime`: `SECONDS.NANOSECONDS`, or `SECONDS` ([`MtimeMode`]);
//! - `sha256`: the content digest of regular files;
//! - `link`: the hard-link group: non-directories that share an inode within
//!   the tree (two or more paths) name the lexicographically first path of
//!   their group;
//! - `rdev`: `MAJOR:MINOR` of character and block devices;
//! - `target`: the target of a symlink;
//! - `xattr.NAME`: each extended attribute's value in hex, sorted by name.
//!
//! [`DumpOptions`] selects the fields. Bytes of paths, targets and xattr names
//! outside printable ASCII, and `\`, `=` and space, are written as `\xNN`, so
//! every line is one deterministic ASCII line whatever the names hold.
//!
//! [`compare`] diffs two dumps: paths only in one, and per changed path the
//! fields that differ, with a tally per field.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// How modification times are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtimeMode {
    /// Seconds and nanoseconds.
    Exact,
    /// Whole seconds only (tar headers without PAX times hold seconds).
    Seconds,
    /// No `mtime` field at all.
    Ignore,
}

/// Which fields a dump records. [`Default`] records everything, with exact
/// modification times.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Modification time precision.
    pub mtime: MtimeMode,
    /// Record the mtime of directories too (they change whenever an entry is
    /// added, so an extractor must set them last; some do not).
    pub dir_mtime: bool,
    /// Record the root directory's own attributes (mode, owner, mtime,
    /// xattrs); when false, the root's line holds only its type.
    pub root_attrs: bool,
    /// Record `mode`.
    pub mode: bool,
    /// Record `uid` and `gid`.
    pub owner: bool,
    /// Record `sha256` of regular files (reads every file).
    pub content: bool,
    /// Record hard-link groups (`link`).
    pub hardlinks: bool,
    /// Record extended attributes.
    pub xattrs: bool,
    /// Extended attributes to leave out: exact names, or prefixes ending in
    /// `*` (e.g. `security.selinux`, `trusted.overlay.*`).
    pub ignore_xattrs: Vec<String>,
    /// Paths (as written in the dump, e.g. `/proc`) to leave out together
    /// with everything below them.
    pub exclude: Vec<String>,
    /// Threads that hash file contents; 0 means the number of CPUs.
    pub threads: usize,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            mtime: MtimeMode::Exact,
            dir_mtime: true,
            root_attrs: true,
            mode: true,
            owner: true,
            content: true,
            hardlinks: true,
            xattrs: true,
            ignore_xattrs: Vec::new(),
            exclude: Vec::new(),
            threads: 0,
        }
    }
}

impl DumpOptions {
    /// Every field, with exact modification times (the same as `default()`).
    pub fn all() -> Self {
        Self::default()
    }

    /// Sets the mtime precision.
    pub fn with_mtime(mut self, mtime: MtimeMode) -> Self {
        self.mtime = mtime;
        self
    }

    /// Leaves out directory mtimes.
    pub fn without_dir_mtime(mut self) -> Self {
        self.dir_mtime = false;
        self
    }

    /// Leaves out the root directory's own attributes.
    pub fn without_root_attrs(mut self) -> Self {
        self.root_attrs = false;
        self
    }

    /// Leaves out an extended attribute name or `prefix*`.
    pub fn ignore_xattr(mut self, pattern: &str) -> Self {
        self.ignore_xattrs.push(pattern.to_string());
        self
    }

    fn xattr_ignored(&self, name: &[u8]) -> bool {
        self.ignore_xattrs
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix.as_bytes()),
                None => name == p.as_bytes(),
            })
    }
}

/// A tree dump: for each path (escaped, with a leading `/`), its fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    entries: BTreeMap<String, Vec<(String, String)>>,
}

impl Dump {
    /// The number of paths, the root included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the dump holds no path.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The paths, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// True when the dump holds `path` (escaped, e.g. `/etc/passwd`).
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }

    /// The value of one field of one path, e.g. `field("/bin", "target")`.
    pub fn field(&self, path: &str, key: &str) -> Option<&str> {
        self.entries
            .get(path)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The dump line of one path (path and fields), if present.
    pub fn line(&self, path: &str) -> Option<String> {
        self.entries.get(path).map(|f| format_line(path, f))
    }

    /// A copy without the fields named `key` (for `xattr.*` fields, a key
    /// ending in `*` removes every field with that prefix).
    pub fn without_field(&self, key: &str) -> Dump {
        self.map_fields(|k, v| {
            let drop = match key.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix),
                None => k == key,
            };
            (!drop).then(|| v.to_string())
        })
    }

    /// A copy with `mtime` fields cut to whole seconds.
    pub fn with_mtime_seconds(&self) -> Dump {
        self.map_fields(|k, v| {
            Some(if k == "mtime" {
                v.split('.').next().unwrap_or(v).to_string()
            } else {
                v.to_string()
            })
        })
    }

    /// A copy without the `mtime` of directories.
    pub fn without_dir_mtime(&self) -> Dump {
        let mut out = self.clone();
        for fields in out.entries.values_mut() {
            if fields.iter().any(|(k, v)| k == "type" && v == "dir") {
                fields.retain(|(k, _)| k != "mtime");
            }
        }
        out
    }

    fn map_fields(&self, f: impl Fn(&str, &str) -> Option<String>) -> Dump {
        Dump {
            entries: self
                .entries
                .iter()
                .map(|(p, fields)| {
                    let kept = fields
                        .iter()
                        .filter_map(|(k, v)| f(k, v).map(|v| (k.clone(), v)))
                        .collect();
                    (p.clone(), kept)
                })
                .collect(),
        }
    }
}

impl fmt::Display for Dump {
    /// The dump as text: one line per path, sorted, each ending in `\n`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (path, fields) in &self.entries {
            writeln!(f, "{}", format_line(path, fields))?;
        }
        Ok(())
    }
}

fn format_line(path: &str, fields: &[(String, String)]) -> String {
    let mut line = path.to_string();
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(v);
    }
    line
}

/// Escapes bytes for a dump line: printable ASCII stays, except `\`, `=` and
/// space; every other byte becomes `\xNN` (lowercase hex).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The Linux major number of a device number.
pub fn dev_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000)
}

/// The Linux minor number of a device number.
pub fn dev_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & 0xffff_ff00)
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// One walked path, before hashing and hard-link grouping.
struct Walked {
    key: String,
    fields: Vec<(String, String)>,
    /// Index into the hashing job list, for regular files.
    hash_job: Option<usize>,
    /// (dev, ino) of non-directories with more than one link.
    inode: Option<(u64, u64)>,
}

/// Dumps the tree at `root` (a directory) according to `opts`.
///
/// Symlinks are never followed. Errors carry the path that failed.
pub fn dump(root: &Path, opts: &DumpOptions) -> io::Result<Dump> {
    let meta = fs::symlink_metadata(root).map_err(|e| with_path(e, "stat", root))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut walked = Vec::new();
    let mut hash_jobs: Vec<PathBuf> = Vec::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    let mut first = true;
    while let Some((path, key)) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(|e| with_path(e, "stat", &path))?;
        let shown_key = if key.is_empty() {
            "/".to_string()
        } else {
            key.clone()
        };
        let is_root = first;
        first = false;
        let w = describe(&path, shown_key, &meta, opts, is_root, &mut hash_jobs)?;
        walked.push(w);
        if meta.is_dir() {
            let rd = fs::read_dir(&path).map_err(|e| with_path(e, "read directory", &path))?;
            for entry in rd {
                let entry = entry.map_err(|e| with_path(e, "read directory", &path))?;
                let child_key = format!("{key}/{}", escape(entry.file_name().as_bytes()));
                if opts.exclude.iter().any(|x| x == &child_key) {
                    continue;
                }
                stack.push((entry.path(), child_key));
            }
        }
    }

    let digests = hash_files(&hash_jobs, opts.threads)?;

    // Hard-link groups: inodes seen at two or more paths.
    let mut groups: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (i, w) in walked.iter().enumerate() {
        if let Some(inode) = w.inode {
            groups.entry(inode).or_default().push(i);
        }
    }
    let mut link_of: HashMap<usize, String> = HashMap::new();
    for members in groups.values().filter(|m| m.len() > 1) {
        let leader = members
            .iter()
            .map(|&i| walked[i].key.as_str())
            .min()
            .unwrap_or_default()
            .to_string();
        for &i in members {
            link_of.insert(i, leader.clone());
        }
    }

    let mut entries = BTreeMap::new();
    for (i, mut w) in walked.into_iter().enumerate() {
        // Put sha256 and link after mtime, before rdev/target/xattrs.
        let pos = w
            .fields
            .iter()
            .position(|(k, _)| k == "rdev" || k == "target" || k.starts_with("xattr."))
            .unwrap_or(w.fields.len());
        let mut extra = Vec::new();
        if let Some(job) = w.hash_job {
            extra.push(("sha256".to_string(), digests[job].clone()));
        }
        if opts.hardlinks {
            if let Some(leader) = link_of.remove(&i) {
                extra.push(("link".to_string(), leader));
            }
        }
        w.fields.splice(pos..pos, extra);
        entries.insert(w.key, w.fields);
    }
    Ok(Dump { entries })
}

fn describe(
    path: &Path,
    key: String,
    meta: &Metadata,
    opts: &DumpOptions,
    is_root: bool,
    hash_jobs: &mut Vec<PathBuf>,
) -> io::Result<Walked> {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        "file"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "unknown"
    };
    let mut fields = vec![("type".to_string(), kind.to_string())];
    let mut w = Walked {
        key,
        fields: Vec::new(),
        hash_job: None,
        inode: None,
    };
    if is_root && !opts.root_attrs {
        w.fields = fields;
        return Ok(w);
    }
    if opts.mode {
        fields.push(("mode".into(), format!("{:04o}", meta.mode() & 0o7777)));
    }
    if opts.owner {
        fields.push(("uid".into(), meta.uid().to_string()));
        fields.push(("gid".into(), meta.gid().to_string()));
    }
    let target = if ft.is_symlink() {
        Some(fs::read_link(path).map_err(|e| with_path(e, "readlink", path))?)
    } else {
        None
    };
    if ft.is_file() {
        fields.push(("size".into(), meta.len().to_string()));
    } else if let Some(t) = &target {
        fields.push(("size".into(), t.as_os_str().len().to_string()));
    }
    let record_mtime = !ft.is_dir() || opts.dir_mtime;
    if record_mtime {
        match opts.mtime {
            MtimeMode::Exact => fields.push((
                "mtime".into(),
                format!("{}.{:09}", meta.mtime(), meta.mtime_nsec()),
            )),
            MtimeMode::Seconds => fields.push(("mtime".into(), meta.mtime().to_string())),
            MtimeMode::Ignore => {}
        }
    }
    if ft.is_file() && opts.content {
        w.hash_job = Some(hash_jobs.len());
        hash_jobs.push(path.to_path_buf());
    }
    if !ft.is_dir() && meta.nlink() > 1 {
        w.inode = Some((meta.dev(), meta.ino()));
    }
    if ft.is_char_device() || ft.is_block_device() {
        let rdev = meta.rdev();
        fields.push((
            "rdev".into(),
            format!("{}:{}", dev_major(rdev), dev_minor(rdev)),
        ));
    }
    if let Some(t) = &target {
        fields.push(("target".into(), escape(t.as_os_str().as_bytes())));
    }
    if opts.xattrs {
        let mut attrs = Vec::new();
        let names = xattr::list(path).map_err(|e| with_path(e, "list xattrs of", path))?;
        for name in names {
            let name_bytes = name.as_bytes();
            if opts.xattr_ignored(name_bytes) {
                continue;
            }
            // A value that vanished between list and get is treated as absent.
            if let Some(value) =
                xattr::get(path, &name).map_err(|e| with_path(e, "get xattrs of", path))?
            {
                attrs.push((format!("xattr.{}", escape(name_bytes)), hex::encode(value)));
            }
        }
        attrs.sort();
        fields.extend(attrs);
    }
    w.fields = fields;
    Ok(w)
}

/// SHA-256 of each file, hex, in the order given, on several threads.
fn hash_files(paths: &[PathBuf], threads: usize) -> io::Result<Vec<String>> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
    } else {
        threads
    }
    .min(paths.len());
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; paths.len()]);
    let failure: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= paths.len() {
                        break;
                    }
                    match hash_file(&paths[i], &mut buf) {
                        Ok(d) => {
                            if let Ok(mut r) = results.lock() {
                                r[i] = Some(d);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            // Stop every thread early.
                            next.store(paths.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results
        .into_inner()
        .map_err(|_| io::Error::other("a hashing thread panicked"))?;
    results
        .into_iter()
        .zip(paths)
        .map(|(r, p)| r.ok_or_else(|| io::Error::other(format!("{}: not hashed", p.display()))))
        .collect()
}

fn hash_file(path: &Path, buf: &mut [u8]) -> io::Result<String> {
    let mut f = File::open(path).map_err(|e| with_path(e, "open", path))?;
    let mut h = Sha256::new();
    loop {
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(with_path(e, "read", path)),
        };
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Compares two dumps; `Ok(())` when equal, else a readable report naming
/// the first side "a" and the second "b". See [`compare_named`].
pub fn compare(a: &Dump, b: &Dump) -> Result<(), String> {
    compare_named(a, "a", b, "b")
}

/// The most difference lines a comparison report shows.
pub const MAX_DIFF_LINES: usize = 50;

/// Compares two dumps with names for each side; `Ok(())` when equal.
///
/// The error report starts with the counts (paths only in each side, changed
/// paths, and how many times each field differs), then lists the first
/// [`MAX_DIFF_LINES`] differences in path order:
///
/// ```text
/// - /only/in/a  type=file ...
/// + /only/in/b  type=file ...
/// ~ /changed  mode: 0644 -> 0755; mtime: 1.5 -> 1.0
/// ```
pub fn compare_named(a: &Dump, a_name: &str, b: &Dump, b_name: &str) -> Result<(), String> {
    let mut lines = Vec::new();
    let (mut only_a, mut only_b, mut changed) = (0usize, 0usize, 0usize);
    let mut per_field: BTreeMap<String, usize> = BTreeMap::new();
    let push = |lines: &mut Vec<String>, l: String| {
        if lines.len() < MAX_DIFF_LINES {
            lines.push(l);
        }
    };
    let mut ia = a.entries.iter().peekable();
    let mut ib = b.entries.iter().peekable();
    loop {
        let order = match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(_), None) => CmpOrdering::Less,
            (None, Some(_)) => CmpOrdering::Greater,
            (Some((pa, _)), Some((pb, _))) => pa.cmp(pb),
        };
        match order {
            CmpOrdering::Less => {
                if let Some((pa, fa)) = ia.next() {
                    only_a += 1;
                    push(&mut lines, format!("- {}", format_line(pa, fa)));
                }
            }
            CmpOrdering::Greater => {
                if let Some((pb, fb)) = ib.next() {
                    only_b += 1;
                    push(&mut lines, format!("+ {}", format_line(pb, fb)));
                }
            }
            CmpOrdering::Equal => {
                if let (Some((pa, fa)), Some((_, fb))) = (ia.next(), ib.next()) {
                    if fa != fb {
                        changed += 1;
                        let diffs = field_diffs(fa, fb);
                        for (k, _, _) in &diffs {
                            *per_field.entry(k.clone()).or_default() += 1;
                        }
                        let text = diffs
                            .iter()
                            .map(|(k, va, vb)| format!("{k}: {va} -> {vb}"))
                            .collect::<Vec<_>>()
                            .join("; ");
                        push(&mut lines, format!("~ {pa}  {text}"));
                    }
                }
            }
        }
    }
    if only_a == 0 && only_b == 0 && changed == 0 {
        return Ok(());
    }
    let total = only_a + only_b + changed;
    let mut report = format!(
        "trees differ: {only_a} paths only in {a_name} (-), {only_b} only in {b_name} (+), \
         {changed} changed (~), of {} and {} paths\n",
        a.len(),
        b.len()
    );
    if !per_field.is_empty() {
        let tally = per_field
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        report.push_str(&format!("changed fields: {tally}\n"));
    }
    for l in &lines {
        report.push_str(l);
        report.push('\n');
    }
    if total > lines.len() {
        report.push_str(&format!(
            "... and {} more differences\n",
            total - lines.len()
        ));
    }
    Err(report)
}

/// The fields that differ between two field lists: (key, a value, b value),
/// with `(none)` for a field missing on one side.
fn field_diffs(a: &[(String, String)], b: &[(String, String)]) -> Vec<(String, String, String)> {
    let ma: BTreeMap<&str, &str> = a.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mb: BTreeMap<&str, &str> = b.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut keys: Vec<&str> = a.iter().chain(b).map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let va = ma.get(k).copied();
            let vb = mb.get(k).copied();
            (va != vb).then(|| {
                (
                    k.to_string(),
                    va.unwrap_or("(none)").to_string(),
                    vb.unwrap_or("(none)").to_string(),
                )
            })
        })
        .collect()
}
