//! Catch-up: an empty peer relay pulls everything a source relay holds, once per mechanism,
//! each into a fresh store.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nostr::{Event, Filter};
use orly::sync::SyncHooks;
use orly_sync::{
    ClusterApi, ClusterSettings, ClusterSync, DistributedApi, DistributedSettings, DistributedSync,
};
use orly_sync_negentropy::{EngineSettings, NegentropyEngine, SyncManager, SyncSettings};

use super::node::Node;
use super::Mechanism;
use crate::dataset;

/// Longest one mechanism may take before it counts as failed.
const DEADLINE: Duration = Duration::from_secs(20 * 60);
/// Deadline of each request to the source (a page of 10,000 events is well below it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Pulls a mechanism may need (each pull normally takes everything at once).
const MAX_PULLS: usize = 10;

/// Everything the catch-up measurement found.
pub struct CatchUp {
    pub events: usize,
    pub signing: Duration,
    pub fill: Duration,
    pub fill_concurrency: usize,
    pub rows: Vec<Row>,
}

pub struct Row {
    pub mechanism: Mechanism,
    pub outcome: Result<Measured, String>,
}

pub struct Measured {
    pub time: Duration,
    /// Events the peer holds afterwards (`count` of everything).
    pub stored: u64,
    /// The peer's highest serial afterwards.
    pub latest_serial: u64,
    /// Mechanism-specific counters, for the notes under the table.
    pub detail: String,
}

