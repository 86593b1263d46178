//! The build stage: pure functions that turn a validated `ComponentPlan` into whole Kubernetes
//! objects (ConfigMap, Service, Deployment or StatefulSet, PodDisruptionBudget, HPA,
//! NetworkPolicy) and the relay's gRPC token Secret. Nothing here talks to the API server, so
//! every object is unit-tested as a whole.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, ExecAction, GRPCAction, HTTPGetAction, Lifecycle, LifecycleHandler,
    LocalObjectReference, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

use crate::component::{Component, METRICS_PORT};
use crate::crd::DRAIN_MARGIN_SECONDS;
use crate::plan::{ComponentPlan, RelayPlan, GRPC_TLS_DIR};

/// The one field manager for every server-side apply the operator does.
pub const FIELD_MANAGER: &str = "orly-operator";
/// Pod template annotation carrying the ConfigMap's content hash, so a config change rolls pods.
pub const CONFIG_HASH_ANNOTATION: &str = "orly.dev/config-hash";
/// Non-root user the images run as.
const RUN_AS: i64 = 65532;

/// The workload of a component: a Deployment, or a StatefulSet when it owns a volume.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    Deployment(Box<Deployment>),
    StatefulSet(Box<StatefulSet>),
}

/// Every child object of one component.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentChildren {
    pub config_map: ConfigMap,
    pub service: Service,
    pub workload: Workload,
    /// Present when the component can run more than one replica.
    pub pdb: Option<PodDisruptionBudget>,
    /// Present when autoscaling is set.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// Present when NetworkPolicies are enabled.
    pub network_policy: Option<NetworkPolicy>,
}

/// Build all children of `component`. `replicas` is the Deployment's `spec.replicas`: the
/// plan's count, or while autoscaling what the replica handoff decided (`None`: the HPA owns
/// it); a StatefulSet always gets the plan's.
pub fn build_children(
    plan: &RelayPlan,
    component: &ComponentPlan,
    replicas: Option<i32>,
) -> ComponentChildren {
    let config_map = build_config_map(plan, component);
    let hash = config_hash(&config_map);
    let workload = if component.storage.is_some() {
        Workload::StatefulSet(Box::new(build_stateful_set(plan, component, &hash)))
    } else {
        Workload::Deployment(Box::new(build_deployment(plan, component, &hash, replicas)))
    };
    ComponentChildren {
        config_map,
        service: build_service(plan, component),
        workload,
        pdb: build_pdb(plan, component),
        hpa: build_hpa(plan, component),
        network_policy: build_network_policy(plan, component),
    }
}

