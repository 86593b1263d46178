//! Reconcile flows against the fake API server: each test is one story of an OrlyRelay, told
//! reconcile by reconcile, checking which children exist, what was sent, and the status.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{reconcile_stored, setup, FakeApi, Harness, NAME, NS};
use http::Method;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams};
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::Api;
use orly_operator::builders::{build_network_policy, CONFIG_HASH_ANNOTATION};
use orly_operator::controller::{error_policy, reconcile, PROGRESSING_REQUEUE, READY_REQUEUE};
use orly_operator::crd::{OrlyRelay, Phase};
use serde_json::json;

fn status(fake: &FakeApi) -> orly_operator::OrlyRelayStatus {
    fake.get::<OrlyRelay>(NS, NAME)
        .and_then(|r| r.status)
        .expect("status written")
}

fn condition(fake: &FakeApi, type_: &str) -> (String, String, String, Option<i64>) {
    let status = status(fake);
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("condition {type_}"));
    (
        c.status.clone(),
        c.reason.clone(),
        c.message.clone(),
        c.observed_generation,
    )
}

/// Writes (everything but GET) sent since the log was last cleared.
fn writes(fake: &FakeApi) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.method != Method::GET)
        .map(|r| r.line())
        .collect()
}

fn generation<K>(fake: &FakeApi, name: &str) -> i64
where
    K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned,
{
    fake.get_json::<K>(NS, name).expect(name)["metadata"]["generation"]
        .as_i64()
        .unwrap()
}

fn event_reasons(fake: &FakeApi) -> Vec<String> {
    fake.names::<Event>(NS)
        .iter()
        .filter_map(|n| fake.get::<Event>(NS, n))
        .filter_map(|e| e.reason)
        .collect()
}

/// Reconcile and mark workloads available until the relay is Ready.
async fn bring_to_ready(fake: &FakeApi, ctx: &Harness) {
    for _ in 0..4 {
        reconcile_stored(fake, ctx).await.expect("reconcile");
        for name in fake.names::<StatefulSet>(NS) {
            fake.mark_available::<StatefulSet>(NS, &name);
        }
        for name in fake.names::<Deployment>(NS) {
            fake.mark_available::<Deployment>(NS, &name);
        }
    }
    reconcile_stored(fake, ctx).await.expect("reconcile");
    assert_eq!(status(fake).phase, Some(Phase::Ready), "{:?}", status(fake));
}

#[tokio::test]
async fn new_relay_gets_only_the_db_tier_and_is_progressing() {
    let (fake, ctx) = setup("sync: {cluster: {enabled: true}}");
    let action = reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(PROGRESSING_REQUEUE));

    assert_eq!(
        writes(&fake),
        [
            "POST /api/v1/namespaces/ns/secrets",
            "PATCH /api/v1/namespaces/ns/configmaps/main-db",
            "PATCH /apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/main-db",
            "PATCH /api/v1/namespaces/ns/services/main-db",
            "PATCH /apis/apps/v1/namespaces/ns/statefulsets/main-db",
            "PATCH /apis/orly.dev/v1alpha1/namespaces/ns/orlyrelays/main/status",
        ]
    );
    // The token every component reads: created once, 32 random bytes in hex.
    let secret = fake
        .get::<Secret>(NS, "main-grpc-auth")
        .expect("token Secret");
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    assert_eq!(token.len(), 64);
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    assert_eq!(
        secret.metadata.owner_references.unwrap()[0].name,
        NAME,
        "garbage-collected with the OrlyRelay"
    );
    // Every child apply is a forced server-side apply under the one field manager.
    for r in fake.requests().iter().filter(|r| r.method == Method::PATCH) {
        assert!(
            r.query.contains("fieldManager=orly-operator"),
            "{}",
            r.query
        );
        assert!(r.query.contains("force=true"), "{}", r.query);
    }
    assert_eq!(fake.names::<StatefulSet>(NS), ["main-db"]);
    assert!(fake.names::<Deployment>(NS).is_empty());
    assert_eq!(fake.names::<ConfigMap>(NS), ["main-db"]);

    let status = status(&fake);
    assert_eq!(status.phase, Some(Phase::Progressing));
    assert_eq!(status.available_tiers, 0);
    let (ready, reason, message, generation) = condition(&fake, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "TierNotAvailable")
    );
    assert!(message.starts_with("waiting for tier db"), "{message}");
    assert_eq!(generation, Some(1));
    let (progressing, reason, _, _) = condition(&fake, "Progressing");
    assert_eq!(
        (progressing.as_str(), reason.as_str()),
        ("True", "RollingOut")
    );
    let names: Vec<_> = status.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["db", "acl", "sync-cluster", "relay"]);
}

