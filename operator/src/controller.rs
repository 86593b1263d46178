//! The reconciler: validate → read the children from the watch caches → create the gRPC
//! token Secret → apply tier by tier (each only once the tier below is Available) → prune every
//! child no longer wanted → status and Events; plus the pause annotation, the error policy with
//! backoff and the `Controller` wiring whose child watches fill the caches.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use kube::core::PartialObjectMeta;
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::builders::{build_children, build_grpc_auth_secret, Workload, FIELD_MANAGER};
use crate::children::{
    child_stores, deployment_replicas, orphans, service_must_be_recreated, slim_deployment,
    slim_service, slim_stateful_set, wanted, ChildKind, ChildRef, ChildStores, Existing, Owner,
};
use crate::component::{Component, ComponentExt, Tier};
use crate::crd::{OrlyRelay, OrlyRelayStatus, Phase};
use crate::error::{Error, Result};
use crate::metrics;
use crate::plan::{plan, ComponentPlan, OperatorDefaults, RelayPlan};
use crate::status::{
    compute_status, invalid_status, tier_available, ComponentState, StatusInput,
    WorkloadObservation, PAUSED_MESSAGE,
};

/// Requeue interval once everything is Ready: a safety net, since child watches trigger us.
pub const READY_REQUEUE: Duration = Duration::from_secs(300);
/// Requeue interval while a tier is rolling out.
pub const PROGRESSING_REQUEUE: Duration = Duration::from_secs(30);
/// First retry delay after an error; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Upper bound of the retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Label selecting every child the operator manages.
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=orly-operator";

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub defaults: OperatorDefaults,
    /// The children as the controller's watches last saw them.
    pub stores: ChildStores,
    /// Consecutive failures per OrlyRelay (`namespace/name`), for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context publishing Events as `reporter` and reading children from `stores`.
    pub fn new(
        client: Client,
        defaults: OperatorDefaults,
        reporter: Reporter,
        stores: ChildStores,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            stores,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn record_failure(&self, key: &str) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn reset_failures(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// The reporter identity for Events.
pub fn reporter(instance: Option<String>) -> Reporter {
    Reporter {
        controller: "orly-operator".into(),
        instance,
    }
}

/// Delay before retry number `failures` (1-based): 5s, 10s, 20s, ... capped at 5 minutes.
pub fn backoff_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

fn object_key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or_default())
}

fn guard_key(obj: &DeserializeGuard<OrlyRelay>) -> String {
    match &obj.0 {
        Ok(relay) => object_key(relay.metadata.namespace.as_deref(), &relay.name_any()),
        Err(invalid) => object_key(
            invalid.metadata.namespace.as_deref(),
            invalid.metadata.name.as_deref().unwrap_or_default(),
        ),
    }
}

/// Reconcile one OrlyRelay (or report why it cannot be read).
pub async fn reconcile(obj: Arc<DeserializeGuard<OrlyRelay>>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let key = guard_key(&obj);
    let result = match &obj.0 {
        Ok(relay) => reconcile_relay(relay, &ctx).await,
        Err(invalid) => report_invalid_object(invalid, &ctx).await,
    };
    metrics::record_reconcile(started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        ctx.reset_failures(&key);
    }
    result
}

