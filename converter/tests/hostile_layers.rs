//! Acceptance: a corpus of hostile layers, each with its expected outcome.
//!
//! Every case is built here from raw tar bytes (headers written byte by
//! byte, so that names with `..`, NUL bytes, absolute paths, lying sizes and
//! repeated entries go in exactly as an attacker would write them), converted
//! with the real `skiff` binary, and then either:
//!
//! - **rejected**: `skiff convert` exits non-zero, its message names the
//!   layer and the entry and says what is wrong, and the destination layout
//!   has no tag (nothing looks published); or
//! - **normalised**: the image converts, `skiff check` passes, and `skiff
//!   unpack` writes it into `box/target`; the test then checks what the tree
//!   holds (symlinks stored byte for byte, never followed; the last of
//!   repeated entries wins; ...).
//!
//! Whatever the outcome, nothing may appear outside the target: the cases'
//! symlinks point at `box/sentinel` (by absolute path and by `../`), which
//! must stay empty, and `box` and the sandbox must hold nothing else
//! afterwards. The heavy cases (a 10,000-level tree, many empty files, gzip
//! and zstd bombs) run here at a size that keeps the suite fast;
//! `scripts/hostile` runs them at full size (a million files, tens of GiB)
//! and prints time and peak memory. docs/hostile-input.md lists the corpus.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{pax_record, require_root, scratch};
use skiff_tests::harness::{catch_case, command_line, run_unchecked, skiff_cmd};

// ---------------------------------------------------------------------------
// Raw tar writing

/// Tar type flags.
const REG: u8 = b'0';
const HARD: u8 = b'1';
const SYM: u8 = b'2';
const CHR: u8 = b'3';
const BLK: u8 = b'4';
const DIR: u8 = b'5';
const FIFO: u8 = b'6';
const PAX: u8 = b'x';

