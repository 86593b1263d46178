//! The results tables, with the issues' goals beside the numbers: the main table (ingest,
//! REQ latency, memory, CPU per event), the fan-out table and the load table.

use super::client::{Ingest, Latency, Shape};
use super::fanout::{self, FanoutResult};
use super::live::Latencies;
use super::load::LoadResult;
use super::Mode;
use crate::table::render;

/// Ingest goal (events/s) per mode (issue 15); none for PostgreSQL and the ACL modes.
fn ingest_goal(mode: Mode) -> Option<f64> {
    match mode {
        Mode::LocalSqlite => Some(10_000.0),
        Mode::SplitSqlite => Some(6_000.0),
        Mode::LocalPostgres | Mode::FollowsLocal | Mode::FollowsGrpc => None,
    }
}

/// Issue 4: ingest with the ACL over gRPC within 20 % of in-process.
const ACL_GRPC_GOAL: f64 = 0.8;

/// The follows/gRPC ingest rate as a share of follows/local, when both were measured.
fn acl_grpc_ratio(rows: &[Row]) -> Option<f64> {
    let rate = |mode: Mode| {
        rows.iter()
            .find_map(|r| match (&r.outcome, r.mode == mode) {
                (Outcome::Measured(m), true) => Some(m.ingest.rate()),
                _ => None,
            })
    };
    Some(rate(Mode::FollowsGrpc)? / rate(Mode::FollowsLocal)?)
}
/// REQ p99 goal (issue 15; issue 3 had 5 ms).
const P99_GOAL_MS: f64 = 2.0;
const RSS_GOAL_MB: f64 = 100.0;
/// Relay CPU per ingested event, local/SQLite (issue 15).
const CPU_GOAL_US: f64 = 100.0;
/// Fan-out p99 in one process and across replicas (issue 15).
const FANOUT_GOAL_MS: f64 = 5.0;
const FANOUT_ACROSS_GOAL_MS: f64 = 10.0;

/// Everything measured for one mode.
pub struct Measured {
    pub ingest: Ingest,
    pub latency: Vec<(Shape, Latency)>,
    pub rss_ingest_mb: f64,
    pub rss_conns_mb: f64,
    /// CPU seconds used during the ingest by the relay, orly-db (split) and this benchmark.
    pub ingest_cpu: CpuUse,
    /// orly-db's own RSS at the end (split mode), reported outside the goal.
    pub db_rss_mb: Option<f64>,
    /// The fan-out phase: not run (`None`), or its result or why it failed.
    pub fanout: Option<Result<FanoutResult, String>>,
}

impl Measured {
    /// The relay's CPU per ingested event, in µs.
    pub fn cpu_us_per_event(&self) -> f64 {
        per_event_us(
            self.ingest_cpu.relay,
            self.ingest.accepted + self.ingest.refused,
        )
    }
}

fn per_event_us(secs: f64, events: usize) -> f64 {
    secs * 1e6 / events.max(1) as f64
}

/// CPU seconds spent during one phase, per process (all relays summed).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub relay: f64,
    pub db: Option<f64>,
    pub bench: f64,
}

impl CpuUse {
    /// What was used between `before` and this snapshot.
    pub fn since(&self, before: &CpuUse) -> CpuUse {
        CpuUse {
            relay: self.relay - before.relay,
            db: self.db.zip(before.db).map(|(a, b)| a - b),
            bench: self.bench - before.bench,
        }
    }
}

pub enum Outcome {
    Measured(Box<Measured>),
    Skipped(String),
    Failed(String),
}

pub struct Row {
    pub mode: Mode,
    pub outcome: Outcome,
}

/// What the header says about the run.
pub struct RunInfo {
    pub cores: usize,
    pub events: usize,
    pub clients: usize,
    pub queries: usize,
    pub connections: usize,
    /// The fan-out phase's sizes, when it ran.
    pub fanout: Option<String>,
}

