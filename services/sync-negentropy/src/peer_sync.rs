//! Relay-to-relay sync with one peer, as the negentropy initiator over the peer's NIP-77
//! WebSocket endpoint, one time window after the other ([`crate::windows`]): per window
//! NEG-OPEN / NEG-MSG until our side has all have/need ids, NEG-CLOSE, then `REQ {"ids": …}` in
//! batches for what we lack (each event verified — id and signature — and checked to be one we
//! asked for before it reaches the store), and `EVENT` for what the peer lacks, counting its
//! OKs. A window over the cap on our side is cut where our data is, one the peer refuses with
//! `blocked:` is halved, and the plan is handed to a [`PlanSink`] after every window so that a
//! pass cut off anywhere resumes where it stopped.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use negentropy::{Id, Negentropy};
use nostr::{
    ClientMessage, Event, EventId, Filter, JsonUtil, RelayMessage, SubscriptionId, Timestamp,
};
use orly_db::{SaveOutcome, SharedStore};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::SyncSettings;
use crate::set::{build_storage, LoadError};
use crate::windows::{cut_for_our_side, cut_in_half, Cut, WindowPlan};

/// What one sync does.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The events reconciled.
    pub filter: Filter,
    /// Largest negentropy message we send (0 or at least 4096).
    pub frame_size: u64,
    /// Most events reconciled at once, in one window (0: no cap, one window).
    pub max_records: usize,
    /// Ids per REQ and events per upload batch.
    pub batch_size: usize,
    /// Longest wait for any one answer from the peer.
    pub timeout: Duration,
    /// Windows reaching into this recent past are reconciled every pass.
    pub recent: Duration,
    /// Older windows are re-checked once they were last reconciled this long ago.
    pub recheck: Duration,
    /// Reconcile every window, due or not.
    pub all_windows: bool,
}

impl SyncOptions {
    pub fn from_settings(s: &SyncSettings) -> Self {
        Self {
            filter: s.filter.clone(),
            frame_size: s.frame_size,
            max_records: s.max_records,
            batch_size: s.batch_size,
            timeout: s.peer_timeout,
            recent: s.window_recent,
            recheck: s.window_recheck,
            all_windows: false,
        }
    }
}

/// Where a pass puts the plan after each window (the manager: the peer's marker, fenced by
/// its lease).
#[async_trait]
pub trait PlanSink: Send {
    async fn save(&mut self, plan: &WindowPlan) -> Result<(), SyncError>;
}

/// A sink that keeps nothing (a one-off sync with its own filter).
pub struct Discard;

#[async_trait]
impl PlanSink for Discard {
    async fn save(&mut self, _: &WindowPlan) -> Result<(), SyncError> {
        Ok(())
    }
}

/// Counters of one sync, also passed to the progress callback as they change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Negentropy messages received from the peer.
    pub rounds: u32,
    /// Ids we have and the peer lacks.
    pub have_count: u64,
    /// Ids the peer has and we lack.
    pub need_count: u64,
    /// Downloaded events newly stored.
    pub fetched: u64,
    /// Downloaded events we already had (stored meanwhile) or the store replaced/refused.
    pub duplicates: u64,
    pub rejected: u64,
    /// Received events that failed verification or were not asked for (dropped).
    pub invalid: u64,
    /// Needed ids the peer did not send.
    pub missing: u64,
    /// Uploaded events the peer accepted (or already had).
    pub sent: u64,
    /// Uploaded events the peer refused.
    pub send_failed: u64,
    /// Negentropy bytes (binary, before hex) each way.
    pub reconcile_bytes_sent: u64,
    pub reconcile_bytes_received: u64,
    /// WebSocket text bytes each way.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Wall time of the reconciliation alone and of the whole sync.
    pub reconcile_time: Duration,
    pub total_time: Duration,
    /// Windows in the plan after the pass, reconciled this pass, cut this pass (each cut
    /// makes one more), and left failed (they could not be cut small enough).
    pub windows: u32,
    pub windows_reconciled: u32,
    pub windows_split: u32,
    pub windows_failed: u32,
    /// Why the last failed window failed.
    pub window_error: String,
    /// True once the sync finished.
    pub complete: bool,
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("the filter matches more than {0} events")]
    TooMany(usize),
    #[error("storage: {0}")]
    Store(#[from] orly_db::StoreError),
    #[error("negentropy: {0}")]
    Negentropy(String),
    #[error("{0}")]
    Busy(String),
    /// Our lease on the peer lapsed or was taken: the sync stopped, its writes were refused.
    #[error(transparent)]
    LeaseLost(#[from] orly_peering::LeaseLost),
}

impl From<orly_peering::PeerError> for SyncError {
    fn from(e: orly_peering::PeerError) -> Self {
        match e {
            orly_peering::PeerError::Store(e) => Self::Store(e),
            orly_peering::PeerError::Lost(l) => Self::LeaseLost(l),
        }
    }
}

impl From<LoadError> for SyncError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::TooMany(n) => Self::TooMany(n),
            LoadError::Store(e) => Self::Store(e),
        }
    }
}

