//! The children that exist, read from the controller's watch caches (one reflector per child
//! kind, filled by the same watches that trigger reconciles), and the decisions taken from
//! them: which children are orphans, which Service must be recreated, and how many replicas an
//! autoscaled Deployment is applied with while its HPA takes the count over.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ObjectMeta};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, store::Writer, Store};

use crate::builders::{build_children, ComponentChildren, Workload, FIELD_MANAGER};
use crate::plan::{ComponentPlan, RelayPlan};
use crate::status::{ComponentState, WorkloadObservation};

/// Label every child carries, and the one the child watches select on.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label naming the OrlyRelay a child belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

/// The kinds of children, in the order orphans are deleted: dependents before what they
/// point at, the ConfigMap last so a half-done deletion is still found next time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChildKind {
    HorizontalPodAutoscaler,
    PodDisruptionBudget,
    NetworkPolicy,
    Deployment,
    StatefulSet,
    Service,
    ConfigMap,
    /// The generated gRPC token; never deleted by the operator (the owner reference removes it
    /// with the OrlyRelay), so switching to a Secret of one's own and back keeps the token.
    Secret,
}

/// One child: its kind and name (the namespace is the OrlyRelay's).
pub type ChildRef = (ChildKind, String);

/// Readers of the child caches. Kinds whose content the reconcile does not read are cached as
/// metadata only; Deployments keep their managedFields (who owns `spec.replicas`).
#[derive(Clone)]
pub struct ChildStores {
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub services: Store<Service>,
    pub deployments: Store<Deployment>,
    pub stateful_sets: Store<StatefulSet>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    pub hpas: Store<PartialObjectMeta<HorizontalPodAutoscaler>>,
    pub network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
    pub secrets: Store<PartialObjectMeta<Secret>>,
}

/// The writers behind [`ChildStores`], fed by the controller's watches (or by a test).
pub struct ChildWriters {
    pub config_maps: Writer<PartialObjectMeta<ConfigMap>>,
    pub services: Writer<Service>,
    pub deployments: Writer<Deployment>,
    pub stateful_sets: Writer<StatefulSet>,
    pub pdbs: Writer<PartialObjectMeta<PodDisruptionBudget>>,
    pub hpas: Writer<PartialObjectMeta<HorizontalPodAutoscaler>>,
    pub network_policies: Writer<PartialObjectMeta<NetworkPolicy>>,
    pub secrets: Writer<PartialObjectMeta<Secret>>,
}

/// Empty caches and their writers.
pub fn child_stores() -> (ChildStores, ChildWriters) {
    let (config_maps, w_config_maps) = reflector::store();
    let (services, w_services) = reflector::store();
    let (deployments, w_deployments) = reflector::store();
    let (stateful_sets, w_stateful_sets) = reflector::store();
    let (pdbs, w_pdbs) = reflector::store();
    let (hpas, w_hpas) = reflector::store();
    let (network_policies, w_network_policies) = reflector::store();
    let (secrets, w_secrets) = reflector::store();
    (
        ChildStores {
            config_maps,
            services,
            deployments,
            stateful_sets,
            pdbs,
            hpas,
            network_policies,
            secrets,
        },
        ChildWriters {
            config_maps: w_config_maps,
            services: w_services,
            deployments: w_deployments,
            stateful_sets: w_stateful_sets,
            pdbs: w_pdbs,
            hpas: w_hpas,
            network_policies: w_network_policies,
            secrets: w_secrets,
        },
    )
}

