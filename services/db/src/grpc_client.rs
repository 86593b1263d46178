//! [`GrpcStore`]: an [`EventStore`] that lives in orly-db, reached over gRPC.
//!
//! The channel is lazy and discovers replicas ([`orly_common::GrpcChannel`]): creating the
//! client never fails because orly-db is down, calls made while it is down fail with
//! [`StoreError::Unavailable`] within the call timeout, a call that finds a replica
//! unreachable is retried on another one, and the channel reconnects by itself.

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use nostr::{Event, EventId, Filter, PublicKey, Timestamp};
use orly_common::{CallError, ClientOptions, GrpcChannel};
use orly_proto::orlydb::v1 as pb;
use pb::database_service_client::DatabaseServiceClient;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::grpc_server::{MAX_IDS_PER_REQUEST, MAX_MESSAGE_SIZE, MAX_SERIAL_PAGE};
use crate::{
    EventStore, Feed, LeaseState, QueryStream, RawEvent, Result, SaveOutcome, SerialEntry,
    StoreError,
};

type Client = DatabaseServiceClient<GrpcChannel>;

/// The orly-db service as an [`EventStore`]. Cheap to clone (one shared channel).
#[derive(Clone)]
pub struct GrpcStore {
    client: Client,
    channel: GrpcChannel,
}

impl std::fmt::Debug for GrpcStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcStore")
            .field("channel", &self.channel)
            .finish()
    }
}

impl GrpcStore {
    /// A client for orly-db at `addr` (`host:port`, `http://host:port`, or several of them
    /// comma-separated; a host name stands for every address it resolves to) whose every call
    /// (for streams: every message) must finish within `timeout`. Token, TLS and resolver
    /// settings come from the environment. Does not connect yet; call inside a tokio runtime.
    pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Self> {
        let opts = ClientOptions::from_env("orly-db", timeout)
            .map_err(|e| StoreError::Config(e.to_string()))?;
        Self::with_options(addr, opts)
    }

    /// [`Self::connect_lazy`] with explicit options.
    pub fn with_options(addr: &str, opts: ClientOptions) -> Result<Self> {
        let channel =
            GrpcChannel::connect_lazy(addr, opts).map_err(|e| StoreError::Config(e.to_string()))?;
        let client = DatabaseServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self { client, channel })
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        self.channel.address()
    }

    /// The channel (replicas, pinning).
    pub fn channel(&self) -> &GrpcChannel {
        &self.channel
    }

    fn call_error(&self, e: CallError) -> StoreError {
        match e {
            CallError::Status(s) if s.code() == Code::InvalidArgument => {
                StoreError::InvalidRequest(s.message().to_string())
            }
            e => StoreError::Unavailable(self.channel.describe(&e)),
        }
    }

    fn status_error(&self, s: Status) -> StoreError {
        self.call_error(CallError::Status(s))
    }

    fn deadline_error(&self, what: &'static str) -> StoreError {
        self.call_error(CallError::Timeout {
            what,
            after: self.channel.timeout(),
        })
    }

    /// One unary call under the call timeout (sent as the gRPC deadline too, so the server
    /// gives up when the client has); retried on another replica when one is unreachable.
    async fn unary<Q, R, F, Fut>(&self, what: &'static str, msg: Q, call: F) -> Result<R>
    where
        Q: Clone,
        F: Fn(Client, Request<Q>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        self.channel
            .call(what, || {
                call(self.client.clone(), self.channel.request(msg.clone()))
            })
            .await
            .map_err(|e| self.call_error(e))
    }

    /// Opens a server stream; the timeout bounds the opening and then each message.
    async fn open_stream<R, F, Fut>(
        &self,
        what: &'static str,
        msg: pb::QueryEventsRequest,
        call: F,
    ) -> Result<Streaming<R>>
    where
        F: Fn(Client, Request<pb::QueryEventsRequest>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Streaming<R>>, Status>>,
    {
        self.channel
            .call(what, || {
                call(self.client.clone(), Request::new(msg.clone()))
            })
            .await
            .map_err(|e| self.call_error(e))
    }

    async fn next_message<R>(
        &self,
        what: &'static str,
        stream: &mut Streaming<R>,
    ) -> Result<Option<R>> {
        match tokio::time::timeout(self.channel.timeout(), stream.message()).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(status)) => Err(self.status_error(status)),
            Err(_) => Err(self.deadline_error(what)),
        }
    }
}

fn query_request(filters: &[Filter]) -> pb::QueryEventsRequest {
    pb::QueryEventsRequest {
        filter: None,
        filters: filters.iter().map(pb::Filter::from).collect(),
        raw: false,
    }
}

