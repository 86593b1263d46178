//! orly-sync-cluster: replication between the member relays of a cluster (membership by kind
//! 39108), as `orlysync.cluster.v1.ClusterSyncService` with `grpc.health.v1`, until SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use orly_db::{config, StoreKind};
use orly_sync::cli::{self, env_bool, fallback};
use orly_sync::{grpc_server, parse_pubkeys, ClusterSettings, ClusterSync};

#[derive(Debug, Parser)]
#[command(
    name = "orly-sync-cluster",
    version,
    about = "orly cluster sync: replicates every member relay of the cluster (membership by kind 39108) in near real time"
)]
struct Args {
    /// gRPC listen address (host:port).
    #[arg(
        long,
        env = "ORLY_SYNC_CLUSTER_LISTEN",
        default_value = "127.0.0.1:50062"
    )]
    listen: String,
    /// Storage: grpc (orly-db), sqlite or postgres.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_DB_TYPE", default_value = "grpc")]
    db_type: StoreKind,
    /// orly-db address with --db-type grpc.
    #[arg(
        long,
        env = "ORLY_SYNC_CLUSTER_DB_SERVER",
        default_value = "127.0.0.1:50051"
    )]
    db_server: String,
    /// Deadline of one orly-db call with --db-type grpc.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_DB_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    db_timeout: Duration,
    /// Data directory holding the SQLite file (orly.db) with --db-type sqlite.
    #[arg(long, env = "ORLY_DATA_DIR", default_value_os_t = config::default_data_dir())]
    data_dir: PathBuf,
    /// PostgreSQL URL with --db-type postgres.
    #[arg(long, env = "ORLY_DB_URL")]
    db_url: Option<String>,
    /// Who may publish cluster membership (kind 39108), npub or hex, comma-separated
    /// [falls back to ORLY_CLUSTER_ADMINS, then ORLY_ADMINS].
    #[arg(long, env = "ORLY_SYNC_CLUSTER_ADMINS")]
    admins: Option<String>,
    /// Replicate privileged events (DMs, gift wraps, …) [default true; falls back to
    /// ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS].
    #[arg(long, env = "ORLY_SYNC_CLUSTER_PROPAGATE_PRIVILEGED", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    propagate_privileged: Option<bool>,
    /// This relay's public URL, never replicated from [falls back to ORLY_RELAY_URL].
    #[arg(long, env = "ORLY_SYNC_CLUSTER_RELAY_URL")]
    relay_url: Option<String>,
    /// Pause after a failed poll, and between polls of members that cannot long-poll.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_POLL_INTERVAL", default_value = "5s", value_parser = orly_common::parse_duration)]
    poll_interval: Duration,
    /// How long a member holds a poll open waiting for new events (at most 5s).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_LONG_POLL", default_value = "5s", value_parser = orly_common::parse_duration)]
    long_poll: Duration,
    /// How long a member's NIP-11 identity is cached.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_NIP11_TTL", default_value = "30m", value_parser = orly_common::parse_duration)]
    nip11_ttl: Duration,
    /// Deadline of one request to a member (a long poll gets the long-poll time on top).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    timeout: Duration,
    /// Lease on a member held by the replica replicating it.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_LEASE_TTL", default_value = "15s", value_parser = orly_common::parse_duration)]
    lease_ttl: Duration,
    /// Answer unsigned /cluster requests (ORLY members sign none); signed ones are still checked.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_ALLOW_UNAUTHENTICATED", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    allow_unauthenticated: bool,
    /// Start replicating at start-up (false: only the Start RPC starts it).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_AUTOSTART", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    autostart: bool,
    /// Log level or tracing filter (falls back to ORLY_SYNC_CLUSTER_LOG_LEVEL when unset).
    #[arg(long, env = "ORLY_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Prometheus /metrics listen address (host:port); empty disables metrics.
    #[arg(long, env = "ORLY_METRICS_LISTEN", default_value = "")]
    metrics_listen: String,
}

fn main() -> std::process::ExitCode {
    orly_common::service::run_main("orly-sync-cluster", run())
}

async fn run() -> anyhow::Result<()> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    orly_common::init_tracing(&orly_common::service::log_level(
        &matches,
        &args.log_level,
        "ORLY_SYNC_CLUSTER_LOG_LEVEL",
    ));
    let admins =
        fallback(args.admins.clone(), &["ORLY_CLUSTER_ADMINS", "ORLY_ADMINS"]).unwrap_or_default();
    let admins = parse_pubkeys(&admins).map_err(|e| anyhow!("ORLY_SYNC_CLUSTER_ADMINS: {e}"))?;
    if admins.is_empty() {
        tracing::warn!("no cluster admins: membership comes only from the UpdateMembership RPC");
    }
    let settings = ClusterSettings {
        admins,
        propagate_privileged: args
            .propagate_privileged
            .or_else(|| env_bool("ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS"))
            .unwrap_or(true),
        relay_url: fallback(args.relay_url.clone(), &["ORLY_RELAY_URL"]),
        poll_interval: args.poll_interval,
        long_poll: args.long_poll,
        nip11_ttl: args.nip11_ttl,
        timeout: args.timeout,
        lease_ttl: args.lease_ttl,
        allow_unauthenticated: args.allow_unauthenticated,
        ..ClusterSettings::default()
    };
    let store = cli::store(
        args.db_type,
        &args.db_server,
        args.data_dir.clone(),
        args.db_url.clone(),
        args.db_timeout,
    )
    .await?;
    let sync = ClusterSync::new(store, settings).map_err(|e| anyhow!(e))?;
    if args.autostart {
        sync.start();
    }
    let stopper = sync.clone();
    cli::run(
        "orly-sync-cluster",
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve_cluster(listener, sync, shutdown),
        || async move { stopper.stop().await },
    )
    .await
}
