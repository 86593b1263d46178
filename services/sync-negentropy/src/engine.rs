//! Client NIP-77 sessions: [`NegentropyEngine`] keeps one negentropy responder per
//! (connection id, subscription id), built from the store's `(created_at, id)` stream for the
//! session's filter. A session holds only that sealed list (40 bytes a record), never events.
//!
//! Lifecycle: NEG-OPEN builds (or replaces) a session; NEG-MSG advances it; NEG-CLOSE, the end
//! of the connection, any error, or [`EngineSettings::session_timeout`] of inactivity remove it.
//!
//! Bounds: at most [`EngineSettings::max_sessions`] sessions open (or opening) in the process,
//! at most [`EngineSettings::max_records`] records in one, and at most
//! [`EngineSettings::max_total_records`] records held by all of them together (a set loads at
//! most what is left, takes its records from the budget once loaded, and gives them back when
//! its session goes); a NEG-OPEN past a bound gets `blocked: …` and changes nothing.
//! A session removed for inactivity leaves a tombstone (kept at least ten minutes, at most
//! 65,536 of them) so a late NEG-MSG learns *why* (`closed: session timed out …`) rather than
//! just `closed: unknown negentropy session`.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use negentropy::{Negentropy, NegentropyStorageVector};
use nostr::Filter;
use orly_db::SharedStore;
use parking_lot::Mutex;

use crate::config::EngineSettings;
use crate::handler::{NegError, NegReply, NegentropyHandler};
use crate::set::{build_storage, load_items, LoadError};
use crate::PROTOCOL_VERSION;

/// Longest subscription id accepted (NIP-01).
pub const MAX_SUBSCRIPTION_ID_LEN: usize = 64;
/// Most tombstones of timed-out sessions remembered.
const MAX_TOMBSTONES: usize = 65_536;
/// How long a tombstone is remembered at least (longer when the session timeout is longer).
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

type SessionKey = (String, String);
type Responder = Negentropy<'static, NegentropyStorageVector>;

/// Records held by every open session, against [`EngineSettings::max_total_records`].
struct RecordBudget {
    /// 0: no limit.
    total: usize,
    used: std::sync::atomic::AtomicUsize,
}

/// Records taken from the budget; given back when dropped (with the session holding them).
struct Reservation {
    budget: Arc<RecordBudget>,
    n: usize,
}

impl RecordBudget {
    /// Reserves `n` records, unless fewer than that are left.
    fn try_reserve(self: &Arc<Self>, n: usize) -> Option<Reservation> {
        use std::sync::atomic::Ordering;
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(n)?;
            if self.total > 0 && next > self.total {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Reservation {
                        budget: self.clone(),
                        n,
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    /// Records not held yet (`None`: no limit).
    fn left(&self) -> Option<usize> {
        (self.total > 0).then(|| self.total.saturating_sub(self.used()))
    }

    fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.n, std::sync::atomic::Ordering::AcqRel);
    }
}

struct Session {
    neg: Responder,
    records: usize,
    /// The session's share of the record budget (its records).
    _reserved: Reservation,
    created_at: i64,
    last_activity: Instant,
    last_activity_unix: i64,
    rounds: u32,
}

/// A session as `ListSessions` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub connection_id: String,
    pub subscription_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last NEG-OPEN / NEG-MSG.
    pub last_activity: i64,
    /// Messages answered (the NEG-OPEN counts as the first).
    pub round_count: u32,
    /// Records in the session's set.
    pub records: usize,
}

/// The in-process NIP-77 responder. Cheap to share (`Arc`); every method is safe to call
/// concurrently, and reconciliation runs on the blocking pool so large sets never stall the
/// async runtime.
pub struct NegentropyEngine {
    store: SharedStore,
    settings: EngineSettings,
    sessions: Mutex<HashMap<SessionKey, Arc<Mutex<Session>>>>,
    /// Sessions removed for inactivity, and when.
    tombstones: Mutex<HashMap<SessionKey, Instant>>,
    /// NEG-OPENs in flight, by token: a close (or a newer NEG-OPEN) that arrives while the set is
    /// loading removes the entry, and the finished open then does not install its session.
    opening: Mutex<HashMap<SessionKey, u64>>,
    next_token: std::sync::atomic::AtomicU64,
    budget: Arc<RecordBudget>,
}

/// Removes a NEG-OPEN's entry from `opening` however the open ends (an abandoned request
/// included), unless a newer NEG-OPEN or a close already took it.
struct Opening<'a> {
    opening: &'a Mutex<HashMap<SessionKey, u64>>,
    key: SessionKey,
    token: u64,
}

impl Opening<'_> {
    /// True (and the entry gone) when this open is still the current one for its key.
    fn finish(&self) -> bool {
        let mut opening = self.opening.lock();
        if opening.get(&self.key) == Some(&self.token) {
            opening.remove(&self.key);
            true
        } else {
            false
        }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for NegentropyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NegentropyEngine")
            .field("settings", &self.settings)
            .field("sessions", &self.sessions.lock().len())
            .finish()
    }
}

