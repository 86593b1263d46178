//! The gRPC faces of the three services — every RPC of ORLY's `DistributedSyncService`,
//! `ClusterSyncService` and `RelayGroupService` — over the engines, and [`serve`], which adds
//! `grpc.health.v1` (SERVING while the store answers).

use std::future::Future;
use std::sync::Arc;

use nostr::{Event, EventId, PublicKey};
use orly_proto::orlysync::cluster::v1 as cpb;
use orly_proto::orlysync::common::v1 as common;
use orly_proto::orlysync::distributed::v1 as dpb;
use orly_proto::orlysync::relaygroup::v1 as rpb;
use tonic::{Request, Response, Status};

use crate::cluster::{ClusterMember, ClusterSync};
use crate::distributed::DistributedSync;
use crate::peer::PeerStatus;
use crate::relaygroup::RelayGroup;

/// Largest gRPC message either side accepts or sends (fetch answers carry up to 16 MiB).
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

type GrpcResult<T> = Result<Response<T>, Status>;

fn event_from(pb: Option<common::Event>) -> Result<Event, Status> {
    let pb = pb.ok_or_else(|| Status::invalid_argument("event missing"))?;
    Event::try_from(pb).map_err(|e| Status::invalid_argument(format!("malformed event: {e}")))
}

fn peer_info(s: PeerStatus) -> common::PeerInfo {
    common::PeerInfo {
        url: s.url,
        last_serial: s.last_serial,
        status: s.status,
        last_poll: s.last_poll,
        error_count: s.error_count,
    }
}

fn member_pb(m: ClusterMember) -> cpb::ClusterMember {
    cpb::ClusterMember {
        http_url: m.http_url,
        websocket_url: m.websocket_url,
        last_serial: m.last_serial,
        last_poll: m.last_poll,
        status: m.status,
        error_count: m.error_count,
    }
}

/// Readiness: the store answers.
fn store_ready(store: orly_db::SharedStore) -> orly_common::ReadinessCheck {
    Arc::new(move || {
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
    })
}

/// `DistributedSyncService` over a [`DistributedSync`].
#[derive(Clone)]
pub struct DistributedGrpc(pub Arc<DistributedSync>);

#[tonic::async_trait]
impl dpb::distributed_sync_service_server::DistributedSyncService for DistributedGrpc {
    async fn ready(&self, _: Request<common::Empty>) -> GrpcResult<common::ReadyResponse> {
        let ready = self.0.store().ping().await.is_ok();
        Ok(Response::new(common::ReadyResponse { ready }))
    }

    async fn get_info(&self, _: Request<common::Empty>) -> GrpcResult<common::SyncInfo> {
        let peers = self.0.peers().await?;
        Ok(Response::new(common::SyncInfo {
            node_id: self.0.node_id().await?,
            relay_url: self.0.relay_url(),
            current_serial: self.0.current_serial().await?,
            peer_count: peers.len() as i32,
            status: if self.0.owned_peers().is_empty() && !peers.is_empty() {
                "standby".into()
            } else {
                "running".into()
            },
        }))
    }

    async fn get_current_serial(
        &self,
        _: Request<dpb::CurrentRequest>,
    ) -> GrpcResult<dpb::CurrentResponse> {
        Ok(Response::new(dpb::CurrentResponse {
            node_id: self.0.node_id().await?,
            relay_url: self.0.relay_url(),
            serial: self.0.current_serial().await?,
        }))
    }

    async fn get_event_i_ds(
        &self,
        req: Request<dpb::EventIDsRequest>,
    ) -> GrpcResult<dpb::EventIDsResponse> {
        let r = req.into_inner();
        let event_map = self.0.event_ids(r.from, r.to).await?.into_iter().collect();
        Ok(Response::new(dpb::EventIDsResponse { event_map }))
    }

