//! `orly-bench`: ingest rate, REQ latency, memory and CPU per event of the real `orly` relay
//! binary in several modes (local/SQLite, split/SQLite over gRPC, local/PostgreSQL, the ACL
//! modes), then live fan-out latency over 10,000 subscriptions (on one relay, and across two
//! relay replicas in split mode), printed as tables. `--load` runs the load benchmark
//! instead: 10,000 subscribed connections, 200 stalled readers and ingest at once.
//!
//! Run from the workspace root; `orly` (which also runs `orly db` and `orly acl`) must sit
//! next to `orly-bench`:
//!
//! ```text
//! cargo build --release -p orly -p orly-bench && target/release/orly-bench
//! ```
//!
//! (with `CARGO_TARGET_DIR` set, the binaries are in `$CARGO_TARGET_DIR/release/`). `--quick`
//! is a smoke run; `--modes`, `--events`, `--clients`, `--queries`, `--connections`,
//! `--skip`, `--fanout-*` and `--load-*` tune it; `--relay-env K=V` passes settings to the
//! relays; PostgreSQL needs an admin URL (`--pg-url`, `ORLY_BENCH_PG_URL` or
//! `ORLY_TEST_PG_URL`). See docs/benchmarks.md.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use orly_bench::binaries::Orly;
use orly_bench::relay::client::{self, Shape};
use orly_bench::relay::fanout::{self, FanoutPlan};
use orly_bench::relay::load::{self, LoadPlan};
use orly_bench::relay::process::{self, Backend, Stack};
use orly_bench::relay::report::{self, CpuUse, LoadInfo, Measured, Outcome, Row, RunInfo};
use orly_bench::relay::{dataset, net, postgres, Mode};

