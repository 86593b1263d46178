//! Storage rules shared by the SQL backends: kind classes, deletion targets (NIP-09),
//! expiration (NIP-40), tag extraction for indexing, filter normalisation, result ordering,
//! and the group-commit writer loop.
//!
//! Decisions documented here apply to both backends:
//! * A filter without `limit` returns at most [`MAX_UNLIMITED_RESULTS`] events (the newest).
//! * A filter with `search` (NIP-50) matches nothing: NIP-50 is not supported (and must not
//!   be listed in NIP-11).
//! * As in `nostr::Filter::match_event`, an empty `ids`, `authors` or `kinds` list is no
//!   constraint, while a `#x` tag filter with no values matches nothing.
//! * Only single-letter tags are indexed (their first value), and only values of at most
//!   [`MAX_INDEXED_TAG_VALUE`] bytes without NUL characters; a `#x` filter value outside those
//!   bounds cannot match.
//! * Expired events (NIP-40, `expiration <= now`) are never returned by any read API.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use nostr::{Event, EventId, Filter, PublicKey};
use tokio::sync::{mpsc, oneshot};

use crate::feed::FeedHub;
use crate::{RawEvent, Result, SaveOutcome, StoreError};

/// Results returned for one filter that has no `limit`.
pub const MAX_UNLIMITED_RESULTS: u64 = 10_000;
/// Longest single-letter tag value (bytes) that is indexed, and longest accepted `d` tag.
pub const MAX_INDEXED_TAG_VALUE: usize = 1024;
/// Largest number of save requests committed in one transaction. Under a saturating ingest
/// every batch writes each index page it touched to the WAL once, so the cost per event falls
/// as the batch grows (SQLite alone, 100,000 events: 68 µs per event at 512, 50 µs at 2,048,
/// 43 µs at 4,096; 20.5 KiB written per event at 1,200, 10.6 at 4,096). The relay lets a
/// publisher have 512 KiB of EVENTs in flight, so a few pipelining publishers fill batches of
/// this size; below saturation a batch is only what queued during the previous commit.
pub const MAX_WRITE_BATCH: usize = 4096;

pub const MSG_EPHEMERAL: &str = "invalid: ephemeral events are not stored";
pub const MSG_EXPIRED: &str = "invalid: event has expired";
pub const MSG_DELETED: &str = "blocked: this event was deleted by its author";
pub const MSG_NEWER: &str = "duplicate: a newer version of this event is stored";
pub const MSG_D_TOO_LONG: &str = "invalid: d tag is too long or contains NUL";

/// How a kind is stored (NIP-01).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindClass {
    Regular,
    /// 0, 3, 10000-19999: one event per (kind, pubkey).
    Replaceable,
    /// 20000-29999: never stored.
    Ephemeral,
    /// 30000-39999: one event per (kind, pubkey, d tag).
    Addressable,
}

pub fn kind_class(kind: u16) -> KindClass {
    match kind {
        0 | 3 | 10_000..=19_999 => KindClass::Replaceable,
        20_000..=29_999 => KindClass::Ephemeral,
        30_000..=39_999 => KindClass::Addressable,
        _ => KindClass::Regular,
    }
}

/// Unix seconds as stored (SQL integers are signed).
pub fn now_secs() -> i64 {
    orly_common::time::now_secs_i64()
}

/// Seconds as stored (SQL integers are signed).
pub fn ts_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

pub fn event_kind(event: &Event) -> u16 {
    event.kind.as_u16()
}

/// The first value of the first `d` tag ("" when absent).
pub fn d_tag(event: &Event) -> &str {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .find(|s| s.first().map(String::as_str) == Some("d"))
        .and_then(|s| s.get(1))
        .map(String::as_str)
        .unwrap_or("")
}

/// The replacement key's `d` column: `Some("")` for replaceable kinds, `Some(d)` for
/// addressable kinds, `None` otherwise.
pub fn replace_key(event: &Event) -> Option<&str> {
    match kind_class(event_kind(event)) {
        KindClass::Replaceable => Some(""),
        KindClass::Addressable => Some(d_tag(event)),
        _ => None,
    }
}

/// NIP-40: the first `expiration` tag's value, when it parses as unix seconds.
pub fn expiration(event: &Event) -> Option<i64> {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .find(|s| s.first().map(String::as_str) == Some("expiration"))
        .and_then(|s| s.get(1))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(ts_i64)
}

pub fn indexable_value(v: &str) -> bool {
    v.len() <= MAX_INDEXED_TAG_VALUE && !v.contains('\0')
}

