//! The relay's side of the peer sync services: it routes their HTTP endpoints and the special
//! kinds (cluster membership 39108, relay group configs 39105/10008) to them, tells the
//! distributed sync about new events, feeds the relay group's relays into the peer lists of
//! the distributed and negentropy sync, and delivers events that other processes stored (sync
//! services, other relay replicas) to live subscriptions ([`spawn_follower`]). Every call is
//! best-effort: a sync service that is down never stops the relay serving clients.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nostr::Event;
use orly_db::SharedStore;
use orly_sync::cluster::KIND_MEMBERSHIP;
use orly_sync::http::to_ws_url;
use orly_sync::nip11::Nip11Cache;
use orly_sync::relaygroup::is_relay_group_kind;
use orly_sync::{ClusterApi, DistributedApi, RelayGroupApi, SyncError};
use parking_lot::Mutex;

use crate::server::Relay;

/// Store marker: the relay group relays last added to the negentropy peers (JSON), so a relay
/// leaving the group is removed again without touching peers configured otherwise.
const NEGENTROPY_APPLIED: &str = "relaygroup:negentropy-peers";
/// How often the relay group's relays are pushed to the peer lists even without a new config
/// (services restarted, a config that arrived while one was down).
const FEED_PERIOD: Duration = Duration::from_secs(60);
/// Behind by more than this many serials, the follower skips ahead: a bulk import or a
/// catch-up is not replayed to live subscribers.
const FOLLOW_MAX_LAG: u64 = 5_000;
const FOLLOW_PAGE: u32 = 1_000;

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

    /// Checks a special-kind event before it is stored; `Err` is the OK refusal.
    pub async fn before_store(&self, event: &Event) -> Result<(), String> {
        if event.kind.as_u16() == KIND_MEMBERSHIP {
            if let Some(cluster) = &self.cluster {
                match cluster.handle_membership_event(event).await {
                    Ok(()) => {}
                    Err(SyncError::Invalid(m)) => return Err(format!("invalid: {m}")),
                    // Stored anyway: the cluster service re-reads memberships from the store.
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster sync unavailable for a membership event")
                    }
                }
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

    /// After a client's event was stored: wake the distributed sync, apply group configs.
    pub async fn after_store(self: &Arc<Self>, relay: &Arc<Relay>, event: &Event, serial: u64) {
        if let Some(d) = &self.distributed {
            if let Err(e) = d.notify_new_event(event.id, serial).await {
                tracing::debug!(error = %e, "NotifyNewEvent failed");
            }
        }
        self.after_any_store(relay, event).await;
    }

    /// For every stored event, whoever stored it.
    async fn after_any_store(self: &Arc<Self>, relay: &Arc<Relay>, event: &Event) {
        if is_relay_group_kind(event.kind) {
            if let Some(group) = &self.relaygroup {
                if let Err(e) = group.handle_event(event).await {
                    tracing::warn!(error = %e, "HandleRelayGroupEvent failed");
                }
                // In the background: it may ask peers for their NIP-11 documents, and the
                // follower that calls this must keep delivering.
                let (hooks, relay) = (self.clone(), relay.clone());
                tokio::spawn(async move { hooks.feed_peers(&relay).await });
            }
        } else if event.kind.as_u16() == KIND_MEMBERSHIP {
            if let Some(cluster) = &self.cluster {
                if let Err(e) = cluster.handle_membership_event(event).await {
                    tracing::debug!(error = %e, "replicated membership event not applied");
                }
            }
        }
    }

    /// Pushes the relay group's relays to the distributed and negentropy peer lists.
    pub async fn feed_peers(&self, relay: &Relay) {
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
            let own = relay.identity().await;
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
            let applied: Vec<String> = match relay.store.get_marker(NEGENTROPY_APPLIED).await {
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
                let _ = relay.store.set_marker(NEGENTROPY_APPLIED, &raw).await;
            }
        }
    }

    /// Feeds the peer lists now and every [`FEED_PERIOD`].
    pub fn spawn_feeder(self: &Arc<Self>, relay: Arc<Relay>) -> tokio::task::JoinHandle<()> {
        let hooks = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FEED_PERIOD);
            loop {
                tick.tick().await;
                hooks.feed_peers(&relay).await;
            }
        })
    }
}

/// Exactly-once live delivery between the relay's own ingest and the store follower, by
/// serial: the ingest records the serials it stored (and delivers those events itself) unless
/// the follower has already gone past them; the follower moves its cursor to the store's latest
/// serial, takes the recorded serials out of that range and delivers only the rest — stored by
/// other processes. One lock orders the two, so every event is delivered once; and while only
/// this relay writes, the follower never reads the store beyond its latest serial.
#[derive(Default)]
pub struct Delivery {
    state: Mutex<DeliveryState>,
    /// Off (the ingest delivers everything, nothing recorded) until a follower runs.
    active: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct DeliveryState {
    /// Every serial up to here is delivered or the follower's to deliver.
    cursor: Option<u64>,
    /// Serials above the cursor stored (and delivered) by this relay's ingest.
    own: BTreeSet<u64>,
}

impl Delivery {
    /// The ingest stored an event under `serial`: true if the ingest delivers it.
    pub fn stored_here(&self, serial: u64) -> bool {
        if !self.active.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        let mut st = self.state.lock();
        if st.cursor.is_some_and(|c| serial <= c) {
            // The follower went past it (and delivers it as not ours).
            return false;
        }
        st.own.insert(serial);
        true
    }

