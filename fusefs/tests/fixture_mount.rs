//! `skiff mount` end to end on the fixture image (a real Debian + Python
//! image): the mounted tree equals `umoci unpack`'s, Python imports numpy and
//! pandas in a chroot of it, 16 threads reading random ranges get the right
//! bytes, a damaged blob gives EIO (and a log line naming the chunk) on the
//! file that needs it and nothing else, and SIGTERM unmounts cleanly.
//!
//! They drive the release `skiff` binary (`SKIFF_BIN`) and need root,
//! `/dev/fuse`, `fusermount3`, umoci and the fixtures: without them they
//! fail, they do not skip.

// In a test a failed expectation is the failure we want reported.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use skiff_format::{Bootstrap, FileKind, InodeId};
use skiff_registry::skiff::open_image;
use skiff_registry::ImageRef;
use skiff_tests::harness::{
    fixture_image, on_path, remove_all, run, scratch_root, skiff, umoci_rootfs,
};
use skiff_tests::services::SkiffMount;
use skiff_tests::treedump::{compare_named, dump, Dump, DumpOptions, MtimeMode};

fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need FUSE"
    );
    assert!(
        on_path("fusermount3"),
        "fusermount3 is missing: apt-get install fuse3"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount filesystems: run them as root"
    );
}

fn work_dir() -> PathBuf {
    scratch_root().join("fusefs-mount")
}

/// The fixture converted once per test binary (an OCI layout, tag `python`).
fn converted() -> &'static PathBuf {
    static CONVERTED: OnceLock<PathBuf> = OnceLock::new();
    CONVERTED.get_or_init(|| {
        let dir = work_dir().join("image");
        remove_all(&dir);
        let t = Instant::now();
        skiff([
            "convert",
            "--no-progress",
            &fixture_image(),
            &format!("oci:{}:python", dir.display()),
        ]);
        eprintln!(
            "converted the fixture in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        dir
    })
}

fn image_ref(layout: &Path) -> String {
    format!("oci:{}:python", layout.display())
}

/// Mounts `image` under this binary's work dir `name` (its own empty disk
/// cache unless `extra` names one).
fn mount(image: &str, name: &str, extra: &[&str]) -> SkiffMount {
    require_fuse();
    SkiffMount::start(image, &work_dir().join(name), extra)
}

/// SIGTERM; the daemon's exit status (it must exit).
fn terminate(m: &mut SkiffMount) -> std::process::ExitStatus {
    m.terminate()
        .0
        .unwrap_or_else(|| panic!("skiff mount did not exit:\n{}", m.logs()))
}