/// Requeue with exponential backoff per object, so one failing OrlyRelay never spins.
pub fn error_policy(
    obj: Arc<DeserializeGuard<OrlyRelay>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = guard_key(&obj);
    let failures = ctx.record_failure(&key);
    let delay = backoff_delay(failures);
    warn!(object = %key, failures, delay_secs = delay.as_secs(), error = %error, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// An object that does not deserialize: say so in its status once and wait for an edit.
async fn report_invalid_object(invalid: &InvalidObject, ctx: &Context) -> Result<Action> {
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let namespace = invalid.metadata.namespace.clone().unwrap_or_default();
    let message = format!("OrlyRelay does not match the schema: {}", invalid.error);
    warn!(object = %name, error = %invalid.error, "OrlyRelay does not deserialize");
    // The guard keeps only metadata; read the current status untyped so that an unchanged
    // report is not written again (a new transition time would trigger another reconcile).
    let raw: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &namespace,
        &ApiResource::erase::<OrlyRelay>(&()),
    );
    let previous: Option<OrlyRelayStatus> = raw
        .get_opt(&name)
        .await?
        .and_then(|o| o.data.get("status").cloned())
        .and_then(|s| serde_json::from_value(s).ok());
    let status = invalid_status(
        invalid.metadata.generation,
        &message,
        previous.as_ref(),
        now(),
    );
    if previous.as_ref() == Some(&status) {
        return Ok(Action::await_change());
    }
    patch_status(&ctx.client, &namespace, &name, &status).await?;
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(OrlyRelay::api_version(&()).into_owned()),
        kind: Some(OrlyRelay::kind(&()).into_owned()),
        name: Some(name),
        namespace: Some(namespace),
        uid: invalid.metadata.uid.clone(),
        ..Default::default()
    };
    publish(
        ctx,
        &reference,
        EventType::Warning,
        "InvalidObject",
        "Validate",
        message,
    )
    .await;
    Ok(Action::await_change())
}

fn now() -> Time {
    Time(Timestamp::now())
}

async fn reconcile_relay(relay: &OrlyRelay, ctx: &Context) -> Result<Action> {
    let name = relay.name_any();
    let namespace = relay.namespace().unwrap_or_default();
    let reference = relay.object_ref(&());
    let previous = relay.status.as_ref();

    if is_paused(&relay.metadata) {
        return report_paused(relay, ctx).await;
    }

    // validate
    let plan = match plan(relay, &ctx.defaults) {
        Ok(plan) => plan,
        Err(Error::InvalidSpec(message)) => {
            let status = invalid_status(relay.metadata.generation, &message, previous, now());
            if previous != Some(&status) {
                patch_status(&ctx.client, &namespace, &name, &status).await?;
                publish(
                    ctx,
                    &reference,
                    EventType::Warning,
                    "InvalidSpec",
                    "Validate",
                    message,
                )
                .await;
            }
            return Ok(Action::await_change());
        }
        Err(other) => return Err(other),
    };

    // what exists, from the watch caches
    let existing = existing_children(ctx, &plan).await?;
    let mut errors: Vec<Error> = Vec::new();
    let mut deleted: BTreeSet<ChildRef> = BTreeSet::new();

    // the gRPC token every component reads must exist before any pod starts
    if plan.grpc_auth.generated && !existing.has(ChildKind::Secret, &plan.grpc_auth.secret_name) {
        if let Err(error) = create_grpc_auth_secret(&ctx.client, &plan).await {
            warn!(relay = %name, error = %error, "creating the gRPC token Secret failed");
            errors.push(error);
        }
    }

    // apply, tier by tier
    let mut states: Vec<(Component, ComponentState)> = Vec::new();
    let mut gate_open = true;
    for tier in Tier::ALL {
        for component in plan
            .components
            .iter()
            .filter(|c| c.component.tier() == tier)
        {
            let state = if gate_open {
                match apply_component(&ctx.client, &plan, component, &existing, &mut deleted).await
                {
                    Ok(observation) => ComponentState::Observed(observation),
                    Err(error) => {
                        warn!(relay = %name, component = %component.component, error = %error, "applying component failed");
                        let state = ComponentState::Failed {
                            desired: component.initial_replicas(),
                            message: error.to_string(),
                        };
                        errors.push(error);
                        state
                    }
                }
            } else {
                existing.observe(&plan, component)
            };
            states.push((component.component, state));
        }
        if gate_open && !tier_available(&states, tier) {
            debug!(relay = %name, tier = %tier, "tier not available yet; higher tiers wait");
            gate_open = false;
        }
    }

    // prune every child that is no longer wanted
    let wanted = wanted(&plan);
    for (kind, child) in orphans(&existing, &wanted) {
        if deleted.contains(&(kind, child.clone())) {
            continue;
        }
        match delete_child(&ctx.client, &plan, kind, &child).await {
            Ok(()) => {
                info!(relay = %name, kind = ?kind, child = %child, "deleted a child that is no longer wanted")
            }
            Err(error) => {
                warn!(relay = %name, kind = ?kind, child = %child, error = %error, "deleting an orphaned child failed");
                errors.push(error);
            }
        }
    }

    // status and events
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let status = compute_status(&StatusInput {
        generation: relay.metadata.generation,
        components: &states,
        errors: &messages,
        previous,
        now: now(),
        paused: false,
    });
    if previous != Some(&status) {
        patch_status(&ctx.client, &namespace, &name, &status).await?;
    }
    publish_transitions(ctx, &reference, previous, &status, &messages).await;

    match errors.len() {
        0 if status.phase == Some(Phase::Ready) => Ok(Action::requeue(READY_REQUEUE)),
        0 => Ok(Action::requeue(PROGRESSING_REQUEUE)),
        1 => Err(errors.remove(0)),
        _ => Err(Error::Children(errors)),
    }
}

