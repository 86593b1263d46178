//! What the relay asks of the three services, as traits with two implementations each: the
//! engines in-process (`ORLY_SYNC_TYPE=local`) and the gRPC clients in [`crate::grpc_client`]
//! (`grpc`). The relay holds `Arc<dyn …>` values and never knows which it has.

use std::sync::Arc;

use async_trait::async_trait;
use nostr::{Event, EventId};

use crate::cluster::ClusterSync;
use crate::distributed::DistributedSync;
use crate::error::SyncError;
use crate::http::{HttpRequest, HttpResponse};
use crate::relaygroup::RelayGroup;

/// The distributed sync, as the relay uses it.
#[async_trait]
pub trait DistributedApi: Send + Sync + 'static {
    /// `POST /api/sync/current`.
    async fn handle_current(&self, req: HttpRequest) -> Result<HttpResponse, SyncError>;
    /// `POST /api/sync/event-ids`.
    async fn handle_event_ids(&self, req: HttpRequest) -> Result<HttpResponse, SyncError>;
    /// The relay stored a new event.
    async fn notify_new_event(&self, id: EventId, serial: u64) -> Result<(), SyncError>;
    /// The relay group's relays (replaces the previous group list).
    async fn update_peers(&self, peers: Vec<String>) -> Result<(), SyncError>;
}

/// The cluster sync, as the relay uses it.
#[async_trait]
pub trait ClusterApi: Send + Sync + 'static {
    /// `GET /cluster/latest`.
    async fn handle_latest(&self, req: HttpRequest) -> Result<HttpResponse, SyncError>;
    /// `GET|POST /cluster/events`.
    async fn handle_events(&self, req: HttpRequest) -> Result<HttpResponse, SyncError>;
    /// A kind-39108 event: `Err(Invalid)` refuses a malformed one by an admin.
    async fn handle_membership_event(&self, event: &Event) -> Result<(), SyncError>;
}

/// The relay group service, as the relay uses it.
#[async_trait]
pub trait RelayGroupApi: Send + Sync + 'static {
    /// `Ok(Err(reason))`: a config by an authorized publisher that is malformed.
    async fn validate(&self, event: &Event) -> Result<Result<(), String>, SyncError>;
    /// A stored config event.
    async fn handle_event(&self, event: &Event) -> Result<(), SyncError>;
    /// The authoritative config's relays.
    async fn relays(&self) -> Result<Vec<String>, SyncError>;
}

#[async_trait]
impl DistributedApi for Arc<DistributedSync> {
    async fn handle_current(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        Ok(DistributedSync::handle_current(self, &req).await)
    }

    async fn handle_event_ids(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        Ok(DistributedSync::handle_event_ids(self, &req).await)
    }

    async fn notify_new_event(&self, _id: EventId, serial: u64) -> Result<(), SyncError> {
        DistributedSync::notify_new_event(self, serial);
        Ok(())
    }

    async fn update_peers(&self, peers: Vec<String>) -> Result<(), SyncError> {
        DistributedSync::update_peers(self, &peers).await
    }
}

#[async_trait]
impl ClusterApi for Arc<ClusterSync> {
    async fn handle_latest(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        Ok(ClusterSync::handle_latest(self, &req).await)
    }

    async fn handle_events(&self, req: HttpRequest) -> Result<HttpResponse, SyncError> {
        Ok(ClusterSync::handle_events(self, &req).await)
    }

    async fn handle_membership_event(&self, event: &Event) -> Result<(), SyncError> {
        ClusterSync::handle_membership_event(self, event)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl RelayGroupApi for RelayGroup {
    async fn validate(&self, event: &Event) -> Result<Result<(), String>, SyncError> {
        Ok(RelayGroup::validate(self, event))
    }

    async fn handle_event(&self, event: &Event) -> Result<(), SyncError> {
        RelayGroup::handle_event(self, event).await
    }

    async fn relays(&self) -> Result<Vec<String>, SyncError> {
        RelayGroup::relays(self).await
    }
}
