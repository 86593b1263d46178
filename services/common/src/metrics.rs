//! Prometheus metrics: one global recorder, rendered at `/metrics`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (tests that embed several services
            // in one process); the handle still renders what this recorder sees.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A router serving `GET /metrics` in the Prometheus text format.
pub fn router() -> Router {
    let handle = prometheus();
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    )
}

/// [`router`] plus `/healthz` (the process answers) and `/readyz` (every gRPC service it
/// serves is ready): the probes of a service whose gRPC port speaks TLS, which kubelet's gRPC
/// probe cannot.
pub fn service_router() -> Router {
    router().route("/healthz", get(|| async { "ok" })).route(
        "/readyz",
        get(|| async {
            if crate::grpc::process_ready() {
                (axum::http::StatusCode::OK, "ready")
            } else {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready")
            }
        }),
    )
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, service_router())
        .with_graceful_shutdown(shutdown)
        .await
}