/// Whether the `orly.dev/reconcile-paused` annotation stops every change.
pub fn is_paused(meta: &ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(orly_consts::RECONCILE_PAUSED_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// A paused OrlyRelay: apply and delete nothing, only report what the caches show, with
/// Progressing=False (reason Paused) and phase Paused.
async fn report_paused(relay: &OrlyRelay, ctx: &Context) -> Result<Action> {
    let name = relay.name_any();
    let namespace = relay.namespace().unwrap_or_default();
    let previous = relay.status.as_ref();
    let mut states = Vec::new();
    // An invalid spec has nothing to observe; the pause is still what the status says.
    if let Ok(plan) = plan(relay, &ctx.defaults) {
        let existing = existing_children(ctx, &plan).await?;
        states = plan
            .components
            .iter()
            .map(|c| (c.component, existing.observe(&plan, c)))
            .collect();
    }
    let status = compute_status(&StatusInput {
        generation: relay.metadata.generation,
        components: &states,
        errors: &[],
        previous,
        now: now(),
        paused: true,
    });
    if previous != Some(&status) {
        patch_status(&ctx.client, &namespace, &name, &status).await?;
    }
    if previous.and_then(|p| p.phase) != Some(Phase::Paused) {
        info!(relay = %name, "reconcile paused by annotation");
        publish(
            ctx,
            &relay.object_ref(&()),
            EventType::Normal,
            "Paused",
            "Reconcile",
            PAUSED_MESSAGE.to_string(),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// How long a reconcile waits for the child caches' first lists before it gives up.
const CACHE_READY_TIMEOUT: Duration = Duration::from_secs(30);

async fn existing_children(ctx: &Context, plan: &RelayPlan) -> Result<Existing> {
    match tokio::time::timeout(CACHE_READY_TIMEOUT, ctx.stores.wait_until_ready()).await {
        Ok(Ok(())) => Ok(ctx.stores.existing(&Owner::of(plan))),
        Ok(Err(_)) => Err(Error::CacheNotReady("a child watch stopped".into())),
        Err(_) => Err(Error::CacheNotReady(format!(
            "the child watches have not listed their objects in {}s",
            CACHE_READY_TIMEOUT.as_secs()
        ))),
    }
}

async fn publish_transitions(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    previous: Option<&OrlyRelayStatus>,
    status: &OrlyRelayStatus,
    errors: &[String],
) {
    if previous.and_then(|p| p.phase) == Some(Phase::Paused) {
        publish(
            ctx,
            reference,
            EventType::Normal,
            "Resumed",
            "Reconcile",
            "the reconcile-paused annotation is gone; reconciling again".into(),
        )
        .await;
    }
    let before = previous.map_or(0, |p| p.available_tiers);
    for tier in Tier::ALL
        .iter()
        .take(status.available_tiers as usize)
        .skip(before as usize)
    {
        let next = Tier::ALL
            .get(*tier as usize + 1)
            .map_or("all tiers are available".to_string(), |t| {
                format!("rolling out tier {t}")
            });
        publish(
            ctx,
            reference,
            EventType::Normal,
            "TierAvailable",
            "Rollout",
            format!("tier {tier} is available; {next}"),
        )
        .await;
    }
    if status.available_tiers < before {
        publish(
            ctx,
            reference,
            EventType::Warning,
            "TierUnavailable",
            "Rollout",
            format!(
                "tier {} is no longer available",
                Tier::ALL[status.available_tiers as usize]
            ),
        )
        .await;
    }
    if !errors.is_empty() {
        publish(
            ctx,
            reference,
            EventType::Warning,
            "ApplyFailed",
            "Apply",
            errors.join("; "),
        )
        .await;
    }
}

/// Events are advisory: a failure to publish one is logged, never fails the reconcile.
async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, reference).await {
        warn!(reason, error = %error, "publishing event failed");
    }
}

/// Write the status through the status subresource with the operator's field manager.
pub async fn patch_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &OrlyRelayStatus,
) -> Result<()> {
    // Guarded, so that writing the status of an object our types cannot read still works.
    let api: Api<DeserializeGuard<OrlyRelay>> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": OrlyRelay::api_version(&()),
        "kind": OrlyRelay::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Status {
        name: name.to_string(),
        source,
    })?;
    Ok(())
}

fn child_error(
    component: Component,
    action: &'static str,
    kind: &'static str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Child {
        component,
        action,
        kind,
        name,
        source,
    }
}

