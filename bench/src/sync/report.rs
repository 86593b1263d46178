//! The results: two plain-text tables with the goals beside the numbers.

use super::catchup::CatchUp;
use super::propagation::Measured as Propagation;
use super::{CATCHUP_GOAL_EPS, PROPAGATION_P99_GOAL_MS};
use crate::table::render;

/// What the header says about the run.
pub struct RunInfo {
    pub cores: usize,
    pub events: usize,
    pub authors: usize,
    pub propagation_events: usize,
    pub interval_ms: u64,
}

/// Prints the report; false if a measurement failed (a missed goal is no failure).
pub fn print(
    info: &RunInfo,
    catch_up: Option<&CatchUp>,
    propagation: Option<&Result<Propagation, String>>,
) -> bool {
    let mut ok = true;
    println!();
    println!(
        "orly-sync-bench: {} cores (available_parallelism); every relay in this process, SQLite stores, loopback",
        info.cores
    );
    println!(
        "goals: catch-up >= {CATCHUP_GOAL_EPS:.0} events/s per mechanism (and the peer holds every event); \
         propagation p99 <= {PROPAGATION_P99_GOAL_MS:.0} ms (A -> B and A -> C together)"
    );

    if let Some(c) = catch_up {
        println!();
        println!(
            "catch-up: an empty peer relay pulls {} events ({} authors, kind 1) from one source relay; a fresh peer store per mechanism",
            c.events, info.authors
        );
        let mut table = vec![cells(&[
            "mechanism",
            "events",
            "time s",
            "events/s",
            "verified",
            "goal ev/s",
            "goal met",
        ])];
        let mut notes = vec![format!(
            "signing {:.1} s; source store filled in {:.1} s ({:.0} events/s, {} save_event calls in flight)",
            c.signing.as_secs_f64(),
            c.fill.as_secs_f64(),
            c.events as f64 / c.fill.as_secs_f64().max(1e-9),
            c.fill_concurrency
        )];
        for row in &c.rows {
            let name = row.mechanism.name();
            match &row.outcome {
                Ok(m) => {
                    let rate = m.rate(c.events);
                    let complete = m.stored == c.events as u64;
                    table.push(vec![
                        name.to_string(),
                        c.events.to_string(),
                        format!("{:.2}", m.time.as_secs_f64()),
                        format!("{rate:.0}"),
                        m.stored.to_string(),
                        format!(">= {CATCHUP_GOAL_EPS:.0}"),
                        match (complete, rate >= CATCHUP_GOAL_EPS) {
                            (true, true) => "yes".into(),
                            (true, false) => "NO".into(),
                            (false, _) => "NO (incomplete)".into(),
                        },
                    ]);
                    notes.push(format!(
                        "{name}: {}; peer latest serial {}",
                        m.detail, m.latest_serial
                    ));
                }
                Err(e) => {
                    ok = false;
                    table.push(vec![
                        name.to_string(),
                        c.events.to_string(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        format!(">= {CATCHUP_GOAL_EPS:.0}"),
                        "failed".into(),
                    ]);
                    notes.push(format!("{name}: FAILED: {e}"));
                }
            }
        }
        print!("{}", render(&table));
        for n in notes {
            println!("  {n}");
        }
    } else if info.events == 0 {
        println!();
        println!("catch-up: skipped (--events 0)");
    }

    match propagation {
        None => {
            println!();
            println!("propagation: skipped (--propagation-events 0)");
        }
        Some(result) => {
            println!();
            println!(
                "propagation: relays A, B, C (cluster sync, each member replicating the other two; live delivery from the store's feed); \
                 {} events published on A one every {} ms; latency = EVENT sent on A -> event received on a live REQ (since now) on B / C",
                info.propagation_events, info.interval_ms
            );
            match result {
                Ok(p) => {
                    let mut table = vec![cells(&[
                        "path",
                        "delivered",
                        "p50 ms",
                        "p90 ms",
                        "p99 ms",
                        "max ms",
                        "goal p99 ms",
                        "goal met",
                    ])];
                    let both: Vec<f64> = p.b.iter().chain(&p.c).copied().collect();
                    table.push(latency_row("A -> B", &p.b, p.sent, None));
                    table.push(latency_row("A -> C", &p.c, p.sent, None));
                    table.push(latency_row(
                        "A -> B+C",
                        &both,
                        2 * p.sent,
                        Some(PROPAGATION_P99_GOAL_MS),
                    ));
                    print!("{}", render(&table));
                    println!(
                        "  A accepted {} of {} events (OK true); publishing took {:.1} s{}",
                        p.accepted,
                        p.sent,
                        p.publish_time.as_secs_f64(),
                        p.first_refusal
                            .as_ref()
                            .map(|r| format!("; first refusal: {r}"))
                            .unwrap_or_default()
                    );
                }
                Err(e) => {
                    ok = false;
                    println!("  FAILED: {e}");
                }
            }
        }
    }
    println!();
    ok
}

fn cells(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn latency_row(path: &str, ms: &[f64], expected: usize, goal: Option<f64>) -> Vec<String> {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let p = |q: f64| percentile(&sorted, q).map_or("-".into(), |v| format!("{v:.1}"));
    let complete = sorted.len() == expected;
    vec![
        path.to_string(),
        format!("{}/{expected}", sorted.len()),
        p(0.50),
        p(0.90),
        p(0.99),
        p(1.0),
        goal.map_or(String::new(), |g| format!("<= {g:.0}")),
        match goal {
            None => String::new(),
            Some(g) => match (complete, percentile(&sorted, 0.99)) {
                (true, Some(p99)) if p99 <= g => "yes".into(),
                (true, _) => "NO".into(),
                (false, _) => "NO (lost events)".into(),
            },
        },
    ]
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}
