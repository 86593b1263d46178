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
    if let Some(r) = refresher {
        r.abort();
    }
    running.stop().await.context("stopping the server")?;
    Ok(())
}