async fn apply<K>(client: &Client, namespace: &str, obj: &K, component: Component) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(child_error(component, "apply", kind_of::<K>(), &name))
}

/// Apply an autoscaled Deployment that still carries `spec.replicas` (the handoff). Not
/// forced at first: should the cache be behind and the HPA (or `kubectl scale`) already own a
/// different count, the API server answers with a conflict on `.spec.replicas` instead of the
/// operator taking the count back; then the count is theirs and is left out. A conflict on
/// other fields only is overridden as every apply does.
async fn apply_during_handoff(
    client: &Client,
    namespace: &str,
    deployment: &Deployment,
    component: Component,
) -> Result<Deployment> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let name = deployment.metadata.name.clone().unwrap_or_default();
    match api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(deployment),
        )
        .await
    {
        Ok(applied) => Ok(applied),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let mut deployment = deployment.clone();
            if conflicts_on_replicas(&status.message) {
                info!(deployment = %name, "another manager owns replicas; leaving them to it");
                if let Some(spec) = deployment.spec.as_mut() {
                    spec.replicas = None;
                }
            }
            apply(client, namespace, &deployment, component).await
        }
        Err(source) => Err(child_error(component, "apply", "Deployment", &name)(source)),
    }
}

/// Whether an apply conflict names `.spec.replicas` (the API server lists each conflicting
/// field as `conflict with "<manager>" ...: .spec.replicas`).
pub fn conflicts_on_replicas(message: &str) -> bool {
    message
        .split([',', '\n'])
        .any(|part| part.trim_end().ends_with(".spec.replicas"))
}

async fn delete<K>(client: &Client, namespace: &str, name: &str, component: Component) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        // Already gone is the outcome we wanted.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(child_error(component, "delete", kind_of::<K>(), name)(
            source,
        )),
    }
}

fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "ConfigMap" => "ConfigMap",
        "Service" => "Service",
        "Deployment" => "Deployment",
        "StatefulSet" => "StatefulSet",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "HorizontalPodAutoscaler" => "HorizontalPodAutoscaler",
        _ => "object",
    }
}

