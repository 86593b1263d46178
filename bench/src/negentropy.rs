//! `orly-negentropy-bench`'s parts: the corpus, stores filled from a shared base, the
//! reconciliation alone (two negentropy instances in-process) and a full relay-to-relay sync
//! between two real orly relays, and the results table.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nostr::{Event, EventId, Filter, Timestamp};
use orly_db::SharedStore;
use orly_sync_negentropy::set::build_storage;
use orly_sync_negentropy::{EngineSettings, NegentropyEngine, SyncManager, SyncSettings};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::dataset::{self, Shape, Times};

/// Where the differing events lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    Random,
    Recent,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Random => "random",
            Layout::Recent => "recent",
        }
    }

    /// Event indices, the differing ones first.
    pub fn order(self, n: usize) -> Vec<usize> {
        match self {
            Layout::Random => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(n as u64));
                order
            }
            Layout::Recent => (0..n).rev().collect(),
        }
    }
}

/// `n` signed text notes over 16 keys, one every 26 s (about a month per 100,000): the index
/// order is the time order, which the `recent` layout relies on.
pub fn corpus(n: usize) -> Vec<Event> {
    let shape = Shape {
        times: Times::Steady {
            base: 1_700_000_000,
            step: 26,
        },
        ..Shape::notes(16, n as u64, "negentropy bench")
    };
    dataset::generate(n, &shape)
        .expect("sign the corpus")
        .events
}

/// A SQLite store at `path`.
pub async fn open_store(path: &std::path::Path) -> SharedStore {
    Arc::new(
        orly_db::sqlite::SqliteStore::open(path)
            .await
            .expect("open SQLite store"),
    )
}

/// Saves `events`, pausing now and then so the store can checkpoint its WAL.
async fn fill(store: &SharedStore, events: &[&Event], concurrency: usize) {
    dataset::fill(
        store,
        events.iter().copied(),
        concurrency,
        Some(Duration::from_millis(600)),
    )
    .await
    .expect("fill a store");
}

async fn stored(store: &SharedStore) -> Vec<(Timestamp, EventId)> {
    store
        .negentropy_items(&[Filter::new()])
        .await
        .expect("negentropy items")
}

/// (a): two negentropy instances over the two sets, messages passed in-process.
pub struct Reconciliation {
    pub rounds: u32,
    pub up: u64,
    pub down: u64,
    pub have: usize,
    pub need: usize,
    pub time: Duration,
}

/// Reconciles `ours` against `theirs` in-process.
pub fn reconcile_alone(
    ours: &[(Timestamp, EventId)],
    theirs: &[(Timestamp, EventId)],
    frame_size: u64,
) -> Reconciliation {
    let started = Instant::now();
    let mut client =
        negentropy::Negentropy::owned(build_storage(ours).expect("client storage"), frame_size)
            .expect("client");
    let mut server =
        negentropy::Negentropy::owned(build_storage(theirs).expect("server storage"), frame_size)
            .expect("server");
    let mut msg = client.initiate().expect("initiate");
    let (mut up, mut down, mut rounds) = (msg.len() as u64, 0u64, 0u32);
    let (mut have, mut need) = (Vec::new(), Vec::new());
    loop {
        let reply = server.reconcile(&msg).expect("server reconcile");
        rounds += 1;
        down += reply.len() as u64;
        match client
            .reconcile_with_ids(&reply, &mut have, &mut need)
            .expect("client reconcile")
        {
            Some(next) => {
                up += next.len() as u64;
                msg = next;
            }
            None => break,
        }
    }
    Reconciliation {
        rounds,
        up,
        down,
        have: have.len(),
        need: need.len(),
        time: started.elapsed(),
    }
}

/// An orly relay on `store` answering NIP-77, on a loopback port.
pub async fn relay_with_negentropy(store: SharedStore) -> orly::RunningRelay {
    let engine = NegentropyEngine::new(
        store.clone(),
        EngineSettings {
            max_records: 0,
            ..EngineSettings::default()
        },
    )
    .expect("engine");
    engine.spawn_reaper();
    let relay = orly::Relay::builder(
        orly::RelayConfig::default(),
        store,
        Arc::new(orly::acl::OpenAcl),
    )
    .negentropy(engine)
    .build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    orly::spawn(listener, relay).expect("spawn relay")
}

/// One case: a size, a layout and a difference.
pub struct Row {
    pub layout: Layout,
    pub n: usize,
    pub pct: usize,
    pub diffs: usize,
    pub rec: Reconciliation,
    pub goal: u64,
    pub sync: orly_sync_negentropy::SyncReport,
    pub converged: bool,
    pub fill: Duration,
}

