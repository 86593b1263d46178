//! orly-sync-distributed: serial-based pull sync between peer relays, as
//! `orlysync.distributed.v1.DistributedSyncService` with `grpc.health.v1`, until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use orly_db::{config, StoreKind};
use orly_sync::cli::{self, fallback};
use orly_sync::http::parse_url_list;
use orly_sync::{grpc_server, DistributedSettings, DistributedSync};

#[derive(Debug, Parser)]
#[command(
    name = "orly-sync-distributed",
    version,
    about = "orly distributed sync: pulls new events from peer relays by serial, and answers their pulls"
)]
struct Args {
    /// gRPC listen address (host:port).
    #[arg(
        long,
        env = "ORLY_SYNC_DISTRIBUTED_LISTEN",
        default_value = "127.0.0.1:50061"
    )]
    listen: String,
    /// Storage: grpc (orly-db), sqlite or postgres.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_DB_TYPE", default_value = "grpc")]
    db_type: StoreKind,
    /// orly-db address with --db-type grpc.
    #[arg(
        long,
        env = "ORLY_SYNC_DISTRIBUTED_DB_SERVER",
        default_value = "127.0.0.1:50051"
    )]
    db_server: String,
    /// Deadline of one orly-db call with --db-type grpc.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_DB_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    db_timeout: Duration,
    /// Data directory holding the SQLite file (orly.db) with --db-type sqlite.
    #[arg(long, env = "ORLY_DATA_DIR", default_value_os_t = config::default_data_dir())]
    data_dir: PathBuf,
    /// PostgreSQL URL with --db-type postgres.
    #[arg(long, env = "ORLY_DB_URL")]
    db_url: Option<String>,
    /// Peer relays, comma-separated http(s) or ws(s) URLs [falls back to ORLY_RELAY_PEERS];
    /// the relay group's relays are added to them.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_PEERS")]
    peers: Option<String>,
    /// This relay's public URL, never polled as a peer [falls back to ORLY_RELAY_URL].
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_RELAY_URL")]
    relay_url: Option<String>,
    /// node_id sent to peers (default: the relay identity pubkey, hex).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_NODE_ID")]
    node_id: Option<String>,
    /// Time between pulls from each peer (NotifyNewEvent and TriggerSync wake them earlier).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_INTERVAL", default_value = "30s", value_parser = orly_common::parse_duration)]
    interval: Duration,
    /// How long a peer's NIP-11 identity is cached.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_NIP11_TTL", default_value = "30m", value_parser = orly_common::parse_duration)]
    nip11_ttl: Duration,
    /// Deadline of one request to a peer.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    timeout: Duration,
    /// Lease on a peer held by the replica pulling it; a dead replica's peers move after it.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_LEASE_TTL", default_value = "15s", value_parser = orly_common::parse_duration)]
    lease_ttl: Duration,
    /// Start pulling at start-up (false: only answer peers).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_AUTOSTART", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    autostart: bool,
    /// Log level or tracing filter (falls back to ORLY_SYNC_DISTRIBUTED_LOG_LEVEL when unset).
    #[arg(long, env = "ORLY_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Prometheus /metrics listen address (host:port); empty disables metrics.
    #[arg(long, env = "ORLY_METRICS_LISTEN", default_value = "")]
    metrics_listen: String,
}

fn main() -> std::process::ExitCode {
    orly_common::service::run_main("orly-sync-distributed", run())
}

async fn run() -> anyhow::Result<()> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    orly_common::init_tracing(&orly_common::service::log_level(
        &matches,
        &args.log_level,
        "ORLY_SYNC_DISTRIBUTED_LOG_LEVEL",
    ));
    let peers = fallback(args.peers.clone(), &["ORLY_RELAY_PEERS"]).unwrap_or_default();
    let settings = DistributedSettings {
        relay_url: fallback(args.relay_url.clone(), &["ORLY_RELAY_URL"]),
        node_id: args.node_id.clone(),
        peers: parse_url_list(&peers).map_err(|e| anyhow!("ORLY_SYNC_DISTRIBUTED_PEERS: {e}"))?,
        interval: args.interval,
        nip11_ttl: args.nip11_ttl,
        timeout: args.timeout,
        lease_ttl: args.lease_ttl,
        ..DistributedSettings::default()
    };
    let store = cli::store(
        args.db_type,
        &args.db_server,
        args.data_dir.clone(),
        args.db_url.clone(),
        args.db_timeout,
    )
    .await?;
    let sync = DistributedSync::new(store, settings).map_err(|e| anyhow!(e))?;
    if args.autostart {
        sync.start();
    }
    let stopper = sync.clone();
    cli::run(
        "orly-sync-distributed",
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve_distributed(listener, sync, shutdown),
        || async move { stopper.stop().await },
    )
    .await
}
