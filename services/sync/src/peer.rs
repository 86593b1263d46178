//! The peer-sync engine both pull protocols share: per-peer state ([`PeerStatus`], kept in
//! the shared [`PeerBook`]: `<ns>:peer:<url>` is the last serial as 8 bytes big-endian, ORLY's
//! layout), and [`catch_up`], which pages through a peer's serials, fetches the events we lack,
//! checks them and stores them in the peer's serial order, advancing the peer's last serial
//! only after a page is stored and only while this replica holds the peer's lease — so a sync
//! cut off anywhere resumes without gaps, a deposed replica cannot move a serial backwards, and
//! duplicates are dropped by id.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use nostr::{Event, EventId, Timestamp};
use orly_db::{SaveOutcome, SharedStore, StoreError};
pub use orly_peering::{FencedPeer, PeerBook};
use serde::{Deserialize, Serialize};

use crate::error::SyncError;

/// Status values (ORLY's).
pub const STATUS_UNKNOWN: &str = "unknown";
pub const STATUS_ACTIVE: &str = "active";
pub const STATUS_ERROR: &str = "error";
/// The peer is this relay itself (same NIP-11 pubkey); it is never polled.
pub const STATUS_SELF: &str = "self";

/// Ids asked for in one fetch request.
pub const FETCH_CHUNK: usize = 500;
/// Most ids a fetch request may name (the serving side refuses more).
pub const MAX_FETCH_IDS: usize = 1000;

/// What we know about pulling from one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerStatus {
    pub url: String,
    /// The peer's last serial we have fully stored.
    pub last_serial: u64,
    /// unknown | active | error | self
    pub status: String,
    /// Unix seconds of the last successful poll.
    pub last_poll: i64,
    /// Failed polls in a row.
    pub error_count: i32,
    pub last_error: String,
    /// Events stored from this peer, all time.
    pub events_stored: u64,
    /// Events this peer sent us, all time (more than stored: some arrived by another path
    /// meanwhile; ids we already had are never fetched).
    pub events_fetched: u64,
    /// Replica that polled last.
    pub holder: String,
}

/// The state of `url` in `book`, with the last serial from its marker (an unreadable state
/// reads as a fresh one: it is rewritten at the next poll).
pub async fn read_status(book: &PeerBook, url: &str) -> Result<PeerStatus, SyncError> {
    let mut status: PeerStatus = match book.state(url).await {
        Ok(s) => s.unwrap_or_default(),
        Err(StoreError::Corrupt(why)) => {
            tracing::warn!(peer = %url, %why, "unreadable peer state; starting afresh");
            PeerStatus::default()
        }
        Err(e) => return Err(e.into()),
    };
    status.url = url.to_string();
    if status.status.is_empty() {
        status.status = STATUS_UNKNOWN.into();
    }
    status.last_serial = book.last_serial(url).await?.unwrap_or(0);
    Ok(status)
}

/// One entry of a peer's serial listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub serial: u64,
    pub id: EventId,
}

/// A page of a peer's listing: its entries, covering serials `from..=end`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub entries: Vec<Listed>,
    pub end: u64,
}

/// The three calls a pull protocol makes to a peer.
#[async_trait]
pub trait PeerSource: Send + Sync {
    /// The peer's highest serial. Protocols that can wait may hold the answer until it exceeds
    /// `after` (long poll).
    async fn latest(&self, peer: &str, after: u64) -> Result<u64, SyncError>;
    /// Entries with serial in `from..=to` (a page of them, see [`Page::end`]).
    async fn list(&self, peer: &str, from: u64, to: u64) -> Result<Page, SyncError>;
    /// The events among `ids` (listed in `from..=to`).
    async fn fetch(
        &self,
        peer: &str,
        from: u64,
        to: u64,
        ids: &[EventId],
    ) -> Result<Vec<Event>, SyncError>;
}

/// What one catch-up did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchupReport {
    pub pages: u64,
    pub listed: u64,
    pub fetched: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Privileged events left out (propagation of privileged events is off).
    pub skipped_privileged: u64,
    pub last_serial: u64,
}

/// How a catch-up treats what it receives.
#[derive(Debug, Clone, Copy)]
pub struct CatchupRules {
    /// Store privileged kinds (DMs, gift wraps, …) too.
    pub keep_privileged: bool,
    /// Largest accepted `created_at` ahead of now, in seconds.
    pub future_limit: u64,
}

impl Default for CatchupRules {
    fn default() -> Self {
        Self {
            keep_privileged: true,
            future_limit: 15 * 60,
        }
    }
}

