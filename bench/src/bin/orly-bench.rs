//! `orly-bench`: ingest rate, REQ latency and memory of the real `orly` relay binary in three
//! modes (local/SQLite, split/SQLite over gRPC, local/PostgreSQL), printed as one table.
//!
//! Run from the workspace root; `orly` (which also runs `orly db` and `orly acl`) must sit
//! next to `orly-bench`:
//!
//! ```text
//! cargo build --release -p orly -p orly-bench && target/release/orly-bench
//! ```
//!
//! (with `CARGO_TARGET_DIR` set, the binaries are in `$CARGO_TARGET_DIR/release/`). `--quick`
//! is a smoke run; `--modes`, `--events`, `--clients`, `--queries`, `--connections` tune it;
//! PostgreSQL needs an admin URL (`--pg-url`, `ORLY_BENCH_PG_URL` or `ORLY_TEST_PG_URL`).
//! See docs/benchmarks.md.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use orly_bench::binaries::Orly;
use orly_bench::relay::client::{self, Shape};
use orly_bench::relay::process::{self, Backend, Stack};
use orly_bench::relay::report::{self, CpuUse, Measured, Outcome, Row, RunInfo};
use orly_bench::relay::{dataset, postgres, Mode};

/// Benchmarks the orly relay: ingest, REQ latency and memory, per storage mode.
#[derive(Debug, Parser)]
#[command(name = "orly-bench", about, long_about = None)]
struct Args {
    /// Modes to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "local-sqlite,split-sqlite,local-postgres,follows-local,follows-grpc"
    )]
    modes: Vec<Mode>,
    /// Signed events to publish (and the size of the store queried) [default: 100000; quick: 5000].
    #[arg(long)]
    events: Option<usize>,
    /// Distinct authors of the events.
    #[arg(long, default_value_t = 1000)]
    authors: usize,
    /// Concurrent publishing WebSocket clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Unanswered EVENTs each client keeps in flight.
    #[arg(long, default_value_t = 500)]
    window: usize,
    /// Timed REQs per query shape [default: 1000; quick: 100].
    #[arg(long)]
    queries: Option<usize>,
    /// Open connections, each holding a subscription, for the memory figure
    /// [default: 1000; quick: 100].
    #[arg(long)]
    connections: Option<usize>,
    /// PostgreSQL admin URL; a scratch database is created in it and dropped after.
    /// Falls back to ORLY_TEST_PG_URL; without either, local-postgres is skipped.
    #[arg(long, env = "ORLY_BENCH_PG_URL")]
    pg_url: Option<String>,
    /// A small smoke run: 5000 events, 100 REQs per shape, 100 connections.
    #[arg(long)]
    quick: bool,
}

/// The sizes of one run, after `--quick` and the defaults.
struct Plan {
    events: usize,
    authors: usize,
    clients: usize,
    window: usize,
    queries: usize,
    warmup: usize,
    connections: usize,
}

