//! `orly db` (ORLY's `orly-db`): the storage service's command line. Opens (and migrates) a
//! SQLite or PostgreSQL store and serves it as `orlydb.v1.DatabaseService` with
//! `grpc.health.v1`, until SIGTERM/SIGINT. The `orly` binary dispatches here; anyhow is used
//! only because this is the top of a program.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use orly_consts::{env, Service};

use crate::{config, grpc_server, open_store, StoreConfig, StoreKind};

/// How often expired (NIP-40) events are purged.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// The service's flags, each with ORLY's env name.
#[derive(Debug, Parser)]
#[command(
    name = "orly-db",
    version,
    about = "orly storage service: events, serials, markers and leases over gRPC"
)]
pub struct Args {
    /// gRPC listen address (host:port).
    #[arg(long, env = env::DB_LISTEN, default_value = orly_consts::DB_LISTEN)]
    pub listen: String,
    /// Storage backend: sqlite or postgres.
    #[arg(long, env = env::DB_TYPE, default_value = "sqlite")]
    pub db_type: StoreKind,
    /// Data directory holding the SQLite file (orly.db).
    #[arg(long, env = env::DATA_DIR, default_value_os_t = config::default_data_dir())]
    pub data_dir: PathBuf,
    /// PostgreSQL URL (with --db-type postgres), e.g. postgres://user:pass@127.0.0.1/orly.
    #[arg(long, env = env::DB_URL)]
    pub db_url: Option<String>,
    /// Connection pool size of the SQL backend (for SQLite: the read pool).
    #[arg(long, env = env::DB_MAX_CONNECTIONS, default_value_t = crate::sqlite::DEFAULT_READ_CONNECTIONS)]
    pub max_connections: u32,
    /// Log level or tracing filter directive (falls back to ORLY_DB_LOG_LEVEL when unset).
    #[arg(long, env = env::LOG_LEVEL, default_value = "info")]
    pub log_level: String,
    /// Prometheus /metrics listen address (host:port); empty disables metrics.
    #[arg(long, env = env::METRICS_LISTEN, default_value = "")]
    pub metrics_listen: String,
}

/// Runs the service with `args` (the first one is the program name, as in `std::env::args`).
/// Bad arguments and `--help` exit the process with clap's message.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Args::command().get_matches_from(args);
    let name = Service::Db.binary();
    orly_common::service::run_main(name, run(matches))
}

async fn run(matches: ArgMatches) -> anyhow::Result<()> {
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    orly_common::init_tracing(&orly_common::service::log_level(
        &matches,
        &args.log_level,
        "ORLY_DB_LOG_LEVEL",
    ));

    if args.db_type == StoreKind::Grpc {
        bail!(
            "ORLY_DB_TYPE=grpc makes no sense for orly-db: it is the gRPC store itself; \
             use sqlite or postgres"
        );
    }
    let cfg = StoreConfig {
        kind: args.db_type,
        data_dir: args.data_dir.clone(),
        postgres_url: args.db_url.clone(),
        max_connections: args.max_connections,
        ..StoreConfig::default()
    };
    let store = open_store(&cfg)
        .await
        .with_context(|| format!("cannot open the {} store", cfg.kind))?;
    tracing::info!(db_type = %cfg.kind, "orly-db store open");
    // One purger among every process sharing the store (orly-db replicas on one PostgreSQL,
    // relays on it): the holder of the purge lease.
    let expiry = crate::spawn_purger(
        store.clone(),
        format!("orly-db:{}:{}", hostname(), std::process::id()),
        EXPIRY_INTERVAL,
    );

    orly_common::service::serve_until_signal(
        Service::Db.binary(),
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve(listener, store, shutdown),
        || async move { expiry.abort() },
    )
    .await?;
    Ok(())
}

/// This host's name (the pod's, in Kubernetes), for naming the purge lease's holder.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_orlys() {
        let args = Args::try_parse_from(["orly-db"]).unwrap();
        assert_eq!(args.listen, orly_consts::DB_LISTEN);
        assert_eq!(args.db_type, StoreKind::Sqlite);
        Args::command().debug_assert();
    }
}