fn malformed(e: impl std::fmt::Display) -> NegError {
    NegError::Invalid(format!("malformed negentropy message: {e}"))
}

/// Runs `f` on the blocking pool, turning a panic inside the negentropy crate into an error
/// instead of a dead task.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NegError> + Send + 'static,
) -> Result<T, NegError> {
    let run = move || {
        std::panic::catch_unwind(AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err(malformed("the message could not be processed")))
    };
    tokio::task::spawn_blocking(run)
        .await
        .map_err(|e| NegError::Internal(format!("reconciliation task failed: {e}")))?
}

/// Parses `message` as a responder over an empty set: catches malformed messages cheaply.
fn check_syntax(message: &[u8]) -> Result<(), NegError> {
    let run = || {
        let storage = build_storage(&[]).map_err(|e| NegError::Internal(e.to_string()))?;
        let mut neg =
            Negentropy::owned(storage, 0).map_err(|e| NegError::Internal(e.to_string()))?;
        neg.reconcile(message).map(|_| ()).map_err(malformed)
    };
    std::panic::catch_unwind(AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(malformed("the message could not be processed")))
}

impl NegentropyEngine {
    /// An engine over `store`. Call [`spawn_reaper`](Self::spawn_reaper) to close idle sessions
    /// in the background (messages to idle sessions are refused even without it).
    pub fn new(store: SharedStore, settings: EngineSettings) -> Result<Arc<Self>, String> {
        settings.validate()?;
        Ok(Arc::new(Self {
            store,
            sessions: Mutex::new(HashMap::new()),
            tombstones: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            next_token: std::sync::atomic::AtomicU64::new(1),
            budget: Arc::new(RecordBudget {
                total: settings.max_total_records,
                used: std::sync::atomic::AtomicUsize::new(0),
            }),
            settings,
        }))
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    fn timeout_error(&self) -> NegError {
        NegError::Closed(format!(
            "session timed out after {:?} of inactivity",
            self.settings.session_timeout
        ))
    }

    fn check_ids(connection_id: &str, subscription_id: &str) -> Result<(), NegError> {
        if subscription_id.is_empty() || subscription_id.len() > MAX_SUBSCRIPTION_ID_LEN {
            return Err(NegError::Invalid(format!(
                "subscription id must be 1 to {MAX_SUBSCRIPTION_ID_LEN} characters"
            )));
        }
        if connection_id.is_empty() {
            return Err(NegError::Invalid("connection id must not be empty".into()));
        }
        Ok(())
    }

    fn check_size(&self, message: &[u8]) -> Result<(), NegError> {
        if message.len() > self.settings.max_message_bytes {
            return Err(NegError::Blocked(format!(
                "negentropy message of {} bytes exceeds the limit of {} bytes",
                message.len(),
                self.settings.max_message_bytes
            )));
        }
        Ok(())
    }

    fn remove(&self, key: &SessionKey) -> bool {
        let removed = self.sessions.lock().remove(key).is_some();
        if removed {
            self.record_gauge();
        }
        removed
    }

    fn record_gauge(&self) {
        metrics::gauge!("orly_negentropy_sessions").set(self.sessions.lock().len() as f64);
        metrics::gauge!("orly_negentropy_session_records").set(self.budget.used() as f64);
    }

    /// Records held by the open sessions (and reserved by those opening).
    pub fn records_held(&self) -> usize {
        self.budget.used()
    }

    fn count_error(e: &NegError) {
        metrics::counter!("orly_negentropy_errors_total", "kind" => e.kind()).increment(1);
    }

    /// NEG-OPEN (see [`NegentropyHandler::open`]).
    pub async fn open_session(
        &self,
        connection_id: &str,
        subscription_id: &str,
        filter: &Filter,
        initial_message: &[u8],
    ) -> Result<NegReply, NegError> {
        let result = self
            .open_inner(connection_id, subscription_id, filter, initial_message)
            .await;
        if let Err(e) = &result {
            Self::count_error(e);
        }
        result
    }

    async fn open_inner(
        &self,
        connection_id: &str,
        subscription_id: &str,
        filter: &Filter,
        initial_message: &[u8],
    ) -> Result<NegReply, NegError> {
        Self::check_ids(connection_id, subscription_id)?;
        let key = (connection_id.to_string(), subscription_id.to_string());
        // A NEG-OPEN on an open subscription id replaces that session, errors included.
        self.remove(&key);
        self.tombstones.lock().remove(&key);
        self.opening.lock().remove(&key);
        self.check_size(initial_message)?;

        // Version negotiation before any storage work: a V1.x client we do not speak gets our
        // version byte alone, as the protocol prescribes, and may retry with it.
        let Some(&version) = initial_message.first() else {
            return Err(malformed("empty message"));
        };
        if !(0x60..=0x6F).contains(&version) {
            return Err(malformed(format!(
                "invalid protocol version byte 0x{version:02x}"
            )));
        }
        if version != PROTOCOL_VERSION {
            return Ok(NegReply::new(vec![PROTOCOL_VERSION]));
        }

        // Syntax check against an empty set first, so garbage costs no storage work.
        check_syntax(initial_message)?;

        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let opening = {
            let mut opening = self.opening.lock();
            let max = self.settings.max_sessions;
            // Sessions open and opening, counted under the `opening` lock so that concurrent
            // NEG-OPENs cannot all pass at the last free place.
            let count = self.sessions.lock().len() + opening.len();
            if max > 0 && count >= max {
                return Err(NegError::Blocked(format!(
                    "too many negentropy sessions open ({count}, the most is {max}); try again later"
                )));
            }
            opening.insert(key.clone(), token);
            Opening {
                opening: &self.opening,
                key: key.clone(),
                token,
            }
        };
        let result = self.build_session(filter, initial_message).await;
        if !opening.finish() {
            return Err(NegError::Closed(
                "the session was closed or replaced while it opened".into(),
            ));
        }
        let (session, reply) = result?;
        let records = session.records;
        self.sessions
            .lock()
            .insert(key, Arc::new(Mutex::new(session)));
        self.record_gauge();
        metrics::counter!("orly_negentropy_messages_total", "type" => "open").increment(1);
        tracing::debug!(
            connection_id,
            subscription_id,
            records,
            reply_bytes = reply.len(),
            "negentropy session opened"
        );
        Ok(NegReply::new(reply))
    }

    /// Loads the set for `filter` within the per-session cap and what is left of the record
    /// budget, and answers the initial message.
    async fn build_session(
        &self,
        filter: &Filter,
        initial_message: &[u8],
    ) -> Result<(Session, Vec<u8>), NegError> {
        let cap = self.settings.max_records;
        let busy = |held: usize| {
            NegError::Blocked(format!(
                "the open negentropy sessions hold {held} records, the most this relay keeps at once; try again later"
            ))
        };
        // The set may not be larger than what the budget has left now; whether it still fits
        // once loaded is decided when its records are reserved below.
        let left = self.budget.left();
        let load_cap = match (cap, left) {
            (0, None) => 0,
            (0, Some(left)) => left,
            (cap, None) => cap,
            (cap, Some(left)) => cap.min(left),
        };
        let budget_bound = left.is_some_and(|l| cap == 0 || l < cap);
        if budget_bound && load_cap == 0 {
            return Err(busy(self.budget.used()));
        }
        let items = load_items(&self.store, filter, load_cap)
            .await
            .map_err(|e| match e {
                LoadError::TooMany(_) if budget_bound => busy(self.budget.used()),
                LoadError::TooMany(n) => NegError::Blocked(format!(
                    "the filter matches more than {n} events; narrow it (since/until, kinds, authors)"
                )),
                LoadError::Store(e) => {
                    tracing::warn!(error = %e, "loading negentropy items failed");
                    NegError::Internal(format!("cannot read the event set: {e}"))
                }
            })?;
        let records = items.len();
        let reserved = self
            .budget
            .try_reserve(records)
            .ok_or_else(|| busy(self.budget.used()))?;
        let frame_size = self.settings.frame_size;
        let query = initial_message.to_vec();
        let (neg, reply) = blocking(move || {
            let storage = build_storage(&items).map_err(|e| NegError::Internal(e.to_string()))?;
            drop(items);
            let mut neg = Negentropy::owned(storage, frame_size)
                .map_err(|e| NegError::Internal(e.to_string()))?;
            let reply = neg.reconcile(&query).map_err(malformed)?;
            Ok((neg, reply))
        })
        .await?;

        let now = orly_common::time::now_secs_i64();
        let session = Session {
            neg,
            records,
            _reserved: reserved,
            created_at: now,
            last_activity: Instant::now(),
            last_activity_unix: now,
            rounds: 1,
        };
        Ok((session, reply))
    }

    /// NEG-MSG (see [`NegentropyHandler::message`]).
    pub async fn session_message(
        &self,
        connection_id: &str,
        subscription_id: &str,
        message: &[u8],
    ) -> Result<NegReply, NegError> {
        let result = self
            .message_inner(connection_id, subscription_id, message)
            .await;
        if let Err(e) = &result {
            Self::count_error(e);
        }
        result
    }

    async fn message_inner(
        &self,
        connection_id: &str,
        subscription_id: &str,
        message: &[u8],
    ) -> Result<NegReply, NegError> {
        Self::check_ids(connection_id, subscription_id)?;
        let key = (connection_id.to_string(), subscription_id.to_string());
        let session = self.sessions.lock().get(&key).cloned();
        let Some(session) = session else {
            if self.tombstones.lock().remove(&key).is_some() {
                return Err(self.timeout_error());
            }
            return Err(NegError::Closed(
                "unknown negentropy session: send NEG-OPEN first".into(),
            ));
        };
        let idle = session
            .try_lock()
            .is_some_and(|s| s.last_activity.elapsed() > self.settings.session_timeout);
        if idle {
            self.remove(&key);
            return Err(self.timeout_error());
        }
        if let Err(e) = self.check_size(message) {
            self.remove(&key);
            return Err(e);
        }
        let query = message.to_vec();
        let worker = session.clone();
        let result = blocking(move || {
            let mut s = worker.lock();
            let reply = s.neg.reconcile(&query).map_err(malformed)?;
            s.rounds = s.rounds.saturating_add(1);
            s.last_activity = Instant::now();
            s.last_activity_unix = orly_common::time::now_secs_i64();
            Ok(reply)
        })
        .await;
        match result {
            Ok(reply) => {
                metrics::counter!("orly_negentropy_messages_total", "type" => "msg").increment(1);
                Ok(NegReply::new(reply))
            }
            Err(e) => {
                // Only drop the session we used: a concurrent NEG-OPEN may have replaced it.
                let mut sessions = self.sessions.lock();
                if sessions.get(&key).is_some_and(|s| Arc::ptr_eq(s, &session)) {
                    sessions.remove(&key);
                }
                drop(sessions);
                self.record_gauge();
                Err(e)
            }
        }
    }

    /// NEG-CLOSE. True if the session existed.
    pub fn close_session(&self, connection_id: &str, subscription_id: &str) -> bool {
        let key = (connection_id.to_string(), subscription_id.to_string());
        self.tombstones.lock().remove(&key);
        self.opening.lock().remove(&key);
        self.remove(&key)
    }

    /// Closes every session of a connection; returns how many there were.
    pub fn close_connection_sessions(&self, connection_id: &str) -> usize {
        self.tombstones.lock().retain(|k, _| k.0 != connection_id);
        self.opening.lock().retain(|k, _| k.0 != connection_id);
        let mut sessions = self.sessions.lock();
        let before = sessions.len();
        sessions.retain(|k, _| k.0 != connection_id);
        let n = before - sessions.len();
        drop(sessions);
        self.record_gauge();
        n
    }

    /// `CloseSession`: an empty `connection_id` closes the subscription id on every connection;
    /// an empty `subscription_id` closes every session of the connection. Returns how many.
    pub fn close_matching(&self, connection_id: &str, subscription_id: &str) -> usize {
        let matches = |k: &SessionKey| {
            (connection_id.is_empty() || k.0 == connection_id)
                && (subscription_id.is_empty() || k.1 == subscription_id)
        };
        self.tombstones.lock().retain(|k, _| !matches(k));
        self.opening.lock().retain(|k, _| !matches(k));
        let mut sessions = self.sessions.lock();
        let before = sessions.len();
        sessions.retain(|k, _| !matches(k));
        let n = before - sessions.len();
        drop(sessions);
        self.record_gauge();
        n
    }

    /// Every open session, sorted by (connection, subscription).
    pub fn list_sessions(&self) -> Vec<SessionInfo> {
        let entries: Vec<(SessionKey, Arc<Mutex<Session>>)> = self
            .sessions
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out: Vec<SessionInfo> = entries
            .into_iter()
            .map(|((conn, sub), s)| {
                let s = s.lock();
                SessionInfo {
                    connection_id: conn,
                    subscription_id: sub,
                    created_at: s.created_at,
                    last_activity: s.last_activity_unix,
                    round_count: s.rounds,
                    records: s.records,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.connection_id, &a.subscription_id).cmp(&(&b.connection_id, &b.subscription_id))
        });
        out
    }

    /// Closes sessions idle longer than the timeout (leaving tombstones) and forgets old
    /// tombstones. Returns how many sessions were closed.
    pub fn reap_idle(&self) -> usize {
        let timeout = self.settings.session_timeout;
        let keep = timeout.max(TOMBSTONE_TTL);
        let entries: Vec<(SessionKey, Arc<Mutex<Session>>)> = self
            .sessions
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // `try_lock`: a session busy reconciling is not idle.
        let idle: Vec<(SessionKey, Arc<Mutex<Session>>)> = entries
            .into_iter()
            .filter(|(_, s)| {
                s.try_lock()
                    .is_some_and(|s| s.last_activity.elapsed() > timeout)
            })
            .collect();
        let now = Instant::now();
        let mut closed = 0;
        {
            let mut sessions = self.sessions.lock();
            let mut tombstones = self.tombstones.lock();
            tombstones.retain(|_, at| now.duration_since(*at) <= keep);
            for (key, s) in idle {
                if sessions.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, &s)) {
                    sessions.remove(&key);
                    if tombstones.len() >= MAX_TOMBSTONES {
                        tombstones.clear();
                    }
                    tombstones.insert(key, now);
                    closed += 1;
                }
            }
        }
        if closed > 0 {
            self.record_gauge();
            tracing::debug!(closed, "closed idle negentropy sessions");
        }
        closed
    }

    /// Runs [`reap_idle`](Self::reap_idle) periodically until the engine is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let period = (self.settings.session_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(engine) = weak.upgrade() else { break };
                engine.reap_idle();
            }
        })
    }
}

