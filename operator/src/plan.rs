//! The validate stage: turns a raw `OrlyRelaySpec` into a `RelayPlan` — per component the image,
//! replicas, env (ORLY names from the architecture contract) and storage — or a clear error.
//! Everything downstream (builders, tier gating) reads only the plan.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;

use crate::component::{child_name, Component, ComponentExt, METRICS_PORT};
use crate::crd::{
    AutoscalingSpec, DatabaseType, OrlyRelay, OrlyRelaySpec, PodOverrides, ServiceType, SqliteSpec,
    SyncCommon, DEFAULT_REPOSITORY,
};
use crate::error::{Error, Result};

/// Operator-wide defaults that are not part of the CRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorDefaults {
    /// Image repository when the spec names none.
    pub repository: String,
    /// Image tag when the spec names none: the operator's own version, so an operator release
    /// rolls out the matching services.
    pub tag: String,
}

impl Default for OperatorDefaults {
    fn default() -> Self {
        Self {
            repository: DEFAULT_REPOSITORY.to_string(),
            tag: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Everything needed to build the children of one OrlyRelay.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayPlan {
    /// OrlyRelay name, the prefix of every child.
    pub name: String,
    /// Namespace of the OrlyRelay and its children.
    pub namespace: String,
    /// Controller owner reference every child carries.
    pub owner: OwnerReference,
    /// Enabled components in rollout order.
    pub components: Vec<ComponentPlan>,
    /// Components whose children must not exist (disabled sync services).
    pub disabled: Vec<Component>,
}

/// One enabled component.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentPlan {
    pub component: Component,
    /// Full image reference.
    pub image: String,
    /// Image tag, also the `app.kubernetes.io/version` label.
    pub version: String,
    pub pull_policy: Option<String>,
    pub pull_secrets: Vec<String>,
    /// Replicas when not autoscaled.
    pub replicas: i32,
    /// When set, an HPA owns the replica count.
    pub autoscaling: Option<AutoscalingSpec>,
    /// Main container port.
    pub port: i32,
    /// Non-secret env, stored in the component's ConfigMap.
    pub config: BTreeMap<String, String>,
    /// Env read from Secrets (never copied into a ConfigMap).
    pub secret_env: Vec<EnvVar>,
    /// Resources, scheduling and user env.
    pub pod: PodOverrides,
    /// SQLite storage: the component runs as a StatefulSet with a PVC.
    pub storage: Option<SqliteSpec>,
    /// Clients balance across pods themselves, so the Service is headless.
    pub headless: bool,
    /// Service type (only the relay is exposed beyond ClusterIP).
    pub service_type: ServiceType,
}

impl ComponentPlan {
    /// Name shared by every child of this component.
    pub fn child_name(&self, relay: &str) -> String {
        child_name(relay, self.component)
    }

    /// The largest replica count this component can run with, for PDB decisions.
    pub fn max_replicas(&self) -> i32 {
        self.autoscaling
            .as_ref()
            .map_or(self.replicas, |a| a.max_replicas)
    }
}

impl RelayPlan {
    /// The plan of one component, if enabled.
    pub fn component(&self, component: Component) -> Option<&ComponentPlan> {
        self.components.iter().find(|c| c.component == component)
    }
}

/// Validate `relay` and derive its plan.
pub fn plan(relay: &OrlyRelay, defaults: &OperatorDefaults) -> Result<RelayPlan> {
    let name = relay
        .metadata
        .name
        .clone()
        .ok_or_else(|| Error::InvalidSpec("metadata.name is missing".into()))?;
    let namespace = relay
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| Error::InvalidSpec("metadata.namespace is missing".into()))?;
    let mut owner = relay
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec("metadata.uid is missing".into()))?;
    // Foreground deletion of the OrlyRelay waits for its children.
    owner.block_owner_deletion = Some(true);
    let spec = &relay.spec;
    validate(spec)?;

    let mut components = Vec::new();
    let mut disabled = Vec::new();
    for component in Component::ALL {
        match component_plan(&name, spec, component, defaults) {
            Some(plan) => components.push(plan),
            None => disabled.push(component),
        }
    }
    Ok(RelayPlan {
        name,
        namespace,
        owner,
        components,
        disabled,
    })
}