/// Benchmarks the orly relay: ingest, REQ latency, memory and fan-out per storage mode; or,
/// with --load, many connections, stalled readers and ingest at once.
#[derive(Debug, Parser)]
#[command(name = "orly-bench", about, long_about = None)]
struct Args {
    /// Modes to run, comma-separated [default: local-sqlite,split-sqlite,local-postgres,
    /// follows-local,follows-grpc; with --load: local-sqlite].
    #[arg(long, value_enum, value_delimiter = ',')]
    modes: Option<Vec<Mode>>,
    /// Signed events to publish (and the size of the store queried) [default: 100000; quick: 5000].
    #[arg(long)]
    events: Option<usize>,
    /// Distinct authors of the events.
    #[arg(long, default_value_t = 1000)]
    authors: usize,
    /// Concurrent publishing WebSocket clients (with --load: the ingest's publishers)
    /// [default: 8; with --load: 4].
    #[arg(long)]
    clients: Option<usize>,
    /// Unanswered EVENTs each client keeps in flight [default: 500; with --load: 100].
    #[arg(long)]
    window: Option<usize>,
    /// Timed REQs per query shape [default: 1000; quick: 100].
    #[arg(long)]
    queries: Option<usize>,
    /// Open connections, each holding a subscription, for the memory figure
    /// [default: 1000; quick: 100].
    #[arg(long)]
    connections: Option<usize>,
    /// Phases to leave out, comma-separated (the ingest always runs: it fills the store).
    #[arg(long, value_enum, value_delimiter = ',')]
    skip: Vec<Phase>,
    /// Fan-out: subscriber connections [default: 1000; quick: 100].
    #[arg(long)]
    fanout_connections: Option<usize>,
    /// Fan-out: live subscriptions per subscriber connection (one filter each; at most the
    /// relay's ORLY_MAX_SUBSCRIPTIONS, 20 by default).
    #[arg(long, default_value_t = 10)]
    fanout_subs: usize,
    /// Fan-out: events published [default: 1000; quick: 200].
    #[arg(long)]
    fanout_events: Option<usize>,
    /// Fan-out: events per second from the publisher [default: 200; quick: 100].
    #[arg(long)]
    fanout_rate: Option<f64>,
    /// Fan-out: relays in split mode and PostgreSQL mode (subscribers spread over them, the
    /// publisher on the first); local SQLite modes always use one.
    #[arg(long, default_value_t = 2)]
    fanout_replicas: usize,
    /// Extra environment for every relay process, `KEY=VALUE`; repeatable (e.g.
    /// `--relay-env ORLY_MAX_OUTBOUND_BYTES=33554432`). Applied after the bench's own settings.
    #[arg(long = "relay-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    relay_env: Vec<(String, String)>,
    /// Run the load benchmark instead of the tables above.
    #[arg(long)]
    load: bool,
    /// Load: subscribed connections, one subscription each [default: 10000; quick: 500].
    #[arg(long)]
    load_connections: Option<usize>,
    /// Load: stalled readers (raw sockets that never read) [default: 200; quick: 20].
    #[arg(long)]
    stalled: Option<usize>,
    /// Load: REQs each stalled reader sends.
    #[arg(long, default_value_t = 1)]
    stalled_reqs: usize,
    /// Load: the `limit` of a stalled reader's REQ (which has no other field).
    #[arg(long, default_value_t = 5000)]
    stalled_limit: usize,
    /// Load: SO_RCVBUF of a stalled reader's socket, bytes.
    #[arg(long, default_value_t = 4096)]
    stalled_rcvbuf: u32,
    /// Load: events stored before the run [default: 10000; quick: 6000].
    #[arg(long)]
    load_prefill: Option<usize>,
    /// Load: events ingested during the run [default: 50000; quick: 5000].
    #[arg(long)]
    load_events: Option<usize>,
    /// Load: the ingest's time limit, seconds; it stops then even with events left
    /// [default: 60; quick: 15].
    #[arg(long)]
    load_secs: Option<u64>,
    /// Load: paced probe EVENTs per second on their own connection during the ingest (each
    /// after the previous one's OK).
    #[arg(long, default_value_t = 50.0)]
    probe_rate: f64,
    /// Load: how long after their REQs to wait for the relay to close the stalled readers,
    /// seconds [default: 150; quick: 30].
    #[arg(long)]
    stall_wait: Option<u64>,
    /// Load: loopback source addresses 127.0.0.1..N for the client sockets (0: as many as
    /// the ephemeral port range needs).
    #[arg(long, default_value_t = 0)]
    source_addrs: usize,
    /// PostgreSQL admin URL; a scratch database is created in it and dropped after.
    /// Falls back to ORLY_TEST_PG_URL; without either, local-postgres is skipped.
    #[arg(long, env = "ORLY_BENCH_PG_URL")]
    pg_url: Option<String>,
    /// A small smoke run: 5000 events, 100 REQs per shape, 100 connections, a fan-out of
    /// 100 connections; with --load 500 connections and 20 stalled readers.
    #[arg(long)]
    quick: bool,
}