fn is_mounted(path: &Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Every path of the mount at `mnt`, every file read, against `reference`
/// (a dump of the umoci rootfs): equal, mtimes to the nanosecond or, where
/// the layer kept only seconds, to the second.
fn assert_equals_reference(reference: &Dump, mnt: &Path, what: &str) {
    let opts = DumpOptions::all().with_mtime(MtimeMode::Exact);
    let t = Instant::now();
    let got = dump(mnt, &opts).expect("dump mount");
    eprintln!(
        "dumped the mount, {what} ({} paths, every file read) in {:.1} s",
        got.len(),
        t.elapsed().as_secs_f64()
    );
    if let Err(exact) = compare_named(reference, "umoci", &got, "mount") {
        if let Err(report) = compare_named(
            &reference.with_mtime_seconds(),
            "umoci",
            &got.with_mtime_seconds(),
            "mount",
        ) {
            panic!("the mount ({what}) differs from umoci unpack:\n{report}");
        }
        eprintln!("equal with mtimes to the second; to the nanosecond:\n{exact}");
    }
}

fn reference_dump() -> Dump {
    let opts = DumpOptions::all().with_mtime(MtimeMode::Exact);
    let t = Instant::now();
    let reference = dump(&umoci_rootfs(), &opts).expect("dump reference");
    eprintln!(
        "dumped the reference ({} paths) in {:.1} s",
        reference.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        reference.len() > 10_000,
        "the reference is suspiciously small"
    );
    reference
}

#[test]
fn mount_equals_umoci_rootfs() {
    let reference = reference_dump();
    let m = mount(&image_ref(converted()), "compare", &[]);
    assert_equals_reference(&reference, &m.mnt, "straight from the blobs");
    assert!(!m.logs().contains("ERROR"), "errors logged:\n{}", m.logs());
}

#[test]
fn through_the_disk_cache_the_mount_equals_umoci_rootfs_cold_and_after_a_restart() {
    // With a disk cache, what readahead and fetch windows bring (chunks of
    // their own, and shared frames of packed small files) goes to disk
    // unverified, and is decoded and verified when read: cold, and again
    // by a second daemon on the same cache, which fetches nothing.
    let reference = reference_dump();
    let cache = work_dir().join("compare-cached-cache");
    remove_all(&cache);
    let cache_arg = cache.display().to_string();
    let mut m = mount(
        &image_ref(converted()),
        "compare-cached",
        &["--cache-dir", &cache_arg],
    );
    assert_equals_reference(&reference, &m.mnt, "cold, through the disk cache");
    assert!(terminate(&mut m).success());
    let cold = exit_counters(&m.logs());
    assert!(!m.logs().contains("ERROR"), "errors logged:\n{}", m.logs());
    assert!(cold["readahead_chunks"] > 0, "{cold:?}");
    assert!(cold["disk_hits"] > 0, "{cold:?}");
    assert_eq!(cold["disk_corrupt"], 0, "{cold:?}");
    let mut m = mount(
        &image_ref(converted()),
        "compare-cached-again",
        &["--cache-dir", &cache_arg],
    );
    assert_equals_reference(&reference, &m.mnt, "after a restart, from the disk cache");
    assert!(terminate(&mut m).success());
    let warm = exit_counters(&m.logs());
    assert!(!m.logs().contains("ERROR"), "errors logged:\n{}", m.logs());
    assert_eq!(warm["fetch_requests"], 0, "{warm:?}");
    assert_eq!(warm["disk_corrupt"], 0, "{warm:?}");
}

#[test]
fn python_imports_numpy_and_pandas_in_a_chroot() {
    let m = mount(&image_ref(converted()), "python", &[]);
    for run_name in ["cold", "warm"] {
        let t = Instant::now();
        let out = run(Command::new("chroot").arg(&m.mnt).args([
            "python3",
            "-c",
            "import numpy, pandas; print(numpy.__version__, pandas.__version__)",
        ]));
        eprintln!(
            "chroot python3 -c 'import numpy, pandas' ({run_name}): {:.2} s, {}",
            t.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
}

/// Regular files of a tree with their sizes (not following symlinks).
fn regular_files(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).expect("readdir") {
            let e = e.expect("entry");
            let rel = rel.join(e.file_name());
            let md = e.metadata().expect("lstat");
            if md.is_dir() {
                stack.push(rel);
            } else if md.is_file() && md.len() > 0 {
                out.push((rel.to_string_lossy().into_owned(), md.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn sixteen_threads_read_random_ranges() {
    const THREADS: u64 = 16;
    const READS_PER_THREAD: u64 = 2_000;
    let reference_root = umoci_rootfs();
    let files = regular_files(&reference_root);
    let m = mount(&image_ref(converted()), "stress", &[]);
    let bytes = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let (files, m, reference_root, bytes) = (&files, &m, &reference_root, &bytes);
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(thread);
                for i in 0..READS_PER_THREAD {
                    let (path, size) = &files[rng.gen_range(0..files.len())];
                    let off = rng.gen_range(0..*size);
                    let len = rng.gen_range(1..=(512u64 << 10)).min(size - off + 64) as usize;
                    let mut want = vec![0u8; len];
                    let mut got = vec![0u8; len];
                    let r = fs::File::open(reference_root.join(path)).expect("open reference");
                    let wn = read_at_full(&r, &mut want, off);
                    let f = fs::File::open(m.p(path))
                        .unwrap_or_else(|e| panic!("thread {thread} read {i}: open {path}: {e}"));
                    let gn = read_at_full(&f, &mut got, off);
                    assert_eq!(
                        gn, wn,
                        "thread {thread} read {i}: {path} at {off}+{len}: length"
                    );
                    assert!(
                        got[..gn] == want[..wn],
                        "thread {thread} read {i}: {path} at {off}+{len}: bytes differ"
                    );
                    bytes.fetch_add(gn as u64, Ordering::Relaxed);
                }
            });
        }
    });
    eprintln!(
        "{} random reads of {} files on {THREADS} threads: {:.1} MB in {:.1} s, no error, no mismatch",
        THREADS * READS_PER_THREAD,
        files.len(),
        bytes.load(Ordering::Relaxed) as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
}

fn read_at_full(f: &fs::File, buf: &mut [u8], off: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => panic!("read at {}: {e}", off + n as u64),
        }
    }
    n
}

/// Paths of the regular files of a bootstrap, by inode (first name only).
fn file_paths(b: &Bootstrap<'_>) -> HashMap<InodeId, String> {
    let mut out = HashMap::new();
    let mut stack = vec![(String::new(), b.root())];
    while let Some((path, dir)) = stack.pop() {
        for e in b.dir_entries(dir).expect("dir") {
            let e = e.expect("entry");
            let p = format!("{path}/{}", String::from_utf8_lossy(e.name));
            match e.kind {
                FileKind::Directory => stack.push((p, e.inode)),
                FileKind::Regular => {
                    out.entry(e.inode).or_insert(p);
                }
                _ => {}
            }
        }
    }
    out
}

#[test]
fn a_damaged_blob_gives_eio_on_that_file_only() {
    let reference_root = umoci_rootfs();
    let layout = work_dir().join("damaged-image");
    remove_all(&layout);
    run(Command::new("cp").arg("-a").arg(converted()).arg(&layout));
    let image = open_image(&image_ref(&layout).parse::<ImageRef>().expect("ref")).expect("open");
    let b = Bootstrap::parse(&image.bootstrap).expect("parse");
    let paths = file_paths(&b);
    // Chunk -> number of files that use it.
    let mut users: HashMap<u32, usize> = HashMap::new();
    for id in paths.keys() {
        let mut seen = HashSet::new();
        for fc in b.file_chunks(*id).expect("chunks") {
            if seen.insert(fc.chunk_index()) {
                *users.entry(fc.chunk_index()).or_default() += 1;
            }
        }
    }
    // A file of a few chunks whose second chunk no other file uses, and a
    // big file that does not use it either.
    let mut candidates: Vec<(&InodeId, &String)> = paths.iter().collect();
    candidates.sort_by(|a, b| a.1.cmp(b.1));
    let (victim, victim_path, chunk_index) = candidates
        .iter()
        .find_map(|(id, p)| {
            let chunks = b.file_chunks(**id).ok()?;
            let c = chunks.get(1)?.chunk_index();
            (chunks.len() >= 3 && users.get(&c) == Some(&1)).then_some((**id, (*p).clone(), c))
        })
        .expect("a file with a private chunk");
    let info = b.chunk(chunk_index).expect("chunk");
    let blob = b.blob(info.blob_index).expect("blob");
    let blob_path = layout.join("blobs/sha256").join(blob.digest.to_hex());
    let mut bytes = fs::read(&blob_path).expect("read blob");
    bytes[(info.compressed_offset + u64::from(info.compressed_size) / 2) as usize] ^= 0x01;
    fs::remove_file(&blob_path).expect("unlink blob copy");
    fs::write(&blob_path, &bytes).expect("write damaged blob");
    let (other_path, _) = candidates
        .iter()
        .filter(|(id, _)| **id != victim)
        .map(|(id, p)| (*p, b.inode(**id).map(|i| i.size()).unwrap_or(0)))
        .filter(|(_, size)| *size > 1 << 20)
        .max_by_key(|(_, size)| *size)
        .expect("a big file");
    drop(image);

    let m = mount(&image_ref(&layout), "damaged", &[]);
    for _ in 0..2 {
        let err = fs::read(m.p(&victim_path)).expect_err("reading a damaged chunk must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{victim_path}: {err}");
    }
    let want =
        fs::read(reference_root.join(other_path.trim_start_matches('/'))).expect("reference");
    assert!(
        fs::read(m.p(other_path)).expect("other file") == want,
        "{other_path} differs"
    );
    // The first chunk of the damaged file is still fine.
    let f = fs::File::open(m.p(&victim_path)).expect("open");
    let mut head = vec![0u8; 100];
    assert_eq!(f.read_at(&mut head, 0).expect("read head"), 100);
    let logs = m.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(&info.digest.to_string()))
        .unwrap_or_else(|| {
            panic!(
                "no log line names chunk {chunk_index} ({}):\n{logs}",
                info.digest
            )
        });
    assert!(
        line.contains(&format!("chunk {chunk_index}")) && line.contains(&victim_path),
        "{line}"
    );
    eprintln!("damaged {victim_path} (chunk {chunk_index}): EIO; {other_path} served; log: {line}");
}

