//! The registry client against a real `docker-registry` (Debian's
//! distribution 2.8) on 127.0.0.1: push and pull, range reads, uploads,
//! mounts, Basic and token auth with refresh, redirects, mirrors, and
//! injected network faults.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use skiff_format::tree::{Attrs, BlobInfo, ChunkInfo, FileChunk, ImageTree, Node, NodeData};
use skiff_registry::media::{
    ANNOTATION_BOOTSTRAP_DIGEST, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX,
    OCI_LAYER_TAR, OCI_MANIFEST, SKIFF_BLOB, SKIFF_BOOTSTRAP,
};
use skiff_registry::skiff::{open_image_cached, open_image_with};
use skiff_registry::{
    open_source_with, BlobStore, BootstrapBytes, BootstrapCache, Credentials, Digest, ImageRef,
    Mirror, Platform, RegistryBlobStore, RegistryClient, RegistryConfig, RegistryError,
    RegistryWriter,
};
use support::*;

/// Pushes config + layers + manifest; returns the manifest digest and bytes.
fn push_image(
    writer: &RegistryWriter,
    tag: &str,
    layers: &[Vec<u8>],
    arch: &str,
    media_type: &str,
) -> Result<(Digest, Vec<u8>), Box<dyn std::error::Error>> {
    let ids: Vec<String> = layers.iter().map(|l| Digest::of(l).oci()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ids},
    }))?;
    let mut descs = Vec::new();
    for l in layers {
        let (d, s) = writer.put_blob_bytes(l)?;
        descs.push(json!({"mediaType": OCI_LAYER_TAR, "digest": d.oci(), "size": s}));
    }
    let (cd, cs) = writer.put_blob_bytes(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": OCI_CONFIG, "digest": cd.oci(), "size": cs},
        "layers": descs,
    }))?;
    let d = writer.put_manifest(tag, &manifest, media_type)?;
    Ok((d, manifest))
}

fn read_all(mut r: impl Read) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn anonymous_push_then_pull_through_open_source() -> TestResult {
    let reg = Registry::start();
    let cfg = test_config();
    let writer = RegistryWriter::new(&reg.docker_ref("test/img"), &cfg)?;
    let layers = vec![pattern(300_000, 1), pattern(3_000, 2)];
    let (digest, _) = push_image(&writer, "v1", &layers, "amd64", OCI_MANIFEST)?;

    let r = ImageRef::Docker(reg.docker_ref("test/img:v1"));
    let (src, opener) = open_source_with(&r, None, &cfg)?;
    assert_eq!(src.manifest_digest, digest);
    assert_eq!(src.layers.len(), 2);
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(src.layers[i].digest, Some(Digest::of(l)));
        assert_eq!(src.layers[i].diff_id, Some(Digest::of(l)));
        assert_eq!(&read_all(opener.open_layer(i)?)?, l);
    }
    assert!(opener.open_layer(2).is_err());

    // By digest.
    let by_digest = ImageRef::Docker(reg.docker_ref(&format!("test/img@{digest}")));
    let (src2, _) = open_source_with(&by_digest, None, &cfg)?;
    assert_eq!(src2.config, src.config);
    // A digest the registry does not have: a clear not-found.
    let missing = Digest::of(b"nope");
    let e = open_source_with(
        &ImageRef::Docker(reg.docker_ref(&format!("test/img@{missing}"))),
        None,
        &cfg,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("not found") && e.contains(&reg.host()), "{e}");

    // A multi-platform index (OCI index of a Docker manifest and an OCI one).
    let arm_layers = vec![pattern(5_000, 3)];
    let (arm, arm_bytes) = push_image(&writer, "arm", &arm_layers, "arm64", DOCKER_MANIFEST)?;
    let (_, amd_bytes) = push_image(&writer, "amd", &layers, "amd64", OCI_MANIFEST)?;
    for (list_type, entry_type) in [
        (OCI_INDEX, OCI_MANIFEST),
        (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST),
    ] {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": list_type,
            "manifests": [
                {"mediaType": entry_type, "digest": digest.oci(), "size": amd_bytes.len(),
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": DOCKER_MANIFEST, "digest": arm.oci(), "size": arm_bytes.len(),
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ],
        }))?;
        writer.put_manifest("multi", &index, list_type)?;
        let multi = ImageRef::Docker(reg.docker_ref("test/img:multi"));
        let arm64: Platform = "linux/arm64".parse()?;
        let (s, o) = open_source_with(&multi, Some(&arm64), &cfg)?;
        assert_eq!(s.manifest_digest, arm);
        assert_eq!(read_all(o.open_layer(0)?)?, arm_layers[0]);
        let amd64: Platform = "linux/amd64".parse()?;
        assert_eq!(
            open_source_with(&multi, Some(&amd64), &cfg)?
                .0
                .manifest_digest,
            digest
        );
        let s390: Platform = "linux/s390x".parse()?;
        let e = open_source_with(&multi, Some(&s390), &cfg).err();
        assert!(
            matches!(e, Some(RegistryError::NoMatchingPlatform { .. })),
            "{e:?}"
        );
    }
    Ok(())
}