#[tokio::test]
async fn once_db_is_available_the_services_tier_follows() {
    let (fake, ctx) = setup("sync: {cluster: {enabled: true}, relaygroup: {enabled: true}}");
    reconcile_stored(&fake, &ctx).await.unwrap();

    // The StatefulSet's controller has not caught up yet: still gated.
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(fake.names::<Deployment>(NS).is_empty());

    fake.mark_available::<StatefulSet>(NS, "main-db");
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(
        fake.names::<Deployment>(NS),
        ["main-acl", "main-sync-cluster", "main-sync-relaygroup"]
    );
    assert_eq!(status(&fake).available_tiers, 1);
    assert!(event_reasons(&fake).contains(&"TierAvailable".to_string()));
    let (_, _, message, _) = condition(&fake, "Progressing");
    assert!(
        message.starts_with("waiting for tier services"),
        "{message}"
    );
}

#[tokio::test]
async fn the_relay_appears_only_after_every_enabled_sync_service_is_available() {
    let (fake, ctx) = setup(
        "sync: {cluster: {enabled: true}, negentropy: {enabled: true}}\nrelay: {nip77: true}",
    );
    reconcile_stored(&fake, &ctx).await.unwrap();
    fake.mark_available::<StatefulSet>(NS, "main-db");
    reconcile_stored(&fake, &ctx).await.unwrap();

    fake.mark_available::<Deployment>(NS, "main-acl");
    fake.mark_available::<Deployment>(NS, "main-sync-cluster");
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(
        fake.get::<Deployment>(NS, "main-relay").is_none(),
        "relay must wait for sync-negentropy"
    );
    let (_, _, message, _) = condition(&fake, "Ready");
    assert!(message.contains("sync-negentropy"), "{message}");

    fake.mark_available::<Deployment>(NS, "main-sync-negentropy");
    reconcile_stored(&fake, &ctx).await.unwrap();
    let relay = fake
        .get::<Deployment>(NS, "main-relay")
        .expect("relay applied");
    assert_eq!(
        relay.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("ghcr.io/orly-relay/orly:1.2.3")
    );
    let relay_config = fake
        .get::<ConfigMap>(NS, "main-relay")
        .unwrap()
        .data
        .unwrap();
    assert_eq!(
        relay_config["ORLY_GRPC_SYNC_NEGENTROPY"],
        "main-sync-negentropy:50064"
    );
    assert_eq!(relay_config["ORLY_NEGENTROPY_ENABLED"], "true");

    fake.mark_available::<Deployment>(NS, "main-relay");
    let action = reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(READY_REQUEUE));
    let status = status(&fake);
    assert_eq!(status.phase, Some(Phase::Ready));
    assert_eq!(status.relay_replicas.as_deref(), Some("1/1"));
    assert_eq!(status.available_tiers, 3);
    assert_eq!(condition(&fake, "Ready").0, "True");
    assert_eq!(condition(&fake, "Progressing").0, "False");
    assert_eq!(condition(&fake, "Degraded").0, "False");
}

#[tokio::test]
async fn a_spec_change_rolls_only_the_changed_components_tier_by_tier() {
    let (fake, ctx) = setup("sync: {cluster: {enabled: true}}");
    bring_to_ready(&fake, &ctx).await;
    let db_generation = generation::<StatefulSet>(&fake, "main-db");
    let cluster_generation = generation::<Deployment>(&fake, "main-sync-cluster");
    let acl_generation = generation::<Deployment>(&fake, "main-acl");
    let relay_generation = generation::<Deployment>(&fake, "main-relay");
    let relay_hash = fake
        .get::<Deployment>(NS, "main-relay")
        .unwrap()
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone();

    // acl.mode feeds acl and the relay: acl rolls first, the relay only once acl is back.
    fake.edit::<OrlyRelay>(NS, NAME, |r| r["spec"]["acl"] = json!({"mode": "follows"}));
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(
        generation::<Deployment>(&fake, "main-acl"),
        acl_generation + 1
    );
    assert_eq!(generation::<StatefulSet>(&fake, "main-db"), db_generation);
    assert_eq!(
        generation::<Deployment>(&fake, "main-sync-cluster"),
        cluster_generation
    );
    assert_eq!(
        generation::<Deployment>(&fake, "main-relay"),
        relay_generation,
        "relay waits while acl rolls"
    );
    for (type_, _) in [("Ready", ()), ("Progressing", ()), ("Degraded", ())] {
        assert_eq!(
            condition(&fake, type_).3,
            Some(2),
            "{type_} carries observedGeneration"
        );
    }
    assert_eq!(status(&fake).phase, Some(Phase::Progressing));

    fake.mark_available::<Deployment>(NS, "main-acl");
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(
        generation::<Deployment>(&fake, "main-relay"),
        relay_generation + 1
    );
    assert_eq!(
        generation::<Deployment>(&fake, "main-sync-cluster"),
        cluster_generation
    );
    let relay = fake.get::<Deployment>(NS, "main-relay").unwrap();
    let new_hash = relay
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone();
    assert_ne!(
        new_hash, relay_hash,
        "config change re-hashes the pod template"
    );
    assert_eq!(
        fake.get::<ConfigMap>(NS, "main-relay")
            .unwrap()
            .data
            .unwrap()["ORLY_ACL_MODE"],
        "follows"
    );
}

