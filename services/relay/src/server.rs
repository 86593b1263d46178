//! The relay's HTTP side: one port for WebSocket upgrades, NIP-11, NIP-86 management,
//! health and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::nip11;
pub use crate::state::Relay;

/// Hard cap on a WebSocket message: beyond the configured limit we still read the message
/// (to answer it with a clear refusal); beyond this the socket is closed by the protocol layer.
const HARD_MESSAGE_CAP_FACTOR: usize = 4;
/// Bytes of WebSocket frames buffered before they are written to the socket (a flush writes
/// them at once in any case). With 0 every frame was a system call and a TCP segment of its
/// own, so a REQ's hundred results, or a publisher's hundred OKs, took a hundred sends. The
/// buffer keeps its capacity after a burst, so it stays small: 50,000 connections x 8 KiB.
const WRITE_BUFFER: usize = 8 << 10;

/// Largest sync request body (a fetch names at most 1000 ids).
const MAX_SYNC_BODY: usize = 1024 * 1024;

/// Largest NIP-86 request body.
const MAX_NIP86_BODY: usize = 64 * 1024;

impl Relay {
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route(DRAIN_PATH, post(drain))
            .route(orly_acl::nip86::PATH, post(nip86))
            .route(orly_sync::distributed::PATH_CURRENT, any(sync_http))
            .route(orly_sync::distributed::PATH_EVENT_IDS, any(sync_http))
            .route(orly_sync::cluster::PATH_LATEST, any(sync_http))
            .route(orly_sync::cluster::PATH_EVENTS, any(sync_http))
            .fallback(root)
            .with_state(self.clone())
            .merge(orly_common::metrics::router())
    }
}

/// `POST` from loopback only: stop taking WebSockets, close every one with 1001 and answer
/// when they are gone (or after `?timeout=`, default 25 s). What `orly drain` calls.
pub const DRAIN_PATH: &str = "/.orly/drain";

async fn drain(
    State(relay): State<Arc<Relay>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "drain is accepted from loopback only",
        )
            .into_response();
    }
    let timeout = q
        .get("timeout")
        .and_then(|t| orly_common::parse_duration(t).ok())
        .unwrap_or(Duration::from_secs(25));
    tracing::info!(connections = relay.connections(), ?timeout, "draining");
    relay.begin_drain();
    let deadline = tokio::time::Instant::now() + timeout;
    while relay.connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = relay.connections();
    let status = if left == 0 {
        StatusCode::OK
    } else {
        StatusCode::GATEWAY_TIMEOUT
    };
    (status, format!("drained; {left} connections left\n")).into_response()
}

async fn readyz(State(relay): State<Arc<Relay>>) -> Response {
    if relay.draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), relay.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store: timed out").into_response(),
    }
}

/// The peer sync endpoints, answered by the distributed or cluster sync service.
async fn sync_http(
    State(relay): State<Arc<Relay>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let hooks = relay.sync.as_ref();
    let path = req.uri().path().to_string();
    let distributed = hooks.and_then(|h| h.distributed.clone());
    let cluster = hooks.and_then(|h| h.cluster.clone());
    let enabled = match path.as_str() {
        orly_sync::distributed::PATH_CURRENT | orly_sync::distributed::PATH_EVENT_IDS => {
            distributed.is_some()
        }
        _ => cluster.is_some(),
    };
    if !enabled {
        return (StatusCode::NOT_FOUND, "sync is not enabled on this relay").into_response();
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_SYNC_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    };
    let mut headers = std::collections::BTreeMap::new();
    for (name, value) in &parts.headers {
        if let Ok(v) = value.to_str() {
            headers.insert(name.as_str().to_ascii_lowercase(), v.to_string());
        }
    }
    let forwarded = orly_sync::HttpRequest {
        method: parts.method.as_str().to_string(),
        path: path.clone(),
        headers,
        body: body.to_vec(),
        query_string: parts.uri.query().unwrap_or_default().to_string(),
        remote_addr: peer.to_string(),
    };
    let answer = async {
        match (path.as_str(), distributed, cluster) {
            (orly_sync::distributed::PATH_CURRENT, Some(d), _) => {
                Some(d.handle_current(forwarded).await)
            }
            (orly_sync::distributed::PATH_EVENT_IDS, Some(d), _) => {
                Some(d.handle_event_ids(forwarded).await)
            }
            (orly_sync::cluster::PATH_LATEST, _, Some(c)) => Some(c.handle_latest(forwarded).await),
            (_, _, Some(c)) => Some(c.handle_events(forwarded).await),
            _ => None,
        }
    };
    // A long poll must not hold the relay's shutdown.
    let mut shutdown = relay.shutdown_receiver();
    let result = tokio::select! {
        r = answer => match r {
            Some(r) => r,
            None => return StatusCode::NOT_FOUND.into_response(),
        },
        _ = shutdown.wait_for(|s| *s) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "relay shutting down").into_response();
        }
    };
    match result {
        Ok(resp) => {
            let mut builder = Response::builder()
                .status(StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY));
            for (k, v) in &resp.headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            builder
                .body(Body::from(resp.body))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(e) => {
            tracing::warn!(%path, error = %e, "sync service unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("sync service unavailable: {e}"),
            )
                .into_response()
        }
    }
}

