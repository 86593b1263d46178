//! One in-process relay on loopback over its own SQLite store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use orly_db::SharedStore;
use tokio::net::TcpListener;

/// A relay: its store opened and its port bound first, then built and [`Node::serve`]d with
/// the sync services and NIP-77 it has.
pub struct Node {
    pub store: SharedStore,
    /// `http://127.0.0.1:PORT`, as the sync services name peers.
    pub http: String,
    /// `ws://127.0.0.1:PORT`.
    pub ws: String,
    listener: Option<TcpListener>,
    running: Option<orly::RunningRelay>,
}

impl Node {
    /// Opens `<dir>/<name>.db` and binds a loopback port; nothing is served yet.
    pub async fn open(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let path = dir.join(format!("{name}.db"));
        let store: SharedStore = Arc::new(
            orly_db::sqlite::SqliteStore::open(&path)
                .await
                .with_context(|| format!("opening {}", path.display()))?,
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback port")?;
        let addr = listener.local_addr()?;
        let http = orly_sync::http::normalize_http_url(&format!("http://{addr}"))
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            store,
            ws: orly_sync::http::to_ws_url(&http),
            http,
            listener: Some(listener),
            running: None,
        })
    }

    /// Builds the relay with `hooks` and `negentropy` and serves it; live delivery (also of
    /// what the sync stores) comes from the store's feed, as in the `orly` binary.
    pub fn serve(
        &mut self,
        hooks: Option<Arc<orly::sync::SyncHooks>>,
        negentropy: Option<Arc<dyn orly_sync_negentropy::NegentropyHandler>>,
    ) -> anyhow::Result<()> {
        let listener = self.listener.take().context("relay already serving")?;
        let mut builder = orly::Relay::builder(
            orly::RelayConfig::default(),
            self.store.clone(),
            Arc::new(orly::acl::OpenAcl),
        );
        if let Some(h) = hooks {
            builder = builder.sync(h);
        }
        if let Some(n) = negentropy {
            builder = builder.negentropy(n);
        }
        self.running = Some(orly::spawn(listener, builder.build())?);
        Ok(())
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), r.stop()).await;
        }
    }
}
