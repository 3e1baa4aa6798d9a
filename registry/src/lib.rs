//! Where images come from and where converted images go.
//!
//! Skiff reads ordinary container images (an OCI image layout, a
//! `docker save` archive, a registry) and writes converted images as
//! OCI image layouts. This crate is that boundary: it parses image
//! references, resolves tags and platforms to manifests, streams layers
//! while verifying their digests, writes layouts crash-safely, and serves
//! byte ranges of blobs to the filesystem.
//!
//! The convert path calls [`open_source`] for a [`SourceImage`] and a
//! [`LayerOpener`], streams each layer, and publishes its output through an
//! [`OciLayoutWriter`], whose [`set_tag`](OciLayoutWriter::set_tag) is the
//! commit point. The mount path reads blobs through a [`BlobStore`]
//! ([`LocalBlobStore`] for a layout on disk). Nothing read from disk is
//! trusted: manifests, configs and blobs are checked against the digests
//! that name them, and a mismatch is an error naming the file or digest,
//! never a panic.
//!
//! # Layout
//!
//! - [`reference`](mod@reference): [`ImageRef`] (`oci:DIR[:TAG]`, `docker-archive:FILE[:REF]`,
//!   `docker://REF`) and [`DockerRef`], parsed in skopeo's syntax.
//! - [`platform`]: [`Platform`] (`os/arch[/variant]`) and the host default.
//! - [`media`]: media types and annotation keys, OCI, Docker and Skiff's own.
//! - [`source`]: [`open_source`], [`SourceImage`], [`LayerInfo`] and
//!   [`LayerOpener`], the converter's view of an input image;
//!   [`source_from_manifest`], the manifest and config parser behind it.
//! - `docker_archive` (private): reading `docker save` tars for [`source`].
//! - [`layout`]: [`OciLayout`] (reading a layout, resolving tags through
//!   nested indexes, the latter also over bytes as [`resolve_index`]) and [`OciLayoutWriter`] / [`BlobWriter`] (writing one).
//! - [`blobstore`]: [`BlobStore`], random access to blobs by digest, and
//!   [`LocalBlobStore`].
//! - [`skiff`](mod@skiff): [`skiff::open_image`], a converted Skiff image by reference.
//! - [`verify`]: [`VerifyingReader`], which checks digest and size at EOF.
//! - [`error`]: the one error type, [`RegistryError`].
//!
//! The registry side (OCI distribution over HTTP):
//!
//! - [`roots`]: the system's CA certificates, read once per process.
//! - [`config`]: [`RegistryConfig`] (TLS, insecure registries, mirrors,
//!   proxy, timeouts, retries, credentials), loadable from TOML or JSON.
//! - [`hosts`]: containerd's registry host configuration (`hosts.toml`
//!   per registry under its `config_path`): mirrors, capabilities, CAs,
//!   client certificates, headers.
//! - [`credentials`]: credentials from the config, the Docker config file
//!   and credential helpers.
//! - `auth` (private): challenges, Basic, Bearer tokens (cached, refreshed).
//! - [`client`]: [`RegistryClient`], one repository: retries, redirects,
//!   mirrors, auth.
//! - [`remote`]: manifests, verified blobs, ranges and resumable streams;
//!   `docker://` as a source.
//! - [`store`]: [`RegistryBlobStore`], the [`BlobStore`] of a repository
//!   (HTTP Range reads), with [`FetchStats`] from [`stats`].
//! - [`push`]: [`RegistryWriter`] and [`RegistryBlobWriter`], uploads and
//!   manifests.
//! - [`referrers`]: the referrers of a manifest (OCI 1.1 API, else the
//!   fallback tag `sha256-<hex>`), listing and attaching them.

mod auth;
pub mod blobstore;
pub mod bootcache;
pub mod client;
pub mod config;
pub mod credentials;
mod docker_archive;
pub mod error;
pub mod hosts;
pub mod layout;
pub mod media;
pub mod platform;
pub mod push;
pub mod reference;
pub mod referrers;
pub mod remote;
pub mod roots;
pub mod skiff;
pub mod source;
pub mod stats;
pub mod store;
pub mod verify;

pub use blobstore::{BlobStore, LocalBlobStore};
pub use bootcache::{BootstrapBytes, BootstrapCache};
pub use client::RegistryClient;
pub use config::{Credentials, Mirror, RegistryConfig, RetryConfig};
pub use error::RegistryError;
pub use layout::{resolve_index, BlobWriter, OciLayout, OciLayoutWriter};
pub use media::LayerCompression;
pub use platform::Platform;
pub use push::{RegistryBlobWriter, RegistryWriter};
pub use reference::{DockerRef, ImageRef};
pub use referrers::{Referrer, ReferrersVia};
pub use skiff_format::Digest;
pub use source::{
    open_source, open_source_entry, open_source_with, source_from_manifest, source_index,
    LayerInfo, LayerOpener, PlatformEntry, SourceImage, SourceIndex,
};
pub use stats::FetchStats;
pub use store::RegistryBlobStore;
pub use verify::VerifyingReader;
