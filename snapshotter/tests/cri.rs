//! kubelet's CRI calls, end to end: real containerd 1.6 with its CRI plugin
//! on and Skiff as its snapshotter, real runc, a registry on 127.0.0.1 that
//! requires a password (htpasswd), and a CRI client making the calls
//! kubelet makes, in kubelet's order, over the real sockets: Version,
//! PullImage (credentials only in the request's `AuthConfig`: no Docker
//! config, no environment), ImageStatus, RunPodSandbox (host network),
//! CreateContainer, StartContainer, ContainerStatus until exit, the
//! container's log at its log path, ExecSync in a long-running container,
//! StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox,
//! RemoveImage.
//!
//! - A private Skiff image pulled through the snapshotter's own socket
//!   (kubelet's `--image-service-endpoint`): the pod runs the python
//!   workload lazily, fetching less than half of the image.
//! - A plain OCI image of the same content runs through the same path (the
//!   control: containerd downloads and unpacks it).
//! - Pulls straight at containerd's CRI socket are deterministic: a Skiff
//!   image pulled, removed and pulled again, four times over.
//!
//! The sandbox ("pause") image is made here: a static C program that waits
//! for SIGTERM, pushed as a one-layer OCI image to a registry without auth
//! (as a node pulls its pause image from a public registry or has it
//! preloaded: kubelet never pulls it itself).
//!
//! Needs root, containerd, runc, docker-registry, apache2-utils (htpasswd),
//! skopeo, gcc with a static libc (build-essential) and the `skiff` binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest as _, Sha256};
use skiff_snapshotter::proto::cri;
use skiff_snapshotter::proto::cri::image_service_client::ImageServiceClient;
use skiff_snapshotter::proto::cri::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

const USER: &str = "kubelet";
const PASSWORD: &str = "pod-pull-s3cret";
/// How long a container may take to run its workload.
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A tonic channel over a unix socket.
async fn channel(path: &Path) -> Channel {
    let socket = path.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::]:50051")
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
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()))
}

/// Builds the pause binary: a static program that waits for SIGTERM (PID 1
/// of a PID namespace ignores signals it has no handler for).
fn build_pause(dir: &Path) -> PathBuf {
    need("gcc", "build-essential");
    let src = dir.join("pause.c");
    fs::write(
        &src,
        "#include <signal.h>\n#include <unistd.h>\n\
         static void done(int s) { (void)s; _exit(0); }\n\
         int main(void) { signal(SIGTERM, done); signal(SIGINT, done); for (;;) pause(); }\n",
    )
    .unwrap();
    let bin = dir.join("pause");
    let mut c = Command::new("gcc");
    c.args(["-static", "-Os", "-s", "-o"]).arg(&bin).arg(&src);
    check_for(&mut c, Duration::from_secs(120));
    bin
}

