//! The peer-sync engine the distributed and cluster sync share: the relay identity, peer
//! identities (NIP-11), the HTTP client, per-peer state, the shard of peers this replica works
//! on, the long-poll watch of our own serial, and the pull of one peer — self check,
//! [`catch_up`] from the last serial stored, state bookkeeping — with the worker loop around it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orly_db::SharedStore;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::SyncError;
use crate::http::PeerHttp;
use crate::nip11::Nip11Cache;
use crate::peer::{
    catch_up, CatchupReport, CatchupRules, PeerBook, PeerSource, PeerStatus, STATUS_ACTIVE,
    STATUS_ERROR, STATUS_SELF,
};
use crate::serve::{Identity, SerialWatch, MAX_RESPONSE};
use crate::shard::{Shard, ShardOwner};

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
        Self {
            identity: Identity::new(store.clone()),
            nip11: Arc::new(Nip11Cache::new(settings.nip11_ttl, settings.timeout)),
            http: PeerHttp::new(settings.timeout + settings.long_poll, MAX_RESPONSE),
            book: PeerBook::new(store.clone(), settings.ns),
            shard: Arc::new(Shard::new(
                store.clone(),
                settings.ns,
                settings.holder.clone(),
                settings.lease_ttl,
            )),
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

    /// One pull of `peer` through `source`: its serial (a long poll), then everything since
    /// the last serial stored from it; the outcome is recorded in the peer's state. Also says
    /// whether anything new was listed.
    pub async fn poll(
        &self,
        peer: &str,
        source: &dyn PeerSource,
        rules: CatchupRules,
    ) -> Result<(PeerStatus, bool), SyncError> {
        let mut status = self.book.status(peer).await?;
        let before = status.clone();
        status.holder = self.shard.holder().to_string();
        if self.is_self(peer).await? {
            status.status = STATUS_SELF.into();
            self.save(&before, &status).await?;
            return Ok((status, false));
        }
        let result = self.pull(peer, source, status.last_serial, rules).await;
        let now = nostr::Timestamp::now().as_secs() as i64;
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
        self.save(&before, &status).await?;
        result.map(|r| (status, r.pages > 0))
    }

    async fn pull(
        &self,
        peer: &str,
        source: &dyn PeerSource,
        mut last: u64,
        rules: CatchupRules,
    ) -> Result<CatchupReport, SyncError> {
        let latest = source.latest(peer, last).await?;
        if latest < last {
            // The peer's store was replaced: its serials start over.
            tracing::warn!(%peer, latest, last, "peer serial went backwards; pulling it again from the start");
            last = 0;
            self.book.set_last_serial(peer, 0).await?;
        }
        catch_up(&self.store, source, &self.book, peer, last, latest, rules).await
    }

    /// Writes a peer's state when it changed in substance, or every few seconds (a long poll
    /// answered per new event would otherwise write it per event).
    async fn save(&self, before: &PeerStatus, now: &PeerStatus) -> Result<(), SyncError> {
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
            self.book.save_status(now).await?;
        }
        Ok(())
    }

    /// The worker of one peer: polls again at once after news or a long poll that waited;
    /// after a failure, or a peer that answered at once without news (it cannot long-poll, or
    /// it is ourselves), waits the interval (or until woken).
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
