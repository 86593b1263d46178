//! The gRPC face of a store: `orlydb.v1.DatabaseService` delegating every RPC to an
//! [`EventStore`](crate::EventStore), plus [`serve`] which adds `grpc.health.v1` readiness.
//!
//! Requests are validated here (ids, filters, serial ranges, batch sizes) and refused with
//! `INVALID_ARGUMENT`; store failures become `UNAVAILABLE` (the database did not answer) or
//! `INTERNAL`. Events are *not* signature-checked (the relay did that), but an event whose id
//! does not match its content is refused.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use nostr::{Event, EventId, Filter, JsonUtil};
use orly_proto::orlydb::v1 as pb;
use pb::database_service_server::{DatabaseService, DatabaseServiceServer};
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
/// Most feed items in one `WatchBatch`.
const WATCH_BATCH: usize = 256;

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

fn check_range(from: u64, to: u64, limit: u32) -> Result<(), Status> {
    if from > to {
        return Err(Status::invalid_argument(format!(
            "invalid serial range: from {from} is greater than to {to}"
        )));
    }
    if limit > MAX_SERIAL_PAGE {
        return Err(Status::invalid_argument(format!(
            "limit {limit} too large (at most {MAX_SERIAL_PAGE} per page)"
        )));
    }
    Ok(())
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

/// A stored event as it travels.
pub fn raw_to_pb(e: &crate::RawEvent) -> pb::RawEvent {
    pb::RawEvent {
        serial: e.serial,
        id: e.id.to_vec(),
        pubkey: e.pubkey.to_vec(),
        created_at: i64::try_from(e.created_at).unwrap_or(i64::MAX),
        kind: u32::from(e.kind),
        json: e.json.as_bytes().to_vec(),
    }
}

/// Fills batches of at most [`EVENTS_PER_BATCH`] events and roughly [`STREAM_BATCH_BYTES`]
/// bytes (a single larger event still gets its own batch).
#[derive(Default)]
struct Batcher {
    batch: pb::EventBatch,
    count: usize,
    bytes: usize,
}

impl Batcher {
    /// Adds an event; returns a full batch to send first when this one does not fit.
    fn push(&mut self, e: crate::RawEvent, raw: bool) -> Option<pb::EventBatch> {
        let len = e.json.len() + 128;
        let full = (self.count >= EVENTS_PER_BATCH || self.bytes + len > STREAM_BATCH_BYTES)
            .then(|| self.take())
            .flatten();
        if raw {
            self.batch.raw.push(raw_to_pb(&e));
        } else {
            match e.parse() {
                Ok(ev) => self.batch.events.push(pb::Event::from(&ev)),
                Err(err) => tracing::warn!(error = %err, "stored event JSON does not parse"),
            }
        }
        self.count += 1;
        self.bytes += len;
        full
    }

    fn take(&mut self) -> Option<pb::EventBatch> {
        (self.count > 0).then(|| {
            self.count = 0;
            self.bytes = 0;
            std::mem::take(&mut self.batch)
        })
    }
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
        let req = request.into_inner();
        let outcome = if !req.json.is_empty() {
            // Ours: the relay verified the event and sends the JSON it keeps; it is parsed
            // for the storage rules and stored as is, with no second hash of the id here.
            let json = String::from_utf8(req.json)
                .map_err(|_| Status::invalid_argument("invalid event: JSON is not UTF-8"))?;
            let event = Event::from_json(&json)
                .map_err(|e| Status::invalid_argument(format!("invalid event: {e}")))?;
            self.store.save_json(&event, &json).await
        } else {
            // ORLY's form: a structured event; its JSON is made here, so its id is checked.
            let p = req
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
            self.store.save_event(&event).await
        }
        .map_err(store_status)?;
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
        let req = request.into_inner();
        let raw = req.raw;
        let filters = filters(req)?;
        let q = self
            .store
            .query_stream(&filters)
            .await
            .map_err(store_status)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            // First the serial the query saw, then batches as rows come off the cursor.
            let head = pb::EventBatch {
                serial: q.serial,
                ..Default::default()
            };
            if raw && tx.send(Ok(head)).await.is_err() {
                return;
            }
            let mut events = q.events;
            let mut batch = Batcher::default();
            while let Some(item) = events.next().await {
                match item {
                    Ok(e) => {
                        if let Some(full) = batch.push(e, raw) {
                            if tx.send(Ok(full)).await.is_err() {
                                return; // the client went away
                            }
                        }
                    }
                    Err(e) => {
                        if let Some(part) = batch.take() {
                            let _ = tx.send(Ok(part)).await;
                        }
                        let _ = tx.send(Err(store_status(e))).await;
                        return;
                    }
                }
            }
            if let Some(last) = batch.take() {
                let _ = tx.send(Ok(last)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchBatch, Status>> + Send>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> GrpcResult<Self::WatchStream> {
        let after = request.into_inner().after;
        // Whatever is ready goes in one message; a quiet feed sends each event at once.
        let feed = self
            .store
            .watch(after)
            .ready_chunks(WATCH_BATCH)
            .map(|chunk| {
                Ok(pb::WatchBatch {
                    events: chunk.iter().map(|e| raw_to_pb(e)).collect(),
                })
            });
        Ok(Response::new(Box::pin(feed)))
    }

    async fn publish_ephemeral(
        &self,
        request: Request<pb::PublishEphemeralRequest>,
    ) -> GrpcResult<pb::Empty> {
        let json = String::from_utf8(request.into_inner().json)
            .map_err(|_| Status::invalid_argument("invalid event: JSON is not UTF-8"))?;
        let event = crate::RawEvent::from_json(0, json)
            .map_err(|e| Status::invalid_argument(format!("invalid event: {e}")))?;
        self.store
            .publish_ephemeral(event)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_events_by_serial_range(
        &self,
        request: Request<pb::SerialRangeRequest>,
    ) -> GrpcResult<pb::RawEventList> {
        let req = request.into_inner();
        check_range(req.from, req.to, req.limit)?;
        let events = self
            .store
            .events_by_serial_range(req.from, req.to, req.limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::RawEventList {
            events: events.iter().map(raw_to_pb).collect(),
        }))
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
            ..Default::default()
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
        check_range(req.from, req.to, req.limit)?;
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
        request: Request<pb::Empty>,
    ) -> GrpcResult<pb::GetRelayIdentitySecretResponse> {
        // Without a token anyone who can reach the port is "authenticated": then the key goes
        // only to callers on this host.
        let open = orly_common::security::process().map_or(true, |s| s.token().is_none());
        let local = request.remote_addr().is_some_and(|a| a.ip().is_loopback());
        if open && !local {
            return Err(Status::permission_denied(
                "the relay's identity key is handed only to authenticated callers: \
                 set ORLY_GRPC_AUTH_TOKEN on orly-db and its clients",
            ));
        }
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