#[test]
fn range_reads() -> TestResult {
    let reg = Registry::start();
    let cfg = test_config();
    let r = reg.docker_ref("ranges/blob");
    let data = pattern((1 << 20) + 123, 7);
    let len = data.len() as u64;
    let (d, _) = RegistryWriter::new(&r, &cfg)?.put_blob_bytes(&data)?;

    // A store that does not know the size: the registry's answers decide.
    let fresh = RegistryBlobStore::new(&r, &cfg)?;
    let e = fresh
        .read_range(&d, len - 5, 10)
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("too short")),
        "{e:?}"
    );
    let e = fresh
        .read_range(&d, len + 100, 1)
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("past its end")),
        "{e:?}"
    );

    let store = RegistryBlobStore::new(&r, &cfg)?;
    assert_eq!(store.blob_size(&d)?, len);
    for (o, l) in [
        (0u64, 1u64),
        (0, len),
        (len - 1, 1),
        (12_345, 4096),
        (len - 10, 10),
        (65_536, 65_536),
    ] {
        let got = store.read_range(&d, o, l)?;
        assert_eq!(got, &data[o as usize..(o + l) as usize], "range {o}+{l}");
    }
    assert!(store.read_range(&d, 10, 0)?.is_empty());
    assert!(store.read_range(&d, len, 1).is_err());
    assert!(store.read_range(&d, len - 5, 10).is_err());
    assert!(store.read_range(&d, u64::MAX, 2).is_err());

    // Merged ranges: overlapping/touching ones in one request.
    let before = store.stats().requests;
    let ranges = [(0u64, 10u64), (10, 10), (5, 10), (100_000, 5)];
    let got = store.read_ranges(&d, &ranges)?;
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert_eq!(got[i], &data[o as usize..(o + l) as usize]);
    }
    assert_eq!(store.stats().requests - before, 2);

    // Missing blob.
    let missing = Digest::of(b"missing");
    let e = store
        .read_range(&missing, 0, 1)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("not found") && e.contains(&missing.to_string()),
        "{e}"
    );

    // Many threads at once (FUSE workers are plain threads).
    let store = Arc::new(store);
    let data = Arc::new(data);
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let (store, data) = (store.clone(), data.clone());
            thread::spawn(move || -> Result<(), String> {
                for i in 0..40u64 {
                    let o = (t * 7919 + i * 104_729) % (len - 70_000);
                    let l = 1 + (i * 977) % 65_536;
                    let got = store.read_range(&d, o, l).map_err(|e| e.to_string())?;
                    if got != data[o as usize..(o + l) as usize] {
                        return Err(format!("wrong bytes at {o}+{l}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "thread panicked")??;
    }
    let stats = store.stats();
    assert_eq!(stats.in_flight, 0);
    assert!(stats.bytes > 0 && stats.requests >= 320, "{stats:?}");
    Ok(())
}

#[test]
fn head_skip_mount_and_streamed_small_blob() -> TestResult {
    let reg = Registry::start();
    let cfg = test_config();
    let a = RegistryWriter::new(&reg.docker_ref("repo/a"), &cfg)?;
    let blob = pattern(200_000, 11);
    let (d, s) = a.put_blob_bytes(&blob)?;
    assert!(a.has_blob(&d)?);
    let uploaded = a.stats().bytes_uploaded;
    assert_eq!(uploaded, s);
    // Again: HEAD says it is there, nothing is sent.
    assert_eq!(a.put_blob_bytes(&blob)?, (d, s));
    assert_eq!(a.stats().blobs_skipped, 1);
    assert_eq!(a.stats().bytes_uploaded, uploaded);

    // Streamed through Write in pieces.
    let other = pattern(50_000, 12);
    let mut w = a.blob_writer()?;
    for piece in other.chunks(777) {
        std::io::Write::write_all(&mut w, piece)?;
    }
    assert_eq!(w.commit()?, (Digest::of(&other), other.len() as u64));

    // Cross-repository mount into another repository.
    let b = RegistryWriter::new(&reg.docker_ref("repo/b"), &cfg)?.with_mount_source("repo/a");
    assert!(!b.has_blob(&d)?);
    assert_eq!(b.put_blob_bytes(&blob)?, (d, s));
    assert_eq!(b.stats().blobs_mounted, 1);
    assert_eq!(b.stats().bytes_uploaded, 0);
    assert!(b.has_blob(&d)?);
    let store = RegistryBlobStore::new(&reg.docker_ref("repo/b"), &cfg)?;
    assert_eq!(store.read_range(&d, 100, 50)?, &blob[100..150]);
    // Mounting what the source does not have: false, nothing mounted.
    let absent = Digest::of(b"absent");
    assert!(!b.mount_blob(&absent, "repo/a")?);
    assert!(!b.has_blob(&absent)?);
    Ok(())
}

#[test]
fn chunked_upload_of_a_large_blob() -> TestResult {
    let reg = Registry::start();
    let cfg = test_config();
    let r = reg.docker_ref("big/blob");
    let w = RegistryWriter::new(&r, &cfg)?;
    let data = pattern(21 << 20, 21);
    let mut bw = w.blob_writer()?;
    for piece in data.chunks(1 << 20) {
        std::io::Write::write_all(&mut bw, piece)?;
    }
    let (d, s) = bw.commit()?;
    assert_eq!((d, s), (Digest::of(&data), data.len() as u64));
    assert_eq!(w.stats().bytes_uploaded, s);
    let store = RegistryBlobStore::new(&r, &cfg)?;
    let edge = (16 << 20) - 10;
    assert_eq!(
        store.read_range(&d, edge, 20)?,
        &data[edge as usize..edge as usize + 20]
    );
    let client = RegistryClient::new(&r, &cfg)?;
    let streamed = read_all(client.blob_reader(d, s, "big blob".into()))?;
    assert!(streamed == data);

    // A writer dropped after its first chunk leaves no blob behind.
    let partial = pattern(17 << 20, 22);
    let mut bw = w.blob_writer()?;
    std::io::Write::write_all(&mut bw, &partial)?;
    drop(bw);
    assert!(!w.has_blob(&Digest::of(&partial))?);
    Ok(())
}

/// A minimal Skiff image: one file in one chunk in one data blob.
fn skiff_image(
    writer: &RegistryWriter,
    tag: &str,
    content: &[u8],
) -> Result<(Digest, Vec<u8>, Digest), Box<dyn std::error::Error>> {
    let (stored, compressed) = skiff_format::encode_chunk(content, 3)?;
    let blob = stored.clone();
    let blob_digest = Digest::of(&blob);
    let chunk = ChunkInfo {
        digest: skiff_format::ChunkHash::Blake3.digest(content),
        hash: skiff_format::ChunkHash::Blake3,
        blob_index: 0,
        compressed,
        compressed_offset: 0,
        compressed_size: u32::try_from(stored.len())?,
        uncompressed_size: u32::try_from(content.len())?,
        frame: None,
    };
    let attrs = |mode| Attrs {
        mode,
        ..Attrs::default()
    };
    let file = Node {
        attrs: attrs(0o644),
        data: NodeData::Regular {
            size: content.len() as u64,
            chunks: vec![FileChunk {
                file_offset: 0,
                chunk_index: 0,
            }],
        },
        xattrs: BTreeMap::new(),
    };
    let root = Node {
        attrs: attrs(0o755),
        data: NodeData::Directory {
            entries: BTreeMap::from([(b"hello.txt".to_vec(), 1)]),
        },
        xattrs: BTreeMap::new(),
    };
    let tree = ImageTree {
        nodes: vec![root, file],
        chunks: vec![chunk],
        blobs: vec![BlobInfo {
            digest: blob_digest,
            size: blob.len() as u64,
            uncompressed_size: content.len() as u64,
            chunk_count: 1,
        }],
        prefetch: Vec::new(),
        prefetch_ranges: Vec::new(),
        chunk_size_hint: 65_536,
        chunk_hash: skiff_format::ChunkHash::Blake3,
    };
    let bootstrap = skiff_format::write_bootstrap(&tree)?;
    let layer = zstd::encode_all(bootstrap.as_slice(), 3)?;
    let (bd, bs) = writer.put_blob_bytes(&blob)?;
    let (ld, ls) = writer.put_blob_bytes(&layer)?;
    let (cd, cs) = writer.put_blob_bytes(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    )?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd.oci(), "size": cs},
        "layers": [
            {"mediaType": SKIFF_BLOB, "digest": bd.oci(), "size": bs},
            {"mediaType": SKIFF_BOOTSTRAP, "digest": ld.oci(), "size": ls,
             "annotations": {ANNOTATION_BOOTSTRAP_DIGEST: Digest::of(&bootstrap).to_string()}},
        ],
    }))?;
    let md = writer.put_manifest(tag, &manifest, OCI_MANIFEST)?;
    Ok((md, bootstrap, blob_digest))
}

