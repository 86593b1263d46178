//! orly-db replicas on one PostgreSQL database behind one DNS name (issue 16), with real
//! processes: a real DNS server (`orly_testkit::TestDns`) answers `db.orly.test` with loopback
//! addresses 127.0.0.2, 127.0.0.3, … (what a headless Kubernetes Service's name gives: one
//! address per ready pod); an `orly db` process listens on each, all on one PostgreSQL
//! database; an `orly` relay process in split mode has `ORLY_GRPC_DB_SERVER=db.orly.test:P`.
//!
//! - writes and queries from several WebSocket clients reach both replicas;
//! - a third replica added to the name gets calls once the relay re-resolves
//!   (`ORLY_GRPC_RESOLVE_INTERVAL`);
//! - with one replica killed every write is accepted and every query answered, while the name
//!   still lists the dead replica and after it is gone.
//!
//! Which replica served what is read from the replicas themselves. orly-db exports no per-call
//! metric, so each replica logs the HTTP/2 frames it receives (`h2::codec::framed_read` at
//! debug) and every request `HEADERS` frame counts as one call (gRPC clients send no trailers).
//!
//! Needs `ORLY_TEST_PG_URL` (`scripts/test-postgres.sh`); without it the test says it is
//! skipped, unless `ORLY_TEST_REQUIRE_PG` is set, which makes it fail instead.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{clean_orly_command, note, now, RawClient, RelayProcess};
use nostr::Keys;
use orly_testkit::{free_port_on_all, loopback, TestDns};
use serde_json::json;
use sqlx::Connection;

const NAME: &str = "db.orly.test";
const RESOLVE: Duration = Duration::from_millis(500);
/// Far more than anything should take: waits end as soon as they can.
const DEADLINE: Duration = Duration::from_secs(60);

/// The admin URL of the test server, or `None` (test skipped) when there is none.
fn pg_url() -> Option<String> {
    match std::env::var("ORLY_TEST_PG_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            // CI sets ORLY_TEST_REQUIRE_PG so that a missing server fails instead of passing.
            assert!(
                std::env::var_os("ORLY_TEST_REQUIRE_PG").is_none(),
                "ORLY_TEST_REQUIRE_PG is set but ORLY_TEST_PG_URL is not: start PostgreSQL with scripts/test-postgres.sh"
            );
            println!("skipping the orly-db replica test: ORLY_TEST_PG_URL is not set");
            None
        }
    }
}

/// `url` with its database replaced by `db` (query string kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

/// A fresh database on the test server, dropped by [`TestDatabase::drop_now`].
struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create(admin_url: String) -> Self {
        let name = format!("orly_replicas_{:016x}", rand::random::<u64>());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to ORLY_TEST_PG_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        Self {
            admin_url,
            name,
            url,
        }
    }

    async fn drop_now(self) {
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await;
            admin.close().await.ok();
        }
    }
}

