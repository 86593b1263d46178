//! The relay's side of the peer sync services: it routes their HTTP endpoints and the special
//! kinds (cluster membership 39108, relay group configs 39105/10008) to them — checked before
//! the event is stored, applied from the store's feed after it is stored, whichever replica
//! stored it ([`SideEffects`]) — and feeds the relay group's relays into the peer lists of the
//! distributed and negentropy sync. The sync services learn of new events from the store's
//! feed themselves. Every call is best-effort: a sync service that is down never stops the
//! relay serving clients.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nostr::Event;
use orly_db::RawEvent;
use orly_db::SharedStore;
use orly_sync::cluster::KIND_MEMBERSHIP;
use orly_sync::http::to_ws_url;
use orly_sync::nip11::Nip11Cache;
use orly_sync::relaygroup::is_relay_group_kind;
use orly_sync::{ClusterApi, DistributedApi, RelayGroupApi};

use crate::live::FeedTap;

/// Store marker: the relay group relays last added to the negentropy peers (JSON), so a relay
/// leaving the group is removed again without touching peers configured otherwise.
const NEGENTROPY_APPLIED: &str = "relaygroup:negentropy-peers";
/// How often the relay group's relays are pushed to the peer lists even without a new config
/// (services restarted, a config that arrived while one was down).
const FEED_PERIOD: Duration = Duration::from_secs(60);

/// The negentropy peer list, in-process or over gRPC.
#[async_trait]
pub trait NegentropyPeers: Send + Sync + 'static {
    async fn add(&self, url: &str) -> Result<(), String>;
    async fn remove(&self, url: &str) -> Result<(), String>;
}

