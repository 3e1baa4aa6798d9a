//! CRI's `ImageService` on the snapshotter's socket, forwarded to
//! containerd's CRI: kubelet's `--image-service-endpoint`.
//!
//! Every call goes to containerd unchanged and its answer comes back
//! unchanged (containerd pulls, stores and removes images as it always
//! does). The one thing added: the `AuthConfig` of each `PullImage` is kept
//! in the [`Keychain`] before the call is forwarded, so that when
//! containerd prepares the image's layers, the snapshotter reads the
//! manifest and mounts the image with the credentials kubelet gave, the
//! design SOCI's CRI keychain proved. The credentials are in memory only:
//! never logged (requests are logged without their `auth`), never on disk.
//!
//! The connection to containerd is made on the first call and re-made
//! after containerd restarts, so the snapshotter may start first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::keychain::Keychain;
use crate::proto::cri;
use crate::proto::cri::image_service_client::ImageServiceClient;
use crate::proto::cri::image_service_server::{ImageService, ImageServiceServer};
use crate::Error;

/// The image service: a forwarder to containerd's CRI with a keychain.
#[derive(Debug, Clone)]
pub struct ImageServiceProxy {
    upstream: ImageServiceClient<Channel>,
    keychain: Arc<Keychain>,
    address: PathBuf,
}

/// A channel to a gRPC server on a unix socket, connected on first use
/// (and again after a failure).
pub fn unix_channel(socket: &Path) -> Result<Channel, Error> {
    let socket = socket.to_path_buf();
    // The URI is a placeholder: the connector dials the socket.
    let endpoint = Endpoint::try_from("http://containerd.sock")
        .map_err(|e| Error::Config(format!("CRI endpoint: {e}")))?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        })),
    )
}

impl ImageServiceProxy {
    /// A proxy to containerd's CRI at `address`, keeping credentials in
    /// `keychain`.
    pub fn new(address: &Path, keychain: Arc<Keychain>) -> Result<ImageServiceProxy, Error> {
        Ok(ImageServiceProxy {
            upstream: ImageServiceClient::new(unix_channel(address)?),
            keychain,
            address: address.to_path_buf(),
        })
    }

    /// The tonic server for it.
    pub fn into_server(self) -> ImageServiceServer<ImageServiceProxy> {
        ImageServiceServer::new(self)
    }

    fn client(&self) -> ImageServiceClient<Channel> {
        self.upstream.clone()
    }

    /// A failure to reach containerd says where it was looked for.
    fn upstream_error(&self, op: &str, status: Status) -> Status {
        if status.code() == tonic::Code::Unavailable {
            tracing::warn!(op, containerd = %self.address.display(), "containerd's CRI is unavailable: {}", status.message());
        }
        status
    }
}

/// The image named by an `ImageSpec`, for logs and the keychain.
fn image_of(spec: Option<&cri::ImageSpec>) -> &str {
    spec.map(|s| s.image.as_str()).unwrap_or("")
}

#[tonic::async_trait]
impl ImageService for ImageServiceProxy {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.client()
            .list_images(request.into_inner())
            .await
            .map_err(|e| self.upstream_error("ListImages", e))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.client()
            .image_status(request.into_inner())
            .await
            .map_err(|e| self.upstream_error("ImageStatus", e))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let r = request.into_inner();
        let image = image_of(r.image.as_ref()).to_owned();
        // Kept before containerd pulls: its Prepare calls come during the pull.
        let kept = self.keychain.remember(&image, r.auth.as_ref());
        tracing::info!(image = %image, credentials = kept, "PullImage");
        let t0 = std::time::Instant::now();
        let answer = self
            .client()
            .pull_image(r)
            .await
            .map_err(|e| self.upstream_error("PullImage", e));
        match &answer {
            Ok(a) => tracing::info!(
                image = %image,
                image_ref = %a.get_ref().image_ref,
                seconds = t0.elapsed().as_secs_f64(),
                "PullImage done"
            ),
            Err(e) => tracing::warn!(image = %image, "PullImage failed: {}", e.message()),
        }
        answer
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let r = request.into_inner();
        tracing::info!(image = %image_of(r.image.as_ref()), "RemoveImage");
        self.client()
            .remove_image(r)
            .await
            .map_err(|e| self.upstream_error("RemoveImage", e))
    }

    async fn image_fs_info(
        &self,
        request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.client()
            .image_fs_info(request.into_inner())
            .await
            .map_err(|e| self.upstream_error("ImageFsInfo", e))
    }
}
