//! Readiness probes: `grpc.health.v1` on a service's named status, or an HTTP 200.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How to ask a child whether it is Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// SERVING on `grpc.health.v1` for the named service.
    Grpc {
        addr: SocketAddr,
        service: &'static str,
    },
    /// `GET path` answering 200.
    Http {
        addr: SocketAddr,
        path: &'static str,
    },
}

impl Probe {
    pub async fn is_ready(&self) -> bool {
        tokio::time::timeout(PROBE_TIMEOUT * 2, self.check())
            .await
            .unwrap_or(false)
    }

    async fn check(&self) -> bool {
        match self {
            Probe::Grpc { addr, service } => {
                let Ok(endpoint) =
                    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                else {
                    return false;
                };
                let Ok(channel) = endpoint.connect_timeout(PROBE_TIMEOUT).connect().await else {
                    return false;
                };
                let request = HealthCheckRequest {
                    service: (*service).to_string(),
                };
                matches!(
                    HealthClient::new(channel).check(request).await,
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
                )
            }
            Probe::Http { addr, path } => http_ok(*addr, path).await,
        }
    }
}

async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 32];
    let Ok(n) = stream.read(&mut head).await else {
        return false;
    };
    let line = String::from_utf8_lossy(&head[..n]);
    line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200")
}
