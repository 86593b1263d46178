//! `orly acl` (ORLY's `orly-acl`): the access control service's command line. Opens the store
//! (orly-db over gRPC by default, or SQLite/PostgreSQL directly), loads the mode's lists and
//! follow sets, and serves `orlyacl.v1.ACLService` with `grpc.health.v1` until SIGTERM/SIGINT.
//! The `orly` binary dispatches here; anyhow is used only because this is the top of a program.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use orly_common::{parse_duration, parse_pubkey_list};
use orly_consts::{env, Service};
use orly_db::{config, open_store, StoreConfig, StoreKind};

use crate::{grpc_server, AclConfig, AclEngine, Mode};

/// The service's flags, each with ORLY's env name.
#[derive(Debug, Parser)]
#[command(
    name = "orly-acl",
    version,
    about = "orly access control service: none / follows / managed modes over gRPC"
)]
pub struct Args {
    /// gRPC listen address (host:port).
    #[arg(long, env = env::ACL_LISTEN, default_value = orly_consts::ACL_LISTEN)]
    pub listen: String,
    /// Access control mode: none, follows or managed.
    #[arg(long, env = "ORLY_ACL_MODE", default_value = "none")]
    pub mode: Mode,
    /// Storage: grpc (the orly-db service), sqlite or postgres.
    #[arg(long, env = "ORLY_ACL_DB_TYPE", default_value = "grpc")]
    pub db_type: StoreKind,
    /// orly-db address for --db-type grpc; ORLY's name ORLY_ACL_GRPC_DB_SERVER is read when
    /// this is unset [default: 127.0.0.1:50051].
    #[arg(long, env = "ORLY_ACL_DB_SERVER")]
    pub db_server: Option<String>,
    /// Deadline of one call to orly-db.
    #[arg(long, env = "ORLY_ACL_DB_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub db_timeout: Duration,
    /// Data directory holding the SQLite file (orly.db) for --db-type sqlite.
    #[arg(long, env = env::DATA_DIR, default_value_os_t = config::default_data_dir())]
    pub data_dir: PathBuf,
    /// PostgreSQL URL for --db-type postgres.
    #[arg(long, env = env::DB_URL)]
    pub db_url: Option<String>,
    /// Owners: comma-separated hex or npub pubkeys (owner level, NIP-86).
    #[arg(long, env = "ORLY_OWNERS", default_value = "")]
    pub owners: String,
    /// Admins: comma-separated hex or npub pubkeys (admin level, NIP-86; in mode follows
    /// their follow lists decide who may write).
    #[arg(long, env = "ORLY_ADMINS", default_value = "")]
    pub admins: String,
    /// How often follow lists (mode follows) and lists (mode managed) are re-read.
    #[arg(long, env = "ORLY_FOLLOW_LIST_FREQUENCY", default_value = "1h", value_parser = parse_duration)]
    pub follow_list_frequency: Duration,
    /// How often the store is checked for changes made by other replicas (a version marker
    /// and newer admin follow lists): a ban made on one replica is enforced by all within it.
    #[arg(long, env = "ORLY_ACL_REFRESH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub refresh_interval: Duration,
    /// Log level or tracing filter directive (falls back to ORLY_ACL_LOG_LEVEL when unset).
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
    orly_common::service::run_main(Service::Acl.binary(), run(matches))
}

async fn run(matches: ArgMatches) -> anyhow::Result<()> {
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    orly_common::init_tracing(&orly_common::service::log_level(
        &matches,
        &args.log_level,
        "ORLY_ACL_LOG_LEVEL",
    ));

    let owners = parse_pubkey_list(&args.owners)
        .map_err(anyhow::Error::msg)
        .context("ORLY_OWNERS")?;
    let admins = parse_pubkey_list(&args.admins)
        .map_err(anyhow::Error::msg)
        .context("ORLY_ADMINS")?;
    let store_cfg = StoreConfig {
        kind: args.db_type,
        data_dir: args.data_dir.clone(),
        postgres_url: args.db_url.clone(),
        grpc_server: args
            .db_server
            .clone()
            .or_else(|| std::env::var("ORLY_ACL_GRPC_DB_SERVER").ok())
            .unwrap_or_else(|| orly_consts::DB_LISTEN.into()),
        grpc_timeout: args.db_timeout,
        ..StoreConfig::default()
    };
    let store = open_store(&store_cfg)
        .await
        .with_context(|| format!("cannot open the {} store", store_cfg.kind))?;
    let engine = AclEngine::new(
        AclConfig {
            mode: args.mode,
            owners,
            admins,
            refresh_interval: args.follow_list_frequency,
        },
        store,
    );
    // Loads now if the store answers, else retries; readiness follows.
    let refresher = engine.spawn_refresher_with(args.refresh_interval);

    tracing::info!(mode = %args.mode, db_type = %store_cfg.kind, "orly-acl starting");
    orly_common::service::serve_until_signal(
        Service::Acl.binary(),
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve(listener, engine, shutdown),
        || async move { refresher.abort() },
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_orlys() {
        Args::command().debug_assert();
        let args = Args::try_parse_from(["orly-acl"]).unwrap();
        assert_eq!(args.listen, orly_consts::ACL_LISTEN);
        assert_eq!(args.db_type, StoreKind::Grpc);
    }
}
