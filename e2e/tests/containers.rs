//! The split deployment as podman containers: two stacks, A and B, each on its own private
//! network with db (orly-db, SQLite on a volume), acl (orly-acl, mode none), negentropy
//! (orly-sync-negentropy) and the relay (orly), each its own container started with the env
//! vars the operator gives that component (`operator/src/plan.rs`). B's negentropy service has
//! A's relay as its peer and is attached to A's network too, so it reaches it by name.
//!
//! From the host, over WebSockets: publish to A and query back; a nostr-sdk NIP-77 sync
//! against A; events crossing between A and B through relay-to-relay sync; `podman kill` of
//! A's negentropy service (NIP-77 answers `NEG-ERR error:`, writes go on) and `podman start`;
//! `podman kill` of A's db (the relay answers `error:` meanwhile) and `podman start`, after
//! which every event acknowledged with OK true is still there; the same for A's relay
//! container, after which B catches up again.
//!
//! Run with `e2e/run-containers.sh` (docs/e2e.md).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nostr::{Event, EventId, Filter, Keys, Kind};
use nostr_sdk::prelude::{
    Client as SdkClient, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, SyncDirection,
    SyncOptions,
};
use orly_e2e::podman::{ContainerSpec, Podman};
use orly_e2e::ws::{self, Client};
use orly_e2e::{free_port, http, note, note_at, now, step, unique_prefix, wait_for};
use serde_json::json;

/// Image repository and tag (`scripts/build-images.sh` tags `localhost/orly-relay/<binary>:<version>`).
fn image(binary: &str) -> String {
    let repository = std::env::var("ORLY_E2E_IMAGE_REPOSITORY")
        .unwrap_or_else(|_| "localhost/orly-relay".into());
    let tag =
        std::env::var("ORLY_E2E_IMAGE_TAG").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into());
    format!("{repository}/{binary}:{tag}")
}

/// How often B's negentropy service syncs with its peer.
const SYNC_INTERVAL: &str = "3s";
/// Longest wait for a relay to serve, for sync to converge.
const SERVE_TIMEOUT: Duration = Duration::from_secs(90);
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for NIP-77 to work again after a restart. After `podman start` of the db, the
/// negentropy service's orly-db client has been seen to time out for up to 60 s (the restarted
/// container has a new IP) while the relay's recovers at once; see docs/e2e.md.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(150);

/// One stack: the OrlyRelay `<prefix>-<stack>` with its children named as the operator names
/// them (`<relay>-db`, `<relay>-acl`, `<relay>-sync-negentropy`, `<relay>-relay`).
struct Stack {
    relay_name: String,
    network: String,
    db: String,
    acl: String,
    negentropy: String,
    relay: String,
    /// Host port the relay's 3334 is published on.
    port: u16,
}

impl Stack {
    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn containers(&self) -> [&str; 4] {
        [&self.db, &self.acl, &self.negentropy, &self.relay]
    }
}

