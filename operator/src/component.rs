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

/// One deployable orly binary: the shared [`orly_consts::Service`] (names, binaries, ports,
/// health service names, env names), with what only the operator adds in [`ComponentExt`].
pub use orly_consts::Service as Component;

/// Port on which every gRPC service serves Prometheus metrics (ORLY_METRICS_LISTEN).
pub const METRICS_PORT: i32 = orly_consts::METRICS_PORT as i32;

/// What the operator adds to a [`Component`].
pub trait ComponentExt {
    /// The main container port: gRPC for services, WebSocket/HTTP default for the relay.
    fn port(self) -> i32;
    /// The relay's env var naming this sync service's address (`ORLY_GRPC_SYNC_<X>`).
    fn relay_sync_env(self) -> Option<&'static str>;
    /// The tier this component belongs to.
    fn tier(self) -> Tier;
}

impl ComponentExt for Component {
    fn port(self) -> i32 {
        i32::from(self.default_port())
    }

    fn relay_sync_env(self) -> Option<&'static str> {
        self.sync_env_prefix().and(self.relay_client_env())
    }

    fn tier(self) -> Tier {
        match self {
            Component::Db => Tier::Db,
            Component::Relay => Tier::Relay,
            _ => Tier::Services,
        }
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
        let ports: Vec<i32> = Component::ALL.iter().map(|c| c.port()).collect();
        assert_eq!(ports, [50051, 50052, 50061, 50062, 50063, 50064, 3334]);
        assert_eq!(
            child_name("main", Component::SyncRelayGroup),
            "main-sync-relaygroup"
        );
    }
}
