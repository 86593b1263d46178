//! `orly-sync-bench`'s parts: catch-up of an empty peer per mechanism ([`catchup`]) and live
//! propagation in a three-relay cluster ([`propagation`]), each relay an in-process orly on
//! its own SQLite store ([`node`]), printed as two tables ([`report`]).

pub mod catchup;
pub mod node;
pub mod propagation;
pub mod report;

use clap::ValueEnum;

use crate::dataset::{self, Shape};

/// How an empty peer pulls the source's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mechanism {
    /// `DistributedSync::poll_peer`: `/api/sync/current` + `/api/sync/event-ids` pages.
    Distributed,
    /// `ClusterSync::poll_member`: `/cluster/latest` + `/cluster/events` pages.
    Cluster,
    /// `SyncManager::sync_peer`: NIP-77 reconciliation, then `REQ` by ids.
    Negentropy,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Distributed => "distributed",
            Mechanism::Cluster => "cluster",
            Mechanism::Negentropy => "negentropy",
        }
    }
}

/// Catch-up goal: events per second, for every mechanism.
pub const CATCHUP_GOAL_EPS: f64 = 5_000.0;
/// Propagation goal: p99 of A → B and A → C together, in ms.
pub const PROPAGATION_P99_GOAL_MS: f64 = 200.0;

/// The catch-up events: `n` kind-1 notes by `authors` keys within the last four weeks,
/// signed on every core.
pub fn catch_up_events(n: usize, authors: usize) -> anyhow::Result<Vec<nostr::Event>> {
    let shape = Shape {
        words: 3..20,
        ..Shape::notes(authors, 0x5eed_5ca7, "sync bench note")
    };
    Ok(dataset::generate(n, &shape)?.events)
}
