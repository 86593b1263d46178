//! orly-db: event storage behind one trait, [`EventStore`], with SQLite and PostgreSQL
//! backends (sqlx) and a gRPC server and client, so callers never know where the store lives.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use nostr::{Event, EventId, Filter, JsonUtil, Timestamp};

pub mod cli;
pub mod config;
pub mod feed;
pub mod grpc_client;
pub mod grpc_server;
pub mod postgres;
pub mod query;
pub mod rules;
pub mod sqlite;

pub use config::{open_store, StoreConfig, StoreKind};
pub use feed::{Feed, FeedHub};

/// Errors of a store. Input errors (a malformed event) are not errors: they are
/// [`SaveOutcome::Rejected`] with a reason for the client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("storage service unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("configuration: {0}")]
    Config(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What happened to an event handed to [`EventStore::save_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Stored under a new serial (older versions of a replaceable/addressable event, and the
    /// targets of a deletion, were removed in the same transaction).
    Stored { serial: u64 },
    /// An event with this id is already stored.
    Duplicate,
    /// Refused by the storage rules; the message carries its NIP-01 prefix
    /// (`duplicate:`, `blocked:`, `invalid:`), ready to send in an OK.
    Rejected(String),
}

/// One event as the store keeps it: the JSON written at ingest — what a REQ, the feed and the
/// sync services send, byte for byte — and the few fields routing and privileged-kind gating
/// need without parsing it.
#[derive(Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// Position in the serial order; 0 for an ephemeral event (never stored).
    pub serial: u64,
    pub id: [u8; 32],
    pub pubkey: [u8; 32],
    pub created_at: u64,
    pub kind: u16,
    pub json: Arc<str>,
}

impl std::fmt::Debug for RawEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawEvent")
            .field("serial", &self.serial)
            .field("id", &hex::encode(self.id))
            .field("kind", &self.kind)
            .field("created_at", &self.created_at)
            .field("bytes", &self.json.len())
            .finish()
    }
}

impl RawEvent {
    /// `event` with the JSON it is kept as.
    pub fn new(serial: u64, event: &Event, json: impl Into<Arc<str>>) -> Self {
        Self {
            serial,
            id: event.id.to_bytes(),
            pubkey: event.pubkey.to_bytes(),
            created_at: event.created_at.as_secs(),
            kind: event.kind.as_u16(),
            json: json.into(),
        }
    }

    /// `event` serialized once, here.
    pub fn from_event(serial: u64, event: &Event) -> Self {
        Self::new(serial, event, event.as_json())
    }

    /// Reads the routing fields out of event JSON (not verified: the JSON was checked when it
    /// was accepted).
    pub fn from_json(serial: u64, json: impl Into<Arc<str>>) -> Result<Self> {
        let json: Arc<str> = json.into();
        let head: rules::EventHead = serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("event JSON: {e}")))?;
        Ok(Self {
            serial,
            id: head.id.to_bytes(),
            pubkey: head.pubkey.to_bytes(),
            created_at: head.created_at,
            kind: head.kind,
            json,
        })
    }

    /// The whole event, parsed from its JSON.
    pub fn parse(&self) -> Result<Event> {
        rules::parse_event(&self.json)
    }

    pub fn event_id(&self) -> EventId {
        EventId::from_byte_array(self.id)
    }

    pub fn is_ephemeral(&self) -> bool {
        self.serial == 0
    }
}

/// The answer to a query, streamed from the database cursor: the highest serial the query's
/// snapshot saw (everything at or below it that matches is in `events`; a live subscription
/// goes on from the next one), then the events newest first.
pub struct QueryStream {
    pub serial: u64,
    pub events: BoxStream<'static, Result<RawEvent>>,
}

impl std::fmt::Debug for QueryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryStream")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// One event's place in the serial sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialEntry {
    pub serial: u64,
    pub id: EventId,
    pub pubkey: nostr::PublicKey,
    pub created_at: Timestamp,
    pub kind: u16,
}

/// The state of a named lease after an acquire attempt. Lease times are the database's
/// clock, never the caller's: replicas whose clocks disagree still agree on who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// True when the caller holds the lease now.
    pub acquired: bool,
    pub holder: String,
    /// When the lease lapses, in the database's clock (Unix ms).
    pub expires_at_ms: i64,
    /// How long the lease has left, measured by the database when it answered. A holder must
    /// stop its work before this much time has passed on its own monotonic clock (counted
    /// from before it asked) unless a renewal succeeded meanwhile.
    pub remaining_ms: i64,
}

/// Event storage. Every method is safe to call concurrently.
///
/// Query semantics are NIP-01's: the filters are OR'd; within a filter every present field
/// must match (ids and authors by exact value, `#x` tags by any value); `limit` keeps the
/// newest `limit` events of that filter. The result is deduplicated and ordered by
/// `created_at` descending, then id ascending. Deleted (NIP-09) and expired (NIP-40) events are
/// never returned.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Checks that the backing database answers.
    async fn ping(&self) -> Result<()>;

    /// Stores a verified event as `json` (its canonical JSON, kept and served byte for byte),
    /// applying the NIP-01 replaceable/addressable rules, NIP-09 deletions (kind 5: the
    /// author's own `e` and `a` targets; targets of other authors are ignored) and NIP-40
    /// expiration. Ephemeral kinds (20000-29999) are refused: see
    /// [`EventStore::publish_ephemeral`]. The caller has verified id and signature. A stored
    /// event enters the feed once committed.
    async fn save_json(&self, event: &Event, json: &str) -> Result<SaveOutcome>;

    /// [`EventStore::save_json`] with the event serialized here.
    async fn save_event(&self, event: &Event) -> Result<SaveOutcome> {
        self.save_json(event, &event.as_json()).await
    }

    /// Puts an ephemeral event on the feed of every process watching this store (not stored;
    /// live only).
    async fn publish_ephemeral(&self, event: RawEvent) -> Result<()>;

    /// The feed (see [`feed`]): stored events with a serial above `after`, in serial order,
    /// then every new stored or ephemeral event as it comes. Never ends while the store lives;
    /// call inside a tokio runtime.
    fn watch(&self, after: u64) -> Feed;

    /// Events matching any of the filters (see the trait docs for ordering), streamed, with
    /// the serial the query saw.
    async fn query_stream(&self, filters: &[Filter]) -> Result<QueryStream>;

    /// [`EventStore::query_stream`] collected and parsed.
    async fn query(&self, filters: &[Filter]) -> Result<Vec<Event>> {
        let q = self.query_stream(filters).await?;
        let raw: Vec<RawEvent> = q.events.try_collect().await?;
        raw.iter().map(RawEvent::parse).collect()
    }

    /// Stored events with `from <= serial <= to`, ascending, at most `limit`, whole.
    async fn events_by_serial_range(&self, from: u64, to: u64, limit: u32)
        -> Result<Vec<RawEvent>>;

    /// How many events match any of the filters (each filter's `limit` is ignored).
    async fn count(&self, filters: &[Filter]) -> Result<u64>;

    /// The stored events among `ids` (order unspecified).
    async fn fetch_by_ids(&self, ids: &[EventId]) -> Result<Vec<Event>>;

    /// `(created_at, id)` of every event matching any of the filters, ascending by
    /// `(created_at, id)`: the set negentropy reconciles, without loading whole events.
    async fn negentropy_items(&self, filters: &[Filter]) -> Result<Vec<(Timestamp, EventId)>>;

    /// Removes one event regardless of author (administrative). True if it existed.
    async fn delete_event(&self, id: &EventId) -> Result<bool>;

    /// Removes events whose NIP-40 expiration lies in the past; returns how many.
    async fn delete_expired(&self) -> Result<u64>;

    /// The highest serial handed out so far (0 for an empty store).
    async fn latest_serial(&self) -> Result<u64>;

    /// Stored events with `from <= serial <= to`, ascending, at most `limit`.
    async fn ids_by_serial_range(&self, from: u64, to: u64, limit: u32)
        -> Result<Vec<SerialEntry>>;

    /// The stored events among `serials`, with their serials.
    async fn fetch_by_serials(&self, serials: &[u64]) -> Result<Vec<(u64, Event)>>;

    /// The serial of a stored event.
    async fn serial_by_id(&self, id: &EventId) -> Result<Option<u64>>;

    /// The relay's identity secret key (32 bytes), created and persisted on first use.
    async fn relay_identity_secret(&self) -> Result<[u8; 32]>;

    async fn set_marker(&self, key: &str, value: &[u8]) -> Result<()>;
    async fn get_marker(&self, key: &str) -> Result<Option<Vec<u8>>>;
    async fn delete_marker(&self, key: &str) -> Result<()>;
    /// Every marker whose key starts with `prefix`, sorted by key.
    async fn list_markers(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;

    /// Takes or renews the named lease for `holder` when it is free, expired, or already
    /// held by `holder`; otherwise reports the current holder. Times are the database's clock.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<LeaseState>;
    /// Gives the lease up if `holder` holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
    /// Writes a marker only while `holder` holds the unexpired lease `lease` (checked in the
    /// same statement, by the database's clock): a deposed holder cannot overwrite what the
    /// new one wrote. True when written.
    async fn set_marker_fenced(
        &self,
        key: &str,
        value: &[u8],
        lease: &str,
        holder: &str,
    ) -> Result<bool>;
    /// The database's clock (Unix ms): one time base for every replica.
    async fn clock_ms(&self) -> Result<i64>;
}

/// A store shared between tasks.
pub type SharedStore = Arc<dyn EventStore>;

/// The lease whose holder purges expired events: one purger for every process sharing a
/// store, whichever it is.
pub const PURGE_LEASE: &str = "store:purge-expired";

/// Purges expired (NIP-40) events every `interval` while this process holds
/// [`PURGE_LEASE`] (`holder` names it), so replicas sharing a store do not all purge.
pub fn spawn_purger(
    store: SharedStore,
    holder: String,
    interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let ttl = i64::try_from(interval.as_millis().saturating_mul(3)).unwrap_or(i64::MAX);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match store.acquire_lease(PURGE_LEASE, &holder, ttl).await {
                Ok(l) if l.acquired => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "purge lease unavailable");
                    continue;
                }
            }
            match store.delete_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "purged expired events"),
                Err(e) => tracing::warn!(error = %e, "purging expired events failed"),
            }
        }
    })
}
