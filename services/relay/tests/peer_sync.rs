//! Peer sync between three relays on loopback (issue 6), each relay with its own store, in both
//! deployments: `local` runs three `orly` processes with the sync in-process
//! (`ORLY_SYNC_TYPE=local`), `split` runs three `orly-launcher`s, each supervising orly-db, the
//! distributed, cluster and relay group services and a relay reaching them over gRPC.
//!
//! Clients are nostr-sdk (publishing) and raw WebSockets (checking); peers call each other's
//! real HTTP endpoints with NIP-98 signed by their NIP-11 identities.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, note, now, orly_command, RawClient};
use nostr::nips::nip19::ToBech32;
use nostr::{EventBuilder, Keys, Kind, Tag, Timestamp};
use rustix::process::{kill_process, Pid, Signal};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Local,
    Split,
}

/// One relay deployment: an `orly` process (local) or an `orly-launcher` with its children
/// (split), on a data directory that survives restarts.
struct Node {
    mode: Mode,
    port: u16,
    services: [u16; 5],
    data: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn new(mode: Mode, data: &Path) -> Self {
        Self {
            mode,
            port: free_port(),
            services: [
                free_port(),
                free_port(),
                free_port(),
                free_port(),
                free_port(),
            ],
            data: data.to_path_buf(),
            env: Vec::new(),
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn set(&mut self, k: &str, v: impl Into<String>) {
        self.env.push((k.to_string(), v.into()));
    }

    fn start(&mut self) {
        // The launcher starts every service through the same orly binary.
        let mut cmd = orly_command(match self.mode {
            Mode::Local => "",
            Mode::Split => "launcher",
        });
        cmd.env("ORLY_DATA_DIR", &self.data)
            .env("ORLY_RELAY_URL", self.ws())
            .env("ORLY_LOG_LEVEL", "info,orly_sync=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match self.mode {
            Mode::Local => {
                cmd.env("ORLY_LISTEN", "127.0.0.1")
                    .env("ORLY_PORT", self.port.to_string());
            }
            Mode::Split => {
                let [db, dist, cluster, group, _] = self.services;
                let a = |p: u16| format!("127.0.0.1:{p}");
                cmd.env("ORLY_LAUNCHER_RELAY_LISTEN", a(self.port))
                    .env("ORLY_LAUNCHER_DB_LISTEN", a(db))
                    .env("ORLY_LAUNCHER_SYNC_DISTRIBUTED_ENABLED", "true")
                    .env("ORLY_LAUNCHER_SYNC_DISTRIBUTED_LISTEN", a(dist))
                    .env("ORLY_LAUNCHER_SYNC_CLUSTER_ENABLED", "true")
                    .env("ORLY_LAUNCHER_SYNC_CLUSTER_LISTEN", a(cluster))
                    .env("ORLY_LAUNCHER_SYNC_RELAYGROUP_ENABLED", "true")
                    .env("ORLY_LAUNCHER_SYNC_RELAYGROUP_LISTEN", a(group))
                    .env("ORLY_LAUNCHER_STOP_TIMEOUT", "5s");
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn relay");
        let stderr = child.stderr.take().unwrap();
        let sink = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    fn log_text(&self) -> String {
        let log = self.log.lock().unwrap();
        let skip = log.len().saturating_sub(60);
        log[skip..].join("\n")
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = http_get(&format!("{}/readyz", self.http()))
                .await
                .is_some_and(|(s, _)| s == 200);
            let started = self.mode == Mode::Local
                || self
                    .log
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.contains("all services ready"));
            if ready && started {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "relay {} never became ready:\n{}",
            self.ws(),
            self.log_text()
        );
    }

    async fn start_ready(&mut self) {
        self.start();
        self.wait_ready().await;
    }

    /// Graceful stop (SIGTERM; the launcher stops its children in reverse order).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill_process(Pid::from_raw(child.id() as i32).unwrap(), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        kill_tree(&mut child);
    }

    /// SIGKILL of the relay process (local) — no chance to flush or say goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(&mut child);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_tree(child: &mut Child) {
    for pid in children_of(child.id()) {
        let _ = kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// A plain HTTP exchange (no client library, to send exactly what a test wants).
async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

async fn http_get(url: &str) -> Option<(u16, String)> {
    http("GET", url, &[], "").await
}

/// The ids among `ids` that `node` has (checked with a REQ).
async fn present(node: &Node, ids: &[String]) -> BTreeSet<String> {
    let mut c = RawClient::connect(&node.ws()).await;
    let mut out = BTreeSet::new();
    for chunk in ids.chunks(500) {
        let got = c
            .req("p", &[json!({"ids": chunk, "limit": chunk.len()})])
            .await
            .expect("REQ refused");
        out.extend(got.iter().map(|e| e["id"].as_str().unwrap().to_string()));
    }
    out
}

/// Waits until `node` has every id of `ids`.
async fn wait_all(node: &Node, ids: &[String], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = present(node, ids).await;
        if have.len() == ids.len() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: {} has {} of {} events; log:\n{}",
                node.ws(),
                have.len(),
                ids.len(),
                node.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that `node` still lacks every id of `ids` after `wait`.
async fn stays_absent(node: &Node, ids: &[String], wait: Duration, what: &str) {
    tokio::time::sleep(wait).await;
    let have = present(node, ids).await;
    assert!(have.is_empty(), "{what}: {} got {have:?}", node.ws());
}

/// Publishes with nostr-sdk; returns the ids.
async fn publish(node: &Node, events: &[nostr::Event]) -> Vec<String> {
    let client = nostr_sdk::Client::default();
    client.add_relay(node.ws()).await.unwrap();
    client.connect().await;
    let mut ids = Vec::new();
    for e in events {
        let out = client.send_event(e).await.unwrap();
        assert!(
            out.failed.is_empty(),
            "publish to {} failed: {:?}",
            node.ws(),
            out.failed
        );
        ids.push(e.id.to_hex());
    }
    client.disconnect().await;
    ids
}

fn notes(keys: &Keys, prefix: &str, n: usize) -> Vec<nostr::Event> {
    let t = now();
    (0..n)
        .map(|i| note(keys, &format!("{prefix} {i}"), t - 100 + i as u64 % 100))
        .collect()
}

fn membership(admin: &Keys, members: &[&Node], at: u64) -> nostr::Event {
    let mut tags = vec![
        Tag::identifier("membership"),
        Tag::parse(["version", "1"]).unwrap(),
    ];
    for m in members {
        tags.push(Tag::parse(["relay", &m.http(), &m.ws()]).unwrap());
    }
    EventBuilder::new(
        Kind::from(39108),
        r#"{"name":"test","description":"three members"}"#,
    )
    .tags(tags)
    .custom_created_at(Timestamp::from(at))
    .sign_with_keys(admin)
    .unwrap()
}

fn group_config(admin: &Keys, relays: &[&Node], at: u64) -> nostr::Event {
    let relays: Vec<String> = relays.iter().map(|n| n.ws()).collect();
    EventBuilder::new(Kind::from(39105), json!({ "relays": relays }).to_string())
        .tags([Tag::identifier("group")])
        .custom_created_at(Timestamp::from(at))
        .sign_with_keys(admin)
        .unwrap()
}

/// Three nodes of `mode`, each configured by `configure(index, nodes' http URLs)`.
async fn three(
    mode: Mode,
    dirs: &[tempfile::TempDir; 3],
    configure: impl Fn(usize, &mut Node, &[String]),
) -> Vec<Node> {
    let mut nodes: Vec<Node> = dirs.iter().map(|d| Node::new(mode, d.path())).collect();
    let urls: Vec<String> = nodes.iter().map(Node::http).collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        configure(i, n, &urls);
        n.start();
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    nodes
}

fn dirs() -> [tempfile::TempDir; 3] {
    [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ]
}

fn peers_but(i: usize, urls: &[String]) -> String {
    urls.iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, u)| u.clone())
        .collect::<Vec<_>>()
        .join(",")
}

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod local {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Mode::Local).await } )*
        }
        mod split {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Mode::Split).await } )*
        }
    };
}

