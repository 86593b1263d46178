//! The gRPC face of a store: `orlydb.v1.DatabaseService` delegating every RPC to an
//! [`EventStore`](crate::EventStore), plus [`serve`] which adds `grpc.health.v1` readiness.
//!
//! Requests are validated here (ids, filters, serial ranges, batch sizes) and refused with
//! `INVALID_ARGUMENT`; store failures become `UNAVAILABLE` (the database did not answer) or
//! `INTERNAL`. Events are *not* signature-checked (the relay did that), but an event whose id
//! does not match its content is refused.

use std::future::Future;
use std::sync::Arc;

use nostr::{Event, EventId, Filter};
use orly_proto::orlydb::v1 as pb;
use pb::database_service_server::{DatabaseService, DatabaseServiceServer};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{SaveOutcome, SharedStore, StoreError};

/// Largest gRPC message either side accepts or sends.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Most ids or serials one request may name.
pub const MAX_IDS_PER_REQUEST: usize = 500;
/// Largest `limit` of one serial-range page.
pub const MAX_SERIAL_PAGE: u32 = 10_000;
/// Most filters one query may carry.
pub const MAX_FILTERS_PER_REQUEST: usize = 500;
/// Events per streamed `EventBatch` (a batch also closes early at [`STREAM_BATCH_BYTES`]).
pub const EVENTS_PER_BATCH: usize = 500;
/// Items per streamed `NegentropyItemBatch`.
pub const ITEMS_PER_BATCH: usize = 10_000;
/// Soft byte budget of one streamed batch, well below [`MAX_MESSAGE_SIZE`].
pub const STREAM_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches buffered ahead of a slow reader.
const STREAM_BUFFER: usize = 4;

type GrpcResult<T> = Result<Response<T>, Status>;

/// `orlydb.v1.DatabaseService` over a shared store.
#[derive(Clone)]
pub struct DbService {
    store: SharedStore,
}

impl DbService {
    pub fn new(store: SharedStore) -> Self {
        Self { store }
    }

    /// The tonic service with generous message limits and no compression.
    pub fn into_server(self) -> DatabaseServiceServer<Self> {
        DatabaseServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

/// Serves the store on `listener` (plus `grpc.health.v1`, SERVING while `store.ping()`
/// succeeds) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: SharedStore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let probe = store.clone();
    let ready: orly_common::ReadinessCheck = Arc::new(move || {
        let store = probe.clone();
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
        DbService::new(store).into_server(),
        ready,
        shutdown,
    )
    .await
}

// ---------------------------------------------------------------------------------------
// request validation and error mapping

fn store_status(e: StoreError) -> Status {
    if !matches!(e, StoreError::InvalidRequest(_)) {
        tracing::warn!(error = %e, "store call failed");
    }
    match e {
        StoreError::Unavailable(m) => Status::unavailable(m),
        StoreError::InvalidRequest(m) => Status::invalid_argument(m),
        StoreError::Database(ref db) => match db {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => Status::unavailable(e.to_string()),
            _ => Status::internal(e.to_string()),
        },
        other => Status::internal(other.to_string()),
    }
}

fn event_id(field: &str, bytes: &[u8]) -> Result<EventId, Status> {
    EventId::from_slice(bytes).map_err(|e| {
        Status::invalid_argument(format!(
            "invalid {field}: expected a 32-byte event id, got {} bytes ({e})",
            bytes.len()
        ))
    })
}

fn check_count(what: &str, n: usize, max: usize) -> Result<(), Status> {
    if n > max {
        return Err(Status::invalid_argument(format!(
            "too many {what}: {n} (at most {max} per request)"
        )));
    }
    Ok(())
}

fn filters(req: pb::QueryEventsRequest) -> Result<Vec<Filter>, Status> {
    let all: Vec<pb::Filter> = req.filter.into_iter().chain(req.filters).collect();
    check_count("filters", all.len(), MAX_FILTERS_PER_REQUEST)?;
    all.into_iter()
        .enumerate()
        .map(|(i, f)| {
            Filter::try_from(f).map_err(|e| Status::invalid_argument(format!("filter {i}: {e}")))
        })
        .collect()
}

fn marker_key(key: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("marker key must not be empty"));
    }
    Ok(())
}