#[test]
fn open_image_from_a_registry() -> TestResult {
    let reg = Registry::start();
    let cfg = test_config();
    let w = RegistryWriter::new(&reg.docker_ref("skiff/img"), &cfg)?;
    let content = b"hello from a lazily loaded image\n".repeat(100);
    let (md, bootstrap, blob) = skiff_image(&w, "v1", &content)?;
    let image = open_image_with(&ImageRef::Docker(reg.docker_ref("skiff/img:v1")), &cfg)?;
    assert_eq!(image.manifest_digest, md);
    assert_eq!(&image.bootstrap[..], &bootstrap[..]);
    let remote = image.registry_store.clone().ok_or("no registry store")?;
    // Manifest + bootstrap only (plus the failed HTTPS probe of a loopback
    // registry that speaks plain HTTP).
    let opened = remote.stats();
    assert!(opened.requests <= 3, "{opened:?}");
    // Sizes come from the manifest: no HEAD.
    let size = image.store.blob_size(&blob)?;
    assert_eq!(remote.stats().requests, opened.requests);
    let stored = image.store.read_range(&blob, 0, size)?;
    let parsed = skiff_format::Bootstrap::parse(&image.bootstrap)?;
    let chunk = parsed.chunk(0)?;
    assert_eq!(skiff_format::decode_chunk(&chunk, &stored)?, content);
    assert_eq!(remote.stats().requests, opened.requests + 1);

    // Not a Skiff image: a clear refusal.
    push_image(&w, "plain", &[pattern(100, 1)], "amd64", OCI_MANIFEST)?;
    let e = open_image_with(&ImageRef::Docker(reg.docker_ref("skiff/img:plain")), &cfg).err();
    assert!(e.is_some_and(|e| e.to_string().contains("not a Skiff image")));
    Ok(())
}

