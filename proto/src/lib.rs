//! The gRPC protocol of every orly service, generated at build time from `proto/`.

pub mod convert;

/// Storage service (`orlydb.v1`).
pub mod orlydb {
    pub mod v1 {
        tonic::include_proto!("orlydb.v1");
    }
}

/// Access control service (`orlyacl.v1`).
pub mod orlyacl {
    pub mod v1 {
        tonic::include_proto!("orlyacl.v1");
    }
}

/// The four sync services and their shared types (`orlysync.*.v1`).
pub mod orlysync {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("orlysync.common.v1");
        }
    }
    pub mod distributed {
        pub mod v1 {
            tonic::include_proto!("orlysync.distributed.v1");
        }
    }
    pub mod cluster {
        pub mod v1 {
            tonic::include_proto!("orlysync.cluster.v1");
        }
    }
    pub mod relaygroup {
        pub mod v1 {
            tonic::include_proto!("orlysync.relaygroup.v1");
        }
    }
    pub mod negentropy {
        pub mod v1 {
            tonic::include_proto!("orlysync.negentropy.v1");
        }
    }
}

/// Fully qualified gRPC service names: the names readiness is reported under in
/// `grpc.health.v1`, which probes and the launcher ask for.
pub mod service_names {
    pub const DB: &str = "orlydb.v1.DatabaseService";
    pub const ACL: &str = "orlyacl.v1.ACLService";
    pub const SYNC_DISTRIBUTED: &str = "orlysync.distributed.v1.DistributedSyncService";
    pub const SYNC_CLUSTER: &str = "orlysync.cluster.v1.ClusterSyncService";
    pub const SYNC_RELAYGROUP: &str = "orlysync.relaygroup.v1.RelayGroupService";
    pub const SYNC_NEGENTROPY: &str = "orlysync.negentropy.v1.NegentropyService";
}
