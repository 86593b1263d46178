//! NIP-77 through the relay: nostr-sdk's negentropy sync against orly, with the engine
//! in-process (local) and in orly-sync-negentropy over gRPC (split: orly-db process too), bad
//! input answered with NEG-ERR, and two relays converging through relay-to-relay sync.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{note, now, Mode, RawClient, TestRelay};
use nostr::{Event, EventId, Filter, Keys, Kind};
use nostr_sdk::prelude::{
    Client, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, SyncDirection, SyncOptions,
};
use orly_sync_negentropy::{EngineSettings, NegentropyEngine, SyncManager, SyncSettings};
use serde_json::json;

/// A relay with NIP-77: local mode uses the engine in-process; split mode an orly-db process
/// and an orly-sync-negentropy gRPC server (reading the same orly-db) that the relay calls.
struct NegRelay {
    relay: TestRelay,
    _service: Option<tokio::task::JoinHandle<()>>,
}

async fn neg_relay(mode: Mode, settings: EngineSettings) -> NegRelay {
    let mut service = None;
    let relay = TestRelay::start_built(mode, orly::RelayConfig::default(), |b, store| {
        let engine = NegentropyEngine::new(store.clone(), settings).unwrap();
        engine.spawn_reaper();
        match mode {
            Mode::Local => b.negentropy(engine),
            Mode::Split => {
                let manager = SyncManager::new(store.clone(), SyncSettings::default()).unwrap();
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.set_nonblocking(true).unwrap();
                let addr = listener.local_addr().unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                service = Some(tokio::spawn(async move {
                    let _ = orly_sync_negentropy::grpc_server::serve(
                        listener,
                        engine,
                        manager,
                        std::future::pending(),
                    )
                    .await;
                }));
                let client = orly_sync_negentropy::ReplicatedNegentropy::connect_lazy(
                    &addr.to_string(),
                    Duration::from_secs(5),
                )
                .unwrap();
                b.negentropy(Arc::new(client))
            }
        }
    })
    .await;
    NegRelay {
        relay,
        _service: service,
    }
}

impl Drop for NegRelay {
    fn drop(&mut self) {
        if let Some(s) = &self._service {
            s.abort();
        }
    }
}

fn notes(keys: &Keys, n: usize, base: u64) -> Vec<Event> {
    (0..n)
        .map(|i| note(keys, &format!("n{base}-{i}"), base + i as u64))
        .collect()
}

fn ids(sets: &[&[Event]]) -> BTreeSet<EventId> {
    sets.iter().flat_map(|s| s.iter().map(|e| e.id)).collect()
}

async fn relay_ids(relay: &TestRelay) -> BTreeSet<EventId> {
    relay
        .store
        .negentropy_items(&[Filter::new()])
        .await
        .unwrap()
        .into_iter()
        .map(|(_, id)| id)
        .collect()
}

async fn sdk_sync(mode: Mode, direction: SyncDirection) {
    let keys = Keys::generate();
    let t = now() - 100_000;
    let shared = notes(&keys, 300, t);
    let client_only = notes(&keys, 25, t + 1_000);
    let relay_only = notes(&keys, 35, t + 2_000);
    let r = neg_relay(mode, EngineSettings::default()).await;
    for e in shared.iter().chain(&relay_only) {
        r.relay.store.save_event(e).await.unwrap();
    }
    let db = MemoryDatabase::with_opts(MemoryDatabaseOptions {
        events: true,
        max_events: None,
    });
    for e in shared.iter().chain(&client_only) {
        db.save_event(e).await.unwrap();
    }
    let client = Client::builder().database(db).build();
    client.add_relay(r.relay.url()).await.unwrap();
    client.connect().await;
    let opts = SyncOptions::new()
        .direction(direction)
        .initial_timeout(Duration::from_secs(10));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        client.sync(Filter::new().kind(Kind::TextNote), &opts),
    )
    .await
    .expect("sync finishes")
    .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    let rec = out.val;
    let set = |s: &std::collections::HashSet<EventId>| s.iter().copied().collect::<BTreeSet<_>>();
    // The have/need sets are exact whatever the direction; transfers follow the direction.
    assert_eq!(set(&rec.local), ids(&[&client_only]));
    assert_eq!(set(&rec.remote), ids(&[&relay_only]));
    let up = matches!(direction, SyncDirection::Up | SyncDirection::Both);
    let down = matches!(direction, SyncDirection::Down | SyncDirection::Both);
    assert_eq!(
        set(&rec.sent),
        if up {
            ids(&[&client_only])
        } else {
            BTreeSet::new()
        }
    );
    assert_eq!(
        set(&rec.received),
        if down {
            ids(&[&relay_only])
        } else {
            BTreeSet::new()
        }
    );
    let expected_relay = if up {
        ids(&[&shared, &relay_only, &client_only])
    } else {
        ids(&[&shared, &relay_only])
    };
    assert_eq!(relay_ids(&r.relay).await, expected_relay);
    let client_ids: BTreeSet<EventId> = client
        .database()
        .query(Filter::new())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let expected_client = if down {
        ids(&[&shared, &relay_only, &client_only])
    } else {
        ids(&[&shared, &client_only])
    };
    assert_eq!(client_ids, expected_client);
    client.shutdown().await;
}