impl ChildStores {
    /// Resolves once every cache has had its first full list.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.config_maps.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.deployments.wait_until_ready().await?;
        self.stateful_sets.wait_until_ready().await?;
        self.pdbs.wait_until_ready().await?;
        self.hpas.wait_until_ready().await?;
        self.network_policies.wait_until_ready().await?;
        self.secrets.wait_until_ready().await
    }

    /// The cached children of one OrlyRelay.
    pub fn existing(&self, owner: &Owner<'_>) -> Existing {
        let mut existing = Existing::default();
        existing.add_names(ChildKind::ConfigMap, &self.config_maps, owner);
        existing.add_names(ChildKind::PodDisruptionBudget, &self.pdbs, owner);
        existing.add_names(ChildKind::HorizontalPodAutoscaler, &self.hpas, owner);
        existing.add_names(ChildKind::NetworkPolicy, &self.network_policies, owner);
        existing.add_names(ChildKind::Secret, &self.secrets, owner);
        existing.services = owned(&self.services, owner, |s| &s.metadata);
        existing.deployments = owned(&self.deployments, owner, |d| &d.metadata);
        existing.stateful_sets = owned(&self.stateful_sets, owner, |s| &s.metadata);
        let refs: Vec<ChildRef> = (existing.services.keys())
            .map(|n| (ChildKind::Service, n.clone()))
            .chain(
                existing
                    .deployments
                    .keys()
                    .map(|n| (ChildKind::Deployment, n.clone())),
            )
            .chain(
                existing
                    .stateful_sets
                    .keys()
                    .map(|n| (ChildKind::StatefulSet, n.clone())),
            )
            .collect();
        existing.refs.extend(refs);
        existing
    }
}

/// The cached objects of `owner`, by name.
fn owned<K>(
    store: &Store<K>,
    owner: &Owner<'_>,
    meta: impl Fn(&K) -> &ObjectMeta,
) -> HashMap<String, Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .into_iter()
        .filter(|o| owner.owns(meta(o)))
        .map(|o| (meta(&o).name.clone().unwrap_or_default(), o))
        .collect()
}

/// Which objects belong to one OrlyRelay: its namespace, the operator's labels with its name,
/// and an owner reference to it (so nothing of another owner is ever pruned).
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

impl Owner<'_> {
    /// The OrlyRelay of `plan`.
    pub fn of(plan: &RelayPlan) -> Owner<'_> {
        Owner {
            namespace: &plan.namespace,
            name: &plan.name,
            uid: &plan.owner.uid,
        }
    }

    /// Whether the object with `meta` is one of this OrlyRelay's children.
    pub fn owns(&self, meta: &ObjectMeta) -> bool {
        let labels = meta.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
        meta.namespace.as_deref() == Some(self.namespace)
            && label(MANAGED_BY_LABEL) == Some(FIELD_MANAGER)
            && label(INSTANCE_LABEL) == Some(self.name)
            && meta
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == self.uid)
    }
}

/// The cached children of one OrlyRelay.
#[derive(Debug, Default)]
pub struct Existing {
    /// Every child, by kind and name.
    pub refs: BTreeSet<ChildRef>,
    pub services: HashMap<String, Arc<Service>>,
    pub deployments: HashMap<String, Arc<Deployment>>,
    pub stateful_sets: HashMap<String, Arc<StatefulSet>>,
}

impl Existing {
    fn add_names<K>(
        &mut self,
        kind: ChildKind,
        store: &Store<PartialObjectMeta<K>>,
        owner: &Owner<'_>,
    ) where
        PartialObjectMeta<K>: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        for object in store.state() {
            if owner.owns(&object.metadata) {
                let name = object.metadata.name.clone().unwrap_or_default();
                self.refs.insert((kind, name));
            }
        }
    }

    /// Whether the child exists (as far as the cache knows).
    pub fn has(&self, kind: ChildKind, name: &str) -> bool {
        self.refs.contains(&(kind, name.to_string()))
    }

    /// The state of a component this reconcile does not apply (its tier is gated, or the
    /// OrlyRelay is paused).
    pub fn observe(&self, plan: &RelayPlan, component: &ComponentPlan) -> ComponentState {
        let name = component.child_name(&plan.name);
        let tolerance = component.max_unavailable();
        // Only the kind the plan wants counts; a leftover of the other kind is being replaced.
        let observed = if component.storage.is_some() {
            self.stateful_sets
                .get(&name)
                .map(|s| WorkloadObservation::from_stateful_set(s, tolerance))
        } else {
            self.deployments
                .get(&name)
                .map(|d| WorkloadObservation::from_deployment(d, tolerance))
        };
        match observed {
            Some(observation) => ComponentState::Observed(observation),
            None => ComponentState::NotCreated {
                desired: component.initial_replicas(),
            },
        }
    }
}

