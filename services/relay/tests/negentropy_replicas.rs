//! Horizontal scaling of the negentropy service (issue 5):
//!
//! - two orly-sync-negentropy gRPC replicas (each its own engine, over one SQLite database)
//!   behind one relay (`ReplicatedNegentropy`): many concurrent nostr-sdk clients all reconcile
//!   exactly, both replicas serve sessions, and after one replica is killed new syncs all
//!   complete on the other;
//! - two `SyncManager` replicas over one store sharing three peer relays: no peer is ever synced
//!   by both at once, and when one replica dies its peers are synced by the other within about
//!   one lease period.
//!
//! A replica runs on its own tokio runtime, and killing it shuts that runtime down: every task
//! of it (server, connections, lease renewal) ends at once, as when the process dies.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{note, now, Mode, RawClient, TestRelay};
use nostr::{Event, EventId, Filter, Keys, Kind};
use nostr_sdk::prelude::{
    Client, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, SyncDirection, SyncOptions,
};
use orly_db::SharedStore;
use orly_sync_negentropy::{
    EngineSettings, NegentropyEngine, ReplicatedNegentropy, SyncManager, SyncSettings,
};
use parking_lot::Mutex;
use serde_json::json;

/// A runtime of its own (one worker) standing for a replica process.
fn replica_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// One orly-sync-negentropy replica: the gRPC service on a loopback port, with its own store
/// handle on the shared SQLite database and its own engine.
struct GrpcReplica {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    engine: Arc<NegentropyEngine>,
}

impl GrpcReplica {
    async fn start(name: &str, db: &Path) -> Self {
        let runtime = replica_runtime(name);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        // Its own handle (connection pool) on the shared database. (Opened here: the open
        // future is not `Send` enough to be spawned.)
        let store: SharedStore = Arc::new(orly_db::sqlite::SqliteStore::open(db).await.unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let engine = NegentropyEngine::new(store.clone(), EngineSettings::default()).unwrap();
            engine.spawn_reaper();
            let manager = SyncManager::new(store, SyncSettings::default()).unwrap();
            let _ = tx.send(engine.clone());
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = orly_sync_negentropy::grpc_server::serve(
                listener,
                engine,
                manager,
                std::future::pending(),
            )
            .await;
        });
        let engine = rx.await.expect("replica started");
        Self {
            runtime: Some(runtime),
            addr,
            engine,
        }
    }

    /// Ends every task of the replica at once (server, connections, sessions).
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for GrpcReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (connection id, subscription id) of the sessions seen on each engine.
type SeenSessions = Arc<Mutex<Vec<HashSet<(String, String)>>>>;

/// Records which sessions each engine holds, sampled every millisecond while it runs.
struct SessionSampler {
    seen: SeenSessions,
    task: tokio::task::JoinHandle<()>,
}

