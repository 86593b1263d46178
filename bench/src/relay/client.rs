//! The load: pipelined EVENT publishing, timed REQs, and many idle subscribed connections,
//! over raw tokio-tungstenite WebSockets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::dataset::Dataset;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for any single frame before the run is declared stuck.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes are flushed at least this often while pipelining.
const FLUSH_EVERY: usize = 64;
/// Connections opened at once in the memory test.
const CONNECT_CONCURRENCY: usize = 64;

/// Connects (Nagle off) and consumes the relay's `["AUTH", challenge]` greeting.
pub async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    greeted(ws).await
}

/// Consumes the relay's `["AUTH", challenge]` greeting on a fresh connection.
pub async fn greeted(mut ws: Ws) -> anyhow::Result<Ws> {
    let greeting = next_text(&mut ws).await?;
    if !greeting.starts_with(r#"["AUTH""#) {
        bail!("expected an AUTH greeting, got {greeting}");
    }
    Ok(ws)
}

/// The next text frame (pings are answered by tungstenite while reading).
pub async fn next_text<S>(stream: &mut S) -> anyhow::Result<String>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, stream.next())
            .await
            .context("timed out waiting for the relay")?
            .context("the relay closed the connection")??;
        match msg {
            Message::Text(t) => return Ok(t.as_str().to_owned()),
            Message::Close(frame) => bail!("the relay closed the connection: {frame:?}"),
            _ => {}
        }
    }
}

/// The result of publishing the whole dataset.
pub struct Ingest {
    pub secs: f64,
    pub accepted: usize,
    pub refused: usize,
    /// One refusal's OK message, to show what went wrong.
    pub sample_refusal: Option<String>,
}

impl Ingest {
    pub fn rate(&self) -> f64 {
        (self.accepted + self.refused) as f64 / self.secs
    }
}

/// Publishes every message over `clients` connections, each keeping up to `window` EVENTs
/// unanswered, and waits for every OK.
pub async fn ingest(
    url: &str,
    data: &Arc<Dataset>,
    clients: usize,
    window: usize,
) -> anyhow::Result<Ingest> {
    let clients = clients.max(1);
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(connect(url).await?);
    }
    let refused = Arc::new(AtomicUsize::new(0));
    let sample = Arc::new(parking_lot::Mutex::new(None));
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, ws)| {
            let indices: Vec<usize> = (c..data.messages.len()).step_by(clients).collect();
            let (data, refused, sample) = (data.clone(), refused.clone(), sample.clone());
            tokio::spawn(async move {
                let (sink, stream) = ws.split();
                let credit = Arc::new(Semaphore::new(window.max(1)));
                let expected = indices.len();
                tokio::try_join!(
                    send_events(sink, &data.messages, indices, &credit),
                    read_oks(stream, expected, &credit, &refused, &sample),
                )
            })
        })
        .collect();
    for t in tasks {
        t.await.context("an ingest client panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    let refused = refused.load(Ordering::Relaxed);
    let sample_refusal = sample.lock().take();
    Ok(Ingest {
        secs,
        accepted: data.messages.len() - refused,
        refused,
        sample_refusal,
    })
}

async fn send_events(
    mut sink: SplitSink<Ws, Message>,
    messages: &[String],
    indices: Vec<usize>,
    credit: &Semaphore,
) -> anyhow::Result<()> {
    let mut unflushed = 0;
    for i in indices {
        match credit.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                // The window is full: push out what we have, then wait for OKs.
                sink.flush().await?;
                unflushed = 0;
                credit.acquire().await?.forget();
            }
        }
        sink.feed(Message::text(messages[i].clone())).await?;
        unflushed += 1;
        if unflushed >= FLUSH_EVERY {
            sink.flush().await?;
            unflushed = 0;
        }
    }
    sink.flush().await?;
    Ok(())
}

async fn read_oks(
    mut stream: SplitStream<Ws>,
    expected: usize,
    credit: &Semaphore,
    refused: &AtomicUsize,
    sample: &parking_lot::Mutex<Option<String>>,
) -> anyhow::Result<()> {
    let mut answered = 0;
    while answered < expected {
        let text = next_text(&mut stream).await?;
        if !text.starts_with(r#"["OK""#) {
            continue;
        }
        let ok: Value = serde_json::from_str(&text)?;
        if ok[2] != Value::Bool(true) {
            refused.fetch_add(1, Ordering::Relaxed);
            sample.lock().get_or_insert(text);
        }
        answered += 1;
        credit.add_permits(1);
    }
    Ok(())
}

