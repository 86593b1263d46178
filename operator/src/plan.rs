//! The validate stage: turns a raw `OrlyRelaySpec` into a `RelayPlan` — per component the image,
//! replicas, env (ORLY names from the architecture contract) and storage — or a clear error.
//! Everything downstream (builders, tier gating) reads only the plan.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use orly_consts::env;

use crate::component::{child_name, Component, ComponentExt, METRICS_PORT};
use crate::crd::{
    AutoscalingSpec, DatabaseType, OrlyRelay, OrlyRelaySpec, PodOverrides, ServiceType, SqliteSpec,
    SyncCommon, DEFAULT_REPOSITORY,
};
use crate::error::{Error, Result};

/// Where every component finds the mTLS certificates (`spec.grpcTls.secretName`, read-only).
pub const GRPC_TLS_DIR: &str = "/etc/orly/grpc-tls";

/// Name of the token Secret the operator creates when the spec names none.
pub fn grpc_auth_secret_name(relay: &str) -> String {
    format!("{relay}-grpc-auth")
}

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
    /// The Secret every component reads the gRPC token from.
    pub grpc_auth: GrpcAuthPlan,
    /// The Secret with the mTLS certificates, mounted in every component.
    pub grpc_tls_secret: Option<String>,
    /// The NetworkPolicies, when enabled.
    pub network_policy: Option<NetworkPolicyPlan>,
}

/// The gRPC token's Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcAuthPlan {
    pub secret_name: String,
    pub key: String,
    /// The operator creates the Secret (once) because the spec names none.
    pub generated: bool,
}

/// What the NetworkPolicies allow beyond the fixed caller graph.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkPolicyPlan {
    /// Who may reach the metrics port; `None`: the pods of the namespace.
    pub metrics_from: Option<Vec<NetworkPolicyPeer>>,
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
    /// The pods' `terminationGracePeriodSeconds` and the relay's preStop drain within it.
    pub grace_period_seconds: Option<i64>,
}

impl ComponentPlan {
    /// Name shared by every child of this component.
    pub fn child_name(&self, relay: &str) -> String {
        child_name(relay, self.component)
    }

    /// The count a new workload starts with: the lower bound when autoscaled.
    pub fn initial_replicas(&self) -> i32 {
        self.autoscaling
            .as_ref()
            .map_or(self.replicas, |a| a.min_replicas)
    }

    /// The largest replica count this component can run with, for PDB decisions.
    pub fn max_replicas(&self) -> i32 {
        self.autoscaling
            .as_ref()
            .map_or(self.replicas, |a| a.max_replicas)
    }