/// The phases after the ingest, which `--skip` can leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Req,
    Memory,
    Fanout,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
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
    skip: Vec<Phase>,
    fanout: FanoutPlan,
    fanout_replicas: usize,
    relay_env: Vec<(String, String)>,
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
            clients: a.clients.unwrap_or(8).max(1),
            window: a.window.unwrap_or(500).max(1),
            queries,
            warmup: (queries / 10).max(10),
            connections: pick(a.connections, 1000, 100),
            skip: a.skip.clone(),
            fanout: FanoutPlan {
                connections: pick(a.fanout_connections, 1000, 100).max(1),
                subs_per_conn: a.fanout_subs.max(1),
                events: pick(a.fanout_events, 1000, 200).max(1),
                rate: a
                    .fanout_rate
                    .unwrap_or(if a.quick { 100.0 } else { 200.0 })
                    .max(0.1),
                drain: Duration::from_secs(10),
            },
            fanout_replicas: a.fanout_replicas.max(1),
            relay_env: a.relay_env.clone(),
        }
    }

    fn runs(&self, phase: Phase) -> bool {
        !self.skip.contains(&phase)
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
    if args.load {
        return run_load(args).await;
    }
    let orly = Orly::locate()?;
    let plan = Plan::from_args(&args);
    let pg_url = pg_url(&args);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let modes = args.modes.clone().unwrap_or_else(|| {
        vec![
            Mode::LocalSqlite,
            Mode::SplitSqlite,
            Mode::LocalPostgres,
            Mode::FollowsLocal,
            Mode::FollowsGrpc,
        ]
    });

    eprintln!("signing {} events ...", plan.events);
    let (events, authors) = (plan.events, plan.authors);
    let data =
        Arc::new(tokio::task::spawn_blocking(move || dataset::generate(events, authors)).await??);

    let mut rows = Vec::new();
    for &mode in &modes {
        eprintln!("== {}", mode.name());
        let outcome = run_mode(mode, &orly, &data, &plan, pg_url.as_deref()).await;
        if let Outcome::Failed(why) = &outcome {
            eprintln!("{}: failed: {why}", mode.name());
        }
        rows.push(Row { mode, outcome });
    }
    let f = &plan.fanout;
    let info = RunInfo {
        cores,
        events: plan.events,
        clients: plan.clients,
        queries: plan.queries,
        connections: plan.connections,
        fanout: plan.runs(Phase::Fanout).then(|| {
            format!(
                "{} connections x {} subscriptions = {}, {} events at {}/s from one publisher; \
                 split and PostgreSQL modes on {} relays",
                f.connections,
                f.subs_per_conn,
                f.connections * f.subs_per_conn,
                f.events,
                f.rate,
                plan.fanout_replicas
            )
        }),
    };
    report::print(&info, &rows);
    if rows.iter().any(|r| {
        matches!(&r.outcome, Outcome::Failed(_))
            || matches!(&r.outcome, Outcome::Measured(m) if matches!(m.fanout, Some(Err(_))))
    }) {
        anyhow::bail!("some modes failed");
    }
    Ok(())
}

fn pg_url(args: &Args) -> Option<String> {
    args.pg_url
        .clone()
        .or_else(|| std::env::var("ORLY_TEST_PG_URL").ok())
        .filter(|u| !u.trim().is_empty())
}

