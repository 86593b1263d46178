//! orly-launcher: runs the split deployment on one host. It starts orly-db, then orly-acl,
//! then the enabled sync services in parallel, then the relay — each tier only once the one
//! before reports Ready — restarts children that die, and stops them in reverse order.

pub mod cli;
pub mod config;
pub mod plan;
pub mod probe;
pub mod supervisor;

use std::time::Duration;

/// ORLY's name of the launcher binary: a link to `orly` under this name runs the launcher.
pub const BINARY: &str = "orly-launcher";
/// The launcher's subcommand of the `orly` binary.
pub const SUBCOMMAND: &str = "launcher";

pub use config::LauncherConfig;
pub use plan::{plan, Exec, Executables, ServiceSpec, Tier};
pub use supervisor::Supervised;

/// Why the launcher could not bring the system up.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot find the {service} binary {binary:?} (looked next to the launcher, in the launcher's own orly binary and in PATH); set {env}")]
    BinaryNotFound {
        service: &'static str,
        binary: String,
        env: String,
    },
    #[error("invalid setting {env}={value:?}: {reason}")]
    InvalidSetting {
        env: String,
        value: String,
        reason: String,
    },
    #[error("{service} could not be started ({binary}): {source}")]
    Spawn {
        service: &'static str,
        binary: String,
        source: std::io::Error,
    },
    #[error("{service} exited ({status}) before becoming ready{}", last_lines_suffix(.last_lines))]
    ExitedBeforeReady {
        service: &'static str,
        status: String,
        last_lines: Vec<String>,
    },
    #[error("{service} did not become ready within {timeout:?}{}", last_lines_suffix(.last_lines))]
    NotReady {
        service: &'static str,
        timeout: Duration,
        last_lines: Vec<String>,
    },
    #[error("interrupted during start-up")]
    Interrupted,
}

fn last_lines_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        "; it printed nothing".into()
    } else {
        format!("; its last output:\n  {}", lines.join("\n  "))
    }
}

/// The running system: tiers in start order.
pub struct Launcher {
    tiers: Vec<Vec<Supervised>>,
    stop_timeout: Duration,
}

impl Launcher {
    /// Starts every tier in order, each after the previous is Ready. On failure (or when
    /// `interrupt` resolves first) everything started so far is stopped again.
    pub async fn start(
        tiers: Vec<Tier>,
        cfg: &LauncherConfig,
        interrupt: impl std::future::Future<Output = ()>,
    ) -> Result<Self, LaunchError> {
        let mut launcher = Launcher {
            tiers: Vec::new(),
            stop_timeout: cfg.stop_timeout,
        };
        let backoff = cfg.restart_backoff_max;
        let bring_up = async {
            for tier in tiers {
                let names: Vec<&str> = tier.services.iter().map(|s| s.name).collect();
                tracing::info!(tier = tier.name, services = ?names, "starting tier");
                let started: Vec<Supervised> = tier
                    .services
                    .into_iter()
                    .map(|spec| Supervised::spawn(spec, backoff))
                    .collect();
                launcher.tiers.push(started);
                let current = launcher.tiers.last().expect("just pushed");
                let waits = current.iter().map(Supervised::wait_ready);
                for result in futures::future::join_all(waits).await {
                    result?;
                }
                tracing::info!(tier = tier.name, "tier ready");
            }
            Ok::<(), LaunchError>(())
        };
        let outcome = tokio::select! {
            r = bring_up => r,
            _ = interrupt => Err(LaunchError::Interrupted),
        };
        match outcome {
            Ok(()) => Ok(launcher),
            Err(e) => {
                launcher.stop().await;
                Err(e)
            }
        }
    }

    /// The supervised children, tier by tier.
    pub fn tiers(&self) -> &[Vec<Supervised>] {
        &self.tiers
    }

    /// Stops the tiers in reverse order; within a tier in parallel. Each child gets SIGTERM,
    /// then SIGKILL after the stop timeout.
    pub async fn stop(&mut self) {
        while let Some(tier) = self.tiers.pop() {
            let stops = tier.into_iter().map(|s| s.stop(self.stop_timeout));
            futures::future::join_all(stops).await;
        }
    }
}
