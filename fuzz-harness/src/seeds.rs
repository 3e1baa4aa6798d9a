//! Seed inputs: small, valid examples of what each target parses, made with
//! the product's own writers (and the `tar`, `flate2` and `zstd` crates), so
//! that fuzzing starts from inputs that reach deep and no binary file needs
//! to be committed. `scripts/fuzz` writes them with the `skiff-fuzz-seeds`
//! binary; `tests/regressions.rs` checks that each is accepted.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use skiff_converter::Converter;
use skiff_format::{encode_chunk, Digest};
use tar::{EntryType, Header};

use crate::chunk::{encode_input, Record};
use crate::manifest::archive_of;

/// One seed: a file name (without directory) and its bytes.
pub type Seed = (String, Vec<u8>);

/// splitmix64, for deterministic "random" bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// `n` bytes of compressible text.
fn text(n: usize, salt: u64) -> Vec<u8> {
    let words = [
        "skiff ", "layer ", "chunk ", "blob ", "the ", "of ", "tar\n",
    ];
    let mut rng = Rng(salt);
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        out.extend_from_slice(words[(rng.next() % words.len() as u64) as usize].as_bytes());
    }
    out.truncate(n);
    out
}

/// Builds a layer tar in memory. Writing to a `Vec` cannot fail except on
/// a name a header cannot hold, and the names here all fit.
struct TarWriter {
    b: tar::Builder<Vec<u8>>,
}

impl TarWriter {
    fn new() -> Self {
        TarWriter {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h
    }

    fn add(&mut self, kind: EntryType, mode: u32, path: &str, data: &[u8]) -> &mut Self {
        let mut h = Self::header(kind, mode, data.len() as u64);
        let _ = self.b.append_data(&mut h, path, data);
        self
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.add(EntryType::Directory, 0o755, path, b"")
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.add(EntryType::Regular, 0o644, path, data)
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777, 0);
        let _ = self.b.append_link(&mut h, path, target);
        self
    }

    fn device(&mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(kind, 0o600, 0);
        let _ = h.set_device_major(major);
        let _ = h.set_device_minor(minor);
        let _ = self.b.append_data(&mut h, path, &b""[..]);
        self
    }

    /// A PAX header (`x` local, `g` global) with `records`.
    fn pax(&mut self, kind: EntryType, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            // LEN counts its own digits: find the fixed point.
            let rest = 1 + k.len() + 1 + v.len() + 1;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        let name = if kind == EntryType::XGlobalHeader {
            "pax_global_header"
        } else {
            "PaxHeaders/entry"
        };
        self.add(kind, 0o644, name, &body)
    }

    fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap_or_default()
    }
}

/// The base layer the layer target converts first: directories, files
/// (some sharing chunks), a symlink, a hard link and an opaque candidate.
pub fn base_layer() -> Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut t = TarWriter::new();
        t.dir("etc/")
            .file("etc/passwd", &text(3000, 1))
            .file("etc/hosts", &text(600, 2))
            .dir("usr/")
            .dir("usr/bin/")
            .file("usr/bin/tool", &Rng(3).bytes(9000))
            .link(EntryType::Symlink, "usr/bin/link", "tool")
            .link(EntryType::Link, "etc/hard", "etc/passwd")
            .dir("opaque/")
            .file("opaque/x", &text(100, 4))
            .file("empty", b"");
        t.finish()
    })
    .clone()
}

/// A layer of every kind of entry the converter knows, to apply on top of
/// [`base_layer`].
pub fn sample_layer() -> Vec<u8> {
    let mut t = TarWriter::new();
    t.pax(
        EntryType::XGlobalHeader,
        &[("comment", b"global"), ("uid", b"7")],
    )
    .dir("etc/")
    .file("etc/passwd", &text(3500, 1))
    .file("etc/.wh.hosts", b"")
    .dir("opaque/")
    .file("opaque/.wh..wh..opq", b"")
    .file("opaque/y", &text(50, 5))
    .pax(
        EntryType::XHeader,
        &[
            ("SCHILY.xattr.user.note", b"line\none"),
            ("mtime", b"1700000000.25"),
        ],
    )
    .file("etc/with-xattr", &text(700, 6))
    .link(EntryType::Link, "etc/hard2", "usr/bin/tool")
    .link(EntryType::Symlink, "etc/abs", "/usr/bin/tool")
    .file("usr/bin/.wh.link", b"")
    .device(EntryType::Char, "dev-null", 1, 3)
    .add(EntryType::Fifo, 0o644, "fifo", b"")
    .file(&format!("deep/{}/file", "long-name-".repeat(12)), b"x")
    .file("zeros", &[0u8; 8192])
    .file("copy-of-tool", &Rng(3).bytes(9000));
    t.finish()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).unwrap_or_default()
}

/// The seeds of target `name` (empty for an unknown name). `fixtures` is
/// the fixture directory (its `images/` OCI layout lends real documents to
/// the manifest target) if there is one.
pub fn seeds(name: &str, fixtures: Option<&Path>) -> Vec<Seed> {
    match name {
        "bootstrap" => bootstrap_seeds(),
        "layer" => layer_seeds(),
        "manifest" => manifest_seeds(fixtures),
        "chunk" => chunk_seeds(),
        _ => Vec::new(),
    }
}

fn layer_seeds() -> Vec<Seed> {
    let tar = sample_layer();
    let half = tar.len() / 2;
    let mut two_members = gzip(&tar[..half]);
    two_members.extend_from_slice(&gzip(&tar[half..]));
    vec![
        ("sample.tar".into(), tar.clone()),
        ("sample.tar.gz".into(), gzip(&tar)),
        ("sample.tar.zst".into(), zstd(&tar)),
        ("two-members.tar.gz".into(), two_members),
        ("base.tar".into(), base_layer()),
        ("empty.tar".into(), vec![0u8; 1024]),
    ]
}