fn neg_err(e: negentropy::Error) -> SyncError {
    SyncError::Negentropy(e.to_string())
}

/// A WebSocket to a peer that counts bytes and applies the answer timeout.
struct PeerSocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    timeout: Duration,
    bytes_sent: u64,
    bytes_received: u64,
}

impl PeerSocket {
    async fn connect(url: &str, timeout: Duration) -> Result<Self, SyncError> {
        let connect = tokio_tungstenite::connect_async(url);
        let (ws, _) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| SyncError::Connect {
                url: url.into(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| SyncError::Connect {
                url: url.into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            ws,
            timeout,
            bytes_sent: 0,
            bytes_received: 0,
        })
    }

    /// Queues a message (sent at the next [`flush`](Self::flush) or [`send`](Self::send)).
    async fn feed(&mut self, msg: &ClientMessage<'_>) -> Result<(), SyncError> {
        let text = msg.as_json();
        self.bytes_sent += text.len() as u64;
        tokio::time::timeout(self.timeout, self.ws.feed(Message::text(text)))
            .await
            .map_err(|_| SyncError::Timeout("the peer to accept our message".into()))?
            .map_err(|e| SyncError::Disconnected(e.to_string()))
    }

    async fn flush(&mut self) -> Result<(), SyncError> {
        tokio::time::timeout(self.timeout, self.ws.flush())
            .await
            .map_err(|_| SyncError::Timeout("the peer to accept our message".into()))?
            .map_err(|e| SyncError::Disconnected(e.to_string()))
    }

    async fn send(&mut self, msg: &ClientMessage<'_>) -> Result<(), SyncError> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// The next relay message; `what` names what we wait for, for the timeout error.
    async fn recv(&mut self, what: &str) -> Result<RelayMessage<'static>, SyncError> {
        loop {
            let next = tokio::time::timeout(self.timeout, self.ws.next())
                .await
                .map_err(|_| SyncError::Timeout(what.into()))?;
            let msg = match next {
                None => {
                    return Err(SyncError::Disconnected(
                        "the peer closed the connection".into(),
                    ))
                }
                Some(Err(e)) => return Err(SyncError::Disconnected(e.to_string())),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Text(text) => {
                    self.bytes_received += text.len() as u64;
                    match RelayMessage::from_json(text.as_str()) {
                        Ok(m) => return Ok(m),
                        Err(e) => {
                            tracing::debug!(error = %e, "ignoring an unparsable message from the peer")
                        }
                    }
                }
                Message::Close(frame) => {
                    return Err(SyncError::Disconnected(format!(
                        "the peer closed the connection ({frame:?})"
                    )))
                }
                _ => {} // pings are answered by tungstenite; binary is not nostr
            }
        }
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }
}

fn sub_id(kind: &str) -> SubscriptionId {
    SubscriptionId::new(format!("orly-neg-{kind}-{:08x}", rand::random::<u32>()))
}

/// Syncs our store with the peer at `url` both ways over every window of a fresh plan (nothing
/// kept); `progress` sees the counters after every negentropy round and every transfer batch.
pub async fn sync_with_peer(
    store: &SharedStore,
    url: &str,
    opts: &SyncOptions,
    progress: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<SyncReport, SyncError> {
    let mut plan = WindowPlan::new(&opts.filter);
    let opts = SyncOptions {
        all_windows: true,
        ..opts.clone()
    };
    sync_windows(store, url, &opts, &mut plan, &mut Discard, progress).await
}

/// One pass over the windows of `plan` that are due: each reconciled, its differences
/// transferred both ways, the plan handed to `sink` after each. With no window due no
/// connection is made.
pub async fn sync_windows(
    store: &SharedStore,
    url: &str,
    opts: &SyncOptions,
    plan: &mut WindowPlan,
    sink: &mut dyn PlanSink,
    progress: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let mut report = SyncReport::default();
    let now = orly_common::time::now_secs_i64();
    let due = plan.due(now, opts.recent, opts.recheck, opts.all_windows);
    plan.passes += 1;
    if !due.is_empty() {
        let mut ws = PeerSocket::connect(url, opts.timeout).await?;
        let result = run(store, &mut ws, opts, plan, due, sink, &mut report, progress).await;
        report.bytes_sent = ws.bytes_sent;
        report.bytes_received = ws.bytes_received;
        ws.close().await;
        result?;
    }
    // Neighbours that ended up small are merged (a quarter of the cap: room to grow).
    if opts.max_records > 0 {
        plan.merge_small(opts.max_records as u64 / 4);
    }
    sink.save(plan).await?;
    report.windows = u32::try_from(plan.windows.len()).unwrap_or(u32::MAX);
    report.total_time = started.elapsed();
    report.complete = true;
    progress(&report);
    Ok(report)
}

/// Our side of one window: its records, or the newest `cap + 1` when there are more.
enum Ours {
    Fit(Vec<(Timestamp, EventId)>),
    Over(Vec<(Timestamp, EventId)>),
}

async fn load_window(store: &SharedStore, filter: &Filter, cap: usize) -> Result<Ours, SyncError> {
    let mut f = filter.clone();
    if cap > 0 && f.limit.is_none_or(|l| l > cap) {
        f.limit = Some(cap.saturating_add(1));
    }
    let items = store.negentropy_items(std::slice::from_ref(&f)).await?;
    Ok(if cap > 0 && items.len() > cap {
        Ours::Over(items)
    } else {
        Ours::Fit(items)
    })
}

/// The records of one time window, as our side holds them.
type WindowRecords = Vec<(Timestamp, EventId)>;

#[allow(clippy::too_many_arguments)]
async fn run(
    store: &SharedStore,
    ws: &mut PeerSocket,
    opts: &SyncOptions,
    plan: &mut WindowPlan,
    due: Vec<u64>,
    sink: &mut dyn PlanSink,
    report: &mut SyncReport,
    progress: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<(), SyncError> {
    let cap = opts.max_records;
    // Windows to do, newest on top; a window cut from one on our side comes with its records.
    let mut todo: Vec<(u64, Option<WindowRecords>)> =
        due.into_iter().rev().map(|since| (since, None)).collect();
    while let Some((since, preloaded)) = todo.pop() {
        let Some(window) = plan.window(since).cloned() else {
            continue;
        };
        let filter = window.filter(&opts.filter);
        let ours = match preloaded {
            Some(items) => Ours::Fit(items),
            None => load_window(store, &filter, cap).await?,
        };
        let items = match ours {
            Ours::Fit(items) => items,
            Ours::Over(items) => {
                match cut_for_our_side(&items, cap / 2, window.since, window.until) {
                    Cut::At(at) => {
                        let (older, newer) = plan.split(since, at).ok_or_else(|| {
                            SyncError::Protocol(format!("cannot cut window {since} at {at}"))
                        })?;
                        report.windows_split += 1;
                        // The newer part's records are all loaded (they are the newest);
                        // they are reused unless they too are over the cap.
                        let upper: Vec<_> = items
                            .into_iter()
                            .filter(|(t, _)| t.as_secs() > at)
                            .collect();
                        todo.push((older, None));
                        todo.push((newer, (upper.len() <= cap).then_some(upper)));
                    }
                    Cut::Impossible => {
                        let why = format!(
                            "more than {cap} events at one second ({}); raise ORLY_SYNC_NEGENTROPY_MAX_RECORDS",
                            window.since.max(items.last().map_or(0, |i| i.0.as_secs()))
                        );
                        tracing::warn!(since, %why, "window cannot be reconciled");
                        plan.failed(since, why.clone());
                        report.windows_failed += 1;
                        report.window_error = why;
                        sink.save(plan).await?;
                    }
                }
                continue;
            }
        };
        let ours_count = items.len() as u64;
        let started = Instant::now();
        let reconciled = reconcile(ws, &filter, items, opts, report, progress).await;
        report.reconcile_time += started.elapsed();
        let (have, need) = match reconciled? {
            Reconciled::Done { have, need } => (have, need),
            Reconciled::PeerBlocked(why) => {
                let now = orly_common::time::now_secs();
                match cut_in_half(&window, now) {
                    Cut::At(at) => {
                        let (older, newer) = plan.split(since, at).ok_or_else(|| {
                            SyncError::Protocol(format!("cannot halve window {since} at {at}"))
                        })?;
                        tracing::debug!(since, at, %why, "the peer refused a window; halving it");
                        report.windows_split += 1;
                        todo.push((older, None));
                        todo.push((newer, None));
                    }
                    Cut::Impossible => {
                        let why = format!("the peer refused a one-second window: {why}");
                        tracing::warn!(since, %why, "window cannot be reconciled");
                        plan.failed(since, why.clone());
                        report.windows_failed += 1;
                        report.window_error = why;
                        sink.save(plan).await?;
                    }
                }
                continue;
            }
        };
        report.windows_reconciled += 1;
        let records = ours_count + need.len() as u64;
        download(store, ws, opts, &need, report, progress).await?;
        upload(store, ws, opts, &have, report, progress).await?;
        plan.reconciled(since, records, orly_common::time::now_secs_i64());
        sink.save(plan).await?;
    }
    Ok(())
}

/// How one window's exchange ended.
enum Reconciled {
    /// Ids we have and the peer lacks, ids it has and we lack.
    Done {
        have: Vec<EventId>,
        need: Vec<EventId>,
    },
    /// The peer refused the window (`blocked:`: more records than it reconciles at once).
    PeerBlocked(String),
}

/// The negentropy exchange over one window, whose records on our side are `items`.
async fn reconcile(
    ws: &mut PeerSocket,
    filter: &Filter,
    items: Vec<(Timestamp, EventId)>,
    opts: &SyncOptions,
    report: &mut SyncReport,
    progress: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<Reconciled, SyncError> {
    let frame_size = opts.frame_size;
    let (mut neg, initial) = tokio::task::spawn_blocking(move || {
        let storage = build_storage(&items).map_err(neg_err)?;
        drop(items);
        let mut neg = Negentropy::owned(storage, frame_size).map_err(neg_err)?;
        let initial = neg.initiate().map_err(neg_err)?;
        Ok::<_, SyncError>((neg, initial))
    })
    .await
    .map_err(|e| SyncError::Negentropy(format!("building the set failed: {e}")))??;

    let sub = sub_id("rec");
    report.reconcile_bytes_sent += initial.len() as u64;
    ws.send(&ClientMessage::NegOpen {
        subscription_id: std::borrow::Cow::Borrowed(&sub),
        filter: std::borrow::Cow::Borrowed(filter),
        id_size: None,
        initial_message: std::borrow::Cow::Owned(hex::encode(&initial)),
    })
    .await?;

    let (have_before, need_before) = (report.have_count, report.need_count);
    let mut have: Vec<Id> = Vec::new();
    let mut need: Vec<Id> = Vec::new();
    loop {
        match ws.recv("a NEG-MSG").await? {
            RelayMessage::NegMsg {
                subscription_id,
                message,
            } if *subscription_id == sub => {
                let query = hex::decode(message.as_bytes())
                    .map_err(|e| SyncError::Protocol(format!("NEG-MSG is not hex: {e}")))?;
                report.rounds += 1;
                report.reconcile_bytes_received += query.len() as u64;
                let next = neg
                    .reconcile_with_ids(&query, &mut have, &mut need)
                    .map_err(neg_err)?;
                report.have_count = have_before + have.len() as u64;
                report.need_count = need_before + need.len() as u64;
                progress(report);
                match next {
                    Some(next) => {
                        report.reconcile_bytes_sent += next.len() as u64;
                        ws.send(&ClientMessage::NegMsg {
                            subscription_id: std::borrow::Cow::Borrowed(&sub),
                            message: std::borrow::Cow::Owned(hex::encode(&next)),
                        })
                        .await?;
                    }
                    None => break,
                }
            }
            RelayMessage::NegErr {
                subscription_id,
                message,
            } if *subscription_id == sub => {
                if message.starts_with("blocked:") {
                    return Ok(Reconciled::PeerBlocked(message.into_owned()));
                }
                return Err(SyncError::Refused(format!("NEG-ERR {message}")));
            }
            RelayMessage::Closed {
                subscription_id,
                message,
            } if *subscription_id == sub => {
                return Err(SyncError::Refused(format!("CLOSED {message}")));
            }
            RelayMessage::Notice(n) => tracing::info!(notice = %n, "peer notice"),
            other => tracing::trace!(?other, "ignored during reconciliation"),
        }
    }
    ws.send(&ClientMessage::NegClose {
        subscription_id: std::borrow::Cow::Borrowed(&sub),
    })
    .await?;
    let to_event = |id: Id| EventId::from_byte_array(id.to_bytes());
    Ok(Reconciled::Done {
        have: have.into_iter().map(to_event).collect(),
        need: need.into_iter().map(to_event).collect(),
    })
}

/// REQ by ids in batches; every event is checked and verified before it is stored.
async fn download(
    store: &SharedStore,
    ws: &mut PeerSocket,
    opts: &SyncOptions,
    need: &[EventId],
    report: &mut SyncReport,
    progress: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<(), SyncError> {
    let chunks: Vec<&[EventId]> = need.chunks(opts.batch_size).collect();
    // The next batch is asked for before this one is stored, so the peer reads it meanwhile.
    let mut next_sub = match chunks.first() {
        Some(first) => Some(request_ids(ws, first).await?),
        None => None,
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let Some(sub) = next_sub.take() else { break };
        let mut wanted: HashSet<EventId> = chunk.iter().copied().collect();
        // A peer flooding us with events we did not ask for is cut off.
        let mut unasked_budget = chunk.len() + 16;
        let mut batch: Vec<Event> = Vec::with_capacity(chunk.len());
        loop {
            match ws.recv("events or EOSE").await? {
                RelayMessage::Event {
                    subscription_id,
                    event,
                } if *subscription_id == sub => {
                    let event = event.into_owned();
                    if !wanted.remove(&event.id) {
                        report.invalid += 1;
                        tracing::warn!(id = %event.id, "peer sent an event we did not ask for");
                        unasked_budget = unasked_budget.checked_sub(1).ok_or_else(|| {
                            SyncError::Protocol(
                                "the peer sent too many events we did not ask for".into(),
                            )
                        })?;
                        continue;
                    }
                    if let Err(e) = event.verify() {
                        report.invalid += 1;
                        tracing::warn!(id = %event.id, error = %e, "peer sent an invalid event");
                        continue;
                    }
                    batch.push(event);
                }
                RelayMessage::EndOfStoredEvents(s) if *s == sub => break,
                RelayMessage::Closed {
                    subscription_id,
                    message,
                } if *subscription_id == sub => {
                    tracing::warn!(%message, "peer closed our REQ");
                    break;
                }
                RelayMessage::Notice(n) => tracing::info!(notice = %n, "peer notice"),
                other => tracing::trace!(?other, "ignored during download"),
            }
        }
        ws.send(&ClientMessage::close(sub)).await?;
        if let Some(next) = chunks.get(i + 1) {
            next_sub = Some(request_ids(ws, next).await?);
        }
        // Saved together, so the store's group commit writes the batch in few transactions
        // (one at a time, every event was its own transaction: ~3x slower).
        let outcomes = futures::future::join_all(batch.iter().map(|e| store.save_event(e))).await;
        for (event, outcome) in batch.iter().zip(outcomes) {
            match outcome? {
                SaveOutcome::Stored { .. } => report.fetched += 1,
                SaveOutcome::Duplicate => report.duplicates += 1,
                SaveOutcome::Rejected(reason) => {
                    report.rejected += 1;
                    tracing::debug!(id = %event.id, %reason, "store refused a synced event");
                }
            }
        }
        report.missing += wanted.len() as u64;
        progress(report);
    }
    Ok(())
}

/// Sends `REQ {"ids": chunk}` under a fresh subscription id.
async fn request_ids(ws: &mut PeerSocket, chunk: &[EventId]) -> Result<SubscriptionId, SyncError> {
    let sub = sub_id("req");
    let filter = Filter::new().ids(chunk.iter().copied()).limit(chunk.len());
    ws.send(&ClientMessage::req(sub.clone(), vec![filter]))
        .await?;
    Ok(sub)
}

/// EVENT for each id the peer lacks, in batches, waiting for every OK of a batch.
async fn upload(
    store: &SharedStore,
    ws: &mut PeerSocket,
    opts: &SyncOptions,
    have: &[EventId],
    report: &mut SyncReport,
    progress: &mut (dyn FnMut(&SyncReport) + Send),
) -> Result<(), SyncError> {
    for chunk in have.chunks(opts.batch_size) {
        let events = store.fetch_by_ids(chunk).await?;
        let mut pending: HashSet<EventId> = HashSet::with_capacity(events.len());
        for event in &events {
            pending.insert(event.id);
            ws.feed(&ClientMessage::event(event.clone())).await?;
        }
        ws.flush().await?;
        while !pending.is_empty() {
            match ws.recv("OK for an uploaded event").await? {
                RelayMessage::Ok {
                    event_id,
                    status,
                    message,
                } if pending.remove(&event_id) => {
                    if status || message.starts_with("duplicate:") {
                        report.sent += 1;
                    } else {
                        report.send_failed += 1;
                        tracing::debug!(id = %event_id, %message, "peer refused an event");
                    }
                }
                RelayMessage::Notice(n) => tracing::info!(notice = %n, "peer notice"),
                other => tracing::trace!(?other, "ignored during upload"),
            }
        }
        progress(report);
    }
    Ok(())
}
