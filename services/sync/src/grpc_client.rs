//! gRPC clients of the three services (`ORLY_SYNC_TYPE=grpc`): lazy channels over every replica
//! of a service ([`orly_common::GrpcChannel`]) that reconnect by themselves, every call bounded by the sync timeout (`ORLY_GRPC_SYNC_TIMEOUT`).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use nostr::{Event, EventId};
use orly_common::{ClientOptions, GrpcChannel};
use orly_proto::orlysync::cluster::v1 as cpb;
use orly_proto::orlysync::common::v1 as common;
use orly_proto::orlysync::distributed::v1 as dpb;
use orly_proto::orlysync::relaygroup::v1 as rpb;

use crate::api::{ClusterApi, DistributedApi, RelayGroupApi};
use crate::cluster::MAX_WAIT;
use crate::error::SyncError;
use crate::grpc_server::MAX_MESSAGE_SIZE;
use crate::http::{HttpRequest, HttpResponse};

/// A discovering, balanced channel to one sync service (every replica behind its name).
fn channel(what: &'static str, addr: &str, timeout: Duration) -> Result<GrpcChannel, String> {
    let opts = ClientOptions::from_env(what, timeout).map_err(|e| e.to_string())?;
    GrpcChannel::connect_lazy(addr, opts).map_err(|e| e.to_string())
}

fn nonzero(timeout: Duration) -> Duration {
    if timeout.is_zero() {
        Duration::from_secs(10)
    } else {
        timeout
    }
}

async fn call<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, SyncError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(status.into()),
        Err(_) => Err(SyncError::Unavailable(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

/// orly-sync-distributed over gRPC.
#[derive(Clone, Debug)]
pub struct GrpcDistributed {
    client: dpb::distributed_sync_service_client::DistributedSyncServiceClient<GrpcChannel>,
    timeout: Duration,
}

impl GrpcDistributed {
    pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Self, String> {
        let timeout = nonzero(timeout);
        let client = dpb::distributed_sync_service_client::DistributedSyncServiceClient::new(
            channel("orly-sync-distributed", addr, timeout)?,
        )
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self { client, timeout })
    }

    pub async fn peers(&self) -> Result<Vec<String>, SyncError> {
        let mut c = self.client.clone();
        Ok(call(self.timeout, c.get_peers(common::Empty {}))
            .await?
            .peers)
    }

    pub async fn trigger_sync(&self) -> Result<(), SyncError> {
        let mut c = self.client.clone();
        call(self.timeout, c.trigger_sync(common::Empty {}))
            .await
            .map(|_| ())
    }

    pub async fn sync_status(&self) -> Result<dpb::SyncStatusResponse, SyncError> {
        let mut c = self.client.clone();
        call(self.timeout, c.get_sync_status(common::Empty {})).await
    }
}

#[async_trait]
impl DistributedApi for GrpcDistributed {
    async fn handle_current(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        let mut c = self.client.clone();
        let pb: common::HttpRequest = req.into();
        // A long poll is held at the service for up to MAX_LONG_POLL.
        let deadline = self.timeout + crate::distributed::MAX_LONG_POLL;
        Ok(call(deadline, c.handle_current_request(pb)).await?.into())
    }

    async fn handle_event_ids(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        let mut c = self.client.clone();
        let pb: common::HttpRequest = req.into();
        Ok(call(self.timeout, c.handle_event_i_ds_request(pb))
            .await?
            .into())
    }

    async fn notify_new_event(&self, id: EventId, serial: u64) -> Result<(), SyncError> {
        let mut c = self.client.clone();
        let note = dpb::NewEventNotification {
            event_id: id.as_bytes().to_vec(),
            serial,
        };
        call(self.timeout, c.notify_new_event(note))
            .await
            .map(|_| ())
    }

    async fn update_peers(&self, peers: Vec<String>) -> Result<(), SyncError> {
        let mut c = self.client.clone();
        call(
            self.timeout,
            c.update_peers(dpb::UpdatePeersRequest { peers }),
        )
        .await
        .map(|_| ())
    }
}

/// orly-sync-cluster over gRPC.
#[derive(Clone, Debug)]
pub struct GrpcCluster {
    client: cpb::cluster_sync_service_client::ClusterSyncServiceClient<GrpcChannel>,
    timeout: Duration,
}

impl GrpcCluster {
    pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Self, String> {
        let timeout = nonzero(timeout);
        let client = cpb::cluster_sync_service_client::ClusterSyncServiceClient::new(channel(
            "orly-sync-cluster",
            addr,
            timeout,
        )?)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self { client, timeout })
    }

    pub async fn members(&self) -> Result<Vec<cpb::ClusterMember>, SyncError> {
        let mut c = self.client.clone();
        Ok(call(self.timeout, c.get_members(common::Empty {}))
            .await?
            .members)
    }

    pub async fn cluster_status(&self) -> Result<cpb::ClusterStatusResponse, SyncError> {
        let mut c = self.client.clone();
        call(self.timeout, c.get_cluster_status(common::Empty {})).await
    }
}

#[async_trait]
impl ClusterApi for GrpcCluster {
    async fn handle_latest(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        let mut c = self.client.clone();
        let pb: common::HttpRequest = req.into();
        // A long poll is held at the service for up to MAX_WAIT.
        Ok(call(self.timeout + MAX_WAIT, c.handle_latest_serial(pb))
            .await?
            .into())
    }

    async fn handle_events(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        let mut c = self.client.clone();
        let pb: common::HttpRequest = req.into();
        Ok(call(self.timeout, c.handle_events_range(pb)).await?.into())
    }

    async fn handle_membership_event(&self, event: &Event) -> Result<(), SyncError> {
        let mut c = self.client.clone();
        let req = cpb::MembershipEventRequest {
            event: Some(event.into()),
        };
        call(self.timeout, c.handle_membership_event(req))
            .await
            .map(|_| ())
    }
}

/// orly-sync-relaygroup over gRPC.
#[derive(Clone, Debug)]
pub struct GrpcRelayGroup {
    client: rpb::relay_group_service_client::RelayGroupServiceClient<GrpcChannel>,
    timeout: Duration,
}

impl GrpcRelayGroup {
    pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Self, String> {
        let timeout = nonzero(timeout);
        let client = rpb::relay_group_service_client::RelayGroupServiceClient::new(channel(
            "orly-sync-relaygroup",
            addr,
            timeout,
        )?)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self { client, timeout })
    }

    pub async fn authoritative_config(&self) -> Result<rpb::RelayGroupConfigResponse, SyncError> {
        let mut c = self.client.clone();
        call(self.timeout, c.find_authoritative_config(common::Empty {})).await
    }
}

#[async_trait]
impl RelayGroupApi for GrpcRelayGroup {
    async fn validate(&self, event: &Event) -> Result<Result<(), String>, SyncError> {
        let mut c = self.client.clone();
        let req = rpb::ValidateEventRequest {
            event: Some(event.into()),
        };
        let resp = call(self.timeout, c.validate_relay_group_event(req)).await?;
        Ok(if resp.valid { Ok(()) } else { Err(resp.error) })
    }

    async fn handle_event(&self, event: &Event) -> Result<(), SyncError> {
        let mut c = self.client.clone();
        let req = rpb::HandleEventRequest {
            event: Some(event.into()),
        };
        call(self.timeout, c.handle_relay_group_event(req))
            .await
            .map(|_| ())
    }

    async fn relays(&self) -> Result<Vec<String>, SyncError> {
        let mut c = self.client.clone();
        Ok(call(self.timeout, c.get_relays(common::Empty {}))
            .await?
            .relays)
    }
}
