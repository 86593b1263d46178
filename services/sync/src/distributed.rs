//! Distributed sync (orly-sync-distributed): serial-based pull between peer relays.
//!
//! Serving: `POST /api/sync/current` answers our highest serial and `POST /api/sync/event-ids`
//! the ids in a serial range (at most [`MAX_RANGE`] serials per call) — or, given `ids`, those
//! events — to peers whose NIP-98 signer is the NIP-11 identity of a configured peer.
//! Pulling: every interval (or when woken) each peer whose lease this replica holds is asked
//! for its serial, and [`catch_up`](crate::peer::catch_up) pulls the range since the last
//! serial stored from it, which persists across restarts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nostr::{Event, EventId, PublicKey};
use orly_db::SharedStore;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineSettings, PeerEngine};
use crate::error::SyncError;
use crate::http::{normalize_http_url, HttpRequest, HttpResponse, PeerHttp};
use crate::nip11::Nip11Cache;
use crate::peer::{CatchupRules, Listed, Page, PeerSource, PeerStatus};
use crate::serve::{self, FetchedEvents};
use futures::future::BoxFuture;
use orly_peering::{FencedPeer, ShardOwner};

/// Most serials one `/api/sync/event-ids` call may span.
pub const MAX_RANGE: u64 = 10_000;
pub const PATH_CURRENT: &str = "/api/sync/current";
pub const PATH_EVENT_IDS: &str = "/api/sync/event-ids";
/// Store marker holding the peer list set by `UpdatePeers` (the relay group), JSON.
const DYNAMIC_PEERS: &str = "distributed:peers";
/// Longest a `/api/sync/current` long poll is held (below the relay's gRPC deadline plus
/// this, and common proxy idle timeouts).
pub const MAX_LONG_POLL: Duration = Duration::from_secs(25);

/// Settings of the distributed sync.
#[derive(Debug, Clone)]
pub struct DistributedSettings {
    /// Our public URL (`ORLY_RELAY_URL`): never a peer of ourselves.
    pub relay_url: Option<String>,
    /// `node_id` sent to peers (default: the identity pubkey, hex).
    pub node_id: Option<String>,
    /// Configured peers (http(s) base URLs); the relay group's list is added to them.
    pub peers: Vec<String>,
    pub interval: Duration,
    /// How long a pull waits at the peer for a new serial (ours: peers that cannot wait answer
    /// at once and are pulled every interval). 0: plain polling every interval.
    pub long_poll: Duration,
    pub nip11_ttl: Duration,
    /// Deadline of one request to a peer.
    pub timeout: Duration,
    pub lease_ttl: Duration,
    pub holder: String,
}