#[test]
fn bootstrap_cache_maps_a_verified_bootstrap_and_refetches_a_damaged_one() -> TestResult {
    let reg = Registry::start();
    let cfg = test_config();
    let w = RegistryWriter::new(&reg.docker_ref("skiff/cached"), &cfg)?;
    let content = b"cached bootstrap\n".repeat(50);
    let (_, bootstrap, _) = skiff_image(&w, "v1", &content)?;
    let dir = tempfile::tempdir()?;
    let cache = BootstrapCache::new(dir.path());
    let r = ImageRef::Docker(reg.docker_ref("skiff/cached:v1"));
    // Requests an open made (each open has its own client and counters).
    let requests = |image: &skiff_registry::skiff::SkiffImage| {
        image
            .registry_store
            .as_ref()
            .map(|r| r.stats().requests)
            .unwrap_or(u64::MAX)
    };

    // First open: fetched, verified, stored and mapped.
    let first = open_image_cached(&r, &cfg, Some(&cache))?;
    assert!(matches!(first.bootstrap, BootstrapBytes::Mapped(_)));
    assert_eq!(&first.bootstrap[..], &bootstrap[..]);
    let file = cache.dir().join(first.bootstrap_layer.to_hex());
    assert_eq!(std::fs::read(&file)?, bootstrap);

    // Second open: mapped from the cache, the bootstrap layer not fetched.
    let second = open_image_cached(&r, &cfg, Some(&cache))?;
    assert!(matches!(second.bootstrap, BootstrapBytes::Mapped(_)));
    assert_eq!(&second.bootstrap[..], &bootstrap[..]);
    assert_eq!(requests(&second) + 1, requests(&first));

    // A flipped byte in the cached file: its checksum fails, the file is
    // replaced by a fresh fetch, and the right bytes are served.
    let mut damaged = std::fs::read(&file)?;
    let at = damaged.len() / 2;
    damaged[at] ^= 0x40;
    std::fs::remove_file(&file)?;
    std::fs::write(&file, &damaged)?;
    let third = open_image_cached(&r, &cfg, Some(&cache))?;
    assert_eq!(&third.bootstrap[..], &bootstrap[..]);
    assert_eq!(requests(&third), requests(&first));
    assert_eq!(std::fs::read(&file)?, bootstrap);
    // The maps taken before stay valid and unchanged.
    assert_eq!(&first.bootstrap[..], &bootstrap[..]);
    Ok(())
}

