//! Cluster sync (orly-sync-cluster): every member relay replicates every other member.
//!
//! Membership is the newest kind-39108 event by a cluster admin (`["relay", <http URL>, <ws
//! URL>]` tags); it is applied when the relay hands it over (HandleMembershipEvent) and
//! re-read from the store every round, so a membership published on any member — and
//! replicated — takes effect everywhere without restarts.
//!
//! Serving: `GET /cluster/latest` and `GET /cluster/events?from&to&limit` (ORLY's shapes); ours
//! on top: `after` + `wait` (ms) make `/cluster/latest` a long poll answered the moment a newer
//! serial is stored, and `POST /cluster/events {"ids":[…]}` returns those events. Requests are
//! NIP-98 signed by a member's identity (unsigned ORLY-style requests only with
//! `allow_unauthenticated`). Privileged kinds are left out unless propagation is on.
//!
//! State: `cluster:members` (the member list), `cluster:peer:<url>` (the last serial from a
//! member, 8 bytes big-endian as ORLY keeps it), `cluster:state:<url>` (status JSON),
//! `cluster:membership` (the membership event applied last).
//!
//! Pulling: one worker per member this replica holds the lease of long-polls the member and
//! catches up whatever it stored since the last serial we have from it, so a new event reaches
//! the other members within one round trip (p50 a few ms on loopback) and a member that was away
//! catches up from its persisted serial.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nostr::{Event, EventId, Filter, Kind, PublicKey};
use orly_db::SharedStore;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineSettings, PeerEngine};
use crate::error::SyncError;
use crate::http::{normalize_http_url, to_ws_url, HttpRequest, HttpResponse, PeerHttp};
use crate::nip11::Nip11Cache;
use crate::peer::{read_status, CatchupRules, Listed, Page, PeerSource, PeerStatus, STATUS_ACTIVE};
use crate::serve::{self, FetchedEvents};
use futures::future::BoxFuture;
use orly_peering::{FencedPeer, ShardOwner};

pub const KIND_MEMBERSHIP: u16 = 39108;
pub const PATH_LATEST: &str = "/cluster/latest";
pub const PATH_EVENTS: &str = "/cluster/events";
/// Listing page size: default and largest (ORLY's).
pub const DEFAULT_LIMIT: u32 = 1000;
pub const MAX_LIMIT: u32 = 10_000;
/// Longest a `/cluster/latest` long poll is held (below the relay's gRPC deadline).
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// Most members a membership event may list.
pub const MAX_MEMBERS: usize = 1000;
/// Store marker of the membership event applied last: JSON {id, created_at}.
const APPLIED: &str = "cluster:membership";
/// Store marker of the member list (JSON array of http URLs). Kept apart from the per-member
/// serial markers so that a poll finishing after its member was removed cannot bring it back.
const MEMBERS: &str = "cluster:members";

/// Settings of the cluster sync.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Who may publish membership (kind 39108).
    pub admins: Vec<PublicKey>,
    /// Replicate privileged kinds (DMs, gift wraps, …) to and from members.
    pub propagate_privileged: bool,
    /// Our public URL: never a member of ourselves.
    pub relay_url: Option<String>,
    /// Pause after a failed poll, and between polls of members that cannot long-poll.
    pub poll_interval: Duration,
    /// How long a poll waits at the member for a new serial.
    pub long_poll: Duration,
    pub nip11_ttl: Duration,
    pub timeout: Duration,
    pub lease_ttl: Duration,
    pub holder: String,
    /// Answer unsigned requests (ORLY members send none).
    pub allow_unauthenticated: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            admins: Vec::new(),
            propagate_privileged: true,
            relay_url: None,
            poll_interval: Duration::from_secs(5),
            long_poll: MAX_WAIT,
            nip11_ttl: Duration::from_secs(30 * 60),
            timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(15),
            holder: orly_peering::default_holder(),
            allow_unauthenticated: false,
        }
    }
}

/// One member of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    pub http_url: String,
    pub websocket_url: String,
    pub last_serial: u64,
    pub last_poll: i64,
    pub status: String,
    pub error_count: i32,
}