/// Creates the network, the db volume and the four containers of one stack.
/// `peer_network`: another stack's network the negentropy service joins, to dial `peers`.
fn start_stack(
    podman: &Podman,
    stack: &str,
    peers: &[String],
    peer_network: Option<&str>,
) -> Result<Stack> {
    let relay_name = podman.name(stack);
    let network = podman.network(&format!("{stack}-net"))?;
    let volume = podman.volume(&format!("{stack}-db-data"))?;
    let child = |c: &str| format!("{relay_name}-{c}");
    let s = Stack {
        relay_name: relay_name.clone(),
        network: network.clone(),
        db: child("db"),
        acl: child("acl"),
        negentropy: child("sync-negentropy"),
        relay: child("relay"),
        port: free_port(),
    };
    let db_address = format!("{}:50051", s.db);
    let common = |spec: ContainerSpec| {
        spec.network(&network)
            .env("ORLY_LOG_LEVEL", "info")
            .env("ORLY_METRICS_LISTEN", "0.0.0.0:9100")
    };

    // db: SQLite on a volume at /data (the operator's StatefulSet volume claim).
    podman.run(
        &common(ContainerSpec::new(&s.db, image("orly-db")))
            .env("ORLY_DB_LISTEN", "0.0.0.0:50051")
            .env("ORLY_DB_TYPE", "sqlite")
            .env("ORLY_DATA_DIR", "/data")
            .volume(format!("{volume}:/data")),
    )?;
    // acl: its state in orly-db.
    podman.run(
        &common(ContainerSpec::new(&s.acl, image("orly-acl")))
            .env("ORLY_ACL_LISTEN", "0.0.0.0:50052")
            .env("ORLY_ACL_DB_TYPE", "grpc")
            .env("ORLY_ACL_DB_SERVER", &db_address)
            .env("ORLY_ACL_MODE", "none"),
    )?;
    // negentropy: NIP-77 sessions for the relay, relay-to-relay sync with the peers.
    let mut neg = common(ContainerSpec::new(
        &s.negentropy,
        image("orly-sync-negentropy"),
    ))
    .env("ORLY_SYNC_NEGENTROPY_LISTEN", "0.0.0.0:50064")
    .env("ORLY_SYNC_NEGENTROPY_DB_TYPE", "grpc")
    .env("ORLY_SYNC_NEGENTROPY_DB_SERVER", &db_address);
    if !peers.is_empty() {
        neg = neg
            .env("ORLY_SYNC_NEGENTROPY_PEERS", peers.join(","))
            .env("ORLY_SYNC_NEGENTROPY_INTERVAL", SYNC_INTERVAL);
    }
    if let Some(other) = peer_network {
        neg = neg.network(other);
    }
    podman.run(&neg)?;
    // relay: everything over gRPC, NIP-77 on; the only port published to the host.
    podman.run(
        &ContainerSpec::new(&s.relay, image("orly"))
            .network(&network)
            .env("ORLY_LOG_LEVEL", "info")
            .env("ORLY_LISTEN", "0.0.0.0")
            .env("ORLY_PORT", "3334")
            .env("ORLY_DB_TYPE", "grpc")
            .env("ORLY_GRPC_SERVER", &db_address)
            .env("ORLY_ACL_TYPE", "grpc")
            .env("ORLY_GRPC_ACL_SERVER", format!("{}:50052", s.acl))
            .env("ORLY_ACL_MODE", "none")
            .env("ORLY_SYNC_TYPE", "grpc")
            .env(
                "ORLY_GRPC_SYNC_NEGENTROPY",
                format!("{}:50064", s.negentropy),
            )
            .env("ORLY_NEGENTROPY_ENABLED", "true")
            .env("ORLY_AUTH_REQUIRED", "false")
            .publish(format!("127.0.0.1:{}:3334", s.port)),
    )?;
    Ok(s)
}

async fn wait_serving(stack: &Stack) -> Result<()> {
    let url = stack.url();
    wait_for(
        &format!("relay {} serving", stack.relay),
        SERVE_TIMEOUT,
        Duration::from_millis(500),
        || {
            let url = url.clone();
            async move { ws::relay_serves(&url).await.map(|ok| ok.then_some(())) }
        },
    )
    .await
}

/// Waits until every id in `ids` is stored at `stack`.
async fn wait_stored(stack: &Stack, ids: &[EventId], why: &str) -> Result<()> {
    let url = stack.url();
    wait_for(why, SYNC_TIMEOUT, Duration::from_secs(1), || {
        let url = url.clone();
        async move {
            let found = ws::stored_at(&url, ids).await?;
            if found.len() == ids.len() {
                Ok(Some(()))
            } else {
                bail!("{} of {} events there", found.len(), ids.len())
            }
        }
    })
    .await
}

async fn missing_at(stack: &Stack, ids: &[EventId]) -> Result<Vec<EventId>> {
    let found = ws::stored_at(&stack.url(), ids).await?;
    Ok(ids.iter().filter(|i| !found.contains(i)).copied().collect())
}

fn notes(keys: &Keys, label: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| note(keys, &format!("{label} {i}")))
        .collect()
}

/// Publish to A and query back: by ids, by author (newest first), and NIP-11 / `/readyz`.
async fn publish_and_query(a: &Stack, acked: &mut Vec<EventId>) -> Result<()> {
    let (status, _) = http::get(&a.http_addr(), "/readyz", None).await?;
    ensure!(status == 200, "/readyz answered {status}");
    let doc = http::nip11(&a.http_addr()).await?;
    let nips = doc["supported_nips"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        nips.contains(&json!(77)),
        "NIP-11 does not list NIP-77: {doc}"
    );

    let keys = Keys::generate();
    let events = notes(&keys, "publish-and-query", 20);
    let mut c = Client::connect(&a.url()).await?;
    for e in &events {
        let ok = c.publish(e).await?;
        ensure!(ok.accepted, "event refused: {}", ok.message);
        acked.push(e.id);
    }
    // A duplicate is acknowledged as such.
    let dup = c.publish(&events[0]).await?;
    ensure!(
        dup.accepted && dup.message.starts_with("duplicate:"),
        "{dup:?}"
    );
    let ids: Vec<EventId> = events.iter().map(|e| e.id).collect();
    ensure!(
        c.stored_ids(&ids).await?.len() == ids.len(),
        "not every event by id"
    );
    let by_author = c
        .req(json!({"authors": [keys.public_key().to_hex()], "limit": 5}))
        .await?
        .map_err(|r| anyhow::anyhow!("CLOSED: {r}"))?;
    ensure!(by_author.len() == 5, "limit 5 returned {}", by_author.len());
    ensure!(
        by_author
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at),
        "not newest first"
    );
    c.close().await;
    Ok(())
}

