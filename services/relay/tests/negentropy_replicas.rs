//! Horizontal scaling of the negentropy service (issues 5 and 16):
//!
//! - replicas behind one DNS name (a real DNS server answering one name with several loopback
//!   addresses, as a headless Kubernetes Service does): an `orly` relay process and two
//!   `orly sync-negentropy` processes listening on 127.0.0.2:P and 127.0.0.3:P; both get
//!   sessions from 16 concurrent nostr-sdk syncs (by their metrics), a third added to the name
//!   gets sessions once the relay re-resolves, a killed one leaves every new sync working (while
//!   the name still lists it, and after) and its open sessions end with `NEG-ERR "closed: …"`;
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

use common::{clean_orly_command, note, now, Mode, RawClient, RelayProcess, TestRelay};
use nostr::{Event, EventId, Filter, Keys, Kind};
use nostr_sdk::prelude::{
    Client, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, SyncDirection, SyncOptions,
};
use orly_common::{ClientOptions, GrpcChannel};
use orly_db::SharedStore;
use orly_sync_negentropy::{
    EngineSettings, GrpcNegentropy, NegentropyEngine, ReplicatedNegentropy, SyncManager,
    SyncSettings,
};
use orly_testkit::{free_port_on, free_port_on_all, loopback, TestDns};
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
    let t = now() - 400_000 + i as u64 * 5_000;
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
    let handler = ReplicatedNegentropy::connect_lazy(
        &format!("{},{}", r1.addr, r2.addr),
        Duration::from_secs(5),
    )
    .unwrap();
    let relay = orly::Relay::builder(
        orly::RelayConfig::default(),
        store.clone(),
        Arc::new(orly::acl::OpenAcl),
    )
    .negentropy(Arc::new(handler))
    .build();
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
    TestRelay::start_built(Mode::Local, orly::RelayConfig::default(), |b, store| {
        let engine = NegentropyEngine::new(store.clone(), EngineSettings::default()).unwrap();
        engine.spawn_reaper();
        b.negentropy(engine)
    })
    .await
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
    // A sync records its holder when it starts and `last_sync` when it ends, which can be
    // after its events are stored: wait for the end.
    for url in &urls {
        let manager = &b.manager;
        wait_until(
            Duration::from_secs(30),
            &format!("{url} synced by the survivor after the kill"),
            || async move {
                let state = manager
                    .peers()
                    .state(url)
                    .await
                    .unwrap()
                    .expect("peer state");
                state.holder == "replica-b" && state.last_sync >= killed_secs
            },
        )
        .await;
    }
    drop(b);
}

/// The body of `GET path` on `addr` (HTTP/1.0: the server closes when done), or `None` when
/// nothing answers.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    Some(match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => text,
    })
}

/// One `orly sync-negentropy` process on `addr`, with its Prometheus metrics on the same IP,
/// over the SQLite database in `data_dir`; SIGKILLed when dropped.
struct NegProcess {
    child: std::process::Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl NegProcess {
    async fn start(addr: SocketAddr, data_dir: &Path) -> Self {
        let metrics = SocketAddr::new(addr.ip(), free_port_on(addr.ip()));
        let child = clean_orly_command("sync-negentropy")
            .env("ORLY_SYNC_NEGENTROPY_LISTEN", addr.to_string())
            .env("ORLY_SYNC_NEGENTROPY_DB_TYPE", "sqlite")
            .env("ORLY_DATA_DIR", data_dir)
            .env("ORLY_SYNC_NEGENTROPY_AUTOSTART", "false")
            .env("ORLY_METRICS_LISTEN", metrics.to_string())
            .env("ORLY_LOG_LEVEL", "warn")
            .spawn()
            .expect("spawn orly sync-negentropy");
        let mut p = Self {
            child,
            addr,
            metrics,
        };
        // Ready when it lists its sessions and serves its metrics.
        let client = p.client();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("orly sync-negentropy on {addr} exited: {status}");
            }
            if client.list_sessions().await.is_ok()
                && http_get(p.metrics, "/metrics").await.is_some()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the replica on {addr} did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    /// A client of this replica alone.
    fn client(&self) -> GrpcNegentropy {
        let opts = ClientOptions::new("orly-sync-negentropy", Duration::from_secs(5));
        GrpcNegentropy::on(GrpcChannel::connect_lazy(&self.addr.to_string(), opts).unwrap())
    }

    /// The subscription ids of the sessions this replica holds.
    async fn sessions(&self) -> Vec<String> {
        self.client()
            .list_sessions()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.subscription_id)
            .collect()
    }