impl From<PeerStatus> for ClusterMember {
    fn from(s: PeerStatus) -> Self {
        Self {
            websocket_url: to_ws_url(&s.url),
            http_url: s.url,
            last_serial: s.last_serial,
            last_poll: s.last_poll,
            status: s.status,
            error_count: s.error_count,
        }
    }
}

/// Everything `GetClusterStatus` reports.
#[derive(Debug, Clone, Default)]
pub struct ClusterStatus {
    pub latest_serial: u64,
    pub active_members: i32,
    pub total_members: i32,
    pub propagate_privileged_events: bool,
    pub members: Vec<ClusterMember>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LatestResponse {
    pub serial: u64,
    pub timestamp: i64,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct EventInfo {
    pub serial: u64,
    pub id: String,
    pub timestamp: i64,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct EventsResponse {
    #[serde(default)]
    pub events: Vec<EventInfo>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub next_from: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Serialize, Deserialize)]
struct FetchRequest {
    ids: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Applied {
    id: String,
    created_at: u64,
}

/// The members named by a membership event (http URL, ws URL), or why it is malformed.
pub fn parse_membership(event: &Event) -> Result<Vec<(String, String)>, String> {
    if event.kind != Kind::from(KIND_MEMBERSHIP) {
        return Err(format!("kind {} is not a membership event", event.kind));
    }
    let mut members: Vec<(String, String)> = Vec::new();
    for tag in event.tags.iter() {
        let values = tag.as_slice();
        if values.first().map(String::as_str) != Some("relay") {
            continue;
        }
        let http = values
            .get(1)
            .ok_or("a relay tag without a URL")
            .and_then(|u| normalize_http_url(u).map_err(|_| "a relay tag with an invalid URL"))?;
        let ws = match values.get(2).filter(|w| !w.is_empty()) {
            Some(w) => to_ws_url(&normalize_http_url(w).map_err(|e| format!("relay tag: {e}"))?),
            None => to_ws_url(&http),
        };
        if !members.iter().any(|(h, _)| *h == http) {
            members.push((http, ws));
        }
    }
    if members.is_empty() {
        return Err("membership event has no relay tags".into());
    }
    if members.len() > MAX_MEMBERS {
        return Err(format!("membership lists more than {MAX_MEMBERS} relays"));
    }
    Ok(members)
}

/// Is `a` newer than `b` (created_at, then the smaller id, as for replaceable events)?
fn newer(a: (u64, &str), b: (u64, &str)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// The cluster sync of one relay (one replica of the service).
pub struct ClusterSync {
    engine: PeerEngine,
    settings: ClusterSettings,
}

impl std::fmt::Debug for ClusterSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSync")
            .field("settings", &self.settings)
            .finish()
    }
}

impl ClusterSync {
    pub fn new(store: SharedStore, mut settings: ClusterSettings) -> Result<Arc<Self>, String> {
        if let Some(u) = &settings.relay_url {
            settings.relay_url = Some(normalize_http_url(u)?);
        }
        if settings.poll_interval.is_zero() || settings.lease_ttl < Duration::from_millis(300) {
            return Err("poll interval must be > 0 and the lease ttl at least 300ms".into());
        }
        settings.long_poll = settings.long_poll.min(MAX_WAIT);
        let engine = PeerEngine::new(
            store,
            EngineSettings {
                ns: "cluster",
                nip11_ttl: settings.nip11_ttl,
                timeout: settings.timeout,
                long_poll: settings.long_poll,
                interval: settings.poll_interval,
                lease_ttl: settings.lease_ttl,
                holder: settings.holder.clone(),
            },
        );
        Ok(Arc::new(Self { engine, settings }))
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn store(&self) -> &SharedStore {
        &self.engine.store
    }

    pub fn nip11(&self) -> &Arc<Nip11Cache> {
        &self.engine.nip11
    }

    /// The members this replica is replicating now.
    pub fn owned_members(&self) -> Vec<String> {
        self.engine.shard.owned()
    }

    pub fn is_admin(&self, pk: &PublicKey) -> bool {
        self.settings.admins.contains(pk)
    }

    /// Member URLs (without ourselves), sorted.
    pub async fn member_urls(&self) -> Result<Vec<String>, SyncError> {
        let own = self.settings.relay_url.as_deref();
        let mut urls = self.stored_members().await?;
        urls.retain(|u| Some(u.as_str()) != own);
        Ok(urls)
    }

    async fn stored_members(&self) -> Result<Vec<String>, SyncError> {
        Ok(match self.engine.store.get_marker(MEMBERS).await? {
            Some(raw) => serde_json::from_slice(&raw).map_err(|e| {
                SyncError::Store(orly_db::StoreError::Corrupt(format!("member list: {e}")))
            })?,
            None => Vec::new(),
        })
    }

    pub async fn members(&self) -> Result<Vec<ClusterMember>, SyncError> {
        let mut out = Vec::new();
        for url in self.member_urls().await? {
            out.push(read_status(&self.engine.book, &url).await?.into());
        }
        Ok(out)
    }

    pub async fn member(&self, http_url: &str) -> Result<Option<ClusterMember>, SyncError> {
        let url = normalize_http_url(http_url).map_err(SyncError::Invalid)?;
        if !self.member_urls().await?.contains(&url) {
            return Ok(None);
        }
        Ok(Some(read_status(&self.engine.book, &url).await?.into()))
    }

    pub async fn status(&self) -> Result<ClusterStatus, SyncError> {
        let members = self.members().await?;
        Ok(ClusterStatus {
            latest_serial: self.engine.store.latest_serial().await?,
            active_members: members.iter().filter(|m| m.status == STATUS_ACTIVE).count() as i32,
            total_members: members.len() as i32,
            propagate_privileged_events: self.settings.propagate_privileged,
            members,
        })
    }

    /// Sets the member list (`UpdateMembership`): members not in `urls` are dropped with
    /// their state, new ones start from serial 0.
    pub async fn update_membership(&self, urls: &[String]) -> Result<(), SyncError> {
        let mut wanted: Vec<String> = Vec::new();
        for u in urls {
            let u = normalize_http_url(u).map_err(SyncError::Invalid)?;
            if Some(u.as_str()) != self.settings.relay_url.as_deref() && !wanted.contains(&u) {
                wanted.push(u);
            }
        }
        wanted.sort();
        let current = self.stored_members().await?;
        for new in wanted.iter().filter(|u| !current.contains(u)) {
            self.engine.book.set_last_serial(new, 0).await?;
            tracing::info!(member = %new, "cluster member added");
        }
        let list = serde_json::to_vec(&wanted).map_err(|e| SyncError::Invalid(e.to_string()))?;
        self.engine.store.set_marker(MEMBERS, &list).await?;
        for gone in current.iter().filter(|u| !wanted.contains(u)) {
            self.engine.book.remove(gone, &[]).await?;
            tracing::info!(member = %gone, "cluster member removed");
        }
        self.engine.shard.kick();
        self.engine.wake.notify_waiters();
        Ok(())
    }

    /// A membership event (HandleMembershipEvent): `Err(Invalid)` for a malformed one by an
    /// admin — the relay refuses it; ignored if not by an admin or older than the one applied.
    pub async fn handle_membership_event(&self, event: &Event) -> Result<bool, SyncError> {
        if event.kind != Kind::from(KIND_MEMBERSHIP) {
            return Err(SyncError::Invalid(format!(
                "kind {} is not a membership event",
                event.kind
            )));
        }
        if !self.is_admin(&event.pubkey) {
            tracing::debug!(author = %event.pubkey, "membership event by a non-admin ignored");
            return Ok(false);
        }
        let members = parse_membership(event).map_err(SyncError::Invalid)?;
        if event.verify().is_err() {
            return Err(SyncError::Invalid(
                "membership event has a bad signature".into(),
            ));
        }
        let id = event.id.to_hex();
        if let Some(raw) = self.engine.store.get_marker(APPLIED).await? {
            if let Ok(applied) = serde_json::from_slice::<Applied>(&raw) {
                if !newer(
                    (event.created_at.as_secs(), &id),
                    (applied.created_at, &applied.id),
                ) {
                    return Ok(false);
                }
            }
        }
        let urls: Vec<String> = members.into_iter().map(|(h, _)| h).collect();
        self.update_membership(&urls).await?;
        let applied = serde_json::to_vec(&Applied {
            id,
            created_at: event.created_at.as_secs(),
        })
        .map_err(|e| SyncError::Invalid(e.to_string()))?;
        self.engine.store.set_marker(APPLIED, &applied).await?;
        tracing::info!(members = urls.len(), event_id = %event.id, "cluster membership applied");
        Ok(true)
    }

    /// Applies the newest valid membership by an admin found in the store (at start, and every
    /// round, so replicated memberships apply too).
    pub async fn refresh_membership(&self) -> Result<(), SyncError> {
        if self.settings.admins.is_empty() {
            return Ok(());
        }
        let filter = Filter::new()
            .kind(Kind::from(KIND_MEMBERSHIP))
            .authors(self.settings.admins.clone())
            .limit(20);
        let mut events = self.engine.store.query(&[filter]).await?;
        events.retain(|e| parse_membership(e).is_ok());
        if let Some(newest) = events.iter().min_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.to_hex().cmp(&b.id.to_hex()))
        }) {
            self.handle_membership_event(newest).await?;
        }
        Ok(())
    }