fn raw_from(p: pb::RawEvent) -> Result<RawEvent> {
    let bad = |what: &str| StoreError::Corrupt(format!("event from orly-db: bad {what}"));
    let json = String::from_utf8(p.json).map_err(|_| bad("JSON"))?;
    Ok(RawEvent {
        serial: p.serial,
        id: p.id.as_slice().try_into().map_err(|_| bad("id"))?,
        pubkey: p.pubkey.as_slice().try_into().map_err(|_| bad("pubkey"))?,
        created_at: u64::try_from(p.created_at).map_err(|_| bad("created_at"))?,
        kind: u16::try_from(p.kind).map_err(|_| bad("kind"))?,
        json: Arc::from(json),
    })
}

/// Items buffered between the watch task and its consumer.
const WATCH_BUFFER: usize = 1024;

/// Keeps one `Watch` stream open, reopening it after any failure from the last serial seen —
/// orly-db (or whichever replica answers) replays what came since: no gap, no duplicate.
/// Ephemeral events are live only, so those sent while the stream was down are not seen.
async fn watch_loop(store: GrpcStore, after: u64, tx: tokio::sync::mpsc::Sender<Arc<RawEvent>>) {
    let mut last = after;
    let mut backoff = Duration::from_millis(100);
    loop {
        let request = pb::WatchRequest { after: last };
        let opened = store
            .channel
            .once("Watch", store.client.clone().watch(Request::new(request)))
            .await;
        match opened {
            Ok(mut stream) => {
                backoff = Duration::from_millis(100);
                loop {
                    match stream.message().await {
                        Ok(Some(batch)) => {
                            for p in batch.events {
                                let e = match raw_from(p) {
                                    Ok(e) => e,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "bad feed item from orly-db");
                                        continue;
                                    }
                                };
                                if e.serial != 0 {
                                    if e.serial <= last {
                                        continue;
                                    }
                                    last = e.serial;
                                }
                                if tx.send(Arc::new(e)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(s) => {
                            tracing::debug!(error = %s, "orly-db feed broke; reopening");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %store.channel.describe(&e), "cannot open the orly-db feed; retrying");
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn event_from(p: pb::Event) -> Result<Event> {
    Event::try_from(p).map_err(|e| StoreError::Corrupt(format!("event from orly-db: {e}")))
}

fn id_from(bytes: &[u8]) -> Result<EventId> {
    EventId::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("event id from orly-db: {e}")))
}

fn entry_from(p: pb::IdPkTs) -> Result<SerialEntry> {
    Ok(SerialEntry {
        serial: p.serial,
        id: id_from(&p.id)?,
        pubkey: PublicKey::from_slice(&p.pubkey)
            .map_err(|e| StoreError::Corrupt(format!("pubkey from orly-db: {e}")))?,
        created_at: Timestamp::from(
            u64::try_from(p.timestamp)
                .map_err(|e| StoreError::Corrupt(format!("timestamp from orly-db: {e}")))?,
        ),
        kind: u16::try_from(p.kind)
            .map_err(|e| StoreError::Corrupt(format!("kind from orly-db: {e}")))?,
    })
}

#[async_trait]
impl EventStore for GrpcStore {
    async fn ping(&self) -> Result<()> {
        let resp = self
            .unary(
                "Ready",
                pb::Empty {},
                |mut c, r| async move { c.ready(r).await },
            )
            .await?;
        if resp.ready {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "orly-db at {} is up but its database is not ready",
                self.addr()
            )))
        }
    }

    async fn save_json(&self, event: &Event, json: &str) -> Result<SaveOutcome> {
        let _ = event; // the server parses the JSON it stores
        let msg = pb::SaveEventRequest {
            event: None,
            json: json.as_bytes().to_vec(),
        };
        let resp = self
            .unary(
                "SaveEvent",
                msg,
                |mut c, r| async move { c.save_event(r).await },
            )
            .await?;
        Ok(match pb::SaveStatus::try_from(resp.status) {
            Ok(pb::SaveStatus::Stored) => SaveOutcome::Stored {
                serial: resp.serial,
            },
            Ok(pb::SaveStatus::Duplicate) => SaveOutcome::Duplicate,
            Ok(pb::SaveStatus::Rejected) => SaveOutcome::Rejected(resp.message),
            // A server that only fills ORLY's `exists` field.
            _ if resp.exists => SaveOutcome::Duplicate,
            _ => SaveOutcome::Stored {
                serial: resp.serial,
            },
        })
    }

    async fn publish_ephemeral(&self, event: RawEvent) -> Result<()> {
        let msg = pb::PublishEphemeralRequest {
            json: event.json.as_bytes().to_vec(),
        };
        self.unary("PublishEphemeral", msg, |mut c, r| async move {
            c.publish_ephemeral(r).await
        })
        .await?;
        Ok(())
    }

    fn watch(&self, after: u64) -> Feed {
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch_loop(self.clone(), after, tx));
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    async fn query_stream(&self, filters: &[Filter]) -> Result<QueryStream> {
        let mut req = query_request(filters);
        req.raw = true;
        let mut stream = self
            .open_stream("QueryEvents", req, |mut c, r| async move {
                c.query_events(r).await
            })
            .await?;
        let head = self
            .next_message("QueryEvents", &mut stream)
            .await?
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "orly-db at {}: the query stream ended before its first batch",
                    self.addr()
                ))
            })?;
        let serial = head.serial;
        let first: Vec<Result<RawEvent>> = head.raw.into_iter().map(raw_from).collect();
        let client = self.clone();
        let rest = futures::stream::unfold(Some(stream), move |state| {
            let client = client.clone();
            async move {
                let mut stream = state?;
                match client.next_message("QueryEvents", &mut stream).await {
                    Ok(Some(batch)) => Some((
                        futures::stream::iter(
                            batch.raw.into_iter().map(raw_from).collect::<Vec<_>>(),
                        ),
                        Some(stream),
                    )),
                    Ok(None) => None,
                    Err(e) => Some((futures::stream::iter(vec![Err(e)]), None)),
                }
            }
        })
        .flatten();
        Ok(QueryStream {
            serial,
            events: futures::stream::iter(first).chain(rest).boxed(),
        })
    }

    async fn events_by_serial_range(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<RawEvent>> {
        if from > to || limit == 0 {
            return Ok(vec![]);
        }
        let msg = pb::SerialRangeRequest {
            from,
            to,
            limit: limit.min(MAX_SERIAL_PAGE),
        };
        let resp = self
            .unary("GetEventsBySerialRange", msg, |mut c, r| async move {
                c.get_events_by_serial_range(r).await
            })
            .await?;
        resp.events.into_iter().map(raw_from).collect()
    }

    async fn count(&self, filters: &[Filter]) -> Result<u64> {
        let resp = self
            .unary(
                "CountEvents",
                query_request(filters),
                |mut c, r| async move { c.count_events(r).await },
            )
            .await?;
        Ok(resp.count)
    }

    async fn fetch_by_ids(&self, ids: &[EventId]) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(MAX_IDS_PER_REQUEST) {
            let msg = pb::FetchEventsByIdsRequest {
                ids: chunk.iter().map(|i| i.as_bytes().to_vec()).collect(),
            };
            let resp = self
                .unary("FetchEventsByIds", msg, |mut c, r| async move {
                    c.fetch_events_by_ids(r).await
                })
                .await?;
            for p in resp.events {
                out.push(event_from(p)?);
            }
        }
        Ok(out)
    }

    async fn negentropy_items(&self, filters: &[Filter]) -> Result<Vec<(Timestamp, EventId)>> {
        let mut stream = self
            .open_stream(
                "QueryNegentropyItems",
                query_request(filters),
                |mut c, r| async move { c.query_negentropy_items(r).await },
            )
            .await?;
        let mut out = Vec::new();
        while let Some(batch) = self
            .next_message("QueryNegentropyItems", &mut stream)
            .await?
        {
            out.reserve(batch.items.len());
            for item in batch.items {
                let ts = u64::try_from(item.created_at).map_err(|e| {
                    StoreError::Corrupt(format!("negentropy timestamp from orly-db: {e}"))
                })?;
                out.push((Timestamp::from(ts), id_from(&item.id)?));
            }
        }
        Ok(out)
    }

    async fn delete_event(&self, id: &EventId) -> Result<bool> {
        let msg = pb::DeleteEventRequest {
            id: id.as_bytes().to_vec(),
        };
        let resp = self
            .unary("DeleteEvent", msg, |mut c, r| async move {
                c.delete_event(r).await
            })
            .await?;
        Ok(resp.deleted)
    }

    async fn delete_expired(&self) -> Result<u64> {
        let resp = self
            .unary("DeleteExpired", pb::Empty {}, |mut c, r| async move {
                c.delete_expired(r).await
            })
            .await?;
        Ok(resp.count)
    }

    async fn latest_serial(&self) -> Result<u64> {
        let resp = self
            .unary("GetLatestSerial", pb::Empty {}, |mut c, r| async move {
                c.get_latest_serial(r).await
            })
            .await?;
        Ok(resp.serial)
    }

    /// Pages through the range when `limit` exceeds the server's page size.
    async fn ids_by_serial_range(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<SerialEntry>> {
        let mut out: Vec<SerialEntry> = Vec::new();
        let mut next = from;
        loop {
            let remaining = limit - out.len() as u32;
            let page = remaining.min(MAX_SERIAL_PAGE);
            let msg = pb::SerialRangeRequest {
                from: next,
                to,
                limit: page,
            };
            let resp = self
                .unary("GetIdsBySerialRange", msg, |mut c, r| async move {
                    c.get_ids_by_serial_range(r).await
                })
                .await?;
            let got = resp.items.len();
            for p in resp.items {
                out.push(entry_from(p)?);
            }
            let done = remaining <= MAX_SERIAL_PAGE || (got as u32) < page;
            match out.last() {
                Some(last) if !done && last.serial < to && last.serial >= next => {
                    next = last.serial + 1;
                }
                _ => return Ok(out),
            }
        }
    }

    async fn fetch_by_serials(&self, serials: &[u64]) -> Result<Vec<(u64, Event)>> {
        let mut out = Vec::new();
        for chunk in serials.chunks(MAX_IDS_PER_REQUEST) {
            let msg = pb::FetchEventsBySerialRequest {
                serials: chunk.to_vec(),
            };
            let resp = self
                .unary("FetchEventsBySerial", msg, |mut c, r| async move {
                    c.fetch_events_by_serial(r).await
                })
                .await?;
            for (serial, p) in resp.events {
                out.push((serial, event_from(p)?));
            }
        }
        out.sort_by_key(|(s, _)| *s);
        Ok(out)
    }

    async fn serial_by_id(&self, id: &EventId) -> Result<Option<u64>> {
        let msg = pb::GetSerialByIdRequest {
            id: id.as_bytes().to_vec(),
        };
        let resp = self
            .unary("GetSerialById", msg, |mut c, r| async move {
                c.get_serial_by_id(r).await
            })
            .await?;
        Ok(resp.found.then_some(resp.serial))
    }

    async fn relay_identity_secret(&self) -> Result<[u8; 32]> {
        let resp = self
            .unary(
                "GetOrCreateRelayIdentitySecret",
                pb::Empty {},
                |mut c, r| async move { c.get_or_create_relay_identity_secret(r).await },
            )
            .await?;
        <[u8; 32]>::try_from(resp.secret_key.as_slice()).map_err(|_| {
            StoreError::Corrupt(format!(
                "relay identity secret from orly-db has {} bytes, expected 32",
                resp.secret_key.len()
            ))
        })
    }

    async fn set_marker(&self, key: &str, value: &[u8]) -> Result<()> {
        let msg = pb::SetMarkerRequest {
            key: key.to_string(),
            value: value.to_vec(),
        };
        self.unary(
            "SetMarker",
            msg,
            |mut c, r| async move { c.set_marker(r).await },
        )
        .await?;
        Ok(())
    }

    async fn get_marker(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let msg = pb::MarkerKey {
            key: key.to_string(),
        };
        let resp = self
            .unary(
                "GetMarker",
                msg,
                |mut c, r| async move { c.get_marker(r).await },
            )
            .await?;
        Ok(resp.found.then_some(resp.value))
    }

    async fn delete_marker(&self, key: &str) -> Result<()> {
        let msg = pb::MarkerKey {
            key: key.to_string(),
        };
        self.unary("DeleteMarker", msg, |mut c, r| async move {
            c.delete_marker(r).await
        })
        .await?;
        Ok(())
    }

    async fn list_markers(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let msg = pb::ListMarkersRequest {
            prefix: prefix.to_string(),
        };
        let resp = self
            .unary("ListMarkers", msg, |mut c, r| async move {
                c.list_markers(r).await
            })
            .await?;
        Ok(resp.markers.into_iter().map(|m| (m.key, m.value)).collect())
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<LeaseState> {
        let msg = pb::AcquireLeaseRequest {
            name: name.to_string(),
            holder: holder.to_string(),
            ttl_ms,
        };
        let resp = self
            .unary("AcquireLease", msg, |mut c, r| async move {
                c.acquire_lease(r).await
            })
            .await?;
        Ok(LeaseState {
            acquired: resp.acquired,
            holder: resp.holder,
            expires_at_ms: resp.expires_at_ms,
            remaining_ms: resp.remaining_ms,
        })
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let msg = pb::ReleaseLeaseRequest {
            name: name.to_string(),
            holder: holder.to_string(),
        };
        self.unary("ReleaseLease", msg, |mut c, r| async move {
            c.release_lease(r).await
        })
        .await?;
        Ok(())
    }

    async fn set_marker_fenced(
        &self,
        key: &str,
        value: &[u8],
        lease: &str,
        holder: &str,
    ) -> Result<bool> {
        let msg = pb::SetMarkerFencedRequest {
            key: key.to_string(),
            value: value.to_vec(),
            lease: lease.to_string(),
            holder: holder.to_string(),
        };
        let resp = self
            .unary("SetMarkerFenced", msg, |mut c, r| async move {
                c.set_marker_fenced(r).await
            })
            .await?;
        Ok(resp.written)
    }

    async fn clock_ms(&self) -> Result<i64> {
        let resp = self
            .unary("GetClock", pb::Empty {}, |mut c, r| async move {
                c.get_clock(r).await
            })
            .await?;
        Ok(resp.now_ms)
    }
}
