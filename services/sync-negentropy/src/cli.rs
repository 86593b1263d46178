//! `orly sync-negentropy` (ORLY's `orly-sync-negentropy`): the negentropy service's command
//! line. Serves NIP-77 sessions for the relay and syncs with peer relays over negentropy, as
//! `orlysync.negentropy.v1.NegentropyService` with `grpc.health.v1`, until SIGTERM/SIGINT. The
//! `orly` binary dispatches here; anyhow is used only because this is the top of a program.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser};
use nostr::{Filter, JsonUtil};
use orly_consts::{env, Service};
use orly_db::{config, open_store, StoreConfig, StoreKind};

use crate::peers::parse_peer_list;
use crate::{grpc_server, EngineSettings, NegentropyEngine, SyncManager, SyncSettings};

/// The service's flags, each with ORLY's env name.
#[derive(Debug, Parser)]
#[command(
    name = "orly-sync-negentropy",
    version,
    about = "orly negentropy service: NIP-77 sessions for clients and relay-to-relay negentropy sync"
)]
pub struct Args {
    /// gRPC listen address (host:port).
    #[arg(
        long,
        env = "ORLY_SYNC_NEGENTROPY_LISTEN",
        default_value = orly_consts::SYNC_NEGENTROPY_LISTEN
    )]
    pub listen: String,
    /// Storage: grpc (orly-db), sqlite or postgres.
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_DB_TYPE", default_value = "grpc")]
    pub db_type: StoreKind,
    /// orly-db address with --db-type grpc.
    #[arg(
        long,
        env = "ORLY_SYNC_NEGENTROPY_DB_SERVER",
        default_value = orly_consts::DB_LISTEN
    )]
    pub db_server: String,
    /// Data directory holding the SQLite file (orly.db) with --db-type sqlite.
    #[arg(long, env = env::DATA_DIR, default_value_os_t = config::default_data_dir())]
    pub data_dir: PathBuf,
    /// PostgreSQL URL with --db-type postgres, e.g. postgres://user:pass@127.0.0.1/orly.
    #[arg(long, env = env::DB_URL)]
    pub db_url: Option<String>,
    /// Peer relays to sync with, comma-separated ws:// or wss:// URLs (added to the stored list).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_PEERS", default_value = "")]
    pub peers: String,
    /// Time between sync passes over all peers (e.g. 60s, 5m).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_INTERVAL", default_value = "60s", value_parser = orly_common::parse_duration)]
    pub interval: Duration,
    /// Largest negentropy message we send, in bytes: 0 (unlimited) or at least 4096.
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_FRAME_SIZE", default_value_t = 4096)]
    pub frame_size: u64,
    /// Id size in bytes. Negentropy protocol V1 (0x61) fixes ids at 32 bytes, the only value
    /// accepted (older NIP-77 drafts allowed shorter ids; ORLY's default was 16).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_ID_SIZE", default_value_t = 32)]
    pub id_size: usize,
    /// Idle time after which a client session is closed (NEG-ERR "closed: …" afterwards).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_SESSION_TIMEOUT", default_value = "5m", value_parser = orly_common::parse_duration)]
    pub session_timeout: Duration,
    /// Most events one session or peer sync may reconcile (NEG-ERR "blocked: …" above); 0: no cap.
    #[arg(
        long,
        env = "ORLY_SYNC_NEGENTROPY_MAX_RECORDS",
        default_value_t = 1_000_000
    )]
    pub max_records: usize,
    /// Most NIP-77 sessions open at once in this process (NEG-ERR "blocked: …" above); 0: no cap.
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_MAX_SESSIONS", default_value_t = crate::config::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// Most events held by all open NIP-77 sessions together (NEG-ERR "blocked: …" above); 0: no cap.
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_MAX_TOTAL_RECORDS", default_value_t = crate::config::DEFAULT_MAX_TOTAL_RECORDS)]
    pub max_total_records: usize,
    /// Peer sync windows reaching into this recent past are reconciled every pass (e.g. 1h).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_RECENT", default_value = "1h", value_parser = orly_common::parse_duration)]
    pub recent: Duration,
    /// Older peer sync windows are reconciled again this long after their last reconciliation.
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_RECHECK", default_value = "6h", value_parser = orly_common::parse_duration)]
    pub recheck: Duration,
    /// Events synced with peers, as a NIP-01 filter in JSON (default: everything).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_FILTER", default_value = "")]
    pub filter: String,
    /// Start the periodic peer sync at start-up (false: only the Start RPC starts it).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_AUTOSTART", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub autostart: bool,
    /// Deadline of one orly-db call with --db-type grpc.
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_DB_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    pub db_timeout: Duration,
    /// Log level or tracing filter directive (falls back to ORLY_SYNC_NEGENTROPY_LOG_LEVEL when unset).
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
    orly_common::service::run_main(Service::SyncNegentropy.binary(), run(matches))
}

