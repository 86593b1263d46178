//! Shared test fixtures: SQLite stores, signed events, the gRPC server on a loopback socket, and
//! a tiny NIP-77 relay (WebSocket) answering NEG-* with a [`NegentropyEngine`] and REQ/EVENT
//! with a store, to stand in for a peer relay.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use nostr::{
    ClientMessage, Event, EventBuilder, EventId, JsonUtil, Keys, Kind, RelayMessage, Timestamp,
};
use orly_db::sqlite::SqliteStore;
use orly_db::{SaveOutcome, SharedStore};
use orly_sync_negentropy::{
    grpc_server, EngineSettings, NegentropyEngine, NegentropyHandler, SyncManager, SyncSettings,
};
use tokio_tungstenite::tungstenite::Message;

pub async fn store(dir: &tempfile::TempDir, name: &str) -> SharedStore {
    Arc::new(SqliteStore::open(&dir.path().join(name)).await.unwrap())
}

/// `n` signed events of `kind`, created at `base`, `base + 1`, … (every 5 share a second).
pub fn events(keys: &Keys, kind: u16, n: usize, base: u64) -> Vec<Event> {
    (0..n)
        .map(|i| {
            EventBuilder::new(Kind::from(kind), format!("event {kind} {base} {i}"))
                .custom_created_at(Timestamp::from(base + i as u64 / 5))
                .sign_with_keys(keys)
                .unwrap()
        })
        .collect()
}

pub async fn save(store: &SharedStore, events: &[Event]) {
    // Concurrently, in chunks: the store's group commit takes each chunk in few transactions.
    for chunk in events.chunks(256) {
        for outcome in futures::future::join_all(chunk.iter().map(|e| store.save_event(e))).await {
            assert!(matches!(outcome.unwrap(), SaveOutcome::Stored { .. }));
        }
    }
}

/// `n` signed kind-1 events with the given `created_at`s.
pub fn events_at(keys: &Keys, times: impl IntoIterator<Item = u64>) -> Vec<Event> {
    times
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            EventBuilder::new(Kind::TextNote, format!("at {t} #{i}"))
                .custom_created_at(Timestamp::from(t))
                .sign_with_keys(keys)
                .unwrap()
        })
        .collect()
}

pub fn items(events: &[&[Event]]) -> Vec<(Timestamp, EventId)> {
    events
        .iter()
        .flat_map(|es| es.iter().map(|e| (e.created_at, e.id)))
        .collect()
}

pub fn ids(events: &[&[Event]]) -> BTreeSet<EventId> {
    events
        .iter()
        .flat_map(|es| es.iter().map(|e| e.id))
        .collect()
}

pub async fn stored_ids(store: &SharedStore) -> BTreeSet<EventId> {
    store
        .negentropy_items(&[nostr::Filter::new()])
        .await
        .unwrap()
        .into_iter()
        .map(|(_, id)| id)
        .collect()
}

/// The gRPC service on 127.0.0.1:<free port>; dropping the returned sender stops it.
pub struct Service {
    pub addr: SocketAddr,
    pub engine: Arc<NegentropyEngine>,
    pub manager: Arc<SyncManager>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn serve(store: SharedStore, engine: EngineSettings, sync: SyncSettings) -> Service {
    let engine = NegentropyEngine::new(store.clone(), engine).unwrap();
    let manager = SyncManager::new(store, sync).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (e, m) = (engine.clone(), manager.clone());
    tokio::spawn(async move {
        grpc_server::serve(listener, e, m, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Service {
        addr,
        engine,
        manager,
        _stop: tx,
    }
}

/// How the test peer misbehaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerMode {
    #[default]
    Honest,
    /// Answers REQ with events whose content was altered (the signature no longer matches).
    Tampering,
    /// Drops the connection at the first REQ, as a relay restarted mid-sync would.
    HangUpOnReq,
}

/// A minimal NIP-77 relay over `store`, at `ws://127.0.0.1:<port>`.
pub struct TestPeer {
    pub url: String,
    pub engine: Arc<NegentropyEngine>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn spawn_peer(store: SharedStore, mode: PeerMode) -> TestPeer {
    spawn_peer_with(store, mode, EngineSettings::default()).await
}

/// [`spawn_peer`] whose engine has `settings` (a small record cap, say).
pub async fn spawn_peer_with(
    store: SharedStore,
    mode: PeerMode,
    settings: EngineSettings,
) -> TestPeer {
    let engine = NegentropyEngine::new(store.clone(), settings).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let conns = Arc::new(AtomicU64::new(0));
    let e = engine.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (engine, store) = (e.clone(), store.clone());
            let conn = format!("conn-{}", conns.fetch_add(1, Ordering::Relaxed));
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                    peer_connection(ws, conn, engine, store, mode).await;
                }
            });
        }
    });
    TestPeer { url, engine, task }
}