/// The rules the CRD states in CEL, checked again here because an object stored under an older
/// CRD (or with validation off) must not produce a broken rollout.
fn validate(spec: &OrlyRelaySpec) -> Result<()> {
    let db = &spec.database;
    if db.type_ == DatabaseType::Postgres && db.postgres.is_none() {
        return Err(Error::InvalidSpec(
            "postgres requires a URL secret: set database.postgres.urlSecret".into(),
        ));
    }
    if db.type_ == DatabaseType::Sqlite && db.replicas > 1 {
        return Err(Error::InvalidSpec("sqlite allows one db replica".into()));
    }
    if db.type_ == DatabaseType::Sqlite && spec.relay.replicas > 1 {
        return Err(Error::InvalidSpec(
            "sqlite allows one relay replica; use postgres to scale the relay".into(),
        ));
    }
    if spec.relay.nip77 && !spec.sync.negentropy.common.enabled {
        return Err(Error::InvalidSpec(
            "relay.nip77 requires sync.negentropy.enabled".into(),
        ));
    }
    let replicas = [db.replicas, spec.relay.replicas]
        .into_iter()
        .chain(sync_commons(spec).map(|(_, c)| c.replicas));
    if replicas.into_iter().any(|r| r < 0) {
        return Err(Error::InvalidSpec("replicas must not be negative".into()));
    }
    for (component, common) in sync_commons(spec) {
        if let Some(a) = &common.autoscaling {
            if a.min_replicas > a.max_replicas {
                return Err(Error::InvalidSpec(format!(
                    "{component}: autoscaling.minReplicas must not exceed autoscaling.maxReplicas"
                )));
            }
        }
    }
    Ok(())
}

fn sync_commons(spec: &OrlyRelaySpec) -> impl Iterator<Item = (Component, &SyncCommon)> {
    [
        (Component::SyncDistributed, &spec.sync.distributed.common),
        (Component::SyncCluster, &spec.sync.cluster.common),
        (Component::SyncRelayGroup, &spec.sync.relaygroup.common),
        (Component::SyncNegentropy, &spec.sync.negentropy.common),
    ]
    .into_iter()
}

fn sync_common(spec: &OrlyRelaySpec, component: Component) -> Option<&SyncCommon> {
    sync_commons(spec)
        .find(|(c, _)| *c == component)
        .map(|(_, common)| common)
}

/// `host:port` of a component's Service, as the other components dial it.
pub fn service_address(relay: &str, component: Component) -> String {
    format!("{}:{}", child_name(relay, component), component.port())
}

