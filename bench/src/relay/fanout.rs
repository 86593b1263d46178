//! Fan-out latency (issue 15): many connections each holding several live subscriptions (a
//! mix of `authors`, `#p` and `kinds` filters), fresh events published at a steady rate from
//! one more connection, and for each (subscription, event) pair the matcher expects, the
//! time from the EVENT leaving the publisher to its arrival. With two relays on one store,
//! subscribers are spread over both and the publisher is on the first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::dataset::Dataset;
use super::live::{self, ConnPlan, Pace, Published, Tally};
use super::matcher::{self, Filter};
use super::net;
use super::process::Stack;
use super::report::CpuUse;

/// The kinds of the fan-out events, and of the `kinds` filters: 100 regular kinds (1 and
/// 2001-2099, none of them privileged), so a `kinds` filter takes about 1% of the events.
pub fn kinds() -> Vec<u16> {
    std::iter::once(1).chain(2001..2100).collect()
}

/// The sizes of a fan-out run.
#[derive(Debug, Clone)]
pub struct FanoutPlan {
    pub connections: usize,
    pub subs_per_conn: usize,
    pub events: usize,
    /// EVENTs per second from the publisher.
    pub rate: f64,
    /// Longest wait, after the last OK, for deliveries still missing.
    pub drain: Duration,
}

/// The subscriptions of connection slot `s` (of every ten): four `authors`, four `#p`, two
/// `kinds` filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Authors,
    PTag,
    Kinds,
}

fn kind_of_slot(s: usize) -> Kind {
    match s % 10 {
        0..=3 => Kind::Authors,
        4..=7 => Kind::PTag,
        _ => Kind::Kinds,
    }
}

/// What the filter mix is, for the report.
pub const MIX: &str = "4 authors (1-3 pubkeys), 4 #p (1-3 pubkeys), 2 kinds (1 of 100) per 10";

/// Builds the filters: authors and `#p` values taken round-robin from a shuffled author
/// list (so together they cover as many authors as they have slots), 1 to 3 values each.
pub fn filters(data: &Dataset, plan: &FanoutPlan, seed: u64) -> Vec<Filter> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = data.authors.len() as u32;
    let mut order: Vec<u32> = (0..n).collect();
    order.shuffle(&mut rng);
    let kinds = kinds();
    let (mut next_author, mut next_p, mut next_kind) = (0usize, n as usize / 2, 0usize);
    let take = |next: &mut usize, k: usize| -> Vec<u32> {
        let v = (0..k)
            .map(|i| order[(*next + i) % order.len()])
            .collect::<Vec<_>>();
        *next += k;
        v
    };
    let total = plan.connections * plan.subs_per_conn;
    (0..total)
        .map(|j| match kind_of_slot(j % plan.subs_per_conn) {
            Kind::Authors => {
                let k = rng.gen_range(1..=3);
                Filter {
                    authors: Some(take(&mut next_author, k)),
                    ..Filter::default()
                }
            }
            Kind::PTag => {
                let k = rng.gen_range(1..=3);
                Filter {
                    p: Some(take(&mut next_p, k)),
                    ..Filter::default()
                }
            }
            Kind::Kinds => {
                next_kind += 1;
                Filter {
                    kinds: Some(vec![kinds[next_kind % kinds.len()]]),
                    ..Filter::default()
                }
            }
        })
        .collect()
}

/// What one fan-out run measured.
pub struct FanoutResult {
    pub relays: usize,
    pub connections: usize,
    pub subscriptions: usize,
    pub published: Published,
    pub tally: Tally,
    /// Subscriber connections the relay closed during the run.
    pub dropped: usize,
    pub foreign: usize,
    /// CPU used while publishing and delivering (relays summed).
    pub cpu: CpuUse,
    /// Wall time of the publishing and draining.
    pub secs: f64,
    /// Expected pairs per event, mean.
    pub pairs_per_event: f64,
    /// Whether every expected delivery arrived before the drain timeout.
    pub drained: bool,
}