async fn bad_input_gets_neg_err(mode: Mode) {
    let settings = EngineSettings {
        max_records: 5,
        session_timeout: Duration::from_secs(1),
        ..EngineSettings::default()
    };
    let r = neg_relay(mode, settings).await;
    let keys = Keys::generate();
    for e in notes(&keys, 8, now() - 50) {
        r.relay.store.save_event(&e).await.unwrap();
    }
    let mut c = RawClient::connect(&r.relay.url()).await;
    let neg_err = |v: &serde_json::Value, sub: &str, prefix: &str| {
        assert_eq!(v[0], "NEG-ERR", "{v}");
        assert_eq!(v[1], sub, "{v}");
        assert!(v[2].as_str().unwrap().starts_with(prefix), "{v}");
    };
    // Malformed hex, a bad filter, a message of the wrong shape.
    c.send_json(json!(["NEG-OPEN", "h", {"kinds": [1], "limit": 0}, "zz"]))
        .await;
    neg_err(&c.recv().await, "h", "invalid:");
    c.send_json(json!(["NEG-OPEN", "f", [1], "61"])).await;
    neg_err(&c.recv().await, "f", "invalid:");
    c.send_json(json!(["NEG-MSG", "s"])).await;
    neg_err(&c.recv().await, "s", "invalid:");
    // An unsupported version: the reply holds our version so the client can fall back.
    c.send_json(json!(["NEG-OPEN", "v", {"kinds": [1]}, "62"]))
        .await;
    let v = c.recv().await;
    assert_eq!(v, json!(["NEG-MSG", "v", "61"]));
    // A NEG-MSG for a session that does not exist.
    c.send_json(json!(["NEG-MSG", "nope", "6100"])).await;
    neg_err(&c.recv().await, "nope", "closed:");
    // More records than the cap.
    c.send_json(json!(["NEG-OPEN", "cap", {"kinds": [1]}, "6100"]))
        .await;
    neg_err(&c.recv().await, "cap", "blocked:");
    // An idle session times out.
    c.send_json(json!(["NEG-OPEN", "idle", {"kinds": [1], "limit": 3}, "6100"]))
        .await;
    let v = c.recv().await;
    assert_eq!(v[0], "NEG-MSG", "{v}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.send_json(json!(["NEG-MSG", "idle", "6100"])).await;
    neg_err(&c.recv().await, "idle", "closed:");
    // An oversized frame.
    let huge = "61".repeat(150_000);
    c.send_json(json!(["NEG-MSG", "big", huge])).await;
    neg_err(&c.recv().await, "big", "blocked:");
    // The connection still works for everything else.
    assert_eq!(c.publish(&note(&keys, "still fine", now())).await[2], true);
}

async fn nostr_sdk_uploads_client_extras(mode: Mode) {
    sdk_sync(mode, SyncDirection::Up).await
}

async fn nostr_sdk_downloads_relay_extras(mode: Mode) {
    sdk_sync(mode, SyncDirection::Down).await
}

async fn nostr_sdk_syncs_both_ways(mode: Mode) {
    sdk_sync(mode, SyncDirection::Both).await
}

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Mode::Local).await })*
        }
        mod split {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Mode::Split).await })*
        }
    };
}

