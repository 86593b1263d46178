//! The names every orly part agrees on — services, binaries, ports, gRPC health service names
//! and the environment variables that wire them together — in one crate without dependencies,
//! so the operator, the launcher and the services all read them from here.

/// One deployable orly service (the relay included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Db,
    Acl,
    SyncDistributed,
    SyncCluster,
    SyncRelayGroup,
    SyncNegentropy,
    Relay,
}

/// Port on which every gRPC service serves Prometheus metrics in a cluster
/// (`ORLY_METRICS_LISTEN`).
pub const METRICS_PORT: u16 = 9100;

/// Default listen addresses (ORLY's).
pub const DB_LISTEN: &str = "127.0.0.1:50051";
pub const ACL_LISTEN: &str = "127.0.0.1:50052";
pub const SYNC_DISTRIBUTED_LISTEN: &str = "127.0.0.1:50061";
pub const SYNC_CLUSTER_LISTEN: &str = "127.0.0.1:50062";
pub const SYNC_RELAYGROUP_LISTEN: &str = "127.0.0.1:50063";
pub const SYNC_NEGENTROPY_LISTEN: &str = "127.0.0.1:50064";
pub const RELAY_LISTEN: &str = "127.0.0.1:3334";

impl Service {
    /// Every service, in rollout order (storage first, the relay last).
    pub const ALL: [Service; 7] = [
        Service::Db,
        Service::Acl,
        Service::SyncDistributed,
        Service::SyncCluster,
        Service::SyncRelayGroup,
        Service::SyncNegentropy,
        Service::Relay,
    ];

    /// The four sync services.
    pub const SYNC: [Service; 4] = [
        Service::SyncDistributed,
        Service::SyncCluster,
        Service::SyncRelayGroup,
        Service::SyncNegentropy,
    ];