#[async_trait]
impl NegentropyHandler for NegentropyEngine {
    async fn open(
        &self,
        connection_id: &str,
        subscription_id: &str,
        filter: &Filter,
        initial_message: &[u8],
    ) -> Result<NegReply, NegError> {
        self.open_session(connection_id, subscription_id, filter, initial_message)
            .await
    }

    async fn message(
        &self,
        connection_id: &str,
        subscription_id: &str,
        message: &[u8],
    ) -> Result<NegReply, NegError> {
        self.session_message(connection_id, subscription_id, message)
            .await
    }

    async fn close(&self, connection_id: &str, subscription_id: &str) {
        self.close_session(connection_id, subscription_id);
    }

    async fn close_connection(&self, connection_id: &str) {
        self.close_connection_sessions(connection_id);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use nostr::{Event, EventBuilder, EventId, Keys, Kind, Timestamp};
    use orly_db::sqlite::SqliteStore;

    use super::*;
    use crate::handler::reconcile_as_client;

    async fn store() -> (tempfile::TempDir, SharedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("orly.db"))
            .await
            .unwrap();
        (dir, Arc::new(store))
    }

    /// `n` signed text notes (kind 1) or `kind` events, created at `base`, `base + 1`, … with a
    /// repeat every 7 so equal timestamps (ordered by id) are covered too.
    fn events(keys: &Keys, kind: u16, n: usize, base: u64) -> Vec<Event> {
        (0..n)
            .map(|i| {
                EventBuilder::new(Kind::from(kind), format!("note {base} {i}"))
                    .custom_created_at(Timestamp::from(base + (i as u64 / 7)))
                    .sign_with_keys(keys)
                    .unwrap()
            })
            .collect()
    }