pub fn print(info: &RunInfo, rows: &[Row]) {
    println!();
    println!(
        "orly-bench: {} cores (available_parallelism), {} events, {} clients, {} REQs per shape, {} connections",
        info.cores, info.events, info.clients, info.queries, info.connections
    );
    println!(
        "goals: ingest >= 10000 ev/s local/SQLite, >= 6000 split/SQLite; REQ p99 <= {P99_GOAL_MS} ms; \
         CPU <= {CPU_GOAL_US} us/event local/SQLite (issue 15); RSS <= {RSS_GOAL_MB} MB at 1000 connections; \
         follows over gRPC within 20% of in-process"
    );
    println!(
        "latency cells are p50/p99 in ms, send to EOSE; RSS is the orly process alone; \
         CPU is the relay process's user+system time during the ingest per event"
    );
    println!();
    let mut table = vec![header(info), goal_row()];
    table.extend(rows.iter().map(row_cells));
    print!("{}", render(&table));
    let mut notes: Vec<String> = rows.iter().flat_map(notes).collect();
    if let Some(ratio) = acl_grpc_ratio(rows) {
        notes.push(format!(
            "ACL follows (10000 follows): ingest over gRPC is {:.0}% of in-process (goal: >= {:.0}%){}",
            ratio * 100.0,
            ACL_GRPC_GOAL * 100.0,
            if ratio >= ACL_GRPC_GOAL { "" } else { "  MISSED" }
        ));
    }
    if !notes.is_empty() {
        println!();
        for n in notes {
            println!("{n}");
        }
    }
    print_fanout(info, rows);
}

/// The fan-out table, one line per group of subscribers (per relay).
fn print_fanout(info: &RunInfo, rows: &[Row]) {
    let ran: Vec<(Mode, &Result<FanoutResult, String>)> = rows
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Measured(m) => m.fanout.as_ref().map(|f| (r.mode, f)),
            _ => None,
        })
        .collect();
    if ran.is_empty() {
        return;
    }
    println!();
    println!(
        "fan-out: {}; filters: {}",
        info.fanout.as_deref().unwrap_or(""),
        fanout::MIX
    );
    println!(
        "goals: fan-out p99 <= {FANOUT_GOAL_MS} ms in one process, <= {FANOUT_ACROSS_GOAL_MS} ms across replicas (issue 15); \
         every expected (subscription, event) pair delivered once"
    );
    println!(
        "latency: EVENT sent by the publisher (on relay A) to its arrival at a subscriber, per \
         expected pair (brute-force matcher); CPU: all relays' user+system time while publishing, per event"
    );
    println!();
    let mut t = vec![vec![
        "mode".to_string(),
        "relays".into(),
        "subscribers on".into(),
        "expected".into(),
        "delivered".into(),
        "missing".into(),
        "dup".into(),
        "p50 ms".into(),
        "p99 ms".into(),
        "max ms".into(),
        "CPU us/ev".into(),
        "goals missed".into(),
    ]];
    let mut notes = Vec::new();
    for (mode, f) in ran {
        let name = mode.name().to_string();
        let f = match f {
            Ok(f) => f,
            Err(why) => {
                t.push(vec![name.clone(), "failed".into()]);
                notes.push(format!("{name}: fan-out FAILED: {why}"));
                continue;
            }
        };
        let missed_pairs = f.tally.missing > 0 || f.tally.duplicates > 0 || f.tally.unexpected > 0;
        for (g, lat) in f.tally.groups.iter().enumerate() {
            let (on, goal) = match (f.relays, g) {
                (1, _) => ("the relay".to_string(), FANOUT_GOAL_MS),
                (_, 0) => ("A (publisher's)".to_string(), FANOUT_GOAL_MS),
                (_, g) => (
                    format!("{} (across)", (b'A' + g as u8) as char),
                    FANOUT_ACROSS_GOAL_MS,
                ),
            };
            let mut missed = Vec::new();
            if lat.p99_ms.is_nan() || lat.p99_ms > goal {
                missed.push("p99");
            }
            if g == 0 && missed_pairs {
                missed.push("deliveries");
            }
            let first = g == 0;
            // The pair counts and CPU are per mode: on its first line only.
            let once = |v: String| if first { v } else { String::new() };
            t.push(vec![
                once(name.clone()),
                once(f.relays.to_string()),
                on,
                once(f.tally.expected.to_string()),
                once(f.tally.delivered.to_string()),
                once(f.tally.missing.to_string()),
                once(f.tally.duplicates.to_string()),
                ms(lat.p50_ms),
                ms(lat.p99_ms),
                ms(lat.max_ms),
                once(format!(
                    "{:.0}",
                    per_event_us(f.cpu.relay, f.published.sent.len())
                )),
                if missed.is_empty() {
                    "none".into()
                } else {
                    missed.join(",")
                },
            ]);
        }
        notes.push(format!(
            "{name}: {} connections, {} subscriptions, {} events sent ({} accepted, {} refused) at {:.0}/s, \
             {:.1} expected deliveries per event; {} delivered ({}); {} unexpected, {} of other events; \
             {} subscriber connections closed by the relay{}",
            f.connections,
            f.subscriptions,
            f.published.sent.len(),
            f.published.accepted,
            f.published.refused,
            f.published.sent.len() as f64 / f.published.secs.max(1e-9),
            f.pairs_per_event,
            f.tally.delivered,
            f.tally
                .groups
                .iter()
                .enumerate()
                .map(|(g, l)| format!("{} on relay {}", l.n, (b'A' + g as u8) as char))
                .collect::<Vec<_>>()
                .join(", "),
            f.tally.unexpected,
            f.foreign,
            f.dropped,
            if f.drained { "" } else { "; gave up waiting for the missing ones" }
        ));
        notes.push(format!(
            "{name}: CPU while publishing ({:.1} s): orly {:.1} s{}, orly-bench {:.1} s",
            f.secs,
            f.cpu.relay,
            f.cpu
                .db
                .map(|d| format!(", orly-db {d:.1} s"))
                .unwrap_or_default(),
            f.cpu.bench
        ));
        if let Some(sample) = &f.published.sample_refusal {
            notes.push(format!("{name}: e.g. {sample}"));
        }
    }
    print!("{}", render(&t));
    println!();
    for n in notes {
        println!("{n}");
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2}")
    }
}