    async fn handle_current_request(
        &self,
        req: Request<common::HttpRequest>,
    ) -> GrpcResult<common::HttpResponse> {
        let resp = self.0.handle_current(&req.into_inner().into()).await;
        Ok(Response::new(resp.into()))
    }

    async fn handle_event_i_ds_request(
        &self,
        req: Request<common::HttpRequest>,
    ) -> GrpcResult<common::HttpResponse> {
        let resp = self.0.handle_event_ids(&req.into_inner().into()).await;
        Ok(Response::new(resp.into()))
    }

    async fn get_peers(&self, _: Request<common::Empty>) -> GrpcResult<dpb::PeersResponse> {
        Ok(Response::new(dpb::PeersResponse {
            peers: self.0.peers().await?,
        }))
    }

    async fn update_peers(
        &self,
        req: Request<dpb::UpdatePeersRequest>,
    ) -> GrpcResult<common::Empty> {
        self.0.update_peers(&req.into_inner().peers).await?;
        Ok(Response::new(common::Empty {}))
    }

    async fn is_authorized_peer(
        &self,
        req: Request<dpb::AuthorizedPeerRequest>,
    ) -> GrpcResult<dpb::AuthorizedPeerResponse> {
        let r = req.into_inner();
        let authorized = self
            .0
            .is_authorized_peer(&r.peer_url, &r.expected_pubkey)
            .await;
        Ok(Response::new(dpb::AuthorizedPeerResponse { authorized }))
    }

    async fn get_peer_pubkey(
        &self,
        req: Request<dpb::PeerPubkeyRequest>,
    ) -> GrpcResult<dpb::PeerPubkeyResponse> {
        let pubkey = self.0.peer_pubkey(&req.into_inner().peer_url).await;
        Ok(Response::new(dpb::PeerPubkeyResponse { pubkey }))
    }

    async fn update_serial(&self, _: Request<common::Empty>) -> GrpcResult<common::Empty> {
        // The current serial is read from the store on every request: nothing to refresh.
        Ok(Response::new(common::Empty {}))
    }

    async fn notify_new_event(
        &self,
        req: Request<dpb::NewEventNotification>,
    ) -> GrpcResult<common::Empty> {
        let r = req.into_inner();
        if !r.event_id.is_empty() && EventId::from_slice(&r.event_id).is_err() {
            return Err(Status::invalid_argument("event_id must be 32 bytes"));
        }
        self.0.notify_new_event(r.serial);
        Ok(Response::new(common::Empty {}))
    }

    async fn trigger_sync(&self, _: Request<common::Empty>) -> GrpcResult<common::Empty> {
        self.0.trigger();
        Ok(Response::new(common::Empty {}))
    }

    async fn get_sync_status(
        &self,
        _: Request<common::Empty>,
    ) -> GrpcResult<dpb::SyncStatusResponse> {
        Ok(Response::new(dpb::SyncStatusResponse {
            current_serial: self.0.current_serial().await?,
            peers: self
                .0
                .peer_statuses()
                .await?
                .into_iter()
                .map(peer_info)
                .collect(),
        }))
    }
}

/// `ClusterSyncService` over a [`ClusterSync`].
#[derive(Clone)]
pub struct ClusterGrpc(pub Arc<ClusterSync>);

#[tonic::async_trait]
impl cpb::cluster_sync_service_server::ClusterSyncService for ClusterGrpc {
    async fn ready(&self, _: Request<common::Empty>) -> GrpcResult<common::ReadyResponse> {
        let ready = self.0.store().ping().await.is_ok();
        Ok(Response::new(common::ReadyResponse { ready }))
    }

    async fn start(&self, _: Request<common::Empty>) -> GrpcResult<common::Empty> {
        self.0.start();
        Ok(Response::new(common::Empty {}))
    }

    async fn stop(&self, _: Request<common::Empty>) -> GrpcResult<common::Empty> {
        self.0.stop().await;
        Ok(Response::new(common::Empty {}))
    }

