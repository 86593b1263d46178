//! The serving side both pull protocols share: the relay identity, NIP-98 peer authorization,
//! and answering a fetch (the events among requested ids) within a byte budget.

use std::time::Duration;

use nostr::{Event, EventId, JsonUtil, Keys, PublicKey};
use orly_acl::nip98::{self, ReplayCache};
use orly_db::SharedStore;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::OnceCell;

use crate::error::SyncError;
use crate::http::{HttpRequest, HttpResponse};
use crate::nip11::Nip11Cache;
use crate::peer::MAX_FETCH_IDS;

/// Bytes of events one fetch answer carries at most; the rest is flagged `more`.
pub const FETCH_BUDGET: usize = 16 * 1024 * 1024;
/// Largest response body a client reads (the budget plus one event at most).
pub const MAX_RESPONSE: usize = FETCH_BUDGET + 1024 * 1024;

/// The relay identity key, kept in the store (the NIP-11 `pubkey` of the relay).
#[derive(Clone)]
pub struct Identity {
    store: SharedStore,
    keys: std::sync::Arc<OnceCell<Keys>>,
}

impl Identity {
    pub fn new(store: SharedStore) -> Self {
        Self {
            store,
            keys: std::sync::Arc::new(OnceCell::new()),
        }
    }

    pub async fn keys(&self) -> Result<&Keys, SyncError> {
        self.keys
            .get_or_try_init(|| async {
                let secret = self.store.relay_identity_secret().await?;
                let sk = nostr::SecretKey::from_slice(&secret)
                    .map_err(|e| SyncError::Invalid(format!("stored identity key: {e}")))?;
                Ok::<_, SyncError>(Keys::new(sk))
            })
            .await
    }

    pub async fn pubkey(&self) -> Result<PublicKey, SyncError> {
        Ok(self.keys().await?.public_key())
    }
}

/// Checks a forwarded request's NIP-98 header and that its signer is the NIP-11 identity of one
/// of `peers`. `Err` is the answer to send: 401 for a missing or bad header, 403 for a signer
/// that is no peer's.
pub async fn authorize_peer(
    req: &HttpRequest,
    peers: &[String],
    nip11: &Nip11Cache,
) -> Result<PublicKey, HttpResponse> {
    authorize_peer_at(
        req,
        peers,
        nip11,
        nostr::Timestamp::now().as_secs(),
        ReplayCache::global(),
    )
    .await
}

/// [`authorize_peer`] at `now` with its own replay cache. A header is usable once: it is
/// claimed only after its signer proved to be a peer, so strangers cannot fill the cache.
pub async fn authorize_peer_at(
    req: &HttpRequest,
    peers: &[String],
    nip11: &Nip11Cache,
    now: u64,
    replay: &ReplayCache,
) -> Result<PublicKey, HttpResponse> {
    let refuse = |e: nip98::Nip98Error| {
        tracing::info!(path = %req.path, remote = %req.remote_addr, reason = %e, "sync request refused");
        HttpResponse::text(401, format!("Unauthorized: {e}"))
    };
    let auth = req.nip98_signer(now).map_err(refuse)?;
    let signer = auth.signer;
    let known = peers.iter().any(|p| nip11.cached(p) == Some(signer)) || {
        let lookups = futures::future::join_all(peers.iter().map(|p| nip11.pubkey(p))).await;
        lookups.iter().any(|r| r.as_ref().ok() == Some(&signer))
    };
    if !known {
        tracing::info!(path = %req.path, remote = %req.remote_addr, %signer, "sync request from an unknown peer refused");
        return Err(HttpResponse::text(403, "Unauthorized peer"));
    }
    replay.claim(&auth, now).map_err(refuse)?;
    Ok(signer)
}

/// Parses a JSON request body, or the 400 to answer.
pub fn parse_body<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, HttpResponse> {
    serde_json::from_slice(&req.body)
        .map_err(|e| HttpResponse::text(400, format!("Invalid request body: {e}")))
}

/// Hex ids from a request, at most [`MAX_FETCH_IDS`].
pub fn parse_ids(ids: &[String]) -> Result<Vec<EventId>, HttpResponse> {
    if ids.len() > MAX_FETCH_IDS {
        return Err(HttpResponse::text(
            400,
            format!("too many ids: {} (at most {MAX_FETCH_IDS})", ids.len()),
        ));
    }
    ids.iter()
        .map(|h| {
            EventId::from_hex(h)
                .map_err(|_| HttpResponse::text(400, format!("invalid event id {h:?}")))
        })
        .collect()
}

