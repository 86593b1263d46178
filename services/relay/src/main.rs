//! `orly`: the relay binary. Parses configuration, opens the store, serves until SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use orly::acl::Acl;
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
    let negentropy_tasks = if cli.negentropy_enabled {
        enable_negentropy(&cli, &relay, &store).await?
    } else {
        Vec::new()
    };
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
    for t in negentropy_tasks {
        t.abort();
    }
    if let Some(r) = refresher {
        r.abort();
    }
    running.stop().await.context("stopping the server")?;
    Ok(())
}

/// NIP-77: in-process engine (and peer sync, when peers are configured) with
/// `ORLY_SYNC_TYPE=local`, or the orly-sync-negentropy service(s) with `grpc`.
async fn enable_negentropy(
    cli: &Cli,
    relay: &Arc<Relay>,
    store: &orly_db::SharedStore,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use orly_sync_negentropy::{NegentropyEngine, ReplicatedNegentropy, SyncManager};
    if cli.sync_type == "grpc" {
        let client =
            ReplicatedNegentropy::connect_lazy(&cli.grpc_sync_negentropy, cli.grpc_sync_timeout)
                .map_err(anyhow::Error::msg)
                .context("orly-sync-negentropy client")?;
        relay.enable_negentropy(Arc::new(client));
        tracing::info!(servers = %cli.grpc_sync_negentropy, "NIP-77 via orly-sync-negentropy");
        return Ok(Vec::new());
    }
    let (engine_settings, sync_settings, peers) = cli.negentropy_settings();
    let engine = NegentropyEngine::new(store.clone(), engine_settings)
        .map_err(anyhow::Error::msg)
        .context("negentropy settings")?;
    let mut tasks = vec![engine.spawn_reaper()];
    relay.enable_negentropy(engine);
    if !peers.is_empty() {
        let manager = SyncManager::new(store.clone(), sync_settings)
            .map_err(anyhow::Error::msg)
            .context("negentropy peer sync settings")?;
        let peer_count = peers.len();
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
    Ok(tasks)
}
