//! One WebSocket connection: reads client messages, answers them, and carries its live
//! subscriptions' events. Access decisions come from the relay's ACL; privileged kinds (DMs,
//! gift wraps, …) reach only their parties.
//!
//! Everything sent goes through the connection's [`Outbox`], bounded in bytes: stored results
//! wait while it is half full (read ahead of the client, so the store's connection is not held
//! by a slow one), live events and replies are queued at once, and a connection
//! past its budget — or whose socket took longer than the write timeout for one send — is
//! closed and its queue freed. The reader never waits for the socket: it always sees the
//! close and shutdown signals. REQs run in their own tasks (several at once, cancelled by
//! CLOSE, with a deadline) and hand over to the live feed by serial ([`crate::live`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use nostr::{Event, Filter, JsonUtil, Kind, PublicKey, SingleLetterTag, TagKind};
use orly_db::{RawEvent, SaveOutcome};
use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::AbortHandle;

use orly_acl::privileged;
use orly_common::time::now_secs;

use crate::acl::{AccessContext, Decision};
use crate::live::{LiveEvent, LiveSub, SubKey, Subscriber};
use crate::message::{self, ClientMessage};
use crate::state::{OutboundBytes, Relay};

/// How far an AUTH event's created_at may be from now.
const AUTH_WINDOW_SECS: u64 = 600;
/// Bytes of queued messages the writer hands the socket before one flush.
const WRITE_BATCH_BYTES: usize = 64 << 10;
/// Longest wait for a close frame to go out once the connection is closing.
const CLOSE_FRAME_TIMEOUT: Duration = Duration::from_secs(2);

/// What the writer takes next.
enum Next {
    Send(String),
    /// The outbox is closed: send this close frame (if any) and stop.
    Close(Option<CloseFrame>),
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<String>,
    bytes: usize,
    closed: bool,
    frame: Option<CloseFrame>,
}

/// A connection's outbound queue, bounded in bytes (see the module docs).
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// Wakes the writer.
    ready: Notify,
    /// Wakes stored-result senders waiting for room.
    room: Notify,
    closed: watch::Sender<bool>,
    budget: usize,
    total: Arc<OutboundBytes>,
    total_limit: usize,
}

impl Outbox {
    pub fn new(budget: usize, total: Arc<OutboundBytes>, total_limit: usize) -> Self {
        Self {
            state: Mutex::new(OutboxState::default()),
            ready: Notify::new(),
            room: Notify::new(),
            closed: watch::channel(false).0,
            budget: budget.max(1),
            total,
            total_limit,
        }
    }

    /// What a connection may hold once every connection together is past the total budget:
    /// a sixteenth of its own budget, at least 64 KiB, at most half. Many connections each
    /// just under half their budget would otherwise hold many times the total.
    fn heavy(&self) -> usize {
        (self.budget / 16).max(64 << 10).min(self.budget / 2)
    }

    /// Whether this connection may also hold `held` bytes of stored results read ahead of it
    /// (see `stored_part`). Past the total budget, one holding more than the
    /// [`heavy`](Self::heavy) mark with them is closed, as for a live event.
    pub fn may_hold(&self, held: usize) -> bool {
        let st = self.state.lock();
        if st.closed {
            return false;
        }
        if st.bytes + held > self.heavy() && self.total.get() > self.total_limit {
            drop(st);
            self.shed();
            return false;
        }
        true
    }

    /// Closes a connection holding too much while the relay is past its total budget.
    fn shed(&self) {
        metrics::counter!("orly_slow_consumers_dropped_total", "reason" => "total_budget")
            .increment(1);
        self.close(
            1008,
            "rate-limited: reading too slowly while the relay is short of memory",
        );
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.state.lock().bytes
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn enqueue(&self, st: &mut OutboxState, msg: String) {
        self.enqueue_quietly(st, msg);
        self.ready.notify_one();
    }

    /// Queues without waking the writer (the caller wakes it once for several messages).
    fn enqueue_quietly(&self, st: &mut OutboxState, msg: String) {
        st.bytes += msg.len();
        self.total.add(msg.len());
        st.queue.push_back(msg);
    }

    /// Queues a reply or a live event at once; past the budget the connection is closed
    /// instead. `false`: closed (now or before).
    pub fn push(&self, msg: String) -> bool {
        let mut st = self.state.lock();
        if st.closed {
            return false;
        }
        if st.bytes + msg.len() > self.budget {
            drop(st);
            metrics::counter!("orly_slow_consumers_dropped_total", "reason" => "budget")
                .increment(1);
            self.close(
                1008,
                "rate-limited: reading too slowly: outbound budget exceeded",
            );
            return false;
        }
        if st.bytes > self.heavy() && self.total.get() > self.total_limit {
            drop(st);
            self.shed();
            return false;
        }
        self.enqueue(&mut st, msg);
        true
    }

    /// Queues a stored result, waiting while the outbox is half full (a slow reader slows
    /// its own REQ, nothing else). `false`: the connection closed.
    pub async fn push_stored(&self, mut msg: String) -> bool {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push_stored(msg) {
                Ok(queued) => return queued,
                Err(back) => msg = back,
            }
            room.await;
        }
    }

    /// Where stored results stop and wait: half the budget, or the lower mark while the
    /// relay is short of memory.
    fn stored_room(&self) -> usize {
        if self.total.get() > self.total_limit {
            self.heavy()
        } else {
            self.budget / 2
        }
    }

    /// [`push_stored`](Self::push_stored) without waiting: `Err` gives the message back
    /// when the outbox has no room for it now.
    pub fn try_push_stored(&self, msg: String) -> Result<bool, String> {
        let mut st = self.state.lock();
        if st.closed {
            return Ok(false);
        }
        if st.bytes == 0 || st.bytes + msg.len() <= self.stored_room() {
            self.enqueue(&mut st, msg);
            Ok(true)
        } else {
            Err(msg)
        }
    }

    /// Queues stored results from the front of `frames` while they fit (as
    /// [`try_push_stored`](Self::try_push_stored)) and wakes the writer once for all of them:
    /// queued one at a time, each woke the writer, which sent every event in a system call
    /// and a TCP segment of its own. What does not fit stays in `frames`. `false`: closed.
    pub fn try_push_stored_many(&self, frames: &mut VecDeque<String>) -> bool {
        let mut st = self.state.lock();
        if st.closed {
            return false;
        }
        let room = self.stored_room();
        let mut queued = false;
        while let Some(frame) = frames.pop_front() {
            if st.bytes != 0 && st.bytes + frame.len() > room {
                frames.push_front(frame);
                break;
            }
            self.enqueue_quietly(&mut st, frame);
            queued = true;
        }
        drop(st);
        if queued {
            self.ready.notify_one();
        }
        true
    }