/// A one-layer OCI layout holding `/pause`, tag `1`.
fn pause_layout(dir: &Path) -> PathBuf {
    let bin = fs::read(build_pause(dir)).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(bin.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_cksum();
    layer.append_data(&mut h, "pause", &bin[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .unwrap();
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let layout = dir.join("pause-image");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": "1"},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    for (digest, bytes) in [
        (&manifest_digest, &manifest),
        (&config_digest, &config),
        (&layer_digest, &layer),
    ] {
        fs::write(blob_path(&layout, digest), bytes).unwrap();
    }
    layout
}

/// `skopeo copy` into the registry, with credentials when given.
fn skopeo_copy(from: &str, to: &str, creds: Option<&str>) {
    need("skopeo", "skopeo");
    let mut c = Command::new("skopeo");
    c.args(["copy", "-q", "--dest-tls-verify=false"]);
    if let Some(creds) = creds {
        c.arg("--dest-creds").arg(creds);
    }
    c.arg(from).arg(to);
    check_for(&mut c, Duration::from_secs(300));
}

/// Converts the fixture and pushes the Skiff image as `REPO:1`; returns the
/// reference and the image's size (manifest, config and layers).
fn push_skiff(dir: &Path, registry: &Registry, repo: &str, creds: Option<&str>) -> (String, u64) {
    let layout = dir.join("skiff-image");
    if !layout.join("index.json").exists() {
        skiff_tests::harness::skiff([
            "convert".to_owned(),
            fixture_image(),
            format!("oci:{}:python", layout.display()),
        ]);
    }
    let reference = format!("{}/{repo}:1", registry.host());
    skopeo_copy(
        &format!("oci:{}:python", layout.display()),
        &format!("docker://{reference}"),
        creds,
    );
    (reference, image_size(&layout, "python"))
}

/// Bytes of an image in a layout: config and layers.
fn image_size(layout: &Path, tag: &str) -> u64 {
    let m = manifest_of(layout, tag);
    let layers = m["layers"].as_array().unwrap();
    m["config"]["size"].as_u64().unwrap()
        + layers
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum::<u64>()
}

/// Reports what a pod's pull and workload fetched of an image of
/// `image_size` bytes and asserts it was lazy: something, and under half (the
/// import reads about 30%; the fetch window brings some neighbours along when
/// the round trips they save pay for them, see fusefs window.rs: on loopback,
/// where a round trip is worth many bytes, up to 45% was seen).
fn assert_lazy(what: &str, fetched: u64, seconds: f64, image_size: u64, node: &Node) {
    eprintln!(
        "{what}: {fetched} of {image_size} bytes fetched by the workload's exit ({:.1}%), pull to exit {seconds:.2} s",
        fetched as f64 * 100.0 / image_size as f64,
    );
    assert!(
        fetched > 0 && fetched * 2 < image_size,
        "not lazy ({what}): {fetched} of {image_size} bytes fetched\n{}",
        node.logs()
    );
}

/// Bytes of blob bodies the registry served (its access log since `mark`).
fn blob_bytes_served(mark: &LogMark) -> u64 {
    mark.since()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            // ... "GET /v2/NAME/blobs/sha256:HEX HTTP/1.1" STATUS BYTES "referer" "agent"
            let after = l.split("HTTP/1.1\" ").nth(1)?;
            let mut f = after.split_whitespace();
            let status: u16 = f.next()?.parse().ok()?;
            let bytes: u64 = f.next()?.parse().ok()?;
            (200..300).contains(&status).then_some(bytes)
        })
        .sum()
}

/// containerd's CRI configuration for this node: Skiff as the snapshotter
/// with the layer annotations on, the local pause image, plain-HTTP
/// registries declared in `certs.d`, runc, and the answer to runc's
/// `can't get final child's PID from pipe: EOF` on this kernel (see
/// docs/kubernetes.md, "Node set-up").
fn cri_config(dir: &Path, pause: &str, registries: &[&Registry]) -> String {
    let certs = dir.join("certs.d");
    for r in registries {
        let host_dir = certs.join(r.host());
        fs::create_dir_all(&host_dir).unwrap();
        fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"http://{h}\"\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                h = r.host()
            ),
        )
        .unwrap();
    }
    fs::create_dir_all(dir.join("cni/bin")).unwrap();
    fs::create_dir_all(dir.join("cni/conf")).unwrap();
    format!(
        r#"  sandbox_image = "{pause}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "skiff"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"
"#,
        runc = dir.join("runc-cri").display(),
        certs = certs.display(),
        cni = dir.join("cni").display(),
    )
}

/// A node: the snapshotter (with its CRI image service on), containerd with
/// CRI, and the registries.
struct Node {
    ctd: Containerd,
    sn: Snapshotter,
    registry: Registry,
    _pause_registry: Registry,
    dir: TestDir,
}

impl Node {
    /// `auth`: whether the image registry requires the password.
    fn start(name: &str, auth: bool) -> Node {
        need_root();
        need("docker-registry", "docker-registry");
        let dir = TestDir::new(name);
        let path = dir.path.clone();
        let registry = if auth {
            Registry::start_with_htpasswd(&path.join("reg"), USER, PASSWORD)
        } else {
            Registry::start(&path.join("reg"))
        };
        let pause_registry = Registry::start(&path.join("pause-reg"));
        let pause = format!("{}/pause:1", pause_registry.host());
        skopeo_copy(
            &format!("oci:{}:1", pause_layout(&path).display()),
            &format!("docker://{pause}"),
            None,
        );
        let ctd_socket = path.join("ctd.sock");
        let sn = Snapshotter::start_with(
            &path.join("sn"),
            &path.join("skiff.sock"),
            &format!("[cri]\ncontainerd_address = \"{}\"\n", ctd_socket.display()),
        );
        let ctd = Containerd::start_cri(
            &path,
            &cri_config(&path, &pause, &[&registry, &pause_registry]),
        );
        assert_eq!(ctd.socket, ctd_socket);
        ctd.wait_for_plugin(&sn.log);
        Node {
            ctd,
            sn,
            registry,
            _pause_registry: pause_registry,
            dir,
        }
    }

