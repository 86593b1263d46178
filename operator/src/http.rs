//! The operator's HTTP endpoints: `/healthz` (process alive), `/readyz` (API server reachable
//! and the OrlyRelay CRD served) and Prometheus `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

/// What the endpoints report.
#[derive(Clone)]
pub struct HttpState {
    /// Set once the operator has listed OrlyRelays successfully.
    pub ready: Arc<AtomicBool>,
    /// Renders the metrics; `None` serves an empty page (tests).
    pub metrics: Option<PrometheusHandle>,
}

/// The router, separate from serving so tests reach it without a socket.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<HttpState>) -> String {
    state.metrics.as_ref().map(|h| h.render()).unwrap_or_default()
}

/// Serve the router on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, state: HttpState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(state)).await
}