    /// The next queued message if there is one now (none once closed: [`next`](Self::next)
    /// then gives the close frame).
    fn try_next(&self) -> Option<String> {
        let mut st = self.state.lock();
        if st.closed {
            return None;
        }
        let m = st.queue.pop_front()?;
        st.bytes -= m.len();
        self.total.sub(m.len());
        drop(st);
        self.room.notify_waiters();
        Some(m)
    }

    async fn next(&self) -> Next {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(m) = self.try_next() {
                return Next::Send(m);
            }
            {
                let mut st = self.state.lock();
                if st.closed {
                    return Next::Close(st.frame.take());
                }
            }
            ready.await;
        }
    }

    /// Closes with a close frame (`code`, `reason`); what is queued is dropped at once.
    pub fn close(&self, code: u16, reason: &str) {
        self.close_with(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        }));
    }

    fn close_with(&self, frame: Option<CloseFrame>) {
        {
            let mut st = self.state.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            st.frame = frame;
            self.total.sub(st.bytes);
            st.bytes = 0;
            st.queue = VecDeque::new();
        }
        self.closed.send_replace(true);
        self.ready.notify_one();
        self.room.notify_waiters();
    }

    async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.total.sub(self.state.get_mut().bytes);
    }
}

/// The connection as its live subscriptions see it.
struct ConnSink {
    outbox: Arc<Outbox>,
    authed: Arc<RwLock<Vec<PublicKey>>>,
    /// Privileged kinds filtered (not `privileged_open`).
    gate: bool,
    readers: Vec<PublicKey>,
}

impl ConnSink {
    fn may_see(&self, e: &LiveEvent) -> bool {
        !self.gate || e.may_see(&self.authed.read(), &self.readers)
    }
}

impl Subscriber for ConnSink {
    fn deliver(&self, sub_id: &str, e: &LiveEvent) -> bool {
        if !self.may_see(e) {
            return true;
        }
        self.outbox
            .push(message::event_message(sub_id, &e.raw.json))
    }
}

struct OpenSub {
    key: SubKey,
    task: AbortHandle,
}

/// Per-connection state shared with the tasks that process its messages.
struct Conn {
    relay: Arc<Relay>,
    ip: IpAddr,
    challenge: String,
    authed: Arc<RwLock<Vec<PublicKey>>>,
    outbox: Arc<Outbox>,
    sink: Arc<ConnSink>,
    subs: Mutex<HashMap<String, OpenSub>>,
    /// Open NIP-77 sessions (they count against the subscription limit).
    neg_sessions: Mutex<HashSet<String>>,
    /// This connection's id at the negentropy subsystem (unique across relay processes).
    neg_key: String,
    /// Byte permits of this connection's EVENTs in flight (`Limits::event_budget`).
    events_in_flight: Arc<Semaphore>,
    /// The permits `events_in_flight` started with (always room for the largest message).
    event_budget: u32,
    reqs: Arc<Semaphore>,
    bucket: Mutex<TokenBucket>,
}

