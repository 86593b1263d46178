//! A peer's HTTP answers to the distributed sync (`POST /api/sync/current`,
//! `POST /api/sync/event-ids`) and the cluster sync (`GET /cluster/latest`,
//! `GET /cluster/events`, `POST /cluster/events`), and its NIP-11 document: a scripted fake peer
//! on a loopback socket answers `DistributedSync::poll_peer` / `ClusterSync::poll_member` with
//! whatever a case says. The promises checked by the property tests
//! (`services/sync/tests/fuzz_answers.rs`) and the cargo-fuzz target `peer_sync`, which include
//! this file. Each function panics only when a promise is broken.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nostr::{Event, EventId, JsonUtil};
use orly_db::sqlite::SqliteStore;
use orly_db::SharedStore;
use orly_sync::cluster::{ClusterSettings, ClusterSync};
use orly_sync::distributed::{DistributedSettings, DistributedSync};
use orly_sync::SyncError;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Requests a fake peer answers per poll; later ones get 503 (a hostile peer could otherwise
/// keep a poll paging forever, each page a request).
pub const REQUEST_BUDGET: usize = 12;

/// Which pull protocol a case talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Distributed,
    Cluster,
}

/// One answer of the fake peer: a status and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            body: body.into(),
        }
    }

    pub fn json(v: &Value) -> Self {
        Self::ok(v.to_string())
    }
}

/// What the fake peer answers, the same every time it is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// NIP-11 (`GET /` and `GET /.well-known/nostr.json`).
    pub nip11: Answer,
    /// The peer's latest serial.
    pub latest: Answer,
    /// The listing of a serial range.
    pub list: Answer,
    /// The events asked for by id.
    pub fetch: Answer,
}

/// One request the fake peer received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// What a poll did.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<(), SyncError>,
    pub requests: Vec<Request>,
    /// Events of the fetch answer the poll stored (in the store after it, not before).
    pub stored: Vec<EventId>,
}

/// Two syncs (distributed, cluster) over one SQLite store, and a runtime to drive them.
pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub store: SharedStore,
    pub distributed: Arc<DistributedSync>,
    pub cluster: Arc<ClusterSync>,
    /// Our identity (hex): a peer whose NIP-11 names it is ourselves.
    pub pubkey: String,
    _dir: tempfile::TempDir,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temporary directory");
        let (store, distributed, cluster, pubkey) = rt.block_on(async {
            let store: SharedStore = Arc::new(
                SqliteStore::open(&dir.path().join("fuzz.db"))
                    .await
                    .expect("store"),
            );
            let timeout = Duration::from_secs(5);
            let distributed = DistributedSync::new(
                store.clone(),
                DistributedSettings {
                    long_poll: Duration::ZERO,
                    timeout,
                    ..DistributedSettings::default()
                },
            )
            .expect("distributed sync");
            let cluster = ClusterSync::new(
                store.clone(),
                ClusterSettings {
                    long_poll: Duration::ZERO,
                    timeout,
                    ..ClusterSettings::default()
                },
            )
            .expect("cluster sync");
            let pubkey = distributed.node_id().await.expect("identity");
            (store, distributed, cluster, pubkey)
        });
        Fixture {
            rt,
            store,
            distributed,
            cluster,
            pubkey,
            _dir: dir,
        }
    })
}

/// Arbitrary bytes as a peer's answers: bit 0 of the first byte picks the protocol, bits 1 to
/// 4 turn the NIP-11, latest, list and fetch answers into HTTP 500s; the rest is the four
/// bodies in that order, each prefixed with its length (two bytes, big-endian).
pub fn peer_sync(data: &[u8]) {
    let Some((&head, mut rest)) = data.split_first() else {
        return;
    };
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let n = match rest {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])).min(rest.len() - 2),
            _ => 0,
        };
        let skip = rest.len().min(2);
        bodies.push(rest[skip..skip + n].to_vec());
        rest = &rest[skip + n..];
    }
    let answer = |i: usize| Answer {
        status: if head & (2 << i) != 0 { 500 } else { 200 },
        body: bodies[i].clone(),
    };
    let protocol = if head & 1 == 0 {
        Protocol::Distributed
    } else {
        Protocol::Cluster
    };
    let script = Script {
        nip11: answer(0),
        latest: answer(1),
        list: answer(2),
        fetch: answer(3),
    };
    let _ = poll(protocol, &script);
}

