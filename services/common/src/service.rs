//! The shell every service binary shares: its runtime, one clear error line and the exit
//! code, and ORLY's per-service log-level fallback.

use std::future::Future;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::ArgMatches;

/// Runs `run` on a multi-threaded runtime; an error is printed as `name: error` (with its
/// causes, via the alternate format) and the process exits with status 1.
pub fn run_main<F, E>(name: &str, run: F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log level: the `log_level` argument (`ORLY_LOG_LEVEL` or the flag), or — when that was
/// left at its default — ORLY's service-specific variable `fallback_env` if it is set.
pub fn log_level(matches: &ArgMatches, given: &str, fallback_env: &str) -> String {
    match (
        matches.value_source("log_level"),
        std::env::var(fallback_env),
    ) {
        (Some(ValueSource::DefaultValue), Ok(l)) if !l.trim().is_empty() => l,
        _ => given.to_string(),
    }
}

/// Why a service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid ORLY_METRICS_LISTEN {0:?}")]
    MetricsAddr(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC security settings: {0}")]
    Security(&'static crate::security::SecurityError),
}

/// The shutdown future a server is handed: resolves once SIGTERM/SIGINT arrived and the
/// service's own `stop` ran.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The run loop every gRPC service binary shares: binds `listen`, serves Prometheus metrics on
/// `metrics_listen` (empty: none), runs `serve` until SIGTERM/SIGINT. At the signal `stop` runs
/// first (background work ends, leases are handed back, held long polls are answered), then the
/// server drains its requests and returns.
pub async fn serve_until_signal<S, SF, T, TF>(
    name: &str,
    listen: &str,
    metrics_listen: &str,
    serve: S,
    stop: T,
) -> Result<(), ServiceError>
where
    S: FnOnce(tokio::net::TcpListener, Shutdown) -> SF,
    SF: Future<Output = Result<(), tonic::transport::Error>>,
    T: FnOnce() -> TF,
    TF: Future<Output = ()>,
{
    crate::security::process().map_err(ServiceError::Security)?;
    let metrics_addr = match metrics_listen.trim() {
        "" => None,
        s => Some(
            s.parse::<std::net::SocketAddr>()
                .map_err(|_| ServiceError::MetricsAddr(s.to_string()))?,
        ),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServiceError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "{name} listening");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || -> Shutdown {
        let mut rx = stop_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
    };
    if let Some(addr) = metrics_addr {
        let shutdown = stopped();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, shutdown).await {
                tracing::error!(%addr, error = %e, "metrics server failed");
            }
        });
    }
    let serving = serve(listener, stopped());
    tokio::pin!(serving);
    let result = tokio::select! {
        result = &mut serving => {
            stop().await;
            result
        }
        _ = crate::shutdown_signal() => {
            stop().await;
            let _ = stop_tx.send(true);
            serving.await
        }
    };
    result?;
    tracing::info!("{name} stopped");
    Ok(())
}
