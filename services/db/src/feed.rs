//! The store's serial order as a live stream: the one backbone every live consumer reads (the
//! relay's subscriptions, the sync services' long polls, side effects of special kinds).
//!
//! A [`FeedHub`] lives in the process that owns a store handle. Stored events enter it in
//! serial order once committed — from the SQLite writer, or from PostgreSQL's `LISTEN/NOTIFY`
//! of new serials (so events written by any replica reach every replica) — and ephemeral
//! events enter it without a serial. It keeps a short ring of recent items (a tokio
//! broadcast). [`FeedHub::watch`] turns it into a [`Feed`] for one consumer: first the stored
//! events above the consumer's serial (read from the store), then live items; a consumer that
//! falls behind the ring, or sees a gap in the serials, reads the missing range from the store
//! again, so it gets every stored event exactly once and in serial order. Ephemeral events are
//! live only: one that falls out of the ring before a slow consumer reads it is lost to it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{RawEvent, Result};

/// A stream of feed items: stored events (serial > 0) in serial order, ephemeral ones
/// (serial 0) as they come. Never ends while the store lives.
pub type Feed = Pin<Box<dyn Stream<Item = Arc<RawEvent>> + Send>>;

/// Recent items the hub keeps for consumers that are a little behind.
pub const RING: usize = 4096;
/// Stored events read from the store per catch-up page.
const CATCH_UP_PAGE: u32 = 1000;
/// Items buffered between a consumer's feed task and the consumer.
const CONSUMER_BUFFER: usize = 1024;

/// Where a feed reads what it missed: the store's events by serial range.
#[async_trait]
pub trait SerialSource: Send + Sync + 'static {
    /// Stored events with `from <= serial <= to`, ascending, at most `limit`.
    async fn events_by_serial_range(&self, from: u64, to: u64, limit: u32)
        -> Result<Vec<RawEvent>>;
}

/// The feed of one process (see the module docs).
pub struct FeedHub {
    tx: broadcast::Sender<Arc<RawEvent>>,
    /// The highest stored serial published (everything up to it is committed).
    last: Mutex<u64>,
}

impl std::fmt::Debug for FeedHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedHub")
            .field("last", &*self.last.lock())
            .field("consumers", &self.tx.receiver_count())
            .finish()
    }
}

impl FeedHub {
    /// A hub whose stored events continue after `last` (the store's latest serial now).
    pub fn new(last: u64) -> Arc<Self> {
        Arc::new(Self {
            tx: broadcast::channel(RING).0,
            last: Mutex::new(last),
        })
    }

    /// The highest stored serial published.
    pub fn last(&self) -> u64 {
        *self.last.lock()
    }

    /// Publishes committed events, ascending by serial; serials already published are skipped
    /// (the same commit can be seen by the writer and by a notification).
    pub fn publish_stored(&self, events: impl IntoIterator<Item = RawEvent>) {
        let mut last = self.last.lock();
        for e in events {
            if e.serial == 0 || e.serial <= *last {
                continue;
            }
            *last = e.serial;
            metrics::counter!("orly_feed_events_total", "kind" => "stored").increment(1);
            // No consumer is fine: the events are in the store.
            let _ = self.tx.send(Arc::new(e));
        }
    }

    /// Moves the last serial to `serial` without publishing: the serials in between hold no
    /// event (a rolled-back transaction used them, or their events are gone already).
    pub fn advance(&self, serial: u64) {
        let mut last = self.last.lock();
        *last = (*last).max(serial);
    }

    /// Publishes an ephemeral event (live only).
    pub fn publish_ephemeral(&self, mut event: RawEvent) {
        event.serial = 0;
        metrics::counter!("orly_feed_events_total", "kind" => "ephemeral").increment(1);
        let _ = self.tx.send(Arc::new(event));
    }

    /// The stored events after serial `after` (from `source`), then everything live.
    pub fn watch(self: &Arc<Self>, after: u64, source: Arc<dyn SerialSource>) -> Feed {
        let (out, rx) = mpsc::channel(CONSUMER_BUFFER);
        // Subscribe before reading the store, so nothing falls between the two.
        let live = self.tx.subscribe();
        tokio::spawn(run_consumer(self.clone(), live, after, source, out));
        Box::pin(ReceiverStream::new(rx))
    }
}

