//! orly-db: event storage behind one trait, [`EventStore`], with SQLite and PostgreSQL
//! backends (sqlx) and a gRPC server and client, so callers never know where the store lives.

use std::sync::Arc;

use async_trait::async_trait;
use nostr::{Event, EventId, Filter, Timestamp};

pub mod cli;
pub mod config;
pub mod grpc_client;
pub mod grpc_server;
pub mod postgres;
pub mod rules;
pub mod sqlite;

pub use config::{open_store, StoreConfig, StoreKind};

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

    /// Stores a verified event, applying the NIP-01 replaceable/addressable rules, NIP-09
    /// deletions (kind 5: author-only; `e` and `a` targets) and NIP-40 expiration. Ephemeral
    /// kinds (20000-29999) are refused. The caller has verified id and signature.
    async fn save_event(&self, event: &Event) -> Result<SaveOutcome>;

    /// Events matching any of the filters (see the trait docs for ordering).
    async fn query(&self, filters: &[Filter]) -> Result<Vec<Event>>;

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