#[async_trait]
impl NegentropyPeers for Arc<orly_sync_negentropy::SyncManager> {
    async fn add(&self, url: &str) -> Result<(), String> {
        self.peers()
            .add(url)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn remove(&self, url: &str) -> Result<(), String> {
        self.peers()
            .remove(url)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl NegentropyPeers for orly_sync_negentropy::GrpcNegentropy {
    async fn add(&self, url: &str) -> Result<(), String> {
        use orly_proto::orlysync::negentropy::v1::AddPeerRequest;
        self.raw()
            .add_peer(AddPeerRequest {
                peer_url: url.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    async fn remove(&self, url: &str) -> Result<(), String> {
        use orly_proto::orlysync::negentropy::v1::RemovePeerRequest;
        self.raw()
            .remove_peer(RemovePeerRequest {
                peer_url: url.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }
}

/// The sync services the relay talks to (any may be absent).
#[derive(Default)]
pub struct SyncHooks {
    pub distributed: Option<Arc<dyn DistributedApi>>,
    pub cluster: Option<Arc<dyn ClusterApi>>,
    pub relaygroup: Option<Arc<dyn RelayGroupApi>>,
    pub negentropy_peers: Option<Arc<dyn NegentropyPeers>>,
    /// Tells our own URL apart in a relay group (NIP-11 pubkey = ours).
    nip11: Option<Nip11Cache>,
}

impl SyncHooks {
    pub fn new(
        distributed: Option<Arc<dyn DistributedApi>>,
        cluster: Option<Arc<dyn ClusterApi>>,
        relaygroup: Option<Arc<dyn RelayGroupApi>>,
        negentropy_peers: Option<Arc<dyn NegentropyPeers>>,
    ) -> Self {
        Self {
            distributed,
            cluster,
            relaygroup,
            negentropy_peers,
            nip11: Some(Nip11Cache::new(
                Duration::from_secs(30 * 60),
                Duration::from_secs(5),
            )),
        }
    }

    /// Checks a special-kind event before it is stored; `Err` is the OK refusal. Nothing is
    /// applied here: that happens from the feed once the event is stored.
    pub async fn before_store(&self, event: &Event) -> Result<(), String> {
        if event.kind.as_u16() == KIND_MEMBERSHIP {
            if self.cluster.is_some() {
                orly_sync::cluster::parse_membership(event).map_err(|m| format!("invalid: {m}"))?;
            }
        } else if is_relay_group_kind(event.kind) {
            if let Some(group) = &self.relaygroup {
                match group.validate(event).await {
                    Ok(Ok(())) => {}
                    Ok(Err(m)) => return Err(format!("invalid: {m}")),
                    Err(e) => {
                        tracing::warn!(error = %e, "relay group service unavailable for validation")
                    }
                }
            }
        }
        Ok(())
    }

    /// A special-kind event in the store (stored by anyone): apply it.
    async fn apply_stored(self: &Arc<Self>, store: &SharedStore, event: &Event) {
        if is_relay_group_kind(event.kind) {
            if let Some(group) = &self.relaygroup {
                if let Err(e) = group.handle_event(event).await {
                    tracing::warn!(error = %e, "HandleRelayGroupEvent failed");
                }
                self.feed_peers(store).await;
            }
        } else if event.kind.as_u16() == KIND_MEMBERSHIP {
            if let Some(cluster) = &self.cluster {
                if let Err(e) = cluster.handle_membership_event(event).await {
                    tracing::debug!(error = %e, "membership event not applied");
                }
            }
        }
    }

    /// Pushes the relay group's relays to the distributed and negentropy peer lists.
    pub async fn feed_peers(&self, store: &SharedStore) {
        let Some(group) = &self.relaygroup else {
            return;
        };
        let relays = match group.relays().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "relay group unavailable; peers unchanged");
                return;
            }
        };
        if let Some(d) = &self.distributed {
            if let Err(e) = d.update_peers(relays.clone()).await {
                tracing::warn!(error = %e, "cannot update the distributed peers");
            }
        }
        if let Some(neg) = &self.negentropy_peers {
            let own = orly_sync::serve::Identity::new(store.clone())
                .pubkey()
                .await
                .ok();
            let mut wanted: Vec<String> = Vec::new();
            for r in &relays {
                let is_self = match (&self.nip11, own) {
                    (Some(cache), Some(own)) => cache.pubkey(r).await.ok() == Some(own),
                    _ => false,
                };
                if !is_self {
                    wanted.push(to_ws_url(r));
                }
            }
            let applied: Vec<String> = match store.get_marker(NEGENTROPY_APPLIED).await {
                Ok(Some(raw)) => serde_json::from_slice(&raw).unwrap_or_default(),
                _ => Vec::new(),
            };
            for url in &wanted {
                if let Err(e) = neg.add(url).await {
                    tracing::warn!(peer = %url, error = %e, "cannot add a negentropy peer");
                    return;
                }
            }
            for url in applied.iter().filter(|u| !wanted.contains(u)) {
                if let Err(e) = neg.remove(url).await {
                    tracing::warn!(peer = %url, error = %e, "cannot remove a negentropy peer");
                    return;
                }
            }
            if let Ok(raw) = serde_json::to_vec(&wanted) {
                let _ = store.set_marker(NEGENTROPY_APPLIED, &raw).await;
            }
        }
    }

    /// Feeds the peer lists now and every [`FEED_PERIOD`].
    pub fn spawn_feeder(self: &Arc<Self>, store: SharedStore) -> tokio::task::JoinHandle<()> {
        let hooks = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FEED_PERIOD);
            loop {
                tick.tick().await;
                hooks.feed_peers(&store).await;
            }
        })
    }
}

/// The special kinds' side effects, applied from the store's feed after the event is stored —
/// by every relay replica, whichever stored it (applying one is idempotent: the newest config
/// wins). In order, one at a time, off the feed consumer.
pub struct SideEffects {
    tx: tokio::sync::mpsc::UnboundedSender<Arc<RawEvent>>,
}

impl SideEffects {
    pub fn new(hooks: Arc<SyncHooks>, store: SharedStore) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Arc<RawEvent>>();
        tokio::spawn(async move {
            while let Some(raw) = rx.recv().await {
                match raw.parse() {
                    Ok(event) => hooks.apply_stored(&store, &event).await,
                    Err(e) => tracing::warn!(error = %e, "stored special-kind event unreadable"),
                }
            }
        });
        Self { tx }
    }
}

impl FeedTap for SideEffects {
    fn wants(&self, kind: u16) -> bool {
        kind == KIND_MEMBERSHIP || is_relay_group_kind(nostr::Kind::from(kind))
    }

    fn stored(&self, event: Arc<RawEvent>) {
        // Special kinds are rare (admins' configs): unbounded is bounded by the feed itself.
        let _ = self.tx.send(event);
    }
}