impl SessionSampler {
    fn start(engines: Vec<Arc<NegentropyEngine>>) -> Self {
        let seen: SeenSessions = Arc::new(Mutex::new(vec![HashSet::new(); engines.len()]));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    for (i, engine) in engines.iter().enumerate() {
                        let sessions = engine.list_sessions();
                        let mut seen = seen.lock();
                        for s in sessions {
                            seen[i].insert((s.connection_id, s.subscription_id));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        Self { seen, task }
    }

    /// Distinct sessions seen on each engine.
    fn stop(self) -> Vec<usize> {
        self.task.abort();
        self.seen.lock().iter().map(HashSet::len).collect()
    }
}

/// What one client holds, and what the relay holds for it, under its own author.
struct ClientCase {
    keys: Keys,
    shared: Vec<Event>,
    client_only: Vec<Event>,
    relay_only: Vec<Event>,
}

fn notes(keys: &Keys, n: usize, base: u64, tag: &str) -> Vec<Event> {
    (0..n)
        .map(|i| note(keys, &format!("{tag}-{i}"), base + i as u64))
        .collect()
}

fn ids(events: &[&[Event]]) -> BTreeSet<EventId> {
    events.iter().flat_map(|s| s.iter().map(|e| e.id)).collect()
}

/// Client `i` has its own sizes, so every client's have/need sets differ.
fn client_case(i: usize) -> ClientCase {
    let keys = Keys::generate();
    let t = now() - 200_000 + i as u64 * 5_000;
    ClientCase {
        shared: notes(&keys, 120 + 7 * i, t, "shared"),
        client_only: notes(&keys, 3 + i, t + 1_000, "client"),
        relay_only: notes(&keys, 5 + 2 * i, t + 2_000, "relay"),
        keys,
    }
}

/// A nostr-sdk client syncs both ways with the relay over its author's events; the have/need
/// and transfer sets must be exact.
async fn sdk_sync_exact(relay_url: String, case: Arc<ClientCase>) {
    let db = MemoryDatabase::with_opts(MemoryDatabaseOptions {
        events: true,
        max_events: None,
    });
    for e in case.shared.iter().chain(&case.client_only) {
        db.save_event(e).await.unwrap();
    }
    let client = Client::builder().database(db).build();
    client.add_relay(&relay_url).await.unwrap();
    client.connect().await;
    let opts = SyncOptions::new()
        .direction(SyncDirection::Both)
        .initial_timeout(Duration::from_secs(20));
    let filter = Filter::new()
        .author(case.keys.public_key())
        .kind(Kind::TextNote);
    let out = tokio::time::timeout(Duration::from_secs(120), client.sync(filter.clone(), &opts))
        .await
        .expect("sync finishes")
        .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    let rec = out.val;
    let set = |s: &HashSet<EventId>| s.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(set(&rec.local), ids(&[&case.client_only]), "have");
    assert_eq!(set(&rec.remote), ids(&[&case.relay_only]), "need");
    assert_eq!(set(&rec.sent), ids(&[&case.client_only]), "sent");
    assert_eq!(set(&rec.received), ids(&[&case.relay_only]), "received");
    let held: BTreeSet<EventId> = client
        .database()
        .query(filter)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        held,
        ids(&[&case.shared, &case.client_only, &case.relay_only])
    );
    client.shutdown().await;
}

async fn stored_ids(store: &SharedStore, filter: Filter) -> BTreeSet<EventId> {
    store
        .negentropy_items(&[filter])
        .await
        .unwrap()
        .into_iter()
        .map(|(_, id)| id)
        .collect()
}

/// Runs every case concurrently against the relay, each client on its own connection.
async fn sync_all_concurrently(relay_url: &str, cases: &[Arc<ClientCase>]) {
    let tasks: Vec<_> = cases
        .iter()
        .map(|c| tokio::spawn(sdk_sync_exact(relay_url.to_string(), c.clone())))
        .collect();
    for t in tasks {
        t.await.expect("client sync succeeds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_over_two_grpc_replicas_and_one_killed() {
    const CLIENTS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let db: PathBuf = dir.path().join("orly.db");
    // The relay's store, and the database the replicas read.
    let store: SharedStore = Arc::new(orly_db::sqlite::SqliteStore::open(&db).await.unwrap());
    let cases: Vec<Arc<ClientCase>> = (0..CLIENTS).map(|i| Arc::new(client_case(i))).collect();
    for c in &cases {
        for e in c.shared.iter().chain(&c.relay_only) {
            store.save_event(e).await.unwrap();
        }
    }
    let mut r1 = GrpcReplica::start("replica-1", &db).await;
    let r2 = GrpcReplica::start("replica-2", &db).await;
    let relay = orly::Relay::new(
        orly::RelayConfig::default(),
        store.clone(),
        Arc::new(orly::acl::OpenAcl),
    );
    let handler = ReplicatedNegentropy::connect_lazy(
        &format!("{},{}", r1.addr, r2.addr),
        Duration::from_secs(5),
    )
    .unwrap();
    relay.enable_negentropy(Arc::new(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = orly::spawn(listener, relay).unwrap();
    let url = running.url();

    // Sessions held open: new sessions alternate between the replicas, and each later NEG-MSG
    // reaches the replica holding its session.
    let mut raw = RawClient::connect(&url).await;
    for s in 0..4 {
        raw.send_json(json!(["NEG-OPEN", format!("held{s}"), {"kinds": [1], "limit": 10}, "6100"]))
            .await;
        let v = raw.recv().await;
        assert_eq!(v[0], "NEG-MSG", "{v}");
    }
    let held = |e: &NegentropyEngine| {
        e.list_sessions()
            .iter()
            .filter(|s| s.subscription_id.starts_with("held"))
            .count()
    };
    assert_eq!((held(&r1.engine), held(&r2.engine)), (2, 2));
    for s in 0..4 {
        raw.send_json(json!(["NEG-MSG", format!("held{s}"), "6100"]))
            .await;
        let v = raw.recv().await;
        assert_eq!(
            v[0], "NEG-MSG",
            "session held{s} answered by its replica: {v}"
        );
        raw.send_json(json!(["NEG-CLOSE", format!("held{s}")]))
            .await;
    }

    // Many concurrent nostr-sdk clients, each with its own have/need sets.
    let sampler = SessionSampler::start(vec![r1.engine.clone(), r2.engine.clone()]);
    sync_all_concurrently(&url, &cases).await;
    let seen = sampler.stop();
    eprintln!("sessions seen per replica during the concurrent syncs: {seen:?}");
    assert!(
        seen.iter().all(|&n| n > 0),
        "both replicas served sessions: {seen:?}"
    );
    for c in &cases {
        let author = Filter::new().author(c.keys.public_key());
        assert_eq!(
            stored_ids(&store, author).await,
            ids(&[&c.shared, &c.client_only, &c.relay_only]),
            "the relay holds the union"
        );
    }
    for e in [&r1.engine, &r2.engine] {
        assert!(
            e.list_sessions().is_empty(),
            "sessions are closed after the syncs"
        );
    }

    // Kill replica 1: every new sync still completes, on replica 2.
    r1.kill();
    let after: Vec<Arc<ClientCase>> = (CLIENTS..CLIENTS + CLIENTS / 2)
        .map(|i| Arc::new(client_case(i)))
        .collect();
    for c in &after {
        for e in c.shared.iter().chain(&c.relay_only) {
            store.save_event(e).await.unwrap();
        }
    }
    let sampler = SessionSampler::start(vec![r2.engine.clone()]);
    sync_all_concurrently(&url, &after).await;
    let seen = sampler.stop();
    eprintln!("sessions seen on replica 2 after replica 1 was killed: {seen:?}");
    assert!(seen[0] > 0, "replica 2 served the syncs");
    // A raw client too: every new session lands on the survivor.
    for s in 0..4 {
        raw.send_json(
            json!(["NEG-OPEN", format!("after{s}"), {"kinds": [1], "limit": 10}, "6100"]),
        )
        .await;
        let v = raw.recv().await;
        assert_eq!(v[0], "NEG-MSG", "{v}");
    }
    let on_r2 = r2
        .engine
        .list_sessions()
        .iter()
        .filter(|s| s.subscription_id.starts_with("after"))
        .count();
    assert_eq!(on_r2, 4);
    running.stop().await.unwrap();
}

/// A peer relay with NIP-77 (engine in-process).
async fn peer_relay() -> TestRelay {
    let relay = TestRelay::start(Mode::Local).await;
    let engine = NegentropyEngine::new(relay.store.clone(), EngineSettings::default()).unwrap();
    engine.spawn_reaper();
    relay.running.relay.enable_negentropy(engine);
    relay
}

/// A `SyncManager` replica on a runtime of its own, running its periodic loop.
struct ManagerReplica {
    runtime: Option<tokio::runtime::Runtime>,
    manager: Arc<SyncManager>,
}

impl ManagerReplica {
    fn start(name: &str, store: SharedStore, settings: SyncSettings) -> Self {
        let runtime = replica_runtime(name);
        let manager = SyncManager::new(store, settings).unwrap();
        {
            let _in = runtime.enter();
            assert!(manager.start());
        }
        Self {
            runtime: Some(runtime),
            manager,
        }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ManagerReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Watches both replicas' in-lease peer sets every millisecond: a peer in both at once is a
/// violation. Returns the peers each replica was seen syncing.
struct LeaseWatch {
    violations: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<[BTreeSet<String>; 2]>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseWatch {
    fn start(a: Arc<SyncManager>, b: Arc<SyncManager>) -> Self {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new([BTreeSet::new(), BTreeSet::new()]));
        let task = {
            let (violations, seen) = (violations.clone(), seen.clone());
            tokio::spawn(async move {
                loop {
                    let (sa, sb) = (a.syncing(), b.syncing());
                    for p in sa.iter().filter(|p| sb.contains(p)) {
                        violations.lock().push(p.clone());
                    }
                    {
                        let mut seen = seen.lock();
                        seen[0].extend(sa);
                        seen[1].extend(sb);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        Self {
            violations,
            seen,
            task,
        }
    }

    fn violations(&self) -> Vec<String> {
        self.violations.lock().clone()
    }

    fn seen(&self) -> [BTreeSet<String>; 2] {
        self.seen.lock().clone()
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls until `cond` holds, at most `limit`; returns how long it took.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if cond().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replicas_share_peers_by_lease_and_take_over_a_dead_one() {
    const LEASE_TTL: Duration = Duration::from_secs(3); // the smallest ttl allowed
    const INTERVAL: Duration = Duration::from_millis(250);
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(
        orly_db::sqlite::SqliteStore::open(&dir.path().join("orly.db"))
            .await
            .unwrap(),
    );
    let keys = Keys::generate();
    let t = now() - 100_000;
    let local = notes(&keys, 150, t, "local");
    for e in &local {
        store.save_event(e).await.unwrap();
    }
    let peers = [peer_relay().await, peer_relay().await, peer_relay().await];
    let mut peer_events = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let evs = notes(&keys, 400, t + 10_000 * (i as u64 + 1), &format!("peer{i}"));
        for e in &evs {
            p.store.save_event(e).await.unwrap();
        }
        peer_events.push(evs);
    }
    let urls: Vec<String> = peers.iter().map(|p| p.url()).collect();
    let settings = |holder: &str| SyncSettings {
        interval: INTERVAL,
        lease_ttl: LEASE_TTL,
        peer_timeout: Duration::from_secs(10),
        batch_size: 50,
        holder: holder.to_string(),
        ..SyncSettings::default()
    };
    // The peer list lives in the store: added once, both replicas see it.
    SyncManager::new(store.clone(), settings("setup"))
        .unwrap()
        .add_peers(&urls)
        .await
        .unwrap();

    let mut a = ManagerReplica::start("sync-a", store.clone(), settings("replica-a"));
    let b = ManagerReplica::start("sync-b", store.clone(), settings("replica-b"));
    let watch = LeaseWatch::start(a.manager.clone(), b.manager.clone());

    // Both loops run for a while: everything converges, and no peer is synced twice at once.
    let everything = {
        let mut all: Vec<&[Event]> = vec![&local];
        all.extend(peer_events.iter().map(Vec::as_slice));
        ids(&all)
    };
    wait_until(Duration::from_secs(60), "the first convergence", || {
        let (store, peers, everything) = (&store, &peers, &everything);
        async move {
            if stored_ids(store, Filter::new()).await != *everything {
                return false;
            }
            for p in peers {
                if stored_ids(&p.store, Filter::new()).await != *everything {
                    return false;
                }
            }
            true
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        watch.violations(),
        Vec::<String>::new(),
        "a peer synced twice at once"
    );
    let seen = watch.seen();
    eprintln!(
        "peers seen in sync: replica-a {:?}, replica-b {:?}",
        seen[0], seen[1]
    );
    let all_urls: BTreeSet<String> = urls.iter().cloned().collect();
    assert_eq!(
        seen[0].union(&seen[1]).cloned().collect::<BTreeSet<_>>(),
        all_urls
    );
    assert!(
        !seen[0].is_empty() && !seen[1].is_empty(),
        "both replicas synced peers: {seen:?}"
    );

    // Kill replica A, preferably while it holds a lease (that peer's lease then lapses only
    // after its ttl, since nothing renews or releases it).
    let mut stuck = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        stuck = a.manager.syncing();
        if !stuck.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    // The watch ends with replica A: a dead replica's in-process state means nothing.
    assert_eq!(
        watch.violations(),
        Vec::<String>::new(),
        "a peer synced twice at once"
    );
    drop(watch);
    a.kill();
    let killed_at = Instant::now();
    let killed_secs = now() as i64;
    eprintln!("replica-a killed while syncing {stuck:?}");

    // Events published to every peer afterwards reach us through replica B alone.
    let mut fresh = BTreeMap::new();
    for (i, url) in urls.iter().enumerate() {
        let mut c = RawClient::connect(url).await;
        let evs = notes(&keys, 5, now() - 50 + i as u64, &format!("fresh{i}"));
        for e in &evs {
            assert_eq!(c.publish(e).await[2], true);
        }
        fresh.insert(url.clone(), evs);
    }
    let fresh_ids = ids(&fresh.values().map(Vec::as_slice).collect::<Vec<_>>());
    let took = wait_until(Duration::from_secs(30), "the fresh events", || {
        let (store, fresh_ids) = (&store, &fresh_ids);
        async move {
            stored_ids(store, Filter::new())
                .await
                .is_superset(fresh_ids)
        }
    })
    .await;
    let since_kill = killed_at.elapsed();
    eprintln!(
        "fresh events from all peers arrived {took:?} after publishing, {since_kill:?} after the kill \
         (lease ttl {LEASE_TTL:?}, interval {INTERVAL:?})"
    );
    // Within one lease period plus a pass and generous slack for a loaded machine.
    assert!(
        since_kill < LEASE_TTL + INTERVAL + Duration::from_secs(5),
        "takeover took {since_kill:?}"
    );
    for url in &urls {
        let state = b
            .manager
            .peers()
            .state(url)
            .await
            .unwrap()
            .expect("peer state");
        assert_eq!(state.holder, "replica-b", "{url} synced by the survivor");
        assert!(
            state.last_sync >= killed_secs,
            "{url} synced after the kill"
        );
    }
    drop(b);
}