    /// Moves the cursor to `latest`: the previous cursor (`None` the first time) and how many
    /// serials in between were this relay's own.
    fn advance(&self, latest: u64) -> (Option<u64>, BTreeSet<u64>) {
        let mut st = self.state.lock();
        let prev = st.cursor;
        let rest = st.own.split_off(&(latest + 1));
        let own = std::mem::replace(&mut st.own, rest);
        // (Below the cursor only if the store was replaced: its serials start over.)
        st.cursor = Some(latest);
        (prev, own)
    }

    /// Undoes an [`Self::advance`] whose events could not be read, so the next look retries.
    fn retreat(&self, to: u64, own: BTreeSet<u64>) {
        let mut st = self.state.lock();
        st.cursor = Some(to);
        st.own.extend(own);
    }
}

/// Delivers events stored by other processes to live subscriptions (and applies replicated
/// memberships and group configs), looking every `period`.
pub fn spawn_follower(relay: Arc<Relay>, period: Duration) -> tokio::task::JoinHandle<()> {
    relay
        .delivery
        .active
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match follow_once(&relay).await {
                Ok(()) => {}
                Err(e) => tracing::debug!(error = %e, "store follower: store unavailable"),
            }
        }
    })
}

async fn follow_once(relay: &Arc<Relay>) -> Result<(), orly_db::StoreError> {
    let store: &SharedStore = &relay.store;
    let latest = store.latest_serial().await?;
    let (prev, own) = relay.delivery.advance(latest);
    // The first look starts from now: history is for REQs, not live delivery.
    let Some(prev) = prev.filter(|p| *p < latest) else {
        return Ok(());
    };
    if latest - prev == own.len() as u64 {
        return Ok(());
    }
    let mut from = prev;
    if latest - from > FOLLOW_MAX_LAG {
        tracing::debug!(
            skipped = latest - from - u64::from(FOLLOW_PAGE),
            "store follower skipping ahead"
        );
        from = latest - u64::from(FOLLOW_PAGE);
    }
    let mut foreign: Vec<u64> = Vec::new();
    while from < latest {
        let entries = match store
            .ids_by_serial_range(from + 1, latest, FOLLOW_PAGE)
            .await
        {
            Ok(e) => e,
            Err(e) => {
                relay.delivery.retreat(prev, own);
                return Err(e);
            }
        };
        let Some(last) = entries.last().map(|e| e.serial) else {
            break;
        };
        foreign.extend(
            entries
                .iter()
                .map(|e| e.serial)
                .filter(|s| !own.contains(s)),
        );
        from = last;
        if (entries.len() as u32) < FOLLOW_PAGE {
            break;
        }
    }
    if foreign.is_empty() {
        return Ok(());
    }
    let mut events = match store.fetch_by_serials(&foreign).await {
        Ok(events) => events,
        Err(e) => {
            relay.delivery.retreat(prev, own);
            return Err(e);
        }
    };
    events.sort_by_key(|(s, _)| *s);
    for (_, event) in events {
        relay.registry.broadcast(&event);
        if let Some(hooks) = relay.sync_hooks() {
            let is_special =
                event.kind.as_u16() == KIND_MEMBERSHIP || is_relay_group_kind(event.kind);
            if is_special {
                hooks.after_any_store(relay, &event).await;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stored_event_is_delivered_once_by_the_ingest_or_the_follower() {
        let d = Delivery::default();
        // Without a follower the ingest delivers everything and records nothing.
        assert!(d.stored_here(1));
        assert!(d.state.lock().own.is_empty());
        d.active.store(true, std::sync::atomic::Ordering::Relaxed);
        // The follower's first look starts at the latest serial.
        assert_eq!(d.advance(1), (None, BTreeSet::new()));
        // Ours: 2 and 4; 3 was stored elsewhere.
        assert!(d.stored_here(2));
        assert!(d.stored_here(4));
        let (prev, own) = d.advance(4);
        assert_eq!(prev, Some(1));
        assert_eq!(own, BTreeSet::from([2, 4]));
        // The ingest of 5 finishes after the follower went past it: the follower delivers it.
        let (prev, own) = d.advance(5);
        assert_eq!((prev, own.len()), (Some(4), 0));
        assert!(!d.stored_here(5));
        // An ingest ahead of the follower keeps its serial until the follower passes it.
        assert!(d.stored_here(7));
        let (_, own) = d.advance(6);
        assert!(own.is_empty());
        assert_eq!(d.state.lock().own, BTreeSet::from([7]));
        // A failed read puts everything back for the next look.
        let (prev, own) = d.advance(7);
        d.retreat(prev.unwrap(), own);
        assert_eq!(d.advance(7), (Some(6), BTreeSet::from([7])));
    }
}