    async fn handle_latest_serial(
        &self,
        req: Request<common::HttpRequest>,
    ) -> GrpcResult<common::HttpResponse> {
        let resp = self.0.handle_latest(&req.into_inner().into()).await;
        Ok(Response::new(resp.into()))
    }

    async fn handle_events_range(
        &self,
        req: Request<common::HttpRequest>,
    ) -> GrpcResult<common::HttpResponse> {
        let resp = self.0.handle_events(&req.into_inner().into()).await;
        Ok(Response::new(resp.into()))
    }

    async fn get_members(&self, _: Request<common::Empty>) -> GrpcResult<cpb::MembersResponse> {
        Ok(Response::new(cpb::MembersResponse {
            members: self.0.members().await?.into_iter().map(member_pb).collect(),
        }))
    }

    async fn update_membership(
        &self,
        req: Request<cpb::UpdateMembershipRequest>,
    ) -> GrpcResult<common::Empty> {
        self.0
            .update_membership(&req.into_inner().relay_urls)
            .await?;
        Ok(Response::new(common::Empty {}))
    }

    async fn handle_membership_event(
        &self,
        req: Request<cpb::MembershipEventRequest>,
    ) -> GrpcResult<common::Empty> {
        let event = event_from(req.into_inner().event)?;
        self.0.handle_membership_event(&event).await?;
        Ok(Response::new(common::Empty {}))
    }

    async fn get_cluster_status(
        &self,
        _: Request<common::Empty>,
    ) -> GrpcResult<cpb::ClusterStatusResponse> {
        let s = self.0.status().await?;
        Ok(Response::new(cpb::ClusterStatusResponse {
            latest_serial: s.latest_serial,
            active_members: s.active_members,
            total_members: s.total_members,
            propagate_privileged_events: s.propagate_privileged_events,
            members: s.members.into_iter().map(member_pb).collect(),
        }))
    }

    async fn get_member_status(
        &self,
        req: Request<cpb::MemberStatusRequest>,
    ) -> GrpcResult<cpb::MemberStatusResponse> {
        let member = self.0.member(&req.into_inner().http_url).await?;
        Ok(Response::new(cpb::MemberStatusResponse {
            found: member.is_some(),
            member: member.map(member_pb),
        }))
    }

    async fn get_latest_serial(
        &self,
        _: Request<common::Empty>,
    ) -> GrpcResult<cpb::LatestSerialResponse> {
        Ok(Response::new(cpb::LatestSerialResponse {
            serial: self
                .0
                .latest_serial(None, std::time::Duration::ZERO)
                .await?,
            timestamp: nostr::Timestamp::now().as_secs() as i64,
        }))
    }

    async fn get_events_in_range(
        &self,
        req: Request<cpb::EventsRangeRequest>,
    ) -> GrpcResult<cpb::EventsRangeResponse> {
        let r = req.into_inner();
        let limit = u32::try_from(r.limit.max(0)).unwrap_or(0);
        let resp = self.0.events_in_range(r.from, r.to, limit).await?;
        Ok(Response::new(cpb::EventsRangeResponse {
            events: resp
                .events
                .into_iter()
                .map(|e| cpb::EventInfo {
                    serial: e.serial,
                    id: e.id,
                    timestamp: e.timestamp,
                })
                .collect(),
            has_more: resp.has_more,
            next_from: resp.next_from,
        }))
    }
}

/// `RelayGroupService` over a [`RelayGroup`].
#[derive(Clone)]
pub struct RelayGroupGrpc(pub RelayGroup);

#[tonic::async_trait]
impl rpb::relay_group_service_server::RelayGroupService for RelayGroupGrpc {
    async fn ready(&self, _: Request<common::Empty>) -> GrpcResult<common::ReadyResponse> {
        let ready = self.0.store().ping().await.is_ok();
        Ok(Response::new(common::ReadyResponse { ready }))
    }

