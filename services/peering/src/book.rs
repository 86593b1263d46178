//! Per-peer bookkeeping in the store, one namespace per service (`distributed`, `cluster`,
//! `negentropy`): `<ns>:peer:<url>` is the peer's marker — the last serial stored from it as 8
//! bytes big-endian for the serial-based syncs (ORLY's layout), `1` for the negentropy peer
//! list — `<ns>:state:<url>` its status as JSON, other `<ns>:<kind>:<url>` markers hold what a
//! protocol keeps besides (the negentropy windows), and `<ns>:lease:<url>` is the lease of the
//! replica working on it. Writes made while working on a peer go through a [`FencedPeer`], so
//! they land only while its lease is held.

use std::sync::Arc;
use std::time::Duration;

use orly_db::{SharedStore, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::lease::{Acquired, Lease, PeerError};

/// The marker kinds every namespace has.
pub const KIND_PEER: &str = "peer";
pub const KIND_STATE: &str = "state";
pub const KIND_LEASE: &str = "lease";

/// The peers of one namespace and what is kept about them.
#[derive(Clone)]
pub struct PeerBook {
    store: SharedStore,
    ns: Arc<str>,
    lease_prefix: Arc<str>,
}

impl std::fmt::Debug for PeerBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerBook").field("ns", &self.ns).finish()
    }
}

impl PeerBook {
    /// The book of namespace `ns`, with leases named `<ns>:lease:<url>`.
    pub fn new(store: SharedStore, ns: impl Into<Arc<str>>) -> Self {
        let ns: Arc<str> = ns.into();
        Self {
            lease_prefix: format!("{ns}:{KIND_LEASE}:").into(),
            store,
            ns,
        }
    }

    /// Leases named `<prefix><url>` instead (negentropy keeps `negentropy:sync:`, so replicas
    /// of an older version and this one never sync a peer at once during an upgrade).
    pub fn with_lease_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.lease_prefix = prefix.into();
        self
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// `<ns>:<kind>:<url>`.
    pub fn key(&self, kind: &str, url: &str) -> String {
        format!("{}:{kind}:{url}", self.ns)
    }

    /// The lease of the replica working on `url`.
    pub fn lease_name(&self, url: &str) -> String {
        format!("{}{url}", self.lease_prefix)
    }

    /// Takes the lease on `url` for `holder`.
    pub async fn acquire(
        &self,
        url: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Acquired, StoreError> {
        Lease::acquire(&self.store, &self.lease_name(url), holder, ttl).await
    }

    /// Writes for `url` under `lease` (which must be `url`'s).
    pub fn fenced(&self, url: &str, lease: Lease) -> FencedPeer {
        debug_assert_eq!(lease.name(), self.lease_name(url));
        FencedPeer {
            book: self.clone(),
            url: url.to_string(),
            lease,
        }
    }

    /// Every url with a peer marker, sorted.
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}:{KIND_PEER}:", self.ns);
        Ok(self
            .store
            .list_markers(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Marks `url` as a peer (the negentropy peer list).
    pub async fn add(&self, url: &str) -> Result<(), StoreError> {
        self.store.set_marker(&self.key(KIND_PEER, url), b"1").await
    }

    pub async fn contains(&self, url: &str) -> Result<bool, StoreError> {
        Ok(self
            .store
            .get_marker(&self.key(KIND_PEER, url))
            .await?
            .is_some())
    }

    /// Forgets `url`: its peer marker, its state and the markers of `kinds`. True if it had a
    /// peer marker.
    pub async fn remove(&self, url: &str, kinds: &[&str]) -> Result<bool, StoreError> {
        let key = self.key(KIND_PEER, url);
        let existed = self.store.get_marker(&key).await?.is_some();
        self.store.delete_marker(&key).await?;
        for kind in std::iter::once(&KIND_STATE).chain(kinds) {
            self.store.delete_marker(&self.key(kind, url)).await?;
        }
        Ok(existed)
    }

    /// The last serial stored from `url` (`None`: never recorded, or not 8 bytes).
    pub async fn last_serial(&self, url: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .store
            .get_marker(&self.key(KIND_PEER, url))
            .await?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes))
    }

    /// Sets the last serial without a lease: for setting a peer up (a new cluster member starts
    /// at 0) while nobody works on it. Work on a peer writes through
    /// [`FencedPeer::set_last_serial`], which only the peer's lease holder gets through.
    pub async fn set_last_serial(&self, url: &str, serial: u64) -> Result<(), StoreError> {
        self.store
            .set_marker(&self.key(KIND_PEER, url), &serial.to_be_bytes())
            .await
    }

    /// The JSON marker `<ns>:<kind>:<url>` (`None`: absent).
    pub async fn json<T: DeserializeOwned>(
        &self,
        kind: &str,
        url: &str,
    ) -> Result<Option<T>, StoreError> {
        let Some(raw) = self.store.get_marker(&self.key(kind, url)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw).map(Some).map_err(|e| {
            StoreError::Corrupt(format!("{kind} of peer {url} is not valid JSON: {e}"))
        })
    }

    /// The state of `url` (`<ns>:state:<url>`).
    pub async fn state<T: DeserializeOwned>(&self, url: &str) -> Result<Option<T>, StoreError> {
        self.json(KIND_STATE, url).await
    }
}

/// The writes of the replica working on one peer, each accepted only while its lease holds.
#[derive(Clone, Debug)]
pub struct FencedPeer {
    book: PeerBook,
    url: String,
    lease: Lease,
}

impl FencedPeer {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn book(&self) -> &PeerBook {
        &self.book
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Records the last serial stored from the peer.
    pub async fn set_last_serial(&self, serial: u64) -> Result<(), PeerError> {
        self.lease
            .write_marker(&self.book.key(KIND_PEER, &self.url), &serial.to_be_bytes())
            .await
    }

    /// Writes `<ns>:<kind>:<url>` as JSON.
    pub async fn set_json<T: Serialize>(&self, kind: &str, value: &T) -> Result<(), PeerError> {
        let raw = serde_json::to_vec(value)
            .map_err(|e| StoreError::InvalidRequest(format!("{kind} of {}: {e}", self.url)))?;
        self.lease
            .write_marker(&self.book.key(kind, &self.url), &raw)
            .await
    }

    /// Writes the peer's state.
    pub async fn save_state<T: Serialize>(&self, state: &T) -> Result<(), PeerError> {
        self.set_json(KIND_STATE, state).await
    }
}
