//! A store lease held under a local deadline. The database decides who holds a lease and for
//! how long, on its own clock ([`orly_db::EventStore::acquire_lease`]); the holder cannot read
//! that clock continuously, so it keeps a deadline on its monotonic clock: the instant taken
//! *before* it asked, plus the time the database said the lease has left, minus a safety
//! margin. That instant comes before the database's expiry whatever either wall clock says.
//! Work run under [`Lease::hold`] is renewed every third of the ttl and is dropped the moment
//! the deadline passes without a successful renewal (the store unreachable, a renewal late) or
//! a renewal finds the lease taken; writes made for the work go through
//! [`Lease::write_marker`], which the database accepts only while the lease is still held
//! (`set_marker_fenced`), so a deposed holder cannot overwrite what its successor wrote.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use orly_db::{SharedStore, StoreError};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

/// The work of a holder ended because it no longer holds the lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease {lease} lost by {holder}: {why}")]
pub struct LeaseLost {
    pub lease: String,
    pub holder: String,
    pub why: String,
}

/// Why a write for a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write was refused: the writer's lease lapsed or another holder has it.
    #[error(transparent)]
    Lost(#[from] LeaseLost),
}

/// What [`Lease::acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// We hold it now.
    Held(Lease),
    /// Another holder has it, for `remaining_ms` more by the database's clock.
    Busy { holder: String, remaining_ms: i64 },
}

/// How much earlier than the database's expiry a holder stops: a tenth of the ttl, for the
/// time between the database's answer and our reading it, clock-rate drift, and the moment
/// work takes to notice it was dropped.
pub fn safety_margin(ttl: Duration) -> Duration {
    ttl / 10
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

struct Inner {
    store: SharedStore,
    name: String,
    holder: String,
    ttl: Duration,
    /// The local deadline; `None` once lost or released (for good: a lost lease is never
    /// revived, it must be acquired again).
    deadline: watch::Sender<Option<Instant>>,
    why_lost: Mutex<Option<String>>,
}

/// A lease this process holds (cheap to clone; clones share the deadline).
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.inner.name)
            .field("holder", &self.inner.holder)
            .field("deadline", &*self.inner.deadline.borrow())
            .finish()
    }
}

/// The local deadline for an answer that said `remaining_ms`, asked at `asked`.
fn deadline_of(asked: Instant, remaining_ms: i64, ttl: Duration) -> Instant {
    let remaining = Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0));
    asked + remaining.saturating_sub(safety_margin(ttl))
}