#[test]
fn basic_auth() -> TestResult {
    let password = "correct-horse-77";
    let reg = Registry::start_with(&AuthMode::Basic {
        user: "alice".into(),
        password: password.into(),
    });
    let r = reg.docker_ref("secure/img");
    let mut cfg = test_config();
    cfg.auths
        .insert(reg.host(), Credentials::new("alice", password));
    let w = RegistryWriter::new(&r, &cfg)?;
    let (d, _) = push_image(&w, "v1", &[pattern(10_000, 5)], "amd64", OCI_MANIFEST)?;
    let (src, _) = open_source_with(
        &ImageRef::Docker(reg.docker_ref("secure/img:v1")),
        None,
        &cfg,
    )?;
    assert_eq!(src.manifest_digest, d);

    // From the Docker config file.
    let dir = tempfile::tempdir()?;
    let auth = base64_encode(&format!("alice:{password}"));
    let docker_cfg = write_file(
        dir.path(),
        "config.json",
        json!({"auths": {reg.host(): {"auth": auth}}})
            .to_string()
            .as_bytes(),
    );
    let cfg2 = RegistryConfig {
        use_docker_config: true,
        docker_config: Some(docker_cfg),
        ..test_config()
    };
    assert!(RegistryWriter::new(&r, &cfg2)?.has_blob(&Digest::of(&pattern(10_000, 5)))?);

    // Wrong password: an auth error naming the registry, without the secret.
    let wrong = "wrong-pass-9731";
    let mut bad = test_config();
    bad.default_credentials = Some(Credentials::new("alice", wrong));
    let e = RegistryWriter::new(&r, &bad)?
        .has_blob(&d)
        .err()
        .ok_or("accepted a wrong password")?;
    assert!(matches!(e, RegistryError::Auth { .. }), "{e:?}");
    let msg = format!("{e} {e:?}");
    assert!(msg.contains(&reg.host()) && msg.contains("alice"), "{msg}");
    assert!(!msg.contains(wrong) && !msg.contains(password), "{msg}");
    assert!(!format!("{bad:?}").contains(wrong));

    // No credentials at all.
    let e = RegistryBlobStore::new(&r, &test_config())?
        .read_range(&d, 0, 1)
        .err();
    let msg = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("requires a login") && msg.contains(&reg.host()),
        "{msg}"
    );
    Ok(())
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn token_auth() -> TestResult {
    let password = "tok-pass-4242";
    let issuer = TokenIssuer::start("bob", password);
    let reg = Registry::start_with(&AuthMode::Token(issuer.clone()));
    let mut cfg = test_config();
    cfg.auths
        .insert(reg.host(), Credentials::new("bob", password));
    let w = RegistryWriter::new(&reg.docker_ref("tok/img"), &cfg)?;
    let layers = vec![pattern(40_000, 8)];
    let (d, _) = push_image(&w, "v1", &layers, "amd64", OCI_MANIFEST)?;
    let (src, opener) =
        open_source_with(&ImageRef::Docker(reg.docker_ref("tok/img:v1")), None, &cfg)?;
    assert_eq!(src.manifest_digest, d);
    assert_eq!(read_all(opener.open_layer(0)?)?, layers[0]);
    // With credentials, tokens are requested by POST.
    assert!(issuer.counts.post.load(Ordering::SeqCst) >= 2);
    assert_eq!(issuer.counts.get.load(Ordering::SeqCst), 0);

    // Tokens are cached per scope: many reads, one token.
    let store = RegistryBlobStore::new(&reg.docker_ref("tok/img"), &cfg)?;
    let ld = Digest::of(&layers[0]);
    for i in 0..20 {
        assert_eq!(
            store.read_range(&ld, i * 100, 100)?,
            &layers[0][(i * 100) as usize..(i * 100 + 100) as usize]
        );
    }
    assert_eq!(store.stats().token_fetches, 1);

    // A token server without POST: GET with Basic credentials.
    issuer.refuse_post.store(true, Ordering::SeqCst);
    let s2 = RegistryBlobStore::new(&reg.docker_ref("tok/img"), &cfg)?;
    assert_eq!(s2.read_range(&ld, 0, 10)?, &layers[0][..10]);
    assert!(issuer.counts.get.load(Ordering::SeqCst) >= 1);
    issuer.refuse_post.store(false, Ordering::SeqCst);

    // Wrong password: refused by the token server; no secret in the error.
    let wrong = "not-the-password-1";
    let mut bad = test_config();
    bad.auths.insert(reg.host(), Credentials::new("bob", wrong));
    let e = RegistryBlobStore::new(&reg.docker_ref("tok/img"), &bad)?
        .read_range(&ld, 0, 1)
        .err()
        .ok_or("accepted a wrong password")?;
    assert!(matches!(e, RegistryError::Auth { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&reg.host()) && msg.contains("bob"), "{msg}");
    assert!(!msg.contains(wrong), "{msg}");
    // Anonymous: refused too.
    let e = RegistryBlobStore::new(&reg.docker_ref("tok/img"), &test_config())?
        .read_range(&ld, 0, 1)
        .err();
    assert!(matches!(e, Some(RegistryError::Auth { .. })), "{e:?}");
    Ok(())
}

#[test]
fn token_refresh_during_a_long_run() -> TestResult {
    let password = "refresh-pw";
    let issuer = TokenIssuer::start("carol", password);
    let reg = Registry::start_with(&AuthMode::Token(issuer.clone()));
    let mut cfg = test_config();
    cfg.auths
        .insert(reg.host(), Credentials::new("carol", password));
    let r = reg.docker_ref("refresh/blob");
    let data = pattern(100_000, 31);
    let (d, _) = RegistryWriter::new(&r, &cfg)?.put_blob_bytes(&data)?;

    issuer.expires_in.store(2, Ordering::SeqCst);
    let store = RegistryBlobStore::new(&r, &cfg)?;
    let start = Instant::now();
    let mut reads = 0u64;
    let mut poisoned = false;
    while start.elapsed() < Duration::from_millis(4_500) {
        if !poisoned && start.elapsed() > Duration::from_millis(2_000) {
            // The next token the issuer hands out is already expired: the
            // registry answers 401 mid-run and the store must recover.
            issuer.expired_tokens.store(1, Ordering::SeqCst);
            poisoned = true;
        }
        let o = (reads * 997) % 90_000;
        assert_eq!(
            store.read_range(&d, o, 1000)?,
            &data[o as usize..o as usize + 1000]
        );
        reads += 1;
        thread::sleep(Duration::from_millis(20));
    }
    let stats = store.stats();
    assert_eq!(
        issuer.expired_tokens.load(Ordering::SeqCst),
        0,
        "the expired token was never used"
    );
    assert!(stats.token_fetches >= 3, "{stats:?}");
    assert_eq!(stats.errors, 0);
    Ok(())
}

/// A front "registry" that wants Basic auth and redirects blob GETs to a
/// blob server on another origin, which records what it was sent.
#[test]
fn redirects_do_not_forward_credentials() -> TestResult {
    let reg = Registry::start();
    let cfg = test_config();
    let r = reg.docker_ref("redir/blob");
    let data = pattern(70_000, 41);
    let (d, s) = RegistryWriter::new(&r, &cfg)?.put_blob_bytes(&data)?;

    let blob_server = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
    let blob_port = blob_server.server_addr().to_ip().ok_or("addr")?.port();
    let blob_seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let upstream = reg.port;
    {
        let (srv, seen) = (blob_server.clone(), blob_seen.clone());
        thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            for req in srv.incoming_requests() {
                let auth = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.to_string());
                seen.lock().expect("lock").push(auth);
                let path = req.url().trim_start_matches("/storage/").to_owned();
                let mut up = http.get(format!(
                    "http://127.0.0.1:{upstream}/v2/redir/blob/blobs/{path}"
                ));
                if let Some(range) = req.headers().iter().find(|h| h.field.equiv("Range")) {
                    up = up.header("Range", range.value.as_str());
                }
                let Ok(resp) = up.send() else { continue };
                let status = resp.status().as_u16();
                let cr = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = resp.bytes().map(|b| b.to_vec()).unwrap_or_default();
                let mut out = tiny_http::Response::from_data(body).with_status_code(status);
                if let Some(cr) = cr {
                    out = out.with_header(
                        tiny_http::Header::from_bytes("Content-Range", cr).expect("header"),
                    );
                }
                let _ = req.respond(out);
            }
        });
    }
    let front = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
    let front_port = front.server_addr().to_ip().ok_or("addr")?.port();
    let front_seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let expected = format!("Basic {}", base64_encode("dave:front-secret"));
    {
        let (srv, seen) = (front.clone(), front_seen.clone());
        thread::spawn(move || {
            for req in srv.incoming_requests() {
                let auth = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.to_string());
                seen.lock().expect("lock").push(auth.clone());
                let resp = if auth.as_deref() != Some(expected.as_str()) {
                    tiny_http::Response::from_string("{}")
                        .with_status_code(401)
                        .with_header(
                            tiny_http::Header::from_bytes(
                                "WWW-Authenticate",
                                "Basic realm=\"front\"",
                            )
                            .expect("header"),
                        )
                } else if let Some(digest) = req.url().strip_prefix("/v2/redir/blob/blobs/") {
                    tiny_http::Response::from_string("")
                        .with_status_code(307)
                        .with_header(
                            tiny_http::Header::from_bytes(
                                "Location",
                                format!("http://127.0.0.1:{blob_port}/storage/{digest}"),
                            )
                            .expect("header"),
                        )
                } else {
                    tiny_http::Response::from_string("{}").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        });
    }
    let front_ref: skiff_registry::DockerRef =
        format!("127.0.0.1:{front_port}/redir/blob").parse()?;
    let mut fcfg = test_config();
    fcfg.auths.insert(
        format!("127.0.0.1:{front_port}"),
        Credentials::new("dave", "front-secret"),
    );
    let store = RegistryBlobStore::new(&front_ref, &fcfg)?;
    assert_eq!(store.read_range(&d, 1000, 5000)?, &data[1000..6000]);
    let client = RegistryClient::new(&front_ref, &fcfg)?;
    assert!(read_all(client.blob_reader(d, s, "redirected blob".into()))? == data);

    let fronts = front_seen.lock().expect("lock").clone();
    assert!(
        fronts.iter().any(|a| a.is_some()),
        "the front never got credentials"
    );
    let blobs = blob_seen.lock().expect("lock").clone();
    assert!(blobs.len() >= 2, "{blobs:?}");
    assert!(
        blobs.iter().all(Option::is_none),
        "credentials leaked to the redirect target: {blobs:?}"
    );
    front.unblock();
    blob_server.unblock();
    Ok(())
}

