//! `orly launcher` (ORLY's `orly-launcher`): parse the configuration, start the tiers, wait
//! for SIGTERM/SIGINT, stop them. The `orly` binary dispatches here and names itself, so the
//! launcher can start every service through it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::{plan, Executables, LaunchError, Launcher, LauncherConfig};

/// Runs the launcher with `args` (the first one is the program name). `multi_call` is the
/// `orly` binary the launcher runs in (`std::env::current_exe`): services without an
/// ORLY-named link next to it are started through it by their subcommand. Bad arguments and
/// `--help` exit the process with clap's message.
pub fn main_from<I, T>(args: I, multi_call: Option<PathBuf>) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cfg = LauncherConfig::parse_from(args);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the tokio runtime: {e}", crate::BINARY);
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cfg, Executables::of(multi_call)))
}

async fn run(cfg: LauncherConfig, exes: Executables) -> ExitCode {
    orly_common::init_tracing(&cfg.log_level);
    let tiers = match plan(&cfg, &exes) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", crate::BINARY);
            return ExitCode::from(2);
        }
    };
    let mut signal = Box::pin(orly_common::shutdown_signal());
    let mut launcher = match Launcher::start(tiers, &cfg, &mut signal).await {
        Ok(l) => l,
        Err(LaunchError::Interrupted) => {
            tracing::info!("interrupted during start-up; everything started was stopped");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}: {e}", crate::BINARY);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!("all services ready");
    signal.await;
    launcher.stop().await;
    tracing::info!("all services stopped");
    ExitCode::SUCCESS
}
