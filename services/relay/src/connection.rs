//! One WebSocket connection: reads client messages, answers them, and carries its live
//! subscriptions' events, with bounded queues and keep-alive pings. Access decisions come
//! from the relay's ACL; privileged kinds (DMs, gift wraps, ...) reach only their parties.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use nostr::{Event, Filter, JsonUtil, Kind, PublicKey, TagKind};
use orly_db::SaveOutcome;
use parking_lot::RwLock;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, Semaphore};

use orly_acl::privileged;

use crate::acl::{AccessContext, Decision};
use crate::message::{self, ClientMessage};
use crate::server::Relay;
use crate::subscriptions::ConnHandle;

/// EVENTs of one connection processed at once (verification and storage overlap).
const EVENT_CONCURRENCY: u32 = 32;
/// How far an AUTH event's created_at may be from now.
const AUTH_WINDOW_SECS: u64 = 600;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Per-connection state shared with the tasks that process its EVENTs.
struct Conn {
    relay: Arc<Relay>,
    ip: IpAddr,
    challenge: String,
    /// NIP-42 identities, shared with the writer (which filters live privileged events).
    authed: Arc<RwLock<Vec<PublicKey>>>,
    /// Replies (OK, EOSE, CLOSED, stored events): awaited, so a slow reader slows only itself.
    out: mpsc::Sender<String>,
    handle: Arc<ConnHandle>,
    /// This connection's id at the negentropy subsystem (unique across relay processes).
    neg_key: String,
    events_in_flight: Arc<Semaphore>,
    bucket: parking_lot::Mutex<TokenBucket>,
}

