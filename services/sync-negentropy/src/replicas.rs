//! Several negentropy replicas behind one [`NegentropyHandler`]: [`ReplicatedNegentropy`]
//! spreads new sessions over the replicas of `ORLY_GRPC_SYNC_NEGENTROPY` — several
//! comma-separated addresses, or a name resolving to every pod of a headless Kubernetes Service,
//! re-resolved as pods come and go ([`orly_common::GrpcChannel`]) — and pins each session to the
//! replica that holds it, so every later NEG-MSG / NEG-CLOSE of a (connection, subscription)
//! goes there. A session whose replica vanished gets `NEG-ERR "closed: …"`; the client opens it
//! again and lands on a live replica.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use nostr::Filter;
use orly_common::{ClientOptions, GrpcChannel};
use parking_lot::Mutex;

use crate::grpc_client::GrpcNegentropy;
use crate::handler::{NegError, NegReply, NegentropyHandler};

/// Sessions spread over replicas and pinned to the one that holds them.
pub struct ReplicatedNegentropy {
    channel: GrpcChannel,
    /// (connection, subscription) → replica.
    pins: Mutex<HashMap<(String, String), SocketAddr>>,
}

impl std::fmt::Debug for ReplicatedNegentropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedNegentropy")
            .field("channel", &self.channel)
            .field("sessions", &self.pins.lock().len())
            .finish()
    }
}

impl ReplicatedNegentropy {
    /// Over the replicas behind `channel`.
    pub fn new(channel: GrpcChannel) -> Self {
        Self {
            channel,
            pins: Mutex::new(HashMap::new()),
        }
    }

    /// A discovering client for a comma-separated list of addresses (`host:port` or
    /// `http://…`); settings (token, TLS, resolver) from the environment.
    pub fn connect_lazy(addrs: &str, timeout: Duration) -> Result<Self, String> {
        let opts =
            ClientOptions::from_env("orly-sync-negentropy", timeout).map_err(|e| e.to_string())?;
        let channel = GrpcChannel::connect_lazy(addrs, opts).map_err(|e| e.to_string())?;
        Ok(Self::new(channel))
    }

    /// The channel over every replica (its replica set, for status and tests).
    pub fn channel(&self) -> &GrpcChannel {
        &self.channel
    }

    /// How many sessions each replica holds (as far as this relay knows), by replica.
    pub fn sessions_per_replica(&self) -> HashMap<SocketAddr, usize> {
        let mut counts: HashMap<SocketAddr, usize> = self
            .channel
            .replicas()
            .into_iter()
            .map(|r| (r, 0))
            .collect();
        for addr in self.pins.lock().values() {
            *counts.entry(*addr).or_default() += 1;
        }
        counts
    }

    fn key(connection_id: &str, subscription_id: &str) -> (String, String) {
        (connection_id.to_string(), subscription_id.to_string())
    }

    fn replica(&self, addr: SocketAddr) -> GrpcNegentropy {
        GrpcNegentropy::on(self.channel.pinned(addr))
    }
}

#[async_trait]
impl NegentropyHandler for ReplicatedNegentropy {
    async fn open(
        &self,
        connection_id: &str,
        subscription_id: &str,
        filter: &Filter,
        initial_message: &[u8],
    ) -> Result<NegReply, NegError> {
        let key = Self::key(connection_id, subscription_id);
        // A re-open replaces the session: drop it where it lives first.
        let previous = self.pins.lock().remove(&key);
        if let Some(addr) = previous {
            self.replica(addr)
                .close(connection_id, subscription_id)
                .await;
        }
        // Try each replica at most once, starting where the balancer points.
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = None;
        loop {
            let picked = match self.channel.pick().await {
                Ok(a) => a,
                Err(s) => {
                    last.get_or_insert_with(|| {
                        NegError::Internal(format!("no negentropy replica: {}", s.message()))
                    });
                    break;
                }
            };
            let addr = if tried.contains(&picked) {
                match self
                    .channel
                    .replicas()
                    .into_iter()
                    .find(|r| !tried.contains(r))
                {
                    Some(other) => other,
                    None => break,
                }
            } else {
                picked
            };
            tried.push(addr);
            match self
                .replica(addr)
                .open(connection_id, subscription_id, filter, initial_message)
                .await
            {
                Ok(reply) => {
                    self.pins.lock().insert(key, addr);
                    return Ok(reply);
                }
                // Unreachable replica (or its store): try the next one.
                Err(e @ (NegError::Internal(_) | NegError::Closed(_))) => {
                    tracing::debug!(replica = %addr, error = %e, "negentropy replica failed; trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(match last {
            Some(NegError::Closed(m)) => NegError::Internal(m),
            Some(e) => e,
            None => NegError::Internal("no negentropy replica answered".into()),
        })
    }

    async fn message(
        &self,
        connection_id: &str,
        subscription_id: &str,
        message: &[u8],
    ) -> Result<NegReply, NegError> {
        let key = Self::key(connection_id, subscription_id);
        let Some(addr) = self.pins.lock().get(&key).copied() else {
            return Err(NegError::Closed(
                "unknown negentropy session: send NEG-OPEN first".into(),
            ));
        };
        let result = self
            .replica(addr)
            .message(connection_id, subscription_id, message)
            .await;
        if result.is_err() {
            // Every error ends the session (and a lost replica lost it anyway).
            self.pins.lock().remove(&key);
        }
        result
    }

    async fn close(&self, connection_id: &str, subscription_id: &str) {
        let pinned = self
            .pins
            .lock()
            .remove(&Self::key(connection_id, subscription_id));
        if let Some(addr) = pinned {
            self.replica(addr)
                .close(connection_id, subscription_id)
                .await;
        }
    }

    async fn close_connection(&self, connection_id: &str) {
        let mut used: Vec<SocketAddr> = Vec::new();
        self.pins.lock().retain(|(conn, _), addr| {
            if conn == connection_id {
                if !used.contains(addr) {
                    used.push(*addr);
                }
                false
            } else {
                true
            }
        });
        for addr in used {
            self.replica(addr).close_connection(connection_id).await;
        }
    }
}
