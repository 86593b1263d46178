//! The peer-sync engine in-process (issue 6): replicas sharing peers by store leases and
//! taking over a dead replica's share; loop safety (what arrived by sync is never sent back);
//! peers that answer garbage are refused with nothing stored.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::note;
use nostr::{Event, JsonUtil, Keys};
use orly::acl::OpenAcl;
use orly::sync::SyncHooks;
use orly::{Relay, RelayConfig, RunningRelay};
use orly_db::SharedStore;
use orly_sync::{
    ClusterApi, ClusterSettings, ClusterSync, DistributedApi, DistributedSettings, DistributedSync,
    SyncError,
};
use serde_json::json;

async fn sqlite(path: &Path) -> SharedStore {
    Arc::new(orly_db::sqlite::SqliteStore::open(path).await.unwrap())
}

/// A runtime of its own standing for a replica process: shutting it down ends every task of
/// the replica at once, leases unreleased, as a crash does.
fn replica_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

const PEERS: [&str; 4] = [
    "http://127.0.0.1:9/a",
    "http://127.0.0.1:9/b",
    "http://127.0.0.1:9/c",
    "http://127.0.0.1:9/d",
];

/// Waits until `check` holds, sampling that `invariant` holds all along.
async fn until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
    mut invariant: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Err(e) = invariant() {
            panic!("{what}: {e}");
        }
        if check() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn disjoint(a: &[String], b: &[String]) -> Result<(), String> {
    let a: BTreeSet<_> = a.iter().collect();
    match b.iter().find(|p| a.contains(p)) {
        Some(p) => Err(format!("{p} is worked on by both replicas")),
        None => Ok(()),
    }
}

