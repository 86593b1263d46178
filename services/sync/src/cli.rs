//! The command lines of the three services (`orly sync-distributed`, `orly sync-cluster`,
//! `orly sync-relaygroup`, ORLY's `orly-sync-*`), one submodule each, and what they share:
//! storage options and ORLY's variable fallbacks (their run loop is
//! `orly_common::service::serve_until_signal`). The `orly` binary dispatches here.

pub mod cluster;
pub mod distributed;
pub mod relaygroup;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use orly_db::{open_store, SharedStore, StoreConfig, StoreKind};

/// The first of `names` set to a non-empty value, when `given` (the service's own variable or
/// flag) is not.
pub fn fallback(given: Option<String>, names: &[&str]) -> Option<String> {
    given.filter(|v| !v.trim().is_empty()).or_else(|| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
    })
}

/// A boolean variable ("true"/"1"/"yes"/"on", or false-y), `None` when unset.
pub fn env_bool(name: &str) -> Option<bool> {
    let v = std::env::var(name).ok()?;
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

/// Opens the service's store.
pub async fn store(
    kind: StoreKind,
    db_server: &str,
    data_dir: PathBuf,
    db_url: Option<String>,
    db_timeout: Duration,
) -> anyhow::Result<SharedStore> {
    let cfg = StoreConfig {
        kind,
        data_dir,
        postgres_url: db_url,
        grpc_server: db_server.to_string(),
        grpc_timeout: db_timeout,
        ..StoreConfig::default()
    };
    open_store(&cfg)
        .await
        .with_context(|| format!("cannot open the {} store", cfg.kind))
}

/// Declares a service's `Args`: the options every sync service has — listen address,
/// storage, log level, metrics, with env names under `prefix` — followed by its own fields.
/// Also gives `Args::parse_from_args(args)` (the arguments and the log level, with ORLY's
/// `<prefix>_LOG_LEVEL` fallback) and `Args::open_store()`.
#[macro_export]
macro_rules! service_args {
    (
        name: $name:literal,
        prefix: $prefix:literal,
        listen: $listen:expr,
        about: $about:literal,
        { $($extra:tt)* }
    ) => {
        #[derive(Debug, clap::Parser)]
        #[command(name = $name, version, about = $about)]
        struct Args {
            /// gRPC listen address (host:port).
            #[arg(long, env = concat!($prefix, "_LISTEN"), default_value = $listen)]
            listen: String,
            /// Storage: grpc (orly-db), sqlite or postgres.
            #[arg(long, env = concat!($prefix, "_DB_TYPE"), default_value = "grpc")]
            db_type: orly_db::StoreKind,
            /// orly-db address with --db-type grpc.
            #[arg(long, env = concat!($prefix, "_DB_SERVER"), default_value = orly_consts::DB_LISTEN)]
            db_server: String,
            /// Deadline of one orly-db call with --db-type grpc.
            #[arg(long, env = concat!($prefix, "_DB_TIMEOUT"), default_value = "10s", value_parser = orly_common::parse_duration)]
            db_timeout: std::time::Duration,
            /// Data directory holding the SQLite file (orly.db) with --db-type sqlite.
            #[arg(long, env = "ORLY_DATA_DIR", default_value_os_t = orly_db::config::default_data_dir())]
            data_dir: std::path::PathBuf,
            /// PostgreSQL URL with --db-type postgres.
            #[arg(long, env = "ORLY_DB_URL")]
            db_url: Option<String>,
            #[arg(long, env = "ORLY_LOG_LEVEL", default_value = "info",
                  help = concat!("Log level or tracing filter (falls back to ", $prefix, "_LOG_LEVEL when unset)"))]
            log_level: String,
            /// Prometheus /metrics listen address (host:port); empty disables metrics.
            #[arg(long, env = "ORLY_METRICS_LISTEN", default_value = "")]
            metrics_listen: String,
            $($extra)*
        }

        impl Args {
            /// The arguments (the first is the program name; exits with clap's message on bad
            /// ones or `--help`) and the log level.
            fn parse_from_args<I, T>(args: I) -> (Self, String)
            where
                I: IntoIterator<Item = T>,
                T: Into<std::ffi::OsString> + Clone,
            {
                use clap::{CommandFactory, FromArgMatches};
                let matches = Self::command().get_matches_from(args);
                let args = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
                let level = orly_common::service::log_level(
                    &matches,
                    &args.log_level,
                    concat!($prefix, "_LOG_LEVEL"),
                );
                (args, level)
            }

            async fn open_store(&self) -> anyhow::Result<orly_db::SharedStore> {
                $crate::cli::store(
                    self.db_type,
                    &self.db_server,
                    self.data_dir.clone(),
                    self.db_url.clone(),
                    self.db_timeout,
                )
                .await
            }
        }
    };
}
