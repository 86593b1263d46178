//! Propagation: three relays in a cluster (each replicating the other two with the in-process
//! cluster sync, as the `orly` binary runs it); events published on A, timed until they reach
//! live subscriptions on B and C.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use nostr::{Event, EventBuilder, JsonUtil, Keys, Timestamp};
use orly::sync::SyncHooks;
use orly_sync::{ClusterApi, ClusterSettings, ClusterSync};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::node::Node;

/// Events published (and awaited on B and C) before the measured ones: the first requests
/// between members also fetch NIP-11 identities and open connections.
const WARMUP_EVENTS: usize = 5;
/// How long after the last publication arrivals are still awaited.
const GRACE: Duration = Duration::from_secs(10);
/// Longest the whole measurement may take.
const DEADLINE: Duration = Duration::from_secs(10 * 60);

pub struct Plan {
    pub events: usize,
    pub interval: Duration,
}

/// Latencies (ms) of the events that arrived, per receiving relay.
pub struct Measured {
    pub sent: usize,
    /// Events A answered with `OK true`.
    pub accepted: usize,
    pub first_refusal: Option<String>,
    pub b: Vec<f64>,
    pub c: Vec<f64>,
    /// Time spent publishing (events × interval, plus any lag).
    pub publish_time: Duration,
}

pub async fn run(dir: &Path, plan: &Plan) -> Result<Measured, String> {
    eprintln!(
        "== propagation: 3 relays, {} events on A every {} ms",
        plan.events,
        plan.interval.as_millis()
    );
    match tokio::time::timeout(DEADLINE, measure(dir, plan)).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => {
            eprintln!("  failed: {e:#}");
            Err(format!("{e:#}"))
        }
        Err(_) => Err(format!("not done within {DEADLINE:?}")),
    }
}

async fn measure(dir: &Path, plan: &Plan) -> anyhow::Result<Measured> {
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(Node::open(dir, &format!("cluster-{name}")).await?);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.http.clone()).collect();
    let mut syncs = Vec::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        let sync = ClusterSync::new(
            node.store.clone(),
            ClusterSettings {
                relay_url: Some(node.http.clone()),
                poll_interval: Duration::from_secs(1),
                ..ClusterSettings::default()
            },
        )
        .map_err(anyhow::Error::msg)?;
        let others: Vec<String> = urls
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, u)| u.clone())
            .collect();
        sync.update_membership(&others).await?;
        node.serve(
            Some(Arc::new(SyncHooks::new(
                None,
                Some(Arc::new(sync.clone()) as Arc<dyn ClusterApi>),
                None,
                None,
            ))),
            None,
        )?;
        syncs.push(sync);
    }
    for s in &syncs {
        s.start();
    }
    let result = measure_cluster(&nodes, plan, &syncs).await;
    for s in &syncs {
        s.stop().await;
    }
    for n in nodes {
        n.stop().await;
    }
    result
}

async fn measure_cluster(
    nodes: &[Node],
    plan: &Plan,
    syncs: &[Arc<ClusterSync>],
) -> anyhow::Result<Measured> {
    // Every member replicates both others before anything is published.
    let deadline = Instant::now() + Duration::from_secs(30);
    while syncs.iter().any(|s| s.owned_members().len() < 2) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster workers did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let since = Timestamp::now();
    let (tx, mut arrivals) = mpsc::unbounded_channel::<(usize, String, Instant)>();
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    for (k, node) in nodes[1..].iter().enumerate() {
        readers.push(subscribe(&node.ws, since, k, tx.clone()).await?);
    }
    drop(tx);
    let publisher = Publisher::connect(&nodes[0].ws).await?;

    let keys: Vec<Keys> = (0..10).map(|_| Keys::generate()).collect();
    let sign = |i: usize, what: &str| -> anyhow::Result<Event> {
        Ok(EventBuilder::text_note(format!("propagation {what} {i}"))
            .custom_created_at(Timestamp::now())
            .sign_with_keys(&keys[i % keys.len()])?)
    };
    let warmup: Vec<Event> = (0..WARMUP_EVENTS)
        .map(|i| sign(i, "warm-up"))
        .collect::<anyhow::Result<_>>()?;
    let events: Vec<Event> = (0..plan.events)
        .map(|i| sign(i, "event"))
        .collect::<anyhow::Result<_>>()?;

    // Warm-up: connections, NIP-11 identities, and proof that live delivery works at all.
    publisher.publish(&warmup, plan.interval).await?;
    let wanted: HashSet<String> = warmup.iter().map(|e| e.id.to_hex()).collect();
    let got = collect(&mut arrivals, &wanted, Instant::now() + GRACE * 3).await;
    anyhow::ensure!(
        got.len() == 2 * wanted.len(),
        "warm-up: only {} of {} deliveries to B and C arrived",
        got.len(),
        2 * wanted.len()
    );

    let t = Instant::now();
    let sent_at = publisher.publish(&events, plan.interval).await?;
    let publish_time = t.elapsed();
    let wanted: HashSet<String> = events.iter().map(|e| e.id.to_hex()).collect();
    let got = collect(&mut arrivals, &wanted, Instant::now() + GRACE).await;
    let accepted = publisher.wait_oks(WARMUP_EVENTS + events.len()).await;
    let first_refusal = publisher.refusal.lock().clone();
    publisher.close();
    for r in readers {
        r.abort();
    }

    let mut lat: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for ((k, id), at) in &got {
        if let Some(sent) = sent_at.get(id) {
            lat[*k].push(at.saturating_duration_since(*sent).as_secs_f64() * 1000.0);
        }
    }
    let [b, c] = lat;
    Ok(Measured {
        sent: events.len(),
        accepted: accepted.saturating_sub(WARMUP_EVENTS),
        first_refusal,
        b,
        c,
        publish_time,
    })
}

