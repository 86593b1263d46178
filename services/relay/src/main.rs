//! `orly`: the relay binary. Parses configuration, opens the store, serves until SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use orly::acl::OpenAcl;
use orly::{Cli, Relay};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    orly_common::init_tracing(&cli.log_level);
    let store_cfg = cli.store_config();
    let store = orly_db::open_store(&store_cfg)
        .await
        .with_context(|| format!("opening the {} store", store_cfg.kind))?;
    tracing::info!(store = %store_cfg.kind, acl = %cli.acl_mode, "starting relay");
    let relay = Relay::new(cli.relay_config(), store.clone(), Arc::new(OpenAcl));
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
    running.stop().await.context("stopping the server")?;
    Ok(())
}