    async fn find_authoritative_config(
        &self,
        _: Request<common::Empty>,
    ) -> GrpcResult<rpb::RelayGroupConfigResponse> {
        let found = self.0.find_authoritative().await?;
        Ok(Response::new(match found {
            Some(c) => rpb::RelayGroupConfigResponse {
                config: Some(rpb::RelayGroupConfig { relays: c.relays }),
                found: true,
                source_event_id: c.source_event_id.as_bytes().to_vec(),
                source_timestamp: c.source_timestamp,
            },
            None => rpb::RelayGroupConfigResponse::default(),
        }))
    }

    async fn get_relays(&self, _: Request<common::Empty>) -> GrpcResult<rpb::RelaysResponse> {
        Ok(Response::new(rpb::RelaysResponse {
            relays: self.0.relays().await?,
        }))
    }

    async fn is_authorized_publisher(
        &self,
        req: Request<rpb::AuthorizedPublisherRequest>,
    ) -> GrpcResult<rpb::AuthorizedPublisherResponse> {
        let pk = PublicKey::from_slice(&req.into_inner().pubkey)
            .map_err(|e| Status::invalid_argument(format!("pubkey: {e}")))?;
        Ok(Response::new(rpb::AuthorizedPublisherResponse {
            authorized: self.0.is_authorized(&pk),
        }))
    }

    async fn get_authorized_pubkeys(
        &self,
        _: Request<common::Empty>,
    ) -> GrpcResult<rpb::AuthorizedPubkeysResponse> {
        Ok(Response::new(rpb::AuthorizedPubkeysResponse {
            pubkeys: self
                .0
                .authorized_pubkeys()
                .iter()
                .map(|p| p.to_bytes().to_vec())
                .collect(),
        }))
    }

    async fn validate_relay_group_event(
        &self,
        req: Request<rpb::ValidateEventRequest>,
    ) -> GrpcResult<rpb::ValidateEventResponse> {
        let resp = match event_from(req.into_inner().event) {
            Ok(event) => match self.0.validate(&event) {
                Ok(()) => rpb::ValidateEventResponse {
                    valid: true,
                    error: String::new(),
                },
                Err(error) => rpb::ValidateEventResponse {
                    valid: false,
                    error,
                },
            },
            Err(status) => rpb::ValidateEventResponse {
                valid: false,
                error: status.message().to_string(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn handle_relay_group_event(
        &self,
        req: Request<rpb::HandleEventRequest>,
    ) -> GrpcResult<common::Empty> {
        let event = event_from(req.into_inner().event)?;
        self.0.handle_event(&event).await?;
        Ok(Response::new(common::Empty {}))
    }
}

/// Serves the distributed service until `shutdown`.
pub async fn serve_distributed(
    listener: tokio::net::TcpListener,
    sync: Arc<DistributedSync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let ready = store_ready(sync.store().clone());
    let svc = dpb::distributed_sync_service_server::DistributedSyncServiceServer::new(
        DistributedGrpc(sync),
    )
    .max_decoding_message_size(MAX_MESSAGE_SIZE)
    .max_encoding_message_size(MAX_MESSAGE_SIZE);
    orly_common::serve_grpc(listener, svc, ready, shutdown).await
}

/// Serves the cluster service until `shutdown`.
pub async fn serve_cluster(
    listener: tokio::net::TcpListener,
    sync: Arc<ClusterSync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let ready = store_ready(sync.store().clone());
    let svc = cpb::cluster_sync_service_server::ClusterSyncServiceServer::new(ClusterGrpc(sync))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    orly_common::serve_grpc(listener, svc, ready, shutdown).await
}

/// Serves the relay group service until `shutdown`.
pub async fn serve_relaygroup(
    listener: tokio::net::TcpListener,
    group: RelayGroup,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let ready = store_ready(group.store().clone());
    let svc = rpb::relay_group_service_server::RelayGroupServiceServer::new(RelayGroupGrpc(group))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    orly_common::serve_grpc(listener, svc, ready, shutdown).await
}
