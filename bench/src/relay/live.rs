//! Live delivery as a client sees it, shared by the fan-out and load phases: subscriber
//! connections holding many live subscriptions, publishers that note when each EVENT left,
//! and the tally of (subscription, event) arrivals against the brute-force matcher.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, Ws};
use super::dataset::Dataset;
use super::matcher::{EventKey, Filter};
use super::net;

/// Connections opened at once.
const CONNECT_CONCURRENCY: usize = 64;
/// Longest wait for an OK or an EOSE.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Events to publish: the messages, their ids and what the matcher needs, index-aligned.
pub struct LiveEvents {
    pub messages: Vec<String>,
    pub ids: Vec<String>,
    pub keys: Vec<EventKey>,
}

impl LiveEvents {
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Event id → index, for the readers.
    pub fn index(&self) -> HashMap<String, u32> {
        self.ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32))
            .collect()
    }

    /// The dataset's events `range` (already signed), for live publishing.
    pub fn from_dataset(data: &Dataset, range: std::ops::Range<usize>) -> Self {
        Self {
            messages: data.messages[range.clone()].to_vec(),
            ids: data.ids[range.clone()].to_vec(),
            keys: data.events[range].to_vec(),
        }
    }

    /// Appends `other`'s events after this one's.
    pub fn extend(&mut self, other: LiveEvents) {
        self.messages.extend(other.messages);
        self.ids.extend(other.ids);
        self.keys.extend(other.keys);
    }
}

