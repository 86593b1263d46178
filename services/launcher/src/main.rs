//! `orly-launcher`: parse configuration, start the tiers, wait for SIGTERM/SIGINT, stop.

use clap::Parser;
use orly_launcher::{plan, Launcher, LauncherConfig};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = LauncherConfig::parse();
    orly_common::init_tracing(&cfg.log_level);
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    let tiers = match plan(&cfg, exe_dir.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("orly-launcher: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut signal = Box::pin(orly_common::shutdown_signal());
    let mut launcher = match Launcher::start(tiers, &cfg, &mut signal).await {
        Ok(l) => l,
        Err(orly_launcher::LaunchError::Interrupted) => {
            tracing::info!("interrupted during start-up; everything started was stopped");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("orly-launcher: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!("all services ready");
    signal.await;
    launcher.stop().await;
    tracing::info!("all services stopped");
    std::process::ExitCode::SUCCESS
}