/// Two replicas of a sharded service over one store: the peers split evenly and are never
/// held by both; when one replica dies the other takes its peers after the lease lapses.
async fn replicas_share_and_take_over<S: Send + Sync + 'static>(
    db: &Path,
    make: impl Fn(SharedStore, &str) -> Arc<S>,
    start: impl Fn(&Arc<S>),
    owned: impl Fn(&Arc<S>) -> Vec<String>,
    lease_ttl: Duration,
) {
    let doomed_rt = replica_runtime();
    let (doomed, survivor) = {
        let s1 = sqlite(db).await;
        let s2 = sqlite(db).await;
        (make(s1, "replica-1"), make(s2, "replica-2"))
    };
    {
        let _in_doomed = doomed_rt.enter();
        start(&doomed);
    }
    start(&survivor);
    until(
        "peers split between two replicas",
        Duration::from_secs(10),
        || owned(&doomed).len() == 2 && owned(&survivor).len() == 2,
        || disjoint(&owned(&doomed), &owned(&survivor)),
    )
    .await;
    // Stable for a few lease renewals, never overlapping.
    let settle = Instant::now() + lease_ttl * 2;
    until(
        "stable split",
        lease_ttl * 4,
        || Instant::now() > settle,
        || {
            disjoint(&owned(&doomed), &owned(&survivor))?;
            let total = owned(&doomed).len() + owned(&survivor).len();
            (total <= 4)
                .then_some(())
                .ok_or(format!("{total} peers held"))
        },
    )
    .await;

    let died = Instant::now();
    doomed_rt.shutdown_background();
    until(
        "the survivor takes over every peer",
        lease_ttl * 4,
        || owned(&survivor).len() == 4,
        || Ok(()),
    )
    .await;
    eprintln!(
        "takeover after {:?} (lease ttl {lease_ttl:?})",
        died.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_replicas_share_peers_and_take_over() {
    let ttl = Duration::from_millis(900);
    let dir = tempfile::tempdir().unwrap();
    replicas_share_and_take_over(
        &dir.path().join("shared.db"),
        |store, holder| {
            DistributedSync::new(
                store,
                DistributedSettings {
                    peers: PEERS.iter().map(|s| s.to_string()).collect(),
                    interval: Duration::from_millis(200),
                    timeout: Duration::from_millis(300),
                    lease_ttl: ttl,
                    holder: holder.into(),
                    ..DistributedSettings::default()
                },
            )
            .unwrap()
        },
        |s| {
            s.start();
        },
        |s| s.owned_peers(),
        ttl,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_replicas_share_members_and_take_over() {
    let ttl = Duration::from_millis(900);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    // The membership lives in the shared store: set once, seen by both replicas.
    ClusterSync::new(sqlite(&db).await, ClusterSettings::default())
        .unwrap()
        .update_membership(&PEERS.map(String::from))
        .await
        .unwrap();
    replicas_share_and_take_over(
        &db,
        |store, holder| {
            ClusterSync::new(
                store,
                ClusterSettings {
                    poll_interval: Duration::from_millis(200),
                    timeout: Duration::from_millis(300),
                    lease_ttl: ttl,
                    holder: holder.into(),
                    ..ClusterSettings::default()
                },
            )
            .unwrap()
        },
        |s| {
            s.start();
        },
        |s| s.owned_members(),
        ttl,
    )
    .await;
}

/// Two relays A and B, each running the distributed sync against the other and serving the
/// sync endpoints; the running relays and the engines.
struct Pair {
    relays: Vec<RunningRelay>,
    syncs: Vec<Arc<DistributedSync>>,
    stores: Vec<SharedStore>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

async fn distributed_pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let listeners = [
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    ];
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let mut pair = Pair {
        relays: Vec::new(),
        syncs: Vec::new(),
        stores: Vec::new(),
        urls: urls.clone(),
        _dir: tempfile::tempdir().unwrap(),
    };
    for (i, listener) in listeners.into_iter().enumerate() {
        let store = sqlite(&dir.path().join(format!("{i}.db"))).await;
        let sync = DistributedSync::new(
            store.clone(),
            DistributedSettings {
                relay_url: Some(urls[i].clone()),
                peers: vec![urls[1 - i].clone()],
                // Pulls are driven by the test; a pull waits at most 3s for news.
                interval: Duration::from_secs(3600),
                long_poll: Duration::from_secs(3),
                ..DistributedSettings::default()
            },
        )
        .unwrap();
        let relay = Relay::builder(RelayConfig::default(), store.clone(), Arc::new(OpenAcl))
            .sync(Arc::new(SyncHooks::new(
                Some(Arc::new(sync.clone()) as Arc<dyn DistributedApi>),
                None,
                None,
                None,
            )))
            .build();
        pair.relays.push(orly::spawn(listener, relay).unwrap());
        pair.syncs.push(sync);
        pair.stores.push(store);
    }
    pair._dir = dir;
    pair
}

/// What B pulled from A is never fetched back by A: A's pulls from B list the ids but fetch
/// none; duplicates are dropped by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_events_are_not_sent_back_to_their_origin() {
    let pair = distributed_pair().await;
    let (a, b) = (&pair.syncs[0], &pair.syncs[1]);
    let (url_a, url_b) = (&pair.urls[0], &pair.urls[1]);
    let keys = Keys::generate();
    let t = common::now();
    for i in 0..30 {
        pair.stores[0]
            .save_event(&note(&keys, &format!("origin A {i}"), t - i))
            .await
            .unwrap();
    }
    let at_b = b.poll_peer(url_a).await.unwrap();
    assert_eq!(at_b.events_stored, 30);
    assert_eq!(at_b.events_fetched, 30);
    assert_eq!(pair.stores[1].latest_serial().await.unwrap(), 30);

    // A pulls B's 30 serials: all listed, none fetched, none stored.
    let at_a = a.poll_peer(url_b).await.unwrap();
    assert_eq!(at_a.last_serial, 30);
    assert_eq!(pair.stores[1].latest_serial().await.unwrap(), 30);
    assert_eq!(at_a.events_fetched, 0);
    assert_eq!(at_a.events_stored, 0);
    assert_eq!(pair.stores[0].latest_serial().await.unwrap(), 30);

    // B's next pull waits at A for news; an event stored meanwhile (the relay says so with
    // NotifyNewEvent) ends the wait, and only that event is fetched.
    let waiting = {
        let b = b.clone();
        let url_a = url_a.clone();
        tokio::spawn(async move { b.poll_peer(&url_a).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = note(&keys, "stored while B waits", t);
    let orly_db::SaveOutcome::Stored { serial } = pair.stores[0].save_event(&late).await.unwrap()
    else {
        panic!("not stored")
    };
    DistributedApi::notify_new_event(&a.clone(), late.id, serial)
        .await
        .unwrap();
    let again = waiting.await.unwrap().unwrap();
    assert_eq!(again.events_fetched, 31);
    assert_eq!(again.events_stored, 31);
    assert_eq!(again.last_serial, 31);

    // Replaceable and deleted events follow the store's rules on the other side too.
    let profile_old = nostr::EventBuilder::metadata(&nostr::Metadata::new().name("old"))
        .custom_created_at(nostr::Timestamp::from(t - 50))
        .sign_with_keys(&keys)
        .unwrap();
    let profile_new = nostr::EventBuilder::metadata(&nostr::Metadata::new().name("new"))
        .custom_created_at(nostr::Timestamp::from(t - 40))
        .sign_with_keys(&keys)
        .unwrap();
    let doomed = note(&keys, "to be deleted", t - 30);
    let deletion = nostr::EventBuilder::new(nostr::Kind::EventDeletion, "")
        .tag(nostr::Tag::event(doomed.id))
        .sign_with_keys(&keys)
        .unwrap();
    for e in [&profile_old, &doomed] {
        pair.stores[0].save_event(e).await.unwrap();
    }
    b.poll_peer(url_a).await.unwrap();
    assert_eq!(
        pair.stores[1]
            .fetch_by_ids(&[doomed.id, profile_old.id])
            .await
            .unwrap()
            .len(),
        2
    );
    for e in [&profile_new, &deletion] {
        pair.stores[0].save_event(e).await.unwrap();
    }
    b.poll_peer(url_a).await.unwrap();
    let profiles = pair.stores[1]
        .query(&[nostr::Filter::new()
            .author(keys.public_key())
            .kind(nostr::Kind::Metadata)])
        .await
        .unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].id, profile_new.id);
    assert!(pair.stores[1]
        .fetch_by_ids(&[doomed.id])
        .await
        .unwrap()
        .is_empty());
}

/// A scripted peer: NIP-11 identity, `/api/sync/current` with a serial, and
/// `/api/sync/event-ids` answering listings and fetches as the test says.
async fn scripted_peer(
    serial: u64,
    listing: serde_json::Value,
    fetched: Arc<dyn Fn() -> String + Send + Sync>,
) -> (String, tokio::task::JoinHandle<()>) {
    use axum::routing::{get, post};
    let doc = json!({"pubkey": Keys::generate().public_key().to_hex()}).to_string();
    let app = axum::Router::new()
        .route(
            "/",
            get(move || {
                let doc = doc.clone();
                async move { doc }
            }),
        )
        .route(
            "/api/sync/current",
            post(move || async move {
                json!({"node_id": "x", "relay_url": "", "serial": serial}).to_string()
            }),
        )
        .route(
            "/api/sync/event-ids",
            post(move |body: String| {
                let listing = listing.clone();
                let fetched = fetched.clone();
                async move {
                    let req: serde_json::Value = serde_json::from_str(&body).unwrap();
                    if req.get("ids").is_some() {
                        fetched()
                    } else {
                        listing.to_string()
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

fn event_map(events: &[(&Event, u64)]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = events
        .iter()
        .map(|(e, s)| (e.id.to_hex(), json!(s)))
        .collect();
    json!({ "event_map": map })
}

/// Every kind of garbage a peer can answer is refused: the pull fails with the reason, the
/// peer's serial does not advance, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_peers_is_refused_and_nothing_stored() {
    let keys = Keys::generate();
    let t = common::now();
    let e1 = note(&keys, "one", t - 2);
    let e2 = note(&keys, "two", t - 1);
    let mut forged: serde_json::Value = serde_json::from_str(&e1.as_json()).unwrap();
    forged["content"] = json!("changed after signing");
    let forged = forged.to_string();
    let mut bad_sig: serde_json::Value = serde_json::from_str(&e1.as_json()).unwrap();
    let sig = bad_sig["sig"].as_str().unwrap().to_string();
    bad_sig["sig"] = json!(format!(
        "{}{}",
        if sig.starts_with('0') { "1" } else { "0" },
        &sig[1..]
    ));
    let bad_sig = bad_sig.to_string();
    let e2_json = e2.as_json();
    let huge = format!(
        r#"{{"event_map":{{}},"events":["{}"]}}"#,
        "x".repeat(orly_sync::serve::MAX_RESPONSE + 10)
    );

    type Case = (&'static str, u64, serde_json::Value, String, &'static str);
    let cases: Vec<Case> = vec![
        (
            "listing not JSON",
            2,
            json!("nope"),
            String::new(),
            "bad JSON",
        ),
        (
            "id not hex",
            2,
            json!({"event_map": {"zz": 1}}),
            String::new(),
            "invalid event id",
        ),
        (
            "serial outside the range",
            2,
            event_map(&[(&e1, 1), (&e2, 7)]),
            String::new(),
            "outside",
        ),
        (
            "more ids than serials",
            1,
            event_map(&[(&e1, 1), (&e2, 1)]),
            String::new(),
            "more ids",
        ),
        (
            "an event not asked for",
            2,
            event_map(&[(&e1, 1)]),
            format!(r#"{{"events":[{e2_json}]}}"#),
            "not asked for",
        ),
        (
            "content changed after signing",
            2,
            event_map(&[(&e1, 1)]),
            format!(r#"{{"events":[{forged}]}}"#),
            "bad id or signature",
        ),
        (
            "a bad signature",
            2,
            event_map(&[(&e1, 1)]),
            format!(r#"{{"events":[{bad_sig}]}}"#),
            "bad id or signature",
        ),
        (
            "a malformed event",
            2,
            event_map(&[(&e1, 1)]),
            r#"{"events":[{"id":1}]}"#.to_string(),
            "malformed event",
        ),
        (
            "an oversized answer",
            2,
            event_map(&[(&e1, 1)]),
            huge,
            "larger than",
        ),
    ];
    for (what, serial, listing, fetched, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir.path().join("t.db")).await;
        let fetched = Arc::new(move || fetched.clone());
        let (url, task) = scripted_peer(serial, listing, fetched).await;
        let sync = DistributedSync::new(
            store.clone(),
            DistributedSettings {
                peers: vec![url.clone()],
                timeout: Duration::from_secs(5),
                ..DistributedSettings::default()
            },
        )
        .unwrap();
        let err = sync.poll_peer(&url).await.expect_err(what);
        assert!(
            matches!(err, SyncError::Garbage { .. }),
            "{what}: not refused as garbage: {err}"
        );
        assert!(err.to_string().contains(reason), "{what}: {err}");
        assert_eq!(
            store.latest_serial().await.unwrap(),
            0,
            "{what}: something was stored"
        );
        let status = sync.peer_statuses().await.unwrap();
        assert_eq!(status[0].last_serial, 0, "{what}: serial advanced");
        assert_eq!(status[0].status, "error");
        assert!(status[0].last_error.contains(reason));
        task.abort();
    }
}

/// A peer that never answers is given up after the timeout, with nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_peer_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Accepts connections and never answers.
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("t.db")).await;
    let sync = DistributedSync::new(
        store.clone(),
        DistributedSettings {
            peers: vec![url.clone()],
            timeout: Duration::from_millis(500),
            long_poll: Duration::from_millis(200),
            ..DistributedSettings::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let err = sync.poll_peer(&url).await.unwrap_err();
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(store.latest_serial().await.unwrap(), 0);
    task.abort();
}

/// The cluster's serving side pages with `has_more`/`next_from`, refuses bad ranges, and
/// leaves privileged kinds out when propagation is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_listing_pages_and_hides_privileged_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("t.db")).await;
    let keys = Keys::generate();
    let t = common::now();
    for i in 0..25 {
        store
            .save_event(&note(&keys, &format!("n{i}"), t - i))
            .await
            .unwrap();
    }
    let dm = nostr::EventBuilder::new(nostr::Kind::EncryptedDirectMessage, "x")
        .tag(nostr::Tag::public_key(Keys::generate().public_key()))
        .sign_with_keys(&keys)
        .unwrap();
    store.save_event(&dm).await.unwrap();
    for propagate in [true, false] {
        let sync = ClusterSync::new(
            store.clone(),
            ClusterSettings {
                propagate_privileged: propagate,
                ..ClusterSettings::default()
            },
        )
        .unwrap();
        let page = sync.events_in_range(1, 26, 10).await.unwrap();
        assert_eq!(page.events.len(), 10);
        assert!(page.has_more);
        assert_eq!(page.next_from, 11);
        let last = sync.events_in_range(21, 26, 10).await.unwrap();
        assert!(!last.has_more);
        assert_eq!(last.next_from, 0);
        let has_dm = last.events.iter().any(|e| e.id == dm.id.to_hex());
        assert_eq!(has_dm, propagate);
        assert!(matches!(
            sync.events_in_range(5, 4, 10).await,
            Err(SyncError::Invalid(_))
        ));
        // An unsigned request is refused unless the compatibility flag is on.
        let req = orly_sync::HttpRequest {
            method: "GET".into(),
            path: "/cluster/events".into(),
            query_string: "from=1&to=5".into(),
            ..Default::default()
        };
        let api: Arc<dyn ClusterApi> = Arc::new(sync.clone());
        assert_eq!(api.handle_events(req).await.unwrap().status, 401);
    }
    let open = ClusterSync::new(
        store.clone(),
        ClusterSettings {
            allow_unauthenticated: true,
            ..ClusterSettings::default()
        },
    )
    .unwrap();
    let api: Arc<dyn ClusterApi> = Arc::new(open);
    for (query, status) in [
        ("from=1&to=5", 200),
        ("from=x&to=5", 400),
        ("from=9&to=5", 400),
    ] {
        let req = orly_sync::HttpRequest {
            method: "GET".into(),
            path: "/cluster/events".into(),
            query_string: query.into(),
            ..Default::default()
        };
        assert_eq!(
            api.handle_events(req).await.unwrap().status,
            status,
            "{query}"
        );
    }
}

/// A poll that finishes after its member was removed (its worker not yet stopped) records a
/// serial for that member; the member must stay removed. (The member list was once derived
/// from those serial markers, and such a late write brought the member back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stays_removed_when_a_late_poll_writes_its_serial() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("t.db")).await;
    let sync = ClusterSync::new(store.clone(), ClusterSettings::default()).unwrap();
    sync.update_membership(&PEERS.map(String::from))
        .await
        .unwrap();
    assert_eq!(sync.member_urls().await.unwrap().len(), 4);
    sync.update_membership(&PEERS[..2].iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .await
        .unwrap();
    // What the removed member's late worker does at the end of a page.
    orly_sync::peer::PeerBook::new(store.clone(), "cluster")
        .set_last_serial(PEERS[3], 42)
        .await
        .unwrap();
    assert_eq!(
        sync.member_urls().await.unwrap(),
        PEERS[..2].iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );
    // Re-added, it starts again from serial 0 (it catches up everything).
    sync.update_membership(&PEERS.map(String::from))
        .await
        .unwrap();
    let m = sync.member(PEERS[3]).await.unwrap().unwrap();
    assert_eq!(m.last_serial, 0);
}

/// A live subscriber gets every event exactly once from the store's feed: those published to
/// this relay and those another process (a sync service) stored in the same store, interleaved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_delivers_events_stored_here_and_elsewhere_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("t.db")).await;
    let relay = Relay::new(RelayConfig::default(), store.clone(), Arc::new(OpenAcl));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = orly::spawn(listener, relay).unwrap();

    let keys = Keys::generate();
    let mut sub = common::RawClient::connect(&running.url()).await;
    sub.send_json(json!(["REQ", "live", {"authors": [keys.public_key().to_hex()]}]))
        .await;
    sub.recv_type("EOSE").await;
    let mut publisher = common::RawClient::connect(&running.url()).await;
    let t = common::now();
    let mut expected = BTreeSet::new();
    for i in 0..40 {
        let e = note(&keys, &format!("interleaved {i}"), t - i);
        expected.insert(e.id.to_hex());
        if i % 2 == 0 {
            assert_eq!(publisher.publish(&e).await[2], true);
        } else {
            // Another process (a sync service) writing into the same store.
            store.save_event(&e).await.unwrap();
        }
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < expected.len() && Instant::now() < deadline {
        let v = sub.recv_type("EVENT").await;
        seen.push(v[2]["id"].as_str().unwrap().to_string());
    }
    // Anything delivered twice would arrive right after.
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await;
    assert!(extra.is_err(), "an event was delivered twice: {extra:?}");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), unique.len(), "duplicates delivered");
    assert_eq!(unique, expected);
}