/// Runs the fan-out on `stack`, whose relays (one, or more with [`Stack::add_replica`])
/// already run; the publisher is on the first.
pub async fn run(
    stack: &Stack,
    data: &Arc<Dataset>,
    plan: &FanoutPlan,
    cpu: impl Fn() -> anyhow::Result<CpuUse>,
) -> anyhow::Result<FanoutResult> {
    let urls = stack.urls();
    let filters = filters(data, plan, 0xfa_0017);
    let covered: Vec<u32> = {
        let mut a: Vec<u32> = filters
            .iter()
            .filter_map(|f| f.authors.clone())
            .flatten()
            .collect();
        a.sort_unstable();
        a.dedup();
        a
    };
    // Authors come from the `authors` filters, so every event has at least one subscriber.
    let events = {
        let (data, covered, n) = (data.clone(), covered.clone(), plan.events);
        tokio::task::spawn_blocking(move || {
            live::sign_events(&data, n, &covered, &kinds(), 0xfa_0015)
        })
        .await??
    };
    let expected = matcher::expected(&filters, &events.keys);
    let total_expected: usize = expected.iter().map(Vec::len).sum();
    anyhow::ensure!(
        expected.iter().all(|subs| !subs.is_empty()),
        "an event matches no subscription"
    );
    let sources = net::source_addrs(net::source_addrs_needed(plan.connections + 1));
    let conns: Vec<ConnPlan> = (0..plan.connections)
        .map(|c| ConnPlan {
            relay: c % urls.len(),
            source: sources[c % sources.len()],
            subs: (0..plan.subs_per_conn)
                .map(|s| (c * plan.subs_per_conn + s) as u32)
                .collect(),
        })
        .collect();
    let relay_of_conn: Vec<usize> = conns.iter().map(|c| c.relay).collect();
    let started = Instant::now();
    let opened = live::open_subscribers(&urls, conns, &filters, &data.authors).await?;
    eprintln!(
        "  fan-out: {} connections x {} subscriptions open on {} relay(s) in {:.1} s; \
         {} events at {}/s, {:.1} deliveries each",
        opened.len(),
        plan.subs_per_conn,
        urls.len(),
        started.elapsed().as_secs_f64(),
        events.len(),
        plan.rate,
        total_expected as f64 / events.len().max(1) as f64
    );
    let readers = live::Readers::start(opened.into_iter().map(|(ws, _)| ws).collect(), &events);
    // Let the subscriptions settle everywhere (the replicas register them on their own).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu_before = cpu()?;
    let started = Instant::now();
    let events = Arc::new(events);
    let indices: Vec<u32> = (0..events.len() as u32).collect();
    let published = live::publish(
        &urls[0],
        sources[0],
        events.clone(),
        indices,
        Pace::Steady {
            rate: plan.rate,
            window: usize::MAX,
        },
        None,
    )
    .await
    .context("publishing the fan-out events")?;
    let drained = live::wait_arrivals(&readers.counter, total_expected, plan.drain).await;
    // A moment more, for duplicates.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu_used = cpu()?.since(&cpu_before);
    let outs = readers.stop().await?;

    let dropped = outs.iter().filter(|o| o.closed.is_some()).count();
    if let Some(why) = outs.iter().find_map(|o| o.closed.as_ref()) {
        eprintln!("  fan-out: {dropped} subscriber connections closed, e.g. {why}");
    }
    let foreign = outs.iter().map(|o| o.foreign).sum();
    let arrivals: Vec<live::Arrival> = outs.into_iter().flat_map(|o| o.arrivals).collect();
    let subs_per_conn = plan.subs_per_conn;
    let tally = live::tally(
        &expected,
        &published.sent,
        &arrivals,
        |s| relay_of_conn[s as usize / subs_per_conn],
        urls.len(),
        |_| true,
    );
    Ok(FanoutResult {
        relays: urls.len(),
        connections: plan.connections,
        subscriptions: filters.len(),
        published,
        tally,
        dropped,
        foreign,
        cpu: cpu_used,
        secs,
        pairs_per_event: total_expected as f64 / events.len().max(1) as f64,
        drained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix() {
        let slots: Vec<Kind> = (0..10).map(kind_of_slot).collect();
        assert_eq!(slots.iter().filter(|k| **k == Kind::Authors).count(), 4);
        assert_eq!(slots.iter().filter(|k| **k == Kind::PTag).count(), 4);
        assert_eq!(slots.iter().filter(|k| **k == Kind::Kinds).count(), 2);
        assert_eq!(kinds().len(), 100);
    }
}