/// A per-connection EVENT budget.
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl Conn {
    async fn send(&self, msg: String) {
        // Fails only when the writer is gone, i.e. the connection is closing.
        let _ = self.out.send(msg).await;
    }

    fn authed(&self) -> Vec<PublicKey> {
        self.authed.read().clone()
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
    let (out_tx, out_rx) = mpsc::channel::<String>(limits.send_queue);
    let (live_tx, live_rx) = mpsc::channel::<String>(limits.send_queue);
    let handle = Arc::new(ConnHandle::new(live_tx));
    let conn_id = relay.registry.register(handle.clone());
    metrics::gauge!("orly_connections").increment(1.0);

    let challenge = hex::encode(rand::random::<[u8; 16]>());
    let authed = Arc::new(RwLock::new(Vec::new()));
    let conn = Arc::new(Conn {
        relay: relay.clone(),
        ip,
        challenge,
        authed: authed.clone(),
        out: out_tx,
        handle: handle.clone(),
        neg_key: format!("{}-{conn_id}", relay.instance),
        events_in_flight: Arc::new(Semaphore::new(EVENT_CONCURRENCY as usize)),
        bucket: parking_lot::Mutex::new(TokenBucket {
            tokens: f64::from(limits.events_per_second),
            last: Instant::now(),
        }),
    });
    tracing::debug!(conn_id, %ip, "connection opened");

    let (sink, mut stream) = socket.split();
    let last_seen = Arc::new(AtomicU64::new(now_secs()));
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<CloseFrame>();
    let privileged = (!relay.config.privileged_open).then(|| PrivilegedGate {
        authed,
        readers: relay.config.privileged_readers.clone(),
    });
    let mut writer = tokio::spawn(write_loop(
        sink,
        out_rx,
        live_rx,
        close_rx,
        last_seen.clone(),
        limits.ping_interval,
        privileged,
    ));

    conn.send(message::auth_message(&conn.challenge)).await;

    let mut shutdown = relay.shutdown_receiver();
    let mut writer_done = false;
    let close = loop {
        tokio::select! {
            // The writer ends on a failed send or a silent peer: the connection is over.
            _ = &mut writer => {
                writer_done = true;
                break None;
            }
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { break None };
                last_seen.store(now_secs(), Ordering::Relaxed);
                match msg {
                    Message::Text(text) => handle_text(&conn, text.as_str()).await,
                    Message::Binary(_) => {
                        conn.send(message::notice_message("invalid: binary messages are not supported")).await;
                    }
                    Message::Close(_) => break None,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            _ = handle.kill.notified() => {
                tracing::info!(conn_id, %ip, "closing a connection that reads too slowly");
                break Some(CloseFrame { code: 1008, reason: "send queue overflow: reading too slowly".into() });
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                break Some(CloseFrame { code: 1001, reason: "relay shutting down".into() });
            }
        }
    };
    relay.registry.unregister(conn_id);
    metrics::gauge!("orly_connections").decrement(1.0);
    if let Some(neg) = relay.negentropy() {
        neg.close_connection(&conn.neg_key).await;
    }
    if let Some(frame) = close {
        let _ = close_tx.send(frame);
    } else {
        drop(close_tx);
    }
    drop(conn);
    if !writer_done {
        let _ = writer.await;
    }
    tracing::debug!(conn_id, "connection closed");
}

/// Who may see privileged live events on this connection.
struct PrivilegedGate {
    authed: Arc<RwLock<Vec<PublicKey>>>,
    readers: Vec<PublicKey>,
}

impl PrivilegedGate {
    /// Whether a live `["EVENT", sub, event]` message may go out. Only messages of a
    /// privileged kind are parsed.
    fn allows(&self, msg: &str) -> bool {
        match privileged::sniff_kind(msg) {
            Some(k) if privileged::is_privileged(Kind::from(k)) => {}
            _ => return true,
        }
        match serde_json::from_str::<(String, String, Event)>(msg) {
            Ok((_, _, event)) => privileged::may_see(&event, &self.authed.read(), &self.readers),
            Err(_) => false,
        }
    }
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<String>,
    mut live: mpsc::Receiver<String>,
    mut close: tokio::sync::oneshot::Receiver<CloseFrame>,
    last_seen: Arc<AtomicU64>,
    ping_interval: Duration,
    privileged: Option<PrivilegedGate>,
) {
    let mut ping = tokio::time::interval(ping_interval);
    ping.tick().await;
    let silence_limit = ping_interval.as_secs().max(1) * 3;
    loop {
        let msg = tokio::select! {
            biased;
            frame = &mut close => {
                if let Ok(frame) = frame {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                }
                break;
            }
            m = out.recv() => match m {
                Some(m) => Message::Text(m.into()),
                None => break,
            },
            Some(m) = live.recv() => {
                if privileged.as_ref().is_some_and(|g| !g.allows(&m)) {
                    continue;
                }
                Message::Text(m.into())
            }
            _ = ping.tick() => {
                if now_secs().saturating_sub(last_seen.load(Ordering::Relaxed)) > silence_limit {
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: 1001, reason: "idle".into() }))).await;
                    break;
                }
                Message::Ping(Default::default())
            }
        };
        if sink.send(msg).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
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
                conn.send(message::neg_err_message(&sub_id, &reason)).await;
                return;
            }
        }
        if text.trim_start().starts_with("[\"EVENT\"") {
            if let Some(id) = message::sniff_event_id(text) {
                conn.send(message::ok_message(&id, false, &reason)).await;
                return;
            }
        }
        conn.send(message::notice_message(&reason)).await;
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
            conn.send(msg).await;
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
            if conn.handle.unsubscribe(&sub_id) {
                metrics::gauge!("orly_subscriptions").decrement(1.0);
            }
        }
        ClientMessage::Auth(raw) => handle_auth(conn, raw).await,
        ClientMessage::NegOpen {
            sub_id,
            filter,
            message,
        } => {
            wait_for_events(conn).await;
            let reply = neg_open(conn, &sub_id, filter, &message).await;
            conn.send(reply).await;
        }
        ClientMessage::NegMsg { sub_id, message } => {
            let reply = neg_msg(conn, &sub_id, &message).await;
            conn.send(reply).await;
        }
        ClientMessage::NegClose(sub_id) => {
            if let Some(neg) = conn.relay.negentropy() {
                neg.close(&conn.neg_key, &sub_id).await;
            }
        }
    }
}