    /// Pods that may be missing while the component still counts as Available: the one its
    /// PodDisruptionBudget lets a drain take, none for a single-replica component.
    pub fn max_unavailable(&self) -> i32 {
        i32::from(self.max_replicas() > 1)
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

    let grpc_auth = match &spec.grpc_auth.secret_name {
        Some(secret) => GrpcAuthPlan {
            secret_name: secret.clone(),
            key: spec.grpc_auth.key.clone(),
            generated: false,
        },
        None => GrpcAuthPlan {
            secret_name: grpc_auth_secret_name(&name),
            key: crate::crd::GRPC_AUTH_TOKEN_KEY.to_string(),
            generated: true,
        },
    };
    let grpc_tls_secret = spec.grpc_tls.as_ref().map(|t| t.secret_name.clone());
    let network_policy = spec.network_policy.enabled.then(|| NetworkPolicyPlan {
        metrics_from: spec.network_policy.metrics_from.clone(),
    });

    let mut components = Vec::new();
    let mut disabled = Vec::new();
    for component in Component::ALL {
        match component_plan(
            &name,
            spec,
            component,
            defaults,
            &grpc_auth,
            &grpc_tls_secret,
        ) {
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
        grpc_auth,
        grpc_tls_secret,
        network_policy,
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
    // One SQLite file has one writer: orly-db. Relay and acl pods all reach it through
    // orly-db, so they scale with SQLite too.
    if db.type_ == DatabaseType::Sqlite && db.replicas > 1 {
        return Err(Error::InvalidSpec("sqlite allows one db replica".into()));
    }
    if spec.relay.nip77 && !spec.sync.negentropy.common.enabled {
        return Err(Error::InvalidSpec(
            "relay.nip77 requires sync.negentropy.enabled".into(),
        ));
    }
    let replicas = [db.replicas, spec.acl.replicas, spec.relay.replicas]
        .into_iter()
        .chain(sync_commons(spec).map(|(_, c)| c.replicas));
    if replicas.into_iter().any(|r| r < 0) {
        return Err(Error::InvalidSpec("replicas must not be negative".into()));
    }
    let autoscaled = [
        (Component::Acl, spec.acl.autoscaling.as_ref()),
        (Component::Relay, spec.relay.autoscaling.as_ref()),
    ]
    .into_iter()
    .chain(sync_commons(spec).map(|(c, common)| (c, common.autoscaling.as_ref())));
    for (component, autoscaling) in autoscaled {
        if autoscaling.is_some_and(|a| a.min_replicas > a.max_replicas) {
            return Err(Error::InvalidSpec(format!(
                "{component}: autoscaling.minReplicas must not exceed autoscaling.maxReplicas"
            )));
        }
    }
    if spec.relay.termination_grace_period_seconds <= crate::crd::DRAIN_MARGIN_SECONDS {
        return Err(Error::InvalidSpec(format!(
            "relay.terminationGracePeriodSeconds must exceed {}",
            crate::crd::DRAIN_MARGIN_SECONDS
        )));
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

/// An env var read from a key of a Secret the pod cannot start without.
fn secret_env_var(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn component_plan(
    relay: &str,
    spec: &OrlyRelaySpec,
    component: Component,
    defaults: &OperatorDefaults,
    grpc_auth: &GrpcAuthPlan,
    grpc_tls_secret: &Option<String>,
) -> Option<ComponentPlan> {
    let log_level = spec.log_level.as_str().to_string();
    let db_address = service_address(relay, Component::Db);
    let mut config = BTreeMap::new();
    let mut secret_env = Vec::new();
    let mut storage = None;
    // Every gRPC Service is headless: clients resolve it to every pod and balance over them.
    let headless = component != Component::Relay;
    let mut autoscaling = None;
    let mut service_type = ServiceType::ClusterIP;
    let mut grace_period_seconds = None;
    let mut port = component.port();
    let listen = format!("0.0.0.0:{port}");
    let metrics_listen = format!("0.0.0.0:{METRICS_PORT}");

    let (replicas, pod) = match component {
        Component::Db => {
            let db = &spec.database;
            config.insert(env::DB_LISTEN.into(), listen);
            config.insert(env::DB_TYPE.into(), db.type_.as_str().into());
            match db.type_ {
                DatabaseType::Sqlite => {
                    config.insert(env::DATA_DIR.into(), "/data".into());
                    storage = Some(db.sqlite.clone().unwrap_or_default());
                }
                DatabaseType::Postgres => {
                    if let Some(pg) = &db.postgres {
                        secret_env.push(secret_env_var(
                            env::DB_URL,
                            &pg.url_secret.name,
                            &pg.url_secret.key,
                        ));
                    }
                }
            }
            (db.replicas, &db.pod)
        }
        Component::Acl => {
            let acl = &spec.acl;
            autoscaling = acl.autoscaling.clone();
            config.insert(env::ACL_LISTEN.into(), listen);
            config.insert("ORLY_ACL_DB_TYPE".into(), "grpc".into());
            config.insert("ORLY_ACL_DB_SERVER".into(), db_address);
            config.insert("ORLY_ACL_MODE".into(), acl.mode.as_str().into());
            insert_list(&mut config, "ORLY_ADMINS", &acl.admins);
            insert_list(&mut config, "ORLY_OWNERS", &acl.owners);
            (acl.replicas, &acl.pod)
        }
        Component::Relay => {
            let r = &spec.relay;
            port = r.port;
            service_type = r.service_type;
            autoscaling = r.autoscaling.clone();
            grace_period_seconds = Some(r.termination_grace_period_seconds);
            if let Some(url) = &r.url {
                config.insert(env::RELAY_URL.into(), url.clone());
            }
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
            autoscaling = common.autoscaling.clone();
            config.insert(format!("{prefix}_LISTEN"), listen);
            config.insert(format!("{prefix}_DB_TYPE"), "grpc".into());
            config.insert(format!("{prefix}_DB_SERVER"), db_address);
            sync_settings(spec, sync, prefix, &mut config);
            (common.replicas, &common.pod)
        }
    };
    if component != Component::Relay {
        config.insert(env::METRICS_LISTEN.into(), metrics_listen);
    }
    config.insert(env::LOG_LEVEL.into(), log_level);
    // Every part calls or serves gRPC: all carry the token, and the certificates when set.
    secret_env.push(secret_env_var(
        env::GRPC_AUTH_TOKEN,
        &grpc_auth.secret_name,
        &grpc_auth.key,
    ));
    if grpc_tls_secret.is_some() {
        config.insert(env::GRPC_TLS_CERT.into(), format!("{GRPC_TLS_DIR}/tls.crt"));
        config.insert(env::GRPC_TLS_KEY.into(), format!("{GRPC_TLS_DIR}/tls.key"));
        config.insert(env::GRPC_TLS_CA.into(), format!("{GRPC_TLS_DIR}/ca.crt"));
    }

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
        grace_period_seconds,
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
            // The relay's own URL, which the peer sync never pulls from.
            opt("RELAY_URL", spec.relay.url.clone());
        }
        Component::SyncCluster => {
            let s = &spec.sync.cluster;
            opt("ADMINS", join(&s.admins));
            opt("RELAY_URL", spec.relay.url.clone());
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
        assert!(db.headless, "every gRPC Service is headless, SQLite's too");
        assert!(!plan.component(Component::Relay).unwrap().headless);
        assert_eq!(
            plan.grpc_auth,
            GrpcAuthPlan {
                secret_name: "test-grpc-auth".into(),
                key: "token".into(),
                generated: true,
            }
        );
        assert_eq!(plan.grpc_tls_secret, None);
        assert_eq!(
            plan.network_policy,
            Some(NetworkPolicyPlan { metrics_from: None })
        );
        // Every component carries the token from the Secret, nothing else from Secrets.
        for c in &plan.components {
            assert_eq!(
                serde_json::to_value(&c.secret_env).unwrap(),
                serde_json::json!([{"name": "ORLY_GRPC_AUTH_TOKEN", "valueFrom": {"secretKeyRef":
                    {"name": "test-grpc-auth", "key": "token", "optional": false}}}]),
                "{}",
                c.component
            );
        }
    }

    #[test]
    fn sqlite_scales_relay_and_acl_but_not_db() {
        let plan = plan_of(
            "acl: {replicas: 3}\nrelay: {replicas: 4, autoscaling: {minReplicas: 2, maxReplicas: 8}}",
        )
        .unwrap();
        let acl = plan.component(Component::Acl).unwrap();
        assert_eq!((acl.replicas, acl.max_unavailable()), (3, 1));
        let relay = plan.component(Component::Relay).unwrap();
        assert_eq!(relay.autoscaling.as_ref().map(|a| a.max_replicas), Some(8));
        assert_eq!(relay.max_unavailable(), 1);
        let db = plan.component(Component::Db).unwrap();
        assert_eq!((db.replicas, db.max_unavailable()), (1, 0));
    }

    #[test]
    fn user_secrets_tls_and_relay_url_reach_every_component_that_reads_them() {
        let plan = plan_of(
            r#"
relay: {url: "wss://relay.example.com"}
grpcAuth: {secretName: mine, key: k}
grpcTls: {secretName: certs}
networkPolicy: {enabled: false}
sync: {distributed: {enabled: true}, cluster: {enabled: true}, negentropy: {enabled: true}}
"#,
        )
        .unwrap();
        assert!(!plan.grpc_auth.generated);
        assert_eq!(plan.network_policy, None);
        assert_eq!(plan.grpc_tls_secret.as_deref(), Some("certs"));
        for c in &plan.components {
            assert_eq!(
                c.config["ORLY_GRPC_TLS_CERT"], "/etc/orly/grpc-tls/tls.crt",
                "{}",
                c.component
            );
            assert_eq!(c.config["ORLY_GRPC_TLS_KEY"], "/etc/orly/grpc-tls/tls.key");
            assert_eq!(c.config["ORLY_GRPC_TLS_CA"], "/etc/orly/grpc-tls/ca.crt");
            let token = &c.secret_env.last().unwrap().value_from.as_ref().unwrap();
            let selector = token.secret_key_ref.as_ref().unwrap();
            assert_eq!(
                (selector.name.as_str(), selector.key.as_str()),
                ("mine", "k")
            );
        }
        let url = |c: Component, var: &str| plan.component(c).unwrap().config.get(var).cloned();
        let wss = Some("wss://relay.example.com".to_string());
        assert_eq!(url(Component::Relay, "ORLY_RELAY_URL"), wss);
        assert_eq!(
            url(
                Component::SyncDistributed,
                "ORLY_SYNC_DISTRIBUTED_RELAY_URL"
            ),
            wss
        );
        assert_eq!(
            url(Component::SyncCluster, "ORLY_SYNC_CLUSTER_RELAY_URL"),
            wss
        );
        assert_eq!(
            plan.component(Component::Relay)
                .unwrap()
                .grace_period_seconds,
            Some(30)
        );
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
            (
                "acl: {autoscaling: {minReplicas: 4, maxReplicas: 2}}",
                "acl: autoscaling.minReplicas must not exceed",
            ),
            (
                "relay: {terminationGracePeriodSeconds: 5}",
                "relay.terminationGracePeriodSeconds must exceed 5",
            ),
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