fn lat_cell(l: &Latencies) -> String {
    format!("{}/{}/{}", ms(l.p50_ms), ms(l.p99_ms), ms(l.max_ms))
}

/// What the load table's header says.
pub struct LoadInfo {
    pub cores: usize,
    pub describe: String,
}

/// The load table, one line per mode.
pub fn print_load(info: &LoadInfo, rows: &[(Mode, Result<LoadResult, String>)]) {
    println!();
    println!(
        "orly-bench --load: {} cores (available_parallelism); {}",
        info.cores, info.describe
    );
    println!(
        "RSS is the orly process alone (sampled every 100 ms, and VmHWM); fan-out cells are \
         p50/p99/max ms from EVENT sent to arrival; probes are paced EVENTs on their own \
         connection, bulk the pipelined ingest; stalled closed: relay's end of the socket \
         seen closed (/proc/net/tcp), after s: from their REQ"
    );
    println!();
    let mut t = vec![vec![
        "mode".to_string(),
        "conns".into(),
        "stalled".into(),
        "ingest ev/s".into(),
        "CPU us/ev".into(),
        "fan-out probes ms".into(),
        "fan-out bulk ms".into(),
        "missing".into(),
        "RSS subs MB".into(),
        "RSS peak MB".into(),
        "RSS end MB".into(),
        "stalled closed".into(),
        "after s p50/max".into(),
        "problems".into(),
    ]];
    let mut notes = Vec::new();
    for (mode, r) in rows {
        let name = mode.name().to_string();
        let r = match r {
            Ok(r) => r,
            Err(why) => {
                t.push(vec![name.clone(), "failed".into()]);
                notes.push(format!("{name}: load FAILED: {why}"));
                continue;
            }
        };
        let closed = r.stalled_closed_after.len();
        let after = if closed == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}/{:.1}",
                crate::relay::client::percentile(&r.stalled_closed_after, 50.0),
                r.stalled_closed_after[closed - 1]
            )
        };
        let missing = r.bulk_tally.missing + r.probe_tally.missing;
        let mut problems = Vec::new();
        if !r.relay_alive {
            problems.push("relay died".to_string());
        }
        if closed < r.stalled {
            problems.push(format!("{} stalled open", r.stalled - closed));
        }
        if missing > 0 {
            problems.push("missing".into());
        }
        if r.dropped > 0 {
            problems.push(format!("{} subscribers dropped", r.dropped));
        }
        let events = r.bulk.accepted + r.bulk.refused + r.probes.sent.len();
        t.push(vec![
            name.clone(),
            r.connections.to_string(),
            r.stalled.to_string(),
            format!("{:.0}", r.bulk.rate()),
            format!("{:.0}", per_event_us(r.cpu.relay, events)),
            lat_cell(&r.probe_tally.groups[0]),
            lat_cell(&r.bulk_tally.groups[0]),
            missing.to_string(),
            format!("{:.1}", r.rss_subscribed_mb),
            format!("{:.1}", r.rss_peak_sampled_mb.max(r.rss_hwm_mb)),
            format!("{:.1}", r.rss_end_mb),
            format!("{closed}/{}", r.stalled),
            after,
            if problems.is_empty() {
                "none".into()
            } else {
                problems.join(", ")
            },
        ]);
        notes.push(format!(
            "{name}: bulk {} accepted, {} refused in {:.1} s{}; {} probes sent; deliveries: bulk {}/{} \
             (dup {}, unexpected {}), probes {}/{} (dup {}, unexpected {})",
            r.bulk.accepted,
            r.bulk.refused,
            r.bulk.secs,
            if r.stopped_early { " (stopped by --load-secs)" } else { "" },
            r.probes.sent.len(),
            r.bulk_tally.delivered,
            r.bulk_tally.expected,
            r.bulk_tally.duplicates,
            r.bulk_tally.unexpected,
            r.probe_tally.delivered,
            r.probe_tally.expected,
            r.probe_tally.duplicates,
            r.probe_tally.unexpected,
        ));
        notes.push(format!(
            "{name}: RSS peak sampled {:.1} MB, VmHWM {:.1} MB; CPU during the ingest: orly {:.1} s{}, orly-bench {:.1} s",
            r.rss_peak_sampled_mb,
            r.rss_hwm_mb,
            r.cpu.relay,
            r.cpu
                .db
                .map(|d| format!(", orly-db {d:.1} s"))
                .unwrap_or_default(),
            r.cpu.bench
        ));
        notes.push(format!(
            "{name}: {}; client sockets from {} loopback source address(es)",
            r.open_files_note, r.sources
        ));
        if let Some(why) = &r.dropped_sample {
            notes.push(format!("{name}: a dropped subscriber: {why}"));
        }
        if let Some(sample) = &r.bulk.sample_refusal {
            notes.push(format!("{name}: e.g. {sample}"));
        }
    }
    print!("{}", render(&t));
    println!();
    for n in notes {
        println!("{n}");
    }
}