/// Apply every child of one component; returns its workload's counts from the apply response.
async fn apply_component(
    client: &Client,
    plan: &RelayPlan,
    component: &ComponentPlan,
    existing: &Existing,
    deleted: &mut BTreeSet<ChildRef>,
) -> Result<WorkloadObservation> {
    let ns = plan.namespace.as_str();
    let c = component.component;
    let name = component.child_name(&plan.name);
    let replicas = deployment_replicas(
        component,
        existing.deployments.get(&name).map(|d| d.as_ref()),
        existing.has(ChildKind::HorizontalPodAutoscaler, &name),
    );
    let children = build_children(plan, component, replicas);
    apply(client, ns, &children.config_map, c).await?;
    // Closed before the pods start: the policy goes in ahead of the workload.
    if let Some(policy) = &children.network_policy {
        apply(client, ns, policy, c).await?;
    }
    if existing
        .services
        .get(&name)
        .is_some_and(|live| service_must_be_recreated(live, &children.service))
    {
        delete::<Service>(client, ns, &name, c).await?;
        deleted.insert((ChildKind::Service, name.clone()));
    }
    apply(client, ns, &children.service, c).await?;
    let tolerance = component.max_unavailable();
    let observation = match &children.workload {
        Workload::Deployment(d) => {
            // db switching from sqlite to postgres leaves a StatefulSet with the same
            // selector behind; it goes before the Deployment takes the pods over.
            if existing.has(ChildKind::StatefulSet, &name) {
                delete::<StatefulSet>(client, ns, &name, c).await?;
                deleted.insert((ChildKind::StatefulSet, name.clone()));
            }
            let applied = if component.autoscaling.is_some() && replicas.is_some() {
                apply_during_handoff(client, ns, d.as_ref(), c).await?
            } else {
                apply(client, ns, d.as_ref(), c).await?
            };
            WorkloadObservation::from_deployment(&applied, tolerance)
        }
        Workload::StatefulSet(s) => {
            if existing.has(ChildKind::Deployment, &name) {
                delete::<Deployment>(client, ns, &name, c).await?;
                deleted.insert((ChildKind::Deployment, name.clone()));
            }
            WorkloadObservation::from_stateful_set(
                &apply(client, ns, s.as_ref(), c).await?,
                tolerance,
            )
        }
    };
    if let Some(pdb) = &children.pdb {
        apply(client, ns, pdb, c).await?;
    }
    if let Some(hpa) = &children.hpa {
        apply(client, ns, hpa, c).await?;
    }
    Ok(observation)
}

/// A fresh token: 32 random bytes from the OS, hex.
fn new_grpc_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Create the token Secret unless it exists. A create, not an apply: an existing Secret
/// (even one the cache has not seen yet) is never overwritten, so the token never changes.
async fn create_grpc_auth_secret(client: &Client, plan: &RelayPlan) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &plan.namespace);
    let secret = build_grpc_auth_secret(plan, &new_grpc_token());
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&params, &secret).await {
        Ok(_) => {
            info!(relay = %plan.name, secret = %plan.grpc_auth.secret_name, "created the gRPC token Secret");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(Error::Secret {
            name: plan.grpc_auth.secret_name.clone(),
            source,
        }),
    }
}

/// Delete one child of `plan` by kind and name.
async fn delete_child(
    client: &Client,
    plan: &RelayPlan,
    kind: ChildKind,
    name: &str,
) -> Result<()> {
    let ns = plan.namespace.as_str();
    // The component named in errors: the suffix after `<relay>-`, when it is one.
    let component = name
        .strip_prefix(&format!("{}-", plan.name))
        .and_then(Component::from_name)
        .unwrap_or(Component::Relay);
    match kind {
        ChildKind::HorizontalPodAutoscaler => {
            delete::<HorizontalPodAutoscaler>(client, ns, name, component).await
        }
        ChildKind::PodDisruptionBudget => {
            delete::<PodDisruptionBudget>(client, ns, name, component).await
        }
        ChildKind::NetworkPolicy => delete::<NetworkPolicy>(client, ns, name, component).await,
        ChildKind::Deployment => delete::<Deployment>(client, ns, name, component).await,
        ChildKind::StatefulSet => delete::<StatefulSet>(client, ns, name, component).await,
        ChildKind::Service => delete::<Service>(client, ns, name, component).await,
        ChildKind::ConfigMap => delete::<ConfigMap>(client, ns, name, component).await,
        // Never pruned (see ChildKind::Secret); nothing to do.
        ChildKind::Secret => Ok(()),
    }
}

/// Settings of the running controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Watch only this namespace (WATCH_NAMESPACE); all namespaces when `None`.
    pub namespace: Option<String>,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// Image defaults.
    pub defaults: OperatorDefaults,
    /// Events' reporting instance (the pod name).
    pub instance: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            concurrency: 4,
            defaults: OperatorDefaults::default(),
            instance: None,
        }
    }
}

fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Drop what no decision reads, so the caches stay small.
fn drop_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Run the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = config.namespace.as_deref();
    let (stores, writers) = child_stores();
    let ctx = Arc::new(Context::new(
        client.clone(),
        config.defaults.clone(),
        reporter(config.instance.clone()),
        stores,
    ));
    // One watch per child kind, label-selected: it triggers the owner's reconcile and fills
    // the cache the reconcile reads, instead of listing every kind on every reconcile.
    let children = watcher::Config::default()
        .labels(MANAGED_BY_SELECTOR)
        .any_semantic();
    info!(namespace = ?ns, "starting OrlyRelay controller");
    Controller::new(
        scoped_api::<DeserializeGuard<OrlyRelay>>(&client, ns),
        watcher::Config::default().any_semantic(),
    )
    .owns_stream(
        watcher(
            scoped_api::<PartialObjectMeta<ConfigMap>>(&client, ns),
            children.clone(),
        )
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(writers.config_maps)
        .touched_objects(),
    )
    // Full objects where a decision reads their content, cut down to that content.
    .owns_stream(
        watcher(scoped_api::<Service>(&client, ns), children.clone())
            .default_backoff()
            .modify(slim_service)
            .reflect(writers.services)
            .touched_objects(),
    )
    .owns_stream(
        watcher(scoped_api::<Deployment>(&client, ns), children.clone())
            .default_backoff()
            .modify(slim_deployment)
            .reflect(writers.deployments)
            .touched_objects(),
    )
    .owns_stream(
        watcher(scoped_api::<StatefulSet>(&client, ns), children.clone())
            .default_backoff()
            .modify(slim_stateful_set)
            .reflect(writers.stateful_sets)
            .touched_objects(),
    )
    .owns_stream(
        watcher(
            scoped_api::<PartialObjectMeta<PodDisruptionBudget>>(&client, ns),
            children.clone(),
        )
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(writers.pdbs)
        .touched_objects(),
    )
    .owns_stream(
        watcher(
            scoped_api::<PartialObjectMeta<HorizontalPodAutoscaler>>(&client, ns),
            children.clone(),
        )
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(writers.hpas)
        .touched_objects(),
    )
    .owns_stream(
        watcher(
            scoped_api::<PartialObjectMeta<NetworkPolicy>>(&client, ns),
            children.clone(),
        )
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(writers.network_policies)
        .touched_objects(),
    )
    // Metadata only: the operator never holds a token in memory beyond creating it.
    .owns_stream(
        watcher(
            scoped_api::<PartialObjectMeta<Secret>>(&client, ns),
            children,
        )
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(writers.secrets)
        .touched_objects(),
    )
    .with_config(controller::Config::default().concurrency(config.concurrency))
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((object, _)) => debug!(object = %object.name, "reconciled"),
            Err(error) => debug!(error = %error, "reconcile did not complete"),
        }
    })
    .await;
    info!("OrlyRelay controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_is_on_replicas_only_when_the_api_server_names_that_field() {
        // The API server's wording, one field per line after the first.
        let scale = "Apply failed with 1 conflict: conflict with \"kube-controller-manager\" with subresource \"scale\" using apps/v1: .spec.replicas";
        assert!(conflicts_on_replicas(scale));
        let two = "Apply failed with 2 conflicts: conflicts with \"kubectl-edit\" using apps/v1:\n- .spec.template.spec.containers[name=\"orly\"].image\n- .spec.replicas";
        assert!(conflicts_on_replicas(two));
        let image = "Apply failed with 1 conflict: conflict with \"kubectl-edit\" using apps/v1: .spec.template.spec.containers[name=\"orly\"].image";
        assert!(!conflicts_on_replicas(image));
    }

    #[test]
    fn only_a_true_annotation_pauses() {
        let meta = |value: Option<&str>| ObjectMeta {
            annotations: value.map(|v| {
                [(
                    orly_consts::RECONCILE_PAUSED_ANNOTATION.to_string(),
                    v.to_string(),
                )]
                .into()
            }),
            ..ObjectMeta::default()
        };
        assert!(is_paused(&meta(Some("true"))));
        assert!(is_paused(&meta(Some(" True "))));
        assert!(!is_paused(&meta(Some("false"))));
        assert!(!is_paused(&meta(Some(""))));
        assert!(!is_paused(&meta(None)));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let delays: Vec<u64> = (1..=8).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }
}