/// Writes a numeric header field: octal, or base-256 when it does not fit.
fn num(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let text = format!("{v:0digits$o}");
    if text.len() <= digits {
        field[..digits].copy_from_slice(text.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let bytes = v.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
        field[0] |= 0x80;
    }
}

/// One 512-byte ustar header, byte for byte: `name` and `link` go in as
/// given (cut to their fields), nothing is validated.
fn header(kind: u8, name: &[u8], link: &[u8], mode: u32, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    num(&mut h[100..108], u64::from(mode));
    num(&mut h[108..116], 0);
    num(&mut h[116..124], 0);
    num(&mut h[124..136], size);
    num(&mut h[136..148], 1_600_000_000);
    h[156] = kind;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    seal(&mut h);
    h
}

/// Recomputes a header's checksum (after an edit).
fn seal(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A tar stream written entry by entry into any writer (a Vec, or a
/// compressor when the stream is too big to hold).
struct Tar<W: Write> {
    out: W,
    /// PAX records for the next entry, written as one extended header
    /// in front of it.
    pending: Vec<u8>,
}

impl Tar<Vec<u8>> {
    fn new() -> Self {
        Tar {
            out: Vec::new(),
            pending: Vec::new(),
        }
    }
}

impl<W: Write> Tar<W> {
    /// A header and its data, padded to the next block, behind the
    /// pending PAX records if there are any.
    fn raw(&mut self, h: &[u8; 512], data: &[u8]) -> &mut Self {
        if !self.pending.is_empty() {
            let body = std::mem::take(&mut self.pending);
            let pax = header(PAX, b"PaxHeaders/entry", b"", 0o644, body.len() as u64);
            self.block(&pax, &body);
        }
        self.block(h, data)
    }

    fn block(&mut self, h: &[u8; 512], data: &[u8]) -> &mut Self {
        self.out.write_all(h).unwrap();
        self.out.write_all(data).unwrap();
        let pad = (512 - data.len() % 512) % 512;
        self.out.write_all(&vec![0u8; pad]).unwrap();
        self
    }

    fn file(&mut self, name: impl AsRef<[u8]>, mode: u32, data: impl AsRef<[u8]>) -> &mut Self {
        let data = data.as_ref();
        self.raw(
            &header(REG, name.as_ref(), b"", mode, data.len() as u64),
            data,
        )
    }

    fn dir(&mut self, name: impl AsRef<[u8]>, mode: u32) -> &mut Self {
        self.raw(&header(DIR, name.as_ref(), b"", mode, 0), b"")
    }

    /// A symlink; a target longer than the 100-byte header field goes in
    /// a PAX `linkpath` record (the sandbox path can be long, as in CI).
    fn symlink(&mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &mut Self {
        self.long_link(SYM, name.as_ref(), target.as_ref(), 0o777)
    }

    fn hardlink(&mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &mut Self {
        self.long_link(HARD, name.as_ref(), target.as_ref(), 0o644)
    }

    fn long_link(&mut self, kind: u8, name: &[u8], target: &[u8], mode: u32) -> &mut Self {
        if target.len() > 100 {
            self.pax(&[(b"linkpath", target)]);
        }
        self.raw(&header(kind, name, target, mode, 0), b"")
    }

    fn device(&mut self, kind: u8, name: &str, major: u64, minor: u64) -> &mut Self {
        let mut h = header(kind, name.as_bytes(), b"", 0o660, 0);
        num(&mut h[329..337], major);
        num(&mut h[337..345], minor);
        seal(&mut h);
        self.raw(&h, b"")
    }

    /// PAX records for the next entry (merged with any the entry adds).
    fn pax(&mut self, records: &[(&[u8], &[u8])]) -> &mut Self {
        for (k, v) in records {
            self.pending.extend(pax_record(k, v));
        }
        self
    }

    /// The end-of-archive marker; returns the writer.
    fn end(mut self) -> W {
        self.out.write_all(&[0u8; 1024]).unwrap();
        self.out
    }
}

/// A one-layer tar built by `f`.
fn tar(f: impl FnOnce(&mut Tar<Vec<u8>>)) -> Vec<u8> {
    let mut t = Tar::new();
    f(&mut t);
    t.end()
}

// ---------------------------------------------------------------------------
// The sandbox

/// `root/work` holds the layers and the converted layout; `root/box` holds
/// the unpack target and an empty sentinel directory that hostile symlinks
/// point at.
struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
    work: PathBuf,
    boxdir: PathBuf,
    sentinel: PathBuf,
    target: PathBuf,
}

impl Sandbox {
    fn new(name: &str) -> Sandbox {
        let dir = scratch(&format!("hostile-{name}"));
        let root = fs::canonicalize(dir.path()).unwrap();
        let (work, boxdir) = (root.join("work"), root.join("box"));
        let (sentinel, target) = (boxdir.join("sentinel"), boxdir.join("target"));
        fs::create_dir_all(&work).unwrap();
        fs::create_dir_all(&sentinel).unwrap();
        Sandbox {
            _dir: dir,
            root,
            work,
            boxdir,
            sentinel,
            target,
        }
    }

    /// The sentinel's absolute path as bytes (a symlink target).
    fn sentinel_abs(&self) -> Vec<u8> {
        self.sentinel.as_os_str().as_bytes().to_vec()
    }

    fn layout(&self) -> String {
        format!("oci:{}:img", self.work.join("layout").display())
    }

    /// Nothing was written outside the target: the sentinel is empty, and
    /// `box` and the sandbox root hold only what the test put there.
    fn assert_contained(&self, case: &str) {
        let names = |dir: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("{case}: reading {}: {e}", dir.display()))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert!(
            names(&self.sentinel).is_empty(),
            "{case}: something was written into the sentinel outside the target: {:?}",
            names(&self.sentinel)
        );
        let in_box = names(&self.boxdir);
        assert!(
            in_box.iter().all(|n| n == "sentinel" || n == "target"),
            "{case}: unpack left something beside its target: {in_box:?}"
        );
        assert_eq!(
            names(&self.root),
            vec!["box".to_string(), "work".to_string()],
            "{case}: something was written into the sandbox root"
        );
    }
}

/// What happened to a case.
#[derive(Debug)]
enum Outcome {
    /// `skiff convert` refused it with this message.
    Rejected(String),
    /// It converted and unpacked; the unpack summary line.
    Unpacked(String),
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes `layers`, converts them with `skiff convert --layer ...`, and
/// when that succeeds checks and unpacks the image into the target.
fn convert_and_unpack(sb: &Sandbox, name: &str, layers: &[Vec<u8>]) -> Outcome {
    let mut args: Vec<String> = vec!["convert".into(), "--no-progress".into()];
    for (i, bytes) in layers.iter().enumerate() {
        let path = sb.work.join(format!("{name}-{}.tar", i + 1));
        fs::write(&path, bytes).unwrap();
        args.push("--layer".into());
        args.push(path.display().to_string());
    }
    convert_files(sb, name, args)
}

fn convert_files(sb: &Sandbox, name: &str, mut args: Vec<String>) -> Outcome {
    args.extend(["--threads".into(), "2".into(), sb.layout()]);
    let mut cmd = skiff_cmd(&args);
    let out = run_unchecked(&mut cmd);
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(
            out.status.code().is_some(),
            "{name}: skiff convert died by a signal: {}\n{message}",
            out.status
        );
        assert!(
            !message.is_empty(),
            "{name}: skiff convert failed without a message"
        );
        assert!(
            !message.contains("panicked"),
            "{name}: skiff convert panicked:\n{message}"
        );
        // The tag is the commit point: a refused image has none.
        let index = sb.work.join("layout/index.json");
        if index.exists() {
            let body = fs::read_to_string(&index).unwrap();
            assert!(
                !body.contains("\"img\""),
                "{name}: a refused conversion left the tag: {body}"
            );
        }
        assert!(!sb.target.exists(), "{name}: a target appeared");
        sb.assert_contained(name);
        return Outcome::Rejected(message);
    }
    let check = run_unchecked(&mut skiff_cmd(["check", &sb.layout()]));
    assert!(
        check.status.success(),
        "{name}: skiff check of the converted image failed:\n{}",
        text(&check)
    );
    let mut cmd = skiff_cmd([
        "unpack".to_string(),
        sb.layout(),
        sb.target.display().to_string(),
    ]);
    let unpack = run_unchecked(&mut cmd);
    sb.assert_contained(name);
    assert!(
        unpack.status.success(),
        "{name}: `{}` failed:\n{}",
        command_line(&cmd),
        text(&unpack)
    );
    Outcome::Unpacked(String::from_utf8_lossy(&unpack.stdout).trim().to_string())
}

// ---------------------------------------------------------------------------
// Checks on an unpacked tree

fn at(target: &Path, rel: impl AsRef<[u8]>) -> PathBuf {
    target.join(std::ffi::OsStr::from_bytes(rel.as_ref()))
}

fn meta(target: &Path, rel: impl AsRef<[u8]>) -> fs::Metadata {
    let p = at(target, rel);
    fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn is_dir(target: &Path, rel: &str) -> bool {
    meta(target, rel).file_type().is_dir()
}

fn content(target: &Path, rel: impl AsRef<[u8]>) -> Vec<u8> {
    let p = at(target, rel);
    assert!(
        meta(
            target,
            p.strip_prefix(target).unwrap().as_os_str().as_bytes()
        )
        .file_type()
        .is_file(),
        "{} is not a regular file",
        p.display()
    );
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn link_target(target: &Path, rel: impl AsRef<[u8]>) -> Vec<u8> {
    let p = at(target, rel);
    fs::read_link(&p)
        .unwrap_or_else(|e| panic!("{} is not a symlink: {e}", p.display()))
        .as_os_str()
        .as_bytes()
        .to_vec()
}

fn listing(target: &Path, rel: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(target.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// The corpus

/// What a case must give.
enum Expect {
    /// Refused; the message holds every one of these.
    Rejected(&'static [&'static str]),
    /// Converted and unpacked; this checks the tree (target, sandbox).
    Normalised(fn(&Path, &Sandbox)),
}

struct Case {
    name: &'static str,
    layers: fn(&Sandbox) -> Vec<Vec<u8>>,
    expect: Expect,
}

fn one(f: impl FnOnce(&mut Tar<Vec<u8>>)) -> Vec<Vec<u8>> {
    vec![tar(f)]
}

fn cases() -> Vec<Case> {
    vec![
        // --- paths that escape
        Case {
            name: "dotdot",
            layers: |_| {
                one(|t| {
                    t.file("../escape", 0o644, "x");
                })
            },
            expect: Expect::Rejected(&["layer 1/1", "'../escape'", "'..' component"]),
        },
        Case {
            name: "dotdot-inner",
            layers: |_| {
                one(|t| {
                    t.dir("a", 0o755).file("a/b/../../../escape", 0o644, "x");
                })
            },
            expect: Expect::Rejected(&["'a/b/../../../escape'", "'..' component"]),
        },
        Case {
            name: "dotdot-second-layer",
            layers: |_| {
                vec![
                    tar(|t| {
                        t.file("ok", 0o644, "fine");
                    }),
                    tar(|t| {
                        t.file("../../sentinel/escape", 0o644, "x");
                    }),
                ]
            },
            expect: Expect::Rejected(&["layer 2/2", "'..' component"]),
        },
        Case {
            name: "dotdot-pax-path",
            layers: |_| {
                one(|t| {
                    t.pax(&[(b"path", b"../../sentinel/pax")])
                        .file("innocent", 0o644, "x");
                })
            },
            expect: Expect::Rejected(&["'../../sentinel/pax'", "'..' component"]),
        },
        Case {
            name: "dotdot-directory",
            layers: |_| {
                one(|t| {
                    t.dir("..", 0o777);
                })
            },
            expect: Expect::Rejected(&["'..'", "'..' component"]),
        },
        Case {
            name: "dotdot-symlink-name",
            layers: |_| {
                one(|t| {
                    t.symlink("../sentinel/link", "/");
                })
            },
            expect: Expect::Rejected(&["'../sentinel/link'", "'..' component"]),
        },
        Case {
            name: "dotdot-whiteout",
            layers: |_| {
                one(|t| {
                    t.file("../.wh.sentinel", 0o644, "");
                })
            },
            expect: Expect::Rejected(&["'../.wh.sentinel'", "'..' component"]),
        },
        Case {
            name: "whiteout-of-dotdot",
            layers: |_| {
                one(|t| {
                    t.file("a/.wh...", 0o644, "");
                })
            },
            expect: Expect::Rejected(&["'a/.wh...'", "whiteout of an invalid name"]),
        },
        Case {
            name: "absolute-paths",
            layers: |_| {
                one(|t| {
                    t.file("/abs", 0o644, "one")
                        .file("//./etc/./passwd", 0o644, "two")
                        .dir("/", 0o755);
                })
            },
            expect: Expect::Normalised(|target, _| {
                assert_eq!(content(target, "abs"), b"one");
                assert_eq!(content(target, "etc/passwd"), b"two");
            }),
        },
        // --- symlinks, and writing through them
        Case {
            name: "escaping-symlinks-stored-as-is",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                one(|t| {
                    t.symlink("abs", &abs)
                        .symlink("rel", "../sentinel")
                        .symlink("deep", "../../../../../../../../../..")
                        .symlink("root", "/")
                        .dir("etc", 0o755)
                        .symlink("etc/passwd", "/etc/shadow");
                })
            },
            expect: Expect::Normalised(|target, sb| {
                assert_eq!(link_target(target, "abs"), sb.sentinel_abs());
                assert_eq!(link_target(target, "rel"), b"../sentinel");
                assert_eq!(
                    link_target(target, "deep"),
                    b"../../../../../../../../../.."
                );
                assert_eq!(link_target(target, "root"), b"/");
                assert_eq!(link_target(target, "etc/passwd"), b"/etc/shadow");
            }),
        },
        Case {
            name: "write-through-absolute-symlink",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                one(|t| {
                    t.symlink("lnk", &abs).file("lnk/pwned", 0o644, "through");
                })
            },
            expect: Expect::Normalised(|target, _| {
                // The symlink is replaced by a directory, as any
                // non-directory on a path is (tree.rs).
                assert!(is_dir(target, "lnk"));
                assert_eq!(content(target, "lnk/pwned"), b"through");
            }),
        },
        Case {
            name: "write-through-symlink-of-lower-layer",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                vec![
                    tar(|t| {
                        t.symlink("lnk", &abs).symlink("up", "../sentinel");
                    }),
                    tar(|t| {
                        t.file("lnk/pwned", 0o644, "a").dir("up/sub", 0o755).file(
                            "up/sub/pwned",
                            0o644,
                            "b",
                        );
                    }),
                ]
            },
            expect: Expect::Normalised(|target, _| {
                assert!(is_dir(target, "lnk") && is_dir(target, "up"));
                assert_eq!(content(target, "lnk/pwned"), b"a");
                assert_eq!(content(target, "up/sub/pwned"), b"b");
            }),
        },
        Case {
            name: "write-through-symlink-chain",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                vec![
                    tar(|t| {
                        t.symlink("b", &abs).symlink("a", "b");
                    }),
                    tar(|t| {
                        t.file("a/pwned", 0o644, "chain");
                    }),
                ]
            },
            expect: Expect::Normalised(|target, sb| {
                assert_eq!(content(target, "a/pwned"), b"chain");
                assert_eq!(link_target(target, "b"), sb.sentinel_abs());
            }),
        },
        Case {
            name: "symlink-then-file-same-name",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                vec![
                    tar(|t| {
                        t.symlink("f", &abs);
                    }),
                    tar(|t| {
                        t.file("f", 0o644, "replaces the link, not its target");
                    }),
                ]
            },
            expect: Expect::Normalised(|target, _| {
                assert_eq!(content(target, "f"), b"replaces the link, not its target");
            }),
        },
        Case {
            name: "whiteout-through-symlink",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                vec![
                    tar(|t| {
                        t.symlink("lnk", &abs).file("keep", 0o644, "k");
                    }),
                    tar(|t| {
                        t.file("lnk/.wh.keep", 0o644, "")
                            .file("lnk/.wh..wh..opq", 0o644, "");
                    }),
                ]
            },
            expect: Expect::Normalised(|target, sb| {
                // A whiteout below a symlink hides nothing.
                assert_eq!(link_target(target, "lnk"), sb.sentinel_abs());
                assert_eq!(content(target, "keep"), b"k");
            }),
        },
        Case {
            name: "symlink-target-with-nul",
            layers: |_| {
                one(|t| {
                    t.pax(&[(b"linkpath", b"/etc\0/x")]).symlink("l", "decoy");
                })
            },
            expect: Expect::Rejected(&["'l'", "NUL"]),
        },
        Case {
            name: "symlink-empty-target",
            layers: |_| {
                one(|t| {
                    t.symlink("l", "");
                })
            },
            expect: Expect::Rejected(&["'l'", "empty"]),
        },
        // --- hard links
        Case {
            name: "hardlink-missing",
            layers: |_| {
                one(|t| {
                    t.hardlink("h", "nowhere");
                })
            },
            expect: Expect::Rejected(&["'h'", "missing target", "nowhere"]),
        },
        Case {
            name: "hardlink-to-directory",
            layers: |_| {
                one(|t| {
                    t.dir("d", 0o755).hardlink("h", "d");
                })
            },
            expect: Expect::Rejected(&["'h'", "hard link to a directory"]),
        },
        Case {
            name: "hardlink-to-root",
            layers: |_| {
                one(|t| {
                    t.hardlink("h", "/");
                })
            },
            expect: Expect::Rejected(&["'h'", "hard link to a directory"]),
        },
        Case {
            name: "hardlink-to-itself",
            layers: |_| {
                one(|t| {
                    t.hardlink("h", "h");
                })
            },
            expect: Expect::Rejected(&["'h'", "missing target"]),
        },
        Case {
            name: "hardlink-dotdot",
            layers: |_| {
                one(|t| {
                    t.file("f", 0o644, "x").hardlink("h", "../box/sentinel");
                })
            },
            expect: Expect::Rejected(&["'h'", "'..' component"]),
        },
        Case {
            name: "hardlink-through-symlink",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                one(|t| {
                    t.symlink("lnk", &abs).hardlink("h", "lnk/secret");
                })
            },
            expect: Expect::Rejected(&["'h'", "missing target", "lnk/secret"]),
        },
        Case {
            name: "hardlink-absolute-inside",
            layers: |_| {
                one(|t| {
                    t.file("etc/passwd", 0o644, "root:x:0:0")
                        .hardlink("copy", "/etc/passwd");
                })
            },
            expect: Expect::Normalised(|target, _| {
                let (a, b) = (meta(target, "etc/passwd"), meta(target, "copy"));
                assert_eq!(a.ino(), b.ino(), "the absolute link names the image's file");
                assert_eq!(a.nlink(), 2);
            }),
        },
        Case {
            name: "hardlink-to-symlink",
            layers: |sb| {
                let abs = sb.sentinel_abs();
                one(|t| {
                    t.symlink("lnk", &abs).hardlink("h", "lnk");
                })
            },
            expect: Expect::Normalised(|target, sb| {
                // A link to the symlink itself, never to what it points at.
                assert_eq!(link_target(target, "h"), sb.sentinel_abs());
                assert_eq!(meta(target, "h").ino(), meta(target, "lnk").ino());
            }),
        },
        // --- special files and modes
        Case {
            name: "device-nodes",
            layers: |_| {
                one(|t| {
                    t.device(CHR, "dev/mem", 1, 1)
                        .device(BLK, "dev/sda", 8, 0)
                        .device(FIFO, "dev/fifo", 0, 0);
                })
            },
            expect: Expect::Normalised(|target, _| {
                let m = meta(target, "dev/mem");
                assert!(m.file_type().is_char_device());
                assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 1));
                let m = meta(target, "dev/sda");
                assert!(m.file_type().is_block_device());
                assert_eq!(m.rdev(), nix::sys::stat::makedev(8, 0));
                assert!(meta(target, "dev/fifo").file_type().is_fifo());
            }),
        },
        Case {
            name: "setuid-setgid-sticky",
            layers: |_| {
                one(|t| {
                    t.file("su", 0o4755, "suid")
                        .file("sg", 0o2711, "sgid")
                        .dir("tmp", 0o1777);
                })
            },
            expect: Expect::Normalised(|target, _| {
                assert_eq!(meta(target, "su").mode() & 0o7777, 0o4755);
                assert_eq!(meta(target, "sg").mode() & 0o7777, 0o2711);
                assert_eq!(meta(target, "tmp").mode() & 0o7777, 0o1777);
            }),
        },
        Case {
            name: "mode-with-type-bits",
            layers: |_| {
                one(|t| {
                    // 0o170644: every type bit set on a regular file.
                    let mut h = header(REG, b"typed", b"", 0o170_644, 1);
                    seal(&mut h);
                    t.raw(&h, b"t");
                })
            },
            expect: Expect::Normalised(|target, _| {
                let m = meta(target, "typed");
                assert!(m.file_type().is_file());
                assert_eq!(m.mode() & 0o7777, 0o644);
            }),
        },
        Case {
            name: "unknown-entry-type",
            layers: |_| {
                one(|t| {
                    t.raw(&header(b'Z', b"weird", b"", 0o644, 0), b"");
                })
            },
            expect: Expect::Rejected(&["'weird'", "unsupported tar entry type"]),
        },
        // --- sizes
        Case {
            name: "huge-declared-size-truncated",
            layers: |_| {
                // 1 TiB declared (base-256 size field), 1 MiB present.
                let mut out = header(REG, b"huge", b"", 0o644, 1 << 40).to_vec();
                out.extend(std::iter::repeat_n(0xabu8, 1 << 20));
                vec![out]
            },
            expect: Expect::Rejected(&["'huge'", "truncated"]),
        },
        Case {
            name: "huge-pax-size-truncated",
            layers: |_| {
                one(|t| {
                    t.pax(&[(b"size", b"1099511627776")])
                        .file("huge", 0o644, "x");
                })
            },
            expect: Expect::Rejected(&["layer 1/1"]),
        },
        Case {
            name: "pax-size-not-a-number",
            layers: |_| {
                one(|t| {
                    t.pax(&[(b"size", b"99999999999999999999999")])
                        .file("huge", 0o644, "x");
                })
            },
            expect: Expect::Rejected(&["layer 1/1"]),
        },
        Case {
            name: "size-field-garbage",
            layers: |_| {
                one(|t| {
                    let mut h = header(REG, b"bad", b"", 0o644, 0);
                    h[124..136].copy_from_slice(b"zzzzzzzzzzz\0");
                    seal(&mut h);
                    t.raw(&h, b"");
                })
            },
            expect: Expect::Rejected(&["layer 1/1", "corrupt"]),
        },
        Case {
            name: "bad-checksum",
            layers: |_| {
                one(|t| {
                    let mut h = header(REG, b"f", b"", 0o644, 1);
                    h[0] = b'g';
                    t.raw(&h, b"x");
                })
            },
            expect: Expect::Rejected(&["layer 1/1", "checksum"]),
        },
        Case {
            name: "not-a-tar",
            layers: |_| vec![b"this is not a tar stream at all".repeat(40)],
            expect: Expect::Rejected(&["layer 1/1"]),
        },
        // --- repeats
        Case {
            name: "repeated-entries",
            layers: |_| {
                one(|t| {
                    for i in 0..1000 {
                        t.file("dup", 0o644, format!("copy {i}"));
                    }
                    t.file("d", 0o644, "a file first")
                        .dir("d", 0o700)
                        .file("d/child", 0o644, "c")
                        .dir("d", 0o750)
                        .file("e/x", 0o644, "below a directory")
                        .file("e", 0o600, "then a file over it")
                        .hardlink("h", "dup")
                        .hardlink("h", "dup")
                        .symlink("s", "one")
                        .symlink("s", "two");
                })
            },
            expect: Expect::Normalised(|target, _| {
                assert_eq!(content(target, "dup"), b"copy 999");
                assert!(is_dir(target, "d"));
                assert_eq!(meta(target, "d").mode() & 0o7777, 0o750);
                assert_eq!(content(target, "d/child"), b"c");
                assert_eq!(content(target, "e"), b"then a file over it");
                assert_eq!(meta(target, "h").ino(), meta(target, "dup").ino());
                assert_eq!(meta(target, "dup").nlink(), 2);
                assert_eq!(link_target(target, "s"), b"two");
                assert_eq!(listing(target, ""), ["d", "dup", "e", "h", "s"]);
            }),
        },
        Case {
            name: "root-entry-not-a-directory",
            layers: |_| {
                one(|t| {
                    t.file("./", 0o644, "a file at the root");
                })
            },
            expect: Expect::Rejected(&["root entry is not a directory"]),
        },
        // --- names
        Case {
            name: "nul-in-header-name",
            layers: |_| {
                one(|t| {
                    // The name field ends at its first NUL, as in every tar reader.
                    t.file(b"visible\0hidden/../../escape", 0o644, "n");
                })
            },
            expect: Expect::Normalised(|target, _| {
                assert_eq!(listing(target, ""), ["visible"]);
                assert_eq!(content(target, "visible"), b"n");
            }),
        },
        Case {
            name: "nul-in-pax-path",
            layers: |_| {
                one(|t| {
                    t.pax(&[(b"path", b"a\0b")]).file("decoy", 0o644, "n");
                })
            },
            expect: Expect::Rejected(&["NUL"]),
        },
        Case {
            name: "nul-in-hardlink-target",
            layers: |_| {
                one(|t| {
                    t.file("a", 0o644, "x")
                        .pax(&[(b"linkpath", b"a\0b")])
                        .hardlink("h", "a");
                })
            },
            expect: Expect::Rejected(&["'h'", "NUL"]),
        },
        Case {
            name: "invalid-utf8-names",
            layers: |_| {
                one(|t| {
                    t.file(b"caf\xe9", 0o644, "latin-1")
                        .file(b"\xff\xfe/\x80\x81", 0o644, "bytes")
                        .symlink(b"l\xc3", b"\xe9\xff");
                })
            },
            expect: Expect::Normalised(|target, _| {
                assert_eq!(content(target, b"caf\xe9"), b"latin-1");
                assert_eq!(content(target, b"\xff\xfe/\x80\x81"), b"bytes");
                assert_eq!(link_target(target, b"l\xc3"), b"\xe9\xff");
            }),
        },
        Case {
            name: "control-characters-in-names",
            layers: |_| {
                one(|t| {
                    t.pax(&[(b"path", b"new\nline")])
                        .file("decoy", 0o644, "nl")
                        .file("tab\tesc\x1b[31m", 0o644, "ctl");
                })
            },
            expect: Expect::Normalised(|target, _| {
                assert_eq!(content(target, "new\nline"), b"nl");
                assert_eq!(content(target, "tab\tesc\x1b[31m"), b"ctl");
            }),
        },
        Case {
            name: "name-component-too-long",
            layers: |_| {
                let long = "n".repeat(256);
                vec![tar(|t| {
                    t.pax(&[(b"path", long.as_bytes())])
                        .file("decoy", 0o644, "x");
                })]
            },
            expect: Expect::Rejected(&["256 bytes long", "at most 255"]),
        },
        Case {
            name: "xattr-names",
            layers: |_| {
                one(|t| {
                    t.pax(&[
                        (b"SCHILY.xattr.user.ok", b"v"),
                        (b"SCHILY.xattr.user.\xff", b"w"),
                    ])
                    .file("x", 0o644, "x");
                })
            },
            expect: Expect::Normalised(|target, _| {
                let p = at(target, "x");
                assert_eq!(
                    xattr::get(&p, "user.ok").unwrap().as_deref(),
                    Some(&b"v"[..])
                );
            }),
        },
        // --- compression
        Case {
            name: "gzip-garbage-after-magic",
            layers: |_| {
                let mut v = vec![0x1f, 0x8b, 8, 0];
                v.extend(b"garbage".repeat(100));
                vec![v]
            },
            expect: Expect::Rejected(&["layer 1/1"]),
        },
    ]
}