/// Milliseconds, rounded.
pub fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// The results as one table: the case | (a) | (b) | the fill time.
pub fn table(rows: &[Row]) -> String {
    let head = [
        "diffs@", "events", "diff%", "diffs", "|", "rounds", "up_B", "down_B", "goal_B", "ok",
        "rec_ms", "|", "rounds", "rec_up_B", "rec_dn_B", "ws_up_B", "ws_dn_B", "fetched", "sent",
        "rec_ms", "sync_ms", "same", "|", "fill_s",
    ];
    let mut t = vec![head.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    t.extend(rows.iter().map(cells));
    crate::table::render(&t)
}

/// One row of [`table`].
pub fn cells(r: &Row) -> Vec<String> {
    let s = &r.sync;
    let yes = |b: bool| if b { "yes" } else { "NO" }.to_string();
    vec![
        r.layout.name().to_string(),
        r.n.to_string(),
        r.pct.to_string(),
        r.diffs.to_string(),
        "|".into(),
        r.rec.rounds.to_string(),
        r.rec.up.to_string(),
        r.rec.down.to_string(),
        r.goal.to_string(),
        yes(r.rec.up + r.rec.down <= r.goal),
        ms(r.rec.time),
        "|".into(),
        s.rounds.to_string(),
        s.reconcile_bytes_sent.to_string(),
        s.reconcile_bytes_received.to_string(),
        s.bytes_sent.to_string(),
        s.bytes_received.to_string(),
        s.fetched.to_string(),
        s.sent.to_string(),
        ms(s.reconcile_time),
        ms(s.total_time),
        yes(r.converged),
        "|".into(),
        format!("{:.1}", r.fill.as_secs_f64()),
    ]
}

/// Copies a SQLite store's files (database and WAL; the WAL index is rebuilt on open). The
/// store must have no write in flight.
pub fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    std::fs::copy(from, to).expect("copy store");
    let wal = |p: &std::path::Path| {
        let mut s = p.as_os_str().to_owned();
        s.push("-wal");
        std::path::PathBuf::from(s)
    };
    if wal(from).exists() {
        std::fs::copy(wal(from), wal(to)).expect("copy store WAL");
    }
}

/// The store both sides share for one size and layout: it holds `order[filled..]`, the events
/// that differ in none of the cases still to run (cases run from the largest difference down,
/// and the base grows between them), and is copied for each side of a case.
pub struct Base {
    pub path: std::path::PathBuf,
    pub store: SharedStore,
    pub filled: usize,
}

/// How stores are filled and messages framed.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Largest negentropy message (bytes; 0 = unlimited).
    pub frame_size: u64,
    /// Concurrent saves while filling a store.
    pub fill_concurrency: usize,
}

/// Runs one case on copies of `base`: fills the differences, reconciles in-process, then
/// syncs two real relays and checks they hold the same set.
pub async fn run_one(
    args: &Settings,
    dir: &std::path::Path,
    all: &[Event],
    layout: Layout,
    order: &[usize],
    base: &mut Base,
    pct: usize,
) -> Row {
    let n = all.len();
    let diffs = n * pct / 100;
    assert!(
        diffs <= base.filled,
        "cases run from the largest difference down"
    );
    let started = Instant::now();
    // The events that differ in no case from here on go into the base first.
    let common: Vec<&Event> = order[diffs..base.filled].iter().map(|&i| &all[i]).collect();
    fill(&base.store, &common, args.fill_concurrency).await;
    base.filled = diffs;
    // The first `diffs` of the order differ: even positions only ours, odd only theirs.
    let (mut ours_only, mut theirs_only): (Vec<&Event>, Vec<&Event>) = (Vec::new(), Vec::new());
    for (k, &i) in order[..diffs].iter().enumerate() {
        if k % 2 == 0 {
            ours_only.push(&all[i]);
        } else {
            theirs_only.push(&all[i]);
        }
    }
    let case = dir.join(format!("{}-n{n}-p{pct}", layout.name()));
    std::fs::create_dir_all(&case).expect("scratch dir");
    copy_store(&base.path, &case.join("a.db"));
    copy_store(&base.path, &case.join("b.db"));
    let store_a = open_store(&case.join("a.db")).await;
    let store_b = open_store(&case.join("b.db")).await;
    tokio::join!(
        fill(&store_a, &ours_only, args.fill_concurrency),
        fill(&store_b, &theirs_only, args.fill_concurrency)
    );
    let (ours_only, theirs_only) = (ours_only.len(), theirs_only.len());
    let fill_time = started.elapsed();
    eprintln!(
        "{} n={n} diff={pct}%: stores ready ({} + {} events) in {fill_time:.1?}",
        layout.name(),
        n - theirs_only,
        n - ours_only,
    );

    // (a) The reconciliation alone.
    let (items_a, items_b) = (stored(&store_a).await, stored(&store_b).await);
    assert_eq!(items_a.len(), n - theirs_only, "store A holds every event");
    assert_eq!(items_b.len(), n - ours_only, "store B holds every event");
    let rec = tokio::task::block_in_place(|| reconcile_alone(&items_a, &items_b, args.frame_size));
    assert_eq!(rec.have, ours_only, "reconciliation: have");
    assert_eq!(rec.need, theirs_only, "reconciliation: need");
    let goal = 3 * diffs as u64 * 32 + 16 * 1024;
    drop((items_a, items_b));

    // (b) Full relay-to-relay sync between two real relays.
    let relay_a = relay_with_negentropy(store_a.clone()).await;
    let relay_b = relay_with_negentropy(store_b.clone()).await;
    let manager = SyncManager::new(
        store_a.clone(),
        SyncSettings {
            max_records: 0,
            frame_size: args.frame_size,
            interval: Duration::from_secs(3600),
            peer_timeout: Duration::from_secs(600),
            ..SyncSettings::default()
        },
    )
    .expect("sync manager");
    let sync = manager
        .sync_peer(&relay_b.url(), None, &mut |_| {})
        .await
        .expect("relay-to-relay sync");
    assert_eq!(sync.have_count as usize, ours_only, "sync: have");
    assert_eq!(sync.need_count as usize, theirs_only, "sync: need");
    let set_a: BTreeSet<EventId> = stored(&store_a).await.into_iter().map(|x| x.1).collect();
    let set_b: BTreeSet<EventId> = stored(&store_b).await.into_iter().map(|x| x.1).collect();
    let converged = set_a == set_b && set_a.len() == n;
    let _ = relay_a.stop().await;
    let _ = relay_b.stop().await;
    drop((store_a, store_b, manager));
    let _ = std::fs::remove_dir_all(&case);
    Row {
        layout,
        n,
        pct,
        diffs,
        rec,
        goal,
        sync,
        converged,
        fill: fill_time,
    }
}
