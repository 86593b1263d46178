//! Peers and their sync state, kept as store markers so every replica (and a restarted one)
//! sees the same list: `negentropy:peer:<url>` marks a peer, `negentropy:state:<url>` holds its
//! [`PeerState`] as JSON. The per-peer sync lease is named `negentropy:sync:<url>`.

use nostr::Timestamp;
use orly_db::{SharedStore, StoreError};
use serde::{Deserialize, Serialize};

/// Marker prefix of the peer list.
pub const PEER_PREFIX: &str = "negentropy:peer:";
/// Marker prefix of per-peer state.
pub const STATE_PREFIX: &str = "negentropy:state:";
/// Lease prefix: one lease per peer, held by the replica syncing it.
pub const LEASE_PREFIX: &str = "negentropy:sync:";

/// Status values of [`PeerState::status`] (ORLY's).
pub const STATUS_IDLE: &str = "idle";
pub const STATUS_SYNCING: &str = "syncing";
pub const STATUS_ERROR: &str = "error";

/// What we know about syncing with one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerState {
    pub peer_url: String,
    /// Unix seconds of the last successful sync (0: never).
    pub last_sync: i64,
    /// Unix seconds of the last attempt.
    pub last_attempt: i64,
    /// Events transferred (downloaded + uploaded) over all syncs.
    pub events_synced: i64,
    /// idle | syncing | error
    pub status: String,
    pub last_error: String,
    pub consecutive_failures: i32,
    /// Of the last successful sync: ids we had and the peer lacked, ids the peer had and we
    /// lacked, events stored and sent, negentropy rounds, reconciliation and total bytes.
    pub have_count: i64,
    pub need_count: i64,
    pub fetched_count: i64,
    pub sent_count: i64,
    pub rounds: i64,
    pub reconcile_bytes_sent: i64,
    pub reconcile_bytes_received: i64,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    /// Replica that ran the last attempt.
    pub holder: String,
}

/// Normalises a peer URL: trimmed, `ws://` or `wss://` with a host, no trailing `/` alone.
pub fn normalize_peer_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let rest = url
        .strip_prefix("wss://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| format!("peer URL {url:?} must start with ws:// or wss://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("peer URL {url:?} has no valid host"));
    }
    let url = if rest.len() == host.len() + 1 && rest.ends_with('/') {
        &url[..url.len() - 1]
    } else {
        url
    };
    Ok(url.to_string())
}

/// Parses a comma-separated peer list (`ORLY_SYNC_NEGENTROPY_PEERS`); empty entries are skipped.
pub fn parse_peer_list(s: &str) -> Result<Vec<String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(normalize_peer_url)
        .collect()
}

/// The peer list and per-peer state in a store.
#[derive(Clone)]
pub struct PeerBook {
    store: SharedStore,
}

impl PeerBook {
    pub fn new(store: SharedStore) -> Self {
        Self { store }
    }

    /// Adds a peer (idempotent); returns its normalised URL.
    pub async fn add(&self, url: &str) -> Result<String, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        self.store
            .set_marker(&format!("{PEER_PREFIX}{url}"), b"1")
            .await?;
        Ok(url)
    }

    /// Removes a peer and its state. False if it was not a peer.
    pub async fn remove(&self, url: &str) -> Result<bool, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        let key = format!("{PEER_PREFIX}{url}");
        let existed = self.store.get_marker(&key).await?.is_some();
        self.store.delete_marker(&key).await?;
        self.store
            .delete_marker(&format!("{STATE_PREFIX}{url}"))
            .await?;
        Ok(existed)
    }

    /// Every peer, sorted.
    pub async fn list(&self) -> Result<Vec<String>, PeerError> {
        Ok(self
            .store
            .list_markers(PEER_PREFIX)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(PEER_PREFIX).map(str::to_string))
            .collect())
    }

    pub async fn is_peer(&self, url: &str) -> Result<bool, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        Ok(self
            .store
            .get_marker(&format!("{PEER_PREFIX}{url}"))
            .await?
            .is_some())
    }

    /// The stored state of a peer.
    pub async fn state(&self, url: &str) -> Result<Option<PeerState>, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        let Some(raw) = self
            .store
            .get_marker(&format!("{STATE_PREFIX}{url}"))
            .await?
        else {
            return Ok(None);
        };
        let state = serde_json::from_slice(&raw).map_err(|e| {
            PeerError::Store(StoreError::Corrupt(format!(
                "peer state of {url} is not valid JSON: {e}"
            )))
        })?;
        Ok(Some(state))
    }

    /// The state of every peer (a peer never synced gets an idle state).
    pub async fn states(&self) -> Result<Vec<PeerState>, PeerError> {
        let mut out = Vec::new();
        for url in self.list().await? {
            let state = self.state(&url).await?.unwrap_or_else(|| PeerState {
                peer_url: url.clone(),
                status: STATUS_IDLE.into(),
                ..PeerState::default()
            });
            out.push(state);
        }
        Ok(out)
    }

    pub async fn save_state(&self, state: &PeerState) -> Result<(), PeerError> {
        let raw = serde_json::to_vec(state)
            .map_err(|e| PeerError::Store(StoreError::Corrupt(e.to_string())))?;
        self.store
            .set_marker(&format!("{STATE_PREFIX}{}", state.peer_url), &raw)
            .await?;
        Ok(())
    }
}

/// Current time in unix seconds.
pub fn now_secs() -> i64 {
    Timestamp::now().as_secs() as i64
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    InvalidUrl(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_normalised() {
        assert_eq!(
            normalize_peer_url(" wss://a.example/ ").unwrap(),
            "wss://a.example"
        );
        assert_eq!(
            normalize_peer_url("ws://127.0.0.1:7777/path/").unwrap(),
            "ws://127.0.0.1:7777/path/"
        );
        assert!(normalize_peer_url("https://a.example").is_err());
        assert!(normalize_peer_url("wss://").is_err());
        assert_eq!(
            parse_peer_list("wss://a, ,ws://b:1").unwrap(),
            vec!["wss://a".to_string(), "ws://b:1".to_string()]
        );
    }
}
