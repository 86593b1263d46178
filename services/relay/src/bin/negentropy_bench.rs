//! `orly-negentropy-bench`: NIP-77 / negentropy benchmark (issue 5).
//!
//! For sets of N events (`--sizes`) with 0 %, 1 % and 10 % differences (`--percents`) split
//! between both sides (`--layouts`: the differing events picked at random, interleaved in time
//! with the shared ones, and/or the newest events), it measures:
//!
//! - (a) the reconciliation alone: two negentropy instances in-process over the two sets
//!   (rounds, bytes each way, wall time);
//! - (b) a full relay-to-relay sync: two real orly relays with NIP-77 over SQLite stores in a
//!   scratch directory, `SyncManager::sync_peer` from A to B over a loopback WebSocket
//!   (reconcile, download with verification, upload), then checks both stores hold the same set.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target cargo build --release -p orly --bin orly-negentropy-bench
//! /work/target/release/orly-negentropy-bench --sizes 10000,100000,1000000
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use nostr::{Event, EventBuilder, EventId, Filter, Keys, Timestamp};
use orly_db::SharedStore;
use orly_sync_negentropy::engine::build_storage;
use orly_sync_negentropy::{EngineSettings, NegentropyEngine, SyncManager, SyncSettings};
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Debug, Parser)]
#[command(
    name = "orly-negentropy-bench",
    about = "NIP-77 / negentropy benchmark"
)]
struct Args {
    /// Set sizes (events on the union of both sides).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    sizes: Vec<usize>,
    /// Differences in percent of the set, split between both sides.
    #[arg(long, value_delimiter = ',', default_value = "0,1,10")]
    percents: Vec<usize>,
    /// Largest negentropy message (bytes; 0 = unlimited).
    #[arg(long, default_value_t = 4096)]
    frame_size: u64,
    /// Concurrent saves while filling a store (they group-commit in SQLite).
    #[arg(long, default_value_t = 1024)]
    fill_concurrency: usize,
    /// Where the differing events lie: `random` (uniformly among the shared ones), `recent`
    /// (the newest events: a peer that was away for a while), or both.
    #[arg(long, value_delimiter = ',', default_value = "random,recent")]
    layouts: Vec<Layout>,
    /// Scratch directory for the SQLite stores (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layout {
    Random,
    Recent,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Random => "random",
            Layout::Recent => "recent",
        }
    }

    /// Event indices, the differing ones first.
    fn order(self, n: usize) -> Vec<usize> {
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

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `n` signed text notes over 16 keys, one every 26 s (about a month per 100,000), signed on
/// every core.
fn corpus(n: usize) -> Vec<Event> {
    let keys: Vec<Keys> = (0..16).map(|_| Keys::generate()).collect();
    let threads = cores();
    let chunk = n.div_ceil(threads).max(1);
    let base = 1_700_000_000u64;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let keys = &keys;
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            EventBuilder::text_note(format!("negentropy bench {i}"))
                                .custom_created_at(Timestamp::from(base + i as u64 * 26))
                                .sign_with_keys(&keys[i % keys.len()])
                                .expect("sign")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("signer thread"))
            .collect()
    })
}

async fn open_store(path: &std::path::Path) -> SharedStore {
    Arc::new(
        orly_db::sqlite::SqliteStore::open(path)
            .await
            .expect("open SQLite store"),
    )
}

/// Events saved between pauses while filling a store.
const FILL_CHUNK: usize = 25_000;

/// Saves `events` with many saves in flight, so the SQLite writer commits them in groups. Large
/// fills pause after every [`FILL_CHUNK`] events: the store checkpoints its WAL in the
/// background, and under an unbroken stream of writes the WAL never restarts and grows without
/// bound (gigabytes for a million events).
async fn fill(store: &SharedStore, events: &[&Event], concurrency: usize) {
    for (k, chunk) in events.chunks(FILL_CHUNK).enumerate() {
        if k > 0 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        futures::stream::iter(chunk.iter().copied())
            .map(|e| {
                let store = store.clone();
                async move { store.save_event(e).await.expect("save event") }
            })
            .buffer_unordered(concurrency)
            .for_each(|_| async {})
            .await;
    }
}

async fn stored(store: &SharedStore) -> Vec<(Timestamp, EventId)> {
    store
        .negentropy_items(&[Filter::new()])
        .await
        .expect("negentropy items")
}

/// (a): two negentropy instances over the two sets, messages passed in-process.
struct Reconciliation {
    rounds: u32,
    up: u64,
    down: u64,
    have: usize,
    need: usize,
    time: Duration,
}