/// Pulls the peer of `fenced` from `last + 1` up to `target`, page by page: list, ask the store
/// which ids it already has, fetch the rest, check every event (id and signature, that it was
/// asked for, its `created_at`), store the page in serial order, then record the page's end —
/// refused, ending the catch-up, once the peer's lease is no longer ours. A page with anything
/// wrong is refused whole.
pub async fn catch_up(
    store: &SharedStore,
    source: &dyn PeerSource,
    fenced: &FencedPeer,
    mut last: u64,
    target: u64,
    rules: CatchupRules,
) -> Result<CatchupReport, SyncError> {
    let peer = fenced.url();
    let mut report = CatchupReport {
        last_serial: last,
        ..CatchupReport::default()
    };
    while last < target {
        let from = last + 1;
        let page = source.list(peer, from, target).await?;
        check_page(peer, &page, from, target)?;
        report.pages += 1;
        report.listed += page.entries.len() as u64;

        let serial_of: HashMap<EventId, u64> =
            page.entries.iter().map(|l| (l.id, l.serial)).collect();
        let ids: Vec<EventId> = page.entries.iter().map(|l| l.id).collect();
        let mut have: HashSet<EventId> = HashSet::new();
        for chunk in ids.chunks(MAX_FETCH_IDS) {
            have.extend(store.fetch_by_ids(chunk).await?.into_iter().map(|e| e.id));
        }
        let missing: Vec<EventId> = ids.into_iter().filter(|id| !have.contains(id)).collect();

        let mut events: Vec<Event> = Vec::with_capacity(missing.len());
        for chunk in missing.chunks(FETCH_CHUNK) {
            let got = source.fetch(peer, from, page.end, chunk).await?;
            let wanted: HashSet<&EventId> = chunk.iter().collect();
            let mut seen = HashSet::new();
            for e in &got {
                if !wanted.contains(&e.id) || !seen.insert(e.id) {
                    return Err(SyncError::garbage(
                        peer,
                        format!("sent event {} that was not asked for", e.id),
                    ));
                }
            }
            report.fetched += got.len() as u64;
            events.extend(got);
        }
        let mut events = verify_all(peer, events, rules.future_limit).await?;
        if !rules.keep_privileged {
            let before = events.len();
            events.retain(|e| !orly_acl::privileged::is_privileged(e.kind));
            report.skipped_privileged += (before - events.len()) as u64;
        }
        events.sort_by_key(|e| serial_of.get(&e.id).copied().unwrap_or(u64::MAX));

        // Saved together so the store's group commit takes them in few transactions; the
        // store's rules (replacement, deletions with their tombstones) do not depend on the
        // order within a batch.
        let outcomes = futures::future::join_all(events.iter().map(|e| store.save_event(e))).await;
        for (event, outcome) in events.iter().zip(outcomes) {
            match outcome? {
                SaveOutcome::Stored { .. } => report.stored += 1,
                SaveOutcome::Duplicate => report.duplicates += 1,
                SaveOutcome::Rejected(why) => {
                    report.rejected += 1;
                    tracing::debug!(%peer, event_id = %event.id, %why, "synced event refused by the store");
                }
            }
        }
        fenced.set_last_serial(page.end).await?;
        last = page.end;
        report.last_serial = last;
    }
    Ok(report)
}

fn check_page(peer: &str, page: &Page, from: u64, to: u64) -> Result<(), SyncError> {
    if page.end < from || page.end > to {
        return Err(SyncError::garbage(
            peer,
            format!("page ends at {} outside {from}..={to}", page.end),
        ));
    }
    let mut prev = 0u64;
    let mut ids = HashSet::new();
    for l in &page.entries {
        if l.serial < from || l.serial > page.end || l.serial <= prev {
            return Err(SyncError::garbage(
                peer,
                format!(
                    "serial {} out of order or outside {from}..={}",
                    l.serial, page.end
                ),
            ));
        }
        if !ids.insert(l.id) {
            return Err(SyncError::garbage(
                peer,
                format!("id {} listed twice", l.id),
            ));
        }
        prev = l.serial;
    }
    Ok(())
}

