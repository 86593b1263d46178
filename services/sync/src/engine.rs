//! The peer-sync engine the distributed and cluster sync share: the relay identity, peer
//! identities (NIP-11), the HTTP client, per-peer state, the shard of peers this replica works
//! on (`orly_peering::Shard`: leases on the database's clock, work dropped when a lease lapses),
//! the long-poll watch of our own serial, and the pull of one peer — self check, [`catch_up`]
//! from the last serial stored, state bookkeeping, every write fenced by the peer's lease —
//! with the worker loop around it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orly_db::SharedStore;
use orly_peering::{Acquired, FencedPeer, PeerBook, Shard, ShardOwner};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::SyncError;
use crate::http::PeerHttp;
use crate::nip11::Nip11Cache;
use crate::peer::{
    catch_up, read_status, CatchupReport, CatchupRules, PeerSource, PeerStatus, STATUS_ACTIVE,
    STATUS_ERROR, STATUS_SELF,
};
use crate::serve::{Identity, SerialWatch, MAX_RESPONSE};

/// A peer's state is written when it changes, and at least this often while it does not.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// How an engine is set up.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Store namespace of its markers and leases (`distributed`, `cluster`).
    pub ns: &'static str,
    pub nip11_ttl: Duration,
    /// Deadline of one request to a peer (a long poll gets `long_poll` on top).
    pub timeout: Duration,
    pub long_poll: Duration,
    /// Pause after a failed pull, and between pulls of peers that cannot long-poll.
    pub interval: Duration,
    pub lease_ttl: Duration,
    pub holder: String,
}

/// One replica's pulling machinery (see the module docs).
pub struct PeerEngine {
    pub store: SharedStore,
    pub identity: Identity,
    pub nip11: Arc<Nip11Cache>,
    pub http: PeerHttp,
    pub book: PeerBook,
    pub shard: Arc<Shard>,
    /// Our own latest serial, for the long polls peers make of us.
    pub latest: SerialWatch,
    /// Wakes every worker waiting out its interval (`TriggerSync`, a changed peer list).
    pub wake: Notify,
    settings: EngineSettings,
    task: Mutex<Option<JoinHandle<()>>>,
    saved: Mutex<HashMap<String, Instant>>,
}