both_modes!(
    distributed_sync_propagates_and_catches_up_after_a_restart,
    cluster_replicates_members_and_follows_membership_changes,
    relay_group_configs_feed_the_distributed_peers,
);

/// Distributed sync, full mesh: events published to any relay reach the others; a relay
/// stopped in the middle of a stream of writes catches up after its restart with every event
/// once.
async fn distributed_sync_propagates_and_catches_up_after_a_restart(mode: Mode) {
    let dirs = dirs();
    let mut nodes = three(mode, &dirs, |i, n, urls| {
        n.set("ORLY_RELAY_PEERS", peers_but(i, urls));
        n.set("ORLY_SYNC_DISTRIBUTED_INTERVAL", "200ms");
    })
    .await;
    let keys = Keys::generate();
    let mut all = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let ids = publish(n, &notes(&keys, &format!("from {i}"), 10)).await;
        all.extend(ids);
    }
    for n in &nodes {
        wait_all(n, &all, "mesh propagation").await;
    }

    // C goes away in the middle of 200 writes to A.
    let writer_keys = keys.clone();
    let a_ws = nodes[0].ws();
    let events = notes(&writer_keys, "stream", 200);
    let stream_ids: Vec<String> = events.iter().map(|e| e.id.to_hex()).collect();
    let writer = tokio::spawn(async move {
        let client = nostr_sdk::Client::default();
        client.add_relay(a_ws).await.unwrap();
        client.connect().await;
        for e in &events {
            let out = client.send_event(e).await.unwrap();
            assert!(out.failed.is_empty());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client.disconnect().await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    match mode {
        Mode::Local => nodes[2].kill(),
        Mode::Split => nodes[2].stop(),
    }
    writer.await.unwrap();
    let during = present(&nodes[1], &stream_ids).await;
    assert!(!during.is_empty());
    nodes[2].start_ready().await;
    all.extend(stream_ids);
    wait_all(&nodes[2], &all, "catch-up after restart").await;

    // Exactly once: the author's events on C are the 230 published, no more.
    let mut c = RawClient::connect(&nodes[2].ws()).await;
    let got = c
        .req(
            "all",
            &[json!({"authors": [keys.public_key().to_hex()], "limit": 5000})],
        )
        .await
        .unwrap();
    let unique: BTreeSet<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got.len(), all.len());
    assert_eq!(unique.len(), all.len());
    c.send_json(json!(["COUNT", "n", {"authors": [keys.public_key().to_hex()]}]))
        .await;
    let count = c.recv_type("COUNT").await;
    assert_eq!(count[2]["count"], all.len());
}

/// ORLY's service name for the distributed peers works on a local relay as well as the relay
/// name: A is given B as ORLY_SYNC_DISTRIBUTED_PEERS, B is given A as ORLY_RELAY_PEERS (each
/// side must list the other to accept its pulls), and events published to either reach the
/// other. A shadowed name is reported: C has both, and names ORLY_RELAY_PEERS as unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_relay_syncs_with_the_peers_of_orly_sync_distributed_peers() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Node::new(Mode::Local, da.path());
    let mut b = Node::new(Mode::Local, db.path());
    a.set("ORLY_SYNC_DISTRIBUTED_PEERS", b.http());
    b.set("ORLY_RELAY_PEERS", a.http());
    for n in [&mut a, &mut b] {
        n.set("ORLY_SYNC_DISTRIBUTED_INTERVAL", "200ms");
    }
    a.start();
    b.start();
    a.wait_ready().await;
    b.wait_ready().await;
    let keys = Keys::generate();
    let on_b = publish(&b, &notes(&keys, "published on B", 5)).await;
    wait_all(&a, &on_b, "B -> A through ORLY_SYNC_DISTRIBUTED_PEERS").await;
    let on_a = publish(&a, &notes(&keys, "published on A", 5)).await;
    wait_all(&b, &on_a, "A -> B through ORLY_RELAY_PEERS").await;

    let dc = tempfile::tempdir().unwrap();
    let mut c = Node::new(Mode::Local, dc.path());
    c.set("ORLY_SYNC_DISTRIBUTED_PEERS", a.http());
    c.set("ORLY_RELAY_PEERS", "http://127.0.0.1:9");
    c.start_ready().await;
    let warned = c
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("WARN") && l.contains("ORLY_RELAY_PEERS is set but has no effect"));
    assert!(warned, "{}", c.log_text());
}