fn lease_names(name: &str, holder: &str) -> Result<(), Status> {
    if name.is_empty() || holder.is_empty() {
        return Err(Status::invalid_argument(
            "lease name and holder must not be empty",
        ));
    }
    Ok(())
}

/// Splits events into batches of at most [`EVENTS_PER_BATCH`] events and roughly
/// [`STREAM_BATCH_BYTES`] bytes (a single larger event still gets its own batch).
fn event_batches(events: Vec<Event>) -> Vec<pb::EventBatch> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    for e in &events {
        let p = pb::Event::from(e);
        let len = p.encoded_len() + 8;
        if !batch.is_empty()
            && (batch.len() >= EVENTS_PER_BATCH || bytes + len > STREAM_BATCH_BYTES)
        {
            out.push(pb::EventBatch {
                events: std::mem::take(&mut batch),
            });
            bytes = 0;
        }
        bytes += len;
        batch.push(p);
    }
    if !batch.is_empty() {
        out.push(pb::EventBatch { events: batch });
    }
    out
}

/// Streams `batches` through a bounded channel: the producer waits for a slow reader, and
/// stops when the client goes away.
fn stream_batches<T: Send + 'static>(batches: Vec<T>) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        for b in batches {
            if tx.send(Ok(b)).await.is_err() {
                break; // client cancelled
            }
        }
    });
    ReceiverStream::new(rx)
}

fn serial_entry(e: crate::SerialEntry) -> pb::IdPkTs {
    pb::IdPkTs {
        id: e.id.as_bytes().to_vec(),
        pubkey: e.pubkey.to_bytes().to_vec(),
        timestamp: e.created_at.as_secs() as i64,
        serial: e.serial,
        kind: u32::from(e.kind),
    }
}

// ---------------------------------------------------------------------------------------

#[tonic::async_trait]
impl DatabaseService for DbService {
    async fn ready(&self, _: Request<pb::Empty>) -> GrpcResult<pb::ReadyResponse> {
        let ready = self.store.ping().await.is_ok();
        Ok(Response::new(pb::ReadyResponse { ready }))
    }

    async fn save_event(
        &self,
        request: Request<pb::SaveEventRequest>,
    ) -> GrpcResult<pb::SaveEventResponse> {
        let p = request
            .into_inner()
            .event
            .ok_or_else(|| Status::invalid_argument("missing event"))?;
        let event = Event::try_from(p)
            .map_err(|e| Status::invalid_argument(format!("invalid event: {e}")))?;
        if !event.verify_id() {
            return Err(Status::invalid_argument(format!(
                "invalid event: id {} does not match its content",
                event.id
            )));
        }
        let outcome = self.store.save_event(&event).await.map_err(store_status)?;
        let resp = match outcome {
            SaveOutcome::Stored { serial } => pb::SaveEventResponse {
                exists: false,
                status: pb::SaveStatus::Stored as i32,
                serial,
                message: String::new(),
            },
            SaveOutcome::Duplicate => pb::SaveEventResponse {
                exists: true,
                status: pb::SaveStatus::Duplicate as i32,
                serial: 0,
                message: "duplicate: already have this event".into(),
            },
            SaveOutcome::Rejected(message) => pb::SaveEventResponse {
                exists: false,
                status: pb::SaveStatus::Rejected as i32,
                serial: 0,
                message,
            },
        };
        Ok(Response::new(resp))
    }

    type QueryEventsStream = ReceiverStream<Result<pb::EventBatch, Status>>;

    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> GrpcResult<Self::QueryEventsStream> {
        let filters = filters(request.into_inner())?;
        let events = self.store.query(&filters).await.map_err(store_status)?;
        Ok(Response::new(stream_batches(event_batches(events))))
    }

    async fn count_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> GrpcResult<pb::CountEventsResponse> {
        let filters = filters(request.into_inner())?;
        let count = self.store.count(&filters).await.map_err(store_status)?;
        Ok(Response::new(pb::CountEventsResponse { count }))
    }