/// A per-connection EVENT budget.
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Conn {
    fn send(&self, msg: String) {
        // Fails only when the connection is closing.
        let _ = self.outbox.push(msg);
    }

    fn authed(&self) -> Vec<PublicKey> {
        self.authed.read().clone()
    }

    fn open_count(&self) -> usize {
        self.subs.lock().len() + self.neg_sessions.lock().len()
    }

    /// Ends subscription `sub_id` (its stored part too); `true` if it was open.
    fn close_sub(&self, sub_id: &str) -> bool {
        let open = self.subs.lock().remove(sub_id);
        match open {
            Some(o) => {
                o.task.abort();
                self.relay.live.unsubscribe(o.key);
                true
            }
            None => false,
        }
    }

    fn close_all(&self) {
        let subs: Vec<OpenSub> = self.subs.lock().drain().map(|(_, o)| o).collect();
        for o in subs {
            o.task.abort();
            self.relay.live.unsubscribe(o.key);
        }
    }

    fn take_token(&self) -> bool {
        let rate = self.relay.config.limits.events_per_second;
        if rate == 0 {
            return true;
        }
        let mut b = self.bucket.lock();
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * f64::from(rate);
        b.tokens = (b.tokens + refill).min(f64::from(rate));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs a connection until the client leaves, it goes silent, it reads too slowly, or the
/// relay shuts down.
pub async fn run(relay: Arc<Relay>, socket: WebSocket, ip: IpAddr) {
    let limits = relay.config.limits.clone();
    let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let event_budget = limits.event_budget();
    relay.connection_opened();
    let outbox = Arc::new(Outbox::new(
        limits.max_outbound_bytes,
        relay.outbound.clone(),
        limits.max_outbound_bytes_total,
    ));
    let authed = Arc::new(RwLock::new(Vec::new()));
    let sink = Arc::new(ConnSink {
        outbox: outbox.clone(),
        authed: authed.clone(),
        gate: !relay.config.privileged_open,
        readers: relay.config.privileged_readers.clone(),
    });
    let conn = Arc::new(Conn {
        relay: relay.clone(),
        ip,
        challenge: hex::encode(rand::random::<[u8; 16]>()),
        authed,
        outbox: outbox.clone(),
        sink,
        subs: Mutex::new(HashMap::new()),
        neg_sessions: Mutex::new(HashSet::new()),
        neg_key: format!("{}-{conn_id}", relay.instance),
        events_in_flight: Arc::new(Semaphore::new(event_budget as usize)),
        event_budget,
        reqs: Arc::new(Semaphore::new(limits.max_concurrent_reqs.max(1))),
        bucket: Mutex::new(TokenBucket {
            tokens: f64::from(limits.events_per_second),
            last: Instant::now(),
        }),
    });
    tracing::debug!(conn_id, %ip, "connection opened");

    let (sink_half, mut stream) = socket.split();
    let last_seen = Arc::new(AtomicU64::new(now_secs()));
    let writer = tokio::spawn(write_loop(
        sink_half,
        outbox.clone(),
        last_seen.clone(),
        limits.ping_interval,
        limits.write_timeout,
    ));

    conn.send(message::auth_message(&conn.challenge));

    let mut shutdown = relay.shutdown_receiver();
    loop {
        let msg = tokio::select! {
            biased;
            _ = outbox.wait_closed() => break,
            _ = shutdown.wait_for(|s| *s) => {
                outbox.close(1001, "relay shutting down");
                break;
            }
            msg = stream.next() => msg,
        };
        let Some(Ok(msg)) = msg else {
            outbox.close_with(None);
            break;
        };
        last_seen.store(now_secs(), Ordering::Relaxed);
        let handled = async {
            match msg {
                Message::Text(text) => handle_text(&conn, text.as_str()).await,
                Message::Binary(_) => conn.send(message::notice_message(
                    "invalid: binary messages are not supported",
                )),
                Message::Close(_) => conn.outbox.close_with(None),
                Message::Ping(_) | Message::Pong(_) => {}
            }
        };
        // Handling may wait (the ACL, the store, the negentropy service): the close and
        // shutdown signals still end the connection at once.
        tokio::select! {
            biased;
            _ = outbox.wait_closed() => break,
            _ = shutdown.wait_for(|s| *s) => {
                outbox.close(1001, "relay shutting down");
                break;
            }
            _ = handled => {}
        }
    }
    conn.close_all();
    if let Some(neg) = &relay.negentropy {
        neg.close_connection(&conn.neg_key).await;
    }
    drop(stream);
    let _ = writer.await;
    relay.connection_closed();
    tracing::debug!(conn_id, "connection closed");
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    last_seen: Arc<AtomicU64>,
    ping_interval: Duration,
    write_timeout: Duration,
) {
    let mut ping = tokio::time::interval(ping_interval);
    ping.tick().await;
    let silence_limit = ping_interval.as_secs().max(1) * 3;
    loop {
        let msg = tokio::select! {
            next = outbox.next() => match next {
                Next::Send(m) => Message::Text(m.into()),
                Next::Close(frame) => {
                    if let Some(frame) = frame {
                        let wait = write_timeout.min(CLOSE_FRAME_TIMEOUT);
                        let _ = tokio::time::timeout(wait, sink.send(Message::Close(Some(frame)))).await;
                    }
                    break;
                }
            },
            _ = ping.tick() => {
                if now_secs().saturating_sub(last_seen.load(Ordering::Relaxed)) > silence_limit {
                    outbox.close(1001, "idle");
                    continue;
                }
                Message::Ping(Default::default())
            }
        };
        let sent = tokio::select! {
            r = tokio::time::timeout(write_timeout, send_queued(&mut sink, msg, &outbox)) => r,
            // Closed while this send waits on a stalled socket (over budget, shut down): the
            // close frame would not get through either; dropping the socket frees it now.
            _ = outbox.wait_closed() => break,
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                outbox.close_with(None);
                break;
            }
            Err(_) => {
                // The socket took no more for a whole write timeout: a close frame would not
                // get through either. Dropping both halves closes the socket.
                metrics::counter!("orly_slow_consumers_dropped_total", "reason" => "write_timeout")
                    .increment(1);
                tracing::info!("closing a connection whose socket stalled past the write timeout");
                outbox.close_with(None);
                break;
            }
        }
    }
}

/// Sends `first` and what else is queued now (up to [`WRITE_BATCH_BYTES`]) with one flush:
/// a publisher pipelining EVENTs gets its OKs in a few writes instead of one system call each
/// (the socket's write buffer, `WRITE_BUFFER` in `server.rs`, holds frames until the flush).
async fn send_queued(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    first: Message,
    outbox: &Outbox,
) -> Result<(), axum::Error> {
    sink.feed(first).await?;
    let mut bytes = 0;
    while bytes < WRITE_BATCH_BYTES {
        let Some(m) = outbox.try_next() else { break };
        bytes += m.len();
        sink.feed(Message::Text(m.into())).await?;
    }
    sink.flush().await
}

async fn handle_text(conn: &Arc<Conn>, text: &str) {
    let limits = &conn.relay.config.limits;
    if text.len() > limits.max_message_size {
        metrics::counter!("orly_messages_refused_total", "reason" => "too_large").increment(1);
        let reason = format!(
            "invalid: message of {} bytes exceeds the limit of {} bytes",
            text.len(),
            limits.max_message_size
        );
        // A NIP-77 message names its session: answer that session with NEG-ERR.
        if text.trim_start().starts_with("[\"NEG-") {
            if let Ok(
                ClientMessage::NegOpen { sub_id, .. } | ClientMessage::NegMsg { sub_id, .. },
            ) = message::parse(text)
            {
                let reason = reason.replacen("invalid:", "blocked:", 1);
                conn.neg_sessions.lock().remove(&sub_id);
                conn.send(message::neg_err_message(&sub_id, &reason));
                return;
            }
        }
        if text.trim_start().starts_with("[\"EVENT\"") {
            if let Some(id) = message::sniff_event_id(text) {
                conn.send(message::ok_message(&id, false, &reason));
                return;
            }
        }
        conn.send(message::notice_message(&reason));
        return;
    }
    let parsed = match message::parse(text) {
        Ok(m) => m,
        Err(e) => {
            let msg = match e.sub_id {
                Some(sub) if e.negentropy => message::neg_err_message(&sub, &e.message),
                Some(sub) => message::closed_message(&sub, &e.message),
                None => message::notice_message(&e.message),
            };
            conn.send(msg);
            return;
        }
    };
    match parsed {
        ClientMessage::Event(raw) => spawn_event(conn, raw).await,
        ClientMessage::Req { sub_id, filters } => {
            wait_for_events(conn).await;
            handle_req(conn, sub_id, filters).await;
        }
        ClientMessage::Count { sub_id, filters } => {
            wait_for_events(conn).await;
            handle_count(conn, sub_id, filters).await;
        }
        ClientMessage::Close(sub_id) => {
            conn.close_sub(&sub_id);
        }
        ClientMessage::Auth(raw) => handle_auth(conn, raw),
        ClientMessage::NegOpen {
            sub_id,
            filter,
            message,
        } => {
            wait_for_events(conn).await;
            let reply = neg_open(conn, &sub_id, filter, &message).await;
            conn.send(reply);
        }
        ClientMessage::NegMsg { sub_id, message } => {
            let reply = neg_msg(conn, &sub_id, &message).await;
            conn.send(reply);
        }
        ClientMessage::NegClose(sub_id) => {
            conn.neg_sessions.lock().remove(&sub_id);
            if let Some(neg) = &conn.relay.negentropy {
                neg.close(&conn.neg_key, &sub_id).await;
            }
        }
    }
}

/// The NIP-77 handler, or the NEG-ERR for a relay without one.
fn negentropy_handler(
    conn: &Conn,
    sub_id: &str,
) -> Result<Arc<dyn orly_sync_negentropy::NegentropyHandler>, String> {
    conn.relay.negentropy.clone().ok_or_else(|| {
        message::neg_err_message(
            sub_id,
            "blocked: NIP-77 negentropy is not enabled on this relay",
        )
    })
}

fn neg_reply(
    conn: &Conn,
    sub_id: &str,
    result: Result<orly_sync_negentropy::NegReply, orly_sync_negentropy::NegError>,
) -> String {
    match result {
        Ok(reply) => message::neg_msg_message(sub_id, &hex::encode(reply.message)),
        Err(e) => {
            metrics::counter!("orly_negentropy_errors_total").increment(1);
            // A NEG-ERR ends the session.
            conn.neg_sessions.lock().remove(sub_id);
            message::neg_err_message(sub_id, &e.reason())
        }
    }
}

fn decode_neg_hex(sub_id: &str, hex_message: &str) -> Result<Vec<u8>, String> {
    hex::decode(hex_message).map_err(|e| {
        message::neg_err_message(sub_id, &format!("invalid: malformed hex message: {e}"))
    })
}

/// NEG-OPEN: the filter is read-checked like a REQ's (privileged kinds only for their
/// parties), the session counts against the subscription limit, then it starts.
async fn neg_open(conn: &Conn, sub_id: &str, raw_filter: &RawValue, hex_message: &str) -> String {
    let neg = match negentropy_handler(conn, sub_id) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    let filter = match checked_filters(conn, &[raw_filter]).await {
        Ok(mut f) => f.remove(0),
        Err(reason) => return message::neg_err_message(sub_id, &reason),
    };
    if !conn.relay.config.privileged_open
        && names_privileged_kind(std::slice::from_ref(&filter))
        && !restricted_to_caller(
            &filter,
            &conn.authed(),
            &conn.relay.config.privileged_readers,
        )
    {
        return message::neg_err_message(
            sub_id,
            "restricted: privileged kinds are reconciled only for their parties: name yourself in authors or #p",
        );
    }
    let initial = match decode_neg_hex(sub_id, hex_message) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let max = conn.relay.config.limits.max_subscriptions;
    {
        let subs = conn.subs.lock().len();
        let mut neg = conn.neg_sessions.lock();
        if !neg.contains(sub_id) && subs + neg.len() >= max {
            return message::neg_err_message(
                sub_id,
                &format!(
                    "blocked: too many open subscriptions and NIP-77 sessions (at most {max})"
                ),
            );
        }
        neg.insert(sub_id.to_string());
    }
    neg_reply(
        conn,
        sub_id,
        neg.open(&conn.neg_key, sub_id, &filter, &initial).await,
    )
}

async fn neg_msg(conn: &Conn, sub_id: &str, hex_message: &str) -> String {
    let neg = match negentropy_handler(conn, sub_id) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    let msg = match decode_neg_hex(sub_id, hex_message) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    neg_reply(conn, sub_id, neg.message(&conn.neg_key, sub_id, &msg).await)
}

/// Waits until this connection's EVENTs in flight are answered, so a REQ sees them.
async fn wait_for_events(conn: &Conn) {
    if let Ok(all) = conn.events_in_flight.acquire_many(conn.event_budget).await {
        drop(all);
    }
}

async fn spawn_event(conn: &Arc<Conn>, raw: &RawValue) {
    let cost = u32::try_from(
        raw.get()
            .len()
            .saturating_add(crate::config::EVENT_OVERHEAD),
    )
    .unwrap_or(u32::MAX)
    .min(conn.event_budget);
    let Ok(permit) = conn.events_in_flight.clone().acquire_many_owned(cost).await else {
        return;
    };
    // Every connection's EVENTs together stay within the relay's total too: past it this
    // connection is not read until the store catches up (TCP slows its publisher).
    let Ok(shared) = conn
        .relay
        .events_in_flight
        .clone()
        .acquire_many_owned(cost)
        .await
    else {
        return;
    };
    let relay = &conn.relay;
    relay
        .event_bursts
        .observe(relay.events_total - relay.events_in_flight.available_permits());
    let raw = raw.get().to_string();
    let conn = conn.clone();
    tokio::spawn(async move {
        let reply = ingest(&conn, raw).await;
        conn.send(reply);
        drop((permit, shared));
        // The last EVENT of a burst answered: what the burst allocated goes back to the OS.
        let relay = &conn.relay;
        if relay.events_in_flight.available_permits() == relay.events_total {
            relay.event_bursts.settled();
        }
    });
}

/// Validates, authorizes and stores (or, ephemeral, publishes) one EVENT; returns the
/// message to send back. Live delivery is the feed's: nothing here waits for it.
async fn ingest(conn: &Conn, raw: String) -> String {
    let relay = &conn.relay;
    let limits = &relay.config.limits;
    let event = match Event::from_json(&raw) {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("invalid: malformed event: {e}");
            return match message::sniff_event_id(&raw) {
                Some(id) => message::ok_message(&id, false, &reason),
                None => message::notice_message(&reason),
            };
        }
    };
    // Parsed: the received text is not needed while the event waits for the store.
    drop(raw);
    let id = event.id.to_hex();
    let refuse = |reason: &str| {
        metrics::counter!("orly_events_total", "result" => "refused").increment(1);
        message::ok_message(&id, false, reason)
    };
    if !crate::verify::id_matches(&event) {
        return refuse("invalid: event id does not match its content");
    }
    if !relay.verifier.signature_ok(&event) {
        return refuse("invalid: bad signature");
    }
    if event.tags.len() > limits.max_event_tags {
        return refuse(&format!(
            "invalid: more than {} tags",
            limits.max_event_tags
        ));
    }
    if event.created_at.as_secs() > now_secs() + limits.created_at_future_limit.as_secs() {
        return refuse("invalid: created_at is too far in the future");
    }
    if event.kind == Kind::Authentication {
        return refuse("invalid: AUTH events are sent with AUTH, not EVENT");
    }
    if !conn.take_token() {
        return refuse("rate-limited: slow down, too many events per second");
    }
    let authed = conn.authed();
    if (relay.config.auth_required || relay.config.auth_to_write) && authed.is_empty() {
        conn.send(message::auth_message(&conn.challenge));
        return refuse("auth-required: this relay requires authentication to publish");
    }
    if event.is_protected() && !authed.contains(&event.pubkey) {
        conn.send(message::auth_message(&conn.challenge));
        return refuse(
            "auth-required: this event is protected; authenticate as its author to publish it",
        );
    }
    let ctx = AccessContext {
        authed: &authed,
        ip: conn.ip,
    };
    if let Decision::Deny(reason) = relay.acl.check_write(&ctx, &event).await {
        return refuse(&reason);
    }
    // Serialized once: what the store keeps and every reader gets, byte for byte.
    let json = event.as_json();
    if event.kind.is_ephemeral() {
        return match relay
            .store
            .publish_ephemeral(RawEvent::new(0, &event, json))
            .await
        {
            Ok(()) => {
                metrics::counter!("orly_events_total", "result" => "ephemeral").increment(1);
                message::ok_message(&id, true, "")
            }
            Err(e) => {
                tracing::warn!(error = %e, event_id = %id, "could not publish an ephemeral event");
                refuse("error: could not publish the event: storage unavailable, try again")
            }
        };
    }
    if let Some(hooks) = &relay.sync {
        if let Err(reason) = hooks.before_store(&event).await {
            return refuse(&reason);
        }
    }
    match relay.store.save_json(&event, &json).await {
        Ok(SaveOutcome::Stored { .. }) => {
            metrics::counter!("orly_events_total", "result" => "stored").increment(1);
            // Before the OK, so an admin's new follow list applies by the time it is acked.
            relay.acl.on_event_stored(&event).await;
            message::ok_message(&id, true, "")
        }
        Ok(SaveOutcome::Duplicate) => {
            metrics::counter!("orly_events_total", "result" => "duplicate").increment(1);
            message::ok_message(&id, true, "duplicate: already have this event")
        }
        Ok(SaveOutcome::Rejected(reason)) => refuse(&reason),
        Err(e) => {
            tracing::warn!(error = %e, event_id = %id, "could not store event");
            refuse("error: could not store the event: storage unavailable, try again")
        }
    }
}