#[test]
fn sigterm_unmounts_cleanly() {
    let mut m = mount(&image_ref(converted()), "sigterm", &[]);
    let md = fs::metadata(m.p("/usr/bin")).expect("stat");
    assert!(md.is_dir());
    assert_eq!(fs::metadata(&m.mnt).expect("root").ino(), 1);
    assert!(is_mounted(&m.mnt));
    let status = terminate(&mut m);
    assert!(status.success(), "exit status {status}:\n{}", m.logs());
    assert!(!is_mounted(&m.mnt), "still mounted after SIGTERM");
    assert!(m.logs().contains("unmounted"), "{}", m.logs());
}

/// The counters of the daemon's "unmounted" log line, by name.
fn exit_counters(logs: &str) -> HashMap<String, u64> {
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("unmounted"))
        .unwrap_or_else(|| panic!("no exit summary in the log:\n{logs}"));
    line.split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Runs the import in a chroot of `m` and unmounts; returns the counters.
fn cold_import(m: &mut SkiffMount) -> HashMap<String, u64> {
    let t = Instant::now();
    run(Command::new("chroot")
        .arg(&m.mnt)
        .args(["python3", "-c", "import numpy, pandas"]));
    let secs = t.elapsed().as_secs_f64();
    assert!(terminate(m).success());
    let mut c = exit_counters(&m.logs());
    c.insert("millis".into(), (secs * 1e3) as u64);
    c
}