    async fn save(store: &SharedStore, events: &[Event]) {
        for e in events {
            store.save_event(e).await.unwrap();
        }
    }

    fn items(events: &[&[Event]]) -> Vec<(Timestamp, EventId)> {
        events
            .iter()
            .flat_map(|es| es.iter().map(|e| (e.created_at, e.id)))
            .collect()
    }

    fn ids(events: &[Event]) -> BTreeSet<EventId> {
        events.iter().map(|e| e.id).collect()
    }

    fn engine(store: &SharedStore) -> Arc<NegentropyEngine> {
        NegentropyEngine::new(store.clone(), EngineSettings::default()).unwrap()
    }

    fn engine_with(
        store: &SharedStore,
        f: impl FnOnce(&mut EngineSettings),
    ) -> Arc<NegentropyEngine> {
        let mut s = EngineSettings::default();
        f(&mut s);
        NegentropyEngine::new(store.clone(), s).unwrap()
    }

    fn notes() -> Filter {
        Filter::new().kind(Kind::TextNote)
    }

    #[tokio::test]
    async fn client_with_extra_events_learns_exactly_what_it_has() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        let shared = events(&keys, 1, 400, 1_700_000_000);
        let extra = events(&keys, 1, 25, 1_700_100_000);
        save(&store, &shared).await;
        let engine = engine(&store);
        let out = reconcile_as_client(
            &*engine,
            "c1",
            "s1",
            &notes(),
            &items(&[&shared, &extra]),
            0,
        )
        .await
        .unwrap();
        assert_eq!(out.have, ids(&extra));
        assert!(out.need.is_empty());
        assert!(
            engine.list_sessions().is_empty(),
            "NEG-CLOSE forgets the session"
        );
    }

    #[tokio::test]
    async fn store_with_extra_events_is_exactly_what_the_client_needs() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        let shared = events(&keys, 1, 400, 1_700_000_000);
        let extra = events(&keys, 1, 30, 1_600_000_000);
        save(&store, &shared).await;
        save(&store, &extra).await;
        let engine = engine(&store);
        let out = reconcile_as_client(&*engine, "c1", "s1", &notes(), &items(&[&shared]), 0)
            .await
            .unwrap();
        assert!(out.have.is_empty());
        assert_eq!(out.need, ids(&extra));
    }

    #[tokio::test]
    async fn both_sides_with_extras_over_several_rounds() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        let shared = events(&keys, 1, 1500, 1_700_000_000);
        let ours = events(&keys, 1, 40, 1_700_000_100);
        let theirs = events(&keys, 1, 60, 1_700_000_050);
        let other_kind = events(&keys, 7, 20, 1_700_000_000);
        save(&store, &shared).await;
        save(&store, &theirs).await;
        save(&store, &other_kind).await; // outside the filter: never "needed"
        let engine = engine(&store);
        // The client limits its frames too, so both directions take several rounds.
        let out = reconcile_as_client(
            &*engine,
            "c1",
            "s1",
            &notes(),
            &items(&[&shared, &ours]),
            4096,
        )
        .await
        .unwrap();
        assert_eq!(out.have, ids(&ours));
        assert_eq!(out.need, ids(&theirs));
        assert!(
            out.rounds > 1,
            "expected several rounds, got {}",
            out.rounds
        );
    }

    #[tokio::test]
    async fn identical_sets_finish_in_one_round() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        let shared = events(&keys, 1, 200, 1_700_000_000);
        save(&store, &shared).await;
        let engine = engine(&store);
        let storage = build_storage(&items(&[&shared])).unwrap();
        let mut client = Negentropy::owned(storage, 0).unwrap();
        let reply = engine
            .open_session("c", "s", &notes(), &client.initiate().unwrap())
            .await
            .unwrap();
        assert!(reply.complete);
        assert_eq!(reply.message, vec![PROTOCOL_VERSION]);
        let (mut have, mut need) = (Vec::new(), Vec::new());
        assert_eq!(
            client
                .reconcile_with_ids(&reply.message, &mut have, &mut need)
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn malformed_messages_are_invalid_and_never_panic() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        save(&store, &events(&keys, 1, 100, 1_700_000_000)).await;
        let engine = engine(&store);
        let f = notes();

        let e = engine.open_session("c", "s", &f, &[]).await.unwrap_err();
        assert!(matches!(e, NegError::Invalid(_)), "{e:?}");
        assert!(e.reason().starts_with("invalid: "));
        for bad in [
            [0x61, 0x00, 0x00, 0x07].to_vec(),               // unknown mode
            [0x61, 0x00, 0x03, 0xaa].to_vec(),               // bound id cut short
            [&[0x61, 0x00, 0x21][..], &[0xaa; 33]].concat(), // bound id longer than 32 bytes
            [0x61, 0x00, 0x00, 0x01, 0xaa].to_vec(),         // fingerprint cut short
            [0x61, 0x00, 0x00, 0x02, 0x05, 0x01].to_vec(),   // id list claiming 5 ids
        ] {
            let bad = &bad[..];
            let e = engine.open_session("c", "s", &f, bad).await.unwrap_err();
            assert!(matches!(e, NegError::Invalid(_)), "{bad:?}: {e:?}");
        }
        assert!(
            engine.list_sessions().is_empty(),
            "a refused NEG-OPEN leaves no session"
        );

        // Random garbage after the version byte, on open and on an open session.
        let mut rng_state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        for i in 0..300 {
            let len = (next() % 80) as usize;
            let mut msg = vec![PROTOCOL_VERSION];
            msg.extend((0..len).map(|_| next() as u8));
            let _ = engine.open_session("c", &format!("f{i}"), &f, &msg).await;
        }
        let storage = build_storage(&[]).unwrap();
        let mut client = Negentropy::owned(storage, 0).unwrap();
        engine
            .open_session("c", "live", &f, &client.initiate().unwrap())
            .await
            .unwrap();
        let e = engine
            .session_message("c", "live", &[0x61, 0x00, 0x00, 0x09])
            .await
            .unwrap_err();
        assert!(matches!(e, NegError::Invalid(_)), "{e:?}");
        let e = engine
            .session_message("c", "live", &[0x61])
            .await
            .unwrap_err();
        assert!(
            matches!(e, NegError::Closed(_)),
            "an error ends the session: {e:?}"
        );
    }

    #[tokio::test]
    async fn unsupported_versions_get_our_version_and_bad_bytes_are_invalid() {
        let (_dir, store) = store().await;
        let engine = engine(&store);
        let f = notes();
        // A future V1.x (0x62) client is told what we speak, so it can fall back.
        let reply = engine
            .open_session("c", "s", &f, &[0x62, 0x00, 0x00])
            .await
            .unwrap();
        assert_eq!(reply.message, vec![0x61]);
        assert!(engine.list_sessions().is_empty());
        // Not a negentropy version at all.
        for bad in [0x00u8, 0x51, 0x70, 0xff] {
            let e = engine
                .open_session("c", "s", &f, &[bad, 0x00])
                .await
                .unwrap_err();
            assert!(
                matches!(e, NegError::Invalid(ref m) if m.contains("version")),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn unknown_sessions_are_closed() {
        let (_dir, store) = store().await;
        let engine = engine(&store);
        let e = engine
            .session_message("c", "nope", &[0x61])
            .await
            .unwrap_err();
        assert!(e.reason().starts_with("closed: unknown"), "{e:?}");
        let e = engine.session_message("c", "", &[0x61]).await.unwrap_err();
        assert!(matches!(e, NegError::Invalid(_)));
        let long = "x".repeat(65);
        let e = engine
            .open_session("c", &long, &notes(), &[0x61])
            .await
            .unwrap_err();
        assert!(matches!(e, NegError::Invalid(_)));
    }

    #[tokio::test]
    async fn filters_over_the_cap_are_blocked() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        save(&store, &events(&keys, 1, 10, 1_700_000_000)).await;
        let engine = engine_with(&store, |s| s.max_records = 5);
        let initial = Negentropy::owned(build_storage(&[]).unwrap(), 0)
            .unwrap()
            .initiate()
            .unwrap();
        let e = engine
            .open_session("c", "s", &notes(), &initial)
            .await
            .unwrap_err();
        assert!(matches!(e, NegError::Blocked(_)), "{e:?}");
        assert!(e
            .reason()
            .starts_with("blocked: the filter matches more than 5"));
        // Narrowed by its own limit, the same filter is fine.
        let reply = engine
            .open_session("c", "s", &notes().limit(5), &initial)
            .await
            .unwrap();
        assert!(!reply.complete);
        assert_eq!(engine.list_sessions()[0].records, 5);
        // Exactly at the cap is allowed.
        let at_cap = engine_with(&store, |s| s.max_records = 10);
        assert!(at_cap
            .open_session("c", "s", &notes(), &initial)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn oversized_messages_are_blocked() {
        let (_dir, store) = store().await;
        let engine = engine_with(&store, |s| s.max_message_bytes = 64);
        let mut big = vec![PROTOCOL_VERSION];
        big.resize(65, 0);
        let e = engine
            .open_session("c", "s", &notes(), &big)
            .await
            .unwrap_err();
        assert!(matches!(e, NegError::Blocked(_)), "{e:?}");
        engine
            .open_session("c", "s", &notes(), &[0x61])
            .await
            .unwrap();
        let e = engine.session_message("c", "s", &big).await.unwrap_err();
        assert!(matches!(e, NegError::Blocked(_)), "{e:?}");
        assert!(engine.list_sessions().is_empty());
    }

    #[tokio::test]
    async fn idle_sessions_time_out_with_closed() {
        let (_dir, store) = store().await;
        let engine = engine_with(&store, |s| s.session_timeout = Duration::from_millis(150));
        let initial = [PROTOCOL_VERSION];
        // Without the reaper: the message itself notices the idle time.
        engine
            .open_session("c", "a", &notes(), &initial)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let e = engine
            .session_message("c", "a", &initial)
            .await
            .unwrap_err();
        assert!(e.reason().starts_with("closed: session timed out"), "{e:?}");

        // With the reaper: the session is gone, and a late message still learns why.
        let reaper = engine.spawn_reaper();
        engine
            .open_session("c", "b", &notes(), &initial)
            .await
            .unwrap();
        assert_eq!(engine.list_sessions().len(), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            engine.list_sessions().is_empty(),
            "the reaper closed the idle session"
        );
        let e = engine
            .session_message("c", "b", &initial)
            .await
            .unwrap_err();
        assert!(e.reason().starts_with("closed: session timed out"), "{e:?}");
        reaper.abort();

        // Activity keeps a session alive.
        engine
            .open_session("c", "d", &notes(), &initial)
            .await
            .unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(80)).await;
            engine.session_message("c", "d", &initial).await.unwrap();
        }
        assert_eq!(engine.list_sessions()[0].round_count, 5);
    }

    #[tokio::test]
    async fn reopening_a_subscription_replaces_its_session() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        let notes_ev = events(&keys, 1, 50, 1_700_000_000);
        let reactions = events(&keys, 7, 30, 1_700_000_000);
        save(&store, &notes_ev).await;
        save(&store, &reactions).await;
        let engine = engine(&store);
        let empty = Negentropy::owned(build_storage(&[]).unwrap(), 0)
            .unwrap()
            .initiate()
            .unwrap();
        engine
            .open_session("c", "s", &notes(), &empty)
            .await
            .unwrap();
        engine
            .open_session("c", "other", &notes(), &empty)
            .await
            .unwrap();
        assert_eq!(engine.list_sessions().len(), 2);
        // Same subscription, new filter: the old session is gone, the new one answers.
        let out = reconcile_as_client(
            &*engine,
            "c",
            "s",
            &Filter::new().kind(Kind::Reaction),
            &[],
            0,
        )
        .await
        .unwrap();
        assert_eq!(out.need, ids(&reactions));
        let sessions = engine.list_sessions();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].subscription_id, "other");
        // The same subscription id on another connection is another session.
        engine
            .open_session("d", "other", &notes(), &empty)
            .await
            .unwrap();
        assert_eq!(engine.list_sessions().len(), 2);
        assert_eq!(engine.close_connection_sessions("c"), 1);
        assert_eq!(engine.list_sessions()[0].connection_id, "d");
        assert_eq!(engine.close_matching("", "other"), 1);
        assert!(engine.list_sessions().is_empty());
        assert!(!engine.close_session("d", "other"));
    }

    #[tokio::test]
    async fn sessions_past_the_process_cap_are_blocked() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        save(&store, &events(&keys, 1, 20, 1_700_000_000)).await;
        let engine = engine_with(&store, |s| s.max_sessions = 3);
        let initial = [PROTOCOL_VERSION];
        for sub in ["a", "b", "c"] {
            engine
                .open_session("c1", sub, &notes(), &initial)
                .await
                .unwrap();
        }
        let e = engine
            .open_session("c2", "d", &notes(), &initial)
            .await
            .unwrap_err();
        assert!(matches!(e, NegError::Blocked(_)), "{e:?}");
        assert!(
            e.reason()
                .starts_with("blocked: too many negentropy sessions open (3"),
            "{e:?}"
        );
        assert_eq!(
            engine.list_sessions().len(),
            3,
            "a refused NEG-OPEN changes nothing"
        );
        // Re-opening an open subscription replaces it: no new place needed.
        engine
            .open_session("c1", "a", &notes(), &initial)
            .await
            .unwrap();
        assert!(engine.close_session("c1", "b"));
        engine
            .open_session("c2", "d", &notes(), &initial)
            .await
            .unwrap();
        assert_eq!(engine.list_sessions().len(), 3);
    }

    /// Regression: a NEG-OPEN abandoned while its set loaded (its gRPC call cancelled at the
    /// relay's deadline, the connection still open) left its entry among the sessions opening
    /// until the connection ended: with a cap on sessions, each such open took a place.
    #[tokio::test]
    async fn an_abandoned_open_gives_its_place_back() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        save(&store, &events(&keys, 1, 200, 1_700_000_000)).await;
        let engine = engine_with(&store, |s| s.max_sessions = 1);
        let initial = [PROTOCOL_VERSION];
        let filter = notes();
        for i in 0..5 {
            let sub = format!("gone{i}");
            let open = engine.open_session("c", &sub, &filter, &initial);
            // Polled once (it then waits for the store), then dropped.
            assert!(futures::FutureExt::now_or_never(open).is_none());
        }
        assert!(engine.list_sessions().is_empty());
        assert_eq!(engine.records_held(), 0);
        engine
            .open_session("c", "live", &notes(), &initial)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_records_budget_bounds_all_sessions_together() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        save(&store, &events(&keys, 1, 10, 1_700_000_000)).await;
        let engine = engine_with(&store, |s| {
            s.max_records = 10;
            s.max_total_records = 25;
        });
        let initial = [PROTOCOL_VERSION];
        for sub in ["s1", "s2"] {
            engine
                .open_session("c", sub, &notes(), &initial)
                .await
                .unwrap();
        }
        assert_eq!(engine.records_held(), 20);
        // Ten more do not fit in the five left.
        let e = engine
            .open_session("c", "s3", &notes(), &initial)
            .await
            .unwrap_err();
        assert!(matches!(e, NegError::Blocked(_)), "{e:?}");
        assert!(
            e.reason()
                .starts_with("blocked: the open negentropy sessions hold 20 records"),
            "{e:?}"
        );
        assert_eq!(engine.records_held(), 20, "the refused open holds nothing");
        assert_eq!(engine.list_sessions().len(), 2);
        // Five do.
        engine
            .open_session("c", "s3", &notes().limit(5), &initial)
            .await
            .unwrap();
        assert_eq!(engine.records_held(), 25);
        let e = engine
            .open_session("c", "s4", &notes().limit(1), &initial)
            .await
            .unwrap_err();
        assert!(matches!(e, NegError::Blocked(_)), "{e:?}");
        // Closing gives records back; so does a session ended by an error.
        assert!(engine.close_session("c", "s1"));
        assert_eq!(engine.records_held(), 15);
        engine
            .open_session("c", "s4", &notes(), &initial)
            .await
            .unwrap();
        assert_eq!(engine.records_held(), 25);
        let _ = engine
            .session_message("c", "s4", &[0x61, 0x00, 0x00, 0x09])
            .await
            .unwrap_err();
        assert_eq!(engine.records_held(), 15);
        assert_eq!(engine.close_connection_sessions("c"), 2);
        assert_eq!(engine.records_held(), 0);
    }

    #[tokio::test]
    async fn idle_sessions_give_their_records_back() {
        let (_dir, store) = store().await;
        let keys = Keys::generate();
        save(&store, &events(&keys, 1, 30, 1_700_000_000)).await;
        let engine = engine_with(&store, |s| {
            s.session_timeout = Duration::from_millis(100);
            s.max_total_records = 30;
        });
        let initial = [PROTOCOL_VERSION];
        engine
            .open_session("c", "a", &notes(), &initial)
            .await
            .unwrap();
        assert!(engine
            .open_session("c", "b", &notes(), &initial)
            .await
            .is_err());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(engine.reap_idle(), 1);
        assert_eq!(engine.records_held(), 0);
        engine
            .open_session("c", "b", &notes(), &initial)
            .await
            .unwrap();
    }
}
