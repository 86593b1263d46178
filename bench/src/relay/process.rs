//! The relay under test: `orly` (and for split mode `orly db`, for follows/gRPC `orly acl`)
//! as child processes on free loopback ports with temporary data dirs, killed when dropped.

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use orly_consts::Service;

use crate::binaries::Orly;

/// How long a child may take to start listening (PostgreSQL migrations included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How the relay reaches its store.
pub enum Backend<'a> {
    Sqlite,
    /// An `orly db` process on SQLite, over gRPC.
    Split,
    Postgres {
        url: &'a str,
    },
    /// In-process SQLite with ACL mode `follows`: `admin` follows `follows` (a kind 3 stored
    /// before the relay starts); with `grpc` the ACL runs in an `orly acl` process.
    Follows {
        admin: &'a nostr::Keys,
        follows: &'a [String],
        grpc: bool,
    },
}

/// Stores the admin's follow list in the SQLite file the relay will open.
async fn seed_follow_list(
    data_dir: &std::path::Path,
    admin: &nostr::Keys,
    follows: &[String],
) -> anyhow::Result<()> {
    let tags = follows
        .iter()
        .map(|p| nostr::Tag::parse(["p", p.as_str()]))
        .collect::<Result<Vec<_>, _>>()?;
    let list = nostr::EventBuilder::new(nostr::Kind::ContactList, "")
        .tags(tags)
        .sign_with_keys(admin)?;
    let store = orly_db::sqlite::SqliteStore::open(&data_dir.join("orly.db")).await?;
    let outcome = orly_db::EventStore::save_event(&store, &list).await?;
    anyhow::ensure!(
        matches!(outcome, orly_db::SaveOutcome::Stored { .. }),
        "follow list not stored: {outcome:?}"
    );
    Ok(())
}

/// One child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `service` with `env` (no inherited ORLY_* settings), stderr to
    /// `<dir>/<name>.log`.
    fn spawn(
        orly: &Orly,
        service: Service,
        dir: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let name = service.binary();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = orly.command(service);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ORLY_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .env("ORLY_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", orly.path.display()))?;
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the child accepts TCP connections on `port`; fails if it exits first.
    async fn wait_listening(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) during startup:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} did not listen on port {port} within {START_TIMEOUT:?}",
            self.name
        )
    }

    /// The last lines the child wrote to stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Resident set size in MB (VmRSS from /proc).
    pub fn rss_mb(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .with_context(|| format!("reading /proc status of {}", self.name))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(kb / 1024.0)
    }

    /// CPU time (user + system, all threads) used so far, in seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        cpu_secs(&self.pid().to_string())
    }
}

/// CPU time (user + system, all threads) of `/proc/<pid>` (or `self`) so far, in seconds.
pub fn cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / CLOCK_TICKS_PER_SEC)
}

/// USER_HZ, 100 on every Linux platform the relay targets.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running relay and whatever backs it; everything stops, and the data dir goes, on drop.
pub struct Stack {
    // Field order is drop order: relay, then orly-acl, then orly-db, then the directory.
    pub relay: Proc,
    /// Held so the orly-acl process lives as long as the relay.
    _acl: Option<Proc>,
    pub db: Option<Proc>,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(orly: &Orly, backend: Backend<'_>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("orly-bench-").tempdir()?;
        let data_dir = dir.path().display().to_string();
        let port = free_port()?;
        let mut env = vec![
            ("ORLY_LISTEN", "127.0.0.1".to_string()),
            ("ORLY_PORT", port.to_string()),
            ("ORLY_DATA_DIR", data_dir.clone()),
        ];
        let mut db = None;
        let mut acl = None;
        match backend {
            Backend::Follows {
                admin,
                follows,
                grpc,
            } => {
                seed_follow_list(dir.path(), admin, follows).await?;
                env.push(("ORLY_DB_TYPE", "sqlite".into()));
                env.push(("ORLY_ACL_MODE", "follows".into()));
                env.push(("ORLY_ADMINS", admin.public_key().to_hex()));
                if grpc {
                    let acl_port = free_port()?;
                    let acl_env = [
                        ("ORLY_ACL_LISTEN", format!("127.0.0.1:{acl_port}")),
                        ("ORLY_ACL_MODE", "follows".into()),
                        ("ORLY_ADMINS", admin.public_key().to_hex()),
                        // The same SQLite file as the relay (WAL allows both processes).
                        ("ORLY_ACL_DB_TYPE", "sqlite".into()),
                        ("ORLY_DATA_DIR", data_dir.clone()),
                    ];
                    let mut p = Proc::spawn(orly, Service::Acl, dir.path(), &acl_env)?;
                    p.wait_listening(acl_port).await?;
                    acl = Some(p);
                    env.push(("ORLY_ACL_TYPE", "grpc".into()));
                    env.push(("ORLY_GRPC_ACL_SERVER", format!("127.0.0.1:{acl_port}")));
                }
            }
            Backend::Sqlite => env.push(("ORLY_DB_TYPE", "sqlite".into())),
            Backend::Postgres { url } => {
                env.push(("ORLY_DB_TYPE", "postgres".into()));
                env.push(("ORLY_DB_URL", url.to_string()));
            }
            Backend::Split => {
                let db_port = free_port()?;
                let db_env = [
                    ("ORLY_DB_LISTEN", format!("127.0.0.1:{db_port}")),
                    ("ORLY_DB_TYPE", "sqlite".into()),
                    ("ORLY_DATA_DIR", data_dir.clone()),
                ];
                let mut p = Proc::spawn(orly, Service::Db, dir.path(), &db_env)?;
                p.wait_listening(db_port).await?;
                db = Some(p);
                env.push(("ORLY_DB_TYPE", "grpc".into()));
                env.push(("ORLY_GRPC_DB_SERVER", format!("127.0.0.1:{db_port}")));
            }
        }
        let mut relay = Proc::spawn(orly, Service::Relay, dir.path(), &env)?;
        relay.wait_listening(port).await?;
        Ok(Self {
            relay,
            _acl: acl,
            db,
            url: format!("ws://127.0.0.1:{port}"),
            _dir: dir,
        })
    }
}

/// A free loopback port (bound, then released for a child to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
