//! The store's feed as the one live backbone, with real processes and sockets: relay replicas
//! on one orly-db (gRPC) and on one PostgreSQL deliver each other's stored and ephemeral
//! events exactly once (stored ones in serial order); the orly-db watch survives a restart
//! with no gap and no duplicate; REQs hand over from the stored answer to live delivery
//! without loss or repetition while events pour in; NIP-46 (nostr-connect) works with the
//! client and the signer on different replicas.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, grpc_store, note, now, DbProcess, Mode, RawClient, TestRelay};
use futures::StreamExt;
use nostr::{EventBuilder, Keys, Kind};
use orly::acl::OpenAcl;
use orly::{Relay, RelayConfig, RunningRelay};
use orly_db::{SharedStore, StoreConfig, StoreKind};
use serde_json::json;

async fn serve(store: SharedStore) -> RunningRelay {
    let relay = Relay::new(RelayConfig::default(), store, Arc::new(OpenAcl));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    orly::spawn(listener, relay).unwrap()
}

/// A scratch PostgreSQL database, dropped at the end; `None` (a skip) only when no server is
/// configured and CI does not require one.
struct PgDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgDb {
    async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("ORLY_TEST_PG_URL") else {
            assert!(
                std::env::var_os("ORLY_TEST_REQUIRE_PG").is_none(),
                "ORLY_TEST_REQUIRE_PG is set but ORLY_TEST_PG_URL is not: start PostgreSQL with scripts/test-postgres.sh"
            );
            println!("skipping the PostgreSQL replica test: ORLY_TEST_PG_URL is not set");
            return None;
        };
        use sqlx::Connection;
        let name = format!("orly_feed_{:016x}", rand::random::<u64>());
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.ok();
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        Some(Self {
            admin_url,
            name,
            url,
        })
    }

    async fn store(&self) -> SharedStore {
        orly_db::open_store(&StoreConfig {
            kind: StoreKind::Postgres,
            postgres_url: Some(self.url.clone()),
            max_connections: 8,
            ..StoreConfig::default()
        })
        .await
        .unwrap()
    }

    async fn drop_db(self) {
        use sqlx::Connection;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await;
        }
    }
}

/// Reads a subscription's live events until `want` distinct ids arrived (or 20 s passed);
/// returns every id in arrival order, duplicates included.
async fn collect_live(c: &mut RawClient, sub: &str, want: usize) -> Vec<String> {
    let mut got = Vec::new();
    let mut distinct = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while distinct.len() < want && Instant::now() < deadline {
        let v = match tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v[0] == "EVENT" && v[1] == sub {
            let id = v[2]["id"].as_str().unwrap().to_string();
            distinct.insert(id.clone());
            got.push(id);
        }
    }
    // Anything sent twice would follow right away.
    while let Ok(v) = tokio::time::timeout(Duration::from_millis(300), c.recv()).await {
        if v[0] == "EVENT" && v[1] == sub {
            got.push(v[2]["id"].as_str().unwrap().to_string());
        }
    }
    got
}