async fn peer_connection(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    conn: String,
    engine: Arc<NegentropyEngine>,
    store: SharedStore,
    mode: PeerMode,
) {
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(msg) = ClientMessage::from_json(text.as_str()) else {
            continue;
        };
        let mut out: Vec<RelayMessage> = Vec::new();
        let neg = |sub: &nostr::SubscriptionId, r: Result<orly_sync_negentropy::NegReply, orly_sync_negentropy::NegError>| match r {
            Ok(reply) => RelayMessage::NegMsg {
                subscription_id: std::borrow::Cow::Owned(sub.clone()),
                message: std::borrow::Cow::Owned(hex::encode(reply.message)),
            },
            Err(e) => RelayMessage::NegErr {
                subscription_id: std::borrow::Cow::Owned(sub.clone()),
                message: std::borrow::Cow::Owned(e.reason()),
            },
        };
        match msg {
            ClientMessage::NegOpen {
                subscription_id,
                filter,
                initial_message,
                ..
            } => {
                let bytes = hex::decode(initial_message.as_bytes()).unwrap_or_default();
                let r = engine
                    .open(&conn, &subscription_id.to_string(), &filter, &bytes)
                    .await;
                out.push(neg(&subscription_id, r));
            }
            ClientMessage::NegMsg {
                subscription_id,
                message,
            } => {
                let bytes = hex::decode(message.as_bytes()).unwrap_or_default();
                let r = engine
                    .message(&conn, &subscription_id.to_string(), &bytes)
                    .await;
                out.push(neg(&subscription_id, r));
            }
            ClientMessage::NegClose { subscription_id } => {
                engine.close(&conn, &subscription_id.to_string()).await;
            }
            ClientMessage::Req { .. } if mode == PeerMode::HangUpOnReq => {
                drop(ws);
                return;
            }
            ClientMessage::Req {
                subscription_id,
                filters,
            } => {
                let filters: Vec<nostr::Filter> =
                    filters.iter().map(|f| f.as_ref().clone()).collect();
                for event in store.query(&filters).await.unwrap() {
                    let event = match mode {
                        PeerMode::Honest | PeerMode::HangUpOnReq => event,
                        PeerMode::Tampering => {
                            let mut json: serde_json::Value =
                                serde_json::from_str(&event.as_json()).unwrap();
                            json["content"] = "tampered".into();
                            Event::from_json(json.to_string()).unwrap()
                        }
                    };
                    out.push(RelayMessage::event(subscription_id.as_ref().clone(), event));
                }
                out.push(RelayMessage::eose(subscription_id.as_ref().clone()));
            }
            ClientMessage::Event(event) => {
                let (ok, message) = match event.verify() {
                    Err(e) => (false, format!("invalid: {e}")),
                    Ok(()) => match store.save_event(&event).await.unwrap() {
                        SaveOutcome::Stored { .. } => (true, String::new()),
                        SaveOutcome::Duplicate => (true, "duplicate: already have it".into()),
                        SaveOutcome::Rejected(r) => (false, r),
                    },
                };
                out.push(RelayMessage::ok(event.id, ok, message));
            }
            _ => {}
        }
        for m in out {
            if ws.send(Message::text(m.as_json())).await.is_err() {
                return;
            }
        }
    }
    engine.close_connection(&conn).await;
}
