//! The gRPC face of the service: `orlysync.negentropy.v1.NegentropyService` over a
//! [`NegentropyEngine`] (client sessions) and a [`SyncManager`] (peers and relay-to-relay
//! sync), plus [`serve`] which adds `grpc.health.v1` readiness.
//!
//! Session errors meant for a NEG-ERR travel in the responses' `error` field (the reason with its
//! prefix) so the relay can tell them from transport failures, which are gRPC statuses.

use std::future::Future;
use std::sync::Arc;

use nostr::Filter;
use orly_proto::orlysync::common::v1 as common;
use orly_proto::orlysync::negentropy::v1 as pb;
use pb::negentropy_service_server::{NegentropyService, NegentropyServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::NegentropyEngine;
use crate::handler::{NegError, NegReply};
use crate::manager::{with_since, SyncManager};
use crate::peer_sync::{SyncError, SyncReport};
use crate::peers::{PeerError, PeerState};

/// Largest gRPC message either side accepts or sends.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// Progress messages buffered ahead of a slow `SyncWithPeer` reader.
const PROGRESS_BUFFER: usize = 16;

type GrpcResult<T> = Result<Response<T>, Status>;

/// `NegentropyService` over an engine and a sync manager.
#[derive(Clone)]
pub struct NegentropyGrpc {
    engine: Arc<NegentropyEngine>,
    manager: Arc<SyncManager>,
}

impl NegentropyGrpc {
    pub fn new(engine: Arc<NegentropyEngine>, manager: Arc<SyncManager>) -> Self {
        Self { engine, manager }
    }

    pub fn into_server(self) -> NegentropyServiceServer<Self> {
        NegentropyServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

/// Serves the service on `listener` (plus `grpc.health.v1`, with
/// `orlysync.negentropy.v1.NegentropyService` SERVING while the store answers) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<NegentropyEngine>,
    manager: Arc<SyncManager>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let store = engine.store().clone();
    let ready: orly_common::ReadinessCheck = Arc::new(move || {
        let store = store.clone();
        Box::pin(async move {
            match store.ping().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "store ping failed");
                    false
                }
            }
        })
    });
    orly_common::serve_grpc(
        listener,
        NegentropyGrpc::new(engine, manager).into_server(),
        ready,
        shutdown,
    )
    .await
}

fn filter_of(f: Option<common::Filter>) -> Result<Filter, Status> {
    match f {
        None => Ok(Filter::new()),
        Some(f) => Filter::try_from(f)
            .map_err(|e| Status::invalid_argument(format!("invalid filter: {e}"))),
    }
}

fn peer_status(e: PeerError) -> Status {
    match e {
        PeerError::InvalidUrl(m) => Status::invalid_argument(m),
        PeerError::Store(e) => {
            tracing::warn!(error = %e, "peer storage failed");
            Status::unavailable(e.to_string())
        }
    }
}

fn sync_status(e: &SyncError) -> Status {
    match e {
        SyncError::Busy(m) => Status::aborted(m.clone()),
        SyncError::Store(e) => Status::unavailable(e.to_string()),
        other => Status::unknown(other.to_string()),
    }
}

fn state_pb(s: PeerState) -> pb::PeerSyncState {
    pb::PeerSyncState {
        peer_url: s.peer_url,
        last_sync: s.last_sync,
        events_synced: s.events_synced,
        status: s.status,
        last_error: s.last_error,
        consecutive_failures: s.consecutive_failures,
    }
}

fn progress_pb(url: &str, r: &SyncReport, error: Option<String>) -> pb::SyncProgress {
    pb::SyncProgress {
        peer_url: url.to_string(),
        round: i32::try_from(r.rounds).unwrap_or(i32::MAX),
        have_count: r.have_count as i64,
        need_count: r.need_count as i64,
        fetched_count: r.fetched as i64,
        sent_count: r.sent as i64,
        complete: r.complete || error.is_some(),
        error: error.unwrap_or_default(),
    }
}