/// Parses and checks the filters of a REQ, COUNT or NEG-OPEN; `Err` is the refusal.
async fn checked_filters(conn: &Conn, raw: &[&RawValue]) -> Result<Vec<Filter>, String> {
    let relay = &conn.relay;
    let limits = &relay.config.limits;
    if raw.len() > limits.max_filters {
        return Err(format!(
            "invalid: {} filters exceed the limit of {}",
            raw.len(),
            limits.max_filters
        ));
    }
    let authed = conn.authed();
    if relay.config.auth_required && authed.is_empty() {
        conn.send(message::auth_message(&conn.challenge));
        return Err("auth-required: this relay requires authentication to read".into());
    }
    let mut filters = Vec::with_capacity(raw.len());
    for r in raw {
        let f = message::parse_filter(r)?;
        let too_many = |n: Option<usize>| n.is_some_and(|n| n > limits.max_filter_values);
        if too_many(f.ids.as_ref().map(|s| s.len()))
            || too_many(f.authors.as_ref().map(|s| s.len()))
            || too_many(f.kinds.as_ref().map(|s| s.len()))
            || f.generic_tags
                .values()
                .any(|v| v.len() > limits.max_filter_values)
        {
            return Err(format!(
                "invalid: a filter field has more than {} values",
                limits.max_filter_values
            ));
        }
        filters.push(f);
    }
    if !relay.config.privileged_open && authed.is_empty() && names_privileged_kind(&filters) {
        conn.send(message::auth_message(&conn.challenge));
        return Err(
            "auth-required: privileged kinds are served only to their parties; authenticate first"
                .into(),
        );
    }
    let ctx = AccessContext {
        authed: &authed,
        ip: conn.ip,
    };
    match relay.acl.check_read(&ctx, &filters).await {
        Decision::Allow => Ok(filters),
        Decision::Deny(reason) => Err(reason),
    }
}