/// One `orly db` process on `addr` over PostgreSQL, logging the HTTP/2 frames it receives to
/// a file; SIGKILLed when dropped.
struct DbReplica {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl DbReplica {
    /// Spawns the process; [`DbReplica::wait_ready`] waits for it.
    fn spawn(addr: SocketAddr, url: &str, dir: &Path) -> Self {
        let log = dir.join(format!("orly-db-{}.log", addr.ip()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = clean_orly_command("db")
            .env("ORLY_DB_LISTEN", addr.to_string())
            .env("ORLY_DB_TYPE", "postgres")
            .env("ORLY_DB_URL", url)
            .env("ORLY_DB_MAX_CONNECTIONS", "4")
            .env("ORLY_LOG_LEVEL", "warn,h2::codec::framed_read=debug")
            .stderr(stderr)
            .spawn()
            .expect("spawn orly db");
        Self { child, addr, log }
    }

    async fn wait_ready(&mut self) {
        let store = common::grpc_store(self.addr);
        let started = Instant::now();
        while store.ping().await.is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "orly db on {} exited: {status}\n{}",
                    self.addr,
                    self.log_text()
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "orly db on {} did not come up",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// gRPC calls this replica received so far: the request `HEADERS` frames in its log.
    fn calls(&self) -> u64 {
        self.log_text()
            .lines()
            .filter(|l| l.contains("received") && l.contains("frame=Headers"))
            .count() as u64
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DbReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls each replica received since `before` (replica → count).
fn calls_since(
    replicas: &[&DbReplica],
    before: &BTreeMap<SocketAddr, u64>,
) -> BTreeMap<SocketAddr, u64> {
    replicas
        .iter()
        .map(|r| {
            (
                r.addr,
                r.calls() - before.get(&r.addr).copied().unwrap_or(0),
            )
        })
        .collect()
}

fn calls_now(replicas: &[&DbReplica]) -> BTreeMap<SocketAddr, u64> {
    calls_since(replicas, &BTreeMap::new())
}

/// The `orly` relay in split mode, its store at `db` (a name).
async fn start_relay(db: &str, dns: SocketAddr) -> RelayProcess {
    RelayProcess::start(&[
        ("ORLY_DB_TYPE", "grpc".to_string()),
        ("ORLY_GRPC_DB_SERVER", db.to_string()),
        ("ORLY_DNS_SERVERS", dns.to_string()),
        (
            "ORLY_GRPC_RESOLVE_INTERVAL",
            format!("{}ms", RESOLVE.as_millis()),
        ),
        ("ORLY_NEGENTROPY_ENABLED", "false".to_string()),
    ])
    .await
}

/// `clients` WebSocket clients at once, each publishing `events` notes of its own author (every
/// one must be accepted) and then reading them back with a REQ (all of them must come).
async fn write_and_read(url: &str, clients: usize, events: usize) {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_string();
            tokio::spawn(async move {
                let keys = Keys::generate();
                let mut ws = RawClient::connect(&url).await;
                let t = now() - 1_000;
                let mut ids = Vec::new();
                for i in 0..events {
                    let e = note(&keys, &format!("client {c} note {i}"), t + i as u64);
                    let ok = ws.publish(&e).await;
                    assert_eq!(ok[2], true, "write refused: {ok}");
                    ids.push(e.id.to_hex());
                }
                let got = ws
                    .req("mine", &[json!({"authors": [keys.public_key().to_hex()]})])
                    .await
                    .expect("query answered");
                let mut got: Vec<String> = got
                    .iter()
                    .map(|e| e["id"].as_str().unwrap().to_string())
                    .collect();
                got.sort();
                ids.sort();
                assert_eq!(got, ids, "a query returns every write");
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writes and queries succeed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_replicas_behind_one_name_share_load_grow_and_lose_one() {
    const CLIENTS: usize = 8;
    const EVENTS: usize = 20;
    let Some(admin_url) = pg_url() else { return };
    let db = TestDatabase::create(admin_url).await;
    let dir = tempfile::tempdir().unwrap();
    let ips = [loopback(2), loopback(3), loopback(4)];
    let port = free_port_on_all(&ips);
    assert_ne!(port, 0, "a port free on 127.0.0.2-4");
    let at = |ip| SocketAddr::new(ip, port);

    // Two replicas start at once on the empty database (both migrate it).
    let mut r2 = DbReplica::spawn(at(ips[0]), &db.url, dir.path());
    let mut r3 = DbReplica::spawn(at(ips[1]), &db.url, dir.path());
    r2.wait_ready().await;
    r3.wait_ready().await;
    let dns = TestDns::start().await.unwrap();
    dns.set(NAME, &ips[..2]);
    let relay = start_relay(&format!("{NAME}:{port}"), dns.addr()).await;

    // Writes and queries from several clients reach both replicas.
    let before = calls_now(&[&r2, &r3]);
    write_and_read(&relay.url, CLIENTS, EVENTS).await;
    let split = calls_since(&[&r2, &r3], &before);
    eprintln!(
        "calls per orly-db replica for {} writes and {CLIENTS} queries, two replicas: {split:?}",
        CLIENTS * EVENTS
    );
    assert!(
        split.values().sum::<u64>() >= (CLIENTS * EVENTS) as u64,
        "fewer calls than writes counted (has h2's debug log changed?): {split:?}"
    );
    assert!(
        split.values().all(|&n| n > 0),
        "a replica got no calls: {split:?}"
    );

    // A third replica joins the name: it gets calls once the relay re-resolves.
    let mut r4 = DbReplica::spawn(at(ips[2]), &db.url, dir.path());
    r4.wait_ready().await;
    let mut ws = RawClient::connect(&relay.url).await;
    let keys = Keys::generate();
    let base = r4.calls();
    dns.set(NAME, &ips);
    let added = Instant::now();
    let mut writes = 0;
    while r4.calls() == base {
        assert!(
            added.elapsed() < DEADLINE,
            "the third replica got no call in {DEADLINE:?}"
        );
        let e = note(&keys, &format!("probe {writes}"), now() - 500 + writes);
        writes += 1;
        assert_eq!(ws.publish(&e).await[2], true);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "third orly-db replica's first call {:?} after it joined the name ({writes} writes; re-resolve interval {RESOLVE:?})",
        added.elapsed()
    );
    let before = calls_now(&[&r2, &r3, &r4]);
    write_and_read(&relay.url, CLIENTS, EVENTS).await;
    let split = calls_since(&[&r2, &r3, &r4], &before);
    eprintln!(
        "calls per orly-db replica for {} writes and {CLIENTS} queries, three replicas: {split:?}",
        CLIENTS * EVENTS
    );
    assert!(
        split.values().all(|&n| n > 0),
        "a replica got no calls: {split:?}"
    );

    // Replica 2 killed, the name still listing it: every write accepted, every query answered.
    r2.kill();
    let before = calls_now(&[&r3, &r4]);
    write_and_read(&relay.url, CLIENTS, EVENTS).await;
    let e = note(&keys, "after the kill", now());
    assert_eq!(ws.publish(&e).await[2], true);
    let split = calls_since(&[&r3, &r4], &before);
    eprintln!("calls per surviving replica, the dead one still in DNS: {split:?}");
    // And once the name no longer lists it.
    dns.set(NAME, &ips[1..]);
    tokio::time::sleep(RESOLVE * 3).await;
    let before = calls_now(&[&r3, &r4]);
    write_and_read(&relay.url, CLIENTS, EVENTS).await;
    let split = calls_since(&[&r3, &r4], &before);
    eprintln!("calls per surviving replica, the dead one out of DNS: {split:?}");
    assert!(
        split.values().all(|&n| n > 0),
        "a survivor got no calls: {split:?}"
    );
    // Everything written through any replica is there.
    let all = ws
        .req(
            "probes",
            &[json!({"authors": [keys.public_key().to_hex()]})],
        )
        .await
        .expect("query answered");
    assert_eq!(all.len() as u64, writes + 1);

    drop(ws);
    drop(relay);
    drop((r3, r4));
    db.drop_now().await;
}
