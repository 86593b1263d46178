//! Choosing and opening a store: SQLite file, PostgreSQL URL, or orly-db over gRPC.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::{Result, SharedStore, StoreError};

/// Where events live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// One SQLite file under the data dir (the embedded default).
    Sqlite,
    /// A PostgreSQL database at a URL.
    Postgres,
    /// The orly-db service over gRPC.
    Grpc,
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sqlite" | "sqlite3" => Ok(Self::Sqlite),
            "postgres" | "postgresql" | "pg" => Ok(Self::Postgres),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!(
                "unknown store type {other:?} (expected sqlite, postgres or grpc)"
            )),
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Grpc => "grpc",
        })
    }
}

/// Everything needed to open a store; each binary fills it from its own flags/env names.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Directory holding `orly.db` for SQLite.
    pub data_dir: PathBuf,
    /// PostgreSQL URL, e.g. `postgres://user:pass@127.0.0.1/orly`.
    pub postgres_url: Option<String>,
    /// orly-db address for gRPC, `host:port` or `http://host:port`.
    pub grpc_server: String,
    /// Deadline of one gRPC call (streams: of each message).
    pub grpc_timeout: Duration,
    /// Connection pool size for SQL backends (for SQLite: the read pool; the writer has its own).
    pub max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Sqlite,
            data_dir: default_data_dir(),
            postgres_url: None,
            grpc_server: "127.0.0.1:50051".into(),
            grpc_timeout: Duration::from_secs(10),
            max_connections: crate::sqlite::DEFAULT_READ_CONNECTIONS,
        }
    }
}

/// `$HOME/.local/share/ORLY`, ORLY's default data directory.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".local/share/ORLY")
}

/// The SQLite file inside a data directory.
pub fn sqlite_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("orly.db")
}

/// Opens (and migrates) the configured store.
pub async fn open_store(cfg: &StoreConfig) -> Result<SharedStore> {
    match cfg.kind {
        StoreKind::Sqlite => {
            std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
                StoreError::Config(format!(
                    "cannot create data dir {}: {e}",
                    cfg.data_dir.display()
                ))
            })?;
            let options = crate::sqlite::SqliteOptions {
                read_connections: cfg.max_connections,
                ..crate::sqlite::SqliteOptions::default()
            };
            let store =
                crate::sqlite::SqliteStore::open_with(&sqlite_path(&cfg.data_dir), options).await?;
            Ok(Arc::new(store))
        }
        StoreKind::Postgres => {
            let url = cfg.postgres_url.as_deref().ok_or_else(|| {
                StoreError::Config("postgres store needs a URL (ORLY_DB_URL)".into())
            })?;
            let store = crate::postgres::PostgresStore::connect(url, cfg.max_connections).await?;
            Ok(Arc::new(store))
        }
        StoreKind::Grpc => {
            let client =
                crate::grpc_client::GrpcStore::connect_lazy(&cfg.grpc_server, cfg.grpc_timeout)?;
            Ok(Arc::new(client))
        }
    }
}