#[test]
fn coalescing_cuts_requests_of_a_cold_import() {
    let image = image_ref(converted());
    let mut figures = Vec::new();
    for (name, extra) in [
        (
            "one request per chunk",
            &[
                "--max-request-kb",
                "1",
                "--fetch-window-kb",
                "0",
                "--chunk-readahead-kb",
                "0",
            ][..],
        ),
        (
            "adjacent chunks merged",
            &["--fetch-window-kb", "0", "--chunk-readahead-kb", "0"][..],
        ),
        ("defaults", &[][..]),
    ] {
        let mut m = mount(&image, "coalesce", extra);
        let c = cold_import(&mut m);
        eprintln!(
            "cold import, {name}: {} requests, {:.1} MB fetched, {} chunks, {} ms",
            c["fetch_requests"],
            c["bytes_fetched"] as f64 / 1e6,
            c["chunks_fetched"],
            c["millis"]
        );
        figures.push(c);
    }
    // Python reads many small files (a chunk or two each), so adjacency
    // within reads saves less than speculative fetching does.
    assert!(figures[1]["fetch_requests"] < figures[0]["fetch_requests"]);
    assert!(figures[2]["fetch_requests"] < figures[1]["fetch_requests"]);
    // Merging changes how requests are made, not what is fetched; the
    // kernel's asynchronous readahead makes the set vary by a chunk or two.
    let (a, b) = (figures[0]["chunks_fetched"], figures[1]["chunks_fetched"]);
    assert!(a.abs_diff(b) <= a / 100 + 2, "{a} vs {b} chunks fetched");
}

