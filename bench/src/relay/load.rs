//! The load benchmark (issue 17): many subscribed connections, stalled readers that asked for
//! a lot and never read, and ingest at the same time. It reports the relay's resident memory
//! (sampled, and its peak), the ingest rate, fan-out latency to the subscribers, and how many
//! stalled readers the relay closed, and when.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::dataset::Dataset;
use super::live::{self, ConnPlan, LiveEvents, Pace, Published, Tally};
use super::matcher::{self, Filter};
use super::net::{self, RelaySide};
use super::process::Stack;
use super::report::CpuUse;

/// The sizes of a load run.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Subscribed connections, one subscription each.
    pub connections: usize,
    pub stalled: usize,
    /// REQs each stalled reader sends (`{"limit": limit}`, everything).
    pub stalled_reqs: usize,
    pub stalled_limit: usize,
    /// SO_RCVBUF of a stalled reader's socket.
    pub rcvbuf: u32,
    /// Events stored before the run (what the stalled readers' REQs find).
    pub prefill: usize,
    /// Events published during the run, by `clients` pipelined publishers.
    pub events: usize,
    pub clients: usize,
    pub window: usize,
    /// Timed probe EVENTs per second from one more connection while the ingest runs, each
    /// sent after the previous one's OK.
    pub probe_rate: f64,
    /// The ingest stops after this long, even with events left.
    pub ingest_for: Duration,
    /// How long after their REQs the stalled readers are watched for being closed.
    pub stall_wait: Duration,
    /// Source addresses for the client sockets (0: as many as the port range needs).
    pub source_addrs: usize,
}

impl LoadPlan {
    /// Sockets this process holds at the peak, plus a margin.
    pub fn open_files(&self) -> u64 {
        (self.connections + self.stalled + self.clients + 2 + 200) as u64
    }
}

/// What one load run measured.
pub struct LoadResult {
    pub connections: usize,
    pub stalled: usize,
    pub bulk: Published,
    /// The ingest was stopped by its time limit before every event was sent.
    pub stopped_early: bool,
    pub probes: Published,
    /// Deliveries of the bulk events and of the probes.
    pub bulk_tally: Tally,
    pub probe_tally: Tally,
    /// Subscriber connections the relay closed during the run, and one reason.
    pub dropped: usize,
    pub dropped_sample: Option<String>,
    pub rss_subscribed_mb: f64,
    pub rss_peak_sampled_mb: f64,
    pub rss_hwm_mb: f64,
    pub rss_end_mb: f64,
    /// Seconds from each closed stalled reader's REQ to the relay's end being seen closed.
    pub stalled_closed_after: Vec<f64>,
    pub cpu: CpuUse,
    pub open_files_note: String,
    pub sources: usize,
    pub relay_alive: bool,
}