    /// Short name: the subcommand of the `orly` binary, the Kubernetes `component` label and
    /// the suffix of child objects (`<relay>-<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            Service::Db => "db",
            Service::Acl => "acl",
            Service::SyncDistributed => "sync-distributed",
            Service::SyncCluster => "sync-cluster",
            Service::SyncRelayGroup => "sync-relaygroup",
            Service::SyncNegentropy => "sync-negentropy",
            Service::Relay => "relay",
        }
    }

    /// ORLY's binary (and image) name.
    pub const fn binary(self) -> &'static str {
        match self {
            Service::Db => "orly-db",
            Service::Acl => "orly-acl",
            Service::SyncDistributed => "orly-sync-distributed",
            Service::SyncCluster => "orly-sync-cluster",
            Service::SyncRelayGroup => "orly-sync-relaygroup",
            Service::SyncNegentropy => "orly-sync-negentropy",
            Service::Relay => "orly",
        }
    }

    /// The service's own port: gRPC for services, WebSocket/HTTP for the relay.
    pub const fn default_port(self) -> u16 {
        match self {
            Service::Db => 50051,
            Service::Acl => 50052,
            Service::SyncDistributed => 50061,
            Service::SyncCluster => 50062,
            Service::SyncRelayGroup => 50063,
            Service::SyncNegentropy => 50064,
            Service::Relay => 3334,
        }
    }

    /// The default listen address (`host:port`).
    pub const fn default_listen(self) -> &'static str {
        match self {
            Service::Db => DB_LISTEN,
            Service::Acl => ACL_LISTEN,
            Service::SyncDistributed => SYNC_DISTRIBUTED_LISTEN,
            Service::SyncCluster => SYNC_CLUSTER_LISTEN,
            Service::SyncRelayGroup => SYNC_RELAYGROUP_LISTEN,
            Service::SyncNegentropy => SYNC_NEGENTROPY_LISTEN,
            Service::Relay => RELAY_LISTEN,
        }
    }

    /// The `grpc.health.v1` service name probes ask for; the relay speaks HTTP instead.
    pub const fn grpc_health_service(self) -> Option<&'static str> {
        match self {
            Service::Db => Some("orlydb.v1.DatabaseService"),
            Service::Acl => Some("orlyacl.v1.ACLService"),
            Service::SyncDistributed => Some("orlysync.distributed.v1.DistributedSyncService"),
            Service::SyncCluster => Some("orlysync.cluster.v1.ClusterSyncService"),
            Service::SyncRelayGroup => Some("orlysync.relaygroup.v1.RelayGroupService"),
            Service::SyncNegentropy => Some("orlysync.negentropy.v1.NegentropyService"),
            Service::Relay => None,
        }
    }

    /// The variable a gRPC service reads its listen address from.
    pub const fn listen_env(self) -> Option<&'static str> {
        match self {
            Service::Db => Some(env::DB_LISTEN),
            Service::Acl => Some(env::ACL_LISTEN),
            Service::SyncDistributed => Some("ORLY_SYNC_DISTRIBUTED_LISTEN"),
            Service::SyncCluster => Some("ORLY_SYNC_CLUSTER_LISTEN"),
            Service::SyncRelayGroup => Some("ORLY_SYNC_RELAYGROUP_LISTEN"),
            Service::SyncNegentropy => Some("ORLY_SYNC_NEGENTROPY_LISTEN"),
            Service::Relay => None,
        }
    }

    /// Env prefix of a sync service (`ORLY_SYNC_<X>`).
    pub const fn sync_env_prefix(self) -> Option<&'static str> {
        match self {
            Service::SyncDistributed => Some("ORLY_SYNC_DISTRIBUTED"),
            Service::SyncCluster => Some("ORLY_SYNC_CLUSTER"),
            Service::SyncRelayGroup => Some("ORLY_SYNC_RELAYGROUP"),
            Service::SyncNegentropy => Some("ORLY_SYNC_NEGENTROPY"),
            _ => None,
        }
    }

    /// The relay's variable naming this service's address.
    pub const fn relay_client_env(self) -> Option<&'static str> {
        match self {
            Service::Db => Some(env::GRPC_DB_SERVER),
            Service::Acl => Some(env::GRPC_ACL_SERVER),
            Service::SyncDistributed => Some("ORLY_GRPC_SYNC_DISTRIBUTED"),
            Service::SyncCluster => Some("ORLY_GRPC_SYNC_CLUSTER"),
            Service::SyncRelayGroup => Some("ORLY_GRPC_SYNC_RELAYGROUP"),
            Service::SyncNegentropy => Some("ORLY_GRPC_SYNC_NEGENTROPY"),
            Service::Relay => None,
        }
    }

    /// The service whose binary or subcommand is `name` (`orly-db`, `db`, `orly`, `relay`, …).
    pub fn from_name(name: &str) -> Option<Service> {
        Service::ALL
            .into_iter()
            .find(|s| s.name() == name || s.binary() == name)
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Environment variables read by more than one part.
pub mod env {
    pub const DB_LISTEN: &str = "ORLY_DB_LISTEN";
    pub const ACL_LISTEN: &str = "ORLY_ACL_LISTEN";
    /// The relay's orly-db address (ours); ORLY's name is [`GRPC_SERVER`].
    pub const GRPC_DB_SERVER: &str = "ORLY_GRPC_DB_SERVER";
    pub const GRPC_SERVER: &str = "ORLY_GRPC_SERVER";
    pub const GRPC_ACL_SERVER: &str = "ORLY_GRPC_ACL_SERVER";
    pub const DB_TYPE: &str = "ORLY_DB_TYPE";
    pub const DB_URL: &str = "ORLY_DB_URL";
    pub const DATA_DIR: &str = "ORLY_DATA_DIR";
    /// Connections of the SQL store (SQLite's read pool, PostgreSQL's pool): orly-db's, or the
    /// relay's own store in local mode.
    pub const DB_MAX_CONNECTIONS: &str = "ORLY_DB_MAX_CONNECTIONS";
    pub const LOG_LEVEL: &str = "ORLY_LOG_LEVEL";
    pub const METRICS_LISTEN: &str = "ORLY_METRICS_LISTEN";
    pub const LISTEN: &str = "ORLY_LISTEN";
    pub const PORT: &str = "ORLY_PORT";
    pub const RELAY_URL: &str = "ORLY_RELAY_URL";
    pub const ACL_TYPE: &str = "ORLY_ACL_TYPE";
    pub const SYNC_TYPE: &str = "ORLY_SYNC_TYPE";
    /// Shared secret every gRPC call carries (`authorization: Bearer <token>`) and every
    /// service checks; unset: no token (loopback-only setups).
    pub const GRPC_AUTH_TOKEN: &str = "ORLY_GRPC_AUTH_TOKEN";
    /// A file holding the token (a mounted Secret); read when [`GRPC_AUTH_TOKEN`] is unset.
    pub const GRPC_AUTH_TOKEN_FILE: &str = "ORLY_GRPC_AUTH_TOKEN_FILE";
    /// mTLS between the parts: PEM certificate and key of this process, and the CA that
    /// signed its peers'. All three set: servers require client certificates and clients
    /// present theirs.
    pub const GRPC_TLS_CERT: &str = "ORLY_GRPC_TLS_CERT";
    pub const GRPC_TLS_KEY: &str = "ORLY_GRPC_TLS_KEY";
    pub const GRPC_TLS_CA: &str = "ORLY_GRPC_TLS_CA";
    /// How often gRPC clients resolve a service name again to find replicas that came or went.
    pub const GRPC_RESOLVE_INTERVAL: &str = "ORLY_GRPC_RESOLVE_INTERVAL";
    /// Name servers (`ip:port`, comma-separated) gRPC clients resolve with instead of the
    /// system's.
    pub const DNS_SERVERS: &str = "ORLY_DNS_SERVERS";
}

/// Annotation that stops the operator changing anything of an `OrlyRelay`.
pub const RECONCILE_PAUSED_ANNOTATION: &str = "orly.dev/reconcile-paused";

/// Paths every gRPC service's metrics server (`ORLY_METRICS_LISTEN`) answers besides
/// `/metrics`: readiness (the same as the named `grpc.health.v1` service) and liveness. The
/// operator probes them over plain HTTP when mTLS keeps the kubelet's gRPC probes out.
pub const METRICS_READYZ_PATH: &str = "/readyz";
pub const METRICS_HEALTHZ_PATH: &str = "/healthz";

/// The relay's subcommand a pod runs before it stops (its `preStop` hook): stop accepting,
/// close every WebSocket with 1001, wait until they are gone (`--port`, `--timeout`).
pub const RELAY_DRAIN_SUBCOMMAND: &str = "drain";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Service::ALL {
            assert_eq!(Service::from_name(s.name()), Some(s));
            assert_eq!(Service::from_name(s.binary()), Some(s));
            assert!(s
                .default_listen()
                .ends_with(&format!(":{}", s.default_port())));
        }
        assert_eq!(Service::from_name("nope"), None);
    }
}