    /// Our latest serial; with `after`, held up to `wait` until it exceeds `after`.
    pub async fn latest_serial(
        &self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<u64, SyncError> {
        self.engine.latest.latest(after, wait).await
    }

    /// Entries with serial in `from..=to`, at most `limit` (GetEventsInRange).
    pub async fn events_in_range(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<EventsResponse, SyncError> {
        if to < from {
            return Err(SyncError::Invalid(format!(
                "bad serial range: from {from} is after to {to}"
            )));
        }
        let limit = match limit {
            0 => DEFAULT_LIMIT,
            l => l.min(MAX_LIMIT),
        };
        let entries = self
            .engine
            .store
            .ids_by_serial_range(from.max(1), to, limit)
            .await?;
        let last = entries.last().map(|e| e.serial);
        let has_more = entries.len() as u32 == limit && last.is_some_and(|s| s < to);
        let next_from = if has_more { last.unwrap_or(0) + 1 } else { 0 };
        let events = entries
            .into_iter()
            .filter(|e| {
                self.settings.propagate_privileged
                    || !orly_acl::privileged::is_privileged(Kind::from(e.kind))
            })
            .map(|e| EventInfo {
                serial: e.serial,
                id: e.id.to_hex(),
                timestamp: e.created_at.as_secs() as i64,
            })
            .collect();
        Ok(EventsResponse {
            events,
            has_more,
            next_from,
        })
    }

    /// `GET /cluster/latest` (HandleLatestSerial).
    pub async fn handle_latest(&self, req: &HttpRequest) -> HttpResponse {
        if !req.method.eq_ignore_ascii_case("GET") {
            return HttpResponse::text(405, "Method not allowed");
        }
        if let Some(resp) = self.guard(req).await {
            return resp;
        }
        let after = match req.query("after").map(str::parse::<u64>) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(_)) => return HttpResponse::text(400, "invalid after"),
        };
        let wait = serve::clamp_wait(req.query("wait"), MAX_WAIT);
        match self.latest_serial(after, wait).await {
            Ok(serial) => HttpResponse::json(
                200,
                &LatestResponse {
                    serial,
                    timestamp: nostr::Timestamp::now().as_secs() as i64,
                },
            ),
            Err(e) => HttpResponse::text(500, e.to_string()),
        }
    }

