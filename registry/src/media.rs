//! Media types and annotation keys: the OCI and Docker ones Skiff reads,
//! and Skiff's own (see `docs/format.md`, "The OCI image").

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI layer, uncompressed tar.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip-compressed tar.
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer, zstd-compressed tar.
pub const OCI_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI non-distributable layer, uncompressed (deprecated, still seen).
pub const OCI_LAYER_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
/// OCI non-distributable layer, gzip (deprecated, still seen).
pub const OCI_LAYER_NONDIST_TAR_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
/// OCI non-distributable layer, zstd (deprecated, still seen).
pub const OCI_LAYER_NONDIST_TAR_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";

/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (the Docker flavour of an index).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker layer, gzip-compressed tar.
pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker layer, uncompressed tar (what `docker save` archives report).
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker foreign (non-distributable) layer, gzip-compressed tar.
pub const DOCKER_LAYER_FOREIGN_TAR_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// A Skiff data blob.
pub const SKIFF_BLOB: &str = "application/vnd.oci.image.layer.skiff.blob.v1";
/// A Skiff bootstrap, compressed as one zstd frame.
pub const SKIFF_BOOTSTRAP: &str = "application/vnd.oci.image.layer.skiff.bootstrap.v1+zstd";

/// The `artifactType` of a Skiff image manifest attached to the image it
/// was converted from (its `subject`): what a node looks for among the
/// referrers of an ordinary image.
pub const SKIFF_ARTIFACT_TYPE: &str = "application/vnd.skiff.image.v1";

/// Layer annotation marking a Skiff data blob (value `true`).
pub const ANNOTATION_BLOB: &str = "dev.skiff.blob";
/// Layer annotation marking the Skiff bootstrap (value `true`).
pub const ANNOTATION_BOOTSTRAP: &str = "dev.skiff.bootstrap";
/// Layer annotation with the bootstrap format version (e.g. `1.0`).
pub const ANNOTATION_BOOTSTRAP_VERSION: &str = "dev.skiff.bootstrap.version";
/// Layer annotation with the digest of the uncompressed bootstrap.
pub const ANNOTATION_BOOTSTRAP_DIGEST: &str = "dev.skiff.bootstrap.uncompressed-digest";
/// Layer annotation with the diff ID of the source layer a data blob came from.
pub const ANNOTATION_SOURCE_DIFF_ID: &str = "dev.skiff.source.diff-id";
/// Manifest annotation with the converter's version.
pub const ANNOTATION_VERSION: &str = "dev.skiff.version";
/// Manifest annotation with the digest of the source manifest.
pub const ANNOTATION_SOURCE_MANIFEST: &str = "dev.skiff.source.manifest";
/// Manifest annotation with the platform (`os/arch[/variant]`) a Skiff
/// manifest of a multi-platform conversion was made for.
pub const ANNOTATION_PLATFORM: &str = "dev.skiff.platform";
/// Manifest annotation describing the chunking (e.g. `fastcdc:16k/64k/256k`).
pub const ANNOTATION_CHUNKING: &str = "dev.skiff.chunking";

/// The OCI annotation naming a manifest in an image layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Whether `media_type` is an image index or a Docker manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Whether `media_type` is an OCI or Docker image manifest.
pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// How a layer is compressed, as far as its media type tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar.
    None,
    /// A gzip-compressed tar.
    Gzip,
    /// A zstd-compressed tar.
    Zstd,
    /// A media type this crate does not know; the caller may sniff magic bytes.
    Unknown,
}

impl LayerCompression {
    /// The compression a layer media type announces.
    pub fn from_media_type(media_type: &str) -> LayerCompression {
        match media_type {
            OCI_LAYER_TAR | OCI_LAYER_NONDIST_TAR | DOCKER_LAYER_TAR => LayerCompression::None,
            OCI_LAYER_TAR_GZIP
            | OCI_LAYER_NONDIST_TAR_GZIP
            | DOCKER_LAYER_TAR_GZIP
            | DOCKER_LAYER_FOREIGN_TAR_GZIP => LayerCompression::Gzip,
            OCI_LAYER_TAR_ZSTD | OCI_LAYER_NONDIST_TAR_ZSTD => LayerCompression::Zstd,
            _ => LayerCompression::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_from_media_type() {
        assert_eq!(
            LayerCompression::from_media_type(OCI_LAYER_TAR_GZIP),
            LayerCompression::Gzip
        );
        assert_eq!(
            LayerCompression::from_media_type(DOCKER_LAYER_TAR_GZIP),
            LayerCompression::Gzip
        );
        assert_eq!(
            LayerCompression::from_media_type(OCI_LAYER_TAR_ZSTD),
            LayerCompression::Zstd
        );
        assert_eq!(
            LayerCompression::from_media_type(DOCKER_LAYER_TAR),
            LayerCompression::None
        );
        assert_eq!(
            LayerCompression::from_media_type(SKIFF_BLOB),
            LayerCompression::Unknown
        );
    }
}
