//! Launcher settings: ORLY's `ORLY_LAUNCHER_*` variables, each also a flag; names, ports and
//! default addresses come from `orly_consts`.

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;
use orly_common::parse_duration;
use orly_consts::{env, Service};

/// Supervises the orly services on one host.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orly-launcher",
    version,
    about = "orly-launcher: starts orly-db, orly-acl, the sync services and the relay in order, \
             restarts them when they die, stops them in reverse order",
    after_help = "Binaries: each *_BINARY is a path, or a name looked up next to the launcher \
                  (a link to the orly binary, as in the images), else the orly binary the \
                  launcher runs in starts the service by its subcommand (orly db, orly acl, …), \
                  else PATH. A binary named orly is always given the service's subcommand.\n\n\
                  The relay listens on ORLY_LAUNCHER_RELAY_LISTEN when set, else on ORLY_LISTEN \
                  and ORLY_PORT when those are set, else on 127.0.0.1:3334.\n\n\
                  Every other ORLY_* variable in the launcher's environment is passed on to the \
                  children (for example ORLY_DATA_DIR, ORLY_DB_TYPE for orly-db, ORLY_ACL_MODE); \
                  the relay does not get the settings that the services it reaches over gRPC \
                  read in its place (ORLY_DB_URL, ORLY_DATA_DIR, ORLY_SYNC_<SERVICE>_*, …)."
)]
pub struct LauncherConfig {
    /// orly-db binary.
    #[arg(long, env = "ORLY_LAUNCHER_DB_BINARY", default_value = Service::Db.binary())]
    pub db_binary: String,
    /// orly-db gRPC address.
    #[arg(long, env = "ORLY_LAUNCHER_DB_LISTEN", default_value = orly_consts::DB_LISTEN)]
    pub db_listen: String,
    /// How long orly-db may take to become Ready.
    #[arg(long, env = "ORLY_LAUNCHER_DB_READY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub db_ready_timeout: Duration,

    /// Run orly-acl (the relay then asks it for access decisions).
    #[arg(long, env = "ORLY_LAUNCHER_ACL_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub acl_enabled: bool,
    /// orly-acl binary.
    #[arg(long, env = "ORLY_LAUNCHER_ACL_BINARY", default_value = Service::Acl.binary())]
    pub acl_binary: String,
    /// orly-acl gRPC address.
    #[arg(long, env = "ORLY_LAUNCHER_ACL_LISTEN", default_value = orly_consts::ACL_LISTEN)]
    pub acl_listen: String,
    /// How long orly-acl may take to become Ready.
    #[arg(long, env = "ORLY_LAUNCHER_ACL_READY_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub acl_ready_timeout: Duration,

    /// Run orly-sync-distributed.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_DISTRIBUTED_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sync_distributed_enabled: bool,
    /// orly-sync-distributed binary.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_DISTRIBUTED_BINARY",
        default_value = Service::SyncDistributed.binary()
    )]
    pub sync_distributed_binary: String,
    /// orly-sync-distributed gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_DISTRIBUTED_LISTEN",
        default_value = orly_consts::SYNC_DISTRIBUTED_LISTEN
    )]
    pub sync_distributed_listen: String,

    /// Run orly-sync-cluster.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_CLUSTER_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sync_cluster_enabled: bool,
    /// orly-sync-cluster binary.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_CLUSTER_BINARY",
        default_value = Service::SyncCluster.binary()
    )]
    pub sync_cluster_binary: String,
    /// orly-sync-cluster gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_CLUSTER_LISTEN",
        default_value = orly_consts::SYNC_CLUSTER_LISTEN
    )]
    pub sync_cluster_listen: String,

    /// Run orly-sync-relaygroup.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_RELAYGROUP_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sync_relaygroup_enabled: bool,
    /// orly-sync-relaygroup binary.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_RELAYGROUP_BINARY",
        default_value = Service::SyncRelayGroup.binary()
    )]
    pub sync_relaygroup_binary: String,
    /// orly-sync-relaygroup gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_RELAYGROUP_LISTEN",
        default_value = orly_consts::SYNC_RELAYGROUP_LISTEN
    )]
    pub sync_relaygroup_listen: String,

    /// Run orly-sync-negentropy.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_NEGENTROPY_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sync_negentropy_enabled: bool,
    /// orly-sync-negentropy binary.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_NEGENTROPY_BINARY",
        default_value = Service::SyncNegentropy.binary()
    )]
    pub sync_negentropy_binary: String,
    /// orly-sync-negentropy gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_NEGENTROPY_LISTEN",
        default_value = orly_consts::SYNC_NEGENTROPY_LISTEN
    )]
    pub sync_negentropy_listen: String,

    /// How long each sync service may take to become Ready.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_READY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub sync_ready_timeout: Duration,

    /// The relay binary.
    #[arg(long, env = "ORLY_LAUNCHER_RELAY_BINARY", default_value = Service::Relay.binary())]
    pub relay_binary: String,
    /// The relay's address (passed to it as ORLY_LISTEN and ORLY_PORT) [default: ORLY_LISTEN
    /// and ORLY_PORT when set, else 127.0.0.1:3334]. Wins over ORLY_LISTEN and ORLY_PORT.
    #[arg(long, env = "ORLY_LAUNCHER_RELAY_LISTEN")]
    pub relay_listen: Option<String>,
    /// ORLY_LISTEN of the launcher's environment: the relay's own name for its address.
    #[arg(skip = std::env::var(env::LISTEN).ok())]
    pub orly_listen: Option<String>,
    /// ORLY_PORT of the launcher's environment.
    #[arg(skip = std::env::var(env::PORT).ok())]
    pub orly_port: Option<String>,
    /// How long the relay may take to become Ready (its /readyz answering 200).
    #[arg(long, env = "ORLY_LAUNCHER_RELAY_READY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub relay_ready_timeout: Duration,

    /// Grace period between SIGTERM and SIGKILL when stopping a child.
    #[arg(long, env = "ORLY_LAUNCHER_STOP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stop_timeout: Duration,
    /// Longest wait between restarts of a child that keeps dying (the wait doubles from 500ms).
    #[arg(long, env = "ORLY_LAUNCHER_RESTART_BACKOFF_MAX", default_value = "30s", value_parser = parse_duration)]
    pub restart_backoff_max: Duration,
    /// The launcher's own log level.
    #[arg(long, env = env::LOG_LEVEL, default_value = "info")]
    pub log_level: String,
}