fn bootstrap_seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    for (name, layers) in [
        ("base.bootstrap", vec![base_layer()]),
        ("sample.bootstrap", vec![base_layer(), sample_layer()]),
        (
            "sample-twice.bootstrap",
            vec![base_layer(), sample_layer(), sample_layer()],
        ),
    ] {
        let sink = Arc::new(crate::layer::MemorySink::default());
        let Ok(mut c) = Converter::new(crate::layer::options(), sink, None) else {
            continue;
        };
        let count = layers.len();
        let ok = layers.into_iter().enumerate().all(|(i, l)| {
            c.add_layer(
                "seed",
                Box::new(std::io::Cursor::new(l)),
                None,
                None,
                i,
                count,
            )
            .is_ok()
        });
        if let (true, Ok(converted)) = (ok, c.finish()) {
            out.push((name.to_string(), converted.bootstrap));
        }
    }
    out
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&0u8)
}

fn manifest_seeds(fixtures: Option<&Path>) -> Vec<Seed> {
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin"],"Cmd":["sh"],"Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":["sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"]},"history":[{"created_by":"base"},{"created_by":"app"}]}"#;
    let config_one = br#"{"architecture":"amd64","os":"linux","config":{"User":"1000"},"rootfs":{"type":"layers","diff_ids":["sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"]}}"#;
    let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2,"annotations":{"org.example":"x"}},{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356","size":5}],"annotations":{"org.opencontainers.image.created":"2024-01-01T00:00:00Z"}}"#;
    let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356","size":5}]}"#;
    let index = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}"#;
    let nested = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356","size":5,"platform":{"os":"linux","architecture":"amd64"}}]}"#;
    let layer = base_layer();
    let archive_config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        Digest::of(&layer)
    );
    let archive_manifest =
        br#"[{"Config":"config.json","RepoTags":["fuzz:latest"],"Layers":["layer.tar"]}]"#;
    let mut out: Vec<Seed> = vec![
        ("oci-manifest".into(), join(&[oci, config])),
        ("docker-manifest".into(), join(&[docker, config])),
        ("config".into(), config_one.to_vec()),
        ("index".into(), join(&[index, nested, oci])),
        (
            "docker-archive".into(),
            join(&[archive_manifest, archive_config.as_bytes(), &layer]),
        ),
        (
            "docker-archive-raw.tar".into(),
            archive_of(archive_manifest, archive_config.as_bytes(), &layer),
        ),
    ];
    if let Some(fixtures) = fixtures {
        out.extend(fixture_documents(&fixtures.join("images")));
    }
    out
}

/// The real fixture's `index.json`, and its manifest with its config.
fn fixture_documents(layout: &Path) -> Vec<Seed> {
    let mut out = Vec::new();
    let Ok(index) = std::fs::read(layout.join("index.json")) else {
        return out;
    };
    out.push(("fixture-index".into(), index.clone()));
    let blob = |d: &str| -> Option<Vec<u8>> {
        let hex = d.strip_prefix("sha256:")?;
        std::fs::read(layout.join("blobs").join("sha256").join(hex)).ok()
    };
    let v: serde_json::Value = serde_json::from_slice(&index).unwrap_or_default();
    let manifest = v
        .pointer("/manifests/0/digest")
        .and_then(|d| d.as_str())
        .and_then(blob);
    if let Some(manifest) = manifest {
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap_or_default();
        let config = m
            .pointer("/config/digest")
            .and_then(|d| d.as_str())
            .and_then(blob)
            .unwrap_or_default();
        out.push(("fixture-manifest".into(), join(&[&manifest, &config])));
        out.push(("fixture-index-manifest".into(), join(&[&index, &manifest])));
    }
    out
}

fn chunk_seeds() -> Vec<Seed> {
    let mut rng = Rng(9);
    let datas = [text(3000, 7), rng.bytes(2000), text(70_000, 8)];
    let mut blob = Vec::new();
    let mut records = Vec::new();
    for d in &datas {
        let Ok((stored, compressed)) = encode_chunk(d, 3) else {
            continue;
        };
        records.push(Record {
            flags: 2 | u8::from(compressed),
            offset: blob.len() as u32,
            compressed_size: stored.len() as u32,
            uncompressed_size: d.len() as u32,
        });
        blob.extend_from_slice(&stored);
    }
    let mut out = vec![("three-chunks".to_string(), encode_input(&records, &blob))];
    for (i, r) in records.iter().enumerate() {
        let start = r.offset as usize;
        let stored = &blob[start..start + r.compressed_size as usize];
        let alone = Record { offset: 0, ..*r };
        out.push((format!("chunk-{i}"), encode_input(&[alone], stored)));
    }
    // Two records of one chunk, and one whose sizes come from the frame.
    if let Some(first) = records.first() {
        let sized = Record {
            flags: first.flags | 4,
            uncompressed_size: 0,
            ..*first
        };
        out.push((
            "repeat-and-sized".into(),
            encode_input(&[*first, *first, sized], &blob),
        ));
        // The same chunks with BLAKE3 digests (format 1.4).
        let blake3: Vec<Record> = records
            .iter()
            .map(|r| Record {
                flags: r.flags | 16,
                ..*r
            })
            .collect();
        out.push(("blake3".into(), encode_input(&blake3, &blob)));
        // Two slices of one shared frame (format 1.1), read together.
        if first.flags & 1 != 0 {
            let shared = Record {
                flags: first.flags | 8,
                ..*first
            };
            out.push((
                "shared-frame".into(),
                encode_input(
                    &[shared, shared, records.get(1).copied().unwrap_or(*first)],
                    &blob,
                ),
            ));
        }
    }
    out
}
