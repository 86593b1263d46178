//! Relay-to-relay sync over time: [`SyncManager`] runs a pass over all peers every interval
//! (between `Start` and `Stop`), on `TriggerSync`, and for `SyncWithPeer`; it takes the peer's
//! store lease first so that among several replicas each peer is synced by one at a time (a
//! replica that dies stops renewing, and the lease passes to a survivor after its ttl), and
//! records the outcome in the peer's [`PeerState`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};

use nostr::{Filter, Timestamp};
use orly_db::SharedStore;
use parking_lot::Mutex;
use rand::seq::SliceRandom;

use crate::config::SyncSettings;
use crate::peer_sync::{sync_with_peer, SyncError, SyncOptions, SyncReport};
use crate::peers::{
    normalize_peer_url, now_secs, PeerBook, PeerError, PeerState, LEASE_PREFIX, STATUS_ERROR,
    STATUS_IDLE, STATUS_SYNCING,
};

/// Peer list, per-peer state and the periodic sync loop.
pub struct SyncManager {
    store: SharedStore,
    book: PeerBook,
    settings: SyncSettings,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    last_sync: AtomicI64,
    in_flight: Mutex<HashSet<String>>,
    /// Peers whose lease this replica holds for a sync running now (see [`Self::syncing`]).
    leased: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for SyncManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncManager")
            .field("settings", &self.settings)
            .field("active", &self.is_active())
            .finish()
    }
}

/// Releases the in-process "syncing" mark of a peer when the sync ends, however it ends.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    url: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.url);
    }
}

impl SyncManager {
    pub fn new(store: SharedStore, settings: SyncSettings) -> Result<Arc<Self>, String> {
        settings.validate()?;
        Ok(Arc::new(Self {
            book: PeerBook::new(store.clone()),
            store,
            settings,
            task: Mutex::new(None),
            last_sync: AtomicI64::new(0),
            in_flight: Mutex::new(HashSet::new()),
            leased: Mutex::new(HashSet::new()),
        }))
    }

    pub fn settings(&self) -> &SyncSettings {
        &self.settings
    }

    /// The persistent peer list and states.
    pub fn peers(&self) -> &PeerBook {
        &self.book
    }

