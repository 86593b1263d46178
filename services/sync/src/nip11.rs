//! Peer identities: the `pubkey` of a peer relay's NIP-11 document, cached per URL. A peer
//! signs its sync requests with that key (NIP-98), so this is how a request is tied to a
//! configured peer, and how our own URL is recognised in a peer list.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nostr::PublicKey;
use parking_lot::Mutex;

use crate::error::SyncError;
use crate::http::PeerHttp;

/// How long a failed lookup is remembered before the peer is asked again.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Largest NIP-11 document read.
const MAX_DOCUMENT: usize = 256 * 1024;

/// NIP-11 pubkeys by peer URL, each kept for the ttl (ORLY: 30 min).
pub struct Nip11Cache {
    http: PeerHttp,
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Option<PublicKey>)>>,
}

impl std::fmt::Debug for Nip11Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nip11Cache")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Nip11Cache {
    pub fn new(ttl: Duration, timeout: Duration) -> Self {
        Self {
            http: PeerHttp::new(timeout, MAX_DOCUMENT),
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The identity pubkey of the relay at `url` (an http(s) base URL).
    pub async fn pubkey(&self, url: &str) -> Result<PublicKey, SyncError> {
        if let Some((at, cached)) = self.entries.lock().get(url).copied() {
            let fresh = match cached {
                Some(_) => at.elapsed() < self.ttl,
                None => at.elapsed() < NEGATIVE_TTL,
            };
            if fresh {
                return cached
                    .ok_or_else(|| SyncError::peer(url, "NIP-11 document unavailable (cached)"));
            }
        }
        let result = self.fetch(url).await;
        self.entries.lock().insert(
            url.to_string(),
            (Instant::now(), result.as_ref().ok().copied()),
        );
        result
    }

    /// The cached pubkey of `url`, without asking the peer.
    pub fn cached(&self, url: &str) -> Option<PublicKey> {
        self.entries.lock().get(url).and_then(|(_, p)| *p)
    }

    /// Standard NIP-11 first (the base URL), then ORLY's `/.well-known/nostr.json`.
    async fn fetch(&self, url: &str) -> Result<PublicKey, SyncError> {
        let mut last = SyncError::peer(url, "no NIP-11 document");
        for target in [url.to_string(), format!("{url}/.well-known/nostr.json")] {
            match self.fetch_one(&target).await {
                Ok(pk) => return Ok(pk),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn fetch_one(&self, url: &str) -> Result<PublicKey, SyncError> {
        let (status, body) = self
            .http
            .send(
                "GET",
                url,
                &[("accept", "application/nostr+json")],
                None,
                None,
                self.http.timeout(),
            )
            .await?;
        if status != 200 {
            return Err(SyncError::peer(url, format!("NIP-11: HTTP {status}")));
        }
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| SyncError::garbage(url, format!("NIP-11 is not JSON: {e}")))?;
        let hex = doc
            .get("pubkey")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| SyncError::garbage(url, "NIP-11 document has no pubkey"))?;
        PublicKey::from_hex(&hex.to_ascii_lowercase())
            .map_err(|e| SyncError::garbage(url, format!("NIP-11 pubkey: {e}")))
    }
}
