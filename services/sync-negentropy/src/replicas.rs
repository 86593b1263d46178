//! Several negentropy replicas behind one [`NegentropyHandler`]: [`ReplicatedNegentropy`]
//! spreads new sessions over the replicas (round robin, skipping replicas that fail to answer)
//! and pins each session to the replica that holds it, so every later NEG-MSG / NEG-CLOSE of a
//! (connection, subscription) goes there. For `ORLY_GRPC_SYNC_NEGENTROPY` with several
//! addresses, or the endpoints behind a headless Kubernetes Service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nostr::Filter;
use parking_lot::Mutex;

use crate::grpc_client::GrpcNegentropy;
use crate::handler::{NegError, NegReply, NegentropyHandler};

/// Sessions spread over replicas and pinned to the one that holds them.
pub struct ReplicatedNegentropy {
    replicas: Vec<Arc<dyn NegentropyHandler>>,
    next: AtomicUsize,
    /// (connection, subscription) → replica index.
    pins: Mutex<HashMap<(String, String), usize>>,
}

impl std::fmt::Debug for ReplicatedNegentropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedNegentropy")
            .field("replicas", &self.replicas.len())
            .field("sessions", &self.pins.lock().len())
            .finish()
    }
}

impl ReplicatedNegentropy {
    /// Over the given replicas (at least one).
    pub fn new(replicas: Vec<Arc<dyn NegentropyHandler>>) -> Result<Self, String> {
        if replicas.is_empty() {
            return Err("at least one negentropy replica is needed".into());
        }
        Ok(Self {
            replicas,
            next: AtomicUsize::new(0),
            pins: Mutex::new(HashMap::new()),
        })
    }

    /// gRPC clients for a comma-separated list of addresses (`host:port` or `http://…`).
    pub fn connect_lazy(addrs: &str, timeout: Duration) -> Result<Self, String> {
        let replicas = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                GrpcNegentropy::connect_lazy(a, timeout)
                    .map(|c| Arc::new(c) as Arc<dyn NegentropyHandler>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(replicas)
    }

    /// How many sessions each replica holds (as far as this relay knows).
    pub fn sessions_per_replica(&self) -> Vec<usize> {
        let mut counts = vec![0; self.replicas.len()];
        for i in self.pins.lock().values() {
            counts[*i] += 1;
        }
        counts
    }

    fn key(connection_id: &str, subscription_id: &str) -> (String, String) {
        (connection_id.to_string(), subscription_id.to_string())
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
        if let Some(i) = previous {
            self.replicas[i].close(connection_id, subscription_id).await;
        }
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut last = None;
        for i in (0..n).map(|k| (start + k) % n) {
            match self.replicas[i]
                .open(connection_id, subscription_id, filter, initial_message)
                .await
            {
                Ok(reply) => {
                    self.pins.lock().insert(key, i);
                    return Ok(reply);
                }
                // Unreachable replica (or its store): try the next one.
                Err(e @ NegError::Internal(_)) => {
                    tracing::debug!(replica = i, error = %e, "negentropy replica failed; trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| NegError::Internal("no negentropy replica answered".into())))
    }

    async fn message(
        &self,
        connection_id: &str,
        subscription_id: &str,
        message: &[u8],
    ) -> Result<NegReply, NegError> {
        let key = Self::key(connection_id, subscription_id);
        let Some(i) = self.pins.lock().get(&key).copied() else {
            return Err(NegError::Closed(
                "unknown negentropy session: send NEG-OPEN first".into(),
            ));
        };
        let result = self.replicas[i]
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
        if let Some(i) = pinned {
            self.replicas[i].close(connection_id, subscription_id).await;
        }
    }

    async fn close_connection(&self, connection_id: &str) {
        let mut used = vec![false; self.replicas.len()];
        self.pins.lock().retain(|(conn, _), i| {
            if conn == connection_id {
                used[*i] = true;
                false
            } else {
                true
            }
        });
        for (i, replica) in self.replicas.iter().enumerate() {
            if used[i] {
                replica.close_connection(connection_id).await;
            }
        }
    }
}
