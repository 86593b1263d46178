//! The relay's state, built once ([`RelayBuilder`]) before it serves: configuration, the
//! store, the ACL, the optional NIP-77 and peer sync services, and the live index fed by the
//! store's feed. Connections, NIP-11 and the HTTP server read it; nothing is set later.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nostr::PublicKey;
use orly_acl::AclAdmin;
use orly_db::SharedStore;
use orly_sync_negentropy::NegentropyHandler;
use tokio::sync::watch;

use crate::acl::Acl;
use crate::config::RelayConfig;
use crate::live::{FeedTap, LiveIndex};

/// Bytes queued for sending on every connection together (see [`crate::connection`]).
#[derive(Debug, Default)]
pub struct OutboundBytes(AtomicUsize);

impl OutboundBytes {
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Authors whose parsed keys the verifier keeps (about 100 bytes each).
const VERIFIER_KEYS: usize = 16_384;

/// The relay (see the module docs).
pub struct Relay {
    pub config: RelayConfig,
    pub store: SharedStore,
    pub acl: Arc<dyn Acl>,
    /// The ACL's management side, for NIP-86 (`None`: no management API).
    pub acl_admin: Option<Arc<dyn AclAdmin>>,
    /// NIP-77 sessions (`None`: NEG-* messages are refused with NEG-ERR).
    pub negentropy: Option<Arc<dyn NegentropyHandler>>,
    /// The peer sync services (`None`: their endpoints answer 404).
    pub sync: Option<Arc<crate::sync::SyncHooks>>,
    /// Every open subscription, fed by the store's feed.
    pub live: Arc<LiveIndex>,
    /// Distinguishes this process's connections at a shared negentropy service.
    pub instance: String,
    /// Bytes waiting in every connection's outbox.
    pub outbound: Arc<OutboundBytes>,
    /// Checks EVENT signatures, keeping authors' parsed keys.
    pub verifier: crate::verify::Verifier,
    /// Byte permits of every connection's EVENTs in flight together
    /// (`ORLY_MAX_EVENT_BYTES_IN_FLIGHT_TOTAL`).
    pub events_in_flight: Arc<tokio::sync::Semaphore>,
    /// The permits `events_in_flight` started with.
    pub events_total: usize,
    /// Bytes of EVENTs in flight, for returning memory after a burst.
    pub event_bursts: orly_common::memory::Bursts,
    connections: AtomicUsize,
    draining: AtomicBool,
    identity: orly_sync::serve::Identity,
    shutdown: watch::Sender<bool>,
    feed: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.feed.abort();
    }
}

/// Builds a [`Relay`]; [`RelayBuilder::build`] starts its live feed (inside a tokio runtime).
pub struct RelayBuilder {
    config: RelayConfig,
    store: SharedStore,
    acl: Arc<dyn Acl>,
    acl_admin: Option<Arc<dyn AclAdmin>>,
    negentropy: Option<Arc<dyn NegentropyHandler>>,
    sync: Option<Arc<crate::sync::SyncHooks>>,
}

impl RelayBuilder {
    /// NIP-86 relay management (`POST /api/nip86`) by the ACL's management side.
    pub fn admin(mut self, admin: Arc<dyn AclAdmin>) -> Self {
        self.acl_admin = Some(admin);
        self
    }

    /// NIP-77: NEG-OPEN / NEG-MSG / NEG-CLOSE go to `handler`.
    pub fn negentropy(mut self, handler: Arc<dyn NegentropyHandler>) -> Self {
        self.negentropy = Some(handler);
        self
    }

    /// The peer sync services: their HTTP endpoints, and the special kinds' side effects.
    pub fn sync(mut self, hooks: Arc<crate::sync::SyncHooks>) -> Self {
        self.sync = Some(hooks);
        self
    }

    pub fn build(self) -> Arc<Relay> {
        let live = Arc::new(LiveIndex::default());
        let tap = self.sync.clone().map(|hooks| {
            Arc::new(crate::sync::SideEffects::new(hooks, self.store.clone())) as Arc<dyn FeedTap>
        });
        let feed = tokio::spawn(live.clone().run_feed(self.store.clone(), tap));
        let events_total = self.config.limits.event_budget_total();
        Arc::new(Relay {
            identity: orly_sync::serve::Identity::new(self.store.clone()),
            config: self.config,
            store: self.store,
            acl: self.acl,
            acl_admin: self.acl_admin,
            negentropy: self.negentropy,
            sync: self.sync,
            live,
            instance: hex::encode(rand::random::<[u8; 6]>()),
            outbound: Arc::new(OutboundBytes::default()),
            verifier: crate::verify::Verifier::new(VERIFIER_KEYS),
            events_in_flight: Arc::new(tokio::sync::Semaphore::new(events_total)),
            events_total,
            event_bursts: orly_common::memory::Bursts::new(orly_common::memory::BURST_BYTES),
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            feed,
        })
    }
}

impl Relay {
    pub fn builder(config: RelayConfig, store: SharedStore, acl: Arc<dyn Acl>) -> RelayBuilder {
        RelayBuilder {
            config,
            store,
            acl,
            acl_admin: None,
            negentropy: None,
            sync: None,
        }
    }

    /// A relay with only a store and an ACL.
    pub fn new(config: RelayConfig, store: SharedStore, acl: Arc<dyn Acl>) -> Arc<Self> {
        Self::builder(config, store, acl).build()
    }

    /// A relay whose ACL is also administered over NIP-86 (`POST /api/nip86`).
    pub fn with_admin(
        config: RelayConfig,
        store: SharedStore,
        acl: Arc<dyn Acl>,
        admin: Option<Arc<dyn AclAdmin>>,
    ) -> Arc<Self> {
        let builder = Self::builder(config, store, acl);
        match admin {
            Some(a) => builder.admin(a),
            None => builder,
        }
        .build()
    }

    /// The relay's identity pubkey (NIP-11 `pubkey`), from the key kept in the store (the same
    /// key the peer sync signs with). `None` while the store cannot be reached; asked again
    /// next time.
    pub async fn identity(&self) -> Option<PublicKey> {
        match tokio::time::timeout(Duration::from_secs(2), self.identity.pubkey()).await {
            Ok(Ok(pk)) => Some(pk),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "relay identity unavailable");
                None
            }
            Err(_) => None,
        }
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("orly_connections").increment(1.0);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("orly_connections").decrement(1.0);
    }

    /// A receiver that flips to `true` when the relay shuts down or drains.
    pub fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Tells every connection to close (1001 going away).
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Stops taking WebSocket upgrades (and reports not ready), then closes every connection.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.begin_shutdown();
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
