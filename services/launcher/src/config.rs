//! Launcher settings: ORLY's `ORLY_LAUNCHER_*` variables, each also a flag.

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;
use orly_common::parse_duration;

/// Supervises the orly services on one host.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orly-launcher",
    version,
    about = "orly-launcher: starts orly-db, orly-acl, the sync services and the relay in order, \
             restarts them when they die, stops them in reverse order",
    after_help = "Every other ORLY_* variable in the launcher's environment is passed on to the \
                  children (for example ORLY_DATA_DIR, ORLY_DB_TYPE for orly-db, ORLY_ACL_MODE)."
)]
pub struct LauncherConfig {
    /// orly-db binary (a path, or a name looked up next to the launcher, then in PATH).
    #[arg(long, env = "ORLY_LAUNCHER_DB_BINARY", default_value = "orly-db")]
    pub db_binary: String,
    /// orly-db gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_DB_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub db_listen: String,
    /// How long orly-db may take to become Ready.
    #[arg(long, env = "ORLY_LAUNCHER_DB_READY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub db_ready_timeout: Duration,

    /// Run orly-acl (the relay then asks it for access decisions).
    #[arg(long, env = "ORLY_LAUNCHER_ACL_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub acl_enabled: bool,
    /// orly-acl binary.
    #[arg(long, env = "ORLY_LAUNCHER_ACL_BINARY", default_value = "orly-acl")]
    pub acl_binary: String,
    /// orly-acl gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_ACL_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
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
        default_value = "orly-sync-distributed"
    )]
    pub sync_distributed_binary: String,
    /// orly-sync-distributed gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_DISTRIBUTED_LISTEN",
        default_value = "127.0.0.1:50061"
    )]
    pub sync_distributed_listen: String,

    /// Run orly-sync-cluster.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_CLUSTER_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sync_cluster_enabled: bool,
    /// orly-sync-cluster binary.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_CLUSTER_BINARY",
        default_value = "orly-sync-cluster"
    )]
    pub sync_cluster_binary: String,
    /// orly-sync-cluster gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_CLUSTER_LISTEN",
        default_value = "127.0.0.1:50062"
    )]
    pub sync_cluster_listen: String,

    /// Run orly-sync-relaygroup.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_RELAYGROUP_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sync_relaygroup_enabled: bool,
    /// orly-sync-relaygroup binary.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_RELAYGROUP_BINARY",
        default_value = "orly-sync-relaygroup"
    )]
    pub sync_relaygroup_binary: String,
    /// orly-sync-relaygroup gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_RELAYGROUP_LISTEN",
        default_value = "127.0.0.1:50063"
    )]
    pub sync_relaygroup_listen: String,

    /// Run orly-sync-negentropy.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_NEGENTROPY_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sync_negentropy_enabled: bool,
    /// orly-sync-negentropy binary.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_NEGENTROPY_BINARY",
        default_value = "orly-sync-negentropy"
    )]
    pub sync_negentropy_binary: String,
    /// orly-sync-negentropy gRPC address.
    #[arg(
        long,
        env = "ORLY_LAUNCHER_SYNC_NEGENTROPY_LISTEN",
        default_value = "127.0.0.1:50064"
    )]
    pub sync_negentropy_listen: String,

    /// How long each sync service may take to become Ready.
    #[arg(long, env = "ORLY_LAUNCHER_SYNC_READY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub sync_ready_timeout: Duration,

    /// The relay binary.
    #[arg(long, env = "ORLY_LAUNCHER_RELAY_BINARY", default_value = "orly")]
    pub relay_binary: String,
    /// The relay's address (passed to it as ORLY_LISTEN and ORLY_PORT).
    #[arg(
        long,
        env = "ORLY_LAUNCHER_RELAY_LISTEN",
        default_value = "127.0.0.1:3334"
    )]
    pub relay_listen: String,
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
    #[arg(long, env = "ORLY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}