fn header(info: &RunInfo) -> Vec<String> {
    let mut h = vec!["mode".to_string(), "ingest ev/s".into()];
    h.extend(Shape::ALL.iter().map(|s| format!("{} ms", s.label())));
    h.push("RSS ingest MB".into());
    h.push(format!("RSS {} conns MB", info.connections));
    h.push("CPU us/ev".into());
    h.push("goals missed".into());
    h
}

fn goal_row() -> Vec<String> {
    let mut g = vec!["goal".to_string(), ">=10000/6000".into()];
    g.extend(Shape::ALL.iter().map(|_| format!("-/{P99_GOAL_MS:.2}")));
    g.push("-".into());
    g.push(format!("{RSS_GOAL_MB:.0}"));
    g.push(format!("{CPU_GOAL_US:.0}"));
    g.push(String::new());
    g
}

fn row_cells(row: &Row) -> Vec<String> {
    let mut cells = vec![row.mode.name().to_string()];
    match &row.outcome {
        Outcome::Measured(m) => {
            cells.push(format!("{:.0}", m.ingest.rate()));
            if m.latency.is_empty() {
                cells.extend(Shape::ALL.iter().map(|_| "-".to_string()));
            }
            cells.extend(
                m.latency
                    .iter()
                    .map(|(_, l)| format!("{:.2}/{:.2}", l.p50_ms, l.p99_ms)),
            );
            cells.push(format!("{:.1}", m.rss_ingest_mb));
            cells.push(if m.rss_conns_mb.is_nan() {
                "-".into()
            } else {
                format!("{:.1}", m.rss_conns_mb)
            });
            cells.push(format!("{:.0}", m.cpu_us_per_event()));
            let missed = missed_goals(row.mode, m);
            cells.push(if missed.is_empty() {
                "none".into()
            } else {
                missed.join(",")
            });
        }
        Outcome::Skipped(_) => cells.push("skipped".into()),
        Outcome::Failed(_) => cells.push("failed".into()),
    }
    cells
}

