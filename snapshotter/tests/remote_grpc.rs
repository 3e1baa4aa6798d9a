//! The snapshotter driven over gRPC the way containerd drives it, without
//! containerd: snapshot semantics and error codes, and the remote path for
//! a Skiff image named by an `oci:` reference in the labels (one FUSE mount
//! per image, the container's overlay on top of it), across restarts of
//! the snapshotter and the death of a mount daemon.
//!
//! Needs root (FUSE and overlay mounts) and the `skiff` binary (`SKIFF_BIN`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use sha2::{Digest as _, Sha256};
use skiff_snapshotter::proto::services::snapshots::v1 as pb;
use skiff_snapshotter::proto::services::snapshots::v1::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;
use tonic::Code;

async fn connect(socket: &Path) -> SnapshotsClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap();
    SnapshotsClient::new(channel)
}

fn prepare(key: &str, parent: &str, labels: &[(&str, &str)]) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "skiff".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

async fn list(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<pb::Info> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "skiff".into(),
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        out.extend(batch.info);
    }
    out
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "skiff".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

/// Mounts a containerd mount list at `target` with mount(8).
fn mount_at(mounts: &[skiff_snapshotter::proto::types::Mount], target: &Path) {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    fs::create_dir_all(target).unwrap();
    let mut c = Command::new("mount");
    c.arg("-t").arg(&m.r#type);
    if m.r#type == "bind" {
        c.arg("--bind");
    }
    c.arg("-o")
        .arg(m.options.join(","))
        .arg(&m.source)
        .arg(target);
    run(&mut c);
}