/// The NIP-77 handler, or the NEG-ERR for a relay without one.
fn negentropy_handler<'a>(
    conn: &'a Conn,
    sub_id: &str,
) -> Result<&'a Arc<dyn orly_sync_negentropy::NegentropyHandler>, String> {
    conn.relay.negentropy().ok_or_else(|| {
        message::neg_err_message(
            sub_id,
            "blocked: NIP-77 negentropy is not enabled on this relay",
        )
    })
}

fn neg_reply(
    sub_id: &str,
    result: Result<orly_sync_negentropy::NegReply, orly_sync_negentropy::NegError>,
) -> String {
    match result {
        Ok(reply) => message::neg_msg_message(sub_id, &hex::encode(reply.message)),
        Err(e) => {
            metrics::counter!("orly_negentropy_errors_total").increment(1);
            message::neg_err_message(sub_id, &e.reason())
        }
    }
}

fn decode_neg_hex(sub_id: &str, hex_message: &str) -> Result<Vec<u8>, String> {
    hex::decode(hex_message).map_err(|e| {
        message::neg_err_message(sub_id, &format!("invalid: malformed hex message: {e}"))
    })
}

/// NEG-OPEN: the filter is read-checked like a REQ's, then the session starts.
async fn neg_open(conn: &Conn, sub_id: &str, raw_filter: &RawValue, hex_message: &str) -> String {
    let neg = match negentropy_handler(conn, sub_id) {
        Ok(n) => n.clone(),
        Err(reply) => return reply,
    };
    let filter = match checked_filters(conn, &[raw_filter]).await {
        Ok(mut f) => f.remove(0),
        Err(reason) => return message::neg_err_message(sub_id, &reason),
    };
    let initial = match decode_neg_hex(sub_id, hex_message) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    neg_reply(
        sub_id,
        neg.open(&conn.neg_key, sub_id, &filter, &initial).await,
    )
}

async fn neg_msg(conn: &Conn, sub_id: &str, hex_message: &str) -> String {
    let neg = match negentropy_handler(conn, sub_id) {
        Ok(n) => n.clone(),
        Err(reply) => return reply,
    };
    let msg = match decode_neg_hex(sub_id, hex_message) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    neg_reply(sub_id, neg.message(&conn.neg_key, sub_id, &msg).await)
}

/// Waits until this connection's EVENTs in flight are answered, so a REQ sees them.
async fn wait_for_events(conn: &Conn) {
    if let Ok(all) = conn.events_in_flight.acquire_many(EVENT_CONCURRENCY).await {
        drop(all);
    }
}

async fn spawn_event(conn: &Arc<Conn>, raw: &RawValue) {
    let Ok(permit) = conn.events_in_flight.clone().acquire_owned().await else {
        return;
    };
    let raw = raw.get().to_string();
    let conn = conn.clone();
    tokio::spawn(async move {
        let reply = ingest(&conn, &raw).await;
        conn.send(reply).await;
        drop(permit);
    });
}

