//! Horizontal scaling: the peers of a service are split among its live replicas by leases kept
//! in the shared store.
//!
//! Every round (a third of the lease ttl) a replica renews its heartbeat marker
//! `<ns>:replica:<holder>` — the database's clock plus the ttl, 8 bytes big-endian — counts the
//! replicas whose heartbeat has not lapsed by that clock, and holds leases on at most its fair
//! share of the targets (`ceil(targets / replicas)`), giving extras back when a replica joins.
//! Each target's work runs under [`Lease::hold`]: it renews its own lease and is dropped the
//! moment the lease is lost or its local deadline passes (the store unreachable, a renewal
//! late), before the database lets anyone else take it. A replica that dies stops renewing;
//! its heartbeat and leases lapse after one ttl and the survivors take its targets on their
//! next round.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use orly_db::StoreError;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::book::{FencedPeer, PeerBook};
use crate::clock::{self, SharedClock};
use crate::lease::{Acquired, Lease};

/// What a sharded service provides: its targets, and the work on one target.
#[async_trait]
pub trait ShardOwner: Send + Sync + 'static {
    /// Every target (peer URL) that should be worked on now.
    async fn targets(&self) -> Result<Vec<String>, String>;
    /// The work on `target`; it runs until dropped, which happens when the lease is lost or the
    /// target handed over. Its writes for the target go through `peer`.
    fn work(self: Arc<Self>, target: String, peer: FencedPeer) -> BoxFuture<'static, ()>;
}

/// Why a round failed (the next round tries again).
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the target list: {0}")]
    Targets(String),
}

struct Worker {
    task: JoinHandle<()>,
    lease: Lease,
}

/// A replica's share of the targets.
pub struct Shard {
    book: PeerBook,
    holder: String,
    ttl: Duration,
    clock: SharedClock,
    workers: Mutex<BTreeMap<String, Worker>>,
    kick: tokio::sync::Notify,
    /// Local clock minus the database's, as last measured (ms).
    skew_ms: AtomicI64,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("ns", &self.book.ns())
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Skew past which the replica warns: leases do not care, but the times this process writes
/// (peer states, `created_at` checks) do.
const SKEW_WARNING_MS: i64 = 5_000;

impl Shard {
    /// A shard over the peers of `book`, on the machine's clock.
    pub fn new(book: PeerBook, holder: String, ttl: Duration) -> Self {
        Self::with_clock(book, holder, ttl, clock::system())
    }

    /// A shard whose local clock is `clock` (tests skew it).
    pub fn with_clock(book: PeerBook, holder: String, ttl: Duration, clock: SharedClock) -> Self {
        Self {
            book,
            holder,
            ttl,
            clock,
            workers: Mutex::new(BTreeMap::new()),
            kick: tokio::sync::Notify::new(),
            skew_ms: AtomicI64::new(0),
        }
    }

    /// Runs the next round now (the target list changed).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn book(&self) -> &PeerBook {
        &self.book
    }

    /// How far the local clock is ahead of the database's (ms, negative: behind), as of the
    /// last round.
    pub fn clock_skew_ms(&self) -> i64 {
        self.skew_ms.load(Ordering::Relaxed)
    }

    /// The targets this replica works on now, sorted.
    pub fn owned(&self) -> Vec<String> {
        self.workers
            .lock()
            .iter()
            .filter(|(_, w)| !w.task.is_finished())
            .map(|(t, _)| t.clone())
            .collect()
    }

    fn heartbeat_prefix(&self) -> String {
        format!("{}:replica:", self.book.ns())
    }