/// Two relays on `stores` (one each): a subscriber on each gets every stored and ephemeral
/// event published on either, once, stored ones in the store's serial order.
async fn replicas_deliver_each_others_events(a_store: SharedStore, b_store: SharedStore) {
    let a = serve(a_store.clone()).await;
    let b = serve(b_store).await;
    let keys = Keys::generate();
    let author = keys.public_key().to_hex();
    let mut subs = Vec::new();
    for url in [a.url(), b.url()] {
        let mut c = RawClient::connect(&url).await;
        let stored = c
            .req("live", &[json!({"authors": [author], "limit": 0})])
            .await
            .unwrap();
        assert!(stored.is_empty());
        subs.push(c);
    }
    let mut pub_a = RawClient::connect(&a.url()).await;
    let mut pub_b = RawClient::connect(&b.url()).await;
    let t = now();
    let mut stored_ids = BTreeSet::new();
    let mut ephemeral_ids = BTreeSet::new();
    for i in 0..60u64 {
        let publisher = if i % 2 == 0 { &mut pub_a } else { &mut pub_b };
        let e = if i % 3 == 0 {
            // NIP-46's kind: ephemeral, never stored.
            let e = EventBuilder::new(Kind::from(24133), format!("request {i}"))
                .sign_with_keys(&keys)
                .unwrap();
            ephemeral_ids.insert(e.id.to_hex());
            e
        } else {
            let e = note(&keys, &format!("note {i}"), t + i);
            stored_ids.insert(e.id.to_hex());
            e
        };
        let ok = publisher.publish(&e).await;
        assert_eq!(ok[2], true, "{ok}");
    }
    let total = stored_ids.len() + ephemeral_ids.len();
    for (n, c) in subs.iter_mut().enumerate() {
        let got = collect_live(c, "live", total).await;
        let distinct: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(got.len(), distinct.len(), "subscriber {n}: duplicates");
        let want: BTreeSet<String> = stored_ids.union(&ephemeral_ids).cloned().collect();
        assert_eq!(distinct, want, "subscriber {n}: missing events");
        // Stored events arrive in serial order.
        let mut serials = Vec::new();
        for id in got.iter().filter(|id| stored_ids.contains(*id)) {
            let id = nostr::EventId::from_hex(id).unwrap();
            serials.push(a_store.serial_by_id(&id).await.unwrap().unwrap());
        }
        assert!(
            serials.windows(2).all(|w| w[0] < w[1]),
            "subscriber {n}: not in serial order: {serials:?}"
        );
    }
    // Ephemeral events were never stored.
    for id in &ephemeral_ids {
        let id = nostr::EventId::from_hex(id).unwrap();
        assert_eq!(a_store.serial_by_id(&id).await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_orly_db_deliver_each_others_events_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = DbProcess::start(dir.path(), free_port()).await;
    replicas_deliver_each_others_events(grpc_store(db.addr), grpc_store(db.addr)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_postgres_deliver_each_others_events_once() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    replicas_deliver_each_others_events(pg.store().await, pg.store().await).await;
    pg.drop_db().await;
}

/// orly-db killed and restarted in the middle of a stream: the gRPC watch resumes from its
/// last serial (no gap, no duplicate: checked by serial), and live subscriptions on both
/// relays see every acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_after_orly_db_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut db = DbProcess::start(dir.path(), port).await;
    let store = grpc_store(db.addr);
    let start = store.latest_serial().await.unwrap();
    let mut watch = store.watch(start);
    let a = serve(grpc_store(db.addr)).await;
    let b = serve(grpc_store(db.addr)).await;
    let keys = Keys::generate();
    let author = keys.public_key().to_hex();
    let mut subs = Vec::new();
    for url in [a.url(), b.url()] {
        let mut c = RawClient::connect(&url).await;
        c.req("live", &[json!({"authors": [author], "limit": 0})])
            .await
            .unwrap();
        subs.push(c);
    }
    let mut publisher = RawClient::connect(&a.url()).await;
    let t = now();
    let mut acked = BTreeSet::new();
    let mut i = 0u64;
    let mut publish_some =
        async |publisher: &mut RawClient, n: u64, acked: &mut BTreeSet<String>| {
            for _ in 0..n {
                let e = note(&keys, &format!("n{i}"), t + i);
                i += 1;
                // While orly-db is down the relay refuses with error:; the client sends again.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let ok = publisher.publish(&e).await;
                    if ok[2] == true {
                        acked.insert(e.id.to_hex());
                        break;
                    }
                    assert!(
                        ok[3].as_str().unwrap().starts_with("error:"),
                        "unexpected refusal {ok}"
                    );
                    assert!(Instant::now() < deadline, "orly-db did not come back");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
    publish_some(&mut publisher, 30, &mut acked).await;
    db.kill();
    db = DbProcess::start(dir.path(), port).await;
    publish_some(&mut publisher, 30, &mut acked).await;

    // The watch: every serial once, ascending, covering exactly the acknowledged events.
    let mut serials = Vec::new();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < acked.len() && Instant::now() < deadline {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            serials.push(e.serial);
            seen.insert(hex::encode(e.id));
        }
    }
    assert_eq!(seen, acked, "the watch missed events");
    assert!(
        serials.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or duplicate in the watch: {serials:?}"
    );
    assert_eq!(serials.first(), Some(&(start + 1)));
    for (n, c) in subs.iter_mut().enumerate() {
        let got = collect_live(c, "live", acked.len()).await;
        let distinct: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(got.len(), distinct.len(), "relay {n}: duplicates");
        assert_eq!(distinct, acked, "relay {n}: missing events");
    }
    drop(db);
}

/// REQs opened while events pour in: every acknowledged event reaches every REQ exactly once,
/// either in its stored part (before EOSE) or live (after it).
async fn handover_under_concurrent_publishing(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let keys = Keys::generate();
    let author = keys.public_key().to_hex();
    let url = relay.url();
    const EVENTS: u64 = 400;
    const REQS: usize = 12;
    let publisher = {
        let url = url.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            let mut c = RawClient::connect(&url).await;
            let t = now() - EVENTS;
            let mut acked = Vec::new();
            for i in 0..EVENTS {
                let e = note(&keys, &format!("h{i}"), t + i);
                let ok = c.publish(&e).await;
                assert_eq!(ok[2], true, "{ok}");
                acked.push(e.id.to_hex());
            }
            acked
        })
    };
    let mut readers = Vec::new();
    for r in 0..REQS {
        let url = url.clone();
        let author = author.clone();
        readers.push(tokio::spawn(async move {
            // Staggered over the publishing.
            tokio::time::sleep(Duration::from_millis(40 * r as u64)).await;
            let mut c = RawClient::connect(&url).await;
            c.send_json(json!(["REQ", "h", {"authors": [author], "limit": 5000}]))
                .await;
            let mut stored = Vec::new();
            let mut live = Vec::new();
            let mut eose = false;
            let deadline = Instant::now() + Duration::from_secs(30);
            while (!eose || live.len() + stored.len() < EVENTS as usize)
                && Instant::now() < deadline
            {
                let Ok(v) = tokio::time::timeout(Duration::from_secs(5), c.recv()).await else {
                    continue;
                };
                match (v[0].as_str(), eose) {
                    (Some("EVENT"), false) => stored.push(v[2]["id"].as_str().unwrap().to_string()),
                    (Some("EVENT"), true) => live.push(v[2]["id"].as_str().unwrap().to_string()),
                    (Some("EOSE"), _) => eose = true,
                    (Some("CLOSED"), _) => panic!("REQ closed: {v}"),
                    _ => {}
                }
            }
            while let Ok(v) = tokio::time::timeout(Duration::from_millis(300), c.recv()).await {
                if v[0] == "EVENT" {
                    live.push(v[2]["id"].as_str().unwrap().to_string());
                }
            }
            (stored, live, eose)
        }));
    }
    let acked: BTreeSet<String> = publisher.await.unwrap().into_iter().collect();
    let mut handed_over = 0;
    for (r, reader) in readers.into_iter().enumerate() {
        let (stored, live, eose) = reader.await.unwrap();
        assert!(eose, "REQ {r}: no EOSE");
        let mut count: HashMap<&String, usize> = HashMap::new();
        for id in stored.iter().chain(&live) {
            *count.entry(id).or_default() += 1;
        }
        let dup: BTreeMap<&&String, &usize> = count.iter().filter(|(_, n)| **n > 1).collect();
        assert!(dup.is_empty(), "REQ {r}: sent twice: {dup:?}");
        let got: BTreeSet<String> = count.keys().map(|s| s.to_string()).collect();
        assert_eq!(
            got,
            acked,
            "REQ {r}: missing {} events",
            acked.len() - got.len().min(acked.len())
        );
        if !stored.is_empty() && !live.is_empty() {
            handed_over += 1;
        }
    }
    // The REQs really overlapped the publishing.
    assert!(handed_over > 0, "no REQ had both a stored and a live part");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_handover_is_exactly_once_local() {
    handover_under_concurrent_publishing(Mode::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_handover_is_exactly_once_split() {
    handover_under_concurrent_publishing(Mode::Split).await;
}

/// NIP-46 remote signing with nostr-sdk's own implementation (nostr-connect): the app talks to
/// replica A, the signer listens on replica B; requests and responses are kind 24133 events
/// (ephemeral), so they cross replicas only through the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nostr_connect_works_across_two_relay_replicas() {
    use nostr::nips::nip46::NostrConnectURI;
    use nostr::signer::NostrSigner;
    use nostr_connect::prelude::{
        NostrConnect, NostrConnectKeys, NostrConnectRemoteSigner, NostrConnectRequest,
        NostrConnectSignerActions,
    };

    struct Approve;
    impl NostrConnectSignerActions for Approve {
        fn approve(&self, _: &nostr::PublicKey, _: &NostrConnectRequest) -> bool {
            true
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let db = DbProcess::start(dir.path(), free_port()).await;
    let a = serve(grpc_store(db.addr)).await;
    let b = serve(grpc_store(db.addr)).await;
    let keys = NostrConnectKeys {
        signer: Keys::generate(),
        user: Keys::generate(),
    };
    let user = keys.user.public_key();
    let signer_pk = keys.signer.public_key();
    let signer = NostrConnectRemoteSigner::new(keys, [b.url().as_str()], None, None).unwrap();
    let serving = tokio::spawn(async move { signer.serve(Approve).await });
    // Let the signer subscribe on B.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let uri = NostrConnectURI::Bunker {
        remote_signer_public_key: signer_pk,
        relays: vec![nostr::RelayUrl::parse(&a.url()).unwrap()],
        secret: None,
    };
    let app = NostrConnect::new(uri, Keys::generate(), Duration::from_secs(20), None).unwrap();
    assert_eq!(app.get_public_key().await.unwrap(), user);
    let signed = EventBuilder::text_note("signed remotely")
        .sign(&app)
        .await
        .unwrap();
    assert_eq!(signed.pubkey, user);
    signed.verify().unwrap();
    app.shutdown().await;
    serving.abort();
}