    /// `GET /cluster/events` (listing) and `POST /cluster/events` (fetch) (HandleEventsRange).
    pub async fn handle_events(&self, req: &HttpRequest) -> HttpResponse {
        let post = req.method.eq_ignore_ascii_case("POST");
        if !post && !req.method.eq_ignore_ascii_case("GET") {
            return HttpResponse::text(405, "Method not allowed");
        }
        if let Some(resp) = self.guard(req).await {
            return resp;
        }
        if post {
            let body: FetchRequest = match serve::parse_body(req) {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let ids = match serve::parse_ids(&body.ids) {
                Ok(ids) => ids,
                Err(resp) => return resp,
            };
            let privileged = self.settings.propagate_privileged;
            return match serve::fetch_events(&self.engine.store, &ids, |e| {
                privileged || !orly_acl::privileged::is_privileged(e.kind)
            })
            .await
            {
                Ok(f) => HttpResponse::json(200, &f),
                Err(e) => HttpResponse::text(500, e.to_string()),
            };
        }
        let num = |name: &str| -> Result<Option<u64>, HttpResponse> {
            match req.query(name) {
                None | Some("") => Ok(None),
                Some(v) => v
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| HttpResponse::text(400, format!("invalid {name}: {v:?}"))),
            }
        };
        let (from, to, limit) = match (num("from"), num("to"), num("limit")) {
            (Ok(f), Ok(t), Ok(l)) => (f.unwrap_or(1), t, l.unwrap_or(0)),
            (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
        };
        let to = match to {
            Some(t) => t,
            None => match self.engine.store.latest_serial().await {
                Ok(s) => s,
                Err(e) => return HttpResponse::text(500, e.to_string()),
            },
        };
        match self
            .events_in_range(from, to, u32::try_from(limit).unwrap_or(MAX_LIMIT))
            .await
        {
            Ok(r) => HttpResponse::json(200, &r),
            Err(SyncError::Invalid(m)) => HttpResponse::text(400, m),
            Err(e) => HttpResponse::text(500, e.to_string()),
        }
    }

    /// Self requests (Origin/Referer naming us) and unauthorized callers are refused.
    async fn guard(&self, req: &HttpRequest) -> Option<HttpResponse> {
        if let Some(own) = &self.settings.relay_url {
            for h in ["origin", "referer"] {
                if let Some(v) = req.header(h).and_then(|v| normalize_http_url(v).ok()) {
                    if &v == own {
                        return Some(HttpResponse::text(400, "Cannot sync with self"));
                    }
                }
            }
        }
        if self.settings.allow_unauthenticated && req.header("authorization").is_none() {
            return None;
        }
        let members = match self.member_urls().await {
            Ok(m) => m,
            Err(e) => return Some(HttpResponse::text(500, e.to_string())),
        };
        serve::authorize_peer(req, &members, &self.engine.nip11)
            .await
            .err()
    }

    /// Starts replicating the members whose lease this replica takes. False if running.
    pub fn start(self: &Arc<Self>) -> bool {
        self.engine.start(self.clone())
    }

    pub fn is_running(&self) -> bool {
        self.engine.is_running()
    }

    /// Stops replicating, answers held long polls and gives this replica's members back.
    pub async fn stop(&self) {
        self.engine.stop().await;
    }

    /// One poll of a member: wait for a new serial, then catch up, under the member's lease
    /// (`Busy` while a worker holds it). True if anything was new.
    pub async fn poll_member(&self, member: &str) -> Result<bool, SyncError> {
        self.engine
            .with_lease(member, |fenced| async move { self.poll(&fenced).await })
            .await
    }

    async fn poll(&self, fenced: &FencedPeer) -> Result<bool, SyncError> {
        let source = ClusterSource {
            http: self.engine.http.clone(),
            keys: self.engine.identity.keys().await?.clone(),
            long_poll: self.settings.long_poll,
            timeout: self.settings.timeout,
        };
        let rules = CatchupRules {
            keep_privileged: self.settings.propagate_privileged,
            ..CatchupRules::default()
        };
        self.engine
            .poll(fenced, &source, rules)
            .await
            .map(|(_, progressed)| progressed)
    }
}

#[async_trait]
impl ShardOwner for ClusterSync {
    async fn targets(&self) -> Result<Vec<String>, String> {
        if let Err(e) = self.refresh_membership().await {
            tracing::warn!(error = %e, "cannot re-read the cluster membership");
        }
        self.member_urls().await.map_err(|e| e.to_string())
    }

