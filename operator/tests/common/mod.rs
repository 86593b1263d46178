//! Helpers shared by the integration tests: the fake API server, OrlyRelay fixtures, and a
//! reconcile context whose child caches are filled from the fake before every reconcile (as
//! the controller's watches would have filled them).

#![allow(dead_code)] // each test binary uses a different part

pub mod examples;
pub mod fake_api;

use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::Resource;
use orly_operator::children::{
    child_stores, slim_deployment, slim_service, slim_stateful_set, ChildWriters,
};
use orly_operator::controller::{reconcile, reporter, Context};
use orly_operator::crd::{OrlyRelay, OrlyRelaySpec};
use orly_operator::plan::OperatorDefaults;
use serde::de::DeserializeOwned;

pub use fake_api::FakeApi;

/// Namespace of every test OrlyRelay.
pub const NS: &str = "ns";
/// Name of the test OrlyRelay.
pub const NAME: &str = "main";
/// Image tag the test operator defaults to.
pub const TAG: &str = "1.2.3";

/// An OrlyRelay named [`NAME`] in [`NS`] with the spec given as YAML.
pub fn relay(spec_yaml: &str) -> OrlyRelay {
    let spec: OrlyRelaySpec = serde_yaml::from_str(spec_yaml).expect("spec parses");
    let mut relay = OrlyRelay::new(NAME, spec);
    relay.metadata.namespace = Some(NS.into());
    relay
}

/// A reconcile context on the fake and the writers of its child caches.
pub struct Harness {
    pub ctx: Arc<Context>,
    writers: Mutex<ChildWriters>,
}

/// Replace one cache's content with what the fake holds (a watch's re-list), each object
/// cut down by `slim` as the controller's watch does.
fn relist<K>(writer: &mut Writer<K>, objects: Vec<serde_json::Value>, slim: fn(&mut K))
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + 'static,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        let mut object: K = serde_json::from_value(object).expect("cached object deserializes");
        slim(&mut object);
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

fn keep<K>(_: &mut K) {}

impl Harness {
    /// Fill every child cache from the fake's current objects.
    pub fn sync(&self, fake: &FakeApi) {
        let mut w = self.writers.lock().unwrap();
        relist(&mut w.config_maps, fake.all_json::<ConfigMap>(), keep);
        relist(&mut w.services, fake.all_json::<Service>(), slim_service);
        relist(
            &mut w.deployments,
            fake.all_json::<Deployment>(),
            slim_deployment,
        );
        relist(
            &mut w.stateful_sets,
            fake.all_json::<StatefulSet>(),
            slim_stateful_set,
        );
        relist(&mut w.pdbs, fake.all_json::<PodDisruptionBudget>(), keep);
        relist(
            &mut w.hpas,
            fake.all_json::<HorizontalPodAutoscaler>(),
            keep,
        );
        relist(
            &mut w.network_policies,
            fake.all_json::<NetworkPolicy>(),
            keep,
        );
        relist(&mut w.secrets, fake.all_json::<Secret>(), keep);
    }
}

/// A reconcile context talking to `fake`.
pub fn context(fake: &FakeApi) -> Harness {
    let (stores, writers) = child_stores();
    Harness {
        ctx: Arc::new(Context::new(
            fake.client(),
            OperatorDefaults {
                repository: "ghcr.io/orly-relay".into(),
                tag: TAG.into(),
            },
            reporter(Some("test".into())),
            stores,
        )),
        writers: Mutex::new(writers),
    }
}

/// A fake holding one OrlyRelay with `spec_yaml`, and a context on it.
pub fn setup(spec_yaml: &str) -> (FakeApi, Harness) {
    let fake = FakeApi::new();
    fake.insert(&relay(spec_yaml));
    let ctx = context(&fake);
    (fake, ctx)
}

/// Run one reconcile of the stored OrlyRelay, as the controller would after a watch event,
/// with the caches up to date.
pub async fn reconcile_stored(
    fake: &FakeApi,
    harness: &Harness,
) -> orly_operator::Result<kube::runtime::controller::Action> {
    harness.sync(fake);
    let stored: OrlyRelay = fake.get(NS, NAME).expect("relay stored");
    reconcile(Arc::new(DeserializeGuard(Ok(stored))), harness.ctx.clone()).await
}
