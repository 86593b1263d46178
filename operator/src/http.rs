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
    state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default()
}

/// Serve the router on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, state: HttpState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(state)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn status_of(router: Router, path: &str) -> StatusCode {
        router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn readyz_follows_the_ready_flag() {
        let ready = Arc::new(AtomicBool::new(false));
        let state = HttpState {
            ready: ready.clone(),
            metrics: None,
        };
        assert_eq!(
            status_of(router(state.clone()), "/healthz").await,
            StatusCode::OK
        );
        assert_eq!(
            status_of(router(state.clone()), "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.store(true, Ordering::Release);
        assert_eq!(
            status_of(router(state.clone()), "/readyz").await,
            StatusCode::OK
        );
        assert_eq!(status_of(router(state), "/metrics").await, StatusCode::OK);
    }
}
