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
use tonic_health::ServingStatus;

/// An async check that says whether the service can serve (store reachable, migrations
/// done). Called periodically; its result drives the named health status.
pub type ReadinessCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// How often readiness is re-evaluated.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// Serves `routes` (the service and anything else) plus `grpc.health.v1` on `listener`
/// until `shutdown` resolves. `service_name` is reported SERVING while `ready` passes.
pub async fn serve_grpc<S>(
    listener: TcpListener,
    service: S,
    ready: ReadinessCheck,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    S: tower_service_bound::GrpcService + NamedService + Clone + Send + Sync + 'static,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    let name = S::NAME;
    reporter
        .set_service_status(name, ServingStatus::NotServing)
        .await;
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
                tracing::info!(service = name, ready = ok, "readiness changed");
                last = Some(ok);
            }
            tokio::time::sleep(READINESS_INTERVAL).await;
        }
    });
    let addr = listener.local_addr().ok();
    tracing::info!(service = name, ?addr, "gRPC listening");
    let routes = Routes::new(health).add_service(service);
    // tonic ignores its tcp_nodelay setting for a caller-supplied listener: set it on each
    // accepted socket, or streamed replies wait on Nagle's algorithm and delayed ACKs.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    });
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    watcher.abort();
    result
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
