//! `orly`: the relay binary. Parses configuration, opens the store, serves until SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use orly::acl::Acl;
use orly::sync::{NegentropyPeers, SyncHooks};
use orly::{Cli, Relay};
use orly_acl::{AclAdmin, AclEngine, GrpcAcl};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    orly_common::init_tracing(&cli.log_level);
    let store_cfg = cli.store_config();
    let store = orly_db::open_store(&store_cfg)
        .await
        .with_context(|| format!("opening the {} store", store_cfg.kind))?;
    let relay_cfg = cli.relay_config().map_err(anyhow::Error::msg)?;
    let (acl, admin, refresher): (Arc<dyn Acl>, Arc<dyn AclAdmin>, _) = if cli.acl_type == "grpc" {
        let client =
            GrpcAcl::connect_lazy(&cli.grpc_acl_server, cli.grpc_acl_timeout, cli.acl_mode)
                .context("orly-acl client")?;
        (client.clone(), client, None)
    } else {
        let engine = AclEngine::new(cli.acl_config().map_err(anyhow::Error::msg)?, store.clone());
        if let Err(e) = engine.load().await {
            tracing::warn!(error = %e, "ACL lists not loaded yet; retrying in the background");
        }
        let refresher = engine.spawn_refresher();
        (engine.clone(), engine, Some(refresher))
    };
    tracing::info!(
        store = %store_cfg.kind,
        acl_type = %cli.acl_type,
        acl = %cli.acl_mode,
        "starting relay"
    );
    let relay = Relay::with_admin(relay_cfg, store.clone(), acl, Some(admin));
    let (negentropy_tasks, negentropy_peers) = if cli.negentropy_enabled {
        enable_negentropy(&cli, &relay, &store).await?
    } else {
        (Vec::new(), None)
    };
    let sync = enable_sync(&cli, &relay, &store, negentropy_peers)?;
    let follower = (!cli.store_follow_interval.is_zero())
        .then(|| orly::sync::spawn_follower(relay.clone(), cli.store_follow_interval));
    let addr = std::net::SocketAddr::new(cli.listen, cli.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let running = orly::spawn(listener, relay)?;
    println!("orly relay listening on ws://{}", running.addr);

    // NIP-40: expired events are filtered at query time and purged in the background.
    let purge = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            match store.delete_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "purged expired events"),
                Err(e) => tracing::debug!(error = %e, "expired-event purge skipped"),
            }
        }
    });
    orly_common::shutdown_signal().await;
    purge.abort();
    if let Some(f) = follower {
        f.abort();
    }
    sync.stop().await;
    for t in negentropy_tasks {
        t.abort();
    }
    if let Some(r) = refresher {
        r.abort();
    }
    running.stop().await.context("stopping the server")?;
    Ok(())
}

type NegentropyPeerList = Option<Arc<dyn NegentropyPeers>>;

