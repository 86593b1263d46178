//! Horizontal scaling: the peers (distributed) or members (cluster) of a service are split
//! among its live replicas by leases kept in the shared store.
//!
//! Every round (a third of the lease ttl) a replica renews its heartbeat marker
//! `<ns>:replica:<holder>`, counts the live replicas, and holds leases `<ns>:lease:<target>` on
//! at most its fair share (`ceil(targets / replicas)`), giving extras back when a new replica
//! appears. A worker runs for each target whose lease it holds and is stopped the moment the
//! lease is lost, so no target is worked on by two replicas at once; when a replica dies its
//! heartbeat and leases lapse after one ttl and the survivors take its targets on their next
//! round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orly_db::SharedStore;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::error::SyncError;

/// What a sharded service provides: its targets, and a worker per target.
#[async_trait]
pub trait ShardOwner: Send + Sync + 'static {
    /// Every target (peer URL) that should be worked on now.
    async fn targets(&self) -> Result<Vec<String>, SyncError>;
    /// Starts the worker of one target; it runs until aborted.
    fn start_worker(self: Arc<Self>, target: String) -> JoinHandle<()>;
}

/// A replica's share of the targets.
pub struct Shard {
    store: SharedStore,
    ns: &'static str,
    holder: String,
    ttl: Duration,
    workers: Mutex<BTreeMap<String, JoinHandle<()>>>,
    kick: tokio::sync::Notify,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("ns", &self.ns)
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A holder name unique to this process: host, pid and a random suffix.
pub fn default_holder() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "orly".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 3]>())
    )
}

impl Shard {
    pub fn new(store: SharedStore, ns: &'static str, holder: String, ttl: Duration) -> Self {
        Self {
            store,
            ns,
            holder,
            ttl,
            workers: Mutex::new(BTreeMap::new()),
            kick: tokio::sync::Notify::new(),
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

    /// The targets this replica works on now, sorted.
    pub fn owned(&self) -> Vec<String> {
        self.workers.lock().keys().cloned().collect()
    }

    fn lease_name(&self, target: &str) -> String {
        format!("{}:lease:{target}", self.ns)
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
                    tracing::warn!(ns = shard.ns, error = %e, "shard round failed");
                }
            }
        })
    }

    /// One round: heartbeat, count replicas, renew, rebalance, take free targets.
    pub async fn round<O: ShardOwner>(&self, owner: &Arc<O>) -> Result<(), SyncError> {
        let ttl_ms = self.ttl.as_millis() as i64;
        let now = now_ms();
        let prefix = format!("{}:replica:", self.ns);
        self.store
            .set_marker(
                &format!("{prefix}{}", self.holder),
                &(now + ttl_ms).to_be_bytes(),
            )
            .await?;
        let mut live = 0usize;
        for (key, value) in self.store.list_markers(&prefix).await? {
            let expires = <[u8; 8]>::try_from(value.as_slice())
                .map(i64::from_be_bytes)
                .unwrap_or(0);
            if expires > now {
                live += 1;
            } else if expires < now - 10 * ttl_ms {
                // Long-gone replicas are forgotten; a recent lapse is kept for the record.
                let _ = self.store.delete_marker(&key).await;
            }
        }
        let targets = owner.targets().await?;
        let share = targets.len().div_ceil(live.max(1));

        // Drop workers of targets that are gone, or whose worker ended.
        let held: Vec<String> = self.owned();
        for t in &held {
            let finished = self
                .workers
                .lock()
                .get(t)
                .is_some_and(JoinHandle::is_finished);
            if !targets.contains(t) || finished {
                self.stop_worker(t).await;
            }
        }
        // Renew what we hold; a lease lost (we were too slow) stops its worker at once.
        for t in self.owned() {
            let state = self
                .store
                .acquire_lease(&self.lease_name(&t), &self.holder, ttl_ms)
                .await?;
            if !state.acquired {
                tracing::warn!(ns = self.ns, target = %t, holder = %state.holder, "lease lost");
                if let Some(w) = self.workers.lock().remove(&t) {
                    w.abort();
                }
            }
        }
        // More than our share (a replica joined): give the extras back.
        let mut owned = self.owned();
        while owned.len() > share {
            if let Some(t) = owned.pop() {
                tracing::info!(ns = self.ns, target = %t, share, "handing a target over");
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
                let state = self
                    .store
                    .acquire_lease(&self.lease_name(t), &self.holder, ttl_ms)
                    .await?;
                if state.acquired {
                    tracing::info!(ns = self.ns, target = %t, holder = %self.holder, "took a target");
                    let worker = owner.clone().start_worker(t.clone());
                    self.workers.lock().insert(t.clone(), worker);
                }
            }
        }
        metrics::gauge!("orly_sync_owned_targets", "service" => self.ns)
            .set(self.workers.lock().len() as f64);
        Ok(())
    }

    async fn stop_worker(&self, target: &str) {
        if let Some(w) = self.workers.lock().remove(target) {
            w.abort();
        }
        if let Err(e) = self
            .store
            .release_lease(&self.lease_name(target), &self.holder)
            .await
        {
            tracing::warn!(ns = self.ns, %target, error = %e, "cannot release a lease");
        }
    }

    /// Stops every worker and gives the leases and the heartbeat back (clean shutdown: the
    /// other replicas take over on their next round instead of after a ttl).
    pub async fn release_all(&self) {
        for t in self.owned() {
            self.stop_worker(&t).await;
        }
        let _ = self
            .store
            .delete_marker(&format!("{}:replica:{}", self.ns, self.holder))
            .await;
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        for (_, w) in std::mem::take(&mut *self.workers.lock()) {
            w.abort();
        }
    }
}