/// Opens a subscription (`since`) on `url`, waits for its EOSE, then reports every event that
/// arrives as (`k`, id, arrival time) until aborted.
async fn subscribe(
    url: &str,
    since: Timestamp,
    k: usize,
    tx: mpsc::UnboundedSender<(usize, String, Instant)>,
) -> anyhow::Result<JoinHandle<()>> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let req = json!(["REQ", "live", {"since": since.as_secs()}]).to_string();
    ws.send(Message::text(req)).await?;
    let eose = async {
        while let Some(msg) = ws.next().await {
            if let Message::Text(text) = msg? {
                let v: Value = serde_json::from_str(text.as_str())?;
                match v[0].as_str() {
                    Some("EOSE") => return Ok(()),
                    Some("CLOSED") => anyhow::bail!("subscription refused: {text}"),
                    _ => {}
                }
            }
        }
        anyhow::bail!("connection closed before EOSE")
    };
    tokio::time::timeout(Duration::from_secs(10), eose)
        .await
        .context("no EOSE")??;
    Ok(tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let at = Instant::now();
            let Message::Text(text) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            if v[0] == "EVENT" {
                if let Some(id) = v[2]["id"].as_str() {
                    if tx.send((k, id.to_string(), at)).is_err() {
                        break;
                    }
                }
            }
        }
    }))
}

/// First arrival per (receiver, id) among `wanted`, until all arrived on both receivers or
/// `deadline` passes.
async fn collect(
    arrivals: &mut mpsc::UnboundedReceiver<(usize, String, Instant)>,
    wanted: &HashSet<String>,
    deadline: Instant,
) -> HashMap<(usize, String), Instant> {
    let mut got = HashMap::new();
    while got.len() < 2 * wanted.len() {
        let next = tokio::time::timeout_at(deadline.into(), arrivals.recv()).await;
        match next {
            Ok(Some((k, id, at))) => {
                if wanted.contains(&id) {
                    got.entry((k, id)).or_insert(at);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    got
}

type WsSink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// A client publishing on A; OKs are counted in the background.
struct Publisher {
    sink: tokio::sync::Mutex<WsSink>,
    oks: Arc<AtomicUsize>,
    refusal: Arc<Mutex<Option<String>>>,
    reader: JoinHandle<()>,
}

impl Publisher {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let (sink, mut stream) = ws.split();
        let oks = Arc::new(AtomicUsize::new(0));
        let refusal = Arc::new(Mutex::new(None));
        let reader = {
            let (oks, refusal) = (oks.clone(), refusal.clone());
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if v[0] == "OK" {
                        if v[2] == true {
                            oks.fetch_add(1, Ordering::Relaxed);
                        } else {
                            refusal.lock().get_or_insert_with(|| text.to_string());
                        }
                    }
                }
            })
        };
        Ok(Self {
            sink: tokio::sync::Mutex::new(sink),
            oks,
            refusal,
            reader,
        })
    }

    /// Sends the events one every `interval`; returns the moment each was handed to the socket.
    async fn publish(
        &self,
        events: &[Event],
        interval: Duration,
    ) -> anyhow::Result<HashMap<String, Instant>> {
        let mut sent_at = HashMap::with_capacity(events.len());
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sink = self.sink.lock().await;
        for e in events {
            tick.tick().await;
            let msg = format!(r#"["EVENT",{}]"#, e.as_json());
            let at = Instant::now();
            sink.send(Message::text(msg)).await?;
            sent_at.insert(e.id.to_hex(), at);
        }
        Ok(sent_at)
    }

    /// Waits (briefly) for `n` OKs; returns how many accepted the event.
    async fn wait_oks(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.oks.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            if self.refusal.lock().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.oks.load(Ordering::Relaxed)
    }

    fn close(self) {
        self.reader.abort();
    }
}