impl Default for DistributedSettings {
    fn default() -> Self {
        Self {
            relay_url: None,
            node_id: None,
            peers: Vec::new(),
            interval: Duration::from_secs(30),
            long_poll: MAX_LONG_POLL,
            nip11_ttl: Duration::from_secs(30 * 60),
            timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(15),
            holder: orly_peering::default_holder(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct CurrentRequest {
    #[serde(default)]
    pub node_id: String,
    #[serde(default)]
    pub relay_url: String,
    /// Ours: hold the answer until our serial exceeds `after`, up to `wait_ms` (at most
    /// [`MAX_LONG_POLL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CurrentResponse {
    pub node_id: String,
    pub relay_url: String,
    pub serial: u64,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct EventIdsRequest {
    #[serde(default)]
    pub node_id: String,
    #[serde(default)]
    pub relay_url: String,
    pub from: u64,
    pub to: u64,
    /// Ours: name ids to get those events back (in `events`) instead of the listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
}

/// (`events` and `more` are ours, for a request naming `ids`; not flattened from
/// [`FetchedEvents`] because serde cannot flatten raw JSON values.)
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct EventIdsResponse {
    #[serde(default)]
    pub event_map: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Box<serde_json::value::RawValue>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// The distributed sync of one relay (one replica of the service).
pub struct DistributedSync {
    engine: PeerEngine,
    settings: DistributedSettings,
}

impl std::fmt::Debug for DistributedSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedSync")
            .field("settings", &self.settings)
            .finish()
    }
}

impl DistributedSync {
    pub fn new(store: SharedStore, mut settings: DistributedSettings) -> Result<Arc<Self>, String> {
        settings.peers = settings
            .peers
            .iter()
            .map(|p| normalize_http_url(p))
            .collect::<Result<_, _>>()?;
        if let Some(u) = &settings.relay_url {
            settings.relay_url = Some(normalize_http_url(u)?);
        }
        if settings.interval.is_zero() || settings.lease_ttl < Duration::from_millis(300) {
            return Err("interval must be > 0 and the lease ttl at least 300ms".into());
        }
        settings.long_poll = settings.long_poll.min(MAX_LONG_POLL);
        let engine = PeerEngine::new(
            store,
            EngineSettings {
                ns: "distributed",
                nip11_ttl: settings.nip11_ttl,
                timeout: settings.timeout,
                long_poll: settings.long_poll,
                interval: settings.interval,
                lease_ttl: settings.lease_ttl,
                holder: settings.holder.clone(),
            },
        );
        Ok(Arc::new(Self { engine, settings }))
    }

    pub fn settings(&self) -> &DistributedSettings {
        &self.settings
    }

    pub fn nip11(&self) -> &Arc<Nip11Cache> {
        &self.engine.nip11
    }

    pub fn store(&self) -> &SharedStore {
        &self.engine.store
    }

    /// The peers this replica is pulling from now.
    pub fn owned_peers(&self) -> Vec<String> {
        self.engine.shard.owned()
    }

    /// Our `node_id`: the configured one, else the identity pubkey.
    pub async fn node_id(&self) -> Result<String, SyncError> {
        match &self.settings.node_id {
            Some(n) if !n.is_empty() => Ok(n.clone()),
            _ => Ok(self.engine.identity.pubkey().await?.to_hex()),
        }
    }

    pub fn relay_url(&self) -> String {
        self.settings.relay_url.clone().unwrap_or_default()
    }

    /// Configured peers plus the relay group's, without our own URL.
    pub async fn peers(&self) -> Result<Vec<String>, SyncError> {
        let mut peers = self.settings.peers.clone();
        if let Some(raw) = self.engine.store.get_marker(DYNAMIC_PEERS).await? {
            let dynamic: Vec<String> = serde_json::from_slice(&raw).unwrap_or_default();
            for p in dynamic {
                if !peers.contains(&p) {
                    peers.push(p);
                }
            }
        }
        let own = self.settings.relay_url.as_deref();
        peers.retain(|p| Some(p.as_str()) != own);
        peers.sort();
        Ok(peers)
    }

    /// Replaces the relay group's part of the peer list (`UpdatePeers`).
    pub async fn update_peers(&self, peers: &[String]) -> Result<(), SyncError> {
        let mut list: Vec<String> = Vec::new();
        for p in peers {
            let p = normalize_http_url(p).map_err(SyncError::Invalid)?;
            if !list.contains(&p) {
                list.push(p);
            }
        }
        list.sort();
        let raw = serde_json::to_vec(&list).map_err(|e| SyncError::Invalid(e.to_string()))?;
        self.engine.store.set_marker(DYNAMIC_PEERS, &raw).await?;
        tracing::info!(peers = list.len(), "distributed peer list updated");
        self.engine.shard.kick();
        self.engine.wake.notify_waiters();
        Ok(())
    }

    /// Does the relay at `peer_url` have the identity `expected`? (`IsAuthorizedPeer`)
    pub async fn is_authorized_peer(&self, peer_url: &str, expected: &str) -> bool {
        let Ok(url) = normalize_http_url(peer_url) else {
            return false;
        };
        match self.engine.nip11.pubkey(&url).await {
            Ok(pk) => pk.to_hex().eq_ignore_ascii_case(expected.trim()),
            Err(_) => false,
        }
    }

    /// The NIP-11 pubkey of a peer, hex ("" when unavailable).
    pub async fn peer_pubkey(&self, peer_url: &str) -> String {
        let Ok(url) = normalize_http_url(peer_url) else {
            return String::new();
        };
        self.engine
            .nip11
            .pubkey(&url)
            .await
            .map(|p| p.to_hex())
            .unwrap_or_default()
    }

    /// Our highest serial, always read from the store (a notification never moves it: a wrong
    /// one would send peers paging through serials that do not exist).
    pub async fn current_serial(&self) -> Result<u64, SyncError> {
        Ok(self.engine.store.latest_serial().await?)
    }

    /// `{hex id: serial}` of the events in `from..=to`.
    pub async fn event_ids(&self, from: u64, to: u64) -> Result<BTreeMap<String, u64>, SyncError> {
        check_range(from, to).map_err(SyncError::Invalid)?;
        let entries = self
            .engine
            .store
            .ids_by_serial_range(from.max(1), to, MAX_RANGE as u32)
            .await?;
        Ok(entries
            .into_iter()
            .map(|e| (e.id.to_hex(), e.serial))
            .collect())
    }

    /// The relay stored an event (`NotifyNewEvent`): peers long-polling us for a newer serial
    /// are answered now.
    pub fn notify_new_event(&self, serial: u64) {
        self.engine.latest.notify(serial);
    }

    /// Wakes every peer's pull now (`TriggerSync`).
    pub fn trigger(&self) {
        self.engine.wake.notify_waiters();
    }

    /// Peer states for `GetSyncStatus`.
    pub async fn peer_statuses(&self) -> Result<Vec<PeerStatus>, SyncError> {
        let mut out = Vec::new();
        for p in self.peers().await? {
            out.push(crate::peer::read_status(&self.engine.book, &p).await?);
        }
        Ok(out)
    }

    /// Starts sharing the peers with the other replicas and pulling from ours. False if running.
    pub fn start(self: &Arc<Self>) -> bool {
        self.engine.start(self.clone())
    }

    /// Stops pulling, answers held long polls and gives this replica's peers to the others.
    pub async fn stop(&self) {
        self.engine.stop().await;
    }

    /// `POST /api/sync/current` (HandleCurrentRequest).
    pub async fn handle_current(&self, req: &HttpRequest) -> HttpResponse {
        if let Err(resp) = self.authorize(req).await {
            return resp;
        }
        let body: CurrentRequest = match serve::parse_body(req) {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        if let Some(resp) = self.refuse_self(&body.node_id).await {
            return resp;
        }
        let wait = Duration::from_millis(body.wait_ms.unwrap_or(0)).min(MAX_LONG_POLL);
        let (node_id, serial) = match (
            self.node_id().await,
            self.engine.latest.latest(body.after, wait).await,
        ) {
            (Ok(n), Ok(s)) => (n, s),
            (Err(e), _) | (_, Err(e)) => return HttpResponse::text(500, e.to_string()),
        };
        HttpResponse::json(
            200,
            &CurrentResponse {
                node_id,
                relay_url: self.relay_url(),
                serial,
            },
        )
    }

    /// `POST /api/sync/event-ids` (HandleEventIDsRequest).
    pub async fn handle_event_ids(&self, req: &HttpRequest) -> HttpResponse {
        if let Err(resp) = self.authorize(req).await {
            return resp;
        }
        let body: EventIdsRequest = match serve::parse_body(req) {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        if let Some(resp) = self.refuse_self(&body.node_id).await {
            return resp;
        }
        if let Err(e) = check_range(body.from, body.to) {
            return HttpResponse::text(400, e);
        }
        let result = match &body.ids {
            Some(ids) => match serve::parse_ids(ids) {
                Ok(ids) => serve::fetch_events(&self.engine.store, &ids, |_| true)
                    .await
                    .map(|fetched| EventIdsResponse {
                        event_map: BTreeMap::new(),
                        events: fetched.events,
                        more: fetched.more,
                    }),
                Err(resp) => return resp,
            },
            None => self
                .event_ids(body.from, body.to)
                .await
                .map(|event_map| EventIdsResponse {
                    event_map,
                    ..EventIdsResponse::default()
                }),
        };
        match result {
            Ok(r) => HttpResponse::json(200, &r),
            Err(e) => HttpResponse::text(500, e.to_string()),
        }
    }

    async fn authorize(&self, req: &HttpRequest) -> Result<PublicKey, HttpResponse> {
        if !req.method.eq_ignore_ascii_case("POST") {
            return Err(HttpResponse::text(405, "Method not allowed"));
        }
        let peers = self
            .peers()
            .await
            .map_err(|e| HttpResponse::text(500, e.to_string()))?;
        serve::authorize_peer(req, &peers, &self.engine.nip11).await
    }

    async fn refuse_self(&self, node_id: &str) -> Option<HttpResponse> {
        let ours = self.node_id().await.ok()?;
        (!node_id.is_empty() && node_id.eq_ignore_ascii_case(&ours))
            .then(|| HttpResponse::text(400, "Cannot sync with self"))
    }

    /// One pull from `peer`: its serial (a long poll), then everything since the last one we
    /// stored, under the peer's lease (`Busy` while a worker holds it).
    pub async fn poll_peer(&self, peer: &str) -> Result<PeerStatus, SyncError> {
        self.engine
            .with_lease(peer, |fenced| async move {
                self.poll(&fenced).await.map(|(status, _)| status)
            })
            .await
    }

    async fn poll(&self, fenced: &FencedPeer) -> Result<(PeerStatus, bool), SyncError> {
        let source = DistributedSource {
            http: self.engine.http.clone(),
            keys: self.engine.identity.keys().await?.clone(),
            node_id: self.node_id().await?,
            relay_url: self.relay_url(),
            timeout: self.settings.timeout,
            long_poll: self.settings.long_poll,
        };
        self.engine
            .poll(fenced, &source, CatchupRules::default())
            .await
    }
}

#[async_trait]
impl ShardOwner for DistributedSync {
    async fn targets(&self) -> Result<Vec<String>, String> {
        self.peers().await.map_err(|e| e.to_string())
    }

    fn work(self: Arc<Self>, _peer: String, fenced: FencedPeer) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let sync = self.clone();
            self.engine
                .run_worker(|| {
                    let (sync, fenced) = (sync.clone(), fenced.clone());
                    async move { sync.poll(&fenced).await.map(|(_, progressed)| progressed) }
                })
                .await
        })
    }
}

fn check_range(from: u64, to: u64) -> Result<(), String> {
    if to < from {
        return Err(format!("bad serial range: from {from} is after to {to}"));
    }
    if to - from.max(1) >= MAX_RANGE {
        return Err(format!(
            "serial range {from}..={to} too large (at most {MAX_RANGE} serials per call)"
        ));
    }
    Ok(())
}

/// The client side of the distributed protocol.
pub struct DistributedSource {
    http: PeerHttp,
    keys: nostr::Keys,
    node_id: String,
    relay_url: String,
    timeout: Duration,
    long_poll: Duration,
}

impl DistributedSource {
    async fn event_ids(
        &self,
        peer: &str,
        from: u64,
        to: u64,
        ids: Option<Vec<String>>,
    ) -> Result<EventIdsResponse, SyncError> {
        let body = serde_json::to_vec(&EventIdsRequest {
            node_id: self.node_id.clone(),
            relay_url: self.relay_url.clone(),
            from,
            to,
            ids,
        })
        .map_err(|e| SyncError::Invalid(e.to_string()))?;
        self.http
            .json(
                "POST",
                &format!("{peer}{PATH_EVENT_IDS}"),
                Some(body),
                &self.keys,
                self.timeout,
            )
            .await
    }
}

#[async_trait]
impl PeerSource for DistributedSource {
    async fn latest(&self, peer: &str, after: u64) -> Result<u64, SyncError> {
        let waits = !self.long_poll.is_zero();
        let body = serde_json::to_vec(&CurrentRequest {
            node_id: self.node_id.clone(),
            relay_url: self.relay_url.clone(),
            after: waits.then_some(after),
            wait_ms: waits.then_some(self.long_poll.as_millis() as u64),
        })
        .map_err(|e| SyncError::Invalid(e.to_string()))?;
        let resp: CurrentResponse = self
            .http
            .json(
                "POST",
                &format!("{peer}{PATH_CURRENT}"),
                Some(body),
                &self.keys,
                self.timeout + self.long_poll,
            )
            .await?;
        Ok(resp.serial)
    }

    async fn list(&self, peer: &str, from: u64, to: u64) -> Result<Page, SyncError> {
        let end = to.min(from + MAX_RANGE - 1);
        let resp = self.event_ids(peer, from, end, None).await?;
        if resp.event_map.len() as u64 > end - from + 1 {
            return Err(SyncError::garbage(
                peer,
                "more ids than serials in the range",
            ));
        }
        let mut entries = resp
            .event_map
            .iter()
            .map(|(id, serial)| {
                EventId::from_hex(id)
                    .map(|id| Listed {
                        serial: *serial,
                        id,
                    })
                    .map_err(|_| SyncError::garbage(peer, format!("invalid event id {id:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|l| l.serial);
        Ok(Page { entries, end })
    }

    async fn fetch(
        &self,
        peer: &str,
        from: u64,
        to: u64,
        ids: &[EventId],
    ) -> Result<Vec<Event>, SyncError> {
        serve::fetch_all(peer, ids, |ids| async move {
            let hex = ids.iter().map(|i| i.to_hex()).collect();
            self.event_ids(peer, from, to, Some(hex))
                .await
                .map(|r| FetchedEvents {
                    events: r.events,
                    more: r.more,
                })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_ranges_are_checked() {
        assert!(check_range(1, 1).is_ok());
        assert!(check_range(0, 9_999).is_ok());
        assert!(check_range(1, 10_000).is_ok());
        assert!(check_range(1, 10_001).is_err());
        assert!(check_range(5, 4).is_err());
    }
}
