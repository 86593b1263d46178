//! Peers and their sync state, kept as store markers (the shared [`orly_peering::PeerBook`],
//! namespace `negentropy`) so every replica (and a restarted one) sees the same list:
//! `negentropy:peer:<url>` marks a peer, `negentropy:state:<url>` holds its [`PeerState`] as
//! JSON, `negentropy:windows:<url>` its window plan ([`crate::windows`]). The per-peer sync
//! lease is named `negentropy:sync:<url>`.

use orly_db::{SharedStore, StoreError};
use serde::{Deserialize, Serialize};

use crate::windows::KIND_WINDOWS;

/// Store namespace of the negentropy peers.
pub const NS: &str = "negentropy";
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
    /// Of the last successful pass: windows in the peer's plan, windows reconciled.
    pub windows: i64,
    pub windows_reconciled: i64,
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

/// The peer list and per-peer state: the shared book, with our URL rules and state type.
#[derive(Clone, Debug)]
pub struct Peers {
    book: orly_peering::PeerBook,
}

impl Peers {
    pub fn new(store: SharedStore) -> Self {
        Self {
            book: orly_peering::PeerBook::new(store, NS).with_lease_prefix(LEASE_PREFIX),
        }
    }

    /// The shared book underneath (leases, fenced writes).
    pub fn book(&self) -> &orly_peering::PeerBook {
        &self.book
    }

    /// Adds a peer (idempotent); returns its normalised URL.
    pub async fn add(&self, url: &str) -> Result<String, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        self.book.add(&url).await?;
        Ok(url)
    }

    /// Removes a peer, its state and its windows. False if it was not a peer.
    pub async fn remove(&self, url: &str) -> Result<bool, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        Ok(self.book.remove(&url, &[KIND_WINDOWS]).await?)
    }

    /// Every peer, sorted.
    pub async fn list(&self) -> Result<Vec<String>, PeerError> {
        Ok(self.book.list().await?)
    }

    pub async fn is_peer(&self, url: &str) -> Result<bool, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        Ok(self.book.contains(&url).await?)
    }

    /// The stored state of a peer.
    pub async fn state(&self, url: &str) -> Result<Option<PeerState>, PeerError> {
        let url = normalize_peer_url(url).map_err(PeerError::InvalidUrl)?;
        Ok(self.book.state(&url).await?)
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