impl ComponentChildren {
    /// Kind and name of every object in this set.
    pub fn refs(&self) -> Vec<ChildRef> {
        let name = |meta: &ObjectMeta| meta.name.clone().unwrap_or_default();
        let mut refs = vec![
            (ChildKind::ConfigMap, name(&self.config_map.metadata)),
            (ChildKind::Service, name(&self.service.metadata)),
            match &self.workload {
                Workload::Deployment(d) => (ChildKind::Deployment, name(&d.metadata)),
                Workload::StatefulSet(s) => (ChildKind::StatefulSet, name(&s.metadata)),
            },
        ];
        if let Some(pdb) = &self.pdb {
            refs.push((ChildKind::PodDisruptionBudget, name(&pdb.metadata)));
        }
        if let Some(hpa) = &self.hpa {
            refs.push((ChildKind::HorizontalPodAutoscaler, name(&hpa.metadata)));
        }
        if let Some(policy) = &self.network_policy {
            refs.push((ChildKind::NetworkPolicy, name(&policy.metadata)));
        }
        refs
    }
}

/// Every child the plan wants, in every tier (a gated tier's children stay where they are).
pub fn wanted(plan: &RelayPlan) -> BTreeSet<ChildRef> {
    let mut wanted: BTreeSet<ChildRef> = plan
        .components
        .iter()
        .flat_map(|c| build_children(plan, c, Some(c.replicas)).refs())
        .collect();
    if plan.grpc_auth.generated {
        wanted.insert((ChildKind::Secret, plan.grpc_auth.secret_name.clone()));
    }
    wanted
}

/// The children that exist but are no longer wanted (a disabled sync service, a PDB, HPA or
/// NetworkPolicy that was turned off), in deletion order. Secrets are never pruned.
pub fn orphans(existing: &Existing, wanted: &BTreeSet<ChildRef>) -> Vec<ChildRef> {
    let mut orphans: Vec<ChildRef> = existing
        .refs
        .iter()
        .filter(|r| r.0 != ChildKind::Secret && !wanted.contains(*r))
        .cloned()
        .collect();
    orphans.sort();
    orphans
}

/// Whether `clusterIP` must change between headless and not, which the API server refuses
/// (the field is immutable), so the Service is deleted and created again.
pub fn service_must_be_recreated(live: &Service, wanted: &Service) -> bool {
    let headless =
        |s: &Service| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    headless(live) != headless(wanted)
}

/// Whether a manager other than the operator owns the Deployment's `spec.replicas` (the HPA
/// controller through the scale subresource, or `kubectl scale`).
pub fn replicas_owned_by_another_manager(deployment: &Deployment) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| entry.manager.as_deref() != Some(FIELD_MANAGER))
        .any(|entry| {
            entry
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|spec| spec.get("f:replicas"))
                .is_some()
        })
}

/// What the cache keeps of a Deployment: metadata (its managedFields cut down to who else
/// owns `spec.replicas`), the count, the selector and the status; not the pod template.
pub fn slim_deployment(d: &mut Deployment) {
    let others: Vec<_> = d
        .metadata
        .managed_fields
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.manager.as_deref() != Some(FIELD_MANAGER))
        .filter(|e| {
            e.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|s| s.get("f:replicas"))
                .is_some()
        })
        .map(|mut e| {
            e.fields_v1 = Some(FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}})));
            e
        })
        .collect();
    d.metadata.managed_fields = (!others.is_empty()).then_some(others);
    if let Some(spec) = d.spec.as_mut() {
        spec.template = Default::default();
    }
}

/// What the cache keeps of a StatefulSet: metadata, the count and the status.
pub fn slim_stateful_set(s: &mut StatefulSet) {
    s.metadata.managed_fields = None;
    if let Some(spec) = s.spec.as_mut() {
        spec.template = Default::default();
        spec.volume_claim_templates = None;
    }
}

/// What the cache keeps of a Service: metadata and whether it is headless.
pub fn slim_service(s: &mut Service) {
    s.metadata.managed_fields = None;
    if let Some(spec) = s.spec.as_mut() {
        *spec = ServiceSpec {
            cluster_ip: spec.cluster_ip.take(),
            ..ServiceSpec::default()
        };
    }
}

