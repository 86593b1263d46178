//! orly-operator: runs the OrlyRelay controller (behind leader election) and the HTTP server
//! for `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::api::ListParams;
use kube::{Api, Client};
use orly_operator::controller::{self, ControllerConfig};
use orly_operator::crd::OrlyRelay;
use orly_operator::http::{self, HttpState};
use orly_operator::leader::{self, LeaseConfig};
use orly_operator::plan::OperatorDefaults;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// Kubernetes operator for orly: reconciles OrlyRelay resources.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Watch only this namespace; all namespaces when empty.
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Listen address of /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "ORLY_OPERATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    metrics_listen: SocketAddr,
    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, env = "ORLY_OPERATOR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log as JSON lines.
    #[arg(long, env = "ORLY_OPERATOR_LOG_JSON", default_value_t = false)]
    log_json: bool,
    /// Take part in leader election; disable only when running a single replica.
    #[arg(long, env = "ORLY_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(
        long,
        env = "ORLY_OPERATOR_LEASE_NAME",
        default_value = "orly-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease; defaults to WATCH_NAMESPACE, then `default`.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Identity in the election and in Events; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease is valid without renewal.
    #[arg(long, env = "ORLY_OPERATOR_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// OrlyRelays reconciled at once.
    #[arg(long, env = "ORLY_OPERATOR_CONCURRENCY", default_value_t = 4)]
    concurrency: u16,
    /// Image repository used when an OrlyRelay names none.
    #[arg(long, env = "ORLY_OPERATOR_DEFAULT_REPOSITORY", default_value = orly_operator::crd::DEFAULT_REPOSITORY)]
    default_repository: String,
    /// Image tag used when an OrlyRelay names none.
    #[arg(long, env = "ORLY_OPERATOR_DEFAULT_TAG", default_value = env!("CARGO_PKG_VERSION"))]
    default_tag: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    // An empty WATCH_NAMESPACE (a common Helm default) means all namespaces.
    args.watch_namespace = args.watch_namespace.filter(|ns| !ns.is_empty());
    let filter = EnvFilter::try_new(&args.log_level).context("parsing --log-level")?;
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colour only on a terminal, so container logs stay plain.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
    }

    let metrics = orly_operator::metrics::install().context("installing metrics recorder")?;
    let ready = Arc::new(AtomicBool::new(false));
    let state = HttpState {
        ready: ready.clone(),
        metrics: Some(metrics),
    };
    let listen = args.metrics_listen;
    tokio::spawn(async move {
        if let Err(e) = http::serve(listen, state).await {
            error!(error = %e, %listen, "HTTP server failed");
        }
    });
    info!(%listen, "serving /healthz, /readyz and /metrics");

    let client = Client::try_default()
        .await
        .context("building Kubernetes client")?;
    tokio::spawn(readiness_check(
        client.clone(),
        args.watch_namespace.clone(),
        ready,
    ));

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "orly-operator".to_string());
    let config = ControllerConfig {
        namespace: args.watch_namespace.clone(),
        concurrency: args.concurrency,
        defaults: OperatorDefaults {
            repository: args.default_repository.clone(),
            tag: args.default_tag.clone(),
        },
        instance: Some(identity.clone()),
    };

    if !args.leader_election {
        controller::run(client, config, shutdown_signal()).await;
        return Ok(());
    }

    let lease = LeaseConfig {
        name: args.lease_name.clone(),
        namespace: args
            .lease_namespace
            .clone()
            .or_else(|| args.watch_namespace.clone())
            .unwrap_or_else(|| "default".to_string()),
        identity,
        duration_secs: args.lease_duration,
        grace_secs: (args.lease_duration / 3).max(1),
    };
    let election = leader::elect(client.clone(), &lease)
        .await
        .context("joining leader election")?;
    info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for leadership");
    let run = leader::run_while_leader(election.is_leader, |stop| {
        let client = client.clone();
        let config = config.clone();
        async move {
            let stop = async move {
                tokio::select! {
                    _ = stop => {}
                    _ = shutdown_signal() => {}
                }
            };
            controller::run(client, config, stop).await;
        }
    });
    tokio::select! {
        _ = run => {}
        _ = shutdown_signal() => info!("shutting down"),
    }
    // Dropping the receivers inside `run` makes the Lease task release the Lease.
    match tokio::time::timeout(Duration::from_secs(5), election.task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "releasing the Lease failed"),
        Ok(_) => {}
        Err(_) => warn!("the Lease was not released in time"),
    }
    Ok(())
}

/// `/readyz` turns ready once OrlyRelays can be listed: the API server answers and the CRD is
/// installed. Retried until it succeeds.
async fn readiness_check(client: Client, namespace: Option<String>, ready: Arc<AtomicBool>) {
    let api: Api<OrlyRelay> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => {
                ready.store(true, Ordering::Release);
                return;
            }
            Err(e) => warn!(error = %e, "cannot list OrlyRelays yet (is the CRD installed?)"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