    fn path(&self) -> &Path {
        &self.dir.path
    }

    fn logs(&self) -> String {
        format!(
            "--- snapshotter ---\n{}\n--- containerd ---\n{}",
            tail_of(&self.sn.log, 40),
            tail_of(&self.ctd.dir.join("containerd.log"), 40)
        )
    }
}

/// kubelet's side: the image service (containerd's CRI socket, or the
/// snapshotter's) and the runtime service (containerd's CRI socket).
struct Kubelet {
    images: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
}

impl Kubelet {
    async fn connect(image_endpoint: &Path, runtime_endpoint: &Path) -> Kubelet {
        Kubelet {
            images: ImageServiceClient::new(channel(image_endpoint).await),
            runtime: RuntimeServiceClient::new(channel(runtime_endpoint).await),
        }
    }

    async fn pull(
        &mut self,
        image: &str,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, tonic::Status> {
        let r = self
            .images
            .pull_image(cri::PullImageRequest {
                image: Some(image_spec(image)),
                auth,
                sandbox_config: None,
            })
            .await?;
        Ok(r.into_inner().image_ref)
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

fn auth() -> cri::AuthConfig {
    cri::AuthConfig {
        username: USER.into(),
        password: PASSWORD.into(),
        ..Default::default()
    }
}

/// The pod's sandbox configuration, as kubelet writes it for a
/// host-network pod: no hostname (runc cannot set one without a UTS
/// namespace of its own), node network, pod PID and IPC namespaces.
fn sandbox_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The namespaces of a host-network pod: the node's network, the pod's own
/// PID and IPC namespaces (as kubelet asks for `hostNetwork: true`).
fn host_network() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        log_path: format!("{name}/0.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The messages of a CRI log file (`TIMESTAMP STREAM TAG MESSAGE` lines).
fn cri_log_messages(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a pod runs: `workload` to completion in one container, `exec`
/// (ExecSync) in a long-running one, and, when given, `after_worker_kill`
/// there after a `kill -9` of the image mount's serving worker.
#[derive(Clone, Copy)]
struct Commands {
    workload: &'static [&'static str],
    exec: &'static [&'static str],
    after_worker_kill: Option<&'static [&'static str]>,
}

/// What one pod run shows.
struct PodRun {
    /// The workload's log messages.
    log: String,
    /// ExecSync's stdout in the long-running container.
    exec: String,
    /// Blob bytes the registry served from before the pull to the
    /// workload's exit.
    fetched: u64,
    /// Seconds from PullImage to the workload's exit (pull, sandbox,
    /// container start and the workload): the pod's start as a user sees it.
    seconds: f64,
}

/// The whole kubelet sequence for `image`, pulled through `kubelet.images`
/// with `auth`, running `commands`.
async fn run_pod(
    node: &Node,
    kubelet: &mut Kubelet,
    pod: &str,
    image: &str,
    auth: Option<cri::AuthConfig>,
    commands: &Commands,
) -> PodRun {
    let Commands {
        workload,
        exec,
        after_worker_kill,
    } = *commands;
    let mark = LogMark::new(&node.registry.log);
    let pull_started = Instant::now();
    let version = kubelet
        .runtime
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.runtime_name, "containerd", "{version:?}");

    let image_ref = match kubelet.pull(image, auth).await {
        Ok(r) => r,
        Err(e) => panic!("PullImage {image}: {e}\n{}", node.logs()),
    };
    let status = kubelet
        .images
        .image_status(cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    let img = status
        .image
        .unwrap_or_else(|| panic!("ImageStatus: {image} is not there after PullImage"));
    assert_eq!(img.id, image_ref, "ImageStatus id vs PullImage's image_ref");

    let log_dir = node.path().join("pods").join(pod);
    fs::create_dir_all(&log_dir).unwrap();
    let sandbox = sandbox_config(pod, &log_dir);
    let pod_id = match kubelet
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!("RunPodSandbox: {e}\n{}", node.logs()),
    };

    // The workload, to completion.
    let started = Instant::now();
    let create = |name: &str, command: &[&str]| cri::CreateContainerRequest {
        pod_sandbox_id: pod_id.clone(),
        config: Some(container_config(name, image, command)),
        sandbox_config: Some(sandbox.clone()),
    };
    let workload_id = match kubelet
        .runtime
        .create_container(create("workload", workload))
        .await
    {
        Ok(r) => r.into_inner().container_id,
        Err(e) => panic!("CreateContainer: {e}\n{}", node.logs()),
    };
    if let Err(e) = kubelet
        .runtime
        .start_container(cri::StartContainerRequest {
            container_id: workload_id.clone(),
        })
        .await
    {
        panic!("StartContainer: {e}\n{}", node.logs());
    }
    let status = loop {
        let s = kubelet
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: workload_id.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if s.state == cri::ContainerState::ContainerExited as i32 {
            break s;
        }
        assert!(
            started.elapsed() < RUN_LIMIT,
            "the workload still runs after {RUN_LIMIT:?}\n{}",
            node.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seconds = pull_started.elapsed().as_secs_f64();
    let fetched = blob_bytes_served(&mark);
    let log = cri_log_messages(Path::new(&status.log_path));
    assert_eq!(
        status.exit_code,
        0,
        "the workload failed: {log}\n{}",
        node.logs()
    );

    // A long-running container and ExecSync in it.
    let long_id = kubelet
        .runtime
        .create_container(create("long", &["sleep", "3600"]))
        .await
        .unwrap_or_else(|e| panic!("CreateContainer (long): {e}\n{}", node.logs()))
        .into_inner()
        .container_id;
    kubelet
        .runtime
        .start_container(cri::StartContainerRequest {
            container_id: long_id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer (long): {e}\n{}", node.logs()));
    let mut exec_out = exec_sync_ok(node, kubelet, &long_id, exec, "").await;
    if let Some(cmd) = after_worker_kill {
        // The serving worker of the image's mount dies; the keeper's next
        // worker reads the credentials again from its inherited descriptor
        // and fetches files never read before from the private registry.
        let keepers = node.sn.daemon_pids();
        assert!(!keepers.is_empty(), "no image mount to kill a worker of");
        for keeper in keepers {
            let worker = skiff_tests::services::child_of(keeper as u32)
                .unwrap_or_else(|| panic!("keeper {keeper} has no worker"));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(worker as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let out = exec_sync_ok(node, kubelet, &long_id, cmd, " after the worker's death").await;
        exec_out.push_str(&out);
        assert_no_password_leak(node);
    }

    // And down again, in kubelet's order.
    for id in [&long_id, &workload_id] {
        kubelet
            .runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 10,
            })
            .await
            .unwrap_or_else(|e| panic!("StopContainer: {e}\n{}", node.logs()));
        kubelet
            .runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", node.logs()));
    }
    kubelet
        .runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", node.logs()));
    kubelet
        .runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id,
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", node.logs()));
    kubelet
        .images
        .remove_image(cri::RemoveImageRequest {
            image: Some(image_spec(image)),
        })
        .await
        .unwrap_or_else(|e| panic!("RemoveImage: {e}\n{}", node.logs()));
    PodRun {
        log,
        exec: exec_out,
        fetched,
        seconds,
    }
}

const WORKLOAD: &[&str] = &[
    "python3",
    "-c",
    "import numpy, pandas; print('workload ok', numpy.__version__)",
];
const EXEC: &[&str] = &["python3", "-c", "import yaml; print('exec ok')"];
const AFTER_WORKER_KILL: &[&str] = &["python3", "-c", "import requests; print('after kill ok')"];

/// The password is nowhere the snapshotter and its mounts write or show:
/// logs and state under its root, the mount daemons' command lines and
/// environment, their metrics.
/// ExecSync of `cmd` in `container`, which must exit 0; its stdout.
/// `when` is added to the failure messages.
async fn exec_sync_ok(
    node: &Node,
    kubelet: &mut Kubelet,
    container: &str,
    cmd: &[&str],
    when: &str,
) -> String {
    let out = kubelet
        .runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: container.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 120,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync{when}: {e}\n{}", node.logs()))
        .into_inner();
    assert_eq!(
        out.exit_code,
        0,
        "ExecSync {cmd:?}{when}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_no_password_leak(node: &Node) {
    let mut leaked = Vec::new();
    find_text(&node.sn.root, PASSWORD, &mut leaked);
    find_text(&node.sn.log, PASSWORD, &mut leaked);
    assert!(leaked.is_empty(), "the password is on disk: {leaked:?}");
    for keeper in node.sn.daemon_pids() {
        let worker = skiff_tests::services::child_of(keeper as u32).unwrap_or(keeper as u32);
        for pid in [keeper as u32, worker] {
            for what in ["cmdline", "environ"] {
                let bytes = fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
                assert!(
                    !bytes
                        .windows(PASSWORD.len())
                        .any(|w| w == PASSWORD.as_bytes()),
                    "the password is in /proc/{pid}/{what}"
                );
            }
        }
    }
    let metrics = node.sn.root.join("metrics");
    let sockets: Vec<PathBuf> = fs::read_dir(&metrics)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        !sockets.is_empty() || node.sn.daemon_pids().is_empty(),
        "no metrics socket in {}",
        metrics.display()
    );
    for sock in sockets {
        let text = skiff_tests::services::scrape_metrics(&sock);
        assert!(
            !text.contains(PASSWORD),
            "the password is in the metrics of {}",
            sock.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_runs_a_private_skiff_image_lazily_through_the_image_service() {
    let node = Node::start("cri", true);
    let creds = format!("{USER}:{PASSWORD}");
    let (skiff_ref, skiff_size) =
        push_skiff(node.path(), &node.registry, "skiff/python", Some(&creds));
    let plain_ref = format!("{}/plain/python:1", node.registry.host());
    skopeo_copy(
        &fixture_image(),
        &format!("docker://{plain_ref}"),
        Some(&creds),
    );
    let plain_size = image_size(&fixture_layout(), "python");

    // kubelet --image-service-endpoint=SNAPSHOTTER --container-runtime-endpoint=CONTAINERD
    let mut kubelet = Kubelet::connect(&node.sn.socket, &node.ctd.socket).await;

    // Without the password the registry refuses the pull.
    let refused = kubelet.pull(&skiff_ref, None).await;
    assert!(
        refused.is_err(),
        "a pull without credentials passed: {refused:?}"
    );

    let run = run_pod(
        &node,
        &mut kubelet,
        "skiff-pod",
        &skiff_ref,
        Some(auth()),
        &Commands {
            workload: WORKLOAD,
            exec: EXEC,
            after_worker_kill: Some(AFTER_WORKER_KILL),
        },
    )
    .await;
    assert!(run.log.contains("workload ok"), "log: {}", run.log);
    assert!(run.exec.contains("exec ok"), "exec: {}", run.exec);
    assert!(run.exec.contains("after kill ok"), "exec: {}", run.exec);
    assert_lazy("skiff image", run.fetched, run.seconds, skiff_size, &node);
    assert_no_password_leak(&node);

    // The control: a plain OCI image through the same path.
    let run = run_pod(
        &node,
        &mut kubelet,
        "plain-pod",
        &plain_ref,
        Some(auth()),
        &Commands {
            workload: WORKLOAD,
            exec: EXEC,
            after_worker_kill: None,
        },
    )
    .await;
    assert!(run.log.contains("workload ok"), "log: {}", run.log);
    assert!(run.exec.contains("exec ok"), "exec: {}", run.exec);
    eprintln!(
        "plain image: {} of {} bytes fetched by the workload's exit, pull to exit {:.2} s",
        run.fetched, plain_size, run.seconds
    );
    assert!(
        run.fetched >= plain_size - plain_size / 10,
        "the plain image was not downloaded whole ({} of {plain_size})",
        run.fetched
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pulls_of_a_skiff_image_are_deterministic() {
    let node = Node::start("cri-pulls", true);
    let creds = format!("{USER}:{PASSWORD}");
    let (skiff_ref, _) = push_skiff(node.path(), &node.registry, "skiff/python", Some(&creds));
    // First as kubelet without --image-service-endpoint: the credentials
    // reach containerd only, the snapshotter cannot read the manifest and
    // containerd falls back to unpacking Skiff's blobs as tar layers, which
    // fails. What it leaves behind must not disturb the pulls below.
    let mut direct = Kubelet::connect(&node.ctd.socket, &node.ctd.socket).await;
    let failed = direct.pull(&skiff_ref, Some(auth())).await;
    eprintln!("PullImage at containerd's CRI with credentials: {failed:?}");
    assert!(
        failed.is_err(),
        "a private Skiff image was pulled without the snapshotter's credentials"
    );
    // containerd goes on downloading the layers it could not unpack after
    // the call returned: let it finish before counting what pulls fetch.
    wait_for_quiet_log(&node.registry.log, Duration::from_secs(2));

    let mut kubelet = Kubelet::connect(&node.sn.socket, &node.ctd.socket).await;
    for round in 0..4 {
        let mark = LogMark::new(&node.registry.log);
        if let Err(e) = kubelet.pull(&skiff_ref, Some(auth())).await {
            panic!("round {round}: PullImage: {e}\n{}", node.logs());
        }
        // Pulling what is there is a no-op, never an error.
        if let Err(e) = kubelet.pull(&skiff_ref, Some(auth())).await {
            panic!("round {round}: second PullImage: {e}\n{}", node.logs());
        }
        let fetched = blob_bytes_served(&mark);
        assert!(
            fetched < 10 << 20,
            "round {round}: the pull fetched {fetched} bytes (data blobs?)"
        );
        kubelet
            .images
            .remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(&skiff_ref)),
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: RemoveImage: {e}\n{}", node.logs()));
    }
}

/// Files below `dir` (not crossing into mounts) whose bytes contain `needle`.
fn find_text(dir: &Path, needle: &str, out: &mut Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(root_dev) = fs::symlink_metadata(dir).map(|m| m.dev()) else {
        return;
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != root_dev {
            continue;
        }
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.filter_map(Result::ok).map(|e| e.path()));
            }
        } else if m.is_file() && m.len() < (64 << 20) {
            if let Ok(bytes) = fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    out.push(p);
                }
            }
        }
    }
}

/// The cause of "unable to prepare extraction snapshot: target snapshot
/// ... already exists" (containerd's metadata names chain-ID snapshots the
/// snapshotter does not have: its root was lost while containerd's was
/// kept; the Prepare never reaches the snapshotter and every Stat answers
/// NotFound) and its remedy: RemoveImage lets containerd's garbage
/// collector drop those records, and the next pull works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_snapshotter_root_is_healed_by_remove_image() {
    let mut node = Node::start("cri-lost", false);
    let (skiff_ref, _) = push_skiff(node.path(), &node.registry, "skiff/python", None);
    let mut kubelet = Kubelet::connect(&node.sn.socket, &node.ctd.socket).await;
    if let Err(e) = kubelet.pull(&skiff_ref, None).await {
        panic!("PullImage: {e}\n{}", node.logs());
    }
    // The snapshotter loses its root; containerd keeps its own.
    for pid in node.sn.daemon_pids() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.sn.daemon_pids().iter().any(|p| daemon_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    unmount_below(&node.sn.root);
    fs::remove_dir_all(&node.sn.root).unwrap();
    node.sn.restart();
    node.ctd.wait_for_plugin(&node.sn.log);
    let stale = kubelet.pull(&skiff_ref, None).await;
    match &stale {
        Err(e)
            if e.code() == tonic::Code::AlreadyExists
                && e.message()
                    .contains("unable to prepare extraction snapshot") => {}
        other => panic!("expected containerd's AlreadyExists for its stale records, got {other:?}"),
    }
    kubelet
        .images
        .remove_image(cri::RemoveImageRequest {
            image: Some(image_spec(&skiff_ref)),
        })
        .await
        .unwrap_or_else(|e| panic!("RemoveImage: {e}\n{}", node.logs()));
    if let Err(e) = kubelet.pull(&skiff_ref, None).await {
        panic!("PullImage after RemoveImage: {e}\n{}", node.logs());
    }
}

/// Pods keep the ORIGINAL reference: the fixture pushed as is, converted
/// with `skiff convert` from registry to registry (which attaches the Skiff
/// image to the original as a referrer, through the fallback tag on this
/// registry), then kubelet's CRI calls with the original reference run the
/// workload lazily.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_runs_the_original_reference_lazily_through_its_skiff_referrer() {
    let node = Node::start("cri-referrer", false);
    let original = format!("{}/app/python:1", node.registry.host());
    skopeo_copy(&fixture_image(), &format!("docker://{original}"), None);
    let out = skiff_tests::harness::skiff([
        "convert".to_owned(),
        "--no-progress".to_owned(),
        "--json".to_owned(),
        format!("docker://{original}"),
        format!("docker://{}/app/python:1-skiff", node.registry.host()),
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["referrers"][0]["via"], "fallback-tag", "{summary}");
    let skiff_size = summary["bytes_out"].as_u64().unwrap();

    let mut kubelet = Kubelet::connect(&node.sn.socket, &node.ctd.socket).await;
    let run = run_pod(
        &node,
        &mut kubelet,
        "original-pod",
        &original,
        None,
        &Commands {
            workload: WORKLOAD,
            exec: EXEC,
            after_worker_kill: None,
        },
    )
    .await;
    assert!(run.log.contains("workload ok"), "log: {}", run.log);
    assert!(run.exec.contains("exec ok"), "exec: {}", run.exec);
    assert_lazy(
        "original reference",
        run.fetched,
        run.seconds,
        skiff_size,
        &node,
    );
}