/// Does a filter ask for a privileged kind by name?
fn names_privileged_kind(filters: &[Filter]) -> bool {
    filters.iter().any(|f| {
        f.kinds
            .as_ref()
            .is_some_and(|ks| ks.iter().any(|k| privileged::is_privileged(*k)))
    })
}

/// Can `f` match privileged events only of the caller's: its authors, or its `#p`
/// recipients, are all authenticated keys (or the caller is a privileged reader)?
fn restricted_to_caller(f: &Filter, authed: &[PublicKey], readers: &[PublicKey]) -> bool {
    if authed.is_empty() {
        return false;
    }
    if authed.iter().any(|a| readers.contains(a)) {
        return true;
    }
    let authors_ok = f
        .authors
        .as_ref()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|a| authed.contains(a)));
    let p = SingleLetterTag::lowercase(nostr::Alphabet::P);
    let recipients_ok = f.generic_tags.get(&p).is_some_and(|s| {
        !s.is_empty()
            && s.iter()
                .all(|v| authed.iter().any(|a| a.to_hex().eq_ignore_ascii_case(v)))
    });
    authors_ok || recipients_ok
}

async fn handle_req(conn: &Arc<Conn>, sub_id: String, raw: Vec<&RawValue>) {
    let relay = &conn.relay;
    let limits = &relay.config.limits;
    let filters = match checked_filters(conn, &raw).await {
        Ok(f) => f,
        Err(reason) => {
            conn.close_sub(&sub_id);
            conn.send(message::closed_message(&sub_id, &reason));
            return;
        }
    };
    // A REQ with an open subscription's id replaces it.
    conn.close_sub(&sub_id);
    if conn.open_count() >= limits.max_subscriptions {
        conn.send(message::closed_message(
            &sub_id,
            &format!(
                "blocked: too many open subscriptions (at most {})",
                limits.max_subscriptions
            ),
        ));
        return;
    }
    if relay.outbound.get() > limits.max_outbound_bytes_total {
        metrics::counter!("orly_reqs_refused_total", "reason" => "total_budget").increment(1);
        conn.send(message::closed_message(
            &sub_id,
            "rate-limited: the relay is sending too much right now; try again shortly",
        ));
        return;
    }
    let sub = relay.live.subscribe(&sub_id, &filters, conn.sink.clone());
    let key = sub.key;
    let task = tokio::spawn(stored_part(conn.clone(), sub, filters));
    conn.subs.lock().insert(
        sub_id,
        OpenSub {
            key,
            task: task.abort_handle(),
        },
    );
}

