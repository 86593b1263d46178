//! The orly relay: NIP-01 over WebSocket with NIP-11, NIP-42, NIP-45 and NIP-70, on top of an
//! [`orly_db::EventStore`] (in-process or over gRPC) and an [`acl::Acl`].

pub use orly_common::acl;
pub mod cli;
pub mod config;
pub mod connection;
pub mod message;
pub mod nip11;
pub mod server;
pub mod subscriptions;
pub mod sync;

pub use config::{AclType, Cli, Limits, RelayConfig, SyncType};
pub use server::{spawn, Relay, RunningRelay};