    fn work(self: Arc<Self>, _member: String, fenced: FencedPeer) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let sync = self.clone();
            self.engine
                .run_worker(|| {
                    let (sync, fenced) = (sync.clone(), fenced.clone());
                    async move { sync.poll(&fenced).await }
                })
                .await
        })
    }
}

/// The client side of the cluster protocol.
pub struct ClusterSource {
    http: PeerHttp,
    keys: nostr::Keys,
    long_poll: Duration,
    timeout: Duration,
}

#[async_trait]
impl PeerSource for ClusterSource {
    async fn latest(&self, peer: &str, after: u64) -> Result<u64, SyncError> {
        let url = format!(
            "{peer}{PATH_LATEST}?after={after}&wait={}",
            self.long_poll.as_millis()
        );
        let resp: LatestResponse = self
            .http
            .json("GET", &url, None, &self.keys, self.timeout + self.long_poll)
            .await?;
        Ok(resp.serial)
    }

    async fn list(&self, peer: &str, from: u64, to: u64) -> Result<Page, SyncError> {
        // The largest page ORLY's servers allow too: fewer rounds when catching up.
        let url = format!("{peer}{PATH_EVENTS}?from={from}&to={to}&limit={MAX_LIMIT}");
        let resp: EventsResponse = self
            .http
            .json("GET", &url, None, &self.keys, self.timeout)
            .await?;
        if resp.events.len() > MAX_LIMIT as usize {
            return Err(SyncError::garbage(peer, "page larger than the limit"));
        }
        let end = if resp.has_more {
            // `to` may be u64::MAX (what the peer announced): no `to + 1`.
            if resp.next_from <= from || resp.next_from - 1 > to {
                return Err(SyncError::garbage(
                    peer,
                    format!("next_from {} outside {from}..={to}", resp.next_from),
                ));
            }
            resp.next_from - 1
        } else {
            to
        };
        let entries = resp
            .events
            .iter()
            .map(|e| {
                EventId::from_hex(&e.id)
                    .map(|id| Listed {
                        serial: e.serial,
                        id,
                    })
                    .map_err(|_| SyncError::garbage(peer, format!("invalid event id {:?}", e.id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page { entries, end })
    }

    async fn fetch(
        &self,
        peer: &str,
        _from: u64,
        _to: u64,
        ids: &[EventId],
    ) -> Result<Vec<Event>, SyncError> {
        let url = format!("{peer}{PATH_EVENTS}");
        serve::fetch_all(peer, ids, |ids| {
            let url = url.clone();
            async move {
                let body = serde_json::to_vec(&FetchRequest {
                    ids: ids.iter().map(|i| i.to_hex()).collect(),
                })
                .map_err(|e| SyncError::Invalid(e.to_string()))?;
                self.http
                    .json::<FetchedEvents>("POST", &url, Some(body), &self.keys, self.timeout)
                    .await
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Tag};

    fn membership(keys: &Keys, tags: Vec<Vec<&str>>) -> Event {
        EventBuilder::new(Kind::from(KIND_MEMBERSHIP), r#"{"name":"c"}"#)
            .tags(tags.into_iter().map(|t| Tag::parse(t).unwrap()))
            .sign_with_keys(keys)
            .unwrap()
    }

    #[test]
    fn membership_events_are_parsed_or_refused() {
        let k = Keys::generate();
        let ok = membership(
            &k,
            vec![
                vec!["d", "membership"],
                vec!["relay", "https://a.example/", "wss://a.example"],
                vec!["relay", "ws://b:1"],
                vec!["relay", "https://a.example"],
                vec!["version", "1"],
            ],
        );
        assert_eq!(
            parse_membership(&ok).unwrap(),
            vec![
                ("https://a.example".into(), "wss://a.example".into()),
                ("http://b:1".into(), "ws://b:1".into())
            ]
        );
        assert!(parse_membership(&membership(&k, vec![vec!["d", "membership"]])).is_err());
        assert!(parse_membership(&membership(&k, vec![vec!["relay"]])).is_err());
        assert!(parse_membership(&membership(&k, vec![vec!["relay", "not a url"]])).is_err());
    }

    #[test]
    fn newer_breaks_ties_by_the_smaller_id() {
        assert!(newer((2, "b"), (1, "a")));
        assert!(newer((1, "a"), (1, "b")));
        assert!(!newer((1, "b"), (1, "a")));
        assert!(!newer((1, "a"), (1, "a")));
    }
}