/// Events as they travel in a fetch answer.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct FetchedEvents {
    #[serde(default)]
    pub events: Vec<Box<RawValue>>,
    /// Some requested events did not fit the byte budget: ask again for the rest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// The stored events among `ids` that `keep` accepts, as JSON within [`FETCH_BUDGET`].
pub async fn fetch_events(
    store: &SharedStore,
    ids: &[EventId],
    keep: impl Fn(&Event) -> bool,
) -> Result<FetchedEvents, SyncError> {
    let mut out = FetchedEvents::default();
    let mut bytes = 0usize;
    for event in store.fetch_by_ids(ids).await? {
        if !keep(&event) {
            continue;
        }
        let json = event.as_json();
        if bytes + json.len() > FETCH_BUDGET && !out.events.is_empty() {
            out.more = true;
            break;
        }
        bytes += json.len();
        out.events.push(
            RawValue::from_string(json)
                .map_err(|e| SyncError::Invalid(format!("event JSON: {e}")))?,
        );
    }
    Ok(out)
}

/// Parses fetched events: each an object or (ORLY v0.24's form) a string holding one.
pub fn parse_fetched(peer: &str, raw: &[Box<RawValue>]) -> Result<Vec<Event>, SyncError> {
    raw.iter()
        .map(|r| {
            let text = r.get();
            let parsed = if text.starts_with('"') {
                serde_json::from_str::<String>(text)
                    .map_err(|e| e.to_string())
                    .and_then(|s| Event::from_json(s).map_err(|e| e.to_string()))
            } else {
                Event::from_json(text).map_err(|e| e.to_string())
            };
            parsed.map_err(|e| SyncError::garbage(peer, format!("malformed event: {e}")))
        })
        .collect()
}

/// Fetches `ids` from a peer through `call` (one request per round), following `more`.
pub async fn fetch_all<F, Fut>(
    peer: &str,
    ids: &[EventId],
    mut call: F,
) -> Result<Vec<Event>, SyncError>
where
    F: FnMut(Vec<EventId>) -> Fut,
    Fut: std::future::Future<Output = Result<FetchedEvents, SyncError>>,
{
    let mut out: Vec<Event> = Vec::with_capacity(ids.len());
    let mut pending: Vec<EventId> = ids.to_vec();
    loop {
        let answer = call(pending.clone()).await?;
        let got = parse_fetched(peer, &answer.events)?;
        if answer.more && got.is_empty() {
            return Err(SyncError::garbage(peer, "answered `more` without events"));
        }
        let got_ids: std::collections::HashSet<EventId> = got.iter().map(|e| e.id).collect();
        out.extend(got);
        if !answer.more {
            return Ok(out);
        }
        pending.retain(|id| !got_ids.contains(id));
        if pending.is_empty() {
            return Ok(out);
        }
    }
}

/// A deadline for calls to peers that must answer promptly.
pub fn clamp_wait(ms: Option<&str>, max: Duration) -> Duration {
    ms.and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::ZERO)
        .min(max)
}

/// Our latest serial for long polls (`after` + `wait`): answered at once when it exceeds
/// `after`, else as soon as a newer one is stored — noticed on the store's feed
/// ([`orly_db::EventStore::watch`]), which carries every replica's writes, or when told so
/// ([`SerialWatch::notify`], the `NotifyNewEvent` RPC). Nothing polls the store.
pub struct SerialWatch {
    store: SharedStore,
    latest: tokio::sync::watch::Sender<u64>,
    watcher: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set at shutdown: waiting polls are answered at once (a server stops only when its
    /// requests are done).
    closed: std::sync::atomic::AtomicBool,
    closing: tokio::sync::Notify,
}

impl SerialWatch {
    pub fn new(store: SharedStore) -> Self {
        Self {
            store,
            latest: tokio::sync::watch::channel(0).0,
            watcher: parking_lot::Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            closing: tokio::sync::Notify::new(),
        }
    }

    /// Answers every waiting poll now, and every later one at once.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.closing.notify_waiters();
    }

    /// A new event was stored under `serial`: wake the polls waiting for it.
    pub fn notify(&self, serial: u64) {
        self.latest.send_if_modified(|v| {
            let newer = serial > *v;
            if newer {
                *v = serial;
            }
            newer
        });
    }

