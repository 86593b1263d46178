//! [`GrpcNegentropy`]: the [`NegentropyHandler`] of an orly-sync-negentropy process, reached
//! over gRPC (`ORLY_SYNC_TYPE=grpc`, `ORLY_GRPC_SYNC_NEGENTROPY`).
//!
//! The channel is lazy: creating the client never fails because the service is down; calls made
//! while it is down fail within the call timeout with `error: …` (a NEG-ERR for that
//! subscription only), and the channel reconnects by itself.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use nostr::Filter;
use orly_proto::orlysync::common::v1 as common;
use orly_proto::orlysync::negentropy::v1 as pb;
use pb::negentropy_service_client::NegentropyServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::grpc_server::MAX_MESSAGE_SIZE;
use crate::handler::{NegError, NegReply, NegentropyHandler};

/// Longest wait for a TCP connection (capped further by the call timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The negentropy service over gRPC. Cheap to clone (one shared HTTP/2 channel).
#[derive(Clone)]
pub struct GrpcNegentropy {
    client: NegentropyServiceClient<Channel>,
    addr: String,
    timeout: Duration,
}

impl std::fmt::Debug for GrpcNegentropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcNegentropy")
            .field("addr", &self.addr)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl GrpcNegentropy {
    /// A client for the service at `addr` (`host:port` or `http://host:port`) whose every call
    /// must finish within `timeout` (0: 10s). Does not connect yet; call inside a tokio runtime.
    pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Self, String> {
        let addr = addr.trim();
        if addr.is_empty() {
            return Err("empty orly-sync-negentropy address".into());
        }
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let timeout = if timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            timeout
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("invalid orly-sync-negentropy address {addr:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .tcp_nodelay(true)
            .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let client = NegentropyServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self {
            client,
            addr: uri,
            timeout,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The generated client, for the RPCs the handler trait does not cover (peers, status).
    pub fn raw(&self) -> NegentropyServiceClient<Channel> {
        self.client.clone()
    }

    /// One unary call under the call timeout (also sent as the gRPC deadline).
    async fn unary<Q, R, F, Fut>(&self, what: &str, msg: Q, call: F) -> Result<R, NegError>
    where
        F: FnOnce(NegentropyServiceClient<Channel>, Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let mut request = Request::new(msg);
        request.set_timeout(self.timeout);
        match tokio::time::timeout(self.timeout, call(self.client.clone(), request)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(NegError::Internal(format!(
                "negentropy service at {}: {what}: {:?}: {}",
                self.addr,
                status.code(),
                status.message()
            ))),
            Err(_) => Err(NegError::Internal(format!(
                "negentropy service at {}: {what} timed out after {:?}",
                self.addr, self.timeout
            ))),
        }
    }

    /// The service's `Ready` answer (false when unreachable).
    pub async fn ready(&self) -> bool {
        self.unary("Ready", common::Empty {}, |mut c, r| async move {
            c.ready(r).await
        })
        .await
        .is_ok_and(|r| r.ready)
    }

    /// `ListSessions`.
    pub async fn list_sessions(&self) -> Result<Vec<pb::ClientSession>, NegError> {
        self.unary("ListSessions", common::Empty {}, |mut c, r| async move {
            c.list_sessions(r).await
        })
        .await
        .map(|r| r.sessions)
    }
}

fn reply(message: Vec<u8>, complete: bool, error: String) -> Result<NegReply, NegError> {
    if !error.is_empty() {
        return Err(NegError::from_reason(&error));
    }
    Ok(NegReply { message, complete })
}

#[async_trait]
impl NegentropyHandler for GrpcNegentropy {
    async fn open(
        &self,
        connection_id: &str,
        subscription_id: &str,
        filter: &Filter,
        initial_message: &[u8],
    ) -> Result<NegReply, NegError> {
        let msg = pb::NegOpenRequest {
            subscription_id: subscription_id.to_string(),
            filter: Some(common::Filter::from(filter)),
            initial_message: initial_message.to_vec(),
            connection_id: connection_id.to_string(),
        };
        let r = self
            .unary("HandleNegOpen", msg, |mut c, r| async move {
                c.handle_neg_open(r).await
            })
            .await?;
        reply(r.message, r.complete, r.error)
    }

    async fn message(
        &self,
        connection_id: &str,
        subscription_id: &str,
        message: &[u8],
    ) -> Result<NegReply, NegError> {
        let msg = pb::NegMsgRequest {
            subscription_id: subscription_id.to_string(),
            message: message.to_vec(),
            connection_id: connection_id.to_string(),
        };
        let r = self
            .unary("HandleNegMsg", msg, |mut c, r| async move {
                c.handle_neg_msg(r).await
            })
            .await?;
        reply(r.message, r.complete, r.error)
    }

    async fn close(&self, connection_id: &str, subscription_id: &str) {
        let msg = pb::NegCloseRequest {
            subscription_id: subscription_id.to_string(),
            connection_id: connection_id.to_string(),
        };
        if let Err(e) = self
            .unary("HandleNegClose", msg, |mut c, r| async move {
                c.handle_neg_close(r).await
            })
            .await
        {
            tracing::debug!(error = %e, "NEG-CLOSE not delivered (the session times out instead)");
        }
    }

    async fn close_connection(&self, connection_id: &str) {
        // CloseSession with an empty subscription id closes every session of the connection.
        let msg = pb::CloseSessionRequest {
            subscription_id: String::new(),
            connection_id: connection_id.to_string(),
        };
        if let Err(e) = self
            .unary("CloseSession", msg, |mut c, r| async move {
                c.close_session(r).await
            })
            .await
        {
            tracing::debug!(error = %e, "connection close not delivered (sessions time out instead)");
        }
    }
}
