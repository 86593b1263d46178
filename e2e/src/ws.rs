//! A raw Nostr client over one WebSocket: every frame is seen, nothing is retried.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long one answer may take (a relay whose db is down answers within its gRPC deadline,
/// 10 s by default).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay's answer to an EVENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ok {
    pub accepted: bool,
    pub message: String,
}

/// The relay's answer to a REQ: the stored events, or the CLOSED reason.
pub type ReqResult = std::result::Result<Vec<nostr::Event>, String>;

pub struct Client {
    ws: Ws,
    url: String,
    next_sub: u64,
}

impl Client {
    /// Connects once (the relay's NIP-42 AUTH greeting, if any, is skipped while reading).
    pub async fn connect(url: &str) -> Result<Self> {
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .with_context(|| format!("connect {url}: timed out"))?
        .with_context(|| format!("connect {url}"))?;
        Ok(Self {
            ws,
            url: url.to_string(),
            next_sub: 0,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn send(&mut self, v: Value) -> Result<()> {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .context("send")
    }

    /// The next JSON frame other than AUTH.
    pub async fn recv(&mut self) -> Result<Value> {
        loop {
            let msg = tokio::time::timeout(ANSWER_TIMEOUT, self.ws.next())
                .await
                .map_err(|_| anyhow!("no answer from {} within {ANSWER_TIMEOUT:?}", self.url))?
                .ok_or_else(|| anyhow!("connection to {} closed", self.url))?
                .context("websocket error")?;
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).context("frame is not JSON")?;
                    if v[0] != "AUTH" {
                        return Ok(v);
                    }
                }
                Message::Close(f) => bail!("connection closed by the relay: {f:?}"),
                _ => {}
            }
        }
    }

    /// Publishes an event; returns its OK.
    pub async fn publish(&mut self, event: &nostr::Event) -> Result<Ok> {
        let ev: Value = serde_json::from_str(&nostr::JsonUtil::as_json(event))?;
        self.send(json!(["EVENT", ev])).await?;
        let id = event.id.to_hex();
        loop {
            let v = self.recv().await?;
            if v[0] == "OK" && v[1] == id.as_str() {
                return Ok(Ok {
                    accepted: v[2].as_bool().unwrap_or(false),
                    message: v[3].as_str().unwrap_or_default().to_string(),
                });
            }
        }
    }

    /// Runs a REQ and collects the events until EOSE; `Err` holds a CLOSED reason.
    pub async fn req(&mut self, filter: Value) -> Result<ReqResult> {
        self.next_sub += 1;
        let sub = format!("e2e-{}", self.next_sub);
        self.send(json!(["REQ", sub, filter])).await?;
        let mut events = Vec::new();
        loop {
            let v = self.recv().await?;
            if v[1] != sub.as_str() {
                continue;
            }
            match v[0].as_str() {
                Some("EVENT") => {
                    let e: nostr::Event = nostr::JsonUtil::from_json(v[2].to_string())
                        .context("EVENT is not an event")?;
                    events.push(e);
                }
                Some("EOSE") => {
                    self.send(json!(["CLOSE", sub])).await?;
                    return Ok(Ok(events));
                }
                Some("CLOSED") => return Ok(Err(v[2].as_str().unwrap_or_default().to_string())),
                _ => {}
            }
        }
    }

    /// The ids among `ids` that the relay returns (queried in batches).
    pub async fn stored_ids(&mut self, ids: &[nostr::EventId]) -> Result<BTreeSet<nostr::EventId>> {
        let mut found = BTreeSet::new();
        for chunk in ids.chunks(200) {
            let hex: Vec<String> = chunk.iter().map(|i| i.to_hex()).collect();
            match self.req(json!({ "ids": hex })).await? {
                Ok(events) => found.extend(events.into_iter().map(|e| e.id)),
                Err(reason) => bail!("REQ by ids refused: {reason}"),
            }
        }
        Ok(found)
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Connects and runs a trivial REQ; `Ok(true)` once the relay answers EOSE.
pub async fn relay_serves(url: &str) -> Result<bool> {
    let mut c = Client::connect(url).await?;
    let answer = c.req(json!({ "kinds": [1], "limit": 1 })).await?;
    c.close().await;
    match answer {
        Ok(_) => Ok(true),
        Err(reason) => bail!("REQ answered CLOSED: {reason}"),
    }
}

/// Publishes every event on one connection; returns the ids acknowledged with OK true and
/// fails on any refusal.
pub async fn publish_all(url: &str, events: &[nostr::Event]) -> Result<Vec<nostr::EventId>> {
    let mut c = Client::connect(url).await?;
    let mut ids = Vec::with_capacity(events.len());
    for e in events {
        let ok = c.publish(e).await?;
        if !ok.accepted {
            bail!("event {} refused: {}", e.id, ok.message);
        }
        ids.push(e.id);
    }
    c.close().await;
    Ok(ids)
}

/// The ids among `ids` stored at `url`.
pub async fn stored_at(url: &str, ids: &[nostr::EventId]) -> Result<BTreeSet<nostr::EventId>> {
    let mut c = Client::connect(url).await?;
    let found = c.stored_ids(ids).await?;
    c.close().await;
    Ok(found)
}