fn component_plan(
    relay: &str,
    spec: &OrlyRelaySpec,
    component: Component,
    defaults: &OperatorDefaults,
) -> Option<ComponentPlan> {
    let log_level = spec.log_level.as_str().to_string();
    let db_address = service_address(relay, Component::Db);
    let mut config = BTreeMap::new();
    let mut secret_env = Vec::new();
    let mut storage = None;
    let mut headless = false;
    let mut autoscaling = None;
    let mut service_type = ServiceType::ClusterIP;
    let mut port = component.port();
    let listen = format!("0.0.0.0:{port}");
    let metrics_listen = format!("0.0.0.0:{METRICS_PORT}");

    let (replicas, pod) = match component {
        Component::Db => {
            let db = &spec.database;
            config.insert("ORLY_DB_LISTEN".into(), listen);
            config.insert("ORLY_DB_TYPE".into(), db.type_.as_str().into());
            match db.type_ {
                DatabaseType::Sqlite => {
                    config.insert("ORLY_DATA_DIR".into(), "/data".into());
                    storage = Some(db.sqlite.clone().unwrap_or_default());
                }
                DatabaseType::Postgres => {
                    // Scaled and stateless: clients balance across the pods themselves.
                    headless = true;
                    if let Some(pg) = &db.postgres {
                        secret_env.push(EnvVar {
                            name: "ORLY_DB_URL".into(),
                            value_from: Some(EnvVarSource {
                                secret_key_ref: Some(SecretKeySelector {
                                    name: pg.url_secret.name.clone(),
                                    key: pg.url_secret.key.clone(),
                                    optional: Some(false),
                                }),
                                ..EnvVarSource::default()
                            }),
                            ..EnvVar::default()
                        });
                    }
                }
            }
            (db.replicas, &db.pod)
        }
        Component::Acl => {
            let acl = &spec.acl;
            config.insert("ORLY_ACL_LISTEN".into(), listen);
            config.insert("ORLY_ACL_DB_TYPE".into(), "grpc".into());
            config.insert("ORLY_ACL_DB_SERVER".into(), db_address);
            config.insert("ORLY_ACL_MODE".into(), acl.mode.as_str().into());
            insert_list(&mut config, "ORLY_ADMINS", &acl.admins);
            insert_list(&mut config, "ORLY_OWNERS", &acl.owners);
            (1, &acl.pod)
        }
        Component::Relay => {
            let r = &spec.relay;
            port = r.port;
            service_type = r.service_type;
            config.insert("ORLY_LISTEN".into(), "0.0.0.0".into());
            config.insert("ORLY_PORT".into(), r.port.to_string());
            config.insert("ORLY_DB_TYPE".into(), "grpc".into());
            config.insert("ORLY_GRPC_SERVER".into(), db_address);
            config.insert("ORLY_ACL_TYPE".into(), "grpc".into());
            config.insert(
                "ORLY_GRPC_ACL_SERVER".into(),
                service_address(relay, Component::Acl),
            );
            config.insert("ORLY_ACL_MODE".into(), spec.acl.mode.as_str().into());
            let mut any_sync = false;
            for sync in Component::SYNC {
                if sync_common(spec, sync).is_some_and(|c| c.enabled) {
                    any_sync = true;
                    if let Some(var) = sync.relay_sync_env() {
                        config.insert(var.into(), service_address(relay, sync));
                    }
                }
            }
            if any_sync {
                config.insert("ORLY_SYNC_TYPE".into(), "grpc".into());
            }
            config.insert("ORLY_NEGENTROPY_ENABLED".into(), r.nip77.to_string());
            config.insert("ORLY_AUTH_REQUIRED".into(), r.auth_required.to_string());
            insert_list(&mut config, "ORLY_ADMINS", &spec.acl.admins);
            insert_list(&mut config, "ORLY_OWNERS", &spec.acl.owners);
            (r.replicas, &r.pod)
        }
        sync => {
            let common = sync_common(spec, sync)?;
            if !common.enabled {
                return None;
            }
            let prefix = sync.sync_env_prefix()?;
            headless = true;
            autoscaling = common.autoscaling.clone();
            config.insert(format!("{prefix}_LISTEN"), listen);
            config.insert(format!("{prefix}_DB_TYPE"), "grpc".into());
            config.insert(format!("{prefix}_DB_SERVER"), db_address);
            sync_settings(spec, sync, prefix, &mut config);
            (common.replicas, &common.pod)
        }
    };
    if component != Component::Relay {
        config.insert("ORLY_METRICS_LISTEN".into(), metrics_listen);
    }
    config.insert("ORLY_LOG_LEVEL".into(), log_level);

    let override_ = pod.image.clone().unwrap_or_default();
    let repository = override_
        .repository
        .or_else(|| spec.images.repository.clone())
        .unwrap_or_else(|| defaults.repository.clone());
    let version = override_
        .tag
        .or_else(|| spec.images.tag.clone())
        .unwrap_or_else(|| defaults.tag.clone());
    let image = format!(
        "{}/{}:{}",
        repository.trim_end_matches('/'),
        component.binary(),
        version
    );

    Some(ComponentPlan {
        component,
        image,
        version,
        pull_policy: spec.images.pull_policy.map(|p| p.as_str().to_string()),
        pull_secrets: spec.images.pull_secrets.clone(),
        replicas,
        autoscaling,
        port,
        config,
        secret_env,
        pod: pod.clone(),
        storage,
        headless,
        service_type,
    })
}

fn sync_settings(
    spec: &OrlyRelaySpec,
    sync: Component,
    prefix: &str,
    config: &mut BTreeMap<String, String>,
) {
    let mut opt = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            config.insert(format!("{prefix}_{key}"), v);
        }
    };
    match sync {
        Component::SyncDistributed => {
            let s = &spec.sync.distributed;
            opt("PEERS", join(&s.peers));
            opt("INTERVAL", s.interval.clone());
        }
        Component::SyncCluster => {
            let s = &spec.sync.cluster;
            opt("ADMINS", join(&s.admins));
            opt(
                "PROPAGATE_PRIVILEGED",
                Some(s.propagate_privileged.to_string()),
            );
            opt("POLL_INTERVAL", s.poll_interval.clone());
        }
        Component::SyncRelayGroup => {
            opt("ADMINS", join(&spec.sync.relaygroup.admins));
        }
        Component::SyncNegentropy => {
            let s = &spec.sync.negentropy;
            opt("PEERS", join(&s.peers));
            opt("INTERVAL", s.interval.clone());
            opt("FRAME_SIZE", s.frame_size.map(|v| v.to_string()));
            opt("ID_SIZE", s.id_size.map(|v| v.to_string()));
            opt("SESSION_TIMEOUT", s.session_timeout.clone());
        }
        _ => {}
    }
}