/// `spec.replicas` to apply. Without autoscaling: the plan's count. With it, the count is
/// handed over without a drop: a server-side apply that stops sending a field it alone owns
/// removes it, and the API server then defaults replicas to 1. So the operator keeps sending
/// the running count (within the HPA's bounds; a new Deployment starts at the minimum) until
/// the HPA exists and another manager owns the field, and only then leaves it out.
pub fn deployment_replicas(
    component: &ComponentPlan,
    live: Option<&Deployment>,
    hpa_exists: bool,
) -> Option<i32> {
    let Some(autoscaling) = &component.autoscaling else {
        return Some(component.replicas);
    };
    let clamp = |n: i32| n.clamp(autoscaling.min_replicas, autoscaling.max_replicas);
    match live {
        None => Some(component.initial_replicas()),
        Some(d) if hpa_exists && replicas_owned_by_another_manager(d) => None,
        Some(d) => Some(clamp(
            d.spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(autoscaling.min_replicas),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::Component;
    use crate::plan::{plan, OperatorDefaults};
    use crate::testdata::relay_from_yaml;
    use serde_json::json;

    fn plan_of(yaml: &str) -> RelayPlan {
        plan(&relay_from_yaml(yaml), &OperatorDefaults::default()).expect("valid")
    }

    fn deployment(replicas: i32, managers: &[(&str, serde_json::Value)]) -> Deployment {
        let managed: Vec<_> = managers
            .iter()
            .map(|(m, fields)| json!({"manager": m, "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": fields}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "test-sync-negentropy", "managedFields": managed},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
        }))
        .unwrap()
    }

    const AUTOSCALED: &str =
        "sync: {negentropy: {enabled: true, autoscaling: {minReplicas: 2, maxReplicas: 6}}}";

    #[test]
    fn replicas_stay_until_the_hpa_exists_and_owns_them() {
        let plan = plan_of(AUTOSCALED);
        let c = plan.component(Component::SyncNegentropy).unwrap();
        let ours = json!({"f:spec": {"f:replicas": {}, "f:template": {}}});
        let hpas = json!({"f:spec": {"f:replicas": {}}});
        let running = deployment(3, &[("orly-operator", ours.clone())]);
        // No Deployment yet: start at the lower bound.
        assert_eq!(deployment_replicas(c, None, false), Some(2));
        // Running with 3, only the operator owns replicas: keep 3, HPA or not.
        assert_eq!(deployment_replicas(c, Some(&running), false), Some(3));
        assert_eq!(deployment_replicas(c, Some(&running), true), Some(3));
        // The HPA controller scaled through the scale subresource: it owns the field now.
        let taken = deployment(
            4,
            &[("orly-operator", ours), ("kube-controller-manager", hpas)],
        );
        assert!(replicas_owned_by_another_manager(&taken));
        assert_eq!(deployment_replicas(c, Some(&taken), true), None);
        // ... but while the HPA does not exist (yet, or any more) the operator keeps the count.
        assert_eq!(deployment_replicas(c, Some(&taken), false), Some(4));
        // A count outside the new bounds moves into them at once, as the HPA would.
        let ten = deployment(
            10,
            &[("orly-operator", json!({"f:spec": {"f:replicas": {}}}))],
        );
        assert_eq!(deployment_replicas(c, Some(&ten), true), Some(6));
        // Fields of other managers that are not replicas do not count.
        let labels_only = deployment(3, &[("kubectl", json!({"f:metadata": {"f:labels": {}}}))]);
        assert!(!replicas_owned_by_another_manager(&labels_only));

        let fixed = plan_of("sync: {negentropy: {enabled: true, replicas: 5}}");
        let c = fixed.component(Component::SyncNegentropy).unwrap();
        assert_eq!(deployment_replicas(c, Some(&taken), true), Some(5));
    }

    #[test]
    fn the_cache_keeps_what_the_decisions_read_and_nothing_more() {
        let mut d = deployment(
            4,
            &[
                (
                    "orly-operator",
                    json!({"f:spec": {"f:replicas": {}, "f:template": {}}}),
                ),
                (
                    "kube-controller-manager",
                    json!({"f:spec": {"f:replicas": {}}}),
                ),
                ("kubectl-edit", json!({"f:metadata": {"f:labels": {}}})),
            ],
        );
        d.spec.as_mut().unwrap().template.metadata = Some(ObjectMeta {
            name: Some("big".into()),
            ..ObjectMeta::default()
        });
        slim_deployment(&mut d);
        assert!(replicas_owned_by_another_manager(&d));
        let managers: Vec<_> = d
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|m| m.manager.clone().unwrap())
            .collect();
        assert_eq!(managers, ["kube-controller-manager"]);
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(4));
        assert_eq!(d.spec.unwrap().template, Default::default());

        let mut only_ours = deployment(
            3,
            &[("orly-operator", json!({"f:spec": {"f:replicas": {}}}))],
        );
        slim_deployment(&mut only_ours);
        assert_eq!(only_ours.metadata.managed_fields, None);
        assert!(!replicas_owned_by_another_manager(&only_ours));

        let mut svc: Service = serde_json::from_value(json!({
            "spec": {"clusterIP": "None", "ports": [{"port": 1}], "selector": {"a": "b"}}
        }))
        .unwrap();
        slim_service(&mut svc);
        assert_eq!(
            serde_json::to_value(&svc).unwrap(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {}, "spec": {"clusterIP": "None"}})
        );
    }

    #[test]
    fn orphans_are_the_unwanted_children_in_deletion_order() {
        let plan = plan_of("sync: {cluster: {enabled: true}}");
        let wanted = wanted(&plan);
        assert!(wanted.contains(&(ChildKind::Secret, "test-grpc-auth".into())));
        assert!(wanted.contains(&(ChildKind::NetworkPolicy, "test-relay".into())));
        assert!(wanted.contains(&(ChildKind::StatefulSet, "test-db".into())));
        assert!(!wanted.contains(&(ChildKind::PodDisruptionBudget, "test-relay".into())));
        let mut existing = Existing::default();
        for r in &wanted {
            existing.refs.insert(r.clone());
        }
        let extra = [
            (ChildKind::ConfigMap, "test-sync-negentropy"),
            (ChildKind::Deployment, "test-sync-negentropy"),
            (ChildKind::HorizontalPodAutoscaler, "test-sync-negentropy"),
            (ChildKind::PodDisruptionBudget, "test-relay"),
            (ChildKind::Deployment, "test-db"),
            (ChildKind::Secret, "test-old-token"),
        ];
        for (kind, name) in extra {
            existing.refs.insert((kind, name.to_string()));
        }
        let expected: Vec<ChildRef> = [
            (ChildKind::HorizontalPodAutoscaler, "test-sync-negentropy"),
            (ChildKind::PodDisruptionBudget, "test-relay"),
            (ChildKind::Deployment, "test-db"),
            (ChildKind::Deployment, "test-sync-negentropy"),
            (ChildKind::ConfigMap, "test-sync-negentropy"),
        ]
        .into_iter()
        .map(|(k, n)| (k, n.to_string()))
        .collect();
        assert_eq!(orphans(&existing, &wanted), expected);
    }

    #[test]
    fn ownership_needs_namespace_labels_and_the_owner_uid() {
        let owner = Owner {
            namespace: "ns",
            name: "test",
            uid: "uid-1",
        };
        let meta = |ns: &str, instance: &str, uid: &str| -> ObjectMeta {
            serde_json::from_value(json!({
                "name": "test-db", "namespace": ns,
                "labels": {"app.kubernetes.io/managed-by": "orly-operator",
                           "app.kubernetes.io/instance": instance},
                "ownerReferences": [{"apiVersion": "orly.dev/v1alpha1", "kind": "OrlyRelay",
                                     "name": instance, "uid": uid}],
            }))
            .unwrap()
        };
        assert!(owner.owns(&meta("ns", "test", "uid-1")));
        assert!(!owner.owns(&meta("other", "test", "uid-1")));
        assert!(!owner.owns(&meta("ns", "test2", "uid-1")));
        // A leftover of an earlier OrlyRelay of the same name is not ours to prune.
        assert!(!owner.owns(&meta("ns", "test", "uid-0")));
    }

    #[test]
    fn a_service_changing_between_headless_and_not_is_recreated() {
        let svc = |cluster_ip: Option<&str>| -> Service {
            serde_json::from_value(json!({"spec": {"clusterIP": cluster_ip}})).unwrap()
        };
        assert!(service_must_be_recreated(
            &svc(Some("10.0.0.7")),
            &svc(Some("None"))
        ));
        assert!(service_must_be_recreated(&svc(Some("None")), &svc(None)));
        assert!(!service_must_be_recreated(
            &svc(Some("None")),
            &svc(Some("None"))
        ));
        assert!(!service_must_be_recreated(
            &svc(Some("10.0.0.7")),
            &svc(None)
        ));
    }
}