    async fn fetch_events_by_ids(
        &self,
        request: Request<pb::FetchEventsByIdsRequest>,
    ) -> GrpcResult<pb::EventBatch> {
        let req = request.into_inner();
        check_count("ids", req.ids.len(), MAX_IDS_PER_REQUEST)?;
        let ids = req
            .ids
            .iter()
            .map(|i| event_id("id", i))
            .collect::<Result<Vec<_>, _>>()?;
        let events = self.store.fetch_by_ids(&ids).await.map_err(store_status)?;
        Ok(Response::new(pb::EventBatch {
            events: events.iter().map(pb::Event::from).collect(),
        }))
    }

    type QueryNegentropyItemsStream = ReceiverStream<Result<pb::NegentropyItemBatch, Status>>;

    async fn query_negentropy_items(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> GrpcResult<Self::QueryNegentropyItemsStream> {
        let filters = filters(request.into_inner())?;
        let items = self
            .store
            .negentropy_items(&filters)
            .await
            .map_err(store_status)?;
        let batches: Vec<_> = items
            .chunks(ITEMS_PER_BATCH)
            .map(|chunk| pb::NegentropyItemBatch {
                items: chunk
                    .iter()
                    .map(|(ts, id)| pb::NegentropyItem {
                        created_at: ts.as_secs() as i64,
                        id: id.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(stream_batches(batches)))
    }

    async fn delete_event(
        &self,
        request: Request<pb::DeleteEventRequest>,
    ) -> GrpcResult<pb::DeleteEventResponse> {
        let id = event_id("id", &request.into_inner().id)?;
        let deleted = self.store.delete_event(&id).await.map_err(store_status)?;
        Ok(Response::new(pb::DeleteEventResponse { deleted }))
    }

    async fn delete_expired(&self, _: Request<pb::Empty>) -> GrpcResult<pb::DeletedCountResponse> {
        let count = self.store.delete_expired().await.map_err(store_status)?;
        Ok(Response::new(pb::DeletedCountResponse { count }))
    }

    async fn get_latest_serial(
        &self,
        _: Request<pb::Empty>,
    ) -> GrpcResult<pb::LatestSerialResponse> {
        let serial = self.store.latest_serial().await.map_err(store_status)?;
        Ok(Response::new(pb::LatestSerialResponse { serial }))
    }

    async fn get_ids_by_serial_range(
        &self,
        request: Request<pb::SerialRangeRequest>,
    ) -> GrpcResult<pb::IdPkTsList> {
        let req = request.into_inner();
        if req.from > req.to {
            return Err(Status::invalid_argument(format!(
                "invalid serial range: from {} is greater than to {}",
                req.from, req.to
            )));
        }
        if req.limit > MAX_SERIAL_PAGE {
            return Err(Status::invalid_argument(format!(
                "limit {} too large (at most {MAX_SERIAL_PAGE} per page)",
                req.limit
            )));
        }
        let entries = self
            .store
            .ids_by_serial_range(req.from, req.to, req.limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::IdPkTsList {
            items: entries.into_iter().map(serial_entry).collect(),
        }))
    }

    async fn fetch_event_by_serial(
        &self,
        request: Request<pb::FetchEventBySerialRequest>,
    ) -> GrpcResult<pb::FetchEventBySerialResponse> {
        let serial = request.into_inner().serial;
        let found = self
            .store
            .fetch_by_serials(&[serial])
            .await
            .map_err(store_status)?
            .into_iter()
            .find(|(s, _)| *s == serial);
        Ok(Response::new(match found {
            Some((_, e)) => pb::FetchEventBySerialResponse {
                event: Some(pb::Event::from(&e)),
                found: true,
            },
            None => pb::FetchEventBySerialResponse {
                event: None,
                found: false,
            },
        }))
    }

    async fn fetch_events_by_serial(
        &self,
        request: Request<pb::FetchEventsBySerialRequest>,
    ) -> GrpcResult<pb::EventMap> {
        let serials = request.into_inner().serials;
        check_count("serials", serials.len(), MAX_IDS_PER_REQUEST)?;
        let found = self
            .store
            .fetch_by_serials(&serials)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::EventMap {
            events: found
                .iter()
                .map(|(s, e)| (*s, pb::Event::from(e)))
                .collect(),
        }))
    }

    async fn get_serial_by_id(
        &self,
        request: Request<pb::GetSerialByIdRequest>,
    ) -> GrpcResult<pb::GetSerialByIdResponse> {
        let id = event_id("id", &request.into_inner().id)?;
        let serial = self.store.serial_by_id(&id).await.map_err(store_status)?;
        Ok(Response::new(pb::GetSerialByIdResponse {
            serial: serial.unwrap_or(0),
            found: serial.is_some(),
        }))
    }

    async fn get_or_create_relay_identity_secret(
        &self,
        _: Request<pb::Empty>,
    ) -> GrpcResult<pb::GetRelayIdentitySecretResponse> {
        let secret = self
            .store
            .relay_identity_secret()
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::GetRelayIdentitySecretResponse {
            secret_key: secret.to_vec(),
        }))
    }

    async fn set_marker(&self, request: Request<pb::SetMarkerRequest>) -> GrpcResult<pb::Empty> {
        let req = request.into_inner();
        marker_key(&req.key)?;
        self.store
            .set_marker(&req.key, &req.value)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_marker(
        &self,
        request: Request<pb::MarkerKey>,
    ) -> GrpcResult<pb::GetMarkerResponse> {
        let key = request.into_inner().key;
        marker_key(&key)?;
        let value = self.store.get_marker(&key).await.map_err(store_status)?;
        Ok(Response::new(pb::GetMarkerResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn has_marker(
        &self,
        request: Request<pb::MarkerKey>,
    ) -> GrpcResult<pb::HasMarkerResponse> {
        let key = request.into_inner().key;
        marker_key(&key)?;
        let value = self.store.get_marker(&key).await.map_err(store_status)?;
        Ok(Response::new(pb::HasMarkerResponse {
            found: value.is_some(),
        }))
    }

    async fn delete_marker(&self, request: Request<pb::MarkerKey>) -> GrpcResult<pb::Empty> {
        let key = request.into_inner().key;
        marker_key(&key)?;
        self.store.delete_marker(&key).await.map_err(store_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_markers(
        &self,
        request: Request<pb::ListMarkersRequest>,
    ) -> GrpcResult<pb::ListMarkersResponse> {
        let prefix = request.into_inner().prefix;
        let markers = self
            .store
            .list_markers(&prefix)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListMarkersResponse {
            markers: markers
                .into_iter()
                .map(|(key, value)| pb::Marker { key, value })
                .collect(),
        }))
    }

    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> GrpcResult<pb::LeaseResponse> {
        let req = request.into_inner();
        lease_names(&req.name, &req.holder)?;
        let state = self
            .store
            .acquire_lease(&req.name, &req.holder, req.ttl_ms)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::LeaseResponse {
            acquired: state.acquired,
            holder: state.holder,
            expires_at_ms: state.expires_at_ms,
            remaining_ms: state.remaining_ms,
        }))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> GrpcResult<pb::Empty> {
        let req = request.into_inner();
        lease_names(&req.name, &req.holder)?;
        self.store
            .release_lease(&req.name, &req.holder)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn set_marker_fenced(
        &self,
        request: Request<pb::SetMarkerFencedRequest>,
    ) -> GrpcResult<pb::SetMarkerFencedResponse> {
        let req = request.into_inner();
        marker_key(&req.key)?;
        lease_names(&req.lease, &req.holder)?;
        let written = self
            .store
            .set_marker_fenced(&req.key, &req.value, &req.lease, &req.holder)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::SetMarkerFencedResponse { written }))
    }

    async fn get_clock(&self, _: Request<pb::Empty>) -> GrpcResult<pb::ClockResponse> {
        let now_ms = self.store.clock_ms().await.map_err(store_status)?;
        Ok(Response::new(pb::ClockResponse { now_ms }))
    }
}
