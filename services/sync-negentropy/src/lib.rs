//! orly-sync-negentropy: set reconciliation (negentropy, protocol version 0x61) for orly.
//!
//! Two jobs, one crate:
//! - **client NIP-77 sessions**: the relay hands NEG-OPEN / NEG-MSG / NEG-CLOSE to a
//!   [`NegentropyHandler`] — in-process the [`NegentropyEngine`], over gRPC the
//!   [`GrpcNegentropy`] client of this service — and turns replies into NEG-MSG and errors into
//!   NEG-ERR ([`NegError::reason`]);
//! - **relay-to-relay sync**: the [`SyncManager`] reconciles with every peer relay over its NIP-77
//!   endpoint, downloads what we lack and uploads what the peer lacks ([`peer_sync`]), in time
//!   windows that keep each reconciliation under the record cap and re-check old ones rarely
//!   ([`windows`]), with peers, per-peer state and windows kept as store markers ([`peers`]) and
//!   a store lease per peer (`orly-peering`, shared with the other peer syncs) so replicas never
//!   sync one peer twice at once.
//!
//! Where to find what: sessions in [`engine`], the reconciled set (records of a filter, the
//! negentropy storage) in [`set`], settings and their limits in [`config`], the relay-facing
//! trait and its errors in [`handler`], the gRPC face in [`grpc_server`] and [`grpc_client`],
//! several replicas behind one handler in [`replicas`].

pub mod cli;
pub mod config;
pub mod engine;
pub mod grpc_client;
pub mod grpc_server;
pub mod handler;
pub mod manager;
pub mod peer_sync;
pub mod peers;
pub mod replicas;
pub mod set;
pub mod windows;

pub use config::{EngineSettings, SyncSettings};
pub use engine::{NegentropyEngine, SessionInfo};
pub use grpc_client::GrpcNegentropy;
pub use handler::{reconcile_as_client, ClientOutcome, NegError, NegReply, NegentropyHandler};
pub use manager::SyncManager;
pub use peer_sync::{SyncError, SyncOptions, SyncReport};
pub use replicas::ReplicatedNegentropy;
pub use windows::{Window, WindowPlan};

/// The negentropy protocol version this crate speaks (V1).
pub const PROTOCOL_VERSION: u8 = negentropy::PROTOCOL_VERSION as u8;