/// Polls a fake peer answering `script` once, and checks that
/// - an error is a sync error with its NIP-01 prefix (`invalid: ` for a peer answering
///   garbage, `error: ` for one that failed);
/// - every sync request carries a NIP-98 `Authorization` header, and the peer is asked at
///   most [`REQUEST_BUDGET`] + 1 times (after which it answers 503);
/// - an event of the fetch answer is stored by the poll only if it verifies and was listed;
/// - a peer whose NIP-11 names our own identity is never asked for its serial.
pub fn poll(protocol: Protocol, script: &Script) -> Outcome {
    let fx = fixture();
    fx.rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        // The path keeps the URL (and so the peer's stored state) unique when a port is
        // used again.
        let url = format!(
            "http://{}/{CASE_PREFIX}{}",
            listener.local_addr().expect("address"),
            next_case()
        );
        let sent = sent_events(&script.fetch);
        let ids: Vec<EventId> = sent.iter().map(|e| e.id).collect();
        let before: HashSet<EventId> = stored_among(&fx.store, &ids).await;
        let log: Arc<Mutex<Vec<Request>>> = Arc::default();
        let server = tokio::spawn(serve(listener, protocol, script.clone(), log.clone()));
        let result = match protocol {
            Protocol::Distributed => fx.distributed.poll_peer(&url).await.map(|_| ()),
            Protocol::Cluster => fx.cluster.poll_member(&url).await.map(|_| ()),
        };
        server.abort();
        let requests = log.lock().clone();

        if let Err(e) = &result {
            let text = e.to_string();
            assert!(
                text.starts_with("invalid: ") || text.starts_with("error: "),
                "sync error without a NIP-01 prefix: {text:?} ({e:?}) for {script:?}"
            );
        }
        assert!(
            requests.len() <= REQUEST_BUDGET + 1,
            "{} requests to one peer in one poll",
            requests.len()
        );
        let mut asked_serial = false;
        for r in &requests {
            if kind_of(protocol, r) != Kind::Nip11 {
                asked_serial |= kind_of(protocol, r) == Kind::Latest;
                assert!(
                    r.authorization
                        .as_deref()
                        .is_some_and(|a| a.starts_with("Nostr ")),
                    "unsigned sync request {} {}",
                    r.method,
                    r.target
                );
            }
        }
        if nip11_pubkey(&script.nip11).as_deref() == Some(fx.pubkey.as_str()) {
            assert!(!asked_serial, "polled ourselves");
        }

        let stored: Vec<EventId> = stored_among(&fx.store, &ids)
            .await
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        let listed = listed_ids(&script.list);
        for id in &stored {
            let event = sent.iter().find(|e| e.id == *id).expect("sent");
            assert!(event.verify().is_ok(), "stored event {id} does not verify");
            assert!(listed.contains(id), "stored event {id} was never listed");
        }
        Outcome {
            result,
            requests,
            stored,
        }
    })
}

