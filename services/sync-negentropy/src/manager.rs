//! Relay-to-relay sync over time: [`SyncManager`] runs a pass over all peers every interval
//! (between `Start` and `Stop`), on `TriggerSync`, and for `SyncWithPeer`. Each sync runs under
//! the peer's store lease (`orly_peering::Lease`, the scheme the other peer syncs share): among
//! several replicas each peer is synced by one at a time, a sync whose renewals fail or come
//! late (the store unreachable) is stopped before the lease can pass to another replica, and
//! the peer's state and window plan are written only while the lease holds. A replica that
//! dies stops renewing, and the lease passes to a survivor after its ttl. A pass reconciles the
//! windows of the peer's plan that are due ([`crate::windows`]) and records the outcome in the
//! peer's [`PeerState`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use nostr::{Filter, Timestamp};
use orly_db::SharedStore;
use orly_peering::{Acquired, FencedPeer};
use parking_lot::Mutex;
use rand::seq::SliceRandom;

use crate::config::SyncSettings;
use crate::peer_sync::{sync_windows, Discard, PlanSink, SyncError, SyncOptions, SyncReport};
use crate::peers::{
    normalize_peer_url, PeerError, PeerState, Peers, STATUS_ERROR, STATUS_IDLE, STATUS_SYNCING,
};
use crate::windows::{WindowPlan, KIND_WINDOWS};