enum StoredError {
    Store(orly_db::StoreError),
    Closed,
}

/// A REQ's stored results read ahead of a slow client, counted in the relay's outbound
/// total while they wait (and uncounted when sent or dropped).
struct HeldFrames {
    frames: VecDeque<String>,
    bytes: usize,
    total: Arc<OutboundBytes>,
}

impl HeldFrames {
    fn new(total: Arc<OutboundBytes>) -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            total,
        }
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push(&mut self, frame: String) {
        self.bytes += frame.len();
        self.total.add(frame.len());
        self.frames.push_back(frame);
    }

    fn pop(&mut self) -> Option<String> {
        let frame = self.frames.pop_front()?;
        self.bytes -= frame.len();
        self.total.sub(frame.len());
        Some(frame)
    }
}

impl Drop for HeldFrames {
    fn drop(&mut self) {
        self.total.sub(self.bytes);
    }
}

/// Queues a chunk of a REQ's results; what the outbox has no room for now is read ahead
/// into `held`, which the connection may be closed for holding.
fn queue_chunk(
    conn: &Conn,
    chunk: &mut VecDeque<String>,
    held: &mut HeldFrames,
) -> Result<(), StoredError> {
    if !conn.outbox.try_push_stored_many(chunk) {
        return Err(StoredError::Closed);
    }
    if chunk.is_empty() {
        return Ok(());
    }
    for frame in chunk.drain(..) {
        held.push(frame);
    }
    if conn.outbox.may_hold(held.bytes) {
        Ok(())
    } else {
        Err(StoredError::Closed)
    }
}

/// A REQ's stored part: the query, EOSE, then the handover to live delivery.
async fn stored_part(conn: Arc<Conn>, sub: Arc<LiveSub>, filters: Vec<Filter>) {
    let relay = conn.relay.clone();
    let limits = &relay.config.limits;
    let sub_id = sub.sub_id.clone();
    let Ok(_turn) = conn.reqs.clone().acquire_owned().await else {
        return;
    };
    // NIP-11 max_limit: larger limits are clamped; filters without one get the default.
    let stored: Vec<Filter> = filters
        .into_iter()
        .filter(|f| f.limit != Some(0))
        .map(|mut f| {
            f.limit = Some(
                f.limit
                    .unwrap_or(limits.default_limit)
                    .min(limits.max_limit),
            );
            f
        })
        .collect();
    let started = Instant::now();
    let work = async {
        let from = relay.live.wait_started().await;
        if stored.is_empty() {
            // Nothing stored to send: live from the feed's position now.
            return Ok(sub.registered_after().max(from));
        }
        let mut answer = relay
            .store
            .query_stream(&stored)
            .await
            .map_err(StoredError::Store)?;
        metrics::histogram!("orly_req_seconds").record(started.elapsed().as_secs_f64());
        // Results stream from the store's cursor while the client keeps up. Once its outbox
        // is half full the rest is read ahead into `held`, so that the store's connection
        // goes back to its pool instead of waiting on a client that may never read (a
        // handful of those would otherwise hold every read connection). `held` counts toward
        // the total outbound budget: past it new REQs are refused, and a slow connection
        // reading ahead is closed.
        let mut held = HeldFrames::new(relay.outbound.clone());
        // Results reach the outbox a chunk at a time (see `Outbox::try_push_stored_many`).
        let mut chunk = VecDeque::new();
        let mut chunk_bytes = 0;
        while let Some(ev) = answer.events.next().await {
            let ev = ev.map_err(StoredError::Store)?;
            if conn.sink.gate && privileged::is_privileged(Kind::from(ev.kind)) {
                let readable =
                    LiveEvent::new(Arc::new(ev.clone())).is_ok_and(|e| conn.sink.may_see(&e));
                if !readable {
                    continue;
                }
            }
            let frame = message::event_message(&sub_id, &ev.json);
            if held.is_empty() {
                chunk_bytes += frame.len();
                chunk.push_back(frame);
                if chunk_bytes >= WRITE_BATCH_BYTES {
                    queue_chunk(&conn, &mut chunk, &mut held)?;
                    chunk_bytes = 0;
                }
                continue;
            }
            held.push(frame);
            if !conn.outbox.may_hold(held.bytes) {
                return Err(StoredError::Closed);
            }
        }
        queue_chunk(&conn, &mut chunk, &mut held)?;
        let serial = answer.serial;
        drop(answer);
        while let Some(frame) = held.pop() {
            if !conn.outbox.push_stored(frame).await {
                return Err(StoredError::Closed);
            }
        }
        Ok(serial)
    };
    let outcome = tokio::time::timeout(limits.query_timeout, work).await;
    let reason = match outcome {
        Ok(Ok(serial)) => {
            conn.send(message::eose_message(&sub_id));
            match sub.go_live(serial) {
                Ok(()) => return,
                Err(e) => e.to_string(),
            }
        }
        Ok(Err(StoredError::Closed)) => return,
        Ok(Err(StoredError::Store(e))) => {
            tracing::warn!(error = %e, sub_id = %sub_id, "query failed");
            "error: could not query events: storage unavailable, try again".to_string()
        }
        Err(_) => {
            metrics::counter!("orly_reqs_refused_total", "reason" => "deadline").increment(1);
            format!(
                "error: the query took longer than {} s; narrow the filters",
                limits.query_timeout.as_secs_f64()
            )
        }
    };
    // This task ends here; take the subscription out unless a newer REQ replaced it.
    {
        let mut subs = conn.subs.lock();
        if subs.get(&*sub_id).is_some_and(|o| o.key == sub.key) {
            subs.remove(&*sub_id);
        }
    }
    relay.live.unsubscribe(sub.key);
    conn.send(message::closed_message(&sub_id, &reason));
}

/// How a COUNT filter is counted under the privileged-kind gate.
enum Counted {
    /// As asked.
    Whole(Filter),
    /// Counts `0` minus `1`: the filter without the privileged events it would match.
    Minus(Filter, Filter),
}

