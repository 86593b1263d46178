//! orly-sync-relaygroup: relay group configs (kind 39105, and ORLY's 10008) and the
//! authoritative relay list, as `orlysync.relaygroup.v1.RelayGroupService` with
//! `grpc.health.v1`, until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::{CommandFactory, FromArgMatches, Parser};
use orly_db::{config, StoreKind};
use orly_sync::cli::{self, fallback};
use orly_sync::{grpc_server, parse_pubkeys, RelayGroup};

#[derive(Debug, Parser)]
#[command(
    name = "orly-sync-relaygroup",
    version,
    about = "orly relay group service: validates relay group configs and names the authoritative relay list"
)]
struct Args {
    /// gRPC listen address (host:port).
    #[arg(
        long,
        env = "ORLY_SYNC_RELAYGROUP_LISTEN",
        default_value = "127.0.0.1:50063"
    )]
    listen: String,
    /// Storage: grpc (orly-db), sqlite or postgres.
    #[arg(long, env = "ORLY_SYNC_RELAYGROUP_DB_TYPE", default_value = "grpc")]
    db_type: StoreKind,
    /// orly-db address with --db-type grpc.
    #[arg(
        long,
        env = "ORLY_SYNC_RELAYGROUP_DB_SERVER",
        default_value = "127.0.0.1:50051"
    )]
    db_server: String,
    /// Deadline of one orly-db call with --db-type grpc.
    #[arg(long, env = "ORLY_SYNC_RELAYGROUP_DB_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    db_timeout: Duration,
    /// Data directory holding the SQLite file (orly.db) with --db-type sqlite.
    #[arg(long, env = "ORLY_DATA_DIR", default_value_os_t = config::default_data_dir())]
    data_dir: PathBuf,
    /// PostgreSQL URL with --db-type postgres.
    #[arg(long, env = "ORLY_DB_URL")]
    db_url: Option<String>,
    /// Who may publish relay group configs, npub or hex, comma-separated [falls back to
    /// ORLY_RELAY_GROUP_ADMINS]. Without any, no config is authoritative.
    #[arg(long, env = "ORLY_SYNC_RELAYGROUP_ADMINS")]
    admins: Option<String>,
    /// Log level or tracing filter (falls back to ORLY_SYNC_RELAYGROUP_LOG_LEVEL when unset).
    #[arg(long, env = "ORLY_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Prometheus /metrics listen address (host:port); empty disables metrics.
    #[arg(long, env = "ORLY_METRICS_LISTEN", default_value = "")]
    metrics_listen: String,
}

fn main() -> std::process::ExitCode {
    orly_common::service::run_main("orly-sync-relaygroup", run())
}

async fn run() -> anyhow::Result<()> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    orly_common::init_tracing(&orly_common::service::log_level(
        &matches,
        &args.log_level,
        "ORLY_SYNC_RELAYGROUP_LOG_LEVEL",
    ));
    let admins = fallback(args.admins.clone(), &["ORLY_RELAY_GROUP_ADMINS"]).unwrap_or_default();
    let admins = parse_pubkeys(&admins).map_err(|e| anyhow!("ORLY_SYNC_RELAYGROUP_ADMINS: {e}"))?;
    if admins.is_empty() {
        tracing::warn!("no relay group admins: no config will be authoritative");
    }
    let store = cli::store(
        args.db_type,
        &args.db_server,
        args.data_dir.clone(),
        args.db_url.clone(),
        args.db_timeout,
    )
    .await?;
    let group = RelayGroup::new(store, admins);
    cli::run(
        "orly-sync-relaygroup",
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve_relaygroup(listener, group, shutdown),
        || async {},
    )
    .await
}
