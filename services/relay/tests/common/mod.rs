//! Test harness: a relay in local mode (in-process SQLite) or split mode (an orly-db
//! process, reached over gRPC), and a raw WebSocket client that sees every frame.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use orly::acl::OpenAcl;
use orly::{Relay, RelayConfig, RunningRelay};
use orly_db::{SharedStore, StoreConfig, StoreKind};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Local,
    Split,
}

/// A free loopback port (bound, then released for a child process to take).
pub fn free_port() -> u16 {
    orly_testkit::free_port()
}

/// This package's `orly` binary: the relay, and by subcommand every service and the
/// launcher. Cargo builds it for these tests, so nothing is built on demand.
pub fn orly_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orly"))
}

/// A command running `program` of the orly binary: `""` for the relay, else its subcommand
/// (`db`, `acl`, `sync-distributed`, …, `launcher`).
pub fn orly_command(program: &str) -> Command {
    let mut cmd = Command::new(orly_bin());
    if !program.is_empty() {
        cmd.arg(program);
    }
    cmd
}

/// [`orly_command`] without the test process's own `ORLY_*` settings, stdin and stdout null.
pub fn clean_orly_command(program: &str) -> Command {
    let mut cmd = orly_command(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ORLY_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    cmd
}

/// An `orly` relay process on a free loopback port with `env` on top of
/// [`clean_orly_command`], up once it accepts a WebSocket; SIGKILLed when dropped.
pub struct RelayProcess {
    pub child: Child,
    pub port: u16,
    pub url: String,
}

impl RelayProcess {
    pub async fn start<V: AsRef<std::ffi::OsStr>>(env: &[(&str, V)]) -> Self {
        let port = free_port();
        let mut cmd = clean_orly_command("");
        cmd.env("ORLY_LISTEN", "127.0.0.1")
            .env("ORLY_PORT", port.to_string())
            .env("ORLY_LOG_LEVEL", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut relay = Self {
            child: cmd.spawn().expect("spawn orly"),
            port,
            url: format!("ws://127.0.0.1:{port}"),
        };
        let started = std::time::Instant::now();
        while tokio_tungstenite::connect_async(relay.url.as_str())
            .await
            .is_err()
        {
            relay.assert_alive();
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the relay did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the relay exited: {status}");
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An orly-db child process, killed on drop.
pub struct DbProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl DbProcess {
    pub async fn start(data_dir: &Path, port: u16) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = orly_command("db")
            .env("ORLY_DB_LISTEN", addr.to_string())
            .env("ORLY_DB_TYPE", "sqlite")
            .env("ORLY_DATA_DIR", data_dir)
            .env("ORLY_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn orly-db");
        let db = Self {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        };
        db.wait_ready().await;
        db
    }

    async fn wait_ready(&self) {
        let store = grpc_store(self.addr);
        for _ in 0..200 {
            if store.ping().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("orly-db at {} did not become ready", self.addr);
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DbProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn grpc_store(addr: SocketAddr) -> SharedStore {
    Arc::new(
        orly_db::grpc_client::GrpcStore::connect_lazy(&addr.to_string(), Duration::from_secs(3))
            .unwrap(),
    )
}

/// A running relay with whatever backs it; everything stops on drop.
pub struct TestRelay {
    pub running: RunningRelay,
    pub db: Option<DbProcess>,
    pub store: SharedStore,
    pub dir: tempfile::TempDir,
}

impl TestRelay {
    pub async fn start(mode: Mode) -> Self {
        Self::start_with(mode, RelayConfig::default()).await
    }

    pub async fn start_with(mode: Mode, config: RelayConfig) -> Self {
        Self::start_built(mode, config, |b, _| b).await
    }

    /// Like [`TestRelay::start_with`], with `build` adding to the relay before it is built
    /// (NIP-77, sync hooks, an admin), given the relay's store.
    pub async fn start_built(
        mode: Mode,
        config: RelayConfig,
        build: impl FnOnce(orly::RelayBuilder, &SharedStore) -> orly::RelayBuilder,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = match mode {
            Mode::Local => {
                let cfg = StoreConfig {
                    kind: StoreKind::Sqlite,
                    data_dir: dir.path().to_path_buf(),
                    ..StoreConfig::default()
                };
                (orly_db::open_store(&cfg).await.unwrap(), None)
            }
            Mode::Split => {
                let db = DbProcess::start(dir.path(), free_port()).await;
                (grpc_store(db.addr), Some(db))
            }
        };
        let relay = build(
            Relay::builder(config, store.clone(), Arc::new(OpenAcl)),
            &store,
        )
        .build();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = orly::spawn(listener, relay).unwrap();
        Self {
            running,
            db,
            store,
            dir,
        }
    }

    pub fn url(&self) -> String {
        self.running.url()
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.running.addr)
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw client: sends text, reads JSON frames, skips the relay's greeting AUTH.
pub struct RawClient {
    pub ws: Ws,
    pub challenge: Option<String>,
    /// Frames read ahead (while waiting for an OK), handed out by `recv` first.
    pending: std::collections::VecDeque<Value>,
}

impl RawClient {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Self::from_ws(ws).await
    }

    /// A client on a WebSocket opened elsewhere (custom headers, …).
    pub async fn from_ws(ws: Ws) -> Self {
        let mut c = Self {
            ws,
            challenge: None,
            pending: Default::default(),
        };
        // The relay greets every connection with a NIP-42 challenge.
        let first = c.recv().await;
        assert_eq!(first[0], "AUTH", "expected AUTH greeting, got {first}");
        c.challenge = Some(first[1].as_str().unwrap().to_string());
        c
    }

    pub async fn send(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .unwrap();
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send(v.to_string()).await;
    }

    /// The next JSON frame (pings are answered by the library); panics after 10 s.
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("timed out waiting for a message")
                .expect("connection closed")
                .expect("websocket error");
            match msg {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Close(f) => panic!("connection closed by relay: {f:?}"),
                _ => continue,
            }
        }
    }

    /// Reads frames until one whose type is `kind`, skipping AUTH re-challenges.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v[0] == kind {
                return v;
            }
            assert_eq!(v[0], "AUTH", "expected {kind}, got {v}");
        }
    }

    /// Publishes an event and returns the OK frame.
    pub async fn publish(&mut self, event: &nostr::Event) -> Value {
        self.send(format!(r#"["EVENT",{}]"#, nostr::JsonUtil::as_json(event)))
            .await;
        // The connection's own subscriptions may get the event before its OK (live delivery
        // does not wait for the OK): those frames are kept for later reads.
        let mut ahead = Vec::new();
        let ok = loop {
            let v = self.recv().await;
            match v[0].as_str() {
                Some("OK") => break v,
                Some("AUTH") => {}
                _ => ahead.push(v),
            }
        };
        self.pending.extend(ahead);
        ok
    }

    /// Runs a REQ and collects the events until EOSE (or the CLOSED frame as Err).
    pub async fn req(&mut self, sub: &str, filters: &[Value]) -> Result<Vec<Value>, Value> {
        let mut msg = vec![Value::from("REQ"), Value::from(sub)];
        msg.extend(filters.iter().cloned());
        self.send_json(Value::Array(msg)).await;
        let mut events = Vec::new();
        loop {
            let v = self.recv().await;
            match v[0].as_str() {
                Some("EVENT") if v[1] == sub => events.push(v[2].clone()),
                Some("EOSE") if v[1] == sub => return Ok(events),
                Some("CLOSED") if v[1] == sub => return Err(v),
                _ => {}
            }
        }
    }
}

/// A signed text note with a given creation time.
pub fn note(keys: &nostr::Keys, content: &str, created_at: u64) -> nostr::Event {
    nostr::EventBuilder::text_note(content)
        .custom_created_at(nostr::Timestamp::from(created_at))
        .sign_with_keys(keys)
        .unwrap()
}

pub fn now() -> u64 {
    nostr::Timestamp::now().as_secs()
}
