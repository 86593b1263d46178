//! What every orly binary shares: logging, shutdown signals, the gRPC server with
//! `grpc.health.v1` readiness, Prometheus metrics, and small config parsers.

pub mod acl;
pub mod config;
pub mod grpc;
pub mod grpc_client;
pub mod memory;
pub mod metrics;
pub mod security;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod time;

pub use config::{parse_duration, parse_pubkey, parse_pubkey_list};
pub use grpc::{serve_grpc, serve_grpc_secured, ReadinessCheck};
pub use grpc_client::{CallError, ClientOptions, GrpcChannel};
pub use security::Security;
pub use shutdown::shutdown_signal;
pub use telemetry::init_tracing;