/// A reply or a NEG-ERR reason, in the response shape.
fn neg_response(r: Result<NegReply, NegError>) -> (Vec<u8>, bool, String) {
    match r {
        Ok(reply) => (reply.message, reply.complete, String::new()),
        Err(e) => (Vec::new(), false, e.reason()),
    }
}

#[tonic::async_trait]
impl NegentropyService for NegentropyGrpc {
    async fn ready(&self, _: Request<common::Empty>) -> GrpcResult<common::ReadyResponse> {
        let ready = self.engine.store().ping().await.is_ok();
        Ok(Response::new(common::ReadyResponse { ready }))
    }

    async fn start(&self, _: Request<common::Empty>) -> GrpcResult<common::Empty> {
        self.manager.start();
        Ok(Response::new(common::Empty {}))
    }

    async fn stop(&self, _: Request<common::Empty>) -> GrpcResult<common::Empty> {
        self.manager.stop();
        Ok(Response::new(common::Empty {}))
    }

    async fn handle_neg_open(
        &self,
        req: Request<pb::NegOpenRequest>,
    ) -> GrpcResult<pb::NegOpenResponse> {
        let req = req.into_inner();
        let result = match filter_of(req.filter) {
            Ok(filter) => {
                self.engine
                    .open_session(
                        &req.connection_id,
                        &req.subscription_id,
                        &filter,
                        &req.initial_message,
                    )
                    .await
            }
            Err(status) => {
                // The session is replaced even by a NEG-OPEN we refuse.
                self.engine
                    .close_session(&req.connection_id, &req.subscription_id);
                Err(NegError::Invalid(status.message().to_string()))
            }
        };
        let (message, complete, error) = neg_response(result);
        Ok(Response::new(pb::NegOpenResponse {
            message,
            have_ids: Vec::new(),
            need_ids: Vec::new(),
            complete,
            error,
        }))
    }

    async fn handle_neg_msg(
        &self,
        req: Request<pb::NegMsgRequest>,
    ) -> GrpcResult<pb::NegMsgResponse> {
        let req = req.into_inner();
        let result = self
            .engine
            .session_message(&req.connection_id, &req.subscription_id, &req.message)
            .await;
        let (message, complete, error) = neg_response(result);
        Ok(Response::new(pb::NegMsgResponse {
            message,
            have_ids: Vec::new(),
            need_ids: Vec::new(),
            complete,
            error,
        }))
    }

    async fn handle_neg_close(
        &self,
        req: Request<pb::NegCloseRequest>,
    ) -> GrpcResult<common::Empty> {
        let req = req.into_inner();
        self.engine
            .close_session(&req.connection_id, &req.subscription_id);
        Ok(Response::new(common::Empty {}))
    }

    type SyncWithPeerStream = ReceiverStream<Result<pb::SyncProgress, Status>>;