/// Which of `ids` the store holds.
async fn stored_among(store: &SharedStore, ids: &[EventId]) -> HashSet<EventId> {
    match store.fetch_by_ids(ids).await {
        Ok(events) => events.into_iter().map(|e| e.id).collect(),
        Err(e) => panic!("store: {e}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nip11,
    Latest,
    List,
    Fetch,
}

/// The first path segment of every peer URL: `/case<n>`.
const CASE_PREFIX: &str = "case";

fn next_case() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn kind_of(protocol: Protocol, r: &Request) -> Kind {
    let path = r.target.split('?').next().unwrap_or_default();
    // Without the `/case<n>` prefix of the peer's URL.
    let path = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(CASE_PREFIX))
        .map(|p| p.trim_start_matches(|c: char| c.is_ascii_digit()))
        .unwrap_or(path);
    match (protocol, r.method.as_str(), path) {
        (Protocol::Distributed, "POST", "/api/sync/current") => Kind::Latest,
        (Protocol::Distributed, "POST", "/api/sync/event-ids") => {
            let asks_ids = serde_json::from_slice::<Value>(&r.body)
                .ok()
                .is_some_and(|v| v.get("ids").is_some_and(|i| !i.is_null()));
            if asks_ids {
                Kind::Fetch
            } else {
                Kind::List
            }
        }
        (Protocol::Cluster, "GET", "/cluster/latest") => Kind::Latest,
        (Protocol::Cluster, "GET", "/cluster/events") => Kind::List,
        (Protocol::Cluster, "POST", "/cluster/events") => Kind::Fetch,
        _ => Kind::Nip11,
    }
}

/// The pubkey a NIP-11 answer names, as the sync reads it.
fn nip11_pubkey(a: &Answer) -> Option<String> {
    if a.status != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(&a.body).ok()?;
    Some(v.get("pubkey")?.as_str()?.to_ascii_lowercase())
}

/// The events a fetch answer holds (objects, or strings holding one), as far as they parse.
fn sent_events(a: &Answer) -> Vec<Event> {
    let Ok(v) = serde_json::from_slice::<Value>(&a.body) else {
        return Vec::new();
    };
    let Some(events) = v.get("events").and_then(Value::as_array) else {
        return Vec::new();
    };
    events
        .iter()
        .filter_map(|e| match e {
            Value::String(s) => Event::from_json(s).ok(),
            other => Event::from_json(other.to_string()).ok(),
        })
        .collect()
}

/// The ids a listing answer names (distributed `event_map` keys, cluster `events[].id`).
fn listed_ids(a: &Answer) -> HashSet<EventId> {
    let Ok(v) = serde_json::from_slice::<Value>(&a.body) else {
        return HashSet::new();
    };
    let mut out = HashSet::new();
    if let Some(map) = v.get("event_map").and_then(Value::as_object) {
        out.extend(map.keys().filter_map(|k| EventId::from_hex(k).ok()));
    }
    if let Some(events) = v.get("events").and_then(Value::as_array) {
        out.extend(
            events
                .iter()
                .filter_map(|e| e.get("id")?.as_str())
                .filter_map(|id| EventId::from_hex(id).ok()),
        );
    }
    out
}

async fn serve(
    listener: TcpListener,
    protocol: Protocol,
    script: Script,
    log: Arc<Mutex<Vec<Request>>>,
) {
    let script = Arc::new(script);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let (script, log) = (script.clone(), log.clone());
        tokio::spawn(async move {
            let _ = answer(sock, protocol, &script, &log).await;
        });
    }
}

async fn answer(
    mut sock: TcpStream,
    protocol: Protocol,
    script: &Script,
    log: &Mutex<Vec<Request>>,
) -> std::io::Result<()> {
    let Some(req) = read_request(&mut sock).await? else {
        return Ok(());
    };
    let kind = kind_of(protocol, &req);
    let n = {
        let mut log = log.lock();
        log.push(req);
        log.len()
    };
    let budget = Answer {
        status: 503,
        body: b"request budget spent".to_vec(),
    };
    let a = if n > REQUEST_BUDGET {
        &budget
    } else {
        match kind {
            Kind::Nip11 => &script.nip11,
            Kind::Latest => &script.latest,
            Kind::List => &script.list,
            Kind::Fetch => &script.fetch,
        }
    };
    let head = format!(
        "HTTP/1.1 {} Fuzz\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        a.status,
        a.body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(&a.body).await?;
    sock.shutdown().await
}

/// One HTTP/1.1 request with a `content-length` body (what the sync's client sends).
async fn read_request(sock: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 || buf.len() > 1 << 20 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (
        first.next().unwrap_or_default().to_string(),
        first.next().unwrap_or_default().to_string(),
    );
    let (mut length, mut authorization) = (0usize, None);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(Request {
        method,
        target,
        authorization,
        body,
    }))
}