    /// The sessions this replica opened: its `orly_negentropy_messages_total{type="open"}`.
    async fn opens(&self) -> u64 {
        let text = http_get(self.metrics, "/metrics")
            .await
            .unwrap_or_else(|| panic!("no metrics from the replica on {}", self.addr));
        text.lines()
            .filter(|l| {
                l.starts_with("orly_negentropy_messages_total{") && l.contains("type=\"open\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NegProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How many sessions each replica opened since `before` (replica address → count).
async fn opens_since(
    replicas: &[&NegProcess],
    before: &BTreeMap<SocketAddr, u64>,
) -> BTreeMap<SocketAddr, u64> {
    let mut out = BTreeMap::new();
    for r in replicas {
        let now = r.opens().await;
        out.insert(r.addr, now - before.get(&r.addr).copied().unwrap_or(0));
    }
    out
}

async fn opens_now(replicas: &[&NegProcess]) -> BTreeMap<SocketAddr, u64> {
    opens_since(replicas, &BTreeMap::new()).await
}

async fn store_cases(store: &SharedStore, cases: &[Arc<ClientCase>]) {
    for c in cases {
        for e in c.shared.iter().chain(&c.relay_only) {
            store.save_event(e).await.unwrap();
        }
    }
}

fn cases(range: std::ops::Range<usize>) -> Vec<Arc<ClientCase>> {
    range.map(|i| Arc::new(client_case(i))).collect()
}

/// Issue 16's acceptance, as a user runs it: an `orly` relay process with
/// `ORLY_GRPC_SYNC_NEGENTROPY=neg.orly.test:P`, resolved by a real DNS server
/// (`ORLY_DNS_SERVERS`) to the loopback addresses of `orly sync-negentropy` processes, as a
/// headless Service's name resolves to its pods. Which replica served what comes from the
/// replicas' own metrics (`orly_negentropy_messages_total{type="open"}`) and session lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_one_name_share_sessions_grow_and_lose_one() {
    const CLIENTS: usize = 16;
    const NAME: &str = "neg.orly.test";
    const RESOLVE: Duration = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    // The database the relay and the replicas share (created and migrated here first).
    let store: SharedStore = Arc::new(
        orly_db::sqlite::SqliteStore::open(&dir.path().join("orly.db"))
            .await
            .unwrap(),
    );
    let ips = [loopback(2), loopback(3), loopback(4)];
    let port = free_port_on_all(&ips);
    assert_ne!(port, 0, "a port free on 127.0.0.2-4");
    let at = |ip| SocketAddr::new(ip, port);
    let mut r2 = NegProcess::start(at(ips[0]), dir.path()).await;
    let r3 = NegProcess::start(at(ips[1]), dir.path()).await;
    let dns = TestDns::start().await.unwrap();
    dns.set(NAME, &ips[..2]);
    let relay = RelayProcess::start(&[
        ("ORLY_DB_TYPE", "sqlite".into()),
        ("ORLY_DATA_DIR", dir.path().display().to_string()),
        ("ORLY_SYNC_TYPE", "grpc".into()),
        ("ORLY_NEGENTROPY_ENABLED", "true".into()),
        ("ORLY_GRPC_SYNC_NEGENTROPY", format!("{NAME}:{port}")),
        ("ORLY_DNS_SERVERS", dns.addr().to_string()),
        (
            "ORLY_GRPC_RESOLVE_INTERVAL",
            format!("{}ms", RESOLVE.as_millis()),
        ),
    ])
    .await;
    let url = relay.url.clone();

    // 16 concurrent nostr-sdk syncs land on both replicas.
    let first = cases(0..CLIENTS);
    store_cases(&store, &first).await;
    let before = opens_now(&[&r2, &r3]).await;
    sync_all_concurrently(&url, &first).await;
    let split = opens_since(&[&r2, &r3], &before).await;
    eprintln!("sessions opened per replica by {CLIENTS} concurrent syncs, two replicas: {split:?}");
    assert!(
        split.values().all(|&n| n > 0),
        "a replica got no sessions: {split:?}"
    );
    assert!(split.values().sum::<u64>() >= CLIENTS as u64, "{split:?}");

    // A third replica joins the name: new sessions reach it once the relay re-resolves.
    let r4 = NegProcess::start(at(ips[2]), dir.path()).await;
    let mut raw = RawClient::connect(&url).await;
    dns.set(NAME, &ips);
    let added = Instant::now();
    let mut probes = 0;
    while r4.opens().await == 0 {
        assert!(
            added.elapsed() < Duration::from_secs(30),
            "the third replica got no session in 30 s"
        );
        let sub = format!("probe{probes}");
        probes += 1;
        raw.send_json(json!(["NEG-OPEN", sub, {"kinds": [1], "limit": 10}, "6100"]))
            .await;
        let v = raw.recv().await;
        assert_eq!(v[0], "NEG-MSG", "{v}");
        raw.send_json(json!(["NEG-CLOSE", sub])).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "third replica's first session {:?} after it joined the name ({probes} opens; re-resolve interval {RESOLVE:?})",
        added.elapsed()
    );
    let more = cases(CLIENTS..2 * CLIENTS);
    store_cases(&store, &more).await;
    let before = opens_now(&[&r2, &r3, &r4]).await;
    sync_all_concurrently(&url, &more).await;
    let split = opens_since(&[&r2, &r3, &r4], &before).await;
    eprintln!(
        "sessions opened per replica by {CLIENTS} concurrent syncs, three replicas: {split:?}"
    );
    assert!(
        split.get(&r4.addr).is_some_and(|&n| n > 0),
        "the third replica got none of the syncs: {split:?}"
    );

    // Sessions held open until one lands on replica 2; then replica 2 is killed (the name
    // still lists it, as a Service does until its endpoints catch up).
    let mut on_r2 = None;
    for s in 0..24 {
        let sub = format!("held{s}");
        raw.send_json(json!(["NEG-OPEN", sub, {"kinds": [1], "limit": 10}, "6100"]))
            .await;
        let v = raw.recv().await;
        assert_eq!(v[0], "NEG-MSG", "{v}");
        if r2.sessions().await.contains(&sub) {
            on_r2 = Some(sub);
            break;
        }
    }
    let on_r2 = on_r2.expect("a held session lands on replica 2");
    r2.kill();

    // Its session ends with `closed:`; opened again, it lands on a survivor.
    raw.send_json(json!(["NEG-MSG", on_r2, "6100"])).await;
    let v = raw.recv().await;
    assert_eq!(v[0], "NEG-ERR", "{v}");
    assert_eq!(v[1], on_r2.as_str());
    assert!(
        v[2].as_str().is_some_and(|r| r.starts_with("closed:")),
        "{v}"
    );
    raw.send_json(json!(["NEG-OPEN", on_r2, {"kinds": [1], "limit": 10}, "6100"]))
        .await;
    let v = raw.recv().await;
    assert_eq!(v[0], "NEG-MSG", "reopened on a survivor: {v}");
    assert!(
        r3.sessions().await.contains(&on_r2) || r4.sessions().await.contains(&on_r2),
        "the reopened session is on a survivor"
    );

    // Every new sync works, while the name still lists the dead replica and after it is gone.
    let stale = cases(2 * CLIENTS..3 * CLIENTS);
    store_cases(&store, &stale).await;
    let before = opens_now(&[&r3, &r4]).await;
    sync_all_concurrently(&url, &stale).await;
    let split = opens_since(&[&r3, &r4], &before).await;
    eprintln!(
        "sessions opened per survivor by {CLIENTS} syncs, the dead replica still in DNS: {split:?}"
    );
    assert!(split.values().sum::<u64>() >= CLIENTS as u64, "{split:?}");
    dns.set(NAME, &ips[1..]);
    let gone = cases(3 * CLIENTS..4 * CLIENTS);
    store_cases(&store, &gone).await;
    let before = opens_now(&[&r3, &r4]).await;
    sync_all_concurrently(&url, &gone).await;
    let split = opens_since(&[&r3, &r4], &before).await;
    eprintln!(
        "sessions opened per survivor by {CLIENTS} syncs, the dead replica out of DNS: {split:?}"
    );
    assert!(split.values().all(|&n| n > 0), "{split:?}");

    for c in first.iter().chain(&more).chain(&stale).chain(&gone) {
        let author = Filter::new().author(c.keys.public_key());
        assert_eq!(
            stored_ids(&store, author).await,
            ids(&[&c.shared, &c.client_only, &c.relay_only]),
            "the relay holds the union"
        );
    }
    drop(raw);
    drop(relay);
    drop((r3, r4));
}