#[tokio::test]
async fn disabling_a_sync_service_deletes_its_objects() {
    let (fake, ctx) = setup(
        "sync: {cluster: {enabled: true, autoscaling: {minReplicas: 2, maxReplicas: 4}}, relaygroup: {enabled: true}}",
    );
    bring_to_ready(&fake, &ctx).await;
    assert!(fake
        .get::<HorizontalPodAutoscaler>(NS, "main-sync-cluster")
        .is_some());
    assert!(fake
        .get::<PodDisruptionBudget>(NS, "main-sync-cluster")
        .is_some());

    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["sync"]["cluster"]["enabled"] = json!(false)
    });
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    let deletes: Vec<_> = writes(&fake)
        .into_iter()
        .filter(|w| w.starts_with("DELETE"))
        .collect();
    assert_eq!(
        deletes,
        [
            "DELETE /apis/autoscaling/v2/namespaces/ns/horizontalpodautoscalers/main-sync-cluster",
            "DELETE /apis/policy/v1/namespaces/ns/poddisruptionbudgets/main-sync-cluster",
            "DELETE /apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/main-sync-cluster",
            "DELETE /apis/apps/v1/namespaces/ns/deployments/main-sync-cluster",
            "DELETE /api/v1/namespaces/ns/services/main-sync-cluster",
            "DELETE /api/v1/namespaces/ns/configmaps/main-sync-cluster",
        ]
    );
    assert!(fake.get::<Deployment>(NS, "main-sync-cluster").is_none());
    assert!(fake.get::<Service>(NS, "main-sync-cluster").is_none());
    assert!(fake.get::<ConfigMap>(NS, "main-sync-cluster").is_none());
    assert!(fake.get::<Deployment>(NS, "main-sync-relaygroup").is_some());
    let relay_config = fake
        .get::<ConfigMap>(NS, "main-relay")
        .unwrap()
        .data
        .unwrap();
    assert!(!relay_config.contains_key("ORLY_GRPC_SYNC_CLUSTER"));
    assert!(relay_config.contains_key("ORLY_GRPC_SYNC_RELAYGROUP"));

    // Nothing left to prune: the next reconcile deletes nothing.
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(
        writes(&fake).iter().all(|w| !w.starts_with("DELETE")),
        "{:?}",
        writes(&fake)
    );
}

/// The last body the operator applied to `path_suffix`, since the log was cleared.
fn applied(fake: &FakeApi, path_suffix: &str) -> serde_json::Value {
    fake.requests()
        .into_iter()
        .rev()
        .find(|r| r.method == Method::PATCH && r.path.ends_with(path_suffix))
        .and_then(|r| r.body)
        .unwrap_or_else(|| panic!("{path_suffix} applied"))
}

fn stored_replicas(fake: &FakeApi, name: &str) -> Option<i64> {
    fake.get_json::<Deployment>(NS, name).expect(name)["spec"]["replicas"].as_i64()
}

#[tokio::test]
async fn a_new_autoscaled_deployment_starts_at_the_minimum_and_autoscaling_off_takes_the_count_back(
) {
    let (fake, ctx) = setup("sync: {negentropy: {enabled: true, replicas: 3, autoscaling: {minReplicas: 2, maxReplicas: 6, targetCPUUtilizationPercentage: 70}}}");
    reconcile_stored(&fake, &ctx).await.unwrap();
    fake.mark_available::<StatefulSet>(NS, "main-db");
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(
        applied(&fake, "deployments/main-sync-negentropy")["spec"]["replicas"],
        2
    );
    let hpa = fake
        .get::<HorizontalPodAutoscaler>(NS, "main-sync-negentropy")
        .unwrap()
        .spec
        .unwrap();
    assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 6));

    // Turning autoscaling off removes the HPA and gives replicas back to the Deployment.
    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["sync"]["negentropy"] = json!({"enabled": true, "replicas": 3})
    });
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(fake
        .get::<HorizontalPodAutoscaler>(NS, "main-sync-negentropy")
        .is_none());
    assert_eq!(stored_replicas(&fake, "main-sync-negentropy"), Some(3));
    assert!(fake
        .get::<PodDisruptionBudget>(NS, "main-sync-negentropy")
        .is_some());
}

