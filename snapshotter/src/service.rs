//! The tonic service: `containerd.services.snapshots.v1.Snapshots` over a
//! [`Snapshotter`]. Requests are translated, errors become gRPC status
//! codes ([`Error::code`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::proto::services::snapshots::v1 as pb;
use crate::proto::types::Mount as PbMount;
use crate::snapshotter::{Info, Mount};
use crate::store::Kind;
use crate::{Error, Snapshotter};

/// Infos per `List` response message.
const LIST_BATCH: usize = 100;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct SnapshotsService {
    sn: Arc<Snapshotter>,
}

impl SnapshotsService {
    /// A service over `sn`.
    pub fn new(sn: Arc<Snapshotter>) -> SnapshotsService {
        SnapshotsService { sn }
    }

    /// The tonic server for it.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<SnapshotsService> {
        pb::snapshots_server::SnapshotsServer::new(self)
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn mounts(ms: Vec<Mount>) -> Vec<PbMount> {
    ms.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn to_pb(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: kind(info.kind) as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

/// Logs failures other than the expected answers (`AlreadyExists` of a
/// remote layer, `NotFound` of a `Stat` probe).
#[allow(clippy::result_large_err)] // tonic's own Status, returned as is
fn log_err<T>(op: &str, key: &str, r: Result<T, Error>) -> Result<T, Status> {
    r.map_err(|e| {
        match e.code() {
            tonic::Code::AlreadyExists | tonic::Code::NotFound => {
                tracing::debug!(op, key, "{e}")
            }
            _ => tracing::warn!(op, key, "{e}"),
        }
        Status::from(e)
    })
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let ms = log_err(
            "prepare",
            &r.key,
            self.sn
                .create(Kind::Active, &r.key, &r.parent, labels(r.labels))
                .await,
        )?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let ms = log_err(
            "view",
            &r.key,
            self.sn
                .create(Kind::View, &r.key, &r.parent, labels(r.labels))
                .await,
        )?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let ms = log_err("mounts", &r.key, self.sn.mounts(&r.key).await)?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(ms) }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        log_err(
            "commit",
            &r.key,
            self.sn.commit(&r.name, &r.key, labels(r.labels)).await,
        )?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        log_err("remove", &r.key, self.sn.remove(&r.key).await)?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = log_err("stat", &r.key, self.sn.stat(&r.key).await)?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(info) = r.info else {
            return Err(Status::invalid_argument("update without snapshot info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let name = info.name.clone();
        let update = Info {
            name: info.name,
            parent: Some(info.parent).filter(|p| !p.is_empty()),
            kind: Kind::Committed,
            labels: labels(info.labels),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        };
        let out = log_err("update", &name, self.sn.update(update, &paths).await)?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb(out)),
        }))
    }

    type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let infos = log_err("list", "", self.sn.walk(&r.filters).await)?;
        let mut batches = Vec::new();
        let mut it = infos.into_iter().map(to_pb).peekable();
        while it.peek().is_some() {
            let info: Vec<pb::Info> = it.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let (size, inodes) = log_err("usage", &r.key, self.sn.usage(&r.key).await)?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(size).unwrap_or(i64::MAX),
            inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        log_err("cleanup", "", self.sn.cleanup().await)?;
        Ok(Response::new(()))
    }
}