/// NIP-77: in-process engine (and peer sync, when peers or relay group admins are configured)
/// with `ORLY_SYNC_TYPE=local`, or the orly-sync-negentropy service(s) with `grpc`. Also
/// returns the peer list the relay group feeds.
async fn enable_negentropy(
    cli: &Cli,
    relay: &Arc<Relay>,
    store: &orly_db::SharedStore,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<()>>, NegentropyPeerList)> {
    use orly_sync_negentropy::{
        GrpcNegentropy, NegentropyEngine, ReplicatedNegentropy, SyncManager,
    };
    if cli.sync_type == "grpc" {
        let client =
            ReplicatedNegentropy::connect_lazy(&cli.grpc_sync_negentropy, cli.grpc_sync_timeout)
                .map_err(anyhow::Error::msg)
                .context("orly-sync-negentropy client")?;
        relay.enable_negentropy(Arc::new(client));
        // Peers live in the shared store: any replica takes the relay group's changes.
        let first = cli
            .grpc_sync_negentropy
            .split(',')
            .next()
            .unwrap_or_default();
        let peers = GrpcNegentropy::connect_lazy(first, cli.grpc_sync_timeout)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(servers = %cli.grpc_sync_negentropy, "NIP-77 via orly-sync-negentropy");
        return Ok((Vec::new(), Some(Arc::new(peers))));
    }
    let (engine_settings, sync_settings, peers) = cli.negentropy_settings();
    let engine = NegentropyEngine::new(store.clone(), engine_settings)
        .map_err(anyhow::Error::msg)
        .context("negentropy settings")?;
    let mut tasks = vec![engine.spawn_reaper()];
    relay.enable_negentropy(engine);
    let mut peer_list: NegentropyPeerList = None;
    if !peers.is_empty() || !cli.relay_group_admins.trim().is_empty() {
        let manager = SyncManager::new(store.clone(), sync_settings)
            .map_err(anyhow::Error::msg)
            .context("negentropy peer sync settings")?;
        let peer_count = peers.len();
        peer_list = Some(Arc::new(manager.clone()));
        // Peers are stored once the store answers (orly-db may start after us); the loop holds
        // only a weak reference to the manager, so this task keeps it alive.
        tasks.push(tokio::spawn(async move {
            while let Err(e) = manager.add_peers(&peers).await {
                tracing::warn!(error = %e, "cannot store negentropy peers yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            manager.start();
            tracing::info!(peers = peer_count, "negentropy peer sync running");
            std::future::pending::<()>().await;
        }));
    }
    tracing::info!("NIP-77 in-process");
    Ok((tasks, peer_list))
}

/// The running peer sync: in-process engines to stop, and the relay's background tasks.
#[derive(Default)]
struct RunningSync {
    distributed: Option<Arc<orly_sync::DistributedSync>>,
    cluster: Option<Arc<orly_sync::ClusterSync>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningSync {
    /// Stops pulling and hands leases back so other replicas take over at once.
    async fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
        if let Some(d) = self.distributed {
            d.stop().await;
        }
        if let Some(c) = self.cluster {
            c.stop().await;
        }
    }
}

/// Distributed, cluster and relay group sync: in-process with `ORLY_SYNC_TYPE=local` (each
/// when configured), or the services named by `ORLY_GRPC_SYNC_*` with `grpc`.
fn enable_sync(
    cli: &Cli,
    relay: &Arc<Relay>,
    store: &orly_db::SharedStore,
    negentropy_peers: NegentropyPeerList,
) -> anyhow::Result<RunningSync> {
    use orly_sync::{
        ClusterApi, ClusterSettings, ClusterSync, DistributedApi, DistributedSettings,
        DistributedSync, GrpcCluster, GrpcDistributed, GrpcRelayGroup, RelayGroup, RelayGroupApi,
    };
    let mut running = RunningSync::default();
    type Apis = (
        Option<Arc<dyn DistributedApi>>,
        Option<Arc<dyn ClusterApi>>,
        Option<Arc<dyn RelayGroupApi>>,
    );
    let (distributed, cluster, relaygroup): Apis = if cli.sync_type == "grpc" {
        let t = cli.grpc_sync_timeout;
        fn addr(a: &Option<String>) -> Option<&str> {
            a.as_deref().map(str::trim).filter(|a| !a.is_empty())
        }
        (
            match addr(&cli.grpc_sync_distributed) {
                Some(a) => Some(Arc::new(
                    GrpcDistributed::connect_lazy(a, t).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
            match addr(&cli.grpc_sync_cluster) {
                Some(a) => Some(Arc::new(
                    GrpcCluster::connect_lazy(a, t).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
            match addr(&cli.grpc_sync_relaygroup) {
                Some(a) => Some(Arc::new(
                    GrpcRelayGroup::connect_lazy(a, t).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
        )
    } else {
        let group_admins = orly_common::parse_pubkey_list(&cli.relay_group_admins)
            .map_err(|e| anyhow::anyhow!("ORLY_RELAY_GROUP_ADMINS: {e}"))?;
        let relaygroup = (!group_admins.is_empty()).then(|| {
            Arc::new(RelayGroup::new(store.clone(), group_admins)) as Arc<dyn RelayGroupApi>
        });
        let peers = orly_sync::http::parse_url_list(&cli.relay_peers)
            .map_err(|e| anyhow::anyhow!("ORLY_RELAY_PEERS: {e}"))?;
        let distributed = if !peers.is_empty() || relaygroup.is_some() {
            let sync = DistributedSync::new(
                store.clone(),
                DistributedSettings {
                    relay_url: cli.relay_url.clone(),
                    peers,
                    interval: cli.distributed_interval,
                    long_poll: cli.distributed_long_poll,
                    ..DistributedSettings::default()
                },
            )
            .map_err(|e| anyhow::anyhow!("distributed sync: {e}"))?;
            sync.start();
            running.distributed = Some(sync.clone());
            Some(Arc::new(sync) as Arc<dyn DistributedApi>)
        } else {
            None
        };
        let admins = cli
            .cluster_admins
            .clone()
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| cli.admins.clone());
        let admins = orly_common::parse_pubkey_list(&admins)
            .map_err(|e| anyhow::anyhow!("ORLY_CLUSTER_ADMINS: {e}"))?;
        let cluster = if admins.is_empty() {
            None
        } else {
            let sync = ClusterSync::new(
                store.clone(),
                ClusterSettings {
                    admins,
                    propagate_privileged: cli.cluster_propagate_privileged,
                    relay_url: cli.relay_url.clone(),
                    poll_interval: cli.cluster_poll_interval,
                    ..ClusterSettings::default()
                },
            )
            .map_err(|e| anyhow::anyhow!("cluster sync: {e}"))?;
            sync.start();
            running.cluster = Some(sync.clone());
            Some(Arc::new(sync) as Arc<dyn ClusterApi>)
        };
        (distributed, cluster, relaygroup)
    };
    if distributed.is_none() && cluster.is_none() && relaygroup.is_none() {
        return Ok(running);
    }
    tracing::info!(
        sync_type = %cli.sync_type,
        distributed = distributed.is_some(),
        cluster = cluster.is_some(),
        relaygroup = relaygroup.is_some(),
        "peer sync enabled"
    );
    let has_group = relaygroup.is_some();
    let hooks = Arc::new(SyncHooks::new(
        distributed,
        cluster,
        relaygroup,
        negentropy_peers,
    ));
    relay.enable_sync(hooks.clone());
    if has_group {
        running.tasks.push(hooks.spawn_feeder(relay.clone()));
    }
    Ok(running)
}