/// nostr-sdk's NIP-77 sync against A (both directions): the have/need sets are exact and
/// each side ends with the union.
async fn nip77_sync(a: &Stack, acked: &mut Vec<EventId>) -> Result<()> {
    let keys = Keys::generate();
    let t = now() - 10_000;
    let make = |label: &str, base: u64, n: usize| -> Vec<Event> {
        (0..n)
            .map(|i| note_at(&keys, &format!("{label} {i}"), base + i as u64))
            .collect()
    };
    let shared = make("shared", t, 60);
    let relay_only = make("relay-only", t + 1_000, 15);
    let client_only = make("client-only", t + 2_000, 10);
    let relay_ids =
        ws::publish_all(&a.url(), &[shared.clone(), relay_only.clone()].concat()).await?;
    acked.extend(&relay_ids);

    let db = MemoryDatabase::with_opts(MemoryDatabaseOptions {
        events: true,
        max_events: None,
    });
    for e in shared.iter().chain(&client_only) {
        db.save_event(e).await?;
    }
    let client = SdkClient::builder().database(db).build();
    client.add_relay(a.url()).await?;
    client.connect().await;
    let opts = SyncOptions::new()
        .direction(SyncDirection::Both)
        .initial_timeout(Duration::from_secs(20));
    let filter = Filter::new().kind(Kind::TextNote).author(keys.public_key());
    let out = tokio::time::timeout(Duration::from_secs(60), client.sync(filter.clone(), &opts))
        .await
        .context("NIP-77 sync did not finish in 60 s")??;
    ensure!(out.failed.is_empty(), "sync failed: {:?}", out.failed);
    let set = |s: &std::collections::HashSet<EventId>| s.iter().copied().collect::<BTreeSet<_>>();
    let ids = |v: &[Event]| v.iter().map(|e| e.id).collect::<BTreeSet<_>>();
    ensure!(set(&out.val.local) == ids(&client_only), "have set differs");
    ensure!(set(&out.val.remote) == ids(&relay_only), "need set differs");
    ensure!(
        set(&out.val.received) == ids(&relay_only),
        "received differs"
    );
    ensure!(set(&out.val.sent) == ids(&client_only), "sent differs");
    let local: BTreeSet<EventId> = client
        .database()
        .query(filter)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    ensure!(local.len() == 85, "client holds {} of 85", local.len());
    client.shutdown().await;
    // The relay acknowledged the uploads with OK true: they count as acknowledged.
    let uploaded: Vec<EventId> = client_only.iter().map(|e| e.id).collect();
    ensure!(
        missing_at(a, &uploaded).await?.is_empty(),
        "uploads missing on A"
    );
    acked.extend(uploaded);
    Ok(())
}

