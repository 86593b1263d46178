//! Leases on the database's clock, held under a local deadline (issue 16): a fenced write by a
//! deposed holder is refused; a replica whose renewals fail (its store became unreachable)
//! stops working its peers before their leases expire; replicas whose wall clocks disagree by
//! 30 s split the peers fairly and never work one at once.
//!
//! A replica runs on a tokio runtime of its own; killing it shuts that runtime down, ending
//! every task of it at once with its leases unreleased, as when the process dies.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use orly_db::SharedStore;
use orly_peering::{
    Acquired, FencedPeer, Lease, PeerBook, PeerError, Shard, ShardOwner, SkewedClock,
};
use parking_lot::Mutex;

async fn sqlite(path: &Path) -> SharedStore {
    Arc::new(orly_db::sqlite::SqliteStore::open(path).await.unwrap())
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn wall_ms() -> i64 {
    orly_common::time::now_ms_i64()
}

async fn held(book: &PeerBook, url: &str, holder: &str, ttl: Duration) -> Lease {
    match book.acquire(url, holder, ttl).await.unwrap() {
        Acquired::Held(l) => l,
        Acquired::Busy { holder, .. } => panic!("{url} is held by {holder}"),
    }
}

/// Waits until `cond` holds, checking `invariant` all along (generous: a loaded machine).
async fn until(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
    mut invariant: impl FnMut() -> Result<(), String>,
) {
    let started = Instant::now();
    loop {
        if let Err(e) = invariant() {
            panic!("{what}: {e}");
        }
        if cond() {
            return;
        }
        assert!(started.elapsed() < limit, "{what}: timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_fenced_write_by_a_deposed_holder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("t.db")).await;
    let book = PeerBook::new(store.clone(), "cluster");
    let url = "http://peer.example";
    let ttl = Duration::from_millis(400);

    let a = held(&book, url, "replica-a", ttl).await;
    let by_a = book.fenced(url, a.clone());
    by_a.set_last_serial(100).await.unwrap();
    by_a.save_state(&serde_json::json!({"by": "a"}))
        .await
        .unwrap();
    assert_eq!(book.last_serial(url).await.unwrap(), Some(100));

    // A stops renewing (it hangs, say); the lease lapses and B takes the peer over.
    let b = loop {
        match book.acquire(url, "replica-b", ttl).await.unwrap() {
            Acquired::Held(l) => break l,
            Acquired::Busy { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let by_b = book.fenced(url, b);
    by_b.set_last_serial(200).await.unwrap();
    by_b.save_state(&serde_json::json!({"by": "b"}))
        .await
        .unwrap();

    // A wakes up with an older page and tries to record it: refused, nothing moves back.
    let e = by_a.set_last_serial(50).await.unwrap_err();
    assert!(matches!(e, PeerError::Lost(_)), "{e:?}");
    let e = by_a
        .save_state(&serde_json::json!({"by": "a, late"}))
        .await
        .unwrap_err();
    assert!(matches!(e, PeerError::Lost(_)), "{e:?}");
    assert_eq!(book.last_serial(url).await.unwrap(), Some(200));
    let state: serde_json::Value = book.state(url).await.unwrap().unwrap();
    assert_eq!(state["by"], "b");

    // The database refuses it too, without the local deadline's help: a holder that never
    // held the lease writes nothing.
    assert!(!store
        .set_marker_fenced(
            &book.key("peer", url),
            &7u64.to_be_bytes(),
            &book.lease_name(url),
            "replica-a"
        )
        .await
        .unwrap());
    assert_eq!(book.last_serial(url).await.unwrap(), Some(200));
}

#[tokio::test]
async fn work_under_a_lease_outlives_its_ttl_while_renewals_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("t.db")).await;
    let book = PeerBook::new(store, "distributed");
    let ttl = Duration::from_millis(300);
    let lease = held(&book, "http://p", "a", ttl).await;
    let out = lease
        .hold(async {
            tokio::time::sleep(ttl * 5).await;
            42
        })
        .await
        .unwrap();
    assert_eq!(out, 42);
    // Someone else taking the lease (it was released) ends the work at the next renewal.
    lease.release().await;
    assert!(!lease.is_held());
    let e = lease.hold(std::future::pending::<()>()).await.unwrap_err();
    assert_eq!(e.why, "released");
}

/// Who works on which target now, across replicas; a second worker on a target is a violation.
#[derive(Default)]
struct Board {
    working: Mutex<HashMap<String, String>>,
    violations: Mutex<Vec<String>>,
    /// (holder, target) → wall ms when its work was dropped.
    stopped: Mutex<HashMap<(String, String), i64>>,
}

struct OnBoard {
    board: Arc<Board>,
    target: String,
    holder: String,
}

impl Drop for OnBoard {
    fn drop(&mut self) {
        self.board.working.lock().remove(&self.target);
        self.board
            .stopped
            .lock()
            .insert((self.holder.clone(), self.target.clone()), wall_ms());
    }
}

impl Board {
    fn enter(self: &Arc<Self>, target: &str, holder: &str) -> OnBoard {
        let mut working = self.working.lock();
        if let Some(other) = working.get(target) {
            self.violations.lock().push(format!(
                "{target}: {holder} started while {other} works on it"
            ));
        }
        working.insert(target.to_string(), holder.to_string());
        OnBoard {
            board: self.clone(),
            target: target.to_string(),
            holder: holder.to_string(),
        }
    }

    fn violations(&self) -> Result<(), String> {
        let v = self.violations.lock();
        if v.is_empty() {
            Ok(())
        } else {
            Err(v.join("; "))
        }
    }
}

/// A sharded service whose work on a target records a serial every 20 ms; a failed write does
/// not stop it (only losing the lease does).
struct Owner {
    targets: Vec<String>,
    holder: String,
    board: Arc<Board>,
}

#[async_trait]
impl ShardOwner for Owner {
    async fn targets(&self) -> Result<Vec<String>, String> {
        Ok(self.targets.clone())
    }

    fn work(self: Arc<Self>, target: String, peer: FencedPeer) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let _on = self.board.enter(&target, &self.holder);
            let mut n = 0u64;
            loop {
                n += 1;
                let _ = peer.set_last_serial(n).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}

const TARGETS: [&str; 4] = ["http://a", "http://b", "http://c", "http://d"];

fn owner(holder: &str, board: &Arc<Board>) -> Arc<Owner> {
    Arc::new(Owner {
        targets: TARGETS.map(String::from).to_vec(),
        holder: holder.into(),
        board: board.clone(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_renewals_fail_stops_before_its_leases_expire() {
    let ttl = Duration::from_millis(1500);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let direct = sqlite(&db).await;

    // Replica A reaches the database through an orly-db server that will die.
    let db_rt = runtime("orly-db");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let db_addr = listener.local_addr().unwrap();
    let served = direct.clone();
    db_rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = orly_db::grpc_server::serve(listener, served, std::future::pending()).await;
    });
    let via_grpc: SharedStore = Arc::new(
        orly_db::grpc_client::GrpcStore::with_options(
            &db_addr.to_string(),
            orly_common::ClientOptions::new("orly-db", Duration::from_millis(400)),
        )
        .unwrap(),
    );

    let board = Arc::new(Board::default());
    let a = Arc::new(Shard::new(
        PeerBook::new(via_grpc, "distributed"),
        "replica-a".into(),
        ttl,
    ));
    let a_task = a.spawn(owner("replica-a", &board));
    until(
        "A takes every target",
        Duration::from_secs(20),
        || a.owned().len() == 4,
        || board.violations(),
    )
    .await;
    let b = Arc::new(Shard::new(
        PeerBook::new(direct.clone(), "distributed"),
        "replica-b".into(),
        ttl,
    ));
    let b_task = b.spawn(owner("replica-b", &board));
    until(
        "the targets split between A and B",
        Duration::from_secs(20),
        || a.owned().len() == 2 && b.owned().len() == 2,
        || board.violations(),
    )
    .await;
    let on_a = a.owned();

    // A's store goes away: its renewals fail from now on.
    db_rt.shutdown_background();
    let book = PeerBook::new(direct.clone(), "distributed");
    let mut expiry = HashMap::new();
    for t in &on_a {
        match book
            .acquire(t, "probe", Duration::from_millis(1))
            .await
            .unwrap()
        {
            Acquired::Busy {
                holder,
                remaining_ms,
            } => {
                assert_eq!(holder, "replica-a");
                expiry.insert(t.clone(), wall_ms() + remaining_ms);
            }
            Acquired::Held(_) => panic!("{t}: A's lease lapsed before A lost its store"),
        }
    }

    // B takes A's targets once the leases lapse; at no time do two replicas work one.
    until(
        "B takes A's targets over",
        Duration::from_secs(30),
        || b.owned().len() == 4,
        || board.violations(),
    )
    .await;
    assert!(a.owned().is_empty(), "A stopped working: {:?}", a.owned());
    let stopped = board.stopped.lock().clone();
    for t in &on_a {
        let at = stopped
            .get(&("replica-a".to_string(), t.clone()))
            .copied()
            .unwrap_or_else(|| panic!("A never stopped working {t}"));
        // SQLite's clock is this machine's clock, so the two compare.
        assert!(
            at < expiry[t],
            "A stopped working {t} at {at}, after its lease expired at {}",
            expiry[t]
        );
    }
    a_task.abort();
    b_task.abort();
    b.release_all().await;
}

/// Replica `skewed` runs with its wall clock 30 s ahead. It starts alone and takes every
/// target; when `fair` joins, it must see `fair`'s heartbeat as live (the database's clock,
/// not its own, says so) and hand half back; when either dies the other takes over.
async fn skewed_replicas(kill_skewed: bool) {
    let ttl = Duration::from_millis(900);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let board = Arc::new(Board::default());
    let skewed_rt = runtime("skewed");
    let fair_rt = runtime("fair");
    let make = |rt: &tokio::runtime::Runtime, store: SharedStore, holder: &str, offset_ms: i64| {
        let shard = Arc::new(Shard::with_clock(
            PeerBook::new(store, "cluster"),
            holder.into(),
            ttl,
            Arc::new(SkewedClock { offset_ms }),
        ));
        let _in = rt.enter();
        shard.spawn(owner(holder, &board));
        shard
    };
    let skewed = make(&skewed_rt, sqlite(&db).await, "skewed", 30_000);
    until(
        "the skewed replica takes every target",
        Duration::from_secs(20),
        || skewed.owned().len() == 4,
        || board.violations(),
    )
    .await;
    let fair = make(&fair_rt, sqlite(&db).await, "fair", 0);
    until(
        "the skewed replica hands half over",
        Duration::from_secs(20),
        || skewed.owned().len() == 2 && fair.owned().len() == 2,
        || board.violations(),
    )
    .await;
    let skew = skewed.clock_skew_ms();
    assert!((29_000..=31_000).contains(&skew), "measured skew {skew} ms");
    assert!(fair.clock_skew_ms().abs() < 1_000);
    // Stable over several renewals.
    let settle = Instant::now() + ttl * 3;
    until(
        "a stable split",
        Duration::from_secs(20),
        || Instant::now() > settle,
        || {
            board.violations()?;
            let n = skewed.owned().len() + fair.owned().len();
            (n <= 4).then_some(()).ok_or(format!("{n} targets held"))
        },
    )
    .await;

    let (dying, dying_rt, survivor, survivor_rt) = if kill_skewed {
        (skewed, skewed_rt, fair, fair_rt)
    } else {
        (fair, fair_rt, skewed, skewed_rt)
    };
    dying_rt.shutdown_background();
    drop(dying);
    until(
        "the survivor takes every target",
        Duration::from_secs(30),
        || survivor.owned().len() == 4,
        || board.violations(),
    )
    .await;
    drop(survivor);
    survivor_rt.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_skewed_clocks_never_work_one_peer_at_once_skewed_dies() {
    skewed_replicas(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_skewed_clocks_never_work_one_peer_at_once_fair_dies() {
    skewed_replicas(false).await;
}