fn umount(target: &Path) {
    run(Command::new("umount").arg(target));
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}")))
            ),
        };
        out.push(next);
    }
    out
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_semantics_and_error_codes() {
    need_root();
    let dir = TestDir::new("grpc-sem");
    let sn = Snapshotter::start(&dir.path.join("sn"), &dir.path.join("skiff.sock"));
    let mut c = connect(&sn.socket).await;

    // A first layer: active, written, committed.
    let mounts = c
        .prepare(prepare("ns/1/extract a", "", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "bind");
    let upper = PathBuf::from(&mounts[0].source);
    fs::write(upper.join("a.txt"), "layer a").unwrap();
    let e = c
        .prepare(prepare("ns/1/extract a", "", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c.prepare(prepare("x", "missing", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .prepare(prepare("x", "ns/1/extract a", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "parent not committed");
    let e = c.prepare(prepare("", "", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "skiff".into(),
        name: "ns/2/layer-a".into(),
        key: "ns/1/extract a".into(),
        labels: HashMap::from([("l".to_owned(), "1".to_owned())]),
    })
    .await
    .unwrap();
    let e = c
        .mounts(pb::MountsRequest {
            snapshotter: "skiff".into(),
            key: "ns/2/layer-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "committed snapshots have no mounts"
    );

    // A second layer and a container on top: overlay, top-most lower first.
    c.prepare(prepare("ns/3/extract b", "ns/2/layer-a", &[]))
        .await
        .unwrap();
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "skiff".into(),
        name: "ns/4/layer-b".into(),
        key: "ns/3/extract b".into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap();
    let mounts = c
        .prepare(prepare("ns/5/ctr", "ns/4/layer-b", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "overlay");
    let lower = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lower.split(':').count(), 2, "{lower}");
    let rootfs = dir.path.join("rootfs");
    mount_at(&mounts, &rootfs);
    assert_eq!(fs::read_to_string(rootfs.join("a.txt")).unwrap(), "layer a");
    fs::write(rootfs.join("new.txt"), "x").unwrap();
    umount(&rootfs);
    assert!(
        !upper.join("new.txt").exists(),
        "a write reached a committed layer"
    );

    // A view: read-only.
    let mounts = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "skiff".into(),
            key: "ns/6/view".into(),
            parent: "ns/2/layer-a".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert!(mounts[0].options.contains(&"ro".to_owned()), "{mounts:?}");
    let e = c
        .commit(pb::CommitSnapshotRequest {
            snapshotter: "skiff".into(),
            name: "n".into(),
            key: "ns/6/view".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Stat, Update, Usage, List with filters.
    let info = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: "skiff".into(),
            key: "ns/2/layer-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(info.labels.get("l").map(String::as_str), Some("1"));
    let mut update = info.clone();
    update.labels = HashMap::from([("m".to_owned(), "2".to_owned())]);
    let updated = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "skiff".into(),
            info: Some(update),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.m".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels.len(), 2, "{:?}", updated.labels);
    let usage = c
        .usage(pb::UsageRequest {
            snapshotter: "skiff".into(),
            key: "ns/2/layer-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.size > 0 && usage.inodes >= 2, "{usage:?}");
    assert_eq!(list(&mut c, &[]).await.len(), 4);
    assert_eq!(list(&mut c, &["kind==committed"]).await.len(), 2);
    assert_eq!(list(&mut c, &["kind==view", "kind==active"]).await.len(), 2);
    assert_eq!(list(&mut c, &[r#"labels.m==2,parent=="""#]).await.len(), 1);
    let e = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "skiff".into(),
            filters: vec!["kind=".into()],
        })
        .await;
    match e {
        Err(e) => assert_eq!(e.code(), Code::InvalidArgument),
        Ok(s) => {
            let e = s.into_inner().message().await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
        }
    }

    // Remove: children first.
    let e = remove(&mut c, "ns/4/layer-b").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    for key in ["ns/5/ctr", "ns/6/view", "ns/4/layer-b", "ns/2/layer-a"] {
        remove(&mut c, key).await.unwrap();
    }
    assert_eq!(
        remove(&mut c, "ns/2/layer-a").await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(list(&mut c, &[]).await.is_empty());
    c.cleanup(pb::CleanupRequest {
        snapshotter: "skiff".into(),
    })
    .await
    .unwrap();
    let left = fs::read_dir(sn.root.join("snapshots")).unwrap().count();
    assert_eq!(
        left, 0,
        "snapshot directories left after removing everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skiff_layers_become_remote_snapshots_on_one_mount() {
    need_root();
    let dir = TestDir::new("grpc-remote");
    let layout = dir.path.join("image");
    skiff_tests::harness::skiff([
        "convert".to_owned(),
        fixture_image(),
        format!("oci:{}:python", layout.display()),
    ]);
    let reference = format!("oci:{}:python", layout.display());
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(blob(
            &layout,
            index["manifests"][0]["digest"].as_str().unwrap(),
        ))
        .unwrap(),
    )
    .unwrap();
    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(blob(
            &layout,
            manifest["config"]["digest"].as_str().unwrap(),
        ))
        .unwrap(),
    )
    .unwrap();
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(diff_ids.len(), layers.len());
    let chain = chain_ids(&diff_ids);

    let mut sn = Snapshotter::start(&dir.path.join("sn"), &dir.path.join("skiff.sock"));
    let mut c = connect(&sn.socket).await;

    // What containerd's unpacker does, layer by layer (labels as ctr-remote
    // sends them), and how its metadata store finds the committed snapshot.
    let mut parent = String::new();
    for (i, (layer, chain_id)) in layers.iter().zip(&chain).enumerate() {
        let key = format!("ns/{}/extract-{i} {chain_id}", 10 + i);
        let e = c
            .prepare(prepare(
                &key,
                &parent,
                &[
                    ("containerd.io/snapshot.ref", chain_id),
                    ("containerd.io/snapshot/remote/stargz.reference", &reference),
                    ("containerd.io/snapshot/remote/stargz.digest", layer),
                ],
            ))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::AlreadyExists,
            "layer {i}: {e:?}\n{}",
            tail_of(&sn.log, 20)
        );
        let filter =
            format!(r#"labels."containerd.io/snapshot.ref"=={chain_id},parent=="{parent}""#);
        let found = list(&mut c, &[&filter]).await;
        assert_eq!(found.len(), 1, "layer {i}: {found:?}");
        assert_eq!(found[0].kind, pb::Kind::Committed as i32);
        parent = found[0].name.clone();
        // Asked again (another namespace, a second pull): AlreadyExists at once.
        let e = c
            .prepare(prepare(
                &format!("other/{i}/extract {chain_id}"),
                "",
                &[
                    ("containerd.io/snapshot.ref", chain_id),
                    ("containerd.io/snapshot/cri.image-ref", &reference),
                    ("containerd.io/snapshot/cri.layer-digest", layer),
                ],
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
    }
    let pids = sn.daemon_pids();
    assert_eq!(pids.len(), 1, "one mount for the image");
    // containerd's registry config_path reaches the image daemon.
    let environ = fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"SKIFF_REGISTRY_HOSTS_DIR=/etc/containerd/certs.d"),
        "the daemon does not get the snapshotter's registry_config_path"
    );
    let mnt = sn.mount_dirs().pop().unwrap();

    // A container: overlay whose only lower directory is the image's mount.
    let mounts = c
        .prepare(prepare("ns/50/container", &parent, &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "overlay", "{mounts:?}");
    let lower = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(Path::new(lower), mnt, "{mounts:?}");
    let rootfs = dir.path.join("rootfs");
    mount_at(&mounts, &rootfs);
    let os = fs::read_to_string(rootfs.join("etc/os-release")).unwrap();
    assert!(os.contains("Debian GNU/Linux 12"), "{os}");
    fs::write(rootfs.join("leak.txt"), "x").unwrap();
    assert!(!mnt.join("leak.txt").exists());

    // Usage of the snapshot that stands for the image: what the image holds
    // in the node's cache (its bootstrap and the chunks read so far), never
    // more than the cache directory holds.
    let cache = dir.path.join("sn").with_extension("cache");
    for f in ["usr/bin/python3.11", "usr/lib/python3.11/os.py"] {
        assert!(fs::metadata(rootfs.join(f)).is_ok(), "{f}");
        let _ = fs::read(rootfs.join(f)).unwrap();
    }
    let boots: Vec<PathBuf> = fs::read_dir(cache.join("bootstraps"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(boots.len(), 1, "{boots:?}");
    let boot_len = fs::metadata(&boots[0]).unwrap().len() as i64;
    let usage = wait_for_usage(&mut c, &parent, boot_len).await;
    let cached = tree_bytes(&cache) as i64;
    eprintln!("Usage of the image's snapshot: {usage:?}; bootstrap {boot_len} bytes; cache directory {cached} bytes");
    assert!(
        usage.size > boot_len && usage.size <= cached && usage.inodes >= 2,
        "usage {usage:?}, bootstrap {boot_len} bytes, cache {cached} bytes"
    );

    // Restart: the daemon is re-used, the container keeps reading.
    sn.restart();
    let mut c = connect(&sn.socket).await;
    assert_eq!(sn.daemon_pids(), pids);
    assert!(daemon_alive(pids[0]));
    let os2 = fs::read_to_string(rootfs.join("usr/lib/os-release")).unwrap();
    assert_eq!(os, os2);
    assert_eq!(list(&mut c, &[]).await.len(), layers.len() + 1);
    umount(&rootfs);

    // A dead daemon is replaced on restart.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sn.restart();
    let mut c = connect(&sn.socket).await;
    let new_pids = sn.daemon_pids();
    assert_eq!(new_pids.len(), 1);
    assert_ne!(new_pids, pids, "the dead daemon was not replaced");
    assert!(daemon_alive(new_pids[0]), "{}", tail_of(&sn.log, 20));
    let mounts = c
        .mounts(pb::MountsRequest {
            snapshotter: "skiff".into(),
            key: "ns/50/container".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    mount_at(&mounts, &rootfs);
    assert!(
        rootfs.join("leak.txt").exists(),
        "the container's upper directory was lost"
    );
    assert!(fs::read_to_string(rootfs.join("etc/os-release"))
        .unwrap()
        .contains("Debian"));
    umount(&rootfs);

    // Removing everything releases the mount.
    let e = remove(&mut c, &parent).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    remove(&mut c, "ns/50/container").await.unwrap();
    let mut names: Vec<pb::Info> = list(&mut c, &[]).await;
    while let Some(leaf) = names
        .iter()
        .find(|i| !names.iter().any(|j| j.parent == i.name))
        .map(|i| i.name.clone())
    {
        remove(&mut c, &leaf).await.unwrap();
        names.retain(|i| i.name != leaf);
    }
    assert!(list(&mut c, &[]).await.is_empty());
    assert!(sn.daemon_pids().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !daemon_alive(new_pids[0]),
        "the image mount daemon still runs"
    );
    assert!(!mnt.exists(), "the mount point is left behind");
    // The image's entries in the node's cache went with it: no image is
    // mounted any more, so no chunk and no bootstrap is left.
    assert_eq!(
        tree_bytes(&cache),
        0,
        "cache entries of the removed image left: {}",
        tail_of(&sn.log, 10)
    );
}

/// Bytes of the regular files under `dir` (temporary files excluded).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && !e.file_name().to_string_lossy().starts_with(".tmp") {
                total += m.len();
            }
        }
    }
    total
}

/// `Usage` of `key` once it counts more than `floor` bytes (the daemon
/// writes fetched chunks to the disk cache in the background).
async fn wait_for_usage(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    floor: i64,
) -> pb::UsageResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let u = c
            .usage(pb::UsageRequest {
                snapshotter: "skiff".into(),
                key: key.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if u.size > floor || std::time::Instant::now() > deadline {
            return u;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