async fn run_mode(
    mode: Mode,
    orly: &Orly,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
    pg_url: Option<&str>,
) -> Outcome {
    let result = match mode {
        Mode::LocalSqlite => measure(orly, Backend::Sqlite, mode, data, plan).await,
        Mode::SplitSqlite => measure(orly, Backend::Split, mode, data, plan).await,
        Mode::FollowsLocal | Mode::FollowsGrpc => {
            let admin = nostr::Keys::generate();
            let follows = follow_list(data);
            let backend = Backend::Follows {
                admin: &admin,
                follows: &follows,
                grpc: mode == Mode::FollowsGrpc,
            };
            measure(orly, backend, mode, data, plan).await
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

/// Every author of the data set is followed, among 10,000 keys in all.
fn follow_list(data: &dataset::Dataset) -> Vec<String> {
    let mut follows = data.authors.clone();
    while follows.len() < FOLLOWS {
        follows.push(nostr::Keys::generate().public_key().to_hex());
    }
    follows
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
    let backend = Backend::Postgres { url: &db.url };
    let result = measure(orly, backend, Mode::LocalPostgres, data, plan).await;
    if let Err(e) = db.drop_db().await {
        eprintln!("warning: {e:#}");
    }
    result
}

/// Starts the stack, then ingest, REQ latency, memory and fan-out, in that order, on one
/// store.
async fn measure(
    orly: &Orly,
    backend: Backend<'_>,
    mode: Mode,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
) -> anyhow::Result<Measured> {
    let mut stack = Stack::start(orly, backend, &plan.relay_env).await?;
    let result = measure_stack(&mut stack, orly, mode, data, plan).await;
    result.map_err(|e| with_logs(e, &stack))
}

/// `e` with the children's log tails.
fn with_logs(e: anyhow::Error, stack: &Stack) -> anyhow::Error {
    let log = stack.log_tail();
    if log.trim().is_empty() {
        e
    } else {
        e.context(format!("child log tail:\n{log}"))
    }
}

async fn measure_stack(
    stack: &mut Stack,
    orly: &Orly,
    mode: Mode,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
) -> anyhow::Result<Measured> {
    let cpu_before = cpu_snapshot(stack)?;
    let ingest = client::ingest(&stack.url, data, plan.clients, plan.window).await?;
    let ingest_cpu = cpu_snapshot(stack)?.since(&cpu_before);
    eprintln!(
        "  ingest: {:.0} events/s ({} accepted, {} refused, {:.1} s), relay CPU {:.0} us/event",
        ingest.rate(),
        ingest.accepted,
        ingest.refused,
        ingest.secs,
        ingest_cpu.relay * 1e6 / (ingest.accepted + ingest.refused).max(1) as f64
    );
    settle().await;
    let rss_ingest_mb = stack.relay.rss_mb()?;

    let mut latency = Vec::new();
    if plan.runs(Phase::Req) {
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
    }

    let mut rss_conns_mb = f64::NAN;
    if plan.runs(Phase::Memory) {
        let conns = client::hold_connections(&stack.url, plan.connections).await?;
        settle().await;
        rss_conns_mb = stack.relay.rss_mb()?;
        eprintln!(
            "  RSS: {rss_ingest_mb:.1} MB after ingest, {rss_conns_mb:.1} MB with {} connections",
            conns.len()
        );
    }
    let db_rss_mb = stack.db.as_ref().map(process::Proc::rss_mb).transpose()?;

    let fanout = match mode {
        _ if !plan.runs(Phase::Fanout) => None,
        Mode::FollowsLocal | Mode::FollowsGrpc => None,
        _ => Some(
            run_fanout(stack, orly, mode, data, plan)
                .await
                .map_err(|e| format!("{:#}", with_logs(e, stack))),
        ),
    };
    if let Some(Ok(f)) = &fanout {
        for (g, l) in f.tally.groups.iter().enumerate() {
            eprintln!(
                "  fan-out relay {}: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms ({} deliveries)",
                g, l.p50_ms, l.p99_ms, l.max_ms, l.n
            );
        }
        eprintln!(
            "  fan-out: {} expected, {} delivered, {} missing, {} duplicates",
            f.tally.expected, f.tally.delivered, f.tally.missing, f.tally.duplicates
        );
    }
    Ok(Measured {
        ingest,
        latency,
        rss_ingest_mb,
        rss_conns_mb,
        ingest_cpu,
        db_rss_mb,
        fanout,
    })
}

/// The fan-out phase: on split and PostgreSQL stacks, more relays join the same store first.
async fn run_fanout(
    stack: &mut Stack,
    orly: &Orly,
    mode: Mode,
    data: &Arc<dataset::Dataset>,
    plan: &Plan,
) -> anyhow::Result<fanout::FanoutResult> {
    if matches!(mode, Mode::SplitSqlite | Mode::LocalPostgres) {
        while stack.urls().len() < plan.fanout_replicas {
            let url = stack.add_replica(orly).await?;
            eprintln!("  fan-out: relay replica on {url}");
        }
    }
    let s: &Stack = stack;
    fanout::run(s, data, &plan.fanout, || cpu_snapshot(s)).await
}

/// The load benchmark, per mode.
async fn run_load(args: Args) -> anyhow::Result<()> {
    let orly = Orly::locate()?;
    let pick = |v: Option<usize>, full: usize, quick: usize| {
        v.unwrap_or(if args.quick { quick } else { full })
    };
    let plan = LoadPlan {
        connections: pick(args.load_connections, 10_000, 500).max(1),
        stalled: pick(args.stalled, 200, 20),
        stalled_reqs: args.stalled_reqs.max(1),
        stalled_limit: args.stalled_limit,
        rcvbuf: args.stalled_rcvbuf,
        prefill: pick(args.load_prefill, 10_000, 6_000),
        events: pick(args.load_events, 50_000, 5_000).max(1),
        clients: args.clients.unwrap_or(4).max(1),
        window: args.window.unwrap_or(100).max(1),
        probe_rate: args.probe_rate.max(0.1),
        ingest_for: Duration::from_secs(pick(args.load_secs.map(|s| s as usize), 60, 15) as u64),
        stall_wait: Duration::from_secs(pick(args.stall_wait.map(|s| s as usize), 150, 30) as u64),
        source_addrs: args.source_addrs,
    };
    let modes = args
        .modes
        .clone()
        .unwrap_or_else(|| vec![Mode::LocalSqlite]);
    let pg_url = pg_url(&args);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // Before any child starts: they inherit the raised limit.
    let fd_note = net::ensure_open_files(plan.open_files())?;
    eprintln!("{fd_note}");

    let n = plan.prefill + plan.events;
    eprintln!("signing {n} events ...");
    let authors = args.authors.max(1);
    let data = Arc::new(tokio::task::spawn_blocking(move || dataset::generate(n, authors)).await??);

    let mut rows = Vec::new();
    for &mode in &modes {
        eprintln!("== {} (load)", mode.name());
        let result = load_mode(
            &orly,
            mode,
            &data,
            &plan,
            &args,
            pg_url.as_deref(),
            &fd_note,
        )
        .await
        .map_err(|e| format!("{e:#}"));
        if let Err(why) = &result {
            eprintln!("{}: failed: {why}", mode.name());
        }
        rows.push((mode, result));
    }
    let info = LoadInfo {
        cores,
        describe: format!(
            "{} subscribed connections (one filter each: authors or #p of one pubkey), {} stalled \
             readers ({} REQ(s) of limit {}, SO_RCVBUF {} B, never read), {} events stored before, \
             up to {} ingested during the run (at most {} s) by {} publishers (window {}), probes at {}/s",
            plan.connections,
            plan.stalled,
            plan.stalled_reqs,
            plan.stalled_limit,
            plan.rcvbuf,
            plan.prefill,
            plan.events,
            plan.ingest_for.as_secs(),
            plan.clients,
            plan.window,
            plan.probe_rate
        ),
    };
    report::print_load(&info, &rows);
    if rows.iter().any(|(_, r)| r.is_err()) {
        anyhow::bail!("some modes failed");
    }
    Ok(())
}

async fn load_mode(
    orly: &Orly,
    mode: Mode,
    data: &Arc<dataset::Dataset>,
    plan: &LoadPlan,
    args: &Args,
    pg_url: Option<&str>,
    fd_note: &str,
) -> anyhow::Result<load::LoadResult> {
    let admin = nostr::Keys::generate();
    let follows = match mode {
        Mode::FollowsLocal | Mode::FollowsGrpc => follow_list(data),
        _ => Vec::new(),
    };
    let scratch = match (mode, pg_url) {
        (Mode::LocalPostgres, Some(admin_url)) => {
            Some(postgres::ScratchDb::create(admin_url).await?)
        }
        (Mode::LocalPostgres, None) => anyhow::bail!("no PostgreSQL URL (give --pg-url)"),
        _ => None,
    };
    let backend = match mode {
        Mode::LocalSqlite => Backend::Sqlite,
        Mode::SplitSqlite => Backend::Split,
        Mode::LocalPostgres => Backend::Postgres {
            url: &scratch.as_ref().expect("created above").url,
        },
        Mode::FollowsLocal | Mode::FollowsGrpc => Backend::Follows {
            admin: &admin,
            follows: &follows,
            grpc: mode == Mode::FollowsGrpc,
        },
    };
    let result = async {
        let mut stack = Stack::start(orly, backend, &args.relay_env).await?;
        let r = load::run(&mut stack, data, plan, fd_note.to_string(), cpu_snapshot).await;
        r.map_err(|e| with_logs(e, &stack))
    }
    .await;
    if let Some(db) = scratch {
        if let Err(e) = db.drop_db().await {
            eprintln!("warning: {e:#}");
        }
    }
    result
}

/// CPU seconds used so far by each process of the run (every relay summed).
fn cpu_snapshot(stack: &Stack) -> anyhow::Result<CpuUse> {
    let mut relay = 0.0;
    for r in stack.relays() {
        relay += r.cpu_secs()?;
    }
    Ok(CpuUse {
        relay,
        db: stack.db.as_ref().map(process::Proc::cpu_secs).transpose()?,
        bench: process::cpu_secs("self")?,
    })
}

/// A moment for the relay to finish background work before its memory is read.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}