    /// True while the periodic loop runs.
    pub fn is_active(&self) -> bool {
        self.task.lock().as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Unix seconds of the last successful sync with any peer by this replica (0: none).
    pub fn last_sync(&self) -> i64 {
        self.last_sync.load(Ordering::Relaxed)
    }

    /// The peers this replica is syncing right now under their lease (sorted): a peer is in it
    /// from the moment the lease is taken until just before it is released, so while leases hold
    /// (they are renewed every third of their ttl) no peer is in the sets of two replicas at once.
    pub fn syncing(&self) -> Vec<String> {
        let mut peers: Vec<String> = self.leased.lock().iter().cloned().collect();
        peers.sort();
        peers
    }

    /// Starts the periodic loop (a pass at once, then every interval). False if running.
    pub fn start(self: &Arc<Self>) -> bool {
        let mut task = self.task.lock();
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let interval = self.settings.interval;
        *task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(manager) = weak.upgrade() else { break };
                manager.sync_all(None).await;
            }
        }));
        tracing::info!(?interval, "negentropy peer sync started");
        true
    }

    /// Stops the periodic loop (a sync in progress is cut off). False if not running.
    pub fn stop(&self) -> bool {
        match self.task.lock().take() {
            Some(t) => {
                t.abort();
                tracing::info!("negentropy peer sync stopped");
                true
            }
            None => false,
        }
    }

    /// One pass over every peer, in random order (so replicas spread over the peers); peers
    /// another replica is syncing are skipped.
    pub async fn sync_all(
        &self,
        filter: Option<Filter>,
    ) -> Vec<(String, Result<SyncReport, SyncError>)> {
        let mut peers = match self.book.list().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peer list");
                return Vec::new();
            }
        };
        peers.shuffle(&mut rand::thread_rng());
        let mut out = Vec::with_capacity(peers.len());
        for url in peers {
            let result = self.sync_peer(&url, filter.clone(), &mut |_| {}).await;
            match &result {
                Ok(r) => tracing::info!(
                    peer = %url, rounds = r.rounds, have = r.have_count, need = r.need_count,
                    fetched = r.fetched, sent = r.sent, "peer synced"
                ),
                Err(SyncError::Busy(why)) => tracing::debug!(peer = %url, %why, "peer skipped"),
                Err(e) => tracing::warn!(peer = %url, error = %e, "peer sync failed"),
            }
            out.push((url, result));
        }
        out
    }

    /// Starts a sync of one peer (or, with `None`, of every peer) in the background.
    pub fn trigger(self: &Arc<Self>, peer: Option<String>, filter: Option<Filter>) {
        let manager = self.clone();
        tokio::spawn(async move {
            match peer {
                Some(url) => {
                    if let Err(e) = manager.sync_peer(&url, filter, &mut |_| {}).await {
                        tracing::warn!(peer = %url, error = %e, "triggered sync failed");
                    }
                }
                None => {
                    manager.sync_all(filter).await;
                }
            }
        });
    }

    /// Syncs with one peer now, under its lease, recording the outcome in its state. `filter`
    /// replaces the configured filter for this sync.
    pub async fn sync_peer(
        &self,
        url: &str,
        filter: Option<Filter>,
        progress: &mut (dyn FnMut(&SyncReport) + Send),
    ) -> Result<SyncReport, SyncError> {
        let url = normalize_peer_url(url).map_err(SyncError::Protocol)?;
        if !self.in_flight.lock().insert(url.clone()) {
            return Err(SyncError::Busy(format!("{url} is being synced already")));
        }
        let _guard = InFlight {
            set: &self.in_flight,
            url: url.clone(),
        };

        let lease = format!("{LEASE_PREFIX}{url}");
        let holder = self.settings.holder.clone();
        let ttl_ms = self.settings.lease_ttl.as_millis() as i64;
        let state = self.store.acquire_lease(&lease, &holder, ttl_ms).await?;
        if !state.acquired {
            return Err(SyncError::Busy(format!(
                "{url} is being synced by {}",
                state.holder
            )));
        }
        self.leased.lock().insert(url.clone());
        let leased = InFlight {
            set: &self.leased,
            url: url.clone(),
        };
        // Aborted when this sync ends or is cut off (its future dropped, e.g. by `stop`): a
        // detached renewal would hold the peer's lease forever.
        let renew = AbortOnDrop({
            let store = self.store.clone();
            let (lease, holder) = (lease.clone(), holder.clone());
            let period = self.settings.lease_ttl / 3;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    match store.acquire_lease(&lease, &holder, ttl_ms).await {
                        Ok(s) if s.acquired => {}
                        Ok(s) => tracing::warn!(%lease, holder = %s.holder, "lost the peer lease"),
                        Err(e) => tracing::warn!(%lease, error = %e, "cannot renew the peer lease"),
                    }
                }
            })
        });

        let mut peer_state = match self.book.state(&url).await {
            Ok(Some(s)) => s,
            Ok(None) => PeerState {
                peer_url: url.clone(),
                ..PeerState::default()
            },
            Err(e) => {
                tracing::warn!(peer = %url, error = %e, "unreadable peer state; starting afresh");
                PeerState {
                    peer_url: url.clone(),
                    ..PeerState::default()
                }
            }
        };
        peer_state.status = STATUS_SYNCING.into();
        peer_state.last_attempt = now_secs();
        peer_state.holder = holder.clone();
        self.save_state(&peer_state).await;

        let mut opts = SyncOptions::from_settings(&self.settings);
        if let Some(f) = filter {
            opts.filter = f;
        }
        let result = sync_with_peer(&self.store, &url, &opts, progress).await;
        drop(renew);

        match &result {
            Ok(r) => {
                let now = now_secs();
                peer_state.status = STATUS_IDLE.into();
                peer_state.last_sync = now;
                peer_state.last_error.clear();
                peer_state.consecutive_failures = 0;
                peer_state.events_synced += (r.fetched + r.sent) as i64;
                peer_state.have_count = r.have_count as i64;
                peer_state.need_count = r.need_count as i64;
                peer_state.fetched_count = r.fetched as i64;
                peer_state.sent_count = r.sent as i64;
                peer_state.rounds = i64::from(r.rounds);
                peer_state.reconcile_bytes_sent = r.reconcile_bytes_sent as i64;
                peer_state.reconcile_bytes_received = r.reconcile_bytes_received as i64;
                peer_state.bytes_sent = r.bytes_sent as i64;
                peer_state.bytes_received = r.bytes_received as i64;
                self.last_sync.fetch_max(now, Ordering::Relaxed);
                metrics::counter!("orly_negentropy_peer_syncs_total", "result" => "ok")
                    .increment(1);
            }
            Err(e) => {
                peer_state.status = STATUS_ERROR.into();
                peer_state.last_error = e.to_string();
                peer_state.consecutive_failures = peer_state.consecutive_failures.saturating_add(1);
                metrics::counter!("orly_negentropy_peer_syncs_total", "result" => "error")
                    .increment(1);
            }
        }
        self.save_state(&peer_state).await;
        drop(leased);
        if let Err(e) = self.store.release_lease(&lease, &holder).await {
            tracing::warn!(%lease, error = %e, "cannot release the peer lease");
        }
        result
    }

    async fn save_state(&self, state: &PeerState) {
        if let Err(e) = self.book.save_state(state).await {
            tracing::warn!(peer = %state.peer_url, error = %e, "cannot save peer state");
        }
    }

    /// Adds peers given at start-up (`ORLY_SYNC_NEGENTROPY_PEERS`).
    pub async fn add_peers(&self, urls: &[String]) -> Result<(), PeerError> {
        for url in urls {
            self.book.add(url).await?;
        }
        Ok(())
    }
}

/// A filter narrowed to events at or after `since` (unix seconds; 0 or less: unchanged).
pub fn with_since(filter: Filter, since: i64) -> Filter {
    if since > 0 {
        filter.since(Timestamp::from(since as u64))
    } else {
        filter
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