fn fault_config() -> RegistryConfig {
    let mut c = test_config();
    c.read_timeout_ms = 1_000;
    c.retry.max_attempts = 7;
    c
}

#[test]
fn faults_on_range_reads_are_retried_or_reported() -> TestResult {
    let reg = Registry::start();
    let cfg = fault_config();
    let data = pattern(200_000, 51);
    let (d, _) =
        RegistryWriter::new(&reg.docker_ref("faults/blob"), &cfg)?.put_blob_bytes(&data)?;
    let proxy = FaultProxy::start(reg.port);
    let r = proxy.docker_ref("faults/blob");
    proxy.filter("/blobs/");

    // Transient faults, then success with the exact bytes.
    proxy.script([
        Fault::Drop,
        Fault::Status(503, Some(1)),
        Fault::Status(429, Some(0)),
        Fault::Truncate,
        Fault::Stall(Duration::from_millis(1_500)),
        Fault::Status(500, None),
    ]);
    let store = RegistryBlobStore::new(&r, &cfg)?;
    let t = Instant::now();
    assert_eq!(store.read_range(&d, 5_000, 100_000)?, &data[5_000..105_000]);
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "Retry-After and the stall: {:?}",
        t.elapsed()
    );
    let st = store.stats();
    assert_eq!(st.retries, 6, "{st:?}");
    assert_eq!(st.errors, 0);

    // Persistent failure: an error naming the registry and the status, no data.
    proxy.script(std::iter::repeat_n(Fault::Status(503, None), 20));
    let e = store
        .read_range(&d, 0, 10)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("503") && e.contains(&proxy.host()) && e.contains("7 attempt"),
        "{e}"
    );
    assert_eq!(store.stats().errors, 1);
    proxy.script([]);

    // A flipped byte in a range cannot be seen by the store (ranges have
    // no digest of their own); the chunk digest check above it does.
    proxy.script([Fault::FlipByte]);
    let got = store.read_range(&d, 0, 1000)?;
    assert_ne!(got, &data[..1000]);
    assert_ne!(
        Digest::of(&got),
        Digest::of(&data[..1000]),
        "what the FUSE layer checks"
    );

    // Whole blobs are verified: a flipped byte in a stream is an error ...
    let client = RegistryClient::new(&r, &cfg)?;
    proxy.script([Fault::FlipByte]);
    let e = read_all(client.blob_reader(d, data.len() as u64, "blob".into())).err();
    assert!(
        e.is_some_and(|e| e.kind() == std::io::ErrorKind::InvalidData
            && e.to_string().contains("digest mismatch"))
    );
    // ... a truncated stream resumes where it broke off ...
    proxy.script([Fault::Truncate, Fault::Drop]);
    assert!(read_all(client.blob_reader(d, data.len() as u64, "blob".into()))? == data);
    // ... and a small blob fetched whole is re-fetched after a bad digest.
    proxy.script([Fault::FlipByte]);
    assert_eq!(
        client.fetch_blob(&d, Some(data.len() as u64), 1 << 20)?,
        data
    );
    Ok(())
}