impl Plan {
    fn from_args(a: &Args) -> Self {
        let pick = |v: Option<usize>, full: usize, quick: usize| {
            v.unwrap_or(if a.quick { quick } else { full })
        };
        let queries = pick(a.queries, 1000, 100);
        Self {
            events: pick(a.events, 100_000, 5_000),
            authors: a.authors.max(1),
            clients: a.clients.max(1),
            window: a.window.max(1),
            queries,
            warmup: (queries / 10).max(10),
            connections: pick(a.connections, 1000, 100),
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("orly-bench: cannot start tokio: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(args) => r,
            _ = interrupted() => {
                // Dropping `run` killed the children; the scratch database goes too.
                postgres::drop_live().await;
                Err(anyhow::anyhow!("interrupted"))
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orly-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP (a closed terminal), so the children never outlive us.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let hup = signal(SignalKind::hangup());
    match (term, hup) {
        (Ok(mut term), Ok(mut hup)) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let orly = Orly::locate()?;
    let plan = Plan::from_args(&args);
    let pg_url = args
        .pg_url
        .clone()
        .or_else(|| std::env::var("ORLY_TEST_PG_URL").ok())
        .filter(|u| !u.trim().is_empty());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);

    eprintln!("signing {} events ...", plan.events);
    let (events, authors) = (plan.events, plan.authors);
    let data =
        Arc::new(tokio::task::spawn_blocking(move || dataset::generate(events, authors)).await??);

    let mut rows = Vec::new();
    for &mode in &args.modes {
        eprintln!("== {}", mode.name());
        let outcome = run_mode(mode, &orly, &data, &plan, pg_url.as_deref()).await;
        if let Outcome::Failed(why) = &outcome {
            eprintln!("{}: failed: {why}", mode.name());
        }
        rows.push(Row { mode, outcome });
    }
    let info = RunInfo {
        cores,
        events: plan.events,
        clients: plan.clients,
        queries: plan.queries,
        connections: plan.connections,
    };
    report::print(&info, &rows);
    if rows.iter().any(|r| matches!(r.outcome, Outcome::Failed(_))) {
        anyhow::bail!("some modes failed");
    }
    Ok(())
}

async fn run_mode(
    mode: Mode,
    orly: &Orly,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
    pg_url: Option<&str>,
) -> Outcome {
    let result = match mode {
        Mode::LocalSqlite => measure(orly, Backend::Sqlite, data, plan).await,
        Mode::SplitSqlite => measure(orly, Backend::Split, data, plan).await,
        Mode::FollowsLocal | Mode::FollowsGrpc => {
            // Every author of the data set is followed, among 10,000 keys in all.
            let admin = nostr::Keys::generate();
            let mut follows = data.authors.clone();
            while follows.len() < FOLLOWS {
                follows.push(nostr::Keys::generate().public_key().to_hex());
            }
            let backend = Backend::Follows {
                admin: &admin,
                follows: &follows,
                grpc: mode == Mode::FollowsGrpc,
            };
            measure(orly, backend, data, plan).await
        }
        Mode::LocalPostgres => {
            let Some(admin) = pg_url else {
                return Outcome::Skipped(
                    "no PostgreSQL URL (give --pg-url, ORLY_BENCH_PG_URL or ORLY_TEST_PG_URL)"
                        .into(),
                );
            };
            measure_postgres(orly, admin, data, plan).await
        }
    };
    match result {
        Ok(m) => Outcome::Measured(Box::new(m)),
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

/// Size of the admin's follow list in the `follows` modes.
const FOLLOWS: usize = 10_000;

/// Runs the PostgreSQL mode in a scratch database that is dropped afterwards.
async fn measure_postgres(
    orly: &Orly,
    admin: &str,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
) -> anyhow::Result<Measured> {
    let db = postgres::ScratchDb::create(admin).await?;
    let result = measure(orly, Backend::Postgres { url: &db.url }, data, plan).await;
    if let Err(e) = db.drop_db().await {
        eprintln!("warning: {e:#}");
    }
    result
}

/// Starts the stack, then ingest, REQ latency and memory, in that order, on one store.
async fn measure(
    orly: &Orly,
    backend: Backend<'_>,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
) -> anyhow::Result<Measured> {
    let stack = Stack::start(orly, backend).await?;
    let result = measure_stack(&stack, data, plan).await;
    result.map_err(|e| {
        let mut log = stack.relay.log_tail();
        if let Some(db) = &stack.db {
            log.push_str(&db.log_tail());
        }
        if log.trim().is_empty() {
            e
        } else {
            e.context(format!("child log tail:\n{log}"))
        }
    })
}

async fn measure_stack(
    stack: &Stack,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
) -> anyhow::Result<Measured> {
    let cpu_before = cpu_snapshot(stack)?;
    let ingest = client::ingest(&stack.url, data, plan.clients, plan.window).await?;
    let ingest_cpu = cpu_snapshot(stack)?.since(&cpu_before);
    eprintln!(
        "  ingest: {:.0} events/s ({} accepted, {} refused, {:.1} s)",
        ingest.rate(),
        ingest.accepted,
        ingest.refused,
        ingest.secs
    );
    settle().await;
    let rss_ingest_mb = stack.relay.rss_mb()?;

    let mut latency = Vec::new();
    for shape in Shape::ALL {
        let l = client::req_latency(&stack.url, data, shape, plan.queries, plan.warmup).await?;
        eprintln!(
            "  REQ {:<10} p50 {:.2} ms  p99 {:.2} ms",
            shape.label(),
            l.p50_ms,
            l.p99_ms
        );
        latency.push((shape, l));
    }

    let conns = client::hold_connections(&stack.url, plan.connections).await?;
    settle().await;
    let rss_conns_mb = stack.relay.rss_mb()?;
    eprintln!(
        "  RSS: {rss_ingest_mb:.1} MB after ingest, {rss_conns_mb:.1} MB with {} connections",
        conns.len()
    );
    let db_rss_mb = stack.db.as_ref().map(process::Proc::rss_mb).transpose()?;
    drop(conns);
    Ok(Measured {
        ingest,
        latency,
        rss_ingest_mb,
        rss_conns_mb,
        ingest_cpu,
        db_rss_mb,
    })
}

/// CPU seconds used so far by each process of the run.
fn cpu_snapshot(stack: &Stack) -> anyhow::Result<CpuUse> {
    Ok(CpuUse {
        relay: stack.relay.cpu_secs()?,
        db: stack.db.as_ref().map(process::Proc::cpu_secs).transpose()?,
        bench: process::cpu_secs("self")?,
    })
}

/// A moment for the relay to finish background work before its memory is read.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}