/// NIP-86 relay management, answered by the ACL's management side.
async fn nip86(State(relay): State<Arc<Relay>>, req: Request) -> Response {
    let json = |status: StatusCode, body: serde_json::Value| {
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    };
    let Some(admin) = relay.acl_admin.clone() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"result": null, "error": "relay management is not enabled"}),
        );
    };
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_NIP86_BODY).await else {
        return json(
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({"result": null, "error": "request body too large"}),
        );
    };
    let now = nostr::Timestamp::now().as_secs();
    let resp = orly_acl::nip86::handle(
        &*admin,
        orly_acl::nip86::Nip86Request {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            body: &body,
        },
        now,
    )
    .await;
    json(
        StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        resp.body,
    )
}

/// Any path: a WebSocket upgrade, a NIP-11 document, or a short text page.
async fn root(
    State(relay): State<Arc<Relay>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let headers = req.headers();
    let wants_ws = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if wants_ws {
        if relay.draining() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "relay draining; connect again",
            )
                .into_response();
        }
        let (mut parts, _body) = req.into_parts();
        let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &relay).await {
            Ok(ws) => ws,
            Err(rejection) => return rejection.into_response(),
        };
        let limits = &relay.config.limits;
        let cap = limits
            .max_message_size
            .saturating_mul(HARD_MESSAGE_CAP_FACTOR);
        let ip = crate::proxy::client_ip(&parts.headers, peer, &relay.config.trusted_proxies);
        let relay = relay.clone();
        return ws
            .max_message_size(cap)
            .max_frame_size(cap)
            // Small buffers keep an idle connection cheap; they grow with traffic.
            .read_buffer_size(4096)
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(cap.max(1 << 20))
            .on_upgrade(move |socket| crate::connection::run(relay, socket, ip));
    }
    let wants_nip11 = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/nostr+json"));
    if wants_nip11 {
        let doc = nip11::document(&relay).await;
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/nostr+json")
            .header(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            )
            .header(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("*"),
            )
            .header(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET"),
            )
            .body(Body::from(doc.to_string()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!(
            "{} is a Nostr relay. Connect with a Nostr client over WebSocket.\n",
            relay.config.name
        ),
    )
        .into_response()
}

/// A relay serving on a listener, for the binary and for tests.
pub struct RunningRelay {
    pub addr: SocketAddr,
    pub relay: Arc<Relay>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningRelay {
    /// The WebSocket URL of the relay.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Stops accepting, closes every connection, and waits for the server to finish.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.relay.begin_shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.relay.begin_shutdown();
        self.task.abort();
    }
}

/// Serves `relay` on `listener` in a background task.
pub fn spawn(listener: TcpListener, relay: Arc<Relay>) -> std::io::Result<RunningRelay> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = relay
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    // Replies are many small frames (EVENTs, then EOSE): without TCP_NODELAY, Nagle's
    // algorithm and the client's delayed ACK hold each answer back by ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, "relay listening");
    Ok(RunningRelay {
        addr,
        relay,
        stop: Some(stop),
        task,
    })
}
