//! Generates the containerd snapshots service (`containerd.services.snapshots.v1`)
//! from the proto files vendored in `proto/`, with the `protoc` that the
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
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[service], &[root, include])?;
    Ok(())
}