/// Validates, authorizes and stores one EVENT; returns the message to send back.
async fn ingest(conn: &Conn, raw: &str) -> String {
    let relay = &conn.relay;
    let limits = &relay.config.limits;
    let event = match Event::from_json(raw) {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("invalid: malformed event: {e}");
            return match message::sniff_event_id(raw) {
                Some(id) => message::ok_message(&id, false, &reason),
                None => message::notice_message(&reason),
            };
        }
    };
    let id = event.id.to_hex();
    let refuse = |reason: &str| {
        metrics::counter!("orly_events_total", "result" => "refused").increment(1);
        message::ok_message(&id, false, reason)
    };
    if !event.verify_id() {
        return refuse("invalid: event id does not match its content");
    }
    if !event.verify_signature() {
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
        conn.send(message::auth_message(&conn.challenge)).await;
        return refuse("auth-required: this relay requires authentication to publish");
    }
    if event.is_protected() && !authed.contains(&event.pubkey) {
        conn.send(message::auth_message(&conn.challenge)).await;
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
    if event.kind.is_ephemeral() {
        relay.registry.broadcast(&event);
        metrics::counter!("orly_events_total", "result" => "ephemeral").increment(1);
        return message::ok_message(&id, true, "");
    }
    let hooks = relay.sync_hooks().cloned();
    if let Some(hooks) = &hooks {
        if let Err(reason) = hooks.before_store(&event).await {
            return refuse(&reason);
        }
    }
    match relay.store.save_event(&event).await {
        Ok(SaveOutcome::Stored { serial }) => {
            metrics::counter!("orly_events_total", "result" => "stored").increment(1);
            if relay.delivery.stored_here(serial) {
                relay.registry.broadcast(&event);
            }
            if let Some(hooks) = hooks {
                let relay = relay.clone();
                let event = event.clone();
                tokio::spawn(async move { hooks.after_store(&relay, &event, serial).await });
            }
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

/// Parses and checks the filters of a REQ or COUNT; `Err` is the CLOSED reason.
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
        conn.send(message::auth_message(&conn.challenge)).await;
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
        conn.send(message::auth_message(&conn.challenge)).await;
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

async fn handle_req(conn: &Conn, sub_id: String, raw: Vec<&RawValue>) {
    let relay = &conn.relay;
    let limits = &relay.config.limits;
    let filters = match checked_filters(conn, &raw).await {
        Ok(f) => f,
        Err(reason) => {
            if conn.handle.unsubscribe(&sub_id) {
                metrics::gauge!("orly_subscriptions").decrement(1.0);
            }
            conn.send(message::closed_message(&sub_id, &reason)).await;
            return;
        }
    };
    let replacing = conn.handle.has(&sub_id);
    if !replacing && conn.handle.len() >= limits.max_subscriptions {
        conn.send(message::closed_message(
            &sub_id,
            &format!(
                "blocked: too many open subscriptions (at most {})",
                limits.max_subscriptions
            ),
        ))
        .await;
        return;
    }
    // Live delivery starts before the stored query so nothing stored meanwhile is missed.
    conn.handle.subscribe(&sub_id, filters.clone());
    if !replacing {
        metrics::gauge!("orly_subscriptions").increment(1.0);
    }
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
    if !stored.is_empty() {
        match relay.store.query(&stored).await {
            Ok(events) => {
                metrics::histogram!("orly_req_seconds").record(started.elapsed().as_secs_f64());
                let gate = (!relay.config.privileged_open).then(|| conn.authed());
                for e in events {
                    if let Some(authed) = &gate {
                        if !privileged::may_see(&e, authed, &relay.config.privileged_readers) {
                            continue;
                        }
                    }
                    conn.send(message::event_message(&sub_id, &e.as_json()))
                        .await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, sub_id, "query failed");
                if conn.handle.unsubscribe(&sub_id) {
                    metrics::gauge!("orly_subscriptions").decrement(1.0);
                }
                conn.send(message::closed_message(
                    &sub_id,
                    "error: could not query events: storage unavailable, try again",
                ))
                .await;
                return;
            }
        }
    }
    conn.send(message::eose_message(&sub_id)).await;
}

async fn handle_count(conn: &Conn, sub_id: String, raw: Vec<&RawValue>) {
    let filters = match checked_filters(conn, &raw).await {
        Ok(f) => f,
        Err(reason) => {
            conn.send(message::closed_message(&sub_id, &reason)).await;
            return;
        }
    };
    match conn.relay.store.count(&filters).await {
        Ok(n) => conn.send(message::count_message(&sub_id, n)).await,
        Err(e) => {
            tracing::warn!(error = %e, sub_id, "count failed");
            conn.send(message::closed_message(
                &sub_id,
                "error: could not count events: storage unavailable, try again",
            ))
            .await;
        }
    }
}

/// NIP-42: a signed kind-22242 event naming our challenge and this relay.
async fn handle_auth(conn: &Conn, raw: &RawValue) {
    let event = match Event::from_json(raw.get()) {
        Ok(e) => e,
        Err(e) => {
            conn.send(message::notice_message(&format!(
                "invalid: malformed AUTH event: {e}"
            )))
            .await;
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
    conn.send(reply).await;
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