impl PeerEngine {
    pub fn new(store: SharedStore, settings: EngineSettings) -> Self {
        let book = PeerBook::new(store.clone(), settings.ns);
        Self {
            identity: Identity::new(store.clone()),
            nip11: Arc::new(Nip11Cache::new(settings.nip11_ttl, settings.timeout)),
            http: PeerHttp::new(settings.timeout + settings.long_poll, MAX_RESPONSE),
            shard: Arc::new(Shard::new(
                book.clone(),
                settings.holder.clone(),
                settings.lease_ttl,
            )),
            book,
            latest: SerialWatch::new(store.clone()),
            wake: Notify::new(),
            store,
            settings,
            task: Mutex::new(None),
            saved: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Starts sharing the peers with the other replicas and working on ours. False if running.
    pub fn start<O: ShardOwner>(&self, owner: Arc<O>) -> bool {
        let mut task = self.task.lock();
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        *task = Some(self.shard.spawn(owner));
        tracing::info!(ns = self.settings.ns, holder = %self.shard.holder(), "peer sync started");
        true
    }

    pub fn is_running(&self) -> bool {
        self.task.lock().as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops pulling, answers the long polls we hold, and hands our peers back.
    pub async fn stop(&self) {
        let task = self.task.lock().take();
        if let Some(t) = task {
            t.abort();
        }
        self.latest.close();
        self.shard.release_all().await;
    }

    /// Is `peer` this relay itself (its NIP-11 pubkey is ours)?
    pub async fn is_self(&self, peer: &str) -> Result<bool, SyncError> {
        let ours = self.identity.pubkey().await?;
        Ok(self.nip11.pubkey(peer).await.ok() == Some(ours))
    }

    /// Runs `work` on `peer` outside the shard (a poll asked for by hand: `poll_peer`,
    /// `poll_member`) under the peer's lease, held as `<holder>:manual` so that it never shares
    /// the lease with this replica's own worker; `Busy` while any worker holds it.
    pub async fn with_lease<T, F, Fut>(&self, peer: &str, work: F) -> Result<T, SyncError>
    where
        F: FnOnce(FencedPeer) -> Fut,
        Fut: Future<Output = Result<T, SyncError>>,
    {
        let holder = format!("{}:manual", self.shard.holder());
        let lease = match self
            .book
            .acquire(peer, &holder, self.settings.lease_ttl)
            .await?
        {
            Acquired::Held(lease) => lease,
            Acquired::Busy { holder, .. } => {
                return Err(SyncError::Busy(format!("{peer} is worked on by {holder}")))
            }
        };
        let result = lease
            .hold(work(self.book.fenced(peer, lease.clone())))
            .await;
        lease.release().await;
        result?
    }

    /// One pull of the peer of `fenced` through `source`: its serial (a long poll), then
    /// everything since the last serial stored from it; the outcome is recorded in the peer's
    /// state. Also says whether anything new was listed.
    pub async fn poll(
        &self,
        fenced: &FencedPeer,
        source: &dyn PeerSource,
        rules: CatchupRules,
    ) -> Result<(PeerStatus, bool), SyncError> {
        let peer = fenced.url();
        let mut status = read_status(&self.book, peer).await?;
        let before = status.clone();
        status.holder = fenced.lease().holder().to_string();
        if self.is_self(peer).await? {
            status.status = STATUS_SELF.into();
            self.save(fenced, &before, &status).await?;
            return Ok((status, false));
        }
        let result = match self.pull(fenced, source, status.last_serial, rules).await {
            // Deposed: nothing more is ours to record.
            Err(lost @ SyncError::LeaseLost(_)) => return Err(lost),
            other => other,
        };
        let now = orly_common::time::now_secs_i64();
        match &result {
            Ok(r) => {
                metrics::counter!("orly_sync_events_stored_total", "service" => self.settings.ns)
                    .increment(r.stored);
                if r.stored > 0 {
                    tracing::debug!(%peer, stored = r.stored, last_serial = r.last_serial, ns = self.settings.ns, "pulled from peer");
                }
                status.status = STATUS_ACTIVE.into();
                status.error_count = 0;
                status.last_error.clear();
                status.last_poll = now;
                status.last_serial = r.last_serial;
                status.events_stored += r.stored;
                status.events_fetched += r.fetched;
            }
            Err(e) => {
                tracing::warn!(%peer, ns = self.settings.ns, error = %e, "pull failed");
                status.last_serial = self.book.last_serial(peer).await?.unwrap_or(0);
                status.status = STATUS_ERROR.into();
                status.error_count = status.error_count.saturating_add(1);
                status.last_error = e.to_string();
            }
        }
        self.save(fenced, &before, &status).await?;
        result.map(|r| (status, r.pages > 0))
    }

    async fn pull(
        &self,
        fenced: &FencedPeer,
        source: &dyn PeerSource,
        mut last: u64,
        rules: CatchupRules,
    ) -> Result<CatchupReport, SyncError> {
        let peer = fenced.url();
        let latest = source.latest(peer, last).await?;
        if latest < last {
            // The peer's store was replaced: its serials start over.
            tracing::warn!(%peer, latest, last, "peer serial went backwards; pulling it again from the start");
            last = 0;
            fenced.set_last_serial(0).await?;
        }
        catch_up(&self.store, source, fenced, last, latest, rules).await
    }

    /// Writes a peer's state when it changed in substance, or every few seconds (a long poll
    /// answered per new event would otherwise write it per event).
    async fn save(
        &self,
        fenced: &FencedPeer,
        before: &PeerStatus,
        now: &PeerStatus,
    ) -> Result<(), SyncError> {
        let changed = before.status != now.status
            || before.error_count != now.error_count
            || before.events_stored != now.events_stored
            || before.holder != now.holder;
        let due = self
            .saved
            .lock()
            .get(&now.url)
            .is_none_or(|at| at.elapsed() >= STATUS_EVERY);
        if changed || due {
            self.saved.lock().insert(now.url.clone(), Instant::now());
            fenced.save_state(now).await?;
        }
        Ok(())
    }

    /// The worker of one peer: polls again at once after news or a long poll that waited;
    /// after a failure, or a peer that answered at once without news (it cannot long-poll, or
    /// it is ourselves), waits the interval (or until woken). Ends when the lease is lost.
    pub async fn run_worker<F, Fut>(&self, mut poll: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool, SyncError>>,
    {
        let long_poll = self.settings.long_poll;
        loop {
            let woken = self.wake.notified();
            let started = Instant::now();
            let again = match poll().await {
                Ok(progressed) => {
                    progressed || (!long_poll.is_zero() && started.elapsed() >= long_poll / 2)
                }
                Err(SyncError::LeaseLost(lost)) => {
                    tracing::warn!(ns = self.settings.ns, error = %lost, "worker stopped");
                    return;
                }
                Err(_) => false,
            };
            if again {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.interval) => {}
                _ = woken => {}
            }
        }
    }
}