async fn run(matches: ArgMatches) -> anyhow::Result<()> {
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    orly_common::init_tracing(&orly_common::service::log_level(
        &matches,
        &args.log_level,
        "ORLY_SYNC_NEGENTROPY_LOG_LEVEL",
    ));

    let engine_settings = EngineSettings {
        frame_size: args.frame_size,
        id_size: args.id_size,
        session_timeout: args.session_timeout,
        max_records: args.max_records,
        max_sessions: args.max_sessions,
        max_total_records: args.max_total_records,
        ..EngineSettings::default()
    };
    let filter = match args.filter.trim() {
        "" => Filter::new(),
        json => Filter::from_json(json)
            .with_context(|| format!("invalid ORLY_SYNC_NEGENTROPY_FILTER {json:?}"))?,
    };
    let sync_settings = SyncSettings {
        interval: args.interval,
        frame_size: args.frame_size,
        max_records: args.max_records,
        window_recent: args.recent,
        window_recheck: args.recheck,
        filter,
        ..SyncSettings::default()
    };
    let peers =
        parse_peer_list(&args.peers).map_err(|e| anyhow!("ORLY_SYNC_NEGENTROPY_PEERS: {e}"))?;

    let cfg = StoreConfig {
        kind: args.db_type,
        data_dir: args.data_dir.clone(),
        postgres_url: args.db_url.clone(),
        grpc_server: args.db_server.clone(),
        grpc_timeout: args.db_timeout,
        ..StoreConfig::default()
    };
    let store = open_store(&cfg)
        .await
        .with_context(|| format!("cannot open the {} store", cfg.kind))?;
    let engine = NegentropyEngine::new(store.clone(), engine_settings).map_err(|e| anyhow!(e))?;
    let manager = SyncManager::new(store, sync_settings).map_err(|e| anyhow!(e))?;

    tracing::info!(db_type = %cfg.kind, "orly-sync-negentropy store open");

    let reaper = engine.spawn_reaper();
    // Peers from the environment are stored once orly-db answers (it may start after us).
    let startup = {
        let manager = manager.clone();
        let autostart = args.autostart;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            loop {
                match manager.add_peers(&peers).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot store the configured peers yet; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
            if autostart {
                manager.start();
            }
        })
    };

    let stopper = manager.clone();
    orly_common::service::serve_until_signal(
        Service::SyncNegentropy.binary(),
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve(listener, engine, manager, shutdown),
        || async move {
            startup.abort();
            stopper.stop();
            reaper.abort();
        },
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
        let args = Args::try_parse_from(["orly-sync-negentropy"]).unwrap();
        assert_eq!(args.listen, orly_consts::SYNC_NEGENTROPY_LISTEN);
        assert_eq!(args.db_server, orly_consts::DB_LISTEN);
        assert!(args.autostart);
        // The documented defaults are the library's.
        assert_eq!(args.max_sessions, crate::config::DEFAULT_MAX_SESSIONS);
        assert_eq!(
            args.max_total_records,
            crate::config::DEFAULT_MAX_TOTAL_RECORDS
        );
        assert_eq!(args.recent, crate::config::DEFAULT_WINDOW_RECENT);
        assert_eq!(args.recheck, crate::config::DEFAULT_WINDOW_RECHECK);
    }
}