impl Measured {
    pub fn rate(&self, events: usize) -> f64 {
        events as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

/// Fills a source relay with `events`, then lets one fresh peer per mechanism pull them.
pub async fn run(
    dir: &Path,
    events: &[Event],
    mechanisms: &[Mechanism],
    fill_concurrency: usize,
) -> anyhow::Result<CatchUp> {
    let mut source = Node::open(dir, "source").await?;
    eprintln!("filling the source store with {} events ...", events.len());
    let t = Instant::now();
    dataset::fill(&source.store, events, fill_concurrency, None).await?;
    let fill = t.elapsed();
    let source_latest = source.store.latest_serial().await?;
    eprintln!(
        "source store filled in {:.1} s ({:.0} events/s), latest serial {source_latest}",
        fill.as_secs_f64(),
        events.len() as f64 / fill.as_secs_f64()
    );

    // The peers run first: the source authorizes a peer's requests by its NIP-11 identity.
    let mut peers: Vec<(Mechanism, Node)> = Vec::new();
    for &m in mechanisms {
        let mut peer = Node::open(dir, &format!("peer-{}", m.name())).await?;
        peer.serve(None, None)?;
        peers.push((m, peer));
    }
    let urls_of = |wanted: Mechanism| -> Vec<String> {
        peers
            .iter()
            .filter(|(m, _)| *m == wanted)
            .map(|(_, p)| p.http.clone())
            .collect()
    };

    // The serving side, as the `orly` binary wires it: the distributed sync lists the peer,
    // the cluster sync has it as a member, NIP-77 answers everyone. Neither is started: the
    // source only serves.
    let distributed = DistributedSync::new(
        source.store.clone(),
        DistributedSettings {
            peers: urls_of(Mechanism::Distributed),
            relay_url: Some(source.http.clone()),
            ..DistributedSettings::default()
        },
    )
    .map_err(anyhow::Error::msg)
    .context("source distributed sync")?;
    let cluster = ClusterSync::new(
        source.store.clone(),
        ClusterSettings {
            relay_url: Some(source.http.clone()),
            ..ClusterSettings::default()
        },
    )
    .map_err(anyhow::Error::msg)
    .context("source cluster sync")?;
    cluster
        .update_membership(&urls_of(Mechanism::Cluster))
        .await?;
    let hooks = Arc::new(SyncHooks::new(
        Some(Arc::new(distributed.clone()) as Arc<dyn DistributedApi>),
        Some(Arc::new(cluster.clone()) as Arc<dyn ClusterApi>),
        None,
        None,
    ));
    let engine = NegentropyEngine::new(
        source.store.clone(),
        EngineSettings {
            max_records: 0,
            ..EngineSettings::default()
        },
    )
    .map_err(anyhow::Error::msg)
    .context("source negentropy engine")?;
    let reaper = engine.spawn_reaper();
    source.serve(Some(hooks), Some(engine))?;

    let mut rows = Vec::new();
    for (m, peer) in &peers {
        eprintln!("== catch-up: {} ({})", m.name(), peer.http);
        let outcome = match tokio::time::timeout(
            DEADLINE,
            measure(*m, peer, &source, source_latest, events.len()),
        )
        .await
        {
            Ok(Ok(measured)) => Ok(measured),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("not done within {DEADLINE:?}")),
        };
        match &outcome {
            Ok(r) => eprintln!(
                "  {:.2} s, {:.0} events/s, {} events at the peer; {}",
                r.time.as_secs_f64(),
                r.rate(events.len()),
                r.stored,
                r.detail
            ),
            Err(e) => eprintln!("  failed: {e}"),
        }
        rows.push(Row {
            mechanism: *m,
            outcome,
        });
    }

    reaper.abort();
    for (_, peer) in peers {
        peer.stop().await;
    }
    source.stop().await;
    Ok(CatchUp {
        events: events.len(),
        signing: Duration::ZERO,
        fill,
        fill_concurrency,
        rows,
    })
}

/// One catch-up of `peer` from `source`, timed from the first request until the peer holds
/// everything up to the source's latest serial.
async fn measure(
    mechanism: Mechanism,
    peer: &Node,
    source: &Node,
    source_latest: u64,
    n: usize,
) -> anyhow::Result<Measured> {
    let started;
    let detail = match mechanism {
        Mechanism::Distributed => {
            let sync = DistributedSync::new(
                peer.store.clone(),
                DistributedSettings {
                    peers: vec![source.http.clone()],
                    relay_url: Some(peer.http.clone()),
                    timeout: REQUEST_TIMEOUT,
                    ..DistributedSettings::default()
                },
            )
            .map_err(anyhow::Error::msg)?;
            started = Instant::now();
            let mut polls = 0;
            loop {
                polls += 1;
                let status = sync
                    .poll_peer(&source.http)
                    .await
                    .context("distributed poll")?;
                if status.last_serial >= source_latest {
                    break format!(
                        "{polls} poll(s); {} fetched, {} stored",
                        status.events_fetched, status.events_stored
                    );
                }
                anyhow::ensure!(
                    polls < MAX_PULLS,
                    "still at serial {} of {source_latest} after {polls} polls",
                    status.last_serial
                );
            }
        }
        Mechanism::Cluster => {
            let sync = ClusterSync::new(
                peer.store.clone(),
                ClusterSettings {
                    relay_url: Some(peer.http.clone()),
                    timeout: REQUEST_TIMEOUT,
                    ..ClusterSettings::default()
                },
            )
            .map_err(anyhow::Error::msg)?;
            sync.update_membership(std::slice::from_ref(&source.http))
                .await?;
            started = Instant::now();
            let mut polls = 0;
            loop {
                polls += 1;
                sync.poll_member(&source.http)
                    .await
                    .context("cluster poll")?;
                let member = sync
                    .member(&source.http)
                    .await?
                    .context("the source is no member")?;
                if member.last_serial >= source_latest {
                    break format!("{polls} poll(s); status {}", member.status);
                }
                anyhow::ensure!(
                    polls < MAX_PULLS,
                    "still at serial {} of {source_latest} after {polls} polls",
                    member.last_serial
                );
            }
        }
        Mechanism::Negentropy => {
            let manager = SyncManager::new(
                peer.store.clone(),
                SyncSettings {
                    max_records: 0,
                    peer_timeout: REQUEST_TIMEOUT,
                    interval: Duration::from_secs(3600),
                    ..SyncSettings::default()
                },
            )
            .map_err(anyhow::Error::msg)?;
            started = Instant::now();
            let r = manager
                .sync_peer(&source.ws, None, &mut |_| {})
                .await
                .context("negentropy sync")?;
            format!(
                "{} rounds, need {}, fetched {}, {:.1} MB received; reconciliation {:.0} ms",
                r.rounds,
                r.need_count,
                r.fetched,
                r.bytes_received as f64 / 1e6,
                r.reconcile_time.as_secs_f64() * 1000.0
            )
        }
    };
    let time = started.elapsed();
    let stored = peer.store.count(&[Filter::new()]).await?;
    let latest_serial = peer.store.latest_serial().await?;
    if stored != n as u64 {
        eprintln!("  the peer holds {stored} events, not {n}");
    }
    Ok(Measured {
        time,
        stored,
        latest_serial,
        detail,
    })
}