    /// Our latest serial; with `after`, held up to `wait` until it exceeds `after`.
    pub async fn latest(&self, after: Option<u64>, wait: Duration) -> Result<u64, SyncError> {
        let now = self.store.latest_serial().await?;
        let Some(after) = after else { return Ok(now) };
        let closing = self.closing.notified();
        if now > after || wait.is_zero() || self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(now);
        }
        let mut rx = self.latest.subscribe();
        self.ensure_watcher(now);
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|s| *s > after)) => {}
            _ = closing => {}
        }
        drop(rx);
        Ok(self.store.latest_serial().await?)
    }

    /// Starts following the feed from `from` (once; again if the follower ended).
    fn ensure_watcher(&self, from: u64) {
        let mut watcher = self.watcher.lock();
        if watcher.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        self.notify(from);
        let mut feed = self.store.watch(from);
        let tx = self.latest.clone();
        *watcher = Some(tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(e) = feed.next().await {
                if e.serial == 0 {
                    continue;
                }
                tx.send_if_modified(|v| {
                    let newer = e.serial > *v;
                    if newer {
                        *v = e.serial;
                    }
                    newer
                });
            }
        }));
    }
}

impl Drop for SerialWatch {
    fn drop(&mut self) {
        if let Some(t) = self.watcher.lock().take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A relay whose NIP-11 document names `pubkey`, on every path: its base URL.
    async fn peer_named(pubkey: PublicKey) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = serde_json::json!({ "pubkey": pubkey.to_hex() }).to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let doc = doc.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/nostr+json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{doc}",
                        doc.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn request(method: &str, auth: Option<String>, body: &[u8]) -> HttpRequest {
        let mut headers =
            std::collections::BTreeMap::from([("host".into(), "relay.example".into())]);
        if let Some(a) = auth {
            headers.insert("authorization".into(), a);
        }
        HttpRequest {
            method: method.into(),
            path: "/api/sync/current".into(),
            headers,
            body: body.to_vec(),
            ..HttpRequest::default()
        }
    }

    #[tokio::test]
    async fn peer_requests_need_a_payload_tag_and_are_usable_once() {
        const URL: &str = "http://relay.example/api/sync/current";
        let peer = Keys::generate();
        let peers = vec![peer_named(peer.public_key()).await];
        let nip11 = Nip11Cache::new(Duration::from_secs(60), Duration::from_secs(5));
        let replay = ReplayCache::new(100);
        let now = nostr::Timestamp::now().as_secs();
        let body = br#"{"node_id":"x","relay_url":"http://peer"}"#;
        let check = |req: HttpRequest| {
            let (peers, nip11, replay) = (&peers, &nip11, &replay);
            async move { authorize_peer_at(&req, peers, nip11, now, replay).await }
        };
        let text = |r: HttpResponse| (r.status, String::from_utf8_lossy(&r.body).into_owned());

        let good = nip98::authorization_header(&peer, URL, "POST", Some(body), now);
        let ok = check(request("POST", Some(good.clone()), body)).await;
        assert_eq!(ok.map_err(text), Ok(peer.public_key()));

        // The same header again: refused as a replay.
        let (status, msg) = text(check(request("POST", Some(good), body)).await.unwrap_err());
        assert_eq!(status, 401, "{msg}");
        assert!(msg.contains("used before"), "{msg}");

        // Signed without a payload tag: the body is not covered.
        let bare = nip98::authorization_header(&peer, URL, "POST", None, now);
        let (status, msg) = text(check(request("POST", Some(bare), body)).await.unwrap_err());
        assert_eq!(status, 401, "{msg}");
        assert!(msg.contains("no payload tag"), "{msg}");

        // Signed for another body.
        let other = nip98::authorization_header(&peer, URL, "POST", Some(b"{}"), now);
        let (status, msg) = text(check(request("POST", Some(other), body)).await.unwrap_err());
        assert_eq!(status, 401, "{msg}");
        assert!(msg.contains("payload tag does not match"), "{msg}");

        // A stranger is refused and not remembered; a GET without a body needs no payload.
        let held = replay.len();
        let stranger = nip98::authorization_header(&Keys::generate(), URL, "POST", Some(body), now);
        let refused = check(request("POST", Some(stranger), body))
            .await
            .unwrap_err();
        assert_eq!(refused.status, 403);
        assert_eq!(replay.len(), held);
        let get = nip98::authorization_header(&peer, URL, "GET", None, now);
        let ok = check(request("GET", Some(get), b"")).await;
        assert_eq!(ok.map_err(text), Ok(peer.public_key()));
    }
}
