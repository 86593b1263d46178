//! The results table, with the goals beside the numbers.

use super::client::{Ingest, Latency, Shape};
use super::Mode;
use crate::table::render;

/// Ingest goal (events/s) per mode; the issue sets none for PostgreSQL.
fn ingest_goal(mode: Mode) -> Option<f64> {
    match mode {
        Mode::LocalSqlite => Some(10_000.0),
        Mode::SplitSqlite => Some(5_000.0),
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
const P99_GOAL_MS: f64 = 5.0;
const RSS_GOAL_MB: f64 = 100.0;

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
}

/// CPU seconds spent during one phase, per process.
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
}

pub fn print(info: &RunInfo, rows: &[Row]) {
    println!();
    println!(
        "orly-bench: {} cores (available_parallelism), {} events, {} clients, {} REQs per shape, {} connections",
        info.cores, info.events, info.clients, info.queries, info.connections
    );
    println!(
        "goals: ingest >= 10000 ev/s local/SQLite, >= 5000 split/SQLite; REQ p99 <= {P99_GOAL_MS} ms; \
         RSS <= {RSS_GOAL_MB} MB at 1000 connections; follows over gRPC within 20% of in-process"
    );
    println!("latency cells are p50/p99 in ms, send to EOSE; RSS is the orly process alone");
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
}

fn header(info: &RunInfo) -> Vec<String> {
    let mut h = vec!["mode".to_string(), "ingest ev/s".into()];
    h.extend(Shape::ALL.iter().map(|s| format!("{} ms", s.label())));
    h.push("RSS ingest MB".into());
    h.push(format!("RSS {} conns MB", info.connections));
    h.push("goals missed".into());
    h
}

fn goal_row() -> Vec<String> {
    let mut g = vec!["goal".to_string(), ">=10000/5000".into()];
    g.extend(Shape::ALL.iter().map(|_| format!("-/{P99_GOAL_MS:.2}")));
    g.push("-".into());
    g.push(format!("{RSS_GOAL_MB:.0}"));
    g.push(String::new());
    g
}

fn row_cells(row: &Row) -> Vec<String> {
    let mut cells = vec![row.mode.name().to_string()];
    match &row.outcome {
        Outcome::Measured(m) => {
            cells.push(format!("{:.0}", m.ingest.rate()));
            cells.extend(
                m.latency
                    .iter()
                    .map(|(_, l)| format!("{:.2}/{:.2}", l.p50_ms, l.p99_ms)),
            );
            cells.push(format!("{:.1}", m.rss_ingest_mb));
            cells.push(format!("{:.1}", m.rss_conns_mb));
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
            n.push(format!(
                "{name}: CPU during ingest: orly {:.1} s{}, orly-bench {:.1} s (wall {:.1} s)",
                cpu.relay,
                cpu.db
                    .map(|d| format!(", orly-db {d:.1} s"))
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