fn reconcile_alone(
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

async fn relay_with_negentropy(store: SharedStore) -> orly::RunningRelay {
    let relay = orly::Relay::new(
        orly::RelayConfig::default(),
        store.clone(),
        Arc::new(orly::acl::OpenAcl),
    );
    let engine = NegentropyEngine::new(
        store,
        EngineSettings {
            max_records: 0,
            ..EngineSettings::default()
        },
    )
    .expect("engine");
    engine.spawn_reaper();
    relay.enable_negentropy(engine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    orly::spawn(listener, relay).expect("spawn relay")
}

struct Row {
    layout: Layout,
    n: usize,
    pct: usize,
    diffs: usize,
    rec: Reconciliation,
    goal: u64,
    sync: orly_sync_negentropy::SyncReport,
    converged: bool,
    fill: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn header() -> String {
    format!(
        "{:>6} {:>9} {:>5} {:>7} | {:>6} {:>9} {:>9} {:>9} {:>4} {:>7} | {:>6} {:>9} {:>9} {:>11} {:>11} {:>7} {:>7} {:>7} {:>8} {:>4} | {:>7}",
        "diffs@", "events", "diff%", "diffs",
        "rounds", "up_B", "down_B", "goal_B", "ok", "rec_ms",
        "rounds", "rec_up_B", "rec_dn_B", "ws_up_B", "ws_dn_B", "fetched", "sent",
        "rec_ms", "sync_ms", "same", "fill_s"
    )
}

fn line(r: &Row) -> String {
    let s = &r.sync;
    format!(
        "{:>6} {:>9} {:>5} {:>7} | {:>6} {:>9} {:>9} {:>9} {:>4} {:>7} | {:>6} {:>9} {:>9} {:>11} {:>11} {:>7} {:>7} {:>7} {:>8} {:>4} | {:>7.1}",
        r.layout.name(),
        r.n,
        r.pct,
        r.diffs,
        r.rec.rounds,
        r.rec.up,
        r.rec.down,
        r.goal,
        if r.rec.up + r.rec.down <= r.goal { "yes" } else { "NO" },
        ms(r.rec.time),
        s.rounds,
        s.reconcile_bytes_sent,
        s.reconcile_bytes_received,
        s.bytes_sent,
        s.bytes_received,
        s.fetched,
        s.sent,
        ms(s.reconcile_time),
        ms(s.total_time),
        if r.converged { "yes" } else { "NO" },
        r.fill.as_secs_f64(),
    )
}

/// Copies a SQLite store's files (database and WAL; the WAL index is rebuilt on open). The
/// store must have no write in flight.
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
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
struct Base {
    path: std::path::PathBuf,
    store: SharedStore,
    filled: usize,
}

async fn run_one(
    args: &Args,
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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let scratch = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).expect("scratch dir");
            tempfile::tempdir_in(d).expect("scratch dir")
        }
        None => tempfile::tempdir().expect("scratch dir"),
    };
    let bench_started = Instant::now();
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let t = Instant::now();
        let all = tokio::task::block_in_place(|| corpus(n));
        eprintln!("n={n}: signed {} events in {:.1?}", all.len(), t.elapsed());
        // Largest difference first: the shared base store grows from one case to the next.
        let mut percents = args.percents.clone();
        percents.sort_unstable_by(|a, b| b.cmp(a));
        percents.dedup();
        for &layout in &args.layouts {
            let order = layout.order(n);
            let path = scratch
                .path()
                .join(format!("base-{}-n{n}.db", layout.name()));
            let mut base = Base {
                store: open_store(&path).await,
                path,
                filled: n,
            };
            let mut these = Vec::new();
            for &pct in &percents {
                let row =
                    run_one(&args, scratch.path(), &all, layout, &order, &mut base, pct).await;
                eprintln!("{}", line(&row));
                these.push(row);
            }
            let Base { store, path, .. } = base;
            drop(store);
            for suffix in ["", "-wal", "-shm"] {
                let mut p = path.as_os_str().to_owned();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
            these.reverse();
            rows.extend(these);
        }
    }

    println!();
    println!(
        "orly negentropy benchmark — {} cores, frame size {} B, SQLite stores, loopback WebSocket",
        cores(),
        args.frame_size
    );
    println!("(a) reconciliation alone: two negentropy instances in-process (rounds, bytes up/down, goal ≤ 3 × diffs × 32 + 16 KiB)");
    println!("(b) relay-to-relay sync: SyncManager::sync_peer A → B between two orly relays (rounds, negentropy bytes, WebSocket bytes, events fetched/sent, reconcile and total wall time, same set afterwards)");
    println!();
    println!("{}", header());
    for r in &rows {
        println!("{}", line(r));
    }
    println!();
    println!("Goals (issue 5): 100,000 events with 1 % difference reconciled in ≤ 1 s and fully synced in ≤ 3 s; reconciliation bytes ≤ 3 × (differing ids × 32 B) + 16 KiB.");
    for r in rows.iter().filter(|r| r.n == 100_000 && r.pct == 1) {
        println!(
            "100,000 / 1 % ({}): reconciliation {} ms in-process, {} ms in the relay sync (goal ≤ 1000 ms); full sync {} ms (goal ≤ 3000 ms); bytes {} (goal ≤ {})",
            r.layout.name(),
            ms(r.rec.time),
            ms(r.sync.reconcile_time),
            ms(r.sync.total_time),
            r.rec.up + r.rec.down,
            r.goal
        );
    }
    println!("total run time {:.1?}", bench_started.elapsed());
}