/// The gate of REQ applied to COUNT: privileged events are counted only for their parties.
fn gated_counts(filters: Vec<Filter>, authed: &[PublicKey], readers: &[PublicKey]) -> Vec<Counted> {
    let privileged_kinds: std::collections::BTreeSet<Kind> = privileged::PRIVILEGED_KINDS
        .iter()
        .map(|k| Kind::from(*k))
        .collect();
    let mut out = Vec::new();
    for f in filters {
        if restricted_to_caller(&f, authed, readers) {
            out.push(Counted::Whole(f));
            continue;
        }
        match &f.kinds {
            Some(kinds) if !kinds.is_empty() => {
                let open: std::collections::BTreeSet<Kind> = kinds
                    .iter()
                    .filter(|k| !privileged::is_privileged(**k))
                    .copied()
                    .collect();
                // A filter of privileged kinds only counts nothing (an empty set would mean
                // every kind).
                if !open.is_empty() {
                    let mut f = f;
                    f.kinds = Some(open);
                    out.push(Counted::Whole(f));
                }
            }
            _ => {
                let mut only_privileged = f.clone();
                only_privileged.kinds = Some(privileged_kinds.clone());
                out.push(Counted::Minus(f, only_privileged));
            }
        }
    }
    out
}

async fn handle_count(conn: &Arc<Conn>, sub_id: String, raw: Vec<&RawValue>) {
    let filters = match checked_filters(conn, &raw).await {
        Ok(f) => f,
        Err(reason) => {
            conn.send(message::closed_message(&sub_id, &reason));
            return;
        }
    };
    let conn = conn.clone();
    // Off the reader, like a REQ's stored part.
    tokio::spawn(async move {
        let Ok(_turn) = conn.reqs.clone().acquire_owned().await else {
            return;
        };
        let store = &conn.relay.store;
        let count = async {
            if conn.relay.config.privileged_open {
                return store.count(&filters).await;
            }
            let counted = gated_counts(
                filters.clone(),
                &conn.authed(),
                &conn.relay.config.privileged_readers,
            );
            if counted.iter().all(|c| matches!(c, Counted::Whole(_))) {
                let whole: Vec<Filter> = counted
                    .into_iter()
                    .filter_map(|c| match c {
                        Counted::Whole(f) => Some(f),
                        Counted::Minus(..) => None,
                    })
                    .collect();
                if whole.is_empty() {
                    return Ok(0);
                }
                return store.count(&whole).await;
            }
            // Each filter on its own (a sum, where the union would need the events).
            let mut total = 0u64;
            for c in counted {
                total += match c {
                    Counted::Whole(f) => store.count(&[f]).await?,
                    Counted::Minus(f, minus) => {
                        let all = store.count(&[f]).await?;
                        all.saturating_sub(store.count(&[minus]).await?)
                    }
                };
            }
            Ok(total)
        };
        let timeout = conn.relay.config.limits.query_timeout;
        match tokio::time::timeout(timeout, count).await {
            Ok(Ok(n)) => conn.send(message::count_message(&sub_id, n)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, sub_id, "count failed");
                conn.send(message::closed_message(
                    &sub_id,
                    "error: could not count events: storage unavailable, try again",
                ));
            }
            Err(_) => conn.send(message::closed_message(
                &sub_id,
                "error: the count took too long; narrow the filters",
            )),
        }
    });
}

/// NIP-42: a signed kind-22242 event naming our challenge and this relay.
fn handle_auth(conn: &Conn, raw: &RawValue) {
    let event = match Event::from_json(raw.get()) {
        Ok(e) => e,
        Err(e) => {
            conn.send(message::notice_message(&format!(
                "invalid: malformed AUTH event: {e}"
            )));
            return;
        }
    };
    let id = event.id.to_hex();
    let reply = match check_auth(conn, &event) {
        Ok(()) => {
            let mut authed = conn.authed.write();
            if !authed.contains(&event.pubkey) {
                authed.push(event.pubkey);
            }
            tracing::debug!(pubkey = %event.pubkey, "authenticated");
            message::ok_message(&id, true, "")
        }
        Err(reason) => message::ok_message(&id, false, &reason),
    };
    conn.send(reply);
}

fn check_auth(conn: &Conn, event: &Event) -> Result<(), String> {
    if event.kind != Kind::Authentication {
        return Err("invalid: AUTH needs a kind 22242 event".into());
    }
    if event.verify().is_err() {
        return Err("invalid: bad event id or signature".into());
    }
    if event.created_at.as_secs().abs_diff(now_secs()) > AUTH_WINDOW_SECS {
        return Err("invalid: AUTH event created_at is not recent".into());
    }
    let tag = |name: &str| {
        event
            .tags
            .find(TagKind::custom(name))
            .and_then(|t| t.content())
            .map(str::to_string)
    };
    if tag("challenge").as_deref() != Some(conn.challenge.as_str()) {
        return Err("invalid: AUTH challenge does not match".into());
    }
    let Some(relay_tag) = tag("relay") else {
        return Err("invalid: AUTH event has no relay tag".into());
    };
    if let Some(ours) = &conn.relay.config.relay_url {
        if normalize_url(ours) != normalize_url(&relay_tag) {
            return Err(format!("invalid: AUTH relay tag must be {ours}"));
        }
    }
    Ok(())
}