/// Labels of the objects that belong to the whole OrlyRelay rather than one component.
pub fn relay_labels(relay: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "orly"),
        ("app.kubernetes.io/instance", relay),
        ("app.kubernetes.io/part-of", "orly"),
        ("app.kubernetes.io/managed-by", "orly-operator"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The Secret with the shared gRPC token, created once (never applied again, so the token
/// never changes under running pods) and owned by the OrlyRelay.
pub fn build_grpc_auth_secret(plan: &RelayPlan, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(plan.grpc_auth.secret_name.clone()),
            namespace: Some(plan.namespace.clone()),
            labels: Some(relay_labels(&plan.name)),
            owner_references: Some(vec![plan.owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            plan.grpc_auth.key.clone(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// Which components call `callee`'s gRPC port: everything calls db; acl and the sync services
/// are called by the relay only; nobody calls the relay's gRPC (it has none).
pub fn callers(plan: &RelayPlan, callee: Component) -> Vec<Component> {
    match callee {
        Component::Db => plan
            .components
            .iter()
            .map(|c| c.component)
            .filter(|c| *c != Component::Db)
            .collect(),
        Component::Relay => Vec::new(),
        _ => vec![Component::Relay],
    }
}

fn tcp_port(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// The component's NetworkPolicy: its gRPC port open to its callers of the same OrlyRelay
/// only, the metrics port to `metricsFrom`, the relay's port to everyone. Egress is left open
/// (peer relays on the internet, PostgreSQL).
pub fn build_network_policy(plan: &RelayPlan, component: &ComponentPlan) -> Option<NetworkPolicy> {
    let policy = plan.network_policy.as_ref()?;
    let mut ingress = Vec::new();
    if component.component == Component::Relay {
        ingress.push(NetworkPolicyIngressRule {
            from: None,
            ports: Some(vec![tcp_port(component.port)]),
        });
    } else {
        let callers: Vec<String> = callers(plan, component.component)
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        let mut same_relay = selector_labels(&plan.name, component.component);
        same_relay.remove("app.kubernetes.io/component");
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(same_relay),
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "app.kubernetes.io/component".into(),
                        operator: "In".into(),
                        values: Some(callers),
                    }]),
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![tcp_port(component.port)]),
        });
        let metrics_from = match &policy.metrics_from {
            None => Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector::default()),
                ..NetworkPolicyPeer::default()
            }]),
            Some(peers) if peers.is_empty() => None,
            Some(peers) => Some(peers.clone()),
        };
        if let Some(from) = metrics_from {
            ingress.push(NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(vec![tcp_port(METRICS_PORT)]),
            });
        }
    }
    Some(NetworkPolicy {
        metadata: child_meta(plan, component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&plan.name, component.component)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// Labels that select one component's pods; stable across versions because selectors are
/// immutable.
pub fn selector_labels(relay: &str, component: Component) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "orly"),
        ("app.kubernetes.io/instance", relay),
        ("app.kubernetes.io/component", component.name()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The Kubernetes recommended label set for a child.
pub fn labels(relay: &str, component: &ComponentPlan) -> BTreeMap<String, String> {
    let mut labels = selector_labels(relay, component.component);
    labels.insert("app.kubernetes.io/part-of".into(), "orly".into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "orly-operator".into(),
    );
    labels.insert(
        "app.kubernetes.io/version".into(),
        component.version.clone(),
    );
    labels
}

/// Name, namespace, labels and controller owner reference of a child.
pub fn child_meta(plan: &RelayPlan, component: &ComponentPlan) -> ObjectMeta {
    ObjectMeta {
        name: Some(component.child_name(&plan.name)),
        namespace: Some(plan.namespace.clone()),
        labels: Some(labels(&plan.name, component)),
        owner_references: Some(vec![plan.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The component's non-secret env, consumed through `envFrom`.
pub fn build_config_map(plan: &RelayPlan, component: &ComponentPlan) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(plan, component),
        data: Some(component.config.clone()),
        ..ConfigMap::default()
    }
}

/// SHA-256 of the ConfigMap data (a BTreeMap, so the order is stable).
pub fn config_hash(config_map: &ConfigMap) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in config_map.data.iter().flatten() {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

/// The Service: headless for scaled gRPC services so clients balance across pods themselves.
pub fn build_service(plan: &RelayPlan, component: &ComponentPlan) -> Service {
    let mut ports = vec![ServicePort {
        name: Some(main_port_name(component.component).into()),
        port: component.port,
        target_port: Some(IntOrString::String(
            main_port_name(component.component).into(),
        )),
        app_protocol: (component.component != Component::Relay)
            .then(|| "kubernetes.io/h2c".to_string()),
        ..ServicePort::default()
    }];
    if component.component != Component::Relay {
        ports.push(ServicePort {
            name: Some("metrics".into()),
            port: METRICS_PORT,
            target_port: Some(IntOrString::String("metrics".into())),
            ..ServicePort::default()
        });
    }
    Service {
        metadata: child_meta(plan, component),
        spec: Some(ServiceSpec {
            type_: Some(component.service_type.as_str().into()),
            cluster_ip: component.headless.then(|| "None".to_string()),
            selector: Some(selector_labels(&plan.name, component.component)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn main_port_name(component: Component) -> &'static str {
    if component == Component::Relay {
        "http"
    } else {
        "grpc"
    }
}

/// Readiness and liveness probes: the named gRPC health service, or the relay's HTTP
/// endpoints. With mTLS the kubelet cannot speak gRPC to the services, so they are probed on
/// their metrics server's `/readyz` and `/healthz` instead.
fn probes(plan: &RelayPlan, component: &ComponentPlan) -> (Probe, Probe) {
    let tls = plan.grpc_tls_secret.is_some();
    let http_probes = |port: &str, ready: &str, live: &str| {
        let http = |path: &str| HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(port.into()),
            ..HTTPGetAction::default()
        };
        (
            Probe {
                http_get: Some(http(ready)),
                period_seconds: Some(5),
                failure_threshold: Some(3),
                ..Probe::default()
            },
            Probe {
                http_get: Some(http(live)),
                initial_delay_seconds: Some(15),
                period_seconds: Some(10),
                failure_threshold: Some(6),
                ..Probe::default()
            },
        )
    };
    match component.component.grpc_health_service() {
        Some(_) if tls => http_probes(
            "metrics",
            orly_consts::METRICS_READYZ_PATH,
            orly_consts::METRICS_HEALTHZ_PATH,
        ),
        Some(service) => {
            let grpc = || GRPCAction {
                port: component.port,
                service: Some(service.to_string()),
            };
            (
                Probe {
                    grpc: Some(grpc()),
                    period_seconds: Some(5),
                    failure_threshold: Some(3),
                    ..Probe::default()
                },
                Probe {
                    grpc: Some(grpc()),
                    initial_delay_seconds: Some(15),
                    period_seconds: Some(10),
                    failure_threshold: Some(6),
                    ..Probe::default()
                },
            )
        }
        None => http_probes("http", "/readyz", "/healthz"),
    }
}

/// The relay's preStop hook: `orly drain` stops accepting, closes every WebSocket with 1001
/// and waits until they are gone, leaving a few seconds of the grace period for the exit.
fn drain_hook(component: &ComponentPlan) -> Option<Lifecycle> {
    let grace = component.grace_period_seconds?;
    Some(Lifecycle {
        pre_stop: Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec![
                    Component::Relay.binary().into(),
                    orly_consts::RELAY_DRAIN_SUBCOMMAND.into(),
                    "--port".into(),
                    component.port.to_string(),
                    "--timeout".into(),
                    format!("{}s", grace - DRAIN_MARGIN_SECONDS),
                ]),
            }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    })
}

/// Container env: Secret-backed vars, then the user's extra env, which wins on a name clash
/// (duplicates are dropped because server-side apply refuses duplicate list-map keys).
fn container_env(component: &ComponentPlan) -> Option<Vec<EnvVar>> {
    let mut env: Vec<EnvVar> = component
        .secret_env
        .iter()
        .filter(|e| !component.pod.env.iter().any(|u| u.name == e.name))
        .cloned()
        .collect();
    env.extend(component.pod.env.iter().cloned());
    (!env.is_empty()).then_some(env)
}

/// The pod template shared by Deployments and StatefulSets.
pub fn build_pod_template(
    plan: &RelayPlan,
    component: &ComponentPlan,
    config_hash: &str,
) -> PodTemplateSpec {
    let (readiness, liveness) = probes(plan, component);
    let mut ports = vec![ContainerPort {
        name: Some(main_port_name(component.component).into()),
        container_port: component.port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }];
    if component.component != Component::Relay {
        ports.push(ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
    }
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    if component.storage.is_some() {
        mounts.push(VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        });
    }
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if let Some(secret) = &plan.grpc_tls_secret {
        mounts.push(VolumeMount {
            name: "grpc-tls".into(),
            mount_path: GRPC_TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "grpc-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let container = Container {
        name: component.component.binary().into(),
        image: Some(component.image.clone()),
        image_pull_policy: component.pull_policy.clone(),
        ports: Some(ports),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: component.child_name(&plan.name),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        env: container_env(component),
        resources: component.pod.resources.clone(),
        readiness_probe: Some(readiness),
        liveness_probe: Some(liveness),
        lifecycle: drain_hook(component),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let mut labels = labels(&plan.name, component);
    // The version label would roll pods on every tag change anyway; keeping it off the pod
    // template keeps the template identical to what selectors and hashes describe.
    labels.remove("app.kubernetes.io/version");
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.to_string(),
                config_hash.to_string(),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            image_pull_secrets: (!component.pull_secrets.is_empty()).then(|| {
                component
                    .pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            node_selector: (!component.pod.node_selector.is_empty())
                .then(|| component.pod.node_selector.clone()),
            tolerations: (!component.pod.tolerations.is_empty())
                .then(|| component.pod.tolerations.clone()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            termination_grace_period_seconds: component.grace_period_seconds,
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}

/// A Deployment; `spec.replicas` is `replicas`, left out once an HPA owns the count.
pub fn build_deployment(
    plan: &RelayPlan,
    component: &ComponentPlan,
    config_hash: &str,
    replicas: Option<i32>,
) -> Deployment {
    Deployment {
        metadata: child_meta(plan, component),
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector_labels(&plan.name, component.component)),
                ..LabelSelector::default()
            },
            template: build_pod_template(plan, component, config_hash),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// A StatefulSet with a `data` PVC for db on SQLite.
pub fn build_stateful_set(
    plan: &RelayPlan,
    component: &ComponentPlan,
    config_hash: &str,
) -> StatefulSet {
    let storage = component.storage.clone().unwrap_or_default();
    StatefulSet {
        metadata: child_meta(plan, component),
        spec: Some(StatefulSetSpec {
            replicas: Some(component.replicas),
            service_name: Some(component.child_name(&plan.name)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&plan.name, component.component)),
                ..LabelSelector::default()
            },
            template: build_pod_template(plan, component, config_hash),
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    labels: Some(selector_labels(&plan.name, component.component)),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_string(),
                            Quantity(storage.storage_size.clone()),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// A PodDisruptionBudget allowing one pod down at a time, when more than one can run.
pub fn build_pdb(plan: &RelayPlan, component: &ComponentPlan) -> Option<PodDisruptionBudget> {
    (component.max_replicas() > 1).then(|| PodDisruptionBudget {
        metadata: child_meta(plan, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&plan.name, component.component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// An autoscaling/v2 HPA on CPU when autoscaling is set.
pub fn build_hpa(plan: &RelayPlan, component: &ComponentPlan) -> Option<HorizontalPodAutoscaler> {
    let autoscaling = component.autoscaling.as_ref()?;
    Some(HorizontalPodAutoscaler {
        metadata: child_meta(plan, component),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: component.child_name(&plan.name),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(autoscaling.target_cpu_utilization_percentage),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, OperatorDefaults};
    use crate::testdata::relay_from_yaml;
    use serde_json::{json, Value};

    fn plan_of(yaml: &str) -> RelayPlan {
        let defaults = OperatorDefaults {
            repository: "r".into(),
            tag: "t".into(),
        };
        plan(&relay_from_yaml(yaml), &defaults).expect("valid spec")
    }

    /// Children as applied once the replica handoff is done: an autoscaled Deployment
    /// leaves its count to the HPA.
    fn children(yaml: &str, component: Component) -> ComponentChildren {
        let plan = plan_of(yaml);
        let c = plan.component(component).expect("enabled");
        build_children(&plan, c, c.autoscaling.is_none().then_some(c.replicas))
    }

    /// The token env every container carries.
    fn token_env() -> Value {
        json!({"name": "ORLY_GRPC_AUTH_TOKEN",
               "valueFrom": {"secretKeyRef": {"name": "test-grpc-auth", "key": "token", "optional": false}}})
    }

    fn selector(component: &str) -> Value {
        json!({
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/instance": "test",
            "app.kubernetes.io/name": "orly",
        })
    }

    /// The metadata every child carries: name, namespace, recommended labels, owner.
    fn meta(component: &str) -> Value {
        json!({
            "name": format!("test-{component}"),
            "namespace": "ns",
            "labels": {
                "app.kubernetes.io/component": component,
                "app.kubernetes.io/instance": "test",
                "app.kubernetes.io/managed-by": "orly-operator",
                "app.kubernetes.io/name": "orly",
                "app.kubernetes.io/part-of": "orly",
                "app.kubernetes.io/version": "t",
            },
            "ownerReferences": [{
                "apiVersion": "orly.dev/v1alpha1", "kind": "OrlyRelay", "name": "test",
                "uid": "uid-1", "controller": true, "blockOwnerDeletion": true,
            }],
        })
    }

    fn to_json<T: serde::Serialize>(value: &T) -> Value {
        serde_json::to_value(value).unwrap()
    }

    const SECURITY: fn() -> (Value, Value) = || {
        (
            json!({"fsGroup": 65532, "runAsGroup": 65532, "runAsNonRoot": true, "runAsUser": 65532,
                   "seccompProfile": {"type": "RuntimeDefault"}}),
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                   "readOnlyRootFilesystem": true}),
        )
    };

    #[test]
    fn sqlite_db_is_a_stateful_set_with_a_volume_claim() {
        let c = children(
            "database: {sqlite: {storageSize: 5Gi, storageClassName: fast}}",
            Component::Db,
        );
        let (pod_security, container_security) = SECURITY();
        let hash = config_hash(&c.config_map);
        let mut pod_labels = meta("db")["labels"].clone();
        pod_labels
            .as_object_mut()
            .unwrap()
            .remove("app.kubernetes.io/version");
        let expected = json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta("db"),
            "spec": {
                "replicas": 1,
                "serviceName": "test-db",
                "selector": {"matchLabels": selector("db")},
                "template": {
                    "metadata": {
                        "annotations": {"orly.dev/config-hash": hash},
                        "labels": pod_labels,
                    },
                    "spec": {
                        "containers": [{
                            "name": "orly-db",
                            "image": "r/orly-db:t",
                            "env": [token_env()],
                            "envFrom": [{"configMapRef": {"name": "test-db", "optional": false}}],
                            "ports": [
                                {"containerPort": 50051, "name": "grpc", "protocol": "TCP"},
                                {"containerPort": 9100, "name": "metrics", "protocol": "TCP"},
                            ],
                            "readinessProbe": {"grpc": {"port": 50051, "service": "orlydb.v1.DatabaseService"},
                                               "periodSeconds": 5, "failureThreshold": 3},
                            "livenessProbe": {"grpc": {"port": 50051, "service": "orlydb.v1.DatabaseService"},
                                              "initialDelaySeconds": 15, "periodSeconds": 10, "failureThreshold": 6},
                            "securityContext": container_security,
                            "volumeMounts": [
                                {"mountPath": "/tmp", "name": "tmp"},
                                {"mountPath": "/data", "name": "data"},
                            ],
                        }],
                        "securityContext": pod_security,
                        "volumes": [{"emptyDir": {}, "name": "tmp"}],
                    },
                },
                "volumeClaimTemplates": [{
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "data", "labels": selector("db")},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "fast",
                        "resources": {"requests": {"storage": "5Gi"}},
                    },
                }],
            },
        });
        let Workload::StatefulSet(sts) = &c.workload else {
            panic!("sqlite db must be a StatefulSet")
        };
        assert_eq!(to_json(sts), expected);
        assert_eq!(
            to_json(&c.config_map),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("db"),
                "data": {
                    "ORLY_DATA_DIR": "/data",
                    "ORLY_DB_LISTEN": "0.0.0.0:50051",
                    "ORLY_DB_TYPE": "sqlite",
                    "ORLY_LOG_LEVEL": "info",
                    "ORLY_METRICS_LISTEN": "0.0.0.0:9100",
                },
            })
        );
        assert_eq!(
            to_json(&c.service),
            json!({
                "apiVersion": "v1", "kind": "Service", "metadata": meta("db"),
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": "None",
                    "selector": selector("db"),
                    "ports": [
                        {"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
                        {"name": "metrics", "port": 9100, "targetPort": "metrics"},
                    ],
                },
            })
        );
        assert!(c.pdb.is_none() && c.hpa.is_none());
    }

    #[test]
    fn postgres_db_is_a_scaled_deployment_reading_the_url_from_the_secret() {
        let c = children(
            "database: {type: postgres, replicas: 3, postgres: {urlSecret: {name: pg, key: dsn}}}",
            Component::Db,
        );
        let Workload::Deployment(d) = &c.workload else {
            panic!("postgres db must be a Deployment")
        };
        let d = to_json(d);
        assert_eq!(d["spec"]["replicas"], 3);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["env"],
            json!([{"name": "ORLY_DB_URL",
                    "valueFrom": {"secretKeyRef": {"name": "pg", "key": "dsn", "optional": false}}},
                   token_env()])
        );
        assert_eq!(to_json(&c.service)["spec"]["clusterIP"], "None");
        assert_eq!(
            to_json(&c.pdb),
            json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta("db"),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector("db")}},
            })
        );
        assert!(
            !c.config_map
                .data
                .as_ref()
                .unwrap()
                .contains_key("ORLY_DB_URL"),
            "no secret in a ConfigMap"
        );
    }

    #[test]
    fn autoscaled_sync_service_leaves_replicas_to_its_hpa() {
        let c = children(
            "sync: {negentropy: {enabled: true, peers: [wss://a, wss://b], idSize: 32, autoscaling: {minReplicas: 2, maxReplicas: 5, targetCPUUtilizationPercentage: 60}}}",
            Component::SyncNegentropy,
        );
        let Workload::Deployment(d) = &c.workload else {
            panic!("sync services are Deployments")
        };
        assert!(d.spec.as_ref().unwrap().replicas.is_none());
        assert_eq!(
            to_json(&c.hpa),
            json!({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": meta("sync-negentropy"),
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "test-sync-negentropy"},
                    "minReplicas": 2,
                    "maxReplicas": 5,
                    "metrics": [{"type": "Resource",
                                 "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}],
                },
            })
        );
        assert_eq!(
            to_json(&c.service),
            json!({
                "apiVersion": "v1", "kind": "Service", "metadata": meta("sync-negentropy"),
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": "None",
                    "selector": selector("sync-negentropy"),
                    "ports": [
                        {"name": "grpc", "port": 50064, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
                        {"name": "metrics", "port": 9100, "targetPort": "metrics"},
                    ],
                },
            })
        );
        assert_eq!(
            to_json(&c.config_map)["data"],
            json!({
                "ORLY_LOG_LEVEL": "info",
                "ORLY_METRICS_LISTEN": "0.0.0.0:9100",
                "ORLY_SYNC_NEGENTROPY_DB_SERVER": "test-db:50051",
                "ORLY_SYNC_NEGENTROPY_DB_TYPE": "grpc",
                "ORLY_SYNC_NEGENTROPY_ID_SIZE": "32",
                "ORLY_SYNC_NEGENTROPY_LISTEN": "0.0.0.0:50064",
                "ORLY_SYNC_NEGENTROPY_PEERS": "wss://a,wss://b",
            })
        );
        assert!(c.pdb.is_some(), "up to 5 replicas need a PDB");
    }

    #[test]
    fn relay_deployment_probes_http_and_carries_pod_overrides() {
        let c = children(
            r#"
images: {pullPolicy: Always, pullSecrets: [regcred]}
relay:
  port: 7777
  serviceType: LoadBalancer
  nodeSelector: {disk: ssd}
  tolerations: [{key: dedicated, operator: Equal, value: orly, effect: NoSchedule}]
  resources: {requests: {cpu: 500m}}
  env: [{name: RUST_LOG, value: debug}]
"#,
            Component::Relay,
        );
        let (pod_security, container_security) = SECURITY();
        let hash = config_hash(&c.config_map);
        let mut pod_labels = meta("relay")["labels"].clone();
        pod_labels
            .as_object_mut()
            .unwrap()
            .remove("app.kubernetes.io/version");
        let Workload::Deployment(d) = &c.workload else {
            panic!("relay is a Deployment")
        };
        assert_eq!(
            to_json(d),
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta("relay"),
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": selector("relay")},
                    "template": {
                        "metadata": {"annotations": {"orly.dev/config-hash": hash}, "labels": pod_labels},
                        "spec": {
                            "containers": [{
                                "name": "orly",
                                "image": "r/orly:t",
                                "imagePullPolicy": "Always",
                                "env": [token_env(), {"name": "RUST_LOG", "value": "debug"}],
                                "envFrom": [{"configMapRef": {"name": "test-relay", "optional": false}}],
                                "ports": [{"containerPort": 7777, "name": "http", "protocol": "TCP"}],
                                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"},
                                                   "periodSeconds": 5, "failureThreshold": 3},
                                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                                                  "initialDelaySeconds": 15, "periodSeconds": 10, "failureThreshold": 6},
                                "resources": {"requests": {"cpu": "500m"}},
                                "lifecycle": {"preStop": {"exec": {"command":
                                    ["orly", "drain", "--port", "7777", "--timeout", "25s"]}}},
                                "securityContext": container_security,
                                "volumeMounts": [{"mountPath": "/tmp", "name": "tmp"}],
                            }],
                            "terminationGracePeriodSeconds": 30,
                            "imagePullSecrets": [{"name": "regcred"}],
                            "nodeSelector": {"disk": "ssd"},
                            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "orly", "effect": "NoSchedule"}],
                            "securityContext": pod_security,
                            "volumes": [{"emptyDir": {}, "name": "tmp"}],
                        },
                    },
                },
            })
        );
        assert_eq!(
            to_json(&c.service),
            json!({
                "apiVersion": "v1", "kind": "Service", "metadata": meta("relay"),
                "spec": {
                    "type": "LoadBalancer",
                    "selector": selector("relay"),
                    "ports": [{"name": "http", "port": 7777, "targetPort": "http"}],
                },
            })
        );
    }

    #[test]
    fn user_env_replaces_an_operator_secret_env_of_the_same_name() {
        let c = children(
            "database: {type: postgres, postgres: {urlSecret: {name: pg}}, env: [{name: ORLY_DB_URL, value: 'postgres://x'}]}",
            Component::Db,
        );
        let Workload::Deployment(d) = &c.workload else {
            panic!()
        };
        let env = to_json(d)["spec"]["template"]["spec"]["containers"][0]["env"].clone();
        assert_eq!(
            env,
            json!([token_env(), {"name": "ORLY_DB_URL", "value": "postgres://x"}])
        );
    }

    #[test]
    fn network_policies_open_each_grpc_port_to_its_callers_only() {
        let yaml = "sync: {cluster: {enabled: true}, negentropy: {enabled: true}}";
        let same_relay = |callers: &[&str]| {
            json!({
                "matchLabels": {"app.kubernetes.io/instance": "test", "app.kubernetes.io/name": "orly"},
                "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                      "values": callers}],
            })
        };
        let policy = |component: &str, ingress: Value| {
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": meta(component),
                "spec": {
                    "podSelector": {"matchLabels": selector(component)},
                    "policyTypes": ["Ingress"],
                    "ingress": ingress,
                },
            })
        };
        let namespace_scrapes = json!({"from": [{"podSelector": {}}],
                                       "ports": [{"port": 9100, "protocol": "TCP"}]});
        assert_eq!(
            to_json(&children(yaml, Component::Db).network_policy),
            policy(
                "db",
                json!([
                    {"from": [{"podSelector": same_relay(&["acl", "sync-cluster", "sync-negentropy", "relay"])}],
                     "ports": [{"port": 50051, "protocol": "TCP"}]},
                    namespace_scrapes,
                ])
            )
        );
        for (component, port) in [("acl", 50052), ("sync-negentropy", 50064)] {
            let c = Component::from_name(component).unwrap();
            assert_eq!(
                to_json(&children(yaml, c).network_policy),
                policy(
                    component,
                    json!([
                        {"from": [{"podSelector": same_relay(&["relay"])}],
                         "ports": [{"port": port, "protocol": "TCP"}]},
                        namespace_scrapes,
                    ])
                )
            );
        }
        assert_eq!(
            to_json(&children(yaml, Component::Relay).network_policy),
            policy(
                "relay",
                json!([{"ports": [{"port": 3334, "protocol": "TCP"}]}])
            )
        );
    }

    #[test]
    fn metrics_sources_follow_the_spec_and_policies_can_be_turned_off() {
        let monitoring = "networkPolicy: {metricsFrom: [{namespaceSelector: {matchLabels: {team: monitoring}}}]}";
        let c = children(monitoring, Component::Acl);
        assert_eq!(
            to_json(&c.network_policy)["spec"]["ingress"][1],
            json!({"from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
                   "ports": [{"port": 9100, "protocol": "TCP"}]})
        );
        let closed = children("networkPolicy: {metricsFrom: []}", Component::Acl);
        let ingress = to_json(&closed.network_policy)["spec"]["ingress"].clone();
        assert_eq!(
            ingress.as_array().unwrap().len(),
            1,
            "no metrics rule: {ingress}"
        );
        assert!(children("networkPolicy: {enabled: false}", Component::Db)
            .network_policy
            .is_none());
    }

    #[test]
    fn the_token_secret_is_owned_by_the_relay_and_holds_the_token() {
        let plan = plan_of("{}");
        let secret = build_grpc_auth_secret(&plan, "00ff");
        assert_eq!(
            to_json(&secret),
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {
                    "name": "test-grpc-auth",
                    "namespace": "ns",
                    "labels": {
                        "app.kubernetes.io/instance": "test",
                        "app.kubernetes.io/managed-by": "orly-operator",
                        "app.kubernetes.io/name": "orly",
                        "app.kubernetes.io/part-of": "orly",
                    },
                    "ownerReferences": meta("db")["ownerReferences"],
                },
                "type": "Opaque",
                // base64 of "00ff"
                "data": {"token": "MDBmZg=="},
            })
        );
    }

    #[test]
    fn with_mtls_every_component_mounts_the_certificates_and_grpc_probes_turn_http() {
        let yaml = "grpcTls: {secretName: certs}\nsync: {negentropy: {enabled: true}}";
        for component in [Component::Db, Component::SyncNegentropy, Component::Relay] {
            let c = children(yaml, component);
            let template = match &c.workload {
                Workload::Deployment(d) => to_json(d)["spec"]["template"].clone(),
                Workload::StatefulSet(s) => to_json(s)["spec"]["template"].clone(),
            };
            let spec = &template["spec"];
            assert_eq!(
                spec["volumes"].as_array().unwrap().last().unwrap(),
                &json!({"name": "grpc-tls", "secret": {"secretName": "certs"}}),
                "{component}"
            );
            let container = &spec["containers"][0];
            assert_eq!(
                container["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .last()
                    .unwrap(),
                &json!({"name": "grpc-tls", "mountPath": "/etc/orly/grpc-tls", "readOnly": true})
            );
            let data = to_json(&c.config_map)["data"].clone();
            assert_eq!(data["ORLY_GRPC_TLS_CERT"], "/etc/orly/grpc-tls/tls.crt");
            if component == Component::Relay {
                assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
            } else {
                assert_eq!(
                    (
                        container["readinessProbe"].clone(),
                        container["livenessProbe"].clone()
                    ),
                    (
                        json!({"httpGet": {"path": "/readyz", "port": "metrics"},
                               "periodSeconds": 5, "failureThreshold": 3}),
                        json!({"httpGet": {"path": "/healthz", "port": "metrics"},
                               "initialDelaySeconds": 15, "periodSeconds": 10, "failureThreshold": 6}),
                    ),
                    "{component}"
                );
            }
        }
    }

    #[test]
    fn config_hash_follows_the_config_only() {
        let a = children("acl: {mode: follows}", Component::Acl);
        let b = children("acl: {mode: follows}", Component::Acl);
        let c = children("acl: {mode: managed}", Component::Acl);
        assert_eq!(config_hash(&a.config_map), config_hash(&b.config_map));
        assert_ne!(config_hash(&a.config_map), config_hash(&c.config_map));
        assert_eq!(config_hash(&a.config_map).len(), 64);
    }
}
