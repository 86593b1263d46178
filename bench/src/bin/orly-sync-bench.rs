//! `orly-sync-bench`: peer sync benchmark, all in-process on loopback, printed as two tables.
//!
//! 1. **Catch-up**: a source relay holds N events (`--events`, default 100,000) in SQLite; for
//!    each mechanism (`distributed`, `cluster`, `negentropy`) a fresh, empty peer relay pulls all
//!    of them once. Reported: wall time, events/s, and the events the peer holds afterwards.
//! 2. **Propagation**: three relays A, B, C, each with its own SQLite store and an in-process
//!    cluster sync replicating the other two; live delivery from each store's feed. Raw
//!    WebSocket subscriptions (`since: now`) on B and C; M events (`--propagation-events`,
//!    default 300) published on A one every `--interval-ms` (20 ms). Reported: the time from
//!    sending the EVENT on A to its arrival at the subscribers of B and C (p50/p90/p99/max).
//!
//! ```text
//! cargo run --release -p orly-bench --bin orly-sync-bench
//! ```
//!
//! See docs/sync-benchmark.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use orly_bench::dataset::cores;
use orly_bench::sync::{catch_up_events, catchup, propagation, report, Mechanism};

/// Benchmarks orly's peer sync: catch-up of an empty peer, and live propagation in a cluster.
#[derive(Debug, Parser)]
#[command(name = "orly-sync-bench", about, long_about = None)]
struct Args {
    /// Events the source relay holds for the catch-up measurement (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct authors (keys) of the catch-up events.
    #[arg(long, default_value_t = 1000)]
    authors: usize,
    /// Catch-up mechanisms to measure, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "distributed,cluster,negentropy"
    )]
    mechanisms: Vec<Mechanism>,
    /// Events published on A for the propagation measurement (0 skips it).
    #[arg(long, default_value_t = 300)]
    propagation_events: usize,
    /// Pause between two published events in the propagation measurement (ms).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Concurrent saves while filling the source store (they group-commit in SQLite).
    #[arg(long, default_value_t = 256)]
    fill_concurrency: usize,
    /// Scratch directory for the SQLite stores (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Log filter for the relays and sync services (stderr).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    orly_common::init_tracing(&args.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("orly-sync-bench: cannot start tokio: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("orly-sync-bench: some measurements failed");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("orly-sync-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs both measurements and prints the report; false if any measurement failed.
async fn run(args: Args) -> anyhow::Result<bool> {
    let scratch = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    };
    let started = Instant::now();

    let mut catch_up = None;
    if args.events > 0 && !args.mechanisms.is_empty() {
        let t = Instant::now();
        let (n, authors) = (args.events, args.authors.max(1));
        let events =
            Arc::new(tokio::task::spawn_blocking(move || catch_up_events(n, authors)).await??);
        let signing = t.elapsed();
        eprintln!(
            "signed {n} events from {authors} authors on {} threads in {:.1} s",
            cores(),
            signing.as_secs_f64()
        );
        let mut mechanisms = args.mechanisms.clone();
        mechanisms.dedup();
        let mut result = catchup::run(
            scratch.path(),
            &events,
            &mechanisms,
            args.fill_concurrency.max(1),
        )
        .await?;
        result.signing = signing;
        catch_up = Some(result);
    }

    let mut propagation = None;
    if args.propagation_events > 0 {
        let plan = propagation::Plan {
            events: args.propagation_events,
            interval: Duration::from_millis(args.interval_ms),
        };
        propagation = Some(propagation::run(scratch.path(), &plan).await);
    }

    let info = report::RunInfo {
        cores: cores(),
        events: args.events,
        authors: args.authors.max(1),
        propagation_events: args.propagation_events,
        interval_ms: args.interval_ms,
    };
    let ok = report::print(&info, catch_up.as_ref(), propagation.as_ref());
    println!("total run time {:.1} s", started.elapsed().as_secs_f64());
    Ok(ok)
}
