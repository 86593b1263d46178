//! The orly relay: NIP-01 over WebSocket with NIP-11, NIP-42, NIP-45, NIP-70 and NIP-77, on
//! top of an [`orly_db::EventStore`] (in-process or over gRPC) and an [`acl::Acl`].
//!
//! Modules depend one way: [`state`] (the relay, built once) ← [`connection`], [`nip11`],
//! [`live`] (the feed and the subscription index) ← [`server`] (HTTP and WebSocket) ← [`cli`].

pub use orly_common::acl;
pub mod cli;
pub mod config;
pub mod connection;
pub mod live;
pub mod message;
pub mod nip11;
pub mod proxy;
pub mod server;
pub mod state;
pub mod sync;
pub mod verify;

pub use config::{AclType, Cli, Limits, RelayConfig, SyncType};
pub use server::{spawn, RunningRelay};
pub use state::{Relay, RelayBuilder};