impl Lease {
    /// Takes (or, for the same holder, renews) the lease `name` for `ttl`.
    pub async fn acquire(
        store: &SharedStore,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Acquired, StoreError> {
        let asked = Instant::now();
        let state = store.acquire_lease(name, holder, ttl_ms(ttl)).await?;
        if !state.acquired {
            return Ok(Acquired::Busy {
                holder: state.holder,
                remaining_ms: state.remaining_ms,
            });
        }
        let deadline = deadline_of(asked, state.remaining_ms, ttl);
        Ok(Acquired::Held(Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                name: name.to_string(),
                holder: holder.to_string(),
                ttl,
                deadline: watch::channel(Some(deadline)).0,
                why_lost: Mutex::new(None),
            }),
        }))
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The local deadline (`None`: lost or released).
    pub fn deadline(&self) -> Option<Instant> {
        *self.inner.deadline.borrow()
    }

    /// True while the local deadline lies ahead.
    pub fn is_held(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() < d)
    }

    fn lose(&self, why: &str) {
        let was_held = self.inner.deadline.send_replace(None).is_some();
        if was_held {
            *self.inner.why_lost.lock() = Some(why.to_string());
            if why != "released" {
                metrics::counter!("orly_leases_lost_total").increment(1);
                tracing::warn!(lease = %self.inner.name, holder = %self.inner.holder, %why, "lease lost");
            }
        }
    }

    fn lost(&self) -> LeaseLost {
        LeaseLost {
            lease: self.inner.name.clone(),
            holder: self.inner.holder.clone(),
            why: self
                .inner
                .why_lost
                .lock()
                .clone()
                .unwrap_or_else(|| "the local deadline passed".into()),
        }
    }

    /// One renewal. `Ok(true)`: renewed, the deadline moved on; `Ok(false)`: lost (another
    /// holder has it, or it was lost before); `Err`: the store did not answer (the deadline
    /// stays where it was).
    pub async fn renew(&self) -> Result<bool, StoreError> {
        if !self.is_held() {
            return Ok(false);
        }
        let asked = Instant::now();
        let state = self
            .inner
            .store
            .acquire_lease(&self.inner.name, &self.inner.holder, ttl_ms(self.inner.ttl))
            .await?;
        if !state.acquired {
            self.lose(&format!("taken by {}", state.holder));
            return Ok(false);
        }
        let deadline = deadline_of(asked, state.remaining_ms, self.inner.ttl);
        let mut renewed = false;
        self.inner.deadline.send_if_modified(|d| {
            // Only while still held: a lease lost meanwhile stays lost.
            if d.is_some() {
                *d = Some(deadline);
                renewed = true;
            }
            renewed
        });
        Ok(renewed)
    }

    /// Runs `work` while the lease is held, renewing it every third of its ttl. `work` is
    /// dropped — stopped wherever it is — when the local deadline passes without a successful
    /// renewal or a renewal finds the lease taken. One `hold` at a time per lease.
    pub async fn hold<F: Future>(&self, work: F) -> Result<F::Output, LeaseLost> {
        let _renewal = AbortOnDrop(tokio::spawn(renew_loop(self.clone())));
        let mut rx = self.inner.deadline.subscribe();
        tokio::pin!(work);
        loop {
            let Some(deadline) = *rx.borrow_and_update() else {
                return Err(self.lost());
            };
            tokio::select! {
                biased;
                out = &mut work => return Ok(out),
                () = tokio::time::sleep_until(deadline) => {
                    self.lose("no renewal before the local deadline");
                    return Err(self.lost());
                }
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(self.lost());
                    }
                }
            }
        }
    }

    /// Writes a marker only while this lease is held, by the local deadline and by the
    /// database's clock in the same statement as the write.
    pub async fn write_marker(&self, key: &str, value: &[u8]) -> Result<(), PeerError> {
        if !self.is_held() {
            self.lose("the local deadline passed");
            return Err(self.lost().into());
        }
        let written = self
            .inner
            .store
            .set_marker_fenced(key, value, &self.inner.name, &self.inner.holder)
            .await?;
        if !written {
            self.lose("the database refused a fenced write (the lease lapsed or was taken)");
            return Err(self.lost().into());
        }
        Ok(())
    }

    /// Gives the lease back (work under [`Self::hold`] should have ended first).
    pub async fn release(&self) {
        self.lose("released");
        if let Err(e) = self
            .inner
            .store
            .release_lease(&self.inner.name, &self.inner.holder)
            .await
        {
            tracing::warn!(lease = %self.inner.name, error = %e, "cannot release a lease");
        }
    }
}

/// Renews every third of the ttl; after a failed attempt, again sooner.
async fn renew_loop(lease: Lease) {
    let period = lease.inner.ttl / 3;
    let retry = (period / 4).max(Duration::from_millis(10));
    let mut wait = period;
    loop {
        tokio::time::sleep(wait).await;
        match tokio::time::timeout(period, lease.renew()).await {
            Ok(Ok(true)) => wait = period,
            Ok(Ok(false)) => return,
            Ok(Err(e)) => {
                tracing::warn!(lease = %lease.inner.name, error = %e, "cannot renew a lease; retrying");
                wait = retry;
            }
            Err(_) => {
                tracing::warn!(lease = %lease.inner.name, "a lease renewal got no answer in time; retrying");
                wait = retry;
            }
        }
        if lease.deadline().is_none() {
            return;
        }
    }
}

/// Aborts a background task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_comes_before_the_time_left() {
        let asked = Instant::now();
        let ttl = Duration::from_secs(10);
        assert_eq!(
            deadline_of(asked, 10_000, ttl),
            asked + Duration::from_secs(9)
        );
        // Less left than the margin: the deadline is already due.
        assert_eq!(deadline_of(asked, 500, ttl), asked);
        assert_eq!(deadline_of(asked, -5, ttl), asked);
    }
}
