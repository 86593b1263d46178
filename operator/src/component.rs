//! The seven orly components and the three tiers they are rolled out in: binary names, ports,
//! gRPC health service names and env prefixes, all from the architecture contract.

use std::fmt;

/// Rollout tier; a tier is touched only when every tier below it is Available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// orly-db.
    Db,
    /// orly-acl and the enabled sync services.
    Services,
    /// The relay.
    Relay,
}

impl Tier {
    /// Every tier, bottom first.
    pub const ALL: [Tier; 3] = [Tier::Db, Tier::Services, Tier::Relay];

    /// Short name used in status messages and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Db => "db",
            Tier::Services => "services",
            Tier::Relay => "relay",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One deployable orly binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Db,
    Acl,
    SyncDistributed,
    SyncCluster,
    SyncRelayGroup,
    SyncNegentropy,
    Relay,
}

/// Port on which every gRPC service serves Prometheus metrics (ORLY_METRICS_LISTEN).
pub const METRICS_PORT: i32 = 9100;

impl Component {
    /// Every component, in rollout order.
    pub const ALL: [Component; 7] = [
        Component::Db,
        Component::Acl,
        Component::SyncDistributed,
        Component::SyncCluster,
        Component::SyncRelayGroup,
        Component::SyncNegentropy,
        Component::Relay,
    ];

    /// The four sync services.
    pub const SYNC: [Component; 4] = [
        Component::SyncDistributed,
        Component::SyncCluster,
        Component::SyncRelayGroup,
        Component::SyncNegentropy,
    ];

    /// Name used for the children (`<relay>-<name>`) and the `component` label.
    pub fn name(self) -> &'static str {
        match self {
            Component::Db => "db",
            Component::Acl => "acl",
            Component::SyncDistributed => "sync-distributed",
            Component::SyncCluster => "sync-cluster",
            Component::SyncRelayGroup => "sync-relaygroup",
            Component::SyncNegentropy => "sync-negentropy",
            Component::Relay => "relay",
        }
    }

    /// Binary and image name.
    pub fn binary(self) -> &'static str {
        match self {
            Component::Db => "orly-db",
            Component::Acl => "orly-acl",
            Component::SyncDistributed => "orly-sync-distributed",
            Component::SyncCluster => "orly-sync-cluster",
            Component::SyncRelayGroup => "orly-sync-relaygroup",
            Component::SyncNegentropy => "orly-sync-negentropy",
            Component::Relay => "orly",
        }
    }

    /// The main container port: gRPC for services, WebSocket/HTTP default for the relay.
    pub fn default_port(self) -> i32 {
        match self {
            Component::Db => 50051,
            Component::Acl => 50052,
            Component::SyncDistributed => 50061,
            Component::SyncCluster => 50062,
            Component::SyncRelayGroup => 50063,
            Component::SyncNegentropy => 50064,
            Component::Relay => 3334,
        }
    }

    /// The `grpc.health.v1` service name probes ask for; the relay speaks HTTP instead.
    pub fn grpc_health_service(self) -> Option<&'static str> {
        match self {
            Component::Db => Some("orlydb.v1.DatabaseService"),
            Component::Acl => Some("orlyacl.v1.ACLService"),
            Component::SyncDistributed => Some("orlysync.distributed.v1.DistributedSyncService"),
            Component::SyncCluster => Some("orlysync.cluster.v1.ClusterSyncService"),
            Component::SyncRelayGroup => Some("orlysync.relaygroup.v1.RelayGroupService"),
            Component::SyncNegentropy => Some("orlysync.negentropy.v1.NegentropyService"),
            Component::Relay => None,
        }
    }

    /// Env prefix of a sync service (`ORLY_SYNC_<X>`).
    pub fn sync_env_prefix(self) -> Option<&'static str> {
        match self {
            Component::SyncDistributed => Some("ORLY_SYNC_DISTRIBUTED"),
            Component::SyncCluster => Some("ORLY_SYNC_CLUSTER"),
            Component::SyncRelayGroup => Some("ORLY_SYNC_RELAYGROUP"),
            Component::SyncNegentropy => Some("ORLY_SYNC_NEGENTROPY"),
            _ => None,
        }
    }

    /// The relay's env var naming this service's address (`ORLY_GRPC_SYNC_<X>`).
    pub fn relay_sync_env(self) -> Option<&'static str> {
        match self {
            Component::SyncDistributed => Some("ORLY_GRPC_SYNC_DISTRIBUTED"),
            Component::SyncCluster => Some("ORLY_GRPC_SYNC_CLUSTER"),
            Component::SyncRelayGroup => Some("ORLY_GRPC_SYNC_RELAYGROUP"),
            Component::SyncNegentropy => Some("ORLY_GRPC_SYNC_NEGENTROPY"),
            _ => None,
        }
    }

    /// The tier this component belongs to.
    pub fn tier(self) -> Tier {
        match self {
            Component::Db => Tier::Db,
            Component::Relay => Tier::Relay,
            _ => Tier::Services,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Name of every child object of `component` for the OrlyRelay `relay`.
pub fn child_name(relay: &str, component: Component) -> String {
    format!("{relay}-{}", component.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_follow_the_dependency_order() {
        let tiers: Vec<Tier> = Component::ALL.iter().map(|c| c.tier()).collect();
        assert!(
            tiers.windows(2).all(|w| w[0] <= w[1]),
            "ALL is in rollout order"
        );
        assert_eq!(Component::Db.tier(), Tier::Db);
        assert_eq!(Component::SyncNegentropy.tier(), Tier::Services);
        assert_eq!(Component::Relay.tier(), Tier::Relay);
    }

    #[test]
    fn every_grpc_service_has_its_contract_port() {
        let ports: Vec<i32> = Component::ALL.iter().map(|c| c.default_port()).collect();
        assert_eq!(ports, [50051, 50052, 50061, 50062, 50063, 50064, 3334]);
        assert_eq!(
            child_name("main", Component::SyncRelayGroup),
            "main-sync-relaygroup"
        );
    }
}