/// The four REQ shapes whose latency is measured.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    Author,
    KindSince,
    PTag,
    Ids,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Author, Shape::KindSince, Shape::PTag, Shape::Ids];

    pub fn label(self) -> &'static str {
        match self {
            Shape::Author => "author",
            Shape::KindSince => "kind+since",
            Shape::PTag => "#p",
            Shape::Ids => "ids",
        }
    }

    /// A filter of this shape with random values from the dataset.
    fn filter(self, data: &Dataset, rng: &mut StdRng) -> Value {
        match self {
            Shape::Author => json!({ "authors": [data.authors.choose(rng)], "limit": 100 }),
            Shape::KindSince => {
                let since = rng.gen_range(data.oldest..=data.newest);
                json!({ "kinds": [1], "since": since, "limit": 100 })
            }
            Shape::PTag => json!({ "#p": [data.authors.choose(rng)], "limit": 100 }),
            Shape::Ids => {
                let ids: Vec<&String> = data.ids.choose_multiple(rng, 10).collect();
                json!({ "ids": ids })
            }
        }
    }
}

/// Latency of one REQ shape, send to EOSE.
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean events returned per REQ (a sanity check that queries hit data).
    pub mean_events: f64,
}

/// Runs `warmup` then `queries` REQs of `shape` one after another on one connection.
pub async fn req_latency(
    url: &str,
    data: &Dataset,
    shape: Shape,
    queries: usize,
    warmup: usize,
) -> anyhow::Result<Latency> {
    let mut ws = connect(url).await?;
    let mut rng = StdRng::seed_from_u64(shape as u64);
    for _ in 0..warmup {
        timed_req(&mut ws, &shape.filter(data, &mut rng)).await?;
    }
    let mut times = Vec::with_capacity(queries);
    let mut events = 0;
    for _ in 0..queries.max(1) {
        let (elapsed, n) = timed_req(&mut ws, &shape.filter(data, &mut rng)).await?;
        times.push(elapsed.as_secs_f64() * 1000.0);
        events += n;
    }
    times.sort_by(f64::total_cmp);
    Ok(Latency {
        p50_ms: percentile(&times, 50.0),
        p99_ms: percentile(&times, 99.0),
        mean_events: events as f64 / times.len() as f64,
    })
}

/// Sends one REQ (reusing the subscription id, which replaces it) and reads to its EOSE.
async fn timed_req(ws: &mut Ws, filter: &Value) -> anyhow::Result<(Duration, usize)> {
    let req = json!(["REQ", "q", filter]).to_string();
    let started = Instant::now();
    ws.send(Message::text(req)).await?;
    let mut events = 0;
    loop {
        let text = next_text(ws).await?;
        if text.starts_with(r#"["EVENT""#) {
            events += 1;
        } else if text.starts_with(r#"["EOSE""#) {
            return Ok((started.elapsed(), events));
        } else if text.starts_with(r#"["CLOSED""#) {
            bail!("REQ {filter} refused: {text}");
        }
    }
}

/// The nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Opens `n` connections, each holding one live subscription (REQ with `limit: 0`, EOSE seen).
/// They stay open until the returned value is dropped.
pub async fn hold_connections(url: &str, n: usize) -> anyhow::Result<Vec<Ws>> {
    futures::stream::iter(0..n)
        .map(|i| subscribed_connection(url, i))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .try_collect()
        .await
}

async fn subscribed_connection(url: &str, i: usize) -> anyhow::Result<Ws> {
    let mut ws = connect(url).await?;
    let sub = format!("live{i}");
    let req = json!(["REQ", sub, { "kinds": [1], "limit": 0 }]).to_string();
    ws.send(Message::text(req)).await?;
    loop {
        let text = next_text(&mut ws).await?;
        if text.starts_with(r#"["EOSE""#) {
            return Ok(ws);
        }
        if text.starts_with(r#"["CLOSED""#) {
            bail!("subscription refused: {text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
