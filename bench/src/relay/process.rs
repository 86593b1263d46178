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
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        Self::spawn_named(orly, service, service.binary(), dir, env)
    }

    /// [`Proc::spawn`] under another log name (a second relay replica).
    fn spawn_named(
        orly: &Orly,
        service: Service,
        name: &'static str,
        dir: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = orly.command(service);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ORLY_") {
                cmd.env_remove(key);
            }
        }
        // Quiet by default; `--relay-env ORLY_LOG_LEVEL=…` wins.
        cmd.env("ORLY_LOG_LEVEL", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
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
        self.status_mb("VmRSS:")
    }

    /// Peak resident set size since the process started, in MB (VmHWM from /proc).
    pub fn peak_rss_mb(&self) -> anyhow::Result<f64> {
        self.status_mb("VmHWM:")
    }

    fn status_mb(&self, field: &str) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .with_context(|| format!("reading /proc status of {}", self.name))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field} in /proc/<pid>/status"))?;
        Ok(kb / 1024.0)
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
    // Field order is drop order: relays, then orly-acl, then orly-db, then the directory.
    pub relay: Proc,
    /// More relays on the same store ([`Stack::add_replica`]), for the fan-out across replicas.
    pub replicas: Vec<Proc>,
    /// Held so the orly-acl process lives as long as the relay.
    _acl: Option<Proc>,
    pub db: Option<Proc>,
    /// The first relay's URL.
    pub url: String,
    /// The replicas' URLs, in the order of `replicas`.
    pub replica_urls: Vec<String>,
    /// What a relay of this stack is started with, but its port and data directory.
    relay_env: Vec<(String, String)>,
    /// Whether a second relay may share the store (not an in-process SQLite file).
    shared_store: bool,
    dir: tempfile::TempDir,
}

impl Stack {
    /// Starts the stack; `extra_env` (`--relay-env`) goes to every relay, after (and so
    /// over) the stack's own settings.
    pub async fn start(
        orly: &Orly,
        backend: Backend<'_>,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("orly-bench-").tempdir()?;
        let data_dir = dir.path().display().to_string();
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| env.push((k.to_string(), v));
        let mut db = None;
        let mut acl = None;
        let mut shared_store = false;
        match backend {
            Backend::Follows {
                admin,
                follows,
                grpc,
            } => {
                seed_follow_list(dir.path(), admin, follows).await?;
                set("ORLY_DB_TYPE", "sqlite".into());
                set("ORLY_ACL_MODE", "follows".into());
                set("ORLY_ADMINS", admin.public_key().to_hex());
                if grpc {
                    let acl_port = free_port()?;
                    let acl_env = owned(&[
                        ("ORLY_ACL_LISTEN", format!("127.0.0.1:{acl_port}")),
                        ("ORLY_ACL_MODE", "follows".into()),
                        ("ORLY_ADMINS", admin.public_key().to_hex()),
                        // The same SQLite file as the relay (WAL allows both processes).
                        ("ORLY_ACL_DB_TYPE", "sqlite".into()),
                        ("ORLY_DATA_DIR", data_dir.clone()),
                    ]);
                    let mut p = Proc::spawn(orly, Service::Acl, dir.path(), &acl_env)?;
                    p.wait_listening(acl_port).await?;
                    acl = Some(p);
                    set("ORLY_ACL_TYPE", "grpc".into());
                    set("ORLY_GRPC_ACL_SERVER", format!("127.0.0.1:{acl_port}"));
                }
            }
            Backend::Sqlite => set("ORLY_DB_TYPE", "sqlite".into()),
            Backend::Postgres { url } => {
                shared_store = true;
                set("ORLY_DB_TYPE", "postgres".into());
                set("ORLY_DB_URL", url.to_string());
            }
            Backend::Split => {
                shared_store = true;
                let db_port = free_port()?;
                let db_env = owned(&[
                    ("ORLY_DB_LISTEN", format!("127.0.0.1:{db_port}")),
                    ("ORLY_DB_TYPE", "sqlite".into()),
                    ("ORLY_DATA_DIR", data_dir.clone()),
                ]);
                let mut p = Proc::spawn(orly, Service::Db, dir.path(), &db_env)?;
                p.wait_listening(db_port).await?;
                db = Some(p);
                set("ORLY_DB_TYPE", "grpc".into());
                set("ORLY_GRPC_DB_SERVER", format!("127.0.0.1:{db_port}"));
            }
        }
        env.extend(extra_env.iter().cloned());
        let (relay, url) = start_relay(orly, Service::Relay.binary(), dir.path(), &env).await?;
        Ok(Self {
            relay,
            replicas: Vec::new(),
            _acl: acl,
            db,
            url,
            replica_urls: Vec::new(),
            relay_env: env,
            shared_store,
            dir,
        })
    }

    /// Starts one more relay on the same store (split mode's orly-db, or PostgreSQL) and
    /// returns its URL.
    pub async fn add_replica(&mut self, orly: &Orly) -> anyhow::Result<String> {
        anyhow::ensure!(
            self.shared_store,
            "a second relay needs a shared store (split or PostgreSQL)"
        );
        anyhow::ensure!(
            self.replicas.len() < REPLICA_NAMES.len(),
            "too many replicas"
        );
        let name = REPLICA_NAMES[self.replicas.len()];
        let (relay, url) = start_relay(orly, name, self.dir.path(), &self.relay_env).await?;
        self.replicas.push(relay);
        self.replica_urls.push(url.clone());
        Ok(url)
    }

    /// Every relay process: the first, then the replicas.
    pub fn relays(&self) -> impl Iterator<Item = &Proc> {
        std::iter::once(&self.relay).chain(&self.replicas)
    }

    /// Every relay URL, the first relay's first.
    pub fn urls(&self) -> Vec<String> {
        std::iter::once(self.url.clone())
            .chain(self.replica_urls.iter().cloned())
            .collect()
    }

    /// The last lines of every child's log.
    pub fn log_tail(&self) -> String {
        let mut log = String::new();
        for p in self.relays().chain(&self.db) {
            let tail = p.log_tail();
            if !tail.trim().is_empty() {
                log.push_str(&format!("[{}]\n{tail}\n", p.name));
            }
        }
        log
    }
}

/// Log names of the second and later relays.
const REPLICA_NAMES: [&str; 3] = ["orly-replica-b", "orly-replica-c", "orly-replica-d"];

/// Starts a relay on a free port (its own data directory under `dir`) and waits for it.
async fn start_relay(
    orly: &Orly,
    name: &'static str,
    dir: &Path,
    env: &[(String, String)],
) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
    let data_dir = if name == Service::Relay.binary() {
        dir.to_path_buf()
    } else {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        d
    };
    let mut all = owned(&[
        ("ORLY_LISTEN", "127.0.0.1".to_string()),
        ("ORLY_PORT", port.to_string()),
        ("ORLY_DATA_DIR", data_dir.display().to_string()),
    ]);
    all.extend(env.iter().cloned());
    let mut relay = Proc::spawn_named(orly, Service::Relay, name, dir, &all)?;
    relay.wait_listening(port).await?;
    Ok((relay, format!("ws://127.0.0.1:{port}")))
}

fn owned(env: &[(&str, String)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// A free loopback port (bound, then released for a child to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