both_modes!(
    nostr_sdk_uploads_client_extras,
    nostr_sdk_downloads_relay_extras,
    nostr_sdk_syncs_both_ways,
    bad_input_gets_neg_err,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_negentropy_refuses_it_and_nip11_says_so() {
    let plain = TestRelay::start(Mode::Local).await;
    let mut c = RawClient::connect(&plain.url()).await;
    c.send_json(json!(["NEG-OPEN", "n", {}, "6100"])).await;
    let v = c.recv().await;
    assert_eq!(v[0], "NEG-ERR");
    assert!(v[2].as_str().unwrap().starts_with("blocked:"), "{v}");
    let nips = |doc: serde_json::Value| -> Vec<u64> {
        doc["supported_nips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect()
    };
    assert!(!nips(nip11(&plain).await).contains(&77));
    let with = neg_relay(Mode::Local, EngineSettings::default()).await;
    assert!(nips(nip11(&with.relay).await).contains(&77));
}

async fn nip11(relay: &TestRelay) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(relay.running.addr)
        .await
        .unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nAccept: application/nostr+json\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    serde_json::from_str(buf.split_once("\r\n\r\n").unwrap().1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_converge_through_relay_to_relay_sync() {
    let a = neg_relay(Mode::Local, EngineSettings::default()).await;
    let b = neg_relay(Mode::Split, EngineSettings::default()).await;
    let keys = Keys::generate();
    let t = now() - 10_000;
    let shared = notes(&keys, 200, t);
    let only_a = notes(&keys, 30, t + 500);
    let only_b = notes(&keys, 40, t + 900);
    for e in shared.iter().chain(&only_a) {
        a.relay.store.save_event(e).await.unwrap();
    }
    for e in shared.iter().chain(&only_b) {
        b.relay.store.save_event(e).await.unwrap();
    }
    // A syncs with B over B's NIP-77 endpoint, as ORLY_SYNC_NEGENTROPY_PEERS would make it.
    let manager = SyncManager::new(a.relay.store.clone(), SyncSettings::default()).unwrap();
    manager.add_peers(&[b.relay.url()]).await.unwrap();
    let results = manager.sync_all(None).await;
    assert_eq!(results.len(), 1);
    let report = results[0].1.as_ref().expect("sync succeeds");
    assert_eq!(report.fetched, 40);
    assert_eq!(report.sent, 30);
    let all = ids(&[&shared, &only_a, &only_b]);
    assert_eq!(relay_ids(&a.relay).await, all);
    assert_eq!(relay_ids(&b.relay).await, all);
    // A second pass finds nothing to do.
    let again = manager.sync_all(None).await;
    let report = again[0].1.as_ref().unwrap();
    assert_eq!((report.fetched, report.sent), (0, 0));
}

/// A relay on a fixed address with NIP-77, over an existing store.
async fn serve_with_negentropy(
    store: orly_db::SharedStore,
    addr: std::net::SocketAddr,
) -> orly::RunningRelay {
    let relay = orly::Relay::builder(
        orly::RelayConfig::default(),
        store.clone(),
        Arc::new(orly::acl::OpenAcl),
    )
    .negentropy(NegentropyEngine::new(store, EngineSettings::default()).unwrap())
    .build();
    // The old listener may linger for a moment after a stop.
    for _ in 0..50 {
        if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
            return orly::spawn(listener, relay).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot bind {addr} again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_converge_when_the_peer_restarts_mid_sync() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let open = |dir: &tempfile::TempDir| {
        let cfg = orly_db::StoreConfig {
            data_dir: dir.path().to_path_buf(),
            ..orly_db::StoreConfig::default()
        };
        async move { orly_db::open_store(&cfg).await.unwrap() }
    };
    let (store_a, store_b) = (open(&dir_a).await, open(&dir_b).await);
    let keys = Keys::generate();
    let t = now() - 100_000;
    let shared = notes(&keys, 300, t);
    let only_a = notes(&keys, 1500, t + 10_000);
    let only_b = notes(&keys, 1500, t + 20_000);
    for e in shared.iter().chain(&only_a) {
        store_a.save_event(e).await.unwrap();
    }
    for e in shared.iter().chain(&only_b) {
        store_b.save_event(e).await.unwrap();
    }
    let b = serve_with_negentropy(store_b.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = b.addr;
    let settings = SyncSettings {
        batch_size: 100,
        peer_timeout: Duration::from_secs(5),
        ..SyncSettings::default()
    };
    let manager = SyncManager::new(store_a.clone(), settings).unwrap();
    manager.add_peers(&[format!("ws://{addr}")]).await.unwrap();

    // B goes away while A is transferring, then comes back on the same address.
    let first = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.sync_all(None).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    b.stop().await.unwrap();
    let _ = first.await.unwrap();
    let b = serve_with_negentropy(store_b.clone(), addr).await;

    // The next pass completes whatever the interrupted one left, without duplicates.
    let results = manager.sync_all(None).await;
    assert!(results[0].1.is_ok(), "{:?}", results[0].1);
    let all = ids(&[&shared, &only_a, &only_b]);
    let stored = |store: orly_db::SharedStore| async move {
        let items = store.negentropy_items(&[Filter::new()]).await.unwrap();
        let set: BTreeSet<EventId> = items.iter().map(|(_, id)| *id).collect();
        assert_eq!(items.len(), set.len(), "no duplicates");
        set
    };
    assert_eq!(stored(store_a.clone()).await, all);
    assert_eq!(stored(store_b.clone()).await, all);
    b.stop().await.unwrap();
}