#[test]
fn hostile_layers_are_rejected_or_normalised() {
    require_root("the hostile layer corpus (device nodes, ownership)");
    let cases = cases();
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let sb = Sandbox::new(case.name);
        let layers = (case.layers)(&sb);
        // Every case runs, and every mismatch is reported at the end.
        let result = catch_case(case.name, || {
            let outcome = convert_and_unpack(&sb, case.name, &layers);
            match (&case.expect, &outcome) {
                (Expect::Rejected(parts), Outcome::Rejected(message)) => {
                    for p in *parts {
                        assert!(
                            message.contains(p),
                            "the message does not mention {p:?}:\n{message}"
                        );
                    }
                }
                (Expect::Normalised(check), Outcome::Unpacked(_)) => check(&sb.target, &sb),
                (Expect::Rejected(_), Outcome::Unpacked(summary)) => {
                    panic!("converted and unpacked, expected a refusal ({summary})")
                }
                (Expect::Normalised(_), Outcome::Rejected(message)) => {
                    panic!("refused, expected to convert:\n{message}")
                }
            }
            sb.assert_contained(case.name);
            outcome
        });
        match result {
            Ok(outcome) => table.push((case.name, outcome)),
            Err(failure) => failures.push(failure),
        }
    }
    eprintln!("\n{} hostile layer cases:", table.len());
    for (name, outcome) in &table {
        match outcome {
            Outcome::Rejected(m) => {
                let last = m.lines().last().unwrap_or_default();
                eprintln!("  {name:38} rejected: {last}");
            }
            Outcome::Unpacked(_) => eprintln!("  {name:38} normalised"),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// The heavy cases: deep trees, many files, decompression bombs

/// A size from the environment (set by `scripts/hostile` for the full-size
/// runs), else the suite's default.
fn size_from_env(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// Wall time and peak resident memory of one child process.
struct Measured {
    ok: bool,
    output: String,
    seconds: f64,
    peak_rss_mib: f64,
}

/// The peak resident memory (`VmHWM`) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `skiff ARGS` and measures it: wall time, and the peak RSS of that
/// process alone, sampled from /proc every 20 ms while it runs (the peak
/// only grows, so the last sample is the peak up to its last 20 ms).
fn measured(args: &[String], log: &Path) -> Measured {
    let out = fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let start = std::time::Instant::now();
    let mut child = skiff_cmd(args)
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start skiff: {e}"));
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(child.id()) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Measured {
        ok: status.success(),
        output: fs::read_to_string(log).unwrap_or_default(),
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_mib: peak as f64 / 1024.0,
    }
}

/// Converts `layer` (a file) and unpacks it, measuring both; returns the
/// two measurements after checking that both worked and stayed contained.
fn convert_and_unpack_measured(sb: &Sandbox, name: &str, layer: &Path) -> (Measured, Measured) {
    let convert = measured(
        &[
            "convert".into(),
            "--no-progress".into(),
            "--threads".into(),
            "2".into(),
            "--layer".into(),
            layer.display().to_string(),
            sb.layout(),
        ],
        &sb.work.join("convert.log"),
    );
    assert!(convert.ok, "{name}: convert failed:\n{}", convert.output);
    assert!(
        !convert.output.contains("panicked"),
        "{name}: {}",
        convert.output
    );
    let unpack = measured(
        &[
            "unpack".into(),
            sb.layout(),
            sb.target.display().to_string(),
        ],
        &sb.work.join("unpack.log"),
    );
    sb.assert_contained(name);
    assert!(unpack.ok, "{name}: unpack failed:\n{}", unpack.output);
    eprintln!(
        "{name}: layer {:.1} MB; convert {:.1} s, peak RSS {:.0} MiB; unpack {:.1} s, peak RSS {:.0} MiB",
        fs::metadata(layer).unwrap().len() as f64 / 1e6,
        convert.seconds,
        convert.peak_rss_mib,
        unpack.seconds,
        unpack.peak_rss_mib
    );
    (convert, unpack)
}

/// Memory bound for the heavy cases: far below what holding the input
/// would take, far above what streaming needs.
const RSS_BOUND_MIB: f64 = 1024.0;

#[test]
fn a_tree_10000_levels_deep() {
    require_root("the deep tree case");
    let levels = size_from_env("SKIFF_HOSTILE_LEVELS", 10_000) as usize;
    let sb = Sandbox::new("deep");
    let mut path = "d/".repeat(levels);
    let dir = path.trim_end_matches('/').to_string();
    path.push_str("bottom");
    let abs = sb.sentinel_abs();
    let bytes = tar(|t| {
        t.pax(&[(b"path", path.as_bytes())])
            .file("decoy", 0o644, "at the bottom");
        let mut link = dir.clone().into_bytes();
        link.extend_from_slice(b"/out");
        t.pax(&[(b"path", &link)]).symlink("decoy", &abs);
    });
    let layer = sb.work.join("deep.tar");
    fs::write(&layer, bytes).unwrap();
    let (_, unpack) = convert_and_unpack_measured(&sb, "deep", &layer);
    assert!(unpack.peak_rss_mib < RSS_BOUND_MIB);
    // Walk down through /proc/self/fd, a few hundred levels at a time
    // (the full path is far beyond PATH_MAX).
    let mut cur = fs::File::open(&sb.target).unwrap();
    let mut left = levels;
    while left > 0 {
        let step = left.min(500);
        let rel = "d/".repeat(step);
        let next = format!("/proc/self/fd/{}/{rel}", cur.as_raw_fd());
        cur = fs::File::open(&next)
            .unwrap_or_else(|e| panic!("{} levels down: {e}", levels - left + step));
        assert!(cur.metadata().unwrap().is_dir());
        left -= step;
    }
    let here = PathBuf::from(format!("/proc/self/fd/{}", cur.as_raw_fd()));
    assert_eq!(fs::read(here.join("bottom")).unwrap(), b"at the bottom");
    assert_eq!(
        fs::read_link(here.join("out"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        abs.as_slice()
    );
}

#[test]
fn many_empty_files() {
    require_root("the many-files case");
    let files = size_from_env("SKIFF_HOSTILE_FILES", 100_000);
    let sb = Sandbox::new("many");
    let layer = sb.work.join("many.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(fs::File::create(&layer).unwrap()),
        flate2::Compression::fast(),
    );
    let mut t = Tar {
        out: gz,
        pending: Vec::new(),
    };
    let per_dir = 1000;
    for i in 0..files {
        if i % per_dir == 0 {
            t.dir(format!("d{}", i / per_dir), 0o755);
        }
        t.file(format!("d{}/f{}", i / per_dir, i % per_dir), 0o644, b"");
    }
    t.end().finish().unwrap().flush().unwrap();
    let (convert, unpack) = convert_and_unpack_measured(&sb, "many", &layer);
    assert!(convert.peak_rss_mib < RSS_BOUND_MIB && unpack.peak_rss_mib < RSS_BOUND_MIB);
    let dirs = files.div_ceil(per_dir);
    assert_eq!(listing(&sb.target, "").len() as u64, dirs);
    let last = files - 1;
    let rel = format!("d{}/f{}", last / per_dir, last % per_dir);
    assert_eq!(meta(&sb.target, &rel).len(), 0);
    assert!(
        unpack.output.contains(&format!("{} paths", files + dirs)),
        "{}",
        unpack.output
    );
}

/// Writes a layer with one file of `gib` GiB of zeros, compressed so that
/// the layer is tiny: concatenated gzip members (each of 1 GiB of zeros,
/// compressed once and repeated), or one zstd frame per GiB.
fn bomb(path: &Path, gib: u64, zstd: bool) {
    let gib_bytes: u64 = 1 << 30;
    let zeros = vec![0u8; 1 << 20];
    let compress = |data: &mut dyn FnMut(&mut dyn Write)| -> Vec<u8> {
        if zstd {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            data(&mut e);
            e.finish().unwrap()
        } else {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            data(&mut e);
            e.finish().unwrap()
        }
    };
    let one_gib = |w: &mut dyn Write| {
        for _ in 0..1024 {
            w.write_all(&zeros).unwrap();
        }
    };
    let mut out = std::io::BufWriter::new(fs::File::create(path).unwrap());
    let h = header(REG, b"zeros", b"", 0o644, gib * gib_bytes);
    out.write_all(&compress(&mut |w| w.write_all(&h).unwrap()))
        .unwrap();
    let member = compress(&mut |w| one_gib(w));
    for _ in 0..gib {
        out.write_all(&member).unwrap();
    }
    out.write_all(&compress(&mut |w| w.write_all(&[0u8; 1024]).unwrap()))
        .unwrap();
    out.flush().unwrap();
}

fn check_bomb(name: &str, zstd: bool) {
    require_root("the decompression bomb case");
    let gib = size_from_env("SKIFF_HOSTILE_BOMB_GIB", 2);
    let sb = Sandbox::new(name);
    let layer = sb
        .work
        .join(if zstd { "bomb.tar.zst" } else { "bomb.tar.gz" });
    bomb(&layer, gib, zstd);
    let (convert, unpack) = convert_and_unpack_measured(&sb, name, &layer);
    assert!(convert.peak_rss_mib < RSS_BOUND_MIB && unpack.peak_rss_mib < RSS_BOUND_MIB);
    // All zeros: no chunk stored, the unpacked file is one hole.
    let m = meta(&sb.target, "zeros");
    assert_eq!(m.len(), gib << 30);
    assert!(
        m.blocks() < 1024,
        "the unpacked zero file takes {} blocks: holes were written out",
        m.blocks()
    );
    let blobs: u64 = fs::read_dir(sb.work.join("layout/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        blobs < 1 << 20,
        "{name}: the image of a file of zeros takes {blobs} bytes"
    );
}

#[test]
fn gzip_bomb() {
    check_bomb("gzip-bomb", false);
}

#[test]
fn zstd_bomb() {
    check_bomb("zstd-bomb", true);
}