/// Relay-to-relay sync: everything acknowledged by A reaches B, and events published to B
/// reach A (B's negentropy service both fetches and uploads).
async fn relay_to_relay(a: &Stack, b: &Stack, acked_a: &mut Vec<EventId>) -> Result<()> {
    let start = Instant::now();
    wait_stored(b, acked_a, "A's events on B").await?;
    eprintln!(
        "    {} events of A on B after {:.1}s",
        acked_a.len(),
        start.elapsed().as_secs_f64()
    );
    let on_b = ws::publish_all(&b.url(), &notes(&Keys::generate(), "published to B", 10)).await?;
    let start = Instant::now();
    wait_stored(a, &on_b, "B's events on A").await?;
    eprintln!(
        "    10 events of B on A after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    acked_a.extend(on_b);
    Ok(())
}

/// `podman kill` of A's db: the relay answers `error:` meanwhile; after `podman start`
/// every acknowledged event is still there, A takes writes again and NIP-77 works again.
async fn db_kill_and_restart(podman: &Podman, a: &Stack, acked: &mut Vec<EventId>) -> Result<()> {
    // Events acknowledged right before the kill.
    acked.extend(ws::publish_all(&a.url(), &notes(&Keys::generate(), "before db kill", 10)).await?);
    let mut c = Client::connect(&a.url()).await?;
    podman.kill(&a.db)?;
    ensure!(!podman.running(&a.db), "db still running after kill");

    let refused = note(&Keys::generate(), "while the db is down");
    let t = Instant::now();
    let ok = c.publish(&refused).await?;
    ensure!(
        !ok.accepted && ok.message.starts_with("error:"),
        "publish with the db down: {ok:?}"
    );
    eprintln!(
        "    publish with db down: OK false {:?} after {:.1}s",
        ok.message,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    match c.req(json!({"kinds": [1], "limit": 10})).await? {
        Err(reason) => {
            ensure!(
                reason.starts_with("error:"),
                "REQ with the db down: CLOSED {reason:?}"
            );
            eprintln!(
                "    REQ with db down: CLOSED {reason:?} after {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
        Ok(events) => bail!("REQ with the db down returned {} events", events.len()),
    }
    let (status, _) = http::get(&a.http_addr(), "/readyz", None).await?;
    eprintln!("    /readyz with db down: {status}");
    c.close().await;

    podman.start(&a.db)?;
    let t = Instant::now();
    wait_for(
        "A takes writes after the db restart",
        SERVE_TIMEOUT,
        Duration::from_millis(500),
        || {
            let url = a.url();
            async move {
                let ev = note(&Keys::generate(), "after db restart");
                let mut c = Client::connect(&url).await?;
                let ok = c.publish(&ev).await?;
                c.close().await;
                Ok(ok.accepted.then_some(()))
            }
        },
    )
    .await?;
    eprintln!(
        "    A takes writes {:.1}s after podman start",
        t.elapsed().as_secs_f64()
    );
    let missing = missing_at(a, acked).await?;
    ensure!(
        missing.is_empty(),
        "{} acknowledged events lost: {missing:?}",
        missing.len()
    );
    ensure!(
        missing_at(a, &[refused.id]).await?.len() == 1,
        "the event refused with error: was stored"
    );
    // The negentropy service reads the same db: NIP-77 must come back too.
    nip77_back(podman, a, acked, "podman start of the db").await?;
    Ok(())
}

/// `podman kill` of A's relay and `podman start`: it serves again on the same port, nothing
/// acknowledged is lost, and sync with B picks up again.
async fn relay_kill_and_restart(
    podman: &Podman,
    a: &Stack,
    b: &Stack,
    acked: &mut Vec<EventId>,
) -> Result<()> {
    podman.kill(&a.relay)?;
    let t = Instant::now();
    match ws::relay_serves(&a.url()).await {
        Ok(_) => bail!("A still serves after kill"),
        Err(e) => eprintln!(
            "    A's relay killed: {e:#} ({:.1}s)",
            t.elapsed().as_secs_f64()
        ),
    }
    podman.start(&a.relay)?;
    let t = Instant::now();
    wait_serving(a).await?;
    eprintln!(
        "    A's relay serves {:.1}s after podman start",
        t.elapsed().as_secs_f64()
    );
    let missing = missing_at(a, acked).await?;
    ensure!(
        missing.is_empty(),
        "{} acknowledged events lost: {missing:?}",
        missing.len()
    );
    let after = ws::publish_all(
        &a.url(),
        &notes(&Keys::generate(), "after relay restart", 5),
    )
    .await?;
    acked.extend(&after);
    let t = Instant::now();
    wait_stored(b, acked, "every event of A on B after A's relay restart").await?;
    let took = t.elapsed();
    eprintln!(
        "    B caught up {:.1}s after the publish",
        took.as_secs_f64()
    );
    if took > Duration::from_secs(10) {
        // B's failed passes against A are in its log.
        eprintln!("    B's negentropy log (slow catch-up):");
        for line in podman.logs(&b.negentropy, 12).lines() {
            eprintln!("      {line}");
        }
        eprintln!("    A's negentropy log:");
        for line in podman.logs(&a.negentropy, 12).lines() {
            eprintln!("      {line}");
        }
    }
    Ok(())
}

/// `podman kill` of A's negentropy service: NIP-77 answers `NEG-ERR error:` meanwhile while
/// the relay keeps taking events; after `podman start` a nostr-sdk sync works again.
async fn negentropy_kill_and_restart(
    podman: &Podman,
    a: &Stack,
    acked: &mut Vec<EventId>,
) -> Result<()> {
    podman.kill(&a.negentropy)?;
    let mut c = Client::connect(&a.url()).await?;
    c.send(json!(["NEG-OPEN", "neg-down", {"kinds": [1]}, "61"]))
        .await?;
    let answer = loop {
        let v = c.recv().await?;
        if v[1] == "neg-down" {
            break v;
        }
    };
    ensure!(
        answer[0] == "NEG-ERR" && answer[2].as_str().is_some_and(|r| r.starts_with("error:")),
        "NEG-OPEN with the negentropy service down: {answer}"
    );
    eprintln!("    NEG-OPEN with negentropy down: {answer}");
    c.close().await;
    acked.extend(ws::publish_all(&a.url(), &notes(&Keys::generate(), "negentropy down", 5)).await?);
    podman.start(&a.negentropy)?;
    nip77_back(podman, a, acked, "podman start of the negentropy service").await
}

/// Retries a nostr-sdk NIP-77 sync against A until it works; prints how long that took and,
/// when it took more than 10 s, A's negentropy log.
async fn nip77_back(
    podman: &Podman,
    a: &Stack,
    acked: &mut Vec<EventId>,
    after: &str,
) -> Result<()> {
    let t = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match nip77_sync(a, acked).await {
            Ok(()) => break,
            Err(e) if t.elapsed() < RECOVERY_TIMEOUT => {
                eprintln!("    NIP-77 attempt {attempts} after {after}: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
    let took = t.elapsed();
    eprintln!(
        "    NIP-77 works {:.1}s after {after} ({attempts} attempt(s))",
        took.as_secs_f64()
    );
    if took > Duration::from_secs(10) {
        eprintln!(
            "    SLOW: NIP-77 took {:.1}s to recover; A's negentropy log:",
            took.as_secs_f64()
        );
        for line in podman.logs(&a.negentropy, 12).lines() {
            eprintln!("      {line}");
        }
    }
    Ok(())
}

async fn scenario(podman: &Podman, start: Instant) -> Result<()> {
    step(start, "starting stack A (db, acl, sync-negentropy, relay)");
    let a = start_stack(podman, "a", &[], None)?;
    let peer = format!("ws://{}:3334", a.relay);
    step(start, &format!("starting stack B, peer {peer}"));
    let b = start_stack(podman, "b", &[peer], Some(&a.network))?;
    eprintln!(
        "    A = {} on {} (ws://127.0.0.1:{}), B = {} on {} (ws://127.0.0.1:{})",
        a.relay_name, a.network, a.port, b.relay_name, b.network, b.port
    );
    wait_serving(&a).await?;
    wait_serving(&b).await?;
    for s in [&a, &b] {
        for c in s.containers() {
            ensure!(podman.running(c), "{c} is not running");
        }
    }
    step(start, "both relays serve");

    let mut acked: Vec<EventId> = Vec::new();
    publish_and_query(&a, &mut acked)
        .await
        .context("publish and query")?;
    step(start, "publish and query on A: ok");
    nip77_sync(&a, &mut acked).await.context("NIP-77 sync")?;
    step(start, "nostr-sdk NIP-77 sync against A: ok");
    relay_to_relay(&a, &b, &mut acked)
        .await
        .context("relay-to-relay sync")?;
    step(start, "relay-to-relay sync A <-> B: ok");
    negentropy_kill_and_restart(podman, &a, &mut acked)
        .await
        .context("negentropy kill and restart")?;
    step(
        start,
        "kill and restart of A's negentropy service: NIP-77 back",
    );
    db_kill_and_restart(podman, &a, &mut acked)
        .await
        .context("db kill and restart")?;
    step(
        start,
        "kill and restart of A's db: nothing acknowledged lost",
    );
    relay_kill_and_restart(podman, &a, &b, &mut acked)
        .await
        .context("relay kill and restart")?;
    step(
        start,
        "kill and restart of A's relay: nothing lost, sync holds",
    );
    eprintln!("    {} acknowledged events checked", acked.len());
    Ok(())
}

#[tokio::test]
#[ignore = "needs podman and the orly images: run e2e/run-containers.sh"]
async fn two_split_stacks_sync_and_survive_restarts() {
    let start = Instant::now();
    let podman = Podman::new(unique_prefix("orly-e2e"));
    let result = scenario(&podman, start).await;
    if let Err(e) = &result {
        podman.dump_logs(30);
        panic!("container e2e failed: {e:#}");
    }
    step(start, "container e2e passed");
    eprintln!(
        "container e2e wall time: {:.1}s",
        start.elapsed().as_secs_f64()
    );
    drop(podman);
}