/// Checks ids and signatures on the blocking pool, split over the cores; hands the events
/// back (moved in and out rather than copied for the worker threads).
async fn verify_all(
    peer: &str,
    events: Vec<Event>,
    future_limit: u64,
) -> Result<Vec<Event>, SyncError> {
    if events.is_empty() {
        return Ok(events);
    }
    let now = Timestamp::now().as_secs();
    if let Some(e) = events
        .iter()
        .find(|e| e.created_at.as_secs() > now + future_limit)
    {
        return Err(SyncError::garbage(
            peer,
            format!("event {} is dated too far in the future", e.id),
        ));
    }
    let parts = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(events.len().div_ceil(64));
    let shared: Arc<Vec<Event>> = Arc::new(events);
    let size = shared.len().div_ceil(parts);
    let mut tasks = Vec::with_capacity(parts);
    for i in 0..parts {
        let events = shared.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            events
                .iter()
                .skip(i * size)
                .take(size)
                .find(|e| e.verify().is_err())
                .map(|e| e.id)
        }));
    }
    for t in tasks {
        if let Some(bad) = t
            .await
            .map_err(|e| SyncError::peer(peer, format!("verification task: {e}")))?
        {
            return Err(SyncError::garbage(
                peer,
                format!("event {bad} has a bad id or signature"),
            ));
        }
    }
    // Every task has finished, so this is the only reference left.
    Ok(Arc::try_unwrap(shared).unwrap_or_else(|shared| shared.as_ref().clone()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nostr::{EventBuilder, Keys};
    use orly_peering::Acquired;

    use super::*;

    /// A peer with `events` at serials 1, 2, …, listed `page` serials at a time; before it
    /// answers the listing starting at `stall_at`, it runs `stall`.
    struct Scripted {
        events: Vec<Event>,
        page: u64,
        stall_at: u64,
        stall: tokio::sync::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    }

    #[async_trait]
    impl PeerSource for Scripted {
        async fn latest(&self, _: &str, _: u64) -> Result<u64, SyncError> {
            Ok(self.events.len() as u64)
        }

        async fn list(&self, _: &str, from: u64, to: u64) -> Result<Page, SyncError> {
            if from == self.stall_at {
                if let Some(stall) = self.stall.lock().await.take() {
                    stall.await;
                }
            }
            let end = to.min(from + self.page - 1);
            let entries = (from..=end)
                .map(|s| Listed {
                    serial: s,
                    id: self.events[s as usize - 1].id,
                })
                .collect();
            Ok(Page { entries, end })
        }

        async fn fetch(
            &self,
            _: &str,
            _: u64,
            _: u64,
            ids: &[EventId],
        ) -> Result<Vec<Event>, SyncError> {
            Ok(self
                .events
                .iter()
                .filter(|e| ids.contains(&e.id))
                .cloned()
                .collect())
        }
    }

    /// A replica deposed in the middle of a catch-up (its lease lapsed while a page was in
    /// flight, and another replica took the peer and moved on) records nothing more: the
    /// serial the new holder wrote stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_replica_cannot_move_a_peer_serial_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(
            orly_db::sqlite::SqliteStore::open(&dir.path().join("t.db"))
                .await
                .unwrap(),
        );
        let keys = Keys::generate();
        let now = Timestamp::now().as_secs();
        let events: Vec<Event> = (0..6)
            .map(|i| {
                EventBuilder::text_note(format!("n{i}"))
                    .custom_created_at(Timestamp::from(now - 100 + i))
                    .sign_with_keys(&keys)
                    .unwrap()
            })
            .collect();
        let book = PeerBook::new(store.clone(), "distributed");
        let peer = "http://peer.example";
        let ttl = Duration::from_millis(300);
        let Acquired::Held(lease_a) = book.acquire(peer, "replica-a", ttl).await.unwrap() else {
            panic!("free lease")
        };
        // While A waits for its second page, its lease lapses and B takes the peer to 1000.
        let stall = {
            let book = book.clone();
            Box::pin(async move {
                let lease_b = loop {
                    match book.acquire(peer, "replica-b", ttl).await.unwrap() {
                        Acquired::Held(l) => break l,
                        Acquired::Busy { .. } => tokio::time::sleep(ttl / 10).await,
                    }
                };
                book.fenced(peer, lease_b)
                    .set_last_serial(1000)
                    .await
                    .unwrap();
            }) as futures::future::BoxFuture<'static, ()>
        };
        let source = Scripted {
            events,
            page: 3,
            stall_at: 4,
            stall: tokio::sync::Mutex::new(Some(stall)),
        };
        // Not under `hold`, so nothing renews A's lease while the page stalls.
        let fenced = book.fenced(peer, lease_a);
        let err = catch_up(&store, &source, &fenced, 0, 6, CatchupRules::default())
            .await
            .unwrap_err();
        assert!(matches!(err, SyncError::LeaseLost(_)), "{err}");
        assert_eq!(book.last_serial(peer).await.unwrap(), Some(1000));
        // The events were stored (a duplicate later is harmless); only the bookkeeping is
        // fenced.
        assert_eq!(store.latest_serial().await.unwrap(), 6);
    }
}