/// Signs `n` fresh events (created now) by authors picked from `authors` (indexes into the
/// dataset's keys), each with a `p` tag naming another dataset author and a kind picked from
/// `kinds`; signed on every core.
pub fn sign_events(
    data: &Dataset,
    n: usize,
    authors: &[u32],
    kinds: &[u16],
    seed: u64,
) -> anyhow::Result<LiveEvents> {
    anyhow::ensure!(
        !authors.is_empty() && !kinds.is_empty(),
        "nothing to sign with"
    );
    let now = nostr::Timestamp::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let total = data.keys.len() as u32;
    let specs: Vec<(u32, u32, u16)> = (0..n)
        .map(|_| {
            let author = authors[rng.gen_range(0..authors.len())];
            // nostr drops a `p` tag naming the author, so pick someone else (if anyone).
            let mut p = rng.gen_range(0..total);
            if p == author && total > 1 {
                p = (p + 1) % total;
            }
            (author, p, kinds[rng.gen_range(0..kinds.len())])
        })
        .collect();
    let events = crate::dataset::par_map(&specs, |i, &(author, p, kind)| {
        nostr::EventBuilder::new(nostr::Kind::from(kind), format!("live {seed} {i}"))
            .tags([nostr::Tag::public_key(data.keys[p as usize].public_key())])
            .custom_created_at(now)
            .sign_with_keys(&data.keys[author as usize])
            .context("signing a live event")
    })
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;
    use nostr::JsonUtil;
    Ok(LiveEvents {
        messages: events
            .iter()
            .map(|e| format!(r#"["EVENT",{}]"#, e.as_json()))
            .collect(),
        ids: events.iter().map(|e| e.id.to_hex()).collect(),
        keys: super::dataset::event_keys(&events, &data.keys),
    })
}

/// One subscriber connection: which relay, from which source address, holding which
/// subscriptions (indexes into the filter list; on the wire `s<index>`).
pub struct ConnPlan {
    pub relay: usize,
    pub source: IpAddr,
    pub subs: Vec<u32>,
}

/// Opens every planned connection and its subscriptions (each REQ answered by EOSE).
pub async fn open_subscribers(
    urls: &[String],
    plan: Vec<ConnPlan>,
    filters: &[Filter],
    authors: &[String],
) -> anyhow::Result<Vec<(Ws, ConnPlan)>> {
    let total = plan.len();
    let opened = AtomicUsize::new(0);
    let started = Instant::now();
    let conns = futures::stream::iter(plan)
        .map(|conn| {
            let opened = &opened;
            async move {
                let ws = subscribe(&urls[conn.relay], &conn, filters, authors)
                    .await
                    .with_context(|| format!("subscriber from {}", conn.source))?;
                let n = opened.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(2000) && n < total {
                    eprintln!(
                        "  {n}/{total} subscriber connections ({:.0} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                anyhow::Ok((ws, conn))
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(conns)
}

async fn subscribe(
    url: &str,
    conn: &ConnPlan,
    filters: &[Filter],
    authors: &[String],
) -> anyhow::Result<Ws> {
    let mut ws = net::connect_from(url, conn.source).await?;
    for &s in &conn.subs {
        let req = json!(["REQ", format!("s{s}"), filters[s as usize].to_json(authors)]);
        ws.feed(Message::text(req.to_string())).await?;
    }
    ws.flush().await?;
    let mut eose = 0;
    while eose < conn.subs.len() {
        let text = tokio::time::timeout(REPLY_TIMEOUT, client::next_text(&mut ws))
            .await
            .context("timed out waiting for EOSE")??;
        if text.starts_with(r#"["EOSE""#) {
            eose += 1;
        } else if text.starts_with(r#"["CLOSED""#) {
            bail!("subscription refused: {text}");
        }
    }
    Ok(ws)
}

/// One delivery: subscription, event index, when it arrived.
pub type Arrival = (u32, u32, Instant);

/// What a reader saw until it was stopped.
pub struct ReaderOut {
    pub arrivals: Vec<Arrival>,
    /// EVENT frames for events this run did not publish.
    pub foreign: usize,
    /// Set when the relay closed the connection (or it failed) before the stop.
    pub closed: Option<String>,
}

/// A reader task per subscriber connection, recording every EVENT of `events` until stopped;
/// `counter` counts arrivals of known events as they come.
pub struct Readers {
    pub counter: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<ReaderOut>>,
}

impl Readers {
    pub fn start(conns: Vec<Ws>, events: &LiveEvents) -> Self {
        let ids = Arc::new(events.index());
        let counter = Arc::new(AtomicUsize::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let tasks = conns
            .into_iter()
            .map(|ws| {
                let (ids, counter, stop) = (ids.clone(), counter.clone(), stop_rx.clone());
                tokio::spawn(read_arrivals(ws, ids, counter, stop))
            })
            .collect();
        Self {
            counter,
            stop,
            tasks,
        }
    }

    /// Stops the readers and returns what each recorded.
    pub async fn stop(self) -> anyhow::Result<Vec<ReaderOut>> {
        self.stop.send_replace(true);
        let mut out = Vec::with_capacity(self.tasks.len());
        for r in self.tasks {
            out.push(r.await.context("a reader panicked")?);
        }
        Ok(out)
    }
}

async fn read_arrivals(
    mut ws: Ws,
    ids: Arc<HashMap<String, u32>>,
    counter: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> ReaderOut {
    let mut out = ReaderOut {
        arrivals: Vec::new(),
        foreign: 0,
        closed: None,
    };
    loop {
        let msg = tokio::select! {
            biased;
            m = ws.next() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                out.closed = Some(format!("closed by the relay: {frame:?}"));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                out.closed = Some(format!("connection failed: {e}"));
                break;
            }
            None => {
                out.closed = Some("connection ended".into());
                break;
            }
        };
        let now = Instant::now();
        match parse_event_frame(text.as_str()) {
            Some((sub, id)) => match ids.get(id) {
                Some(&ev) => {
                    out.arrivals.push((sub, ev, now));
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                None => out.foreign += 1,
            },
            None if text.as_str().starts_with(r#"["CLOSED""#) => {
                out.closed = Some(format!("subscription closed: {}", text.as_str()));
            }
            None => {}
        }
    }
    out
}

/// `["EVENT","s12",{…"id":"<hex>"…}]` → (12, hex id). The event is a JSON object whose
/// only string-valued `"id"` key is the event id (tags are arrays, quotes in content are
/// escaped), so a plain search finds it.
fn parse_event_frame(text: &str) -> Option<(u32, &str)> {
    let rest = text.strip_prefix(r#"["EVENT","s"#)?;
    let (sub, rest) = rest.split_once('"')?;
    let sub = sub.parse().ok()?;
    let at = rest.find(r#""id":""#)? + 6;
    let id = rest.get(at..at + 64)?;
    Some((sub, id))
}

/// When each published event was sent, and what the relay answered.
#[derive(Default)]
pub struct Published {
    /// (event index, when its EVENT was handed to the socket).
    pub sent: Vec<(u32, Instant)>,
    pub accepted: usize,
    pub refused: usize,
    pub sample_refusal: Option<String>,
    /// First send to last OK.
    pub secs: f64,
}

impl Published {
    pub fn merge(&mut self, other: Published) {
        self.sent.extend(other.sent);
        self.accepted += other.accepted;
        self.refused += other.refused;
        if self.sample_refusal.is_none() {
            self.sample_refusal = other.sample_refusal;
        }
        self.secs = self.secs.max(other.secs);
    }

    pub fn rate(&self) -> f64 {
        (self.accepted + self.refused) as f64 / self.secs.max(1e-9)
    }
}

/// How a publisher paces its EVENTs.
#[derive(Clone, Copy)]
pub enum Pace {
    /// One EVENT every 1/rate seconds, each flushed at once, with at most `window`
    /// unanswered (ticks missed while waiting for an OK are skipped).
    Steady { rate: f64, window: usize },
    /// As fast as the relay answers, keeping up to `window` EVENTs unanswered.
    Pipelined { window: usize },
}

/// Publishes `indices` of `events` over one connection (from `source`) and waits for every
/// OK. With `stop`, it stops sending (and waits for the OKs of what it sent) once `stop`
/// turns true.
pub async fn publish(
    url: &str,
    source: IpAddr,
    events: Arc<LiveEvents>,
    indices: Vec<u32>,
    pace: Pace,
    stop: Option<watch::Receiver<bool>>,
) -> anyhow::Result<Published> {
    let ws = net::connect_from(url, source).await?;
    let (mut sink, mut stream) = ws.split();
    let window = match pace {
        Pace::Steady { window, .. } | Pace::Pipelined { window } => window.clamp(1, 1 << 40),
    };
    let credit = Arc::new(Semaphore::new(window));
    let (sent_tx, mut sent_rx) = watch::channel(None::<usize>);
    let started = Instant::now();
    let send = async {
        let mut sent = Vec::with_capacity(indices.len());
        let mut ticker = match pace {
            Pace::Steady { rate, .. } => {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                Some(t)
            }
            Pace::Pipelined { .. } => None,
        };
        let mut unflushed = 0;
        for &i in &indices {
            if stop.as_ref().is_some_and(|s| *s.borrow()) {
                break;
            }
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            match credit.try_acquire() {
                Ok(p) => p.forget(),
                Err(_) => {
                    sink.flush().await?;
                    unflushed = 0;
                    credit.acquire().await?.forget();
                }
            }
            sent.push((i, Instant::now()));
            sink.feed(Message::text(events.messages[i as usize].clone()))
                .await?;
            unflushed += 1;
            if ticker.is_some() || unflushed >= 64 {
                sink.flush().await?;
                unflushed = 0;
            }
        }
        sink.flush().await?;
        sent_tx.send_replace(Some(sent.len()));
        anyhow::Ok((sent, sink))
    };
    let read = async {
        let (mut answered, mut accepted, mut refused, mut sample) = (0, 0, 0, None);
        loop {
            if let Some(total) = *sent_rx.borrow() {
                if answered >= total {
                    break;
                }
            }
            let text = tokio::select! {
                t = tokio::time::timeout(REPLY_TIMEOUT, client::next_text(&mut stream)) => {
                    t.context("timed out waiting for OK")??
                }
                _ = sent_rx.changed() => continue,
            };
            if !text.starts_with(r#"["OK""#) {
                continue;
            }
            let ok: Value = serde_json::from_str(&text)?;
            if ok[2] == Value::Bool(true) {
                accepted += 1;
            } else {
                refused += 1;
                sample.get_or_insert(text);
            }
            answered += 1;
            credit.add_permits(1);
        }
        anyhow::Ok((accepted, refused, sample))
    };
    let ((sent, _sink), (accepted, refused, sample_refusal)) = tokio::try_join!(send, read)?;
    Ok(Published {
        sent,
        accepted,
        refused,
        sample_refusal,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Waits until `counter` reaches `target` or `timeout` passes; true if it got there.
pub async fn wait_arrivals(counter: &AtomicUsize, target: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while counter.load(Ordering::Relaxed) < target {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Latencies of one group of subscribers, in ms.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self {
            n: ms.len(),
            p50_ms: client::percentile(&ms, 50.0),
            p99_ms: client::percentile(&ms, 99.0),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Deliveries checked against the matcher.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// (subscription, event) pairs the matcher expects, for the events sent.
    pub expected: usize,
    /// Expected pairs that arrived (at least once).
    pub delivered: usize,
    pub missing: usize,
    /// Arrivals beyond the first of a pair.
    pub duplicates: usize,
    /// Arrivals of a pair the matcher does not expect.
    pub unexpected: usize,
    /// Latency of each delivered pair (first arrival − send), per group of subscribers.
    pub groups: Vec<Latencies>,
}

/// Tallies `arrivals` against `expected` (per event, its subscriptions) for the events in
/// `sent`; `group_of(sub)` < `groups` picks the latency group of a subscription.
pub fn tally(
    expected: &[Vec<u32>],
    sent: &[(u32, Instant)],
    arrivals: &[Arrival],
    group_of: impl Fn(u32) -> usize,
    groups: usize,
    only: impl Fn(u32) -> bool,
) -> Tally {
    let mut sent_at: Vec<Option<Instant>> = vec![None; expected.len()];
    for &(e, t) in sent {
        sent_at[e as usize] = Some(t);
    }
    let mut first: HashMap<(u32, u32), (usize, Instant)> = HashMap::with_capacity(arrivals.len());
    for &(s, e, t) in arrivals {
        if !only(e) {
            continue;
        }
        first
            .entry((s, e))
            .and_modify(|(n, at)| {
                *n += 1;
                if t < *at {
                    *at = t;
                }
            })
            .or_insert((1, t));
    }
    let mut out = Tally::default();
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); groups];
    for (e, subs) in expected.iter().enumerate() {
        let Some(sent) = sent_at[e] else { continue };
        if !only(e as u32) {
            continue;
        }
        for &s in subs {
            out.expected += 1;
            match first.remove(&(s, e as u32)) {
                Some((n, at)) => {
                    out.delivered += 1;
                    out.duplicates += n - 1;
                    let ms_ = at.saturating_duration_since(sent).as_secs_f64() * 1000.0;
                    ms[group_of(s).min(groups - 1)].push(ms_);
                }
                None => out.missing += 1,
            }
        }
    }
    // What is left arrived without being expected (or for an event never sent).
    out.unexpected = first.values().map(|(n, _)| n).sum();
    out.groups = ms.into_iter().map(Latencies::of).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frames() {
        let id = "ab".repeat(32);
        let frame =
            format!(r#"["EVENT","s17",{{"content":"say \"id\":\"x\"","id":"{id}","kind":1}}]"#);
        assert_eq!(parse_event_frame(&frame), Some((17, id.as_str())));
        assert_eq!(parse_event_frame(r#"["EOSE","s1"]"#), None);
        assert_eq!(parse_event_frame(r#"["EVENT","q",{}]"#), None);
    }

    #[test]
    fn tallies() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let expected = vec![vec![0, 1], vec![1], vec![2]];
        // Event 2 was never sent; sub 1 got event 0 twice; sub 2 got event 0 unasked.
        let sent = [(0, t0), (1, ms(10))];
        let arrivals = [(0, 0, ms(2)), (1, 0, ms(4)), (1, 0, ms(5)), (2, 0, ms(3))];
        let t = tally(&expected, &sent, &arrivals, |s| s as usize % 2, 2, |_| true);
        assert_eq!(
            (
                t.expected,
                t.delivered,
                t.missing,
                t.duplicates,
                t.unexpected
            ),
            (3, 2, 1, 1, 1)
        );
        assert_eq!(t.groups[0].n, 1);
        assert_eq!(t.groups[1].max_ms, 4.0);
    }
}
