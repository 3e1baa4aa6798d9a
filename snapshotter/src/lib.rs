//! Skiff's containerd remote snapshotter: `containerd.services.snapshots.v1`
//! served over gRPC on a unix socket, for containerd's proxy plugins
//! (`[proxy_plugins.skiff] type = "snapshot" address = "/run/skiff/snapshotter.sock"`).
//!
//! Ordinary layers become ordinary overlay snapshots that containerd unpacks
//! into. Layers of a Skiff image become *remote* snapshots: on `Prepare`
//! with the labels of such a layer (see [`labels`]), the snapshotter resolves
//! the image, mounts it lazily with one `skiff mount` daemon per image (its
//! own process, in its own session, so that restarting the snapshotter never
//! breaks a running container), commits the layer's snapshot itself and
//! answers `AlreadyExists`, so containerd downloads nothing. A container on
//! top gets an overlay whose only lower directory is the image's FUSE mount.
//!
//! The same socket can serve CRI's `ImageService` for kubelet
//! (`--image-service-endpoint`): calls go on to containerd's CRI, and the
//! credentials of each pull are kept in memory so that private images are
//! read and mounted with them ([`cri`], [`keychain`]).
//!
//! The same image mounts serve podman and CRI-O: `skiff store` ([`alsfs`])
//! is containers/storage's Additional Layer Store, a FUSE filesystem whose
//! layer directories point at the `skiff mount` of each image (see
//! docs/podman.md).
//!
//! Metadata (snapshots, image mounts) lives in one JSON file under the root
//! directory, replaced atomically on every change; on start the snapshotter
//! re-attaches to the daemons it finds alive and re-mounts the others.
//!
//! # Layout
//!
//! - [`proto`]: the gRPC types and service, generated at build time from
//!   containerd's own proto files (vendored in `proto/`).
//! - [`config`]: [`Config`], the snapshotter's TOML configuration.
//! - [`error`]: [`Error`], and its mapping to gRPC status codes.
//! - [`store`]: the persistent metadata: snapshots and image mounts.
//! - [`filter`]: containerd's filter syntax, for `Walk` (`List`).
//! - [`labels`]: the snapshot labels containerd clients send for a layer.
//! - [`resolver`]: which image a layer belongs to and whether it is Skiff's.
//! - [`keychain`]: credentials of kubelet's pulls, in memory.
//! - [`daemon`]: starting, checking and stopping `skiff mount` daemons
//!   (and handing them credentials).
//! - [`cri`]: CRI's image service, forwarded to containerd's CRI
//!   (kubelet's `--image-service-endpoint`), filling the keychain.
//! - [`snapshotter`]: [`Snapshotter`], the snapshot semantics.
//! - [`service`]: the tonic service over a [`Snapshotter`].
//! - [`server`]: serving on a unix socket; [`run`], the whole daemon.
//! - [`als`]: the Additional Layer Store's names, layer keys, `info`
//!   records and the store's persistent state.
//! - [`alsstore`]: `skiff store`'s logic: resolving references, starting
//!   the images' mounts with [`daemon`], blobs, use counts, its state.
//! - [`alsfs`]: `skiff store`, the Additional Layer Store as a FUSE
//!   filesystem over [`alsstore`].

pub mod als;
pub mod alsfs;
pub mod alsstore;
pub mod config;
pub mod cri;
pub mod daemon;
pub mod error;
pub mod filter;
pub mod keychain;
pub mod labels;
pub mod resolver;
pub mod server;
pub mod service;
pub mod snapshotter;
pub mod store;

pub use config::Config;
pub use error::Error;
pub use server::run;
pub use snapshotter::Snapshotter;

/// containerd's gRPC API, generated from its proto files.
pub mod proto {
    /// `containerd.types`: the `Mount` message.
    pub mod types {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the snapshots service.
            pub mod v1 {
                #![allow(missing_docs, clippy::all)]
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
    /// Kubernetes' Container Runtime Interface, `runtime.v1`
    /// (k8s.io/cri-api): the `ImageService` the snapshotter serves and
    /// forwards to containerd, and the `RuntimeService` kubelet calls.
    pub mod cri {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("runtime.v1");
    }
}