/// The `(name, value)` pairs indexed for `#x` filters: every tag whose name is one ASCII
/// letter, with its first value; deduplicated. Borrowed: the SQLite writer only writes them
/// into its batch.
pub fn index_tags(event: &Event) -> Vec<(&str, &str)> {
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut out = Vec::new();
    for tag in event.tags.iter() {
        let s = tag.as_slice();
        let (Some(name), Some(value)) = (s.first(), s.get(1)) else {
            continue;
        };
        if name.len() != 1 || !name.as_bytes()[0].is_ascii_alphabetic() {
            continue;
        }
        if !indexable_value(value) {
            continue;
        }
        if seen.insert((name.as_str(), value.as_str())) {
            out.push((name.as_str(), value.as_str()));
        }
    }
    out
}

/// An `a` deletion target: `kind:pubkey:d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrTarget {
    pub kind: u16,
    pub pubkey: PublicKey,
    /// "" for replaceable kinds.
    pub d: String,
}

/// The targets of a kind-5 deletion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletionTargets {
    pub ids: Vec<EventId>,
    pub addrs: Vec<AddrTarget>,
}

/// Parses the `e` and `a` tags of a kind-5 event. Malformed targets are ignored, and so are `a`
/// targets of kinds that are neither replaceable nor addressable and `a` targets of other
/// authors (NIP-09: a deletion only ever removes its author's events; the rest of it stands).
/// `e` targets are kept whoever wrote them: only the author's own are deleted (and tombstoned
/// for that author), so naming someone else's event does nothing.
pub fn deletion_targets(event: &Event) -> DeletionTargets {
    let mut out = DeletionTargets::default();
    for tag in event.tags.iter() {
        let s = tag.as_slice();
        match (s.first().map(String::as_str), s.get(1)) {
            (Some("e"), Some(v)) => {
                if let Ok(id) = EventId::from_hex(v.trim()) {
                    if !out.ids.contains(&id) {
                        out.ids.push(id);
                    }
                }
            }
            (Some("a"), Some(v)) => {
                let mut parts = v.splitn(3, ':');
                let (Some(k), Some(pk)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let d = parts.next().unwrap_or("");
                let (Ok(kind), Ok(pubkey)) = (k.parse::<u16>(), PublicKey::from_hex(pk)) else {
                    continue;
                };
                if pubkey != event.pubkey {
                    continue;
                }
                let d = match kind_class(kind) {
                    KindClass::Replaceable => String::new(),
                    KindClass::Addressable => d.to_string(),
                    _ => continue,
                };
                let t = AddrTarget { kind, pubkey, d };
                if !out.addrs.contains(&t) {
                    out.addrs.push(t);
                }
            }
            _ => {}
        }
    }
    out
}

/// A filter reduced to what the SQL backends need.
#[derive(Debug, Clone, Default)]
pub struct NormFilter {
    pub ids: Vec<[u8; 32]>,
    pub authors: Vec<[u8; 32]>,
    pub kinds: Vec<i64>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// AND'd tag constraints, each matching any of its values.
    pub tags: Vec<(String, Vec<String>)>,
    /// Effective limit (`None`: no limit, used by count).
    pub limit: Option<u64>,
}

/// Why a filter may use a limit or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// `query`: the filter's limit, or [`MAX_UNLIMITED_RESULTS`].
    Query,
    /// `negentropy_items`: the filter's limit if present, else everything.
    IfPresent,
    /// `count`: limits are ignored.
    Ignore,
}

/// Normalises a filter; `None` when it can match nothing.
pub fn normalize(filter: &Filter, mode: LimitMode) -> Option<NormFilter> {
    if filter.search.is_some() {
        return None;
    }
    let limit = match mode {
        LimitMode::Query => Some(filter.limit.map_or(MAX_UNLIMITED_RESULTS, |l| l as u64)),
        LimitMode::IfPresent => filter.limit.map(|l| l as u64),
        LimitMode::Ignore => None,
    };
    if limit == Some(0) {
        return None;
    }
    let since = filter.since.map(|t| ts_i64(t.as_secs()));
    let until = filter.until.map(|t| ts_i64(t.as_secs()));
    if let (Some(s), Some(u)) = (since, until) {
        if s > u {
            return None;
        }
    }
    let mut tags = Vec::new();
    for (name, values) in filter.generic_tags.iter() {
        let vals: Vec<String> = values
            .iter()
            .filter(|v| indexable_value(v))
            .cloned()
            .collect();
        if vals.is_empty() {
            return None;
        }
        tags.push((name.as_char().to_string(), vals));
    }
    Some(NormFilter {
        ids: filter
            .ids
            .as_ref()
            .map(|s| s.iter().map(|i| i.to_bytes()).collect())
            .unwrap_or_default(),
        authors: filter
            .authors
            .as_ref()
            .map(|s| s.iter().map(|p| p.to_bytes()).collect())
            .unwrap_or_default(),
        kinds: filter
            .kinds
            .as_ref()
            .map(|s| s.iter().map(|k| i64::from(k.as_u16())).collect())
            .unwrap_or_default(),
        since,
        until,
        tags,
        limit,
    })
}

