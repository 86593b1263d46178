//! orly-peering: the peer bookkeeping and lease scheme every peer sync of orly shares — the
//! distributed and cluster syncs (`orly-sync`) and the negentropy peer sync
//! (`orly-sync-negentropy`).
//!
//! - [`book`]: per-peer markers in the store (`<ns>:peer:<url>`, `<ns>:state:<url>`, …) and
//!   [`FencedPeer`], the writes of the replica working on a peer;
//! - [`lease`]: a store lease held under a local deadline on the monotonic clock, renewed while
//!   work runs under it, the work dropped when it lapses; fenced marker writes;
//! - [`shard`]: replicas of a service splitting its peers by those leases;
//! - [`clock`]: the local wall clock as a value (leases never read it).

pub mod book;
pub mod clock;
pub mod lease;
pub mod shard;

pub use book::{FencedPeer, PeerBook};
pub use clock::{Clock, SharedClock, SkewedClock, SystemClock};
pub use lease::{Acquired, Lease, LeaseLost, PeerError};
pub use shard::{Shard, ShardError, ShardOwner};

/// A holder name unique to this process: host, pid and a random suffix.
pub fn default_holder() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "orly".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 3]>())
    )
}
