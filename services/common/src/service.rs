//! The shell every service binary shares: its runtime, one clear error line and the exit
//! code, and ORLY's per-service log-level fallback.

use std::future::Future;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::ArgMatches;

/// Runs `run` on a multi-threaded runtime; an error is printed as `name: error` (with its
/// causes, via the alternate format) and the process exits with status 1.
pub fn run_main<F, E>(name: &str, run: F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log level: the `log_level` argument (`ORLY_LOG_LEVEL` or the flag), or — when that was
/// left at its default — ORLY's service-specific variable `fallback_env` if it is set.
pub fn log_level(matches: &ArgMatches, given: &str, fallback_env: &str) -> String {
    match (
        matches.value_source("log_level"),
        std::env::var(fallback_env),
    ) {
        (Some(ValueSource::DefaultValue), Ok(l)) if !l.trim().is_empty() => l,
        _ => given.to_string(),
    }
}