fn normalize_url(u: &str) -> String {
    u.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(budget: usize) -> (Arc<Outbox>, Arc<OutboundBytes>) {
        let total = Arc::new(OutboundBytes::default());
        (
            Arc::new(Outbox::new(budget, total.clone(), usize::MAX)),
            total,
        )
    }

    #[tokio::test]
    async fn a_full_outbox_closes_and_frees_what_it_held() {
        let (o, total) = outbox(100);
        assert!(o.push("x".repeat(60)));
        assert_eq!(total.get(), 60);
        assert!(!o.push("y".repeat(60)), "over the budget");
        assert!(o.is_closed());
        assert_eq!(o.bytes(), 0);
        assert_eq!(total.get(), 0, "queued data freed at once");
        match o.next().await {
            Next::Close(Some(f)) => {
                assert_eq!(f.code, 1008);
                assert!(
                    f.reason.as_str().starts_with("rate-limited: "),
                    "{}",
                    f.reason
                );
            }
            _ => panic!("expected a close frame"),
        }
        assert!(!o.push("z".into()));
    }

    #[tokio::test]
    async fn stored_results_wait_at_half_the_budget_and_go_on_when_drained() {
        let (o, _) = outbox(100);
        assert!(o.push_stored("a".repeat(40)).await);
        let o2 = o.clone();
        let waiting = tokio::spawn(async move { o2.push_stored("b".repeat(40)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "should wait for room");
        assert_eq!(o.bytes(), 40);
        assert!(matches!(o.next().await, Next::Send(m) if m.len() == 40));
        assert!(waiting.await.unwrap());
        assert_eq!(o.bytes(), 40);
        // A closing outbox releases its waiters.
        let o3 = o.clone();
        let blocked = tokio::spawn(async move { o3.push_stored("d".repeat(60)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        o.close(1001, "bye");
        assert!(!blocked.await.unwrap());
    }

    #[tokio::test]
    async fn past_the_total_budget_only_heavy_connections_are_closed() {
        let total = Arc::new(OutboundBytes::default());
        let light = Outbox::new(1000, total.clone(), 500);
        let heavy = Outbox::new(1000, total.clone(), 500);
        assert!(heavy.push("h".repeat(600)));
        // The total is over its limit; the light connection still gets its events.
        assert!(light.push("l".repeat(10)));
        assert!(!heavy.push("h".into()));
        assert!(heavy.is_closed());
        assert!(!light.is_closed());
        assert_eq!(total.get(), 10);
    }

    #[tokio::test]
    async fn stored_results_are_queued_together_up_to_the_room() {
        let (o, total) = outbox(100);
        let mut frames: VecDeque<String> =
            ["a", "b", "c", "d"].iter().map(|c| c.repeat(20)).collect();
        // Half the budget (50 bytes) takes two frames of 20; the rest stays, in order.
        assert!(o.try_push_stored_many(&mut frames));
        assert_eq!(o.bytes(), 40);
        assert_eq!(total.get(), 40);
        assert_eq!(frames, ["c".repeat(20), "d".repeat(20)]);
        assert_eq!(o.try_next(), Some("a".repeat(20)));
        assert_eq!(o.try_next(), Some("b".repeat(20)));
        // An empty outbox takes a frame larger than the room, as `try_push_stored` does.
        let mut big: VecDeque<String> = [("e".repeat(70))].into_iter().collect();
        assert!(o.try_push_stored_many(&mut big));
        assert!(big.is_empty());
        assert_eq!(o.bytes(), 70);
        o.close(1000, "bye");
        assert!(!o.try_push_stored_many(&mut frames));
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn held_frames_count_toward_the_total_until_sent_or_dropped() {
        let total = Arc::new(OutboundBytes::default());
        let o = Outbox::new(100, total.clone(), usize::MAX);
        assert_eq!(o.try_push_stored("a".repeat(40)), Ok(true));
        // Half the budget is taken: the next stored result is given back, not queued.
        assert_eq!(o.try_push_stored("b".repeat(40)), Err("b".repeat(40)));
        let mut held = HeldFrames::new(total.clone());
        held.push("b".repeat(40));
        held.push("c".repeat(30));
        assert_eq!(total.get(), 110);
        assert_eq!(held.pop().as_deref(), Some("b".repeat(40).as_str()));
        assert_eq!(total.get(), 70);
        drop(held);
        assert_eq!(total.get(), 40);
        o.close(1001, "bye");
        assert_eq!(o.try_push_stored("d".into()), Ok(false));
        assert_eq!(total.get(), 0);

        // Past the total budget, a connection may not read ahead beyond the heavy mark.
        let o = Outbox::new(1000, total.clone(), 100);
        assert!(o.push("e".repeat(200)));
        assert!(o.may_hold(300), "at the heavy mark (half of 1000)");
        assert!(!o.may_hold(301));
        assert!(o.is_closed());
        assert_eq!(total.get(), 0);
    }

    #[tokio::test]
    async fn past_the_total_budget_connections_may_hold_a_sixteenth_of_their_budget() {
        let total = Arc::new(OutboundBytes::default());
        let budget = 16 << 20;
        let a = Arc::new(Outbox::new(budget, total.clone(), 4 << 20));
        let b = Outbox::new(budget, total.clone(), 4 << 20);
        // Under the total, each holds up to its own budget.
        assert!(a.push("a".repeat(3 << 20)));
        assert!(b.push("b".repeat(1536 << 10)));
        // Over it (4.5 MiB > 4 MiB), stored results wait once a connection holds 1 MiB (a
        // sixteenth of its budget), not 8 MiB.
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.push_stored("s".repeat(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        // And a live event for a connection holding more than 1 MiB closes it.
        assert!(!b.push("b".into()));
        assert!(b.is_closed());
        a.close(1001, "bye");
        assert!(!waiting.await.unwrap());
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn count_gate_keeps_privileged_events_to_their_parties() {
        let me = nostr::Keys::generate().public_key();
        let other = nostr::Keys::generate().public_key();
        let dms = Filter::new().kinds([Kind::from(4), Kind::from(1)]);
        // A stranger counting DMs to someone else: the DM kind is dropped.
        let c = gated_counts(vec![dms.clone().pubkey(other)], &[me], &[]);
        match &c[..] {
            [Counted::Whole(f)] => {
                assert_eq!(f.kinds.as_ref().unwrap().len(), 1);
                assert!(f.kinds.as_ref().unwrap().contains(&Kind::from(1)));
            }
            _ => panic!("expected one trimmed filter"),
        }
        // Only privileged kinds: nothing is counted.
        let c = gated_counts(
            vec![Filter::new().kind(Kind::from(4)).pubkey(other)],
            &[me],
            &[],
        );
        assert!(c.is_empty());
        // No kinds: privileged events are subtracted.
        let c = gated_counts(vec![Filter::new().pubkey(other)], &[me], &[]);
        assert!(matches!(&c[..], [Counted::Minus(..)]));
        // The caller's own DMs count whole.
        let c = gated_counts(vec![dms.clone().pubkey(me)], &[me], &[]);
        assert!(matches!(&c[..], [Counted::Whole(f)] if f.kinds.as_ref().unwrap().len() == 2));
        let c = gated_counts(vec![dms.author(me)], &[me], &[]);
        assert!(matches!(&c[..], [Counted::Whole(_)]));
        // A privileged reader counts everything.
        let c = gated_counts(vec![Filter::new().kind(Kind::from(4))], &[me], &[me]);
        assert!(matches!(&c[..], [Counted::Whole(_)]));
    }
}