#[tokio::test]
async fn enabling_autoscaling_on_a_running_deployment_keeps_its_replicas_until_the_hpa_owns_them() {
    const DEPLOYMENT: &str = "main-sync-negentropy";
    let (fake, ctx) = setup("sync: {negentropy: {enabled: true, replicas: 3}}");
    bring_to_ready(&fake, &ctx).await;
    assert_eq!(stored_replicas(&fake, DEPLOYMENT), Some(3));

    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["sync"]["negentropy"]["autoscaling"] = json!({"minReplicas": 2, "maxReplicas": 6})
    });
    // The HPA is created, but the operator keeps applying the running count: dropping it
    // now would let the API server default it to 1.
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(fake
        .get::<HorizontalPodAutoscaler>(NS, DEPLOYMENT)
        .is_some());
    assert_eq!(
        applied(&fake, "deployments/main-sync-negentropy")["spec"]["replicas"],
        3
    );
    assert_eq!(stored_replicas(&fake, DEPLOYMENT), Some(3));

    // The HPA exists but has not written the count: still 3, still the operator's.
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(
        applied(&fake, "deployments/main-sync-negentropy")["spec"]["replicas"],
        3
    );
    assert_eq!(
        fake.replicas_owners::<Deployment>(NS, DEPLOYMENT),
        ["orly-operator"]
    );

    // The HPA controller scales through the scale subresource and so owns the field.
    let deployments: Api<Deployment> = Api::namespaced(fake.client(), NS);
    let hpa_controller = PatchParams {
        field_manager: Some("kube-controller-manager".into()),
        ..PatchParams::default()
    };
    deployments
        .patch_scale(
            DEPLOYMENT,
            &hpa_controller,
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .expect("scaled");
    assert_eq!(
        fake.replicas_owners::<Deployment>(NS, DEPLOYMENT),
        ["kube-controller-manager"]
    );

    // Now the operator leaves replicas out, and the HPA's count stays.
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    let body = applied(&fake, "deployments/main-sync-negentropy");
    assert!(body["spec"].get("replicas").is_none(), "{}", body["spec"]);
    assert_eq!(stored_replicas(&fake, DEPLOYMENT), Some(4));
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(stored_replicas(&fake, DEPLOYMENT), Some(4));
}

#[tokio::test]
async fn a_stale_cache_never_takes_the_count_back_from_the_hpa() {
    const DEPLOYMENT: &str = "main-sync-negentropy";
    let (fake, ctx) = setup("sync: {negentropy: {enabled: true, replicas: 3}}");
    bring_to_ready(&fake, &ctx).await;
    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["sync"]["negentropy"]["autoscaling"] = json!({"minReplicas": 2, "maxReplicas": 6})
    });
    reconcile_stored(&fake, &ctx).await.unwrap();
    ctx.sync(&fake);
    // The HPA scales to 5 after the caches were filled: the operator still believes it alone
    // owns a count of 3.
    let deployments: Api<Deployment> = Api::namespaced(fake.client(), NS);
    let hpa_controller = PatchParams {
        field_manager: Some("kube-controller-manager".into()),
        ..PatchParams::default()
    };
    deployments
        .patch_scale(
            DEPLOYMENT,
            &hpa_controller,
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    fake.clear_requests();
    let stored: OrlyRelay = fake.get(NS, NAME).unwrap();
    reconcile(Arc::new(DeserializeGuard(Ok(stored))), ctx.ctx.clone())
        .await
        .unwrap();
    // The unforced apply of 3 conflicted on .spec.replicas; the count stayed the HPA's.
    let deployment_applies: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == Method::PATCH && r.path.ends_with("deployments/main-sync-negentropy")
        })
        .collect();
    assert_eq!(
        deployment_applies.len(),
        2,
        "an unforced try, then without replicas"
    );
    assert!(!deployment_applies[0].query.contains("force=true"));
    assert_eq!(
        deployment_applies[0].body.as_ref().unwrap()["spec"]["replicas"],
        3
    );
    assert!(deployment_applies[1].query.contains("force=true"));
    assert!(deployment_applies[1].body.as_ref().unwrap()["spec"]
        .get("replicas")
        .is_none());
    assert_eq!(stored_replicas(&fake, DEPLOYMENT), Some(5));
    assert_eq!(
        fake.replicas_owners::<Deployment>(NS, DEPLOYMENT),
        ["kube-controller-manager"]
    );
}

#[tokio::test]
async fn the_fake_api_merges_applies_per_field_manager_like_the_api_server() {
    // What the handoff guards against: the only owner dropping replicas resets them to 1,
    // while a field another manager also owns survives its co-owner leaving it.
    let fake = FakeApi::new();
    let api: Api<Deployment> = Api::namespaced(fake.client(), NS);
    let deployment = |replicas: Option<i32>, label: &str| -> Deployment {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": NS, "labels": {"app.kubernetes.io/name": label}},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}}},
        });
        if let Some(r) = replicas {
            d["spec"]["replicas"] = json!(r);
        }
        serde_json::from_value(d).unwrap()
    };
    let apply = |manager: &str| PatchParams::apply(manager).force();
    api.patch("d", &apply("a"), &Patch::Apply(deployment(Some(3), "x")))
        .await
        .unwrap();
    let d = api
        .patch("d", &apply("a"), &Patch::Apply(deployment(None, "x")))
        .await
        .unwrap();
    assert_eq!(
        d.spec.unwrap().replicas,
        Some(1),
        "dropped by its only owner"
    );

    api.patch("d", &apply("a"), &Patch::Apply(deployment(Some(3), "x")))
        .await
        .unwrap();
    api.patch("d", &apply("b"), &Patch::Apply(deployment(Some(3), "x")))
        .await
        .unwrap();
    let d = api
        .patch("d", &apply("a"), &Patch::Apply(deployment(None, "x")))
        .await
        .unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(3), "b still owns it");
    assert_eq!(fake.replicas_owners::<Deployment>(NS, "d"), ["b"]);

    // Without force, a changed value of a field someone else owns is a conflict.
    let conflict = api
        .patch(
            "d",
            &PatchParams::apply("a"),
            &Patch::Apply(deployment(Some(5), "x")),
        )
        .await
        .expect_err("conflict");
    assert!(conflict.to_string().contains("conflict"), "{conflict}");
    // managedFields tell the story the operator reads.
    let d = api.get("d").await.unwrap();
    let managers: Vec<_> = d
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| (m.manager.unwrap(), m.operation.unwrap()))
        .collect();
    assert_eq!(
        managers,
        [
            ("a".to_string(), "Apply".to_string()),
            ("b".into(), "Apply".into())
        ]
    );
}