    async fn sync_with_peer(
        &self,
        req: Request<pb::SyncPeerRequest>,
    ) -> GrpcResult<Self::SyncWithPeerStream> {
        let req = req.into_inner();
        let url =
            crate::peers::normalize_peer_url(&req.peer_url).map_err(Status::invalid_argument)?;
        let filter = match req.filter {
            None => self.manager.settings().filter.clone(),
            some => filter_of(some)?,
        };
        let filter = with_since(filter, req.since);
        let (tx, rx) = mpsc::channel(PROGRESS_BUFFER);
        let manager = self.manager.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let progress_url = url.clone();
            let mut progress = move |r: &SyncReport| {
                if r.complete {
                    return; // the final message is sent below
                }
                // A slow reader misses intermediate progress rather than stalling the sync.
                let _ = progress_tx.try_send(Ok(progress_pb(&progress_url, r, None)));
            };
            let last = match manager.sync_peer(&url, Some(filter), &mut progress).await {
                Ok(report) => Ok(progress_pb(&url, &report, None)),
                Err(e @ SyncError::Busy(_)) => Err(sync_status(&e)),
                Err(e) => Ok(progress_pb(
                    &url,
                    &SyncReport::default(),
                    Some(e.to_string()),
                )),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_sync_status(
        &self,
        _: Request<common::Empty>,
    ) -> GrpcResult<pb::SyncStatusResponse> {
        let states = self.manager.peers().states().await.map_err(peer_status)?;
        Ok(Response::new(pb::SyncStatusResponse {
            active: self.manager.is_active(),
            last_sync: states
                .iter()
                .map(|s| s.last_sync)
                .max()
                .unwrap_or(0)
                .max(self.manager.last_sync()),
            peer_count: i32::try_from(states.len()).unwrap_or(i32::MAX),
            peer_states: states.into_iter().map(state_pb).collect(),
        }))
    }

    async fn get_peers(&self, _: Request<common::Empty>) -> GrpcResult<pb::PeersResponse> {
        let peers = self.manager.peers().list().await.map_err(peer_status)?;
        Ok(Response::new(pb::PeersResponse { peers }))
    }

    async fn add_peer(&self, req: Request<pb::AddPeerRequest>) -> GrpcResult<common::Empty> {
        let url = self
            .manager
            .peers()
            .add(&req.into_inner().peer_url)
            .await
            .map_err(peer_status)?;
        tracing::info!(peer = %url, "peer added");
        Ok(Response::new(common::Empty {}))
    }

    async fn remove_peer(&self, req: Request<pb::RemovePeerRequest>) -> GrpcResult<common::Empty> {
        let url = req.into_inner().peer_url;
        let existed = self
            .manager
            .peers()
            .remove(&url)
            .await
            .map_err(peer_status)?;
        if !existed {
            return Err(Status::not_found(format!("{url} is not a peer")));
        }
        tracing::info!(peer = %url, "peer removed");
        Ok(Response::new(common::Empty {}))
    }

    async fn trigger_sync(
        &self,
        req: Request<pb::TriggerSyncRequest>,
    ) -> GrpcResult<common::Empty> {
        let req = req.into_inner();
        let filter = match req.filter {
            None => None,
            some => Some(filter_of(some)?),
        };
        let peer = match req.peer_url.trim() {
            "" => None,
            url => {
                let url =
                    crate::peers::normalize_peer_url(url).map_err(Status::invalid_argument)?;
                if !self
                    .manager
                    .peers()
                    .is_peer(&url)
                    .await
                    .map_err(peer_status)?
                {
                    return Err(Status::not_found(format!("{url} is not a peer")));
                }
                Some(url)
            }
        };
        self.manager.trigger(peer, filter);
        Ok(Response::new(common::Empty {}))
    }

    async fn get_peer_sync_state(
        &self,
        req: Request<pb::PeerSyncStateRequest>,
    ) -> GrpcResult<pb::PeerSyncStateResponse> {
        let url = req.into_inner().peer_url;
        let book = self.manager.peers();
        let state = match book.state(&url).await.map_err(peer_status)? {
            Some(s) => Some(s),
            None if book.is_peer(&url).await.map_err(peer_status)? => Some(PeerState {
                peer_url: crate::peers::normalize_peer_url(&url).unwrap_or(url),
                status: crate::peers::STATUS_IDLE.into(),
                ..PeerState::default()
            }),
            None => None,
        };
        Ok(Response::new(pb::PeerSyncStateResponse {
            found: state.is_some(),
            state: state.map(state_pb),
        }))
    }

    async fn list_sessions(
        &self,
        _: Request<common::Empty>,
    ) -> GrpcResult<pb::ListSessionsResponse> {
        let sessions = self
            .engine
            .list_sessions()
            .into_iter()
            .map(|s| pb::ClientSession {
                subscription_id: s.subscription_id,
                connection_id: s.connection_id,
                created_at: s.created_at,
                last_activity: s.last_activity,
                round_count: i32::try_from(s.round_count).unwrap_or(i32::MAX),
            })
            .collect();
        Ok(Response::new(pb::ListSessionsResponse { sessions }))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> GrpcResult<common::Empty> {
        let req = req.into_inner();
        if req.subscription_id.is_empty() && req.connection_id.is_empty() {
            return Err(Status::invalid_argument(
                "give a subscription id, a connection id, or both",
            ));
        }
        self.engine
            .close_matching(&req.connection_id, &req.subscription_id);
        Ok(Response::new(common::Empty {}))
    }
}
