//! The gRPC server every service runs: its own service plus `grpc.health.v1`, with the
//! named service reported SERVING only while its readiness check passes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::Status;
use tonic_health::ServingStatus;

use crate::security::Security;

/// An async check that says whether the service can serve (store reachable, migrations
/// done). Called periodically; its result drives the named health status.
pub type ReadinessCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// How often readiness is re-evaluated.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// Serves `service` plus `grpc.health.v1` on `listener` until `shutdown` resolves, with this
/// process's token and TLS settings ([`crate::security::process`]). `service_name` is reported
/// SERVING while `ready` passes.
pub async fn serve_grpc<S>(
    listener: TcpListener,
    service: S,
    ready: ReadinessCheck,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    S: tower_service_bound::GrpcService + NamedService + Clone + Send + Sync + 'static,
{
    let security = match crate::security::process() {
        Ok(s) => s.clone(),
        Err(e) => {
            // serve_until_signal refuses to start on this; anything else serving must not
            // fall back to an open service.
            tracing::error!(error = %e, "gRPC security settings are invalid; refusing every call");
            Security::refuse_all()
        }
    };
    serve_grpc_secured(listener, service, ready, shutdown, security).await
}

/// [`serve_grpc`] with explicit security settings: every call but `grpc.health.v1` must carry
/// the token (when one is set), and with TLS files the server speaks TLS and requires client
/// certificates signed by the CA.
pub async fn serve_grpc_secured<S>(
    listener: TcpListener,
    service: S,
    ready: ReadinessCheck,
    shutdown: impl Future<Output = ()> + Send + 'static,
    security: Security,
) -> Result<(), tonic::transport::Error>
where
    S: tower_service_bound::GrpcService + NamedService + Clone + Send + Sync + 'static,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    let name = S::NAME;
    reporter
        .set_service_status(name, ServingStatus::NotServing)
        .await;
    set_ready(name, false);
    let watcher = tokio::spawn(async move {
        let mut last = None;
        loop {
            let ok = ready().await;
            if last != Some(ok) {
                let status = if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status(name, status).await;
                set_ready(name, ok);
                tracing::info!(service = name, ready = ok, "readiness changed");
                last = Some(ok);
            }
            tokio::time::sleep(READINESS_INTERVAL).await;
        }
    });
    let addr = listener.local_addr().ok();
    tracing::info!(
        service = name,
        ?addr,
        token = security.token().is_some(),
        tls = security.tls().is_some(),
        "gRPC listening"
    );
    // Health stays open: kubelet and grpc_health_probe send no token.
    let routes = Routes::new(health).add_service(Authenticated {
        inner: service,
        security: security.clone(),
    });
    // tonic ignores its tcp_nodelay setting for a caller-supplied listener: set it on each
    // accepted socket, or streamed replies wait on Nagle's algorithm and delayed ACKs.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(files) = security.tls() {
        builder = builder.tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&files.cert, &files.key))
                .client_ca_root(Certificate::from_pem(&files.ca)),
        )?;
    }
    let result = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    watcher.abort();
    set_ready(name, false);
    result
}

static READINESS: std::sync::LazyLock<
    parking_lot::Mutex<std::collections::BTreeMap<&'static str, bool>>,
> = std::sync::LazyLock::new(Default::default);

fn set_ready(name: &'static str, ready: bool) {
    READINESS.lock().insert(name, ready);
}

/// Whether every gRPC service this process serves reports ready (false while none serves):
/// what the metrics port's `/readyz` answers, for probes that cannot speak gRPC over TLS.
pub fn process_ready() -> bool {
    let r = READINESS.lock();
    !r.is_empty() && r.values().all(|v| *v)
}

/// Checks the token of every call before the service sees it.
#[derive(Clone)]
struct Authenticated<S> {
    inner: S,
    security: Security,
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Authenticated<S>
where
    S: tower_service_bound::GrpcService + NamedService,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        futures::future::Either<S::Future, std::future::Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if self.security.accepts(given) {
            futures::future::Either::Left(self.inner.call(req))
        } else {
            metrics::counter!("orly_grpc_unauthenticated_total", "service" => S::NAME).increment(1);
            tracing::debug!(service = S::NAME, path = %req.uri().path(), "gRPC call without a valid token refused");
            futures::future::Either::Right(std::future::ready(Ok(Status::unauthenticated(
                "missing or wrong token (ORLY_GRPC_AUTH_TOKEN)",
            )
            .into_http())))
        }
    }
}

/// The bounds tonic places on a service it can route to, named once.
pub mod tower_service_bound {
    use std::convert::Infallible;

    use tonic::body::Body;

    pub trait GrpcService:
        tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
    {
    }

    impl<T> GrpcService for T where
        T: tower::Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = Infallible,
                Future: Send + 'static,
            > + Send
    {
    }
}