#[test]
fn a_recorded_import_prefetches_and_a_restart_reuses_the_cache() {
    let work = work_dir().join("prefetch-e2e");
    remove_all(&work);
    fs::create_dir_all(&work).expect("work dir");
    let list = work.join("access.txt");
    let cache = work.join("cache");

    // 1. Record what the import reads (the reads' own requests, without
    // readahead: the figure step 3 is measured against).
    let mut m = mount(
        &image_ref(converted()),
        "record",
        &[
            "--chunk-readahead-kb",
            "0",
            "--record-access",
            &list.display().to_string(),
            "--cache-dir",
            &cache.display().to_string(),
        ],
    );
    let cold = cold_import(&mut m);
    let recorded = fs::read_to_string(&list).expect("access list");
    // One line per stretch read: PATH, or PATH<TAB>OFFSET<TAB>LENGTH for
    // part of a file (the pages the import maps of a shared library).
    let mut paths: Vec<&str> = Vec::new();
    for l in recorded.lines() {
        let path = l.split('\t').next().unwrap_or_default();
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    let files = paths.len();
    assert!(files > 100, "only {files} files recorded");
    assert!(paths.iter().any(|p| p.contains("numpy")), "{recorded}");
    let stretches = recorded.lines().filter(|l| l.contains('\t')).count();
    assert!(
        stretches > 10,
        "the import maps parts of libraries, but only {stretches} stretches were recorded:\n{recorded}"
    );

    // 2. Restart on the same cache: the import fetches nothing.
    let mut m = mount(
        &image_ref(converted()),
        "restart",
        &["--cache-dir", &cache.display().to_string()],
    );
    let warm = cold_import(&mut m);
    eprintln!(
        "import: cold {} requests / {:.1} MB in {} ms; after a restart on the same cache: {} requests, {} disk hits, {} ms",
        cold["fetch_requests"],
        cold["bytes_fetched"] as f64 / 1e6,
        cold["millis"],
        warm["fetch_requests"],
        warm["disk_hits"],
        warm["millis"]
    );
    assert_eq!(warm["fetch_requests"], 0, "restart reuse");
    assert!(warm["disk_hits"] > 0);

    // 3. Convert with the list, mount with an empty cache: prefetch fetches
    // the listed stretches before anyone reads them.
    let layout = work.join("image");
    skiff([
        "convert",
        "--no-progress",
        "--prefetch-list",
        &list.display().to_string(),
        &fixture_image(),
        &format!("oci:{}:python", layout.display()),
    ]);
    let image = open_image(&image_ref(&layout).parse::<ImageRef>().expect("ref")).expect("open");
    let b = Bootstrap::parse(&image.bootstrap).expect("parse");
    assert_eq!(b.prefetch().expect("prefetch").len(), files);
    let ranges = b.prefetch_ranges().expect("prefetch ranges");
    assert!(ranges.len() >= recorded.lines().count() / 2, "{ranges:?}");
    drop(image);
    let sock = work.join("metrics.sock");
    let mut m = mount(
        &image_ref(&layout),
        "prefetched",
        &["--metrics-socket", &sock.display().to_string()],
    );
    let t = Instant::now();
    let metrics = loop {
        let text = scrape(&sock);
        if text.contains("\nskiff_prefetch_finished 1\n") {
            break text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "prefetch never ended:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    let prefetch_requests = value("skiff_fetch_requests_total");
    let prefetch_bytes = value("skiff_fetch_bytes_total");
    assert_eq!(
        value("skiff_reads_total"),
        0,
        "prefetch must not need reads"
    );
    assert!(value("skiff_fetch_chunks_total") > 0);
    let after = cold_import(&mut m);
    eprintln!(
        "prefetch of {files} files: {prefetch_requests} requests, {:.1} MB; then the import: {} more requests, {} ms",
        prefetch_bytes as f64 / 1e6,
        after["fetch_requests"] - prefetch_requests,
        after["millis"]
    );
    // The list is coalesced: requests of up to 2 MiB across gaps of up to
    // 64 KiB take far fewer than the cold import's (104 of 346 here; the
    // import's own reads ask only for what they need: from a local store
    // its fetch window opens only for reads that walk on). Its bytes are
    // the stretches the import read plus the bridged gaps (30.0 MB against
    // 29.6 MB; whole files were 36.0 MB).
    assert!(
        prefetch_requests * 10 < cold["fetch_requests"] * 6,
        "prefetch should take far fewer requests than the cold import"
    );
    assert!(
        prefetch_bytes * 100 < cold["bytes_fetched"] * 115,
        "prefetch fetched {prefetch_bytes} bytes, the cold import {}",
        cold["bytes_fetched"]
    );
    assert!(after["fetch_requests"] - prefetch_requests <= cold["fetch_requests"] / 10);
}

/// `GET /metrics` on a unix socket.
fn scrape(sock: &Path) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    reply
}
