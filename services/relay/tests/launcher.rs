//! The launcher (`orly launcher`) supervising real `orly db`, `orly sync-negentropy` and relay
//! processes, all started through this package's `orly` binary, as a launcher without links
//! next to it does. (The tests live here, not in orly-launcher, because the binary is this
//! package's: cargo builds it for them, so no test builds anything itself.)

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rustix::process::{kill_process, Pid, Signal};
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    orly_testkit::free_port()
}

/// A launcher process whose stderr is collected; killed (with its children) on drop.
struct Launched {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    relay: SocketAddr,
    _data: tempfile::TempDir,
}

impl Launched {
    fn start(extra_env: &[(&str, &str)]) -> Self {
        let relay: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_with(
            relay,
            &[("ORLY_LAUNCHER_RELAY_LISTEN", &relay.to_string())],
            extra_env,
        )
    }

    /// A launcher whose relay is expected at `relay`, told so by `addr_env`.
    fn start_with(
        relay: SocketAddr,
        addr_env: &[(&str, &str)],
        extra_env: &[(&str, &str)],
    ) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orly"));
        cmd.arg("launcher");
        for var in ["ORLY_LAUNCHER_RELAY_LISTEN", "ORLY_LISTEN", "ORLY_PORT"] {
            cmd.env_remove(var);
        }
        cmd.env(
            "ORLY_LAUNCHER_DB_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .envs(addr_env.iter().copied())
        .env("ORLY_LAUNCHER_STOP_TIMEOUT", "5s")
        .env("ORLY_LAUNCHER_RESTART_BACKOFF_MAX", "1s")
        .env("ORLY_DATA_DIR", data.path())
        .env("ORLY_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            relay,
            _data: data,
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Index of the first log line containing every needle.
    fn position(&self, needles: &[&str]) -> Option<usize> {
        self.log()
            .iter()
            .position(|l| needles.iter().all(|n| l.contains(n)))
    }

    fn children(&self) -> Vec<u32> {
        children_of(self.child.id())
    }

    fn signal(&self, sig: Signal) {
        kill_process(Pid::from_raw(self.child.id() as i32).unwrap(), sig).unwrap();
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "launcher did not exit; log:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn wait_relay_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // Ready means the launcher finished its start-up too, not only the relay: a child
            // killed before that fails the start by design.
            if http_status(self.relay, "/readyz").await == Some(200)
                && self.log().iter().any(|l| l.contains("all services ready"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("relay never became ready; log:\n{}", self.log().join("\n"));
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        for pid in self.children() {
            let _ = kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Direct children of `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) && fields[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

/// Which program of the orly binary a process runs: its subcommand, or "relay" for none.
fn program(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    match args.get(1).map(String::as_str) {
        Some(sub) if !sub.is_empty() && !sub.starts_with('-') => sub.to_string(),
        _ => "relay".to_string(),
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Publishes a note and reads it back over a WebSocket; false on any refusal.
async fn publish_and_query(relay: SocketAddr, content: &str) -> bool {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{relay}")).await else {
        return false;
    };
    let keys = nostr::Keys::generate();
    let event = nostr::EventBuilder::text_note(content)
        .sign_with_keys(&keys)
        .unwrap();
    let json = nostr::JsonUtil::as_json(&event);
    let _ = ws
        .send(Message::Text(format!(r#"["EVENT",{json}]"#).into()))
        .await;
    let _ = ws
        .send(Message::Text(
            format!(r#"["REQ","q",{{"ids":["{}"]}}]"#, event.id.to_hex()).into(),
        ))
        .await;
    let (mut ok, mut found) = (false, false);
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_secs(5), ws.next()).await
    {
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        match v[0].as_str() {
            Some("OK") => ok = v[2] == true,
            Some("EVENT") => found = v[2]["content"] == content,
            Some("EOSE") | Some("CLOSED") => break,
            _ => {}
        }
    }
    ok && found
}

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_in_order_serves_and_stops_in_reverse_without_orphans() {
    let mut l = Launched::start(&[]);
    l.wait_relay_ready(Duration::from_secs(60)).await;
    assert!(publish_and_query(l.relay, "through the launcher").await);

    // Gating: the relay was started only after db reported ready.
    let db_ready = l
        .position(&["ready", "service=\"db\""])
        .or_else(|| l.position(&["ready", "db"]));
    let relay_started = l
        .position(&["started", "relay"])
        .expect("relay start logged");
    assert!(
        db_ready.expect("db ready logged") < relay_started,
        "{:#?}",
        l.log()
    );

    let children = l.children();
    assert_eq!(
        children.len(),
        2,
        "db and relay run as children: {children:?}"
    );
    l.signal(Signal::TERM);
    assert!(l.wait_exit(Duration::from_secs(30)).success());
    for pid in children {
        assert!(!alive(pid), "child {pid} outlived the launcher");
    }
    let relay_stopped = l
        .position(&["stopped", "relay"])
        .expect("relay stop logged");
    let db_stopped = l.position(&["stopped", "db"]).expect("db stop logged");
    assert!(
        relay_stopped < db_stopped,
        "relay stops before db: {:#?}",
        l.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_child_is_restarted_and_the_relay_serves_again() {
    let mut l = Launched::start(&[]);
    l.wait_relay_ready(Duration::from_secs(60)).await;
    for victim in ["db", "relay"] {
        let pid = *l
            .children()
            .iter()
            .find(|p| program(**p) == victim)
            .unwrap_or_else(|| panic!("no {victim} child"));
        kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL).unwrap();
        let mut served = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if publish_and_query(l.relay, &format!("after killing {victim}")).await {
                served = true;
                break;
            }
        }
        assert!(
            served,
            "not serving after killing {victim}; log:\n{}",
            l.log().join("\n")
        );
        assert!(l.children().iter().all(|p| *p != pid));
        assert_eq!(l.children().len(), 2);
    }
    assert!(l.position(&["exited unexpectedly", "db"]).is_some());
    assert!(l.position(&["exited unexpectedly", "relay"]).is_some());
    l.signal(Signal::TERM);
    assert!(l.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test]
async fn a_missing_binary_fails_with_a_clear_message() {
    let mut l = Launched::start(&[("ORLY_LAUNCHER_DB_BINARY", "/nonexistent/orly-db")]);
    let status = l.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = l.log().join("\n");
    assert!(
        log.contains("/nonexistent/orly-db") && log.contains("ORLY_LAUNCHER_DB_BINARY"),
        "{log}"
    );
}

#[tokio::test]
async fn a_child_that_never_becomes_ready_fails_the_start_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "fake-acl",
        "echo 'acl booting slowly'\nexec sleep 600",
    );
    let mut l = Launched::start(&[
        ("ORLY_LAUNCHER_ACL_ENABLED", "true"),
        ("ORLY_LAUNCHER_ACL_BINARY", script.to_str().unwrap()),
        ("ORLY_LAUNCHER_ACL_READY_TIMEOUT", "2s"),
    ]);
    assert!(l.wait_for_log("acl booting slowly", Duration::from_secs(60)));
    let children = l.children();
    let status = l.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    let log = l.log().join("\n");
    assert!(log.contains("acl did not become ready within 2s"), "{log}");
    assert!(
        log.contains("its last output:\n  acl booting slowly"),
        "{log}"
    );
    for pid in children {
        assert!(!alive(pid), "child {pid} left behind");
    }
}

#[tokio::test]
async fn sigterm_during_start_up_leaves_no_children() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "fake-acl",
        "echo 'acl waiting forever'\nexec sleep 600",
    );
    let mut l = Launched::start(&[
        ("ORLY_LAUNCHER_ACL_ENABLED", "true"),
        ("ORLY_LAUNCHER_ACL_BINARY", script.to_str().unwrap()),
        ("ORLY_LAUNCHER_ACL_READY_TIMEOUT", "120s"),
    ]);
    assert!(l.wait_for_log("acl waiting forever", Duration::from_secs(60)));
    let children = l.children();
    assert_eq!(children.len(), 2, "db and the fake acl run");
    l.signal(Signal::TERM);
    let status = l.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    for pid in children {
        assert!(!alive(pid), "child {pid} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nip77_sync_works_through_the_launched_system() {
    use nostr_sdk::prelude::{
        Client, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, SyncDirection, SyncOptions,
    };
    let neg = format!("127.0.0.1:{}", free_port());
    let mut l = Launched::start(&[
        ("ORLY_LAUNCHER_SYNC_NEGENTROPY_ENABLED", "true"),
        ("ORLY_LAUNCHER_SYNC_NEGENTROPY_LISTEN", &neg),
    ]);
    l.wait_relay_ready(Duration::from_secs(60)).await;
    assert_eq!(l.children().len(), 3, "db, negentropy and relay run");

    // The relay has one event the client lacks; the client has one the relay lacks.
    assert!(publish_and_query(l.relay, "already on the relay").await);
    let keys = nostr::Keys::generate();
    let mine = nostr::EventBuilder::text_note("only in the client")
        .sign_with_keys(&keys)
        .unwrap();
    let db = MemoryDatabase::with_opts(MemoryDatabaseOptions {
        events: true,
        max_events: None,
    });
    db.save_event(&mine).await.unwrap();
    let client = Client::builder().database(db).build();
    client.add_relay(format!("ws://{}", l.relay)).await.unwrap();
    client.connect().await;
    let opts = SyncOptions::new()
        .direction(SyncDirection::Both)
        .initial_timeout(Duration::from_secs(10));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        client.sync(nostr::Filter::new().kind(nostr::Kind::TextNote), &opts),
    )
    .await
    .expect("sync finishes")
    .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    assert_eq!(out.val.sent.len(), 1);
    assert!(out.val.sent.contains(&mine.id));
    assert_eq!(out.val.received.len(), 1);
    client.shutdown().await;

    l.signal(Signal::TERM);
    assert!(l.wait_exit(Duration::from_secs(30)).success());
}

/// ORLY's own names for the relay's address, set for the launcher, are where the relay
/// listens; ORLY_LAUNCHER_RELAY_LISTEN given as well wins over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_listens_on_orly_port_and_orly_listen() {
    let port = free_port();
    let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut l = Launched::start_with(
        relay,
        &[
            ("ORLY_PORT", &port.to_string()),
            ("ORLY_LISTEN", "127.0.0.1"),
        ],
        &[],
    );
    l.wait_relay_ready(Duration::from_secs(60)).await;
    assert!(publish_and_query(relay, "on ORLY_PORT").await);
    l.signal(Signal::TERM);
    assert!(l.wait_exit(Duration::from_secs(30)).success());

    let explicit: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut l = Launched::start_with(
        explicit,
        &[
            ("ORLY_PORT", &free_port().to_string()),
            ("ORLY_LAUNCHER_RELAY_LISTEN", &explicit.to_string()),
        ],
        &[],
    );
    l.wait_relay_ready(Duration::from_secs(60)).await;
    assert!(publish_and_query(explicit, "on the launcher's address").await);
    l.signal(Signal::TERM);
    assert!(l.wait_exit(Duration::from_secs(30)).success());
}

/// Services run as `orly <subcommand>` of the launcher's own binary when no link is next to
/// it, and the relay does not get the storage settings orly-db reads in its place (so it has
/// no ignored variable to warn about).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_through_the_launchers_own_binary() {
    let mut l = Launched::start(&[("ORLY_DB_URL", "postgres://unused@127.0.0.1/none")]);
    l.wait_relay_ready(Duration::from_secs(60)).await;
    let mut programs: Vec<String> = l.children().into_iter().map(program).collect();
    programs.sort();
    assert_eq!(programs, vec!["db", "relay"]);
    assert!(
        !l.log().iter().any(|line| line.contains("has no effect")),
        "{:#?}",
        l.log()
    );
    l.signal(Signal::TERM);
    assert!(l.wait_exit(Duration::from_secs(30)).success());
}