/// Runs the load on a freshly started `stack` (its store empty).
pub async fn run(
    stack: &mut Stack,
    data: &Arc<Dataset>,
    plan: &LoadPlan,
    open_files_note: String,
    cpu: impl Fn(&Stack) -> anyhow::Result<CpuUse>,
) -> anyhow::Result<LoadResult> {
    let url = stack.url.clone();
    let relay = net::relay_addr(&url)?;
    let n_sources = if plan.source_addrs == 0 {
        net::source_addrs_needed(plan.connections + plan.stalled + plan.clients + 1)
    } else {
        plan.source_addrs
    };
    let sources = net::source_addrs(n_sources);

    // 1. The store the stalled readers will ask for.
    let prefill = Arc::new(LiveEvents::from_dataset(data, 0..plan.prefill));
    let started = Instant::now();
    let mut filled = Published::default();
    let per = plan.clients.max(1);
    let tasks: Vec<_> = (0..per)
        .map(|c| {
            let idx: Vec<u32> = (c..prefill.len()).step_by(per).map(|i| i as u32).collect();
            let (url, ev, src) = (url.clone(), prefill.clone(), sources[c % sources.len()]);
            tokio::spawn(async move {
                live::publish(&url, src, ev, idx, Pace::Pipelined { window: 500 }, None).await
            })
        })
        .collect();
    for t in tasks {
        filled.merge(t.await.context("a prefill publisher panicked")??);
    }
    eprintln!(
        "  load: {} events stored before the run in {:.1} s ({} refused)",
        filled.accepted,
        started.elapsed().as_secs_f64(),
        filled.refused
    );

    // 2. The subscribers: one filter each, alternately `authors` and `#p` of one pubkey.
    let n_authors = data.authors.len() as u32;
    let filters: Vec<Filter> = (0..plan.connections as u32)
        .map(|i| {
            let who = Some(vec![(i / 2) % n_authors]);
            if i.is_multiple_of(2) {
                Filter {
                    authors: who,
                    ..Filter::default()
                }
            } else {
                Filter {
                    p: who,
                    ..Filter::default()
                }
            }
        })
        .collect();
    let conns: Vec<ConnPlan> = (0..plan.connections)
        .map(|c| ConnPlan {
            relay: 0,
            source: sources[c % sources.len()],
            subs: vec![c as u32],
        })
        .collect();
    let started = Instant::now();
    let opened =
        live::open_subscribers(std::slice::from_ref(&url), conns, &filters, &data.authors).await?;
    eprintln!(
        "  load: {} subscribed connections from {} source address(es) in {:.1} s",
        opened.len(),
        sources.len(),
        started.elapsed().as_secs_f64()
    );

    // The live events: the rest of the dataset (bulk), then the probes.
    let mut events = LiveEvents::from_dataset(data, plan.prefill..data.messages.len());
    let bulk_count = events.len();
    let probe_count =
        ((plan.probe_rate * (plan.ingest_for.as_secs_f64() + 5.0)) as usize).clamp(1, 100_000);
    let probes = {
        let (data, n) = (data.clone(), probe_count);
        let authors: Vec<u32> = (0..n_authors).collect();
        tokio::task::spawn_blocking(move || live::sign_events(&data, n, &authors, &[1], 0x10ad))
            .await??
    };
    events.extend(probes);
    let expected = matcher::expected(&filters, &events.keys);
    let readers = live::Readers::start(opened.into_iter().map(|(ws, _)| ws).collect(), &events);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_subscribed_mb = stack.relay.rss_mb()?;
    eprintln!("  load: relay RSS {rss_subscribed_mb:.1} MB with the subscribers");

    // 3. The stalled readers.
    let reqs: Vec<String> = (0..plan.stalled_reqs.max(1))
        .map(|k| {
            serde_json::json!(["REQ", format!("big{k}"), { "limit": plan.stalled_limit }])
                .to_string()
        })
        .collect();
    let stalled: Vec<net::Stalled> = futures::future::try_join_all((0..plan.stalled).map(|i| {
        let (url, reqs, src) = (&url, &reqs, sources[i % sources.len()]);
        async move { net::stalled_reader(url, src, plan.rcvbuf, reqs).await }
    }))
    .await
    .context("opening the stalled readers")?;
    eprintln!(
        "  load: {} stalled readers sent {} REQ(s) of limit {} each and read no more",
        stalled.len(),
        reqs.len(),
        plan.stalled_limit
    );

    // Watchers: the relay's RSS, and its end of each stalled reader's socket.
    let (watch_stop_tx, watch_stop_rx) = tokio::sync::watch::channel(false);
    let rss_watch = {
        let pid = stack.relay.pid();
        let mut stop = watch_stop_rx.clone();
        tokio::spawn(async move {
            let mut peak = 0.0f64;
            loop {
                if let Ok(mb) = rss_of(pid) {
                    peak = peak.max(mb);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            peak
        })
    };
    let stalled_addrs: Vec<SocketAddr> = stalled.iter().map(|s| s.local).collect();
    let stalled_sent: HashMap<SocketAddr, Instant> =
        stalled.iter().map(|s| (s.local, s.sent_at)).collect();
    let stall_watch = {
        let mut stop = watch_stop_rx.clone();
        let addrs = stalled_addrs.clone();
        tokio::spawn(async move {
            let mut closed_at: HashMap<SocketAddr, Instant> = HashMap::new();
            loop {
                let sides = tokio::task::spawn_blocking({
                    let addrs = addrs.clone();
                    move || net::relay_sides(relay, &addrs)
                })
                .await;
                if let Ok(Ok(sides)) = sides {
                    let now = Instant::now();
                    for (a, side) in sides {
                        if side == RelaySide::Closed {
                            closed_at.entry(a).or_insert(now);
                        }
                    }
                }
                if closed_at.len() == addrs.len() || *stop.borrow() {
                    break;
                }
                // Reading /proc/net/tcp with 20,000 sockets costs tens of ms.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
            }
            closed_at
        })
    };

    // 4. Ingest under load, with probes on the side.
    let events = Arc::new(events);
    let cpu_before = cpu(stack)?;
    let (probe_stop_tx, probe_stop_rx) = tokio::sync::watch::channel(false);
    let probe_task = {
        let (url, ev, src) = (url.clone(), events.clone(), sources[0]);
        let idx: Vec<u32> = (bulk_count..bulk_count + probe_count)
            .map(|i| i as u32)
            .collect();
        let rate = plan.probe_rate;
        tokio::spawn(async move {
            live::publish(
                &url,
                src,
                ev,
                idx,
                Pace::Steady { rate, window: 1 },
                Some(probe_stop_rx),
            )
            .await
        })
    };
    let (bulk_stop_tx, bulk_stop_rx) = tokio::sync::watch::channel(false);
    let bulk_tasks: Vec<_> = (0..per)
        .map(|c| {
            let idx: Vec<u32> = (c..bulk_count).step_by(per).map(|i| i as u32).collect();
            let (url, ev, stop) = (url.clone(), events.clone(), bulk_stop_rx.clone());
            let src = sources[(c + 1) % sources.len()];
            let window = plan.window;
            tokio::spawn(async move {
                live::publish(&url, src, ev, idx, Pace::Pipelined { window }, Some(stop)).await
            })
        })
        .collect();
    let ingest_for = plan.ingest_for;
    let timer = tokio::spawn(async move {
        tokio::time::sleep(ingest_for).await;
        bulk_stop_tx.send_replace(true);
    });
    let mut bulk = Published::default();
    for t in bulk_tasks {
        bulk.merge(t.await.context("a publisher panicked")??);
    }
    timer.abort();
    let stopped_early = bulk.sent.len() < bulk_count;
    probe_stop_tx.send_replace(true);
    let probes = probe_task.await.context("the probe publisher panicked")??;
    let cpu_used = cpu(stack)?.since(&cpu_before);
    eprintln!(
        "  load: ingest {:.0} events/s ({} accepted, {} refused, {:.1} s{}), {} probes",
        bulk.rate(),
        bulk.accepted,
        bulk.refused,
        bulk.secs,
        if stopped_early {
            ", stopped by --load-secs"
        } else {
            ""
        },
        probes.sent.len()
    );
    let sent: Vec<(u32, Instant)> = bulk.sent.iter().chain(&probes.sent).copied().collect();
    let target: usize = sent.iter().map(|&(e, _)| expected[e as usize].len()).sum();
    if !live::wait_arrivals(&readers.counter, target, Duration::from_secs(15)).await {
        eprintln!("  load: deliveries still missing 15 s after the ingest");
    }

    // 5. Wait for the relay to close the stalled readers (or for the stall wait to pass).
    let first_req = stalled.iter().map(|s| s.sent_at).min();
    let deadline = first_req.unwrap_or_else(Instant::now) + plan.stall_wait;
    while Instant::now() < deadline && !stall_watch.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    watch_stop_tx.send_replace(true);
    let closed_at = stall_watch.await.context("the stall watcher panicked")?;
    let rss_peak_sampled_mb = rss_watch.await.context("the RSS watcher panicked")?;
    let outs = readers.stop().await?;
    let relay_alive = stack.relay.is_running();
    let rss_end_mb = stack.relay.rss_mb().unwrap_or(f64::NAN);
    let rss_hwm_mb = stack.relay.peak_rss_mb().unwrap_or(f64::NAN);

    let mut stalled_closed_after: Vec<f64> = closed_at
        .iter()
        .map(|(a, at)| at.saturating_duration_since(stalled_sent[a]).as_secs_f64())
        .collect();
    stalled_closed_after.sort_by(f64::total_cmp);
    drop(stalled);

    let dropped = outs.iter().filter(|o| o.closed.is_some()).count();
    let dropped_sample = outs.iter().find_map(|o| o.closed.clone());
    let arrivals: Vec<live::Arrival> = outs.into_iter().flat_map(|o| o.arrivals).collect();
    let bulk_tally = live::tally(
        &expected,
        &bulk.sent,
        &arrivals,
        |_| 0,
        1,
        |e| (e as usize) < bulk_count,
    );
    let probe_tally = live::tally(
        &expected,
        &probes.sent,
        &arrivals,
        |_| 0,
        1,
        |e| (e as usize) >= bulk_count,
    );
    Ok(LoadResult {
        connections: plan.connections,
        stalled: plan.stalled,
        bulk,
        stopped_early,
        probes,
        bulk_tally,
        probe_tally,
        dropped,
        dropped_sample,
        rss_subscribed_mb,
        rss_peak_sampled_mb,
        rss_hwm_mb,
        rss_end_mb,
        stalled_closed_after,
        cpu: cpu_used,
        open_files_note,
        sources: sources.len(),
        relay_alive,
    })
}

fn rss_of(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}
