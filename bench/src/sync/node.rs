//! One in-process relay on loopback over its own SQLite store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use orly_db::SharedStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A relay: bound and configured first (sync services and NIP-77 are enabled before it
/// serves), then [`Node::serve`]d.
pub struct Node {
    pub store: SharedStore,
    pub relay: Arc<orly::Relay>,
    /// `http://127.0.0.1:PORT`, as the sync services name peers.
    pub http: String,
    /// `ws://127.0.0.1:PORT`.
    pub ws: String,
    listener: Option<TcpListener>,
    running: Option<orly::RunningRelay>,
    follower: Option<JoinHandle<()>>,
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
        let relay = orly::Relay::new(
            orly::RelayConfig::default(),
            store.clone(),
            Arc::new(orly::acl::OpenAcl),
        );
        Ok(Self {
            store,
            relay,
            ws: orly_sync::http::to_ws_url(&http),
            http,
            listener: Some(listener),
            running: None,
            follower: None,
        })
    }

    /// Starts serving; with `follow`, also the store follower (live delivery of events that the
    /// sync stored), looking every `follow`, as the `orly` binary runs it.
    pub fn serve(&mut self, follow: Option<Duration>) -> anyhow::Result<()> {
        let listener = self.listener.take().context("relay already serving")?;
        if let Some(period) = follow {
            self.follower = Some(orly::sync::spawn_follower(self.relay.clone(), period));
        }
        self.running = Some(orly::spawn(listener, self.relay.clone())?);
        Ok(())
    }

    pub async fn stop(mut self) {
        if let Some(f) = self.follower.take() {
            f.abort();
        }
        if let Some(r) = self.running.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), r.stop()).await;
        }
    }
}
