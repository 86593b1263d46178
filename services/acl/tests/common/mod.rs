//! Real orly processes for the replica tests: the workspace's multi-call `orly` binary run as
//! `orly db` and `orly acl`, each on a loopback address with an ephemeral port, killed on drop.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use orly_db::SharedStore;
use orly_proto::orlyacl::v1 as pb;
use pb::acl_service_client::AclServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// How long a process may take to come up (a loaded CI machine: generous).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `orly` binary, built once per test run: it belongs to the `orly` package, so cargo
/// does not build it for this crate's tests. Building it every run keeps it current.
pub fn orly_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> → target/<profile>/orly
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile directory");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "orly", "--bin", "orly"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p orly --bin orly failed");
        profile_dir.join("orly")
    })
}

/// A child process, SIGKILLed and reaped on drop.
pub struct Proc {
    child: Child,
    pub name: String,
}

impl Proc {
    /// `orly <program>` with `envs` (and nothing else of the ORLY settings of this process).
    pub fn spawn(name: &str, program: &str, envs: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(orly_bin());
        cmd.arg(program);
        for (k, _) in std::env::vars() {
            if k.starts_with("ORLY_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("ORLY_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn orly {program}: {e}"));
        Self {
            child,
            name: name.to_string(),
        }
    }

    /// SIGKILL: the process gets no chance to say goodbye (a lost pod).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Panics if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited: {status}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An `orly db` on SQLite in `dir`, listening on 127.0.0.1, ready.
pub async fn start_db(dir: &Path) -> (Proc, SocketAddr) {
    let ip = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let addr = SocketAddr::new(ip, orly_testkit::free_port_on(ip));
    let mut db = Proc::spawn(
        "orly db",
        "db",
        &[
            ("ORLY_DB_LISTEN", addr.to_string()),
            ("ORLY_DB_TYPE", "sqlite".into()),
            ("ORLY_DATA_DIR", dir.display().to_string()),
        ],
    );
    let store = grpc_store(addr);
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while store.ping().await.is_err() {
        db.assert_running();
        assert!(
            tokio::time::Instant::now() < deadline,
            "orly db at {addr} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (db, addr)
}

/// A client of the orly-db at `addr`.
pub fn grpc_store(addr: SocketAddr) -> SharedStore {
    Arc::new(
        orly_db::grpc_client::GrpcStore::connect_lazy(&addr.to_string(), Duration::from_secs(5))
            .unwrap(),
    )
}

/// One `orly acl` replica: its gRPC and metrics addresses.
pub struct AclReplica {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl AclReplica {
    /// `orly acl` on `addr` over the orly-db at `db`, with `envs` (mode, owners, …) and the
    /// metrics server on the same IP; returns once it reports ready.
    pub async fn start(addr: SocketAddr, db: SocketAddr, envs: &[(&str, String)]) -> Self {
        let metrics = SocketAddr::new(addr.ip(), orly_testkit::free_port_on(addr.ip()));
        let mut all = vec![
            ("ORLY_ACL_LISTEN", addr.to_string()),
            ("ORLY_ACL_DB_TYPE", "grpc".into()),
            ("ORLY_ACL_DB_SERVER", db.to_string()),
            ("ORLY_METRICS_LISTEN", metrics.to_string()),
        ];
        all.extend(envs.iter().cloned());
        let mut proc = Proc::spawn(&format!("orly acl on {addr}"), "acl", &all);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            proc.assert_running();
            if let Ok(mut c) = client(addr).await {
                if c.ready(pb::Empty {})
                    .await
                    .is_ok_and(|r| r.into_inner().ready)
                {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "orly acl at {addr} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            proc,
            addr,
            metrics,
        }
    }

    /// A gRPC client of this replica alone.
    pub async fn client(&self) -> AclServiceClient<Channel> {
        client(self.addr).await.expect("connect to the replica")
    }

    /// A gRPC client of the replica at `addr`, if it can be reached.
    pub async fn client_at(addr: SocketAddr) -> Option<AclServiceClient<Channel>> {
        client(addr).await.ok()
    }

    /// The replica's `orly_acl_checks_total` for `op`, summed over decisions.
    pub async fn checks(&self, op: &str) -> u64 {
        let text = http_get(self.metrics, "/metrics").await;
        text.lines()
            .filter(|l| {
                l.starts_with("orly_acl_checks_total{") && l.contains(&format!("op=\"{op}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

async fn client(addr: SocketAddr) -> Result<AclServiceClient<Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(AclServiceClient::new(channel))
}

/// The body of `GET path` (HTTP/1.0, so the server closes when done).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => text,
    }
}

/// Waits (up to `timeout`) until `cond` holds, polling; panics with `what` otherwise.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