/// Peer list, per-peer state and the periodic sync loop.
pub struct SyncManager {
    store: SharedStore,
    peers: Peers,
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
            peers: Peers::new(store.clone()),
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
    pub fn peers(&self) -> &Peers {
        &self.peers
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
        let mut peers = match self.peers.list().await {
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
    /// replaces the configured filter for this sync (then every window of a fresh plan is
    /// reconciled and the plan is not kept); without it the peer's stored plan is followed.
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
        let lease = match self
            .peers
            .book()
            .acquire(&url, &self.settings.holder, self.settings.lease_ttl)
            .await?
        {
            Acquired::Held(lease) => lease,
            Acquired::Busy { holder, .. } => {
                return Err(SyncError::Busy(format!(
                    "{url} is being synced by {holder}"
                )))
            }
        };
        self.leased.lock().insert(url.clone());
        let leased = InFlight {
            set: &self.leased,
            url: url.clone(),
        };
        let fenced = self.peers.book().fenced(&url, lease.clone());
        // Dropped — wherever it is — once the lease lapses without a renewal.
        let result = lease
            .hold(self.sync_leased(&fenced, filter, progress))
            .await;
        drop(leased);
        lease.release().await;
        let result = result.map_err(SyncError::from).and_then(|r| r);
        if let Err(e @ SyncError::LeaseLost(_)) = &result {
            metrics::counter!("orly_negentropy_peer_syncs_total", "result" => "lease_lost")
                .increment(1);
            tracing::warn!(peer = %url, error = %e, "peer sync stopped");
        }
        result
    }

    /// The sync of the peer of `fenced`, its lease held.
    async fn sync_leased(
        &self,
        fenced: &FencedPeer,
        filter: Option<Filter>,
        progress: &mut (dyn FnMut(&SyncReport) + Send),
    ) -> Result<SyncReport, SyncError> {
        let url = fenced.url();
        let mut peer_state = match self.peers.book().state::<PeerState>(url).await {
            Ok(Some(s)) => s,
            Ok(None) => PeerState::default(),
            Err(e) => {
                tracing::warn!(peer = %url, error = %e, "unreadable peer state; starting afresh");
                PeerState::default()
            }
        };
        peer_state.peer_url = url.to_string();
        peer_state.status = STATUS_SYNCING.into();
        peer_state.last_attempt = orly_common::time::now_secs_i64();
        peer_state.holder = fenced.lease().holder().to_string();
        self.save_state(fenced, &peer_state).await?;

        let mut opts = SyncOptions::from_settings(&self.settings);
        let result = match filter {
            Some(f) => {
                opts.filter = f;
                opts.all_windows = true;
                let mut plan = WindowPlan::new(&opts.filter);
                sync_windows(&self.store, url, &opts, &mut plan, &mut Discard, progress).await
            }
            None => {
                let mut plan = self.plan(url).await;
                let mut sink = FencedPlan(fenced);
                sync_windows(&self.store, url, &opts, &mut plan, &mut sink, progress).await
            }
        };

        match &result {
            Ok(r) => {
                let now = orly_common::time::now_secs_i64();
                peer_state.last_sync = now;
                if r.windows_failed > 0 {
                    peer_state.status = STATUS_ERROR.into();
                    peer_state.last_error = format!(
                        "{} window(s) could not be reconciled: {}",
                        r.windows_failed, r.window_error
                    );
                    peer_state.consecutive_failures =
                        peer_state.consecutive_failures.saturating_add(1);
                } else {
                    peer_state.status = STATUS_IDLE.into();
                    peer_state.last_error.clear();
                    peer_state.consecutive_failures = 0;
                }
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
                peer_state.windows = i64::from(r.windows);
                peer_state.windows_reconciled = i64::from(r.windows_reconciled);
                self.last_sync.fetch_max(now, Ordering::Relaxed);
                metrics::counter!("orly_negentropy_peer_syncs_total", "result" => "ok")
                    .increment(1);
                metrics::counter!("orly_negentropy_windows_reconciled_total")
                    .increment(u64::from(r.windows_reconciled));
            }
            // Deposed: nothing more is ours to record.
            Err(SyncError::LeaseLost(_)) => return result,
            Err(e) => {
                peer_state.status = STATUS_ERROR.into();
                peer_state.last_error = e.to_string();
                peer_state.consecutive_failures = peer_state.consecutive_failures.saturating_add(1);
                metrics::counter!("orly_negentropy_peer_syncs_total", "result" => "error")
                    .increment(1);
            }
        }
        self.save_state(fenced, &peer_state).await?;
        result
    }

    /// The stored window plan of `url` for the configured filter (a fresh one when there is
    /// none, it is unreadable, or it was made for another filter).
    async fn plan(&self, url: &str) -> WindowPlan {
        let filter = &self.settings.filter;
        match self
            .peers
            .book()
            .json::<WindowPlan>(KIND_WINDOWS, url)
            .await
        {
            Ok(Some(plan)) if plan.is_for(filter) => plan,
            Ok(Some(_)) => {
                tracing::info!(peer = %url, "the sync filter changed: windows planned afresh");
                WindowPlan::new(filter)
            }
            Ok(None) => WindowPlan::new(filter),
            Err(e) => {
                tracing::warn!(peer = %url, error = %e, "unreadable window plan; planning afresh");
                WindowPlan::new(filter)
            }
        }
    }

    /// Writes the peer's state; only a lost lease is an error (a store hiccup is logged).
    async fn save_state(&self, fenced: &FencedPeer, state: &PeerState) -> Result<(), SyncError> {
        match fenced.save_state(state).await {
            Ok(()) => Ok(()),
            Err(orly_peering::PeerError::Lost(l)) => Err(SyncError::LeaseLost(l)),
            Err(e) => {
                tracing::warn!(peer = %state.peer_url, error = %e, "cannot save peer state");
                Ok(())
            }
        }
    }

    /// Adds peers given at start-up (`ORLY_SYNC_NEGENTROPY_PEERS`).
    pub async fn add_peers(&self, urls: &[String]) -> Result<(), PeerError> {
        for url in urls {
            self.peers.add(url).await?;
        }
        Ok(())
    }
}

/// The plan of a regular pass goes to the peer's marker, while the lease holds.
struct FencedPlan<'a>(&'a FencedPeer);

#[async_trait]
impl PlanSink for FencedPlan<'_> {
    async fn save(&mut self, plan: &WindowPlan) -> Result<(), SyncError> {
        Ok(self.0.set_json(KIND_WINDOWS, plan).await?)
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