    /// Runs rounds until aborted (then [`Self::release_all`] gives the leases back).
    pub fn spawn<O: ShardOwner>(self: &Arc<Self>, owner: Arc<O>) -> JoinHandle<()> {
        let shard = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(shard.ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shard.kick.notified() => {}
                }
                if let Err(e) = shard.round(&owner).await {
                    tracing::warn!(ns = shard.book.ns(), error = %e, "shard round failed");
                }
            }
        })
    }

    /// Renews the heartbeat and counts the live replicas, all on the database's clock.
    async fn heartbeat(&self) -> Result<usize, StoreError> {
        let store = self.book.store();
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let now = store.clock_ms().await?;
        let skew = self.clock.now_ms() - now;
        self.skew_ms.store(skew, Ordering::Relaxed);
        metrics::gauge!("orly_sync_clock_skew_ms", "service" => self.book.ns().to_string())
            .set(skew as f64);
        if skew.abs() > SKEW_WARNING_MS {
            tracing::warn!(
                ns = self.book.ns(),
                skew_ms = skew,
                "the local clock is off from the database's"
            );
        }
        let prefix = self.heartbeat_prefix();
        store
            .set_marker(
                &format!("{prefix}{}", self.holder),
                &now.saturating_add(ttl_ms).to_be_bytes(),
            )
            .await?;
        let mut live = 0usize;
        for (key, value) in store.list_markers(&prefix).await? {
            let expires = <[u8; 8]>::try_from(value.as_slice())
                .map(i64::from_be_bytes)
                .unwrap_or(0);
            if expires > now {
                live += 1;
            } else if expires < now.saturating_sub(ttl_ms.saturating_mul(10)) {
                // Long-gone replicas are forgotten; a recent lapse is kept for the record.
                let _ = store.delete_marker(&key).await;
            }
        }
        Ok(live)
    }

    /// One round: heartbeat, count replicas, drop ended workers, rebalance, take free targets.
    pub async fn round<O: ShardOwner>(&self, owner: &Arc<O>) -> Result<(), ShardError> {
        let live = self.heartbeat().await?;
        let targets = owner.targets().await.map_err(ShardError::Targets)?;
        let share = targets.len().div_ceil(live.max(1));

        // Workers of targets that are gone, or that ended (their lease was lost).
        let ended: Vec<String> = self
            .workers
            .lock()
            .iter()
            .filter(|(t, w)| !targets.contains(t) || w.task.is_finished())
            .map(|(t, _)| t.clone())
            .collect();
        for t in ended {
            self.stop_worker(&t).await;
        }
        // More than our share (a replica joined): give the extras back.
        let mut owned = self.owned();
        while owned.len() > share {
            if let Some(t) = owned.pop() {
                tracing::info!(ns = self.book.ns(), target = %t, share, "handing a target over");
                self.stop_worker(&t).await;
            }
        }
        // Take free targets up to our share, starting at a holder-specific offset so that
        // replicas starting together do not all race for the same ones.
        if owned.len() < share && !targets.is_empty() {
            let offset = self
                .holder
                .bytes()
                .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize))
                % targets.len();
            for i in 0..targets.len() {
                if self.workers.lock().len() >= share {
                    break;
                }
                let t = &targets[(offset + i) % targets.len()];
                if self.workers.lock().contains_key(t) {
                    continue;
                }
                let lease = match self.book.acquire(t, &self.holder, self.ttl).await? {
                    Acquired::Held(lease) => lease,
                    Acquired::Busy { .. } => continue,
                };
                tracing::info!(ns = self.book.ns(), target = %t, holder = %self.holder, "took a target");
                let work = owner
                    .clone()
                    .work(t.clone(), self.book.fenced(t, lease.clone()));
                let task = {
                    let (lease, ns, target) =
                        (lease.clone(), self.book.ns().to_string(), t.clone());
                    tokio::spawn(async move {
                        if let Err(lost) = lease.hold(work).await {
                            tracing::warn!(%ns, %target, error = %lost, "worker stopped: lease lost");
                        }
                    })
                };
                self.workers
                    .lock()
                    .insert(t.clone(), Worker { task, lease });
            }
        }
        metrics::gauge!("orly_sync_owned_targets", "service" => self.book.ns().to_string())
            .set(self.owned().len() as f64);
        Ok(())
    }

    /// Stops a worker — waits until its work is dropped — then gives its lease back.
    async fn stop_worker(&self, target: &str) {
        let Some(worker) = self.workers.lock().remove(target) else {
            return;
        };
        worker.task.abort();
        let _ = worker.task.await;
        worker.lease.release().await;
    }

    /// Stops every worker and gives the leases and the heartbeat back (clean shutdown: the
    /// other replicas take over on their next round instead of after a ttl).
    pub async fn release_all(&self) {
        let targets: Vec<String> = self.workers.lock().keys().cloned().collect();
        for t in targets {
            self.stop_worker(&t).await;
        }
        let _ = self
            .book
            .store()
            .delete_marker(&format!("{}{}", self.heartbeat_prefix(), self.holder))
            .await;
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        for (_, w) in std::mem::take(&mut *self.workers.lock()) {
            w.task.abort();
        }
    }
}
