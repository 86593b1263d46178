//! Shared pieces of the orly end-to-end suites: a raw Nostr WebSocket client that sees every
//! frame, a tiny HTTP GET (NIP-11, `/readyz`), a podman driver that removes whatever it
//! created, and `kubectl` helpers for the kind suite.
//!
//! The suites themselves are `tests/containers.rs` (podman, run by `e2e/run-containers.sh`)
//! and `tests/kind.rs` (a kind cluster, run by `e2e/kind/run.sh`); see `docs/e2e.md`.

pub mod http;
pub mod kube;
pub mod podman;
pub mod ws;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A free loopback port (bound, then released for a container to publish on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A name prefix unique to this run: `<base>-<pid>-<millis>`.
pub fn unique_prefix(base: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    format!("{base}-{}-{millis}", std::process::id())
}

/// Calls `check` every `every` until it returns `Ok(Some(v))`; fails after `timeout` with
/// the last error or "still waiting".
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::from("still waiting");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() >= timeout {
            bail!("{what}: not reached after {timeout:?}: {last}");
        }
        tokio::time::sleep(every).await;
    }
}

/// A signed kind-1 note.
pub fn note(keys: &nostr::Keys, content: &str) -> nostr::Event {
    nostr::EventBuilder::text_note(content)
        .sign_with_keys(keys)
        .expect("sign")
}

/// A signed kind-1 note with a given creation time.
pub fn note_at(keys: &nostr::Keys, content: &str, created_at: u64) -> nostr::Event {
    nostr::EventBuilder::text_note(content)
        .custom_created_at(nostr::Timestamp::from(created_at))
        .sign_with_keys(keys)
        .expect("sign")
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    nostr::Timestamp::now().as_secs()
}

/// Prints a step with the time since `start` (shown with `--nocapture`).
pub fn step(start: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64());
}
