//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager), so that two operator
//! replicas can run and only the holder reconciles.

use std::future::Future;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::metrics;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Namespace holding the Lease.
    pub namespace: String,
    /// This instance's identity (the pod name).
    pub identity: String,
    /// Seconds a Lease stays valid without renewal; a standby takes over after this.
    pub duration_secs: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_secs: u64,
}

/// A running election: `is_leader` follows the Lease, `task` renews it.
pub struct Election {
    pub is_leader: watch::Receiver<bool>,
    pub task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Join the election; the Lease is created when missing.
pub async fn elect(client: Client, config: &LeaseConfig) -> Result<Election, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration_secs)
        .with_grace(config.grace_secs)
        .build()
        .await?;
    let (is_leader, task) = manager.watch().await;
    Ok(Election { is_leader, task })
}

/// Run `work` whenever this instance leads, stopping it (through the future `work` receives)
/// when leadership is lost, and waiting to lead again. Returns when the election ends.
pub async fn run_while_leader<F, Fut>(mut is_leader: watch::Receiver<bool>, mut work: F)
where
    F: FnMut(std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        metrics::set_leader(false);
        if is_leader.wait_for(|leading| *leading).await.is_err() {
            return;
        }
        info!("acquired leadership");
        metrics::set_leader(true);
        let mut lost = is_leader.clone();
        let stop = Box::pin(async move {
            let _ = lost.wait_for(|leading| !*leading).await;
        });
        work(stop).await;
        info!("leadership lost or work stopped");
        if is_leader.wait_for(|leading| !*leading).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Work runs only while leading, stops when leadership goes and restarts when it returns.
    #[tokio::test]
    async fn work_follows_leadership() {
        let (tx, rx) = watch::channel(false);
        let started = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicUsize::new(0));
        let (s, t) = (started.clone(), stopped.clone());
        let runner = tokio::spawn(run_while_leader(rx, move |stop| {
            let (s, t) = (s.clone(), t.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                stop.await;
                t.fetch_add(1, Ordering::SeqCst);
            }
        }));
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        settle().await;
        assert_eq!(started.load(Ordering::SeqCst), 0, "not leader yet");
        tx.send(true).unwrap();
        settle().await;
        assert_eq!(
            (
                started.load(Ordering::SeqCst),
                stopped.load(Ordering::SeqCst)
            ),
            (1, 0)
        );
        tx.send(false).unwrap();
        settle().await;
        assert_eq!(stopped.load(Ordering::SeqCst), 1, "stopped on loss");
        tx.send(true).unwrap();
        settle().await;
        assert_eq!(started.load(Ordering::SeqCst), 2, "restarted on regain");
        drop(tx);
        tokio::time::timeout(Duration::from_secs(1), runner)
            .await
            .expect("runner ends with the election")
            .unwrap();
    }
}