async fn run_consumer(
    hub: Arc<FeedHub>,
    mut live: broadcast::Receiver<Arc<RawEvent>>,
    after: u64,
    source: Arc<dyn SerialSource>,
    out: mpsc::Sender<Arc<RawEvent>>,
) {
    let mut next = after.saturating_add(1);
    if !catch_up(&*source, &mut next, hub.last(), &out).await {
        return;
    }
    loop {
        match live.recv().await {
            Ok(e) if e.serial == 0 => {
                if out.send(e).await.is_err() {
                    return;
                }
            }
            Ok(e) if e.serial < next => {}
            Ok(e) => {
                if e.serial > next && !catch_up(&*source, &mut next, e.serial - 1, &out).await {
                    return;
                }
                next = e.serial + 1;
                if out.send(e).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                metrics::counter!("orly_feed_lagged_total").increment(1);
                tracing::debug!(missed = n, "feed consumer fell behind; reading the store");
                if !catch_up(&*source, &mut next, hub.last(), &out).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends the stored events `next..=to` from the store, retrying while it is unreachable.
/// False when the consumer is gone.
async fn catch_up(
    source: &dyn SerialSource,
    next: &mut u64,
    to: u64,
    out: &mpsc::Sender<Arc<RawEvent>>,
) -> bool {
    let mut backoff = Duration::from_millis(50);
    while *next <= to {
        match source
            .events_by_serial_range(*next, to, CATCH_UP_PAGE)
            .await
        {
            Ok(page) => {
                backoff = Duration::from_millis(50);
                let full = page.len() as u32 >= CATCH_UP_PAGE;
                for e in page {
                    if e.serial < *next {
                        continue;
                    }
                    *next = e.serial + 1;
                    if out.send(Arc::new(e)).await.is_err() {
                        return false;
                    }
                }
                if !full {
                    // The rest of the range holds no (live) events: deleted, or never used.
                    *next = to + 1;
                }
            }
            Err(e) => {
                if out.is_closed() {
                    return false;
                }
                tracing::warn!(error = %e, from = *next, to, "feed catch-up failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    !out.is_closed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A store of serials 1..=n (with holes) for catch-up reads.
    struct Fake(Mutex<Vec<RawEvent>>);

    #[async_trait]
    impl SerialSource for Fake {
        async fn events_by_serial_range(
            &self,
            from: u64,
            to: u64,
            limit: u32,
        ) -> Result<Vec<RawEvent>> {
            Ok(self
                .0
                .lock()
                .iter()
                .filter(|e| e.serial >= from && e.serial <= to)
                .take(limit as usize)
                .cloned()
                .collect())
        }
    }

    fn ev(serial: u64) -> RawEvent {
        RawEvent {
            serial,
            id: [serial as u8; 32],
            pubkey: [0; 32],
            created_at: serial,
            kind: 1,
            json: Arc::from(format!("{{\"serial\":{serial}}}")),
        }
    }

    async fn take(feed: &mut Feed, n: usize) -> Vec<u64> {
        let mut v = Vec::new();
        for _ in 0..n {
            let e = tokio::time::timeout(Duration::from_secs(5), feed.next())
                .await
                .expect("feed item")
                .expect("feed open");
            v.push(e.serial);
        }
        v
    }

    #[tokio::test]
    async fn a_consumer_gets_history_then_live_items_once_and_in_order() {
        let store = Arc::new(Fake(Mutex::new((1..=5).map(ev).collect())));
        let hub = FeedHub::new(5);
        let mut feed = hub.watch(2, store.clone());
        assert_eq!(take(&mut feed, 3).await, vec![3, 4, 5]);
        // 6 and 7 are committed; the hub publishes them (and 5 again, which is skipped).
        store.0.lock().extend([ev(6), ev(7)]);
        hub.publish_stored([ev(5), ev(6), ev(7)]);
        hub.publish_ephemeral(ev(99));
        assert_eq!(take(&mut feed, 3).await, vec![6, 7, 0]);
        // A gap (9 published before 8 reached the hub) is filled from the store.
        store.0.lock().extend([ev(8), ev(9)]);
        hub.publish_stored([ev(9)]);
        hub.publish_stored([ev(8)]);
        assert_eq!(take(&mut feed, 2).await, vec![8, 9]);
        assert_eq!(hub.last(), 9);
    }

    #[tokio::test]
    async fn a_consumer_that_falls_behind_the_ring_reads_the_store() {
        let store = Arc::new(Fake(Mutex::new(Vec::new())));
        let hub = FeedHub::new(0);
        let mut feed = hub.watch(0, store.clone());
        let n = (RING as u64) * 3;
        for s in 1..=n {
            store.0.lock().push(ev(s));
            hub.publish_stored([ev(s)]);
        }
        let got = take(&mut feed, n as usize).await;
        assert_eq!(got, (1..=n).collect::<Vec<_>>());
    }
}