#[tokio::test]
async fn a_drained_db_pod_does_not_block_a_relay_image_change() {
    let (fake, ctx) =
        setup("database: {type: postgres, replicas: 3, postgres: {urlSecret: {name: pg}}}");
    bring_to_ready(&fake, &ctx).await;
    let relay_image = |fake: &FakeApi| {
        fake.get::<Deployment>(NS, "main-relay")
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .image
            .clone()
            .unwrap()
    };
    let db_available = |fake: &FakeApi, n: i32| {
        fake.edit::<Deployment>(NS, "main-db", |d| {
            d["status"]["readyReplicas"] = json!(n);
            d["status"]["availableReplicas"] = json!(n);
        })
    };
    // A node drain evicted one db pod; its replacement is not ready yet.
    db_available(&fake, 2);
    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["relay"] = json!({"image": {"tag": "2.0.0"}})
    });
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(relay_image(&fake), "ghcr.io/orly-relay/orly:2.0.0");

    // The rollback goes through as well.
    fake.edit::<OrlyRelay>(NS, NAME, |r| r["spec"]["relay"] = json!({}));
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(relay_image(&fake), "ghcr.io/orly-relay/orly:1.2.3");

    // Two of three db pods gone is more than the PDB allows: the relay waits.
    db_available(&fake, 1);
    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["relay"] = json!({"image": {"tag": "3.0.0"}})
    });
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(relay_image(&fake), "ghcr.io/orly-relay/orly:1.2.3");
    let (_, reason, message, _) = condition(&fake, "Ready");
    assert_eq!(reason, "TierNotAvailable");
    assert!(message.contains("db 1/3 available (needs 2)"), "{message}");
}

#[tokio::test]
async fn a_paused_relay_changes_nothing_and_its_status_says_so() {
    let (fake, ctx) = setup("{}");
    bring_to_ready(&fake, &ctx).await;
    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["metadata"]["annotations"] = json!({"orly.dev/reconcile-paused": "true"});
        r["spec"]["acl"] = json!({"mode": "follows"});
        r["spec"]["networkPolicy"] = json!({"enabled": false});
    });
    fake.remove::<ConfigMap>(NS, "main-relay");
    fake.clear_requests();
    let action = reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let changes: Vec<String> = writes(&fake)
        .into_iter()
        .filter(|w| !w.contains("/events"))
        .collect();
    assert_eq!(
        changes,
        ["PATCH /apis/orly.dev/v1alpha1/namespaces/ns/orlyrelays/main/status"],
        "only the status is written"
    );
    assert!(
        fake.get::<ConfigMap>(NS, "main-relay").is_none(),
        "not recreated"
    );
    assert_eq!(
        fake.get::<ConfigMap>(NS, "main-acl").unwrap().data.unwrap()["ORLY_ACL_MODE"],
        "none"
    );
    assert!(
        fake.get::<NetworkPolicy>(NS, "main-db").is_some(),
        "not pruned"
    );
    let paused = status(&fake);
    assert_eq!(paused.phase, Some(Phase::Paused));
    let (progressing, reason, message, _) = condition(&fake, "Progressing");
    assert_eq!((progressing.as_str(), reason.as_str()), ("False", "Paused"));
    assert!(message.contains("reconcile-paused"), "{message}");
    assert!(event_reasons(&fake).contains(&"Paused".to_string()));
    assert_eq!(paused.available_tiers, 3, "what it sees is still reported");

    // A paused relay stays quiet: nothing to write on the next round.
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(writes(&fake).is_empty(), "{:?}", writes(&fake));

    // Unpaused, everything waiting is done.
    fake.edit::<OrlyRelay>(NS, NAME, |r| r["metadata"]["annotations"] = json!({}));
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(
        fake.get::<ConfigMap>(NS, "main-acl").unwrap().data.unwrap()["ORLY_ACL_MODE"],
        "follows"
    );
    assert!(fake.get::<NetworkPolicy>(NS, "main-db").is_none());
    assert!(event_reasons(&fake).contains(&"Resumed".to_string()));
    assert_ne!(status(&fake).phase, Some(Phase::Paused));
}