/// ORLY lists are comma-separated; an empty list is left unset so the service default applies.
fn join(values: &[String]) -> Option<String> {
    (!values.is_empty()).then(|| values.join(","))
}

fn insert_list(config: &mut BTreeMap<String, String>, key: &str, values: &[String]) {
    if let Some(v) = join(values) {
        config.insert(key.into(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::relay_from_yaml;

    fn plan_of(yaml: &str) -> Result<RelayPlan> {
        plan(&relay_from_yaml(yaml), &OperatorDefaults::default())
    }

    #[test]
    fn minimal_relay_plans_db_acl_and_relay() {
        let plan = plan_of("{}").unwrap();
        let names: Vec<_> = plan.components.iter().map(|c| c.component).collect();
        assert_eq!(names, [Component::Db, Component::Acl, Component::Relay]);
        assert_eq!(plan.disabled, Component::SYNC.to_vec());
        let db = plan.component(Component::Db).unwrap();
        assert_eq!(
            db.image,
            format!("ghcr.io/orly-relay/orly-db:{}", env!("CARGO_PKG_VERSION"))
        );
        assert!(db.storage.is_some());
        assert!(!db.headless);
    }

    #[test]
    fn relay_env_names_every_enabled_sync_service() {
        let plan = plan_of(
            "sync: {cluster: {enabled: true}, negentropy: {enabled: true, frameSize: 8192}}\nrelay: {nip77: true}",
        )
        .unwrap();
        let relay = plan.component(Component::Relay).unwrap();
        let expected: BTreeMap<String, String> = [
            ("ORLY_ACL_MODE", "none"),
            ("ORLY_ACL_TYPE", "grpc"),
            ("ORLY_AUTH_REQUIRED", "false"),
            ("ORLY_DB_TYPE", "grpc"),
            ("ORLY_GRPC_ACL_SERVER", "test-acl:50052"),
            ("ORLY_GRPC_SERVER", "test-db:50051"),
            ("ORLY_GRPC_SYNC_CLUSTER", "test-sync-cluster:50062"),
            ("ORLY_GRPC_SYNC_NEGENTROPY", "test-sync-negentropy:50064"),
            ("ORLY_LISTEN", "0.0.0.0"),
            ("ORLY_LOG_LEVEL", "info"),
            ("ORLY_NEGENTROPY_ENABLED", "true"),
            ("ORLY_PORT", "3334"),
            ("ORLY_SYNC_TYPE", "grpc"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(relay.config, expected);
        let neg = plan.component(Component::SyncNegentropy).unwrap();
        assert_eq!(neg.config["ORLY_SYNC_NEGENTROPY_FRAME_SIZE"], "8192");
        assert_eq!(
            neg.config["ORLY_SYNC_NEGENTROPY_DB_SERVER"],
            "test-db:50051"
        );
        assert!(neg.headless);
    }

    #[test]
    fn component_image_override_wins() {
        let plan =
            plan_of("images: {repository: reg.example/orly, tag: v9}\nacl: {image: {tag: hotfix}}")
                .unwrap();
        assert_eq!(
            plan.component(Component::Acl).unwrap().image,
            "reg.example/orly/orly-acl:hotfix"
        );
        assert_eq!(
            plan.component(Component::Relay).unwrap().image,
            "reg.example/orly/orly:v9"
        );
    }

    #[test]
    fn inconsistent_specs_are_refused_with_the_crd_message() {
        let cases = [
            (
                "database: {type: postgres}",
                "postgres requires a URL secret",
            ),
            ("database: {replicas: 2}", "sqlite allows one db replica"),
            ("relay: {replicas: 2}", "sqlite allows one relay replica"),
            (
                "relay: {nip77: true}",
                "relay.nip77 requires sync.negentropy.enabled",
            ),
            (
                "sync: {cluster: {enabled: true, autoscaling: {minReplicas: 3, maxReplicas: 2}}}",
                "autoscaling.minReplicas must not exceed",
            ),
        ];
        for (yaml, message) in cases {
            let err = plan_of(yaml).expect_err(yaml).to_string();
            assert!(err.contains(message), "{yaml}: {err}");
        }
    }
}
