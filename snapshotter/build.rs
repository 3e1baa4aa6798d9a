//! Generates the containerd snapshots service (`containerd.services.snapshots.v1`)
//! and Kubernetes' CRI (`runtime.v1`: the image service the snapshotter
//! serves and forwards, the runtime service its tests call) from the proto
//! files vendored in `proto/`, with the `protoc` that the
//! `protoc-bin-vendored` crate ships (no system protoc needed).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY-free: build scripts are single-threaded; tonic-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    let root = PathBuf::from("proto");
    let service =
        root.join("github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto");
    // k8s.io/cri-api runtime/v1 (Apache-2.0, header kept), as the k8s-cri
    // crate (0.10) ships it.
    let cri = root.join("k8s.io/cri-api/runtime/v1/api.proto");
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[service, cri], &[root, include])?;
    Ok(())
}