pub fn clamp_limit(limit: u64) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The routing fields of event JSON (serde skips the rest).
#[derive(Debug, serde::Deserialize)]
pub struct EventHead {
    pub id: EventId,
    pub pubkey: PublicKey,
    pub created_at: u64,
    pub kind: u16,
}

pub fn parse_event(json: &str) -> Result<Event> {
    use nostr::JsonUtil;
    Event::from_json(json).map_err(|e| StoreError::Corrupt(format!("stored event JSON: {e}")))
}

pub fn event_id(bytes: &[u8]) -> Result<EventId> {
    EventId::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("stored event id: {e}")))
}

pub fn public_key(bytes: &[u8]) -> Result<PublicKey> {
    PublicKey::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("stored pubkey: {e}")))
}

pub fn u64_of(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}: {v}")))
}

pub fn kind_of(v: i64) -> Result<u16> {
    u16::try_from(v).map_err(|_| StoreError::Corrupt(format!("stored kind out of range: {v}")))
}

/// Validates a stored identity secret.
pub fn identity_secret(bytes: &[u8]) -> Result<[u8; 32]> {
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("relay identity secret is not 32 bytes".into()))?;
    nostr::SecretKey::from_slice(&arr)
        .map_err(|e| StoreError::Corrupt(format!("relay identity secret: {e}")))?;
    Ok(arr)
}

pub fn new_identity_secret() -> [u8; 32] {
    nostr::Keys::generate().secret_key().to_secret_bytes()
}

