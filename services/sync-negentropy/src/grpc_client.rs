//! [`GrpcNegentropy`]: the [`NegentropyHandler`] of an orly-sync-negentropy process, reached
//! over gRPC (`ORLY_SYNC_TYPE=grpc`, `ORLY_GRPC_SYNC_NEGENTROPY`).
//!
//! The channel is lazy: creating the client never fails because the service is down; calls made
//! while it is down fail within the call timeout with `error: …` (a NEG-ERR for that
//! subscription only), and the channel reconnects by itself. One client talks to one replica
//! ([`GrpcNegentropy::on`] a pinned channel); [`crate::ReplicatedNegentropy`] spreads sessions
//! over all of them.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use nostr::Filter;
use orly_common::{CallError, ClientOptions, GrpcChannel};
use orly_proto::orlysync::common::v1 as common;
use orly_proto::orlysync::negentropy::v1 as pb;
use pb::negentropy_service_client::NegentropyServiceClient;
use tonic::{Code, Request, Response, Status};

use crate::grpc_server::MAX_MESSAGE_SIZE;
use crate::handler::{NegError, NegReply, NegentropyHandler};

/// The negentropy service over gRPC. Cheap to clone (one shared channel).
#[derive(Clone)]
pub struct GrpcNegentropy {
    client: NegentropyServiceClient<GrpcChannel>,
    channel: GrpcChannel,
}

impl std::fmt::Debug for GrpcNegentropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcNegentropy")
            .field("channel", &self.channel)
            .finish()
    }
}

impl GrpcNegentropy {
    /// A client for the service at `addr` (`host:port` or `http://host:port`; a name stands for
    /// all its replicas) whose every call must finish within `timeout` (0: 10s). Does not
    /// connect yet; call inside a tokio runtime.
    pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Self, String> {
        let opts =
            ClientOptions::from_env("orly-sync-negentropy", timeout).map_err(|e| e.to_string())?;
        let channel = GrpcChannel::connect_lazy(addr, opts).map_err(|e| e.to_string())?;
        Ok(Self::on(channel))
    }

    /// A client over an existing channel (pinned to one replica for sessions).
    pub fn on(channel: GrpcChannel) -> Self {
        let client = NegentropyServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Self { client, channel }
    }

    pub fn addr(&self) -> &str {
        self.channel.address()
    }

    pub fn channel(&self) -> &GrpcChannel {
        &self.channel
    }

    /// The generated client, for the RPCs the handler trait does not cover (peers, status).
    pub fn raw(&self) -> NegentropyServiceClient<GrpcChannel> {
        self.client.clone()
    }

    /// One call under the call timeout (also sent as the gRPC deadline), never repeated: a
    /// session lives in one replica. A replica that is gone or unreachable ends the session
    /// with `closed:` (the client may open it again, on another replica).
    async fn unary<Q, R, F, Fut>(&self, what: &'static str, msg: Q, call: F) -> Result<R, NegError>
    where
        F: FnOnce(NegentropyServiceClient<GrpcChannel>, Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let fut = call(self.client.clone(), self.channel.request(msg));
        self.channel.once(what, fut).await.map_err(|e| {
            let text = self.channel.describe(&e);
            match (&e, self.channel.pinned_to()) {
                (CallError::Status(s), Some(_)) if s.code() == Code::Unavailable => {
                    NegError::Closed(format!("the negentropy replica holding this session is unreachable; open it again ({text})"))
                }
                _ => NegError::Internal(text),
            }
        })
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