#[tokio::test]
async fn every_labelled_child_not_wanted_any_more_is_deleted_and_nothing_else() {
    let (fake, ctx) = setup("relay: {replicas: 3}");
    bring_to_ready(&fake, &ctx).await;
    assert!(fake.get::<PodDisruptionBudget>(NS, "main-relay").is_some());
    let owner_uid = fake
        .get::<OrlyRelay>(NS, NAME)
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let leftover = |name: &str, uid: &str| -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": NS,
                "labels": {"app.kubernetes.io/managed-by": "orly-operator",
                           "app.kubernetes.io/instance": NAME,
                           "app.kubernetes.io/name": "orly"},
                "ownerReferences": [{"apiVersion": "orly.dev/v1alpha1", "kind": "OrlyRelay",
                                     "name": NAME, "uid": uid, "controller": true}],
            },
            "data": {},
        }))
        .unwrap()
    };
    // Left by an older operator version, and one of another owner that only looks alike.
    fake.insert(&leftover("main-sync-cluster", &owner_uid));
    fake.insert(&leftover("main-other", "uid-of-someone-else"));
    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["relay"] = json!({"replicas": 1});
        r["spec"]["networkPolicy"] = json!({"enabled": false});
    });
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    let deletes: Vec<_> = writes(&fake)
        .into_iter()
        .filter(|w| w.starts_with("DELETE"))
        .collect();
    assert_eq!(
        deletes,
        [
            "DELETE /apis/policy/v1/namespaces/ns/poddisruptionbudgets/main-relay",
            "DELETE /apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/main-acl",
            "DELETE /apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/main-db",
            "DELETE /apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/main-relay",
            "DELETE /api/v1/namespaces/ns/configmaps/main-sync-cluster",
        ]
    );
    assert!(fake.get::<ConfigMap>(NS, "main-other").is_some());
    assert!(
        fake.get::<Secret>(NS, "main-grpc-auth").is_some(),
        "never pruned"
    );
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(writes(&fake).iter().all(|w| !w.starts_with("DELETE")));
}

#[tokio::test]
async fn network_policies_are_applied_for_every_component() {
    let (fake, ctx) = setup("sync: {negentropy: {enabled: true}}\nnetworkPolicy: {metricsFrom: [{namespaceSelector: {matchLabels: {team: monitoring}}}]}");
    bring_to_ready(&fake, &ctx).await;
    assert_eq!(
        fake.names::<NetworkPolicy>(NS),
        ["main-acl", "main-db", "main-relay", "main-sync-negentropy"]
    );
    let stored: OrlyRelay = fake.get(NS, NAME).unwrap();
    let plan =
        orly_operator::plan::plan(&stored, &orly_operator::plan::OperatorDefaults::default())
            .unwrap();
    for component in &plan.components {
        let name = component.child_name(NAME);
        let mut expected =
            serde_json::to_value(build_network_policy(&plan, component).unwrap()).unwrap();
        expected["metadata"]["labels"]["app.kubernetes.io/version"] = json!(common::TAG);
        let live = fake.get_json::<NetworkPolicy>(NS, &name).unwrap();
        assert_eq!(live["spec"], expected["spec"], "{name}");
        assert_eq!(live["metadata"]["labels"], expected["metadata"]["labels"]);
    }
}