/// Checks that can be made on an event alone, before touching the database.
pub fn precheck(event: &Event, now: i64) -> Option<SaveOutcome> {
    if kind_class(event_kind(event)) == KindClass::Ephemeral {
        return Some(SaveOutcome::Rejected(MSG_EPHEMERAL.into()));
    }
    if let Some(exp) = expiration(event) {
        if exp <= now {
            return Some(SaveOutcome::Rejected(MSG_EXPIRED.into()));
        }
    }
    if let Some(d) = replace_key(event) {
        if !indexable_value(d) {
            return Some(SaveOutcome::Rejected(MSG_D_TOO_LONG.into()));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Group commit
// ---------------------------------------------------------------------------------------

/// An event waiting to be saved, with the JSON it is kept as.
#[derive(Debug, Clone)]
pub struct Pending {
    pub event: Event,
    pub json: String,
}

/// A backend's batch saver: saves several events in one transaction.
#[async_trait]
pub trait BatchSaver: Send + 'static {
    /// Saves `events` in one transaction, in order (later events see earlier ones). On `Ok`,
    /// the transaction is committed and holds one outcome per event. On `Err`, nothing of
    /// the batch is kept.
    async fn save_batch(&mut self, events: &[Pending]) -> Result<Vec<SaveOutcome>>;
}

pub struct SaveRequest {
    pub pending: Pending,
    pub reply: oneshot::Sender<Result<SaveOutcome>>,
}

/// Spawns the single writer task; returns the channel that feeds it. Every committed event
/// enters `hub` (the feed) before its save is answered.
pub fn spawn_writer<S: BatchSaver>(saver: S, hub: Arc<FeedHub>) -> mpsc::Sender<SaveRequest> {
    let (tx, rx) = mpsc::channel(MAX_WRITE_BATCH);
    tokio::spawn(run_writer(saver, rx, hub));
    tx
}

/// [`spawn_writer`] on a thread of its own (with a single-threaded runtime) instead of the
/// caller's runtime, for a saver whose database work runs on threads of its own (SQLite's).
/// On the shared runtime, every wake-up of the writer between its statements waited behind
/// the queue of EVENTs being verified (up to ~100 ms per statement under a saturating
/// ingest, the SQLite thread idle meanwhile); here it is answered at once.
pub fn spawn_writer_thread<S: BatchSaver>(
    saver: S,
    hub: Arc<FeedHub>,
) -> Result<mpsc::Sender<SaveRequest>> {
    let (tx, rx) = mpsc::channel(MAX_WRITE_BATCH);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Unavailable(format!("starting the store writer: {e}")))?;
    std::thread::Builder::new()
        .name("orly-db-writer".into())
        .spawn(move || runtime.block_on(run_writer(saver, rx, hub)))
        .map_err(|e| StoreError::Unavailable(format!("starting the store writer: {e}")))?;
    Ok(tx)
}

/// Puts the stored events of a committed batch on the feed, in serial order.
fn publish(hub: &FeedHub, batch: &[Pending], outcomes: &[SaveOutcome]) {
    let mut stored: Vec<RawEvent> = batch
        .iter()
        .zip(outcomes)
        .filter_map(|(p, o)| match o {
            SaveOutcome::Stored { serial } => {
                Some(RawEvent::new(*serial, &p.event, p.json.as_str()))
            }
            _ => None,
        })
        .collect();
    stored.sort_by_key(|e| e.serial);
    hub.publish_stored(stored);
}

async fn run_writer<S: BatchSaver>(
    mut saver: S,
    mut rx: mpsc::Receiver<SaveRequest>,
    hub: Arc<FeedHub>,
) {
    let mut batch: Vec<SaveRequest> = Vec::with_capacity(MAX_WRITE_BATCH);
    // Batch sizes, for returning memory after a burst.
    let bursts = orly_common::memory::Bursts::new(orly_common::memory::BURST_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_WRITE_BATCH).await == 0 {
            return; // every sender is gone
        }
        let (events, replies): (Vec<Pending>, Vec<_>) =
            batch.drain(..).map(|r| (r.pending, r.reply)).unzip();
        match saver.save_batch(&events).await {
            Ok(outcomes) if outcomes.len() == replies.len() => {
                publish(&hub, &events, &outcomes);
                bursts.observe(outcomes.len());
                for (reply, out) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(out));
                }
                if rx.is_empty() {
                    // Caught up: after a burst, what its batches allocated goes back to the OS.
                    bursts.settled();
                }
            }
            Ok(_) => {
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Corrupt(
                        "writer returned a wrong number of outcomes".into(),
                    )));
                }
            }
            Err(err) if replies.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(err));
                }
            }
            Err(err) => {
                // One bad event must not fail the others: retry each alone.
                tracing::warn!(error = %err, size = replies.len(), "batch save failed; retrying one by one");
                for (reply, ev) in replies.into_iter().zip(events) {
                    let res = match saver.save_batch(std::slice::from_ref(&ev)).await {
                        Ok(outcomes) if outcomes.len() == 1 => {
                            publish(&hub, std::slice::from_ref(&ev), &outcomes);
                            Ok(outcomes[0].clone())
                        }
                        Ok(_) => Err(StoreError::Corrupt("no outcome".into())),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(res);
                }
            }
        }
    }
}

/// Sends one event to the writer and waits for its outcome.
pub async fn save_via(
    tx: &mpsc::Sender<SaveRequest>,
    event: &Event,
    json: &str,
) -> Result<SaveOutcome> {
    let (reply, rx) = oneshot::channel();
    tx.send(SaveRequest {
        pending: Pending {
            event: event.clone(),
            json: json.to_string(),
        },
        reply,
    })
    .await
    .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?;
    rx.await
        .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
}

/// The outcome of a lease upsert at database time `now`: `won` is the row the conditional
/// upsert wrote (the caller holds the lease), else `current` is the lease as another holder
/// keeps it.
pub fn lease_state(
    holder: &str,
    now: i64,
    won: Option<(String, i64)>,
    current: Option<(String, i64)>,
) -> crate::LeaseState {
    let state = |acquired: bool, holder: String, expires_at_ms: i64| crate::LeaseState {
        acquired,
        holder,
        expires_at_ms,
        remaining_ms: expires_at_ms.saturating_sub(now).max(0),
    };
    match (won, current) {
        (Some((holder, expires)), _) => state(true, holder, expires),
        (None, Some((current, expires))) => {
            state(current == holder && expires > now, current, expires)
        }
        (None, None) => state(false, String::new(), now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(kind_class(0), KindClass::Replaceable);
        assert_eq!(kind_class(1), KindClass::Regular);
        assert_eq!(kind_class(3), KindClass::Replaceable);
        assert_eq!(kind_class(5), KindClass::Regular);
        assert_eq!(kind_class(10_002), KindClass::Replaceable);
        assert_eq!(kind_class(20_001), KindClass::Ephemeral);
        assert_eq!(kind_class(30_023), KindClass::Addressable);
        assert_eq!(kind_class(40_000), KindClass::Regular);
    }
}