#[test]
fn faults_during_upload_are_resumed() -> TestResult {
    let reg = Registry::start();
    let cfg = fault_config();
    let proxy = FaultProxy::start(reg.port);
    let r = proxy.docker_ref("faults/upload");
    let w = RegistryWriter::new(&r, &cfg)?;
    let data = pattern(17 << 20, 61);
    proxy.filter("PATCH ");
    proxy.script([Fault::Status(503, None), Fault::Drop]);
    let mut bw = w.blob_writer()?;
    for piece in data.chunks(1 << 20) {
        std::io::Write::write_all(&mut bw, piece)?;
    }
    assert_eq!(bw.commit()?, (Digest::of(&data), data.len() as u64));
    proxy.filter("PUT ");
    proxy.script([Fault::Drop, Fault::Status(502, None)]);
    let small = pattern(1000, 62);
    assert_eq!(w.put_blob_bytes(&small)?.0, Digest::of(&small));
    let store = RegistryBlobStore::new(&reg.docker_ref("faults/upload"), &cfg)?;
    assert_eq!(
        store.read_range(&Digest::of(&data), (16 << 20) - 3, 6)?,
        &data[(16 << 20) - 3..(16 << 20) + 3]
    );
    assert!(w.stats().retries >= 4, "{:?}", w.stats());
    Ok(())
}

#[test]
fn mirrors_are_tried_first_with_their_headers() -> TestResult {
    let origin = Registry::start();
    let mirror = Registry::start();
    let cfg = test_config();
    // Only the mirror has the content.
    let mw = RegistryWriter::new(&mirror.docker_ref("library/app"), &cfg)?;
    let data = pattern(30_000, 71);
    let (d, _) = mw.put_blob_bytes(&data)?;
    let (md, _) = push_image(
        &mw,
        "v1",
        std::slice::from_ref(&data),
        "amd64",
        OCI_MANIFEST,
    )?;
    let proxy = FaultProxy::start(mirror.port);

    let mut mcfg = test_config();
    let dead = format!("127.0.0.1:{}", free_port());
    let mut m = Mirror::new(format!("http://{}", proxy.host()));
    m.headers
        .insert("X-Mirror-Key".into(), "mirror-secret".into());
    mcfg.mirrors
        .insert(origin.host(), vec![Mirror::new(dead), m]);
    let store = RegistryBlobStore::new(&origin.docker_ref("library/app"), &mcfg)?;
    assert_eq!(store.read_range(&d, 10, 20)?, &data[10..30]);
    let m = store.client().fetch_manifest(&md.oci(), None)?;
    assert_eq!(m.digest, md);
    let seen = proxy.seen();
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|s| s.header("X-Mirror-Key") == Some("mirror-secret"))
    );
    assert!(!format!("{mcfg:?}").contains("mirror-secret"));
    // Tags are resolved at the origin, which does not have this one.
    let e = store.client().fetch_manifest("v1", None).err();
    assert!(matches!(e, Some(RegistryError::NotFound(_))), "{e:?}");

    // An explicit HTTP proxy carries the requests (credentials redacted).
    let via = FaultProxy::start(origin.port);
    let mut pcfg = test_config();
    pcfg.proxy = Some(format!("http://user:proxy-pw@{}", via.host()));
    assert!(!format!("{pcfg:?}").contains("proxy-pw"));
    let ow = RegistryWriter::new(&origin.docker_ref("via/proxy"), &pcfg)?;
    let (pd, _) = ow.put_blob_bytes(&data)?;
    assert!(ow.has_blob(&pd)?);
    let lines: Vec<String> = via.seen().into_iter().map(|s| s.request_line).collect();
    let absolute = format!("http://{}/v2/via/proxy/", origin.host());
    assert!(lines.iter().any(|l| l.contains(&absolute)), "{lines:?}");
    Ok(())
}