/// Cluster: membership from kind 39108 by the admin; members replicate each other at once,
/// a relay outside the membership gets nothing until a newer membership names it (no restart),
/// then catches up; privileged events stay where they were published (flag off).
async fn cluster_replicates_members_and_follows_membership_changes(mode: Mode) {
    let admin = Keys::generate();
    let dirs = dirs();
    let nodes = three(mode, &dirs, |_, n, _| {
        n.set(
            "ORLY_CLUSTER_ADMINS",
            admin.public_key().to_bech32().unwrap(),
        );
        n.set("ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS", "false");
        n.set("ORLY_SYNC_CLUSTER_POLL_INTERVAL", "200ms");
        n.set("ORLY_PRIVILEGED_OPEN", "true");
    })
    .await;
    let t0 = now() - 10;
    let first = membership(&admin, &[&nodes[0], &nodes[1]], t0);
    publish(&nodes[0], std::slice::from_ref(&first)).await;
    publish(&nodes[1], std::slice::from_ref(&first)).await;

    let keys = Keys::generate();
    // A live subscription on B sees what arrives from A (delivered by B's store follower).
    let mut live = RawClient::connect(&nodes[1].ws()).await;
    live.send_json(json!(["REQ", "live", {"authors": [keys.public_key().to_hex()]}]))
        .await;
    live.recv_type("EOSE").await;
    let e1 = publish(&nodes[0], &notes(&keys, "members only", 5)).await;
    let mut seen = BTreeSet::new();
    while seen.len() < e1.len() {
        let v = live.recv_type("EVENT").await;
        seen.insert(v[2]["id"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, e1.iter().cloned().collect::<BTreeSet<_>>());
    wait_all(&nodes[1], &e1, "A to B").await;
    let e1b = publish(&nodes[1], &notes(&keys, "from B", 5)).await;
    wait_all(&nodes[0], &e1b, "B to A").await;
    stays_absent(
        &nodes[2],
        &e1,
        Duration::from_millis(800),
        "not a member yet",
    )
    .await;

    // DMs and gift wraps stay local with the flag off.
    let bob = Keys::generate();
    let dm = EventBuilder::new(Kind::EncryptedDirectMessage, "secret")
        .tag(Tag::public_key(bob.public_key()))
        .sign_with_keys(&keys)
        .unwrap();
    let wrap = EventBuilder::new(Kind::GiftWrap, "wrapped")
        .tag(Tag::public_key(bob.public_key()))
        .sign_with_keys(&Keys::generate())
        .unwrap();
    let private = publish(&nodes[0], &[dm, wrap]).await;
    let marker = publish(&nodes[0], &notes(&keys, "after the DMs", 1)).await;
    wait_all(&nodes[1], &marker, "marker after DMs").await;
    assert!(
        present(&nodes[1], &private).await.is_empty(),
        "privileged events were replicated"
    );
    assert_eq!(present(&nodes[0], &private).await.len(), 2);

    // A newer membership adds C: published to A (B gets it by replication) and to C.
    let second = membership(&admin, &[&nodes[0], &nodes[1], &nodes[2]], t0 + 5);
    publish(&nodes[0], std::slice::from_ref(&second)).await;
    publish(&nodes[2], std::slice::from_ref(&second)).await;
    let mut everything = e1.clone();
    everything.extend(e1b.clone());
    everything.extend(marker.clone());
    wait_all(&nodes[2], &everything, "C catches up after joining").await;
    let e3 = publish(&nodes[2], &notes(&keys, "from C", 5)).await;
    wait_all(&nodes[0], &e3, "C to A").await;
    wait_all(&nodes[1], &e3, "C to B").await;
    assert!(
        present(&nodes[2], &private).await.is_empty(),
        "privileged events reached C"
    );
}

/// Relay group: relays with no configured peers start syncing when the admin's group config
/// names them, and stop pulling a relay a newer config drops — without restarts.
async fn relay_group_configs_feed_the_distributed_peers(mode: Mode) {
    let admin = Keys::generate();
    let dirs = dirs();
    let nodes = three(mode, &dirs, |_, n, _| {
        n.set("ORLY_RELAY_GROUP_ADMINS", admin.public_key().to_hex());
        n.set("ORLY_SYNC_DISTRIBUTED_INTERVAL", "200ms");
    })
    .await;
    let keys = Keys::generate();
    let e1 = publish(&nodes[0], &notes(&keys, "before the group", 5)).await;
    stays_absent(&nodes[1], &e1, Duration::from_millis(600), "no group yet").await;

    let t0 = now() - 10;
    let group = group_config(&admin, &[&nodes[0], &nodes[1], &nodes[2]], t0);
    for n in &nodes {
        publish(n, std::slice::from_ref(&group)).await;
    }
    wait_all(&nodes[1], &e1, "group A,B,C: A to B").await;
    wait_all(&nodes[2], &e1, "group A,B,C: A to C").await;

    // A newer config without C: A and B stop pulling from C.
    let smaller = group_config(&admin, &[&nodes[0], &nodes[1]], t0 + 5);
    for n in &nodes {
        publish(n, std::slice::from_ref(&smaller)).await;
    }
    // Let a poll that started before the change finish.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let e3 = publish(&nodes[2], &notes(&keys, "from C, outside", 5)).await;
    stays_absent(
        &nodes[0],
        &e3,
        Duration::from_millis(1000),
        "C left the group",
    )
    .await;
    let e4 = publish(&nodes[1], &notes(&keys, "from B, inside", 5)).await;
    wait_all(&nodes[0], &e4, "B to A after the change").await;
}

/// The relay refuses malformed membership and group configs by their admins, stores nothing
/// of them, and accepts the same kinds from anyone else as ordinary events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_membership_and_group_events_are_refused() {
    let admin = Keys::generate();
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::new(Mode::Local, dir.path());
    node.set("ORLY_CLUSTER_ADMINS", admin.public_key().to_hex());
    node.set("ORLY_RELAY_GROUP_ADMINS", admin.public_key().to_hex());
    node.start_ready().await;
    let mut c = RawClient::connect(&node.ws()).await;
    let bad_membership = EventBuilder::new(Kind::from(39108), "{}")
        .tags([Tag::identifier("membership")])
        .sign_with_keys(&admin)
        .unwrap();
    let bad_url = EventBuilder::new(Kind::from(39108), "{}")
        .tags([
            Tag::identifier("membership"),
            Tag::parse(["relay", "not a url"]).unwrap(),
        ])
        .sign_with_keys(&admin)
        .unwrap();
    let bad_group = EventBuilder::new(Kind::from(39105), r#"{"relays":"wss://x"}"#)
        .tags([Tag::identifier("g")])
        .sign_with_keys(&admin)
        .unwrap();
    let bad_group_orly = EventBuilder::new(Kind::from(10008), "not json")
        .sign_with_keys(&admin)
        .unwrap();
    for e in [&bad_membership, &bad_url, &bad_group, &bad_group_orly] {
        let ok = c.publish(e).await;
        assert_eq!(ok[2], false, "{ok}");
        assert!(ok[3].as_str().unwrap().starts_with("invalid:"), "{ok}");
    }
    let ids: Vec<String> = [&bad_membership, &bad_url, &bad_group, &bad_group_orly]
        .iter()
        .map(|e| e.id.to_hex())
        .collect();
    assert!(present(&node, &ids).await.is_empty());
    // Not an admin: an ordinary event.
    let other = EventBuilder::new(Kind::from(39105), "not json")
        .tags([Tag::identifier("g")])
        .sign_with_keys(&Keys::generate())
        .unwrap();
    assert_eq!(c.publish(&other).await[2], true);
    drop(node);
}

/// Peer endpoints: NIP-98 is required, bound to URL, method and body, signed by a configured
/// peer's NIP-11 identity; bad ranges and oversized requests get 400; a peer answering garbage
/// or hanging is logged and nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_endpoints_refuse_unauthorized_and_forged_requests_and_bad_peers() {
    // A fake peer: its NIP-11 names `peer`'s key; its sync endpoints answer garbage or hang.
    let peer = Keys::generate();
    let fake = FakePeer::start(peer.public_key()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::new(Mode::Local, dir.path());
    node.set(
        "ORLY_RELAY_PEERS",
        format!("{},{}", fake.url("garbage"), fake.url("hang")),
    );
    node.set("ORLY_SYNC_DISTRIBUTED_INTERVAL", "200ms");
    // A hanging peer is given up after the request timeout (10s) plus the long poll.
    node.set("ORLY_SYNC_DISTRIBUTED_LONG_POLL", "1s");
    node.set(
        "ORLY_CLUSTER_ADMINS",
        Keys::generate().public_key().to_hex(),
    );
    node.start_ready().await;
    let current = format!("{}/api/sync/current", node.http());
    let body = json!({"node_id": "peer", "relay_url": fake.url("garbage")}).to_string();

    let signed = |keys: &Keys, url: &str, method: &str, body: &str| {
        orly_acl::nip98::authorization_header(keys, url, method, Some(body.as_bytes()), now())
    };
    // No header, a stranger, a wrong URL, a wrong method, a body that is not the signed one,
    // a tampered signature, an expired one.
    let (s, _) = http("POST", &current, &[], &body).await.unwrap();
    assert_eq!(s, 401);
    let stranger = signed(&Keys::generate(), &current, "POST", &body);
    assert_eq!(
        http("POST", &current, &[("Authorization", stranger)], &body)
            .await
            .unwrap()
            .0,
        403
    );
    let wrong_url = signed(
        &peer,
        &format!("{}/api/sync/event-ids", node.http()),
        "POST",
        &body,
    );
    assert_eq!(
        http("POST", &current, &[("Authorization", wrong_url)], &body)
            .await
            .unwrap()
            .0,
        401
    );
    let wrong_method = signed(&peer, &current, "GET", &body);
    assert_eq!(
        http("POST", &current, &[("Authorization", wrong_method)], &body)
            .await
            .unwrap()
            .0,
        401
    );
    let other_body = signed(&peer, &current, "POST", "{}");
    assert_eq!(
        http("POST", &current, &[("Authorization", other_body)], &body)
            .await
            .unwrap()
            .0,
        401
    );
    let tampered = tamper(&signed(&peer, &current, "POST", &body));
    assert_eq!(
        http("POST", &current, &[("Authorization", tampered)], &body)
            .await
            .unwrap()
            .0,
        401
    );
    let old = orly_acl::nip98::authorization_header(
        &peer,
        &current,
        "POST",
        Some(body.as_bytes()),
        now() - 600,
    );
    assert_eq!(
        http("POST", &current, &[("Authorization", old)], &body)
            .await
            .unwrap()
            .0,
        401
    );

    // The peer itself is answered.
    let good = signed(&peer, &current, "POST", &body);
    let (s, text) = http("POST", &current, &[("Authorization", good)], &body)
        .await
        .unwrap();
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["serial"].is_u64() && v["node_id"].as_str().unwrap().len() == 64);

    // Bad ranges, oversized ranges and fetches, malformed JSON.
    let ids_url = format!("{}/api/sync/event-ids", node.http());
    for (body, why) in [
        (json!({"from": 10, "to": 5}).to_string(), "reversed"),
        (json!({"from": 1, "to": 20_001}).to_string(), "too large"),
        (
            json!({"from": 1, "to": 2, "ids": vec!["00".repeat(32); 1001]}).to_string(),
            "too many ids",
        ),
        (
            json!({"from": 1, "to": 2, "ids": ["xyz"]}).to_string(),
            "bad id",
        ),
        ("{not json".to_string(), "malformed"),
    ] {
        let h = signed(&peer, &ids_url, "POST", &body);
        let (s, text) = http("POST", &ids_url, &[("Authorization", h)], &body)
            .await
            .unwrap();
        assert_eq!(s, 400, "{why}: {text}");
    }
    let h = signed(&peer, &ids_url, "POST", "");
    assert_eq!(
        http("GET", &ids_url, &[("Authorization", h)], "")
            .await
            .unwrap()
            .0,
        405
    );

    // Cluster endpoints: signed by a member only.
    let latest = format!("{}/cluster/latest", node.http());
    assert_eq!(http_get(&latest).await.unwrap().0, 401);
    let h = signed(&peer, &latest, "GET", "");
    assert_eq!(
        http("GET", &latest, &[("Authorization", h)], "")
            .await
            .unwrap()
            .0,
        403
    );

    // The bad peers were polled, failed with a logged reason, and gave us nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = node.log_text();
        if log.contains("answered garbage") && log.contains("no answer within") {
            break;
        }
        assert!(Instant::now() < deadline, "no logged failures:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = RawClient::connect(&node.ws()).await;
    let got = c.req("any", &[json!({"limit": 100})]).await.unwrap();
    assert!(got.is_empty(), "stored from bad peers: {got:?}");
    drop(node);
}

fn tamper(header: &str) -> String {
    use base64::Engine;
    let b64 = header.strip_prefix("Nostr ").unwrap();
    let engine = base64::engine::general_purpose::URL_SAFE;
    let mut event: Value = serde_json::from_slice(&engine.decode(b64).unwrap()).unwrap();
    let sig = event["sig"].as_str().unwrap().to_string();
    // The first hex digit changed: still well-formed, no longer a valid signature.
    let first = if sig.starts_with('0') { "1" } else { "0" };
    let flipped = format!("{first}{}", &sig[1..]);
    event["sig"] = Value::from(flipped);
    format!("Nostr {}", engine.encode(event.to_string()))
}

/// A peer that identifies as `pubkey` over NIP-11 and misbehaves on the sync endpoints:
/// under `/garbage` it claims events and lists ids that are not hex, then sends events that
/// were never asked for; under `/hang` it never answers.
struct FakePeer {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakePeer {
    async fn start(pubkey: nostr::PublicKey) -> Self {
        use axum::routing::{any, get};
        let doc = json!({"name": "fake", "pubkey": pubkey.to_hex()}).to_string();
        let nip11 = move || {
            let doc = doc.clone();
            async move { ([("content-type", "application/nostr+json")], doc) }
        };
        let app = axum::Router::new()
            .route("/garbage", get(nip11.clone()))
            .route("/hang", get(nip11))
            .route(
                "/garbage/api/sync/current",
                any(|| async { r#"{"node_id":"x","relay_url":"y","serial":5}"# }),
            )
            .route(
                "/garbage/api/sync/event-ids",
                any(|| async { r#"{"event_map":{"not-hex":1}}"# }),
            )
            .route(
                "/hang/api/sync/current",
                any(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    ""
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