#[tokio::test]
async fn the_token_secret_is_never_overwritten_and_a_named_one_is_used_as_is() {
    // A Secret of that name made by hand (so not in the operator's labelled cache).
    let fake = FakeApi::new();
    fake.insert(&common::relay("{}"));
    let by_hand: Secret = serde_json::from_value(json!({
        "metadata": {"name": "main-grpc-auth", "namespace": NS},
        "data": {"token": "aGFuZA=="},
    }))
    .unwrap();
    fake.insert(&by_hand);
    let ctx = common::context(&fake);
    reconcile_stored(&fake, &ctx).await.unwrap();
    let secret = fake.get::<Secret>(NS, "main-grpc-auth").unwrap();
    assert_eq!(secret.data.unwrap()["token"].0, b"hand");

    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["grpcAuth"] = json!({"secretName": "mine", "key": "t"})
    });
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(writes(&fake).iter().all(|w| !w.contains("/secrets")));
    let db = fake.get_json::<StatefulSet>(NS, "main-db").unwrap();
    assert_eq!(
        db["spec"]["template"]["spec"]["containers"][0]["env"],
        json!([{"name": "ORLY_GRPC_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "mine", "key": "t", "optional": false}}}])
    );
}

#[tokio::test]
async fn a_cluster_ip_service_of_an_older_operator_is_recreated_headless() {
    let (fake, ctx) = setup("{}");
    let uid = fake
        .get::<OrlyRelay>(NS, NAME)
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let old: Service = serde_json::from_value(json!({
        "metadata": {
            "name": "main-db", "namespace": NS,
            "labels": {"app.kubernetes.io/managed-by": "orly-operator",
                       "app.kubernetes.io/instance": NAME},
            "ownerReferences": [{"apiVersion": "orly.dev/v1alpha1", "kind": "OrlyRelay",
                                 "name": NAME, "uid": uid, "controller": true}],
        },
        "spec": {"type": "ClusterIP", "ports": [{"name": "grpc", "port": 50051}]},
    }))
    .unwrap();
    fake.insert(&old);
    assert_ne!(
        fake.get::<Service>(NS, "main-db")
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("None")
    );
    fake.clear_requests();
    reconcile_stored(&fake, &ctx).await.unwrap();
    let service_writes: Vec<_> = writes(&fake)
        .into_iter()
        .filter(|w| w.contains("/services/"))
        .collect();
    assert_eq!(
        service_writes,
        [
            "DELETE /api/v1/namespaces/ns/services/main-db",
            "PATCH /api/v1/namespaces/ns/services/main-db",
        ]
    );
    assert_eq!(
        fake.get::<Service>(NS, "main-db")
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("None")
    );
}

#[tokio::test]
async fn a_conflict_on_one_child_requeues_with_backoff_and_spares_the_others() {
    let (fake, ctx) = setup("sync: {cluster: {enabled: true}}");
    reconcile_stored(&fake, &ctx).await.unwrap();
    fake.mark_available::<StatefulSet>(NS, "main-db");
    fake.fail(Method::PATCH, "/deployments/main-acl", 409, "Conflict", 2);

    let error = reconcile_stored(&fake, &ctx)
        .await
        .expect_err("conflict surfaces");
    assert!(error.to_string().contains("Deployment main-acl"), "{error}");
    assert!(
        fake.get::<Deployment>(NS, "main-sync-cluster").is_some(),
        "a broken acl does not wedge sync-cluster"
    );
    let status = status(&fake);
    assert_eq!(status.phase, Some(Phase::Degraded));
    let (degraded, reason, message, _) = condition(&fake, "Degraded");
    assert_eq!(
        (degraded.as_str(), reason.as_str()),
        ("True", "ApplyFailed")
    );
    assert!(
        message.contains("409") || message.contains("Conflict"),
        "{message}"
    );
    assert!(event_reasons(&fake).contains(&"ApplyFailed".to_string()));

    let stored: OrlyRelay = fake.get(NS, NAME).unwrap();
    let guard = Arc::new(DeserializeGuard(Ok(stored)));
    assert_eq!(
        error_policy(guard.clone(), &error, ctx.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    let error = reconcile_stored(&fake, &ctx)
        .await
        .expect_err("second conflict");
    assert_eq!(
        error_policy(guard.clone(), &error, ctx.ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );

    // The fault is gone: the retry succeeds and resets the backoff.
    reconcile_stored(&fake, &ctx).await.expect("recovered");
    assert!(fake.get::<Deployment>(NS, "main-acl").is_some());
    assert_eq!(condition(&fake, "Degraded").0, "False");
    assert_eq!(
        error_policy(guard, &error, ctx.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test]
async fn a_server_error_requeues_with_backoff() {
    let (fake, ctx) = setup("{}");
    fake.fail(
        Method::PATCH,
        "/statefulsets/main-db",
        500,
        "InternalError",
        1,
    );
    let error = reconcile_stored(&fake, &ctx)
        .await
        .expect_err("500 surfaces");
    assert!(error.to_string().contains("StatefulSet main-db"), "{error}");
    let stored: OrlyRelay = fake.get(NS, NAME).unwrap();
    assert_eq!(
        error_policy(
            Arc::new(DeserializeGuard(Ok(stored))),
            &error,
            ctx.ctx.clone()
        ),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(status(&fake).phase, Some(Phase::Degraded));
    reconcile_stored(&fake, &ctx).await.expect("retry succeeds");
    assert_eq!(status(&fake).phase, Some(Phase::Progressing));
}

#[tokio::test]
async fn an_undeserializable_relay_is_reported_in_status_and_not_retried() {
    let fake = FakeApi::new();
    let mut raw = serde_json::to_value(common::relay("{}")).unwrap();
    raw["spec"]["database"] = json!({"type": "mysql"});
    fake.insert_json::<OrlyRelay>(raw);
    let ctx = common::context(&fake);
    ctx.sync(&fake);

    // Read it the way the controller's watcher does.
    let api: Api<DeserializeGuard<OrlyRelay>> = Api::namespaced(fake.client(), NS);
    let guard = api.get(NAME).await.expect("guarded get succeeds");
    assert!(guard.0.is_err(), "mysql is not a database type");

    let guard = Arc::new(guard);
    let action = reconcile(guard.clone(), ctx.ctx.clone())
        .await
        .expect("reported, not failed");
    assert_eq!(action, Action::await_change());
    let status = fake.get_json::<OrlyRelay>(NS, NAME).unwrap()["status"].clone();
    assert_eq!(status["phase"], "Invalid");
    assert_eq!(status["conditions"][2]["type"], "Degraded");
    assert_eq!(status["conditions"][2]["reason"], "InvalidSpec");
    assert!(status["conditions"][2]["message"]
        .as_str()
        .unwrap()
        .contains("mysql"));
    assert!(fake.names::<StatefulSet>(NS).is_empty());
    assert!(event_reasons(&fake).contains(&"InvalidObject".to_string()));

    // The status write triggers another reconcile; it must write nothing (no hot loop).
    fake.clear_requests();
    let guard = Arc::new(api.get(NAME).await.unwrap());
    assert_eq!(
        reconcile(guard, ctx.ctx.clone()).await.unwrap(),
        Action::await_change()
    );
    assert!(writes(&fake).is_empty(), "{:?}", writes(&fake));
}

#[tokio::test]
async fn an_inconsistent_spec_is_reported_once_and_waits_for_an_edit() {
    // Two SQLite db replicas, as if stored before the CRD's CEL rules existed.
    let (fake, ctx) = setup("database: {replicas: 2}");
    let action = reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(status(&fake).phase, Some(Phase::Invalid));
    assert_eq!(
        condition(&fake, "Degraded").2,
        "sqlite allows one db replica"
    );
    assert!(fake.names::<StatefulSet>(NS).is_empty());

    // Reconciling again (a resync) writes nothing: no hot loop of status updates.
    fake.clear_requests();
    assert_eq!(
        reconcile_stored(&fake, &ctx).await.unwrap(),
        Action::await_change()
    );
    assert!(writes(&fake).is_empty(), "{:?}", writes(&fake));
}

#[tokio::test]
async fn a_deleted_child_is_recreated() {
    let (fake, ctx) = setup("{}");
    bring_to_ready(&fake, &ctx).await;
    fake.remove::<Service>(NS, "main-acl");
    fake.remove::<ConfigMap>(NS, "main-relay");
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(fake.get::<Service>(NS, "main-acl").is_some());
    assert!(fake.get::<ConfigMap>(NS, "main-relay").is_some());
}

#[tokio::test]
async fn switching_db_to_postgres_replaces_the_stateful_set() {
    let (fake, ctx) = setup("{}");
    bring_to_ready(&fake, &ctx).await;
    fake.edit::<OrlyRelay>(NS, NAME, |r| {
        r["spec"]["database"] = json!({"type": "postgres", "replicas": 2, "postgres": {"urlSecret": {"name": "pg"}}})
    });
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert!(fake.get::<StatefulSet>(NS, "main-db").is_none());
    let db = fake
        .get::<Deployment>(NS, "main-db")
        .expect("db deployment");
    assert_eq!(db.spec.unwrap().replicas, Some(2));
    let service = fake.get::<Service>(NS, "main-db").unwrap();
    assert_eq!(service.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    assert!(fake.get::<PodDisruptionBudget>(NS, "main-db").is_some());
}

/// The real controller, with its watches, against the fake: watch events alone drive the
/// rollout to Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_drives_a_relay_to_ready_through_watch_events() {
    let fake = FakeApi::new();
    let client = fake.client();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(orly_operator::controller::run(
        client,
        orly_operator::controller::ControllerConfig::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    fake.insert(&common::relay("sync: {relaygroup: {enabled: true}}"));

    let wait = |what: &'static str, check: Box<dyn Fn() -> bool + Send>| async move {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    };
    let f = fake.clone();
    wait(
        "db",
        Box::new(move || f.get::<StatefulSet>(NS, "main-db").is_some()),
    )
    .await;
    fake.mark_available::<StatefulSet>(NS, "main-db");
    let f = fake.clone();
    wait(
        "services tier",
        Box::new(move || f.names::<Deployment>(NS).len() == 2),
    )
    .await;
    fake.mark_available::<Deployment>(NS, "main-acl");
    fake.mark_available::<Deployment>(NS, "main-sync-relaygroup");
    let f = fake.clone();
    wait(
        "relay",
        Box::new(move || f.get::<Deployment>(NS, "main-relay").is_some()),
    )
    .await;
    fake.mark_available::<Deployment>(NS, "main-relay");
    let f = fake.clone();
    wait(
        "Ready",
        Box::new(move || {
            f.get::<OrlyRelay>(NS, NAME)
                .and_then(|r| r.status)
                .is_some_and(|s| s.phase == Some(Phase::Ready))
        }),
    )
    .await;

    assert_eq!(
        fake.names::<NetworkPolicy>(NS),
        ["main-acl", "main-db", "main-relay", "main-sync-relaygroup"]
    );
    assert!(fake.get::<Secret>(NS, "main-grpc-auth").is_some());

    // Deleting a child is noticed through the owned-object watch and repaired.
    fake.remove::<Service>(NS, "main-relay");
    let f = fake.clone();
    wait(
        "relay Service recreated",
        Box::new(move || f.get::<Service>(NS, "main-relay").is_some()),
    )
    .await;

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("controller stops")
        .expect("controller task");
}