fn missed_goals(mode: Mode, m: &Measured) -> Vec<String> {
    let mut missed = Vec::new();
    if ingest_goal(mode).is_some_and(|goal| m.ingest.rate() < goal) {
        missed.push("ingest".to_string());
    }
    let slow: Vec<&str> = m
        .latency
        .iter()
        .filter(|(_, l)| l.p99_ms > P99_GOAL_MS)
        .map(|(shape, _)| shape.label())
        .collect();
    match slow.len() {
        0 => {}
        n if n == m.latency.len() => missed.push("p99 (all)".into()),
        _ => missed.push(format!("p99 ({})", slow.join(" "))),
    }
    if m.rss_conns_mb > RSS_GOAL_MB {
        missed.push("RSS".into());
    }
    if mode == Mode::LocalSqlite && m.cpu_us_per_event() > CPU_GOAL_US {
        missed.push("CPU".into());
    }
    if m.ingest.refused > 0 {
        missed.push("refusals".into());
    }
    missed
}

fn notes(row: &Row) -> Vec<String> {
    let name = row.mode.name();
    match &row.outcome {
        Outcome::Skipped(why) => vec![format!("{name}: skipped: {why}")],
        Outcome::Failed(why) => vec![format!("{name}: FAILED: {why}")],
        Outcome::Measured(m) => {
            let mut n = vec![format!(
                "{name}: {} accepted, {} refused in {:.1} s; mean events per REQ: {}",
                m.ingest.accepted,
                m.ingest.refused,
                m.ingest.secs,
                m.latency
                    .iter()
                    .map(|(s, l)| format!("{} {:.1}", s.label(), l.mean_events))
                    .collect::<Vec<_>>()
                    .join(", ")
            )];
            let cpu = &m.ingest_cpu;
            let events = m.ingest.accepted + m.ingest.refused;
            n.push(format!(
                "{name}: CPU during ingest: orly {:.1} s{}, orly-bench {:.1} s (wall {:.1} s)",
                cpu.relay,
                cpu.db
                    .map(|d| format!(
                        ", orly-db {d:.1} s ({:.0} us/event; relay + orly-db {:.0} us/event)",
                        per_event_us(d, events),
                        per_event_us(d + cpu.relay, events)
                    ))
                    .unwrap_or_default(),
                cpu.bench,
                m.ingest.secs
            ));
            if let Some(sample) = &m.ingest.sample_refusal {
                n.push(format!("{name}: e.g. {sample}"));
            }
            if let Some(db) = m.db_rss_mb {
                n.push(format!(
                    "{name}: orly-db process RSS {db:.1} MB (not in the relay's column)"
                ));
            }
            n
        }
    }
}