/// Debian's docker-registry as a pull-through cache (`proxy: remoteurl:`)
/// answers the first Range request for a blob it does not hold with `200`
/// and the whole blob (it is filling its cache), later ones with `206`.
/// Reads through it get exactly their bytes either way; from a `200` the
/// client reads no further than the end of its range, then closes (the
/// bytes received tell which answer came: offset + length for a `200`,
/// the length for a `206`; the registry's access log cannot, it logs 500
/// for a proxied copy cut short); and nothing falls back to the origin.
#[test]
fn a_pull_through_cache_answering_200_is_read_lazily() -> TestResult {
    let origin = Registry::start();
    let mirror = Registry::start_proxy(&origin.host());
    let r = origin.docker_ref("cached/app");
    let w = RegistryWriter::new(&r, &test_config())?;
    let data = pattern(8 << 20, 91);
    let (d, n) = w.put_blob_bytes(&data)?;
    let mut cfg = test_config();
    cfg.mirrors.insert(
        origin.host(),
        vec![Mirror::new(format!("http://{}", mirror.host()))],
    );
    let store = RegistryBlobStore::new(&r, &cfg)?;
    store.add_known_sizes([(d, n)]);

    // A miss at the mirror: 200 and the whole blob; the read takes the
    // bytes up to the end of its range and closes.
    let (off, len) = (1usize << 20, 64usize << 10);
    let got = store.read_range(&d, off as u64, len as u64)?;
    assert_eq!(got, &data[off..off + len]);
    let s = store.stats();
    assert_eq!(s.bytes, (off + len) as u64, "{s:?}\n{}", mirror.log());
    assert_eq!((s.retries, s.errors), (0, 0), "{s:?}");

    // Once the mirror holds the blob (it stores it in the background):
    // 206 and only the range.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (off, len) = (5usize << 20, 4096usize);
    loop {
        let before = store.stats().bytes;
        let got = store.read_range(&d, off as u64, len as u64)?;
        assert_eq!(got, &data[off..off + len]);
        let cost = (store.stats().bytes - before) as usize;
        if cost == len {
            break;
        }
        assert_eq!(cost, off + len, "neither a 200 nor a 206");
        assert!(
            Instant::now() < deadline,
            "no 206 after 20 s: {}",
            mirror.log()
        );
        thread::sleep(Duration::from_millis(100));
    }

    // Concurrent misses of another blob: each read gets its own bytes
    // (several 200s at once), none short, none from the origin.
    let data2 = pattern(6 << 20, 92);
    let (d2, n2) = w.put_blob_bytes(&data2)?;
    store.add_known_sizes([(d2, n2)]);
    let before = store.stats();
    thread::scope(|sc| {
        for i in 0..8usize {
            let (store, data2) = (&store, &data2);
            sc.spawn(move || {
                let off = i * (700 << 10);
                let got = store.read_range(&d2, off as u64, 100_000).ok();
                assert_eq!(got.as_deref(), data2.get(off..off + 100_000), "read {i}");
            });
        }
    });
    let s = store.stats();
    assert_eq!(
        (s.retries, s.errors),
        (before.retries, before.errors),
        "{s:?}"
    );
    // More than the ranges (some 200s), at most each read's end.
    let got = s.bytes - before.bytes;
    let most: u64 = (0..8u64).map(|i| i * (700 << 10) + 100_000).sum();
    assert!(got > 8 * 100_000 && got <= most, "{s:?}");
    Ok(())
}

#[test]
fn tls_with_an_extra_ca_file() -> TestResult {
    let reg = Registry::start_tls();
    let mut cfg = test_config();
    cfg.ca_file = Some(reg.tls_cert().ok_or("no cert")?);
    let r = reg.docker_ref("tls/blob");
    let data = pattern(10_000, 81);
    let w = RegistryWriter::new(&r, &cfg)?;
    let (d, _) = w.put_blob_bytes(&data)?;
    let store = RegistryBlobStore::new(&r, &cfg)?;
    assert_eq!(store.read_range(&d, 5, 10)?, &data[5..15]);
    // Without the CA: a certificate error, not a silent fall back to HTTP.
    let mut no_ca = test_config();
    no_ca.retry.max_attempts = 1;
    let e = RegistryBlobStore::new(&r, &no_ca)?
        .read_range(&d, 5, 10)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("certificate") && e.contains("https://"), "{e}");
    Ok(())
}
