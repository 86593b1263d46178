//! orly-sync: the distributed, cluster and relay-group sync services of orly, on one shared
//! peer-sync engine.
//!
//! - [`engine`]: the [`engine::PeerEngine`] both pull protocols are built on — identities, the
//!   HTTP client, per-peer state, the shard, the long-poll watch, one pull of a peer and the
//!   worker loop around it;
//! - [`peer`]: per-peer state in the store and [`peer::catch_up`], which pages through a peer's
//!   serials, fetches what is missing, checks it and stores it in order, resuming where a
//!   cut-off sync stopped;
//! - several replicas of a service split the peers by store leases: `orly_peering::Shard`, the
//!   scheme the negentropy peer sync shares;
//! - [`serve`], [`http`], [`nip11`]: NIP-98 on both sides, the relay identity, peer identities;
//! - [`distributed`], [`cluster`], [`relaygroup`]: the three services' logic;
//! - [`api`]: what the relay calls, in-process or over gRPC ([`grpc_client`]); [`grpc_server`]
//!   is the face of each service binary.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod grpc_client;
pub mod grpc_server;
pub mod http;
pub mod nip11;
pub mod peer;
pub mod relaygroup;
pub mod serve;

pub use api::{ClusterApi, DistributedApi, RelayGroupApi};
pub use cluster::{ClusterSettings, ClusterSync};
pub use distributed::{DistributedSettings, DistributedSync};
pub use error::SyncError;
pub use grpc_client::{GrpcCluster, GrpcDistributed, GrpcRelayGroup};
pub use http::{HttpRequest, HttpResponse};
pub use relaygroup::RelayGroup;
